//! The GPU backend's host-side logic, without a GPU: device layout of every example's
//! schedules, argument packing, the written-before-read property the arena relies on, the
//! PTX cache, bf16 conversion. Data-driven over `examples/*.net` plus small inline networks.

use std::collections::BTreeSet;
use std::path::Path;

use wrnc_compiler::ast::Precision;
use wrnc_compiler::graph::Graph;
use wrnc_compiler::passes::{Fusion, Mode};
use wrnc_compiler::schedule::{self, Options, ScalarArg, Schedule};
use wrnc_runtime::cuda::cache::{self, ModuleCache};
use wrnc_runtime::cuda::exec::{bf16_to_f32, decode, encode, f32_to_bf16};
use wrnc_runtime::cuda::layout::{self, ArgValue, Hyper, Layout, Place, ALIGN, SHARED};

fn inline(body: &str) -> Graph {
    let text = format!("network \"t\" {{ input 3x8x8 classes 3 {body} }}");
    wrnc_grammar::build(&wrnc_grammar::Source::inline(text.as_str())).unwrap()
}

/// Every example network (full size) and a few small inline ones.
fn graphs() -> Vec<(String, Graph)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "net"))
        .collect();
    files.sort();
    let mut v = vec![];
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        let src = wrnc_grammar::source_from_bytes(&f.display().to_string(), &bytes).unwrap();
        v.push((f.display().to_string(), wrnc_grammar::build(&src).unwrap()));
    }
    v.push((
        "wrn-dropout".into(),
        inline(
            "conv(3x3, 4) residual { pre bn relu body conv(3x3, 6, stride=2) bn relu dropout(0.3) conv(3x3, 6) shortcut proj } bn relu gap fc",
        ),
    ));
    v.push((
        "dense".into(),
        inline("conv(3x3, 4) dense { bn relu conv(3x3, 2) } bn relu conv(1x1, 4) avgpool(2x2) bn relu gap fc"),
    ));
    v
}

fn schedules(g: &Graph, batch: u32) -> Vec<(String, Schedule)> {
    let mut v = vec![];
    for mode in [Mode::Train, Mode::Infer] {
        for unfused in [false, true] {
            for precision in [Precision::F32, Precision::Bf16] {
                let opts = Options {
                    tiles: Default::default(),
                    layout: Default::default(),
                    mode,
                    batch,
                    precision,
                    fusion: Fusion {
                        unfused,
                        disabled: vec![],
                    },
                };
                let s = schedule::build(g, &opts).unwrap();
                v.push((
                    format!("{mode:?} unfused={unfused} {}", precision.name()),
                    s,
                ));
            }
            // bf16 with Hopper's warpgroup MMA and the weights by TMA (tensor-map arguments)
            let opts = Options {
                tiles: schedule::Tiles {
                    wgmma: true,
                    tma: true,
                    ..Default::default()
                },
                layout: Default::default(),
                mode,
                batch,
                precision: Precision::Bf16,
                fusion: Fusion {
                    unfused,
                    disabled: vec![],
                },
            };
            let s = schedule::build(g, &opts).unwrap();
            v.push((format!("{mode:?} unfused={unfused} bf16 tma"), s));
        }
    }
    v
}

