//! GPU tests: run only where a GPU is usable; elsewhere each test prints why it skipped and
//! passes. The NVRTC compile of wrnc's own augmentation kernel runs wherever NVRTC loads.

use wrnc_compiler::ast::Precision;
use wrnc_compiler::graph::Graph;
use wrnc_compiler::passes::Mode;
use wrnc_compiler::schedule::Layout;
use wrnc_runtime::cuda::{self, augment, cache::ModuleCache, check, device::Gpu};

fn gpu() -> Option<Gpu> {
    match Gpu::open(0) {
        Ok(g) => Some(g),
        Err(e) => {
            eprintln!("skipped: no usable GPU ({e})");
            None
        }
    }
}

fn graph(body: &str) -> Graph {
    let text = format!("network \"t\" {{ input 3x8x8 classes 3 {body} }}");
    wrnc_grammar::build(&wrnc_grammar::Source::inline(text.as_str())).unwrap()
}

#[test]
fn augmentation_kernel_compiles_with_nvrtc() {
    if let Err(e) = wrnc_runtime::nvrtc::library() {
        eprintln!("skipped: NVRTC not available ({e})");
        return;
    }
    for p in [Precision::F32, Precision::Bf16] {
        let ptx = wrnc_runtime::nvrtc::compile_ptx(&augment::source(p), "sm_90")
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(ptx.contains(augment::KERNEL), "{p:?}");
    }
}

#[test]
fn augmentation_matches_the_cpu_bit_for_bit() {
    let Some(gpu) = gpu() else { return };
    let r = check::check_augment(&gpu, &ModuleCache::new(None)).unwrap();
    assert!(r.passed, "{r:?}");
}

#[test]
fn small_wrn_matches_the_cpu_reference() {
    let Some(gpu) = gpu() else { return };
    let g = graph("conv(3x3, 4) residual { pre bn relu body conv(3x3, 6, stride=2) bn relu dropout(0.3) conv(3x3, 6) shortcut proj } bn relu gap fc");
    let cache = ModuleCache::new(None);
    for mode in [Mode::Train, Mode::Infer] {
        for unfused in [false, true] {
            for p in [Precision::F32, Precision::Bf16] {
                for layout in [Layout::Nchw, Layout::Nhwc] {
                    let r = check::check_graph(
                        &gpu,
                        &cache,
                        "wrn",
                        &g,
                        mode,
                        2,
                        p,
                        unfused,
                        &Default::default(),
                        layout,
                    )
                    .unwrap();
                    assert!(r.passed, "{layout:?} {r:?}");
                }
            }
        }
    }
}

#[test]
fn device_info_is_consistent() {
    let Ok(info) = cuda::is_available() else {
        eprintln!("skipped: no usable GPU");
        return;
    };
    assert!(info.compute_capability.0 >= 3, "{info:?}");
    assert!(info.free_bytes <= info.total_bytes);
    assert!(info.arch().starts_with("sm_"));
}
