//! Tensor-core convolution kernels (`wrnc_compiler::codegen::mma`) run through the CUDA
//! emulation (`emu/cuda_emu.h` + `emu/cuda_emu_mma.h`, g++) at tiny shapes and compared with the
//! CPU reference convolution (`wrnc_runtime::ops::conv`, in f64):
//!
//! - against the reference on the very bf16 values the kernel read (inputs rounded to bf16, the
//!   prologue applied in f32 and rounded like the kernel), so the only error left is fp32
//!   accumulation order: relative error (to the tensor's largest value) <= 1e-5 for f32 outputs,
//!   and for bf16 outputs <= 2^-8 (one bf16 rounding of a value that may sit on a tie);
//! - against the reference on the unrounded f32 inputs: the bf16 tolerance, <= 1e-2.
//!
//! The emulated `mma` / `ldmatrix` themselves are checked against a scalar matrix product and
//! against fragments built from the PTX ISA's layout formulas.

#[path = "emu_support.rs"]
mod support;

use wrnc_compiler::codegen::mma::{self, MmaConv, OutType, Pass, Tile};
use wrnc_compiler::graph::Conv2d;
use wrnc_runtime::ops::conv;
use wrnc_runtime::Tensor;

/// The emulated warp-level mma and ldmatrix (plain and .trans) against the fragment formulas
/// of the PTX ISA and a scalar product. Integer-valued bf16 inputs make every product and sum
/// exact, so any misplaced element shows as an exact mismatch. Two warps run at once so that
/// warps cannot see each other's operands.
#[test]
fn emulated_mma_and_ldmatrix_match_fragment_layouts() {
    let dir = support::temp_dir("mma-frag");
    std::fs::write(dir.join("kernel.cu"), mma::MMA_CUH).unwrap();
    std::fs::write(
        dir.join("main.cpp"),
        r#"#include "emu_all.h"
#include "kernel.cu"
// Per warp: A 16x16, B 16x16 (two n8 tiles), C 16x16; A stored row-major [16][24], B stored
// both as Bt [n][k] ([16][24], for ldmatrix) and Bk [k][n] ([16][24], for ldmatrix.trans).
static float A[2][16][16], B[2][16][16], C[2][16][16], D[2][16][16];
static int bad = 0;
static unsigned short bfv(float f) { unsigned u; memcpy(&u, &f, 4); return (unsigned short)(u >> 16); }
static unsigned pack(float lo, float hi) { return bfv(lo) | ((unsigned)bfv(hi) << 16); }
__global__ void k() {
    __shared__ __align__(16) unsigned short sa[2][16 * 24], sbt[2][16 * 24], sbk[2][16 * 24];
    __shared__ __align__(16) unsigned short sat[2][16 * 24];  // A stored [k][m] for .trans
    const int tid = threadIdx.x, w = tid / 32, lane = tid % 32, g = lane >> 2, t = lane & 3;
    if (lane == 0) {
        for (int i = 0; i < 16; ++i)
            for (int j = 0; j < 16; ++j) {
                sa[w][i * 24 + j] = bfv(A[w][i][j]);
                sat[w][j * 24 + i] = bfv(A[w][i][j]);
                sbt[w][j * 24 + i] = bfv(B[w][i][j]);  // B[k=i][n=j] at row n
                sbk[w][i * 24 + j] = bfv(B[w][i][j]);
            }
    }
    __syncthreads();
    // Fragments from the PTX ISA formulas.
    unsigned fa[4] = {pack(A[w][g][2 * t], A[w][g][2 * t + 1]), pack(A[w][g + 8][2 * t], A[w][g + 8][2 * t + 1]),
                      pack(A[w][g][2 * t + 8], A[w][g][2 * t + 9]), pack(A[w][g + 8][2 * t + 8], A[w][g + 8][2 * t + 9])};
    unsigned fb[2][2];
    for (int j = 0; j < 2; ++j) {
        fb[j][0] = pack(B[w][2 * t][8 * j + g], B[w][2 * t + 1][8 * j + g]);
        fb[j][1] = pack(B[w][2 * t + 8][8 * j + g], B[w][2 * t + 9][8 * j + g]);
    }
    // The same through ldmatrix, with the addressing the generated kernels use.
    unsigned la[4], lat[4], lb[4], lbt[4];
    wrnc_ldmatrix_x4(la, sa[w] + (lane & 15) * 24 + (lane >> 4) * 8);
    wrnc_ldmatrix_x4_trans(lat, sat[w] + ((lane & 7) + (lane >> 4) * 8) * 24 + ((lane >> 3) & 1) * 8);
    wrnc_ldmatrix_x4(lb, sbt[w] + ((lane & 7) + (lane >> 4) * 8) * 24 + ((lane >> 3) & 1) * 8);
    wrnc_ldmatrix_x4_trans(lbt, sbk[w] + ((lane & 7) + ((lane >> 3) & 1) * 8) * 24 + (lane >> 4) * 8);
    for (int i = 0; i < 4; ++i) {
        if (la[i] != fa[i]) { printf("lane %d ldmatrix A reg %d\n", tid, i); bad = 1; }
        if (lat[i] != fa[i]) { printf("lane %d ldmatrix.trans A reg %d\n", tid, i); bad = 1; }
        if (lb[i] != fb[i / 2][i % 2]) { printf("lane %d ldmatrix B reg %d\n", tid, i); bad = 1; }
        if (lbt[i] != fb[i / 2][i % 2]) { printf("lane %d ldmatrix.trans B reg %d\n", tid, i); bad = 1; }
    }
    for (int j = 0; j < 2; ++j) {
        float c[4] = {C[w][g][8 * j + 2 * t], C[w][g][8 * j + 2 * t + 1], C[w][g + 8][8 * j + 2 * t], C[w][g + 8][8 * j + 2 * t + 1]};
        wrnc_mma_bf16_16816(c, fa, fb[j], c);
        D[w][g][8 * j + 2 * t] = c[0];
        D[w][g][8 * j + 2 * t + 1] = c[1];
        D[w][g + 8][8 * j + 2 * t] = c[2];
        D[w][g + 8][8 * j + 2 * t + 1] = c[3];
    }
}
int main() {
    unsigned s = 12345;
    auto rnd = [&]() { s = s * 1664525u + 1013904223u; return (float)((int)(s >> 27) - 16); };
    for (int w = 0; w < 2; ++w)
        for (int i = 0; i < 16; ++i)
            for (int j = 0; j < 16; ++j) { A[w][i][j] = rnd(); B[w][i][j] = rnd(); C[w][i][j] = rnd(); }
    wrnc_emu::launch(k, dim3(1), dim3(64), 0);
    for (int w = 0; w < 2; ++w)
        for (int i = 0; i < 16; ++i)
            for (int j = 0; j < 16; ++j) {
                double e = C[w][i][j];
                for (int q = 0; q < 16; ++q) e += (double)A[w][i][q] * B[w][q][j];
                if ((double)D[w][i][j] != e) { printf("D[%d][%d][%d] = %g, want %g\n", w, i, j, D[w][i][j], e); bad = 1; }
            }
    printf(bad ? "FAIL\n" : "ok\n");
    return bad;
}
"#,
    )
    .unwrap();
    let prog = support::compile(&dir, "main.cpp");
    let out = support::run(&prog, &[]);
    assert_eq!(out.trim(), "ok", "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// Convolutions.

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn bf16_bits(v: f32) -> u16 {
    let u = v.to_bits();
    (u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16) as u16
}
fn bf16(v: f32) -> f32 {
    f32::from_bits((bf16_bits(v) as u32) << 16)
}
fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|&x| bf16_bits(x).to_le_bytes()).collect()
}
fn bytes_bf16(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(2)
        .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
        .collect()
}

