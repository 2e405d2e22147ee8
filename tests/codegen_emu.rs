//! Generated CUDA, run through the emulation (`emu/cuda_emu.h`, g++), against the CPU
//! reference backend (`wrnc-runtime`, in f64): a whole training step of small networks of
//! every family, fused and unfused -- logits, loss, every parameter gradient, the updated
//! parameters and BN running statistics -- and inference.

#[path = "emu_support.rs"]
mod support;

use std::collections::BTreeMap;
use support::*;
use wrnc_compiler::ast::Precision;
use wrnc_compiler::graph::Graph;
use wrnc_compiler::passes::{Fusion, Mode};
use wrnc_compiler::schedule::{
    self, Access, Dtype, KernelSpec, Launch, Layout, Options, ScalarArg, Schedule, TcTile, Tiles,
};
use wrnc_runtime::cpu::{Mode as CpuMode, Model};
use wrnc_runtime::init::SplitMix64;
use wrnc_runtime::loss::softmax_cross_entropy;
use wrnc_runtime::optim::Sgd;
use wrnc_runtime::reference;
use wrnc_runtime::Tensor;

fn graph(body: &str) -> Graph {
    graph_in("input 3x6x6", body)
}

fn graph_in(input: &str, body: &str) -> Graph {
    let text = format!("network \"t\" {{ {input} classes 3 {body} }}");
    wrnc_grammar::build(&wrnc_grammar::Source::inline(text.as_str()))
        .unwrap_or_else(|d| panic!("{body}\n{d:?}"))
}

const HYPER: Hyper = Hyper {
    seed: 5,
    step: 3,
    lr: 0.1,
    momentum: 0.9,
    weight_decay: 5e-4,
    nesterov: true,
    smoothing: 0.1,
};
const BATCH: usize = 2;

/// The reference step: f64 CPU model starting from the f32-rounded parameters.
struct Reference {
    params0: BTreeMap<String, Vec<f32>>,
    buffers0: BTreeMap<String, Vec<f32>>,
    x: Vec<f32>,
    labels: Vec<u32>,
    logits: Vec<f64>,
    loss: f64,
    grads: BTreeMap<String, Vec<f64>>,
    params1: BTreeMap<String, Vec<f64>>,
    buffers1: BTreeMap<String, Vec<f64>>,
}

fn reference(g: &Graph, mode: Mode) -> Reference {
    reference_n(g, mode, BATCH)
}

fn reference_n(g: &Graph, mode: Mode, batch: usize) -> Reference {
    let m32 = Model::<f32>::new(g.clone(), 11).unwrap();
    let params0: BTreeMap<String, Vec<f32>> = m32
        .params
        .iter()
        .map(|(k, t)| (k.clone(), t.data.clone()))
        .collect();
    // non-trivial running statistics, so eval mode tests something
    let mut r = SplitMix64(9);
    let buffers0: BTreeMap<String, Vec<f32>> = m32
        .buffers
        .iter()
        .map(|(k, t)| {
            let v = if k.ends_with("running_var") {
                t.data.iter().map(|_| 0.5 + r.uniform() as f32).collect()
            } else {
                t.data.iter().map(|_| 0.2 * r.normal() as f32).collect()
            };
            (k.clone(), v)
        })
        .collect();
    let to64 = |m: &BTreeMap<String, Vec<f32>>, shapes: &BTreeMap<String, Tensor<f32>>| {
        m.iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    Tensor::from_vec(&shapes[k].shape, v.iter().map(|&x| x as f64).collect()),
                )
            })
            .collect::<BTreeMap<_, _>>()
    };
    let mut m = Model::<f64>::with_state(
        g.clone(),
        to64(&params0, &m32.params),
        to64(&buffers0, &m32.buffers),
    )
    .unwrap();
    let s = g.input_shape();
    let len = batch * s.numel() as usize;
    let x: Vec<f32> = (0..len).map(|_| r.normal() as f32).collect();
    let labels: Vec<u32> = (0..batch as u32).map(|i| i % g.classes).collect();
    let xt = Tensor::from_vec(
        &[batch, s.c as usize, s.h as usize, s.w as usize],
        x.iter().map(|&v| v as f64).collect(),
    );
    let cpu_mode = match mode {
        Mode::Train => CpuMode::Train {
            seed: HYPER.seed,
            step: HYPER.step,
        },
        Mode::Infer => CpuMode::Eval,
    };
    let (logits, tape) = m.forward(&xt, cpu_mode).unwrap();
    let mut out = Reference {
        params0,
        buffers0,
        x,
        labels: labels.clone(),
        logits: logits.data.clone(),
        loss: 0.0,
        grads: BTreeMap::new(),
        params1: BTreeMap::new(),
        buffers1: m
            .buffers
            .iter()
            .map(|(k, t)| (k.clone(), t.data.clone()))
            .collect(),
    };
    if mode == Mode::Train {
        let l = softmax_cross_entropy(&logits, &labels, HYPER.smoothing as f64).unwrap();
        out.loss = l.loss;
        let grads = m.backward(tape, &l.dlogits).unwrap();
        let mut sgd = Sgd::new(
            HYPER.momentum as f64,
            HYPER.nesterov,
            HYPER.weight_decay as f64,
        );
        sgd.step(&mut m.params, &grads, HYPER.lr as f64).unwrap();
        out.grads = grads.into_iter().map(|(k, t)| (k, t.data)).collect();
        out.params1 = m
            .params
            .iter()
            .map(|(k, t)| (k.clone(), t.data.clone()))
            .collect();
    }
    out
}

/// The buffers a step starts from: parameters, BN state, the batch (and in training the
/// optimizer table and the labels), as raw bytes of each buffer's dtype.
fn inputs(s: &Schedule, r: &Reference) -> Vec<(String, Vec<u8>)> {
    let mut arena = vec![0f32; s.buffers[s.buffer("params").unwrap()].len as usize];
    for p in &s.params {
        arena[p.offset as usize..(p.offset + p.len) as usize].copy_from_slice(&r.params0[&p.name]);
    }
    let mut state = vec![0f32; s.buffers[s.buffer("state").unwrap()].len as usize];
    for (name, off, len) in &s.state {
        let c = (*len / 2) as usize;
        let o = *off as usize;
        state[o..o + c].copy_from_slice(&r.buffers0[&format!("{name}.running_mean")]);
        state[o + c..o + 2 * c].copy_from_slice(&r.buffers0[&format!("{name}.running_var")]);
    }
    let x: Vec<f64> = r.x.iter().map(|&v| v as f64).collect();
    let mut inputs = vec![
        ("params".to_string(), f32_bytes(&arena)),
        ("state".to_string(), f32_bytes(&state)),
        (
            "input".to_string(),
            reference::encode(&x, s.buffers[s.input].dtype),
        ),
    ];
    if s.mode == Mode::Train {
        let table: Vec<u8> = schedule::sgd_table(s)
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        inputs.push(("sgd_table".into(), table));
        let labels: Vec<u8> = r
            .labels
            .iter()
            .flat_map(|&v| (v as i32).to_le_bytes())
            .collect();
        inputs.push(("labels".into(), labels));
    }
    inputs
}

const HOST: reference::HostScalars = reference::HostScalars {
    seed: HYPER.seed,
    step: HYPER.step,
    lr: HYPER.lr,
    momentum: HYPER.momentum,
    weight_decay: HYPER.weight_decay,
    nesterov: HYPER.nesterov,
    smoothing: HYPER.smoothing,
};

/// Runs `s` through the emulation with the reference's inputs and state, tracing every
/// launch, and checks every kernel in isolation ([`check_kernels`]) with `kernel_tol`.
fn emulate(tag: &str, s: &Schedule, r: &Reference, kernel_tol: f64) -> BTreeMap<String, Vec<u8>> {
    let ins = inputs(s, r);
    let (out, trace) = run_schedule_traced(tag, s, &ins, HYPER, true);
    check_kernels(tag, s, &ins, &trace, kernel_tol);
    negative_control(tag, s, &ins, &trace, kernel_tol);
    out
}

/// The per-kernel check must catch a wrong kernel: one value written by a launch in the middle
/// of the run is moved by `10 * tol` of its magnitude, and that launch must be the first one
/// flagged (later ones read the moved value, so they may be flagged too).
fn negative_control(tag: &str, s: &Schedule, ins: &[(String, Vec<u8>)], trace: &Trace, tol: f64) {
    let all: Vec<&Launch> = s.setup.iter().chain(&s.launches).collect();
    let (li, key) = (all.len() / 2..all.len())
        .find_map(|li| {
            let a = all[li].buffers.iter().find(|a| a.access != Access::Read)?;
            Some((li, (li, s.buffers[a.buffer].name.clone())))
        })
        .expect("a launch that writes");
    let a = *all[li]
        .buffers
        .iter()
        .find(|a| a.access != Access::Read)
        .unwrap();
    let dtype = s.buffers[a.buffer].dtype;
    let mut v = reference::decode(&trace[&key], dtype);
    let slice = a.offset as usize..(a.offset + a.len) as usize;
    let i = slice
        .clone()
        .max_by(|&x, &y| v[x].abs().total_cmp(&v[y].abs()))
        .unwrap();
    v[i] = if v[i] == 0.0 {
        1.0
    } else {
        v[i] * (1.0 + 10.0 * tol)
    };
    let mut bad = trace.clone();
    bad.insert(key, reference::encode(&v, dtype));
    let ins: BTreeMap<String, Vec<u8>> = ins.iter().cloned().collect();
    let errs = reference::check_kernels(s, &ins, &bad, &HOST).unwrap();
    let first = errs.iter().find(|e| e.rel > tol);
    assert_eq!(
        first.map(|e| e.launch),
        Some(li),
        "{tag}: a wrong value written by launch {li} ({}) was not caught there",
        all[li].note
    );
}

/// Gradients and updated parameters of the f64 step with storage rounding (see
/// `reference::run`), by parameter name.
fn rounded_reference(
    s: &Schedule,
    r: &Reference,
) -> (BTreeMap<String, Vec<f64>>, BTreeMap<String, Vec<f64>>) {
    let ins: BTreeMap<String, Vec<u8>> = inputs(s, r).into_iter().collect();
    let bufs: Vec<Vec<f64>> = s
        .buffers
        .iter()
        .map(|b| match ins.get(&b.name) {
            Some(bytes) => reference::decode(bytes, b.dtype),
            None => vec![0.0; b.len as usize],
        })
        .collect();
    let out = reference::run(s, bufs, &HOST, true).unwrap();
    let (g, p) = (
        &out[s.buffer("grads").unwrap()],
        &out[s.buffer("params").unwrap()],
    );
    let mut grads = BTreeMap::new();
    let mut params = BTreeMap::new();
    for slot in &s.params {
        let range = slot.offset as usize..(slot.offset + slot.len) as usize;
        grads.insert(slot.name.clone(), g[range.clone()].to_vec());
        params.insert(slot.name.clone(), p[range].to_vec());
    }
    (grads, params)
}