fn check_layout(what: &str, s: &Schedule) {
    let l = Layout::new(s);
    let mut own: Vec<(u64, u64, String)> = vec![];
    let mut arena_bytes_seen = 0;
    for (i, p) in l.places.iter().enumerate() {
        let b = &s.buffers[i];
        let bytes = layout::buffer_bytes(s, i);
        match p {
            Place::Own { offset } => {
                assert_eq!(offset % ALIGN, 0, "{what}: {} misaligned", b.name);
                assert!(offset + bytes <= l.own_bytes, "{what}: {} outside", b.name);
                if *offset >= l.arena_offset {
                    let planned = l.plan.offsets[i].expect("arena buffers are planned");
                    assert_eq!(*offset, l.arena_offset + planned, "{what}: {}", b.name);
                    arena_bytes_seen = arena_bytes_seen.max(planned + bytes);
                } else {
                    own.push((*offset, offset + bytes, b.name.clone()));
                }
            }
            Place::Shared { name, bytes: sb } => {
                assert_eq!(name, &b.name);
                assert_eq!(*sb, bytes);
                assert!(SHARED.contains(&name.as_str()), "{what}: {name} shared");
            }
            Place::Unused => {
                for l in s.setup.iter().chain(&s.launches) {
                    assert!(
                        l.buffers.iter().all(|a| a.buffer != i),
                        "{what}: {} is used but has no storage",
                        b.name
                    );
                }
            }
        }
    }
    assert!(arena_bytes_seen <= l.arena_bytes, "{what}: arena overflow");
    own.sort();
    for w in own.windows(2) {
        assert!(w[0].1 <= w[1].0, "{what}: {} overlaps {}", w[0].2, w[1].2);
    }
    if let Some(last) = own.last() {
        assert!(
            last.1 <= l.arena_offset,
            "{what}: {} overlaps the arena",
            last.2
        );
    }
    // the whole step needs what the memory plan said (persistent + arena), to alignment
    assert!(
        l.total_bytes() <= l.plan.peak_bytes + ALIGN * s.buffers.len() as u64,
        "{what}: layout {} vs plan {}",
        l.total_bytes(),
        l.plan.peak_bytes
    );
    // argument packing: pointers at buffer base + offset * element size, scalars mapped
    let own_base = 1u64 << 40;
    let shared_names: BTreeSet<&str> = SHARED.iter().copied().collect();
    let shared = |n: &str| {
        shared_names
            .iter()
            .position(|x| *x == n)
            .map(|k| (2 + k as u64) << 40)
    };
    let addr = l.addresses(own_base, &shared).unwrap();
    let h = Hyper {
        seed: 7,
        step: 9,
        lr: 0.25,
        momentum: 0.9,
        weight_decay: 5e-4,
        nesterov: true,
        label_smoothing: 0.1,
    };
    for launch in s.setup.iter().chain(&s.launches) {
        let args = layout::pack(s, launch, &addr, &h).unwrap();
        let (bufs, scalars) = s.kernels[launch.kernel].spec.signature();
        let tmaps = s.kernels[launch.kernel].spec.tmap_params();
        assert_eq!(
            args.len(),
            bufs.len() + scalars.len() + tmaps.len(),
            "{what}: {}",
            launch.note
        );
        // a tensor map after the scalars, over its buffer argument's address
        for (t, v) in launch.tmaps.iter().zip(&args[bufs.len() + scalars.len()..]) {
            assert_eq!(
                *v,
                ArgValue::TensorMap {
                    addr: match args[t.buffer] {
                        ArgValue::Ptr(p) => p,
                        _ => panic!("{what}: {}: not a pointer", launch.note),
                    },
                    dims: t.dims,
                    box_dim: t.box_dim,
                    swizzle: t.swizzle,
                },
                "{what}: {}",
                launch.note
            );
            assert_eq!(v.slot(), None);
        }
        for (a, v) in launch.buffers.iter().zip(&args) {
            let want = addr[a.buffer].unwrap() + a.offset * s.buffers[a.buffer].dtype.bytes();
            assert_eq!(*v, ArgValue::Ptr(want), "{what}: {}", launch.note);
        }
        for (sc, v) in launch.scalars.iter().zip(&args[launch.buffers.len()..]) {
            let want = match *sc {
                ScalarArg::I32(x) => ArgValue::I32(x),
                ScalarArg::U32(x) => ArgValue::U32(x),
                ScalarArg::F32(x) => ArgValue::F32(x),
                ScalarArg::Seed => ArgValue::U32(7),
                ScalarArg::Step => ArgValue::U32(9),
                ScalarArg::Lr => ArgValue::F32(0.25),
                ScalarArg::Momentum => ArgValue::F32(0.9),
                ScalarArg::WeightDecay => ArgValue::F32(5e-4),
                ScalarArg::Nesterov => ArgValue::I32(1),
                ScalarArg::LabelSmoothing => ArgValue::F32(0.1),
            };
            assert_eq!(*v, want, "{what}: {}", launch.note);
            if matches!(sc, ScalarArg::Seed | ScalarArg::Step | ScalarArg::Lr) {
                assert!(layout::is_dynamic(launch), "{what}: {}", launch.note);
            }
        }
    }
}

#[test]
fn layouts_and_argument_packing_of_every_example() {
    for (name, g) in graphs() {
        for (what, s) in schedules(&g, 4) {
            check_layout(&format!("{name} {what}"), &s);
        }
    }
}

/// The arena reuses bytes, so no launch may read a transient buffer before the step wrote
/// it (the emulation zero-fills every buffer and would not notice).
#[test]
fn transient_buffers_are_written_before_they_are_read() {
    for (name, g) in graphs() {
        for (what, s) in schedules(&g, 2) {
            layout::check_written_before_read(&s).unwrap_or_else(|e| panic!("{name} {what}: {e}"));
        }
    }
}

#[test]
fn packing_refuses_buffers_without_storage() {
    let g = inline("conv(3x3, 4) bn relu gap fc");
    let s = schedule::build(
        &g,
        &Options {
            batch: 2,
            ..Options::default()
        },
    )
    .unwrap();
    let addr = vec![None; s.buffers.len()];
    let e = layout::pack(&s, &s.launches[0], &addr, &Hyper::default()).unwrap_err();
    assert!(e.to_string().contains("has no storage"), "{e}");
}

