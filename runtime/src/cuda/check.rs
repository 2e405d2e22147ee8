//! GPU-vs-CPU comparisons: the core of `wrnc selftest`.
//!
//! A schedule run on the GPU is compared with the CPU reference backend in `f64`, starting
//! from the same `f32` weights, non-trivial BN running statistics, inputs and labels (the
//! method of the emulation tests, `tests/codegen_emu.rs`):
//! - training: step 1's logits, loss and every parameter gradient; then a second step (a new
//!   step counter: new dropout masks; momentum now non-zero) and the parameters and BN
//!   running statistics after it -- this also catches state a step leaves behind;
//! - inference: the logits (after the setup launches, e.g. BN folding).
//!
//! Errors are relative to the largest magnitude of the reference tensor, with floors as in the
//! emulation tests (gradients: 1% of the network's largest gradient; updated parameters:
//! 0.1% of the largest parameter) so that values that are zero in exact arithmetic do not
//! divide rounding noise by zero.

use std::collections::BTreeMap;

use wrnc_compiler::ast::Precision;
use wrnc_compiler::graph::Graph;
use wrnc_compiler::passes::{Fusion, Mode};
use wrnc_compiler::schedule::{self, F32Math, Layout, Options, Tiles};

use super::augment::{Augmenter, DeviceDataset};
use super::cache::ModuleCache;
use super::device::Gpu;
use super::exec::{Executor, Shared};
use super::layout::Hyper;
use super::CudaError;
use crate::cpu::{Mode as CpuMode, Model};
use crate::data::{make_batch, Dataset, Normalization};
use crate::init::SplitMix64;
use crate::loss::softmax_cross_entropy;
use crate::optim::Sgd;
use crate::reference::{self, HostScalars};
use crate::Tensor;

/// The outcome of one comparison.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckResult {
    /// `WRN-16-4 train fused f32`.
    pub what: String,
    pub max_rel_err: f64,
    pub tol: f64,
    /// The tensor with the largest error.
    pub worst: String,
    pub passed: bool,
    /// bf16 and plain-TF32 whole steps: the logits' distance from the unrounded f64 CPU model
    /// (what bf16 storage or TF32 operands cost; reported, not held to a tolerance). `None`
    /// elsewhere.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logits_vs_f64_model: Option<f64>,
    /// Whole training steps and bf16 inference: the comparison's resolution, how far apart two
    /// correct computations at this precision land (`twin_noise`; bf16 inference: the logits
    /// of the rounded f64 run and of the same run nudged); `None` elsewhere.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub precision_noise: Option<f64>,
    /// Where `precision_noise` is: what the comparisons are held to,
    /// `max(tol, NOISE_FACTOR * precision_noise)`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_tol: Option<f64>,
    /// Whether the comparison can tell a correct computation from a wrong one at all: false
    /// where `grad_tol` exceeds [`UNRESOLVED_ABOVE`] (deep networks' bf16 whole steps at the
    /// selftest's tiny shapes; their launches are checked one by one). `passed` still says
    /// whether it stayed within `grad_tol`.
    pub resolved: bool,
}

/// A comparison held to more than this (relative to each tensor's largest value) is reported
/// as unresolved: it would pass a step that is wrong by a quarter of the values.
pub const UNRESOLVED_ABOVE: f64 = 0.25;

/// `max |a - b| / max(max |b|, floor)`.
pub fn rel_err(a: &[f32], b: &[f64], floor: f64) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let scale = b.iter().fold(floor.max(1e-30), |m, v| m.max(v.abs()));
    let diff = a.iter().zip(b).fold(0f64, |m, (x, y)| {
        let d = (*x as f64 - y).abs();
        if d.is_nan() {
            f64::INFINITY
        } else {
            m.max(d)
        }
    });
    diff / scale
}

/// The tolerance of a precision: 1e-4 in `f32`, 1e-2 with bf16 activations.
pub fn tolerance(p: Precision) -> f64 {
    match p {
        Precision::F32 => 1e-4,
        Precision::Bf16 => 1e-2,
    }
}

const SEED: u32 = 5;
const LR: f64 = 0.1;
const MOMENTUM: f64 = 0.9;
const WD: f64 = 5e-4;
const SMOOTHING: f64 = 0.1;
/// How many times its resolution (`twin_noise`) a whole training step may differ by (on the
/// fake GPU, the deep examples: 1.1 to 3.9 in f32, 0.04 to 1.7 in bf16).
pub const NOISE_FACTOR: f64 = 10.0;

