//! The schedule: buffers, kernels and launches of one inference pass or one training step.
//!
//! Plain data (serialisable for `--emit schedule`), built from a [`Graph`](crate::graph::Graph) by
//! [`build`]: the graph becomes a [`Plan`](crate::passes::Plan), the fusion [`passes`](crate::passes) annotate it,
//! and [`lower`] emits kernels and launches — forward, loss, backward (reverse-mode autodiff
//! over the annotated plan) and the optimizer update.
//!
//! Invariants (checked by [`Schedule::validate`]):
//! - every [`Launch::kernel`] indexes `kernels`; its buffer and scalar arguments match the
//!   kernel's [`KernelSpec::signature`] in number, order and element type;
//! - every [`BufArg`] lies inside its buffer (`offset + len <= buffer.len`);
//! - kernels are unique by [`KernelSpec`] (the same spec is one kernel, reused by every layer
//!   with the same shapes), and kernel names are unique and derived from the spec alone;
//! - all element indices of every kernel fit in a signed 32-bit int (checked at build time);
//! - order is deterministic: buffers, kernels and launches appear in first-use order of a walk
//!   over the plan in topological order.

mod build;
mod kernel;

pub use build::{build, lower, sgd_table, SPLIT_K_MAX, SPLIT_K_MIN_BLOCKS};
pub use kernel::{
    channel_reduce_shape, channel_reduce_splits, GPU_SMS, NHWC_RED_CH, NHWC_RED_LANES,
    RED_MIN_PIXELS, RED_TARGET_BLOCKS,
};
pub use kernel::{
    Access, AsyncSmem, BufParam, ConvGeom, ElemKind, EpilogueFlags, KernelSpec, PrologueFlags,
    ScalarKind, TcTile, K64_SMEM, MAX_STAGES, STATIC_SMEM, TC_STATIC_SMEM,
};

use crate::ast::Precision;
use crate::graph::ParamKind;
use crate::passes::{Fusion, Mode};
use serde::Serialize;

/// Element type of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Dtype {
    F32,
    /// bfloat16 storage (activations in `--precision bf16`); arithmetic stays fp32.
    Bf16,
    I32,
    U32,
}

impl Dtype {
    pub fn bytes(self) -> u64 {
        match self {
            Dtype::Bf16 => 2,
            _ => 4,
        }
    }
    /// The C type in generated code.
    pub fn c_type(self) -> &'static str {
        match self {
            Dtype::F32 => "float",
            Dtype::Bf16 => "unsigned short",
            Dtype::I32 => "int",
            Dtype::U32 => "unsigned int",
        }
    }
}

/// What a buffer holds; decides its lifetime in the memory plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The input batch (host-written, persistent).
    Input,
    /// Labels of the batch, `i32`, one per sample (host-written, persistent).
    Labels,
    /// An op's output (forward), or the loss.
    Activation,
    /// The gradient of an activation (backward).
    ActivationGrad,
    /// All trainable parameters, one flat arena (persistent).
    Param,
    /// Their gradients, same layout (persistent across the step).
    Grad,
    /// The optimizer's momentum, same layout (persistent).
    Momentum,
    /// BN running statistics (persistent).
    State,
    /// Kept from forward for backward (BN mean / rstd, scale / shift).
    Saved,
    /// Temporary (statistics accumulated with atomics, folded weights).
    Scratch,
    /// The optimizer's multi-tensor table `(start, len, decay)` per parameter (`u32`, persistent).
    Table,
    /// The scalars that change from step to step, `[step, lr as f32 bits, 0]` (`u32`,
    /// persistent, host-written before each step, [`HYPER_LEN`] long). Kernels read them from
    /// memory rather than as arguments, so one captured CUDA graph replays every step. Word 2
    /// is the step's non-finite-loss flag: the loss kernel sets it, the optimizer then skips
    /// the update ([`HYPER_NONFINITE`]).
    Hyper,
}

/// Length of the [`Role::Hyper`] buffer (`u32` words): `[0]` the step, `[1]` the learning rate's
/// bits, `[2]` the non-finite-loss flag ([`HYPER_NONFINITE`]).
pub const HYPER_LEN: u64 = 3;