/// Per-kernel checks. Before each launch the buffers hold exactly what the emulation had
/// (the step's inputs, then every earlier launch's traced writes); the f64 reference
/// (`wrnc_runtime::reference`, the CPU backend's op kernels) recomputes the launch from them, and
/// every part of every argument the kernel writes must satisfy
///
/// ```text
/// max_i |emulated_i - reference_i|  <=  tol * max_i |reference_i|
/// ```
///
/// (the relative error in the max norm of that part: a whole output tensor, or one half of a
/// per-channel pair such as BN's mean / rstd or the atomically accumulated sum / sum of
/// squares). Prints the worst part of each kernel.
#[track_caller]
fn check_kernels(tag: &str, s: &Schedule, ins: &[(String, Vec<u8>)], trace: &Trace, tol: f64) {
    let ins: BTreeMap<String, Vec<u8>> = ins.iter().cloned().collect();
    let errs =
        reference::check_kernels(s, &ins, trace, &HOST).unwrap_or_else(|e| panic!("{tag}: {e}"));
    assert!(!errs.is_empty());
    let mut worst: BTreeMap<&str, &reference::PartErr> = BTreeMap::new();
    for e in &errs {
        let w = worst.entry(e.kernel.as_str()).or_insert(e);
        if e.rel > w.rel {
            *w = e;
        }
    }
    let launches = s.setup.len() + s.launches.len();
    let max = errs.iter().fold(0f64, |m, e| m.max(e.rel));
    eprintln!(
        "{tag}: {launches} launches, {} kernels, {} parts; worst relative error {max:.2e}",
        s.kernels.len(),
        errs.len()
    );
    let bad: Vec<String> = errs
        .iter()
        .filter(|e| e.rel.is_nan() || e.rel > tol)
        .map(|e| {
            format!(
                "  launch {} ({}) {} {}: {:.3e} (max |err| {:.3e}, max |want| {:.3e})",
                e.launch, e.note, e.kernel, e.part, e.rel, e.abs, e.scale
            )
        })
        .collect();
    assert!(
        bad.is_empty(),
        "{tag}: {} kernel outputs over {tol:.0e}:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

/// The f64 reference run launch after launch from the step's inputs must be the CPU model's
/// step (f64) to rounding: checks the per-kernel reference itself, independently of the
/// emulation.
fn check_reference_chain(tag: &str, s: &Schedule, r: &Reference) {
    let ins: BTreeMap<String, Vec<u8>> = inputs(s, r).into_iter().collect();
    let bufs: Vec<Vec<f64>> = s
        .buffers
        .iter()
        .map(|b| match ins.get(&b.name) {
            Some(bytes) => reference::decode(bytes, b.dtype),
            None => vec![0.0; b.len as usize],
        })
        .collect();
    let out = reference::run(s, bufs, &HOST, false).unwrap_or_else(|e| panic!("{tag}: {e}"));
    let f = |name: &str| -> Vec<f32> {
        out[s.buffer(name).unwrap()]
            .iter()
            .map(|&v| v as f32)
            .collect()
    };
    let tol = 1e-6; // f32 rounding of the comparison only: both sides are f64
    close(
        &format!("{tag} reference: logits"),
        &f(&s.buffers[s.logits].name),
        &r.logits,
        tol,
    );
    if s.mode == Mode::Train {
        let g = &out[s.buffer("grads").unwrap()];
        let p = &out[s.buffer("params").unwrap()];
        for slot in &s.params {
            let range = slot.offset as usize..(slot.offset + slot.len) as usize;
            let want = &r.grads[&slot.name];
            let scale = want.iter().fold(1e-12f64, |m, v| m.max(v.abs()));
            let err = g[range.clone()]
                .iter()
                .zip(want)
                .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                err <= 1e-9 * scale.max(1e-3),
                "{tag} reference: grad {} off by {err:e} (scale {scale:e})",
                slot.name
            );
            let want = &r.params1[&slot.name];
            let err = p[range]
                .iter()
                .zip(want)
                .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                err <= 1e-9,
                "{tag} reference: updated {} off by {err:e}",
                slot.name
            );
        }
        let st = &out[s.buffer("state").unwrap()];
        for (bn, off, len) in &s.state {
            let (o, c) = (*off as usize, (*len / 2) as usize);
            for (k, suffix) in ["running_mean", "running_var"].iter().enumerate() {
                let want = &r.buffers1[&format!("{bn}.{suffix}")];
                let got = &st[o + k * c..o + (k + 1) * c];
                let err = got
                    .iter()
                    .zip(want)
                    .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
                assert!(err <= 1e-9, "{tag} reference: {bn}.{suffix} off by {err:e}");
            }
        }
    }
}

/// Activation precision and the tolerances it is held to: `kernel` per kernel in isolation
/// (see [`check_kernels`]), `e2e` for the whole step against the CPU model in f64.
#[derive(Debug, Clone, Copy)]
struct Prec {
    precision: Precision,
    kernel: f64,
    e2e: f64,
    /// Every tensor-core conv's block tile (bf16).
    tile: TcTile,
    /// Activation layout (`Auto`: NHWC in bf16, NCHW in f32).
    layout: Layout,
    /// Hopper's warpgroup MMA for the `_v8` forward and data-gradient convs (`Tiles::wgmma`).
    wgmma: bool,
    /// `cp.async` pipeline stages of the `_v8` convs (`Tiles::stages`; 0: automatic).
    stages: u32,
    /// The weight operand of the `wgmma` convs by TMA (`Tiles::tma`).
    tma: bool,
    /// f32 convs on the tensor cores as 3xTF32 (`Tiles::tf32x3`).
    tf32x3: bool,
    /// f32 convs on the tensor cores in plain TF32 (`Tiles::tf32`).
    tf32: bool,
    /// Strided data gradients over every tap, not in phase order (`Tiles::dense_dgrad`).
    dense_dgrad: bool,
    /// bf16's forward and data-gradient `wgmma` convs with stages of 64 (`Tiles::k64`).
    k64: bool,
}

const F32: Prec = Prec {
    precision: Precision::F32,
    kernel: 1e-5,
    e2e: 1e-4,
    tile: TcTile::DEFAULT,
    layout: Layout::Auto,
    wgmma: false,
    stages: 0,
    tma: false,
    tf32x3: false,
    tf32: false,
    dense_dgrad: false,
    k64: false,
};

/// f32 on NHWC activations: the layout checked at fp32 tolerances.
const F32_NHWC: Prec = Prec {
    layout: Layout::Nhwc,
    ..F32
};

/// bf16 on NCHW activations (the tensor cores' engine on the other layout).
const BF16_NCHW: Prec = Prec {
    layout: Layout::Nchw,
    ..BF16
};

/// bf16 activation storage (8-bit mantissa: one rounding is up to 2^-9 = 2e-3 relative).
const BF16: Prec = Prec {
    precision: Precision::Bf16,
    kernel: 1e-2,
    e2e: 1e-2,
    tile: TcTile::DEFAULT,
    layout: Layout::Auto,
    wgmma: false,
    stages: 0,
    tma: false,
    tf32x3: false,
    tf32: false,
    dense_dgrad: false,
    k64: false,
};

fn build(g: &Graph, mode: Mode, unfused: bool, precision: Precision) -> Schedule {
    build_tiled(g, mode, unfused, precision, TcTile::DEFAULT)
}

fn build_tiled(
    g: &Graph,
    mode: Mode,
    unfused: bool,
    precision: Precision,
    tile: TcTile,
) -> Schedule {
    build_in(
        g,
        mode,
        unfused,
        Prec {
            precision,
            tile,
            layout: Layout::Auto,
            kernel: 0.0,
            e2e: 0.0,
            wgmma: false,
            stages: 0,
            tma: false,
            tf32x3: false,
            tf32: false,
            dense_dgrad: false,
            k64: false,
        },
    )
}

fn build_in(g: &Graph, mode: Mode, unfused: bool, prec: Prec) -> Schedule {
    let Prec {
        precision,
        tile,
        layout,
        wgmma,
        stages,
        tma,
        tf32x3,
        tf32,
        dense_dgrad,
        k64,
        ..
    } = prec;
    let opts = Options {
        layout,
        tiles: Tiles {
            wgmma,
            stages,
            tma,
            tf32x3,
            tf32,
            dense_dgrad,
            k64,
            ..Tiles::all(tile)
        },
        mode,
        batch: BATCH as u32,
        precision,
        fusion: Fusion {
            unfused,
            disabled: vec![],
        },
    };
    schedule::build(g, &opts).unwrap()
}

/// A buffer of the emulation's output, decoded (bf16 activations widened) to f32.
fn values(out: &BTreeMap<String, Vec<u8>>, s: &Schedule, name: &str) -> Vec<f32> {
    let b = &s.buffers[s.buffer(name).unwrap()];
    reference::decode(&out[name], b.dtype)
        .into_iter()
        .map(|v| v as f32)
        .collect()
}

#[track_caller]
fn close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    close_floor(what, got, want, tol, 1e-6)
}

#[track_caller]
fn close_floor(what: &str, got: &[f32], want: &[f64], tol: f64, floor: f64) {
    let e = rel_err(got, want, floor);
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.0e} (max |want| {scale:.3e}, floor {floor:.1e})\n got {:?}\nwant {:?}", &got[..got.len().min(8)], &want[..want.len().min(8)]);
}

/// `-nchw` / `-nhwc` for a layout that is not the precision's default.
fn layout_tag(prec: Prec) -> &'static str {
    match prec.layout {
        Layout::Nchw => "-nchw",
        Layout::Nhwc => "-nhwc",
        Layout::Auto => "",
    }
}

fn check_step(name: &str, body: &str) -> (usize, usize) {
    check_step_in(name, body, F32)
}

/// A training step, unfused then fused, in `prec`: every kernel in isolation, then logits,
/// loss, every gradient, every updated parameter and the running statistics against the CPU
/// model (f64), then fused against unfused. Returns the launch counts (unfused, fused).
fn check_step_in(name: &str, body: &str, prec: Prec) -> (usize, usize) {
    check_step_of(name, graph(body), prec)
}

/// [`check_step_in`] of a graph.
fn check_step_of(name: &str, g: Graph, prec: Prec) -> (usize, usize) {
    let r = reference(&g, Mode::Train);
    let tol = prec.e2e;
    let mut results = vec![];
    for unfused in [true, false] {
        let tag = format!(
            "{name}-{}{}{}{}",
            if unfused { "unfused" } else { "fused" },
            match (prec.precision, prec.tile.is_default()) {
                (Precision::Bf16, true) => "-bf16".to_string(),
                (Precision::Bf16, false) => format!("-bf16-t{}", prec.tile),
                _ => String::new(),
            },
            if prec.wgmma { "-wg" } else { "" },
            layout_tag(prec)
        );
        let s = build_in(&g, Mode::Train, unfused, prec);
        // (plain TF32's reference rounds the conv operands: not the CPU model's chain)
        if prec.precision == Precision::F32 && !prec.tf32 {
            check_reference_chain(&tag, &s, &r);
        }
        let out = emulate(&tag, &s, &r, prec.kernel);
        let f = |b: &str| values(&out, &s, b);
        close(
            &format!("{tag}: logits"),
            &f(&s.buffers[s.logits].name),
            &r.logits,
            tol,
        );
        let loss = f("loss");
        let mean = loss.iter().map(|&v| v as f64).sum::<f64>() / loss.len() as f64;
        assert!(
            (mean - r.loss).abs() <= tol * r.loss.abs().max(1.0),
            "{tag}: loss {mean} vs {}",
            r.loss
        );
        let (grads, params) = (f("grads"), f("params"));
        // f32: against the CPU model (f64). bf16: against the same f64 step with every stored
        // value rounded to its buffer's type (`reference::run` with `round_storage`) -- the
        // unrounded gradients of these tiny networks (batch 2, BN over 18..72 values per
        // channel) are too ill-conditioned for bf16 storage to come within 1e-2 of them
        // (measured: up to 0.6 relative), while the logits, loss and running statistics above
        // are held to the CPU model directly.
        // Plain TF32 likewise, against the f64 step with its conv operands rounded to TF32.
        let (want_grads, want_params) = if prec.precision == Precision::F32 && !prec.tf32 {
            (r.grads.clone(), r.params1.clone())
        } else {
            rounded_reference(&s, &r)
        };
        // Errors are relative to max(max |reference tensor|, 1% of the network's largest
        // gradient): a gradient that is zero in exact arithmetic (a bias feeding a BN) is pure
        // rounding noise, and one 10^4 times smaller than the largest is ill-conditioned in
        // fp32 (the CPU backend itself, in f32, misses its f64 result by 1.6e-4 on the stem's
        // BN gamma).
        let gmax = want_grads
            .values()
            .flatten()
            .fold(0f64, |m, v| m.max(v.abs()));
        let pmax = want_params
            .values()
            .flatten()
            .fold(0f64, |m, v| m.max(v.abs()));
        for p in &s.params {
            let range = p.offset as usize..(p.offset + p.len) as usize;
            close_floor(
                &format!("{tag}: grad {}", p.name),
                &grads[range.clone()],
                &want_grads[&p.name],
                tol,
                1e-2 * gmax,
            );
            close_floor(
                &format!("{tag}: updated {}", p.name),
                &params[range],
                &want_params[&p.name],
                tol,
                1e-3 * pmax,
            );
        }
        let state = f("state");
        for (bn, off, len) in &s.state {
            let (o, c) = (*off as usize, (*len / 2) as usize);
            close(
                &format!("{tag}: {bn}.running_mean"),
                &state[o..o + c],
                &r.buffers1[&format!("{bn}.running_mean")],
                tol,
            );
            close(
                &format!("{tag}: {bn}.running_var"),
                &state[o + c..o + 2 * c],
                &r.buffers1[&format!("{bn}.running_var")],
                tol,
            );
        }
        results.push((
            grads,
            params,
            f(&s.buffers[s.logits].name),
            s.launches.len(),
        ));
    }
    // fused and unfused agree with each other (and fusion removed launches); in bf16 only the
    // logits: fusion stores fewer activations, so the gradients see different roundings
    let (u, fz) = (&results[0], &results[1]);
    let compared = if prec.precision == Precision::F32 {
        vec![(&u.0, &fz.0), (&u.1, &fz.1), (&u.2, &fz.2)]
    } else {
        vec![(&u.2, &fz.2)]
    };
    for (a, b) in compared {
        let b64: Vec<f64> = b.iter().map(|&v| v as f64).collect();
        close(&format!("{name}: fused vs unfused"), a, &b64, tol);
    }
    assert!(
        fz.3 <= u.3,
        "{name}: fusion added launches ({} vs {})",
        fz.3,
        u.3
    );
    (u.3, fz.3)
}

