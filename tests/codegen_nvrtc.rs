//! Every kernel of a training step and of inference, fused and unfused, f32 and bf16, compiles
//! with NVRTC for sm_80 and sm_90; WRN-28-10's training step generates and compiles in well
//! under 10 s. Skips (with the reason printed) when libnvrtc cannot be loaded, except under CI
//! (`CI` set), where a missing NVRTC is a failure.

use std::time::Instant;
use wrnc_compiler::ast::Precision;
use wrnc_compiler::codegen::cuda;
use wrnc_compiler::passes::{Fusion, Mode};
use wrnc_compiler::schedule::{self, Layout, Options};
use wrnc_runtime::nvrtc;

/// Held by every test of this file while it compiles, so the tests run one at a time and the
/// compile time `wrn_28_10_compiles_quickly` measures is not shared with a sibling test's.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn nvrtc_available() -> bool {
    match nvrtc::library() {
        Ok(_) => true,
        Err(e) if std::env::var_os("CI").is_some() => panic!("CI is set and NVRTC is missing: {e}"),
        Err(e) => {
            eprintln!("skipping: {e}");
            false
        }
    }
}

/// WRN-28-10's graph, with this file's NVRTC lock held; `None` (skipped, said) without NVRTC.
fn wrn_28_10_for_nvrtc() -> Option<(
    std::sync::MutexGuard<'static, ()>,
    wrnc_compiler::graph::Graph,
)> {
    if !nvrtc_available() {
        return None;
    }
    Some((one_at_a_time(), graph("WRN-28-10")))
}

/// The tiles `wgmma` takes: those of at least 64 rows.
fn wgmma_tiles() -> impl Iterator<Item = schedule::TcTile> {
    schedule::TcTile::CANDIDATES
        .into_iter()
        .filter(|t| t.rows >= 64)
}

fn graph(text: &str) -> wrnc_compiler::graph::Graph {
    wrnc_grammar::build(&wrnc_grammar::Source::inline(text))
        .unwrap_or_else(|d| panic!("{text}\n{d:?}"))
}

