//! Batch normalisation over (N, H, W) per channel.
//!
//! Training normalises with the batch mean and the biased batch variance and updates the
//! running statistics with the unbiased variance: `running = (1 - momentum) * running +
//! momentum * batch` (PyTorch's `BatchNorm2d`). Inference normalises with the running
//! statistics. Channel sums accumulate in `f64` whatever `T` is.

use rayon::prelude::*;

use super::{nchw, Float};
use crate::tensor::Tensor;

/// What backward needs besides the input: the statistics the forward normalised with.
#[derive(Debug, Clone, PartialEq)]
pub struct BnSaved<T> {
    /// Per-channel mean used to normalise.
    pub mean: Vec<T>,
    /// Per-channel `1 / sqrt(var + eps)` used to normalise.
    pub invstd: Vec<T>,
    /// True when the statistics came from the batch (training), so they depend on `x`.
    pub batch_stats: bool,
}

/// Per-channel `(sum a, sum a*b)` over N, H, W, in f64, in parallel over channels.
fn channel_sums<T: Float>(
    shape: [usize; 4],
    a: &[T],
    f: impl Fn(usize, T, usize) -> (f64, f64) + Sync,
) -> Vec<(f64, f64)> {
    let [n, c, h, w] = shape;
    let hw = h * w;
    (0..c)
        .into_par_iter()
        .map(|ci| {
            let mut s = (0.0, 0.0);
            for ni in 0..n {
                let base = (ni * c + ci) * hw;
                for (j, &v) in a[base..base + hw].iter().enumerate() {
                    let (p, q) = f(ci, v, base + j);
                    s.0 += p;
                    s.1 += q;
                }
            }
            s
        })
        .collect()
}

/// Applies `y = x * scale[c] + shift[c]` plane by plane.
fn affine<T: Float>(x: &Tensor<T>, scale: &[T], shift: &[T]) -> Tensor<T> {
    let [_, c, h, w] = nchw(x);
    let hw = h * w;
    let mut y = Tensor::zeros(&x.shape);
    y.data
        .par_chunks_mut(hw.max(1))
        .zip(x.data.par_chunks(hw.max(1)))
        .enumerate()
        .for_each(|(plane, (yp, xp))| {
            let ci = plane % c;
            for (o, &v) in yp.iter_mut().zip(xp) {
                *o = v * scale[ci] + shift[ci];
            }
        });
    y
}

/// Training forward. Updates `running_mean` / `running_var` in place and returns the output
/// and what backward needs. Requires more than one value per channel (`N*H*W > 1`).
pub fn batch_norm_train<T: Float>(
    x: &Tensor<T>,
    gamma: &[T],
    beta: &[T],
    eps: f32,
    momentum: f32,
    running_mean: &mut [T],
    running_var: &mut [T],
) -> (Tensor<T>, BnSaved<T>) {
    let shape = nchw(x);
    let [n, c, h, w] = shape;
    for s in [gamma, beta, &*running_mean, &*running_var] {
        assert_eq!(s.len(), c, "bn: parameter length");
    }
    let m = n * h * w;
    assert!(m > 1, "bn: training needs more than one value per channel");
    let mf = m as f64;
    let sums = channel_sums(shape, &x.data, |_, v, _| (v.to_f64(), 0.0));
    let mean: Vec<f64> = sums.iter().map(|s| s.0 / mf).collect();
    let var = channel_sums(shape, &x.data, |ci, v, _| {
        let d = v.to_f64() - mean[ci];
        (d * d, 0.0)
    });
    let var: Vec<f64> = var.iter().map(|s| s.0 / mf).collect();
    let invstd: Vec<f64> = var.iter().map(|&v| 1.0 / (v + eps as f64).sqrt()).collect();
    let mom = momentum as f64;
    for ci in 0..c {
        let unbiased = var[ci] * mf / (mf - 1.0);
        running_mean[ci] = T::from_f64((1.0 - mom) * running_mean[ci].to_f64() + mom * mean[ci]);
        running_var[ci] = T::from_f64((1.0 - mom) * running_var[ci].to_f64() + mom * unbiased);
    }
    let saved = BnSaved {
        mean: mean.iter().map(|&v| T::from_f64(v)).collect(),
        invstd: invstd.iter().map(|&v| T::from_f64(v)).collect(),
        batch_stats: true,
    };
    (normalise(x, gamma, beta, &saved), saved)
}

