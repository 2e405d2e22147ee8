//! Kernel specifications: everything that decides a kernel's code, and nothing else.
//!
//! Convolution geometry (channels, spatial sizes, window) is a compile-time constant of a conv
//! kernel, so its index arithmetic folds. Every other kernel (BN statistics / apply / backward,
//! pooling, zero-pad shortcuts, concatenation) takes its channel count and spatial sizes as
//! runtime arguments (upper-case scalars `C`, `HW`, `IH`, ...), and the batch size and element
//! counts are always runtime arguments: one BN kernel serves every layer, one conv kernel every
//! layer with the same geometry and fusion, which keeps networks whose width changes block by
//! block (PyramidNet) to a few hundred kernels.

use super::{BufArg, Dtype, ScalarArg, TmapArg};
use crate::graph::Pool;
use serde::Serialize;

/// How a launch touches a buffer argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    Read,
    Write,
    ReadWrite,
}

/// Element type of a kernel parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ElemKind {
    /// Activation storage: `float`, or bf16 bits in `--precision bf16`.
    Act,
    F32,
    /// bf16 bits in either precision (the tensor cores' packed weights, [`KernelSpec::PackWeight`]).
    Bf16,
    I32,
    U32,
}

/// Scalar parameter type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ScalarKind {
    I32,
    U32,
    F32,
}

/// A buffer parameter of a kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufParam {
    pub name: &'static str,
    pub access: Access,
    pub elem: ElemKind,
}

impl BufParam {
    pub fn dtype_ok(&self, d: Dtype) -> bool {
        matches!(
            (self.elem, d),
            (ElemKind::Act, Dtype::F32 | Dtype::Bf16)
                | (ElemKind::F32, Dtype::F32)
                | (ElemKind::Bf16, Dtype::Bf16)
                | (ElemKind::I32, Dtype::I32)
                | (ElemKind::U32, Dtype::U32)
        )
    }
}

/// Geometry of a convolution (per image): spatial sizes, window and groups. The channel counts
/// `IC`, `OC` and the batch `n` are runtime arguments; they only scale indices and bound the
/// reduction loop, while every division in the index arithmetic is by a constant here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct ConvGeom {
    pub in_h: u32,
    pub in_w: u32,
    pub out_h: u32,
    pub out_w: u32,
    pub k: u32,
    pub stride: u32,
    pub pad: u32,
    pub groups: u32,
    /// The GEMM runs on the tensor cores (bf16 `mma.sync` operands, fp32 accumulation, block
    /// tiles of `tile`; `--precision bf16`), not as fp32 FMAs (64x64 tiles). Part of the
    /// kernel's identity: it changes the code (name suffix `_tc`) and the launch grid.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub tensor_cores: bool,
    /// The tensor-core block tile (only meaningful with `tensor_cores`; [`TcTile::DEFAULT`]
    /// otherwise). Part of the kernel's identity (name suffix `_t<rows>x<cols>` when not the
    /// default).
    #[serde(skip_serializing_if = "TcTile::is_default")]
    pub tile: TcTile,
    /// Activations are channels-last (NHWC, [`Layout::Nhwc`](super::Layout::Nhwc)); the reduction index of the
    /// patch operand then runs `(kh, kw, c)` with `c` fastest, so consecutive threads gather
    /// consecutive channels. Weights stay OIHW either way. Name suffix `_nhwc`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub nhwc: bool,
    /// Vector operand loads (only with `tensor_cores` and `nhwc`, and only where the channels
    /// per group of both the input and the output are multiples of 8): every operand moves as
    /// runs of 8 channels (16 bytes of bf16, or 32 bytes of f32 with `tf32` / `tf32x3`: two
    /// 16-byte copies) by `cp.async` into a multi-stage shared-memory ring, instead of one
    /// element per thread through registers. The forward and data-gradient passes then read a
    /// weight packed for them ([`KernelSpec::PackWeight`]: bf16, or f32 for the TF32 engines);
    /// the weight gradient reads `dy` and `x` as they are. Changes no value. Name suffix `_v8`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub vec: bool,
    /// Hopper's warpgroup MMA (`wgmma.mma_async`, sm_90a) instead of `mma.sync` (only with
    /// `vec`, in all three passes (the weight gradient's stages transposed in shared memory,
    /// [`AsyncSmem::transposed`]), and with a tile of at least 64 rows; bf16 or plain TF32,
    /// never 3xTF32; see [`super::Tiles::wgmma`]). Changes no value's algebra (TF32 operands
    /// are rounded in shared memory, where `mma.sync` rounds its fragments). Name suffix `_wg`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub wgmma: bool,
    /// Shared-memory stages of the `cp.async` ring of a vector-loading convolution (only with
    /// `vec`; see [`super::Tiles::stages`]): 0 chooses as many (2 to 4) as fit in static
    /// shared memory; 2 to 8 asks for that many, in dynamic shared memory where they need more
    /// than static shared memory holds ([`ConvGeom::async_smem`]). Changes no value. Name
    /// suffix `_s<n>` when not 0.
    #[serde(skip_serializing_if = "is_zero")]
    pub stages: u32,
    /// The weight operand (B) of a `wgmma` pass arrives by the tensor memory accelerator
    /// (only with `wgmma`; see [`super::Tiles::tma`]): per stage, thread 0 issues one
    /// `cp.async.bulk.tensor` of 32 reduction indices x `tile.cols` rows (64-byte swizzle),
    /// completing on the slot's `mbarrier`, and the launch passes the weight's tensor map
    /// ([`super::TmapArg`]) by value. Changes no value. Name suffix `_tma`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub tma: bool,
    /// The activation operand (A: `x` forward, `dy` data gradient) arrives by TMA too (only
    /// with `tma`, where [`KernelSpec::act_box`] finds the tile to be a box of the image): per
    /// stage one 4-D box of 32 channels of the tile's pixels, shifted by the stage's tap, on
    /// the same `mbarrier`; TMA's zero fill outside the image is the conv's zero padding, and
    /// the prologue still runs in shared memory (padding skipped). The launch passes the
    /// activation's tensor map `tmx` after `tmw`. Changes no value. Name suffix `_tmaa`
    /// (instead of `_tma`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub tma_a: bool,
    /// An f32 convolution on the tensor cores (only with `tensor_cores`; with `vec` the
    /// operands arrive as f32 by `cp.async`; see [`super::Tiles::tf32x3`]): fp32 operands, each split into a TF32 high part and the
    /// TF32 rounding of its remainder, and three `mma.sync.m16n8k8.tf32` per fragment pair
    /// (`lo*hi + hi*lo + hi*hi`, fp32 accumulation), which keeps fp32's accuracy (relative
    /// error of a product about 2^-21) at tensor-core speed. Operands and results stay f32;
    /// the reference treats the operands as exact. Name suffix `_x3` (after `_tc`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub tf32x3: bool,
    /// An f32 convolution on the tensor cores in plain TF32 (only with `tensor_cores`, never
    /// with `tf32x3`; with `vec` as `tf32x3`; see [`super::Tiles::tf32`]): the 3xTF32 kernel with only its
    /// `hi*hi` product, one `mma.sync.m16n8k8.tf32` per fragment pair, as cuDNN's convolutions
    /// run under PyTorch's default (`torch.backends.cudnn.allow_tf32`). Each operand is
    /// rounded to TF32 (`cvt.rna`: 11 significant bits, ties away from zero) as the fragment
    /// is read; the products are exact in the fp32 accumulator. Operands and results stay
    /// f32 in memory; the reference rounds the operands as the kernel does
    /// (`reference::tf32_round`). Name suffix `_tf32` (after `_tc`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub tf32: bool,
    /// The data gradient of a strided convolution (only `ConvBwdData`, stride `S > 1`, input
    /// height and width multiples of `S`; see [`ConvGeom::phases_fit`]) runs its rows in phase
    /// order: GEMM row `m` is input pixel `(ni, i S + ph / S, j S + ph % S)` of phase
    /// `ph = m / (n (IH / S) (IW / S))`, and a block whose rows all lie in one phase reduces
    /// over only the taps that reach that phase (`kh = (ph / S + P) mod S`, then every `S`-th;
    /// likewise `kw`), about `1 / S^2` of them. Every other tap's `dy` index is not a multiple
    /// of `S`, so it adds exact zeros: the same sum, its other terms in the same order (the
    /// same bits on the FMA engine; the tensor cores may group the products into their
    /// instructions differently). A block straddling two phases reduces over every tap,
    /// masked, as without `phases`. Name suffix `_ph`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub phases: bool,
    /// A bf16 forward or data-gradient `wgmma` pass (only with `wgmma`, bf16 operands, and a
    /// reduction of at least 64; see [`super::Tiles::k64`]) whose stages hold 64 reduction
    /// indices instead of 32: rows of
    /// 128 bytes in the 128-byte swizzle mode (chunk `c` of row `r` at chunk `c ^ (r % 8)`,
    /// 1024-byte atoms), four `wgmma` k16 steps per stage and barrier instead of two. With
    /// `tma` the boxes are 64 reduction indices wide (the weight's reduction at least 64, and
    /// a stage within one tap: channels per group multiples of 64 for the activation's box
    /// and for a data gradient in phase order). Changes no value's algebra (the same products,
    /// the same k order). Name suffix `_k64`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub k64: bool,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// Shared memory a block may declare statically, without opting in to more: 48 KiB.
pub const STATIC_SMEM: u32 = 48 * 1024;

/// What a tensor-core GEMM's own shared-memory array may take of [`STATIC_SMEM`]: the
/// epilogue's reduction arrays (2 x 16 x 17 f32) and small prelude arrays need the rest.
pub const TC_STATIC_SMEM: u32 = 46 * 1024;

/// The ring a [`ConvGeom::k64`] pass takes by default (dynamic shared memory): as many
/// stages, 2 to 4, as fit in 96 KiB (128x128: 3 stages of 32 KiB; 128x64 and 64x128: 4 of 24;
/// 64x64: 4 of 16), so that two blocks of the largest tile share a Hopper SM's 228 KiB.
pub const K64_SMEM: u32 = 96 * 1024;

/// Channels per block of an NHWC channel reduction ([`KernelSpec::ChannelSums`],
/// [`KernelSpec::BnBwdReduce`]): `threadIdx.x`, so a half-warp reads 16 consecutive channels
/// of one pixel (32 contiguous bytes in bf16, 64 in f32).
pub const NHWC_RED_CH: u32 = 16;
/// Pixel lanes per block of an NHWC channel reduction (`threadIdx.y`): lane `l` sums pixels
/// `l, l + 32, ...`, and the block adds the lanes in lane order.
pub const NHWC_RED_LANES: u32 = 32;

