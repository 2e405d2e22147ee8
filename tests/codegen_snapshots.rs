//! Snapshots of the generated CUDA, the fused schedule JSON, the plan after each pass for a
//! small WRN-style network, and WRN-28-10's launch / traffic / memory summary.

use wrnc_compiler::codegen::cuda;
use wrnc_compiler::passes::{self, Fusion, Mode, Plan};
use wrnc_compiler::schedule::{self, Options};

const NET: &str = "network \"tiny-wrn\" { input 3x8x8 classes 10
    conv(3x3, 4)
    residual { pre bn relu body conv(3x3, 8, stride=2) bn relu dropout(0.3) conv(3x3, 8) shortcut proj }
    bn relu gap fc }";

fn graph(text: &str) -> wrnc_compiler::graph::Graph {
    wrnc_grammar::build(&wrnc_grammar::Source::inline(text)).unwrap_or_else(|d| panic!("{d:?}"))
}

fn opts(mode: Mode) -> Options {
    Options {
        mode,
        batch: 4,
        ..Options::default()
    }
}

#[test]
fn tiny_wrn_cuda_train_fused() {
    let o = opts(Mode::Train);
    let s = schedule::build(&graph(NET), &o).unwrap();
    insta::assert_snapshot!("tiny_wrn_train_fused_cu", cuda::write(&s, &o).unwrap());
}

/// The tensor-core path on channels-last activations (`--precision bf16` is NHWC by default):
/// the input's transpose, `_nhwc` kernels, `(kh, kw, c)` reductions, NCHW dropout mask indices.
#[test]
fn tiny_wrn_cuda_train_fused_bf16_nhwc() {
    let o = Options {
        precision: wrnc_compiler::ast::Precision::Bf16,
        ..opts(Mode::Train)
    };
    let s = schedule::build(&graph(NET), &o).unwrap();
    assert_eq!(s.layout, schedule::Layout::Nhwc);
    insta::assert_snapshot!(
        "tiny_wrn_train_fused_bf16_nhwc_cu",
        cuda::write(&s, &o).unwrap()
    );
}

/// f32 on the tensor cores (`--tf32x3`), inference: `_tc_x3` convs with f32 operand tiles and
/// three TF32 `mma.sync` per fragment pair.
#[test]
fn tiny_wrn_cuda_infer_tf32x3() {
    let o = Options {
        tiles: schedule::Tiles {
            tf32x3: true,
            ..Default::default()
        },
        ..opts(Mode::Infer)
    };
    let s = schedule::build(&graph(NET), &o).unwrap();
    insta::assert_snapshot!("tiny_wrn_infer_tf32x3_cu", cuda::write(&s, &o).unwrap());
}

/// f32 on the tensor cores in plain TF32 (`--tf32`), inference: `_tc_tf32` convs, one TF32
/// `mma.sync` per fragment pair.
#[test]
fn tiny_wrn_cuda_infer_tf32() {
    let o = Options {
        tiles: schedule::Tiles {
            tf32: true,
            ..Default::default()
        },
        ..opts(Mode::Infer)
    };
    let s = schedule::build(&graph(NET), &o).unwrap();
    insta::assert_snapshot!("tiny_wrn_infer_tf32_cu", cuda::write(&s, &o).unwrap());
}

/// Hopper's path (`--tma`, implying `--wgmma`) on a network whose convs take 32 and 64
/// channels (the `_v8` engine), inference: `_wg_tma` forward kernels with a `wrnc_tmap`
/// parameter, an mbarrier per stage, TMA for the weights of the 64-channel convs (a box of
/// 32 x 64, no larger than their tensors), the activations of the stride-1 conv by TMA too
/// (`_tmaa`, a box of one 8x8 image), and the launches' tensor maps.
#[test]
fn tiny_wide_infer_tma() {
    wide_infer_snapshots("tiny_wide_infer_tma", false);
}

/// The same network with stages of 64 (`--k64`): `_wg_k64_tma` forward kernels whose stages
/// are rows of 128 bytes in the 128-byte swizzle (`wrnc_wgmma_desc128`, four k16 steps per
/// stage), boxes of 64 x 64 in that swizzle, the ring in dynamic shared memory; the 1x1
/// projection (a reduction of 32) keeps stages of 32.
#[test]
fn tiny_wide_infer_k64() {
    wide_infer_snapshots("tiny_wide_infer_k64", true);
}

