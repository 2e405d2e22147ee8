//! Timings of a network's schedules on the GPU (`wrnc bench`): training step and inference,
//! fused and unfused, measured with CUDA events after warm-up, as the median of many runs,
//! both as plain stream launches and as one replayed CUDA graph.

use wrnc_compiler::ast::Precision;
use wrnc_compiler::graph::Graph;
use wrnc_compiler::passes::{Fusion, Mode};
use wrnc_compiler::schedule::{self, Layout, Options, Schedule, Tiles};

use super::cache::ModuleCache;
use super::device::Gpu;
use super::exec::{Executor, Shared};
use super::layout::Hyper;
use super::CudaError;
use crate::init::SplitMix64;

/// Summary of repeated measurements, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Timing {
    pub median_ms: f64,
    pub min_ms: f64,
    pub p90_ms: f64,
    pub runs: usize,
}

impl Timing {
    /// From samples (at least one).
    pub fn from_samples(mut v: Vec<f64>) -> Timing {
        v.retain(|x| x.is_finite());
        if v.is_empty() {
            return Timing {
                median_ms: f64::NAN,
                min_ms: f64::NAN,
                p90_ms: f64::NAN,
                runs: 0,
            };
        }
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Timing {
            median_ms: median,
            min_ms: v[0],
            p90_ms: v[((n - 1) * 9) / 10],
            runs: n,
        }
    }
}

/// One schedule's measurements.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ScheduleBench {
    pub mode: String,
    pub fused: bool,
    pub batch: u32,
    pub kernels: usize,
    pub launches: usize,
    /// Launches that take a tensor map (`--tma`: their weights, and some their activations,
    /// arrive by TMA; none where every box would be larger than its tensor).
    pub tma_launches: usize,
    /// Per step / batch, launches enqueued one by one.
    pub stream: Timing,
    /// Per step / batch, the whole step replayed as one CUDA graph.
    pub graph: Option<Timing>,
    /// Images per second at the graph's (else the stream's) median.
    pub images_per_s: f64,
    /// Device bytes the schedule allocated (its own allocation + weights, gradients,
    /// momentum, BN state): the memory plan's peak.
    pub planned_bytes: u64,
    /// Device memory in use measured with `cuMemGetInfo` after the runs, minus before
    /// building the executor (includes the module and the driver's own allocations).
    pub measured_bytes: u64,
    /// The compiler's estimate of the DRAM bytes one step / batch moves
    /// (`wrnc_compiler::memplan::dram_bytes`).
    pub dram_bytes: u64,
    /// Seconds to compile (or load from the cache) and load the kernels.
    pub setup_s: f64,
    pub cache_hit: bool,
    /// The useful multiply-adds of the step's GEMM launches (`KernelSpec::gemm_macs`).
    pub gemm_macs: u64,
    /// Where the step's time goes, kernel by kernel (`wrnc bench --profile`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<Profile>,
}

/// A step timed launch by launch ([`Executor::profile_step`]), summed per kernel.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Profile {
    /// Steps timed (each launch's time is its median over them).
    pub reps: usize,
    /// The launches' medians summed: the step as launched one by one with an event between
    /// every two (near the stream's time; a CUDA graph's replay may be shorter).
    pub step_ms: f64,
    /// GEMM launches' share of `step_ms` (convolutions and linear layers).
    pub gemm_ms: f64,
    /// Useful GEMM FLOPs of the step over `gemm_ms`.
    pub gemm_tflops: Option<f64>,
    /// Per kernel, most time first.
    pub kernels: Vec<KernelTime>,
}

/// One kernel's launches in a [`Profile`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct KernelTime {
    pub kernel: String,
    pub launches: usize,
    /// Its launches' medians summed.
    pub ms: f64,
    /// Of the step's `step_ms`.
    pub share: f64,
    /// Useful GEMM FLOPs (2 per multiply-add, `KernelSpec::gemm_macs`) over `ms`; `None`
    /// for a kernel that is not a GEMM.
    pub tflops: Option<f64>,
    /// The compiler's estimate of its DRAM bytes (`memplan::launch_dram_bytes`) over `ms`.
    pub tb_per_s: f64,
    pub dram_bytes: u64,
}