/// How many nudged twins ([`reference::run_nudged`], seeds 1 to this) a whole step's
/// resolution is the largest distance of: at ReLU's kink one twin may flip a mask the GPU
/// flips and another not.
const TWIN_SEEDS: u64 = 3;

struct Worst {
    err: f64,
    name: String,
}

impl Worst {
    fn add(&mut self, name: &str, e: f64) {
        let e = if e.is_nan() { f64::INFINITY } else { e };
        if std::env::var_os("WRNC_CHECK_TRACE").is_some() {
            eprintln!("check: {name} {e:.3e}");
        }
        if e > self.err || self.name.is_empty() {
            self.err = e;
            self.name = name.to_string();
        }
    }
}

type Map64 = BTreeMap<String, Tensor<f64>>;

fn to64(m: &BTreeMap<String, Tensor<f32>>) -> Map64 {
    m.iter()
        .map(|(k, t)| {
            (
                k.clone(),
                Tensor::from_vec(&t.shape, t.data.iter().map(|&v| v as f64).collect()),
            )
        })
        .collect()
}

fn host(h: &Hyper) -> HostScalars {
    HostScalars {
        seed: h.seed,
        step: h.step,
        lr: h.lr,
        momentum: h.momentum,
        weight_decay: h.weight_decay,
        nesterov: h.nesterov,
        smoothing: h.label_smoothing,
    }
}

/// How finely a training step can be checked at the schedule's precision at all: the largest
/// distance (as the gradient comparison measures it) between the step-1 gradients of the
/// reference the GPU is held to and of twins that differ from it only as much as two correct
/// implementations may. f32: the f64 CPU model against the same model in f32, and against
/// [`TWIN_SEEDS`] runs of the f64 schedule with its stored activations nudged by about one f32
/// kernel's error ([`reference::run_nudged`]). bf16 and plain TF32 (`rounded` given): the f64
/// steps with bf16 storage rounding (`rounded`) against the same with every bf16 value nudged
/// by 2^-23 before rounding ([`reference::run_nudged`]: what another order of the f32 sums
/// does). Deep networks at the selftest's tiny shapes (BN over a handful of values) are so
/// ill-conditioned that this is large (preresnet-164 in f32: 9e-2); the GPU's distance is then
/// held to a multiple of it instead of the kernels' tolerance ([`NOISE_FACTOR`]).
#[allow(clippy::too_many_arguments)]
fn twin_noise(
    gpu: &Gpu,
    graph: &Graph,
    st: &Start,
    xt: &Tensor<f64>,
    labels: &[u32],
    grads: &BTreeMap<String, Tensor<f64>>,
    rounded: Option<&Vec<Vec<f64>>>,
    ex: &Executor,
) -> Result<f64, CudaError> {
    let plan_err = |e: crate::cpu::Error| CudaError::Plan(format!("CPU reference: {e}"));
    let gmax = grads
        .values()
        .flat_map(|t| &t.data)
        .fold(0f64, |a, v| a.max(v.abs()));
    let mut worst = 0f64;
    if rounded.is_none() {
        let mut m =
            Model::<f32>::with_state(graph.clone(), st.m32.params.clone(), st.buffers0.clone())
                .map_err(plan_err)?;
        let x32 = Tensor::from_vec(&xt.shape, st.x.clone());
        let (lg, tape) = m
            .forward(
                &x32,
                CpuMode::Train {
                    seed: SEED,
                    step: 0,
                },
            )
            .map_err(plan_err)?;
        let l = softmax_cross_entropy(&lg, labels, SMOOTHING).map_err(plan_err)?;
        let g32 = m.backward(tape, &l.dlogits).map_err(plan_err)?;
        for (n, t) in grads {
            if let Some(g) = g32.get(n) {
                worst = worst.max(rel_err(&g.data, &t.data, 1e-2 * gmax));
            }
        }
    }
    // Both precisions: the nudged twins of the f64 schedule (`run_nudged`), against the rounded
    // steps (bf16) or the f64 model (f32). In f32 the model rounds like none of the kernels,
    // and at ReLU's kink (a BN over a handful of values, beta 0 at init) a kernel's own error
    // decides masks the other way: wrn-40-2-b313's fused step on the fake GPU, 7.4e-2 from the
    // model in one BN's dbeta, while the f32 model lands 1.4e-4 away; twins of seeds 1 to 4,
    // 1.1e-3, 7.4e-2, 1.2e-3 and 7.4e-2 (hence [`TWIN_SEEDS`]); the same step at batch 4, 6.4e-5.
    let s = &ex.schedule;
    let gb = s
        .buffer("grads")
        .ok_or_else(|| CudaError::Plan("no grads".into()))?;
    let bufs = decoded(s, &persistent_bytes(gpu, ex)?);
    let slot = |bufs: &[Vec<f64>], p: &schedule::ParamSlot| {
        bufs[gb][p.offset as usize..(p.offset + p.len) as usize].to_vec()
    };
    // what each parameter's gradient is held to, and the floor of the comparison
    let (want, floor): (Vec<Option<Vec<f64>>>, f64) = match rounded {
        Some(r) => {
            let w: Vec<_> = s.params.iter().map(|p| Some(slot(r, p))).collect();
            let rmax = w
                .iter()
                .flatten()
                .flatten()
                .fold(0f64, |a, v| a.max(v.abs()));
            (w, 1e-2 * rmax)
        }
        None => (
            s.params
                .iter()
                .map(|p| grads.get(&p.name).map(|t| t.data.clone()))
                .collect(),
            1e-2 * gmax,
        ),
    };
    for seed in 1..=TWIN_SEEDS {
        let twin = reference::run_nudged(s, bufs.clone(), &host(&selftest_hyper(0)), seed)
            .map_err(|e| CudaError::Plan(format!("f64 reference: {e}")))?;
        for (p, w) in s.params.iter().zip(&want) {
            let Some(w) = w else { continue };
            let g: Vec<f32> = slot(&twin, p).iter().map(|&v| v as f32).collect();
            let e = rel_err(&g, w, floor);
            if std::env::var_os("WRNC_CHECK_TRACE").is_some() {
                eprintln!("check: twin {seed} grad {} {e:.3e}", p.name);
            }
            worst = worst.max(e);
        }
    }
    if std::env::var_os("WRNC_CHECK_TRACE").is_some() {
        eprintln!("check: twin noise {worst:.3e}");
    }
    Ok(worst)
}

