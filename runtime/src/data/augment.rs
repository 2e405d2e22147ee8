//! Batching with the standard CIFAR augmentation, and the epoch shuffle.
//!
//! All randomness comes from [`wrnc_compiler::rng::bits`], so it is a pure function of the
//! seed: the same `(seed, indices)` always give the same batch, on any machine and however the
//! work is split across threads.

use rayon::prelude::*;
use wrnc_compiler::rng;

use super::{Dataset, DatasetKind};
use crate::Tensor;

/// Zero padding on each side before the random crop.
pub const PAD_PIXELS: usize = 4;

/// Per-channel normalisation `(x / 255 - mean[c]) / std[c]`.
///
/// Invariant: `mean.len() == std.len()`, equal to the images' channel count, and every `std`
/// is positive.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Normalization {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Normalization {
    /// The usual constants: CIFAR-10 and CIFAR-100 mean/std of the training set (as used by
    /// the Wide ResNet reference code), ImageNet's, and for SVHN `x / 255` only.
    pub fn for_dataset(kind: DatasetKind) -> Normalization {
        let per255 = |v: [f32; 3]| v.iter().map(|x| x / 255.0).collect::<Vec<_>>();
        match kind {
            DatasetKind::Cifar10 => Normalization {
                mean: per255([125.3, 123.0, 113.9]),
                std: per255([63.0, 62.1, 66.7]),
            },
            DatasetKind::Cifar100 => Normalization {
                mean: per255([129.3, 124.1, 112.4]),
                std: per255([68.2, 65.4, 70.4]),
            },
            DatasetKind::Svhn => Normalization::identity(3),
            DatasetKind::Imagenet => Normalization {
                mean: vec![0.485, 0.456, 0.406],
                std: vec![0.229, 0.224, 0.225],
            },
        }
    }

    /// `x / 255` only.
    pub fn identity(channels: usize) -> Normalization {
        Normalization {
            mean: vec![0.0; channels],
            std: vec![1.0; channels],
        }
    }

    /// Mean and standard deviation per channel measured on `ds` (in `[0, 1]` units). A
    /// channel with no spread (std below 1e-6) gets std 1.
    pub fn from_data(ds: &Dataset) -> Normalization {
        let plane = ds.h * ds.w;
        let mut mean = Vec::with_capacity(ds.c);
        let mut std = Vec::with_capacity(ds.c);
        for ch in 0..ds.c {
            let (mut s, mut s2, mut cnt) = (0f64, 0f64, 0f64);
            for i in 0..ds.n {
                for &p in &ds.image(i)[ch * plane..(ch + 1) * plane] {
                    let x = p as f64 / 255.0;
                    s += x;
                    s2 += x * x;
                    cnt += 1.0;
                }
            }
            let m = if cnt > 0.0 { s / cnt } else { 0.0 };
            let var = if cnt > 0.0 {
                (s2 / cnt - m * m).max(0.0)
            } else {
                0.0
            };
            mean.push(m as f32);
            // Below 1e-6 (a fraction of one grey level) the spread is rounding noise.
            let sd = var.sqrt();
            std.push(if sd > 1e-6 { sd as f32 } else { 1.0 });
        }
        Normalization { mean, std }
    }
}

/// The `rng_seed` of [`make_batch`] for a run seed and an epoch: the epoch goes in the high
/// 32 bits, so each epoch draws new crops and flips.
pub fn augment_seed(run_seed: u32, epoch: u32) -> u64 {
    ((epoch as u64) << 32) | run_seed as u64
}

/// Builds a batch: `(N x C x H x W f32, labels)` for the images `indices` of `ds`.
///
/// With `augment`, each image is zero-padded by [`PAD_PIXELS`] pixels on every side (pixel value 0,
/// before normalisation, as torchvision's `RandomCrop(32, padding=4)`), cropped back to
/// `H x W` at a random offset, and flipped horizontally with probability 1/2. Then every pixel
/// becomes `(x / 255 - mean[c]) / std[c]`.
///
/// The crop and flip of an image depend only on `rng_seed` (low 32 bits: seed, high 32 bits:
/// step, see [`augment_seed`]) and the image's index in `ds`, not on its place in the batch.
///
/// Panics if an index is `>= ds.n` or `norm` does not have `ds.c` channels: both come from the
/// program (e.g. [`shuffle`]), not from the user.
pub fn make_batch(
    ds: &Dataset,
    indices: &[usize],
    augment: bool,
    rng_seed: u64,
    norm: &Normalization,
) -> (Tensor, Vec<u16>) {
    assert!(
        norm.mean.len() == ds.c && norm.std.len() == ds.c,
        "normalisation has {} means and {} stds for {} channels",
        norm.mean.len(),
        norm.std.len(),
        ds.c
    );
    if let Some(&bad) = indices.iter().find(|&&i| i >= ds.n) {
        panic!("image index {bad} out of range for a data set of {}", ds.n);
    }
    let (c, h, w) = (ds.c, ds.h, ds.w);
    let per = c * h * w;
    let seed = rng_seed as u32;
    let step = (rng_seed >> 32) as u32;
    let stream = rng::stream_id("data.augment");
    // Lookup tables: x/255 normalised, per channel.
    let lut: Vec<[f32; 256]> = (0..c)
        .map(|ch| {
            let mut t = [0f32; 256];
            for (v, slot) in t.iter_mut().enumerate() {
                *slot = (v as f32 / 255.0 - norm.mean[ch]) / norm.std[ch];
            }
            t
        })
        .collect();
    let mut data = vec![0f32; indices.len() * per];
    data.par_chunks_mut(per.max(1))
        .zip(indices.par_iter())
        .for_each(|(out, &idx)| {
            let img = ds.image(idx);
            let (dy, dx, flip) = if augment {
                let r = rng::bits(seed, stream, step, idx as u32);
                let span = (2 * PAD_PIXELS + 1) as u32;
                let dy = (r % span) as isize - PAD_PIXELS as isize;
                let dx = ((r / span) % span) as isize - PAD_PIXELS as isize;
                (dy, dx, (r >> 31) & 1 == 1)
            } else {
                (0, 0, false)
            };
            for ch in 0..c {
                let t = &lut[ch];
                let src = &img[ch * h * w..(ch + 1) * h * w];
                let dst = &mut out[ch * h * w..(ch + 1) * h * w];
                for y in 0..h {
                    let sy = y as isize + dy;
                    for x in 0..w {
                        let xx = if flip { w - 1 - x } else { x };
                        let sx = xx as isize + dx;
                        let v = if sy >= 0 && (sy as usize) < h && sx >= 0 && (sx as usize) < w {
                            src[sy as usize * w + sx as usize]
                        } else {
                            0
                        };
                        dst[y * w + x] = t[v as usize];
                    }
                }
            }
        });
    let labels = indices.iter().map(|&i| ds.labels[i]).collect();
    (Tensor::from_vec(&[indices.len(), c, h, w], data), labels)
}

/// A permutation of `0..n` for one epoch: Fisher-Yates driven by the counter-based generator,
/// a pure function of `(n, seed, epoch)`.
pub fn shuffle(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    let stream = rng::stream_id("data.shuffle") ^ (seed >> 32) as u32;
    let s = seed as u32 ^ (epoch >> 32) as u32;
    for i in (1..n).rev() {
        let r = rng::bits(s, stream, epoch as u32, i as u32) as u64;
        // Unbiased enough for n < 2^32: multiply-shift into 0..=i.
        let j = ((r * (i as u64 + 1)) >> 32) as usize;
        p.swap(i, j);
    }
    p
}
