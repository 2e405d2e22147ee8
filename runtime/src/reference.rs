//! The f64 reference semantics of every [`KernelSpec`] of a schedule, built from the CPU
//! backend's op kernels (`crate::ops`, `loss`) wherever one computes the same thing. Used by
//! the emulation tests (`tests/codegen_emu.rs`) and by `wrnc selftest` on the GPU
//! (`cuda::check`): both run a schedule launch by launch, trace what each launch wrote, and
//! check every launch against this reference on the very inputs it read.
//!
//! [`launch`] takes the contents of a launch's buffer arguments (in the kernel's signature
//! order, already decoded to f64) and its resolved scalars, and returns the new contents of
//! every argument the kernel writes. Run on the very inputs an emulated kernel read, it is that
//! kernel's exact result, so comparing the two isolates the kernel (per-kernel checks); run
//! launch after launch from the step's inputs ([`run`]), it is a whole f64 step, which the
//! tests compare with `crate::cpu::Model` to check this reference itself.
//!
//! Invariants: every function here is pure; shapes come from the spec and the batch, and a
//! buffer argument whose length does not match them is an `Err`, never a panic.

use crate::ops::{conv, elementwise as ew, linear, pool};
use crate::Tensor;
use wrnc_compiler::ast::Precision;
use wrnc_compiler::graph::Conv2d;
use wrnc_compiler::schedule::{Access, ConvGeom, Dtype, KernelSpec, PrologueFlags, ScalarArg};
use wrnc_compiler::schedule::{Launch, Role, Schedule, HYPER_LEN, HYPER_NONFINITE};

/// Values of the host-supplied scalars (the driver's `hyper.txt`).
#[derive(Debug, Clone, Copy)]
pub struct HostScalars {
    pub seed: u32,
    pub step: u32,
    pub lr: f32,
    pub momentum: f32,
    pub weight_decay: f32,
    pub nesterov: bool,
    pub smoothing: f32,
}

/// A scalar argument's value, as the kernel sees it (f32 arguments rounded to f32).
pub fn scalar(a: ScalarArg, h: &HostScalars) -> f64 {
    match a {
        ScalarArg::I32(v) => v as f64,
        ScalarArg::U32(v) => v as f64,
        ScalarArg::F32(v) => v as f64,
        ScalarArg::Seed => h.seed as f64,
        ScalarArg::Step => h.step as f64,
        ScalarArg::Lr => h.lr as f64,
        ScalarArg::Momentum => h.momentum as f64,
        ScalarArg::WeightDecay => h.weight_decay as f64,
        ScalarArg::Nesterov => h.nesterov as i32 as f64,
        ScalarArg::LabelSmoothing => h.smoothing as f64,
    }
}

/// The `hyper` buffer's words (`Role::Hyper`: `[step, lr bits, 0]`, [`HYPER_LEN`] long) for
/// `h`, as the host writes them before a step.
pub fn hyper_words(h: &HostScalars) -> Vec<f64> {
    let mut w = vec![h.step as f64, h.lr.to_bits() as f64];
    w.resize(HYPER_LEN as usize, 0.0);
    w
}

/// Writes [`hyper_words`] into `bufs`' `hyper` buffer, if `s` has one.
fn set_hyper(s: &Schedule, bufs: &mut [Vec<f64>], h: &HostScalars) {
    if let Some(i) = s.buffers.iter().position(|b| b.role == Role::Hyper) {
        bufs[i] = hyper_words(h);
    }
}

/// Decodes a buffer's raw little-endian bytes.
pub fn decode(bytes: &[u8], dtype: Dtype) -> Vec<f64> {
    match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            .collect(),
        Dtype::Bf16 => bytes
            .chunks_exact(2)
            .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16) as f64)
            .collect(),
        Dtype::I32 => bytes
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            .collect(),
        Dtype::U32 => bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            .collect(),
    }
}

/// f32 -> bf16 bits, round to nearest even; a NaN stays a quiet NaN of its sign (the
/// generated `wrnc_bf16_bits`, behind `wrnc_st`).
pub fn bf16_bits(v: f32) -> u16 {
    let u = v.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        return ((u >> 16) | 0x40) as u16;
    }
    (u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

/// f32 -> TF32 as `cvt.rna.tf32.f32` rounds (the generated `wrnc_tf32`): to 10 mantissa
/// bits, to nearest, ties away from zero; infinities and NaNs as they are. The result is an
/// f32 whose low 13 bits are zero.
pub fn tf32_round(v: f32) -> f32 {
    if !v.is_finite() {
        return v;
    }
    f32::from_bits(v.to_bits().wrapping_add(0x1000) & 0xffff_e000)
}

/// A tensor-core GEMM operand as the kernel sees it: every value rounded (through f32) to
/// bf16, to nearest even, or in plain TF32 ([`ConvGeom::tf32`]) to TF32 as
/// [`tf32_round`]. Identity for fp32 kernels, the FMA engine's and 3xTF32's
/// ([`ConvGeom::tf32x3`], whose products are within about 2^-21 of fp32's: the reference
/// takes its operands as exact).
fn tc_operand(g: &ConvGeom, v: &mut [f64]) {
    if g.tensor_cores && !g.tf32x3 {
        round_operand(v, g.tf32);
    }
}

/// Rounds a tensor-core operand to TF32 (`tf32`) or else bf16; nudged first while
/// [`run_nudged`] runs.
fn round_operand(v: &mut [f64], tf32: bool) {
    if let Some((seed, call)) = NUDGE.get() {
        NUDGE.set(Some((seed, call + 1)));
        nudge(v, seed ^ (call << 48) ^ (1 << 47), BF16_NUDGE);
    }
    if tf32 {
        for x in v {
            *x = tf32_round(*x as f32) as f64;
        }
    } else {
        for x in v {
            *x = f32::from_bits((bf16_bits(*x as f32) as u32) << 16) as f64;
        }
    }
}

thread_local! {
    /// While [`run_nudged`] runs: its seed, and a count of the operand roundings so far (the
    /// tensor-core operands rounded to bf16 inside a kernel are nudged as stored values are).
    static NUDGE: std::cell::Cell<Option<(u64, u64)>> = const { std::cell::Cell::new(None) };
}

/// How far [`run_nudged`] moves a value it stores as bf16 (before rounding): about what
/// another order of a kernel's f32 sums moves it by, a few f32 ulps.
const BF16_NUDGE: i32 = -23;

/// How far [`run_nudged`] moves an f32 activation or activation gradient it stores: about one
/// f32 kernel's own error (selftest's launch checks measure up to about 1e-6 of a part's
/// largest value; sums of hundreds of f32 products in another order).
const F32_NUDGE: i32 = -20;

/// Moves each value by 2^exp of itself, up or down by a pseudo-random sign (splitmix64 of
/// `key` and the element's index).
fn nudge(v: &mut [f64], key: u64, exp: i32) {
    for (i, x) in v.iter_mut().enumerate() {
        let mut z = key ^ i as u64;
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        *x *= 1.0 + if z & 1 == 0 { 1.0 } else { -1.0 } * 2f64.powi(exp);
    }
}

/// Encodes values as a buffer of `dtype` (f32 values rounded to the storage type).
pub fn encode(v: &[f64], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F32 => v.iter().flat_map(|&x| (x as f32).to_le_bytes()).collect(),
        Dtype::Bf16 => v
            .iter()
            .flat_map(|&x| bf16_bits(x as f32).to_le_bytes())
            .collect(),
        Dtype::I32 => v.iter().flat_map(|&x| (x as i32).to_le_bytes()).collect(),
        Dtype::U32 => v.iter().flat_map(|&x| (x as u32).to_le_bytes()).collect(),
    }
}

/// The named parts of a written argument that the per-kernel checks measure separately:
/// per-channel pairs (`[a | b]` of `2 C` values: statistics, mean / rstd, scale / shift,
/// running mean / variance, dgamma / dbeta) are two parts, anything else one.
pub fn parts(spec: &KernelSpec, arg: &str, len: usize) -> Vec<(String, std::ops::Range<usize>)> {
    let halves: Option<[&str; 2]> = match (spec, arg) {
        (KernelSpec::ConvFwd { .. }, "stats")
        | (KernelSpec::ChannelSums { split: true, .. }, "out")
            if len.is_multiple_of(4) =>
        {
            let q = len / 4;
            return vec![
                (format!("{arg}.sum"), 0..q),
                (format!("{arg}.sumsq"), q..2 * q),
            ];
        }
        (KernelSpec::ChannelSums { squares: true, .. }, "out") => Some(["sum", "m2"]),
        (_, "saved") => Some(["mean", "rstd"]),
        (_, "affine") => Some(["scale", "shift"]),
        (_, "running") => Some(["running_mean", "running_var"]),
        (_, "sums") => Some(["dgamma", "dbeta"]),
        _ => None,
    };
    match halves {
        Some([a, b]) if len.is_multiple_of(2) => vec![
            (format!("{arg}.{a}"), 0..len / 2),
            (format!("{arg}.{b}"), len / 2..len),
        ],
        _ => vec![(arg.to_string(), 0..len)],
    }
}

