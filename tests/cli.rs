//! The `wrnc` binary as a user runs it: outputs, exit codes, and end-to-end training on a
//! tiny data set the test writes (the official CIFAR-10 binary format).

use std::path::Path;
use std::process::{Command, Output};

#[path = "cifar_support.rs"]
mod cifar;
use cifar::write_cifar10;

fn wrnc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wrnc"))
        .args(args)
        .output()
        .expect("run wrnc")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `check(args, exit code, text the output must contain)`: one line per behaviour.
fn check(args: &[&str], code: i32, contains: &str) {
    let o = wrnc(args);
    let t = text(&o);
    assert_eq!(
        o.status.code(),
        Some(code),
        "wrnc {args:?} exited {:?}:\n{t}",
        o.status.code()
    );
    assert!(
        t.contains(contains),
        "wrnc {args:?} output lacks {contains:?}:\n{t}"
    );
    assert!(!t.contains("panicked"), "wrnc {args:?} panicked:\n{t}");
}

#[test]
fn commands_and_exit_codes() {
    check(&["compile", "--list-passes"], 0, "bn_relu_prologue");
    // `precompile`: what it needs to know before compiling anything
    check(
        &["precompile", "--arch", "sm_9", "bench", "WRN-10-1"],
        2,
        "--arch `sm_9` is not a GPU architecture such as sm_90",
    );
    check(
        &["precompile", "--arch", "sm_90a", "bench", "WRN-10-1"],
        2,
        "wgmma modules get sm_90a by themselves",
    );
    check(
        &["precompile", "run", "WRN-10-1"],
        2,
        "say what to precompile",
    );
    // the data sets `wrnc run` takes, with its messages
    check(
        &["precompile", "run", "WRN-10-1", "--train", "mnist"],
        2,
        "unknown data set `mnist`",
    );
    check(
        &["precompile", "run", "WRN-10-1", "--train", "imagenet"],
        2,
        "training on ImageNet is not supported",
    );
    check(
        &["precompile", "selftest", "--batch", "65"],
        2,
        "batch 65 is out of range",
    );
    check(
        &[
            "precompile",
            "bench",
            "WRN-10-1",
            "--precision",
            "bf16",
            "--tf32",
        ],
        2,
        "error:",
    );
    check(&["precompile", "bench", "WRN-1O-1"], 2, "WRN-1O-1");
    check(&["compile"], 2, "<NET>");
    check(&["info", "WRN-28-10"], 0, "parameters   36.5M (36479194)");
    check(&["info", "WRN-28-10"], 0, "MACs/image   5.24G");
    check(&["info", "--json", "WRN-40-4"], 0, "\"params\": 8949210");
    check(&["info", "--json", "WRN-16-4"], 0, "\"train_fused\"");
    // the compiled step's figures in another precision: bf16 halves the activations' traffic
    check(
        &["info", "WRN-28-10", "--precision", "bf16"],
        0,
        "DRAM/step    8.39 GiB fused, 14.84 GiB unfused (estimate, batch 128, bf16)",
    );
    check(
        &["info", "WRN-28-10"],
        0,
        "DRAM/step    14.89 GiB fused, 27.80 GiB unfused (estimate, batch 128, f32)",
    );
    // inference: the folded BNs, adds and ReLUs in the conv epilogues, the weights packed in
    // setup, and at batch 1 the split-K convs' partial sums (written, then read back once)
    check(
        &["info", "WRN-28-10", "--precision", "bf16", "--batch", "1"],
        0,
        "DRAM/infer   219.2 MiB fused, 241.2 MiB unfused (estimate, a batch of 1, bf16; setup excluded)",
    );
    check(
        &["info", "WRN-28-10", "--precision", "f16"],
        2,
        "invalid value 'f16'",
    );
    check(
        &["bench", "WRN-10-1", "--no-train", "--no-infer"],
        2,
        "the argument '--no-train' cannot be used with '--no-infer'",
    );
    check(&["check", "examples/custom.net"], 0, "ok: custom-preact");
    check(&["info", "WRN-27-10"], 2, "<inline>:1:5");
    check(&["info", "WRN-28-0"], 2, "must be at least 1");
    check(
        &["info", "nonexistent.net"],
        2,
        "cannot read `nonexistent.net`",
    );
    check(
        &["info", "--batch", "0", "WRN-16-4"],
        2,
        "batch 0 is out of range",
    );
    check(&["info", "--bogus", "WRN-16-4"], 2, "unexpected argument");
    check(
        &["selftest", "--device", "cpu", "--side", "0"],
        2,
        "--side 0: custom-preact does not build at 0x0",
    );
    check(
        &["compile", "WRN-16-4", "--no-fuse", "nope", "--emit", "cuda"],
        2,
        "unknown pass `nope`",
    );
    check(
        &[
            "compile",
            "WRN-10-1",
            "--precision",
            "bf16",
            "--arch",
            "sm_75",
            "--emit",
            "ptx",
        ],
        2,
        "bf16 tensor cores, which need sm_80 or later",
    );
    for flag in ["--tf32x3", "--tf32"] {
        check(
            &["compile", "WRN-10-1", flag, "--arch", "sm_75", "--emit", "ptx"],
            2,
            "--tf32 and --tf32x3 run the f32 convolutions on TF32 tensor cores, which need sm_80 or later",
        );
    }
    check(
        &[
            "compile",
            "WRN-10-1",
            "--precision",
            "bf16",
            "--wgmma",
            "--arch",
            "sm_80",
            "--emit",
            "ptx",
        ],
        2,
        "--wgmma needs sm_90",
    );
    check(
        &[
            "compile",
            "WRN-10-1",
            "--precision",
            "bf16",
            "--stages",
            "9",
        ],
        2,
        "2..=8",
    );
    check(
        &["compile", "WRN-10-1", "--stages", "4"],
        2,
        "which f32 has only with --tf32 or --tf32x3",
    );
    check(
        &["bench", "WRN-10-1", "--wgmma"],
        2,
        "--wgmma runs the tensor-core convolutions of --precision bf16 or of --tf32",
    );
    check(
        &["compile", "WRN-10-1", "--tma", "--emit", "cuda"],
        2,
        "--tma loads the bf16 tensor-core convolutions' operands",
    );
    check(
        &["compile", "WRN-10-1", "--tf32", "--tma", "--emit", "cuda"],
        2,
        "--tma loads the bf16 tensor-core convolutions' operands",
    );
    // plain TF32 runs on wgmma; 3xTF32 does not
    check(
        &[
            "compile", "WRN-10-1", "--tf32x3", "--wgmma", "--emit", "cuda",
        ],
        2,
        "3xTF32 stays on mma.sync",
    );
    check(
        &["compile", "WRN-10-1", "--tf32", "--wgmma", "--emit", "cuda"],
        0,
        "wrnc_wgmma_tf32_m64n",
    );
    // TF32 and 3xTF32 are for f32: bf16 convolutions are on the tensor cores already; and
    // they exclude each other
    for cmd in ["compile", "bench", "run"] {
        for flag in ["--tf32x3", "--tf32"] {
            check(
                &[cmd, "WRN-10-1", "--precision", "bf16", flag],
                2,
                "--tf32 and --tf32x3 move the f32 convolutions to the tensor cores; with --precision bf16 they are there already",
            );
        }
        check(
            &[cmd, "WRN-10-1", "--tf32", "--tf32x3"],
            2,
            "the argument '--tf32' cannot be used with '--tf32x3'",
        );
    }
    // --tma implies --wgmma, so it too needs sm_90
    check(
        &[
            "compile",
            "WRN-10-1",
            "--precision",
            "bf16",
            "--tma",
            "--arch",
            "sm_80",
            "--emit",
            "ptx",
        ],
        2,
        "--tma needs sm_90",
    );
    check(
        &[
            "run",
            "WRN-10-1",
            "--train",
            "cifar10",
            "--precision",
            "fp16",
        ],
        2,
        "invalid value 'fp16'",
    );
    check(
        &["compile", "WRN-16-4", "--emit", "expanded"],
        0,
        "shortcut proj",
    );
    check(
        &["compile", "WRN-16-4", "--emit", "graph"],
        0,
        "conv 3x3 16->64",
    );
    check(
        &[
            "compile", "WRN-16-4", "--emit", "schedule", "--infer", "--batch", "2",
        ],
        0,
        "\"launches\"",
    );
    check(
        &[
            "run",
            "WRN-10-1",
            "--train",
            "cifar10",
            "--device",
            "cuda",
            "--data",
            "/nonexistent",
        ],
        1,
        "use --device cpu",
    );
    check(
        &["run", "WRN-10-1", "--train", "imagenet2"],
        2,
        "unknown data set `imagenet2`",
    );
    check(
        &[
            "run",
            "WRN-10-1",
            "--train",
            "cifar10",
            "--data",
            "/nonexistent/dir",
            "--device",
            "cpu",
        ],
        2,
        "/nonexistent/dir",
    );
}