/// Sums per-launch times (`ms[i]` for `s.launches[i]`) per kernel, with the useful FLOPs and
/// estimated DRAM bytes of each, most time first (ties by name, so the order is
/// deterministic).
pub fn profile_of(s: &Schedule, ms: &[f64], reps: usize) -> Profile {
    let mut per: std::collections::BTreeMap<&str, (usize, f64, Option<u64>, u64)> =
        Default::default();
    let (mut step, mut gemm, mut gemm_macs) = (0.0, 0.0, 0u64);
    for (l, &t) in s.launches.iter().zip(ms) {
        let k = &s.kernels[l.kernel];
        let macs = k.spec.gemm_macs(&l.scalars);
        let bytes = wrnc_compiler::memplan::launch_dram_bytes(s, l);
        let e = per.entry(k.name.as_str()).or_insert((0, 0.0, None, 0));
        e.0 += 1;
        e.1 += t;
        if let Some(m) = macs {
            e.2 = Some(e.2.unwrap_or(0) + m);
            gemm += t;
            gemm_macs += m;
        }
        e.3 += bytes;
        step += t;
    }
    let rate = |num: f64, ms: f64| (ms > 0.0).then(|| num / (ms * 1e-3) / 1e12);
    let mut kernels: Vec<KernelTime> = per
        .into_iter()
        .map(|(name, (launches, t, macs, bytes))| KernelTime {
            kernel: name.to_string(),
            launches,
            ms: t,
            share: if step > 0.0 { t / step } else { 0.0 },
            tflops: macs.and_then(|m| rate(2.0 * m as f64, t)),
            tb_per_s: rate(bytes as f64, t).unwrap_or(0.0),
            dram_bytes: bytes,
        })
        .collect();
    kernels.sort_by(|a, b| b.ms.total_cmp(&a.ms).then_with(|| a.kernel.cmp(&b.kernel)));
    Profile {
        reps,
        step_ms: step,
        gemm_ms: gemm,
        gemm_tflops: rate(2.0 * gemm_macs as f64, gemm),
        kernels,
    }
}

/// The hyper-parameters every benchmark step runs with (`step` feeds the RNG).
pub fn hyper(step: u32) -> Hyper {
    Hyper {
        seed: 1,
        step,
        lr: 1e-3,
        momentum: 0.9,
        weight_decay: 5e-4,
        nesterov: true,
        label_smoothing: 0.0,
    }
}

/// The schedule [`prepare`] measures, with its fusion (also what to hand
/// [`super::exec::precompile`] before a series of benches).
#[allow(clippy::too_many_arguments)]
pub fn bench_schedule_of(
    graph: &Graph,
    mode: Mode,
    batch: u32,
    precision: Precision,
    unfused: bool,
    tiles: &Tiles,
    layout: Layout,
) -> Result<(Schedule, Fusion), CudaError> {
    let fusion = Fusion {
        unfused,
        disabled: vec![],
    };
    let s = schedule::build(
        graph,
        &Options {
            tiles: tiles.clone(),
            layout,
            mode,
            batch,
            precision,
            fusion: fusion.clone(),
        },
    )
    .map_err(|e| CudaError::Plan(e.message))?;
    Ok((s, fusion))
}

/// A schedule of `graph` (tensor-core convolutions with `tiles`) compiled, loaded and ready to
/// run: weights as `Model::new`, a random
/// normal input batch, labels `0..classes`, setup launches done. Also returns the seconds the
/// kernels took to compile (or load from the cache) and the free device memory before.
#[allow(clippy::too_many_arguments)]
pub fn prepare(
    gpu: &Gpu,
    cache: &ModuleCache,
    graph: &Graph,
    mode: Mode,
    batch: u32,
    precision: Precision,
    unfused: bool,
    tiles: &Tiles,
    layout: Layout,
) -> Result<(Executor, f64, u64), CudaError> {
    let (s, fusion) = bench_schedule_of(graph, mode, batch, precision, unfused, tiles, layout)?;
    gpu.synchronize("bench setup")?;
    let before = gpu.mem_info()?;
    let t0 = std::time::Instant::now();
    let mut shared = Shared::new();
    let ex = Executor::new(gpu, s, &fusion, &mut shared, cache)?;
    let setup_s = t0.elapsed().as_secs_f64();
    let params = crate::init::init_params::<f32>(graph, 1);
    let buffers = crate::init::init_buffers::<f32>(graph);
    ex.load_state(gpu, &params, &buffers)?;
    let mut r = SplitMix64(1);
    let n_in = ex.schedule.buffers[ex.schedule.input].len as usize;
    let x: Vec<f32> = (0..n_in).map(|_| r.normal() as f32).collect();
    ex.write_f32(gpu, ex.schedule.input, &x)?;
    if let Some(lb) = ex.schedule.labels {
        let lab: Vec<u8> = (0..batch)
            .flat_map(|i| ((i % graph.classes) as i32).to_le_bytes())
            .collect();
        ex.write_bytes(gpu, lb, &lab)?;
    }
    ex.run_setup(gpu, &hyper(0))?;
    Ok((ex, setup_s, before.0))
}