fn t4(data: &[f64], shape: [usize; 4]) -> Result<Tensor<f64>, String> {
    if data.len() != shape.iter().product::<usize>() {
        return Err(format!(
            "buffer of {} values for shape {shape:?}",
            data.len()
        ));
    }
    Ok(Tensor::from_vec(&shape, data.to_vec()))
}

fn conv_op(g: &ConvGeom, in_c: usize, out_c: usize) -> Conv2d {
    Conv2d {
        in_c: in_c as u32,
        out_c: out_c as u32,
        k: g.k,
        stride: g.stride,
        pad: g.pad,
        groups: g.groups,
        bias: false,
    }
}

fn conv_w_len(g: &ConvGeom, in_c: usize, out_c: usize) -> usize {
    out_c * (in_c / g.groups as usize) * (g.k * g.k) as usize
}

/// Named access to a launch's arguments and scalars.
struct Args<'a> {
    spec: &'a KernelSpec,
    bufs: &'a [Vec<f64>],
    scalars: &'a [f64],
}

impl Args<'_> {
    fn buf(&self, name: &str) -> Result<&[f64], String> {
        let (p, _) = self.spec.signature();
        let i = p
            .iter()
            .position(|b| b.name == name)
            .ok_or(format!("{}: no buffer {name}", self.spec.name()))?;
        Ok(&self.bufs[i])
    }
    fn sc(&self, name: &str) -> Result<f64, String> {
        let (_, s) = self.spec.signature();
        let i = s
            .iter()
            .position(|(n, _)| *n == name)
            .ok_or(format!("{}: no scalar {name}", self.spec.name()))?;
        Ok(self.scalars[i])
    }
    fn key(&self) -> Result<ew::MaskKey, String> {
        Ok(ew::MaskKey {
            seed: self.sc("seed")? as u32,
            stream: self.sc("stream")? as u32,
            step: self.hyper()?.0,
        })
    }
    /// The per-step scalars `(step, lr)` from the `hyper` buffer.
    fn hyper(&self) -> Result<(u32, f32), String> {
        match self.buf("hyper")? {
            [step, lr, ..] => Ok((*step as u32, f32::from_bits(*lr as u32))),
            _ => Err("the hyper buffer is too short".into()),
        }
    }
    /// The dropout probability as the kernel holds it (an f32).
    fn p(&self) -> Result<f32, String> {
        Ok(self.sc("p")? as f32)
    }
    fn accum(&self, name: &str, prior: &str, v: Vec<f64>) -> Result<Vec<f64>, String> {
        if self.sc(name)? != 0.0 {
            let old = self.buf(prior)?;
            if old.len() != v.len() {
                return Err(format!("{prior}: {} values, want {}", old.len(), v.len()));
            }
            Ok(v.iter().zip(old).map(|(a, b)| a + b).collect())
        } else {
            Ok(v)
        }
    }
}

/// `drop(relu(x * scale[c] + shift[c]))` over an NCHW tensor (a conv prologue / BN chain).
fn prologue(x: &Tensor<f64>, pro: &PrologueFlags, a: &Args) -> Result<Tensor<f64>, String> {
    let mut y = x.clone();
    let [_, c, h, w] = [x.shape[0], x.shape[1], x.shape[2], x.shape[3]];
    if pro.affine {
        let aff = a.buf("affine")?;
        if aff.len() != 2 * c {
            return Err("affine length".into());
        }
        for (i, v) in y.data.iter_mut().enumerate() {
            let ch = (i / (h * w)) % c;
            *v = *v * aff[ch] + aff[c + ch];
        }
    }
    if pro.relu {
        y = ew::relu(&y);
    }
    if pro.dropout {
        y = ew::dropout(&y, a.p()?, a.key()?);
    }
    Ok(y)
}

/// Per-channel `(sum f(i))` over an NCHW tensor's N, H, W.
fn per_channel(shape: [usize; 4], f: impl Fn(usize) -> f64) -> Vec<f64> {
    let [n, c, h, w] = shape;
    let mut s = vec![0.0; c];
    for ni in 0..n {
        for (ch, acc) in s.iter_mut().enumerate() {
            for p in 0..h * w {
                *acc += f((ni * c + ch) * h * w + p);
            }
        }
    }
    s
}

fn add_into(prior: &[f64], v: &[f64]) -> Vec<f64> {
    prior.iter().zip(v).map(|(a, b)| a + b).collect()
}

/// `[n][C][H][W]` <-> `[n][H][W][C]` for `chw = [C, H, W]` (`to_nchw` says which way);
/// `n` from the length.
pub fn permute_layout(v: &[f64], chw: [usize; 3], to_nchw: bool) -> Result<Vec<f64>, String> {
    let [c, h, w] = chw;
    let per = c * h * w;
    if per == 0 || !v.len().is_multiple_of(per) {
        return Err(format!("{} values are not images of {chw:?}", v.len()));
    }
    let hw = h * w;
    let mut out = vec![0.0; v.len()];
    for ni in 0..v.len() / per {
        for ch in 0..c {
            for p in 0..hw {
                let (nchw, nhwc) = ((ni * c + ch) * hw + p, (ni * hw + p) * c + ch);
                if to_nchw {
                    out[nchw] = v[nhwc];
                } else {
                    out[nhwc] = v[nchw];
                }
            }
        }
    }
    Ok(out)
}

/// The packed index ([`KernelSpec::PackWeight`]) of every OIHW weight index: `perm[oihw]` for a
/// weight of `oc x ic/groups x k x k`; forward OHWI, data gradient `[g][i][kh][kw][o]`.
pub fn weight_pack_order(
    k: usize,
    groups: usize,
    ic: usize,
    oc: usize,
    data_grad: bool,
) -> Result<Vec<usize>, String> {
    if groups == 0 || !ic.is_multiple_of(groups) || !oc.is_multiple_of(groups) {
        return Err(format!("groups {groups} do not divide {ic} / {oc}"));
    }
    let (icg, ocg) = (ic / groups, oc / groups);
    let mut perm = vec![0; oc * icg * k * k];
    for o in 0..oc {
        for i in 0..icg {
            for kh in 0..k {
                for kw in 0..k {
                    let oihw = ((o * icg + i) * k + kh) * k + kw;
                    perm[oihw] = if data_grad {
                        let (gi, og) = (o / ocg, o % ocg);
                        (((gi * icg + i) * k + kh) * k + kw) * ocg + og
                    } else {
                        ((o * k + kh) * k + kw) * icg + i
                    };
                }
            }
        }
    }
    Ok(perm)
}

