//! The GPU runtime end to end without a GPU: `emu/fakecuda.cpp` stands in for `libcuda.so.1`
//! and NVRTC and runs every kernel the runtime launches with the CPU emulation (see its header
//! comment). Driver calls, argument packing, the arena, graphs, augmentation on the device,
//! `wrnc selftest`, `wrnc run --device cuda` and `wrnc bench` all run for real; only the
//! silicon is emulated. Needs g++ (as the other emulation tests).
//!
//! Where the real NVRTC is installed (CI installs it), the fake also compiles every module with
//! it, so a source NVRTC would refuse fails here too.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde_json::Value;

#[path = "cifar_support.rs"]
mod cifar;
use cifar::write_cifar10;

/// Builds the fake driver once per test process and points this process's environment (and
/// so every `wrnc` it starts) at it.
fn fake() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let dir = std::env::temp_dir().join(format!("wrnc-fakegpu-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let lib = dir.join("libwrnc_fakecuda.so");
        let out = Command::new("g++")
            .args(["-O1", "-std=c++20", "-shared", "-fPIC", "-pthread", "-Wall"])
            .arg(format!(
                "-DWRNC_FAKE_EMU_DIR=\"{}\"",
                root.join("emu").display()
            ))
            .arg(root.join("emu/fakecuda.cpp"))
            .arg("-o")
            .arg(&lib)
            .arg("-ldl")
            .output()
            .expect("g++ is required by the emulation tests (apt-get install g++)");
        assert!(
            out.status.success(),
            "building the fake driver failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The real NVRTC, when installed where wrnc finds it by path (the pip package).
        let real = wrnc_runtime::nvrtc::candidates()
            .into_iter()
            .find(|p| p.is_absolute() && p.is_file());
        match &real {
            Some(p) => eprintln!("fake GPU: sources also compiled by {}", p.display()),
            None => eprintln!("fake GPU: no NVRTC installed; sources are not NVRTC-compiled here"),
        }
        // Set once, before any thread of this process reads them.
        std::env::set_var("WRNC_LIBCUDA", &lib);
        std::env::set_var("WRNC_NVRTC", &lib);
        std::env::set_var("WRNC_CACHE_DIR", dir.join("cache"));
        std::env::set_var("WRNC_FAKE_BUILD_DIR", dir.join("build"));
        if let Some(p) = real {
            std::env::set_var("WRNC_FAKE_REAL_NVRTC", p);
        }
        dir
    })
}

fn wrnc(args: &[&str], env: &[(&str, &str)]) -> Output {
    fake();
    let mut c = Command::new(env!("CARGO_BIN_EXE_wrnc"));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run wrnc")
}

fn ok(o: &Output) -> String {
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "wrnc failed ({}):\n{out}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

fn json(o: &Output) -> Value {
    serde_json::from_str(&ok(o)).expect("JSON output")
}

/// `(captures, graph launches)` from a `WRNC_FAKE_STATS` file (see `emu/fakecuda.cpp`).
fn stats(path: &Path) -> (u64, u64) {
    let text = std::fs::read_to_string(path).expect("the fake driver's counts");
    let get = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    };
    (get("captures "), get("graph_launches "))
}

const TINY: &str = "network \"tiny\" { conv(3x3, 4, stride=4) residual { body bn relu conv(3x3, 4) } bn relu gap fc }\nbatch 8\nlr 0.05\n";

/// A network whose convs (but the stem) take 8 and 16 channels: the `_v8` engine.
const V8_NET: &str = "network \"v8\" { input 3x8x8 classes 3 conv(3x3, 8) residual { body bn relu conv(3x3, 16, stride=2) bn relu conv(3x3, 16) shortcut proj } bn relu gap fc }\nbatch 4\nlr 0.05\n";

/// 64-channel convs: TMA for every box (`--tma`).
const WIDE_NET: &str = "network \"w64\" { input 3x8x8 classes 3 conv(3x3, 64) residual { body bn relu conv(3x3, 64) bn relu conv(3x3, 64) } bn relu gap fc }\nbatch 4\nlr 0.05\n";

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * a.abs().max(b.abs()).max(1e-3)
}