/// Streaming multiprocessors of the GPU the schedules' grids are sized for (an H100 SXM or an
/// H200, both 132; a schedule must not depend on the device it runs on, so that modules
/// compiled ahead of time match): split-K GEMMs ([`super::SPLIT_K_MIN_BLOCKS`]) and split per-channel
/// reductions ([`RED_TARGET_BLOCKS`]) fill this many SMs. Another GPU runs the same grids,
/// balanced a little worse.
pub const GPU_SMS: u64 = 132;

/// Blocks a split per-channel reduction (BN statistics, [`KernelSpec::ChannelSums`]; dBN,
/// [`KernelSpec::BnBwdReduce`]) aims for: four per SM of a [`GPU_SMS`]-SM Hopper, since these are
/// memory-bound and want many loads in flight. One block per channel (NCHW) or per
/// [`NHWC_RED_CH`] channels (NHWC) is 1 to 640 blocks for WRN-28-10's BNs, most of the GPU
/// idle while the small counts read 4 to 84 MB.
pub const RED_TARGET_BLOCKS: u64 = 4 * GPU_SMS;
/// The fewest pixels a split channel reduction gives one block (8 per lane of an NHWC block).
pub const RED_MIN_PIXELS: u64 = 256;

/// Pixel ranges (`gridDim.y`) of a BN's statistics or dBN reduction over `c` channels and
/// `pixels` (= n * h * w) pixels: enough that the grid has about [`RED_TARGET_BLOCKS`] blocks, none
/// with fewer than [`RED_MIN_PIXELS`] pixels; 1 (no split) where that is 1.
pub fn channel_reduce_splits(nhwc: bool, c: u64, pixels: u64) -> u64 {
    let blocks = channel_reduce_shape(nhwc, c).0[0].max(1);
    RED_TARGET_BLOCKS
        .div_ceil(blocks)
        .min(pixels / RED_MIN_PIXELS)
        .max(1)
}

/// Grid and block of a per-channel reduction over `c` channels: NCHW one block of 256 threads
/// per channel (each reads its channel's contiguous planes); NHWC one block of
/// [`NHWC_RED_CH`] x [`NHWC_RED_LANES`] threads per [`NHWC_RED_CH`] channels, since one
/// channel of an NHWC tensor is strided by `c` elements. A split reduction adds
/// [`channel_reduce_splits`] pixel ranges as `gridDim.y`.
pub fn channel_reduce_shape(nhwc: bool, c: u64) -> ([u64; 3], [u32; 3]) {
    if nhwc {
        (
            [c.div_ceil(NHWC_RED_CH as u64), 1, 1],
            [NHWC_RED_CH, NHWC_RED_LANES, 1],
        )
    } else {
        ([c, 1, 1], [256, 1, 1])
    }
}

/// Most pipeline stages a vector-loading convolution may ask for ([`ConvGeom::stages`]).
pub const MAX_STAGES: u32 = 8;

/// The shared memory of a vector-loading convolution's GEMM (`gemm_tc_async` in
/// `codegen::cuda`): a ring of `stages` stages of `stage_bytes`, whose bytes the epilogue's
/// accumulator slab ([`TcTile::cs_bytes`]) reuses once the reduction is done.
///
/// Invariant: `bytes = max(stages * stage_bytes + 2 * transposed, tile.cs_bytes())`; `dynamic` exactly when
/// `bytes > TC_STATIC_SMEM`, and then the kernel declares no array of its own for them but
/// takes them from the launch's dynamic shared memory ([`super::Launch::shared`] = `bytes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AsyncSmem {
    pub stages: u32,
    pub stage_bytes: u32,
    pub bytes: u32,
    pub dynamic: bool,
    /// Bytes of one of the two K-major stage buffers a transposing `wgmma` pass (the TF32
    /// weight gradient on `wgmma`) fills from its landed stage, after the ring (at
    /// `stages * stage_bytes`, 1024-byte aligned); 0 for every other pass.
    pub transposed: u32,
}

/// A tensor-core block tile: `rows x cols` GEMM outputs per block of 256 threads (8 warps in a
/// `warps().0 x warps().1` grid, each warp `rows / warps().0 x cols / warps().1` outputs made of
/// m16n8 `mma.sync` tiles). Only the [`TcTile::CANDIDATES`] exist: they keep the warp tile a
/// multiple of 16 x 16 (B fragments come two n8 tiles per `ldmatrix.x4`) and the block's shared
/// memory within 48 KiB (the accumulator tile `rows x (cols + 1)` f32 reuses the operand tiles'
/// memory; the 128x128 tile's goes through it in two halves of its rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct TcTile {
    pub rows: u32,
    pub cols: u32,
}

impl Default for TcTile {
    fn default() -> TcTile {
        TcTile::DEFAULT
    }
}

impl TcTile {
    /// The tile a schedule uses where nothing else was chosen (no GPU, no tuning).
    pub const DEFAULT: TcTile = TcTile { rows: 64, cols: 64 };
    /// Every tile the tensor-core engine generates, the default first.
    pub const CANDIDATES: [TcTile; 6] = [
        TcTile::DEFAULT,
        TcTile {
            rows: 128,
            cols: 64,
        },
        TcTile {
            rows: 128,
            cols: 128,
        },
        TcTile {
            rows: 64,
            cols: 128,
        },
        TcTile { rows: 32, cols: 64 },
        TcTile { rows: 64, cols: 32 },
    ];

    pub fn is_default(&self) -> bool {
        *self == TcTile::DEFAULT
    }

    /// Row slabs the tensor-core epilogue stages its accumulators in: the whole
    /// `rows x (cols + 1)` f32 tile where it fits in [`TC_STATIC_SMEM`], else two halves of
    /// the rows (the 128x128 tile) one after the other.
    pub fn cs_halves(self) -> u32 {
        if self.rows * (self.cols + 1) * 4 > TC_STATIC_SMEM {
            2
        } else {
            1
        }
    }

    /// Bytes of the epilogue's accumulator slab ([`TcTile::cs_halves`]).
    pub fn cs_bytes(self) -> u32 {
        self.rows / self.cs_halves() * (self.cols + 1) * 4
    }

    /// The warp grid `(warp rows, warp columns)`: 4 x 2 for tall tiles, else 2 x 4.
    pub fn warps(self) -> (u32, u32) {
        if self.rows > self.cols {
            (4, 2)
        } else {
            (2, 4)
        }
    }

    /// `"128x64"` -> the candidate tile; `None` for anything else.
    pub fn parse(s: &str) -> Option<TcTile> {
        let (r, c) = s.trim().split_once('x')?;
        let t = TcTile {
            rows: r.parse().ok()?,
            cols: c.parse().ok()?,
        };
        TcTile::CANDIDATES.contains(&t).then_some(t)
    }
}

impl std::fmt::Display for TcTile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.rows, self.cols)
    }
}

impl ConvGeom {
    /// Rows and columns of output one block computes (the launch grid divides by them): the
    /// tensor-core tile, or 64x64 for the fp32 engine (a 4x4 register tile per thread).
    pub fn block_tile(&self) -> (u32, u32) {
        if self.tensor_cores {
            (self.tile.rows, self.tile.cols)
        } else {
            (64, 64)
        }
    }

    /// The tensor cores multiply f32 operands as TF32 ([`ConvGeom::tf32`],
    /// [`ConvGeom::tf32x3`]): operands stay f32 in memory and in shared memory (the packed
    /// weight of a `vec` pass included), where bf16 operands would be bf16.
    pub fn f32_operands(&self) -> bool {
        self.tensor_cores && (self.tf32 || self.tf32x3)
    }

    /// Reduction indices per stage of the `cp.async` ring (and per TMA box): 64 with
    /// [`ConvGeom::k64`], else 32.
    pub fn bk(&self) -> u32 {
        if self.k64 {
            64
        } else {
            32
        }
    }

    /// Whether the data gradient of this convolution can run in phase order
    /// ([`ConvGeom::phases`]): a stride above 1 and an input whose height and width are
    /// multiples of it (every phase the same number of pixels).
    pub fn phases_fit(&self) -> bool {
        self.stride > 1
            && self.in_h.is_multiple_of(self.stride)
            && self.in_w.is_multiple_of(self.stride)
    }

    fn tag(&self) -> String {
        format!(
            "i{}x{}_o{}x{}_k{}s{}p{}g{}{}{}{}{}{}{}{}{}{}{}",
            self.in_h,
            self.in_w,
            self.out_h,
            self.out_w,
            self.k,
            self.stride,
            self.pad,
            self.groups,
            match (self.tensor_cores, self.tile.is_default()) {
                (false, _) => String::new(),
                (true, true) => "_tc".into(),
                (true, false) => format!("_tc_t{}", self.tile),
            },
            if self.tf32x3 { "_x3" } else { "" },
            if self.tf32 { "_tf32" } else { "" },
            if self.nhwc { "_nhwc" } else { "" },
            if self.vec { "_v8" } else { "" },
            if self.wgmma { "_wg" } else { "" },
            if self.k64 { "_k64" } else { "" },
            if self.stages != 0 {
                format!("_s{}", self.stages)
            } else {
                String::new()
            },
            if self.tma_a {
                "_tmaa"
            } else if self.tma {
                "_tma"
            } else {
                ""
            },
            if self.phases { "_ph" } else { "" },
        )
    }

