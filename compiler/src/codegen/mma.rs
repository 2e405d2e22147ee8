//! Tensor-core convolution kernels (sm_80+): bf16 implicit GEMM on NHWC activations with fp32
//! accumulation, `mma.sync.m16n8k16`, `ldmatrix` and a multi-stage `cp.async` pipeline.
//!
//! Three passes, each one GEMM `D[M][N] = sum_K A[M][K] B[K][N]` whose operands are gathered
//! from the tensors as they are loaded (no im2col buffer):
//!
//! | pass | M | N | K | A | B | D |
//! |---|---|---|---|---|---|---|
//! | forward | `n*oh*ow` | `out_c` | `k*k*in_c` | `x` patches | `w` | `y` (NHWC) |
//! | data gradient | `n*h*w` | `in_c` | `k*k*out_c` | `dy` patches | `w` | `dx` (NHWC) |
//! | weight gradient | `out_c` | `k*k*in_c` | `n*oh*ow` | `dy` | `x` patches | `dw` (OHWI) |
//!
//! Layouts: activations and gradients NHWC bf16; the weight OHWI (`[out_c][k][k][in_c]`) bf16
//! for forward and data gradient; the weight gradient OHWI f32. The K index of a patch runs
//! `(kh, kw, c)` with `c` fastest, so a patch row is contiguous within one tap and 8 channels are
//! one 16-byte `cp.async`: every channel count must be a multiple of 8.
//!
//! Invariants of the generated source: one translation unit, no system headers (NVRTC and
//! `emu/cuda_emu.h` + `emu/cuda_emu_mma.h` both compile it); only static shared memory (at most
//! 48 KiB); the batch is the only runtime size (`int batch`), everything else is a constant;
//! [`MmaConv::grid`] refuses batches whose tensors would overflow the kernels' 32-bit indices.
//! Generation is deterministic (same input, same text) and never panics on bad input: every
//! check returns an [`MmaError`].

use std::fmt::Write;

/// The device helpers (PTX wrappers, bf16 conversion), included verbatim in every kernel.
pub const MMA_CUH: &str = include_str!("mma.cuh");

/// Static shared memory available to one block without opting in to more.
pub const MAX_STATIC_SMEM: u64 = 48 * 1024;

/// Elements of padding at the end of every shared-memory row: keeps rows 16-byte aligned and
/// spreads the eight rows one `ldmatrix` reads over distinct banks.
const PAD: u32 = 8;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MmaError {
    #[error("kernel name `{0}` is not a C identifier")]
    Name(String),
    #[error("convolution geometry: {0}")]
    Geometry(String),
    #[error("tile: {0}")]
    Tile(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("too large: {0}")]
    TooLarge(String),
}

/// Storage type of a kernel's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutType {
    Bf16,
    F32,
}

impl OutType {
    fn c(self) -> &'static str {
        match self {
            OutType::Bf16 => "unsigned short",
            OutType::F32 => "float",
        }
    }
}

/// Which GEMM of the convolution a kernel computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pass {
    Fwd,
    BwdData,
    BwdWeight,
}

/// A block's tile: `bm x bn` outputs, `bk` of the reduction per pipeline stage, a
/// `warps_m x warps_n` grid of warps (each owning a `bm/warps_m x bn/warps_n` warp tile of
/// m16n8 mma tiles), and `stages` shared-memory buffers in flight.
///
/// Valid when: `bk % 16 == 0`; the warp tile's rows are a multiple of 16 and its columns a
/// multiple of 16 (B fragments come two n8 tiles per `ldmatrix.x4`); `bm`, `bn` multiples of 8;
/// 1..=32 warps; `stages >= 2`; the stages fit in [`MAX_STATIC_SMEM`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tile {
    pub bm: u32,
    pub bn: u32,
    pub bk: u32,
    pub warps_m: u32,
    pub warps_n: u32,
    pub stages: u32,
}

impl Tile {
    /// Threads per block.
    pub fn threads(&self) -> u32 {
        32 * self.warps_m * self.warps_n
    }

    /// Shared memory of all stages, in bytes, for the given operand layouts (`true`: the
    /// operand is stored K-contiguous, `[rows][bk + PAD]`; `false`: `[bk][rows + PAD]`).
    fn smem_bytes(&self, a_kmajor: bool, b_kmajor: bool) -> u64 {
        let st = |rows: u32, kmajor: bool| -> u64 {
            if kmajor {
                rows as u64 * (self.bk + PAD) as u64
            } else {
                self.bk as u64 * (rows + PAD) as u64
            }
        };
        2 * self.stages as u64 * (st(self.bm, a_kmajor) + st(self.bn, b_kmajor))
    }

