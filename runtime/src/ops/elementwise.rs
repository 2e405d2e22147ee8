//! Elementwise and channel-shuffling ops: ReLU, dropout, DropPath, Add, Concat.
//!
//! Dropout and DropPath masks come from [`wrnc_compiler::rng::keep`]; backward regenerates the
//! mask from the same `(seed, stream, step)` instead of storing it. The mask index is the flat
//! element index within the batch (dropout) or the sample index (DropPath), as `u32`
//! (wrapping past 2^32 elements, like the CUDA kernels).

use rayon::prelude::*;
use wrnc_compiler::rng;

use super::{nchw, Float, CHUNK};
use crate::tensor::Tensor;

/// `y = max(x, 0)`.
pub fn relu<T: Float>(x: &Tensor<T>) -> Tensor<T> {
    let mut y = Tensor::zeros(&x.shape);
    y.data
        .par_chunks_mut(CHUNK)
        .zip(x.data.par_chunks(CHUNK))
        .for_each(|(o, i)| {
            for (o, &v) in o.iter_mut().zip(i) {
                *o = if v > T::ZERO { v } else { T::ZERO };
            }
        });
    y
}

/// ReLU backward from its output: `dx = dy * [y > 0]` (the subgradient at 0 is 0).
pub fn relu_backward<T: Float>(y: &Tensor<T>, dy: &Tensor<T>) -> Tensor<T> {
    assert_eq!(y.shape, dy.shape, "relu: gradient shape");
    let mut dx = Tensor::zeros(&y.shape);
    dx.data
        .par_chunks_mut(CHUNK)
        .zip(y.data.par_chunks(CHUNK).zip(dy.data.par_chunks(CHUNK)))
        .for_each(|(o, (y, g))| {
            for ((o, &y), &g) in o.iter_mut().zip(y).zip(g) {
                *o = if y > T::ZERO { g } else { T::ZERO };
            }
        });
    dx
}

/// The random source of a dropout-like op in one training step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaskKey {
    pub seed: u32,
    /// [`rng::stream_id`] of the node name.
    pub stream: u32,
    pub step: u32,
}

/// Inverted dropout with drop probability `p`: `x * m / (1 - p)`, `m` per element. The same
/// call computes the backward (`dy * m / (1 - p)`), since the op is linear with a fixed mask.
/// `p >= 1` drops everything.
pub fn dropout<T: Float>(x: &Tensor<T>, p: f32, key: MaskKey) -> Tensor<T> {
    let keep = 1.0f32 - p;
    let mut y = Tensor::zeros(&x.shape);
    if keep <= 0.0 {
        return y;
    }
    let scale = T::ONE / T::from_f64(keep as f64);
    y.data
        .par_chunks_mut(CHUNK)
        .zip(x.data.par_chunks(CHUNK))
        .enumerate()
        .for_each(|(ci, (o, i))| {
            for (j, (o, &v)) in o.iter_mut().zip(i).enumerate() {
                let idx = (ci * CHUNK + j) as u32;
                if rng::keep(key.seed, key.stream, key.step, idx, keep) {
                    *o = v * scale;
                }
            }
        });
    y
}

/// Stochastic depth with survival probability `s`: sample `n` is scaled by `m[n] / s`.
/// Forward and backward are the same call (see [`dropout`]). `s <= 0` drops everything.
pub fn drop_path<T: Float>(x: &Tensor<T>, survival: f32, key: MaskKey) -> Tensor<T> {
    let [n, ..] = nchw(x);
    let mut y = Tensor::zeros(&x.shape);
    if survival <= 0.0 || n == 0 {
        return y;
    }
    let per = x.data.len() / n;
    let scale = T::ONE / T::from_f64(survival as f64);
    y.data
        .par_chunks_mut(per.max(1))
        .zip(x.data.par_chunks(per.max(1)))
        .enumerate()
        .for_each(|(s, (o, i))| {
            if rng::keep(key.seed, key.stream, key.step, s as u32, survival) {
                for (o, &v) in o.iter_mut().zip(i) {
                    *o = v * scale;
                }
            }
        });
    y
}

/// `a + b` (same shapes).
pub fn add<T: Float>(a: &Tensor<T>, b: &Tensor<T>) -> Tensor<T> {
    assert_eq!(a.shape, b.shape, "add: operand shapes differ");
    let mut y = a.clone();
    y.data
        .par_chunks_mut(CHUNK)
        .zip(b.data.par_chunks(CHUNK))
        .for_each(|(o, b)| super::add_assign(o, b));
    y
}

/// Channel concatenation of `a` then `b` (same N, H, W).
pub fn concat<T: Float>(a: &Tensor<T>, b: &Tensor<T>) -> Tensor<T> {
    let [n, ca, h, w] = nchw(a);
    let [nb, cb, hb, wb] = nchw(b);
    assert_eq!((n, h, w), (nb, hb, wb), "concat: operand shapes differ");
    let (la, lb) = (ca * h * w, cb * h * w);
    let mut y = Tensor::zeros(&[n, ca + cb, h, w]);
    if la + lb == 0 {
        return y;
    }
    y.data
        .par_chunks_mut(la + lb)
        .enumerate()
        .for_each(|(i, o)| {
            o[..la].copy_from_slice(&a.data[i * la..(i + 1) * la]);
            o[la..].copy_from_slice(&b.data[i * lb..(i + 1) * lb]);
        });
    y
}

/// Splits a concatenation's gradient into the operands' (`ca` channels first).
pub fn concat_backward<T: Float>(dy: &Tensor<T>, ca: usize) -> (Tensor<T>, Tensor<T>) {
    let [n, c, h, w] = nchw(dy);
    assert!(ca <= c, "concat: split past the channels");
    let cb = c - ca;
    let (la, lb) = (ca * h * w, cb * h * w);
    let mut da = Tensor::zeros(&[n, ca, h, w]);
    let mut db = Tensor::zeros(&[n, cb, h, w]);
    for i in 0..n {
        let src = &dy.data[i * (la + lb)..(i + 1) * (la + lb)];
        da.data[i * la..(i + 1) * la].copy_from_slice(&src[..la]);
        db.data[i * lb..(i + 1) * lb].copy_from_slice(&src[la..]);
    }
    (da, db)
}