/// Every buffer of `s` in f64: `inputs`' bytes where it has them, zeros elsewhere.
fn decoded(s: &schedule::Schedule, inputs: &BTreeMap<String, Vec<u8>>) -> Vec<Vec<f64>> {
    s.buffers
        .iter()
        .map(|b| match inputs.get(&b.name) {
            Some(bytes) => reference::decode(bytes, b.dtype),
            None => vec![0.0; b.len as usize],
        })
        .collect()
}

/// Every persistent buffer of `ex`'s schedule as it is on the device now (the step's inputs:
/// parameters, state, input, labels, optimizer table and momentum), by name.
fn persistent_bytes(gpu: &Gpu, ex: &Executor) -> Result<BTreeMap<String, Vec<u8>>, CudaError> {
    let mut m = BTreeMap::new();
    for (i, b) in ex.schedule.buffers.iter().enumerate() {
        if b.role.persistent() {
            m.insert(b.name.clone(), ex.read_bytes(gpu, i)?);
        }
    }
    Ok(m)
}

/// The f64 reference of `steps` whole steps from `inputs`, every stored value rounded to its
/// buffer's type ([`reference::run`] with `round_storage`): what a bf16 schedule's gradients
/// and updated parameters are held to (the unrounded CPU model is too ill-conditioned for that
/// on small networks; see `docs/gpu.md`). Returns every buffer after the last step.
fn rounded_steps(
    s: &schedule::Schedule,
    inputs: &BTreeMap<String, Vec<u8>>,
    hypers: &[Hyper],
) -> Result<Vec<Vec<f64>>, CudaError> {
    let mut bufs = decoded(s, inputs);
    for h in hypers {
        bufs = reference::run(s, bufs, &host(h), true)
            .map_err(|e| CudaError::Plan(format!("f64 reference: {e}")))?;
    }
    Ok(bufs)
}

/// The hyper-parameters of every selftest step (`step` feeds the RNG).
fn selftest_hyper(step: u32) -> Hyper {
    Hyper {
        seed: SEED,
        step,
        lr: LR as f32,
        momentum: MOMENTUM as f32,
        weight_decay: WD as f32,
        nesterov: true,
        label_smoothing: SMOOTHING as f32,
    }
}

