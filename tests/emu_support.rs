//! Shared by the emulation tests (`#[path = "emu_support.rs"] mod support;`): compile host C++
//! against `emu/cuda_emu.h` with g++ and run it. No tests of its own.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

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

/// Compiles `main` (a .cpp in `dir`) with `g++ -O1 -std=c++20 -pthread -I emu -I dir` into
/// `dir/prog`. Panics with a clear message when g++ is missing or compilation fails.
pub fn compile(dir: &Path, main: &str) -> PathBuf {
    let out = dir.join("prog");
    let r = Command::new("g++")
        .args(["-O1", "-std=c++20", "-pthread", "-w"])
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
    let r = Command::new(prog).args(args).output().expect("run emulated program");
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