/// Word of the `hyper` buffer that guards the update. The host writes 0 before each step; the
/// loss kernel (`SoftmaxXent`) writes 1 when any sample's loss is not finite; the optimizer
/// (`SgdMultiTensor`) then changes nothing. So the whole step (forward, backward, update) is one
/// CUDA graph and still never applies an update from a NaN loss, which the host reports as the
/// CPU loop does (stop, the last good checkpoint kept).
pub const HYPER_NONFINITE: usize = 2;

impl Role {
    /// Persistent buffers live for the whole run; the others are planned by liveness.
    pub fn persistent(self) -> bool {
        matches!(
            self,
            Role::Input
                | Role::Labels
                | Role::Param
                | Role::Grad
                | Role::Momentum
                | Role::State
                | Role::Table
                | Role::Hyper
        )
    }
}

/// A device buffer. `len` is in elements of `dtype`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Buffer {
    /// Unique, deterministic (`act.<node>`, `grad.<node>`, `params`, ...).
    pub name: String,
    pub len: u64,
    pub dtype: Dtype,
    pub role: Role,
}

/// One compiled kernel.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Kernel {
    /// C identifier derived from the spec (`conv_fwd_i32x32_o32x32_k3s1p1g1_pro_bnrelu`).
    pub name: String,
    pub spec: KernelSpec,
}

/// A buffer argument: `len` elements from `offset` (both in elements) of `buffer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BufArg {
    pub buffer: usize,
    pub offset: u64,
    pub len: u64,
    pub access: Access,
}

/// A scalar argument: a constant, or a value the host supplies per step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ScalarArg {
    I32(i32),
    U32(u32),
    F32(f32),
    /// The run's RNG seed (`u32`).
    Seed,
    /// The training step counter (`u32`), for the RNG. Only while a schedule is built: the
    /// builder moves it into the [`Role::Hyper`] buffer (word 0), so no finished launch has it.
    Step,
    /// Learning rate of this step (`f32`). Like `Step`, moved into the `hyper` buffer (word 1).
    Lr,
    /// SGD momentum (`f32`).
    Momentum,
    /// Weight decay (`f32`).
    WeightDecay,
    /// 1 for Nesterov momentum (`i32`).
    Nesterov,
    /// Label smoothing (`f32`).
    LabelSmoothing,
}

impl ScalarArg {
    pub fn kind(self) -> ScalarKind {
        match self {
            ScalarArg::I32(_) | ScalarArg::Nesterov => ScalarKind::I32,
            ScalarArg::U32(_) | ScalarArg::Seed | ScalarArg::Step => ScalarKind::U32,
            _ => ScalarKind::F32,
        }
    }
}

/// One kernel launch.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Launch {
    pub kernel: usize,
    pub grid: [u32; 3],
    pub block: [u32; 3],
    /// Dynamic shared memory bytes: [`KernelSpec::dynamic_smem`] of the launch's kernel (0
    /// unless a vector-loading convolution's `cp.async` ring outgrows static shared memory).
    pub shared: u32,
    pub buffers: Vec<BufArg>,
    pub scalars: Vec<ScalarArg>,
    /// Tensor maps passed by value after the scalars, in [`KernelSpec::tmap_params`] order
    /// (empty unless the kernel loads an operand by TMA, [`ConvGeom::tma`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tmaps: Vec<TmapArg>,
    /// The graph node this launch belongs to, and what part of it (`fwd`, `bwd_data`, ...).
    pub note: String,
}