    /// The shared memory of this convolution's `cp.async` GEMM (meaningful with `vec`) for a
    /// pass whose operands are stored K-contiguous (`kmajor`: forward and data gradient) or
    /// not (weight gradient). A stage holds 32 reduction indices (64 with [`ConvGeom::k64`],
    /// whose rows are 128 bytes) of both operands: rows of 64
    /// bytes in the 64-byte swizzle mode, unpadded (`wgmma`), K-contiguous rows of 32 + 8 halves, or 32
    /// rows of `rows + 8` / `cols + 8` halves (the 8 halves of padding keep rows 16-byte
    /// aligned and put the 8 rows an `ldmatrix` reads in distinct banks). With f32 operands
    /// ([`ConvGeom::f32_operands`]) the elements are floats: K-contiguous rows of 32 + 4, or
    /// rows of `rows + 8` / `cols + 8` (either way the fragment reads of a warp, 8 rows x 4
    /// reduction indices, fall in 32 distinct banks), or for `wgmma` (plain TF32) two halves of
    /// 16 reduction indices, each in bf16's swizzled rows of 64 bytes. Stages: `stages` when
    /// set, else as many as fit in [`TC_STATIC_SMEM`] (in [`K64_SMEM`] with
    /// [`ConvGeom::k64`], whose stages hold 64 reduction indices: rows of 128 bytes), 2 to 4.
    pub fn async_smem(&self, kmajor: bool) -> AsyncSmem {
        let t = self.tile;
        let stage_bytes = if self.f32_operands() {
            if self.wgmma && kmajor && t.rows >= 64 {
                // two halves of 16 reduction indices, rows of 64 bytes (the swizzle's)
                (t.rows + t.cols) * 128
            } else if kmajor {
                (t.rows + t.cols) * 144
            } else {
                128 * (t.rows + t.cols + 16)
            }
        } else if self.wgmma && kmajor && t.rows >= 64 {
            // rows of 64 or (`k64`) 128 bytes, the swizzle's
            (t.rows + t.cols) * 2 * self.bk()
        } else if kmajor {
            (t.rows + t.cols) * 80
        } else {
            64 * (t.rows + t.cols + 16)
        };
        // the TF32 weight gradient on wgmma: its stages land `[k][m]` as above and are
        // transposed into one of two K-major buffers of the 64-byte swizzle
        let transposed = match (self.wgmma && !kmajor && t.rows >= 64, self.f32_operands()) {
            (true, true) => (t.rows + t.cols) * 128,
            (true, false) => (t.rows + t.cols) * 64,
            (false, _) => 0,
        };
        let stages = if self.stages != 0 {
            self.stages
        } else if self.k64 {
            (K64_SMEM / stage_bytes).clamp(2, 4)
        } else {
            ((TC_STATIC_SMEM.saturating_sub(2 * transposed)) / stage_bytes).clamp(2, 4)
        };
        let bytes = (stages * stage_bytes + 2 * transposed).max(t.cs_bytes());
        AsyncSmem {
            stages,
            stage_bytes,
            bytes,
            dynamic: bytes > TC_STATIC_SMEM,
            transposed,
        }
    }
}

/// A conv's input transform on load (see [`crate::passes::ProloguePlan`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
pub struct PrologueFlags {
    /// `x * scale[c] + shift[c]` (a BN).
    pub affine: bool,
    pub relu: bool,
    /// Inverted dropout, mask from the RNG.
    pub dropout: bool,
}

impl PrologueFlags {
    pub fn any(&self) -> bool {
        self.affine || self.relu || self.dropout
    }
    fn tag(&self) -> String {
        let mut s = String::new();
        if self.affine {
            s.push_str("bn");
        }
        if self.relu {
            s.push_str("relu");
        }
        if self.dropout {
            s.push_str("drop");
        }
        s
    }
}

/// A conv's output transform.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
pub struct EpilogueFlags {
    /// `+ bias[o]`.
    pub bias: bool,
    /// `+ residual[i]` (a fused Add).
    pub residual: bool,
    /// Per-channel sum and sum of squares of the result, atomically added into `stats`.
    pub stats: bool,
    /// `relu(..)` of the sum, last (a fused ReLU, inference): `v > 0 ? v : 0`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub relu: bool,
}

impl EpilogueFlags {
    fn tag(&self) -> String {
        let mut s = String::new();
        if self.bias {
            s.push_str("_bias");
        }
        if self.residual {
            s.push_str("_res");
        }
        if self.stats {
            s.push_str("_stats");
        }
        if self.relu {
            s.push_str("_relu");
        }
        s
    }
}

/// Everything that decides a kernel's code. Runtime arguments: `n` (batch) or `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum KernelSpec {
    /// `y = epi(conv(pro(x), w))`, tiled implicit GEMM (M = n*OH*OW pixels, N = OC/g, K = IC/g*k*k).
    /// With `split_k > 1` (tensor cores, inference, no `epi.stats`) the reduction is cut into
    /// `split_k` slices of whole 32-steps in the layout's reduction order (`(kh, kw, c)` NHWC,
    /// `(c, kh, kw)` NCHW), slice `s` covering `[s * chunk, (s + 1) * chunk)` with `chunk =
    /// ceil(K / (32 split_k)) * 32`; `y` (f32) then holds `split_k` partial convolutions one
    /// after another, without `epi`, and [`KernelSpec::SplitKEpilogue`] sums them and applies
    /// `epi` (the flags stay in the spec, so in its name and tile key).
    ConvFwd {
        g: ConvGeom,
        pro: PrologueFlags,
        epi: EpilogueFlags,
        #[serde(skip_serializing_if = "is_one")]
        split_k: u32,
    },
    /// `dx (+)= conv_transpose(dy, w)`; with `chain`, the epilogue applies a BN chain's
    /// dReLU / dropout masks (recomputed from the pre-activation `x`) and accumulates dBN's
    /// reductions (`sum g`, `sum g * xhat`) into `sums`, writing `g` (the BN output gradient).
    ConvBwdData {
        g: ConvGeom,
        chain: PrologueFlags,
    },
    /// `dw = sum_{n,oh,ow} dy * pro(x)` (the prologue recomputes the activation). With
    /// `split_k > 1` (any engine) the pixel reduction is cut into `split_k` slices of
    /// whole 32-steps, slice `s` covering flat pixels `[s * chunk, (s + 1) * chunk)` with
    /// `chunk = ceil(n*OH*OW / (32 split_k)) * 32`, and `dw` holds `split_k` partial gradients one
    /// after another; [`KernelSpec::SplitKReduce`] sums them.
    ConvBwdWeight {
        g: ConvGeom,
        pro: PrologueFlags,
        #[serde(skip_serializing_if = "is_one")]
        split_k: u32,
    },
    /// `y = x W^T + b`.
    /// With `hw > 1` the input is an NHWC activation of `hw` pixels flattened, whose features
    /// the weights (and PyTorch) index in NCHW order `c * hw + p`: the kernel reads feature
    /// `c * hw + p` at `p * (in_f / hw) + c`.
    LinearFwd {
        in_f: u32,
        out_f: u32,
        #[serde(skip_serializing_if = "is_one")]
        hw: u32,
    },
    LinearBwdData {
        in_f: u32,
        out_f: u32,
        #[serde(skip_serializing_if = "is_one")]
        hw: u32,
    },
    LinearBwdWeight {
        in_f: u32,
        out_f: u32,
        #[serde(skip_serializing_if = "is_one")]
        hw: u32,
    },
    /// `out[ch] = sum_{n,p} x[n,ch,p]` (and, with `squares`, the centred second moment
    /// `out[c + ch] = sum (x - mean)^2`, two passes): BN batch statistics and bias gradients.
    /// Deterministic. NCHW: one block per channel. NHWC: [`channel_reduce_shape`] (a block of
    /// [`NHWC_RED_CH`] consecutive channels, read as contiguous runs). With `split` (BN
    /// statistics only, `squares`) the pixels are cut into `gridDim.y` ranges
    /// ([`channel_reduce_splits`]) and each block adds its range's sum and sum of squares
    /// (one pass, in double) to `out = [sum | sumsq | sum_lo | sumsq_lo]`, compensated pairs
    /// as a conv epilogue's statistics are (`wrnc_atomic_add_comp`), into a zeroed slot.
    ChannelSums {
        squares: bool,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        nhwc: bool,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        split: bool,
    },
    /// From `stats = [sum | sumsq]` (or `[sum | sum (x - mean)^2]` when `centered`): saved
    /// `[mean | rstd]`, affine `[scale | shift]`, running statistics update. With `zero_dsums`
    /// it also zeroes `dsums`, the BN's `[dgamma | dbeta]` gradients, which a data-gradient
    /// conv ([`KernelSpec::ConvBwdData`] with a chain) later adds into with atomics: the
    /// forward clears what the backward accumulates, instead of a launch zeroing every
    /// gradient. Name suffix `_zd`.
    BnFinalizeTrain {
        centered: bool,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        zero_dsums: bool,
    },
    /// From running statistics: affine `[scale | shift]`.
    BnFinalizeEval,
    /// `y = x * scale[c] + shift[c]`.
    BnApply {
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        nhwc: bool,
    },
    /// dBN reductions `dgamma = sum g * xhat`, `dbeta = sum g`, where `g` is `dy`, or, with a
    /// chain, `dy` through the recomputed dropout / ReLU masks. With `split` the pixels are
    /// cut into `gridDim.y` ranges ([`channel_reduce_splits`]): each block sums its range in
    /// double and adds the result to `dgamma`, `dbeta` with f32 atomics (`dgamma +=`), which
    /// the BN's [`KernelSpec::BnFinalizeTrain`] zeroed (`zero_dsums`) in the forward.
    BnBwdReduce {
        chain: PrologueFlags,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        nhwc: bool,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        split: bool,
    },
    /// `dx (+)= gamma * rstd * (g - dbeta / m - xhat * dgamma / m)`, `m = n * hw`.
    BnBwdApply {
        chain: PrologueFlags,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        nhwc: bool,
    },
    Relu,
    /// `dx (+)= y > 0 ? dy : 0`.
    ReluBwd,
    /// Inverted dropout; the mask index is the element's NCHW index (with `nhwc`, computed
    /// from `C` and `HW`), so both layouts draw the same masks.
    Dropout {
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        nhwc: bool,
    },
    DropoutBwd {
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        nhwc: bool,
    },
    /// Stochastic depth, one draw per sample (`per` elements per image at runtime).
    DropPath,
    DropPathBwd,
    /// `y = a + b`.
    Add,
    /// `y (+)= x` (gradient pass-through and identity copies).
    Accumulate,
    /// Average-pool by `S`, then zero channels up to `OC` (all sizes at runtime).
    ZeroPad {
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        nhwc: bool,
    },
    ZeroPadBwd {
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        nhwc: bool,
    },
    /// Channel concatenation (`C0`, `C1`, `HW` at runtime).
    Concat {
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        nhwc: bool,
    },
    ConcatBwd {
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        nhwc: bool,
    },
    /// Window pooling; the window is compile-time, the sizes runtime.
    MaxPool {
        pool: Pool,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        nhwc: bool,
    },
    MaxPoolBwd {
        pool: Pool,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        nhwc: bool,
    },
    AvgPool {
        pool: Pool,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        nhwc: bool,
    },
    AvgPoolBwd {
        pool: Pool,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        nhwc: bool,
    },
    /// Mean over `HW` values per row (`rows = n * C`; with `nhwc` or a prologue the runtime `C`
    /// too). With `pro` (inference: a BN, and the ReLU after it, inlined) each value is
    /// `relu(x * scale[c] + shift[c])` (`affine` = `[scale | shift]`) as it is read.
    GlobalAvgPool {
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        nhwc: bool,
        #[serde(skip_serializing_if = "no_prologue")]
        pro: PrologueFlags,
    },
    GlobalAvgPoolBwd {
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        nhwc: bool,
    },
    /// `y[n][p][c] = x[n][c][p]`: the network's NCHW input into an NHWC schedule's layout
    /// (`C`, `HW` at runtime).
    ToNhwc,
    /// Per-sample softmax cross-entropy (with label smoothing): loss and `dlogits / n`; sets
    /// `hyper[HYPER_NONFINITE]` when a loss is not finite.
    SoftmaxXent {
        classes: u32,
    },
    /// SGD with momentum, Nesterov and weight decay over every parameter tensor in one launch:
    /// `grid.y` indexes the `(start, len, decay)` table. Changes nothing when the step's loss
    /// was not finite (`hyper[HYPER_NONFINITE]`).
    SgdMultiTensor,
    /// `y[i] = 0`.
    Zero,
    /// `dw[i] = sum_{s < splits} part[s * count + i]`, in slice order (deterministic).
    SplitKReduce,
    /// A split-K forward convolution's end: `y[i] = epi(sum_{s < splits} part[s * count + i])`
    /// in slice order, `epi` as [`KernelSpec::ConvFwd`]'s (bias of the element's channel, the
    /// residual, the ReLU; never statistics). Channel of `i`: `i % C` NHWC, `i / HW % C` NCHW.
    SplitKEpilogue {
        epi: EpilogueFlags,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        nhwc: bool,
    },
    /// Inference BN folding: `w' = w * s[o]`, `b' = (b - mean) * s + beta`.
    FoldBn {
        bias: bool,
    },
    /// The bf16 copy of a conv's f32 OIHW weight (`w`, `OC x IC/groups x k x k`) in the order a
    /// vector-loading tensor-core conv ([`ConvGeom::vec`]) reads its B operand, so that 8
    /// consecutive reduction indices are 16 contiguous bytes. `data_grad = false` (forward): OHWI,
    /// `wp[o][kh][kw][i]`; `true` (data gradient): `wp[g][i][kh][kw][o]` for `o` and `i` within
    /// group `g`. Every value is rounded to bf16 (nearest even), which the conv would do anyway.
    /// With `f32` (a TF32 conv, [`ConvGeom::f32_operands`]) the copy is f32 and every value
    /// is the weight's own: the conv rounds it to TF32 as it reads it, as it rounds the OIHW
    /// weight without vector loads. Name suffix `_f32`.
    PackWeight {
        k: u32,
        groups: u32,
        data_grad: bool,
        f32: bool,
    },
}