/// A buffer of the emulated program: name, C element type, initial contents.
struct Buf {
    name: &'static str,
    bf16: bool,
    data: Vec<f32>,
}

impl Buf {
    fn new(name: &'static str, bf16: bool, data: Vec<f32>) -> Buf {
        Buf { name, bf16, data }
    }
    fn ctype(&self) -> &'static str {
        if self.bf16 {
            "unsigned short"
        } else {
            "float"
        }
    }
    fn bytes(&self) -> Vec<u8> {
        if self.bf16 {
            bf16_bytes(&self.data)
        } else {
            support::f32_bytes(&self.data)
        }
    }
}

/// One launch: kernel name, grid, threads, arguments (buffer names, or integer literals).
struct Launch {
    kernel: String,
    grid: [u32; 3],
    threads: u32,
    args: Vec<String>,
}

/// Compiles `src` with a driver that loads `bufs`, runs `launches` in order and returns every
/// buffer's final contents (decoded to f32).
fn run(tag: &str, src: &str, bufs: &[Buf], launches: &[Launch]) -> Vec<Vec<f32>> {
    let dir = support::temp_dir(tag);
    std::fs::write(dir.join("kernel.cu"), src).unwrap();
    let mut m = String::from(
        "#include \"emu_all.h\"\n#include \"kernel.cu\"\n\
         template <class T> static void io(const std::string& path, std::vector<T>& v, bool rd) {\n\
             FILE* f = fopen(path.c_str(), rd ? \"rb\" : \"wb\");\n\
             if (!f) { perror(path.c_str()); exit(2); }\n\
             size_t n = rd ? fread(v.data(), sizeof(T), v.size(), f) : fwrite(v.data(), sizeof(T), v.size(), f);\n\
             if (n != v.size()) { fprintf(stderr, \"short io on %s\\n\", path.c_str()); exit(2); }\n\
             fclose(f);\n\
         }\n\
         int main(int argc, char** argv) {\n    std::string d = argv[1];\n",
    );
    for b in bufs {
        m.push_str(&format!(
            "    std::vector<{t}> {n}({len});\n    io(d + \"/{n}.bin\", {n}, true);\n",
            t = b.ctype(),
            n = b.name,
            len = b.data.len()
        ));
        std::fs::write(dir.join(format!("{}.bin", b.name)), b.bytes()).unwrap();
    }
    for l in launches {
        let args: Vec<String> = l
            .args
            .iter()
            .map(|a| {
                if bufs.iter().any(|b| b.name == a) {
                    format!("{a}.data()")
                } else {
                    a.clone()
                }
            })
            .collect();
        m.push_str(&format!(
            "    wrnc_emu::launch({}, dim3({}, {}, {}), dim3({}), 0, {});\n",
            l.kernel,
            l.grid[0],
            l.grid[1],
            l.grid[2],
            l.threads,
            args.join(", ")
        ));
    }
    for b in bufs {
        m.push_str(&format!(
            "    io(d + \"/{n}.out\", {n}, false);\n",
            n = b.name
        ));
    }
    m.push_str("    return 0;\n}\n");
    std::fs::write(dir.join("main.cpp"), m).unwrap();
    let prog = support::compile(&dir, "main.cpp");
    support::run(&prog, &[dir.to_str().unwrap()]);
    let out = bufs
        .iter()
        .map(|b| {
            let raw = std::fs::read(dir.join(format!("{}.out", b.name))).unwrap();
            if b.bf16 {
                bytes_bf16(&raw)
            } else {
                support::bytes_f32(&raw)
            }
        })
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    out
}