    fn check(&self, a_kmajor: bool, b_kmajor: bool) -> Result<(), MmaError> {
        let bad = |m: String| Err(MmaError::Tile(format!("{self:?}: {m}")));
        if self.warps_m == 0 || self.warps_n == 0 || self.warps_m as u64 * self.warps_n as u64 > 32
        {
            return bad("1 to 32 warps".into());
        }
        if self.bk == 0 || !self.bk.is_multiple_of(16) || self.bk > 256 {
            return bad("bk must be a positive multiple of 16, at most 256".into());
        }
        if self.bm == 0 || !self.bm.is_multiple_of(16 * self.warps_m) || self.bm > 512 {
            return bad("bm must be a multiple of 16 * warps_m, at most 512".into());
        }
        if self.bn == 0 || !self.bn.is_multiple_of(16 * self.warps_n) || self.bn > 512 {
            return bad("bn must be a multiple of 16 * warps_n, at most 512".into());
        }
        if self.stages < 2 || self.stages > 8 {
            return bad("2 to 8 stages".into());
        }
        let smem = self.smem_bytes(a_kmajor, b_kmajor);
        if smem > MAX_STATIC_SMEM {
            return bad(format!(
                "{smem} bytes of shared memory (> {MAX_STATIC_SMEM})"
            ));
        }
        Ok(())
    }
}

/// Operand layouts in shared memory per pass: (A K-contiguous, B K-contiguous).
fn layouts(pass: Pass) -> (bool, bool) {
    match pass {
        Pass::Fwd => (true, true),
        Pass::BwdData => (true, false),
        Pass::BwdWeight => (false, false),
    }
}

/// A tile for a GEMM of `m x n x k` when no GPU is at hand to tune one: the largest of
/// 128 / 64 rows and 128 / 64 / 32 columns that the problem fills, 4 or 8 warps, and as many
/// stages (up to 4) as fit in static shared memory. Deterministic; always valid for `pass`.
pub fn default_tile(pass: Pass, m: u64, n: u64, _k: u64) -> Tile {
    let bm = if m >= 8192 { 128 } else { 64 };
    let bn = if n >= 128 {
        128
    } else if n >= 64 {
        64
    } else {
        32
    };
    let (warps_m, warps_n) = match (bm, bn) {
        (128, 128) => (2, 4),
        (128, 64) => (4, 2),
        (128, _) => (4, 1),
        (_, 128) => (2, 4),
        (_, 64) => (2, 2),
        _ => (2, 1),
    };
    let (ak, bk_major) = layouts(pass);
    let mut t = Tile {
        bm,
        bn,
        bk: 32,
        warps_m,
        warps_n,
        stages: 4,
    };
    while t.stages > 2 && t.smem_bytes(ak, bk_major) > MAX_STATIC_SMEM {
        t.stages -= 1;
    }
    if t.smem_bytes(ak, bk_major) > MAX_STATIC_SMEM {
        t.bk = 16;
    }
    t
}

/// Split-K factor for the weight gradient: enough slices of the (long) pixel reduction that
/// the grid has about two blocks per SM of a 132-SM GPU, each slice keeping at least 8 k-tiles;
/// between 1 and 32.
pub fn default_split_k(m: u64, n: u64, k: u64, t: &Tile) -> u32 {
    let blocks = m
        .div_ceil(t.bm.max(1) as u64)
        .max(1)
        .saturating_mul(n.div_ceil(t.bn.max(1) as u64).max(1));
    let want = 264u64.div_ceil(blocks);
    let kt = k.div_ceil(t.bk.max(1) as u64);
    want.min(kt / 8).clamp(1, 32) as u32
}

/// One convolution (groups = 1, square window, zero padding, no bias) and the options of its
/// tensor-core kernels.
///
/// - `prologue`: `x` is replaced by `relu(x * scale[c] + shift[c])` (f32 `fmaf`, rounded to
///   bf16) as it lands in shared memory; padding stays zero. `affine` is `[scale | shift]`, `2
///   in_c` floats. Forward and weight gradient.
/// - `residual` (forward): `y = conv + res`, `res` NHWC with `y`'s storage type.
/// - `stats` (forward): `stats[o] += sum y`, `stats[out_c + o] += sum y^2` over the stored
///   (rounded) outputs, f32 atomics (`stats` is `2 out_c` floats the caller zeroes).
/// - `accumulate` (data gradient): `dx += conv_transpose(dy, w)` instead of `=`.
/// - `split_k` (weight gradient): slices of the pixel reduction; with more than one, the main
///   kernel writes `split_k` partial gradients and `<name>_reduce` sums them in slice order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MmaConv {
    pub in_c: u32,
    pub out_c: u32,
    pub in_h: u32,
    pub in_w: u32,
    pub k: u32,
    pub stride: u32,
    pub pad: u32,
    pub out: OutType,
    pub prologue: bool,
    pub residual: bool,
    pub stats: bool,
    pub accumulate: bool,
    pub tile: Tile,
    pub split_k: u32,
}

impl MmaConv {
    /// A plain convolution with bf16 output and the [`default_tile`] of the forward pass at
    /// batch 128 (call [`MmaConv::with_default_tile`] for another pass or batch).
    pub fn new(in_c: u32, out_c: u32, in_h: u32, in_w: u32, k: u32, stride: u32, pad: u32) -> Self {
        let c = MmaConv {
            in_c,
            out_c,
            in_h,
            in_w,
            k,
            stride,
            pad,
            out: OutType::Bf16,
            prologue: false,
            residual: false,
            stats: false,
            accumulate: false,
            tile: Tile {
                bm: 64,
                bn: 64,
                bk: 32,
                warps_m: 2,
                warps_n: 2,
                stages: 3,
            },
            split_k: 1,
        };
        c.with_default_tile(Pass::Fwd, 128)
    }