/// Inputs a review found mishandled, one `check` each: a device read as a .net file or a
/// metrics file (read for ever before), flags held to the ranges a file's settings are, `--eval`
/// with training flags, `--resume` with nothing to resume or with weights alone, a plot to a
/// folder, a file error said once, a byte-order mark, a folder as `--input`, an empty
/// examples folder, a tiny `stochastic_depth`, and activations past 2^64 bytes.
#[test]
fn reviewed_inputs_get_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |name: &str| tmp.path().join(name).to_str().unwrap().to_string();
    check(&["info", "/dev/zero"], 2, "holds more than 16777216 bytes");
    check(&["check", "/dev/urandom"], 2, "holds more than");
    // 13107 x 160x32x32 is under 2^31 but its grid-stride loops would step past it
    check(
        &[
            "compile",
            "WRN-28-10",
            "--batch",
            "13107",
            "--emit",
            "schedule",
        ],
        2,
        "elements exceed the 2146435071 (2^31 - 2^20) that 32-bit indexing allows",
    );
    check(
        &["plot", "/dev/zero", "-o", &p("x.png")],
        2,
        "not a metrics file",
    );
    let run = |extra: &[&str]| {
        let mut a = vec!["run", "WRN-10-1", "--train", "cifar10", "--device", "cpu"];
        a.extend(extra);
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let check_run = |extra: &[&str], code, want: &str| {
        let a = run(extra);
        check(
            &a.iter().map(String::as_str).collect::<Vec<_>>(),
            code,
            want,
        );
    };
    check_run(&["--lr", "1e30"], 2, "--lr 1e30 is out of range");
    check_run(
        &["--epochs", "100001"],
        2,
        "--epochs 100001 is out of range",
    );
    check_run(
        &["--seed", "4294967296"],
        2,
        "--seed 4294967296 is out of range",
    );
    check(
        &[
            "run",
            "WRN-10-1",
            "--eval",
            "cifar10",
            "--weights",
            "w",
            "--epochs",
            "3",
        ],
        2,
        "cannot be used with",
    );
    // --resume: no checkpoint yet, then a file of weights alone
    let data = tmp.path().join("data");
    write_cifar10(&data, 8);
    let ck = p("ck");
    let resume = |ck: &str| {
        run(&[
            "--data",
            data.to_str().unwrap(),
            "--checkpoint",
            ck,
            "--resume",
            "--quiet",
        ])
    };
    let a = resume(&ck);
    check(
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
        2,
        "no checkpoint to resume from",
    );
    let weights = p("w.safetensors");
    check(&["export", "WRN-10-1", "--save-weights", &weights], 0, "");
    std::fs::create_dir_all(&ck).unwrap();
    std::fs::copy(&weights, tmp.path().join("ck/last.safetensors")).unwrap();
    let a = resume(&ck);
    check(
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
        2,
        "holds weights only",
    );
    // one step on the CPU, and what it says: more outputs than the data has classes, and a
    // GPU-only layout
    let one_step = |net: &str, extra: &[&str], want: &str| {
        let d = data.to_str().unwrap();
        let mut a = vec![
            "run", net, "--train", "cifar10", "--device", "cpu", "--data", d,
        ];
        a.extend(["--epochs", "1", "--max-steps", "1"]);
        a.extend(extra);
        check(&a, 0, want);
    };
    one_step("WRN-10-1@cifar100", &[], "90 outputs are never a label");
    one_step(
        "WRN-10-1",
        &["--layout", "nhwc"],
        "--layout nhwc applies on the GPU",
    );
    // a file error says its reason once
    let a = run(&[
        "--data",
        data.to_str().unwrap(),
        "--metrics",
        "/proc/x/m.jsonl",
        "--quiet",
    ]);
    let o = wrnc(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let t = text(&o);
    assert_eq!(t.matches("No such file or directory").count(), 1, "{t}");
    // a plot to a folder
    let m = p("m.jsonl");
    std::fs::write(&m, "{\"epoch\":1,\"train_loss\":1.0,\"train_acc\":0.5,\"test_loss\":1.0,\"test_acc\":0.5,\"lr\":0.1,\"seconds\":1.0,\"images_per_s\":10}\n").unwrap();
    std::fs::create_dir_all(tmp.path().join("d.png")).unwrap();
    check(&["plot", &m, "-o", &p("d.png")], 2, "it is a directory");
    check(&["plot", &m, "-o", &p("new/dir/c.svg")], 0, "wrote");
    // a byte-order mark is not text; a folder is no input file
    let bom = p("bom.net");
    std::fs::write(&bom, b"\xEF\xBB\xBFnetwork WRN-10-1\n").unwrap();
    check(&["check", &bom], 0, "ok: WRN-10-1");
    check(
        &[
            "export",
            "WRN-10-1",
            "--input",
            &p("d.png"),
            "--logits",
            &p("l.bin"),
        ],
        2,
        "is not a file",
    );
    // an examples folder without networks is not a passing selftest
    std::fs::create_dir_all(tmp.path().join("empty")).unwrap();
    check(
        &["selftest", "--device", "cpu", "--examples", &p("empty")],
        2,
        "holds no .net file",
    );
    // a survival below 1e-6 is not rounded to 0
    let sd = p("sd.net");
    std::fs::write(&sd, "network WRN-10-1\nstochastic_depth 1e-8\n").unwrap();
    check(&["info", &sd], 0, "parameters");
    // activations past 2^64 bytes are not wrapped round
    check(
        &[
            "info",
            "network \"x\" { input 65536x4096x4096 repeat 3 { relu } gap fc }",
            "--batch",
            "1048576",
        ],
        0,
        "16 EiB or more",
    );
}

/// The `__global__` lines of the CUDA that `wrnc compile NET --emit cuda ARGS...` prints.
fn kernel_defs(net: &str, args: &[&str]) -> Vec<String> {
    let mut a = vec!["compile", net, "--emit", "cuda"];
    a.extend_from_slice(args);
    let o = wrnc(&a);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| l.contains("__global__ void"))
        .map(str::to_string)
        .collect()
}

