//! The warpgroup-MMA layout probe (sm_90): whether the hardware reads `wgmma`'s shared-memory
//! operands, and lays out its accumulators, as the convolutions assume
//! ([`wrnc_compiler::codegen::cuda::wgmma_probe_source`]).
//!
//! Each configuration of [`WGMMA_PROBES`] runs one `wgmma` on a shared-memory image of random
//! small integers (exact in bf16 and TF32, and their sums of products exact in f32), and the
//! host computes what it must give if the descriptor is read as wrnc reads it: element
//! `(row, k)` of a K-major operand at byte `row * W + k_byte + k * size` of its region (`W`
//! the configuration's row: 64 or 128 bytes), that address's 16-byte chunk bits XORed with
//! its bits 7 and up (bits 4-5 with 7-8 in the 64-byte swizzle, 4-6 with 7-9 in the
//! 128-byte one), and
//! accumulator `d[4 i + j]` of thread `t` at row `16 (t / 32 % 4) + t % 32 / 4 + 8 (j / 2)`,
//! column `8 i + 2 (t % 4) + j % 2`. Every accumulator must match exactly. Where one does not,
//! the image and the raw registers of every configuration can be written to a file
//! (`wrnc selftest --probe-dump FILE`), from which the reading the hardware does is worked
//! out without a GPU.

use std::path::Path;

use wrnc_compiler::codegen::cuda::{
    tma_probe_box, tma_probe_source, wgmma_probe_source, TMA_PROBES, TMA_PROBE_DIMS,
    TMA_PROBE_KERNEL, WGMMA_PROBES, WGMMA_PROBE_B, WGMMA_PROBE_BYTES, WGMMA_PROBE_KERNEL,
};

use super::cache::ModuleCache;
use super::check::CheckResult;
use super::device::Gpu;
use super::layout::ArgValue;
use super::CudaError;
use crate::init::SplitMix64;

/// The byte address `addr` of a 64-byte-swizzled region as the hardware is assumed to read
/// it: chunk bits 4-5 XORed with bits 7-8.
pub fn swizzle64(addr: u32) -> u32 {
    addr ^ (((addr >> 7) & 3) << 4)
}

/// The same in the 128-byte swizzle: chunk bits 4-6 XORed with bits 7-9.
pub fn swizzle128(addr: u32) -> u32 {
    addr ^ (((addr >> 7) & 7) << 4)
}

/// The probe's shared-memory image for configuration `config` (deterministic): every element
/// slot a random integer in -3..=3, as bf16 or f32 by the configuration.
pub fn image(config: usize) -> Vec<u8> {
    let (tf32, ..) = WGMMA_PROBES[config];
    let mut r = SplitMix64(0x5eed_0000 + config as u64);
    let size = if tf32 { 4 } else { 2 };
    let mut img = Vec::with_capacity(WGMMA_PROBE_BYTES as usize);
    while img.len() < WGMMA_PROBE_BYTES as usize {
        let v = (r.next_u64() % 7) as f32 - 3.0;
        let bits = v.to_bits();
        if size == 4 {
            img.extend_from_slice(&bits.to_le_bytes());
        } else {
            img.extend_from_slice(&((bits >> 16) as u16).to_le_bytes());
        }
    }
    img
}

fn element(img: &[u8], at: u32, tf32: bool) -> f64 {
    let a = at as usize;
    if tf32 {
        f32::from_le_bytes([img[a], img[a + 1], img[a + 2], img[a + 3]]) as f64
    } else {
        f32::from_bits((u16::from_le_bytes([img[a], img[a + 1]]) as u32) << 16) as f64
    }
}

/// The accumulators `out[t * n / 2 + i]` configuration `config` must give on `img`, by the
/// reading described in the module docs.
pub fn expected(config: usize, img: &[u8]) -> Vec<f32> {
    if WGMMA_PROBES[config].3 == 128 {
        expected_by(config, img, swizzle128)
    } else {
        expected_by(config, img, swizzle64)
    }
}

/// [`expected`] with the operands' byte addresses mapped by `swizzle` instead of the
/// configuration's ([`swizzle64`], [`swizzle128`]): a reading the probe must tell from wrnc's.
pub fn expected_by(config: usize, img: &[u8], swizzle: impl Fn(u32) -> u32) -> Vec<f32> {
    let (tf32, n, k_byte, row) = WGMMA_PROBES[config];
    let (size, ks) = if tf32 { (4, 8) } else { (2, 16) };
    let a = |r: u32, k: u32| element(img, swizzle(r * row + k_byte + k * size), tf32);
    let b = |col: u32, k: u32| {
        element(
            img,
            WGMMA_PROBE_B + swizzle(col * row + k_byte + k * size),
            tf32,
        )
    };
    let regs = n / 2;
    let mut out = vec![0f32; (128 * regs) as usize];
    for t in 0..128u32 {
        let (w, l) = (t / 32, t % 32);
        for i in 0..regs / 4 {
            for j in 0..4 {
                let row = 16 * (w % 4) + l / 4 + 8 * (j / 2);
                let col = 8 * i + 2 * (l % 4) + j % 2;
                let d: f64 = (0..ks).map(|k| a(row, k) * b(col, k)).sum();
                out[(t * regs + 4 * i + j) as usize] = d as f32;
            }
        }
    }
    out
}