/// NHWC [n, h, w, c] -> NCHW tensor in f64.
fn nchw(v: &[f32], n: usize, h: usize, w: usize, c: usize) -> Tensor<f64> {
    let mut t = Tensor::zeros(&[n, c, h, w]);
    for i in 0..n {
        for y in 0..h {
            for x in 0..w {
                for ch in 0..c {
                    t.data[((i * c + ch) * h + y) * w + x] =
                        v[((i * h + y) * w + x) * c + ch] as f64;
                }
            }
        }
    }
    t
}

/// NCHW tensor -> NHWC values.
fn nhwc(t: &Tensor<f64>) -> Vec<f64> {
    let [n, c, h, w] = [t.shape[0], t.shape[1], t.shape[2], t.shape[3]];
    let mut v = vec![0.0; t.data.len()];
    for i in 0..n {
        for ch in 0..c {
            for y in 0..h {
                for x in 0..w {
                    v[((i * h + y) * w + x) * c + ch] = t.data[((i * c + ch) * h + y) * w + x];
                }
            }
        }
    }
    v
}

/// OHWI <-> OIHW weights (`o` outputs, `i` inputs, `k x k` taps).
fn ohwi_to_oihw(v: &[f32], o: usize, i: usize, k: usize) -> Vec<f64> {
    let mut r = vec![0.0; v.len()];
    for a in 0..o {
        for t in 0..k * k {
            for b in 0..i {
                r[(a * i + b) * k * k + t] = v[(a * k * k + t) * i + b] as f64;
            }
        }
    }
    r
}
fn oihw_to_ohwi(v: &[f64], o: usize, i: usize, k: usize) -> Vec<f64> {
    let mut r = vec![0.0; v.len()];
    for a in 0..o {
        for t in 0..k * k {
            for b in 0..i {
                r[(a * k * k + t) * i + b] = v[(a * i + b) * k * k + t];
            }
        }
    }
    r
}

