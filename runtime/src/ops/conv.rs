//! 2-D convolution (any kernel, stride, padding, groups, optional bias) as im2col + GEMM, with
//! a direct GEMM (no im2col) for 1x1 stride-1 unpadded convolutions. Grouped convolution is one
//! GEMM per group. Backward: the data gradient is `W^T dY` followed by col2im, the weight
//! gradient `dY col^T` summed over the batch in a fixed order.

use rayon::prelude::*;
use wrnc_compiler::graph::Conv2d;

use super::{gemm, nchw, partitions, window_out, Float, Mat, REDUCE_PARTS};
use crate::tensor::Tensor;

/// Sizes of one convolution applied to one batch.
#[derive(Debug, Clone, Copy)]
struct Geom {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    oc: usize,
    oh: usize,
    ow: usize,
    k: usize,
    stride: usize,
    pad: usize,
    groups: usize,
    /// Input channels per group.
    cg: usize,
    /// Output channels per group.
    ocg: usize,
}

impl Geom {
    fn new(x: [usize; 4], p: &Conv2d) -> Geom {
        let [n, c, h, w] = x;
        assert_eq!(c, p.in_c as usize, "conv: input channels");
        let groups = p.groups as usize;
        assert!(
            groups >= 1 && c.is_multiple_of(groups) && (p.out_c as usize).is_multiple_of(groups)
        );
        let (k, stride, pad) = (p.k as usize, p.stride as usize, p.pad as usize);
        let oh = window_out(h, k, stride, pad).expect("conv: window does not fit");
        let ow = window_out(w, k, stride, pad).expect("conv: window does not fit");
        Geom {
            n,
            c,
            h,
            w,
            oc: p.out_c as usize,
            oh,
            ow,
            k,
            stride,
            pad,
            groups,
            cg: c / groups,
            ocg: p.out_c as usize / groups,
        }
    }
    /// Output pixels per image.
    fn p(&self) -> usize {
        self.oh * self.ow
    }
    /// Rows of the column matrix (and columns of a group's weight matrix).
    fn kk(&self) -> usize {
        self.cg * self.k * self.k
    }
    /// 1x1, stride 1, no padding: the input plane is already the column matrix.
    fn direct(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.pad == 0
    }
    fn weight_len(&self) -> usize {
        self.oc * self.kk()
    }
}

/// The output columns `ox` whose input column `ox * s + kx - pad` lies inside `0..w`, and the
/// input column of the first of them.
#[inline]
fn valid_cols(g: &Geom, kx: usize) -> (usize, usize, usize) {
    let (s, pad) = (g.stride, g.pad);
    // first ox with ox * s + kx >= pad
    let lo = if kx >= pad { 0 } else { (pad - kx).div_ceil(s) };
    // one past the last ox with ox * s + kx < w + pad
    let hi = if g.w + pad > kx {
        (g.w + pad - kx).div_ceil(s)
    } else {
        0
    };
    let (lo, hi) = (lo.min(g.ow), hi.min(g.ow));
    let hi = hi.max(lo);
    (lo, hi, (lo * s + kx).saturating_sub(pad))
}

/// Writes the column matrix `[cg*k*k, oh*ow]` of channels `c0..c0+cg` of one image.
fn im2col<T: Float>(g: &Geom, img: &[T], c0: usize, col: &mut [T]) {
    let (k, s, pad, oh, ow) = (g.k, g.stride, g.pad, g.oh, g.ow);
    let mut r = 0;
    for ci in 0..g.cg {
        let plane = &img[(c0 + ci) * g.h * g.w..(c0 + ci + 1) * g.h * g.w];
        for ky in 0..k {
            for kx in 0..k {
                let (lo, hi, ix0) = valid_cols(g, kx);
                let row = &mut col[r * oh * ow..(r + 1) * oh * ow];
                for oy in 0..oh {
                    let out = &mut row[oy * ow..(oy + 1) * ow];
                    let iy = (oy * s + ky) as isize - pad as isize;
                    if iy < 0 || iy >= g.h as isize {
                        out.fill(T::ZERO);
                        continue;
                    }
                    let src = &plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                    out[..lo].fill(T::ZERO);
                    out[hi..].fill(T::ZERO);
                    let n = hi - lo;
                    if s == 1 {
                        out[lo..hi].copy_from_slice(&src[ix0..ix0 + n]);
                    } else {
                        for (o, &v) in out[lo..hi].iter_mut().zip(src[ix0..].iter().step_by(s)) {
                            *o = v;
                        }
                    }
                }
                r += 1;
            }
        }
    }
}