fn check_infer(name: &str, body: &str) {
    check_infer_in(name, body, F32)
}

/// Inference, unfused then fused, in `prec`: every kernel in isolation, then the logits
/// against the CPU model (f64, eval mode).
fn check_infer_in(name: &str, body: &str, prec: Prec) {
    check_infer_of(name, &graph(body), prec)
}

fn check_infer_of(name: &str, g: &Graph, prec: Prec) {
    let g = g.clone();
    let r = reference(&g, Mode::Infer);
    for unfused in [true, false] {
        let tag = format!(
            "{name}-infer-{}{}{}",
            if unfused { "unfused" } else { "fused" },
            if prec.precision == Precision::Bf16 {
                "-bf16"
            } else {
                ""
            },
            layout_tag(prec)
        );
        let s = build_in(&g, Mode::Infer, unfused, prec);
        if prec.precision == Precision::F32 && !prec.tf32 {
            check_reference_chain(&tag, &s, &r);
        }
        let out = emulate(&tag, &s, &r, prec.kernel);
        close(
            &format!("{tag}: logits"),
            &values(&out, &s, &s.buffers[s.logits].name),
            &r.logits,
            prec.e2e,
        );
    }
}

const WRN: &str = "conv(3x3, 4)
     residual { pre bn relu body conv(3x3, 6, stride=2) bn relu dropout(0.3) conv(3x3, 6) shortcut proj }
     residual { body bn relu conv(3x3, 6) bn relu dropout(0.3) conv(3x3, 6) }
     bn relu gap fc";

const DENSENET: &str = "conv(3x3, 4)
     dense { bn relu conv(1x1, 4) bn relu conv(3x3, 2) }
     dense { bn relu conv(3x3, 2) }
     bn relu conv(1x1, 4) avgpool(2x2)
     bn relu gap fc";

const PYRAMIDNET: &str = "conv(3x3, 4) bn
     residual { body bn conv(3x3, 5) bn relu conv(3x3, 5) bn shortcut zeropad survival 0.5 }
     residual { body bn conv(3x3, 6, stride=2) bn relu conv(3x3, 6) bn shortcut zeropad survival 0.5 }
     bn relu gap fc";

#[test]
fn wrn_step() {
    let (unfused, fused) = check_step("wrn", WRN);
    assert!(
        fused < unfused,
        "fusion did not remove launches ({fused} vs {unfused})"
    );
}

#[test]
fn wrn_infer() {
    check_infer("wrn", WRN);
}

/// 64-channel convolutions on 8x8 images at batch 2: their inference GEMMs are two blocks of
/// 64x64 over a reduction of 576 (18 steps of 32), so they split in two (`split_k_for`); and
/// a grouped one, 64 channels per group.
const SPLIT: &str = "conv(3x3, 16) bn relu conv(3x3, 64) bn relu conv(3x3, 64)
     residual { body bn relu conv(3x3, 64) bn relu conv(3x3, 64) }
     bn relu conv(1x1, 128) bn relu conv(3x3, 128, groups=2)
     bn relu gap fc";

/// TF32 with a kernel tolerance of 1e-3: a BN prologue's f32 arithmetic can put an operand
/// on the other side of a TF32 rounding boundary than the f64 reference's does (one TF32 step
/// is 2^-11 relative; 64-channel 1x1 convs of [`SPLIT`] meet one, 7e-5 of the output).
const TF32_LOOSE: Prec = Prec {
    kernel: 1e-3,
    ..TF32
};

/// Split-K inference (the tensor cores, small grids): the split convs write partial sums,
/// `SplitKEpilogue` adds them and applies the folded BN's bias and the ReLU, or the residual;
/// every launch against the f64 reference (slices cut in the launch's reduction order, NHWC
/// and NCHW) and the logits against the CPU model, on `mma.sync` (bf16 NHWC and NCHW, TF32)
/// and on `wgmma` (bf16), with both operands by TMA too (a slice's stages start at multiples
/// of 32: each box stays in one tap).
#[test]
fn split_k_inference() {
    let g = graph_in("input 3x8x8", SPLIT);
    let s = build_in(&g, Mode::Infer, false, BF16);
    let names: Vec<&str> = s
        .launches
        .iter()
        .map(|l| s.kernels[l.kernel].name.as_str())
        .collect();
    let split = |k: &KernelSpec| matches!(k, KernelSpec::ConvFwd { split_k, .. } if *split_k > 1);
    // the convs with reductions of 576 per group split (the three of 64 channels, the grouped
    // one), those of 27, 144 and 64 (the stem, the conv from 16 channels, the 1x1) do not
    for l in &s.launches {
        let k = &s.kernels[l.kernel];
        if let KernelSpec::ConvFwd { g, .. } = k.spec {
            let ic = match l.scalars[1] {
                ScalarArg::I32(v) => v as u32,
                _ => unreachable!(),
            };
            let kdim = ic / g.groups * g.k * g.k;
            assert_eq!(split(&k.spec), kdim == 576, "{}: {names:?}", k.name);
        }
    }
    assert_eq!(
        s.kernels.iter().filter(|k| split(&k.spec)).count(),
        4,
        "{names:?}"
    );
    // inference packs its weights once, in setup
    let packs = |ls: &[Launch]| {
        ls.iter()
            .filter(|l| matches!(s.kernels[l.kernel].spec, KernelSpec::PackWeight { .. }))
            .count()
    };
    assert!(packs(&s.setup) >= 5 && packs(&s.launches) == 0, "{names:?}");
    for tag in [
        "splitk_epilogue_nhwc",
        "splitk_epilogue_bias_relu_nhwc",
        "splitk_epilogue_res_nhwc",
    ] {
        assert!(names.contains(&tag), "{tag}: {names:?}");
    }
    // training never splits a forward conv
    let t = build_in(&g, Mode::Train, false, BF16);
    assert!(!t.kernels.iter().any(|k| split(&k.spec)));
    for (tag, prec) in [
        ("split", BF16),
        ("split-nchw", BF16_NCHW),
        ("split-tf32", TF32_LOOSE),
        (
            "split-wgmma",
            Prec {
                wgmma: true,
                ..BF16
            },
        ),
        (
            "split-tma",
            Prec {
                wgmma: true,
                tma: true,
                ..BF16
            },
        ),
        (
            "split-tf32-wgmma",
            Prec {
                wgmma: true,
                layout: Layout::Auto,
                ..TF32_LOOSE
            },
        ),
    ] {
        check_infer_of(tag, &g, prec);
    }
    // with TMA the split convs take tensor maps for both operands (stride 1, 64 channels per
    // group, a tile of 64 pixels is one 8x8 image), the grouped one too
    let s = build_in(
        &g,
        Mode::Infer,
        false,
        Prec {
            wgmma: true,
            tma: true,
            ..BF16
        },
    );
    let tma_split = s
        .launches
        .iter()
        .filter(|l| split(&s.kernels[l.kernel].spec) && l.tmaps.len() == 2)
        .count();
    assert_eq!(
        tma_split,
        4,
        "{:?}",
        s.launches.iter().map(|l| &l.note).collect::<Vec<_>>()
    );
}

const RESNET: &str = "conv(3x3, 4) bn relu
         residual { body conv(3x3, 4) bn relu conv(3x3, 4) bn post relu }
         residual { body conv(3x3, 6, stride=2) bn relu conv(3x3, 6) bn shortcut zeropad post relu }
         gap fc";

#[test]
fn resnet_zeropad_step() {
    let _ = check_step("resnet", RESNET);
}

/// Post-activation inference: every BN folds into its conv, the first block's add and the
/// ReLUs after the folded BNs and after that add go into the conv epilogues (`_relu`), so the
/// fused schedule has no ReLU kernel but the one after the zero-padding block's add; each
/// kernel against the f64 reference and the logits against the CPU model, in f32 and bf16.
#[test]
fn resnet_infer_relu_and_residual_epilogues() {
    let s = build(&graph(RESNET), Mode::Infer, false, Precision::F32);
    let names: Vec<&str> = s
        .launches
        .iter()
        .map(|l| s.kernels[l.kernel].name.as_str())
        .collect();
    let count = |p: &str| names.iter().filter(|n| n.starts_with(p)).count();
    assert_eq!(count("relu_fwd"), 1, "{names:?}");
    assert_eq!(count("add_fwd"), 1, "{names:?}");
    assert_eq!(
        names
            .iter()
            .filter(|n| n.starts_with("conv_fwd") && n.ends_with("_bias_relu"))
            .count(),
        3,
        "{names:?}"
    );
    assert_eq!(
        names
            .iter()
            .filter(|n| n.starts_with("conv_fwd") && n.ends_with("_bias_res_relu"))
            .count(),
        1,
        "{names:?}"
    );
    check_infer("resnet", RESNET);
    check_infer_in("resnet", RESNET, BF16);
}

const RESNEXT: &str = "conv(3x3, 4) bn relu
         residual { body conv(1x1, 4) bn relu conv(3x3, 4, groups=2) bn relu conv(1x1, 8) bn shortcut projbn post relu }
         gap fc";

const STEM: &str =
    "conv(3x3, 4, stride=2, bias) bn relu maxpool(3x3, stride=2, pad=1) bn relu gap fc";

/// Residual blocks whose body reads the shortcut's tensor itself (`x + conv(x)`, no
/// pre-activation), then a pre-activation one: in the first, the block's conv writes its data
/// gradient into the shortcut's gradient while reading the add's, so `residual_grad_alias`
/// must keep those two apart; the second's shortcut shares the add's gradient.
#[test]
fn residual_body_reading_the_shortcut_step() {
    let _ = check_step(
        "shortcut-read",
        "conv(3x3, 4)
         residual { body conv(3x3, 4) }
         residual { body bn relu conv(3x3, 4) }
         bn relu gap fc",
    );
}

#[test]
fn resnext_grouped_step_and_infer() {
    let _ = check_step("resnext", RESNEXT);
    check_infer("resnext", RESNEXT);
}

#[test]
fn densenet_concat_avgpool_step() {
    let _ = check_step("densenet", DENSENET);
}

#[test]
fn pyramidnet_droppath_step() {
    let _ = check_step("pyramidnet", PYRAMIDNET);
}

#[test]
fn imagenet_stem_maxpool_step_and_infer() {
    let _ = check_step("stem", STEM);
    check_infer("stem", STEM);
}

/// A linear layer on a flattened map (no global pooling): in NHWC its input features are read
/// in the weights' NCHW order.
/// A linear layer on a flattened 3x3 map (not global pooling): in NHWC its input features are
/// read at `p * C + c` while the weights keep the NCHW order `c * HW + p`.
const FLAT: &str = "conv(3x3, 4) bn relu avgpool(2x2) fc";

/// Channels-last activations (`Layout::Nhwc`) in f32, where the tolerances are tight: a whole
/// training step (every kernel against the f64 reference on transposed arguments, then the
/// step against the CPU model) and inference, fused and unfused, for every family's data
/// movement: dropout masks (drawn at the NCHW index), zero-pad shortcuts, concatenation,
/// average and max pooling, DropPath, grouped and strided convs, and a linear layer on a
/// flattened map.
#[test]
fn nhwc_every_family_f32() {
    for (name, body) in [
        ("wrn", WRN),
        ("densenet", DENSENET),
        ("pyramidnet", PYRAMIDNET),
        ("resnext", RESNEXT),
        ("stem", STEM),
        ("flat", FLAT),
    ] {
        let _ = check_step_in(name, body, F32_NHWC);
        check_infer_in(name, body, F32_NHWC);
    }
}

