//! From an annotated [`Plan`] to a [`Schedule`]: buffers, kernels, launches; forward, loss,
//! reverse-mode autodiff and the multi-tensor optimizer update.

use super::*;
use crate::graph::{Graph, Op};
use crate::passes::{self, Plan};
use crate::rng;
use std::collections::HashMap;

fn err(msg: impl Into<String>) -> crate::Error {
    crate::Error::new(crate::Span::default(), msg)
}

/// Builds the schedule of `graph`: plan, fusion passes (per `opts.fusion`), lowering.
pub fn build(graph: &Graph, opts: &Options) -> crate::Result<Schedule> {
    opts.fusion.validate().map_err(err)?;
    let mut plan = Plan::new(graph, opts.mode);
    let changed = passes::run(&mut plan, &opts.fusion, |_, _| {});
    let mut s = lower(&plan, opts)?;
    s.passes = changed.into_iter().map(String::from).collect();
    Ok(s)
}

const ELEM_BLOCK: u32 = 256;
const MAX_ELEM_GRID: u64 = 4096;
/// The most elements a tensor may have: its grid-stride loops' indices, up to the count plus
/// one stride of `MAX_ELEM_GRID * ELEM_BLOCK`, must stay within an i32.
pub const MAX_INDEXED: u64 = i32::MAX as u64 - MAX_ELEM_GRID * ELEM_BLOCK as u64;
const TILE: u32 = 16;

/// Whether a BN of `plan` sums its statistics over pixel ranges ([`channel_reduce_splits`]):
/// it has no conv epilogue doing it (`fuse.stats_from`) and its shape splits.
fn stats_split(plan: &Plan, nhwc: bool, n: u64) -> bool {
    plan.nodes.iter().any(|x| {
        matches!(x.op, Op::BatchNorm { .. })
            && x.fuse.stats_from.is_none()
            && channel_reduce_splits(nhwc, x.shape.c as u64, n * (x.shape.h * x.shape.w) as u64) > 1
    })
}

fn ceil_div(a: u64, b: u64) -> u64 {
    a.div_ceil(b)
}

struct B<'a> {
    plan: &'a Plan,
    n: u32,
    s: Schedule,
    kernel_index: HashMap<String, usize>,
    param_off: HashMap<String, (u64, u64)>,
    state_off: HashMap<usize, u64>,
    stats_off: HashMap<usize, u64>,
    val: Vec<Option<usize>>,
    grad: Vec<Option<usize>>,
    written: Vec<bool>,
    /// For nodes in a BN prologue chain (ReLU, dropout): the BN.
    chain_bn: Vec<Option<usize>>,
    /// For a chained BN: the node whose gradient is the chain's activation gradient.
    chain_last: Vec<Option<usize>>,
    in_setup: bool,
    /// Convolutions run on the tensor cores (`--precision bf16`, or f32 with `--tf32x3`).
    tensor_cores: bool,
    /// How f32 convolutions compute (fp32 FMAs unless `tensor_cores`).
    f32: F32Math,
    /// Their block tiles.
    tiles: Tiles,
    /// Activations are NHWC (`Layout::Nhwc`).
    nhwc: bool,
}

impl<'a> B<'a> {
    fn buffer(&mut self, name: String, len: u64, dtype: Dtype, role: Role) -> usize {
        if let Some(i) = self.s.buffer(&name) {
            return i;
        }
        self.s.buffers.push(Buffer {
            name,
            len,
            dtype,
            role,
        });
        self.written.push(false);
        self.s.buffers.len() - 1
    }

    fn kernel(&mut self, spec: KernelSpec) -> usize {
        let name = spec.name();
        if let Some(&k) = self.kernel_index.get(&name) {
            debug_assert_eq!(self.s.kernels[k].spec, spec);
            return k;
        }
        self.s.kernels.push(Kernel {
            name: name.clone(),
            spec,
        });
        self.kernel_index.insert(name, self.s.kernels.len() - 1);
        self.s.kernels.len() - 1
    }

    fn whole(&self, b: usize, access: Access) -> BufArg {
        BufArg {
            buffer: b,
            offset: 0,
            len: self.s.buffers[b].len,
            access,
        }
    }

    fn param(&self, name: &str, access: Access, arena: usize) -> BufArg {
        let (offset, len) = self.param_off[name];
        BufArg {
            buffer: arena,
            offset,
            len,
            access,
        }
    }

    fn launch(
        &mut self,
        spec: KernelSpec,
        grid: [u64; 3],
        block: [u32; 3],
        buffers: Vec<BufArg>,
        scalars: Vec<ScalarArg>,
        note: String,
    ) -> crate::Result<()> {
        // Per-step scalars become reads of the `hyper` buffer (the signature's last buffer),
        // as `KernelSpec::signature` declares them.
        let (mut buffers, mut scalars) = (buffers, scalars);
        let per_step = |s: &ScalarArg| matches!(s, ScalarArg::Step | ScalarArg::Lr);
        if scalars.iter().any(per_step) {
            scalars.retain(|s| !per_step(s));
            let h = self.buffer("hyper".into(), HYPER_LEN, Dtype::U32, Role::Hyper);
            buffers.push(self.whole(h, Access::Read));
        }
        let kernel = self.kernel(spec);
        for (i, g) in grid.iter().enumerate() {
            let limit = if i == 0 { i32::MAX as u64 } else { 65_535 };
            if *g == 0 || *g > limit {
                return Err(err(format!("{note}: grid dimension {g} out of range")));
            }
        }
        for a in &buffers {
            if matches!(a.access, Access::Write | Access::ReadWrite) {
                self.written[a.buffer] = true;
            }
        }
        let l = Launch {
            kernel,
            grid: grid.map(|g| g as u32),
            block,
            shared: spec.dynamic_smem(),
            tmaps: spec.tmaps(&buffers, &scalars),
            buffers,
            scalars,
            note,
        };
        if self.in_setup {
            self.s.setup.push(l);
        } else {
            self.s.launches.push(l);
        }
        Ok(())
    }

    /// A tiled GEMM launch (conv or linear): `rows x cols` outputs per group, a block of 16x16
    /// threads per tile (`ConvGeom::block_tile` for a conv, 16x16 for a linear layer), one
    /// block row of the grid per group (`grid.z`). A tensor-core conv's tile comes from
    /// `Options::tiles` here.
    #[allow(clippy::too_many_arguments)]
    fn gemm_launch(
        &mut self,
        spec: KernelSpec,
        rows: u64,
        cols: u64,
        groups: u32,
        buffers: Vec<BufArg>,
        scalars: Vec<ScalarArg>,
        note: String,
    ) -> crate::Result<()> {
        let mut spec = spec;
        // a strided conv's data gradient in phase order (before the tile's lookup: it is part
        // of the kernel's identity, so of its tile key)
        if let KernelSpec::ConvBwdData { g, .. } = &mut spec {
            g.phases = !self.tiles.dense_dgrad && g.phases_fit();
        }
        let tile = self.tile_for(&spec, &scalars);
        let kmajor = matches!(
            spec,
            KernelSpec::ConvFwd { .. } | KernelSpec::ConvBwdData { .. }
        );
        // (bf16 or plain TF32; 3xTF32 runs `mma.sync`, which `check_engine_flags` says;
        // the weight gradient goes through a transposing pass in shared memory)
        let wgmma = spec
            .conv_geom()
            .is_some_and(|g| self.tiles.wgmma && g.vec && !g.tf32x3 && tile.rows >= 64);
        // stages of 64 reduction indices: bf16's forward and data gradient on wgmma, where the
        // reduction is at least 64 long (a shorter one would fill half of every stage with
        // zeros)
        let long = spec.weight_gemm(&scalars).is_some_and(|(red, _)| red >= 64);
        // a split-K forward conv's slices start at multiples of 32 reduction indices: stages of
        // 32 (a stage of 64 could straddle two taps)
        let split = matches!(spec, KernelSpec::ConvFwd { split_k, .. } if split_k > 1);
        let k64 = spec.conv_geom().is_some_and(|g| {
            self.tiles.k64 && wgmma && kmajor && !g.f32_operands() && long && !split
        });
        let bk = if k64 { 64 } else { 32 };
        let weight_box_fits = spec.weight_box_fits(&scalars, tile.cols, bk);
        let phase_box_fits = match &spec {
            KernelSpec::ConvBwdData { g, .. } => spec
                .weight_gemm(&scalars)
                .is_some_and(|(red, _)| (red / u64::from(g.k * g.k)).is_multiple_of(u64::from(bk))),
            _ => true,
        };
        if let Some(g) = spec.conv_geom_mut() {
            g.tile = tile;
            g.wgmma = wgmma;
            g.k64 = k64;
            // TMA (bf16's forward and data gradient) where no box is larger than its tensor
            // (CUDA requires it, [`TmapArg`]); elsewhere the operands come by `cp.async`
            g.tma = self.tiles.tma && g.wgmma && kmajor && !g.f32_operands() && weight_box_fits;
            // in phase order a stage's `bk` reduction indices must lie in one tap for the
            // weight's TMA box to be one box: the output channels per group a multiple of `bk`
            if g.phases && !phase_box_fits {
                g.tma = false;
            }
            g.stages = if g.vec { self.tiles.stages } else { 0 };
        }
        // the activation operand by TMA where the tile is a box of the image (after the above:
        // it depends on the tile and on `tma`)
        let tma_a = spec.act_box(&scalars).is_some();
        if let Some(g) = spec.conv_geom_mut() {
            g.tma_a = tma_a;
        }
        let (tr, tc) = spec.conv_geom().map_or((TILE, TILE), |g| g.block_tile());
        let grid = [
            ceil_div(rows, tr as u64),
            ceil_div(cols, tc as u64),
            groups as u64,
        ];
        self.launch(spec, grid, [TILE, TILE, 1], buffers, scalars, note)
    }