/// A tensor map argument (a `CUtensorMap` the host encodes with `cuTensorMapEncodeTiled`, a
/// kernel's `const __grid_constant__ wrnc_tmap` parameter): a dense bf16 tensor of 4
/// dimensions (trailing ones of 1 where it has fewer), innermost first, inside one of the
/// launch's buffer arguments.
///
/// Invariants (checked by [`Schedule::validate`]): `buffer` indexes `Launch::buffers` and that
/// argument is bf16 and holds at least the product of `dims` elements; `dims[0]` is a
/// multiple of 8 (every row starts 16-byte aligned, as TMA requires); `1 <= box_dim[i] <= 256`
/// and `box_dim[0] * 2` is a multiple of 16 bytes; `box_dim[i] <= dims[i]` (pytorch/helion#2555:
/// on CUDA a larger box makes a tensor map whose copies fault); `swizzle` is 0, 32, 64 or 128
/// and, when not 0, equals `box_dim[0] * 2`. A box may hang over the tensor's edge where a
/// copy starts near it: TMA fills the elements outside the tensor with zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TmapArg {
    /// Index into the launch's `buffers` of the tensor.
    pub buffer: usize,
    /// Elements per dimension, innermost first; strides are dense (`dims[0] * 2` bytes, then
    /// `dims[0] * dims[1] * 2`, ...).
    pub dims: [u64; 4],
    /// Elements one copy moves per dimension (the box), landing in shared memory innermost
    /// first, densely: element `(i0, i1, i2, i3)` at
    /// `(((i3 * box[2]) + i2) * box[1] + i1) * box[0] + i0`, then swizzled.
    pub box_dim: [u32; 4],
    /// The swizzle mode's row in bytes (`CU_TENSOR_MAP_SWIZZLE_<n>B`), 0 for none: the
    /// 16-byte chunk of the byte that lands at shared address `a` moves to chunk
    /// `(a / 16) % (swizzle / 16) ^ (a / 128) % (swizzle / 16)` of its row, the layout
    /// `wgmma` reads through a descriptor of the same mode.
    pub swizzle: u32,
}

/// A trainable tensor's slot in the `params` / `grads` / `momentum` arenas.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ParamSlot {
    /// `<node name>.<suffix>`, as in the graph.
    pub name: String,
    pub offset: u64,
    pub len: u64,
    pub kind: ParamKind,
    /// Weight decay applies (every parameter, as the CPU reference and the WRN code do).
    pub decay: bool,
}

/// Options of a schedule.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Options {
    pub mode: Mode,
    /// Images per batch, `>= 1`.
    pub batch: u32,
    pub precision: Precision,
    pub fusion: Fusion,
    /// Block tiles of the tensor-core convolutions (`--precision bf16`, or f32 with
    /// [`Tiles::tf32x3`] or [`Tiles::tf32`]; otherwise ignored in f32).
    pub tiles: Tiles,
    /// Activation layout ([`Layout::Auto`]: NHWC in bf16, NCHW in f32).
    pub layout: Layout,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            mode: Mode::Train,
            batch: 128,
            precision: Precision::F32,
            fusion: Fusion::default(),
            tiles: Tiles::default(),
            layout: Layout::default(),
        }
    }
}

/// The memory order of a schedule's activations and activation gradients (per image).
/// Parameters, gradients, the network's input (`Role::Input`) and the logits are the same in
/// both: weights OIHW, input NCHW (an NHWC schedule transposes it first, [`KernelSpec::ToNhwc`]),
/// logits `[n][classes]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// NHWC where the convolutions run on the tensor cores (`--precision bf16`, or f32 with
    /// `--tf32` / `--tf32x3`: their operands then arrive by `cp.async` as runs of channels),
    /// NCHW for f32 on the FMA engine.
    #[default]
    Auto,
    /// `[c][h][w]`, PyTorch's default.
    Nchw,
    /// `[h][w][c]`, channels last: a pixel's channels are contiguous, so a convolution's
    /// reduction over `(kh, kw, c)` reads runs of consecutive channels.
    Nhwc,
}

impl Layout {
    /// `Auto` resolved for `precision` and, in f32, how the convolutions compute (`f32`).
    pub fn resolve(self, precision: Precision, f32: F32Math) -> Layout {
        match (self, precision) {
            (Layout::Auto, Precision::Bf16) => Layout::Nhwc,
            (Layout::Auto, Precision::F32) if f32.tensor_cores() => Layout::Nhwc,
            (Layout::Auto, Precision::F32) => Layout::Nchw,
            (l, _) => l,
        }
    }

