//! `wrnc bench` and `wrnc selftest`: the GPU backend's timings and its check against the CPU
//! reference. Without a usable GPU both say why and fail (exit 1), except
//! `selftest --device cpu`, which runs the host-side checks only.

use crate::net::{Loaded, UserError};
use std::path::{Path, PathBuf};
use wrnc_compiler::ast::{NetFile, NetworkSpec, Precision, Spanned};
use wrnc_compiler::graph::Graph;
use wrnc_compiler::passes::{Fusion, Mode};
use wrnc_compiler::schedule::{self, F32Math, Layout, Options, TcTile};
use wrnc_runtime::cuda::tune::{self, TileMode};
use wrnc_runtime::cuda::{self, bench, cache::ModuleCache, check, device::Gpu, exec, layout};

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PrecisionArg {
    F32,
    Bf16,
}

impl PrecisionArg {
    pub fn get(self) -> Precision {
        match self {
            PrecisionArg::F32 => Precision::F32,
            PrecisionArg::Bf16 => Precision::Bf16,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
}

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Images per training step / inference batch.
    #[arg(long, default_value_t = 128)]
    pub batch: u32,
    /// f32, or bf16 (bf16 activations, tensor-core convolutions, fp32 master weights and accumulation).
    #[arg(long, value_enum, default_value = "f32")]
    pub precision: PrecisionArg,
    /// Untimed runs before measuring.
    #[arg(long, default_value_t = 10)]
    pub warmup: usize,
    /// Timed runs (the median is reported).
    #[arg(long, default_value_t = 50)]
    pub iters: usize,
    /// Only the fused schedules (skip the unfused baseline).
    #[arg(long)]
    pub fused_only: bool,
    /// Skip inference (training step only).
    #[arg(long)]
    pub no_infer: bool,
    /// Skip the training step (inference at --batch and at batch 1 only: throughput at large
    /// batches, e.g. --batch 1024, whose training step would not fit or matter).
    #[arg(long, conflicts_with = "no_infer")]
    pub no_train: bool,
    /// Which GPU.
    #[arg(long, default_value_t = 0)]
    pub gpu: usize,
    /// Tensor-core tiles (bf16, or f32 with --tf32 or --tf32x3): auto (search on this GPU what the tile cache lacks), default
    /// (64x64), or one tile for every convolution (128x64, 128x128, 64x128, 32x64, 64x32).
    #[arg(long, default_value = "auto", value_parser = TileMode::parse)]
    pub tiles: TileMode,
    /// Activation layout: auto (nhwc for bf16 and with --tf32 / --tf32x3, nchw for f32), nchw or nhwc (channels last).
    #[arg(long, default_value = "auto", value_parser = Layout::parse)]
    pub layout: Layout,
    /// bf16 or --tf32: the NHWC vector-loading convolutions (all three passes) on Hopper's warpgroup MMA
    /// (`wgmma`, sm_90 GPUs only) instead of `mma.sync`.
    #[arg(long)]
    pub wgmma: bool,
    /// bf16: the weight operand of the warpgroup-MMA convolutions by Hopper's tensor memory
    /// accelerator (TMA), and the activation operand of the stride-1 ones with 32k channels
    /// per group whose tiles are boxes of the image. Implies --wgmma.
    #[arg(long)]
    pub tma: bool,
    /// bf16: the forward and data-gradient warpgroup-MMA convolutions take stages of 64
    /// reduction indices (128-byte rows and swizzle, four k16 steps per barrier instead of
    /// two) in dynamic shared memory. Implies --wgmma.
    #[arg(long)]
    pub k64: bool,
    /// bf16: `cp.async` pipeline stages of the NHWC convolutions (2 to 8), in dynamic shared
    /// memory where they need more than 48 KiB (default: as many as fit in 48 KiB, at most 4).
    #[arg(long, value_parser = clap::value_parser!(u32).range(2..=8))]
    pub stages: Option<u32>,
    /// f32: the convolutions on the tensor cores as 3xTF32 (fp32 accuracy, sm_80 and later),
    /// with tiles as `--tiles` says, instead of as fp32 FMAs.
    #[arg(long)]
    pub tf32x3: bool,
    /// f32: the convolutions on the tensor cores in plain TF32 (as PyTorch runs cuDNN's f32
    /// convolutions by default; sm_80 and later), with tiles as `--tiles` says, instead of as
    /// fp32 FMAs.
    #[arg(long, conflicts_with = "tf32x3")]
    pub tf32: bool,
    /// The data gradients of strided convolutions over every tap, masked (the baseline of
    /// phase order, which runs each output phase over only the taps that reach it: about a
    /// quarter of them at stride 2, same results).
    #[arg(long)]
    pub dense_dgrad: bool,
    /// No split-K: the weight gradients (every engine) and the small-batch inference
    /// convolutions each run their whole reduction in one block per output tile (the baseline
    /// of split-K, which cuts a long reduction over more blocks when the grid alone would
    /// leave the GPU idle).
    #[arg(long)]
    pub no_split_k: bool,
    /// Also time every launch where it runs in the step (events between launches, the
    /// median of min(--iters, 10) steps, after the timed runs), summed per kernel: time,
    /// share, useful TFLOP/s of the GEMMs and the estimated DRAM traffic's TB/s.
    #[arg(long)]
    pub profile: bool,
    /// Machine-readable output (one JSON object).
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args)]
pub struct SelftestArgs {
    /// cuda: compare the GPU with the CPU reference; cpu: host-side checks only.
    #[arg(long, value_enum, default_value = "cuda")]
    pub device: DeviceArg,
    /// Folder of example networks (every `.net` file is checked).
    #[arg(long, default_value = "examples")]
    pub examples: PathBuf,
    /// Images per batch of each check.
    #[arg(long, default_value_t = 2)]
    pub batch: u32,
    /// Only the small built-in networks, not the examples.
    #[arg(long)]
    pub quick: bool,
    /// The examples' input side (default: the smallest of 8, 16, 32, 64 at which every batch
    /// norm still normalises at least 2x2 values per image; never more than the network's own).
    #[arg(long, value_name = "PIXELS")]
    pub side: Option<u32>,
    /// Which GPU.
    #[arg(long, default_value_t = 0)]
    pub gpu: usize,
    /// Only the comparisons whose name, as selftest prints it, contains this text (e.g.
    /// `wgmma`, `resnext train fused`, `preresnet-164 train fused every launch bf16`), to rerun
    /// one that failed.
    #[arg(long, value_name = "TEXT")]
    pub only: Option<String>,
    /// Machine-readable output (one JSON object).
    #[arg(long)]
    pub json: bool,
    /// On an sm_90 GPU: write the layout probes' runs to FILE (JSON): the warpgroup-MMA probe's
    /// shared-memory images and raw accumulators, the TMA probe's landed boxes; to work out
    /// without a GPU how the hardware read or landed them.
    #[arg(long, value_name = "FILE")]
    pub probe_dump: Option<PathBuf>,
}