    /// The block tile of a tensor-core convolution launch with `scalars` (by its
    /// [`KernelSpec::tile_key`]); the default for any other launch.
    fn tile_for(&self, spec: &KernelSpec, scalars: &[ScalarArg]) -> TcTile {
        spec.tile_key(scalars, self.n)
            .map_or(TcTile::DEFAULT, |k| self.tiles.get(&k))
    }

    fn elem_grid(count: u64) -> [u64; 3] {
        [
            ceil_div(count, ELEM_BLOCK as u64).clamp(1, MAX_ELEM_GRID),
            1,
            1,
        ]
    }

    fn numel(&self, i: usize) -> u64 {
        self.n as u64 * self.plan.nodes[i].shape.numel()
    }

    fn val(&self, i: usize) -> usize {
        self.val[i]
            .unwrap_or_else(|| panic!("value of {} is not materialised", self.plan.nodes[i].name))
    }

    /// A vector-loading conv's weight operand ([`ConvGeom::vec`]): launches
    /// [`KernelSpec::PackWeight`] from the f32 OIHW weight `w` into a bf16 (f32 for a TF32
    /// conv, [`ConvGeom::f32_operands`]) scratch buffer named
    /// `pack.<conv>.<pass>` and returns that buffer (read); `w` itself when `g` is not `vec`.
    /// In training the copy lives from this launch to the conv's, so the memory plan reuses
    /// its bytes. In inference the (folded) weights only change with the parameters, so the
    /// pack is a setup launch, run once after they change, and the copy persists.
    fn conv_weight(
        &mut self,
        w: BufArg,
        g: &ConvGeom,
        conv: &crate::graph::Conv2d,
        node: &str,
        data_grad: bool,
    ) -> crate::Result<BufArg> {
        if !g.vec {
            return Ok(w);
        }
        let pass = if data_grad { "bwd_data" } else { "fwd" };
        let wp = self.buffer(
            format!("pack.{node}.{pass}"),
            w.len,
            if g.f32_operands() {
                Dtype::F32
            } else {
                Dtype::Bf16
            },
            Role::Scratch,
        );
        let out = self.whole(wp, Access::Write);
        let in_setup = self.in_setup;
        self.in_setup = self.plan.mode == Mode::Infer;
        let packed = self.launch(
            KernelSpec::PackWeight {
                k: g.k,
                groups: g.groups,
                data_grad,
                f32: g.f32_operands(),
            },
            B::elem_grid(w.len),
            [ELEM_BLOCK, 1, 1],
            vec![
                out,
                BufArg {
                    access: Access::Read,
                    ..w
                },
            ],
            vec![
                ScalarArg::I32(conv.out_c as i32),
                ScalarArg::I32(conv.in_c as i32),
            ],
            format!("{node} {pass} weight pack"),
        );
        self.in_setup = in_setup;
        packed?;
        Ok(self.whole(wp, Access::Read))
    }

    /// The scratch buffer (f32, `len`) of a split-K GEMM's partial sums, `splitk.<node>`.
    fn splitk_part(&mut self, node: &str, len: u64) -> usize {
        self.buffer(format!("splitk.{node}"), len, Dtype::F32, Role::Scratch)
    }

    fn arg(&self, b: usize, access: Access) -> BufArg {
        self.whole(b, access)
    }

    fn rng(&self, node: usize, p: f32) -> [ScalarArg; 4] {
        [
            ScalarArg::Seed,
            ScalarArg::U32(rng::stream_id(&self.plan.nodes[node].name)),
            ScalarArg::Step,
            ScalarArg::F32(p),
        ]
    }

    /// The scalars an NHWC dropout of node `i` takes after `count` (`C`, `HW`), none in NCHW.
    fn layout_scalars(&self, i: usize) -> Vec<ScalarArg> {
        let sh = self.plan.nodes[i].shape;
        if self.nhwc {
            vec![
                ScalarArg::I32(sh.c as i32),
                ScalarArg::I32((sh.h * sh.w) as i32),
            ]
        } else {
            vec![]
        }
    }

    /// A linear layer `i`'s `hw` (see [`KernelSpec::LinearFwd`]): its input's pixels in an
    /// NHWC schedule, else 1.
    fn linear_hw(&self, i: usize) -> u32 {
        let sh = self.plan.nodes[self.plan.nodes[i].inputs[0]].shape;
        if self.nhwc {
            sh.h * sh.w
        } else {
            1
        }
    }

    fn dropout_p(&self, d: usize) -> f32 {
        match self.plan.nodes[d].op {
            Op::Dropout { p } => p,
            _ => unreachable!(),
        }
    }

    fn bn_buf(&mut self, b: usize, what: &str, role: Role) -> usize {
        let c = self.plan.nodes[b].shape.c as u64;
        let name = format!("bn.{}.{what}", self.plan.nodes[b].name);
        self.buffer(name, 2 * c, Dtype::F32, role)
    }

    fn slice(&self, buffer: usize, offset: u64, len: u64, access: Access) -> BufArg {
        BufArg {
            buffer,
            offset,
            len,
            access,
        }
    }
}

/// Slices of a GEMM's reduction (`pixels` long: the weight gradient's pixels on any engine, a
/// tensor-core inference forward conv's `IC/g * k * k`) for an `rows x cols` output per group in blocks of
/// `tile`, `wlen` outputs in all; 1 means no split.
///
/// First the fewest slices for about [`SPLIT_K_MIN_BLOCKS`] blocks (two per SM of a
/// [`GPU_SMS`]-SM GPU), each slice keeping at least 8 steps of 32, at most [`SPLIT_K_MAX`]
/// slices. Where that splits at all, more slices (within the same limits) are taken where
/// [`split_k_cost`] says the grid's last wave then costs less than the partial sums' extra
/// traffic: a grid just over a multiple of the SMs (276 blocks, 2.09 per SM) runs as long as
/// 3 blocks per SM, so WRN-28-10's 160-wide 3x3 weight gradients (69 blocks of 64x64, 4096
/// steps) take 17 slices (1173 blocks, 8.9 per SM) instead of 4. Fewer while the grid's z or
/// the partial buffer's `int` indices would overflow; then as few as give every slice the same
/// whole steps (`ceil(steps / s)` each), so that no slice is empty.
fn split_k_for(
    rows: u64,
    cols: u64,
    groups: u32,
    pixels: u64,
    wlen: u64,
    tile: TcTile,
    tensor_cores: bool,
) -> u32 {
    let blocks = rows.div_ceil(tile.rows as u64).max(1)
        * cols.div_ceil(tile.cols as u64).max(1)
        * groups.max(1) as u64;
    let steps = pixels.div_ceil(32).max(1);
    let fits = |s: u64| s * groups as u64 <= 65_535 && s * wlen <= i32::MAX as u64;
    // slices are `ceil(steps / s)` steps each (the kernels' and the reference's chunk): the
    // fewest slices of that length, so none is left without work
    let even = |s: u64| steps.div_ceil(steps.div_ceil(s));
    let most = (steps / 8).clamp(1, SPLIT_K_MAX);
    let mut s = SPLIT_K_MIN_BLOCKS.div_ceil(blocks).min(most).max(1);
    while s > 1 && !fits(s) {
        s -= 1;
    }
    let mut s = even(s);
    if s > 1 {
        let per_byte = if tensor_cores {
            FLOPS_PER_BYTE_TC
        } else {
            FLOPS_PER_BYTE_FMA
        };
        let cost = |s| split_k_cost(blocks, steps, s, wlen, tile, per_byte);
        for t in s + 1..=most {
            let t = even(t);
            if fits(t) && cost(t) < cost(s) {
                s = t;
            }
        }
    }
    s as u32
}

/// Blocks a split-K grid aims for at least: two per SM of a [`GPU_SMS`]-SM GPU.
pub const SPLIT_K_MIN_BLOCKS: u64 = 2 * GPU_SMS;

/// The most slices a split-K GEMM takes: enough for a one-block output over a long reduction
/// (a weight gradient from 16 channels, 4096 steps at batch 128) to fill 2 blocks per SM;
/// the partial sums' traffic (`split_k_cost`) keeps large outputs far below it.
pub const SPLIT_K_MAX: u64 = 128;