fn op(c: &MmaConv) -> Conv2d {
    Conv2d {
        in_c: c.in_c,
        out_c: c.out_c,
        k: c.k,
        stride: c.stride,
        pad: c.pad,
        groups: 1,
        bias: false,
    }
}

/// The kernel's prologue on one stored value: f32 fma, relu, bf16.
fn pro(x: f32, s: f32, b: f32) -> f32 {
    bf16(x.mul_add(s, b).max(0.0))
}

fn check(what: &str, got: &[f32], want: &[f64], tol: f64) {
    let e = support::rel_err(got, want, 1e-3);
    println!("{what}: rel err {e:.3e} (tolerance {tol:.0e})");
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.0e}");
}

fn out_tol(out: OutType) -> f64 {
    match out {
        OutType::F32 => 1e-5,
        OutType::Bf16 => 1.0 / 256.0 + 1e-5,
    }
}

const BATCH: usize = 2;

/// Forward: `y = conv(pro(x), w) (+ res)`, statistics of `y`.
fn check_fwd(tag: &str, c: &MmaConv) {
    let (oh, ow) = c.out_hw().unwrap();
    let (ic, oc, h, w, k) = (
        c.in_c as usize,
        c.out_c as usize,
        c.in_h as usize,
        c.in_w as usize,
        c.k as usize,
    );
    let (oh, ow) = (oh as usize, ow as usize);
    let x = values(BATCH * h * w * ic, 1);
    let wt: Vec<f32> = values(oc * k * k * ic, 2)
        .iter()
        .map(|v| v / (k * k * ic) as f32 * 4.0)
        .collect();
    let affine: Vec<f32> = values(2 * ic, 3)
        .iter()
        .enumerate()
        .map(|(i, v)| if i < ic { 1.0 + 0.5 * v } else { 0.2 * v })
        .collect();
    let ylen = BATCH * oh * ow * oc;
    let res = values(ylen, 4);
    let obf = c.out == OutType::Bf16;
    let mut bufs = vec![
        Buf::new("x", true, x.clone()),
        Buf::new("w", true, wt.clone()),
        Buf::new("y", obf, vec![0.0; ylen]),
    ];
    let mut args: Vec<String> = vec!["x".into(), "w".into(), "y".into()];
    if c.prologue {
        bufs.push(Buf::new("affine", false, affine.clone()));
        args.push("affine".into());
    }
    if c.residual {
        bufs.push(Buf::new("res", obf, res.clone()));
        args.push("res".into());
    }
    if c.stats {
        bufs.push(Buf::new("stats", false, vec![0.0; 2 * oc]));
        args.push("stats".into());
    }
    args.push(BATCH.to_string());
    let src = mma::conv_fwd_kernel("conv_fwd_mma", c).unwrap();
    let l = Launch {
        kernel: "conv_fwd_mma".into(),
        grid: c.grid(Pass::Fwd, BATCH as u32).unwrap(),
        threads: c.threads(),
        args,
    };
    let got = run(tag, &src, &bufs, &[l]);
    let y = &got[2];
    // Reference on the values the kernel read.
    let act = |x: &[f32], rounded: bool| -> Vec<f32> {
        x.iter()
            .enumerate()
            .map(|(i, &v)| {
                let v = if rounded { bf16(v) } else { v };
                if !c.prologue {
                    return v;
                }
                let ch = i % ic;
                if rounded {
                    pro(v, affine[ch], affine[ic + ch])
                } else {
                    (v * affine[ch] + affine[ic + ch]).max(0.0)
                }
            })
            .collect()
    };
    let reference = |rounded: bool| -> Vec<f64> {
        let xs = act(&x, rounded);
        let ws: Vec<f32> = wt
            .iter()
            .map(|&v| if rounded { bf16(v) } else { v })
            .collect();
        let t = conv::conv2d_forward(
            &nchw(&xs, BATCH, h, w, ic),
            &op(c),
            &ohwi_to_oihw(&ws, oc, ic, k),
            None,
        );
        let mut r = nhwc(&t);
        if c.residual {
            for (v, &q) in r.iter_mut().zip(&res) {
                *v += if obf && rounded { bf16(q) } else { q } as f64;
            }
        }
        r
    };
    check(
        &format!("{tag} y (bf16 inputs)"),
        y,
        &reference(true),
        out_tol(c.out),
    );
    check(&format!("{tag} y (f32 inputs)"), y, &reference(false), 1e-2);
    if c.stats {
        let mut want = vec![0.0f64; 2 * oc];
        for (i, &v) in y.iter().enumerate() {
            want[i % oc] += v as f64;
            want[oc + i % oc] += v as f64 * v as f64;
        }
        check(
            &format!("{tag} stats.sum"),
            &got.last().unwrap()[..oc],
            &want[..oc],
            1e-5,
        );
        check(
            &format!("{tag} stats.sumsq"),
            &got.last().unwrap()[oc..],
            &want[oc..],
            1e-5,
        );
    }
}

