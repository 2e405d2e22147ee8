//! The CUDA emulation header itself: shuffles, shared memory + barriers, atomics, early
//! returns, 2-D indices, and the RNG's CUDA twin agreeing bit for bit with the Rust one.

#[path = "emu_support.rs"]
mod support;

#[test]
fn emulation_selftest() {
    let dir = support::temp_dir("emu-selftest");
    std::fs::write(dir.join("rng_source.cuh"), wrnc_compiler::rng::CUDA_SOURCE).unwrap();
    std::fs::copy(
        support::root().join("emu/tests/selftest.cpp"),
        dir.join("selftest.cpp"),
    )
    .unwrap();
    // selftest.cpp includes "../cuda_emu.h": give it that layout
    std::fs::create_dir_all(dir.join("t")).unwrap();
    std::fs::rename(dir.join("selftest.cpp"), dir.join("t/selftest.cpp")).unwrap();
    std::fs::rename(dir.join("rng_source.cuh"), dir.join("t/rng_source.cuh")).unwrap();
    std::fs::copy(
        support::root().join("emu/cuda_emu.h"),
        dir.join("cuda_emu.h"),
    )
    .unwrap();
    let prog = support::compile(&dir.join("t"), "selftest.cpp");
    let out = support::run(&prog, &[]);
    for name in [
        "shuffle_block_reduction_atomics",
        "shared_syncthreads",
        "xor_shuffle",
        "early_return",
        "indices_2d",
        "race_shows_in_one_order",
    ] {
        assert!(out.contains(&format!("{name} ok")), "{name} failed:\n{out}");
    }
    // a barrier only some threads reach hangs a GPU; the emulation stops and says so
    let d = std::process::Command::new(&prog)
        .arg("deadlock")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&d.stderr);
    assert!(
        !d.status.success() && err.contains("cuda_emu: deadlock in block (0, 0, 0)"),
        "{}\n{err}",
        d.status
    );
    let bits: Vec<u32> = out
        .lines()
        .filter_map(|l| l.strip_prefix("rng "))
        .map(|v| v.parse().unwrap())
        .collect();
    let want: Vec<u32> = (0..8)
        .map(|i| wrnc_compiler::rng::bits(7, 0x1234, 3, i))
        .collect();
    assert_eq!(
        bits, want,
        "CUDA RNG twin disagrees with the Rust generator"
    );
}