pub(crate) fn check_range(batch: u32, what: &str, max: u32) -> Result<(), UserError> {
    if batch == 0 || batch > max {
        return Err(UserError(format!(
            "error: {what} {batch} is out of range (1 to {max})"
        )));
    }
    Ok(())
}

fn open_gpu(ordinal: usize) -> anyhow::Result<Gpu> {
    Gpu::open(ordinal).map_err(|e| anyhow::anyhow!("no usable GPU: {e}"))
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// What `wrnc bench` measures, decided from its flags alone (no GPU): the precision and f32
/// engine, the variants (fused, then unfused unless `--fused-only`), the modes, and the
/// schedules whose tensor-core tiles are chosen together (`bases`).
pub struct BenchPlan {
    pub precision: Precision,
    pub f32_math: F32Math,
    pub wgmma: bool,
    /// `unfused` values, fused first.
    pub variants: Vec<bool>,
    pub modes: Vec<Mode>,
    /// Every schedule measured, tiles left to the tile choice; empty without tensor cores.
    pub bases: Vec<Options>,
}

/// Checks `a`'s flags and plans the bench ([`BenchPlan`]).
pub fn bench_plan(a: &BenchArgs) -> Result<BenchPlan, UserError> {
    check_range(a.batch, "batch", 1 << 16)?;
    if a.iters == 0 || a.iters > 100_000 || a.warmup > 100_000 {
        return Err(UserError(
            "error: --iters must lie in 1..=100000 and --warmup in 0..=100000".into(),
        ));
    }
    let precision = a.precision.get();
    let wgmma = a.wgmma || a.tma || a.k64;
    let f32_math =
        F32Math::from_flags(a.tf32, a.tf32x3).map_err(|e| UserError(format!("error: {e}")))?;
    schedule::check_engine_flags(precision, f32_math, wgmma, a.tma, a.k64, a.stages.is_some())
        .map_err(|e| UserError(format!("error: {e}")))?;
    let variants = if a.fused_only {
        vec![false]
    } else {
        vec![false, true]
    };
    let modes = if a.no_infer {
        vec![Mode::Train]
    } else if a.no_train {
        vec![Mode::Infer]
    } else {
        vec![Mode::Train, Mode::Infer]
    };
    let mut bases = vec![];
    if precision == Precision::Bf16 || f32_math.tensor_cores() {
        for &unfused in &variants {
            let base = |mode, batch| Options {
                mode,
                batch,
                precision,
                fusion: Fusion {
                    unfused,
                    disabled: vec![],
                },
                tiles: schedule::Tiles {
                    wgmma,
                    tma: a.tma,
                    k64: a.k64,
                    stages: a.stages.unwrap_or(0),
                    dense_dgrad: a.dense_dgrad,
                    no_split_k: a.no_split_k,
                    ..Default::default()
                }
                .with_f32_math(f32_math),
                layout: a.layout,
            };
            for &mode in &modes {
                bases.push(base(mode, a.batch));
            }
            if !a.no_infer {
                bases.push(base(Mode::Infer, 1));
            }
        }
    }
    Ok(BenchPlan {
        precision,
        f32_math,
        wgmma,
        variants,
        modes,
        bases,
    })
}

/// The modules `wrnc bench` loads once its tiles are chosen: every variant's schedule of
/// every mode at `--batch`, and inference at batch 1 (unless `--no-infer`).
pub fn bench_sources(
    graph: &Graph,
    a: &BenchArgs,
    p: &BenchPlan,
    tiles: &schedule::Tiles,
) -> anyhow::Result<Vec<exec::ModuleSource>> {
    let mut sources = vec![];
    for &unfused in &p.variants {
        let mut shapes: Vec<(Mode, u32)> = p.modes.iter().map(|&m| (m, a.batch)).collect();
        if !a.no_infer {
            shapes.push((Mode::Infer, 1));
        }
        for (mode, batch) in shapes {
            let (s, f) = bench::bench_schedule_of(
                graph,
                mode,
                batch,
                p.precision,
                unfused,
                tiles,
                a.layout,
            )?;
            sources.push(exec::module_source(&s, &f)?);
        }
    }
    Ok(sources)
}

pub fn bench(l: Loaded, a: BenchArgs) -> anyhow::Result<()> {
    let plan = bench_plan(&a)?;
    let (precision, f32_math, wgmma) = (plan.precision, plan.f32_math, plan.wgmma);
    let (variants, modes) = (&plan.variants[..], &plan.modes[..]);
    let gpu = open_gpu(a.gpu)?;
    let cache = ModuleCache::default_location();
    if !a.json {
        eprintln!("{}", gpu.info());
    }
    let mut runs = vec![];
    // the tensor-core tiles of every schedule measured below, chosen once
    let (tiles, tile_report) = if !plan.bases.is_empty() {
        let (mut t, r) = tune::choose_tiles(&gpu, &cache, &l.graph, &plan.bases, a.tiles)?;
        t.wgmma = wgmma;
        t.tma = a.tma;
        t.k64 = a.k64;
        t.stages = a.stages.unwrap_or(0);
        t.dense_dgrad = a.dense_dgrad;
        t.no_split_k = a.no_split_k;
        let t = t.with_f32_math(f32_math);
        if !a.json {
            eprintln!("{}", tile_summary(&r));
        }
        (t, Some(r))
    } else {
        (
            schedule::Tiles {
                dense_dgrad: a.dense_dgrad,
                no_split_k: a.no_split_k,
                ..Default::default()
            },
            None,
        )
    };
    // every module measured below compiled at once, on all cores
    let sources = bench_sources(&l.graph, &a, &plan, &tiles)?;
    let precompiled = exec::precompile(&gpu, &cache, sources, exec::compile_threads())?;
    if !a.json && precompiled.compiled > 0 {
        eprintln!(
            "compiled {} modules in {:.1} s on {} threads",
            precompiled.compiled, precompiled.seconds, precompiled.threads
        );
    }
    // one schedule measured: `mode` at `batch`, profiled over `profile` steps (0: not)
    let measure = |mode: Mode, batch: u32, unfused: bool, profile: usize| {
        bench::bench_schedule(
            &gpu, &cache, &l.graph, mode, batch, precision, unfused, a.warmup, a.iters, &tiles,
            a.layout, profile,
        )
    };
    for &mode in modes {
        for &unfused in variants {
            let r = measure(
                mode,
                a.batch,
                unfused,
                if a.profile { a.iters.min(10) } else { 0 },
            )?;
            if !a.json {
                print_run(&r);
                if let Some(p) = &r.profile {
                    print_profile(p);
                }
            }
            runs.push(r);
        }
    }
    let mut latency = vec![];
    if !a.no_infer {
        for &unfused in variants {
            let r = measure(Mode::Infer, 1, unfused, 0)?;
            if !a.json {
                print_run(&r);
            }
            latency.push(r);
        }
    }
    let pick = |v: &[bench::ScheduleBench], mode: &str, fused: bool| {
        v.iter()
            .find(|r| r.mode == mode && r.fused == fused)
            .map(|r| r.graph.map(|g| g.median_ms).unwrap_or(r.stream.median_ms))
    };
    let peak = |fused: bool| {
        runs.iter()
            .find(|r| r.mode == "train" && r.fused == fused)
            .map(|r| mb(r.planned_bytes))
    };
    // The useful multiply-adds of the run's GEMM launches (a training step: three GEMMs per
    // conv / linear but the stem's data gradient; an inference pass one), 2 FLOPs each, over
    // its time. Element-wise work is not counted.
    let macs = wrnc_compiler::analysis::info(&l.graph, 1).macs as f64;
    let tflops = |ms: Option<f64>, mode: &str, fused: bool| {
        let r = runs.iter().find(|r| r.mode == mode && r.fused == fused)?;
        ms.map(|ms| 2.0 * r.gemm_macs as f64 / (ms * 1e-3) / 1e12)
    };
    let (tf, tu) = (pick(&runs, "train", true), pick(&runs, "train", false));
    // what fusion removed and how fast the unfused step had moved it: the DRAM bytes of the
    // two training steps (the compiler's estimate) and the time between them. Fusion changes
    // traffic, not arithmetic, so this bandwidth near the GPU's says fusion bought what its
    // traffic was worth (docs/gpu.md, "What fusion can buy a step")
    let dram = |fused: bool| {
        runs.iter()
            .find(|r| r.mode == "train" && r.fused == fused)
            .map(|r| r.dram_bytes)
    };
    let fusion = match (tf, tu, dram(true), dram(false)) {
        (Some(f), Some(u), Some(bf), Some(bu)) => {
            let removed = bu as f64 - bf as f64;
            let saved_ms = u - f;
            let bw = (removed > 0.0 && saved_ms > 0.0).then(|| removed / (saved_ms * 1e-3) / 1e12);
            if !a.json {
                use wrnc_compiler::analysis::human_bytes;
                println!(
                    "fusion: the training step {:.2}x faster fused; the {} of DRAM traffic per step it removes (estimate: {} against {}) took the unfused step {saved_ms:.3} ms{}",
                    u / f,
                    human_bytes(removed.max(0.0) as u64),
                    human_bytes(bf),
                    human_bytes(bu),
                    bw.map(|b| if b >= 0.1 {
                        format!(", {b:.2} TB/s")
                    } else {
                        format!(", {:.3} GB/s", b * 1e3)
                    })
                    .unwrap_or_default()
                );
            }
            Some(serde_json::json!({
                "speedup": u / f,
                "dram_bytes": {"fused": bf, "unfused": bu},
                "saved_ms": saved_ms,
                "removed_traffic_tb_per_s": bw,
            }))
        }
        _ => None,
    };
    let (inf, inu) = (pick(&runs, "infer", true), pick(&runs, "infer", false));
    let out = serde_json::json!({
        "device": gpu.info(),
        "macs_per_image": macs,
        "train_tflops": {"fused": tflops(tf, "train", true), "unfused": tflops(tu, "train", false)},
        "infer_tflops": {"fused": tflops(inf, "infer", true), "unfused": tflops(inu, "infer", false)},
        "net": l.graph.name,
        "batch": a.batch,
        "precision": precision.name(),
        "layout": a.layout.resolve(precision, f32_math),
        "wgmma": wgmma,
        "tma": a.tma,
        "k64": a.k64,
        "tf32x3": a.tf32x3,
        "tf32": a.tf32,
        "dense_dgrad": a.dense_dgrad,
        "no_split_k": a.no_split_k,
        "stages": a.stages,
        "train_step_ms": {"fused": pick(&runs, "train", true), "unfused": pick(&runs, "train", false)},
        "infer_ms": {"fused": pick(&runs, "infer", true), "unfused": pick(&runs, "infer", false)},
        "latency_b1_ms": {"fused": pick(&latency, "infer", true), "unfused": pick(&latency, "infer", false)},
        "peak_mem_mb": {"fused": peak(true), "unfused": peak(false)},
        "fusion": fusion,
        "runs": runs,
        "latency_runs": latency,
        "tiles": tile_report,
        "precompiled": precompiled,
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}

/// One line on how the tensor-core tiles were chosen.
pub fn tile_summary(r: &tune::TuneReport) -> String {
    let mut counts = std::collections::BTreeMap::new();
    for t in r.tiles.values() {
        *counts.entry(t.as_str()).or_insert(0) += 1;
    }
    let used: Vec<String> = counts.iter().map(|(t, n)| format!("{n} x {t}")).collect();
    let how = match r.mode.as_str() {
        "auto" if r.searched > 0 => format!(
            "{} searched on this GPU in {:.1} s, {} from the cache",
            r.searched,
            r.search_s,
            r.gemms - r.searched
        ),
        "auto" => "all from the cache".into(),
        m => format!("--tiles {m}"),
    };
    let mut s = format!(
        "tiles: {} tensor-core convolution GEMMs ({how}): {}",
        r.gemms,
        used.join(", ")
    );
    if let Some(c) = &r.cache {
        s.push_str(&format!("; cache {c}"));
    }
    if let Some(w) = &r.warning {
        s.push_str(&format!("\nwarning: {w}"));
    }
    s
}

fn print_run(r: &bench::ScheduleBench) {
    let g = r
        .graph
        .map(|g| format!("{:.3} ms graph", g.median_ms))
        .unwrap_or_else(|| "no graph".into());
    println!(
        "{:<5} {:<7} batch {:>4}: {:.3} ms stream, {g} (median of {}), {:.0} img/s, {} launches, {:.1} MiB planned, {:.1} MiB measured{}",
        r.mode,
        if r.fused { "fused" } else { "unfused" },
        r.batch,
        r.stream.median_ms,
        r.stream.runs,
        r.images_per_s,
        r.launches,
        mb(r.planned_bytes),
        mb(r.measured_bytes),
        if r.cache_hit { ", kernels from cache" } else { "" }
    );
}

/// The kernels that take most of a profiled step (all that make up 95% of it, at least 5,
/// at most 20), one line each, and what the GEMMs achieved together.
fn print_profile(p: &bench::Profile) {
    println!(
        "  profile (median of {} steps, launch by launch): {:.3} ms, GEMMs {:.3} ms ({:.0}%){}",
        p.reps,
        p.step_ms,
        p.gemm_ms,
        100.0 * p.gemm_ms / p.step_ms.max(f64::MIN_POSITIVE),
        p.gemm_tflops
            .map(|t| if t >= 0.1 {
                format!(" at {t:.1} TFLOP/s useful")
            } else {
                format!(" at {:.2} GFLOP/s useful", t * 1e3)
            })
            .unwrap_or_default()
    );
    let mut covered = 0.0;
    for (i, k) in p.kernels.iter().enumerate() {
        if i >= 20 || (i >= 5 && covered >= 0.95) {
            println!("    ... {} more kernels", p.kernels.len() - i);
            break;
        }
        covered += k.share;
        let rate = match k.tflops {
            Some(t) if t >= 0.1 => format!("{t:7.1} TFLOP/s"),
            Some(t) => format!("{:7.2} GFLOP/s", t * 1e3),
            None if k.tb_per_s >= 0.1 => format!("{:7.2} TB/s   ", k.tb_per_s),
            None => format!("{:7.2} GB/s   ", k.tb_per_s * 1e3),
        };
        println!(
            "    {:8.3} ms {:5.1}% x{:<3} {rate}  {}",
            k.ms,
            100.0 * k.share,
            k.launches,
            k.kernel
        );
    }
}

/// Small networks of every family, written inline (tiny inputs): always checked.
const BUILTIN: &[(&str, &str)] = &[
    ("wrn", "conv(3x3, 4) residual { pre bn relu body conv(3x3, 6, stride=2) bn relu dropout(0.3) conv(3x3, 6) shortcut proj } residual { body bn relu conv(3x3, 6) bn relu dropout(0.3) conv(3x3, 6) } bn relu gap fc"),
    ("resnet-zeropad", "conv(3x3, 4) bn relu residual { body conv(3x3, 4) bn relu conv(3x3, 4) bn post relu } residual { body conv(3x3, 6, stride=2) bn relu conv(3x3, 6) bn shortcut zeropad post relu } gap fc"),
    ("resnext", "conv(3x3, 4) bn relu residual { body conv(1x1, 4) bn relu conv(3x3, 4, groups=2) bn relu conv(1x1, 8) bn shortcut projbn post relu } gap fc"),
    ("densenet", "conv(3x3, 4) dense { bn relu conv(1x1, 4) bn relu conv(3x3, 2) } dense { bn relu conv(3x3, 2) } bn relu conv(1x1, 4) avgpool(2x2) bn relu gap fc"),
    ("pyramidnet", "conv(3x3, 4) bn residual { body bn conv(3x3, 5) bn relu conv(3x3, 5) bn shortcut zeropad survival 0.5 } residual { body bn conv(3x3, 6, stride=2) bn relu conv(3x3, 6) bn shortcut zeropad survival 0.5 } bn relu gap fc"),
    ("stem-maxpool", "conv(3x3, 4, stride=2, bias) bn relu maxpool(3x3, stride=2, pad=1) bn relu gap fc"),
];

/// [`check::check_launches`] and [`check::check_graph`].
type CheckFn = fn(
    &Gpu,
    &ModuleCache,
    &str,
    &Graph,
    Mode,
    usize,
    Precision,
    bool,
    &schedule::Tiles,
    Layout,
) -> Result<check::CheckResult, cuda::CudaError>;

/// A small network whose convolutions (but the stem) have multiples of 8 channels: the
/// vector-loading convs that `--wgmma` moves to Hopper's warpgroup MMA.
const WGMMA_NET: &str = "conv(3x3, 8) residual { pre bn relu body conv(3x3, 16, stride=2) bn relu dropout(0.3) conv(3x3, 16) shortcut proj } residual { body bn relu conv(3x3, 16) bn relu conv(3x3, 16) } bn relu gap fc";

/// `--tma`'s network: no box of a tensor map may be larger than its tensor, so the weights
/// come by TMA only where a group has at least a tile's columns of output (forward) or input
/// (data gradient) channels: 64 and 128 here, at 16x16 and 8x8 (a grouped conv), stride-1
/// convs whose tiles are boxes of the image (whole rows, whole images), so their activations
/// come by TMA too (`ConvGeom::tma_a`); the data gradient of the grouped conv (64 input
/// channels, at 128 columns) keeps its weights on `cp.async`.
const TMAA_NET: &str = "conv(3x3, 64) residual { pre bn relu body conv(3x3, 64) bn relu dropout(0.3) conv(1x1, 64) } residual { body bn relu conv(3x3, 128, stride=2) bn relu conv(3x3, 128, groups=2) shortcut proj } bn relu gap fc";

fn builtin(body: &str) -> anyhow::Result<Graph> {
    builtin_in("3x8x8", body)
}

fn builtin_in(input: &str, body: &str) -> anyhow::Result<Graph> {
    let text = format!("network \"t\" {{ input {input} classes 3 {body} }}");
    wrnc_grammar::build(&wrnc_grammar::Source::inline(text.as_str()))
        .map_err(|d| anyhow::anyhow!("built-in network does not build: {}", d.render()))
}

/// The network of `file` with a smaller input where it still builds (the CPU reference in
/// f64 is slow at full size): the first of 8x8, 16x16, 32x32, 64x64 that lowers and leaves
/// every BN at least 2x2 values a channel per image, else the first that lowers, else the
/// original. (At 32x32, ResNet-50's last BNs see 1x1: over a batch of 2, two values, whose
/// normalisation's gradient is 1 / |x1 - x2|; its step overflowed.)
/// The example at the first of 8, 16, 32, 64 pixels a side at which it builds and every BN
/// keeps 2x2 values a channel per image (else its own size); at `want` exactly (`--side`),
/// or an error naming the network where it does not build.
fn shrink(file: &NetFile, original: &Graph, want: Option<u32>) -> Result<Graph, UserError> {
    let Ok(mut f) = wrnc_compiler::expand::expand_file(file) else {
        return Ok(original.clone());
    };
    let s = original.input_shape();
    let min_bn = |g: &Graph| {
        g.order
            .iter()
            .map(|&i| &g.g[i])
            .filter(|n| matches!(n.op, wrnc_compiler::graph::Op::BatchNorm { .. }))
            .map(|n| n.shape.h * n.shape.w)
            .min()
            .unwrap_or(u32::MAX)
    };
    let mut first = None;
    let sides = match want {
        Some(n) => vec![n as u64],
        None => vec![8u64, 16, 32, 64],
    };
    for side in sides {
        if side >= s.h as u64 {
            break;
        }
        if let NetworkSpec::Structural(st) = &mut f.network {
            let span = st.input.map(|i| i.span).unwrap_or_default();
            st.input = Some(Spanned::new([s.c as u64, side, side], span));
        }
        match wrnc_compiler::build(&f) {
            Ok(g) if want.is_some() || min_bn(&g) >= 4 => return Ok(g),
            Ok(g) => {
                first.get_or_insert(g);
            }
            Err(d) if want.is_some() => {
                return Err(UserError(format!(
                    "error: --side {side}: {} does not build at {side}x{side}: {}",
                    original.name, d.message
                )))
            }
            Err(_) => {}
        }
    }
    Ok(first.unwrap_or_else(|| original.clone()))
}

fn examples(dir: &Path, side: Option<u32>) -> anyhow::Result<Vec<(String, Graph)>> {
    let rd = std::fs::read_dir(dir).map_err(|e| {
        UserError(format!(
            "error: cannot read the examples folder `{}`: {e} (run from the repository root, pass --examples DIR, or --quick)",
            dir.display()
        ))
    })?;
    let mut files: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "net"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(UserError(format!(
            "error: the examples folder `{}` holds no .net file (pass --examples DIR, or --quick for the built-in networks alone)",
            dir.display()
        ))
        .into());
    }
    let mut v = vec![];
    for f in files {
        let l = crate::net::load(&f.display().to_string())?;
        let name = f
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        v.push((name, shrink(&l.file, &l.graph, side)?));
    }
    Ok(v)
}

/// The networks `wrnc selftest` checks: the built-in ones, then (unless `--quick`) every
/// example, shrunk to small shapes.
pub fn selftest_nets(a: &SelftestArgs) -> anyhow::Result<Vec<(String, Graph)>> {
    let mut nets: Vec<(String, Graph)> = vec![];
    for (n, body) in BUILTIN {
        nets.push((n.to_string(), builtin(body)?));
    }
    if !a.quick {
        nets.extend(examples(&a.examples, a.side)?);
    }
    Ok(nets)
}

/// Each job's schedule (`None` where it does not build: the check reports that itself).
pub fn job_schedules(
    a: &SelftestArgs,
    nets: &[(String, Graph)],
    jobs: &[Job],
) -> Vec<Option<(schedule::Schedule, Fusion)>> {
    jobs.iter()
        .map(|j| {
            bench::bench_schedule_of(
                &nets[j.net].1,
                j.mode,
                a.batch,
                j.precision,
                j.unfused,
                &j.tiles,
                j.layout,
            )
            .ok()
        })
        .collect()
}

/// The modules the selftest's checks load on a GPU of compute capability `cc`: one per job's
/// schedule, the augmentation kernel's (f32, as `check_augment` runs it), and on sm_90 the
/// warpgroup-MMA and TMA layout probes'.
pub fn selftest_sources(
    built: &[Option<(schedule::Schedule, Fusion)>],
    cc: (i32, i32),
) -> Vec<exec::ModuleSource> {
    let probes = (cc == (9, 0)).then(|| {
        [
            wrnc_compiler::codegen::cuda::wgmma_probe_source(),
            wrnc_compiler::codegen::cuda::tma_probe_source(),
        ]
        .map(|text| exec::ModuleSource { text, wgmma: true })
    });
    built
        .iter()
        .flatten()
        .filter_map(|(s, f)| exec::module_source(s, f).ok())
        .chain(std::iter::once(exec::ModuleSource {
            text: wrnc_runtime::cuda::augment::source(Precision::F32),
            wgmma: false,
        }))
        .chain(probes.into_iter().flatten())
        .collect()
}

/// One selftest comparison (see [`selftest_jobs`]).
pub struct Job {
    label: String,
    net: usize,
    mode: Mode,
    precision: Precision,
    unfused: bool,
    layout: Layout,
    tiles: schedule::Tiles,
    /// Launch by launch only (no whole-step comparison).
    launches_only: bool,
}

/// Every comparison of `wrnc selftest` with `a`'s flags on a GPU of compute capability `cc`,
/// listed first so that all their modules compile at once (and so that `wrnc precompile`
/// finds the same list without a GPU). Adds to `nets` the built-in networks some checks use.
pub fn selftest_jobs(
    a: &SelftestArgs,
    nets: &mut Vec<(String, Graph)>,
    cc: (i32, i32),
) -> anyhow::Result<Vec<Job>> {
    // Every comparison, listed first so that all their modules compile at once, on all
    // cores: each precision's own layout (NCHW in f32, NHWC in bf16) for every network, the
    // other one too for the built-in networks; then every other tensor-core tile on the first
    // built-in network's fused training step (forward, data and weight gradient convolutions).
    let mut jobs = vec![];
    for (ni, (name, _)) in nets.iter().enumerate() {
        for precision in [Precision::F32, Precision::Bf16] {
            let mut layouts = vec![(name.clone(), Layout::Auto)];
            if ni < BUILTIN.len() {
                let other = match Layout::Auto.resolve(precision, F32Math::Fma) {
                    Layout::Nhwc => Layout::Nchw,
                    _ => Layout::Nhwc,
                };
                layouts.push((format!("{name} {}", other.name()), other));
            }
            for (label, layout) in layouts {
                for mode in [Mode::Train, Mode::Infer] {
                    for unfused in [false, true] {
                        jobs.push(Job {
                            label: label.clone(),
                            net: ni,
                            mode,
                            precision,
                            unfused,
                            layout,
                            tiles: Default::default(),
                            launches_only: false,
                        });
                    }
                }
            }
        }
    }
    for tile in TcTile::CANDIDATES.into_iter().filter(|t| !t.is_default()) {
        jobs.push(Job {
            label: format!("{} tile {tile}", nets[0].0),
            net: 0,
            mode: Mode::Train,
            precision: Precision::Bf16,
            unfused: false,
            layout: Layout::Auto,
            tiles: schedule::Tiles::all(tile),
            launches_only: true,
        });
    }
    // f32 convolutions on the tensor cores as 3xTF32 (`--tf32x3`) and in plain TF32
    // (`--tf32`): the first built-in network's fused training step and inference at the
    // default tile, launch by launch and whole (split-K weight gradients included), the
    // training step's launches at 128x128 (the two-slab epilogue) and at 32x64, and the
    // unfused training step
    for (math, (mode, tile, launches_only, unfused)) in
        [F32Math::Tf32x3, F32Math::Tf32].into_iter().flat_map(|m| {
            [
                (Mode::Train, TcTile::DEFAULT, false, false),
                (Mode::Infer, TcTile::DEFAULT, false, false),
                (
                    Mode::Train,
                    TcTile {
                        rows: 128,
                        cols: 128,
                    },
                    true,
                    false,
                ),
                (Mode::Train, TcTile { rows: 32, cols: 64 }, true, false),
                (Mode::Train, TcTile::DEFAULT, true, true),
            ]
            .map(|j| (m, j))
        })
    {
        jobs.push(Job {
            label: format!(
                "{} {} tile {tile}",
                nets[0].0,
                math.flag().trim_start_matches('-')
            ),
            net: 0,
            mode,
            precision: Precision::F32,
            unfused,
            layout: Layout::Auto,
            tiles: schedule::Tiles::all(tile).with_f32_math(math),
            launches_only,
        });
    }
    // the same engines on NCHW activations (`--layout nchw`): no `cp.async`, operands
    // gathered one element per thread; the fused training step, launch by launch and whole
    for math in [F32Math::Tf32x3, F32Math::Tf32] {
        jobs.push(Job {
            label: format!("{} {} nchw", nets[0].0, math.flag().trim_start_matches('-')),
            net: 0,
            mode: Mode::Train,
            precision: Precision::F32,
            unfused: false,
            layout: Layout::Nchw,
            tiles: schedule::Tiles::default().with_f32_math(math),
            launches_only: false,
        });
    }
    // a network of 8- and 16-channel convs, all on the `cp.async` engine
    nets.push(("vec8".into(), builtin(WGMMA_NET)?));
    let vec8 = nets.len() - 1;
    let t128 = TcTile {
        rows: 128,
        cols: 128,
    };
    // deep pipelines (`--stages`) in dynamic shared memory beyond 48 KiB: 4 stages of
    // 128x128 (80 KiB; the 3x3 convs' 5 k-tiles wrap around the ring) and 5 of 128x64
    // (75 KiB; they fill every slot), training step and inference, launch by launch and whole
    let t128x64 = TcTile {
        rows: 128,
        cols: 64,
    };
    // (mode, tile, launches only, stages, wgmma, tma)
    let mut vec8_checks = vec![];
    for (tile, stages) in [(t128, 4), (t128x64, 5)] {
        for mode in [Mode::Train, Mode::Infer] {
            vec8_checks.push((mode, tile, false, stages, false, false));
        }
    }
    // Hopper's warpgroup MMA (`--wgmma`) on a Hopper GPU: the fused training step and
    // inference at the default tile (n32 per warpgroup), launch by launch and whole, and the
    // training step's launches at 128x128 (n128), with 2 stages and with 4 (dynamic)
    if cc == (9, 0) {
        vec8_checks.extend([
            (Mode::Train, TcTile::DEFAULT, false, 0, true, false),
            (Mode::Infer, TcTile::DEFAULT, false, 0, true, false),
            (Mode::Train, t128, true, 0, true, false),
            (Mode::Train, t128, true, 4, true, false),
        ]);
    }
    // the tensor memory accelerator (`--tma`) on its own network (TMAA_NET: no box larger
    // than its tensor): the weights, and the activations of the stride-1 convs, by TMA; the
    // fused training step and inference at the default tile, launch by launch and whole, and
    // a 4-stage 128x64 ring that keeps a wgmma in flight while TMA refills a slot; then the
    // same with stages of 64 (`--k64`: rows of 128 bytes in the 128-byte swizzle, boxes of
    // 64): the step and inference at the default tile (4 stages, a wgmma in flight), and the
    // step's launches at 128x64 with 3 stages (none in flight)
    if cc == (9, 0) {
        nets.push(("tmaa".into(), builtin_in("3x16x16", TMAA_NET)?));
        let net = nets.len() - 1;
        for (mode, tile, stages, launches_only, k64) in [
            (Mode::Train, TcTile::DEFAULT, 0, false, false),
            (Mode::Infer, TcTile::DEFAULT, 0, false, false),
            (Mode::Train, t128x64, 4, true, false),
            (Mode::Train, TcTile::DEFAULT, 0, false, true),
            (Mode::Infer, TcTile::DEFAULT, 0, false, true),
            (Mode::Train, t128x64, 3, true, true),
        ] {
            jobs.push(Job {
                label: format!(
                    "tmaa wgmma tma{}{} tile {tile}",
                    if k64 { " k64" } else { "" },
                    if stages != 0 {
                        format!(" stages {stages}")
                    } else {
                        String::new()
                    }
                ),
                net,
                mode,
                precision: Precision::Bf16,
                unfused: false,
                layout: Layout::Auto,
                tiles: schedule::Tiles {
                    wgmma: true,
                    tma: true,
                    k64,
                    stages,
                    ..schedule::Tiles::all(tile)
                },
                launches_only,
            });
        }
    }
    // the TF32 engines on the `cp.async` engine (NHWC, 8- and 16-channel convs: f32 runs of 8
    // channels, an f32 packed weight): the fused training step and inference at the default
    // tile, launch by launch and whole, for both; plain TF32's training step's launches with a
    // 4-stage 128x128 ring in dynamic shared memory
    // (on a Hopper GPU also plain TF32 on `wgmma`: the step and inference at the default
    // tile, and the step's launches with a 4-stage 128x64 ring that keeps a wgmma in flight)
    let mut tf32_checks = vec![
        (F32Math::Tf32, Mode::Train, TcTile::DEFAULT, 0, false, false),
        (F32Math::Tf32, Mode::Infer, TcTile::DEFAULT, 0, false, false),
        (F32Math::Tf32, Mode::Train, t128, 4, true, false),
        (
            F32Math::Tf32x3,
            Mode::Train,
            TcTile::DEFAULT,
            0,
            false,
            false,
        ),
        (
            F32Math::Tf32x3,
            Mode::Infer,
            TcTile::DEFAULT,
            0,
            false,
            false,
        ),
    ];
    if cc == (9, 0) {
        tf32_checks.extend([
            (F32Math::Tf32, Mode::Train, TcTile::DEFAULT, 0, false, true),
            (F32Math::Tf32, Mode::Infer, TcTile::DEFAULT, 0, false, true),
            (F32Math::Tf32, Mode::Train, t128x64, 4, true, true),
        ]);
    }
    // one job per check: bf16 (`math` None) or an f32 engine on the tensor cores
    let vec8_all =
        vec8_checks
            .into_iter()
            .map(|(mode, tile, launches_only, stages, wgmma, tma)| {
                (None, mode, tile, stages, launches_only, wgmma, tma)
            })
            .chain(tf32_checks.into_iter().map(
                |(math, mode, tile, stages, launches_only, wgmma)| {
                    (Some(math), mode, tile, stages, launches_only, wgmma, false)
                },
            ));
    for (math, mode, tile, stages, launches_only, wgmma, tma) in vec8_all {
        let tiles = schedule::Tiles {
            wgmma,
            stages,
            tma,
            ..schedule::Tiles::all(tile)
        };
        jobs.push(Job {
            label: format!(
                "vec8{}{}{}{} tile {tile}",
                math.map_or(String::new(), |m: F32Math| format!(
                    " {}",
                    m.flag().trim_start_matches('-')
                )),
                if wgmma { " wgmma" } else { "" },
                if tma { " tma" } else { "" },
                if stages != 0 {
                    format!(" stages {stages}")
                } else {
                    String::new()
                }
            ),
            net: vec8,
            mode,
            precision: if math.is_some() {
                Precision::F32
            } else {
                Precision::Bf16
            },
            unfused: false,
            layout: Layout::Auto,
            tiles: match math {
                Some(m) => tiles.with_f32_math(m),
                None => tiles,
            },
            launches_only,
        });
    }
    if let Some(only) = &a.only {
        // as selftest prints a check (`wrn train fused bf16`, ` every launch` before the
        // precision), or as `wrn Train unfused=false bf16`
        jobs.retain(|j| {
            let (m, u, p, t) = (j.mode, j.unfused, j.precision, &j.tiles);
            [
                check::describe(&j.label, m, u, p, t, ""),
                check::describe(&j.label, m, u, p, t, " every launch"),
                format!("{} {m:?} unfused={u} {}", j.label, check::arithmetic(p, t)),
            ]
            .iter()
            .any(|s| s.contains(only.as_str()))
        });
        if jobs.is_empty() {
            return Err(UserError(format!(
                "error: no selftest comparison matches --only `{only}`"
            ))
            .into());
        }
    }
    Ok(jobs)
}

pub fn selftest(a: SelftestArgs) -> anyhow::Result<()> {
    check_range(a.batch, "batch", 64)?;
    let mut nets = selftest_nets(&a)?;
    // host-side checks: every schedule builds, validates, and reads nothing unwritten
    let mut host_failures = vec![];
    for (name, g) in &nets {
        for mode in [Mode::Train, Mode::Infer] {
            for unfused in [false, true] {
                for (precision, layout) in [
                    (Precision::F32, Layout::Nchw),
                    (Precision::F32, Layout::Nhwc),
                    (Precision::Bf16, Layout::Nchw),
                    (Precision::Bf16, Layout::Nhwc),
                ] {
                    let opts = Options {
                        tiles: Default::default(),
                        layout,
                        mode,
                        batch: a.batch,
                        precision,
                        fusion: Fusion {
                            unfused,
                            disabled: vec![],
                        },
                    };
                    let r = schedule::build(g, &opts)
                        .map_err(|e| e.message)
                        .and_then(|s| s.validate().map(|_| s))
                        .and_then(|s| layout::check_written_before_read(&s));
                    if let Err(e) = r {
                        host_failures.push(format!(
                            "{name} {mode:?} unfused={unfused} {} {layout:?}: {e}",
                            precision.name()
                        ));
                    }
                }
            }
        }
    }
    if a.device == DeviceArg::Cpu {
        for f in &host_failures {
            println!("FAIL {f}");
        }
        println!(
            "host-side checks of {} networks: {}; the GPU comparison was not run (--device cpu)",
            nets.len(),
            if host_failures.is_empty() {
                "ok"
            } else {
                "FAILED"
            }
        );
        if !host_failures.is_empty() {
            anyhow::bail!("{} host-side checks failed", host_failures.len());
        }
        return Ok(());
    }
    let gpu = match Gpu::open(a.gpu) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("selftest: cannot run on the GPU: {e}");
            anyhow::bail!(
                "selftest needs a usable CUDA GPU (use `wrnc selftest --device cpu` for the host-side checks only)"
            );
        }
    };
    let mut gpu = gpu;
    // name the failing kernel on a fault
    gpu.set_sync_each(true);
    let cache = ModuleCache::default_location();
    if !a.json {
        eprintln!("{}", gpu.info());
    }
    let mut results: Vec<check::CheckResult> = vec![];
    let mut errors: Vec<String> = host_failures.clone();
    let mut report = |r: Result<check::CheckResult, cuda::CudaError>, what: &str| match r {
        Ok(r) => {
            if !a.json {
                println!(
                    "{} {:<48} max rel err {:.2e} (tol {:.0e}) worst: {}{}{}",
                    match (r.passed, r.resolved) {
                        (false, _) => "FAIL",
                        (true, true) => "ok  ",
                        (true, false) => "--  ",
                    },
                    r.what,
                    r.max_rel_err,
                    r.tol,
                    r.worst,
                    r.logits_vs_f64_model
                        .map(|v| format!("; logits {v:.2e} from the unrounded f64 model"))
                        .unwrap_or_default(),
                    match (r.precision_noise, r.grad_tol) {
                        (Some(n), Some(g)) if !r.resolved => format!(
                            "; unresolved: two correct computations of this step at this precision differ by {n:.1e} at these shapes (held to {g:.1e}, it would pass a wrong step); its launches are checked one by one"
                        ),
                        (Some(n), Some(g)) if g > r.tol => format!(
                            "; held to {g:.1e}: two correct computations of this step at this precision differ by {n:.1e}"
                        ),
                        _ => String::new(),
                    }
                );
            }
            results.push(r);
        }
        Err(e) => {
            if !a.json {
                println!("ERR  {what}: {e}");
            }
            errors.push(format!("{what}: {e}"));
        }
    };
    let jobs = selftest_jobs(&a, &mut nets, gpu.info().compute_capability)?;
    // every job's schedule, built once here for its module and the check below
    let built = job_schedules(&a, &nets, &jobs);
    let cc = gpu.info().compute_capability;
    let sources = selftest_sources(&built, cc);
    // a wgmma check whose schedule has no wgmma kernel, a tma check none of whose launches
    // passes a tensor map, or a stages check none of whose launches uses dynamic shared
    // memory, would check nothing of it
    for (j, b) in jobs.iter().zip(&built) {
        let missing = match b {
            Some((s, _)) if j.tiles.wgmma && !s.uses_wgmma() => Some("no wgmma kernel"),
            Some((s, _))
                if j.tiles.f32_math().tensor_cores()
                    && !s.kernels.iter().any(|k| {
                        k.spec
                            .conv_geom()
                            .is_some_and(|g| (g.tf32x3, g.tf32) == (j.tiles.tf32x3, j.tiles.tf32))
                    }) =>
            {
                Some("no TF32 convolution")
            }
            Some((s, _)) if j.tiles.tma && s.launches.iter().all(|l| l.tmaps.is_empty()) => {
                Some("no launch with a tensor map")
            }
            Some((s, _))
                if j.label.starts_with("tmaa")
                    && !s
                        .kernels
                        .iter()
                        .any(|k| k.spec.conv_geom().is_some_and(|g| g.tma_a)) =>
            {
                Some("no convolution with its activations by TMA")
            }
            Some((s, _)) if j.tiles.stages != 0 && s.launches.iter().all(|l| l.shared == 0) => {
                Some("no launch with dynamic shared memory")
            }
            None if j.tiles.wgmma || j.tiles.stages != 0 || j.tiles.f32_math().tensor_cores() => {
                Some("no schedule")
            }
            _ => None,
        };
        if let Some(m) = missing {
            report(
                Err(cuda::CudaError::Plan(format!("{m} in the schedule"))),
                &format!("{} {:?}", j.label, j.mode),
            );
        }
    }
    match exec::precompile(&gpu, &cache, sources, exec::compile_threads()) {
        Ok(p) if !a.json => eprintln!(
            "{} modules: {} compiled in {:.1} s on {} threads, the rest from the cache",
            p.modules, p.compiled, p.seconds, p.threads
        ),
        Ok(_) => {}
        // the checks below compile again and report the error per network
        Err(e) => eprintln!("warning: precompiling failed: {e}"),
    }
    report(check::check_augment(&gpu, &cache), "augmentation");
    // after a kernel fault the context is unusable: every later check would fail at its first
    // driver call without naming anything, so the run stops at the one that names the kernel
    let mut poisoned = None;
    let total_checks: usize = jobs.iter().map(|j| 1 + !j.launches_only as usize).sum();
    let mut ran = 0usize;
    'jobs: for j in &jobs {
        let g = &nets[j.net].1;
        let what = format!(
            "{} {:?} unfused={} {}",
            j.label,
            j.mode,
            j.unfused,
            check::arithmetic(j.precision, &j.tiles)
        );
        // every launch alone, then (unless `launches_only`) the whole step
        let mut checks: Vec<(CheckFn, String)> =
            vec![(check::check_launches, format!("{what} every launch"))];
        if !j.launches_only {
            checks.push((check::check_graph, what));
        }
        for (f, what) in checks {
            let r = f(
                &gpu,
                &cache,
                &j.label,
                g,
                j.mode,
                a.batch as usize,
                j.precision,
                j.unfused,
                &j.tiles,
                j.layout,
            );
            ran += 1;
            let sticky = r
                .as_ref()
                .err()
                .filter(|e| e.poisons_context())
                .map(|e| e.to_string());
            report(r, &what);
            if let Some(e) = sticky {
                poisoned = Some(e);
                break 'jobs;
            }
        }
    }
    // on a Hopper GPU: does the hardware read wgmma's operands, and land TMA's boxes, as the
    // convolutions assume? Last, so that a probe that faults (which leaves the context
    // unusable) costs no other check; not after a fault
    if cc == (9, 0) && poisoned.is_none() {
        let mut dump = serde_json::Map::new();
        report(
            cuda::probe::check_wgmma_probe(&gpu, &cache, &mut dump),
            "wgmma layout probe",
        );
        report(
            cuda::probe::check_tma_probe(&gpu, &cache, &mut dump),
            "TMA layout probe",
        );
        if let Some(p) = &a.probe_dump {
            match cuda::probe::write_dump(&gpu, p, dump) {
                Ok(()) if !a.json => eprintln!("probe runs written to {}", p.display()),
                Ok(()) => {}
                Err(e) => eprintln!("warning: could not write {}: {e}", p.display()),
            }
        }
    } else if let Some(p) = &a.probe_dump {
        eprintln!(
            "note: the layout probes did not run (they need an sm_90 GPU and a run without a fault); {} not written",
            p.display()
        );
    }
    if let Some(e) = &poisoned {
        let left = total_checks - ran;
        let msg = format!(
            "stopped: the CUDA context cannot be used after that error ({e}); {left} comparisons not run (rerun with --only to check them)"
        );
        if !a.json {
            println!("{msg}");
        }
        errors.push(msg);
    }
    let failed = results.iter().filter(|r| !r.passed).count();
    let unresolved = results.iter().filter(|r| r.passed && !r.resolved).count();
    // the largest errors of the comparisons that can tell right from wrong
    let max_of = |class: &str| {
        results
            .iter()
            .filter(|r| r.resolved && r.what.ends_with(&format!(" {class}")))
            .map(|r| r.max_rel_err)
            .fold(0f64, f64::max)
    };
    let (max_f32, max_bf16, max_tf32) = (max_of("f32"), max_of("bf16"), max_of("tf32"));
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "device": gpu.info(),
                "checks": results,
                "errors": errors,
                "failed": failed,
                "unresolved": unresolved,
                "max_rel_err_vs_cpu": {"f32": max_f32, "bf16": max_bf16, "tf32": max_tf32},
            }))?
        );
    } else {
        println!(
            "{} checks, {failed} failed, {unresolved} unresolved (--), {} errors; max rel err vs CPU (resolved checks): f32 {max_f32:.2e}, bf16 {max_bf16:.2e}, tf32 {max_tf32:.2e}",
            results.len(),
            errors.len()
        );
    }
    if failed > 0 || !errors.is_empty() {
        anyhow::bail!(
            "selftest failed: {failed} comparisons out of tolerance, {} errors",
            errors.len()
        );
    }
    Ok(())
}