/// Adds the column matrix back into channels `c0..c0+cg` of one image (the adjoint of
/// [`im2col`]).
fn col2im<T: Float>(g: &Geom, col: &[T], c0: usize, img: &mut [T]) {
    let (k, s, pad, oh, ow) = (g.k, g.stride, g.pad, g.oh, g.ow);
    let mut r = 0;
    for ci in 0..g.cg {
        let plane = &mut img[(c0 + ci) * g.h * g.w..(c0 + ci + 1) * g.h * g.w];
        for ky in 0..k {
            for kx in 0..k {
                let (lo, hi, ix0) = valid_cols(g, kx);
                let row = &col[r * oh * ow..(r + 1) * oh * ow];
                for oy in 0..oh {
                    let iy = (oy * s + ky) as isize - pad as isize;
                    if iy < 0 || iy >= g.h as isize {
                        continue;
                    }
                    let dst = &mut plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                    let src = &row[oy * ow + lo..oy * ow + hi];
                    if s == 1 {
                        super::add_assign(&mut dst[ix0..ix0 + src.len()], src);
                    } else {
                        for (d, &v) in dst[ix0..].iter_mut().step_by(s).zip(src) {
                            *d += v;
                        }
                    }
                }
                r += 1;
            }
        }
    }
}

/// Forward: `y[n, o] = sum_{i in group(o)} w[o, i] * x[n, i] (+ b[o])`.
/// `w` is OIHW `[out_c, in_c/groups, k, k]`, `b` has `out_c` entries.
pub fn conv2d_forward<T: Float>(x: &Tensor<T>, p: &Conv2d, w: &[T], b: Option<&[T]>) -> Tensor<T> {
    let g = Geom::new(nchw(x), p);
    assert_eq!(w.len(), g.weight_len(), "conv: weight length");
    if let Some(b) = b {
        assert_eq!(b.len(), g.oc, "conv: bias length");
    }
    let (pp, kk) = (g.p(), g.kk());
    let mut y = Tensor::zeros(&[g.n, g.oc, g.oh, g.ow]);
    let col_len = if g.direct() { 0 } else { kk * pp };
    y.data.par_chunks_mut(g.oc * pp).enumerate().for_each_init(
        || vec![T::ZERO; col_len],
        |col, (n, out)| {
            let img = &x.data[n * g.c * g.h * g.w..(n + 1) * g.c * g.h * g.w];
            for gi in 0..g.groups {
                let wg = Mat::rm(&w[gi * g.ocg * kk..(gi + 1) * g.ocg * kk], g.ocg, kk);
                let cols = if g.direct() {
                    Mat::rm(&img[gi * g.cg * pp..(gi + 1) * g.cg * pp], kk, pp)
                } else {
                    im2col(&g, img, gi * g.cg, col);
                    Mat::rm(col, kk, pp)
                };
                let out_g = &mut out[gi * g.ocg * pp..(gi + 1) * g.ocg * pp];
                gemm(T::ONE, wg, cols, T::ZERO, out_g);
            }
            if let Some(b) = b {
                for (o, plane) in out.chunks_mut(pp).enumerate() {
                    for v in plane {
                        *v += b[o];
                    }
                }
            }
        },
    );
    y
}

/// Gradients of a convolution.
#[derive(Debug, Clone)]
pub struct ConvGrads<T> {
    /// `dL/dx`, when requested.
    pub dx: Option<Tensor<T>>,
    /// `dL/dw`, OIHW like the weight.
    pub dw: Vec<T>,
    /// `dL/db`, when the convolution has a bias.
    pub db: Option<Vec<T>>,
}

