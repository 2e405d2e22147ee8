//! `wrnc export`: files, determinism, exit codes, and the logits dump against onnxruntime.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn wrnc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wrnc"))
        .args(args)
        .output()
        .expect("run wrnc")
}

fn tmp(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("wrnc-onnx-cli-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn ok(args: &[&str]) {
    let o = wrnc(args);
    assert!(
        o.status.success(),
        "wrnc {args:?}: {}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
}

fn write_f32(path: &Path, n: usize, seed: u32) {
    let mut bytes = Vec::with_capacity(n * 4);
    let mut x = seed.wrapping_mul(2654435761).max(1);
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        bytes.extend_from_slice(&((x as f32 / u32::MAX as f32) * 2.0 - 1.0).to_le_bytes());
    }
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn same_input_same_bytes() {
    let d = tmp("det");
    let (a, b, c) = (d.join("a.onnx"), d.join("b.onnx"), d.join("c.onnx"));
    ok(&["export", "WRN-10-1", "--onnx", s(&a)]);
    ok(&["export", "WRN-10-1", "--onnx", s(&b)]);
    ok(&["export", "WRN-10-1", "--seed", "2", "--onnx", s(&c)]);
    let (a, b, c) = (
        std::fs::read(a).unwrap(),
        std::fs::read(b).unwrap(),
        std::fs::read(c).unwrap(),
    );
    assert!(a == b, "two exports of the same network differ");
    assert!(a != c, "--seed 2 gave the same weights as the default");
    // Through a checkpoint: same weights, same file.
    let (w, e) = (d.join("w.safetensors"), d.join("e.onnx"));
    ok(&["export", "WRN-10-1", "--save-weights", s(&w)]);
    ok(&["export", "WRN-10-1", "--weights", s(&w), "--onnx", s(&e)]);
    assert!(
        std::fs::read(e).unwrap() == a,
        "weights via a checkpoint changed the export"
    );
}

/// The first tensor (in the checkpoint's order) whose name or shape differs.
fn first_mismatch(net: &str, other: &str) -> String {
    let g = |t: &str| wrnc_grammar::build(&wrnc_grammar::Source::inline(t)).unwrap();
    let (a, b) = (g(net), g(other));
    let (ea, eb) = (
        wrnc_runtime::checkpoint::expected_tensors(&a),
        wrnc_runtime::checkpoint::expected_tensors(&b),
    );
    let fb: std::collections::BTreeMap<_, _> = eb.into_iter().collect();
    ea.into_iter()
        .find(|(n, s)| fb.get(n) != Some(s))
        .map(|(n, _)| n)
        .expect("the networks differ")
}

/// Each case: arguments after `export`, the exit code, a piece of standard error.
#[test]
fn user_errors() {
    let d = tmp("errors");
    let w = d.join("wrn-10-1.safetensors");
    ok(&["export", "WRN-10-1", "--save-weights", s(&w)]);
    let garbage = d.join("garbage.safetensors");
    std::fs::write(&garbage, b"not a checkpoint at all").unwrap();
    let short = d.join("short.bin");
    write_f32(&short, 3 * 32 * 32 - 1, 1);
    let out = d.join("out.onnx");
    let mismatch_10_2 = first_mismatch("WRN-10-2", "WRN-10-1");
    let mismatch_dense = first_mismatch("DenseNet-BC-10-4", "WRN-10-1");
    let cases: Vec<(Vec<&str>, i32, String)> = vec![
        (
            vec!["WRN-10-2", "--weights", s(&w), "--onnx", s(&out)],
            2,
            format!("tensor {mismatch_10_2} "),
        ),
        (
            vec!["DenseNet-BC-10-4", "--weights", s(&w), "--onnx", s(&out)],
            2,
            format!("tensor {mismatch_dense} "),
        ),
        (
            vec!["WRN-10-1", "--weights", s(&garbage), "--onnx", s(&out)],
            2,
            "not a valid checkpoint".into(),
        ),
        (
            vec![
                "WRN-10-1",
                "--weights",
                "/nonexistent/w.safetensors",
                "--onnx",
                s(&out),
            ],
            2,
            "/nonexistent/w.safetensors".into(),
        ),
        (vec!["WRN-10-1"], 2, "say what to write".into()),
        (
            vec!["WRN-10-1", "--input", s(&short), "--logits", s(&out)],
            2,
            "whole number".into(),
        ),
        (vec!["WRN-10-1", "--input", s(&short)], 2, "--logits".into()),
        (
            vec![
                "WRN-10-1",
                "--weights",
                s(&w),
                "--seed",
                "3",
                "--onnx",
                s(&out),
            ],
            2,
            "cannot be used with".into(),
        ),
        (vec!["WRN-7-1", "--onnx", s(&out)], 2, "depth".into()),
    ];
    for (args, code, needle) in cases {
        let mut full = vec!["export"];
        full.extend(&args);
        let o = wrnc(&full);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(code), "wrnc {full:?}: {err}");
        assert!(
            err.contains(&needle),
            "wrnc {full:?}: no `{needle}` in\n{err}"
        );
    }
    assert!(!out.exists(), "a failed export wrote {}", out.display());
}

/// `--logits` is the CPU backend's `infer`: the same weights give the same logits whether they
/// come from a seed or a checkpoint, and a batch of 2 is two batches of 1.
#[test]
fn logits_dump() {
    let d = tmp("logits");
    let net = "WRN-10-1";
    let (x, x0, x1) = (d.join("x.bin"), d.join("x0.bin"), d.join("x1.bin"));
    write_f32(&x, 2 * 3 * 32 * 32, 7);
    let bytes = std::fs::read(&x).unwrap();
    std::fs::write(&x0, &bytes[..bytes.len() / 2]).unwrap();
    std::fs::write(&x1, &bytes[bytes.len() / 2..]).unwrap();
    let w = d.join("w.safetensors");
    let (ya, yb, y0, y1) = (d.join("ya"), d.join("yb"), d.join("y0"), d.join("y1"));
    ok(&[
        "export",
        net,
        "--seed",
        "5",
        "--save-weights",
        s(&w),
        "--input",
        s(&x),
        "--logits",
        s(&ya),
    ]);
    ok(&[
        "export",
        net,
        "--weights",
        s(&w),
        "--input",
        s(&x),
        "--logits",
        s(&yb),
    ]);
    ok(&[
        "export",
        net,
        "--seed",
        "5",
        "--input",
        s(&x0),
        "--logits",
        s(&y0),
    ]);
    ok(&[
        "export",
        net,
        "--seed",
        "5",
        "--input",
        s(&x1),
        "--logits",
        s(&y1),
    ]);
    let read = |p: &Path| -> Vec<f32> {
        std::fs::read(p)
            .unwrap()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let (a, b) = (read(&ya), read(&yb));
    assert_eq!(a.len(), 2 * 10);
    assert_eq!(a, b, "seed vs checkpoint");
    let mut halves = read(&y0);
    halves.extend(read(&y1));
    let diff = a
        .iter()
        .zip(&halves)
        .map(|(p, q)| (p - q).abs())
        .fold(0f32, f32::max);
    assert!(diff <= 1e-5, "batch of 2 vs two batches of 1: {diff}");
}

/// The CLI pipeline the PyTorch twin uses: `--onnx` run by onnxruntime equals `--logits`.
/// Skips like runtime/tests/onnx_roundtrip.rs: only when onnxruntime is missing and `CI` unset.
#[test]
fn exported_file_runs_in_onnxruntime() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/onnx_check.py");
    let py = std::env::var("WRNC_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = Command::new(&py).arg(&script).arg("--probe").output();
    if !probe.as_ref().is_ok_and(|o| o.status.success()) {
        let why = match &probe {
            Ok(o) => String::from_utf8_lossy(&o.stderr).to_string(),
            Err(e) => e.to_string(),
        };
        assert!(
            std::env::var_os("CI").is_none(),
            "onnxruntime is required under CI: {why}"
        );
        eprintln!("SKIPPED: onnxruntime is not usable ({why}); run scripts/install-deps.sh");
        return;
    }
    let d = tmp("ort");
    let net = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/custom.net");
    let (x, m, yw, yo) = (
        d.join("x.bin"),
        d.join("m.onnx"),
        d.join("yw"),
        d.join("yo"),
    );
    write_f32(&x, 2 * 3 * 32 * 32, 11);
    ok(&[
        "export",
        s(&net),
        "--onnx",
        s(&m),
        "--input",
        s(&x),
        "--logits",
        s(&yw),
    ]);
    let o = Command::new(&py)
        .arg(&script)
        .args([&m, &x, &yo])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (a, b) = (std::fs::read(yw).unwrap(), std::fs::read(yo).unwrap());
    assert_eq!(a.len(), b.len());
    let f = |v: &[u8]| -> Vec<f32> {
        v.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let (a, b) = (f(&a), f(&b));
    let diff = a
        .iter()
        .zip(&b)
        .map(|(p, q)| (p - q).abs())
        .fold(0f32, f32::max);
    let scale = b.iter().map(|q| q.abs()).fold(1e-3f32, f32::max);
    assert!(diff / scale <= 1e-4, "relative error {}", diff / scale);
}