/// The layouts differ only in the order of activation elements: an NHWC schedule has the same
/// launches as the NCHW one plus the input's transpose, and every NHWC kernel's name says so.
#[test]
fn nhwc_schedule_shape() {
    let g = graph(WRN);
    for precision in [Precision::F32, Precision::Bf16] {
        let prec = |layout| Prec {
            precision,
            layout,
            ..F32
        };
        let a = build_in(&g, Mode::Train, false, prec(Layout::Nchw));
        let b = build_in(&g, Mode::Train, false, prec(Layout::Nhwc));
        assert_eq!(a.layout, Layout::Nchw);
        assert_eq!(b.layout, Layout::Nhwc);
        assert_eq!(b.launches.len(), a.launches.len() + 1);
        // the transpose comes before any launch that reads an activation
        let t = b.launches.iter().position(|l| l.note == "input to nhwc");
        assert!(t.is_some_and(|t| t <= 1), "{t:?}");
        for k in b.kernels.iter().filter(|k| k.name != "to_nhwc") {
            assert_eq!(k.spec.nhwc(), k.name.contains("_nhwc"), "{}", k.name);
        }
        assert!(b.kernels.iter().filter(|k| k.spec.nhwc()).count() >= 10);
        assert!(a.kernels.iter().all(|k| !k.spec.nhwc()));
    }
    // `Auto`: channels-last for the tensor cores, NCHW in f32
    assert_eq!(
        build(&g, Mode::Train, false, Precision::Bf16).layout,
        Layout::Nhwc
    );
    assert_eq!(
        build(&g, Mode::Train, false, Precision::F32).layout,
        Layout::Nchw
    );
}

/// Channel counts that are multiples of 8 (16, and 24 from a concatenation), so the bf16 NHWC
/// convolutions load their patches 8 channels (16 bytes) at a time (`ConvGeom::vec`): a
/// strided pre-activation block with dropout in the prologue, a grouped block (8 channels per
/// group), a dense block and 1x1 convs; 6x6 images, so the pixel tiles are ragged.
const VEC: &str = "conv(3x3, 16)
     residual { pre bn relu body conv(3x3, 16, stride=2) bn relu dropout(0.3) conv(3x3, 16) shortcut proj }
     residual { body conv(1x1, 16) bn relu conv(3x3, 16, groups=2) bn relu conv(1x1, 16) bn shortcut projbn post relu }
     dense { bn relu conv(3x3, 8) }
     bn relu conv(1x1, 16) bn relu gap fc";

/// Vector loads: every conv pass of [`VEC`] (forward, data and weight gradient) but the
/// 3-channel stem's is `_v8` (the `cp.async` engine), and whole steps and inference, fused and unfused, match the
/// reference launch by launch and the CPU model; the emulation aborts on a 16-byte access that
/// is not 16-byte aligned.
#[test]
fn bf16_vector_loads() {
    let g = graph(VEC);
    let s = build_in(&g, Mode::Train, false, BF16);
    let convs: Vec<_> = s
        .kernels
        .iter()
        .filter_map(|k| k.spec.conv_geom().map(|cg| (k, cg)))
        .collect();
    for (k, cg) in &convs {
        assert_eq!(cg.vec, k.name.contains("_v8"), "{}", k.name);
    }
    let count = |what: &str, vec: bool| {
        convs
            .iter()
            .filter(|(k, cg)| cg.vec == vec && k.name.starts_with(what))
            .count()
    };
    let names: Vec<_> = convs.iter().map(|(k, _)| &k.name).collect();
    assert!(count("conv_fwd", true) >= 5, "{names:?}");
    assert!(count("conv_bwd_data", true) >= 4, "{names:?}");
    assert!(count("conv_bwd_weight", true) >= 5, "{names:?}");
    // the stem reads 3 channels: element by element
    assert_eq!(count("conv_fwd", false), 1, "{names:?}");
    assert_packed_weights(&s, Dtype::Bf16);
    let _ = check_step_in("vec", VEC, BF16);
    check_infer_in("vec", VEC, BF16);
}

/// Every `_v8` forward and data-gradient conv of `s` reads a weight of `dtype` packed for it
/// (`pack.*`, f32 for the TF32 engines) by the launch just before it, for its own pass.
fn assert_packed_weights(s: &Schedule, dtype: Dtype) {
    for (li, l) in s.launches.iter().enumerate() {
        let spec = &s.kernels[l.kernel].spec;
        let reads_w = matches!(
            spec,
            KernelSpec::ConvFwd { .. } | KernelSpec::ConvBwdData { .. }
        );
        if !reads_w || !spec.conv_geom().is_some_and(|cg| cg.vec) {
            continue;
        }
        let w = spec
            .signature()
            .0
            .iter()
            .position(|p| p.name == "w")
            .unwrap();
        let wb = &s.buffers[l.buffers[w].buffer];
        assert!(
            wb.name.starts_with("pack.") && wb.dtype == dtype,
            "{}",
            l.note
        );
        let prev = &s.launches[li - 1];
        let f32 = dtype == Dtype::F32;
        assert!(
            matches!(s.kernels[prev.kernel].spec, KernelSpec::PackWeight { data_grad, f32: pf, .. }
                if data_grad == matches!(spec, KernelSpec::ConvBwdData { .. }) && pf == f32),
            "{}",
            l.note
        );
        assert_eq!(s.kernels[prev.kernel].name.ends_with("_f32"), f32);
        assert_eq!(prev.buffers[0].buffer, l.buffers[w].buffer, "{}", l.note);
    }
}

/// The emulated inference logits of `g` in `prec` (every launch checked on the way), as bytes.
fn infer_logits(g: &Graph, ri: &Reference, prec: Prec, tag: &str) -> Vec<u8> {
    let s = build_in(g, Mode::Infer, false, prec);
    let out = emulate(tag, &s, ri, BF16.kernel);
    out[&s.buffers[s.logits].name].clone()
}

/// Every `_v8` conv pass of [`VEC`]'s training step `s` runs on wgmma (the weight gradient's
/// too, transposed in shared memory), named with `suffix`, and no other conv does.
fn assert_every_vec_pass_on_wgmma(s: &Schedule, suffix: &str, what: &str) {
    let (mut wg, mut wgrad) = (0, 0);
    for k in &s.kernels {
        if let Some(cg) = k.spec.conv_geom() {
            let want = cg.vec;
            assert_eq!(cg.wgmma, want, "{}", k.name);
            assert_eq!(k.name.contains(suffix), want, "{}", k.name);
            wg += want as usize;
            wgrad += (want && matches!(k.spec, KernelSpec::ConvBwdWeight { .. })) as usize;
        }
    }
    assert!(
        wg >= 14 && wgrad >= 5,
        "{what}: {wg} wgmma kernels, {wgrad} weight gradients"
    );
}

/// Hopper's warpgroup MMA in plain TF32 (`--wgmma --tf32`): the `_v8` forward and
/// data-gradient convs of [`VEC`] issue `wgmma ... .tf32` from f32 stages in bf16's swizzled
/// layout (two halves of 16 reduction indices), after rounding every landed operand to TF32 in
/// shared memory (the emulation aborts on a wgmma operand that is not a TF32 value); the
/// weight gradients too, their `[k][m]` stages transposed into one of two K-major buffers by
/// that pass. At 64x64, 128x128 and 128x64 with 4 stages (a wgmma
/// kept in flight): every launch against the rounding reference, the step against the f64
/// model; and inference logits against `mma.sync`'s at the same tile (both round the same
/// operands the same way; the sums may differ in order). 3xTF32 with `--wgmma` is refused.
#[test]
fn f32_tf32_wgmma_forward_and_data_gradient() {
    let g = graph(VEC);
    let ri = reference(&g, Mode::Infer);
    for (tile, stages) in [
        (TcTile::DEFAULT, 0),
        (
            TcTile {
                rows: 128,
                cols: 128,
            },
            0,
        ),
        (
            TcTile {
                rows: 128,
                cols: 64,
            },
            4,
        ),
    ] {
        let prec = Prec {
            tile,
            stages,
            wgmma: true,
            ..TF32_NHWC
        };
        let s = build_in(&g, Mode::Train, false, prec);
        assert_every_vec_pass_on_wgmma(&s, "_tf32_nhwc_v8_wg", &tile.to_string());
        assert_eq!(s.min_compute_capability(), 90);
        let cu = wrnc_compiler::codegen::cuda::write(&s, &Default::default()).unwrap();
        assert!(cu.contains("wrnc_wgmma_tf32_m64n"));
        let tag = format!("tf32wg{tile}s{stages}");
        let _ = check_step_of(&tag, g.clone(), prec);
        let out = |p: Prec, tag: &str| {
            let s = build_in(&g, Mode::Infer, false, p);
            let out = emulate(tag, &s, &ri, p.kernel);
            values(&out, &s, &s.buffers[s.logits].name)
        };
        let (a, b) = (
            out(prec, &format!("{tag}-infer")),
            out(
                Prec {
                    wgmma: false,
                    ..prec
                },
                &format!("{tag}-infer-mma"),
            ),
        );
        let b: Vec<f64> = b.iter().map(|&v| v as f64).collect();
        close(
            &format!("{tag}: wgmma against mma.sync logits"),
            &a,
            &b,
            1e-5,
        );
    }
    let bad = Options {
        precision: Precision::F32,
        tiles: Tiles {
            wgmma: true,
            tf32x3: true,
            ..Default::default()
        },
        ..Default::default()
    };
    let Err(e) = schedule::build(&g, &bad) else {
        panic!("--wgmma --tf32x3 was not refused");
    };
    assert!(
        e.message.contains("3xTF32 stays on mma.sync"),
        "{}",
        e.message
    );
}

/// Hopper's warpgroup MMA (`wgmma.mma_async` from shared-memory descriptors, emulated as
/// `emu/cuda_emu_mma.h` says: queued at issue, performed at `wgmma.wait_group`) in the `_v8`
/// convs, all three passes (the weight gradient's `[k][m]` stages transposed in shared memory
/// into one of two K-major buffers), at every tile it takes (64 or 128 rows: one m64 slab per
/// warpgroup, stacked or side by side; n32, n64 and n128): which kernels use it, every launch
/// against the f64 reference and the step against the CPU model, and inference logits bit for
/// bit those of `mma.sync` at the same tile (both sum each k16 step in k order from the
/// accumulator).
#[test]
fn bf16_wgmma_forward_and_data_gradient() {
    let g = graph(VEC);
    let ri = reference(&g, Mode::Infer);
    for tile in TcTile::CANDIDATES.into_iter().filter(|t| t.rows >= 64) {
        let prec = Prec {
            tile,
            wgmma: true,
            ..BF16
        };
        let s = build_in(&g, Mode::Train, false, prec);
        assert_every_vec_pass_on_wgmma(&s, "_v8_wg", &tile.to_string());
        assert!(s.uses_wgmma());
        assert_eq!(s.min_compute_capability(), 90);
        assert_eq!(s.nvrtc_arch("sm_90"), "sm_90a");
        let _ = check_step_of(&format!("wg{tile}"), g.clone(), prec);
        let logits = |p: Prec, tag: &str| infer_logits(&g, &ri, p, tag);
        assert!(
            logits(prec, &format!("wg-infer-{tile}"))
                == logits(Prec { tile, ..BF16 }, &format!("mma-infer-{tile}")),
            "{tile}: wgmma's inference logits differ from mma.sync's"
        );
    }
    // a tile of 32 rows has no m64 slab: mma.sync stays
    let t32 = TcTile::CANDIDATES
        .into_iter()
        .find(|t| t.rows == 32)
        .unwrap();
    let s = build_in(
        &g,
        Mode::Train,
        false,
        Prec {
            tile: t32,
            wgmma: true,
            ..BF16
        },
    );
    assert!(!s.uses_wgmma());
}