/// Bytes of DRAM traffic that cost as much time as one multiply-add pair (2 flops) of bf16
/// `mma.sync` work, as flops per byte: a Hopper's dense bf16 rate over its DRAM bandwidth
/// (989 TFLOP/s over 3.35 TB/s (H100 SXM) or 4.8 TB/s (H200): 295 or 206), taken low
/// (`mma.sync` runs below the dense peak), so that split-K's extra traffic is not
/// underestimated.
const FLOPS_PER_BYTE_TC: u64 = 200;

/// The same for the fp32 FMA engine (64x64 tiles of [`TcTile::DEFAULT`]'s size): 67 TFLOP/s
/// of fp32 FMAs over 3.35 TB/s, 20.
const FLOPS_PER_BYTE_FMA: u64 = 20;

/// A model of a split-K GEMM's time, in flops of one SM (the busiest): `blocks` output tiles
/// of `tile`, `steps` steps of 32 reduction indices, `s` slices of `ceil(steps / s)` steps,
/// `wlen` outputs. Blocks of equal work spread over [`GPU_SMS`] SMs, so the busiest SM runs
/// `ceil(blocks s / SMS)` of them (the last wave's quantization). With `s > 1` the slices
/// write `s wlen` f32 partial sums that the summing launch reads back: `8 s wlen` bytes at
/// `per_byte` flops a byte ([`FLOPS_PER_BYTE_TC`], [`FLOPS_PER_BYTE_FMA`]), shared by the SMs. Only compares splits of one GEMM; it is no
/// prediction of time.
fn split_k_cost(blocks: u64, steps: u64, s: u64, wlen: u64, tile: TcTile, per_byte: u64) -> u64 {
    let step_flops = 2 * 32 * tile.rows as u64 * tile.cols as u64;
    let per_sm = (blocks * s).div_ceil(GPU_SMS) * steps.div_ceil(s) * step_flops;
    let partials = if s > 1 { 8 * s * wlen } else { 0 };
    per_sm + partials * per_byte / GPU_SMS
}

/// Conv `i`'s geometry; on the tensor cores when `tensor_cores` (`--precision bf16`, or f32
/// with [`Tiles::tf32x3`] or [`Tiles::tf32`]: `f32`, which says how).
fn geom(p: &Plan, i: usize, tensor_cores: bool, f32: F32Math, nhwc: bool) -> ConvGeom {
    let Op::Conv2d(c) = p.nodes[i].op else {
        unreachable!()
    };
    let ins = p.nodes[p.nodes[i].inputs[0]].shape;
    let out = p.nodes[i].shape;
    ConvGeom {
        in_h: ins.h,
        in_w: ins.w,
        out_h: out.h,
        out_w: out.w,
        k: c.k,
        stride: c.stride,
        pad: c.pad,
        groups: c.groups,
        tensor_cores,
        tile: TcTile::DEFAULT,
        nhwc,
        // whole 16-byte runs of channels in every patch the forward and data-gradient passes
        // gather (and 16-byte aligned ones: every offset is a multiple of 8 channels)
        vec: tensor_cores && nhwc && (c.in_c / c.groups) % 8 == 0 && (c.out_c / c.groups) % 8 == 0,
        wgmma: false,
        stages: 0,
        tma: false,
        tma_a: false,
        tf32x3: tensor_cores && f32 == F32Math::Tf32x3,
        tf32: tensor_cores && f32 == F32Math::Tf32,
        // set per launch (`gemm_launch`): it is the data gradient's alone
        phases: false,
        k64: false,
    }
}