/// What one configuration gave.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProbeRun {
    pub tf32: bool,
    pub n: u32,
    pub k_byte: u32,
    /// The operands' rows (and swizzle) in bytes: 64 or 128.
    pub row: u32,
    /// Where B starts in the image ([`WGMMA_PROBE_B`]).
    pub b_offset: u32,
    /// Accumulators that differ from [`expected`].
    pub mismatches: usize,
    /// The shared-memory image, hex.
    pub image: String,
    /// The raw accumulators, `out[t * n / 2 + i]`.
    pub out: Vec<f32>,
}

/// Runs every configuration on `gpu` (an sm_90 GPU) and compares; the runs ([`ProbeRun`]) go
/// into `dump` (see [`write_dump`]).
pub fn check_wgmma_probe(
    gpu: &Gpu,
    cache: &ModuleCache,
    dump: &mut serde_json::Map<String, serde_json::Value>,
) -> Result<CheckResult, CudaError> {
    let module = super::exec::load_source_wgmma(
        gpu,
        cache,
        &wgmma_probe_source(),
        &[WGMMA_PROBE_KERNEL.into()],
        true,
    )?;
    let img_buf = gpu.alloc(WGMMA_PROBE_BYTES as u64, "wgmma probe", 0)?;
    let out_buf = gpu.alloc(128 * 64 * 4, "wgmma probe", 0)?;
    let mut runs = vec![];
    for (c, &(tf32, n, k_byte, row)) in WGMMA_PROBES.iter().enumerate() {
        let img = image(c);
        gpu.upload(img_buf.ptr(), &img)?;
        gpu.launch(
            &module,
            0,
            [1, 1, 1],
            [128, 1, 1],
            0,
            &[
                ArgValue::Ptr(img_buf.ptr()),
                ArgValue::Ptr(out_buf.ptr()),
                ArgValue::I32(c as i32),
            ],
            WGMMA_PROBE_KERNEL,
            "wgmma layout probe",
        )?;
        gpu.synchronize("wgmma layout probe")?;
        let mut bytes = vec![0u8; (128 * n / 2 * 4) as usize];
        gpu.download(out_buf.ptr(), &mut bytes)?;
        let out: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let want = expected(c, &img);
        // as values: the hardware's order of summation may give -0 where the host has +0
        let mismatches = out.iter().zip(&want).filter(|(g, w)| g != w).count();
        runs.push(ProbeRun {
            tf32,
            n,
            k_byte,
            row,
            b_offset: WGMMA_PROBE_B,
            mismatches,
            image: hex(&img),
            out,
        });
    }
    dump.insert("wgmma".into(), serde_json::json!(runs));
    let bad: Vec<String> = runs
        .iter()
        .filter(|r| r.mismatches > 0)
        .map(|r| {
            format!(
                "{} m64n{}k{} in {}-byte rows at byte {}: {} of {}",
                if r.tf32 { "tf32" } else { "bf16" },
                r.n,
                if r.tf32 { 8 } else { 16 },
                r.row,
                r.k_byte,
                r.mismatches,
                r.out.len()
            )
        })
        .collect();
    let total: usize = runs.iter().map(|r| r.mismatches).sum();
    Ok(exact(
        format!(
            "wgmma layout probe ({} configurations, exact)",
            WGMMA_PROBES.len()
        ),
        total,
        "accumulators",
        &bad,
    ))
}

/// The bit pattern TMA probe tensor element `i` (in memory order) holds: `0x3000 + i`, a
/// normal bf16 (no copy could flush it) that names its element; a zero is a fill.
pub fn tma_code(i: u64) -> u16 {
    (0x3000 + i) as u16
}

/// The TMA probe's tensor ([`TMA_PROBE_DIMS`], bf16): element `i` holds [`tma_code`]`(i)`.
pub fn tma_tensor() -> Vec<u8> {
    let n: u64 = TMA_PROBE_DIMS.iter().product();
    (0..n).flat_map(|i| tma_code(i).to_le_bytes()).collect()
}

/// The bytes TMA probe `config` must land, by wrnc's reading (module docs): box element
/// `(i0, i1)` at byte `swizzle64((i1 * box0 + i0) * 2)` (or `swizzle128` for a configuration
/// in the 128-byte swizzle), holding tensor element `(c0 + i0, c1 + i1)` or zero outside the
/// tensor.
pub fn tma_expected(config: usize) -> Vec<u8> {
    if TMA_PROBES[config].2 == 128 {
        tma_expected_by(config, swizzle128)
    } else {
        tma_expected_by(config, swizzle64)
    }
}