/// Backward of [`conv2d_forward`] given its input `x` and the output gradient `dy`.
/// `need_dx = false` skips the data gradient (the first layer's input).
pub fn conv2d_backward<T: Float>(
    x: &Tensor<T>,
    p: &Conv2d,
    w: &[T],
    dy: &Tensor<T>,
    need_dx: bool,
) -> ConvGrads<T> {
    let g = Geom::new(nchw(x), p);
    assert_eq!(w.len(), g.weight_len(), "conv: weight length");
    assert_eq!(
        dy.shape,
        [g.n, g.oc, g.oh, g.ow],
        "conv: output gradient shape"
    );
    let (pp, kk) = (g.p(), g.kk());
    let img_len = g.c * g.h * g.w;
    let mut dx = if need_dx {
        Some(Tensor::zeros(&x.shape))
    } else {
        None
    };
    // Fixed partition of the batch; each part accumulates its own weight gradient.
    let parts = partitions(g.n, REDUCE_PARTS);
    let mut dx_parts: Vec<Option<&mut [T]>> = Vec::with_capacity(parts.len());
    match dx.as_mut() {
        Some(dx) => {
            let mut rest: &mut [T] = &mut dx.data;
            for r in &parts {
                let (head, tail) = rest.split_at_mut(r.len() * img_len);
                dx_parts.push(Some(head));
                rest = tail;
            }
        }
        None => dx_parts.extend(parts.iter().map(|_| None)),
    }
    let partial: Vec<(Vec<T>, Vec<T>)> = parts
        .par_iter()
        .zip(dx_parts.into_par_iter())
        .map(|(range, mut dx_part)| {
            let mut dw = vec![T::ZERO; g.weight_len()];
            let mut db = vec![T::ZERO; if p.bias { g.oc } else { 0 }];
            let scratch = if g.direct() { 0 } else { kk * pp };
            let mut col = vec![T::ZERO; scratch];
            let mut dcol = vec![T::ZERO; if need_dx { scratch } else { 0 }];
            for (local, n) in range.clone().enumerate() {
                let img = &x.data[n * img_len..(n + 1) * img_len];
                let dyn_ = &dy.data[n * g.oc * pp..(n + 1) * g.oc * pp];
                for gi in 0..g.groups {
                    let dy_g = Mat::rm(&dyn_[gi * g.ocg * pp..(gi + 1) * g.ocg * pp], g.ocg, pp);
                    let cols = if g.direct() {
                        Mat::rm(&img[gi * g.cg * pp..(gi + 1) * g.cg * pp], kk, pp)
                    } else {
                        im2col(&g, img, gi * g.cg, &mut col);
                        Mat::rm(&col, kk, pp)
                    };
                    let dw_g = &mut dw[gi * g.ocg * kk..(gi + 1) * g.ocg * kk];
                    gemm(T::ONE, dy_g, cols.t(), T::ONE, dw_g);
                    if let Some(dx_part) = dx_part.as_deref_mut() {
                        let dx_img = &mut dx_part[local * img_len..(local + 1) * img_len];
                        let wg_t =
                            Mat::rm(&w[gi * g.ocg * kk..(gi + 1) * g.ocg * kk], g.ocg, kk).t();
                        if g.direct() {
                            let dst = &mut dx_img[gi * g.cg * pp..(gi + 1) * g.cg * pp];
                            gemm(T::ONE, wg_t, dy_g, T::ZERO, dst);
                        } else {
                            gemm(T::ONE, wg_t, dy_g, T::ZERO, &mut dcol);
                            col2im(&g, &dcol, gi * g.cg, dx_img);
                        }
                    }
                }
                for (o, acc) in db.iter_mut().enumerate() {
                    *acc += dyn_[o * pp..(o + 1) * pp].iter().copied().sum::<T>();
                }
            }
            (dw, db)
        })
        .collect();
    let mut dw = vec![T::ZERO; g.weight_len()];
    let mut db = vec![T::ZERO; if p.bias { g.oc } else { 0 }];
    for (pdw, pdb) in &partial {
        super::add_assign(&mut dw, pdw);
        super::add_assign(&mut db, pdb);
    }
    ConvGrads {
        dx,
        dw,
        db: p.bias.then_some(db),
    }
}

/// The GEMM shapes `(m, k, n)` one image of this convolution runs, per group, in forward,
/// backward-data and backward-weight order (for benchmarks comparing against raw GEMM rates).
pub fn gemm_shapes(p: &Conv2d, h: usize, w: usize) -> Option<[(usize, usize, usize); 3]> {
    let (k, s, pad) = (p.k as usize, p.stride as usize, p.pad as usize);
    let oh = window_out(h, k, s, pad)?;
    let ow = window_out(w, k, s, pad)?;
    let g = p.groups.max(1) as usize;
    let (ocg, kk, pp) = (p.out_c as usize / g, p.in_c as usize / g * k * k, oh * ow);
    Some([(ocg, kk, pp), (kk, ocg, pp), (ocg, pp, kk)])
}