#[test]
fn selftest_passes_on_the_fake_gpu() {
    let o = wrnc(&["selftest", "--quick", "--json"], &[]);
    let v = json(&o);
    assert_eq!(v["failed"], 0, "{v}");
    assert_eq!(v["errors"].as_array().map(Vec::len), Some(0), "{v}");
    let checks = v["checks"].as_array().unwrap();
    assert!(checks.len() >= 40, "only {} checks", checks.len());
    // the fake GPU is an sm_90: Hopper's warpgroup MMA is checked too (training and inference,
    // launch by launch and whole, and the 128x128 tile's training launches)
    let wg = checks
        .iter()
        .filter(|c| c["what"].as_str().unwrap_or_default().contains("wgmma"))
        .count();
    assert!(wg >= 5, "{wg} wgmma checks");
    // deep pipelines in dynamic shared memory (`--stages`): two tiles, training and inference,
    // launch by launch and whole, and wgmma's 128x128 training launches
    let deep = checks
        .iter()
        .filter(|c| c["what"].as_str().unwrap_or_default().contains("stages"))
        .count();
    assert!(deep >= 9, "{deep} stages checks");
    // the weights by TMA (`--tma`, a 64/128-channel network: no box larger than its tensor):
    // training and inference at the default tile, launch by launch and whole, and the
    // 4-stage 128x128 training launches
    let tma = checks
        .iter()
        .filter(|c| c["what"].as_str().unwrap_or_default().contains("wgmma tma"))
        .count();
    assert!(tma >= 5, "{tma} tma checks");
    // the activations by TMA too (the same 64/128-channel network): its checks above
    let tmaa = checks
        .iter()
        .filter(|c| {
            c["what"]
                .as_str()
                .unwrap_or_default()
                .contains("tmaa wgmma tma")
        })
        .count();
    assert!(tmaa >= 1, "{tmaa} tmaa checks");
    // stages of 64 (`--k64`) on the same network: training and inference at the default
    // tile, launch by launch and whole, and 3 stages of 128x64's training launches
    let k64 = checks
        .iter()
        .filter(|c| c["what"].as_str().unwrap_or_default().contains(" k64 "))
        .count();
    assert!(k64 >= 5, "{k64} k64 checks");
    // f32 convolutions as 3xTF32 (`--tf32x3`): training and inference, launch by launch and
    // whole, two more tiles' training launches and the unfused step, at f32's tolerance
    let x3: Vec<_> = checks
        .iter()
        .filter(|c| c["what"].as_str().unwrap_or_default().contains("tf32x3"))
        .collect();
    assert!(x3.len() >= 5, "{} tf32x3 checks", x3.len());
    assert!(x3.iter().all(|c| c["tol"].as_f64() == Some(1e-4)), "{x3:?}");
    // plain TF32 (`--tf32`): the same checks, each launch against the reference with its
    // operands rounded to TF32 at f32's tolerance, reported apart (`tf32`), f32's figure
    // untouched by them
    let tf32: Vec<_> = checks
        .iter()
        .filter(|c| c["what"].as_str().unwrap_or_default().ends_with(" tf32"))
        .collect();
    assert!(tf32.len() >= 5, "{} tf32 checks", tf32.len());
    assert!(tf32.iter().all(|c| c["passed"] == true), "{tf32:?}");
    assert!(
        v["max_rel_err_vs_cpu"]["tf32"]
            .as_f64()
            .is_some_and(|e| e > 0.0),
        "{v}"
    );
    assert!(
        v["device"]["name"]
            .as_str()
            .unwrap_or_default()
            .contains("fake"),
        "{v}"
    );
    // every whole training step reports its resolution and what it was held to
    let whole_train: Vec<_> = checks
        .iter()
        .filter(|c| {
            let w = c["what"].as_str().unwrap_or_default();
            w.contains(" train ") && !w.contains("every launch")
        })
        .collect();
    assert!(whole_train.len() >= 20, "{} whole steps", whole_train.len());
    for c in whole_train {
        let (noise, held, tol) = (
            c["precision_noise"].as_f64(),
            c["grad_tol"].as_f64(),
            c["tol"].as_f64().unwrap(),
        );
        assert!(noise.is_some() && held.is_some_and(|h| h >= tol), "{c}");
        // a step held to more than 0.25 is reported as unresolved (`--`), and only that one
        let resolved = c["resolved"].as_bool().unwrap();
        assert_eq!(resolved, held.unwrap() <= 0.25, "{c}");
        // the built-in networks are small enough for their f32 steps to be resolved finely
        // (up to 1.9e-3 on the fake GPU; some of their bf16 steps are not)
        if c["what"].as_str().unwrap().ends_with(" f32") {
            assert!(resolved && held.unwrap() < 1e-2, "{c}");
        }
    }
    assert_eq!(
        v["unresolved"].as_u64().unwrap() as usize,
        checks.iter().filter(|c| c["resolved"] == false).count(),
        "{v}"
    );
}

/// The bytes a hex string (the probe dump's) spells.
fn unhex(hex: &str) -> Vec<u8> {
    (0..hex.len() / 2)
        .map(|j| u8::from_str_radix(&hex[2 * j..2 * j + 2], 16).unwrap())
        .collect()
}