    /// Parses `auto`, `nchw` or `nhwc` (a CLI flag's value).
    pub fn parse(s: &str) -> Result<Layout, String> {
        match s {
            "auto" => Ok(Layout::Auto),
            "nchw" => Ok(Layout::Nchw),
            "nhwc" => Ok(Layout::Nhwc),
            _ => Err(format!("unknown layout `{s}`: use auto, nchw or nhwc")),
        }
    }

    pub fn is_nchw(&self) -> bool {
        *self == Layout::Nchw
    }

    /// `auto`, `nchw` or `nhwc`, as [`Layout::parse`] reads it.
    pub fn name(self) -> &'static str {
        match self {
            Layout::Auto => "auto",
            Layout::Nchw => "nchw",
            Layout::Nhwc => "nhwc",
        }
    }
}

/// Which [`TcTile`] each tensor-core convolution GEMM uses: its entry in `by_key` (keyed by
/// [`Schedule::tile_keys`]'s strings, e.g. from an on-device search), else `default`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Tiles {
    pub default: TcTile,
    pub by_key: std::collections::BTreeMap<String, TcTile>,
    /// The vector-loading convolutions ([`ConvGeom::vec`], all three passes; bf16 or plain
    /// TF32) with tiles of at least 64 rows run on Hopper's warpgroup MMA (`wgmma`, sm_90a)
    /// instead of `mma.sync` (`ConvGeom::wgmma`). Off by default.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub wgmma: bool,
    /// `cp.async` pipeline stages of the vector-loading convolutions ([`ConvGeom::stages`]):
    /// 0 (the default) as many as fit in static shared memory (2 to 4), else 2 to
    /// [`kernel::MAX_STAGES`], in dynamic shared memory beyond 48 KiB (the runtime opts the
    /// kernel in and checks the GPU's limit). Checked by [`Tiles::check`].
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub stages: u32,
    /// With `wgmma`: the weight operand of the warpgroup-MMA convolutions arrives by Hopper's
    /// tensor memory accelerator (one `cp.async.bulk.tensor` per stage, completing on an
    /// `mbarrier`) instead of per-thread `cp.async` ([`ConvGeom::tma`]), and so does the
    /// activation operand of those whose tile is a box of the image ([`ConvGeom::tma_a`]).
    /// Off by default; meaningless without `wgmma`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub tma: bool,
    /// `--precision f32` only: the convolutions run on the tensor cores as 3xTF32
    /// ([`ConvGeom::tf32x3`]) with this struct's block tiles, instead of as fp32 FMAs. Off by
    /// default (refused with bf16).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub tf32x3: bool,
    /// `--precision f32` only: the convolutions run on the tensor cores in plain TF32
    /// ([`ConvGeom::tf32`]: one TF32 product per fragment pair, operands rounded to 11
    /// significant bits, as PyTorch runs cuDNN's f32 convolutions by default), with this
    /// struct's block tiles. Off by default (refused with bf16 and with `tf32x3`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub tf32: bool,
    /// The data gradients of strided convolutions gather every tap, masked, instead of running
    /// in phase order ([`ConvGeom::phases`]). Off by default: phase order computes the same
    /// sums with about `1 / S^2` of the taps; this is the baseline to measure it against.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dense_dgrad: bool,
    /// With `wgmma`: the bf16 forward and data-gradient warpgroup-MMA convolutions take
    /// stages of 64 reduction indices (rows of 128 bytes, 128-byte swizzle; four k16 `wgmma`
    /// steps per barrier instead of two), by default rings of up to 96 KiB in dynamic shared
    /// memory ([`ConvGeom::k64`]). Off by
    /// default; meaningless without `wgmma`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub k64: bool,
    /// No GEMM splits its reduction (split-K): the weight gradients (every engine) and the
    /// tensor-core inference forward convolutions at small batches each run their whole reduction in one
    /// block per output tile. Off by default; the baseline to measure split-K against.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub no_split_k: bool,
}

/// How the convolutions of a `--precision f32` schedule compute ([`Tiles::tf32`],
/// [`Tiles::tf32x3`]; the CLI's `--tf32`, `--tf32x3`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum F32Math {
    /// fp32 FMAs (the default).
    #[default]
    Fma,
    /// Tensor cores, plain TF32 ([`ConvGeom::tf32`]).
    Tf32,
    /// Tensor cores, 3xTF32 ([`ConvGeom::tf32x3`]).
    Tf32x3,
}

