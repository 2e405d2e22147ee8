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

/// The device's f32 -> bf16 roundings (`common.cuh`'s `wrnc_bf16_bits`, `wrnc_st` and
/// `wrnc_stored` in a bf16 module, `mma.cuh`'s `wrnc_f32_bf16`) agree bit for bit with the
/// host's `reference::bf16_bits`, NaNs included: CUDA's NaN, 0x7fffffff, used to carry into
/// -0.0 through the rounding add, so a diverging bf16 run trained on zeros.
#[test]
fn bf16_rounding_on_the_device_matches_the_host_nans_included() {
    let dir = support::temp_dir("emu-bf16-round");
    let patterns: [u32; 14] = [
        0x3f80_0000,
        0xc000_0000,
        0x3f80_8000,
        0x3f81_8000,
        0x3f80_8001,
        0x0000_0001,
        0x7f7f_ffff,
        0x7f80_0000,
        0xff80_0000,
        0x7fff_ffff,
        0xffff_ffff,
        0x7f80_0001,
        0xffc0_0000,
        0x7fc0_0000,
    ];
    let list: Vec<String> = patterns.iter().map(|p| format!("{p:#x}u")).collect();
    let main = format!(
        r#"#include "emu_all.h"
#define WRNC_BF16
{rng}
{common}
{mma}
__global__ void round_all(const unsigned* in, unsigned* out, int n) {{
    int i = threadIdx.x;
    if (i >= n) return;
    float v = __uint_as_float(in[i]);
    act_t s[1];
    wrnc_st(s, 0, v);
    out[4 * i] = wrnc_bf16_bits(v);
    out[4 * i + 1] = s[0];
    out[4 * i + 2] = __float_as_uint(wrnc_stored(v)) >> 16;
    out[4 * i + 3] = wrnc_f32_bf16(v);
}}
int main() {{
    const unsigned in[] = {{{list}}};
    const int n = sizeof(in) / sizeof(in[0]);
    unsigned out[4 * n];
    wrnc_emu::launch(round_all, dim3(1), dim3(32), 0, (const unsigned*)in, (unsigned*)out, n);
    for (int i = 0; i < 4 * n; ++i) printf("%u\n", out[i]);
}}
"#,
        rng = wrnc_compiler::rng::CUDA_SOURCE,
        common = wrnc_compiler::codegen::cuda::COMMON_CUH,
        mma = wrnc_compiler::codegen::mma::MMA_CUH,
        list = list.join(", "),
    );
    std::fs::write(dir.join("round.cpp"), main).unwrap();
    let out = support::run(&support::compile(&dir, "round.cpp"), &[]);
    let got: Vec<u32> = out.lines().map(|l| l.trim().parse().unwrap()).collect();
    assert_eq!(got.len(), 4 * patterns.len(), "{out}");
    for (i, &p) in patterns.iter().enumerate() {
        let want = wrnc_runtime::reference::bf16_bits(f32::from_bits(p)) as u32;
        let helpers = ["wrnc_bf16_bits", "wrnc_st", "wrnc_stored", "wrnc_f32_bf16"];
        for (j, h) in helpers.iter().enumerate() {
            assert_eq!(
                got[4 * i + j],
                want,
                "{h}({p:#010x}): device {:#06x}, host {want:#06x}",
                got[4 * i + j]
            );
        }
        if f32::from_bits(p).is_nan() {
            assert!(
                f32::from_bits(want << 16).is_nan(),
                "{p:#x} must stay a NaN"
            );
        }
    }
}

/// The emulation's `cvt.rna.tf32.f32` (`wrnc_tf32`, behind every TF32 kernel the emulation
/// runs) rounds as the host's `reference::tf32_round`, which a unit test pins to the PTX ISA's
/// round-to-nearest, ties away from zero; for finite values bit for bit, NaNs stay NaNs.
#[test]
fn tf32_rounding_in_the_emulation_matches_the_host() {
    let dir = support::temp_dir("emu-tf32-round");
    let patterns: [u32; 10] = [
        0x3f80_1000, // 1 + 2^-11: a tie, away from zero
        0xbf80_1000,
        0x3f80_0fff,
        0x3f80_3000, // 1 + 3 * 2^-11
        0x3fff_f000, // 2 - 2^-11: carries into the exponent
        0x7f7f_ffff, // the largest finite: rounds to infinity
        0x0000_1001,
        0x7f80_0000,
        0xff80_0000,
        0x7fc0_0000,
    ];
    let list: Vec<String> = patterns.iter().map(|p| format!("{p:#x}u")).collect();
    let main = format!(
        r#"#include "emu_all.h"
__global__ void round_all(const unsigned* in, unsigned* out, int n) {{
    int i = threadIdx.x;
    if (i < n) out[i] = wrnc_tf32(__uint_as_float(in[i]));
}}
int main() {{
    const unsigned in[] = {{{list}}};
    const int n = sizeof(in) / sizeof(in[0]);
    unsigned out[n];
    wrnc_emu::launch(round_all, dim3(1), dim3(32), 0, (const unsigned*)in, (unsigned*)out, n);
    for (int i = 0; i < n; ++i) printf("%u\n", out[i]);
}}
"#,
        list = list.join(", "),
    );
    std::fs::write(dir.join("round.cpp"), main).unwrap();
    let out = support::run(&support::compile(&dir, "round.cpp"), &[]);
    let got: Vec<u32> = out.lines().map(|l| l.trim().parse().unwrap()).collect();
    assert_eq!(got.len(), patterns.len(), "{out}");
    for (&p, &g) in patterns.iter().zip(&got) {
        let want = wrnc_runtime::reference::tf32_round(f32::from_bits(p));
        if want.is_nan() {
            assert!(f32::from_bits(g).is_nan(), "{p:#010x}: device {g:#010x}");
        } else {
            assert_eq!(g, want.to_bits(), "{p:#010x}: device {g:#010x}");
        }
    }
}