/// `WRN-16-4 train fused f32` (with `extra` before the precision).
/// A check's name as selftest prints it: `wrn train fused bf16` (`extra`: ` every launch`).
pub fn describe(
    label: &str,
    mode: Mode,
    unfused: bool,
    precision: Precision,
    tiles: &Tiles,
    extra: &str,
) -> String {
    format!(
        "{label} {} {}{extra} {}",
        match mode {
            Mode::Train => "train",
            Mode::Infer => "infer",
        },
        if unfused { "unfused" } else { "fused" },
        arithmetic(precision, tiles)
    )
}

/// The arithmetic class a check reports its error in (the last word of its name): `f32`
/// (3xTF32 included: fp32's accuracy), `tf32` (plain TF32 conv operands, `--tf32`), `bf16`.
pub fn arithmetic(precision: Precision, tiles: &Tiles) -> &'static str {
    match precision {
        Precision::F32 if tiles.f32_math() == F32Math::Tf32 => "tf32",
        p => p.name(),
    }
}

/// What both checks start from: the f32 weights `Model::new` gives (seed 11), non-trivial BN
/// running statistics, a random normal input batch and labels `i % classes`.
struct Start {
    m32: Model<f32>,
    buffers0: BTreeMap<String, Tensor<f32>>,
    x: Vec<f32>,
    labels: Vec<u32>,
}

fn start(graph: &Graph, batch: usize) -> Result<Start, CudaError> {
    let m32 = Model::<f32>::new(graph.clone(), 11)
        .map_err(|e| CudaError::Plan(format!("CPU reference: {e}")))?;
    let mut r = SplitMix64(9);
    let buffers0: BTreeMap<String, Tensor<f32>> = m32
        .buffers
        .iter()
        .map(|(k, t)| {
            let v = if k.ends_with("running_var") {
                t.data.iter().map(|_| 0.5 + r.uniform() as f32).collect()
            } else {
                t.data.iter().map(|_| 0.2 * r.normal() as f32).collect()
            };
            (k.clone(), Tensor::from_vec(&t.shape, v))
        })
        .collect();
    let per = graph.input_shape().numel() as usize;
    let x: Vec<f32> = (0..batch * per).map(|_| r.normal() as f32).collect();
    let labels: Vec<u32> = (0..batch as u32).map(|i| i % graph.classes).collect();
    Ok(Start {
        m32,
        buffers0,
        x,
        labels,
    })
}

/// `graph`'s schedule on the GPU with `st`'s weights, statistics, input and labels uploaded.
#[allow(clippy::too_many_arguments)]
fn executor(
    gpu: &Gpu,
    cache: &ModuleCache,
    graph: &Graph,
    mode: Mode,
    precision: Precision,
    unfused: bool,
    st: &Start,
    tiles: &Tiles,
    layout: Layout,
) -> Result<Executor, CudaError> {
    let fusion = Fusion {
        unfused,
        disabled: vec![],
    };
    let sched = schedule::build(
        graph,
        &Options {
            tiles: tiles.clone(),
            layout,
            mode,
            batch: st.labels.len() as u32,
            precision,
            fusion: fusion.clone(),
        },
    )
    .map_err(|e| CudaError::Plan(e.message))?;
    let mut shared = Shared::new();
    let ex = Executor::new(gpu, sched, &fusion, &mut shared, cache)?;
    ex.load_state(gpu, &st.m32.params, &st.buffers0)?;
    ex.write_f32(gpu, ex.schedule.input, &st.x)?;
    if let Some(lb) = ex.schedule.labels {
        let lab: Vec<u8> = st
            .labels
            .iter()
            .flat_map(|&l| (l as i32).to_le_bytes())
            .collect();
        ex.write_bytes(gpu, lb, &lab)?;
    }
    Ok(ex)
}