    /// This convolution with [`default_tile`] (and for the weight gradient
    /// [`default_split_k`]) for `pass` at `batch`. Geometry errors leave the tile as it was
    /// (the kernel generators report them).
    pub fn with_default_tile(mut self, pass: Pass, batch: u32) -> Self {
        if let Ok((m, n, k)) = self.gemm(pass, batch) {
            self.tile = default_tile(pass, m, n, k);
            self.split_k = if pass == Pass::BwdWeight {
                default_split_k(m, n, k, &self.tile)
            } else {
                1
            };
        }
        self
    }

    /// Output height and width; an error when the window does not fit or a size is zero.
    pub fn out_hw(&self) -> Result<(u32, u32), MmaError> {
        let g = |m: &str| Err(MmaError::Geometry(format!("{self:?}: {m}")));
        if self.k == 0 || self.stride == 0 {
            return g("k and stride must be positive");
        }
        if self.in_c == 0 || self.out_c == 0 || self.in_h == 0 || self.in_w == 0 {
            return g("sizes must be positive");
        }
        if self.pad >= self.k {
            return g("pad must be smaller than k");
        }
        let o = |i: u32| -> Option<u32> {
            let span = i as u64 + 2 * self.pad as u64;
            (span >= self.k as u64)
                .then(|| ((span - self.k as u64) / self.stride as u64 + 1) as u32)
        };
        match (o(self.in_h), o(self.in_w)) {
            (Some(h), Some(w)) => Ok((h, w)),
            _ => g("window larger than the padded input"),
        }
    }

    /// The GEMM `(m, n, k)` of `pass` at `batch`.
    pub fn gemm(&self, pass: Pass, batch: u32) -> Result<(u64, u64, u64), MmaError> {
        let (oh, ow) = self.out_hw()?;
        let (b, kk) = (batch as u64, self.k as u64 * self.k as u64);
        let (ic, oc) = (self.in_c as u64, self.out_c as u64);
        // Saturating: absurd sizes give huge (not wrapped) products, which the callers reject.
        let mul = |a: u64, b: u64, c: u64| a.saturating_mul(b).saturating_mul(c);
        let (out_pix, in_pix) = (
            mul(b, oh as u64, ow as u64),
            mul(b, self.in_h as u64, self.in_w as u64),
        );
        Ok(match pass {
            Pass::Fwd => (out_pix, oc, kk.saturating_mul(ic)),
            Pass::BwdData => (in_pix, ic, kk.saturating_mul(oc)),
            Pass::BwdWeight => (oc, kk.saturating_mul(ic), out_pix),
        })
    }

    /// Threads per block (one dimension).
    pub fn threads(&self) -> u32 {
        self.tile.threads()
    }

    /// The launch grid of `pass` at `batch` (`z` is the split-K factor for the weight
    /// gradient, 1 otherwise). An error when any tensor of the batch has 2^31 elements or more
    /// (the kernels index with `int`) or the grid exceeds CUDA's limits.
    pub fn grid(&self, pass: Pass, batch: u32) -> Result<[u32; 3], MmaError> {
        self.check(pass)?;
        if batch == 0 {
            return Err(MmaError::Geometry("batch must be positive".into()));
        }
        let (oh, ow) = self.out_hw()?;
        let b = batch as u64;
        let lim = i32::MAX as u64;
        let x = b * self.in_h as u64 * self.in_w as u64 * self.in_c as u64;
        let y = b * oh as u64 * ow as u64 * self.out_c as u64;
        let part = self.split_k as u64 * self.weight_len();
        if x > lim || y > lim || part > lim {
            return Err(MmaError::TooLarge(format!(
                "batch {batch}: a tensor of {} elements (int indices)",
                x.max(y).max(part)
            )));
        }
        let (m, n, _) = self.gemm(pass, batch)?;
        let gx = m.div_ceil(self.tile.bm as u64);
        let gy = n.div_ceil(self.tile.bn as u64);
        if gx > lim || gy > 65535 {
            return Err(MmaError::TooLarge(format!("grid {gx} x {gy}")));
        }
        let z = if pass == Pass::BwdWeight {
            self.split_k
        } else {
            1
        };
        Ok([gx as u32, gy as u32, z])
    }

    /// Elements of the weight (`out_c * k * k * in_c`).
    pub fn weight_len(&self) -> u64 {
        (self.out_c as u64 * self.in_c as u64).saturating_mul(self.k as u64 * self.k as u64)
    }

    fn check(&self, pass: Pass) -> Result<(), MmaError> {
        let (oh, ow) = self.out_hw()?;
        let un = |m: &str| Err(MmaError::Unsupported(format!("{m} ({self:?})")));
        if !self.in_c.is_multiple_of(8) || !self.out_c.is_multiple_of(8) {
            return un("channel counts must be multiples of 8 (16-byte cp.async chunks)");
        }
        if self.k > 15 || self.stride > 15 {
            return un("k and stride at most 15");
        }
        // Per-image sizes and the weight must index with int even at batch 1.
        let lim = i32::MAX as u64;
        let img = (self.in_h as u64 * self.in_w as u64)
            .saturating_mul(self.in_c as u64)
            .max((oh as u64 * ow as u64).saturating_mul(self.out_c as u64));
        if img > lim || self.weight_len() > lim {
            return Err(MmaError::TooLarge(format!("{self:?}")));
        }
        match pass {
            Pass::Fwd => {
                if self.accumulate {
                    return un("accumulate is for the data gradient");
                }
            }
            Pass::BwdData => {
                if self.prologue || self.residual || self.stats {
                    return un("the data gradient has no prologue, residual or statistics");
                }
            }
            Pass::BwdWeight => {
                if self.residual || self.stats || self.accumulate {
                    return un("the weight gradient has no residual, statistics or accumulate");
                }
            }
        }
        if self.split_k == 0 || self.split_k > 256 {
            return un("split_k must be 1..=256");
        }
        if pass != Pass::BwdWeight && self.split_k != 1 {
            return un("split_k is for the weight gradient");
        }
        let (a, b) = layouts(pass);
        self.tile.check(a, b)
    }
}