/// Data gradient: `dx (+)= conv_transpose(dy, w)`.
fn check_bwd_data(tag: &str, c: &MmaConv) {
    let (oh, ow) = c.out_hw().unwrap();
    let (ic, oc, h, w, k) = (
        c.in_c as usize,
        c.out_c as usize,
        c.in_h as usize,
        c.in_w as usize,
        c.k as usize,
    );
    let (oh, ow) = (oh as usize, ow as usize);
    let dy = values(BATCH * oh * ow * oc, 5);
    let wt: Vec<f32> = values(oc * k * k * ic, 6)
        .iter()
        .map(|v| v / (k * k) as f32)
        .collect();
    let dx0 = values(BATCH * h * w * ic, 7);
    let obf = c.out == OutType::Bf16;
    let init = if c.accumulate {
        dx0.clone()
    } else {
        vec![0.0; dx0.len()]
    };
    let bufs = vec![
        Buf::new("dy", true, dy.clone()),
        Buf::new("w", true, wt.clone()),
        Buf::new("dx", obf, init.clone()),
    ];
    let src = mma::conv_bwd_data_kernel("conv_dgrad_mma", c).unwrap();
    let l = Launch {
        kernel: "conv_dgrad_mma".into(),
        grid: c.grid(Pass::BwdData, BATCH as u32).unwrap(),
        threads: c.threads(),
        args: vec!["dy".into(), "w".into(), "dx".into(), BATCH.to_string()],
    };
    let got = run(tag, &src, &bufs, &[l]);
    let reference = |rounded: bool| -> Vec<f64> {
        let r = |v: &[f32]| -> Vec<f32> {
            v.iter()
                .map(|&q| if rounded { bf16(q) } else { q })
                .collect()
        };
        let g = conv::conv2d_backward(
            &Tensor::zeros(&[BATCH, ic, h, w]),
            &op(c),
            &ohwi_to_oihw(&r(&wt), oc, ic, k),
            &nchw(&r(&dy), BATCH, oh, ow, oc),
            true,
        );
        let mut v = nhwc(&g.dx.unwrap());
        for (a, &b) in v.iter_mut().zip(&init) {
            *a += if obf && rounded { bf16(b) } else { b } as f64;
        }
        v
    };
    check(
        &format!("{tag} dx (bf16 inputs)"),
        &got[2],
        &reference(true),
        out_tol(c.out),
    );
    check(
        &format!("{tag} dx (f32 inputs)"),
        &got[2],
        &reference(false),
        1e-2,
    );
}