/// Compiles `g` in both modes, fused and unfused, both precisions, and each layout of `layouts`.
fn compile_all(
    name: &str,
    g: &wrnc_compiler::graph::Graph,
    batch: u32,
    archs: &[&str],
    layouts: &[Layout],
) {
    for mode in [Mode::Train, Mode::Infer] {
        for unfused in [false, true] {
            for (precision, &layout) in [Precision::F32, Precision::Bf16]
                .into_iter()
                .flat_map(|p| layouts.iter().map(move |l| (p, l)))
            {
                let opts = Options {
                    tiles: Default::default(),
                    layout,
                    mode,
                    batch,
                    precision,
                    fusion: Fusion {
                        unfused,
                        disabled: vec![],
                    },
                };
                let s = schedule::build(g, &opts).unwrap();
                let src = cuda::write(&s, &opts).unwrap();
                for arch in archs {
                    let ptx = nvrtc::compile_ptx(&src, arch).unwrap_or_else(|e| {
                        panic!("{name} {mode:?} unfused={unfused} {precision:?} {layout:?} {arch}: {e}")
                    });
                    for k in &s.kernels {
                        assert!(
                            ptx.contains(&format!(".entry {}(", k.name)),
                            "{name}: kernel {} missing from the PTX",
                            k.name
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn small_networks_of_every_family_compile() {
    let _serial = one_at_a_time();
    if !nvrtc_available() {
        return;
    }
    let nets = [
        "conv(3x3, 4) residual { pre bn relu body conv(3x3, 6, stride=2) bn relu dropout(0.3) conv(3x3, 6) shortcut proj } bn relu gap fc",
        "conv(3x3, 4) bn relu residual { body conv(3x3, 6, stride=2) bn relu conv(3x3, 6) bn shortcut zeropad post relu } gap fc",
        "conv(3x3, 4) bn relu residual { body conv(1x1, 4) bn relu conv(3x3, 4, groups=2) bn relu conv(1x1, 8) bn shortcut projbn post relu } gap fc",
        "conv(3x3, 4) dense { bn relu conv(1x1, 4) bn relu conv(3x3, 2) } bn relu conv(1x1, 4) avgpool(2x2) bn relu gap fc",
        "conv(3x3, 4) bn residual { body bn conv(3x3, 5) bn relu conv(3x3, 5) bn shortcut zeropad survival 0.5 } bn relu gap fc",
        "conv(3x3, 4, stride=2, bias) bn relu maxpool(3x3, stride=2, pad=1) bn relu gap fc",
    ];
    for (i, body) in nets.iter().enumerate() {
        let g = graph(&format!(
            "network \"t{i}\" {{ input 3x8x8 classes 3 {body} }}"
        ));
        compile_all(
            &format!("net {i}"),
            &g,
            4,
            &["sm_80", "sm_90"],
            &[Layout::Nchw, Layout::Nhwc],
        );
    }
}

#[test]
fn wrn_28_10_compiles_quickly() {
    let _serial = one_at_a_time();
    if !nvrtc_available() {
        return;
    }
    let g = graph("network WRN-28-10\ndropout 0.3");
    let t = Instant::now();
    let opts = Options {
        mode: Mode::Train,
        batch: 128,
        ..Options::default()
    };
    let s = schedule::build(&g, &opts).unwrap();
    let src = cuda::write(&s, &opts).unwrap();
    nvrtc::compile_ptx(&src, "sm_90").unwrap();
    let took = t.elapsed();
    eprintln!(
        "WRN-28-10 training step: {} kernels, {} launches, generated + NVRTC in {took:?}",
        s.kernels.len(),
        s.launches.len()
    );
    assert!(took.as_secs_f64() < 10.0, "took {took:?}");
    // one kernel per distinct shape: far fewer kernels than launches
    assert!(
        s.kernels.len() * 2 < s.launches.len(),
        "{} kernels for {} launches",
        s.kernels.len(),
        s.launches.len()
    );
    compile_all("WRN-28-10", &g, 128, &["sm_80"], &[Layout::Auto]);
}

#[test]
fn compile_errors_carry_the_log() {
    let _serial = one_at_a_time();
    if !nvrtc_available() {
        return;
    }
    let e = nvrtc::compile_ptx(
        "extern \"C\" __global__ void k() { undeclared_thing(); }",
        "sm_80",
    )
    .unwrap_err();
    assert!(e.to_string().contains("undeclared_thing"), "{e}");
    assert!(matches!(
        nvrtc::compile_ptx("", "sm80"),
        Err(nvrtc::NvrtcError::Arch(_))
    ));
}

/// Every network in `examples/`: the kernels of a training step and of inference, fused and
/// unfused, at batch 128, compile with NVRTC for sm_80 and sm_90 (f32; bf16 too for a few).
/// One NVRTC module per (network, mode, fusion, precision, arch), compiled on all cores.
#[test]
fn every_example_compiles() {
    let _serial = one_at_a_time();
    if !nvrtc_available() {
        return;
    }
    const BF16_TOO: &[&str] = &["wrn-28-10.net", "resnet-50-imagenet.net", "custom.net"];
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "net"))
        .collect();
    files.sort();
    assert!(files.len() >= 10, "examples/ has {} networks", files.len());
    let mut jobs = vec![];
    for path in &files {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let bytes = std::fs::read(path).unwrap();
        let src = wrnc_grammar::source_from_bytes(&format!("examples/{file}"), &bytes)
            .unwrap_or_else(|d| panic!("{}", d.render()));
        let g = wrnc_grammar::build(&src).unwrap_or_else(|d| panic!("{}", d.render()));
        let precisions: &[Precision] = if BF16_TOO.contains(&file.as_str()) {
            &[Precision::F32, Precision::Bf16]
        } else {
            &[Precision::F32]
        };
        for mode in [Mode::Train, Mode::Infer] {
            for unfused in [false, true] {
                for &precision in precisions {
                    let opts = Options {
                        tiles: Default::default(),
                        layout: Default::default(),
                        mode,
                        batch: 128,
                        precision,
                        fusion: Fusion {
                            unfused,
                            disabled: vec![],
                        },
                    };
                    let s = schedule::build(&g, &opts)
                        .unwrap_or_else(|e| panic!("{file} {mode:?} unfused={unfused}: {e}"));
                    let src = cuda::write(&s, &opts).unwrap();
                    let names: Vec<String> = s.kernels.iter().map(|k| k.name.clone()).collect();
                    let what = format!(
                        "{file} {mode:?} {} {precision:?}",
                        if unfused { "unfused" } else { "fused" }
                    );
                    for arch in ["sm_80", "sm_90"] {
                        jobs.push((what.clone(), arch, src.clone(), names.clone()));
                    }
                }
            }
        }
    }
    let t = Instant::now();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(8);
    let report = std::sync::Mutex::new(vec![]);
    std::thread::scope(|sc| {
        for _ in 0..workers {
            sc.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some((what, arch, src, names)) = jobs.get(i) else {
                    break;
                };
                let t0 = Instant::now();
                let ptx =
                    nvrtc::compile_ptx(src, arch).unwrap_or_else(|e| panic!("{what} {arch}: {e}"));
                for k in names {
                    assert!(
                        ptx.contains(&format!(".entry {k}(")),
                        "{what} {arch}: no {k}"
                    );
                }
                report.lock().unwrap().push(format!(
                    "{what} {arch}: {} kernels, {:.2} s",
                    names.len(),
                    t0.elapsed().as_secs_f64()
                ));
            });
        }
    });
    let mut report = report.into_inner().unwrap();
    report.sort();
    for l in &report {
        eprintln!("{l}");
    }
    let kernels: usize = jobs.iter().map(|j| j.3.len()).sum();
    eprintln!(
        "{} networks, {} NVRTC modules, {kernels} kernels, {workers} threads: {:.1} s",
        files.len(),
        jobs.len(),
        t.elapsed().as_secs_f64()
    );
}

/// Static shared memory per kernel in `ptx`: the sizes of the `.shared` declarations local to
/// it (their mangled names hold `<length><kernel>E`).
fn shared_bytes(ptx: &str, kernel: &str) -> u64 {
    let local = format!("{}{kernel}E", kernel.len());
    ptx.lines()
        .filter(|l| l.trim_start().starts_with(".shared") && l.contains(&local))
        .filter_map(|l| {
            let (_, rest) = l.rsplit_once('[')?;
            let n: u64 = rest.split(']').next()?.parse().ok()?;
            let elem = if l.contains(".b8") {
                1
            } else if l.contains(".b32") || l.contains(".f32") || l.contains(".u32") {
                4
            } else if l.contains(".b16") || l.contains(".u16") {
                2
            } else {
                8
            };
            Some(n * elem)
        })
        .sum()
}

/// Every tensor-core tile ([`schedule::TcTile::CANDIDATES`]) of WRN-28-10's fused bf16
/// training step compiles for sm_80 and sm_90, each conv kernel within the 48 KiB of static
/// shared memory a block may have.
#[test]
fn every_tensor_core_tile_compiles_within_static_shared_memory() {
    let _serial = one_at_a_time();
    if !nvrtc_available() {
        return;
    }
    let g = graph("network WRN-28-10\ndropout 0.3");
    for tile in schedule::TcTile::CANDIDATES {
        let opts = Options {
            mode: Mode::Train,
            batch: 128,
            precision: Precision::Bf16,
            tiles: schedule::Tiles::all(tile),
            ..Options::default()
        };
        let s = schedule::build(&g, &opts).unwrap();
        let src = cuda::write(&s, &opts).unwrap();
        for arch in ["sm_80", "sm_90"] {
            let ptx =
                nvrtc::compile_ptx(&src, arch).unwrap_or_else(|e| panic!("{tile} {arch}: {e}"));
            let mut most = 0;
            for k in s.kernels.iter().filter(|k| k.spec.conv_geom().is_some()) {
                assert!(
                    ptx.contains(&format!(".entry {}(", k.name)),
                    "{tile}: {} missing",
                    k.name
                );
                let b = shared_bytes(&ptx, &k.name);
                assert!(
                    b > 0 && b <= 48 * 1024,
                    "{tile} {arch}: {} has {b} bytes of shared memory",
                    k.name
                );
                most = most.max(b);
            }
            eprintln!("tile {tile} {arch}: compiles; largest static shared memory of a conv kernel {most} bytes");
        }
    }
}

/// Register pressure, from ptxas itself (NVRTC compiling to machine code for sm_80 and sm_90,
/// `ptxas -v`; no GPU): no kernel of WRN-28-10's fused training step or inference, f32 and
/// bf16 (the training step with every tensor-core tile), spills a register, and each reports the registers and static shared memory it uses
/// (every conv kernel within the 48 KiB a block may have without opting in).
#[test]
fn no_kernel_of_wrn_28_10_spills() {
    let _serial = one_at_a_time();
    if !nvrtc_available() {
        return;
    }
    let g = graph("network WRN-28-10\ndropout 0.3");
    let default = schedule::TcTile::DEFAULT;
    let mut cases = vec![
        (Mode::Train, Precision::F32, "sm_80", default, 128),
        (Mode::Train, Precision::Bf16, "sm_80", default, 128),
        (Mode::Train, Precision::Bf16, "sm_90", default, 128),
        (Mode::Infer, Precision::Bf16, "sm_90", default, 128),
        // batch 1: every forward conv but the stem and the 1x1 projections split-K
        (Mode::Infer, Precision::Bf16, "sm_90", default, 1),
    ];
    // and every other tensor-core tile's bf16 training step
    for t in schedule::TcTile::CANDIDATES
        .into_iter()
        .filter(|t| !t.is_default())
    {
        cases.push((Mode::Train, Precision::Bf16, "sm_90", t, 128));
    }
    for (mode, precision, arch, tile, batch) in cases {
        let opts = Options {
            mode,
            batch,
            precision,
            tiles: schedule::Tiles::all(tile),
            ..Options::default()
        };
        let s = schedule::build(&g, &opts).unwrap();
        let split = s.kernels.iter().filter(|k| k.name.contains("_sk")).count();
        // (split-K weight gradients in training on every engine, split-K forward convs at
        // batch 1)
        assert_eq!(
            split > 0,
            mode == Mode::Train || batch == 1,
            "{mode:?} batch {batch}"
        );
        let src = cuda::write(&s, &opts).unwrap();
        let r = nvrtc::ptxas_resources(&src, arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
        let tag = format!(
            "{mode:?} {} {arch} tile {tile} batch {batch}",
            precision.name()
        );
        assert_eq!(r.len(), s.kernels.len(), "{tag}: one report per kernel");
        for k in &r {
            assert!(
                s.kernels.iter().any(|x| x.name == k.name),
                "{tag}: {} is not a kernel of the schedule",
                k.name
            );
            assert!(k.registers > 0 && k.registers <= 255, "{tag}: {k:?}");
            assert_eq!(k.spill_stores + k.spill_loads, 0, "{tag}: {k:?} spills");
            assert!(k.shared <= 48 * 1024, "{tag}: {k:?}");
        }
        let most = r.iter().max_by_key(|k| k.registers).unwrap();
        eprintln!(
            "{tag}: {} kernels, none spills; most registers {} ({}), most shared memory {} bytes",
            r.len(),
            most.registers,
            most.name,
            r.iter().map(|k| k.shared).max().unwrap()
        );
    }
}

/// `precompile_for` compiles a run's modules on several threads at once (as `wrnc selftest`,
/// `wrnc bench` and the tile search do before their first executor): each cache entry is the
/// CUBIN that NVRTC gives the same source compiled alone, duplicates compile once, and a second
/// call finds everything cached.
#[test]
fn precompiling_on_threads_matches_one_by_one() {
    if !nvrtc_available() {
        return;
    }
    let _g = one_at_a_time();
    let g = graph("WRN-10-2");
    let mut sources = vec![];
    for mode in [Mode::Train, Mode::Infer] {
        for unfused in [false, true] {
            let opts = Options {
                mode,
                batch: 2,
                precision: Precision::Bf16,
                fusion: Fusion {
                    unfused,
                    disabled: vec![],
                },
                ..Options::default()
            };
            let s = schedule::build(&g, &opts).unwrap();
            sources.push(wrnc_runtime::cuda::exec::module_source(&s, &opts.fusion).unwrap());
        }
    }
    sources.push(sources[0].clone());
    let dir = tempfile::tempdir().unwrap();
    let cache = wrnc_runtime::cuda::cache::ModuleCache::new(Some(dir.path().to_path_buf()));
    let p = wrnc_runtime::cuda::exec::precompile_for("sm_90", &cache, sources.clone(), 4).unwrap();
    assert_eq!((p.modules, p.compiled, p.threads), (4, 4, 4), "{p:?}");
    let version = nvrtc::version().unwrap();
    for src in &sources[..4] {
        assert!(!src.wgmma);
        let key = wrnc_runtime::cuda::cache::key(&src.text, "sm_90", version);
        let cached = cache.get(&key).expect("an entry per source");
        // machine code for sm_90, as NVRTC makes it again
        assert!(nvrtc::is_cubin(&cached));
        assert_eq!(cached, nvrtc::compile_cubin(&src.text, "sm_90").unwrap());
    }
    let again = wrnc_runtime::cuda::exec::precompile_for("sm_90", &cache, sources, 4).unwrap();
    assert_eq!((again.modules, again.compiled), (4, 0), "{again:?}");
}

/// The warpgroup-MMA engine (`Tiles::wgmma`) compiles for `sm_90a` at every tile it takes,
/// and ptxas (run by NVRTC) reports no spills, no stack frame, no warning or performance note
/// (such as serialized `wgmma`) and at most 48 KiB of static shared memory for WRN-28-10's
/// training step and inference in bf16.
#[test]
fn layout_probes_compile_for_sm_90a_without_spills() {
    if !nvrtc_available() {
        return;
    }
    let _g = one_at_a_time();
    for (src, name) in [
        (cuda::wgmma_probe_source(), cuda::WGMMA_PROBE_KERNEL),
        (cuda::tma_probe_source(), cuda::TMA_PROBE_KERNEL),
    ] {
        let r = nvrtc::ptxas_resources(&src, "sm_90a").unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(r[0].name, name);
        assert_no_spill_frame_or_note(name, &r);
    }
}

#[test]
fn wgmma_kernels_of_wrn_28_10_compile_for_sm_90a_without_spills() {
    let Some((_g, g)) = wrn_28_10_for_nvrtc() else {
        return;
    };
    for tile in wgmma_tiles() {
        for mode in [Mode::Train, Mode::Infer] {
            let opts = Options {
                mode,
                batch: 128,
                precision: Precision::Bf16,
                tiles: schedule::Tiles {
                    wgmma: true,
                    ..schedule::Tiles::all(tile)
                },
                ..Options::default()
            };
            let s = schedule::build(&g, &opts).unwrap();
            assert!(s.uses_wgmma());
            let arch = s.nvrtc_arch("sm_90");
            let src = cuda::write(&s, &opts).unwrap();
            let r = nvrtc::ptxas_resources(&src, &arch).unwrap_or_else(|e| panic!("{tile}: {e}"));
            let wg: Vec<_> = r.iter().filter(|k| k.name.contains("_wg")).collect();
            assert!(!wg.is_empty(), "{tile} {mode:?}: no wgmma kernel");
            assert_no_spill_frame_or_note(&tile.to_string(), &r);
            for k in &r {
                assert!(k.shared <= 48 * 1024, "{tile}: {k:?}");
            }
            let most = wg.iter().max_by_key(|k| k.registers).unwrap();
            eprintln!(
                "{mode:?} tile {tile} {arch}: {} wgmma kernels, most registers {} ({})",
                wg.len(),
                most.registers,
                most.name
            );
        }
    }
}

/// Stages of 64 (`Tiles::k64`): WRN-28-10's bf16 training step at every tile of at least 64
/// rows, with operands by `cp.async` and by TMA, compiles for `sm_90a` with `_k64` kernels
/// (four k16 steps on the 128-byte swizzle's descriptors), no spills, no stack frame, no
/// ptxas note (no serialized `wgmma`), and each `_k64` kernel's ring in dynamic shared memory
/// at most [`schedule::K64_SMEM`] plus the alignment slack.
#[test]
fn k64_kernels_of_wrn_28_10_compile_for_sm_90a_without_spills() {
    let Some((_g, g)) = wrn_28_10_for_nvrtc() else {
        return;
    };
    for tile in wgmma_tiles() {
        for tma in [false, true] {
            let opts = Options {
                mode: Mode::Train,
                batch: 128,
                precision: Precision::Bf16,
                tiles: schedule::Tiles {
                    wgmma: true,
                    tma,
                    k64: true,
                    ..schedule::Tiles::all(tile)
                },
                ..Options::default()
            };
            let s = schedule::build(&g, &opts).unwrap();
            let what = format!("{tile} tma {tma}");
            let src = cuda::write(&s, &opts).unwrap();
            assert!(src.contains("wrnc_wgmma_desc128(smem_, As_"), "{what}");
            let r = nvrtc::ptxas_resources(&src, &s.nvrtc_arch("sm_90"))
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            let wide: Vec<_> = r.iter().filter(|k| k.name.contains("_k64")).collect();
            assert!(
                wide.len() >= 8,
                "{what}: {} kernels with stages of 64",
                wide.len()
            );
            assert_no_spill_frame_or_note(&what, &r);
            for k in s.kernels.iter().filter(|k| k.name.contains("_k64")) {
                let d = k.spec.dynamic_smem();
                assert!(
                    d > schedule::TC_STATIC_SMEM && d <= schedule::K64_SMEM + 1024,
                    "{what}: {}: {d}",
                    k.name
                );
            }
            let most = wide.iter().max_by_key(|k| k.registers).unwrap();
            eprintln!(
                "{what}: {} kernels with stages of 64, most registers {} ({})",
                wide.len(),
                most.registers,
                most.name
            );
        }
    }
}

/// ptxas's verdict on every kernel of a module (`what` names it in a failure): no spills, no
/// stack frame (a wgmma's accumulators in local memory), no note (ptxas serializes wgmma,
/// C7515, when it cannot keep the accumulators in place).
fn assert_no_spill_frame_or_note(what: &str, r: &[nvrtc::KernelResources]) {
    for k in r {
        assert_eq!(k.spill_stores + k.spill_loads, 0, "{what}: {k:?} spills");
        assert_eq!(
            k.stack_frame, 0,
            "{what}: {k:?}: accumulators in local memory"
        );
        assert!(k.notes.is_empty(), "{what}: {k:?}");
    }
}

/// The warpgroup-MMA engine in plain TF32 (`--wgmma --tf32`): WRN-28-10's f32 training step
/// at 64x64, 128x128 and 128x64 with 4 stages (a wgmma kept in flight in the forward and
/// data-gradient passes) compiles for `sm_90a` with `wgmma ... .tf32` in all three passes (the
/// weight gradient's through its transposing pass), and ptxas reports no spills, no stack frame
/// and no note (no serialized `wgmma`).
#[test]
fn tf32_wgmma_kernels_of_wrn_28_10_compile_for_sm_90a_without_spills() {
    if !nvrtc_available() {
        return;
    }
    let _g = one_at_a_time();
    let g = graph("WRN-28-10");
    let t = |rows, cols| schedule::TcTile { rows, cols };
    for (tile, stages) in [(t(64, 64), 0), (t(128, 128), 0), (t(128, 64), 4)] {
        let opts = Options {
            batch: 128,
            precision: Precision::F32,
            tiles: schedule::Tiles {
                wgmma: true,
                stages,
                ..schedule::Tiles::all(tile).with_f32_math(schedule::F32Math::Tf32)
            },
            ..Options::default()
        };
        let s = schedule::build(&g, &opts).unwrap();
        assert!(s.uses_wgmma());
        let arch = s.nvrtc_arch("sm_90");
        let src = cuda::write(&s, &opts).unwrap();
        let ptx = nvrtc::compile_ptx(&src, &arch).unwrap_or_else(|e| panic!("{tile}: {e}"));
        assert!(ptx.contains(".f32.tf32.tf32"), "{tile}: no TF32 wgmma");
        let r = nvrtc::ptxas_resources(&src, &arch).unwrap_or_else(|e| panic!("{tile}: {e}"));
        let wg: Vec<_> = r.iter().filter(|k| k.name.contains("_wg")).collect();
        assert!(wg.len() >= 30, "{tile}: {} wgmma kernels", wg.len());
        let wgrad = wg
            .iter()
            .filter(|k| k.name.starts_with("conv_bwd_weight"))
            .count();
        assert!(wgrad >= 5, "{tile}: {wgrad} weight-gradient wgmma kernels");
        assert_no_spill_frame_or_note(&tile.to_string(), &r);
        let most = wg.iter().max_by_key(|k| k.registers).unwrap();
        eprintln!(
            "tf32 tile {tile} stages {stages} {arch}: {} wgmma kernels, most registers {} ({})",
            wg.len(),
            most.registers,
            most.name
        );
    }
}

/// Deep pipelines (`Tiles::stages`) whose `cp.async` ring lives in dynamic shared memory
/// compile for sm_80 (`mma.sync`) and sm_90a (`wgmma`) in WRN-28-10's bf16 training step: no
/// spills, no stack frame, no ptxas note; the kernels that take dynamic shared memory declare
/// almost none statically (the epilogue's reduction arrays), and static plus dynamic stay
/// within sm_80's opt-in limit of 163 KiB per block.
#[test]
fn deep_pipelines_of_wrn_28_10_compile_in_dynamic_shared_memory() {
    if !nvrtc_available() {
        return;
    }
    let _g = one_at_a_time();
    let g = graph("WRN-28-10");
    let t = |rows, cols| schedule::TcTile { rows, cols };
    for (arch, tile, stages, wgmma) in [
        ("sm_80", t(128, 128), 4, false),
        ("sm_90", t(128, 64), 4, true),
    ] {
        let opts = Options {
            batch: 128,
            precision: Precision::Bf16,
            tiles: schedule::Tiles {
                wgmma,
                stages,
                ..schedule::Tiles::all(tile)
            },
            ..Options::default()
        };
        let s = schedule::build(&g, &opts).unwrap();
        let src = cuda::write(&s, &opts).unwrap();
        let arch = s.nvrtc_arch(arch);
        let r = nvrtc::ptxas_resources(&src, &arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
        let mut dynamic = 0;
        for k in &r {
            let spec = &s.kernels.iter().find(|x| x.name == k.name).unwrap().spec;
            let d = spec.dynamic_smem() as u64;
            assert_eq!(k.spill_stores + k.spill_loads, 0, "{arch}: {k:?} spills");
            assert_eq!(k.stack_frame, 0, "{arch}: {k:?}");
            assert!(k.notes.is_empty(), "{arch}: {k:?}");
            if d > 0 {
                dynamic += 1;
                assert!(d > 48 * 1024 - 4096, "{arch}: {k:?}: {d}");
                assert!(
                    k.shared <= 4096,
                    "{arch}: {k:?}: static shared beside the dynamic ring"
                );
                assert!(k.shared + d <= 163 * 1024, "{arch}: {k:?}: {d} dynamic");
            }
        }
        assert!(
            dynamic >= 10,
            "{arch} {tile} s{stages}: {dynamic} kernels with dynamic shared memory"
        );
        let most = r.iter().max_by_key(|k| k.registers).unwrap();
        eprintln!(
            "{arch} tile {tile} stages {stages}: {dynamic} kernels in dynamic shared memory, most registers {} ({})",
            most.registers, most.name
        );
    }
}

/// The weight operand by Hopper's tensor memory accelerator (`Tiles::tma`) in WRN-28-10's bf16
/// training step compiles for sm_90a with real NVRTC and ptxas, at the default tile (3 stages)
/// and at 128x64 with 4 (dynamic shared memory, a wgmma in flight): every `wgmma` kernel but
/// three of the convs from the 16-channel stem (a weight box larger than its tensor) and only
/// those take a tensor map and issue `cp.async.bulk.tensor` on `mbarrier`s, with no
/// spills, no stack frame and no ptxas note (a serialized wgmma would be one), and little
/// beside the ring (mbarriers, and the padding of the ring's 1024-byte alignment).
#[test]
fn tma_kernels_of_wrn_28_10_compile_for_sm_90a() {
    if !nvrtc_available() {
        return;
    }
    let _g = one_at_a_time();
    let g = graph("WRN-28-10");
    let t = |rows, cols| schedule::TcTile { rows, cols };
    for (tile, stages) in [(schedule::TcTile::DEFAULT, 0), (t(128, 64), 4)] {
        let opts = Options {
            batch: 128,
            precision: Precision::Bf16,
            tiles: schedule::Tiles {
                wgmma: true,
                tma: true,
                stages,
                ..schedule::Tiles::all(tile)
            },
            ..Options::default()
        };
        let s = schedule::build(&g, &opts).unwrap();
        let src = cuda::write(&s, &opts).unwrap();
        let arch = s.nvrtc_arch("sm_90");
        assert_eq!(arch, "sm_90a");
        let ptx = nvrtc::compile_ptx(&src, &arch).unwrap_or_else(|e| panic!("{tile}: {e}"));
        assert!(ptx.contains(
            "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
        ));
        assert!(ptx.contains("mbarrier.try_wait.parity.shared::cta.b64"));
        // the 64-byte swizzle is a function of address bits: the rings are 1024-byte aligned
        // (static arrays at the default tile, dynamic shared memory at 4 stages), and each
        // kernel checks it
        let align = if stages == 0 {
            ".shared .align 1024 .b8"
        } else {
            ".extern .shared .align 1024 .b8 wrnc_dsmem_"
        };
        assert!(ptx.contains(align), "{tile} s{stages}: no `{align}`");
        assert!(ptx.contains("trap;"), "{tile} s{stages}");
        let r = nvrtc::ptxas_resources(&src, &arch).unwrap_or_else(|e| panic!("{tile}: {e}"));
        let (mut tma, mut tma_a, mut wg_only) = (0, 0, 0);
        for k in &r {
            let spec = &s.kernels.iter().find(|x| x.name == k.name).unwrap().spec;
            let g = spec.conv_geom();
            assert!(!g.is_some_and(|g| g.tma && !g.wgmma), "{}", k.name);
            // (the weight gradient's wgmma kernels never take TMA: their stages land [k][m])
            let wgrad = matches!(spec, schedule::KernelSpec::ConvBwdWeight { .. });
            wg_only += (g.is_some_and(|g| g.wgmma && !g.tma) && !wgrad) as usize;
            assert_eq!(
                spec.tmap_params().len(),
                g.is_some_and(|g| g.tma) as usize + g.is_some_and(|g| g.tma_a) as usize
            );
            tma_a += g.is_some_and(|g| g.tma_a) as usize;
            assert_eq!(k.spill_stores + k.spill_loads, 0, "{tile}: {k:?} spills");
            assert_eq!(k.stack_frame, 0, "{tile}: {k:?}");
            assert!(k.notes.is_empty(), "{tile}: {k:?}");
            if g.is_some_and(|g| g.tma) {
                tma += 1;
                let ring = g.unwrap().async_smem(true);
                let stat = if ring.dynamic { 0 } else { ring.bytes as u64 };
                assert!(k.shared <= stat + 64 + 4096, "{tile}: {k:?}");
            }
        }
        assert!(tma >= 20, "{tile} s{stages}: {tma} TMA kernels");
        // wgmma without TMA only where the weight's box would be larger than its tensor: the
        // convs from the 16-channel stem, their data gradients (16 input channels against the
        // tile's columns) and the 1x1 shortcut's forward (a reduction of 16)
        assert!(
            wg_only <= 3,
            "{tile} s{stages}: {wg_only} wgmma kernels without TMA"
        );
        // the stride-1 convs of 160 to 640 channels take their activations by TMA too: at
        // 32x32, 16x16 and 8x8, every tile of 64 or 128 pixels is a box of the image
        assert!(
            tma_a >= 12,
            "{tile} s{stages}: {tma_a} kernels with activations by TMA"
        );
        let most = r.iter().max_by_key(|k| k.registers).unwrap();
        eprintln!(
            "sm_90a tile {tile} stages {stages}: {tma} TMA kernels ({tma_a} with activations), most registers {} ({})",
            most.registers, most.name
        );
    }
}

/// 3xTF32 (`--tf32x3`) and plain TF32 (`--tf32`): WRN-28-10's fused f32 training step with
/// every conv on the tensor cores, at the default tile and at the largest (128x128: a 64x32
/// warp tile, the most registers), compiles for sm_80 with TF32 `mma.sync` and
/// `cvt.rna.tf32`, no conv kernel spills, and each stays within 48 KiB of static shared
/// memory (plain TF32's 128x128 for sm_90 too; on sm_80 it spilled 48 bytes before its
/// k-steps were kept rolled). Both engines: NCHW (operands gathered element by element) and
/// NHWC, `Auto`'s choice, where every conv but the stem loads f32 runs by `cp.async`
/// (`_v8`; the 128x128 ring in dynamic shared memory).
#[test]
fn tf32x3_kernels_of_wrn_28_10_compile_for_sm_80_without_spills() {
    if !nvrtc_available() {
        return;
    }
    let _g = one_at_a_time();
    let g = graph("WRN-28-10");
    let t = |rows, cols| schedule::TcTile { rows, cols };
    let (x3, tf32) = (schedule::F32Math::Tf32x3, schedule::F32Math::Tf32);
    let (d, nchw, auto) = (
        schedule::TcTile::DEFAULT,
        schedule::Layout::Nchw,
        schedule::Layout::Auto,
    );
    for (math, tile, arch, layout) in [
        (x3, d, "sm_80", nchw),
        (x3, t(128, 128), "sm_80", nchw),
        (tf32, d, "sm_80", nchw),
        (tf32, t(128, 128), "sm_80", nchw),
        (tf32, t(128, 128), "sm_90", nchw),
        (x3, d, "sm_80", auto),
        (x3, t(128, 128), "sm_80", auto),
        (tf32, d, "sm_80", auto),
        (tf32, t(128, 128), "sm_80", auto),
        (tf32, t(128, 128), "sm_90", auto),
    ] {
        let opts = Options {
            batch: 128,
            precision: Precision::F32,
            layout,
            tiles: schedule::Tiles::all(tile).with_f32_math(math),
            ..Options::default()
        };
        let s = schedule::build(&g, &opts).unwrap();
        let vec = s
            .kernels
            .iter()
            .filter(|k| k.spec.conv_geom().is_some_and(|g| g.vec))
            .count();
        if layout == auto {
            assert!(vec >= 20, "{math:?} {tile}: {vec} vector-loading convs");
        } else {
            assert_eq!(vec, 0);
        }
        let src = cuda::write(&s, &opts).unwrap();
        let ptx = nvrtc::compile_ptx(&src, arch).unwrap_or_else(|e| panic!("{tile}: {e}"));
        assert!(ptx.contains("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32"));
        assert!(ptx.contains("cvt.rna.tf32.f32"));
        // the K-contiguous f32 tiles' fragments are read by ldmatrix (32-bit elements)
        assert!(ptx.contains("ldmatrix.sync.aligned.m8n8.x4.shared.b16"));
        let r = nvrtc::ptxas_resources(&src, arch).unwrap_or_else(|e| panic!("{tile}: {e}"));
        let mut x3 = 0;
        for k in &r {
            let spec = &s.kernels.iter().find(|x| x.name == k.name).unwrap().spec;
            if spec.conv_geom().is_some_and(|g| g.tf32x3 || g.tf32) {
                x3 += 1;
                assert_eq!(k.spill_stores + k.spill_loads, 0, "{tile}: {k:?} spills");
                assert!(k.shared <= 48 * 1024, "{tile}: {k:?}");
            }
        }
        assert!(x3 >= 20, "{math:?} {tile}: {x3} TF32 kernels");
        let most = r.iter().max_by_key(|k| k.registers).unwrap();
        eprintln!(
            "{arch} {math:?} {} tile {tile}: {x3} conv kernels ({vec} vector-loading), most registers {} ({})",
            layout.name(),
            most.registers,
            most.name
        );
    }
}
