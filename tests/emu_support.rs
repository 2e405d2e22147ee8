//! Shared by the emulation tests (`#[path = "emu_support.rs"] mod support;`): compile host C++
//! against `emu/cuda_emu.h` with g++ and run it. No tests of its own.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The flags every emulated program is compiled with (and its precompiled header).
const CXX_FLAGS: [&str; 4] = ["-O1", "-std=c++20", "-pthread", "-w"];

/// A directory, searched before `emu/`, holding `emu_all.h.gch`: `emu/emu_all.h` precompiled
/// with [`CXX_FLAGS`], which saves each compile the parsing of the emulation headers. One per
/// version of the headers (its name hashes them), shared by test processes and runs, built
/// atomically. When g++ cannot build it, or finds it invalid, the text header is used.
fn pch_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        CXX_FLAGS.hash(&mut h);
        for f in [
            "emu_all.h",
            "cuda_emu.h",
            "cuda_emu_mma.h",
            "cuda_emu_tma.h",
        ] {
            std::fs::read(root().join("emu").join(f))
                .unwrap_or_default()
                .hash(&mut h);
        }
        let d = std::env::temp_dir().join(format!("wrnc-emu-pch-{:016x}", h.finish()));
        let gch = d.join("emu_all.h.gch");
        if !gch.exists() {
            let _ = std::fs::create_dir_all(&d);
            let tmp = d.join(format!("tmp.{}.gch", std::process::id()));
            let built = Command::new("g++")
                .args(CXX_FLAGS)
                .args(["-x", "c++-header"])
                .arg(root().join("emu/emu_all.h"))
                .arg("-o")
                .arg(&tmp)
                .output()
                .is_ok_and(|o| o.status.success());
            if built {
                let _ = std::fs::rename(&tmp, &gch);
            }
            let _ = std::fs::remove_file(&tmp);
        }
        d
    })
}

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fresh temporary directory, unique per test name and process.
pub fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("wrnc-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Compiles `main` (a .cpp in `dir`) with `g++ -O1 -std=c++20 -pthread -I emu -I dir` (and the
/// precompiled `emu_all.h`, [`pch_dir`]) into `dir/prog`. Panics with a clear message when g++
/// is missing or compilation fails.
pub fn compile(dir: &Path, main: &str) -> PathBuf {
    let out = dir.join("prog");
    let r = Command::new("g++")
        .args(CXX_FLAGS)
        .arg("-I")
        .arg(pch_dir())
        .arg("-I")
        .arg(root().join("emu"))
        .arg("-I")
        .arg(dir)
        .arg(dir.join(main))
        .arg("-o")
        .arg(&out)
        .output();
    let r = match r {
        Ok(r) => r,
        Err(e) => panic!(
            "g++ is required by the CUDA emulation tests and could not be run ({e}); install it \
             (Debian/Ubuntu: apt-get install g++)"
        ),
    };
    assert!(
        r.status.success(),
        "g++ failed on {}:\n{}",
        dir.join(main).display(),
        String::from_utf8_lossy(&r.stderr)
    );
    out
}

/// Runs a compiled program with arguments; returns stdout; panics on failure.
pub fn run(prog: &Path, args: &[&str]) -> String {
    let r = Command::new(prog)
        .args(args)
        .output()
        .expect("run emulated program");
    assert!(
        r.status.success(),
        "{} failed ({}):\n{}\n{}",
        prog.display(),
        r.status,
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr)
    );
    String::from_utf8_lossy(&r.stdout).into_owned()
}

/// Host-side values a step needs (the driver's `hyper.txt`).
#[derive(Debug, Clone, Copy)]
pub struct Hyper {
    pub seed: u32,
    pub step: u32,
    pub lr: f32,
    pub momentum: f32,
    pub weight_decay: f32,
    pub nesterov: bool,
    pub smoothing: f32,
}

/// Writes the schedule's CUDA and driver into a fresh directory, compiles them against the
/// emulation, loads `inputs` (buffer name -> raw bytes), runs the setup and step launches and
/// returns every buffer's final bytes by name.
pub fn run_schedule(
    name: &str,
    s: &wrnc_compiler::schedule::Schedule,
    inputs: &[(String, Vec<u8>)],
    hyper: Hyper,
) -> BTreeMap<String, Vec<u8>> {
    run_schedule_traced(name, s, inputs, hyper, false).0
}

/// Every buffer a launch wrote, right after it: `(launch index, buffer name) -> bytes`, launch
/// indices counting the setup launches first (the driver's `trace` mode).
pub type Trace = BTreeMap<(usize, String), Vec<u8>>;

/// [`run_schedule`], and with `trace` the buffers every launch wrote (empty otherwise).
pub fn run_schedule_traced(
    name: &str,
    s: &wrnc_compiler::schedule::Schedule,
    inputs: &[(String, Vec<u8>)],
    hyper: Hyper,
    trace: bool,
) -> (BTreeMap<String, Vec<u8>>, Trace) {
    use wrnc_compiler::codegen;
    let dir = temp_dir(name);
    let opts = wrnc_compiler::schedule::Options {
        tiles: Default::default(),
        layout: s.layout,
        mode: s.mode,
        batch: s.batch,
        precision: s.precision,
        fusion: Default::default(),
    };
    std::fs::write(
        dir.join("kernels.cu"),
        codegen::cuda::write(s, &opts).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("driver.cpp"), codegen::emu::driver(s)).unwrap();
    for sub in ["in", "out", "trace"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    for (n, bytes) in inputs {
        std::fs::write(dir.join("in").join(format!("{n}.bin")), bytes).unwrap();
    }
    std::fs::write(
        dir.join("hyper.txt"),
        format!(
            "{} {} {:?} {:?} {:?} {} {:?}\n",
            hyper.seed,
            hyper.step,
            hyper.lr,
            hyper.momentum,
            hyper.weight_decay,
            hyper.nesterov as i32,
            hyper.smoothing
        ),
    )
    .unwrap();
    let prog = compile(&dir, "driver.cpp");
    let d = dir.to_str().unwrap();
    let args: Vec<&str> = if trace { vec![d, "trace"] } else { vec![d] };
    run(&prog, &args);
    let mut out = BTreeMap::new();
    for b in &s.buffers {
        out.insert(
            b.name.clone(),
            std::fs::read(dir.join("out").join(format!("{}.bin", b.name))).unwrap(),
        );
    }
    let mut tr = BTreeMap::new();
    if trace {
        for e in std::fs::read_dir(dir.join("trace")).unwrap() {
            let e = e.unwrap();
            let f = e.file_name().to_string_lossy().into_owned();
            let stem = f.strip_suffix(".bin").expect("trace file name");
            let (li, buf) = stem.split_once('.').expect("trace file name");
            tr.insert(
                (li.parse().expect("launch index"), buf.to_string()),
                std::fs::read(e.path()).unwrap(),
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    (out, tr)
}

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn bytes_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// `max |a - b| / max(max |b|, floor)`: the relative error of a whole tensor. `floor` keeps
/// tensors that are mathematically zero (a bias feeding a BN) from dividing rounding noise by
/// zero.
pub fn rel_err(a: &[f32], b: &[f64], floor: f64) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(floor.max(1e-30), |m, v| m.max(v.abs()));
    let diff = a.iter().zip(b).fold(0f64, |m, (x, y)| {
        // a NaN is an infinite error (f64::max would skip it)
        let d = (*x as f64 - y).abs();
        if d.is_nan() {
            f64::INFINITY
        } else {
            m.max(d)
        }
    });
    diff / scale
}