macro_rules! b {
    ($n:expr, $a:ident, $e:ident) => {
        BufParam {
            name: $n,
            access: Access::$a,
            elem: ElemKind::$e,
        }
    };
}

impl KernelSpec {
    /// The convolution geometry of a conv kernel.
    pub fn conv_geom(&self) -> Option<&ConvGeom> {
        match self {
            KernelSpec::ConvFwd { g, .. }
            | KernelSpec::ConvBwdData { g, .. }
            | KernelSpec::ConvBwdWeight { g, .. } => Some(g),
            _ => None,
        }
    }

    /// Names of the kernel's tensor-map parameters, after its scalars: `tmw` (the packed bf16
    /// weight `w`) for a forward or data-gradient convolution with [`ConvGeom::tma`], then
    /// `tmx` (the activation operand) with [`ConvGeom::tma_a`].
    pub fn tmap_params(&self) -> Vec<&'static str> {
        match self {
            KernelSpec::ConvFwd { g, .. } | KernelSpec::ConvBwdData { g, .. } if g.tma => {
                if g.tma_a {
                    vec!["tmw", "tmx"]
                } else {
                    vec!["tmw"]
                }
            }
            _ => vec![],
        }
    }

    /// A scalar argument named `name` of a launch of this kernel with `scalars` (0 when
    /// absent or negative).
    fn scalar_u64(&self, scalars: &[ScalarArg], name: &str) -> u64 {
        let (_, names) = self.signature();
        names
            .iter()
            .zip(scalars)
            .find(|((n, _), _)| *n == name)
            .map_or(0, |(_, s)| match *s {
                ScalarArg::I32(v) => v.max(0) as u64,
                _ => 0,
            })
    }

    /// The useful multiply-adds of a launch of this kernel with `scalars`: a convolution's
    /// pass (forward, data or weight gradient alike) `n OH OW K^2 (IC / groups) OC`, a linear
    /// layer's `n in_f out_f`; `None` for a kernel that is not a GEMM. Useful: what the
    /// network's arithmetic needs (a data gradient run over every tap, `--dense-dgrad`,
    /// executes more at stride 2; in phase order it executes this).
    pub fn gemm_macs(&self, scalars: &[ScalarArg]) -> Option<u64> {
        use KernelSpec::*;
        let n = self.scalar_u64(scalars, "n");
        match self {
            ConvFwd { g, .. } | ConvBwdData { g, .. } | ConvBwdWeight { g, .. } => {
                let (ic, oc) = (
                    self.scalar_u64(scalars, "IC"),
                    self.scalar_u64(scalars, "OC"),
                );
                Some(
                    n * u64::from(g.out_h * g.out_w)
                        * u64::from(g.k * g.k)
                        * (ic / u64::from(g.groups.max(1)))
                        * oc,
                )
            }
            LinearFwd { in_f, out_f, .. }
            | LinearBwdData { in_f, out_f, .. }
            | LinearBwdWeight { in_f, out_f, .. } => Some(n * u64::from(*in_f) * u64::from(*out_f)),
            _ => None,
        }
    }

    /// The TMA box of the activation operand (A) of a forward or data-gradient convolution
    /// with [`ConvGeom::tma`] launched with `scalars`, innermost first `[bk, w, h, n]`, when
    /// one stage of A is such a box; `None` otherwise (A then arrives by `cp.async`).
    ///
    /// A stage is `bk` ([`ConvGeom::bk`]: 32, or 64 with `k64`) reduction indices `(kh, kw,
    /// c)` with `c` fastest, so it is one tap's `bk` consecutive channels when the channels
    /// per group (`ICG` forward, `OCG` data gradient) are a multiple of `bk`. Its rows are the tile's `rows` consecutive pixels `m`
    /// of the GEMM's image grid (`OH x OW` forward, `IH x IW` data gradient), which are a box
    /// of the NHWC tensor when they are part of one image row (`W % rows == 0`), whole rows
    /// of one image (`rows % W == 0`, `(H W) % rows == 0`) or whole images (`rows % (H W) ==
    /// 0`; the last tile's images past `n` land as zeros). At stride 1 the tap shifts the box
    /// by `(kw - P, kh - P)` (forward) or `(P - kw, P - kh)` (data gradient) pixels, and TMA's
    /// zero fill outside the tensor is the conv's zero padding.
    pub fn act_box(&self, scalars: &[ScalarArg]) -> Option<[u32; 4]> {
        // the GEMM's image grid `h x w`, and the image `th x tw` of the tensor the map covers
        // (x forward, dy in the data gradient): at stride 1 they differ when the padding is
        // not `(k - 1) / 2`, and no box may be larger than its tensor
        let (g, ch, h, w, th, tw) = match self {
            KernelSpec::ConvFwd { g, .. } if g.tma => (
                g,
                self.scalar_u64(scalars, "IC"),
                g.out_h,
                g.out_w,
                g.in_h,
                g.in_w,
            ),
            KernelSpec::ConvBwdData { g, .. } if g.tma => (
                g,
                self.scalar_u64(scalars, "OC"),
                g.in_h,
                g.in_w,
                g.out_h,
                g.out_w,
            ),
            _ => return None,
        };
        let (r, bk) = (g.tile.rows, g.bk());
        let cg = ch / g.groups as u64;
        if g.stride != 1 || cg == 0 || !cg.is_multiple_of(u64::from(bk)) || w == 0 || h == 0 {
            return None;
        }
        let bx = if w.is_multiple_of(r) {
            [bk, r, 1, 1]
        } else if r.is_multiple_of(w) && (h * w).is_multiple_of(r) {
            [bk, w, r / w, 1]
        } else if r.is_multiple_of(h * w) {
            [bk, w, h, r / (h * w)]
        } else {
            return None;
        };
        // no box larger than the tensor ([`TmapArg`]): not more images than the batch has
        let n = self.scalar_u64(scalars, "n");
        (bx.iter().all(|&d| d <= 256) && bx[1] <= tw && bx[2] <= th && u64::from(bx[3]) <= n)
            .then_some(bx)
    }

    /// The weight operand's GEMM shape per group as its tensor map `tmw` sees it
    /// ([`KernelSpec::tmaps`]): the reduction length and the B operand's columns.
    pub fn weight_gemm(&self, scalars: &[ScalarArg]) -> Option<(u64, u64)> {
        let (g, fwd) = match self {
            KernelSpec::ConvFwd { g, .. } => (g, true),
            KernelSpec::ConvBwdData { g, .. } => (g, false),
            _ => return None,
        };
        let (ic, oc) = (
            self.scalar_u64(scalars, "IC"),
            self.scalar_u64(scalars, "OC"),
        );
        let (icg, ocg) = (ic / g.groups as u64, oc / g.groups as u64);
        let kk = (g.k * g.k) as u64;
        Some(if fwd {
            (icg * kk, ocg)
        } else {
            (ocg * kk, icg)
        })
    }

    /// Whether the weight's tensor map for a tile of `cols` columns and stages of `bk`
    /// reduction indices has a box no larger than its tensor ([`TmapArg`]): a reduction of at
    /// least `bk` and at least `cols` columns per group. Elsewhere the weights come by
    /// `cp.async`.
    pub fn weight_box_fits(&self, scalars: &[ScalarArg], cols: u32, bk: u32) -> bool {
        self.weight_gemm(scalars)
            .is_some_and(|(red, rows)| red >= u64::from(bk) && rows >= u64::from(cols))
    }

    /// The tensor maps a launch of this kernel with `buffers` and `scalars` passes
    /// ([`KernelSpec::tmap_params`]), in the swizzle mode the `wgmma` engine's stages use: 64
    /// bytes, or 128 with [`ConvGeom::k64`].
    ///
    /// - `tmw`: the packed `[g][row][k]` weight the pass reads ([`KernelSpec::PackWeight`]):
    ///   `dims = [k, rows per group, groups, 1]` with `k` the reduction length (`ICG * K * K`
    ///   forward, `OCG * K * K` for the data gradient) and `rows` the B operand's columns
    ///   (`OCG` forward, `ICG` data gradient); the box is a stage's B tile, [`ConvGeom::bk`]
    ///   reduction indices (64 or 128 bytes) of `tile.cols` rows.
    /// - `tmx` ([`ConvGeom::tma_a`]): the NHWC activation operand (`x` forward, `dy` data
    ///   gradient), `dims = [C, W, H, n]`, with the box of [`KernelSpec::act_box`].
    pub fn tmaps(&self, buffers: &[BufArg], scalars: &[ScalarArg]) -> Vec<TmapArg> {
        let (g, fwd) = match self {
            KernelSpec::ConvFwd { g, .. } if g.tma => (g, true),
            KernelSpec::ConvBwdData { g, .. } if g.tma => (g, false),
            _ => return vec![],
        };
        let (params, _) = self.signature();
        let int = |name: &str| self.scalar_u64(scalars, name);
        let (ic, oc) = (int("IC"), int("OC"));
        let Some((red, rows)) = self.weight_gemm(scalars) else {
            return vec![];
        };
        let Some(w) = params.iter().position(|p| p.name == "w") else {
            return vec![];
        };
        debug_assert!(w < buffers.len());
        let mut maps = vec![TmapArg {
            buffer: w,
            dims: [red, rows, g.groups as u64, 1],
            box_dim: [g.bk(), g.tile.cols, 1, 1],
            swizzle: 2 * g.bk(),
        }];
        if g.tma_a {
            let (name, c, h, wd) = if fwd {
                ("x", ic, g.in_h, g.in_w)
            } else {
                ("dy", oc, g.out_h, g.out_w)
            };
            if let (Some(a), Some(bx)) = (
                params.iter().position(|p| p.name == name),
                self.act_box(scalars),
            ) {
                maps.push(TmapArg {
                    buffer: a,
                    dims: [c, wd as u64, h as u64, int("n")],
                    box_dim: bx,
                    swizzle: 2 * g.bk(),
                });
            }
        }
        maps
    }

    /// [`KernelSpec::conv_geom`], mutable.
    pub fn conv_geom_mut(&mut self) -> Option<&mut ConvGeom> {
        match self {
            KernelSpec::ConvFwd { g, .. }
            | KernelSpec::ConvBwdData { g, .. }
            | KernelSpec::ConvBwdWeight { g, .. } => Some(g),
            _ => None,
        }
    }

    /// Bytes of dynamic shared memory every launch of this kernel needs
    /// ([`ConvGeom::async_smem`]): a vector-loading tensor-core convolution whose ring does
    /// not fit in static shared memory; 0 for every other kernel.
    pub fn dynamic_smem(&self) -> u32 {
        const DYN_ALIGN_SLACK: u32 = 1024;
        let kmajor = matches!(
            self,
            KernelSpec::ConvFwd { .. } | KernelSpec::ConvBwdData { .. }
        );
        match self.conv_geom() {
            Some(g) if g.tensor_cores && g.vec => {
                let s = g.async_smem(kmajor);
                match (s.dynamic, g.wgmma) {
                    (false, _) => 0,
                    (true, false) => s.bytes,
                    // a wgmma ring rounds its start up to 1024 bytes itself
                    // (`wrnc_dyn_smem_1024`): where the driver puts dynamic shared memory
                    // after a kernel's static arrays is not documented to honour more than 16
                    (true, true) => s.bytes + DYN_ALIGN_SLACK,
                }
            }
            _ => 0,
        }
    }

    /// The `nhwc` flag of a layout-dependent kernel that has one (all but the linear layers,
    /// whose layout is their input's `hw > 1`).
    fn nhwc_flag(&mut self) -> Option<&mut bool> {
        use KernelSpec::*;
        match self {
            ConvFwd { g, .. } | ConvBwdData { g, .. } | ConvBwdWeight { g, .. } => {
                Some(&mut g.nhwc)
            }
            ChannelSums { nhwc, .. }
            | BnApply { nhwc }
            | BnBwdReduce { nhwc, .. }
            | BnBwdApply { nhwc, .. }
            | Dropout { nhwc }
            | DropoutBwd { nhwc }
            | ZeroPad { nhwc }
            | ZeroPadBwd { nhwc }
            | Concat { nhwc }
            | ConcatBwd { nhwc }
            | MaxPool { nhwc, .. }
            | MaxPoolBwd { nhwc, .. }
            | AvgPool { nhwc, .. }
            | AvgPoolBwd { nhwc, .. }
            | GlobalAvgPool { nhwc, .. }
            | GlobalAvgPoolBwd { nhwc }
            | SplitKEpilogue { nhwc, .. } => Some(nhwc),
            _ => None,
        }
    }

    /// Whether the kernel reads and writes its activations channels-last (NHWC).
    pub fn nhwc(&self) -> bool {
        use KernelSpec::*;
        match *self {
            LinearFwd { hw, .. } | LinearBwdData { hw, .. } | LinearBwdWeight { hw, .. } => hw > 1,
            mut k => k.nhwc_flag().is_some_and(|f| *f),
        }
    }

    /// The same kernel on NCHW activations: what an NHWC kernel computes, up to the order of
    /// its activations' elements (and of a conv's reduction). `None` for a kernel that is not
    /// NHWC. The f64 reference checks an NHWC launch as this one on transposed arguments.
    pub fn as_nchw(&self) -> Option<KernelSpec> {
        use KernelSpec::*;
        if !self.nhwc() {
            return None;
        }
        let mut k = *self;
        match &mut k {
            LinearFwd { hw, .. } | LinearBwdData { hw, .. } | LinearBwdWeight { hw, .. } => *hw = 1,
            other => *other.nhwc_flag()? = false,
        }
        if let Some(g) = k.conv_geom_mut() {
            g.vec = false; // vector loads need NHWC
        }
        // the NCHW kernel's signature lacks the scalars only an NHWC kernel needs
        Some(k)
    }

    /// The activation arguments of an NHWC kernel with their per-image `[C, H, W]`, from the
    /// launch's scalars (`sc(name)`): the arguments whose element order the layout changes.
    /// Empty for an NCHW kernel; `None` when a scalar is missing.
    pub fn spatial_args(
        &self,
        sc: impl Fn(&str) -> Option<usize>,
    ) -> Option<Vec<(&'static str, [usize; 3])>> {
        use KernelSpec::*;
        if !self.nhwc() {
            return Some(vec![]);
        }
        let hw = |c: usize| Some([c, sc("HW")?, 1]);
        Some(match *self {
            ConvFwd { g, epi, .. } => {
                let x = [sc("IC")?, g.in_h as usize, g.in_w as usize];
                let y = [sc("OC")?, g.out_h as usize, g.out_w as usize];
                let mut v = vec![("y", y), ("x", x)];
                if epi.residual {
                    v.push(("res", y));
                }
                v
            }
            ConvBwdData { g, chain } => {
                let x = [sc("IC")?, g.in_h as usize, g.in_w as usize];
                let y = [sc("OC")?, g.out_h as usize, g.out_w as usize];
                let mut v = vec![("dx", x), ("dy", y)];
                if chain.any() {
                    v.push(("xpre", x));
                }
                v
            }
            ConvBwdWeight { g, .. } => vec![
                ("dy", [sc("OC")?, g.out_h as usize, g.out_w as usize]),
                ("x", [sc("IC")?, g.in_h as usize, g.in_w as usize]),
            ],
            LinearFwd { in_f, hw, .. } | LinearBwdWeight { in_f, hw, .. } => {
                vec![("x", [(in_f / hw) as usize, hw as usize, 1])]
            }
            LinearBwdData { in_f, hw, .. } => vec![("dx", [(in_f / hw) as usize, hw as usize, 1])],
            ChannelSums { .. } => vec![("x", hw(sc("C")?)?)],
            BnApply { .. } => vec![("y", hw(sc("C")?)?), ("x", hw(sc("C")?)?)],
            SplitKEpilogue { epi, .. } => {
                let t = hw(sc("C")?)?;
                let mut v = vec![("y", t), ("part", t)];
                if epi.residual {
                    v.push(("res", t));
                }
                v
            }
            BnBwdReduce { .. } => vec![("dy", hw(sc("C")?)?), ("x", hw(sc("C")?)?)],
            BnBwdApply { .. } => {
                let t = hw(sc("C")?)?;
                vec![("dx", t), ("dy", t), ("x", t)]
            }
            Dropout { .. } => vec![("y", hw(sc("C")?)?), ("x", hw(sc("C")?)?)],
            DropoutBwd { .. } => vec![("dx", hw(sc("C")?)?), ("dy", hw(sc("C")?)?)],
            ZeroPad { .. } | ZeroPadBwd { .. } => {
                let x = [sc("IC")?, sc("IH")?, sc("IW")?];
                let y = [sc("OC")?, sc("OH")?, sc("OW")?];
                if matches!(self, ZeroPad { .. }) {
                    vec![("y", y), ("x", x)]
                } else {
                    vec![("dx", x), ("dy", y)]
                }
            }
            Concat { .. } | ConcatBwd { .. } => {
                let (c0, c1) = (sc("C0")?, sc("C1")?);
                let (a, b, y) = (hw(c0)?, hw(c1)?, hw(c0 + c1)?);
                if matches!(self, Concat { .. }) {
                    vec![("y", y), ("x", a), ("x1", b)]
                } else {
                    vec![("dx0", a), ("dx1", b), ("dy", y)]
                }
            }
            MaxPool { .. } | AvgPool { .. } | MaxPoolBwd { .. } | AvgPoolBwd { .. } => {
                let x = [sc("C")?, sc("IH")?, sc("IW")?];
                let y = [sc("C")?, sc("OH")?, sc("OW")?];
                match self {
                    MaxPool { .. } | AvgPool { .. } => vec![("y", y), ("x", x)],
                    MaxPoolBwd { .. } => vec![("dx", x), ("dy", y), ("x", x)],
                    _ => vec![("dx", x), ("dy", y)],
                }
            }
            GlobalAvgPool { .. } => vec![("x", hw(sc("C")?)?)],
            GlobalAvgPoolBwd { .. } => vec![("dx", hw(sc("C")?)?)],
            _ => vec![],
        })
    }

    /// The key a tensor-core convolution GEMM is tuned under (see [`super::Tiles`]): its
    /// kernel's name at the default tile, without `wgmma`, stages, TMA (which the builder
    /// decides after looking the tile up) and split-K, then the runtime sizes `IC`,
    /// `OC` and the batch, e.g. `conv_fwd_i32x32_o32x32_k3s1p1g1_tc_pro_bnrelu ic160 oc160
    /// n128`. `scalars` are the launch's (per-step scalars may be among them). `None` for
    /// every other kernel.
    pub fn tile_key(&self, scalars: &[super::ScalarArg], batch: u32) -> Option<String> {
        use super::ScalarArg;
        let mut spec = *self;
        let g = spec.conv_geom_mut()?;
        if !g.tensor_cores {
            return None;
        }
        g.tile = TcTile::DEFAULT;
        g.wgmma = false;
        g.k64 = false;
        g.stages = 0;
        // decided by the builder after the tile's lookup (they depend on the tile): a key
        // with them would never be the key the builder looks up
        g.tma = false;
        g.tma_a = false;
        if let KernelSpec::ConvBwdWeight { split_k, .. } | KernelSpec::ConvFwd { split_k, .. } =
            &mut spec
        {
            *split_k = 1;
        }
        let (_, names) = spec.signature();
        let sc: Vec<&ScalarArg> = scalars
            .iter()
            .filter(|s| !matches!(s, ScalarArg::Step | ScalarArg::Lr))
            .collect();
        let int = |n: &str| match names.iter().position(|(x, _)| *x == n).map(|i| sc.get(i)) {
            Some(Some(ScalarArg::I32(v))) => Some(*v),
            _ => None,
        };
        Some(format!(
            "{} ic{} oc{} n{batch}",
            spec.name(),
            int("IC")?,
            int("OC")?
        ))
    }

    /// C identifier, derived from the spec alone (stable across runs and graphs).
    pub fn name(&self) -> String {
        use KernelSpec::*;
        let pool = |p: &Pool| format!("k{}s{}p{}", p.k, p.stride, p.pad);
        let nh = |b: bool| if b { "_nhwc" } else { "" };
        let lin = |hw: u32| {
            if hw > 1 {
                format!("_nhwc{hw}")
            } else {
                String::new()
            }
        };
        match self {
            ConvFwd {
                g,
                pro,
                epi,
                split_k,
            } => {
                let p = if pro.any() {
                    format!("_pro_{}", pro.tag())
                } else {
                    String::new()
                };
                let sk = if *split_k > 1 {
                    format!("_sk{split_k}")
                } else {
                    String::new()
                };
                format!("conv_fwd_{}{}{}{}", g.tag(), p, epi.tag(), sk)
            }
            ConvBwdData { g, chain } => {
                let p = if chain.any() {
                    format!("_chain_{}", chain.tag())
                } else {
                    String::new()
                };
                format!("conv_bwd_data_{}{}", g.tag(), p)
            }
            ConvBwdWeight { g, pro, split_k } => {
                let p = if pro.any() {
                    format!("_pro_{}", pro.tag())
                } else {
                    String::new()
                };
                let sk = if *split_k > 1 {
                    format!("_sk{split_k}")
                } else {
                    String::new()
                };
                format!("conv_bwd_weight_{}{}{}", g.tag(), p, sk)
            }
            LinearFwd { in_f, out_f, hw } => format!("linear_fwd_{in_f}x{out_f}{}", lin(*hw)),
            LinearBwdData { in_f, out_f, hw } => {
                format!("linear_bwd_data_{in_f}x{out_f}{}", lin(*hw))
            }
            LinearBwdWeight { in_f, out_f, hw } => {
                format!("linear_bwd_weight_{in_f}x{out_f}{}", lin(*hw))
            }
            ChannelSums {
                squares,
                nhwc,
                split,
            } => {
                format!(
                    "channel_sums{}{}{}",
                    if *squares { "_sq" } else { "" },
                    nh(*nhwc),
                    if *split { "_split" } else { "" }
                )
            }
            BnFinalizeTrain {
                centered,
                zero_dsums,
            } => format!(
                "bn_finalize_train{}{}",
                if *centered { "_centered" } else { "" },
                if *zero_dsums { "_zd" } else { "" }
            ),
            BnFinalizeEval => "bn_finalize_eval".into(),
            BnApply { nhwc } => format!("bn_apply{}", nh(*nhwc)),
            BnBwdReduce { chain, nhwc, split } => {
                let p = if chain.any() {
                    format!("_chain_{}", chain.tag())
                } else {
                    String::new()
                };
                format!(
                    "bn_bwd_reduce{p}{}{}",
                    nh(*nhwc),
                    if *split { "_split" } else { "" }
                )
            }
            BnBwdApply { chain, nhwc } => {
                let p = if chain.any() {
                    format!("_chain_{}", chain.tag())
                } else {
                    String::new()
                };
                format!("bn_bwd_apply{p}{}", nh(*nhwc))
            }
            Relu => "relu_fwd".into(),
            ReluBwd => "relu_bwd".into(),
            Dropout { nhwc } => format!("dropout_fwd{}", nh(*nhwc)),
            DropoutBwd { nhwc } => format!("dropout_bwd{}", nh(*nhwc)),
            DropPath => "droppath_fwd".into(),
            DropPathBwd => "droppath_bwd".into(),
            Add => "add_fwd".into(),
            Accumulate => "accumulate".into(),
            ZeroPad { nhwc } => format!("zeropad_fwd{}", nh(*nhwc)),
            ZeroPadBwd { nhwc } => format!("zeropad_bwd{}", nh(*nhwc)),
            Concat { nhwc } => format!("concat_fwd{}", nh(*nhwc)),
            ConcatBwd { nhwc } => format!("concat_bwd{}", nh(*nhwc)),
            MaxPool { pool: p, nhwc } => format!("maxpool_fwd_{}{}", pool(p), nh(*nhwc)),
            MaxPoolBwd { pool: p, nhwc } => format!("maxpool_bwd_{}{}", pool(p), nh(*nhwc)),
            AvgPool { pool: p, nhwc } => format!("avgpool_fwd_{}{}", pool(p), nh(*nhwc)),
            AvgPoolBwd { pool: p, nhwc } => format!("avgpool_bwd_{}{}", pool(p), nh(*nhwc)),
            GlobalAvgPool { nhwc, pro } => {
                let p = if pro.any() {
                    format!("_pro_{}", pro.tag())
                } else {
                    String::new()
                };
                format!("gap_fwd{p}{}", nh(*nhwc))
            }
            GlobalAvgPoolBwd { nhwc } => format!("gap_bwd{}", nh(*nhwc)),
            ToNhwc => "to_nhwc".into(),
            SoftmaxXent { classes } => format!("softmax_xent_{classes}"),
            SgdMultiTensor => "sgd_multi_tensor".into(),
            Zero => "zero_fill".into(),
            SplitKReduce => "splitk_reduce".into(),
            SplitKEpilogue { epi, nhwc } => format!("splitk_epilogue{}{}", epi.tag(), nh(*nhwc)),
            FoldBn { bias } => format!("fold_bn{}", if *bias { "_bias" } else { "" }),
            PackWeight {
                k,
                groups,
                data_grad,
                f32,
            } => format!(
                "pack_weight_{}_k{k}g{groups}{}",
                if *data_grad { "bwd_data" } else { "fwd" },
                if *f32 { "_f32" } else { "" }
            ),
        }
    }

    /// The runtime shape scalars of the spatial kernels (after `n`, before any `accum`).
    fn shape_scalars(&self) -> Vec<(&'static str, ScalarKind)> {
        use KernelSpec::*;
        let names: &[&'static str] = match self {
            ZeroPad { .. } | ZeroPadBwd { .. } => &["IC", "OC", "IH", "IW", "OH", "OW", "S"],
            Concat { .. } | ConcatBwd { .. } => &["C0", "C1", "HW"],
            MaxPool { .. } | MaxPoolBwd { .. } | AvgPool { .. } | AvgPoolBwd { .. } => {
                &["C", "IH", "IW", "OH", "OW"]
            }
            _ => &[],
        };
        names.iter().map(|&n| (n, ScalarKind::I32)).collect()
    }

    /// Buffer and scalar parameters, in argument order. The code generator writes exactly
    /// these, and the schedule builder passes exactly these.
    pub fn signature(&self) -> (Vec<BufParam>, Vec<(&'static str, ScalarKind)>) {
        use KernelSpec::*;
        use ScalarKind as S;
        let rng = [
            ("seed", S::U32),
            ("stream", S::U32),
            ("step", S::U32),
            ("p", S::F32),
        ];
        // an NHWC dropout recomputes the NCHW mask index from `C` and `HW`
        let layout = |nhwc: bool| {
            if nhwc {
                vec![("C", S::I32), ("HW", S::I32)]
            } else {
                vec![]
            }
        };
        let (mut bufs, mut sc): (Vec<BufParam>, Vec<(&'static str, ScalarKind)>) = match self {
            ConvFwd {
                g,
                pro,
                epi,
                split_k,
            } => {
                // split-K: the partial convolutions (f32), without the epilogue's arguments
                let split = *split_k > 1;
                let y = BufParam {
                    name: "y",
                    access: Access::Write,
                    elem: if split { ElemKind::F32 } else { ElemKind::Act },
                };
                let mut v = vec![y, b!("x", Read, Act), conv_w(g)];
                if pro.affine {
                    v.push(b!("affine", Read, F32));
                }
                let epi = if split {
                    EpilogueFlags::default()
                } else {
                    *epi
                };
                if epi.bias {
                    v.push(b!("bias", Read, F32));
                }
                if epi.residual {
                    v.push(b!("res", Read, Act));
                }
                if epi.stats {
                    v.push(b!("stats", ReadWrite, F32));
                }
                let mut s = vec![("n", S::I32), ("IC", S::I32), ("OC", S::I32)];
                if pro.dropout {
                    s.extend(rng);
                }
                (v, s)
            }
            ConvBwdData { g, chain } => {
                let mut v = vec![b!("dx", ReadWrite, Act), b!("dy", Read, Act), conv_w(g)];
                let mut s = vec![
                    ("n", S::I32),
                    ("IC", S::I32),
                    ("OC", S::I32),
                    ("accum", S::I32),
                ];
                if chain.any() {
                    v.push(b!("xpre", Read, Act));
                    if chain.relu {
                        v.push(b!("affine", Read, F32));
                    }
                    v.extend([b!("saved", Read, F32), b!("sums", ReadWrite, F32)]);
                    if chain.dropout {
                        s.extend(rng);
                    }
                }
                (v, s)
            }
            ConvBwdWeight { pro, .. } => {
                let mut v = vec![
                    b!("dw", Write, F32),
                    b!("dy", Read, Act),
                    b!("x", Read, Act),
                ];
                if pro.affine {
                    v.push(b!("affine", Read, F32));
                }
                let mut s = vec![("n", S::I32), ("IC", S::I32), ("OC", S::I32)];
                if pro.dropout {
                    s.extend(rng);
                }
                (v, s)
            }
            LinearFwd { .. } => (
                vec![
                    b!("y", Write, Act),
                    b!("x", Read, Act),
                    b!("w", Read, F32),
                    b!("bias", Read, F32),
                ],
                vec![("n", S::I32)],
            ),
            LinearBwdData { .. } => (
                vec![
                    b!("dx", ReadWrite, Act),
                    b!("dy", Read, Act),
                    b!("w", Read, F32),
                ],
                vec![("n", S::I32), ("accum", S::I32)],
            ),
            LinearBwdWeight { .. } => (
                vec![
                    b!("dw", Write, F32),
                    b!("dy", Read, Act),
                    b!("x", Read, Act),
                ],
                vec![("n", S::I32)],
            ),
            ChannelSums { split: true, .. } => (
                vec![b!("out", ReadWrite, F32), b!("x", Read, Act)],
                vec![("n", S::I32), ("C", S::I32), ("HW", S::I32)],
            ),
            ChannelSums { .. } => (
                vec![b!("out", Write, F32), b!("x", Read, Act)],
                vec![("n", S::I32), ("C", S::I32), ("HW", S::I32)],
            ),
            BnFinalizeTrain { zero_dsums, .. } => (
                [
                    b!("stats", Read, F32),
                    b!("gamma", Read, F32),
                    b!("beta", Read, F32),
                    b!("saved", Write, F32),
                    b!("affine", Write, F32),
                    b!("running", ReadWrite, F32),
                ]
                .into_iter()
                .chain(zero_dsums.then(|| b!("dsums", Write, F32)))
                .collect(),
                vec![
                    ("C", S::I32),
                    ("count", S::I32),
                    ("eps", S::F32),
                    ("momentum", S::F32),
                ],
            ),
            BnFinalizeEval => (
                vec![
                    b!("running", Read, F32),
                    b!("gamma", Read, F32),
                    b!("beta", Read, F32),
                    b!("affine", Write, F32),
                ],
                vec![("C", S::I32), ("eps", S::F32)],
            ),
            BnApply { .. } => (
                vec![
                    b!("y", Write, Act),
                    b!("x", Read, Act),
                    b!("affine", Read, F32),
                ],
                vec![("n", S::I32), ("C", S::I32), ("HW", S::I32)],
            ),
            BnBwdReduce { chain, split, .. } => {
                let sum = |name| BufParam {
                    name,
                    access: if *split {
                        Access::ReadWrite
                    } else {
                        Access::Write
                    },
                    elem: ElemKind::F32,
                };
                let mut v = vec![
                    sum("dgamma"),
                    sum("dbeta"),
                    b!("dy", Read, Act),
                    b!("x", Read, Act),
                    b!("saved", Read, F32),
                ];
                if chain.relu {
                    v.push(b!("affine", Read, F32));
                }
                let mut s = vec![("n", S::I32), ("C", S::I32), ("HW", S::I32)];
                if chain.dropout {
                    s.extend(rng);
                }
                (v, s)
            }
            BnBwdApply { chain, .. } => {
                let mut v = vec![
                    b!("dx", ReadWrite, Act),
                    b!("dy", Read, Act),
                    b!("x", Read, Act),
                    b!("saved", Read, F32),
                    b!("gamma", Read, F32),
                    b!("dgamma", Read, F32),
                    b!("dbeta", Read, F32),
                ];
                if chain.relu {
                    v.push(b!("affine", Read, F32));
                }
                let mut s = vec![
                    ("n", S::I32),
                    ("C", S::I32),
                    ("HW", S::I32),
                    ("accum", S::I32),
                ];
                if chain.dropout {
                    s.extend(rng);
                }
                (v, s)
            }
            Relu => (
                vec![b!("y", Write, Act), b!("x", Read, Act)],
                vec![("count", S::I32)],
            ),
            ReluBwd => (
                vec![
                    b!("dx", ReadWrite, Act),
                    b!("dy", Read, Act),
                    b!("y", Read, Act),
                ],
                vec![("count", S::I32), ("accum", S::I32)],
            ),
            Dropout { nhwc } => (
                vec![b!("y", Write, Act), b!("x", Read, Act)],
                [("count", S::I32)]
                    .into_iter()
                    .chain(layout(*nhwc))
                    .chain(rng)
                    .collect(),
            ),
            DropoutBwd { nhwc } => (
                vec![b!("dx", ReadWrite, Act), b!("dy", Read, Act)],
                [("count", S::I32), ("accum", S::I32)]
                    .into_iter()
                    .chain(layout(*nhwc))
                    .chain(rng)
                    .collect(),
            ),
            DropPath => (
                vec![b!("y", Write, Act), b!("x", Read, Act)],
                [("count", S::I32), ("per", S::I32)]
                    .into_iter()
                    .chain(rng)
                    .collect(),
            ),
            DropPathBwd => (
                vec![b!("dx", ReadWrite, Act), b!("dy", Read, Act)],
                [("count", S::I32), ("per", S::I32), ("accum", S::I32)]
                    .into_iter()
                    .chain(rng)
                    .collect(),
            ),
            Add => (
                vec![b!("y", Write, Act), b!("a", Read, Act), b!("b", Read, Act)],
                vec![("count", S::I32)],
            ),
            Accumulate => (
                vec![b!("y", ReadWrite, Act), b!("x", Read, Act)],
                vec![("count", S::I32), ("accum", S::I32)],
            ),
            ZeroPad { .. } | MaxPool { .. } | AvgPool { .. } | Concat { .. } => {
                let mut v = vec![b!("y", Write, Act), b!("x", Read, Act)];
                if matches!(self, Concat { .. }) {
                    v.push(b!("x1", Read, Act));
                }
                (
                    v,
                    [("n", S::I32)]
                        .into_iter()
                        .chain(self.shape_scalars())
                        .collect(),
                )
            }
            ZeroPadBwd { .. } | AvgPoolBwd { .. } => (
                vec![b!("dx", ReadWrite, Act), b!("dy", Read, Act)],
                [("n", S::I32)]
                    .into_iter()
                    .chain(self.shape_scalars())
                    .chain([("accum", S::I32)])
                    .collect(),
            ),
            MaxPoolBwd { .. } => (
                vec![
                    b!("dx", ReadWrite, Act),
                    b!("dy", Read, Act),
                    b!("x", Read, Act),
                ],
                [("n", S::I32)]
                    .into_iter()
                    .chain(self.shape_scalars())
                    .chain([("accum", S::I32)])
                    .collect(),
            ),
            ConcatBwd { .. } => (
                vec![
                    b!("dx0", ReadWrite, Act),
                    b!("dx1", ReadWrite, Act),
                    b!("dy", Read, Act),
                ],
                [("n", S::I32)]
                    .into_iter()
                    .chain(self.shape_scalars())
                    .chain([("accum0", S::I32), ("accum1", S::I32)])
                    .collect(),
            ),
            GlobalAvgPool { nhwc, pro } => (
                [b!("y", Write, Act), b!("x", Read, Act)]
                    .into_iter()
                    .chain(pro.affine.then_some(b!("affine", Read, F32)))
                    .collect(),
                [("rows", S::I32), ("HW", S::I32)]
                    .into_iter()
                    .chain((*nhwc || pro.any()).then_some(("C", S::I32)))
                    .collect(),
            ),
            GlobalAvgPoolBwd { nhwc } => (
                vec![b!("dx", ReadWrite, Act), b!("dy", Read, Act)],
                [("rows", S::I32), ("HW", S::I32)]
                    .into_iter()
                    .chain(nhwc.then_some(("C", S::I32)))
                    .chain([("accum", S::I32)])
                    .collect(),
            ),
            ToNhwc => (
                vec![b!("y", Write, Act), b!("x", Read, Act)],
                vec![("n", S::I32), ("C", S::I32), ("HW", S::I32)],
            ),
            SoftmaxXent { .. } => (
                vec![
                    b!("loss", Write, F32),
                    b!("dlogits", Write, Act),
                    b!("logits", Read, Act),
                    b!("labels", Read, I32),
                    // sets the non-finite-loss flag (`HYPER_NONFINITE`)
                    b!("hyper", ReadWrite, U32),
                ],
                vec![("n", S::I32), ("smoothing", S::F32)],
            ),
            SgdMultiTensor => (
                vec![
                    b!("params", ReadWrite, F32),
                    b!("grads", Read, F32),
                    b!("momentum_buf", ReadWrite, F32),
                    b!("table", Read, U32),
                ],
                vec![
                    ("lr", S::F32),
                    ("momentum", S::F32),
                    ("weight_decay", S::F32),
                    ("nesterov", S::I32),
                ],
            ),
            Zero => (vec![b!("y", Write, F32)], vec![("count", S::I32)]),
            SplitKReduce => (
                vec![b!("dw", Write, F32), b!("part", Read, F32)],
                vec![("count", S::I32), ("splits", S::I32)],
            ),
            SplitKEpilogue { epi, .. } => {
                let mut v = vec![b!("y", Write, Act), b!("part", Read, F32)];
                if epi.bias {
                    v.push(b!("bias", Read, F32));
                }
                if epi.residual {
                    v.push(b!("res", Read, Act));
                }
                (
                    v,
                    vec![
                        ("count", S::I32),
                        ("splits", S::I32),
                        ("C", S::I32),
                        ("HW", S::I32),
                    ],
                )
            }
            FoldBn { bias, .. } => {
                let mut v = vec![
                    b!("w_out", Write, F32),
                    b!("b_out", Write, F32),
                    b!("w", Read, F32),
                ];
                if *bias {
                    v.push(b!("b", Read, F32));
                }
                v.extend([b!("affine", Read, F32)]);
                (v, vec![("OC", S::I32), ("PER", S::I32)])
            }
            PackWeight { f32: true, .. } => (
                vec![b!("wp", Write, F32), b!("w", Read, F32)],
                vec![("OC", S::I32), ("IC", S::I32)],
            ),
            PackWeight { .. } => (
                vec![b!("wp", Write, Bf16), b!("w", Read, F32)],
                vec![("OC", S::I32), ("IC", S::I32)],
            ),
        };
        // The per-step scalars are read from the `hyper` buffer (`Role::Hyper`), the kernel's
        // last buffer parameter: `step` is `hyper[0]`, `lr` the float in `hyper[1]`.
        let per_step = |n: &str| n == "step" || n == "lr";
        if sc.iter().any(|(n, _)| per_step(n)) {
            sc.retain(|(n, _)| !per_step(n));
            bufs.push(b!("hyper", Read, U32));
        }
        bufs.shrink_to_fit();
        sc.shrink_to_fit();
        (bufs, sc)
    }
}

/// A forward or data-gradient conv's weight parameter: the f32 OIHW weight, or with vector loads
/// ([`ConvGeom::vec`]) its copy packed by [`KernelSpec::PackWeight`] (bf16, or f32 for TF32).
fn conv_w(g: &ConvGeom) -> BufParam {
    if g.vec && !g.f32_operands() {
        b!("w", Read, Bf16)
    } else {
        b!("w", Read, F32)
    }
}

fn no_prologue(p: &PrologueFlags) -> bool {
    !p.any()
}

fn is_one(v: &u32) -> bool {
    *v == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pixel ranges of a dBN reduction: (nhwc, channels, pixels) -> ranges.
    #[test]
    fn channel_reduce_split_counts() {
        let check = |nhwc, c, pixels, want| {
            assert_eq!(
                channel_reduce_splits(nhwc, c, pixels),
                want,
                "{nhwc} {c} {pixels}"
            )
        };
        // WRN-28-10 at batch 128: the stem's BN (16 channels, 131072 pixels), stage 3's
        check(true, 16, 131072, 512);
        check(true, 640, 8192, 14);
        check(false, 16, 131072, 33);
        check(false, 640, 8192, 1);
        // the tests' tiny images: no split below two ranges of RED_MIN_PIXELS
        check(true, 4, 72, 1);
        check(true, 4, 511, 1);
        check(true, 4, 512, 2);
        check(false, 300, 1 << 20, 2);
        check(false, 600, 1 << 20, 1);
    }

    fn geom(rows: u32, cols: u32, stages: u32, wgmma: bool) -> ConvGeom {
        ConvGeom {
            in_h: 8,
            in_w: 8,
            out_h: 8,
            out_w: 8,
            k: 3,
            stride: 1,
            pad: 1,
            groups: 1,
            tensor_cores: true,
            tile: TcTile { rows, cols },
            nhwc: true,
            vec: true,
            wgmma,
            tma: false,
            tma_a: false,
            stages,
            tf32x3: false,
            tf32: false,
            phases: false,
            k64: false,
        }
    }

    /// `(tile, stages, wgmma, kmajor)` -> `(stages, stage bytes, bytes, dynamic)`: the automatic
    /// depth stays in static shared memory; an asked-for depth moves beyond it only when it
    /// must; the accumulator slab is the floor.
    #[test]
    fn async_smem_of_each_tile() {
        let check = |rows, cols, stages, wgmma, kmajor, want: (u32, u32, u32, bool)| {
            let s = geom(rows, cols, stages, wgmma).async_smem(kmajor);
            assert_eq!(
                (s.stages, s.stage_bytes, s.bytes, s.dynamic),
                want,
                "{rows}x{cols} s{stages} wgmma={wgmma} kmajor={kmajor}"
            );
        };
        check(64, 64, 0, false, true, (4, 10240, 40960, false));
        check(128, 64, 0, false, true, (3, 15360, 46080, false));
        check(128, 128, 0, false, true, (2, 20480, 40960, false));
        check(128, 128, 0, false, false, (2, 17408, 34816, false));
        check(32, 64, 0, false, true, (4, 7680, 30720, false));
        check(64, 64, 4, false, true, (4, 10240, 40960, false));
        check(64, 64, 2, false, true, (2, 10240, 20480, false));
        // the 64x64 accumulator slab (64 x 65 f32) is larger than two small stages
        check(64, 64, 2, true, true, (2, 8192, 16640, false));
        check(64, 64, 6, false, true, (6, 10240, 61440, true));
        check(128, 128, 4, false, true, (4, 20480, 81920, true));
        check(128, 128, 4, true, true, (4, 16384, 65536, true));
        check(128, 128, 8, false, false, (8, 17408, 139264, true));
        // wgmma never applies to a 32-row tile
        check(32, 64, 4, true, true, (4, 7680, 30720, false));
        // the weight gradient on wgmma: the ring, then two K-major buffers of (128 + 64) rows
        // of 64 bytes that its transposing pass fills
        check(128, 64, 4, true, false, (4, 13312, 77824, true));
        check(64, 64, 0, true, false, (3, 9216, 44032, false));
    }

    #[test]
    fn stages_are_part_of_the_name_and_not_of_the_tile_key() {
        let spec = |stages| KernelSpec::ConvFwd {
            g: geom(128, 128, stages, false),
            pro: Default::default(),
            epi: Default::default(),
            split_k: 1,
        };
        assert!(spec(4).name().contains("_v8_s4"), "{}", spec(4).name());
        assert!(!spec(0).name().contains("_s"), "{}", spec(0).name());
        assert_eq!(spec(4).dynamic_smem(), 81920);
        assert_eq!(spec(0).dynamic_smem(), 0);
        let scalars: Vec<super::super::ScalarArg> = (0..spec(0).signature().1.len())
            .map(|_| super::super::ScalarArg::I32(16))
            .collect();
        let key = spec(4).tile_key(&scalars, 8);
        assert!(key.as_ref().is_some_and(|k| !k.contains("_s4")), "{key:?}");
        assert_eq!(key, spec(0).tile_key(&scalars, 8));
    }

    /// [`KernelSpec::act_box`], one line per case: `(pass, image, k, stride, groups, channels
    /// in, channels out, tile rows, padding) -> box`. The forward pass tiles the output image, the data
    /// gradient the input one; channels per group of A (in forward, out in the data gradient)
    /// must be a multiple of 32.
    #[test]
    fn activation_boxes() {
        use super::super::ScalarArg::I32;
        #[allow(clippy::too_many_arguments)]
        fn check(
            fwd: bool,
            hw: u32,
            k: u32,
            stride: u32,
            groups: u32,
            ic: i32,
            oc: i32,
            rows: u32,
            pad: u32,
            want: Option<[u32; 4]>,
        ) {
            let out = (hw + 2 * pad - k) / stride + 1;
            let g = ConvGeom {
                in_h: hw,
                in_w: hw,
                out_h: out,
                out_w: out,
                k,
                stride,
                pad,
                groups,
                tma: true,
                ..geom(rows, 64, 0, true)
            };
            let spec = if fwd {
                KernelSpec::ConvFwd {
                    g,
                    pro: Default::default(),
                    epi: Default::default(),
                    split_k: 1,
                }
            } else {
                KernelSpec::ConvBwdData {
                    g,
                    chain: Default::default(),
                }
            };
            let mut scalars = vec![I32(2), I32(ic), I32(oc)];
            scalars.resize(spec.signature().1.len(), I32(0));
            assert_eq!(
                spec.act_box(&scalars),
                want,
                "fwd={fwd} {hw}x{hw} k{k}s{stride}p{pad}g{groups} {ic}->{oc} rows {rows}"
            );
        }
        let (f, d) = (true, false);
        check(f, 32, 3, 1, 1, 160, 160, 64, 1, Some([32, 32, 2, 1])); // two rows
        check(f, 32, 3, 1, 1, 160, 160, 128, 1, Some([32, 32, 4, 1]));
        check(f, 16, 1, 1, 1, 320, 320, 64, 0, Some([32, 16, 4, 1]));
        check(f, 8, 3, 1, 1, 640, 640, 64, 1, Some([32, 8, 8, 1])); // one image
        check(f, 8, 3, 1, 1, 640, 640, 128, 1, Some([32, 8, 8, 2])); // two images
        check(f, 4, 3, 1, 1, 64, 64, 32, 1, Some([32, 4, 4, 2])); // the whole batch of 2
        check(f, 4, 3, 1, 1, 64, 64, 128, 1, None); // 8 images: a box larger than the batch
        check(f, 128, 3, 1, 1, 32, 32, 64, 1, Some([32, 64, 1, 1])); // part of a row
        check(f, 8, 3, 1, 2, 64, 64, 64, 1, Some([32, 8, 8, 1])); // 32 channels per group
        check(f, 32, 3, 1, 1, 16, 160, 64, 1, None); // 16 channels in
        check(d, 32, 3, 1, 1, 16, 160, 64, 1, Some([32, 32, 2, 1])); // ...but 160 out
        check(d, 32, 3, 1, 1, 160, 48, 64, 1, None);
        check(f, 8, 3, 1, 4, 64, 64, 64, 1, None); // 16 channels per group
        check(f, 32, 3, 2, 1, 160, 320, 64, 1, None); // stride 2
        check(d, 32, 3, 2, 1, 160, 320, 64, 1, None);
        check(f, 6, 3, 1, 1, 32, 32, 64, 1, None); // 36 pixels an image: no box of 64
        check(f, 24, 3, 1, 1, 32, 32, 64, 1, None); // rows of 24: no box of 64
                                                    // padding other than (k - 1) / 2: the grid and the mapped image differ in size
        check(f, 10, 3, 1, 1, 32, 32, 64, 0, Some([32, 8, 8, 1])); // 8x8 of x's 10x10
        check(d, 8, 3, 1, 1, 32, 32, 64, 0, None); // an 8x8 grid on dy's 6x6
        check(f, 6, 1, 1, 1, 32, 32, 64, 1, None); // an 8x8 grid on x's 6x6
        check(d, 8, 3, 1, 1, 32, 32, 64, 2, Some([32, 8, 8, 1])); // 8x8 of dy's 10x10
        check(f, 512, 1, 1, 1, 32, 32, 64, 0, Some([32, 64, 1, 1]));
    }
}