/// The strided convs' data gradients run in phase order (`_ph` kernels: WRN-10-1's two
/// stride-2 3x3 convs and their 1x1 projections), and `--dense-dgrad` gives the kernels over
/// every tap instead.
#[test]
fn compile_puts_strided_data_gradients_in_phase_order() {
    let phased = |extra: &[&str]| {
        let k = kernel_defs("WRN-10-1", extra);
        let defs = |suffix: &str| {
            k.iter()
                .filter(|l| l.contains("void conv_bwd_data_") && l.contains(suffix))
                .count()
        };
        (defs("_ph("), defs("s2p"))
    };
    assert_eq!(phased(&[]), (4, 4));
    assert_eq!(phased(&["--dense-dgrad"]), (0, 4));
}

/// Split-K: WRN-16-4's bf16 inference at batch 1 splits its 64-wide and wider convs'
/// reductions (`_sk<N>` kernels, each followed by a `splitk_epilogue`), its training step the
/// weight gradients'; `--no-split-k` splits none.
#[test]
fn compile_splits_long_reductions_unless_told_not_to() {
    let split = |extra: &[&str]| {
        let k = kernel_defs("WRN-16-4", &[&["--precision", "bf16"][..], extra].concat());
        let defs = |what: &str| k.iter().filter(|l| l.contains(what)).count();
        (
            defs("conv_fwd_") - defs("_sk"),
            defs("_sk"),
            defs("splitk_epilogue"),
        )
    };
    let infer = ["--infer", "--batch", "1"];
    let (whole, sk, epilogues) = split(&infer);
    assert!(
        sk >= 3 && epilogues >= 2 && whole >= 1,
        "{whole} {sk} {epilogues}"
    );
    assert_eq!(
        split(&[&infer[..], &["--no-split-k"]].concat()),
        (whole + sk, 0, 0)
    );
    assert!(split(&[]).1 > 0);
    assert_eq!(split(&["--no-split-k"]).1, 0);
}