fn check_name(name: &str) -> Result<(), MmaError> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(MmaError::Name(name.to_string()))
    }
}

/// One GEMM operand as the generic kernel loads it.
struct Operand {
    /// Stored `[rows][bk + PAD]` (K contiguous) rather than `[bk][rows + PAD]`.
    kmajor: bool,
    /// The tensor pointer (a valid address for zero-fill copies).
    base: &'static str,
    /// C statements that, given `r` (the global row of this operand: M for A, N for B; for a
    /// K-contiguous operand any row, otherwise the first of 8) and `kk` (the global K index,
    /// likewise), set `src` to the chunk's 8 elements or leave it null (zero), and `ch` to the
    /// input channel of the first element where a prologue applies.
    addr: String,
    /// Apply the prologue to this operand's valid chunks.
    prologue: bool,
}

struct Gemm<'a> {
    name: &'a str,
    c: &'a MmaConv,
    params: Vec<String>,
    m: &'static str,
    n: &'static str,
    k: &'static str,
    a: Operand,
    b: Operand,
    /// C statements storing `v` (f32 accumulator) at GEMM element `(row, col)`; may set
    /// `stored` (the value as stored) for statistics.
    epilogue: String,
    stats: bool,
}

fn geometry_consts(c: &MmaConv) -> Result<String, MmaError> {
    let (oh, ow) = c.out_hw()?;
    Ok(format!(
        "    constexpr int IC = {}, OC = {}, H = {}, W = {}, OH = {oh}, OW = {ow}, KS = {}, S = {}, P = {};\n",
        c.in_c, c.out_c, c.in_h, c.in_w, c.k, c.stride, c.pad
    ))
}

/// The input-patch address code shared by the forward A operand and the weight-gradient B
/// operand: output pixel `pix`, patch index `kidx` = `(kh, kw, ci)`.
fn patch_addr(pix: &str, kidx: &str, bound: &str) -> String {
    format!(
        "if ({bound}) {{
                const int ci = {kidx} % IC, tap = {kidx} / IC, kw = tap % KS, kh = tap / KS;
                const int ow = {pix} % OW, t = {pix} / OW, oh = t % OH, nb = t / OH;
                const int ih = oh * S - P + kh, iw = ow * S - P + kw;
                if (ih >= 0 && ih < H && iw >= 0 && iw < W) src = x + ((nb * H + ih) * W + iw) * IC + ci;
                ch = ci;
            }}"
    )
}

