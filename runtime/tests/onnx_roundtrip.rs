//! The ONNX export run by an implementation nobody here wrote: for each network, export it,
//! run it with onnxruntime (CPU execution provider, after `onnx.checker` with full checks)
//! through `scripts/onnx_check.py`, and compare with [`Model::infer`] of the CPU backend on
//! the same seeded random input at batch 2.
//!
//! Error measure (normwise, infinity norm): `max_i |wrnc_i - ort_i| / max(max_i |ort_i|, 1e-3)`,
//! i.e. the largest absolute difference relative to the largest onnxruntime logit, the floor
//! keeping near-zero logits from dividing by zero. It must be <= 1e-4.
//!
//! Weights are "trained-looking" unless a case says otherwise: BN gamma, beta, running mean and
//! variance and every bias drawn at random, so that a swapped BN input or a dropped bias shows.
//!
//! Networks: every file in `examples/`, as written when it has at most [`FULL_PARAMS`]
//! parameters; larger ones are run as the same network with every convolution's width divided
//! by 16 (from the expanded form), unless `WRNC_ONNX_FULL=1` asks for full size. Then the
//! structural nets below.
//!
//! `WRNC_ONNX_KEEP=DIR` keeps each case's model, input and both outputs under `DIR/<label>/`.
//!
//! Skips (with a printed reason) only when onnxruntime cannot be imported and `CI` is unset;
//! under `CI` that is a failure. `WRNC_PYTHON` overrides the interpreter (default `python3`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use wrnc_compiler::graph::{Graph, Op, ParamKind};
use wrnc_runtime::cpu::{Mode, Model};
use wrnc_runtime::init::{stream, SplitMix64};
use wrnc_runtime::{onnx, Tensor};

/// Examples with more parameters than this run slimmed (see the module docs).
const FULL_PARAMS: u64 = 12_000_000;
const TOLERANCE: f64 = 1e-4;
const FLOOR: f64 = 1e-3;
const BATCH: usize = 2;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn python() -> String {
    std::env::var("WRNC_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Whether onnxruntime is usable; panics under `CI` when it is not.
fn ort_available() -> bool {
    static PROBE: OnceLock<Result<String, String>> = OnceLock::new();
    let probe = PROBE.get_or_init(|| {
        let out = Command::new(python())
            .arg(root().join("scripts/onnx_check.py"))
            .arg("--probe")
            .output();
        match out {
            Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).trim().into()),
            Ok(o) => Err(String::from_utf8_lossy(&o.stderr).trim().into()),
            Err(e) => Err(format!("cannot run {}: {e}", python())),
        }
    });
    match probe {
        Ok(versions) => {
            eprintln!("onnx_roundtrip: using {versions}");
            true
        }
        Err(why) if std::env::var_os("CI").is_some() => {
            panic!("onnxruntime is required under CI (run scripts/install-deps.sh): {why}")
        }
        Err(why) => {
            eprintln!("onnx_roundtrip: SKIPPED, onnxruntime is not usable ({why}); run scripts/install-deps.sh");
            false
        }
    }
}

fn graph(text: &str) -> Graph {
    wrnc_grammar::build(&wrnc_grammar::Source::inline(text))
        .unwrap_or_else(|d| panic!("{text}\n{}", d.render()))
}

/// The same network with every convolution's width divided by 16 (at least 1, and a multiple
/// of its groups), written from the structural form.
fn slimmed(source: &wrnc_grammar::Source) -> Graph {
    let file = wrnc_grammar::parse(source).unwrap_or_else(|d| panic!("{}", d.render()));
    let text =
        wrnc_compiler::print::print_file(&wrnc_compiler::expand::expand_file(&file).unwrap());
    let mut out = String::new();
    let mut rest = text.as_str();
    while let Some(i) = rest.find("conv(") {
        out.push_str(&rest[..i + 5]);
        rest = &rest[i + 5..];
        let close = rest.find(')').unwrap();
        let args: Vec<&str> = rest[..close].split(", ").collect();
        let groups: u64 = args
            .iter()
            .find_map(|a| a.strip_prefix("groups="))
            .map_or(1, |g| g.parse().unwrap());
        let width: u64 = args[1].parse().unwrap();
        let slim = (width / 16 / groups).max(1) * groups;
        out.push_str(args[0]);
        out.push_str(&format!(", {slim}"));
        for a in &args[2..] {
            out.push_str(&format!(", {a}"));
        }
        rest = &rest[close..];
    }
    out.push_str(rest);
    wrnc_grammar::build(&wrnc_grammar::Source::new("slimmed.net", out.clone()))
        .unwrap_or_else(|d| panic!("{out}\n{}", d.render()))
}