/// The exact result of one launch: for each buffer argument (signature order), the new
/// contents when the kernel writes it, `None` when it only reads it. `bufs` are the
/// arguments' contents before the launch, `scalars` the launch's scalars, `n` the batch.
///
/// An NHWC kernel ([`KernelSpec::nhwc`]) is its NCHW twin ([`KernelSpec::as_nchw`]) on
/// transposed activations: its activation arguments ([`KernelSpec::spatial_args`]) are
/// transposed to NCHW, the twin runs on them (with the scalars its signature names), and what
/// it writes is transposed back.
pub fn launch(
    spec: &KernelSpec,
    n: usize,
    bufs: &[Vec<f64>],
    scalars: &[f64],
) -> Result<Vec<Option<Vec<f64>>>, String> {
    let Some(base) = spec.as_nchw() else {
        return launch_nchw(spec, n, bufs, scalars, false);
    };
    let (params, snames) = spec.signature();
    if params.len() != bufs.len() || snames.len() != scalars.len() {
        return Err(format!("{}: argument count", spec.name()));
    }
    let sc = |name: &str| {
        snames
            .iter()
            .position(|(x, _)| *x == name)
            .map(|i| scalars[i])
    };
    let spatial = spec
        .spatial_args(|name| sc(name).map(|v| v as usize))
        .ok_or(format!("{}: a shape scalar is missing", spec.name()))?;
    let shape = |name: &str| spatial.iter().find(|(a, _)| *a == name).map(|x| x.1);
    let mut nb = bufs.to_vec();
    for (i, p) in params.iter().enumerate() {
        if let Some(chw) = shape(p.name) {
            nb[i] = permute_layout(&bufs[i], chw, true).map_err(|e| format!("{}: {e}", p.name))?;
        }
    }
    // a vector-loading conv reads its weight packed (`PackWeight`); the twin reads OIHW
    let packed = matches!(
        spec,
        KernelSpec::ConvFwd { .. } | KernelSpec::ConvBwdData { .. }
    );
    if let Some(g) = spec.conv_geom().filter(|g| g.vec && packed) {
        let data_grad = matches!(spec, KernelSpec::ConvBwdData { .. });
        let (ic, oc) = (sc("IC"), sc("OC"));
        let (Some(ic), Some(oc)) = (ic, oc) else {
            return Err(format!("{}: a shape scalar is missing", spec.name()));
        };
        let i = params.iter().position(|p| p.name == "w").unwrap();
        let perm = weight_pack_order(
            g.k as usize,
            g.groups as usize,
            ic as usize,
            oc as usize,
            data_grad,
        )
        .map_err(|e| format!("{}: {e}", spec.name()))?;
        if perm.len() != nb[i].len() {
            return Err(format!("{}: packed weight length", spec.name()));
        }
        nb[i] = perm.iter().map(|&p| bufs[i][p]).collect();
    }
    let (_, bnames) = base.signature();
    let bsc = bnames
        .iter()
        .map(|(x, _)| sc(x).ok_or(format!("{}: no scalar {x}", spec.name())))
        .collect::<Result<Vec<f64>, String>>()?;
    // (a split-K conv's slices are ranges of the NHWC reduction order)
    let mut out = launch_nchw(&base, n, &nb, &bsc, true)?;
    for (p, o) in params.iter().zip(out.iter_mut()) {
        if let (Some(chw), Some(v)) = (shape(p.name), o.as_mut()) {
            *v = permute_layout(v, chw, false)?;
        }
    }
    Ok(out)
}