/// Weight gradient: `dw = sum dy (x) pro(x)`, split-K with the reduce kernel.
fn check_bwd_weight(tag: &str, c: &MmaConv) {
    let (oh, ow) = c.out_hw().unwrap();
    let (ic, oc, h, w, k) = (
        c.in_c as usize,
        c.out_c as usize,
        c.in_h as usize,
        c.in_w as usize,
        c.k as usize,
    );
    let (oh, ow) = (oh as usize, ow as usize);
    let x = values(BATCH * h * w * ic, 8);
    let dy = values(BATCH * oh * ow * oc, 9);
    let affine: Vec<f32> = values(2 * ic, 10)
        .iter()
        .enumerate()
        .map(|(i, v)| if i < ic { 1.0 + 0.5 * v } else { 0.2 * v })
        .collect();
    let wl = c.weight_len() as usize;
    let splits = c.split_k as usize;
    let mut bufs = vec![
        Buf::new("x", true, x.clone()),
        Buf::new("dy", true, dy.clone()),
        Buf::new("part", false, vec![f32::NAN; splits * wl]),
        Buf::new("dw", false, vec![f32::NAN; wl]),
    ];
    let mut args: Vec<String> = vec!["x".into(), "dy".into(), "part".into()];
    if c.prologue {
        bufs.push(Buf::new("affine", false, affine.clone()));
        args.push("affine".into());
    }
    args.push(BATCH.to_string());
    let src = mma::conv_bwd_weight_kernel("conv_wgrad_mma", c).unwrap();
    let mut launches = vec![Launch {
        kernel: "conv_wgrad_mma".into(),
        grid: c.grid(Pass::BwdWeight, BATCH as u32).unwrap(),
        threads: c.threads(),
        args,
    }];
    if splits > 1 {
        launches.push(Launch {
            kernel: "conv_wgrad_mma_reduce".into(),
            grid: [(wl as u32).div_ceil(128), 1, 1],
            threads: 128,
            args: vec![
                "part".into(),
                "dw".into(),
                splits.to_string(),
                wl.to_string(),
            ],
        });
    }
    let got = run(tag, &src, &bufs, &launches);
    let dw = if splits > 1 { &got[3] } else { &got[2] };
    let reference = |rounded: bool| -> Vec<f64> {
        let xs: Vec<f32> = x
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let ch = i % ic;
                match (rounded, c.prologue) {
                    (true, true) => pro(bf16(v), affine[ch], affine[ic + ch]),
                    (true, false) => bf16(v),
                    (false, true) => (v * affine[ch] + affine[ic + ch]).max(0.0),
                    (false, false) => v,
                }
            })
            .collect();
        let dys: Vec<f32> = dy
            .iter()
            .map(|&q| if rounded { bf16(q) } else { q })
            .collect();
        let g = conv::conv2d_backward(
            &nchw(&xs, BATCH, h, w, ic),
            &op(c),
            &vec![0.0; wl],
            &nchw(&dys, BATCH, oh, ow, oc),
            false,
        );
        oihw_to_ohwi(&g.dw, oc, ic, k)
    };
    check(
        &format!("{tag} dw (bf16 inputs)"),
        dw,
        &reference(true),
        1e-5,
    );
    check(
        &format!("{tag} dw (f32 inputs)"),
        dw,
        &reference(false),
        1e-2,
    );
}

const SMALL: Tile = Tile {
    bm: 32,
    bn: 16,
    bk: 16,
    warps_m: 1,
    warps_n: 1,
    stages: 2,
};
const TALL: Tile = Tile {
    bm: 64,
    bn: 32,
    bk: 32,
    warps_m: 2,
    warps_n: 1,
    stages: 4,
};