impl F32Math {
    /// From the CLI's two flags; both at once is an error.
    pub fn from_flags(tf32: bool, tf32x3: bool) -> Result<F32Math, String> {
        match (tf32, tf32x3) {
            (true, true) => Err(TF32_AND_TF32X3.to_string()),
            (true, false) => Ok(F32Math::Tf32),
            (false, true) => Ok(F32Math::Tf32x3),
            (false, false) => Ok(F32Math::Fma),
        }
    }

    /// On the tensor cores.
    pub fn tensor_cores(self) -> bool {
        self != F32Math::Fma
    }

    /// The CLI flag that asks for it (`""` for the default).
    pub fn flag(self) -> &'static str {
        match self {
            F32Math::Fma => "",
            F32Math::Tf32 => "--tf32",
            F32Math::Tf32x3 => "--tf32x3",
        }
    }
}

const TF32_AND_TF32X3: &str =
    "--tf32 (one TF32 product) and --tf32x3 (three, fp32's accuracy) exclude each other";

/// The error of `--tf32` or `--tf32x3` with `--precision bf16`.
pub const TF32_WITH_BF16: &str = "--tf32 and --tf32x3 move the f32 convolutions to the tensor cores; with --precision bf16 they are there already";

/// Whether the engine flags go together with `precision` and the f32 engine `f32`: `--wgmma`
/// runs the bf16 and the plain TF32 (`--tf32`) tensor-core convolutions, not 3xTF32's; `--tma`
/// (`tma`) loads bf16 operands only, and `--k64` (`k64`) widens bf16's stages only; `--stages` (`stages`) sets the `cp.async` pipelines,
/// which bf16 and the TF32 engines (`--tf32`, `--tf32x3`) have and the fp32 FMA engine does
/// not; TF32 is for f32. The one check behind the compiler's and the CLI's errors.
pub fn check_engine_flags(
    precision: Precision,
    f32: F32Math,
    wgmma: bool,
    tma: bool,
    k64: bool,
    stages: bool,
) -> Result<(), String> {
    match precision {
        Precision::F32 if k64 => Err(
            "--k64 widens the stages of the bf16 warpgroup-MMA convolutions, which run only with --precision bf16"
                .into(),
        ),
        Precision::F32 if tma => Err(
            "--tma loads the bf16 tensor-core convolutions' operands, which run only with --precision bf16"
                .into(),
        ),
        Precision::F32 if wgmma && f32 != F32Math::Tf32 => Err(
            "--wgmma runs the tensor-core convolutions of --precision bf16 or of --tf32 (plain TF32; 3xTF32 stays on mma.sync)"
                .into(),
        ),
        Precision::F32 if stages && !f32.tensor_cores() => Err(
            "--stages sets the cp.async pipeline of the tensor-core convolutions, which f32 has only with --tf32 or --tf32x3 (or use --precision bf16)"
                .into(),
        ),
        Precision::Bf16 if f32.tensor_cores() => Err(TF32_WITH_BF16.into()),
        _ => Ok(()),
    }
}

fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

impl Tiles {
    /// Every GEMM with tile `t` (what a search times).
    pub fn all(t: TcTile) -> Tiles {
        Tiles {
            default: t,
            by_key: Default::default(),
            wgmma: false,
            stages: 0,
            tma: false,
            tf32x3: false,
            tf32: false,
            dense_dgrad: false,
            k64: false,
            no_split_k: false,
        }
    }

    /// `stages` is 0 or within 2 to [`kernel::MAX_STAGES`]; `tma` only with `wgmma`.
    pub fn check(&self) -> Result<(), String> {
        if self.tma && !self.wgmma {
            return Err("--tma feeds Hopper's warpgroup MMA: it needs --wgmma".to_string());
        }
        if self.k64 && !self.wgmma {
            return Err(
                "--k64 widens the stages of Hopper's warpgroup MMA: it needs --wgmma".to_string(),
            );
        }
        if self.tf32 && self.tf32x3 {
            return Err(TF32_AND_TF32X3.to_string());
        }
        if self.stages != 0 && !(2..=kernel::MAX_STAGES).contains(&self.stages) {
            return Err(format!(
                "{} pipeline stages: the tensor-core engine takes 2 to {}",
                self.stages,
                kernel::MAX_STAGES
            ));
        }
        Ok(())
    }