/// [`launch`] on NCHW arguments; `red_nhwc`: the launch is NHWC, so a conv's reduction runs
/// `(kh, kw, c)` (else `(c, kh, kw)`), which decides a split-K forward conv's slices.
fn launch_nchw(
    spec: &KernelSpec,
    n: usize,
    bufs: &[Vec<f64>],
    scalars: &[f64],
    red_nhwc: bool,
) -> Result<Vec<Option<Vec<f64>>>, String> {
    use KernelSpec::*;
    let (params, sparams) = spec.signature();
    if params.len() != bufs.len() || sparams.len() != scalars.len() {
        return Err(format!("{}: argument count", spec.name()));
    }
    let a = Args {
        spec,
        bufs,
        scalars,
    };
    let mut out: Vec<(&str, Vec<f64>)> = vec![];
    // a runtime shape scalar (`C`, `HW`, `IH`, ...), checked to be at least 1
    let dim = |name: &str| -> Result<usize, String> {
        let v = a.sc(name)?;
        if v >= 1.0 {
            Ok(v as usize)
        } else {
            Err(format!("{}: {name} = {v}", spec.name()))
        }
    };
    match *spec {
        ConvFwd {
            g,
            pro,
            epi,
            split_k,
        } => {
            let (ic, oc) = (dim("IC")?, dim("OC")?);
            if ic % g.groups as usize != 0 || oc % g.groups as usize != 0 {
                return Err(format!("{}: groups do not divide {ic} / {oc}", spec.name()));
            }
            let x = t4(a.buf("x")?, [n, ic, g.in_h as usize, g.in_w as usize])?;
            let mut x = prologue(&x, &pro, &a)?;
            tc_operand(&g, &mut x.data);
            let mut w = a.buf("w")?.to_vec();
            if w.len() != conv_w_len(&g, ic, oc) {
                return Err("conv weight length".into());
            }
            tc_operand(&g, &mut w);
            if split_k > 1 {
                // slice s: the weights whose reduction index (in the launch's order) lies in
                // [s chunk, (s + 1) chunk), zero elsewhere; no epilogue
                let (icg, kk) = (ic / g.groups as usize, (g.k * g.k) as usize);
                let kdim = icg * kk;
                let sk = split_k as usize;
                let chunk = kdim.div_ceil(32 * sk) * 32;
                let red = |i: usize| {
                    let (c, tap) = (i / kk % icg, i % kk);
                    if red_nhwc {
                        tap * icg + c
                    } else {
                        c * kk + tap
                    }
                };
                let op = conv_op(&g, ic, oc);
                let mut parts = Vec::with_capacity(sk * n * oc * (g.out_h * g.out_w) as usize);
                for s in 0..sk {
                    let ws: Vec<f64> = w
                        .iter()
                        .enumerate()
                        .map(|(i, &v)| {
                            let r = red(i);
                            if r >= s * chunk && r < (s + 1) * chunk {
                                v
                            } else {
                                0.0
                            }
                        })
                        .collect();
                    parts.extend(conv::conv2d_forward(&x, &op, &ws, None).data);
                }
                out.push(("y", parts));
            } else {
                let w = &w[..];
                let mut op = conv_op(&g, ic, oc);
                op.bias = epi.bias;
                let mut y =
                    conv::conv2d_forward(&x, &op, w, epi.bias.then(|| a.buf("bias")).transpose()?);
                if epi.residual {
                    let r = a.buf("res")?;
                    if r.len() != y.data.len() {
                        return Err("residual length".into());
                    }
                    y.data = add_into(&y.data, r);
                }
                if epi.relu {
                    y = ew::relu(&y);
                }
                if epi.stats {
                    let prior = a.buf("stats")?;
                    if prior.len() != 4 * oc {
                        return Err("conv stats length".into());
                    }
                    out.push(("stats", stats_of(&y.data, n, oc, prior)));
                }
                out.push(("y", y.data));
            }
        }
        ConvBwdData { g, chain } => {
            let (ic, oc) = (dim("IC")?, dim("OC")?);
            if ic % g.groups as usize != 0 || oc % g.groups as usize != 0 {
                return Err(format!("{}: groups do not divide {ic} / {oc}", spec.name()));
            }
            let xs = [n, ic, g.in_h as usize, g.in_w as usize];
            let mut dy = t4(a.buf("dy")?, [n, oc, g.out_h as usize, g.out_w as usize])?;
            tc_operand(&g, &mut dy.data);
            let mut w = a.buf("w")?.to_vec();
            if w.len() != conv_w_len(&g, ic, oc) {
                return Err("conv weight length".into());
            }
            tc_operand(&g, &mut w);
            let w = &w[..];
            let zeros = Tensor::zeros(&xs);
            let dact = conv::conv2d_backward(&zeros, &conv_op(&g, ic, oc), w, &dy, true)
                .dx
                .expect("dx requested");
            if chain.any() {
                let xpre = t4(a.buf("xpre")?, xs)?;
                let gv = chain_mask(&xpre, dact.data, &chain, &a)?;
                let saved = a.buf("saved")?;
                let c = ic;
                let hw = (g.in_h * g.in_w) as usize;
                let xh = |i: usize| {
                    let ch = (i / hw) % c;
                    (xpre.data[i] - saved[ch]) * saved[c + ch]
                };
                let sg = per_channel(xs, |i| gv[i] * xh(i));
                let sb = per_channel(xs, |i| gv[i]);
                let prior = a.buf("sums")?;
                // what an f32 sum of these terms may be off by is relative to the sum of
                // their magnitudes (see SUM_L1)
                let l1 = [
                    per_channel(xs, |i| (gv[i] * xh(i)).abs()),
                    per_channel(xs, |i| gv[i].abs()),
                ]
                .concat();
                SUM_L1.set(vec![(
                    "sums",
                    prior.iter().zip(&l1).map(|(p, t)| p.abs() + t).collect(),
                )]);
                out.push(("sums", add_into(prior, &[sg, sb].concat())));
                out.push(("dx", gv));
            } else {
                out.push(("dx", a.accum("accum", "dx", dact.data)?));
            }
        }
        ConvBwdWeight { g, pro, split_k } => {
            let (ic, oc) = (dim("IC")?, dim("OC")?);
            if ic % g.groups as usize != 0 || oc % g.groups as usize != 0 {
                return Err(format!("{}: groups do not divide {ic} / {oc}", spec.name()));
            }
            let x = t4(a.buf("x")?, [n, ic, g.in_h as usize, g.in_w as usize])?;
            let mut x = prologue(&x, &pro, &a)?;
            tc_operand(&g, &mut x.data);
            let mut dy = t4(a.buf("dy")?, [n, oc, g.out_h as usize, g.out_w as usize])?;
            tc_operand(&g, &mut dy.data);
            let w0 = vec![0.0; conv_w_len(&g, ic, oc)];
            let op = conv_op(&g, ic, oc);
            if split_k <= 1 {
                out.push(("dw", conv::conv2d_backward(&x, &op, &w0, &dy, false).dw));
            } else {
                // slice s: dy kept on flat pixels [s chunk, (s + 1) chunk), zero elsewhere
                let ohw = (g.out_h * g.out_w) as usize;
                let pixels = n * ohw;
                let sk = split_k as usize;
                let chunk = pixels.div_ceil(32 * sk) * 32;
                let mut parts = Vec::with_capacity(sk * w0.len());
                for s in 0..sk {
                    let mut d = dy.clone();
                    for (i, v) in d.data.iter_mut().enumerate() {
                        let p = (i / (oc * ohw)) * ohw + i % ohw;
                        if p < s * chunk || p >= (s + 1) * chunk {
                            *v = 0.0;
                        }
                    }
                    parts.extend(conv::conv2d_backward(&x, &op, &w0, &d, false).dw);
                }
                out.push(("dw", parts));
            }
        }
        SplitKEpilogue { epi, .. } => {
            let (count, splits, c, hw) = (dim("count")?, dim("splits")?, dim("C")?, dim("HW")?);
            let part = a.buf("part")?;
            if part.len() < count * splits || a.buf("y")?.len() != count {
                return Err("split-K buffer lengths".into());
            }
            let bias = if epi.bias { Some(a.buf("bias")?) } else { None };
            let res = if epi.residual {
                Some(a.buf("res")?)
            } else {
                None
            };
            if bias.is_some_and(|b| b.len() != c) || res.is_some_and(|r| r.len() != count) {
                return Err("split-K epilogue argument lengths".into());
            }
            let y = (0..count)
                .map(|i| {
                    let mut v: f64 = (0..splits).map(|s| part[s * count + i]).sum();
                    if let Some(b) = bias {
                        v += b[i / hw % c];
                    }
                    if let Some(r) = res {
                        v += r[i];
                    }
                    if epi.relu {
                        // as the ReLU kernel (NaN to 0)
                        v = if v > 0.0 { v } else { 0.0 };
                    }
                    v
                })
                .collect();
            out.push(("y", y));
        }
        SplitKReduce => {
            let (count, splits) = (dim("count")?, dim("splits")?);
            let part = a.buf("part")?;
            if part.len() < count * splits || a.buf("dw")?.len() != count {
                return Err("split-K buffer lengths".into());
            }
            let dw = (0..count)
                .map(|i| (0..splits).map(|s| part[s * count + i]).sum())
                .collect();
            out.push(("dw", dw));
        }
        LinearFwd { in_f, out_f, .. } => {
            let (i, o) = (in_f as usize, out_f as usize);
            let x = t4(a.buf("x")?, [n, i, 1, 1])?;
            out.push((
                "y",
                linear::linear(&x, a.buf("w")?, a.buf("bias")?, i, o).data,
            ));
        }
        LinearBwdData { in_f, out_f, .. } => {
            let (i, o) = (in_f as usize, out_f as usize);
            let x0 = Tensor::zeros(&[n, i]);
            let dy = t4(a.buf("dy")?, [n, o, 1, 1])?;
            let (dx, _, _) = linear::linear_backward(&x0, a.buf("w")?, &dy, i, o);
            out.push(("dx", a.accum("accum", "dx", dx.data)?));
        }
        LinearBwdWeight { in_f, out_f, .. } => {
            let (i, o) = (in_f as usize, out_f as usize);
            let x = t4(a.buf("x")?, [n, i, 1, 1])?;
            let dy = t4(a.buf("dy")?, [n, o, 1, 1])?;
            let w0 = vec![0.0; i * o];
            out.push(("dw", linear::linear_backward(&x, &w0, &dy, i, o).1));
        }
        ChannelSums { split: true, .. } => {
            // compensated pairs `[sum | sumsq | lo | lo]` added to what is there; compared in
            // their canonical form (`canonical_stats`)
            let x = a.buf("x")?;
            out.push(("out", stats_of(x, n, dim("C")?, a.buf("out")?)));
        }
        ChannelSums { squares, .. } => {
            let (c, hw) = (dim("C")?, dim("HW")?);
            let shape = [n, c, hw, 1];
            let x = t4(a.buf("x")?, shape)?;
            let s = per_channel(shape, |i| x.data[i]);
            let mut v = s.clone();
            if squares {
                let m = (n * hw) as f64;
                let q = per_channel(shape, |i| {
                    let d = x.data[i] - s[(i / hw) % c] / m;
                    d * d
                });
                v.extend(q);
            }
            out.push(("out", v));
        }
        BnFinalizeTrain {
            centered,
            zero_dsums,
        } => {
            let c = dim("C")?;
            let (st, gamma, beta, run) = (
                a.buf("stats")?,
                a.buf("gamma")?,
                a.buf("beta")?,
                a.buf("running")?,
            );
            let (count, eps, mom) = (a.sc("count")?, a.sc("eps")?, a.sc("momentum")?);
            let (mut saved, mut affine, mut running) =
                (vec![0.0; 2 * c], vec![0.0; 2 * c], vec![0.0; 2 * c]);
            let st = if centered {
                if st.len() != 2 * c {
                    return Err("centred stats length".into());
                }
                st.to_vec()
            } else {
                if st.len() != 4 * c {
                    return Err("compensated stats length".into());
                }
                canonical_stats(st)
            };
            for ch in 0..c {
                let mean = st[ch] / count;
                let var = if centered {
                    st[c + ch] / count
                } else {
                    st[c + ch] / count - mean * mean
                }
                .max(0.0);
                let rstd = 1.0 / (var + eps).sqrt();
                saved[ch] = mean;
                saved[c + ch] = rstd;
                affine[ch] = gamma[ch] * rstd;
                affine[c + ch] = beta[ch] - mean * gamma[ch] * rstd;
                let unbiased = if count > 1.0 {
                    var * count / (count - 1.0)
                } else {
                    var
                };
                running[ch] = (1.0 - mom) * run[ch] + mom * mean;
                running[c + ch] = (1.0 - mom) * run[c + ch] + mom * unbiased;
            }
            out.push(("saved", saved));
            out.push(("affine", affine));
            out.push(("running", running));
            if zero_dsums {
                // the BN's [dgamma | dbeta], cleared for the backward's atomics
                out.push(("dsums", vec![0.0; 2 * c]));
            }
        }
        BnFinalizeEval => {
            let c = dim("C")?;
            let (run, gamma, beta) = (a.buf("running")?, a.buf("gamma")?, a.buf("beta")?);
            let eps = a.sc("eps")?;
            let mut affine = vec![0.0; 2 * c];
            for ch in 0..c {
                let sc = gamma[ch] / (run[c + ch] + eps).sqrt();
                affine[ch] = sc;
                affine[c + ch] = beta[ch] - run[ch] * sc;
            }
            out.push(("affine", affine));
        }
        BnApply { .. } => {
            let x = t4(a.buf("x")?, [n, dim("C")?, dim("HW")?, 1])?;
            let pro = PrologueFlags {
                affine: true,
                relu: false,
                dropout: false,
            };
            out.push(("y", prologue(&x, &pro, &a)?.data));
        }
        BnBwdReduce { chain, split, .. } => {
            let (c, hw) = (dim("C")?, dim("HW")?);
            let shape = [n, c, hw, 1];
            let x = t4(a.buf("x")?, shape)?;
            let d = chain_mask(&x, a.buf("dy")?.to_vec(), &chain, &a)?;
            let saved = a.buf("saved")?;
            let xh = |i: usize| (x.data[i] - saved[(i / hw) % c]) * saved[c + (i / hw) % c];
            let dgamma = per_channel(shape, |i| d[i] * xh(i));
            let dbeta = per_channel(shape, |i| d[i]);
            if split {
                // added with f32 atomics, one block's double sum at a time, to what is there
                // (zeroed by the forward's finalize): held to the terms' magnitudes (SUM_L1)
                let (pg, pb) = (a.buf("dgamma")?, a.buf("dbeta")?);
                let l1g = per_channel(shape, |i| (d[i] * xh(i)).abs());
                let l1b = per_channel(shape, |i| d[i].abs());
                let with_prior =
                    |p: &[f64], l1: Vec<f64>| p.iter().zip(l1).map(|(p, t)| p.abs() + t).collect();
                SUM_L1.set(vec![
                    ("dgamma", with_prior(pg, l1g)),
                    ("dbeta", with_prior(pb, l1b)),
                ]);
                out.push(("dgamma", add_into(pg, &dgamma)));
                out.push(("dbeta", add_into(pb, &dbeta)));
            } else {
                out.push(("dgamma", dgamma));
                out.push(("dbeta", dbeta));
            }
        }
        BnBwdApply { chain, .. } => {
            let (c, hw) = (dim("C")?, dim("HW")?);
            let shape = [n, c, hw, 1];
            let x = t4(a.buf("x")?, shape)?;
            let d = chain_mask(&x, a.buf("dy")?.to_vec(), &chain, &a)?;
            let (saved, gamma, dgamma, dbeta) = (
                a.buf("saved")?,
                a.buf("gamma")?,
                a.buf("dgamma")?,
                a.buf("dbeta")?,
            );
            let m = (n * hw) as f64;
            let r: Vec<f64> = (0..d.len())
                .map(|i| {
                    let ch = (i / hw) % c;
                    let rstd = saved[c + ch];
                    let xh = (x.data[i] - saved[ch]) * rstd;
                    gamma[ch] * rstd * (d[i] - dbeta[ch] / m - xh * dgamma[ch] / m)
                })
                .collect();
            out.push(("dx", a.accum("accum", "dx", r)?));
        }
        Relu => {
            let x = a.buf("x")?;
            out.push(("y", ew::relu(&t4(x, [1, 1, 1, x.len()])?).data));
        }
        ReluBwd => {
            let (y, dy) = (a.buf("y")?, a.buf("dy")?);
            let s = [1, 1, 1, y.len()];
            let d = ew::relu_backward(&t4(y, s)?, &t4(dy, s)?).data;
            out.push(("dx", a.accum("accum", "dx", d)?));
        }
        Dropout { .. } => {
            let x = a.buf("x")?;
            out.push((
                "y",
                ew::dropout(&t4(x, [1, 1, 1, x.len()])?, a.p()?, a.key()?).data,
            ));
        }
        DropoutBwd { .. } => {
            let dy = a.buf("dy")?;
            let d = ew::dropout(&t4(dy, [1, 1, 1, dy.len()])?, a.p()?, a.key()?).data;
            out.push(("dx", a.accum("accum", "dx", d)?));
        }
        DropPath | DropPathBwd => {
            let src = if matches!(spec, DropPath) { "x" } else { "dy" };
            let x = a.buf(src)?;
            let per = a.sc("per")? as usize;
            if per == 0 || x.len() % per != 0 {
                return Err("droppath: per".into());
            }
            // the kernel keeps a sample with probability 1 - p, p = 1 - survival as an f32
            let survival = 1.0f32 - a.p()?;
            let d = ew::drop_path(&t4(x, [x.len() / per, per, 1, 1])?, survival, a.key()?).data;
            if matches!(spec, DropPath) {
                out.push(("y", d));
            } else {
                out.push(("dx", a.accum("accum", "dx", d)?));
            }
        }
        Add => {
            let (x, y) = (a.buf("a")?, a.buf("b")?);
            let s = [1, 1, 1, x.len()];
            out.push(("y", ew::add(&t4(x, s)?, &t4(y, s)?).data));
        }
        Accumulate => {
            let x = a.buf("x")?.to_vec();
            out.push(("y", a.accum("accum", "y", x)?));
        }
        ZeroPad { .. } => {
            let x = t4(a.buf("x")?, [n, dim("IC")?, dim("IH")?, dim("IW")?])?;
            let y = pool::zero_pad_shortcut(&x, dim("OC")?, dim("S")? as u32);
            if y.shape != [n, dim("OC")?, dim("OH")?, dim("OW")?] {
                return Err(format!("zeropad: output shape {:?}", y.shape));
            }
            out.push(("y", y.data));
        }
        ZeroPadBwd { .. } => {
            let dy = t4(a.buf("dy")?, [n, dim("OC")?, dim("OH")?, dim("OW")?])?;
            let xs = [n, dim("IC")?, dim("IH")?, dim("IW")?];
            let d = pool::zero_pad_shortcut_backward(&xs, dim("S")? as u32, &dy).data;
            out.push(("dx", a.accum("accum", "dx", d)?));
        }
        Concat { .. } => {
            let hw = dim("HW")?;
            let x0 = t4(a.buf("x")?, [n, dim("C0")?, hw, 1])?;
            let x1 = t4(a.buf("x1")?, [n, dim("C1")?, hw, 1])?;
            out.push(("y", ew::concat(&x0, &x1).data));
        }
        ConcatBwd { .. } => {
            let (c0, c1, hw) = (dim("C0")?, dim("C1")?, dim("HW")?);
            let dy = t4(a.buf("dy")?, [n, c0 + c1, hw, 1])?;
            let (d0, d1) = ew::concat_backward(&dy, c0);
            out.push(("dx0", a.accum("accum0", "dx0", d0.data)?));
            out.push(("dx1", a.accum("accum1", "dx1", d1.data)?));
        }
        MaxPool { pool: p, .. } | AvgPool { pool: p, .. } => {
            let x = t4(a.buf("x")?, [n, dim("C")?, dim("IH")?, dim("IW")?])?;
            let y = if matches!(spec, MaxPool { .. }) {
                pool::max_pool(&x, &p)
            } else {
                pool::avg_pool(&x, &p)
            };
            if y.shape != [n, dim("C")?, dim("OH")?, dim("OW")?] {
                return Err(format!("pool: output shape {:?}", y.shape));
            }
            out.push(("y", y.data));
        }
        MaxPoolBwd { pool: p, .. } | AvgPoolBwd { pool: p, .. } => {
            let xs = [n, dim("C")?, dim("IH")?, dim("IW")?];
            let dy = t4(a.buf("dy")?, [n, dim("C")?, dim("OH")?, dim("OW")?])?;
            let d = if matches!(spec, MaxPoolBwd { .. }) {
                pool::max_pool_backward(&t4(a.buf("x")?, xs)?, &p, &dy)
            } else {
                pool::avg_pool_backward(&xs, &p, &dy)
            };
            out.push(("dx", a.accum("accum", "dx", d.data)?));
        }
        GlobalAvgPool { pro, .. } => {
            let rows = dim("rows")?;
            let mut x = t4(a.buf("x")?, [rows, 1, dim("HW")?, 1])?;
            if pro.any() {
                // the prologue per row's channel: the rows viewed as [n, C, HW, 1]
                let c = dim("C")?;
                if rows % c != 0 {
                    return Err("gap rows are not images of C channels".into());
                }
                x = prologue(&t4(&x.data, [rows / c, c, dim("HW")?, 1])?, &pro, &a)?;
                x = t4(&x.data, [rows, 1, dim("HW")?, 1])?;
            }
            out.push(("y", pool::global_avg_pool(&x).data));
        }
        GlobalAvgPoolBwd { .. } => {
            let rows = dim("rows")?;
            let dy = t4(a.buf("dy")?, [rows, 1, 1, 1])?;
            let d = pool::global_avg_pool_backward(&[rows, 1, dim("HW")?, 1], &dy).data;
            out.push(("dx", a.accum("accum", "dx", d)?));
        }
        SoftmaxXent { classes } => {
            let k = classes as usize;
            let logits = a.buf("logits")?;
            let labels: Vec<u32> = a.buf("labels")?.iter().map(|&l| l as u32).collect();
            let sm = a.sc("smoothing")?;
            let lt = Tensor::from_vec(&[n, k], logits.to_vec());
            let all =
                crate::loss::softmax_cross_entropy(&lt, &labels, sm).map_err(|e| e.to_string())?;
            let mut loss = vec![];
            for i in 0..n {
                let row = Tensor::from_vec(&[1, k], logits[i * k..(i + 1) * k].to_vec());
                let one = crate::loss::softmax_cross_entropy(&row, &labels[i..i + 1], sm)
                    .map_err(|e| e.to_string())?;
                loss.push(one.loss);
            }
            // the update guard (`HYPER_NONFINITE`): a loss that is not finite stops the optimizer
            let mut hyper = a.buf("hyper")?.to_vec();
            if loss.iter().any(|l| !(*l as f32).is_finite()) {
                *hyper
                    .get_mut(HYPER_NONFINITE)
                    .ok_or("the hyper buffer is too short")? = 1.0;
            }
            out.push(("loss", loss));
            out.push(("dlogits", all.dlogits.data));
            out.push(("hyper", hyper));
        }
        SgdMultiTensor => {
            let mut p = a.buf("params")?.to_vec();
            let mut mb = a.buf("momentum_buf")?.to_vec();
            // the step's loss was not finite: no update
            let skip = a
                .buf("hyper")?
                .get(HYPER_NONFINITE)
                .is_some_and(|&f| f != 0.0);
            let (g, table) = (a.buf("grads")?, a.buf("table")?);
            let (lr, mom, wd, nest) = (
                a.hyper()?.1 as f64,
                a.sc("momentum")?,
                a.sc("weight_decay")?,
                a.sc("nesterov")? != 0.0,
            );
            for e in table.chunks_exact(3).filter(|_| !skip) {
                let (start, len) = (e[0] as usize, e[1] as usize);
                let d = if e[2] != 0.0 { wd } else { 0.0 };
                if start + len > p.len() || start + len > g.len() || start + len > mb.len() {
                    return Err("sgd table out of range".into());
                }
                for o in start..start + len {
                    let gr = g[o] + d * p[o];
                    let b = mom * mb[o] + gr;
                    mb[o] = b;
                    p[o] -= lr * if nest { gr + mom * b } else { b };
                }
            }
            out.push(("params", p));
            out.push(("momentum_buf", mb));
        }
        Zero => {
            let len = a.buf("y")?.len();
            out.push(("y", vec![0.0; len]));
        }
        ToNhwc => {
            let (c, hw) = (dim("C")?, dim("HW")?);
            out.push(("y", permute_layout(a.buf("x")?, [c, hw, 1], false)?));
        }
        PackWeight {
            k,
            groups,
            data_grad,
            f32,
        } => {
            let (oc, ic) = (dim("OC")?, dim("IC")?);
            let perm = weight_pack_order(k as usize, groups as usize, ic, oc, data_grad)?;
            let mut w = a.buf("w")?.to_vec();
            if w.len() != perm.len() {
                return Err("pack_weight length".into());
            }
            // bf16 as stored; an f32 copy is the weight itself (the conv rounds it to TF32)
            if !f32 {
                round_operand(&mut w, false);
            }
            let mut wp = vec![0.0; w.len()];
            for (oihw, &p) in perm.iter().enumerate() {
                wp[p] = w[oihw];
            }
            out.push(("wp", wp));
        }
        FoldBn { bias } => {
            let (oc, per) = (dim("OC")?, dim("PER")?);
            let (w, aff) = (a.buf("w")?, a.buf("affine")?);
            if w.len() != oc * per || aff.len() != 2 * oc {
                return Err("fold_bn lengths".into());
            }
            let b = if bias {
                a.buf("b")?.to_vec()
            } else {
                vec![0.0; oc]
            };
            out.push((
                "w_out",
                (0..oc * per).map(|i| w[i] * aff[i / per]).collect(),
            ));
            out.push((
                "b_out",
                (0..oc).map(|o| b[o] * aff[o] + aff[oc + o]).collect(),
            ));
        }
    }
    let mut res = vec![None; params.len()];
    for (name, v) in out {
        let i = params.iter().position(|p| p.name == name).unwrap();
        if params[i].access == Access::Read {
            return Err(format!("{}: writes read-only {name}", spec.name()));
        }
        if v.len() != bufs[i].len() {
            return Err(format!(
                "{}: {name} has {} values, the argument {}",
                spec.name(),
                v.len(),
                bufs[i].len()
            ));
        }
        res[i] = Some(v);
    }
    Ok(res)
}