fn conv(ic: u32, oc: u32, hw: u32, k: u32, s: u32, p: u32, out: OutType) -> MmaConv {
    MmaConv {
        out,
        ..MmaConv::new(ic, oc, hw, hw, k, s, p)
    }
}

#[test]
fn forward_matches_reference() {
    let f32o = OutType::F32;
    let cases: Vec<(&str, MmaConv)> = vec![
        // default tile, 3x3 / 1x1, stride 1 and 2
        (
            "fwd-k3s1",
            conv(16, 32, 8, 3, 1, 1, f32o).with_default_tile(Pass::Fwd, 2),
        ),
        (
            "fwd-k1s1",
            conv(32, 16, 8, 1, 1, 0, f32o).with_default_tile(Pass::Fwd, 2),
        ),
        (
            "fwd-k3s2",
            conv(16, 32, 8, 3, 2, 1, f32o).with_default_tile(Pass::Fwd, 2),
        ),
        // partial tiles in every dimension (M = 98, N = 40, K = 216), four stages
        (
            "fwd-ragged",
            MmaConv {
                tile: TALL,
                ..conv(24, 40, 7, 3, 1, 1, f32o)
            },
        ),
        // shortcut 1x1 stride 2 with the BN-ReLU prologue
        (
            "fwd-k1s2-pro",
            MmaConv {
                prologue: true,
                tile: TALL,
                ..conv(32, 64, 8, 1, 2, 0, f32o)
            },
        ),
        // everything: prologue, residual, statistics, bf16 output, many small blocks
        (
            "fwd-k3s2-all-bf16",
            MmaConv {
                prologue: true,
                residual: true,
                stats: true,
                tile: SMALL,
                ..conv(16, 32, 8, 3, 2, 1, OutType::Bf16)
            },
        ),
        (
            "fwd-k3s1-stats-f32",
            MmaConv {
                stats: true,
                residual: true,
                ..conv(16, 16, 8, 3, 1, 1, f32o)
            },
        ),
    ];
    for (tag, c) in &cases {
        check_fwd(tag, c);
    }
}

#[test]
fn data_gradient_matches_reference() {
    let f32o = OutType::F32;
    let cases: Vec<(&str, MmaConv)> = vec![
        (
            "dgrad-k3s1",
            conv(16, 32, 8, 3, 1, 1, f32o).with_default_tile(Pass::BwdData, 2),
        ),
        (
            "dgrad-k3s2-acc",
            MmaConv {
                accumulate: true,
                tile: SMALL,
                ..conv(32, 16, 8, 3, 2, 1, f32o)
            },
        ),
        (
            "dgrad-k1s2-bf16",
            MmaConv {
                tile: TALL,
                ..conv(16, 32, 8, 1, 2, 0, OutType::Bf16)
            },
        ),
        (
            "dgrad-ragged",
            MmaConv {
                tile: TALL,
                ..conv(24, 40, 7, 3, 1, 1, f32o)
            },
        ),
    ];
    for (tag, c) in &cases {
        check_bwd_data(tag, c);
    }
}

#[test]
fn weight_gradient_matches_reference() {
    let f32o = OutType::F32;
    let cases: Vec<(&str, MmaConv)> = vec![
        (
            "wgrad-k3s1",
            conv(16, 32, 8, 3, 1, 1, f32o).with_default_tile(Pass::BwdWeight, 2),
        ),
        (
            "wgrad-k3s2-pro-split3",
            MmaConv {
                prologue: true,
                split_k: 3,
                tile: SMALL,
                ..conv(24, 16, 8, 3, 2, 1, f32o)
            },
        ),
        (
            "wgrad-k1s1-split4",
            MmaConv {
                split_k: 4,
                tile: TALL,
                ..conv(32, 32, 8, 1, 1, 0, f32o)
            },
        ),
        // more splits than k-tiles: the idle slices must write zeros
        (
            "wgrad-ragged-split9",
            MmaConv {
                split_k: 9,
                tile: TALL,
                ..conv(24, 40, 7, 3, 1, 1, f32o)
            },
        ),
    ];
    for (tag, c) in &cases {
        check_bwd_weight(tag, c);
    }
}