/// Deep `cp.async` pipelines (`--stages`) whose ring outgrows the 48 KiB of static shared
/// memory, in the launch's dynamic shared memory (the emulation fills it with NaN bytes
/// before each launch and aborts when a kernel reaches past it): which kernels and launches
/// take it, every launch against the f64 reference and the step against the CPU model, and
/// inference logits bit for bit those of the automatic depth at the same tile (the ring's
/// depth changes when an operand lands, not what is summed in which order). VEC's 3x3 convs
/// reduce over 5 k-tiles: 4 stages wrap around the ring.
#[test]
fn bf16_deep_pipelines_in_dynamic_shared_memory() {
    let g = graph(VEC);
    let ri = reference(&g, Mode::Infer);
    let t = |rows, cols| TcTile { rows, cols };
    for (tile, stages, wgmma) in [
        (t(128, 128), 4, false),
        (t(64, 64), 6, false),
        (t(128, 64), 4, true),
    ] {
        let prec = Prec {
            tile,
            stages,
            wgmma,
            ..BF16
        };
        let tag = format!("s{stages}{}-{tile}", if wgmma { "wg" } else { "" });
        let s = build_in(&g, Mode::Train, false, prec);
        let mut dynamic = 0;
        for k in &s.kernels {
            if let Some(cg) = k.spec.conv_geom() {
                assert_eq!(cg.stages, if cg.vec { stages } else { 0 }, "{}", k.name);
                assert_eq!(
                    k.name.contains(&format!("_s{stages}")),
                    cg.vec,
                    "{}",
                    k.name
                );
                let d = k.spec.dynamic_smem();
                assert!(d == 0 || d > schedule::TC_STATIC_SMEM, "{}: {d}", k.name);
                dynamic += (d > 0) as usize;
            }
        }
        // the forward and data-gradient `_v8` convs at least
        assert!(
            dynamic >= 9,
            "{tag}: {dynamic} kernels with dynamic shared memory"
        );
        for l in &s.launches {
            assert_eq!(
                l.shared,
                s.kernels[l.kernel].spec.dynamic_smem(),
                "{}",
                l.note
            );
        }
        let _ = check_step_of(&tag, g.clone(), prec);
        let logits = |p: Prec, tag: &str| infer_logits(&g, &ri, p, tag);
        assert!(
            logits(prec, &format!("{tag}-infer"))
                == logits(Prec { stages: 0, ..prec }, &format!("{tag}-auto-infer")),
            "{tag}: inference logits differ from the automatic depth's"
        );
    }
}

/// Hopper's tensor memory accelerator for the weight operand of the `wgmma` convs (`--tma`):
/// exactly the `wgmma` kernels take it, each of their launches passes one tensor map over its
/// packed weight, and the emulation's TMA (asynchronous: the slot is NaN from issue until a
/// wait on its mbarrier lands the box, zeros outside the tensor) gives every launch the f64
/// reference's values, the step the CPU model's, and inference logits bit for bit those of
/// `cp.async` (TMA changes how B lands, not what is summed in which order). WTMA's grouped
/// conv checks the group dimension, its 3x3 reductions (576, 288) end in a box hanging over
/// the tensor's edge; no box is larger than its tensor, so where a group has fewer output
/// (forward) or input (data gradient) channels than the tile's columns the weights stay on
/// `cp.async` (the grouped conv's data gradient; at 128 columns every 64-channel conv);
/// 64x64 (4 stages) and `--stages 4` at 128x128 keep a wgmma in flight, so a slot is refilled
/// by TMA while the previous stage's wgmma may still run. The input (6x6, stride 2 to 3x3)
/// makes no tile a box of an image, so the activations stay on `cp.async`.
#[test]
fn bf16_tma_weights_on_mbarriers() {
    let t = |rows, cols| TcTile { rows, cols };
    let tiles = [(t(128, 64), 0), (t(64, 64), 0), (t(128, 128), 4)];
    check_tma(WTMA, "input 3x6x6", "tma", &tiles, false);
}

const WTMA: &str = "conv(3x3, 64)
     residual { pre bn relu body conv(3x3, 64, stride=2) bn relu dropout(0.3) conv(3x3, 128, groups=2) shortcut proj }
     residual { body conv(1x1, 128) bn relu conv(3x3, 128) bn relu conv(1x1, 128) bn shortcut projbn post relu }
     bn relu gap fc";

/// TMA for the activation operand too (`ConvGeom::tma_a`): on TMAA (64 channels per group, a
/// grouped conv, a 1x1 conv), the stride-1 forward and data-gradient convs take a second map,
/// `tmx`, over `x` or `dy` as `[C, W, H, n]`, with a box of whole image rows (16x16) or whole
/// images (8x8; tiles of more images than the batch would be a box larger than the tensor:
/// `activation_boxes` in the compiler), shifted by the tap so that TMA's zero fill is the padding; the BN-ReLU and
/// dropout prologue still runs in shared memory on what TMA landed. The same checks as the
/// weights' TMA, at 128x64 (3 stages) and 64x64 (4, a wgmma in flight).
#[test]
fn bf16_tma_activations_as_image_boxes() {
    let t = |rows, cols| TcTile { rows, cols };
    check_tma(
        TMAA,
        "input 3x16x16",
        "tmaa",
        &[(t(128, 64), 0), (t(64, 64), 0)],
        true,
    );
}

const TMAA: &str = "conv(3x3, 64)
     residual { pre bn relu body conv(3x3, 64) bn relu dropout(0.3) conv(1x1, 64) }
     residual { body bn relu conv(3x3, 128, stride=2) bn relu conv(3x3, 128, groups=2) shortcut proj }
     bn relu gap fc";

fn check_tma(body: &str, input: &str, name: &str, tiles: &[(TcTile, u32)], act: bool) {
    let g = graph_in(input, body);
    let ri = reference(&g, Mode::Infer);
    for &(tile, stages) in tiles {
        let prec = Prec {
            tile,
            stages,
            wgmma: true,
            tma: true,
            ..BF16
        };
        let tag = format!("{name}-s{stages}-{tile}");
        let s = build_in(&g, Mode::Train, false, prec);
        let (mut tma, mut tma_a) = (0, 0);
        let mut boxes = std::collections::BTreeSet::new();
        // TMA exactly where the wgmma engine runs and the weight's box fits its tensor
        let mut fallback = 0;
        for l in &s.launches {
            let k = &s.kernels[l.kernel];
            if let Some(cg) = k.spec.conv_geom().filter(|g| g.wgmma) {
                let fits = k.spec.weight_box_fits(&l.scalars, cg.tile.cols, cg.bk());
                assert_eq!(cg.tma, fits, "{}", k.name);
                fallback += !fits as usize;
            }
        }
        if !act {
            assert!(
                fallback >= 1,
                "{tag}: no wgmma conv on cp.async for a box too large"
            );
        }
        for k in &s.kernels {
            if let Some(cg) = k.spec.conv_geom() {
                assert!(!cg.tma || cg.wgmma, "{}", k.name);
                assert_eq!(k.name.contains("_tma"), cg.tma, "{}", k.name);
                assert_eq!(k.name.contains("_tmaa"), cg.tma_a, "{}", k.name);
                assert!(!cg.tma_a || (cg.tma && cg.stride == 1), "{}", k.name);
                tma += cg.tma as usize;
                tma_a += cg.tma_a as usize;
            }
        }
        assert!(tma >= 4, "{tag}: {tma} TMA kernels");
        if act {
            // forward and data gradient of the 3x3/64, 1x1/64, 3x3/128 grouped convs
            assert!(tma_a >= 6, "{tag}: {tma_a} kernels with activations by TMA");
        } else {
            assert_eq!(tma_a, 0, "{tag}");
        }
        for l in &s.launches {
            let k = &s.kernels[l.kernel];
            let cg = k.spec.conv_geom();
            let want = cg.is_some_and(|g| g.tma) as usize + cg.is_some_and(|g| g.tma_a) as usize;
            assert_eq!(l.tmaps.len(), want, "{}", l.note);
            for (i, tm) in l.tmaps.iter().enumerate() {
                assert_eq!(tm.swizzle, 64, "{}", l.note);
                assert_eq!(tm.dims[0] % 8, 0, "{}", l.note);
                if i == 0 {
                    assert_eq!(tm.box_dim, [32, tile.cols, 1, 1], "{}", l.note);
                } else {
                    // a box of the tile's pixels: whole image rows, or whole images
                    let [c, w, h, n] = tm.box_dim;
                    assert_eq!((c, w * h * n), (32, tile.rows), "{}: {tm:?}", l.note);
                    assert_eq!(w as u64, tm.dims[1], "{}: {tm:?}", l.note);
                    assert!(n == 1 || h as u64 == tm.dims[2], "{}: {tm:?}", l.note);
                    assert_eq!(tm.dims[3], BATCH as u64, "{}", l.note);
                    boxes.insert((w, h, n));
                }
            }
        }
        if act {
            // rows of a 16x16 image, one or two 8x8 images
            let r = tile.rows;
            let want = [(16, r / 16, 1), (8, 8, r / 64)];
            assert!(want.iter().all(|b| boxes.contains(b)), "{tag}: {boxes:?}");
        }
        s.validate().unwrap();
        let _ = check_step_of(&tag, g.clone(), prec);
        let logits = |p: Prec, tag: &str| infer_logits(&g, &ri, p, tag);
        assert!(
            logits(prec, &format!("{tag}-infer"))
                == logits(Prec { tma: false, ..prec }, &format!("{tag}-cp-infer")),
            "{tag}: TMA's inference logits differ from cp.async's"
        );
    }
}

/// The tensor-core engine on NCHW activations (`--layout nchw`), the bf16 default before NHWC.
#[test]
fn bf16_nchw_wrn_step_and_infer() {
    let _ = check_step_in("wrn", WRN, BF16_NCHW);
    check_infer_in("wrn", WRN, BF16_NCHW);
}

/// BN statistics and dBN reductions split over pixel ranges (`_split`): each block adds its
/// range's sums, the statistics as compensated pairs into the slot "zero bn_stats" cleared,
/// the dBN sums with f32 atomics to the `[dgamma | dbeta]` that the BN's finalize zeroed in
/// the forward (`_zd`). 16x16 images at batch 2 are 512 pixels, two ranges of 256; the pre-activation BN
/// (two consumers) and the last one (read by the pooling) reduce on their own. Every kernel in
/// isolation (the split ones held to their terms' magnitudes), then the whole step, in both
/// layouts and in bf16.
#[test]
fn split_bn_reductions() {
    const NET: &str = "conv(3x3, 4)
         residual { pre bn relu body conv(3x3, 6) bn relu conv(3x3, 6) shortcut proj }
         bn relu gap fc";
    let g = graph_in("input 3x16x16", NET);
    for prec in [F32, F32_NHWC, BF16] {
        for unfused in [true, false] {
            let s = build_in(&g, Mode::Train, unfused, prec);
            let split = |prefix: &str| {
                s.launches
                    .iter()
                    .map(|l| s.kernels[l.kernel].name.as_str())
                    .filter(|k| k.starts_with(prefix) && k.ends_with("_split"))
                    .count()
            };
            // unfused: every BN's statistics and dBN sums; fused: the conv epilogues take the
            // statistics, and the dBN sums of all but the two BNs without one conv to do them
            let (stats, dbn) = if unfused { (3, 3) } else { (0, 2) };
            assert_eq!(
                split("channel_sums_sq"),
                stats,
                "split statistics (unfused: {unfused})"
            );
            assert_eq!(
                split("bn_bwd_reduce"),
                dbn,
                "split dBN sums (unfused: {unfused})"
            );
        }
        let _ = check_step_of("split-red", g.clone(), prec);
    }
}

/// `--no-fuse PASS` for every pass in turn: still the reference's step.
#[test]
fn wrn_step_with_each_pass_disabled() {
    let g = graph(WRN);
    let r = reference(&g, Mode::Train);
    for pass in wrnc_compiler::passes::pass_names() {
        let opts = Options {
            tiles: Default::default(),
            layout: Default::default(),
            mode: Mode::Train,
            batch: BATCH as u32,
            precision: Default::default(),
            fusion: Fusion {
                unfused: false,
                disabled: vec![pass.to_string()],
            },
        };
        let s = schedule::build(&g, &opts).unwrap();
        let out = emulate(&format!("wrn-no-{pass}"), &s, &r, F32.kernel);
        let f = |b: &str| bytes_f32(&out[b]);
        close(
            &format!("no {pass}: logits"),
            &f(&s.buffers[s.logits].name),
            &r.logits,
            1e-4,
        );
        let gmax = r.grads.values().flatten().fold(0f64, |m, v| m.max(v.abs()));
        let grads = f("grads");
        for p in &s.params {
            let range = p.offset as usize..(p.offset + p.len) as usize;
            close_floor(
                &format!("no {pass}: grad {}", p.name),
                &grads[range],
                &r.grads[&p.name],
                1e-4,
                1e-2 * gmax,
            );
        }
    }
}

/// bf16 activation storage (arithmetic in fp32): the WRN step and inference, and the families
/// with their own data movement (concat, pooling, zero-pad shortcuts, DropPath), against the
/// CPU model in f64 with the bf16 tolerance; every kernel in isolation too.
#[test]
fn bf16_wrn_step_and_infer() {
    let _ = check_step_in("wrn", WRN, BF16);
    check_infer_in("wrn", WRN, BF16);
}

#[test]
fn bf16_densenet_and_pyramidnet_steps() {
    let _ = check_step_in("densenet", DENSENET, BF16);
    let _ = check_step_in("pyramidnet", PYRAMIDNET, BF16);
}