fn emit(g: &Gemm) -> Result<String, MmaError> {
    let c = g.c;
    let t = &c.tile;
    let (wtm, wtn) = (t.bm / t.warps_m, t.bn / t.warps_n);
    let threads = t.threads();
    let ld = |rows: u32, kmajor: bool| if kmajor { t.bk + PAD } else { rows + PAD };
    let stage = |rows: u32, kmajor: bool| {
        if kmajor {
            rows * (t.bk + PAD)
        } else {
            t.bk * (rows + PAD)
        }
    };
    let mut s = String::new();
    let w = &mut s;
    let _ = writeln!(
        w,
        "// {}: bf16 implicit-GEMM convolution on tensor cores (mma.sync m16n8k16, fp32 accumulation).",
        g.name
    );
    let _ = writeln!(
        w,
        "// tile {}x{}x{}, warps {}x{} (warp tile {wtm}x{wtn}), {} cp.async stages.",
        t.bm, t.bn, t.bk, t.warps_m, t.warps_n, t.stages
    );
    let _ = writeln!(
        w,
        "extern \"C\" __global__ void __launch_bounds__({threads}) {}({}) {{",
        g.name,
        g.params.join(", ")
    );
    w.push_str(&geometry_consts(c)?);
    let _ = writeln!(
        w,
        "    constexpr int BM = {}, BN = {}, BK = {}, STAGES = {}, THREADS = {threads};
    constexpr int WTM = {wtm}, WTN = {wtn}, MI = WTM / 16, NI = WTN / 8, WARPS_M = {};
    constexpr int A_LD = {}, B_LD = {}, A_STAGE = {}, B_STAGE = {};
    constexpr int A_CHUNKS = {}, B_CHUNKS = {};
    __shared__ __align__(16) unsigned short sA[STAGES * A_STAGE];
    __shared__ __align__(16) unsigned short sB[STAGES * B_STAGE];
    const int M = {}, NG = {}, K = {};
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp % WARPS_M, wn = warp / WARPS_M;
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    const int kt_all = (K + BK - 1) / BK, kt_per = (kt_all + gridDim.z - 1) / gridDim.z;
    const int kt0 = blockIdx.z * kt_per;
    const int kt_end = kt0 + kt_per < kt_all ? kt0 + kt_per : kt_all;
    const int nkt = kt_end - kt0;
    float acc[MI][NI][4];
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NI; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.0f;",
        t.bm,
        t.bn,
        t.bk,
        t.stages,
        t.warps_m,
        ld(t.bm, g.a.kmajor),
        ld(t.bn, g.b.kmajor),
        stage(t.bm, g.a.kmajor),
        stage(t.bn, g.b.kmajor),
        t.bm * t.bk / 8,
        t.bn * t.bk / 8,
        g.m,
        g.n,
        g.k,
    );
    // Loaders and prologue fix-ups, per operand.
    for (op, tag, rows, sh, ldn) in [
        (&g.a, "a", "BM", "sA", "A_LD"),
        (&g.b, "b", "BN", "sB", "B_LD"),
    ] {
        let org = if tag == "a" { "m0" } else { "n0" };
        let upper = tag.to_uppercase();
        let coords = if op.kmajor {
            format!(
                "const int row = c / (BK / 8), col = (c % (BK / 8)) * 8;
            const int r = {org} + row, kk = kbase + col;"
            )
        } else {
            format!(
                "const int row = c / ({rows} / 8), col = (c % ({rows} / 8)) * 8;
            const int kk = kbase + row, r = {org} + col;"
            )
        };
        let _ = writeln!(
            w,
            "    // Operand {upper}: {layout}; chunks of 8 bf16 (16 bytes).
    auto load_{tag} = [&](int st, int kt) {{
        unsigned short* dst = {sh} + st * {upper}_STAGE;
        const int kbase = (kt0 + kt) * BK;
        for (int c = tid; c < {upper}_CHUNKS; c += THREADS) {{
            {coords}
            const unsigned short* src = nullptr;
            int ch = 0;
            {addr}
            (void)ch;
            wrnc_cp_async16(dst + row * {ldn} + col, src ? src : {base}, src != nullptr);
        }}
    }};",
            layout = if op.kmajor {
                format!("[{rows}][BK + pad] in shared memory")
            } else {
                format!("[BK][{rows} + pad] in shared memory")
            },
            addr = op.addr,
            base = op.base,
        );
        if op.prologue {
            let _ = writeln!(
                w,
                "    // Prologue on operand {upper}: relu(v * scale[c] + shift[c]) on the chunks this
    // thread copied, once they have landed; zero-filled (padding) chunks stay zero.
    auto fix_{tag} = [&](int st, int kt) {{
        unsigned short* dst = {sh} + st * {upper}_STAGE;
        const int kbase = (kt0 + kt) * BK;
        for (int c = tid; c < {upper}_CHUNKS; c += THREADS) {{
            {coords}
            const unsigned short* src = nullptr;
            int ch = 0;
            {addr}
            if (src) {{
                unsigned short* d = dst + row * {ldn} + col;
#pragma unroll
                for (int e = 0; e < 8; ++e) {{
                    const float v = fmaf(wrnc_bf16_f32(d[e]), affine[ch + e], affine[IC + ch + e]);
                    d[e] = wrnc_f32_bf16(v > 0.0f ? v : 0.0f);
                }}
            }}
        }}
    }};",
                addr = op.addr,
            );
        }
    }
    // Fragment loads.
    let a_frag = if g.a.kmajor {
        "wrnc_ldmatrix_x4(af[mi], as + (rb + (lane & 15)) * A_LD + ks * 16 + (lane >> 4) * 8);"
    } else {
        "wrnc_ldmatrix_x4_trans(af[mi], as + (ks * 16 + (lane & 7) + (lane >> 4) * 8) * A_LD + rb + ((lane >> 3) & 1) * 8);"
    };
    let b_frag = if g.b.kmajor {
        "wrnc_ldmatrix_x4(q, bs + (nb + (lane & 7) + (lane >> 4) * 8) * B_LD + ks * 16 + ((lane >> 3) & 1) * 8);"
    } else {
        "wrnc_ldmatrix_x4_trans(q, bs + (ks * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * B_LD + nb + (lane >> 4) * 8);"
    };
    let fix = match (g.a.prologue, g.b.prologue) {
        (true, _) => "        fix_a(kt % STAGES, kt);\n",
        (_, true) => "        fix_b(kt % STAGES, kt);\n",
        _ => "",
    };
    let _ = writeln!(
        w,
        "    // One stage: BK / 16 steps of ldmatrix fragments and MI x NI mma per warp.
    auto compute = [&](int st) {{
        const unsigned short* as = sA + st * A_STAGE;
        const unsigned short* bs = sB + st * B_STAGE;
#pragma unroll
        for (int ks = 0; ks < BK / 16; ++ks) {{
            unsigned int af[MI][4], bf[NI][2];
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) {{
                const int rb = wm * WTM + mi * 16;
                {a_frag}
            }}
#pragma unroll
            for (int p = 0; p < NI / 2; ++p) {{
                const int nb = wn * WTN + p * 16;
                unsigned int q[4];
                {b_frag}
                bf[2 * p][0] = q[0];
                bf[2 * p][1] = q[1];
                bf[2 * p + 1][0] = q[2];
                bf[2 * p + 1][1] = q[3];
            }}
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                for (int ni = 0; ni < NI; ++ni) wrnc_mma_bf16_16816(acc[mi][ni], af[mi], bf[ni], acc[mi][ni]);
        }}
    }};
    // Pipeline: STAGES - 1 tiles in flight; wait for tile kt, make it visible to the block
    // (which also retires every warp's reads of the stage the next prefetch overwrites),
    // prefetch tile kt + STAGES - 1, compute tile kt.
    for (int s = 0; s < STAGES - 1; ++s) {{
        if (s < nkt) {{
            load_a(s, s);
            load_b(s, s);
        }}
        wrnc_cp_async_commit();
    }}
    for (int kt = 0; kt < nkt; ++kt) {{
        wrnc_cp_async_wait<STAGES - 2>();
{fix}        __syncthreads();
        const int nk = kt + STAGES - 1;
        if (nk < nkt) {{
            load_a(nk % STAGES, nk);
            load_b(nk % STAGES, nk);
        }}
        wrnc_cp_async_commit();
        compute(kt % STAGES);
    }}
    wrnc_cp_async_wait<0>();"
    );
    // Epilogue.
    let stats_decl = if g.stats {
        "    float ssum[NI][2], ssq[NI][2];
#pragma unroll
    for (int ni = 0; ni < NI; ++ni) ssum[ni][0] = ssum[ni][1] = ssq[ni][0] = ssq[ni][1] = 0.0f;\n"
    } else {
        ""
    };
    let stats_acc = if g.stats {
        "                    ssum[ni][r & 1] += stored;
                    ssq[ni][r & 1] += stored * stored;\n"
    } else {
        ""
    };
    let _ = write!(
        w,
        "    // Epilogue: accumulator (mi, ni, r) is GEMM element (row g + 8 (r / 2), col 2 t + r % 2)
    // of its m16n8 tile, g = lane / 4, t = lane % 4.
{stats_decl}#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
#pragma unroll
            for (int r = 0; r < 4; ++r) {{
                const int row = m0 + wm * WTM + mi * 16 + (lane >> 2) + (r >> 1) * 8;
                const int col = n0 + wn * WTN + ni * 8 + (lane & 3) * 2 + (r & 1);
                if (row < M && col < NG) {{
                    const float v = acc[mi][ni][r];
                    float stored = v;
{epi}
                    (void)stored;
{stats_acc}                }}
            }}
",
        epi = g.epilogue,
    );
    if g.stats {
        let _ = write!(
            w,
            "    // Statistics: sum the 8 row groups of the warp (lanes with equal lane % 4), then
    // lanes 0..3 add their two columns per n8 tile.
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
        for (int h = 0; h < 2; ++h) {{
            float a = ssum[ni][h], b = ssq[ni][h];
            for (int o = 4; o < 32; o <<= 1) {{
                a += __shfl_xor_sync(0xffffffffu, a, o);
                b += __shfl_xor_sync(0xffffffffu, b, o);
            }}
            const int col = n0 + wn * WTN + ni * 8 + lane * 2 + h;
            if (lane < 4 && col < NG) {{
                atomicAdd(&stats[col], a);
                atomicAdd(&stats[OC + col], b);
            }}
        }}
"
        );
    }
    w.push_str("}\n");
    Ok(s)
}