/// Runs every launch of `graph`'s schedule alone on the GPU (setup launches first), reads back
/// every buffer it wrote, and checks each launch against the f64 reference recomputed on the
/// very inputs it read ([`reference::check_kernels`]): the per-kernel check of the emulation
/// tests, on the device. Tolerance as [`tolerance`] (the relative error in the max norm of each
/// written part).
#[allow(clippy::too_many_arguments)]
pub fn check_launches(
    gpu: &Gpu,
    cache: &ModuleCache,
    label: &str,
    graph: &Graph,
    mode: Mode,
    batch: usize,
    precision: Precision,
    unfused: bool,
    tiles: &Tiles,
    layout: Layout,
) -> Result<CheckResult, CudaError> {
    let st = start(graph, batch)?;
    let ex = executor(
        gpu, cache, graph, mode, precision, unfused, &st, tiles, layout,
    )?;
    let h = selftest_hyper(0);
    let what = describe(label, mode, unfused, precision, tiles, " every launch");
    gpu.synchronize(&what)?;
    let inputs = persistent_bytes(gpu, &ex)?;
    let s = &ex.schedule;
    let total = s.setup.len() + s.launches.len();
    // the launches run as the reference asks for what they wrote (no trace is kept)
    let mut ran = 0usize;
    let mut device_err = None;
    let mut fetch = |li: usize, b: usize| -> Result<Vec<u8>, String> {
        let r = (|| {
            while ran <= li {
                ex.run_one(gpu, &h, ran)?;
                ran += 1;
            }
            gpu.synchronize(&what)?;
            ex.read_bytes(gpu, b)
        })();
        r.map_err(|e: CudaError| {
            let m = e.to_string();
            device_err = Some(e);
            m
        })
    };
    let errs = reference::check_kernels_with(s, &inputs, &host(&h), &mut fetch);
    if let Some(e) = device_err {
        return Err(e);
    }
    let errs = errs.map_err(|e| CudaError::Plan(format!("f64 reference: {e}")))?;
    // the launches the reference asked nothing of (none write) still run, as before
    for li in ran..total {
        ex.run_one(gpu, &h, li)?;
    }
    gpu.synchronize(&what)?;
    let mut worst = Worst {
        err: 0.0,
        name: String::new(),
    };
    for e in &errs {
        worst.add(
            &format!("launch {} ({}) {} {}", e.launch, e.note, e.kernel, e.part),
            e.rel,
        );
    }
    let tol = tolerance(precision);
    Ok(CheckResult {
        passed: !errs.is_empty() && worst.err <= tol,
        what,
        max_rel_err: worst.err,
        tol,
        worst: worst.name,
        logits_vs_f64_model: None,
        precision_noise: None,
        grad_tol: None,
        resolved: true,
    })
}