/// Measures one schedule of `graph`: `warmup` runs, then `iters` timed runs, with and
/// without a CUDA graph.
#[allow(clippy::too_many_arguments)]
pub fn bench_schedule(
    gpu: &Gpu,
    cache: &ModuleCache,
    graph: &Graph,
    mode: Mode,
    batch: u32,
    precision: Precision,
    unfused: bool,
    warmup: usize,
    iters: usize,
    tiles: &Tiles,
    layout: Layout,
    profile: usize,
) -> Result<ScheduleBench, CudaError> {
    let (ex, setup_s, free_before) = prepare(
        gpu, cache, graph, mode, batch, precision, unfused, tiles, layout,
    )?;
    let h = hyper;
    let what = format!("{} bench", ex.schedule.name);
    for i in 0..warmup {
        ex.run(gpu, &h(i as u32))?;
    }
    gpu.synchronize(&what)?;
    let (start, end) = (gpu.event()?, gpu.event()?);
    let mut samples = Vec::with_capacity(iters);
    for i in 0..iters {
        // the per-step scalars go to the device before the timed region
        let hi = h((warmup + i) as u32);
        ex.write_hyper(gpu, &hi)?;
        gpu.record(&start)?;
        ex.enqueue(gpu, &hi)?;
        gpu.record(&end)?;
        samples.push(gpu.elapsed_ms(&start, &end)? as f64);
    }
    let stream = Timing::from_samples(samples);
    let graph_t = match ex.capture(gpu, &h(0)) {
        Ok(g) => {
            // every replay reads the same step and lr from the `hyper` buffer
            ex.write_hyper(gpu, &h(0))?;
            for _ in 0..warmup.max(1) {
                gpu.replay(&g)?;
            }
            gpu.synchronize(&what)?;
            let mut samples = Vec::with_capacity(iters);
            for _ in 0..iters {
                gpu.record(&start)?;
                gpu.replay(&g)?;
                gpu.record(&end)?;
                samples.push(gpu.elapsed_ms(&start, &end)? as f64);
            }
            Some(Timing::from_samples(samples))
        }
        Err(e) => {
            eprintln!("warning: CUDA graph capture failed, stream timings only: {e}");
            None
        }
    };
    // kernel by kernel, after the timed runs (its events do not perturb them)
    let profile = if profile > 0 {
        let ms = ex.profile_step(gpu, &h((warmup + iters) as u32), profile)?;
        Some(profile_of(&ex.schedule, &ms, profile))
    } else {
        None
    };
    gpu.synchronize(&what)?;
    let after = gpu.mem_info()?;
    let best = graph_t.map(|g| g.median_ms).unwrap_or(stream.median_ms);
    Ok(ScheduleBench {
        mode: match mode {
            Mode::Train => "train".into(),
            Mode::Infer => "infer".into(),
        },
        fused: !unfused,
        batch,
        kernels: ex.schedule.kernels.len(),
        launches: ex.schedule.launches.len(),
        tma_launches: ex
            .schedule
            .launches
            .iter()
            .filter(|l| !l.tmaps.is_empty())
            .count(),
        stream,
        graph: graph_t,
        images_per_s: batch as f64 / (best / 1000.0),
        planned_bytes: ex.own_bytes() + ex.shared_bytes(),
        measured_bytes: free_before.saturating_sub(after.0),
        dram_bytes: wrnc_compiler::memplan::dram_bytes(&ex.schedule),
        setup_s,
        cache_hit: ex.cache_hit,
        gemm_macs: ex
            .schedule
            .launches
            .iter()
            .filter_map(|l| ex.schedule.kernels[l.kernel].spec.gemm_macs(&l.scalars))
            .sum(),
        profile,
    })
}