fn store(out: OutType, ptr: &str, idx: &str, val: &str) -> String {
    match out {
        OutType::Bf16 => format!(
            "                    {ptr}[{idx}] = wrnc_f32_bf16({val});
                    stored = wrnc_bf16_f32({ptr}[{idx}]);"
        ),
        OutType::F32 => format!(
            "                    {ptr}[{idx}] = {val};
                    stored = {val};"
        ),
    }
}

fn load(out: OutType, ptr: &str, idx: &str) -> String {
    match out {
        OutType::Bf16 => format!("wrnc_bf16_f32({ptr}[{idx}])"),
        OutType::F32 => format!("{ptr}[{idx}]"),
    }
}

/// The forward kernel `y = conv(pro(x), w) (+ res)`, with optional statistics. Signature:
/// `name(const unsigned short* x, const unsigned short* w, OUT* y[, const float* affine]
/// [, const OUT* res][, float* stats], int batch)`, `OUT` the [`OutType`]; launch with
/// [`MmaConv::grid`]`(Pass::Fwd, batch)` blocks of [`MmaConv::threads`] threads.
pub fn conv_fwd_kernel(name: &str, c: &MmaConv) -> Result<String, MmaError> {
    check_name(name)?;
    c.check(Pass::Fwd)?;
    let ot = c.out.c();
    let mut params = vec![
        "const unsigned short* __restrict__ x".to_string(),
        "const unsigned short* __restrict__ w".into(),
        format!("{ot}* __restrict__ y"),
    ];
    if c.prologue {
        params.push("const float* __restrict__ affine".into());
    }
    if c.residual {
        params.push(format!("const {ot}* __restrict__ res"));
    }
    if c.stats {
        params.push("float* __restrict__ stats".into());
    }
    params.push("int batch".into());
    let val = if c.residual {
        format!("v + {}", load(c.out, "res", "row * OC + col"))
    } else {
        "v".into()
    };
    let g = Gemm {
        name,
        c,
        params,
        m: "batch * OH * OW",
        n: "OC",
        k: "KS * KS * IC",
        a: Operand {
            kmajor: true,
            base: "x",
            addr: patch_addr("r", "kk", "r < M && kk < K"),
            prologue: c.prologue,
        },
        b: Operand {
            kmajor: true,
            base: "w",
            addr: "if (r < NG && kk < K) src = w + r * K + kk;".into(),
            prologue: false,
        },
        epilogue: format!(
            "                    const float o = {val};\n{}",
            store(c.out, "y", "row * OC + col", "o")
        ),
        stats: c.stats,
    };
    Ok(format!("{MMA_CUH}\n{}", emit(&g)?))
}