/// The tensor-core engine (every conv of a bf16 schedule) on what the families above do not
/// reach: grouped convolutions, a strided conv with bias, and 72 channels, which leave a ragged
/// second 64-wide column tile and a reduction of 648 (21 k-steps of 32, the last partial).
#[test]
fn bf16_tensor_cores_grouped_strided_and_wide() {
    for (name, body) in [
        ("resnext", RESNEXT),
        ("stem", STEM),
        (
            "wide",
            "conv(3x3, 8) bn relu conv(1x1, 72, stride=2) bn relu conv(3x3, 72) bn relu gap fc",
        ),
    ] {
        let g = graph(body);
        for (prec, tc) in [(Precision::F32, false), (Precision::Bf16, true)] {
            let s = build(&g, Mode::Train, false, prec);
            let convs = s.kernels.iter().filter_map(|k| k.spec.conv_geom());
            assert!(
                convs.clone().count() > 0 && convs.clone().all(|g| g.tensor_cores == tc),
                "{name} {prec:?}: every conv kernel should have tensor_cores = {tc}"
            );
            assert_eq!(s.uses_tensor_cores(), tc);
        }
        let _ = check_step_in(name, body, BF16);
    }
}

/// Split-K of the tensor-core weight gradient (both engines: the 3-channel stem's gathers its
/// operands, the 8-channel conv's is `_v8`): at 20x20 the 800-pixel reduction (25 steps of
/// 32) is cut into 3 slices of 288, 288 and 224 pixels whose partial gradients a second launch
/// sums; every launch against the f64 reference (which sums the slices the same way), the
/// whole step against the CPU model.
#[test]
fn bf16_tensor_core_weight_gradient_split_k() {
    let g = graph_in(
        "input 3x20x20",
        "conv(3x3, 8) bn relu conv(3x3, 8) bn relu gap fc",
    );
    let s = build(&g, Mode::Train, false, Precision::Bf16);
    let splits: Vec<u32> = s
        .kernels
        .iter()
        .filter_map(|k| match k.spec {
            schedule::KernelSpec::ConvBwdWeight { split_k, .. } => Some(split_k),
            _ => None,
        })
        .collect();
    assert!(splits.contains(&3), "split-K factors {splits:?}");
    // the 8 -> 8 conv's is the `cp.async` engine (`_v8`), sliced too
    assert!(s.kernels.iter().any(|k| matches!(k.spec,
        schedule::KernelSpec::ConvBwdWeight { g, split_k, .. } if g.vec && split_k > 1)));
    assert!(s
        .kernels
        .iter()
        .any(|k| k.spec == schedule::KernelSpec::SplitKReduce));
    let _ = check_step_of("splitk", g, BF16);
}

/// Split-K of the fp32 FMA engine's weight gradient (`gemm_rt`, 64x64 tiles), NCHW and NHWC:
/// the same 800-pixel reduction in 3 slices (288, 288, 224 pixels), and at 17x17 a 578-pixel
/// one in 2 (320 and 258: the last slice ends 2 pixels into a 16-step of the FMA loop, the
/// operands' `kk < ke_` mask zeroing the rest; the other slices end at multiples of 32);
/// every launch against the f64 reference, the whole step against the CPU model.
#[test]
fn fma_weight_gradient_split_k() {
    for (input, slices) in [("input 3x20x20", 3), ("input 3x17x17", 2)] {
        fma_split_k_case(input, slices);
    }
}

fn fma_split_k_case(input: &str, slices: u32) {
    let g = graph_in(input, "conv(3x3, 8) bn relu conv(3x3, 8) bn relu gap fc");
    for prec in [F32, F32_NHWC] {
        let s = build_in(&g, Mode::Train, false, prec);
        let splits: Vec<u32> = s
            .kernels
            .iter()
            .filter_map(|k| match k.spec {
                schedule::KernelSpec::ConvBwdWeight { g, split_k, .. } if !g.tensor_cores => {
                    Some(split_k)
                }
                _ => None,
            })
            .collect();
        assert!(
            splits.contains(&slices),
            "{input}: split-K factors {splits:?}"
        );
        let _ = check_step_of("splitk_fma", g.clone(), prec);
    }
}

/// BN statistics accumulated by a conv epilogue across many blocks (2048 rows per channel here,
/// added atomically as 128 sums of 16 rows: 32 blocks of 64 rows, each adding its four sub-tiles),
/// on channels whose mean is ~0: the sum is ~1e-5 of its terms, and plain fp32 atomics got it
/// 37% wrong. The per-kernel check must still hold (compensated accumulation,
/// see the conv epilogue); the second conv's data-gradient epilogue accumulates the first
/// BN's dgamma / dbeta with atomics over as many blocks.
#[test]
fn conv_epilogue_statistics_of_a_zero_mean_channel() {
    let g = graph_in(
        "input 3x16x16",
        "conv(1x1, 4) bn relu conv(1x1, 4) bn relu gap fc",
    );
    let batch = 8;
    let mut r = reference_n(&g, Mode::Train, batch);
    // zero-mean input channels: a 1x1 convolution (no padding) keeps every mean ~0
    let hw = 16 * 16;
    for c in 0..3 {
        let idx: Vec<usize> = (0..batch)
            .flat_map(|n| (0..hw).map(move |p| (n * 3 + c) * hw + p))
            .collect();
        let mean = idx.iter().map(|&i| r.x[i] as f64).sum::<f64>() / idx.len() as f64;
        for &i in &idx {
            r.x[i] = (r.x[i] as f64 - mean) as f32;
        }
    }
    let opts = Options {
        tiles: Default::default(),
        layout: Default::default(),
        mode: Mode::Train,
        batch: batch as u32,
        precision: Precision::F32,
        fusion: Fusion::default(),
    };
    let s = schedule::build(&g, &opts).unwrap();
    assert!(s
        .launches
        .iter()
        .any(|l| s.kernels[l.kernel].name.ends_with("_stats")));
    let _ = emulate("zero-mean-stats", &s, &r, F32.kernel);
}

/// A BN feeding a conv with no ReLU in between (PyramidNet's `bn conv`), fused as the conv's
/// prologue: alone (its one conv's data-gradient epilogue also does dBN's reductions), with a
/// dropout, and shared by two convs (a `pre bn` read by the body and a projection shortcut:
/// plain dBN after both data gradients); and not fused where an add reads the BN too. A
/// training step fused and unfused against the CPU model and every kernel against the f64
/// reference; inference likewise.
#[test]
fn bn_conv_without_relu_step_and_infer() {
    // (name, net, kernels the fused training step must have)
    let cases: [(&str, &str, &[&str]); 5] = [
        (
            "bnconv",
            "conv(3x3, 4) bn conv(3x3, 4) bn relu gap fc",
            &["_pro_bn_stats", "_chain_bn"],
        ),
        (
            "bndropconv",
            "conv(3x3, 4) bn dropout(0.3) conv(3x3, 4) bn relu gap fc",
            &["_pro_bndrop_stats", "_chain_bndrop"],
        ),
        (
            "prebn",
            "conv(3x3, 4)
             residual { pre bn body conv(3x3, 6, stride=2) bn relu conv(3x3, 6) shortcut proj }
             bn relu gap fc",
            &["_pro_bn", "bn_bwd_reduce"],
        ),
        (
            // the BN's input is no conv, so inference keeps it (nothing to fold into): the
            // eval-mode prologue
            "relubnconv",
            "conv(3x3, 4) relu bn conv(3x3, 4) bn relu gap fc",
            &["_pro_bn_stats", "_chain_bn"],
        ),
        (
            "bnadd",
            "conv(3x3, 4) bn residual { body conv(3x3, 4) bn relu conv(3x3, 4) } bn relu gap fc",
            &[],
        ),
    ];
    for (name, body, kernels) in cases {
        let g = graph(body);
        let s = build(&g, Mode::Train, false, Precision::F32);
        let names: Vec<&str> = s.kernels.iter().map(|k| k.name.as_str()).collect();
        for k in kernels {
            assert!(
                names.iter().any(|n| n.contains(k)),
                "{name}: no kernel `*{k}*` in {names:?}"
            );
        }
        // a relu-less BN prologue exactly where the BN has no other reader
        let relu_less = names
            .iter()
            .any(|n| n.contains("_pro_bn") && !n.contains("_pro_bnrelu"));
        assert_eq!(relu_less, !kernels.is_empty(), "{name}: {names:?}");
        if name == "relubnconv" {
            let s = build(&g, Mode::Infer, false, Precision::F32);
            assert!(
                s.kernels.iter().any(|k| k.name.contains("_pro_bn_bias")),
                "{name}: no eval-mode BN prologue"
            );
        }
        let _ = check_step(name, body);
        check_infer(name, body);
    }
}