/// Trained-looking state (seeded): BN gamma and beta and every bias at random, and BN running
/// statistics from a training-mode forward on random images (as training leaves them, so
/// that deep nets keep sane activations) then perturbed, so that no statistic is the init
/// default and a swapped BN input or a dropped bias shows.
fn trained_looking(m: &mut Model, seed: u64) {
    let kinds: std::collections::BTreeMap<String, ParamKind> = m
        .graph()
        .params()
        .into_iter()
        .map(|(n, p)| (n, p.kind))
        .collect();
    for (name, t) in m.params.iter_mut() {
        let mut r = stream(seed, name);
        match kinds[name] {
            ParamKind::Weight => {}
            ParamKind::BnWeight => t
                .data
                .iter_mut()
                .for_each(|v| *v = 0.5 + r.uniform() as f32),
            ParamKind::BnBias | ParamKind::Bias => {
                t.data.iter_mut().for_each(|v| *v = 0.2 * r.normal() as f32)
            }
        }
    }
    // Momentum 1: the running statistics become those of the calibration batch.
    let mut g = m.graph().clone();
    for node in g.g.node_weights_mut() {
        if let Op::BatchNorm { momentum, .. } = &mut node.op {
            *momentum = 1.0;
        }
    }
    let mut cal = Model::with_state(g, m.params.clone(), m.buffers.clone()).unwrap();
    cal.forward(
        &random_input(cal.graph(), 4, seed),
        Mode::Train { seed: 1, step: 0 },
    )
    .unwrap();
    // Perturbed relative to each channel's spread: means move by 0.1 standard deviations,
    // variances by a factor in [0.8, 1.2].
    let bn_names: Vec<String> = m
        .graph()
        .g
        .node_weights()
        .filter(|n| matches!(n.op, Op::BatchNorm { .. }))
        .map(|n| n.name.clone())
        .collect();
    for name in bn_names {
        let (mean_name, var_name) = (
            format!("{name}.running_mean"),
            format!("{name}.running_var"),
        );
        let (mut rm, mut rv) = (stream(seed, &mean_name), stream(seed, &var_name));
        let mean = &cal.buffers[&mean_name].data;
        let var = &cal.buffers[&var_name].data;
        let m_out = &mut m.buffers.get_mut(&mean_name).unwrap().data;
        for (o, (mu, v)) in m_out.iter_mut().zip(mean.iter().zip(var)) {
            *o = mu + 0.1 * v.sqrt() * rm.normal() as f32;
        }
        let v_out = &mut m.buffers.get_mut(&var_name).unwrap().data;
        for (o, v) in v_out.iter_mut().zip(var) {
            *o = v * (0.8 + 0.4 * rv.uniform() as f32);
        }
    }
}

/// `n` images of normal noise shaped for `g`, seeded.
fn random_input(g: &Graph, n: usize, seed: u64) -> Tensor {
    let s = g.input_shape();
    let shape = [n, s.c as usize, s.h as usize, s.w as usize];
    let mut r = SplitMix64(seed);
    Tensor::from_vec(
        &shape,
        (0..shape.iter().product::<usize>())
            .map(|_| r.normal() as f32)
            .collect(),
    )
}

fn write_f32(path: &Path, data: &[f32]) {
    let mut bytes = Vec::with_capacity(data.len() * 4);
    for v in data {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(path, bytes).unwrap();
}

/// Exports `m`, runs it in onnxruntime on a seeded input, returns the error measure.
fn compare(label: &str, m: &Model, seed: u64) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let x = random_input(m.graph(), BATCH, seed);
    let want = m.infer(&x).unwrap();
    let (model_path, x_path, y_path) = (
        dir.path().join("model.onnx"),
        dir.path().join("x.bin"),
        dir.path().join("y.bin"),
    );
    std::fs::write(&model_path, onnx::export(m).unwrap()).unwrap();
    write_f32(&x_path, &x.data);
    let out = Command::new(python())
        .arg(root().join("scripts/onnx_check.py"))
        .args([&model_path, &x_path, &y_path])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{label}: onnx_check.py failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if let Some(keep) = std::env::var_os("WRNC_ONNX_KEEP") {
        // Debugging aid: keep the files of every case.
        let to = Path::new(&keep).join(label.replace(|c: char| !c.is_ascii_alphanumeric(), "_"));
        std::fs::create_dir_all(&to).unwrap();
        for p in [&model_path, &x_path, &y_path] {
            std::fs::copy(p, to.join(p.file_name().unwrap())).unwrap();
        }
        write_f32(&to.join("wrnc.bin"), &want.data);
    }
    let got: Vec<f32> = std::fs::read(&y_path)
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(got.len(), want.data.len(), "{label}: logits length");
    assert_eq!(want.shape, [BATCH, m.graph().classes as usize]);
    let diff = got
        .iter()
        .zip(&want.data)
        .map(|(a, b)| (*a as f64 - *b as f64).abs())
        .fold(0.0, f64::max);
    let scale = got.iter().map(|a| (*a as f64).abs()).fold(0.0, f64::max);
    assert!(
        diff.is_finite() && scale.is_finite(),
        "{label}: non-finite logits"
    );
    let rel = diff / scale.max(FLOOR);
    eprintln!("{label}: max |diff| {diff:.3e}, max |logit| {scale:.3e}, relative {rel:.3e}");
    rel
}