/// Compares `graph`'s training step (`Mode::Train`) or inference at `batch` on the GPU with
/// the CPU reference.
#[allow(clippy::too_many_arguments)]
pub fn check_graph(
    gpu: &Gpu,
    cache: &ModuleCache,
    label: &str,
    graph: &Graph,
    mode: Mode,
    batch: usize,
    precision: Precision,
    unfused: bool,
    tiles: &Tiles,
    layout: Layout,
) -> Result<CheckResult, CudaError> {
    let plan_err = |e: crate::cpu::Error| CudaError::Plan(format!("CPU reference: {e}"));
    let st = start(graph, batch)?;
    let mut cpu = Model::<f64>::with_state(graph.clone(), to64(&st.m32.params), to64(&st.buffers0))
        .map_err(plan_err)?;
    let s = graph.input_shape();
    let labels = st.labels.clone();
    let xt = Tensor::from_vec(
        &[batch, s.c as usize, s.h as usize, s.w as usize],
        st.x.iter().map(|&v| v as f64).collect(),
    );
    let ex = executor(
        gpu, cache, graph, mode, precision, unfused, &st, tiles, layout,
    )?;
    let tol = tolerance(precision);
    let mut worst = Worst {
        err: 0.0,
        name: String::new(),
    };
    let what = describe(label, mode, unfused, precision, tiles, "");
    let h = selftest_hyper;
    // bf16 and plain TF32 round on the way (storage; the TF32 operands inside the kernels):
    // whole steps are held to the f64 schedule with the same roundings (`reference::run`)
    let rounding = precision == Precision::Bf16 || tiles.f32_math() == F32Math::Tf32;
    let mut vs_model = None;
    // gradients, updates and momentum (tracked apart, to name the worst of each kind); a
    // training step's comparisons are all held to `tol`, or to NOISE_FACTOR times how far the
    // precision itself moves the gradients ([`twin_noise`]) where that is more: at init, deep
    // networks at these shapes are ill-conditioned in the forward pass too (preresnet-164's
    // step-1 logits: 2.6e-4 in f32, 0.41 in bf16; from the same state one step later, 1.4e-6
    // and 0)
    let mut grad_worst = Worst {
        err: 0.0,
        name: String::new(),
    };
    let mut noise = None;
    match mode {
        Mode::Infer => {
            let want = cpu.infer(&xt).map_err(plan_err)?;
            // bf16: against the f64 run with bf16 storage rounding (setup included), as the
            // training step below, held to its resolution too (the same run nudged: the logits
            // of a 110-layer PyramidNet move 2e-2 by that alone); the distance from the
            // unrounded model is reported (plain TF32 likewise, its operands rounded)
            let rounded = if rounding {
                gpu.synchronize(&what)?;
                let inputs = persistent_bytes(gpu, &ex)?;
                let r = rounded_steps(&ex.schedule, &inputs, &[h(0)])?;
                let twin = reference::run_nudged(
                    &ex.schedule,
                    decoded(&ex.schedule, &inputs),
                    &host(&h(0)),
                    1,
                )
                .map_err(|e| CudaError::Plan(format!("f64 reference: {e}")))?;
                let l = ex.schedule.logits;
                let t: Vec<f32> = twin[l].iter().map(|&v| v as f32).collect();
                noise = Some(rel_err(&t, &r[l], 1e-6));
                Some(r)
            } else {
                None
            };
            ex.run_setup(gpu, &h(0))?;
            ex.run(gpu, &h(0))?;
            gpu.synchronize(&what)?;
            let got = ex.read_f32(gpu, ex.schedule.logits)?;
            match &rounded {
                Some(r) => {
                    worst.add("logits", rel_err(&got, &r[ex.schedule.logits], 1e-6));
                    vs_model = Some(rel_err(&got, &want.data, 1e-6));
                }
                None => worst.add("logits", rel_err(&got, &want.data, 1e-6)),
            }
        }
        Mode::Train => {
            // Each of the two steps is compared from the same state on both sides: after the
            // first, the GPU's parameters, momentum and BN statistics are copied into the
            // reference. Two free-running steps of a deep network at these tiny shapes (BN
            // over a handful of values) are chaotic: f32 rounding noise in the first step's
            // update grows to O(1) differences in the second (preresnet-164's running
            // variances, 0.87 in f32 on the fake GPU), which says nothing about the kernels.
            // bf16: everything against the f64 steps with bf16 storage rounding
            // (`reference::run`, the CPU reference of a bf16 schedule), whose distance from
            // the unrounded model is bf16's, not the kernels' (plain TF32 likewise, with its
            // operands rounded as the kernels round them). f32: against the CPU model.
            let rounded_from =
                |ex: &Executor, step: u32| -> Result<Option<Vec<Vec<f64>>>, CudaError> {
                    if !rounding {
                        return Ok(None);
                    }
                    gpu.synchronize(&what)?;
                    let inputs = persistent_bytes(gpu, ex)?;
                    Ok(Some(rounded_steps(&ex.schedule, &inputs, &[h(step)])?))
                };
            let arena = |bufs: &[Vec<f64>], name: &str, p: &schedule::ParamSlot| -> Vec<f64> {
                let b = ex
                    .schedule
                    .buffer(name)
                    .expect("train schedules have params and grads");
                bufs[b][p.offset as usize..(p.offset + p.len) as usize].to_vec()
            };
            let shapes: BTreeMap<String, Vec<usize>> = graph
                .params()
                .into_iter()
                .map(|(n, p)| (n, p.shape))
                .collect();
            let mut sgd = Sgd::<f64>::new(MOMENTUM, true, WD);
            for step in 0..2u32 {
                let rounded = rounded_from(&ex, step)?;
                let base = cpu.params.clone();
                let (logits, tape) = cpu
                    .forward(&xt, CpuMode::Train { seed: SEED, step })
                    .map_err(plan_err)?;
                let l = softmax_cross_entropy(&logits, &labels, SMOOTHING).map_err(plan_err)?;
                let grads = cpu.backward(tape, &l.dlogits).map_err(plan_err)?;
                if step == 0 {
                    noise = Some(twin_noise(
                        gpu,
                        graph,
                        &st,
                        &xt,
                        &labels,
                        &grads,
                        rounded.as_ref(),
                        &ex,
                    )?);
                }
                sgd.step(&mut cpu.params, &grads, LR).map_err(plan_err)?;
                ex.run(gpu, &h(step))?;
                gpu.synchronize(&what)?;
                let got = ex.read_f32(gpu, ex.schedule.logits)?;
                let lb = ex.schedule.loss.expect("train has loss");
                let (want_logits, want_loss) = match &rounded {
                    Some(one) => (
                        one[ex.schedule.logits].clone(),
                        one[lb].iter().sum::<f64>() / one[lb].len().max(1) as f64,
                    ),
                    None => (logits.data.clone(), l.loss),
                };
                let s = step + 1;
                worst.add(
                    &format!("step {s} logits"),
                    rel_err(&got, &want_logits, 1e-6),
                );
                if step == 0 && rounded.is_some() {
                    vs_model = Some(rel_err(&got, &logits.data, 1e-6));
                }
                let loss = ex.read_f32(gpu, lb)?;
                let mean = loss.iter().map(|&v| v as f64).sum::<f64>() / loss.len() as f64;
                worst.add(
                    &format!("step {s} loss"),
                    (mean - want_loss).abs() / want_loss.abs().max(1.0),
                );
                // gradients, the parameters' updates and the momentum, each relative to the
                // largest of its kind in the network (1% floor), as the emulation tests do
                let slice = |name: &str| -> Result<Vec<f32>, CudaError> {
                    let b = ex
                        .schedule
                        .buffer(name)
                        .ok_or_else(|| CudaError::Plan(format!("no {name}")))?;
                    ex.read_f32(gpu, b)
                };
                let (g, pg, mg) = (slice("grads")?, slice("params")?, slice("momentum")?);
                let mut want_g = vec![];
                let mut want_d = vec![];
                let mut want_m = vec![];
                for p in &ex.schedule.params {
                    let b0 = &base[&p.name].data;
                    let (wg, wp, wm) = match &rounded {
                        Some(r) => (
                            arena(r, "grads", p),
                            arena(r, "params", p),
                            arena(r, "momentum", p),
                        ),
                        None => (
                            grads
                                .get(&p.name)
                                .map(|t| t.data.clone())
                                .unwrap_or_default(),
                            cpu.params[&p.name].data.clone(),
                            sgd.state
                                .get(&p.name)
                                .map(|t| t.data.clone())
                                .unwrap_or_default(),
                        ),
                    };
                    want_g.push(wg);
                    want_d.push(wp.iter().zip(b0).map(|(a, b)| a - b).collect::<Vec<f64>>());
                    want_m.push(wm);
                }
                let big = |v: &[Vec<f64>]| v.iter().flatten().fold(0f64, |m, x| m.max(x.abs()));
                let (gmax, dmax, mmax) = (big(&want_g), big(&want_d), big(&want_m));
                for (i, p) in ex.schedule.params.iter().enumerate() {
                    let range = p.offset as usize..(p.offset + p.len) as usize;
                    let b0 = &base[&p.name].data;
                    let got_d: Vec<f32> = pg[range.clone()]
                        .iter()
                        .zip(b0)
                        .map(|(a, b)| (*a as f64 - b) as f32)
                        .collect();
                    grad_worst.add(
                        &format!("step {s} grad {}", p.name),
                        rel_err(&g[range.clone()], &want_g[i], 1e-2 * gmax),
                    );
                    grad_worst.add(
                        &format!("step {s} update {}", p.name),
                        rel_err(&got_d, &want_d[i], 1e-2 * dmax),
                    );
                    grad_worst.add(
                        &format!("step {s} momentum {}", p.name),
                        rel_err(&mg[range], &want_m[i], 1e-2 * mmax),
                    );
                }
                // running statistics: bf16 against the rounded f64 step too (a BN over the 8
                // values per channel of a batch-2 check at 2x2 is ill-conditioned enough that
                // bf16 storage alone moves a running variance 13% from the unrounded model's:
                // wrn-10-2's `3.body.1.running_var[4]`, 0.689 on the fake GPU and in the
                // rounded steps, 0.610 in the model)
                let (params, buffers) = ex.save_state(gpu, &shapes)?;
                let state = ex.schedule.buffer("state");
                for (n, want) in &cpu.buffers {
                    let got = buffers.get(n).map(|t| t.data.as_slice()).unwrap_or(&[]);
                    // a BN node's slot holds its running mean, then its running variance
                    let slot = ex.schedule.state.iter().find_map(|(node, off, len)| {
                        let c = (*len / 2) as usize;
                        let off = *off as usize;
                        match n.strip_prefix(node.as_str()) {
                            Some(".running_mean") => Some(off..off + c),
                            Some(".running_var") => Some(off + c..off + 2 * c),
                            _ => None,
                        }
                    });
                    let want = match (&rounded, state, slot) {
                        (Some(r), Some(b), Some(r2)) => r[b][r2].to_vec(),
                        _ => want.data.clone(),
                    };
                    worst.add(&format!("step {s} {n}"), rel_err(got, &want, 1e-6));
                }
                // the next step starts from the GPU's state on both sides
                let momentum = ex.split_arena(&mg, &shapes)?;
                cpu.params = to64(&params);
                cpu.buffers = to64(&buffers);
                sgd.state = to64(&momentum);
            }
        }
    }
    let grad_tol = noise.map_or(tol, |n: f64| tol.max(NOISE_FACTOR * n));
    let passed = worst.err.max(grad_worst.err) <= grad_tol;
    let (max_rel_err, worst_name) = if grad_worst.err > worst.err {
        (grad_worst.err, grad_worst.name)
    } else {
        (worst.err, worst.name)
    };
    Ok(CheckResult {
        passed,
        what,
        max_rel_err,
        tol,
        worst: worst_name,
        logits_vs_f64_model: vs_model,
        precision_noise: noise,
        grad_tol: noise.map(|_| grad_tol),
        resolved: grad_tol <= UNRESOLVED_ABOVE,
    })
}