/// Lowers an annotated plan (see [`crate::passes`]) to a schedule.
pub fn lower(plan: &Plan, opts: &Options) -> crate::Result<Schedule> {
    let n = opts.batch;
    if n == 0 {
        return Err(err("batch size must be at least 1"));
    }
    plan.verify().map_err(err)?;
    opts.tiles.check().map_err(err)?;
    super::check_engine_flags(
        opts.precision,
        opts.tiles.f32_math(),
        opts.tiles.wgmma,
        opts.tiles.tma,
        opts.tiles.k64,
        opts.tiles.stages != 0,
    )
    .map_err(err)?;
    let train = plan.mode == Mode::Train;
    let act = match opts.precision {
        Precision::F32 => Dtype::F32,
        Precision::Bf16 => Dtype::Bf16,
    };
    let layout = opts.layout.resolve(opts.precision, opts.tiles.f32_math());
    let nn = plan.nodes.len();
    let mut b = B {
        plan,
        n,
        s: Schedule {
            name: plan.name.clone(),
            mode: plan.mode,
            batch: n,
            precision: opts.precision,
            layout,
            classes: plan.classes,
            passes: vec![],
            buffers: vec![],
            kernels: vec![],
            setup: vec![],
            launches: vec![],
            params: vec![],
            state: vec![],
            input: 0,
            labels: None,
            logits: 0,
            loss: None,
        },
        kernel_index: HashMap::new(),
        param_off: HashMap::new(),
        state_off: HashMap::new(),
        stats_off: HashMap::new(),
        val: vec![None; nn],
        grad: vec![None; nn],
        written: vec![],
        chain_bn: vec![None; nn],
        chain_last: vec![None; nn],
        in_setup: false,
        tensor_cores: opts.precision == Precision::Bf16 || opts.tiles.f32_math().tensor_cores(),
        f32: opts.tiles.f32_math(),
        tiles: opts.tiles.clone(),
        nhwc: layout == Layout::Nhwc,
    };

    // sizes: every element index must fit an i32, and so must the index a grid-stride loop
    // steps to past the end (`i += gridDim.x * blockDim.x`, at most MAX_ELEM_GRID *
    // ELEM_BLOCK), or its last step wraps negative and reads before the buffer
    for node in &plan.nodes {
        let total = node.shape.numel().checked_mul(n as u64);
        if total.is_none_or(|t| t > MAX_INDEXED) {
            return Err(err(format!(
                "{}: {} x {} elements exceed the {MAX_INDEXED} (2^31 - 2^20) that 32-bit indexing allows; use a smaller batch",
                node.name, n, node.shape
            )));
        }
    }

    // parameter arenas and BN state
    let mut off = 0u64;
    let mut state = 0u64;
    let mut stats = 0u64;
    for (i, node) in plan.nodes.iter().enumerate() {
        for p in node.op.params() {
            let len: u64 = p.shape.iter().map(|&d| d as u64).product();
            let name = format!("{}.{}", node.name, p.suffix);
            b.param_off.insert(name.clone(), (off, len));
            b.s.params.push(ParamSlot {
                name,
                offset: off,
                len,
                kind: p.kind,
                // as the CPU reference (and the WRN authors' code): every parameter is decayed
                decay: true,
            });
            off += len;
        }
        if let Op::BatchNorm { c, .. } = node.op {
            b.state_off.insert(i, state);
            b.s.state.push((node.name.clone(), state, 2 * c as u64));
            state += 2 * c as u64;
            b.stats_off.insert(i, stats);
            // [sum | sum of squares | their compensation terms] (see the conv epilogue)
            stats += 4 * c as u64;
        }
    }
    if off > i32::MAX as u64 {
        return Err(err(format!(
            "{off} parameters exceed the 2^31 limit of 32-bit indexing"
        )));
    }
    let params = b.buffer("params".into(), off.max(1), Dtype::F32, Role::Param);
    let grads = if train {
        Some(b.buffer("grads".into(), off.max(1), Dtype::F32, Role::Grad))
    } else {
        None
    };
    let momentum = if train {
        Some(b.buffer("momentum".into(), off.max(1), Dtype::F32, Role::Momentum))
    } else {
        None
    };
    let state_buf = b.buffer("state".into(), state.max(1), Dtype::F32, Role::State);
    let stats_buf = if train && stats > 0 {
        Some(b.buffer("bn_stats".into(), stats, Dtype::F32, Role::Scratch))
    } else {
        None
    };

    // values
    for i in 0..nn {
        let node = &plan.nodes[i];
        if matches!(node.op, Op::Input) {
            let len = b.numel(i);
            let buf = b.buffer("input".into(), len, act, Role::Input);
            b.s.input = buf;
            // an NHWC schedule reads its own transposed copy (see `ToNhwc` below)
            b.val[i] = Some(if b.nhwc {
                b.buffer("act.input.nhwc".into(), len, act, Role::Activation)
            } else {
                buf
            });
        } else if node.fuse.removed {
            b.val[i] = b.val[node.inputs[0]];
        } else if plan.value_node(i) == Some(i) {
            let len = b.numel(i);
            b.val[i] = Some(b.buffer(format!("act.{}", node.name), len, act, Role::Activation));
        }
    }
    b.s.logits = b.val[plan.output].ok_or_else(|| err("the output is not materialised"))?;

    // BN prologue chains
    for i in 0..nn {
        if let Some(p) = plan.nodes[i].fuse.prologue {
            if let Some(bn) = p.bn {
                for x in [p.relu, p.dropout].into_iter().flatten() {
                    b.chain_bn[x] = Some(bn);
                }
                b.chain_last[bn] = Some(plan.nodes[i].inputs[0]);
            }
        }
    }

    // ---------------------------------------------------------------- inference setup
    if !train {
        b.in_setup = true;
        for i in 0..nn {
            if let Op::BatchNorm { c, eps, .. } = plan.nodes[i].op {
                let name = plan.nodes[i].name.clone();
                let affine = b.bn_buf(i, "affine", Role::Saved);
                let so = b.state_off[&i];
                let args = vec![
                    b.slice(state_buf, so, 2 * c as u64, Access::Read),
                    b.param(&format!("{name}.weight"), Access::Read, params),
                    b.param(&format!("{name}.bias"), Access::Read, params),
                    b.arg(affine, Access::Write),
                ];
                b.launch(
                    KernelSpec::BnFinalizeEval,
                    [ceil_div(c as u64, 256), 1, 1],
                    [256, 1, 1],
                    args,
                    vec![ScalarArg::I32(c as i32), ScalarArg::F32(eps)],
                    format!("{name} finalize_eval"),
                )?;
                if let Some(cv) = plan.nodes[i].fuse.folded_into {
                    let Op::Conv2d(conv) = plan.nodes[cv].op else {
                        unreachable!()
                    };
                    let cname = plan.nodes[cv].name.clone();
                    let per = (conv.in_c / conv.groups * conv.k * conv.k) as u64;
                    let wlen = conv.out_c as u64 * per;
                    let wb = b.buffer(
                        format!("fold.{cname}.weight"),
                        wlen,
                        Dtype::F32,
                        Role::Scratch,
                    );
                    let bb = b.buffer(
                        format!("fold.{cname}.bias"),
                        conv.out_c as u64,
                        Dtype::F32,
                        Role::Scratch,
                    );
                    let mut args = vec![
                        b.arg(wb, Access::Write),
                        b.arg(bb, Access::Write),
                        b.param(&format!("{cname}.weight"), Access::Read, params),
                    ];
                    if conv.bias {
                        args.push(b.param(&format!("{cname}.bias"), Access::Read, params));
                    }
                    args.push(b.arg(affine, Access::Read));
                    b.launch(
                        KernelSpec::FoldBn { bias: conv.bias },
                        B::elem_grid(wlen),
                        [ELEM_BLOCK, 1, 1],
                        args,
                        vec![
                            ScalarArg::I32(conv.out_c as i32),
                            ScalarArg::I32(per as i32),
                        ],
                        format!("{cname} fold {name}"),
                    )?;
                }
            }
        }
        b.in_setup = false;
    }

    // ---------------------------------------------------------------- forward
    if let Some(sb) = stats_buf {
        if plan.nodes.iter().any(|x| x.fuse.stats_for.is_some())
            || stats_split(plan, b.nhwc, n as u64)
        {
            let a = b.arg(sb, Access::Write);
            b.launch(
                KernelSpec::Zero,
                B::elem_grid(stats),
                [ELEM_BLOCK, 1, 1],
                vec![a],
                vec![ScalarArg::I32(stats as i32)],
                "zero bn_stats".into(),
            )?;
        }
    }
    let ni = n as i32;
    if b.nhwc {
        // y[n][p][c] = x[n][c][p]: the NCHW input in the schedule's layout
        let x = plan
            .nodes
            .iter()
            .position(|x| matches!(x.op, Op::Input))
            .unwrap();
        let sh = plan.nodes[x].shape;
        let (xin, xv) = (b.s.input, b.val(x));
        let args = vec![b.arg(xv, Access::Write), b.arg(xin, Access::Read)];
        b.launch(
            KernelSpec::ToNhwc,
            B::elem_grid(b.numel(x)),
            [ELEM_BLOCK, 1, 1],
            args,
            vec![
                ScalarArg::I32(ni),
                ScalarArg::I32(sh.c as i32),
                ScalarArg::I32((sh.h * sh.w) as i32),
            ],
            "input to nhwc".into(),
        )?;
    }
    for i in 0..nn {
        let node = &plan.nodes[i];
        let name = node.name.clone();
        let shape = node.shape;
        let fu = node.fuse.clone();
        let count = b.numel(i);
        match node.op {
            Op::Input => {}
            Op::Conv2d(conv) => {
                let g = geom(plan, i, b.tensor_cores, b.f32, b.nhwc);
                let pro = fu.prologue;
                let src = pro.map(|p| p.src).unwrap_or(node.inputs[0]);
                let pflags = PrologueFlags {
                    affine: pro.is_some_and(|p| p.bn.is_some()),
                    relu: pro.is_some_and(|p| p.relu.is_some()),
                    dropout: pro.is_some_and(|p| p.dropout.is_some()),
                };
                let folded = fu.folded_bn;
                let epi = EpilogueFlags {
                    bias: conv.bias || folded.is_some(),
                    residual: fu.residual.is_some(),
                    stats: fu.stats_for.is_some(),
                    relu: fu.epi_relu.is_some(),
                };
                // the last node of the epilogue chain: its ReLU, add, folded BN, or the conv
                let y = b.val(plan.epilogue_out(i));
                let xb = b.val(src);
                let mut args = vec![b.arg(y, Access::Write), b.arg(xb, Access::Read)];
                let w = if folded.is_some() {
                    let w = b.s.buffer(&format!("fold.{name}.weight")).unwrap();
                    b.arg(w, Access::Read)
                } else {
                    b.param(&format!("{name}.weight"), Access::Read, params)
                };
                args.push(b.conv_weight(w, &g, &conv, &name, false)?);
                if pflags.affine {
                    let bn = pro.unwrap().bn.unwrap();
                    let aff = b.bn_buf(bn, "affine", Role::Saved);
                    args.push(b.arg(aff, Access::Read));
                }
                if epi.bias {
                    if folded.is_some() {
                        let fb = b.s.buffer(&format!("fold.{name}.bias")).unwrap();
                        args.push(b.arg(fb, Access::Read));
                    } else {
                        args.push(b.param(&format!("{name}.bias"), Access::Read, params));
                    }
                }
                if let Some((_, o)) = fu.residual {
                    let r = b.val(o);
                    args.push(b.arg(r, Access::Read));
                }
                if let Some(bn) = fu.stats_for {
                    let so = b.stats_off[&bn];
                    args.push(b.slice(
                        stats_buf.unwrap(),
                        so,
                        4 * conv.out_c as u64,
                        Access::ReadWrite,
                    ));
                }
                let mut sc = vec![
                    ScalarArg::I32(ni),
                    ScalarArg::I32(conv.in_c as i32),
                    ScalarArg::I32(conv.out_c as i32),
                ];
                if let Some(d) = pro.and_then(|p| p.dropout) {
                    sc.extend(b.rng(d, b.dropout_p(d)));
                }
                let rows = n as u64 * (g.out_h * g.out_w) as u64;
                let cols = (conv.out_c / g.groups) as u64;
                let spec = |split_k| KernelSpec::ConvFwd {
                    g,
                    pro: pflags,
                    epi,
                    split_k,
                };
                // inference on the tensor cores: a grid too small for the GPU (small batches)
                // splits its reduction (the tile is the unsplit conv's: the split is not in
                // the tile key)
                let split_k = if !train
                    && g.tensor_cores
                    && !epi.stats
                    && !pflags.dropout
                    && !b.tiles.no_split_k
                {
                    let kdim = (conv.in_c / g.groups * g.k * g.k) as u64;
                    split_k_for(
                        rows,
                        cols,
                        g.groups,
                        kdim,
                        count,
                        b.tile_for(&spec(1), &sc),
                        true,
                    )
                } else {
                    1
                };
                if split_k > 1 {
                    // the slices' partial convolutions into a scratch buffer, then one
                    // launch sums them in slice order and applies the epilogue
                    let part = b.splitk_part(&name, split_k as u64 * count);
                    let n_conv = 3 + usize::from(pflags.affine);
                    let mut epi_args = args.split_off(n_conv);
                    let yarg = std::mem::replace(&mut args[0], b.whole(part, Access::Write));
                    b.gemm_launch(
                        spec(split_k),
                        rows,
                        cols,
                        g.groups * split_k,
                        args,
                        sc,
                        format!("{name} fwd (split-K {split_k})"),
                    )?;
                    epi_args.insert(0, b.whole(part, Access::Read));
                    epi_args.insert(0, yarg);
                    b.launch(
                        KernelSpec::SplitKEpilogue { epi, nhwc: b.nhwc },
                        B::elem_grid(count),
                        [ELEM_BLOCK, 1, 1],
                        epi_args,
                        vec![
                            ScalarArg::I32(count as i32),
                            ScalarArg::I32(split_k as i32),
                            ScalarArg::I32(conv.out_c as i32),
                            ScalarArg::I32((g.out_h * g.out_w) as i32),
                        ],
                        format!("{name} fwd split-K sum"),
                    )?;
                } else {
                    b.gemm_launch(
                        spec(1),
                        rows,
                        cols,
                        g.groups,
                        args,
                        sc,
                        format!("{name} fwd"),
                    )?;
                }
            }
            Op::BatchNorm { c, eps, momentum } => {
                let x = node.inputs[0];
                let hw = shape.h * shape.w;
                if train {
                    let so = b.stats_off[&i];
                    let sb = stats_buf.unwrap();
                    // statistics over pixel ranges, compensated pairs added into the slot
                    // "zero bn_stats" cleared (`stats_split`, the same test)
                    let splits = channel_reduce_splits(b.nhwc, c as u64, ni as u64 * hw as u64);
                    let split = fu.stats_from.is_none() && splits > 1;
                    if fu.stats_from.is_none() {
                        let xb = b.val(x);
                        let args = vec![
                            if split {
                                b.slice(sb, so, 4 * c as u64, Access::ReadWrite)
                            } else {
                                b.slice(sb, so, 2 * c as u64, Access::Write)
                            },
                            b.arg(xb, Access::Read),
                        ];
                        let (grid, block) = channel_reduce_shape(b.nhwc, c as u64);
                        b.launch(
                            KernelSpec::ChannelSums {
                                squares: true,
                                nhwc: b.nhwc,
                                split,
                            },
                            [grid[0], if split { splits } else { 1 }, 1],
                            block,
                            args,
                            vec![
                                ScalarArg::I32(ni),
                                ScalarArg::I32(c as i32),
                                ScalarArg::I32(hw as i32),
                            ],
                            format!("{name} stats"),
                        )?;
                    }
                    let saved = b.bn_buf(i, "saved", Role::Saved);
                    let affine = b.bn_buf(i, "affine", Role::Saved);
                    let st = b.state_off[&i];
                    let args = vec![
                        // compensated pairs from a conv epilogue or a split reduction, centred
                        // sums otherwise
                        b.slice(
                            sb,
                            so,
                            if fu.stats_from.is_some() || split {
                                4
                            } else {
                                2
                            } * c as u64,
                            Access::Read,
                        ),
                        b.param(&format!("{name}.weight"), Access::Read, params),
                        b.param(&format!("{name}.bias"), Access::Read, params),
                        b.arg(saved, Access::Write),
                        b.arg(affine, Access::Write),
                        b.slice(state_buf, st, 2 * c as u64, Access::ReadWrite),
                    ];
                    // a conv's data gradient (`fuse.bwd_for`), or a split dBN reduction, adds
                    // this BN's [dgamma | dbeta] with atomics: zeroed here, before the
                    // backward, each step
                    let zero_dsums = plan.nodes.iter().any(|x| x.fuse.bwd_for == Some(i))
                        || (fu.bwd_from.is_none()
                            && channel_reduce_splits(b.nhwc, c as u64, ni as u64 * hw as u64) > 1);
                    let mut args = args;
                    if zero_dsums {
                        let (goff, _) = b.param_off[&format!("{name}.weight")];
                        let grads = grads.ok_or_else(|| err("training without gradients"))?;
                        args.push(b.slice(grads, goff, 2 * c as u64, Access::Write));
                    }
                    let cnt = (n as u64 * hw as u64) as i32;
                    b.launch(
                        KernelSpec::BnFinalizeTrain {
                            centered: fu.stats_from.is_none() && !split,
                            zero_dsums,
                        },
                        [ceil_div(c as u64, 256), 1, 1],
                        [256, 1, 1],
                        args,
                        vec![
                            ScalarArg::I32(c as i32),
                            ScalarArg::I32(cnt),
                            ScalarArg::F32(eps),
                            ScalarArg::F32(momentum),
                        ],
                        format!("{name} finalize"),
                    )?;
                }
                if !fu.inlined && fu.folded_into.is_none() {
                    let affine = b.bn_buf(i, "affine", Role::Saved);
                    let (xb, yb) = (b.val(x), b.val(i));
                    let args = vec![
                        b.arg(yb, Access::Write),
                        b.arg(xb, Access::Read),
                        b.arg(affine, Access::Read),
                    ];
                    b.launch(
                        KernelSpec::BnApply { nhwc: b.nhwc },
                        B::elem_grid(count),
                        [ELEM_BLOCK, 1, 1],
                        args,
                        vec![
                            ScalarArg::I32(ni),
                            ScalarArg::I32(c as i32),
                            ScalarArg::I32(hw as i32),
                        ],
                        format!("{name} apply"),
                    )?;
                }
            }
            Op::Relu | Op::Dropout { .. } | Op::DropPath { .. } => {
                if fu.inlined || fu.removed || fu.computed_by.is_some() {
                    continue;
                }
                let (xb, yb) = (b.val(node.inputs[0]), b.val(i));
                let args = vec![b.arg(yb, Access::Write), b.arg(xb, Access::Read)];
                let cnt = ScalarArg::I32(count as i32);
                let (spec, sc) = match node.op {
                    Op::Relu => (KernelSpec::Relu, vec![cnt]),
                    Op::Dropout { p } if train => (
                        KernelSpec::Dropout { nhwc: b.nhwc },
                        [cnt]
                            .into_iter()
                            .chain(b.layout_scalars(i))
                            .chain(b.rng(i, p))
                            .collect(),
                    ),
                    Op::DropPath { survival } if train => {
                        let per = ScalarArg::I32(shape.numel() as i32);
                        (
                            KernelSpec::DropPath,
                            [cnt, per]
                                .into_iter()
                                .chain(b.rng(i, 1.0 - survival))
                                .collect(),
                        )
                    }
                    // eval mode, unfused: identity copy
                    _ => (KernelSpec::Accumulate, vec![cnt, ScalarArg::I32(0)]),
                };
                b.launch(
                    spec,
                    B::elem_grid(count),
                    [ELEM_BLOCK, 1, 1],
                    args,
                    sc,
                    format!("{name} fwd"),
                )?;
            }
            Op::Add => {
                if fu.computed_by.is_some() {
                    continue;
                }
                let (a0, a1, yb) = (b.val(node.inputs[0]), b.val(node.inputs[1]), b.val(i));
                let args = vec![
                    b.arg(yb, Access::Write),
                    b.arg(a0, Access::Read),
                    b.arg(a1, Access::Read),
                ];
                b.launch(
                    KernelSpec::Add,
                    B::elem_grid(count),
                    [ELEM_BLOCK, 1, 1],
                    args,
                    vec![ScalarArg::I32(count as i32)],
                    format!("{name} fwd"),
                )?;
            }
            Op::ZeroPadShortcut { .. }
            | Op::MaxPool(_)
            | Op::AvgPool(_)
            | Op::Concat
            | Op::GlobalAvgPool => {
                let (spec, shape_sc) = fwd_spatial(plan, i, b.nhwc);
                let yb = b.val(i);
                let mut args = vec![b.arg(yb, Access::Write)];
                if let Some(p) = fu.prologue {
                    // global pooling of an inlined BN(-ReLU) chain: it reads the chain's input
                    let xb = b.val(p.src);
                    args.push(b.arg(xb, Access::Read));
                    if let Some(bn) = p.bn {
                        let aff = b.bn_buf(bn, "affine", Role::Saved);
                        args.push(b.arg(aff, Access::Read));
                    }
                } else {
                    for &x in &node.inputs {
                        let xb = b.val(x);
                        args.push(b.arg(xb, Access::Read));
                    }
                }
                let (grid, first) = if let KernelSpec::GlobalAvgPool { .. } = spec {
                    let rows = n as u64 * shape.c as u64;
                    (B::elem_grid(rows), ScalarArg::I32(rows as i32))
                } else {
                    (B::elem_grid(count), ScalarArg::I32(ni))
                };
                let sc = [first].into_iter().chain(shape_sc).collect();
                b.launch(
                    spec,
                    grid,
                    [ELEM_BLOCK, 1, 1],
                    args,
                    sc,
                    format!("{name} fwd"),
                )?;
            }
            Op::Linear { in_f, out_f } => {
                let (xb, yb) = (b.val(node.inputs[0]), b.val(i));
                let args = vec![
                    b.arg(yb, Access::Write),
                    b.arg(xb, Access::Read),
                    b.param(&format!("{name}.weight"), Access::Read, params),
                    b.param(&format!("{name}.bias"), Access::Read, params),
                ];
                let hw = b.linear_hw(i);
                b.gemm_launch(
                    KernelSpec::LinearFwd { in_f, out_f, hw },
                    n as u64,
                    out_f as u64,
                    1,
                    args,
                    vec![ScalarArg::I32(ni)],
                    format!("{name} fwd"),
                )?;
            }
        }
    }

    if !train {
        return finish(b);
    }

    // ---------------------------------------------------------------- loss
    let classes = plan.nodes[plan.output].shape.numel();
    let labels = b.buffer("labels".into(), n as u64, Dtype::I32, Role::Labels);
    let loss = b.buffer("loss".into(), n as u64, Dtype::F32, Role::Activation);
    b.s.labels = Some(labels);
    b.s.loss = Some(loss);
    // gradient buffers: the operand an add's gradient is aliased to (`residual_grad_alias`)
    // has none of its own
    let mut alias_of: Vec<Option<usize>> = vec![None; nn];
    for (y, node) in plan.nodes.iter().enumerate() {
        if let Some(r) = node.fuse.grad_alias {
            alias_of[r] = Some(y);
        }
    }
    for (i, node) in plan.nodes.iter().enumerate() {
        if matches!(node.op, Op::Input) {
            continue;
        }
        let own = if node.fuse.residual.is_some() {
            false
        } else if let Some(bn) = b.chain_bn[i] {
            b.chain_last[bn] == Some(i) && plan.nodes[bn].fuse.bwd_from.is_none()
        } else if matches!(node.op, Op::BatchNorm { .. }) && node.fuse.inlined {
            // the chain's output gradient (written by the fused data-gradient epilogue), or,
            // for a chain without ReLU or dropout, the activation gradient the convs write
            node.fuse.bwd_from.is_some() || b.chain_last[i] == Some(i)
        } else {
            true
        };
        if let Some(y) = alias_of[i] {
            if !own {
                return Err(err(format!(
                    "{}: the gradient of {} is aliased to it, but {} has no gradient buffer of its own",
                    plan.nodes[y].name, node.name, node.name
                )));
            }
        } else if own {
            let len = b.numel(i);
            b.grad[i] = Some(b.buffer(
                format!("grad.{}", node.name),
                len,
                act,
                Role::ActivationGrad,
            ));
        }
    }
    // from the last node down, so that an add's own alias is resolved before its operands'
    for i in (0..nn).rev() {
        if let Some((a, _)) = plan.nodes[i].fuse.residual {
            b.grad[i] = b.grad[a];
        }
        if let Some(y) = alias_of[i] {
            b.grad[i] = b.grad[y];
        }
    }
    {
        let (lb, xb) = (b.val(plan.output), b.grad[plan.output].unwrap());
        let args = vec![
            b.arg(loss, Access::Write),
            b.arg(xb, Access::Write),
            b.arg(lb, Access::Read),
            b.arg(labels, Access::Read),
        ];
        let h = b.buffer("hyper".into(), HYPER_LEN, Dtype::U32, Role::Hyper);
        let mut args = args;
        args.push(b.whole(h, Access::ReadWrite));
        b.launch(
            KernelSpec::SoftmaxXent {
                classes: classes as u32,
            },
            B::elem_grid(n as u64),
            [ELEM_BLOCK, 1, 1],
            args,
            vec![ScalarArg::I32(ni), ScalarArg::LabelSmoothing],
            "loss".into(),
        )?;
    }

    // ---------------------------------------------------------------- backward
    let grads = grads.unwrap();
    for i in (0..nn).rev() {
        backward_node(&mut b, i, params, grads)?;
    }

    // ---------------------------------------------------------------- optimizer
    let table: Vec<u32> =
        b.s.params
            .iter()
            .flat_map(|p| [p.offset as u32, p.len as u32, p.decay as u32])
            .collect();
    let nt = b.s.params.len() as u64;
    if nt > 0 {
        let tb = b.buffer(
            "sgd_table".into(),
            table.len() as u64,
            Dtype::U32,
            Role::Table,
        );
        let largest = b.s.params.iter().map(|p| p.len).max().unwrap_or(1);
        let args = vec![
            b.arg(params, Access::ReadWrite),
            b.arg(grads, Access::Read),
            b.arg(momentum.unwrap(), Access::ReadWrite),
            b.arg(tb, Access::Read),
        ];
        if nt > 65_535 {
            return Err(err("more than 65535 parameter tensors"));
        }
        b.launch(
            KernelSpec::SgdMultiTensor,
            [ceil_div(largest, ELEM_BLOCK as u64).clamp(1, 256), nt, 1],
            [ELEM_BLOCK, 1, 1],
            args,
            vec![
                ScalarArg::Lr,
                ScalarArg::Momentum,
                ScalarArg::WeightDecay,
                ScalarArg::Nesterov,
            ],
            "sgd".into(),
        )?;
    }
    finish(b)
}