#[test]
fn train_checkpoint_resume_eval_plot() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_cifar10(&data, 8);
    let net = tmp.path().join("tiny.net");
    std::fs::write(
        &net,
        "network \"tiny\" { conv(3x3, 4, stride=4) residual { body bn relu conv(3x3, 4) } bn relu gap fc }\nbatch 8\nlr 0.05\n",
    )
    .unwrap();
    let (net, data) = (net.to_str().unwrap(), data.to_str().unwrap());
    let ck = tmp.path().join("ck");
    let metrics = tmp.path().join("m.jsonl");
    let (ck_s, metrics_s) = (ck.to_str().unwrap(), metrics.to_str().unwrap());
    let base = [
        "run",
        net,
        "--train",
        "cifar10",
        "--data",
        data,
        "--device",
        "cpu",
        "--checkpoint",
        ck_s,
        "--metrics",
        metrics_s,
        "--quiet",
    ];
    // Two epochs, interrupted after 3 steps (5 a epoch), then resumed.
    let mut a = base.to_vec();
    a.extend(["--epochs", "2", "--max-steps", "3"]);
    check(&a, 0, "stopped after 3 steps");
    let mut b = base.to_vec();
    b.extend(["--epochs", "2", "--resume"]);
    check(&b, 0, "epoch   2");
    let lines = std::fs::read_to_string(&metrics).unwrap();
    assert_eq!(lines.lines().count(), 2, "{lines}");
    for key in [
        "\"epoch\"",
        "\"train_loss\"",
        "\"train_acc\"",
        "\"test_loss\"",
        "\"test_acc\"",
        "\"lr\"",
        "\"seconds\"",
        "\"images_per_s\"",
    ] {
        assert!(
            lines.lines().all(|l| l.contains(key)),
            "{key} missing: {lines}"
        );
    }
    // Evaluate the checkpoint; a checkpoint of another network is refused by name.
    check(
        &[
            "run",
            net,
            "--eval",
            "cifar10",
            "--weights",
            ck_s,
            "--data",
            data,
            "--json",
        ],
        0,
        "\"test_acc\"",
    );
    check(
        &[
            "run",
            "WRN-10-1",
            "--eval",
            "cifar10",
            "--weights",
            ck_s,
            "--data",
            data,
        ],
        2,
        "does not fit WRN-10-1",
    );
    // A truncated batch file names the file.
    std::fs::write(
        Path::new(data).join("cifar-10-batches-bin/test_batch.bin"),
        [1u8; 100],
    )
    .unwrap();
    check(
        &[
            "run",
            net,
            "--eval",
            "cifar10",
            "--weights",
            ck_s,
            "--data",
            data,
        ],
        2,
        "test_batch.bin",
    );
    let png = tmp.path().join("curves.png");
    check(
        &["plot", metrics_s, "-o", png.to_str().unwrap()],
        0,
        "wrote",
    );
    assert!(std::fs::metadata(&png).unwrap().len() > 1000);
}