thread_local! {
    /// Set by the last [`launch`] of a kernel that sums a BN chain's gradients into `sums`
    /// (a data-gradient convolution with a BN chain): per value, the sum of the magnitudes
    /// of what it adds up (prior value included). [`check_kernels_with`] compares that part
    /// relative to at least a share of it ([`SUM_L1_SHARE`]): where the terms cancel (a BN's `dbeta` whose gradient comes through a
    /// 1x1 convolution from another BN in training mode is exactly 0 in exact arithmetic:
    /// pyramidnet-272-200-bottleneck's `76.body.0`), the exact sum is rounding noise and
    /// an f32 sum's error, at most a few ulps of this, is not relative to the sum itself.
    /// Per output argument (`sums`; a split dBN reduction's `dgamma`, `dbeta`).
    static SUM_L1: std::cell::RefCell<Vec<(&'static str, Vec<f64>)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The floor of a `sums` part is its largest [`SUM_L1`] over this: loose enough for an f32
/// sum's rounding, tight enough that a missing or mis-signed term of average size (1/n of the
/// magnitudes) still fails by far for any n the selftest's shapes give.
const SUM_L1_SHARE: f64 = 64.0;

thread_local! {
    /// How [`chain_mask`] decides a ReLU whose recomputed activation is zero up to f32
    /// rounding (`|x * scale + shift| <= 2^-20 (|x * scale| + |shift|)`: a kernel computing it
    /// in f32 may land on either side): `None`, as f64 does; `Some(on)`, all such ties on or
    /// all off. And how many ties it met.
    static RELU_TIES: std::cell::Cell<(Option<bool>, usize)> = const { std::cell::Cell::new((None, 0)) };
}

/// Sets [`RELU_TIES`]'s policy for its lifetime (back to f64's own decisions after).
struct TiePolicy;

impl TiePolicy {
    fn set(policy: Option<bool>) -> TiePolicy {
        RELU_TIES.set((policy, 0));
        TiePolicy
    }
}

impl Drop for TiePolicy {
    fn drop(&mut self) {
        RELU_TIES.set((None, 0));
    }
}

/// The gradient through a BN chain's dropout and ReLU (recomputing the activation from the
/// BN input `x` and the `affine` argument): `d * m / (1 - p) * [x * scale + shift > 0]`,
/// ties decided as [`RELU_TIES`] says.
fn chain_mask(
    x: &Tensor<f64>,
    d: Vec<f64>,
    chain: &PrologueFlags,
    a: &Args,
) -> Result<Vec<f64>, String> {
    let mut d = t4(&d, [x.shape[0], x.shape[1], x.shape[2], x.shape[3]])?;
    if chain.dropout {
        d = ew::dropout(&d, a.p()?, a.key()?);
    }
    if chain.relu {
        let [_, c, h, w] = [x.shape[0], x.shape[1], x.shape[2], x.shape[3]];
        let aff = a.buf("affine")?;
        if aff.len() != 2 * c {
            return Err("affine length".into());
        }
        let (policy, mut ties) = RELU_TIES.get();
        for (i, v) in d.data.iter_mut().enumerate() {
            let ch = (i / (h * w)) % c;
            let (xs, sh) = (x.data[i] * aff[ch], aff[c + ch]);
            let act = xs + sh;
            let on = if act.abs() <= (xs.abs() + sh.abs()) * 2f64.powi(-20) {
                ties += 1;
                policy.unwrap_or(act > 0.0)
            } else {
                act > 0.0
            };
            if !on {
                *v = 0.0;
            }
        }
        RELU_TIES.set((policy, ties));
    }
    Ok(d.data)
}

/// The contents (f64) of each buffer argument of `l`, sliced from whole buffers.
pub fn gather(l: &Launch, bufs: &[Vec<f64>]) -> Vec<Vec<f64>> {
    l.buffers
        .iter()
        .map(|a| bufs[a.buffer][a.offset as usize..(a.offset + a.len) as usize].to_vec())
        .collect()
}

/// Runs every setup launch then every step launch in f64 from `bufs` (whole buffers, f64),
/// returning the final buffers: a whole step in f64 arithmetic. With `round_storage`, every
/// value written to a buffer is rounded to that buffer's storage type (f32, or bf16 for
/// activations in `--precision bf16`), which is all the rounding a schedule's data sees
/// between kernels.
pub fn run(
    s: &Schedule,
    bufs: Vec<Vec<f64>>,
    h: &HostScalars,
    round_storage: bool,
) -> Result<Vec<Vec<f64>>, String> {
    run_impl(s, bufs, h, round_storage, None)
}

/// [`run`] with storage rounding, every value stored as bf16 first moved by 2^-23 of itself up
/// or down (a fixed pseudo-random sign per value, from `seed`): about what another order of a
/// kernel's f32 sums moves a value by (a few f32 ulps), which decides some of bf16's roundings
/// the other way; and every ReLU tie of a BN chain (see `RELU_TIES`) decided on. (At 2^-20
/// instead, wrn-10-2's gradients moved 37%, while the fake GPU's are 1e-3 from `run`'s: the
/// nudge is calibrated to what f32 sums do.) In an f32 schedule, the activations and their
/// gradients are moved by 2^-20 of themselves (`F32_NUDGE`), one f32 kernel's error; other f32 buffers are left
/// alone (some hold compensated sums, far finer than that, from which variances are taken).
/// Its distance from [`run`]'s result is how finely a whole step of this schedule at this
/// precision can be checked at all (`selftest`).
pub fn run_nudged(
    s: &Schedule,
    bufs: Vec<Vec<f64>>,
    h: &HostScalars,
    seed: u64,
) -> Result<Vec<Vec<f64>>, String> {
    run_impl(s, bufs, h, true, Some(seed))
}

fn run_impl(
    s: &Schedule,
    bufs: Vec<Vec<f64>>,
    h: &HostScalars,
    round_storage: bool,
    nudge_seed: Option<u64>,
) -> Result<Vec<Vec<f64>>, String> {
    // the nudged twin also nudges the tensor-core operands a kernel rounds to bf16 (a fused
    // BN-ReLU prologue's output is rounded there, never stored: without this, wrn-16-8's fused
    // bf16 twin moved 1.3e-2, its unfused one 0.51, and the fake GPU's fused step 0.43), and
    // decides every ReLU tie of a BN chain on, as valid a choice for an f32 kernel as f64's
    let _ties = TiePolicy::set(nudge_seed.map(|_| true));
    NUDGE.set(nudge_seed.map(|s| (s, 0)));
    let r = run_steps(s, bufs, h, round_storage, nudge_seed);
    NUDGE.set(None);
    r
}

fn run_steps(
    s: &Schedule,
    mut bufs: Vec<Vec<f64>>,
    h: &HostScalars,
    round_storage: bool,
    nudge_seed: Option<u64>,
) -> Result<Vec<Vec<f64>>, String> {
    set_hyper(s, &mut bufs, h);
    for (li, l) in s.setup.iter().chain(&s.launches).enumerate() {
        let spec = &s.kernels[l.kernel].spec;
        let sc: Vec<f64> = l.scalars.iter().map(|&x| scalar(x, h)).collect();
        let before = gather(l, &bufs);
        let mut new = launch(spec, s.batch as usize, &before, &sc)
            .map_err(|e| format!("launch {li} ({}): {e}", l.note))?;
        if round_storage {
            for (ai, (a, v)) in l.buffers.iter().zip(new.iter_mut()).enumerate() {
                if let Some(v) = v {
                    let dtype = s.buffers[a.buffer].dtype;
                    if let Some(seed) = nudge_seed {
                        let key = seed ^ ((li as u64) << 40) ^ ((ai as u64) << 32);
                        let role = s.buffers[a.buffer].role;
                        if dtype == Dtype::Bf16 {
                            nudge(v, key, BF16_NUDGE);
                        } else if s.precision == Precision::F32
                            && matches!(role, Role::Activation | Role::ActivationGrad)
                        {
                            nudge(v, key, F32_NUDGE);
                        }
                    }
                    *v = decode(&encode(v, dtype), dtype);
                }
            }
            // a conv epilogue's statistics are of the stored (rounded) output, in compensated
            // (about f64) precision
            if let KernelSpec::ConvFwd { epi, .. } = spec {
                if epi.stats {
                    let (params, snames) = spec.signature();
                    let pos = |name: &str| params.iter().position(|p| p.name == name).unwrap();
                    let oc = sc[snames.iter().position(|(n, _)| *n == "OC").unwrap()] as usize;
                    let y = nchw_output(spec, new[pos("y")].as_ref().unwrap(), oc)?;
                    new[pos("stats")] =
                        Some(stats_of(&y, s.batch as usize, oc, &before[pos("stats")]));
                }
            }
        }
        for (a, v) in l.buffers.iter().zip(new) {
            if let Some(v) = v {
                bufs[a.buffer][a.offset as usize..(a.offset + a.len) as usize].copy_from_slice(&v);
            }
        }
    }
    Ok(bufs)
}

/// One measured part of one launch's output.
#[derive(Debug, Clone)]
pub struct PartErr {
    pub launch: usize,
    pub note: String,
    pub kernel: String,
    /// `<buffer argument>[.<part>]`.
    pub part: String,
    /// `max |got - want|`.
    pub abs: f64,
    /// `max |want|` over the part.
    pub scale: f64,
    /// `abs / scale` (0 when both are 0).
    pub rel: f64,
}

/// A conv epilogue's statistics after adding `y` (`n` images of `c` channels) to `prior`:
/// both are compensated pairs `[sum | sumsq | sum_lo | sumsq_lo]`; the result holds the exact
/// (f64) totals in the first half and zeros in the second (see [`canonical_stats`]).
pub fn stats_of(y: &[f64], n: usize, c: usize, prior: &[f64]) -> Vec<f64> {
    let hw = y.len() / (n * c).max(1);
    let shape = [n, c, hw, 1];
    let s = per_channel(shape, |i| y[i]);
    let q = per_channel(shape, |i| y[i] * y[i]);
    let mut out = canonical_stats(prior);
    for ch in 0..c {
        out[ch] += s[ch];
        out[c + ch] += q[ch];
    }
    out
}

/// A conv's output `y` (`oc` channels) in NCHW order, whatever the kernel's layout.
fn nchw_output(spec: &KernelSpec, y: &[f64], oc: usize) -> Result<Vec<f64>, String> {
    match spec.conv_geom() {
        Some(g) if g.nhwc => permute_layout(y, [oc, g.out_h as usize, g.out_w as usize], true),
        _ => Ok(y.to_vec()),
    }
}

/// `[hi_s | hi_q | lo_s | lo_q]` -> `[hi_s + lo_s | hi_q + lo_q | 0 | 0]` (f64): the values the
/// compensated pairs stand for.
pub fn canonical_stats(v: &[f64]) -> Vec<f64> {
    let c = v.len() / 4;
    let mut out = vec![0.0; v.len()];
    for ch in 0..c {
        out[ch] = v[ch] + v[2 * c + ch];
        out[c + ch] = v[c + ch] + v[3 * c + ch];
    }
    out
}

/// Per-kernel isolation over an emulated run: before each launch the buffers hold exactly
/// what the emulation had (the step's `inputs`, then each launch's traced writes); the
/// reference recomputes the launch from those in f64 and every written part is measured
/// against what the emulated kernel wrote (`trace[(launch, buffer name)]`, whole buffers).
pub fn check_kernels(
    s: &Schedule,
    inputs: &std::collections::BTreeMap<String, Vec<u8>>,
    trace: &std::collections::BTreeMap<(usize, String), Vec<u8>>,
    h: &HostScalars,
) -> Result<Vec<PartErr>, String> {
    check_kernels_with(s, inputs, h, |li, b| {
        let name = &s.buffers[b].name;
        trace
            .get(&(li, name.clone()))
            .cloned()
            .ok_or(format!("no trace of {name}"))
    })
}

/// [`check_kernels`], with the traced contents of buffer `b` after launch `li` fetched on
/// demand by `fetch(li, b)`, in increasing `li` (only for buffers launch `li` writes): a
/// caller can run the launches as they are asked for and keep no trace, so that the memory
/// needed is the buffers', not the launches' times the buffers' (pyramidnet-272-200's
/// gradient arena, 100 MB, is written by some 800 launches).
pub fn check_kernels_with(
    s: &Schedule,
    inputs: &std::collections::BTreeMap<String, Vec<u8>>,
    h: &HostScalars,
    mut fetch: impl FnMut(usize, usize) -> Result<Vec<u8>, String>,
) -> Result<Vec<PartErr>, String> {
    let mut cur: Vec<Vec<f64>> = s
        .buffers
        .iter()
        .map(|b| match inputs.get(&b.name) {
            Some(bytes) => decode(bytes, b.dtype),
            None => vec![0.0; b.len as usize],
        })
        .collect();
    set_hyper(s, &mut cur, h);
    let mut errs = vec![];
    for (li, l) in s.setup.iter().chain(&s.launches).enumerate() {
        let k = &s.kernels[l.kernel];
        let sc: Vec<f64> = l.scalars.iter().map(|&x| scalar(x, h)).collect();
        RELU_TIES.set((None, 0));
        SUM_L1.set(Vec::new());
        let mut want = launch(&k.spec, s.batch as usize, &gather(l, &cur), &sc)
            .map_err(|e| format!("launch {li} ({}): {e}", l.note))?;
        let sum_l1 = SUM_L1.take();
        // A ReLU recomputed at a tie (see RELU_TIES) may go either way in the kernel: the
        // launch is also computed with every tie on and with every tie off, and each element
        // is held to the nearer of the two (exact where a channel's ties all went one way).
        let ties = if RELU_TIES.get().1 > 0 {
            let alt = |on: bool| {
                RELU_TIES.set((Some(on), 0));
                launch(&k.spec, s.batch as usize, &gather(l, &cur), &sc)
                    .map_err(|e| format!("launch {li} ({}): {e}", l.note))
            };
            let both = (alt(true)?, alt(false)?);
            RELU_TIES.set((None, 0));
            Some(both)
        } else {
            None
        };
        let (params, _) = k.spec.signature();
        let mut got_bufs = std::collections::BTreeMap::new();
        for (a, w) in l.buffers.iter().zip(&want) {
            if w.is_some() && !got_bufs.contains_key(&a.buffer) {
                let b = &s.buffers[a.buffer];
                let bytes =
                    fetch(li, a.buffer).map_err(|e| format!("launch {li} ({}): {e}", l.note))?;
                got_bufs.insert(a.buffer, decode(&bytes, b.dtype));
            }
        }
        if let KernelSpec::ConvFwd { epi, .. } = k.spec {
            if epi.stats {
                // The statistics are of the values the kernel wrote (what the BN normalises),
                // so they are checked against sums of the emulated output, not of the exact one.
                let pos = |name: &str| params.iter().position(|p| p.name == name).unwrap();
                let (yi, si) = (pos("y"), pos("stats"));
                let ya = l.buffers[yi];
                let y = &got_bufs[&ya.buffer][ya.offset as usize..(ya.offset + ya.len) as usize];
                let (_, snames) = k.spec.signature();
                let oc = sc[snames.iter().position(|(n, _)| *n == "OC").unwrap()] as usize;
                let prior = gather(l, &cur)[si].clone();
                let y = nchw_output(&k.spec, y, oc)
                    .map_err(|e| format!("launch {li} ({}): {e}", l.note))?;
                want[si] = Some(stats_of(&y, s.batch as usize, oc, &prior));
            }
        }
        for (j, ((a, w), p)) in l.buffers.iter().zip(&want).zip(&params).enumerate() {
            let Some(w) = w else { continue };
            let mut got =
                got_bufs[&a.buffer][a.offset as usize..(a.offset + a.len) as usize].to_vec();
            if matches!(k.spec, KernelSpec::ConvFwd { .. }) && p.name == "stats"
                || matches!(k.spec, KernelSpec::ChannelSums { split: true, .. }) && p.name == "out"
            {
                got = canonical_stats(&got);
            }
            let nearer;
            let w = match &ties {
                Some((on, off)) => match (&on[j], &off[j]) {
                    (Some(on), Some(off)) => {
                        nearer = got
                            .iter()
                            .zip(on.iter().zip(off))
                            .map(|(g, (a, b))| {
                                if (g - a).abs() <= (g - b).abs() {
                                    *a
                                } else {
                                    *b
                                }
                            })
                            .collect::<Vec<f64>>();
                        &nearer
                    }
                    _ => w,
                },
                None => w,
            };
            for (part, r) in parts(&k.spec, p.name, w.len()) {
                // a cancelling sum's floor: 1/64 of its terms' magnitudes (SUM_L1). An f32 sum
                // of n terms is within about sqrt(n) 2^-24 of them (1e-6 at n = 4096), far
                // under 1e-4 of the floor; a term dropped or of the wrong sign moves it by
                // `|term|`, about 64/n of the floor
                let l1 = sum_l1
                    .iter()
                    .find(|(name, l1)| *name == p.name && l1.len() == w.len())
                    .map_or(0.0, |(_, l1)| {
                        l1[r.clone()].iter().fold(0f64, |m, v| m.max(*v)) / SUM_L1_SHARE
                    });
                let (g, w) = (&got[r.clone()], &w[r]);
                // a NaN anywhere is an infinite error (f64::max would skip it)
                let abs = g.iter().zip(w).fold(0f64, |m, (x, y)| {
                    let d = (x - y).abs();
                    if d.is_nan() {
                        f64::INFINITY
                    } else {
                        m.max(d)
                    }
                });
                let scale = w.iter().fold(l1, |m, y| m.max(y.abs()));
                let rel = if abs == 0.0 { 0.0 } else { abs / scale };
                if rel > 1e-2 && std::env::var_os("WRNC_CHECK_TRACE").is_some() {
                    // the worst elements, to see what kind of error it is
                    let mut idx: Vec<usize> = (0..g.len()).collect();
                    idx.sort_by(|&i, &j| (g[j] - w[j]).abs().total_cmp(&(g[i] - w[i]).abs()));
                    for &i in idx.iter().take(4) {
                        eprintln!(
                            "check: launch {li} {part}[{i}]: got {:e}, want {:e} (scale {scale:e})",
                            g[i], w[i]
                        );
                    }
                }
                errs.push(PartErr {
                    launch: li,
                    note: l.note.clone(),
                    kernel: k.name.clone(),
                    part,
                    abs,
                    scale,
                    rel,
                });
            }
        }
        for (b, v) in got_bufs {
            cur[b] = v;
        }
    }
    Ok(errs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `cvt.rna.tf32.f32` (PTX ISA): to 10 mantissa bits, to nearest, ties away from zero
    /// (where round-to-nearest-even would differ: 1 + 2^-11 lies between 1, even, and
    /// 1 + 2^-10); a carry into the exponent; the largest finite f32 rounds up to infinity;
    /// infinities and NaNs stay.
    #[test]
    fn tf32_round_is_ptx_round_to_nearest_ties_away() {
        let p = |e: i32| 2f32.powi(e);
        for (x, want) in [
            (1.0 + p(-11), 1.0 + p(-10)),
            (-(1.0 + p(-11)), -(1.0 + p(-10))),
            (1.0 + p(-11) - p(-23), 1.0),
            (1.0 + p(-11) + p(-23), 1.0 + p(-10)),
            (1.0 + 3.0 * p(-11), 1.0 + p(-9)),
            (2.0 - p(-11), 2.0),
            (1.5, 1.5),
            (0.0, 0.0),
            (f32::MAX, f32::INFINITY),
            (f32::NEG_INFINITY, f32::NEG_INFINITY),
        ] {
            assert_eq!(tf32_round(x), want, "{x:e}");
        }
        assert!(tf32_round(f32::NAN).is_nan());
        assert_eq!(tf32_round(-0.0).to_bits(), (-0.0f32).to_bits());
        // every result has its low 13 bits clear
        for bits in [0x3f80_1234u32, 0xc2f0_0fffu32, 0x0000_1001u32] {
            assert_eq!(tf32_round(f32::from_bits(bits)).to_bits() & 0x1fff, 0);
        }
    }

    /// A ReLU recomputed in a BN chain at an activation that is zero up to rounding is a tie:
    /// counted, decided by the policy (f64's own decision by default), every other element
    /// decided by its sign.
    #[test]
    fn relu_ties_in_a_bn_chain_follow_the_policy() {
        let spec = KernelSpec::BnBwdApply {
            chain: PrologueFlags {
                affine: true,
                relu: true,
                dropout: false,
            },
            nhwc: false,
        };
        let (params, scalars) = spec.signature();
        // one channel of four values; activation x * 0.5 - 1: exactly 0 at x = 2, a tie
        let bufs: Vec<Vec<f64>> = params
            .iter()
            .map(|p| match p.name {
                "dx" => vec![0.0; 4],
                "dy" | "x" => vec![2.0, 3.0, 1.0, 2.5],
                "saved" => vec![2.0, 1.0],
                "gamma" => vec![1.0],
                "dgamma" | "dbeta" => vec![0.0],
                "affine" => vec![0.5, -1.0],
                other => panic!("unexpected buffer {other}"),
            })
            .collect();
        let sc: Vec<f64> = scalars
            .iter()
            .map(|(n, _)| match *n {
                "n" => 1.0,
                "C" => 1.0,
                "HW" => 4.0,
                "accum" => 0.0,
                other => panic!("unexpected scalar {other}"),
            })
            .collect();
        let dx = |policy: Option<bool>| {
            RELU_TIES.set((policy, 0));
            let out = launch(&spec, 1, &bufs, &sc).unwrap();
            let (_, ties) = RELU_TIES.get();
            RELU_TIES.set((None, 0));
            (out[0].clone().unwrap(), ties)
        };
        // dx = gamma * rstd * d (dgamma = dbeta = 0): d = dy where the ReLU is on
        assert_eq!(dx(None), (vec![0.0, 3.0, 0.0, 2.5], 1));
        assert_eq!(dx(Some(false)), (vec![0.0, 3.0, 0.0, 2.5], 1));
        assert_eq!(dx(Some(true)), (vec![2.0, 3.0, 0.0, 2.5], 1));
    }
}