    /// How f32 convolutions compute ([`Tiles::tf32`], [`Tiles::tf32x3`]; 3xTF32 where both).
    pub fn f32_math(&self) -> F32Math {
        match (self.tf32x3, self.tf32) {
            (true, _) => F32Math::Tf32x3,
            (false, true) => F32Math::Tf32,
            (false, false) => F32Math::Fma,
        }
    }

    /// Sets [`Tiles::tf32`] and [`Tiles::tf32x3`] as `m` says.
    pub fn with_f32_math(self, m: F32Math) -> Tiles {
        Tiles {
            tf32: m == F32Math::Tf32,
            tf32x3: m == F32Math::Tf32x3,
            ..self
        }
    }

    pub fn get(&self, key: &str) -> TcTile {
        self.by_key.get(key).copied().unwrap_or(self.default)
    }
}

/// The architecture NVRTC compiles a module for on a GPU of architecture `arch` (`sm_90`):
/// the architecture-specific `sm_90a` where the module uses `wgmma`, else `arch`.
pub fn nvrtc_arch(arch: &str, wgmma: bool) -> String {
    if wgmma && arch == "sm_90" {
        "sm_90a".into()
    } else {
        arch.into()
    }
}

/// Everything one step launches (see module invariants).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Schedule {
    pub name: String,
    pub mode: Mode,
    pub batch: u32,
    pub precision: Precision,
    /// The activation layout (resolved: never `Auto`).
    #[serde(skip_serializing_if = "Layout::is_nchw")]
    pub layout: Layout,
    pub classes: u32,
    /// Passes that changed the plan, in order.
    pub passes: Vec<String>,
    pub buffers: Vec<Buffer>,
    pub kernels: Vec<Kernel>,
    /// Run once after the parameters are loaded (inference: BN folding, eval scale/shift).
    pub setup: Vec<Launch>,
    /// Run every batch / step, in order.
    pub launches: Vec<Launch>,
    /// Trainable parameters in the `params` arena, in graph order.
    pub params: Vec<ParamSlot>,
    /// BN running statistics `(name, offset, len)` in the `state` buffer.
    pub state: Vec<(String, u64, u64)>,
    /// Buffer indices of the batch input, labels (train), logits, and per-sample loss (train).
    pub input: usize,
    pub labels: Option<usize>,
    pub logits: usize,
    pub loss: Option<usize>,
}

impl Schedule {
    pub fn buffer(&self, name: &str) -> Option<usize> {
        self.buffers.iter().position(|b| b.name == name)
    }

    /// The tensor-core convolution GEMMs of [`Schedule::launches`]: `(launch index, tuning
    /// key)` ([`KernelSpec::tile_key`]), in launch order.
    pub fn tile_keys(&self) -> Vec<(usize, String)> {
        self.launches
            .iter()
            .enumerate()
            .filter_map(|(i, l)| {
                let k = self.kernels[l.kernel]
                    .spec
                    .tile_key(&l.scalars, self.batch)?;
                Some((i, k))
            })
            .collect()
    }

    /// Whether some kernel runs on the tensor cores (bf16 or TF32 `mma.sync`: compute
    /// capability 8.0 or later).
    pub fn uses_tensor_cores(&self) -> bool {
        self.kernels
            .iter()
            .any(|k| k.spec.conv_geom().is_some_and(|g| g.tensor_cores))
    }

    /// The oldest compute capability (`major * 10 + minor`) the generated code runs on.
    pub fn min_compute_capability(&self) -> u32 {
        if self.uses_wgmma() {
            90
        } else if self.uses_tensor_cores() {
            80
        } else {
            0
        }
    }

    /// Some kernel runs on Hopper's warpgroup MMA ([`ConvGeom::wgmma`]): the module must be
    /// compiled for the architecture-specific target `sm_90a` ([`Schedule::nvrtc_arch`]).
    pub fn uses_wgmma(&self) -> bool {
        self.kernels
            .iter()
            .any(|k| k.spec.conv_geom().is_some_and(|g| g.wgmma))
    }