/// Each case: a label, the graph, and whether the weights are made trained-looking.
fn check(cases: Vec<(String, Graph, bool)>) {
    if !ort_available() {
        return;
    }
    let mut bad = vec![];
    for (i, (label, g, trained)) in cases.into_iter().enumerate() {
        let mut m = Model::new(g, 10 + i as u64).unwrap();
        if trained {
            trained_looking(&mut m, 100 + i as u64);
        }
        let rel = compare(&label, &m, 1000 + i as u64);
        if rel.is_nan() || rel > TOLERANCE {
            bad.push(format!("{label}: relative error {rel:.3e} > {TOLERANCE:e}"));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// The examples, split in two halves so that the test harness runs them on both cores.
fn examples(half: usize) -> Vec<(String, Graph, bool)> {
    let full = std::env::var("WRNC_ONNX_FULL").is_ok_and(|v| v == "1");
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "net"))
        .collect();
    files.sort();
    assert!(files.len() >= 10, "examples/ went missing: {files:?}");
    files
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 2 == half)
        .map(|(_, p)| {
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            let src = wrnc_grammar::source_from_bytes(&name, &std::fs::read(p).unwrap()).unwrap();
            let g = wrnc_grammar::build(&src).unwrap_or_else(|d| panic!("{}", d.render()));
            let params = wrnc_compiler::analysis::info(&g, 1).params;
            if full || params <= FULL_PARAMS {
                (name, g, true)
            } else {
                (format!("{name} (widths / 16)"), slimmed(&src), true)
            }
        })
        .collect()
}

#[test]
fn examples_even_match_onnxruntime() {
    check(examples(0));
}

#[test]
fn examples_odd_match_onnxruntime() {
    check(examples(1));
}

/// Structural nets covering every op and option, and the default (fresh) initialisation.
#[test]
fn structural_nets_match_onnxruntime() {
    let custom = std::fs::read_to_string(root().join("examples/custom.net")).unwrap();
    let cases =
        vec![
        ("custom.net, fresh initialisation", custom.as_str(), false),
        (
            "conv options, max and average pooling with padding, fc on a feature map",
            "network { input 3x13x11 classes 7
               conv(5x5, 8, stride=2, pad=2, bias) bn relu
               conv(3x3, 8, groups=4, pad=0) maxpool(3x3, stride=2, pad=1)
               conv(1x1, 6, bias) avgpool(3x3, stride=1, pad=1) dropout(0.5) fc(9) fc }",
            true,
        ),
        (
            "zero-pad shortcuts (stride and channels, stride only, channels only), DropPath, post",
            "network { input 3x16x16 classes 5 conv(3x3, 4)
               residual { body bn relu conv(3x3, 6, stride=2) shortcut zeropad survival 0.7 }
               residual { body conv(3x3, 6, stride=2) bn shortcut zeropad post relu }
               residual { body conv(3x3, 9) shortcut zeropad }
               residual { pre bn relu body conv(3x3, 12, stride=2) shortcut proj }
               residual { body conv(3x3, 12) bn shortcut projbn post relu }
               bn relu gap fc }",
            true,
        ),
        (
            "dense units holding residual blocks, concat of concat",
            "network { input 2x8x8 classes 3 conv(3x3, 4)
               dense { bn relu conv(3x3, 3) }
               dense { residual { body bn relu conv(3x3, 7) } dense { relu conv(1x1, 2) } }
               bn relu avgpool(2x2) gap fc }",
            true,
        ),
        ("ResNeXt, tiny width", "ResNeXt-11-2x4d", true),
        ("PyramidNet bottleneck, tiny width", "PyramidNet-11-6-bottleneck", true),
    ];
    check(
        cases
            .into_iter()
            .map(|(l, t, trained)| (l.to_string(), graph(t), trained))
            .collect(),
    );
}