/// Inference forward with the running statistics.
pub fn batch_norm_eval<T: Float>(
    x: &Tensor<T>,
    gamma: &[T],
    beta: &[T],
    eps: f32,
    running_mean: &[T],
    running_var: &[T],
) -> (Tensor<T>, BnSaved<T>) {
    let [_, c, _, _] = nchw(x);
    for s in [gamma, beta, running_mean, running_var] {
        assert_eq!(s.len(), c, "bn: parameter length");
    }
    let saved = BnSaved {
        mean: running_mean.to_vec(),
        invstd: running_var
            .iter()
            .map(|&v| T::from_f64(1.0 / (v.to_f64() + eps as f64).sqrt()))
            .collect(),
        batch_stats: false,
    };
    (normalise(x, gamma, beta, &saved), saved)
}

fn normalise<T: Float>(x: &Tensor<T>, gamma: &[T], beta: &[T], s: &BnSaved<T>) -> Tensor<T> {
    let scale: Vec<T> = (0..gamma.len()).map(|c| gamma[c] * s.invstd[c]).collect();
    let shift: Vec<T> = (0..gamma.len())
        .map(|c| beta[c] - s.mean[c] * scale[c])
        .collect();
    affine(x, &scale, &shift)
}

/// Gradients of batch norm: `(dx, dgamma, dbeta)`.
pub fn batch_norm_backward<T: Float>(
    x: &Tensor<T>,
    gamma: &[T],
    saved: &BnSaved<T>,
    dy: &Tensor<T>,
) -> (Tensor<T>, Vec<T>, Vec<T>) {
    let shape = nchw(x);
    let [n, c, h, w] = shape;
    assert_eq!(dy.shape, x.shape, "bn: gradient shape");
    let hw = h * w;
    let mf = (n * hw) as f64;
    let (mean, invstd) = (&saved.mean, &saved.invstd);
    // (sum dy, sum dy * xhat) per channel.
    let sums = channel_sums(shape, &dy.data, |ci, g, idx| {
        let xhat = (x.data[idx].to_f64() - mean[ci].to_f64()) * invstd[ci].to_f64();
        (g.to_f64(), g.to_f64() * xhat)
    });
    let dbeta: Vec<T> = sums.iter().map(|s| T::from_f64(s.0)).collect();
    let dgamma: Vec<T> = sums.iter().map(|s| T::from_f64(s.1)).collect();
    let mut dx = Tensor::zeros(&x.shape);
    dx.data
        .par_chunks_mut(hw.max(1))
        .enumerate()
        .for_each(|(plane, out)| {
            let ci = plane % c;
            let base = plane * hw;
            let k = gamma[ci].to_f64() * invstd[ci].to_f64();
            if saved.batch_stats {
                let (sdy, sdyx) = (sums[ci].0 / mf, sums[ci].1 / mf);
                for (j, o) in out.iter_mut().enumerate() {
                    let xhat =
                        (x.data[base + j].to_f64() - mean[ci].to_f64()) * invstd[ci].to_f64();
                    let g = dy.data[base + j].to_f64();
                    *o = T::from_f64(k * (g - sdy - xhat * sdyx));
                }
            } else {
                let k = T::from_f64(k);
                for (j, o) in out.iter_mut().enumerate() {
                    *o = dy.data[base + j] * k;
                }
            }
        });
    (dx, dgamma, dbeta)
}