/// The augmentation kernel against [`make_batch`], bit for bit (f32), on a small synthetic
/// data set, with and without augmentation.
pub fn check_augment(gpu: &Gpu, cache: &ModuleCache) -> Result<CheckResult, CudaError> {
    let (n, c, h, w) = (37usize, 3usize, 11usize, 9usize);
    let mut r = SplitMix64(3);
    let ds = Dataset {
        images: (0..n * c * h * w)
            .map(|_| (r.next_u64() & 255) as u8)
            .collect(),
        labels: (0..n).map(|i| (i % 10) as u16).collect(),
        n,
        c,
        h,
        w,
        classes: 10,
        class_names: vec![],
    };
    let norm = Normalization {
        mean: vec![0.4, 0.5, 0.6],
        std: vec![0.2, 0.25, 0.3],
    };
    let batch = 13;
    let aug = Augmenter::new(gpu, Precision::F32, batch, cache)?;
    let dev = DeviceDataset::upload(gpu, &ds, &norm)?;
    let out = gpu.alloc((batch * c * h * w * 4) as u64, "augmentation check", 0)?;
    let lab = gpu.alloc((batch * 4) as u64, "augmentation check", 0)?;
    let indices: Vec<usize> = (0..batch).map(|i| (i * 7 + 3) % n).collect();
    let mut mismatches = 0usize;
    for (augment, seed) in [(false, 0u64), (true, (5u64 << 32) | 17)] {
        aug.run(
            gpu,
            &dev,
            &indices,
            batch,
            augment,
            seed,
            out.ptr(),
            lab.ptr(),
        )?;
        let mut bytes = vec![0u8; batch * c * h * w * 4];
        gpu.download(out.ptr(), &mut bytes)?;
        let mut lb = vec![0u8; batch * 4];
        gpu.download(lab.ptr(), &mut lb)?;
        let (want, want_labels) = make_batch(&ds, &indices, augment, seed, &norm);
        let got: Vec<u32> = bytes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        mismatches += got
            .iter()
            .zip(&want.data)
            .filter(|(g, w)| **g != w.to_bits())
            .count();
        let got_labels: Vec<i32> = lb
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        mismatches += got_labels
            .iter()
            .zip(&want_labels)
            .filter(|(g, w)| **g != **w as i32)
            .count();
    }
    Ok(CheckResult {
        what: "augmentation kernel vs make_batch (bit-exact)".into(),
        max_rel_err: mismatches as f64,
        tol: 0.0,
        worst: format!("{mismatches} elements differ"),
        passed: mismatches == 0,
        logits_vs_f64_model: None,
        precision_noise: None,
        grad_tol: None,
        resolved: true,
    })
}
