//! Generated CUDA, run through the emulation (`emu/cuda_emu.h`, g++), against the CPU
//! reference backend (`wrnc-runtime`, in f64): a whole training step of small networks of
//! every family, fused and unfused -- logits, loss, every parameter gradient, the updated
//! parameters and BN running statistics -- and inference.

#[path = "emu_support.rs"]
mod support;

use std::collections::BTreeMap;
use support::*;
use wrnc_compiler::graph::Graph;
use wrnc_compiler::passes::{Fusion, Mode};
use wrnc_compiler::schedule::{self, Options, Schedule};
use wrnc_runtime::cpu::{Mode as CpuMode, Model};
use wrnc_runtime::init::SplitMix64;
use wrnc_runtime::loss::softmax_cross_entropy;
use wrnc_runtime::optim::Sgd;
use wrnc_runtime::Tensor;

fn graph(body: &str) -> Graph {
    let text = format!("network \"t\" {{ input 3x6x6 classes 3 {body} }}");
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
    let len = BATCH * s.numel() as usize;
    let x: Vec<f32> = (0..len).map(|_| r.normal() as f32).collect();
    let labels: Vec<u32> = (0..BATCH as u32).map(|i| i % g.classes).collect();
    let xt = Tensor::from_vec(
        &[BATCH, s.c as usize, s.h as usize, s.w as usize],
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

/// Runs `s` through the emulation with the reference's inputs and state.
fn emulate(tag: &str, s: &Schedule, r: &Reference) -> BTreeMap<String, Vec<u8>> {
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
    let mut inputs = vec![
        ("params".to_string(), f32_bytes(&arena)),
        ("state".to_string(), f32_bytes(&state)),
        ("input".to_string(), f32_bytes(&r.x)),
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
    run_schedule(tag, s, &inputs, HYPER)
}

fn build(g: &Graph, mode: Mode, unfused: bool) -> Schedule {
    let opts = Options {
        mode,
        batch: BATCH as u32,
        precision: Default::default(),
        fusion: Fusion {
            unfused,
            disabled: vec![],
        },
    };
    schedule::build(g, &opts).unwrap()
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

/// Returns the step's outputs (grads then params arenas, logits) for fused/unfused comparison.
fn check_step(name: &str, body: &str) -> (usize, usize) {
    let g = graph(body);
    let r = reference(&g, Mode::Train);
    let mut results = vec![];
    for unfused in [true, false] {
        let tag = format!("{name}-{}", if unfused { "unfused" } else { "fused" });
        let s = build(&g, Mode::Train, unfused);
        let out = emulate(&tag, &s, &r);
        let f = |b: &str| bytes_f32(&out[b]);
        close(
            &format!("{tag}: logits"),
            &f(&s.buffers[s.logits].name),
            &r.logits,
            1e-4,
        );
        let loss = f("loss");
        let mean = loss.iter().map(|&v| v as f64).sum::<f64>() / loss.len() as f64;
        assert!(
            (mean - r.loss).abs() <= 1e-4 * r.loss.abs().max(1.0),
            "{tag}: loss {mean} vs {}",
            r.loss
        );
        let (grads, params) = (f("grads"), f("params"));
        // Errors are relative to max(max |reference tensor|, 1% of the network's largest
        // gradient): a gradient that is zero in exact arithmetic (a bias feeding a BN) is pure
        // rounding noise, and one 10^4 times smaller than the largest is ill-conditioned in
        // fp32 (the CPU backend itself, in f32, misses its f64 result by 1.6e-4 on the stem's
        // BN gamma).
        let gmax = r.grads.values().flatten().fold(0f64, |m, v| m.max(v.abs()));
        let pmax = r
            .params1
            .values()
            .flatten()
            .fold(0f64, |m, v| m.max(v.abs()));
        for p in &s.params {
            let range = p.offset as usize..(p.offset + p.len) as usize;
            close_floor(
                &format!("{tag}: grad {}", p.name),
                &grads[range.clone()],
                &r.grads[&p.name],
                1e-4,
                1e-2 * gmax,
            );
            close_floor(
                &format!("{tag}: updated {}", p.name),
                &params[range],
                &r.params1[&p.name],
                1e-4,
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
                1e-4,
            );
            close(
                &format!("{tag}: {bn}.running_var"),
                &state[o + c..o + 2 * c],
                &r.buffers1[&format!("{bn}.running_var")],
                1e-4,
            );
        }
        results.push((
            grads,
            params,
            f(&s.buffers[s.logits].name),
            s.launches.len(),
        ));
    }
    // fused and unfused agree with each other (and fusion removed launches)
    let (u, fz) = (&results[0], &results[1]);
    for (a, b) in [(&u.0, &fz.0), (&u.1, &fz.1), (&u.2, &fz.2)] {
        let b64: Vec<f64> = b.iter().map(|&v| v as f64).collect();
        close(&format!("{name}: fused vs unfused"), a, &b64, 1e-4);
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
    let g = graph(body);
    let r = reference(&g, Mode::Infer);
    for unfused in [true, false] {
        let tag = format!("{name}-infer-{}", if unfused { "unfused" } else { "fused" });
        let s = build(&g, Mode::Infer, unfused);
        let out = emulate(&tag, &s, &r);
        close(
            &format!("{tag}: logits"),
            &bytes_f32(&out[&s.buffers[s.logits].name]),
            &r.logits,
            1e-4,
        );
    }
}

const WRN: &str = "conv(3x3, 4)
     residual { pre bn relu body conv(3x3, 6, stride=2) bn relu dropout(0.3) conv(3x3, 6) shortcut proj }
     residual { body bn relu conv(3x3, 6) bn relu dropout(0.3) conv(3x3, 6) }
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

#[test]
fn resnet_zeropad_step() {
    let _ = check_step(
        "resnet",
        "conv(3x3, 4) bn relu
         residual { body conv(3x3, 4) bn relu conv(3x3, 4) bn post relu }
         residual { body conv(3x3, 6, stride=2) bn relu conv(3x3, 6) bn shortcut zeropad post relu }
         gap fc",
    );
}

#[test]
fn resnext_grouped_step_and_infer() {
    let body = "conv(3x3, 4) bn relu
         residual { body conv(1x1, 4) bn relu conv(3x3, 4, groups=2) bn relu conv(1x1, 8) bn shortcut projbn post relu }
         gap fc";
    let _ = check_step("resnext", body);
    check_infer("resnext", body);
}

#[test]
fn densenet_concat_avgpool_step() {
    let _ = check_step(
        "densenet",
        "conv(3x3, 4)
         dense { bn relu conv(1x1, 4) bn relu conv(3x3, 2) }
         dense { bn relu conv(3x3, 2) }
         bn relu conv(1x1, 4) avgpool(2x2)
         bn relu gap fc",
    );
}

#[test]
fn pyramidnet_droppath_step() {
    let _ = check_step(
        "pyramidnet",
        "conv(3x3, 4) bn
         residual { body bn conv(3x3, 5) bn relu conv(3x3, 5) bn shortcut zeropad survival 0.5 }
         residual { body bn conv(3x3, 6, stride=2) bn relu conv(3x3, 6) bn shortcut zeropad survival 0.5 }
         bn relu gap fc",
    );
}

#[test]
fn imagenet_stem_maxpool_step_and_infer() {
    let body = "conv(3x3, 4, stride=2, bias) bn relu maxpool(3x3, stride=2, pad=1) bn relu gap fc";
    let _ = check_step("stem", body);
    check_infer("stem", body);
}

/// `--no-fuse PASS` for every pass in turn: still the reference's step.
#[test]
fn wrn_step_with_each_pass_disabled() {
    let g = graph(WRN);
    let r = reference(&g, Mode::Train);
    for pass in wrnc_compiler::passes::pass_names() {
        let opts = Options {
            mode: Mode::Train,
            batch: BATCH as u32,
            precision: Default::default(),
            fusion: Fusion {
                unfused: false,
                disabled: vec![pass.to_string()],
            },
        };
        let s = schedule::build(&g, &opts).unwrap();
        let out = emulate(&format!("wrn-no-{pass}"), &s, &r);
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