#[test]
fn argument_slots_are_little_endian_low_bytes() {
    assert_eq!(
        ArgValue::Ptr(0x1234_5678_9abc).slot(),
        Some(0x1234_5678_9abc)
    );
    assert_eq!(ArgValue::I32(-1).slot(), Some(0xffff_ffff));
    assert_eq!(ArgValue::U32(7).slot(), Some(7));
    assert_eq!(ArgValue::F32(1.0).slot(), Some(0x3f80_0000));
}

#[test]
fn bf16_rounds_to_nearest_even_and_round_trips() {
    for (x, bits) in [
        (1.0f32, 0x3f80u16),
        (-2.0, 0xc000),
        (0.0, 0),
        (f32::from_bits(0x3f80_8000), 0x3f80), // tie -> even
        (f32::from_bits(0x3f81_8000), 0x3f82), // tie -> even (up)
        (f32::from_bits(0x3f80_8001), 0x3f81),
        (f32::from_bits(0x7f7f_ffff), 0x7f80), // the largest f32 rounds to inf
        (f32::INFINITY, 0x7f80),
        (f32::NEG_INFINITY, 0xff80),
        // NaNs stay NaNs (CUDA's 0x7fffffff would carry into -0.0 by the rounding add alone)
        (f32::from_bits(0x7fff_ffff), 0x7fff),
        (f32::from_bits(0xffff_ffff), 0xffff),
        (f32::from_bits(0x7f80_0001), 0x7fc0),
        (f32::from_bits(0xffc0_0000), 0xffc0),
    ] {
        assert_eq!(f32_to_bf16(x), bits, "{x}");
    }
    let v = [1.5f32, -3.25, 1e-3, 65504.0];
    let back = decode(&encode(&v, schedule::Dtype::Bf16), schedule::Dtype::Bf16);
    for (a, b) in v.iter().zip(&back) {
        assert!((a - b).abs() <= a.abs() / 128.0, "{a} {b}");
        assert_eq!(*b, bf16_to_f32(f32_to_bf16(*a)));
    }
    assert_eq!(
        decode(&encode(&v, schedule::Dtype::F32), schedule::Dtype::F32),
        v
    );
}

#[test]
fn cache_folder_rules() {
    use std::path::PathBuf;
    let p = |s: &str| Some(PathBuf::from(s));
    let check = |off, e, x, h, want: Option<&str>| {
        assert_eq!(cache::dir_from(off, e, x, h), want.map(PathBuf::from));
    };
    check(false, p("/c"), p("/x"), p("/h"), Some("/c"));
    check(false, None, p("/x"), p("/h"), Some("/x/wrnc"));
    check(false, None, p("relative"), p("/h"), Some("/h/.cache/wrnc"));
    check(false, None, None, p("/h"), Some("/h/.cache/wrnc"));
    check(false, None, None, None, None);
    check(true, p("/c"), p("/x"), p("/h"), None);
}

#[test]
fn cache_keys_separate_source_arch_and_nvrtc_version() {
    let k = cache::key("src", "sm_90", (13, 0));
    assert_eq!(k, cache::key("src", "sm_90", (13, 0)));
    for other in [
        cache::key("src2", "sm_90", (13, 0)),
        cache::key("src", "sm_80", (13, 0)),
        cache::key("src", "sm_90", (12, 8)),
    ] {
        assert_ne!(k, other);
    }
    assert!(k.contains("sm_90") && k.contains("nvrtc13.0"), "{k}");
}

/// A CUBIN as far as its ELF header tells (`nvrtc::is_cubin`): ELF64, little endian, EM_CUDA,
/// the section header table (`shnum` entries of 64 bytes at `shoff`) then `body`.
fn elf(shoff: u64, shnum: u16, body: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; 64];
    h[..4].copy_from_slice(b"\x7fELF");
    h[4] = 2;
    h[5] = 1;
    h[18..20].copy_from_slice(&190u16.to_le_bytes());
    h[40..48].copy_from_slice(&shoff.to_le_bytes());
    h[58..60].copy_from_slice(&64u16.to_le_bytes());
    h[60..62].copy_from_slice(&shnum.to_le_bytes());
    h.extend_from_slice(body);
    h
}

#[test]
fn cubins_are_whole_elf_images_for_cuda() {
    use wrnc_runtime::nvrtc::is_cubin;
    let body = vec![0u8; 128];
    assert!(is_cubin(&elf(64, 2, &body)));
    // cut short: the section headers lie past the end
    assert!(!is_cubin(&elf(64, 3, &body)));
    assert!(!is_cubin(&elf(64, 2, &body)[..150]));
    assert!(!is_cubin(&elf(u64::MAX, 2, &body)));
    // another machine, 32-bit, big endian, not ELF, too short
    let mut x86 = elf(64, 2, &body);
    x86[18] = 62;
    assert!(!is_cubin(&x86));
    for (at, v) in [(4, 1u8), (5, 2), (0, b'E')] {
        let mut b = elf(64, 2, &body);
        b[at] = v;
        assert!(!is_cubin(&b), "byte {at} = {v}");
    }
    assert!(!is_cubin(b"\x7fELF"));
}