/// The data-gradient kernel `dx (+)= conv_transpose(dy, w)`. Signature:
/// `name(const unsigned short* dy, const unsigned short* w, OUT* dx, int batch)`; launch with
/// [`MmaConv::grid`]`(Pass::BwdData, batch)`.
pub fn conv_bwd_data_kernel(name: &str, c: &MmaConv) -> Result<String, MmaError> {
    check_name(name)?;
    c.check(Pass::BwdData)?;
    let ot = c.out.c();
    let params = vec![
        "const unsigned short* __restrict__ dy".to_string(),
        "const unsigned short* __restrict__ w".into(),
        format!("{ot}* __restrict__ dx"),
        "int batch".into(),
    ];
    let val = if c.accumulate {
        format!("v + {}", load(c.out, "dx", "row * IC + col"))
    } else {
        "v".into()
    };
    let g = Gemm {
        name,
        c,
        params,
        m: "batch * H * W",
        n: "IC",
        k: "KS * KS * OC",
        a: Operand {
            kmajor: true,
            base: "dy",
            addr: "if (r < M && kk < K) {
                const int co = kk % OC, tap = kk / OC, kw = tap % KS, kh = tap / KS;
                const int iw = r % W, t = r / W, ih = t % H, nb = t / H;
                const int th = ih + P - kh, tw = iw + P - kw;
                if (th >= 0 && tw >= 0 && th % S == 0 && tw % S == 0 && th / S < OH && tw / S < OW)
                    src = dy + ((nb * OH + th / S) * OW + tw / S) * OC + co;
            }"
            .into(),
            prologue: false,
        },
        b: Operand {
            kmajor: false,
            base: "w",
            addr: "if (kk < K && r < NG) {
                const int co = kk % OC, tap = kk / OC;
                src = w + (co * KS * KS + tap) * IC + r;
            }"
            .into(),
            prologue: false,
        },
        epilogue: format!(
            "                    const float o = {val};\n{}",
            store(c.out, "dx", "row * IC + col", "o")
        ),
        stats: false,
    };
    Ok(format!("{MMA_CUH}\n{}", emit(&g)?))
}