/// [`tma_expected`] with the landing address mapped by `swizzle`.
pub fn tma_expected_by(config: usize, swizzle: impl Fn(u32) -> u32) -> Vec<u8> {
    let (c0, c1, sw) = TMA_PROBES[config];
    let [b0, b1, ..] = tma_probe_box(sw);
    let [d0, d1, ..] = TMA_PROBE_DIMS;
    let mut out = vec![0u8; (b0 * b1 * 2) as usize];
    for i1 in 0..b1 {
        for i0 in 0..b0 {
            let (x, y) = (c0 as i64 + i0 as i64, c1 as i64 + i1 as i64);
            let v: u16 = if x < d0 as i64 && y < d1 as i64 {
                tma_code(y as u64 * d0 + x as u64)
            } else {
                0
            };
            let at = swizzle((i1 * b0 + i0) * 2) as usize;
            out[at..at + 2].copy_from_slice(&v.to_le_bytes());
        }
    }
    out
}

/// What one TMA configuration landed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TmaProbeRun {
    pub c0: i32,
    pub c1: i32,
    /// The map's swizzle in bytes (64 or 128); the box is [`tma_probe_box`] of it.
    pub swizzle: u32,
    /// Bytes that differ from [`tma_expected`].
    pub mismatches: usize,
    /// The landed bytes, hex.
    pub landed: String,
}

/// Runs every TMA configuration on `gpu` (an sm_90 GPU) and compares; the runs
/// ([`TmaProbeRun`]) go into `dump` (see [`write_dump`]).
pub fn check_tma_probe(
    gpu: &Gpu,
    cache: &ModuleCache,
    dump: &mut serde_json::Map<String, serde_json::Value>,
) -> Result<CheckResult, CudaError> {
    gpu.check_tma()?;
    let module = super::exec::load_source_wgmma(
        gpu,
        cache,
        &tma_probe_source(),
        &[TMA_PROBE_KERNEL.into()],
        true,
    )?;
    let tensor = tma_tensor();
    let t_buf = gpu.alloc(tensor.len() as u64, "TMA probe", 0)?;
    gpu.upload(t_buf.ptr(), &tensor)?;
    let most = (tma_probe_box(128).iter().product::<u32>() * 2) as usize;
    let out_buf = gpu.alloc(most as u64, "TMA probe", 0)?;
    let mut runs = vec![];
    for (c, &(c0, c1, swizzle)) in TMA_PROBES.iter().enumerate() {
        let box_dim = tma_probe_box(swizzle);
        let bytes = (box_dim.iter().product::<u32>() * 2) as usize;
        gpu.launch(
            &module,
            0,
            [1, 1, 1],
            [32, 1, 1],
            0,
            &[
                ArgValue::TensorMap {
                    addr: t_buf.ptr(),
                    dims: TMA_PROBE_DIMS,
                    box_dim,
                    swizzle,
                },
                ArgValue::Ptr(out_buf.ptr()),
                ArgValue::I32(c0),
                ArgValue::I32(c1),
                ArgValue::I32(bytes as i32),
            ],
            TMA_PROBE_KERNEL,
            "TMA layout probe",
        )?;
        gpu.synchronize("TMA layout probe")?;
        let mut got = vec![0u8; bytes];
        gpu.download(out_buf.ptr(), &mut got)?;
        let want = tma_expected(c);
        let mismatches = got.iter().zip(&want).filter(|(g, w)| g != w).count();
        runs.push(TmaProbeRun {
            c0,
            c1,
            swizzle,
            mismatches,
            landed: hex(&got),
        });
    }
    let total: usize = runs.iter().map(|r| r.mismatches).sum();
    dump.insert("tma".into(), serde_json::json!(runs));
    let bad: Vec<String> = runs
        .iter()
        .filter(|r| r.mismatches > 0)
        .map(|r| {
            format!(
                "box at ({}, {}) in the {}-byte swizzle: {} of {} bytes",
                r.c0,
                r.c1,
                r.swizzle,
                r.mismatches,
                r.landed.len() / 2
            )
        })
        .collect();
    Ok(exact(
        format!("TMA layout probe ({} boxes, exact)", TMA_PROBES.len()),
        total,
        "bytes",
        &bad,
    ))
}

/// A probe's check: passed when nothing of `what` (`accumulators`, `bytes`) differs from the
/// host's reading; `bad` names the runs that differ.
fn exact(what: String, mismatches: usize, of: &str, bad: &[String]) -> CheckResult {
    CheckResult {
        what,
        max_rel_err: mismatches as f64,
        tol: 0.0,
        worst: if bad.is_empty() {
            format!("every one of the {of} as assumed")
        } else {
            format!("{of} differ: {}", bad.join(", "))
        },
        passed: mismatches == 0,
        logits_vs_f64_model: None,
        precision_noise: None,
        grad_tol: None,
        resolved: true,
    }
}

/// Writes the probes' runs (`{"device", "wgmma": [ProbeRun], "tma": [TmaProbeRun]}`, each
/// present if that probe ran) to `path` as JSON.
pub fn write_dump(
    gpu: &Gpu,
    path: &Path,
    mut runs: serde_json::Map<String, serde_json::Value>,
) -> std::io::Result<()> {
    runs.insert("device".into(), serde_json::json!(gpu.info()));
    std::fs::write(path, serde_json::Value::Object(runs).to_string())
}

/// `bytes` as lower-case hex, two digits each (the dump's images and landed boxes).
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