/// The update guard that lets a whole training step be one CUDA graph: a NaN in the batch
/// makes the loss kernel set `hyper[HYPER_NONFINITE]`, and the optimizer then changes neither
/// the weights nor the momentum, in the emulated CUDA and in the f64 reference interpreter.
/// Control: the same step on the finite batch clears the flag and moves every weight tensor.
#[test]
fn a_nan_loss_skips_the_update() {
    use schedule::{HYPER_LEN, HYPER_NONFINITE};
    let g = graph(WRN);
    let s = build(&g, Mode::Train, false, Precision::F32);
    let r = reference(&g, Mode::Train);
    let finite = inputs(&s, &r);
    // one NaN in the last parameter, the classifier's (a NaN in the batch would not do: ReLU
    // maps it to 0)
    let fc = s.params.last().unwrap();
    let mut poisoned = finite.clone();
    let at = 4 * fc.offset as usize;
    poisoned.iter_mut().find(|(n, _)| n == "params").unwrap().1[at..at + 4]
        .copy_from_slice(&f32::NAN.to_le_bytes());
    let pb = s.buffer("params").unwrap();
    let words = |out: &BTreeMap<String, Vec<u8>>| -> Vec<u32> {
        out["hyper"]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    for (tag, ins, nan) in [("guard_ok", &finite, false), ("guard_nan", &poisoned, true)] {
        let out = run_schedule(tag, &s, ins, HYPER);
        let h = words(&out);
        assert_eq!(h.len(), HYPER_LEN as usize);
        assert_eq!(h[HYPER_NONFINITE], nan as u32, "{tag}: the flag");
        let before = &ins.iter().find(|(n, _)| n == "params").unwrap().1;
        let after = &out["params"];
        let momentum = values(&out, &s, "momentum");
        for p in &s.params {
            let span = p.offset as usize..(p.offset + p.len) as usize;
            let bytes = 4 * span.start..4 * span.end;
            let moved = before[bytes.clone()] != after[bytes];
            assert_eq!(moved, !nan, "{tag}: parameter {} moved: {moved}", p.name);
            if nan {
                assert!(momentum[span].iter().all(|&m| m == 0.0), "{tag}: momentum");
            }
        }
        // the f64 interpreter of the same schedule agrees
        let bufs: Vec<Vec<f64>> = s
            .buffers
            .iter()
            .map(|b| match ins.iter().find(|(n, _)| *n == b.name) {
                Some((_, bytes)) => reference::decode(bytes, b.dtype),
                None => vec![0.0; b.len as usize],
            })
            .collect();
        let fin = reference::run(&s, bufs.clone(), &HOST, false).unwrap();
        let hb = s.buffer("hyper").unwrap();
        assert_eq!(
            fin[hb][HYPER_NONFINITE], nan as u32 as f64,
            "{tag}: reference flag"
        );
        let same = fin[pb]
            .iter()
            .zip(&bufs[pb])
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert_eq!(same, nan, "{tag}: reference update");
    }
}

/// Every tensor-core block tile ([`TcTile::CANDIDATES`] other than the default, which the tests
/// above use) on a network with 72-channel layers, which leave ragged row and column tiles in
/// every pass: a whole bf16 training step, fused and unfused, every launch against the f64
/// reference and the step against the CPU model; and inference, every launch against the
/// reference and the logits bit for bit those of the default tile (a tile changes which block
/// computes an output, not how; inference has no atomics). The kernels are named by their
/// tile.
/// f32 convolutions on the tensor cores as 3xTF32 (`--tf32x3`): every conv kernel is `_tc_x3`
/// (and none packs a bf16 weight); the WRN's fused and unfused training steps and inference,
/// and a 3-channel stem at 20x20 whose weight gradients are split-K, held to the f32
/// tolerances (each kernel 1e-5, the step 1e-4), which plain TF32 (2^-11) would miss; then the
/// 128x128 tile (the epilogue's two slabs) and 32x64 on the WRN's step.
#[test]
fn f32_tf32x3_tensor_cores() {
    let x3 = Prec {
        tf32x3: true,
        layout: Layout::Nchw,
        ..F32
    };
    let g = graph(WRN);
    for mode in [Mode::Train, Mode::Infer] {
        let s = build_in(&g, mode, false, x3);
        let convs: Vec<_> = s
            .kernels
            .iter()
            .filter(|k| k.spec.conv_geom().is_some())
            .collect();
        assert!(!convs.is_empty());
        for k in &convs {
            let cg = k.spec.conv_geom().unwrap();
            assert!(cg.tensor_cores && cg.tf32x3 && !cg.vec, "{}", k.name);
            assert!(k.name.contains("_tc_x3"), "{}", k.name);
        }
        assert!(!s
            .kernels
            .iter()
            .any(|k| matches!(k.spec, schedule::KernelSpec::PackWeight { .. })));
        assert!(s.uses_tensor_cores());
    }
    // bf16 with --tf32x3 is refused
    let bad = Options {
        precision: Precision::Bf16,
        tiles: Tiles {
            tf32x3: true,
            ..Default::default()
        },
        ..Default::default()
    };
    let Err(e) = schedule::build(&g, &bad) else {
        panic!("bf16 --tf32x3 was not refused");
    };
    assert!(e.message.contains("--tf32x3"), "{}", e.message);
    let _ = check_step_in("x3wrn", WRN, x3);
    check_infer_in("x3wrn", WRN, x3);
    let stem = graph_in(
        "input 3x20x20",
        "conv(3x3, 8) bn relu conv(3x3, 8) bn relu gap fc",
    );
    let s = build_in(&stem, Mode::Train, false, x3);
    assert!(s.kernels.iter().any(|k| matches!(k.spec,
        schedule::KernelSpec::ConvBwdWeight { g, split_k, .. } if g.tf32x3 && split_k > 1)));
    let _ = check_step_of("x3splitk", stem, x3);
    for tile in [
        TcTile {
            rows: 128,
            cols: 128,
        },
        TcTile { rows: 32, cols: 64 },
    ] {
        let _ = check_step_of(&format!("x3tile{tile}"), graph(WRN), Prec { tile, ..x3 });
    }
}

/// f32 convolutions on the tensor cores in plain TF32 (`--tf32`): every conv kernel is
/// `_tc_tf32` with one TF32 product per fragment pair; the WRN's fused and unfused training
/// steps and inference, every kernel against the reference with its operands rounded to TF32
/// as `cvt.rna` rounds (1e-5: the rounding itself is 2^-11, so a kernel that rounded
/// otherwise, or not at all, would miss it), the gradients and updates against the f64 step
/// rounded so, the logits, loss and running statistics against the unrounded CPU model
/// (`TF32.e2e`); a split-K stem and the 128x128 tile likewise.
#[test]
fn f32_plain_tf32_tensor_cores() {
    let g = graph(WRN);
    for mode in [Mode::Train, Mode::Infer] {
        let s = build_in(&g, mode, false, TF32);
        let convs: Vec<_> = s
            .kernels
            .iter()
            .filter_map(|k| k.spec.conv_geom().map(|cg| (k, cg)))
            .collect();
        assert!(!convs.is_empty());
        for (k, cg) in &convs {
            assert!(
                cg.tensor_cores && cg.tf32 && !cg.tf32x3 && !cg.vec,
                "{}",
                k.name
            );
            assert!(k.name.contains("_tc_tf32"), "{}", k.name);
        }
        let cu = wrnc_compiler::codegen::cuda::write(&s, &Default::default()).unwrap();
        assert!(cu.contains("wrnc_mma_tf32_1688(cacc[i][jn], ah[i], bh[jn], cacc[i][jn])"));
        assert!(!cu.contains("al[i]"), "plain TF32 computes no remainders");
    }
    // --tf32 with --tf32x3, or with bf16, is refused
    for (precision, x3) in [(Precision::F32, true), (Precision::Bf16, false)] {
        let bad = Options {
            precision,
            tiles: Tiles {
                tf32: true,
                tf32x3: x3,
                ..Default::default()
            },
            ..Default::default()
        };
        let Err(e) = schedule::build(&g, &bad) else {
            panic!("--tf32 with {precision:?}, --tf32x3 {x3} was not refused");
        };
        assert!(e.message.contains("--tf32"), "{}", e.message);
    }
    let _ = check_step_in("tf32wrn", WRN, TF32);
    check_infer_in("tf32wrn", WRN, TF32);
    let stem = graph_in(
        "input 3x20x20",
        "conv(3x3, 8) bn relu conv(3x3, 8) bn relu gap fc",
    );
    let s = build_in(&stem, Mode::Train, false, TF32);
    assert!(s.kernels.iter().any(|k| matches!(k.spec,
        schedule::KernelSpec::ConvBwdWeight { g, split_k, .. } if g.tf32 && split_k > 1)));
    let _ = check_step_of("tf32splitk", stem, TF32);
    let tile = TcTile {
        rows: 128,
        cols: 128,
    };
    let _ = check_step_of("tf32tile128x128", graph(WRN), Prec { tile, ..TF32 });
}

/// f32 storage, conv operands in plain TF32 (`--tf32`): each kernel exactly as the reference
/// rounds (f32 sums in another order; measured up to 9.4e-7, and 4.8e-4 against a reference
/// that does not round); the step, against the unrounded model, as TF32 costs (the WRN's
/// logits: 5.8e-4).
const TF32: Prec = Prec {
    kernel: 1e-5,
    e2e: 5e-3,
    tf32: true,
    layout: Layout::Nchw,
    ..F32
};

/// f32 convolutions on the tensor cores with vector loads ([`f32_tf32_vector_loads`]).
const TF32_NHWC: Prec = Prec {
    layout: Layout::Auto,
    ..TF32
};

/// f32 convolutions on the tensor cores with vector loads: `Auto` is NHWC under `--tf32` and
/// `--tf32x3`, and [`VEC`]'s channel counts put every conv pass but the 3-channel stem's
/// (gathered element by element, NHWC) on the `cp.async` engine with f32 operands: a run of
/// 8 floats is two 16-byte copies, the forward and data-gradient passes read an f32 weight
/// packed for them by the launch before (`pack_weight_*_f32`: the weight's own values; the conv
/// rounds them to TF32 as it reads its fragments).
/// Both engines: the training step, fused and unfused, and inference, every launch against
/// the reference (plain TF32's rounding its operands as `cvt.rna` does, 3xTF32's exact) and
/// the step against the f64 model; plain TF32 also at 128x128 with 4 stages (a ring in dynamic
/// shared memory) and at 32x64.
#[test]
fn f32_tf32_vector_loads() {
    let g = graph(VEC);
    let x3 = Prec {
        tf32x3: true,
        layout: Layout::Auto,
        ..F32
    };
    for prec in [TF32_NHWC, x3] {
        let s = build_in(&g, Mode::Train, false, prec);
        assert_eq!(s.layout, Layout::Nhwc);
        let convs: Vec<_> = s
            .kernels
            .iter()
            .filter_map(|k| k.spec.conv_geom().map(|cg| (k, cg)))
            .collect();
        let names: Vec<_> = convs.iter().map(|(k, _)| &k.name).collect();
        for (k, cg) in &convs {
            assert!(cg.f32_operands() && cg.nhwc, "{}", k.name);
            assert_eq!(cg.vec, k.name.contains("_v8"), "{}", k.name);
        }
        let count = |what: &str| {
            convs
                .iter()
                .filter(|(k, cg)| cg.vec && k.name.starts_with(what))
                .count()
        };
        assert!(count("conv_fwd") >= 5, "{names:?}");
        assert!(count("conv_bwd_data") >= 4, "{names:?}");
        assert!(count("conv_bwd_weight") >= 5, "{names:?}");
        assert_eq!(
            convs.iter().filter(|(_, cg)| !cg.vec).count(),
            2,
            "{names:?}"
        );
        assert_packed_weights(&s, Dtype::F32);
        let cu = wrnc_compiler::codegen::cuda::write(&s, &Default::default()).unwrap();
        assert!(
            cu.contains(" + 4, src_ + 4, ok_);"),
            "a run's second 16-byte copy"
        );
        // fragments of the K-contiguous stages by ldmatrix, of the weight gradient's
        // `[k][m]` stages a float at a time
        assert!(cu.contains("wrnc_ldmatrix_x4(r_, &As_[slot_ * 64 + wm * 32"));
        assert!(cu.contains("const float* p_ = &As_[slot_ * 32 + ks + (lane & 3)]"));
        let tag = if prec.tf32 { "tf32vec" } else { "x3vec" };
        let _ = check_step_in(tag, VEC, prec);
        check_infer_in(tag, VEC, prec);
    }
    let t128 = TcTile {
        rows: 128,
        cols: 128,
    };
    let deep = Prec {
        tile: t128,
        stages: 4,
        ..TF32_NHWC
    };
    let s = build_in(&g, Mode::Train, false, deep);
    assert!(s.kernels.iter().any(|k| k.spec.dynamic_smem() > 0));
    let _ = check_step_of("tf32vec-t128-s4", g.clone(), deep);
    let _ = check_step_of(
        "tf32vec-t32x64",
        g,
        Prec {
            tile: TcTile { rows: 32, cols: 64 },
            ..TF32_NHWC
        },
    );
}

#[test]
fn bf16_every_tensor_core_tile() {
    let body = "conv(3x3, 8) bn relu conv(1x1, 72, stride=2) bn relu conv(3x3, 72) bn relu gap fc";
    let g = graph(body);
    let ri = reference(&g, Mode::Infer);
    let base = build_tiled(&g, Mode::Infer, false, Precision::Bf16, TcTile::DEFAULT);
    let logits = s_logits(&base);
    let want = emulate("tile-infer-default", &base, &ri, BF16.kernel);
    for tile in TcTile::CANDIDATES.into_iter().filter(|t| !t.is_default()) {
        let suffix = format!("_t{tile}");
        for mode in [Mode::Train, Mode::Infer] {
            let s = build_tiled(&g, mode, false, Precision::Bf16, tile);
            for l in &s.launches {
                let k = &s.kernels[l.kernel];
                if let Some(cg) = k.spec.conv_geom() {
                    assert_eq!(cg.tile, tile);
                    assert!(k.name.contains(&suffix), "{} lacks {suffix}", k.name);
                    assert!(l.block == [16, 16, 1], "{}: block {:?}", k.name, l.block);
                }
            }
        }
        let _ = check_step_of(&format!("tile{tile}"), graph(body), Prec { tile, ..BF16 });
        let s = build_tiled(&g, Mode::Infer, false, Precision::Bf16, tile);
        let got = emulate(&format!("tile-infer-{tile}"), &s, &ri, BF16.kernel);
        assert!(
            got[&logits] == want[&logits],
            "{tile}: inference logits differ from the default tile's"
        );
    }
}

fn s_logits(s: &Schedule) -> String {
    s.buffers[s.logits].name.clone()
}

/// A BN whose gradient reaches it through a 1x1 convolution from a BN in training mode has a
/// `dbeta` of 0 in exact arithmetic, so the fused data-gradient kernel's `sums.dbeta` is
/// rounding noise on both sides: the launch check holds it to a share of its terms'
/// magnitudes (`reference::SUM_L1`), and it passes. Moved by one average term of its channel
/// (1/n of those magnitudes, what a dropped term would do), it fails, at that launch.
#[test]
fn cancelling_bn_sums_pass_and_a_missing_term_fails() {
    let g = graph_in("input 3x8x8", "conv(3x3, 8) bn conv(1x1, 8) bn relu gap fc");
    let r = reference(&g, Mode::Train);
    let s = build_in(&g, Mode::Train, false, F32);
    let ins = inputs(&s, &r);
    let (_, trace) = run_schedule_traced("cancel", &s, &ins, HYPER, true);
    check_kernels("cancel", &s, &ins, &trace, F32.kernel);
    let all: Vec<&Launch> = s.setup.iter().chain(&s.launches).collect();
    let (li, l) = all
        .iter()
        .enumerate()
        .find(|(_, l)| {
            matches!(s.kernels[l.kernel].spec,
                KernelSpec::ConvBwdData { chain, .. } if chain.any())
        })
        .expect("a fused data gradient with a BN chain");
    let (params, _) = s.kernels[l.kernel].spec.signature();
    let arg = |name: &str| l.buffers[params.iter().position(|p| p.name == name).unwrap()];
    let (sums, dx) = (arg("sums"), arg("dx"));
    let values = |a: &schedule::BufArg| {
        let v = reference::decode(&trace[&(li, s.buffers[a.buffer].name.clone())], Dtype::F32);
        v[a.offset as usize..(a.offset + a.len) as usize].to_vec()
    };
    // channel 0's average |term| (NCHW: dx[(n * C + 0) * HW + p])
    let c = sums.len as usize / 2;
    let d = values(&dx);
    let hw = d.len() / (BATCH * c);
    let terms: Vec<f64> = (0..BATCH)
        .flat_map(|n| d[n * c * hw..n * c * hw + hw].to_vec())
        .collect();
    let mean = terms.iter().map(|t| t.abs()).sum::<f64>() / terms.len() as f64;
    let key = (li, s.buffers[sums.buffer].name.clone());
    let mut v = reference::decode(&trace[&key], Dtype::F32);
    v[sums.offset as usize + c] += mean;
    let mut bad = trace.clone();
    bad.insert(key, reference::encode(&v, Dtype::F32));
    let ins: BTreeMap<String, Vec<u8>> = ins.into_iter().collect();
    let errs = reference::check_kernels(&s, &ins, &bad, &HOST).unwrap();
    let first = errs.iter().find(|e| e.rel > F32.kernel).expect("caught");
    assert_eq!((first.launch, first.part.as_str()), (li, "sums.dbeta"));
    eprintln!(
        "a missing term: {:.2e} (tolerance {:.0e})",
        first.rel, F32.kernel
    );
}

/// Two strided pre-activation blocks whose convs and 1x1 projections halve 16x16 to 8x8 and
/// 8x8 to 4x4 (64 and 128 channels: whole TMA boxes of 32 output channels in one tap, and
/// at least 64 input channels, the 64-column tile's box).
const PHASES: &str = "conv(3x3, 64)
     residual { pre bn relu body conv(3x3, 64, stride=2) bn relu conv(3x3, 64) shortcut proj }
     residual { pre bn relu body conv(3x3, 128, stride=2) bn relu dropout(0.3) conv(3x3, 128) shortcut proj }
     bn relu gap fc";

/// The data gradients of strided convs in phase order (`ConvGeom::phases`): every one of
/// [`PHASES`]' (3x3 and 1x1, stride 2) is `_ph` unless `dense_dgrad` asks otherwise, and none
/// other is. At batch 2 a phase of the 16x16 input is 128 rows, so 64- and 128-row blocks lie
/// in one phase and reduce over 1, 2 or 4 of the 9 taps (the 1x1 projection's over 1 or none);
/// one of the 8x8 input is 32 rows, so every block straddles phases and keeps all the taps.
/// On every engine (fp32 FMAs in NCHW, bf16 `mma.sync` with vector loads, 3xTF32, plain TF32
/// on wgmma, bf16 wgmma with the weights by TMA, whose box columns skip taps too), the step is
/// checked launch by launch against the reference and whole against the CPU model; on the
/// FMA and `mma.sync` engines the emulated step's gradients and updated parameters are the
/// same bits as with every tap (the skipped products are exact zeros).
#[test]
fn strided_data_gradient_in_phase_order() {
    let g = graph_in("input 3x16x16", PHASES);
    let t = |rows, cols| TcTile { rows, cols };
    let engines = [
        ("f32", F32, true),
        ("bf16", BF16, true),
        (
            "x3",
            Prec {
                tf32x3: true,
                layout: Layout::Auto,
                kernel: 1e-5,
                ..F32
            },
            false,
        ),
        (
            "tf32-wg",
            // (kernel tolerance 1e-4: on these 576-long reductions a prologue output one f32
            // ulp from the reference's sometimes rounds to the other TF32 neighbour, 2^-11 of
            // that operand; measured 2.7e-5 in a forward and a weight gradient, not `_ph`)
            Prec {
                wgmma: true,
                tile: t(128, 64),
                kernel: 1e-4,
                ..TF32_NHWC
            },
            false,
        ),
        (
            "bf16-wg-tma",
            Prec {
                wgmma: true,
                tma: true,
                tile: t(64, 64),
                stages: 4,
                ..BF16
            },
            false,
        ),
    ];
    for (name, prec, same_bits) in engines {
        let s = build_in(&g, Mode::Train, false, prec);
        let dense = build_in(
            &g,
            Mode::Train,
            false,
            Prec {
                dense_dgrad: true,
                ..prec
            },
        );
        let (mut strided, mut tma) = (0, 0);
        for (k, kd) in s.kernels.iter().zip(&dense.kernels) {
            let Some(cg) = k.spec.conv_geom() else {
                continue;
            };
            let want = matches!(k.spec, KernelSpec::ConvBwdData { .. }) && cg.stride > 1;
            assert_eq!(cg.phases, want, "{name}: {}", k.name);
            assert_eq!(k.name.contains("_ph"), want, "{name}: {}", k.name);
            assert!(!kd.spec.conv_geom().unwrap().phases, "{name}: {}", kd.name);
            strided += want as usize;
            // whole boxes of 32 output channels: phase order costs no kernel its TMA
            assert_eq!(
                cg.tma,
                kd.spec.conv_geom().unwrap().tma,
                "{name}: {}",
                k.name
            );
            tma += (want && cg.tma) as usize;
        }
        assert_eq!(strided, 4, "{name}: the 3x3 and 1x1 strided data gradients");
        if prec.tma {
            assert_eq!(tma, 4, "{name}: strided data gradients with TMA");
        }
        let _ = check_step_of(&format!("phases-{name}"), g.clone(), prec);
        if same_bits {
            let r = reference(&g, Mode::Train);
            let run = |s: &Schedule, tag: &str| {
                let (out, _) = run_schedule_traced(tag, s, &inputs(s, &r), HYPER, false);
                (out["grads"].clone(), out["params"].clone())
            };
            assert!(
                run(&s, &format!("phases-{name}-bits"))
                    == run(&dense, &format!("phases-{name}-dense")),
                "{name}: phase order changed the step's bits"
            );
        }
    }
}

/// A tile search's choice reaches its launch: the keys of a built schedule
/// (`Schedule::tile_keys`, what the search times and caches) are the keys the builder looks
/// tiles up by, on every engine (the wgmma ones with TMA for weights and activations too,
/// which the builder decides after the lookup). Each key gets a tile of its own in turn and
/// every tensor-core conv launch must come out with the tile of its key.
#[test]
fn searched_tiles_reach_every_launch() {
    let t = |rows, cols| TcTile { rows, cols };
    for (name, input, body, prec) in [
        ("bf16", "input 3x16x16", TMAA, BF16),
        ("tf32", "input 3x16x16", PHASES, TF32_NHWC),
        (
            "wgmma",
            "input 3x16x16",
            TMAA,
            Prec {
                wgmma: true,
                ..BF16
            },
        ),
        (
            "tma",
            "input 3x16x16",
            TMAA,
            Prec {
                wgmma: true,
                tma: true,
                ..BF16
            },
        ),
        (
            "tma-phases",
            "input 3x16x16",
            PHASES,
            Prec {
                wgmma: true,
                tma: true,
                ..BF16
            },
        ),
    ] {
        let g = graph_in(input, body);
        let s = build_in(&g, Mode::Train, false, prec);
        let keys = s.tile_keys();
        assert!(keys.len() >= 6, "{name}: {} keys", keys.len());
        for pick in [t(128, 64), t(64, 128)] {
            let mut tiles = Tiles {
                wgmma: prec.wgmma,
                tma: prec.tma,
                tf32: prec.tf32,
                ..Tiles::all(TcTile::DEFAULT)
            };
            for (_, k) in &keys {
                tiles.by_key.insert(k.clone(), pick);
            }
            let opts = Options {
                layout: prec.layout,
                tiles,
                mode: Mode::Train,
                batch: BATCH as u32,
                precision: prec.precision,
                fusion: Fusion {
                    unfused: false,
                    disabled: vec![],
                },
            };
            let s2 = schedule::build(&g, &opts).unwrap();
            let mut tma = 0;
            for l in &s2.launches {
                let k = &s2.kernels[l.kernel];
                if let Some(cg) = k.spec.conv_geom().filter(|cg| cg.tensor_cores) {
                    assert_eq!(
                        cg.tile, pick,
                        "{name}: {} did not get its searched tile",
                        k.name
                    );
                    tma += cg.tma as usize;
                }
            }
            assert_eq!(tma > 0, prec.tma, "{name}: {tma} TMA launches");
        }
    }
}

/// Stages of 64 reduction indices on `wgmma` (`--k64`, `ConvGeom::k64`): rows of 128 bytes in
/// the 128-byte swizzle mode, four k16 `wgmma` steps per stage. Exactly bf16's forward and
/// data-gradient `wgmma` convs take them (`_k64`), with TMA boxes 64 indices wide in that
/// swizzle; every launch against the f64 reference and the step against the CPU model; and
/// the step's gradients and updated parameters are the same bits as with stages of 32 (the
/// same k16 products in the same order). Cases: [`VEC`]'s 16-channel convs (reductions of
/// 144: a partial last stage; of 16 and 72: stages of 32 and of 64 in one step) at 64x64 (4 stages, a wgmma in flight) and 128x128 (3);
/// [`TMAA`] (64 channels per group: activation boxes of 64 channels) at 128x64; [`PHASES`]
/// (strided data gradients in phase order, the weight's box columns skipping taps) at 128x64.
#[test]
fn bf16_wgmma_stages_of_64() {
    let t = |rows, cols| TcTile { rows, cols };
    let cases = [
        ("vec", "input 3x6x6", VEC, t(64, 64), false),
        ("vec", "input 3x6x6", VEC, t(128, 128), false),
        ("tmaa", "input 3x16x16", TMAA, t(128, 64), true),
        ("phases", "input 3x16x16", PHASES, t(128, 64), true),
    ];
    for (name, input, body, tile, tma) in cases {
        let g = graph_in(input, body);
        let prec = Prec {
            tile,
            wgmma: true,
            tma,
            k64: true,
            ..BF16
        };
        let tag = format!("k64-{name}-{tile}");
        let s = build_in(&g, Mode::Train, false, prec);
        let s32 = build_in(&g, Mode::Train, false, Prec { k64: false, ..prec });
        let mut wide = 0;
        for k in &s.kernels {
            let Some(cg) = k.spec.conv_geom() else {
                continue;
            };
            let kmajor = !matches!(k.spec, KernelSpec::ConvBwdWeight { .. });
            // (a reduction shorter than 64 keeps stages of 32)
            let long = s
                .launches
                .iter()
                .filter(|l| l.kernel == s.kernels.iter().position(|x| x.name == k.name).unwrap())
                .all(|l| {
                    k.spec
                        .weight_gemm(&l.scalars)
                        .is_some_and(|(red, _)| red >= 64)
                });
            assert_eq!(cg.k64, cg.wgmma && kmajor && long, "{tag}: {}", k.name);
            assert_eq!(k.name.contains("_k64"), cg.k64, "{tag}: {}", k.name);
            wide += cg.k64 as usize;
            if cg.k64 {
                assert!(k.spec.dynamic_smem() > 0, "{tag}: {}", k.name);
            }
        }
        assert!(wide >= 4, "{tag}: {wide} kernels with stages of 64");
        let (mut boxes, mut phases) = (0, 0);
        for l in &s.launches {
            let k = &s.kernels[l.kernel];
            let Some(cg) = k.spec.conv_geom() else {
                continue;
            };
            phases += (cg.phases && cg.tma) as usize;
            for tm in &l.tmaps {
                assert_eq!(
                    (tm.swizzle, tm.box_dim[0]),
                    (2 * cg.bk(), cg.bk()),
                    "{tag}: {}",
                    l.note
                );
                boxes += cg.k64 as usize;
            }
        }
        if tma {
            assert!(boxes >= 4, "{tag}: {boxes} TMA boxes of 64");
        }
        if name == "tmaa" {
            assert!(
                s.launches.iter().any(|l| l.tmaps.len() == 2),
                "{tag}: no activation box"
            );
        }
        if name == "phases" {
            assert!(phases >= 4, "{tag}: {phases} phase-order launches by TMA");
        }
        s.validate().unwrap();
        let _ = check_step_of(&tag, g.clone(), prec);
        let r = reference(&g, Mode::Train);
        let run = |s: &Schedule, tag: &str| {
            let (out, _) = run_schedule_traced(tag, s, &inputs(s, &r), HYPER, false);
            (out["grads"].clone(), out["params"].clone())
        };
        assert!(
            run(&s, &format!("{tag}-bits")) == run(&s32, &format!("{tag}-k32")),
            "{tag}: stages of 64 changed the step's bits"
        );
    }
}