/// The layout probes on the fake Hopper: every `wgmma` configuration gives exactly what wrnc's
/// reading of it says, and every TMA box lands where wrnc reads it (the emulation does both
/// so); the dump holds what that was decided on, and the probes tell that reading from wrong
/// ones (no 64-byte swizzle; for wgmma also one XORing one chunk bit only, the 32-byte mode).
#[test]
fn layout_probes_pass_and_tell_readings_apart() {
    use wrnc_runtime::cuda::probe;
    let dir = std::env::temp_dir().join(format!("wrnc-probe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dump = dir.join("probe.json");
    let o = wrnc(
        &[
            "selftest",
            "--quick",
            "--only",
            "vec8 wgmma tile 64x64 infer fused bf16",
            "--json",
            "--probe-dump",
            dump.to_str().unwrap(),
        ],
        &[],
    );
    let v = json(&o);
    for probe in ["wgmma layout probe", "TMA layout probe"] {
        let c = v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["what"].as_str().unwrap().starts_with(probe))
            .unwrap_or_else(|| panic!("no {probe} in {v}"));
        assert_eq!(c["passed"], true, "{c}");
    }
    let d: Value = serde_json::from_str(&std::fs::read_to_string(&dump).unwrap()).unwrap();
    // TMA: every box landed where wrnc reads it, and not where an unswizzled copy would put it
    let tma = d["tma"].as_array().unwrap();
    // three boxes in the 64-byte swizzle, three (64 wide) in the 128-byte one
    assert_eq!(tma.len(), 6);
    for (i, r) in tma.iter().enumerate() {
        let landed = unhex(r["landed"].as_str().unwrap());
        assert_eq!(landed, probe::tma_expected(i), "box {i}");
        assert_ne!(
            landed,
            probe::tma_expected_by(i, |a| a),
            "box {i}: unswizzled"
        );
        if r["swizzle"] == 128 {
            assert_eq!(landed.len(), 2048, "box {i}");
            assert_ne!(
                landed,
                probe::tma_expected_by(i, probe::swizzle64),
                "box {i}: the 64-byte swizzle"
            );
        }
    }
    // the boxes over the edges: zeros where they hang over, elements elsewhere
    for i in [2, 5] {
        let edge = probe::tma_expected(i);
        assert!(edge.iter().any(|&b| b != 0) && edge.chunks(2).any(|c| c == [0, 0]));
    }
    let runs = d["wgmma"].as_array().unwrap();
    // rows of 64 bytes (5 configurations) and of 128 (3: `--k64`'s stages)
    assert_eq!(runs.len(), 8);
    assert_eq!(runs.iter().filter(|r| r["row"] == 128).count(), 3);
    for (i, r) in runs.iter().enumerate() {
        let img = unhex(r["image"].as_str().unwrap());
        assert_eq!(img, probe::image(i));
        let out: Vec<f32> = r["out"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(out, probe::expected(i, &img), "run {i}");
        assert_ne!(
            out,
            probe::expected_by(i, &img, |a| a),
            "run {i}: unswizzled"
        );
        assert_ne!(
            out,
            probe::expected_by(i, &img, |a| a ^ (((a >> 7) & 1) << 4)),
            "run {i}: 32-byte swizzle"
        );
        // and the other of the two swizzles wrnc uses
        let other = if r["row"] == 128 {
            probe::expected_by(i, &img, probe::swizzle64)
        } else {
            probe::expected_by(i, &img, probe::swizzle128)
        };
        assert_ne!(out, other, "run {i}: the other swizzle");
    }
    // scripts/probe_analyze.py names the reading that explains a dump: wrnc's for this one,
    // and "no swizzle" for one whose registers are made as an unswizzled reading gives them
    let analyze = |path: &Path| -> Option<String> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        match Command::new("python3")
            .arg(root.join("scripts/probe_analyze.py"))
            .arg(path)
            .output()
        {
            Ok(o) => {
                assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
                Some(String::from_utf8_lossy(&o.stdout).into_owned())
            }
            Err(e) if std::env::var_os("CI").is_some() => panic!("CI has no python3: {e}"),
            Err(e) => {
                eprintln!("skipping probe_analyze.py: no python3 ({e})");
                None
            }
        }
    };
    if let Some(t) = analyze(&dump) {
        assert_eq!(
            t.matches("A swz64, B swz64, fragments mma").count(),
            5,
            "{t}"
        );
        assert_eq!(
            t.matches("A swz128, B swz128, fragments mma").count(),
            3,
            "{t}"
        );
        assert!(t.contains("every run as wrnc reads it"), "{t}");
        let mut wrong = d.clone();
        for (i, r) in wrong["wgmma"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .enumerate()
        {
            r["out"] = serde_json::json!(probe::expected_by(i, &probe::image(i), |a| a));
        }
        let wrong_path = dir.join("unswizzled.json");
        std::fs::write(&wrong_path, wrong.to_string()).unwrap();
        let t = analyze(&wrong_path).unwrap();
        assert_eq!(t.matches("A none, B none, fragments mma").count(), 8, "{t}");
        assert!(t.contains("8 runs not as wrnc reads them"), "{t}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The examples' path of selftest (without `--quick`): an example network from a folder, shrunk
/// to 8x8, every launch alone and whole steps (each from the same state, held to its measured
/// resolution) in both precisions, train and infer, fused and unfused. (The whole selftest of
/// every example takes hours on the fake GPU; the GPU session runs it.)
#[test]
fn selftest_of_an_example_network_passes_on_the_fake_gpu() {
    let dir = std::env::temp_dir().join(format!("wrnc-fake-examples-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    std::fs::copy(root.join("examples/wrn-10-2.net"), dir.join("wrn-10-2.net")).unwrap();
    let o = wrnc(
        &[
            "selftest",
            "--examples",
            dir.to_str().unwrap(),
            "--only",
            "wrn-10-2",
            "--json",
        ],
        &[],
    );
    let v = json(&o);
    assert_eq!(v["failed"], 0, "{v}");
    assert_eq!(v["errors"].as_array().map(Vec::len), Some(0), "{v}");
    let checks = v["checks"].as_array().unwrap();
    let of_example = checks
        .iter()
        .filter(|c| {
            c["what"]
                .as_str()
                .unwrap_or_default()
                .starts_with("wrn-10-2 ")
        })
        .count();
    // train and infer, fused and unfused, f32 and bf16, every launch and whole
    assert_eq!(of_example, 16, "{v}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn gpu_training_matches_the_cpu_and_checkpoints_move_between_backends() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_cifar10(&data, 8);
    let net = tmp.path().join("tiny.net");
    std::fs::write(&net, TINY).unwrap();
    let (net, data) = (net.to_str().unwrap(), data.to_str().unwrap());
    let drop_net = tmp.path().join("drop.net");
    std::fs::write(
        &drop_net,
        TINY.replace("relu conv", "relu dropout(0.3) conv"),
    )
    .unwrap();
    let drop_net = drop_net.to_str().unwrap();
    let run_net = |net: &str, device: &str, ck: &str, extra: &[&str], env: &[(&str, &str)]| {
        let ck = tmp.path().join(ck);
        let mut a = vec![
            "run",
            net,
            "--train",
            "cifar10",
            "--data",
            data,
            "--device",
            device,
            "--checkpoint",
            ck.to_str().unwrap(),
            "--quiet",
        ];
        a.extend_from_slice(extra);
        wrnc(&a, env)
    };
    let run_raw = |device: &str, ck: &str, extra: &[&str]| run_net(net, device, ck, extra, &[]);
    let run = |device: &str, ck: &str, extra: &[&str]| {
        let mut e = vec!["--json"];
        e.extend_from_slice(extra);
        json(&run_raw(device, ck, &e))
    };
    // Two epochs of 5 steps with augmentation, on each backend; on the GPU each step is one
    // CUDA graph (forward, backward and update), captured once and replayed.
    let counts = tmp.path().join("counts");
    let counts_env = [("WRNC_FAKE_STATS", counts.to_str().unwrap())];
    let g = json(&run_net(
        net,
        "cuda",
        "g",
        &["--json", "--epochs", "2"],
        &counts_env,
    ));
    assert_eq!(
        stats(&counts),
        (1, 10),
        "(captures, graph launches) of 10 steps"
    );
    let c = run("cpu", "c", &["--epochs", "2"]);
    assert_eq!(g["device"], "cuda");
    // the summary says how the f32 convolutions computed (the FMA engine by default; none on
    // the CPU backend)
    assert_eq!(g["f32_convolutions"], "fma", "{g}");
    assert!(c["f32_convolutions"].is_null(), "{c}");
    for (eg, ec) in g["epochs"]
        .as_array()
        .unwrap()
        .iter()
        .zip(c["epochs"].as_array().unwrap())
    {
        for k in ["train_loss", "test_loss", "train_acc", "test_acc"] {
            let (a, b) = (eg[k].as_f64().unwrap(), ec[k].as_f64().unwrap());
            assert!(close(a, b, 1e-5), "{k}: gpu {a} cpu {b}");
        }
    }
    // 3 steps on the GPU, then resumed on the CPU: the same end as the CPU-only run.
    run("cuda", "x", &["--epochs", "2", "--max-steps", "3"]);
    let r = run("cpu", "x", &["--epochs", "2", "--resume"]);
    let last_loss = |v: &Value| {
        v["epochs"].as_array().unwrap().last().unwrap()["test_loss"]
            .as_f64()
            .unwrap()
    };
    let (a, b) = (last_loss(&r), last_loss(&c));
    assert!(close(a, b, 1e-5), "resumed on cpu {a}, cpu-only {b}");
    // A NaN on the GPU stops training and keeps the last good checkpoint as it was: the
    // checkpoint's classifier weights set to 3e38, so the logits overflow (a learning rate
    // that diverges is refused up front now: --lr is at most 100)
    let last = tmp.path().join("g/last.safetensors");
    let mut ck = wrnc_runtime::checkpoint::load(&last).unwrap();
    let fc = ck
        .tensors
        .iter_mut()
        .filter(|(n, t)| n.ends_with(".weight") && t.shape.len() == 2)
        .map(|(_, t)| t)
        .next()
        .expect("a linear layer's weight");
    fc.data.iter_mut().for_each(|w| *w = 3e38);
    wrnc_runtime::checkpoint::save(&tmp.path().join("g"), &ck).unwrap();
    let before = std::fs::read(&last).unwrap();
    let o = run_raw("cuda", "g", &["--resume", "--epochs", "3"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("NaN") && err.contains("last good checkpoint"),
        "{err}"
    );
    assert!(
        std::fs::read(&last).unwrap() == before,
        "the checkpoint changed"
    );
    // With dropout the masks follow the step, which replayed graphs read from the device:
    // the GPU (graphs), the GPU without graphs, and the CPU agree.
    let e = ["--epochs", "1", "--json"];
    let dg = json(&run_net(drop_net, "cuda", "dg", &e, &[]));
    let ds = json(&run_net(
        drop_net,
        "cuda",
        "ds",
        &e,
        &[("WRNC_NO_GRAPHS", "1"), counts_env[0]],
    ));
    assert_eq!(
        stats(&counts),
        (0, 0),
        "WRNC_NO_GRAPHS=1 launches on the stream"
    );
    let dc = json(&run_net(drop_net, "cpu", "dc", &e, &[]));
    for k in ["train_loss", "test_loss"] {
        let (a, b, c) = (
            dg["epochs"][0][k].as_f64().unwrap(),
            dc["epochs"][0][k].as_f64().unwrap(),
            ds["epochs"][0][k].as_f64().unwrap(),
        );
        assert!(
            close(a, b, 1e-5) && close(c, b, 1e-5),
            "{k}: graphs {a} cpu {b} stream {c}"
        );
    }
    // 40 images in batches of 6: the epoch's last step (4 images) has its own schedule and
    // graph; GPU and CPU still agree.
    let e = ["--epochs", "1", "--batch-size", "6", "--json"];
    let tg = json(&run_net(net, "cuda", "tg", &e, &counts_env));
    assert_eq!(
        stats(&counts),
        (2, 7),
        "(captures, graph launches) of 6 + 1 steps"
    );
    let tc = json(&run_net(net, "cpu", "tc", &e, &[]));
    for k in ["train_loss", "test_loss"] {
        let (a, b) = (
            tg["epochs"][0][k].as_f64().unwrap(),
            tc["epochs"][0][k].as_f64().unwrap(),
        );
        assert!(close(a, b, 1e-5), "{k}: gpu {a} cpu {b} (batch 6)");
    }
    // bf16 (tensor cores, NHWC) trains too, with finite losses. `--tiles default`: the search
    // (`--tiles auto`, the default) is `tensor_core_tiles_are_searched_once_and_cached`'s, and
    // costs minutes in the emulation.
    let h = run(
        "cuda",
        "h",
        &["--epochs", "1", "--precision", "bf16", "--tiles", "default"],
    );
    // it reports its tensor-core tiles (f32 has none)
    assert_eq!(h["tiles"]["mode"], "default", "{h}");
    assert_eq!(h["tiles"]["searched"], 0, "{h}");
    assert_eq!(h["layout"], "nhwc", "{h}");
    assert!(h["tiles"]["gemms"].as_u64().is_some_and(|n| n > 0), "{h}");
    assert!(g["tiles"].is_null(), "{g}");
    let l = h["epochs"][0]["train_loss"].as_f64().unwrap();
    assert!(l.is_finite() && (l - c["epochs"][0]["train_loss"].as_f64().unwrap()).abs() < 0.05);
}

#[test]
fn bench_reports_fused_unfused_and_graph_timings() {
    let tmp = tempfile::tempdir().unwrap();
    let net = tmp.path().join("tiny.net");
    std::fs::write(&net, TINY).unwrap();
    let bench = |extra: &[&str]| {
        let mut a = vec!["bench", net.to_str().unwrap(), "--batch", "4", "--json"];
        a.extend_from_slice(extra);
        json(&wrnc(&a, &[]))
    };
    let v = bench(&["--warmup", "1", "--iters", "2"]);
    for k in ["train_step_ms", "infer_ms", "latency_b1_ms", "peak_mem_mb"] {
        for f in ["fused", "unfused"] {
            assert!(v[k][f].as_f64().is_some_and(|x| x > 0.0), "{k}.{f}: {v}");
        }
    }
    // Every run was also replayed as a captured CUDA graph.
    for r in v["runs"].as_array().unwrap() {
        assert!(r["graph"]["median_ms"].as_f64().is_some(), "{r}");
    }
    // What fusion removed: the two training steps' DRAM bytes (the compiler's estimate, the
    // fused one smaller), the step times' ratio and the time between them
    let f = &v["fusion"];
    let (bf, bu) = (
        f["dram_bytes"]["fused"].as_u64().unwrap(),
        f["dram_bytes"]["unfused"].as_u64().unwrap(),
    );
    assert!(0 < bf && bf < bu, "{f}");
    let (tf, tu) = (
        v["train_step_ms"]["fused"].as_f64().unwrap(),
        v["train_step_ms"]["unfused"].as_f64().unwrap(),
    );
    assert!(close(f["speedup"].as_f64().unwrap(), tu / tf, 1e-9), "{f}");
    assert!(close(f["saved_ms"].as_f64().unwrap(), tu - tf, 1e-9), "{f}");
    // A second start finds the compiled module in the on-disk cache, and is quick.
    let again = bench(&[
        "--warmup",
        "0",
        "--iters",
        "1",
        "--fused-only",
        "--no-infer",
    ]);
    let r = &again["runs"][0];
    assert_eq!(r["cache_hit"], true, "{r}");
    assert!(r["setup_s"].as_f64().unwrap() < 1.0, "{r}");
    // --no-train: inference only (a large batch's throughput), batch-1 latency included
    let infer = bench(&[
        "--warmup",
        "0",
        "--iters",
        "1",
        "--fused-only",
        "--no-train",
    ]);
    assert!(infer["train_step_ms"]["fused"].is_null(), "{infer}");
    assert!(infer["fusion"].is_null(), "{infer}");
    for k in ["infer_ms", "latency_b1_ms"] {
        assert!(
            infer[k]["fused"].as_f64().is_some_and(|x| x > 0.0),
            "{k}: {infer}"
        );
    }
}

/// Tensor-core tiles chosen on the device: the first bf16 start times every GEMM with every
/// candidate tile and caches the choice per GPU; the second finds all of them in the cache and
/// searches nothing; `--tiles 128x64` forces one tile; a tile that does not exist is refused.
#[test]
fn tensor_core_tiles_are_searched_once_and_cached() {
    let tmp = tempfile::tempdir().unwrap();
    let net = tmp.path().join("tiny.net");
    std::fs::write(&net, TINY).unwrap();
    let cache = tmp.path().join("cache");
    let env = [("WRNC_CACHE_DIR", cache.to_str().unwrap())];
    let bench = |tiles: &str| {
        let a = [
            "bench",
            net.to_str().unwrap(),
            "--batch",
            "4",
            "--precision",
            "bf16",
            "--fused-only",
            "--no-infer",
            "--warmup",
            "0",
            "--iters",
            "1",
            "--tiles",
            tiles,
            "--json",
        ];
        json(&wrnc(&a, &env))["tiles"].clone()
    };
    let first = bench("auto");
    let gemms = first["gemms"].as_u64().unwrap();
    // the tiny network's 2 convs: forward, data gradient (not of the stem) and weight gradient
    assert!(gemms >= 4, "{first}");
    assert_eq!(first["searched"].as_u64(), Some(gemms), "{first}");
    let file = cache
        .join("tiles")
        .read_dir()
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let entries: serde_json::Map<String, Value> =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(entries.len() as u64, gemms);
    for (k, e) in &entries {
        assert_eq!(
            e["us"].as_object().unwrap().len(),
            wrnc_compiler::schedule::TcTile::CANDIDATES.len(),
            "{k}: every candidate timed: {e}"
        );
        assert_eq!(
            first["tiles"][k], e["tile"],
            "{k}: the run uses the cached choice"
        );
    }
    let second = bench("auto");
    assert_eq!(second["searched"], 0, "{second}");
    assert_eq!(second["tiles"], first["tiles"]);
    let fixed = bench("128x64");
    assert_eq!(fixed["mode"], "128x64");
    assert!(fixed["tiles"]
        .as_object()
        .unwrap()
        .values()
        .all(|t| t == "128x64"));
    let o = wrnc(&["bench", net.to_str().unwrap(), "--tiles", "100x7"], &env);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("use auto, default or one of"),
        "{err}"
    );
}

/// Deep pipelines (`--stages`) on the fake GPU, which refuses a launch with more than 48 KiB
/// of dynamic shared memory unless its kernel opted in (`cuFuncSetAttribute`), as a GPU does:
/// the runtime opts every such kernel in, the run completes and its JSON says how many
/// stages; a GPU that allows a block less shared memory than a kernel needs is refused before
/// any launch, naming the kernel and what to do.
#[test]
fn deep_pipelines_opt_in_to_dynamic_shared_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let net = tmp.path().join("v8.net");
    std::fs::write(&net, V8_NET).unwrap();
    let cache = tmp.path().join("cache");
    let bench = |optin: &str, tiles: &str| {
        let a = [
            "bench",
            net.to_str().unwrap(),
            "--batch",
            "4",
            "--precision",
            "bf16",
            "--fused-only",
            "--warmup",
            "0",
            "--iters",
            "1",
            "--tiles",
            tiles,
            "--stages",
            "4",
            "--json",
        ];
        let mut env = vec![("WRNC_CACHE_DIR", cache.to_str().unwrap())];
        if !optin.is_empty() {
            env.push(("WRNC_FAKE_SMEM_OPTIN", optin));
        }
        wrnc(&a, &env)
    };
    let v = json(&bench("", "128x128"));
    assert_eq!(v["stages"], 4, "{v}");
    assert!(
        v["train_step_ms"]["fused"]
            .as_f64()
            .is_some_and(|x| x > 0.0),
        "{v}"
    );
    assert!(
        v["infer_ms"]["fused"].as_f64().is_some_and(|x| x > 0.0),
        "{v}"
    );
    // 4 stages of 128x128 take 80 KiB; a GPU allowing 64 KiB per block cannot run them
    let o = bench("65536", "128x128");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("_s4") && err.contains("65536 bytes") && err.contains("use fewer --stages"),
        "{err}"
    );
    // the tile search on that GPU times only the candidates that fit (not 128x128's 80 KiB)
    let v = json(&bench("65536", "auto"));
    let tiles = v["tiles"]["tiles"].as_object().unwrap();
    assert!(!tiles.is_empty(), "{v}");
    assert!(tiles.values().all(|t| t != "128x128"), "{v}");
    let file = cache
        .join("tiles")
        .read_dir()
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert!(
        file.to_string_lossy().ends_with("-s4.json"),
        "{}",
        file.display()
    );
    let entries: serde_json::Map<String, Value> =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    for (k, e) in &entries {
        let us = e["us"].as_object().unwrap();
        assert!(
            us.contains_key("64x64") && !us.contains_key("128x128"),
            "{k}: {e}"
        );
    }
}

#[test]
fn out_of_device_memory_names_the_batch_and_the_need() {
    let o = wrnc(
        &[
            "bench", "WRN-16-4", "--batch", "64", "--iters", "1", "--json",
        ],
        &[("WRNC_FAKE_MEM_MB", "64")],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("out of device memory") && err.contains("batch 64"),
        "{err}"
    );
}

/// Negative control: the fake catches a kernel writing one float past its allocation, as
/// a GPU's memory checker would, and the runtime reports the failing kernel.
#[test]
fn fake_driver_catches_a_write_past_an_allocation() {
    use wrnc_runtime::cuda::{device::Gpu, exec::load_source, layout::ArgValue};
    fake();
    let gpu = Gpu::open(0).expect("the fake GPU opens");
    let cache = wrnc_runtime::cuda::cache::ModuleCache::new(None);
    let src = "extern \"C\" __global__ void fill(float* __restrict__ y, int n) {\n    int i = threadIdx.x;\n    if (i <= n) y[i] = 1.0f;\n}\n";
    let m = load_source(&gpu, &cache, src, &["fill".to_string()]).expect("module loads");
    let buf = gpu.alloc(5 * 4, "y", 1).unwrap();
    let launch = |n: i32| {
        gpu.launch(
            &m,
            0,
            [1, 1, 1],
            [32, 1, 1],
            0,
            &[ArgValue::Ptr(buf.ptr()), ArgValue::I32(n)],
            "fill",
            "test",
        )
        .and_then(|_| gpu.synchronize("test"))
    };
    launch(4).expect("y[0..=4] stays inside 5 floats");
    let mut out = vec![0u8; 20];
    gpu.download(buf.ptr(), &mut out).unwrap();
    assert!(out.chunks(4).all(|c| c == 1f32.to_le_bytes()));
    let err = launch(5).expect_err("y[5] is past the end");
    // the fake reports at the launch (a GPU at the next synchronisation, where
    // WRNC_CUDA_SYNC=1 makes wrnc name the kernel too)
    let e = err.to_string();
    assert!(
        e.contains("ILLEGAL_ADDRESS") && e.contains("kernel fill"),
        "{e}"
    );
    // and, as on a GPU, the context stays unusable (selftest stops at such an error)
    assert!(err.poisons_context(), "{e}");
    let again = match gpu.alloc(4, "z", 1) {
        Ok(_) => panic!("a poisoned context allocates nothing"),
        Err(e) => e.to_string(),
    };
    assert!(again.contains("ILLEGAL_ADDRESS"), "{again}");
}

/// Without `--device`, `wrnc run` takes the GPU when one is usable and says so; with no driver
/// it falls back to the CPU and says why.
#[test]
fn without_device_a_usable_gpu_is_chosen_and_named() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_cifar10(&data, 8);
    let net = tmp.path().join("tiny.net");
    std::fs::write(&net, TINY).unwrap();
    let args = [
        "run",
        net.to_str().unwrap(),
        "--train",
        "cifar10",
        "--data",
        data.to_str().unwrap(),
        "--epochs",
        "1",
        "--max-steps",
        "1",
    ];
    // (--json keeps stderr quiet; the summary's `device` says it there)
    let o = wrnc(&args, &[]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("device: cuda (wrnc fake GPU (CPU emulation), sm_90)"),
        "{err}"
    );
    let o = wrnc(&args, &[("WRNC_LIBCUDA", "/nonexistent/libcuda.so.1")]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{err}");
    assert!(err.contains("device: cpu (no usable GPU"), "{err}");
}

/// A BN whose gradient reaches it through a 1x1 convolution from another BN in training mode
/// has a `dbeta` of exactly 0 in exact arithmetic (the second BN's input gradient sums to 0
/// per channel, and a 1x1 convolution without padding keeps per-channel sums), so the fused
/// data-gradient kernel's `sums.dbeta` is rounding noise on both sides: the launch check
/// compares it relative to the magnitudes it sums (`reference::SUM_L1`), not to itself
/// (before: `FAIL ... sums.dbeta 2.48e-1`; pyramidnet-272-200-bottleneck's bottlenecks, 6.67).
#[test]
fn selftest_holds_cancelling_sums_to_the_size_of_their_terms() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("cancel.net"),
        "network \"cancel\" { input 3x8x8 classes 10 conv(3x3, 8) bn conv(1x1, 8) bn relu gap fc }",
    )
    .unwrap();
    let o = wrnc(
        &[
            "selftest",
            "--examples",
            tmp.path().to_str().unwrap(),
            "--only",
            "cancel train fused every launch f32",
            "--json",
        ],
        &[],
    );
    let v = json(&o);
    assert_eq!(v["failed"], 0, "{v}");
    let c = &v["checks"].as_array().unwrap()[0];
    assert!(c["max_rel_err"].as_f64().unwrap() < 1e-5, "{c}");
}

/// A one-iteration fused `wrnc bench --json` of `net` (written into `dir`) at the default
/// tile, with `extra` flags: its JSON on success, else the exit code and stderr.
fn bench_once(
    dir: &Path,
    net: &str,
    precision: &str,
    extra: &[&str],
) -> Result<Value, (Option<i32>, String)> {
    let file = dir.join("net.net");
    std::fs::write(&file, net).unwrap();
    let cache = dir.join("cache");
    let mut args = vec![
        "bench",
        file.to_str().unwrap(),
        "--batch",
        "4",
        "--precision",
        precision,
        "--fused-only",
        "--warmup",
        "0",
        "--iters",
        "1",
        "--tiles",
        "default",
        "--json",
    ];
    args.extend_from_slice(extra);
    let o = wrnc(&args, &[("WRNC_CACHE_DIR", cache.to_str().unwrap())]);
    if o.status.success() {
        Ok(json(&o))
    } else {
        Err((
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        ))
    }
}

/// `wrnc bench --tf32x3` (f32 on the tensor cores) on the fake GPU: the JSON says so and the
/// step runs; with bf16 it is refused. `--tf32` (plain TF32) runs too.
#[test]
fn tf32x3_bench_runs_on_the_fake_gpu() {
    let tmp = tempfile::tempdir().unwrap();
    let flags = ["--no-infer", "--tf32x3"];
    let v = bench_once(tmp.path(), TINY, "f32", &flags).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(v["tf32x3"], true, "{v}");
    assert_eq!(v["precision"], "f32", "{v}");
    assert!(
        v["train_step_ms"]["fused"]
            .as_f64()
            .is_some_and(|x| x > 0.0),
        "{v}"
    );
    assert!(
        v["tiles"]["tiles"]
            .as_object()
            .is_some_and(|t| !t.is_empty() && t.keys().all(|k| k.contains("_x3"))),
        "{v}"
    );
    let (code, err) = bench_once(tmp.path(), TINY, "bf16", &flags).unwrap_err();
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--tf32x3"), "{err}");
    // plain TF32 (`--tf32`) likewise
    let v = bench_once(tmp.path(), TINY, "f32", &["--no-infer", "--tf32"])
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(v["tf32"], true, "{v}");
    assert!(
        v["tiles"]["tiles"]
            .as_object()
            .is_some_and(|t| !t.is_empty() && t.keys().all(|k| k.contains("_tf32"))),
        "{v}"
    );
    // and on the fake Hopper's warpgroup MMA (`--tf32 --wgmma`, an sm_90a module whose `_v8`
    // passes, the weight gradient's included, are wgmma: `codegen_emu` checks which), NHWC;
    // 3xTF32 with --wgmma is refused
    let v = bench_once(
        tmp.path(),
        V8_NET,
        "f32",
        &["--no-infer", "--tf32", "--wgmma"],
    )
    .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(
        (v["tf32"].clone(), v["wgmma"].clone()),
        (true.into(), true.into()),
        "{v}"
    );
    assert_eq!(v["layout"], "nhwc", "{v}");
    assert!(
        v["train_step_ms"]["fused"]
            .as_f64()
            .is_some_and(|x| x > 0.0),
        "{v}"
    );
    let (code, err) = bench_once(
        tmp.path(),
        V8_NET,
        "f32",
        &["--no-infer", "--tf32x3", "--wgmma"],
    )
    .unwrap_err();
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("3xTF32 stays on mma.sync"), "{err}");
}

/// `wrnc bench --tma` on the fake Hopper: the runtime encodes each TMA launch's tensor map with
/// `cuTensorMapEncodeTiled` (the fake driver refuses one not 64-byte aligned, not over one live
/// allocation, or with a box TMA cannot move), captures the step as a graph with the maps
/// in the launch arguments, and the JSON says which engine ran; `--tma` implies `--wgmma`, and
/// with f32 it is refused.
#[test]
fn tma_bench_runs_on_the_fake_hopper() {
    let tmp = tempfile::tempdir().unwrap();
    let v =
        bench_once(tmp.path(), WIDE_NET, "bf16", &["--tma"]).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(v["tma"], true, "{v}");
    assert_eq!(v["wgmma"], true, "{v}");
    // the 64-channel convs take tensor maps (no box larger than its tensor)
    for r in v["runs"].as_array().unwrap() {
        assert!(r["tma_launches"].as_u64().unwrap() >= 2, "{r}");
    }
    // and a network of 8 and 16 channels none: every box would be larger than its tensor
    let v = bench_once(tmp.path(), V8_NET, "bf16", &["--tma"]).unwrap_or_else(|e| panic!("{e:?}"));
    for r in v["runs"].as_array().unwrap() {
        assert_eq!(r["tma_launches"], 0, "{r}");
    }
    for part in ["train_step_ms", "infer_ms"] {
        assert!(
            v[part]["fused"].as_f64().is_some_and(|x| x > 0.0),
            "{part}: {v}"
        );
    }
    let (code, err) = bench_once(tmp.path(), V8_NET, "f32", &["--tma"]).unwrap_err();
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--tma"), "{err}");
}

/// `wrnc bench --k64` (stages of 64 reduction indices on wgmma, implying `--wgmma`) runs on
/// the fake Hopper with and without `--tma`, its rings in dynamic shared memory, with 64-wide
/// boxes in the 128-byte swizzle (the fake driver refuses a box whose row is not the
/// swizzle's), and the JSON says so; with f32 it is refused.
#[test]
fn k64_bench_runs_on_the_fake_hopper() {
    let tmp = tempfile::tempdir().unwrap();
    for extra in [&["--k64"][..], &["--k64", "--tma"][..]] {
        let v = bench_once(tmp.path(), WIDE_NET, "bf16", extra).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(
            (&v["k64"], &v["wgmma"]),
            (&Value::Bool(true), &Value::Bool(true)),
            "{v}"
        );
        for part in ["train_step_ms", "infer_ms"] {
            assert!(
                v[part]["fused"].as_f64().is_some_and(|x| x > 0.0),
                "{extra:?} {part}: {v}"
            );
        }
        if extra.contains(&"--tma") {
            for r in v["runs"].as_array().unwrap() {
                assert!(r["tma_launches"].as_u64().unwrap() >= 2, "{r}");
            }
        }
    }
    let (code, err) = bench_once(tmp.path(), V8_NET, "f32", &["--k64"]).unwrap_err();
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--k64"), "{err}");
}

/// `wrnc bench --dense-dgrad` (the strided data gradients over every tap, the baseline of
/// phase order) runs on the fake GPU beside the default, and the JSON says which it was.
#[test]
fn dense_dgrad_bench_runs_on_the_fake_gpu() {
    let tmp = tempfile::tempdir().unwrap();
    for (precision, dense) in [("bf16", false), ("bf16", true), ("f32", true)] {
        let extra: &[&str] = if dense {
            &["--dense-dgrad", "--no-infer"]
        } else {
            &["--no-infer"]
        };
        let v =
            bench_once(tmp.path(), V8_NET, precision, extra).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(v["dense_dgrad"], dense, "{v}");
        assert!(
            v["train_step_ms"]["fused"]
                .as_f64()
                .is_some_and(|x| x > 0.0),
            "{precision} {dense}: {v}"
        );
    }
}

/// `wrnc bench --profile`: every launch of the step timed where it runs, summed per kernel.
/// The kernels' launches add up to the step's, their times to the profile's step (and their
/// shares to 1); exactly the conv and linear kernels have a GEMM rate; the GEMM time is theirs.
#[test]
fn bench_profile_times_every_launch() {
    let tmp = tempfile::tempdir().unwrap();
    let v = bench_once(tmp.path(), V8_NET, "f32", &["--no-infer", "--profile"])
        .unwrap_or_else(|e| panic!("{e:?}"));
    let r = &v["runs"][0];
    let p = &r["profile"];
    let ks = p["kernels"].as_array().unwrap_or_else(|| panic!("{r}"));
    let launches: u64 = ks.iter().map(|k| k["launches"].as_u64().unwrap()).sum();
    assert_eq!(launches, r["launches"].as_u64().unwrap(), "{p}");
    let f = |k: &Value, key: &str| k[key].as_f64().unwrap_or_else(|| panic!("{key}: {k}"));
    let sum: f64 = ks.iter().map(|k| f(k, "ms")).sum();
    let share: f64 = ks.iter().map(|k| f(k, "share")).sum();
    assert!(
        close(sum, f(p, "step_ms"), 1e-9) && close(share, 1.0, 1e-9),
        "{p}"
    );
    let mut gemm = 0.0;
    for k in ks {
        let name = k["kernel"].as_str().unwrap();
        let is_gemm = name.starts_with("conv_") || name.starts_with("linear_");
        assert_eq!(k["tflops"].is_number(), is_gemm, "{k}");
        if is_gemm {
            gemm += f(k, "ms");
        }
    }
    assert!(close(gemm, f(p, "gemm_ms"), 1e-9), "{p}");
    assert!(p["gemm_tflops"].as_f64().is_some_and(|t| t > 0.0), "{p}");
    // the profile's GEMM work is the run's, and the step's TFLOP/s are that work over the
    // step's time: 2 per useful multiply-add (3 GEMMs per conv but the stem's data gradient)
    let macs = r["gemm_macs"].as_f64().unwrap();
    assert!(
        close(
            f(p, "gemm_tflops") * f(p, "gemm_ms") * 1e9,
            2.0 * macs,
            1e-9
        ),
        "{p}"
    );
    let step = v["train_step_ms"]["fused"].as_f64().unwrap();
    let tf = v["train_tflops"]["fused"].as_f64().unwrap();
    assert!(close(tf * step * 1e9, 2.0 * macs, 1e-9), "{v}");
    let per_image = v["macs_per_image"].as_f64().unwrap();
    // (batch 4; this network's 3-channel stem is 16% of a forward pass: 799296 of 854592)
    assert_eq!(
        macs,
        3.0 * 4.0 * per_image - 4.0 * (8 * 8 * 9 * 3 * 8) as f64
    );
    // sorted, most time first
    assert!(
        ks.windows(2).all(|w| f(&w[0], "ms") >= f(&w[1], "ms")),
        "{p}"
    );
    // without --profile, none
    let v = bench_once(tmp.path(), V8_NET, "f32", &["--no-infer"]).unwrap();
    assert!(v["runs"][0].get("profile").is_none(), "{v}");
}

/// `wrnc precompile` compiles, without a GPU, exactly the modules that `bench`, `selftest` and
/// `run` then load: after it, each command with the same flags finds every module in the
/// cache, so it adds no entry (a module it compiled itself would be a new one). The fake's
/// NVRTC reports NVRTC's version as the real one does, and the cache keys only the source,
/// the architecture and that version, so this is the match the GPU machine relies on.
#[test]
fn precompiled_modules_are_the_ones_the_commands_load() {
    let tmp = tempfile::tempdir().unwrap();
    let net = tmp.path().join("v8.net");
    std::fs::write(&net, V8_NET).unwrap();
    let net = net.to_str().unwrap();
    let tiny = tmp.path().join("tiny.net");
    std::fs::write(&tiny, TINY).unwrap();
    let tiny = tiny.to_str().unwrap();
    let data = tmp.path().join("data");
    write_cifar10(&data, 2);
    let data = data.to_str().unwrap();
    let cache = tmp.path().join("cache");
    let env = [("WRNC_CACHE_DIR", cache.to_str().unwrap())];
    let entries = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(cache.join("cubin"))
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    let bench = [
        "bench",
        net,
        "--batch",
        "2",
        "--precision",
        "bf16",
        "--wgmma",
        "--tiles",
        "default",
        "--warmup",
        "0",
        "--iters",
        "1",
        "--json",
    ];
    let selftest = ["selftest", "--quick", "--only", "vec8 wgmma", "--json"];
    let run = [
        "run",
        tiny,
        "--train",
        "cifar10",
        "--data",
        data,
        "--subset",
        "10",
        "--batch-size",
        "4",
        "--epochs",
        "1",
        "--device",
        "cuda",
        "--quiet",
    ];
    let mut before = 0;
    let mut modules = vec![];
    for cmd in [&bench[..], &selftest[..], &run[..]] {
        let mut a = vec!["precompile"];
        a.extend_from_slice(cmd);
        if !a.contains(&"--json") {
            a.push("--json");
        }
        let p = json(&wrnc(&a, &env));
        let n = p["modules"].as_u64().unwrap() as usize;
        assert!(n >= 2, "{p}");
        modules.push(n);
        assert_eq!(
            p["compiled"].as_u64(),
            Some(n as u64 - p["cached"].as_u64().unwrap()),
            "{p}"
        );
        let filled = entries();
        assert!(filled.len() > before, "{} {filled:?}", cmd[0]);
        before = filled.len();
        ok(&wrnc(cmd, &env));
        assert_eq!(
            entries(),
            filled,
            "`{}` compiled a module precompile did not",
            cmd[0]
        );
    }
    // the bench's wgmma modules are keyed for sm_90a, the rest for sm_90
    let all = entries();
    // an entry the driver refuses (here: a whole ELF header for EM_CUDA and garbage, as a
    // CUBIN from another toolkit might be) is said, compiled again and replaced; the command
    // still succeeds
    let mut refused = vec![0u8; 64];
    refused[..4].copy_from_slice(b"\x7fELF");
    refused[4] = 2;
    refused[5] = 1;
    refused[18] = 190;
    refused.extend_from_slice(b"not a module");
    for e in &all {
        std::fs::write(cache.join("cubin").join(e), &refused).unwrap();
    }
    let o = wrnc(&bench, &env);
    ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("did not load") && err.contains("compiling it again"),
        "{err}"
    );
    assert_eq!(entries(), all);
    let bench_modules = all
        .iter()
        .filter(|e| std::fs::read(cache.join("cubin").join(e.as_str())).unwrap() != refused)
        .count();
    assert_eq!(
        bench_modules, modules[0],
        "the bench's modules are rewritten"
    );
    assert!(all.iter().any(|e| e.contains("-sm_90a-")), "{all:?}");
    assert!(all.iter().any(|e| e.contains("-sm_90-")), "{all:?}");
    // the cache holds them as CUBINs (the fake's: a bare ELF header, then its source)
    for e in &all {
        let b = std::fs::read(cache.join("cubin").join(e)).unwrap();
        assert!(wrnc_runtime::nvrtc::is_cubin(&b), "{e}");
    }
}