/// The optimizer's table contents `(start, len, decay)` per parameter, as the `sgd_table`
/// buffer must be initialised.
pub fn sgd_table(s: &Schedule) -> Vec<u32> {
    s.params
        .iter()
        .flat_map(|p| [p.offset as u32, p.len as u32, p.decay as u32])
        .collect()
}

fn finish(b: B) -> crate::Result<Schedule> {
    let s = b.s;
    s.validate().map_err(err)?;
    Ok(s)
}

/// The forward kernel of a spatial op and its runtime shape scalars (in the order of
/// [`KernelSpec::signature`], after `n` / `rows`).
fn fwd_spatial(plan: &Plan, i: usize, nhwc: bool) -> (KernelSpec, Vec<ScalarArg>) {
    let node = &plan.nodes[i];
    let x = plan.nodes[node.inputs[0]].shape;
    let y = node.shape;
    let v = |xs: &[u32]| {
        xs.iter()
            .map(|&d| ScalarArg::I32(d as i32))
            .collect::<Vec<_>>()
    };
    match node.op {
        Op::ZeroPadShortcut { out_c, stride } => (
            KernelSpec::ZeroPad { nhwc },
            v(&[x.c, out_c, x.h, x.w, y.h, y.w, stride]),
        ),
        Op::MaxPool(pool) => (
            KernelSpec::MaxPool { pool, nhwc },
            v(&[x.c, x.h, x.w, y.h, y.w]),
        ),
        Op::AvgPool(pool) => (
            KernelSpec::AvgPool { pool, nhwc },
            v(&[x.c, x.h, x.w, y.h, y.w]),
        ),
        Op::Concat => (
            KernelSpec::Concat { nhwc },
            v(&[x.c, plan.nodes[node.inputs[1]].shape.c, x.h * x.w]),
        ),
        Op::GlobalAvgPool => {
            // an inlined BN(-ReLU) chain read through the pooling (inference)
            let p = node.fuse.prologue;
            let pro = PrologueFlags {
                affine: p.is_some_and(|p| p.bn.is_some()),
                relu: p.is_some_and(|p| p.relu.is_some()),
                dropout: false,
            };
            (
                KernelSpec::GlobalAvgPool { nhwc, pro },
                if nhwc || pro.any() {
                    v(&[x.h * x.w, x.c])
                } else {
                    v(&[x.h * x.w])
                },
            )
        }
        _ => unreachable!(),
    }
}