#[test]
fn cache_compiles_once_then_hits_and_ignores_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let c = ModuleCache::new(Some(dir.path().to_path_buf()));
    let calls = std::cell::Cell::new(0);
    let compile = |src: &str, arch: &str| {
        calls.set(calls.get() + 1);
        Ok(elf(0, 0, format!("{src} {arch}").as_bytes()))
    };
    let a = c.get_or_compile("k1", "sm_90", (13, 0), compile).unwrap();
    assert!(!a.hit && a.warning.is_none());
    let b = c.get_or_compile("k1", "sm_90", (13, 0), compile).unwrap();
    assert!(b.hit);
    assert_eq!(a.image, b.image);
    let _ = c.get_or_compile("k1", "sm_80", (13, 0), compile).unwrap();
    assert_eq!(calls.get(), 2);
    // a damaged entry is not a CUBIN (no ELF header, or one cut short): it misses and is
    // replaced
    std::fs::write(c.path(&a.key).unwrap(), "garbage").unwrap();
    let d = c.get_or_compile("k1", "sm_90", (13, 0), compile).unwrap();
    assert!(!d.hit);
    assert_eq!(calls.get(), 3);
    std::fs::write(c.path(&a.key).unwrap(), elf(64, 4, &[0; 100])).unwrap();
    assert!(
        !c.get_or_compile("k1", "sm_90", (13, 0), compile)
            .unwrap()
            .hit
    );
    assert_eq!(calls.get(), 4);
    // no temporary files are left behind
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("cubin"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // no cache folder: always compiles, never fails
    let none = ModuleCache::new(None);
    let e = none
        .get_or_compile("k1", "sm_90", (13, 0), compile)
        .unwrap();
    assert!(!e.hit);
    assert_eq!(calls.get(), 5);
    // compile errors pass through
    let err = c
        .get_or_compile("k9", "sm_90", (13, 0), |_, _| {
            Err(wrnc_runtime::nvrtc::NvrtcError::Nul)
        })
        .unwrap_err();
    assert_eq!(err, wrnc_runtime::nvrtc::NvrtcError::Nul);
}

#[test]
fn timing_summaries() {
    use wrnc_runtime::cuda::bench::Timing;
    let t = Timing::from_samples(vec![5.0, 1.0, 3.0, f64::NAN, 2.0, 4.0]);
    assert_eq!((t.median_ms, t.min_ms, t.runs), (3.0, 1.0, 5));
    assert_eq!(t.p90_ms, 4.0);
    let e = Timing::from_samples(vec![2.0, 1.0]);
    assert_eq!(e.median_ms, 1.5);
    assert_eq!(Timing::from_samples(vec![]).runs, 0);
}

/// `Schedule::validate` holds every tensor map to what TMA can take: over a bf16 buffer
/// argument that holds the whole tensor, rows 16-byte aligned, a box of 1 to 256 elements per
/// dimension whose inner one is a multiple of 16 bytes.
#[test]
fn tensor_maps_are_validated() {
    let (_, g) = graphs().into_iter().next().unwrap();
    let s = schedules(&g, 2)
        .into_iter()
        .find(|(what, _)| what.ends_with("tma") && what.starts_with("Train"))
        .unwrap()
        .1;
    s.validate().unwrap();
    let li = s.launches.iter().position(|l| !l.tmaps.is_empty()).unwrap();
    let broken = |f: &dyn Fn(&mut schedule::TmapArg)| {
        let mut s = s.clone();
        f(&mut s.launches[li].tmaps[0]);
        s.validate().unwrap_err()
    };
    assert!(broken(&|t| t.dims[0] -= 4).contains("not 16-byte aligned"));
    assert!(broken(&|t| t.dims[2] *= 1000).contains("larger than its buffer"));
    assert!(broken(&|t| t.box_dim[1] = 512).contains("box TMA cannot move"));
    assert!(broken(&|t| t.box_dim[0] = 4).contains("box TMA cannot move"));
    assert!(broken(&|t| t.box_dim[0] = 16).contains("swizzle that does not match"));
    assert!(broken(&|t| t.swizzle = 48).contains("swizzle that does not match"));
    assert!(broken(&|t| t.buffer = 99).contains("has no buffer"));
    let mut s2 = s.clone();
    s2.launches[li].tmaps.clear();
    assert!(s2.validate().unwrap_err().contains("tensor maps"));
}