/// `--emit resources`: ptxas's registers, spills and shared memory per kernel, as JSON, and a
/// one-line summary; needs NVRTC (skips with the reason without it, except under CI).
#[test]
fn compile_emits_ptxas_resources() {
    if let Err(e) = wrnc_runtime::nvrtc::library() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set and NVRTC is missing: {e}"
        );
        eprintln!("skipping: {e}");
        return;
    }
    let o = wrnc(&[
        "compile",
        "WRN-10-1",
        "--precision",
        "bf16",
        "--batch",
        "4",
        "--emit",
        "resources",
        "--arch",
        "sm_80",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let start = stdout.find('[').expect("a JSON array");
    let v: serde_json::Value = serde_json::from_str(&stdout[start..]).unwrap();
    let ks = v.as_array().unwrap();
    assert!(ks.iter().any(|k| k["name"]
        .as_str()
        .is_some_and(|n| n.starts_with("conv_fwd") && n.contains("_v8"))));
    for k in ks {
        assert!(k["registers"].as_u64().unwrap() > 0, "{k}");
        assert_eq!(k["spill_stores"].as_u64(), Some(0), "{k}");
    }
    assert!(text(&o).contains("ptxas sm_80:"), "{}", text(&o));
    // --wgmma compiles for sm_90a, and its kernels say so
    let o = wrnc(&[
        "compile",
        "WRN-10-1",
        "--precision",
        "bf16",
        "--batch",
        "4",
        "--wgmma",
        "--emit",
        "resources",
        "--arch",
        "sm_90",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("ptxas sm_90a:"), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("_v8_wg"));
    // --tf32: one TF32 mma per fragment pair, no remainders
    let o = wrnc(&[
        "compile", "WRN-10-1", "--batch", "4", "--tf32", "--emit", "cuda",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let cu = String::from_utf8_lossy(&o.stdout);
    assert!(
        cu.contains("conv_fwd_i32x32_o32x32_k3s1p1g1_tc_tf32"),
        "{cu}"
    );
    // (the helper's definition is in every tensor-core module: look for the call)
    assert!(cu.contains("wrnc_mma_tf32_1688(cacc[i][jn], ah[i], bh[jn], cacc[i][jn])"));
    assert!(!cu.contains("al[i][q]") && !cu.contains("wrnc_mma_tf32_1688(cacc[i][jn], al[i]"));
    // its convs load f32 runs by cp.async (Auto is NHWC under --tf32), from f32 packed weights;
    // --stages sets their ring, as in bf16
    let o = wrnc(&[
        "compile", "WRN-10-1", "--batch", "4", "--tf32", "--stages", "3", "--emit", "cuda",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let cu = String::from_utf8_lossy(&o.stdout);
    assert!(
        cu.contains("conv_fwd_i32x32_o32x32_k3s1p1g1_tc_tf32_nhwc_v8_s3"),
        "{cu}"
    );
    assert!(
        cu.contains("pack_weight_fwd_k3g1_f32(float* __restrict__ wp"),
        "{cu}"
    );
    // --tf32x3: every f32 conv on the tensor cores, three TF32 mmas per fragment pair
    let o = wrnc(&[
        "compile", "WRN-10-1", "--batch", "4", "--tf32x3", "--emit", "cuda",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let cu = String::from_utf8_lossy(&o.stdout);
    assert!(cu.contains("conv_fwd_i32x32_o32x32_k3s1p1g1_tc_x3"), "{cu}");
    assert!(cu.contains("wrnc_mma_tf32_1688(cacc[i][jn], al[i], bh[jn], cacc[i][jn])"));
    assert!(!cu.contains("wrnc_mma_bf16_16816(cacc"));
    // --tma: the wgmma kernels take the weight's tensor map and load it with TMA, and the
    // schedule's launches carry the maps
    let o = wrnc(&[
        "compile",
        "WRN-10-1",
        "--precision",
        "bf16",
        "--batch",
        "4",
        "--tma",
        "--emit",
        "cuda",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let cu = String::from_utf8_lossy(&o.stdout);
    assert!(cu.contains("_v8_wg_tma_") && cu.contains("const __grid_constant__ wrnc_tmap tmw"));
    assert!(cu.contains("wrnc_tma_load_4d(") && cu.contains("wrnc_mbar_wait("));
    // no box larger than its tensor: the weights of the 16- and 32-channel convs (fewer
    // output channels than the tile's 64 columns) stay on cp.async
    assert!(cu.contains("conv_fwd_i32x32_o32x32_k3s1p1g1_tc_nhwc_v8_wg_pro_bnrelu_stats("));
    // the 64-channel stride-1 convs take their activations by TMA too
    assert!(cu.contains("_v8_wg_tmaa_") && cu.contains("const __grid_constant__ wrnc_tmap tmx"));
    let o = wrnc(&[
        "compile",
        "WRN-10-1",
        "--precision",
        "bf16",
        "--batch",
        "4",
        "--tma",
        "--emit",
        "schedule",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let v: serde_json::Value = serde_json::from_str(&stdout[stdout.find('{').unwrap()..]).unwrap();
    let maps: Vec<_> = v["launches"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l.get("tmaps"))
        .collect();
    assert!(maps.len() >= 4, "{maps:?}");
    assert!(
        maps.iter()
            .all(|m| m[0]["box_dim"][0] == 32 && m[0]["swizzle"] == 64),
        "{maps:?}"
    );
    assert!(
        maps.iter().any(|m| m[1]["box_dim"][0] == 32),
        "no activation map: {maps:?}"
    );
    // --stages 8: 8 stages of 64x64 (80 KiB) in dynamic shared memory, which the report shows
    let o = wrnc(&[
        "compile",
        "WRN-10-1",
        "--precision",
        "bf16",
        "--batch",
        "4",
        "--stages",
        "8",
        "--emit",
        "resources",
        "--arch",
        "sm_80",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let v: serde_json::Value = serde_json::from_str(&stdout[stdout.find('[').unwrap()..]).unwrap();
    let deep: Vec<_> = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["dynamic_shared"].as_u64().is_some_and(|d| d > 48 * 1024))
        .collect();
    assert!(deep.len() >= 3, "{v}");
    for k in deep {
        assert!(k["name"].as_str().unwrap().contains("_v8_s8"), "{k}");
        assert_eq!(k["spill_stores"].as_u64(), Some(0), "{k}");
    }
}

/// `wrnc precompile` without a GPU: CUBINs (ELF images) for the architecture asked, keyed
/// by it; with `--tiles auto` the tile search's candidates and a note that the picked tiles
/// compile on the GPU; a second call finds everything cached; no cache is an error; an
/// architecture NVRTC refuses says NVRTC's reason.
#[test]
fn precompile_fills_the_cache_with_cubins() {
    if let Err(e) = wrnc_runtime::nvrtc::library() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set and NVRTC is missing: {e}"
        );
        eprintln!("skipping: {e}");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_wrnc"));
        c.args(args)
            .env("WRNC_CACHE_DIR", &cache)
            .env_remove("WRNC_NO_CACHE");
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().expect("run wrnc")
    };
    let args = [
        "precompile",
        "--arch",
        "sm_80",
        "bench",
        "WRN-10-1",
        "--batch",
        "2",
        "--precision",
        "bf16",
        "--fused-only",
        "--no-infer",
        "--json",
    ];
    let o = run(&args, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    // the default `--tiles auto`: one module per candidate tile (the bench's one schedule)
    assert_eq!(v["modules"], 6, "{v}");
    assert_eq!(v["compiled"], 6, "{v}");
    assert!(
        v["notes"][0].as_str().unwrap().contains("--tiles auto"),
        "{v}"
    );
    let entries: Vec<_> = std::fs::read_dir(cache.join("cubin"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(entries.len(), 6, "{entries:?}");
    for e in &entries {
        assert!(e.to_string_lossy().contains("-sm_80-nvrtc"), "{e:?}");
        assert!(
            wrnc_runtime::nvrtc::is_cubin(&std::fs::read(e).unwrap()),
            "{e:?}"
        );
    }
    let o = run(&args, &[]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (v["compiled"].clone(), v["cached"].clone()),
        (0.into(), 6.into()),
        "{v}"
    );
    // a fixed tile: the bench's own modules, text output
    let o = run(
        &[
            "precompile",
            "bench",
            "WRN-10-1",
            "--batch",
            "2",
            "--precision",
            "bf16",
            "--tiles",
            "128x64",
        ],
        &[],
    );
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(
        t.contains("6 modules for sm_90 (6 compiled now, 0 already cached)"),
        "{t}"
    );
    assert!(!t.contains("note:"), "{t}");
    let o = run(&args, &[("WRNC_NO_CACHE", "1")]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("caching is off"), "{}", text(&o));
    let mut bad = args.to_vec();
    bad[2] = "sm_10";
    let o = run(&bad, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("did not compile; the first: NVRTC compilation failed for sm_10"),
        "{}",
        text(&o)
    );
}

/// `wrnc compile NET --emit cuda | head`: a reader that stops early ends wrnc quietly, as it
/// ends other Unix tools, instead of a panic ("failed printing to stdout: Broken pipe").
#[test]
fn a_reader_that_stops_early_is_not_a_panic() {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_wrnc"))
        .args(["compile", "WRN-28-10", "--emit", "cuda"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run wrnc");
    let mut out = child.stdout.take().unwrap();
    let mut head = [0u8; 64];
    out.read_exact(&mut head).unwrap();
    assert!(String::from_utf8_lossy(&head).starts_with("// Generated by wrnc"));
    drop(out);
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        !o.status.success(),
        "the output (194 KB) cannot all have been written"
    );
}