/// Destination of a gradient contribution to node `x`, with the accumulate flag (0 for the
/// first contribution, 1 after).
fn grad_dst(b: &B, x: usize) -> Option<(BufArg, ScalarArg)> {
    if matches!(b.plan.nodes[x].op, Op::Input) {
        return None;
    }
    let g = b.grad[x].unwrap_or_else(|| panic!("no gradient buffer for {}", b.plan.nodes[x].name));
    // the first contribution only writes (the kernels read `dst` only when `accum` is 1)
    let accum = b.written[g];
    let access = if accum {
        Access::ReadWrite
    } else {
        Access::Write
    };
    Some((b.whole(g, access), ScalarArg::I32(accum as i32)))
}

fn backward_node(b: &mut B, i: usize, params: usize, grads: usize) -> crate::Result<()> {
    let plan = b.plan;
    let node = &plan.nodes[i];
    let name = node.name.clone();
    let fu = node.fuse.clone();
    let n = b.n;
    let ni = n as i32;
    let count = b.numel(i);
    if matches!(node.op, Op::Input) {
        return Ok(());
    }
    if b.chain_bn[i].is_some() {
        return Ok(()); // ReLU / dropout of a BN prologue chain: the BN's backward does it
    }
    // the gradient flowing into this node (for a chained BN: the chain's activation gradient)
    let dy_node = match (&node.op, b.chain_last[i]) {
        (Op::BatchNorm { .. }, Some(last)) if fu.bwd_from.is_none() => last,
        _ => i,
    };
    let dy = b.grad[dy_node]
        .unwrap_or_else(|| panic!("no gradient buffer for {}", plan.nodes[dy_node].name));
    if !b.written[dy] {
        // not reachable from the loss: its gradient is zero
        let a = b.whole(dy, Access::Write);
        let len = a.len;
        b.launch(
            KernelSpec::Zero,
            B::elem_grid(len),
            [ELEM_BLOCK, 1, 1],
            vec![a],
            vec![ScalarArg::I32(len as i32)],
            format!("{name} zero grad"),
        )?;
    }
    let dya = b.whole(dy, Access::Read);
    let blk = [ELEM_BLOCK, 1, 1];
    match node.op {
        Op::Input => {}
        Op::Conv2d(conv) => {
            let g = geom(plan, i, b.tensor_cores, b.f32, b.nhwc);
            let pro = fu.prologue;
            let src = pro.map(|p| p.src).unwrap_or(node.inputs[0]);
            let pflags = PrologueFlags {
                affine: pro.is_some_and(|p| p.bn.is_some()),
                relu: pro.is_some_and(|p| p.relu.is_some()),
                dropout: pro.is_some_and(|p| p.dropout.is_some()),
            };
            let rng: Vec<ScalarArg> = pro
                .and_then(|p| p.dropout)
                .map(|d| b.rng(d, b.dropout_p(d)).to_vec())
                .unwrap_or_default();
            // weight gradient (recomputing the prologue)
            let xb = b.val(src);
            let mut args = vec![
                b.param(&format!("{name}.weight"), Access::Write, grads),
                dya,
                b.whole(xb, Access::Read),
            ];
            if pflags.affine {
                let aff = b.bn_buf(pro.unwrap().bn.unwrap(), "affine", Role::Saved);
                args.push(b.whole(aff, Access::Read));
            }
            let ocg = (conv.out_c / g.groups) as u64;
            let kdim = ((conv.in_c / g.groups) * g.k * g.k) as u64;
            let chans = [
                ScalarArg::I32(conv.in_c as i32),
                ScalarArg::I32(conv.out_c as i32),
            ];
            let sc: Vec<ScalarArg> = [ScalarArg::I32(ni)]
                .into_iter()
                .chain(chans)
                .chain(rng.iter().copied())
                .collect();
            let pixels = n as u64 * (g.out_h * g.out_w) as u64;
            let wlen = ocg * kdim * g.groups as u64;
            let mut g = g;
            g.tile = b.tile_for(
                &KernelSpec::ConvBwdWeight {
                    g,
                    pro: pflags,
                    split_k: 1,
                },
                &sc,
            );
            // on every engine: the fp32 FMA engine's 64x64 tiles leave the GPU as idle
            // (WRN-28-10's 160-wide 3x3 weight gradients: 69 blocks on 132 SMs)
            let split_k = if !b.tiles.no_split_k {
                split_k_for(ocg, kdim, g.groups, pixels, wlen, g.tile, g.tensor_cores)
            } else {
                1
            };
            // With split-K, the slices write partial gradients into a scratch buffer, and a
            // second launch sums them in slice order into the gradient.
            let mut reduce = None;
            if split_k > 1 {
                let part = b.splitk_part(&name, split_k as u64 * wlen);
                let dw = std::mem::replace(&mut args[0], b.whole(part, Access::Write));
                reduce = Some((dw, part));
            }
            let note = if split_k > 1 {
                format!("{name} bwd_weight (split-K {split_k})")
            } else {
                format!("{name} bwd_weight")
            };
            b.gemm_launch(
                KernelSpec::ConvBwdWeight {
                    g,
                    pro: pflags,
                    split_k,
                },
                ocg,
                kdim,
                g.groups * split_k,
                args,
                sc,
                note,
            )?;
            if let Some((dw, part)) = reduce {
                b.launch(
                    KernelSpec::SplitKReduce,
                    B::elem_grid(wlen),
                    blk,
                    vec![dw, b.whole(part, Access::Read)],
                    vec![ScalarArg::I32(wlen as i32), ScalarArg::I32(split_k as i32)],
                    format!("{name} bwd_weight split-K sum"),
                )?;
            }
            if conv.bias {
                let args = vec![b.param(&format!("{name}.bias"), Access::Write, grads), dya];
                let (grid, block) = channel_reduce_shape(b.nhwc, conv.out_c as u64);
                b.launch(
                    KernelSpec::ChannelSums {
                        squares: false,
                        nhwc: b.nhwc,
                        split: false,
                    },
                    grid,
                    block,
                    args,
                    vec![
                        ScalarArg::I32(ni),
                        ScalarArg::I32(conv.out_c as i32),
                        ScalarArg::I32((g.out_h * g.out_w) as i32),
                    ],
                    format!("{name} bwd_bias"),
                )?;
            }
            // data gradient
            let x = node.inputs[0];
            if matches!(plan.nodes[x].op, Op::Input) {
                return Ok(());
            }
            let (m, icg) = (
                n as u64 * (g.in_h * g.in_w) as u64,
                (conv.in_c / g.groups) as u64,
            );
            let w = b.param(&format!("{name}.weight"), Access::Read, params);
            let w = b.conv_weight(w, &g, &conv, &name, true)?;
            if let Some(bn) = fu.bwd_for {
                let p = pro.unwrap();
                let gbuf = b.grad[bn].unwrap();
                if b.written[gbuf] {
                    return Err(err(format!(
                        "{name}: fused BN backward needs to be the only gradient contribution"
                    )));
                }
                let bname = plan.nodes[bn].name.clone();
                let xpre = b.val(p.src);
                let aff = b.bn_buf(bn, "affine", Role::Saved);
                let saved = b.bn_buf(bn, "saved", Role::Saved);
                let (goff, _) = b.param_off[&format!("{bname}.weight")];
                let mut args = vec![
                    b.whole(gbuf, Access::Write),
                    dya,
                    w,
                    b.whole(xpre, Access::Read),
                ];
                if pflags.relu {
                    // only the dReLU mask recomputes the activation
                    args.push(b.whole(aff, Access::Read));
                }
                args.extend([
                    b.whole(saved, Access::Read),
                    b.slice(grads, goff, 2 * conv.in_c as u64, Access::ReadWrite),
                ]);
                let sc: Vec<ScalarArg> = [ScalarArg::I32(ni)]
                    .into_iter()
                    .chain(chans)
                    .chain([ScalarArg::I32(0)])
                    .chain(rng.iter().copied())
                    .collect();
                b.gemm_launch(
                    KernelSpec::ConvBwdData { g, chain: pflags },
                    m,
                    icg,
                    g.groups,
                    args,
                    sc,
                    format!("{name} bwd_data+{bname} reduce"),
                )?;
            } else {
                let (dst, acc) = grad_dst(b, x).unwrap();
                b.gemm_launch(
                    KernelSpec::ConvBwdData {
                        g,
                        chain: PrologueFlags::default(),
                    },
                    m,
                    icg,
                    g.groups,
                    vec![dst, dya, w],
                    vec![ScalarArg::I32(ni), chans[0], chans[1], acc],
                    format!("{name} bwd_data"),
                )?;
            }
        }
        Op::BatchNorm { c, .. } => {
            let hw = node.shape.h * node.shape.w;
            let x = node.inputs[0];
            // The masks between the BN and the activation gradient `dy`: the chain's ReLU
            // (which needs the affine to recompute its input) and dropout, each only if the
            // chain has one. A chain of the BN alone (PyramidNet's `bn conv`) is plain dBN.
            let chain = if fu.inlined && fu.bwd_from.is_none() {
                let pro = plan
                    .nodes
                    .iter()
                    .find_map(|x| x.fuse.prologue.filter(|q| q.bn == Some(i)))
                    .unwrap();
                PrologueFlags {
                    affine: pro.relu.is_some(),
                    relu: pro.relu.is_some(),
                    dropout: pro.dropout.is_some(),
                }
            } else {
                PrologueFlags::default()
            };
            let rng: Vec<ScalarArg> = if chain.dropout {
                let d = b.chain_last[i].unwrap();
                b.rng(d, b.dropout_p(d)).to_vec()
            } else {
                vec![]
            };
            let xb = b.val(x);
            let saved = b.bn_buf(i, "saved", Role::Saved);
            let aff = b.bn_buf(i, "affine", Role::Saved);
            let dgamma = b.param(&format!("{name}.weight"), Access::Write, grads);
            let dbeta = b.param(&format!("{name}.bias"), Access::Write, grads);
            if fu.bwd_from.is_none() {
                // pixel ranges over gridDim.y, summed with atomics into the [dgamma | dbeta]
                // that the forward's finalize zeroed (`zero_dsums`, the same test)
                let splits = channel_reduce_splits(b.nhwc, c as u64, ni as u64 * hw as u64);
                let split = splits > 1;
                let sums = if split {
                    Access::ReadWrite
                } else {
                    Access::Write
                };
                let mut args = vec![
                    BufArg {
                        access: sums,
                        ..dgamma
                    },
                    BufArg {
                        access: sums,
                        ..dbeta
                    },
                    dya,
                    b.whole(xb, Access::Read),
                    b.whole(saved, Access::Read),
                ];
                if chain.relu {
                    args.push(b.whole(aff, Access::Read));
                }
                let sc: Vec<ScalarArg> = [
                    ScalarArg::I32(ni),
                    ScalarArg::I32(c as i32),
                    ScalarArg::I32(hw as i32),
                ]
                .into_iter()
                .chain(rng.iter().copied())
                .collect();
                let (grid, block) = channel_reduce_shape(b.nhwc, c as u64);
                b.launch(
                    KernelSpec::BnBwdReduce {
                        chain,
                        nhwc: b.nhwc,
                        split,
                    },
                    [grid[0], splits, 1],
                    block,
                    args,
                    sc,
                    format!("{name} bwd_reduce"),
                )?;
            }
            if let Some((dst, acc)) = grad_dst(b, x) {
                let mut args = vec![
                    dst,
                    dya,
                    b.whole(xb, Access::Read),
                    b.whole(saved, Access::Read),
                    b.param(&format!("{name}.weight"), Access::Read, params),
                    BufArg {
                        access: Access::Read,
                        ..dgamma
                    },
                    BufArg {
                        access: Access::Read,
                        ..dbeta
                    },
                ];
                if chain.relu {
                    args.push(b.whole(aff, Access::Read));
                }
                let sc: Vec<ScalarArg> = [
                    ScalarArg::I32(ni),
                    ScalarArg::I32(c as i32),
                    ScalarArg::I32(hw as i32),
                    acc,
                ]
                .into_iter()
                .chain(rng.iter().copied())
                .collect();
                b.launch(
                    KernelSpec::BnBwdApply {
                        chain,
                        nhwc: b.nhwc,
                    },
                    B::elem_grid(count),
                    blk,
                    args,
                    sc,
                    format!("{name} bwd_apply"),
                )?;
            }
        }
        Op::Relu | Op::Dropout { .. } | Op::DropPath { .. } => {
            let Some((dst, acc)) = grad_dst(b, node.inputs[0]) else {
                return Ok(());
            };
            let cnt = ScalarArg::I32(count as i32);
            let (spec, args, sc) = match node.op {
                Op::Relu => {
                    let y = b.val(i);
                    (
                        KernelSpec::ReluBwd,
                        vec![dst, dya, b.whole(y, Access::Read)],
                        vec![cnt, acc],
                    )
                }
                Op::Dropout { p } => (
                    KernelSpec::DropoutBwd { nhwc: b.nhwc },
                    vec![dst, dya],
                    [cnt, acc]
                        .into_iter()
                        .chain(b.layout_scalars(i))
                        .chain(b.rng(i, p))
                        .collect(),
                ),
                Op::DropPath { survival } => {
                    let per = ScalarArg::I32(node.shape.numel() as i32);
                    (
                        KernelSpec::DropPathBwd,
                        vec![dst, dya],
                        [cnt, per, acc]
                            .into_iter()
                            .chain(b.rng(i, 1.0 - survival))
                            .collect(),
                    )
                }
                _ => unreachable!(),
            };
            b.launch(
                spec,
                B::elem_grid(count),
                blk,
                args,
                sc,
                format!("{name} bwd"),
            )?;
        }
        Op::Add => {
            for &x in &node.inputs.clone() {
                if fu.computed_by == Some(x) || fu.grad_alias == Some(x) {
                    continue; // the operand's gradient is this one (aliased)
                }
                if let Some((dst, acc)) = grad_dst(b, x) {
                    b.launch(
                        KernelSpec::Accumulate,
                        B::elem_grid(count),
                        blk,
                        vec![dst, dya],
                        vec![ScalarArg::I32(count as i32), acc],
                        format!("{name} bwd"),
                    )?;
                }
            }
        }
        Op::ZeroPadShortcut { .. } | Op::MaxPool(_) | Op::AvgPool(_) | Op::GlobalAvgPool => {
            let x = node.inputs[0];
            let Some((dst, acc)) = grad_dst(b, x) else {
                return Ok(());
            };
            let xcount = b.numel(x);
            let (fwd, shape_sc) = fwd_spatial(plan, i, b.nhwc);
            let spec = match fwd {
                KernelSpec::ZeroPad { nhwc } => KernelSpec::ZeroPadBwd { nhwc },
                KernelSpec::MaxPool { pool, nhwc } => KernelSpec::MaxPoolBwd { pool, nhwc },
                KernelSpec::AvgPool { pool, nhwc } => KernelSpec::AvgPoolBwd { pool, nhwc },
                KernelSpec::GlobalAvgPool { nhwc, .. } => KernelSpec::GlobalAvgPoolBwd { nhwc },
                _ => unreachable!(),
            };
            let mut args = vec![dst, dya];
            if let KernelSpec::MaxPoolBwd { .. } = spec {
                let xb = b.val(x);
                args.push(b.whole(xb, Access::Read));
            }
            let first = if let KernelSpec::GlobalAvgPoolBwd { .. } = spec {
                ScalarArg::I32((n as u64 * node.shape.c as u64) as i32)
            } else {
                ScalarArg::I32(ni)
            };
            let sc = [first].into_iter().chain(shape_sc).chain([acc]).collect();
            b.launch(
                spec,
                B::elem_grid(xcount),
                blk,
                args,
                sc,
                format!("{name} bwd"),
            )?;
        }
        Op::Concat => {
            let (x0, x1) = (node.inputs[0], node.inputs[1]);
            if x0 == x1
                || matches!(plan.nodes[x0].op, Op::Input)
                || matches!(plan.nodes[x1].op, Op::Input)
            {
                return Err(err(format!("{name}: concatenating the input, or a tensor with itself, is not supported by the CUDA backend yet")));
            }
            let (_, shape_sc) = fwd_spatial(plan, i, b.nhwc);
            let (d0, a0) = grad_dst(b, x0).unwrap();
            let (d1, a1) = grad_dst(b, x1).unwrap();
            b.launch(
                KernelSpec::ConcatBwd { nhwc: b.nhwc },
                B::elem_grid(count),
                blk,
                vec![d0, d1, dya],
                [ScalarArg::I32(ni)]
                    .into_iter()
                    .chain(shape_sc)
                    .chain([a0, a1])
                    .collect(),
                format!("{name} bwd"),
            )?;
        }
        Op::Linear { in_f, out_f } => {
            let x = node.inputs[0];
            let xb = b.val(x);
            let args = vec![
                b.param(&format!("{name}.weight"), Access::Write, grads),
                dya,
                b.whole(xb, Access::Read),
            ];
            let hw = b.linear_hw(i);
            b.gemm_launch(
                KernelSpec::LinearBwdWeight { in_f, out_f, hw },
                out_f as u64,
                in_f as u64,
                1,
                args,
                vec![ScalarArg::I32(ni)],
                format!("{name} bwd_weight"),
            )?;
            let args = vec![b.param(&format!("{name}.bias"), Access::Write, grads), dya];
            b.launch(
                // `dy` is `[n][out_f]`: the same in both layouts
                KernelSpec::ChannelSums {
                    squares: false,
                    nhwc: false,
                    split: false,
                },
                [out_f as u64, 1, 1],
                blk,
                args,
                vec![
                    ScalarArg::I32(ni),
                    ScalarArg::I32(out_f as i32),
                    ScalarArg::I32(1),
                ],
                format!("{name} bwd_bias"),
            )?;
            if let Some((dst, acc)) = grad_dst(b, x) {
                let w = b.param(&format!("{name}.weight"), Access::Read, params);
                b.gemm_launch(
                    KernelSpec::LinearBwdData {
                        in_f,
                        out_f,
                        hw: b.linear_hw(i),
                    },
                    n as u64,
                    in_f as u64,
                    1,
                    vec![dst, dya, w],
                    vec![ScalarArg::I32(ni), acc],
                    format!("{name} bwd_data"),
                )?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `split_k_for` on a weight gradient: `rows x cols` (OC x IC k k), `pixels` (N H W) long,
    /// at `tile`; one line per case.
    fn check(rows: u64, cols: u64, pixels: u64, tile: (u32, u32), expect: u32) {
        let tile = TcTile {
            rows: tile.0,
            cols: tile.1,
        };
        let s = split_k_for(rows, cols, 1, pixels, rows * cols, tile, true);
        assert_eq!(s, expect, "{rows}x{cols} over {pixels} at {tile}");
    }

    #[test]
    fn split_k_counts() {
        // WRN-28-10 at batch 128, 64x64: 69 blocks would take 4 slices for 264 blocks (276,
        // 2.09 per SM: a last wave of 12); 17 (1173 blocks, 8.9 per SM) balance the SMs
        check(160, 1440, 131072, (64, 64), 17);
        // 225 blocks: 2 slices would be 450 (3.4 per SM), 4 are 900 (6.8)
        check(320, 2880, 32768, (64, 64), 4);
        // 900 blocks already: no split
        check(640, 5760, 8192, (64, 64), 1);
        // 3 blocks: 88 slices, 264 blocks
        check(160, 16, 131072, (64, 64), 88);
        // WRN-16-4's 64-wide 3x3 weight gradients: 9 blocks x 44 slices, 3 per SM (32 slices,
        // the former limit, made 288 blocks, 2.18 per SM)
        check(64, 576, 131072, (64, 64), 44);
        // a one-block output over a long reduction: the limit
        check(16, 16, 1 << 20, (64, 64), 128);
        // a large output: the partial sums' traffic outweighs the balance (3 slices, 432
        // blocks, not 11, 1584)
        check(256, 2304, 8192, (64, 64), 3);
        // 128x128: 24 blocks x 11 slices is 264, two per SM exactly: kept
        check(160, 1440, 131072, (128, 128), 11);
        // too short to split (16 steps: 8 per slice at most, 2 slices)
        check(64, 64, 512, (64, 64), 2);
        check(64, 64, 255, (64, 64), 1);
        // an inference forward conv at batch 1 (WRN-28-10's 160-wide stage: 1024 pixels x
        // 160, a reduction of 1440 = 45 steps): 5 slices of 9 steps
        let t = TcTile::DEFAULT;
        assert_eq!(split_k_for(1024, 160, 1, 1440, 1024 * 160, t, true), 5);
        // the fp32 FMA engine: partial sums cost less against its slower arithmetic, so a
        // large output splits further (8 slices, 1152 blocks, 8.7 per SM, not 3)
        assert_eq!(split_k_for(256, 2304, 1, 8192, 256 * 2304, t, false), 8);
    }
}