/// The CUDA (`<name>_cu`) and the launches' tensor maps (`<name>_maps`) of the 32/64-channel
/// network's bf16 inference at batch 512 with `--tma` (and `--k64` where `k64`).
fn wide_infer_snapshots(name: &str, k64: bool) {
    let net = "network \"w64\" { input 3x16x16 classes 3 conv(3x3, 32) residual { body bn relu conv(3x3, 64, stride=2) bn relu conv(3x3, 64) shortcut proj } bn relu gap fc }";
    let o = Options {
        precision: wrnc_compiler::ast::Precision::Bf16,
        tiles: schedule::Tiles {
            wgmma: true,
            tma: true,
            k64,
            ..Default::default()
        },
        // a batch at which no forward conv splits its reduction (split-K convs take no TMA):
        // the 8x8 convs' grids are 512 blocks
        batch: 512,
        ..opts(Mode::Infer)
    };
    let s = schedule::build(&graph(net), &o).unwrap();
    insta::assert_snapshot!(format!("{name}_cu"), cuda::write(&s, &o).unwrap());
    let maps: Vec<String> = s
        .launches
        .iter()
        .filter(|l| !l.tmaps.is_empty())
        .map(|l| format!("{}: {:?}", l.note, l.tmaps))
        .collect();
    insta::assert_snapshot!(format!("{name}_maps"), maps.join("\n"));
}

#[test]
fn tiny_wrn_schedule_json() {
    let s = schedule::build(&graph(NET), &opts(Mode::Train)).unwrap();
    insta::assert_snapshot!("tiny_wrn_train_fused_schedule", s.to_json());
    let s = schedule::build(&graph(NET), &opts(Mode::Infer)).unwrap();
    insta::assert_snapshot!("tiny_wrn_infer_fused_schedule", s.to_json());
}

#[test]
fn tiny_wrn_plan_after_each_pass() {
    let mut out = String::new();
    for mode in [Mode::Train, Mode::Infer] {
        let mut plan = Plan::new(&graph(NET), mode);
        passes::run(&mut plan, &Fusion::default(), |name, p| {
            out.push_str(&format!("--- after {name}\n{p}"));
        });
    }
    insta::assert_snapshot!("tiny_wrn_plan_after_each_pass", out);
}

#[test]
fn output_is_deterministic() {
    let o = opts(Mode::Train);
    let a = cuda::write(&schedule::build(&graph(NET), &o).unwrap(), &o).unwrap();
    let b = cuda::write(&schedule::build(&graph(NET), &o).unwrap(), &o).unwrap();
    assert_eq!(a, b);
}

#[test]
fn wrn_28_10_summary() {
    let g = graph("network WRN-28-10\ndropout 0.3");
    let s = wrnc_compiler::memplan::summarize(&g, 128, Default::default()).unwrap();
    assert!(s.launches.train_fused < s.launches.train_unfused);
    assert!(s.dram_bytes.fused < s.dram_bytes.unfused);
    assert!(s.infer_dram_bytes.fused < s.infer_dram_bytes.unfused);
    assert!(s.peak_bytes.fused < s.peak_bytes.unfused);
    insta::assert_snapshot!(
        "wrn_28_10_summary_batch128",
        serde_json::to_string_pretty(&s).unwrap()
    );
}

/// A network from `examples/` with its own batch size (128 when the file sets none).
fn example(file: &str) -> (wrnc_compiler::graph::Graph, u32) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(file);
    let src = wrnc_grammar::source_from_bytes(
        &format!("examples/{file}"),
        &std::fs::read(&path).unwrap(),
    )
    .unwrap();
    let parsed = wrnc_grammar::parse(&src).unwrap_or_else(|d| panic!("{}", d.render()));
    let batch = parsed.settings.batch.map_or(128, |b| b.value as u32);
    (wrnc_compiler::build(&parsed).unwrap(), batch)
}

/// The fused training step of example networks: the generated CUDA and the schedule JSON.
#[test]
fn example_networks_train_fused() {
    for (file, tag) in [("wrn-10-2.net", "wrn_10_2"), ("custom.net", "custom")] {
        let (g, batch) = example(file);
        let o = Options {
            mode: Mode::Train,
            batch,
            ..Options::default()
        };
        let s = schedule::build(&g, &o).unwrap();
        insta::assert_snapshot!(
            format!("{tag}_train_fused_cu"),
            cuda::write(&s, &o).unwrap()
        );
        insta::assert_snapshot!(format!("{tag}_train_fused_schedule"), s.to_json());
    }
}