/// The weight-gradient kernel `dw = sum_pixels dy (x) pro(x)` (f32, OHWI), split over
/// `c.split_k` slices of the pixels: `name(const unsigned short* x, const unsigned short* dy,
/// float* part[, const float* affine], int batch)` writes slice `z` to `part + z * weight_len`;
/// with `split_k == 1`, `part` is `dw` itself. With `split_k > 1` it also emits
/// `name_reduce(const float* part, float* dw, int splits, int total)`: `dw[i] = sum_z
/// part[z * total + i]` in slice order (deterministic), one thread per element.
pub fn conv_bwd_weight_kernel(name: &str, c: &MmaConv) -> Result<String, MmaError> {
    check_name(name)?;
    c.check(Pass::BwdWeight)?;
    let mut params = vec![
        "const unsigned short* __restrict__ x".to_string(),
        "const unsigned short* __restrict__ dy".into(),
        "float* __restrict__ part".into(),
    ];
    if c.prologue {
        params.push("const float* __restrict__ affine".into());
    }
    params.push("int batch".into());
    let g = Gemm {
        name,
        c,
        params,
        m: "OC",
        n: "KS * KS * IC",
        k: "batch * OH * OW",
        a: Operand {
            kmajor: false,
            base: "dy",
            addr: "if (kk < K && r < M) src = dy + kk * OC + r;".into(),
            prologue: false,
        },
        b: Operand {
            kmajor: false,
            base: "x",
            addr: patch_addr("kk", "r", "kk < K && r < NG"),
            prologue: c.prologue,
        },
        epilogue: "                    part[blockIdx.z * (M * NG) + row * NG + col] = v;".into(),
        stats: false,
    };
    let mut s = format!("{MMA_CUH}\n{}", emit(&g)?);
    if c.split_k > 1 {
        let _ = write!(
            s,
            "
// Sums the split-K slices of {name} in slice order.
extern \"C\" __global__ void {name}_reduce(const float* __restrict__ part, float* __restrict__ dw, int splits, int total) {{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    float s = 0.0f;
    for (int z = 0; z < splits; ++z) s += part[z * total + i];
    dw[i] = s;
}}
"
        );
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_tiles_are_valid_for_every_pass() {
        for pass in [Pass::Fwd, Pass::BwdData, Pass::BwdWeight] {
            for &(m, n, k) in &[
                (1u64, 8u64, 8u64),
                (128, 16, 144),
                (100_000, 640, 5760),
                (640, 5760, 100_000),
            ] {
                let t = default_tile(pass, m, n, k);
                let (a, b) = layouts(pass);
                t.check(a, b).unwrap();
                let s = default_split_k(m, n, k, &t);
                assert!((1..=32).contains(&s));
            }
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let ok = MmaConv::new(16, 32, 8, 8, 3, 1, 1);
        assert!(conv_fwd_kernel("k", &ok).is_ok());
        let cases: Vec<(&str, MmaConv)> = vec![
            ("1k", ok),
            ("k-x", ok),
            ("k", MmaConv { in_c: 12, ..ok }),
            ("k", MmaConv { k: 0, ..ok }),
            ("k", MmaConv { stride: 0, ..ok }),
            ("k", MmaConv { pad: 3, ..ok }),
            (
                "k",
                MmaConv {
                    in_h: 1,
                    pad: 0,
                    ..ok
                },
            ),
            (
                "k",
                MmaConv {
                    accumulate: true,
                    ..ok
                },
            ),
            ("k", MmaConv { split_k: 2, ..ok }),
            (
                "k",
                MmaConv {
                    in_c: u32::MAX - 7,
                    ..ok
                },
            ),
            (
                "k",
                MmaConv {
                    tile: Tile { bk: 24, ..ok.tile },
                    ..ok
                },
            ),
            (
                "k",
                MmaConv {
                    tile: Tile {
                        stages: 1,
                        ..ok.tile
                    },
                    ..ok
                },
            ),
            (
                "k",
                MmaConv {
                    tile: Tile {
                        warps_m: 1 << 31,
                        warps_n: 2,
                        ..ok.tile
                    },
                    ..ok
                },
            ),
            (
                "k",
                MmaConv {
                    k: 1 << 20,
                    pad: 0,
                    in_h: u32::MAX,
                    ..ok
                },
            ),
            ("k", MmaConv::new(8, 8, u32::MAX, u32::MAX, 1, 1, 0)),
            (
                "k",
                MmaConv {
                    tile: Tile {
                        bm: 512,
                        bn: 512,
                        ..ok.tile
                    },
                    ..ok
                },
            ),
        ];
        for (name, c) in cases {
            assert!(conv_fwd_kernel(name, &c).is_err(), "{name} {c:?}");
        }
        assert!(conv_bwd_data_kernel(
            "k",
            &MmaConv {
                prologue: true,
                ..ok
            }
        )
        .is_err());
        assert!(conv_bwd_weight_kernel("k", &MmaConv { stats: true, ..ok }).is_err());
        assert!(ok.grid(Pass::Fwd, 0).is_err());
        assert!(ok.grid(Pass::Fwd, u32::MAX).is_err());
    }

    /// Arbitrary field values (extremes included) give a kernel or an error, never a panic.
    #[test]
    fn arbitrary_inputs_never_panic() {
        let picks = [
            0u32,
            1,
            2,
            3,
            7,
            8,
            15,
            16,
            31,
            32,
            64,
            4096,
            1 << 31,
            u32::MAX,
        ];
        let mut s = 0x9e3779b97f4a7c15u64;
        let mut pick = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            picks[(s >> 33) as usize % picks.len()]
        };
        for _ in 0..3000 {
            let c = MmaConv {
                in_c: pick(),
                out_c: pick(),
                in_h: pick(),
                in_w: pick(),
                k: pick(),
                stride: pick(),
                pad: pick(),
                out: OutType::F32,
                prologue: pick() % 2 == 0,
                residual: pick() % 2 == 0,
                stats: pick() % 2 == 0,
                accumulate: pick() % 2 == 0,
                tile: Tile {
                    bm: pick(),
                    bn: pick(),
                    bk: pick(),
                    warps_m: pick(),
                    warps_n: pick(),
                    stages: pick(),
                },
                split_k: pick(),
            };
            let batch = pick();
            for pass in [Pass::Fwd, Pass::BwdData, Pass::BwdWeight] {
                let _ = c.with_default_tile(pass, batch).grid(pass, batch);
                let _ = c.grid(pass, batch);
            }
            let _ = conv_fwd_kernel("k", &c);
            let _ = conv_bwd_data_kernel("k", &c);
            let _ = conv_bwd_weight_kernel("k", &c);
        }
    }

    #[test]
    fn generation_is_deterministic_and_names_the_kernel() {
        let c = MmaConv {
            prologue: true,
            residual: true,
            stats: true,
            ..MmaConv::new(32, 64, 16, 16, 3, 2, 1)
        };
        let a = conv_fwd_kernel("fwd", &c).unwrap();
        assert_eq!(a, conv_fwd_kernel("fwd", &c).unwrap());
        assert!(a.contains("void __launch_bounds__("));
        assert!(a.contains(" fwd(const unsigned short* __restrict__ x"));
        let w = MmaConv {
            split_k: 3,
            ..c.with_default_tile(Pass::BwdWeight, 4)
        };
        let w = MmaConv {
            stats: false,
            residual: false,
            ..w
        };
        let s = conv_bwd_weight_kernel("wg", &w).unwrap();
        assert!(s.contains("void wg_reduce("));
    }
}