    /// The architecture to compile this schedule's module for on a GPU of architecture
    /// `arch` (e.g. `sm_90`): `sm_90a` where [`Schedule::uses_wgmma`], else `arch`.
    pub fn nvrtc_arch(&self, arch: &str) -> String {
        nvrtc_arch(arch, self.uses_wgmma())
    }

    /// Checks the module invariants.
    pub fn validate(&self) -> Result<(), String> {
        let mut names = std::collections::BTreeSet::new();
        for k in &self.kernels {
            if !names.insert(&k.name) {
                return Err(format!("duplicate kernel name {}", k.name));
            }
        }
        for (li, l) in self.setup.iter().chain(&self.launches).enumerate() {
            let k = self
                .kernels
                .get(l.kernel)
                .ok_or(format!("launch {li}: no kernel {}", l.kernel))?;
            let (bufs, scalars) = k.spec.signature();
            if bufs.len() != l.buffers.len() || scalars.len() != l.scalars.len() {
                return Err(format!(
                    "launch {li} ({}): {} buffers / {} scalars, kernel {} wants {} / {}",
                    l.note,
                    l.buffers.len(),
                    l.scalars.len(),
                    k.name,
                    bufs.len(),
                    scalars.len()
                ));
            }
            for (a, p) in l.buffers.iter().zip(&bufs) {
                let b = self
                    .buffers
                    .get(a.buffer)
                    .ok_or(format!("launch {li}: no buffer {}", a.buffer))?;
                if a.offset + a.len > b.len {
                    return Err(format!(
                        "launch {li} ({}): {} out of range of {}",
                        l.note, p.name, b.name
                    ));
                }
                if !p.dtype_ok(b.dtype) {
                    return Err(format!(
                        "launch {li} ({}): {} has dtype {:?}",
                        l.note, p.name, b.dtype
                    ));
                }
            }
            for (s, p) in l.scalars.iter().zip(&scalars) {
                if s.kind() != p.1 {
                    return Err(format!(
                        "launch {li} ({}): scalar {} is {:?}",
                        l.note,
                        p.0,
                        s.kind()
                    ));
                }
            }
            let tnames = k.spec.tmap_params();
            if tnames.len() != l.tmaps.len() {
                return Err(format!(
                    "launch {li} ({}): {} tensor maps, kernel {} wants {}",
                    l.note,
                    l.tmaps.len(),
                    k.name,
                    tnames.len()
                ));
            }
            for (t, name) in l.tmaps.iter().zip(tnames) {
                let bad = |why: &str| format!("launch {li} ({}): tensor map {name} {why}", l.note);
                let a = l
                    .buffers
                    .get(t.buffer)
                    .ok_or_else(|| bad("has no buffer"))?;
                let b = &self.buffers[a.buffer];
                if b.dtype != Dtype::Bf16 {
                    return Err(bad("is not over a bf16 buffer"));
                }
                if t.dims.iter().product::<u64>() > a.len || t.dims.contains(&0) {
                    return Err(bad("is larger than its buffer argument"));
                }
                if t.dims[0] % 8 != 0 || (a.offset * 2) % 16 != 0 {
                    return Err(bad("is not 16-byte aligned"));
                }
                if t.box_dim.iter().any(|&d| d == 0 || d > 256) || (t.box_dim[0] * 2) % 16 != 0 {
                    return Err(bad("has a box TMA cannot move"));
                }
                if t.box_dim
                    .iter()
                    .zip(&t.dims)
                    .any(|(&b, &d)| u64::from(b) > d)
                {
                    return Err(bad("has a box larger than its tensor"));
                }
                if t.swizzle != 0
                    && (![32, 64, 128].contains(&t.swizzle) || t.box_dim[0] * 2 != t.swizzle)
                {
                    return Err(bad("has a swizzle that does not match its box"));
                }
            }
        }
        Ok(())
    }

    /// The schedule as pretty JSON (`--emit schedule`).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("schedule serialises")
    }
}
