//! Pooling: max (padding never wins), average (PyTorch's `count_include_pad=True`: always
//! divides by `k*k`), global average, and the zero-pad shortcut (average-pool by `stride` with
//! `k = stride`, then zero channels appended up to `out_c`).
//!
//! Output sizes are `floor((len + 2 pad - k) / stride) + 1` (no ceil mode).

use rayon::prelude::*;
use wrnc_compiler::graph::Pool;

use super::{nchw, window_out, Float};
use crate::tensor::Tensor;

#[derive(Clone, Copy)]
struct Win {
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    k: usize,
    s: usize,
    pad: usize,
}

impl Win {
    fn new(h: usize, w: usize, p: &Pool) -> Win {
        let (k, s, pad) = (p.k as usize, p.stride as usize, p.pad as usize);
        Win {
            h,
            w,
            oh: window_out(h, k, s, pad).expect("pool: window does not fit"),
            ow: window_out(w, k, s, pad).expect("pool: window does not fit"),
            k,
            s,
            pad,
        }
    }
    /// The in-bounds input rows/cols of output `(oy, ox)`'s window.
    fn ranges(&self, oy: usize, ox: usize) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
        let y0 = (oy * self.s) as isize - self.pad as isize;
        let x0 = (ox * self.s) as isize - self.pad as isize;
        let clip = |a: isize, len: usize| a.clamp(0, len as isize) as usize;
        (
            clip(y0, self.h)..clip(y0 + self.k as isize, self.h),
            clip(x0, self.w)..clip(x0 + self.k as isize, self.w),
        )
    }
    /// Flat in-plane index of the window's maximum (first one in row-major order), if the
    /// window holds any input element.
    fn argmax<T: Float>(&self, plane: &[T], oy: usize, ox: usize) -> Option<usize> {
        let (ys, xs) = self.ranges(oy, ox);
        let mut best: Option<(usize, T)> = None;
        for y in ys {
            for x in xs.clone() {
                let v = plane[y * self.w + x];
                if best.is_none_or(|(_, b)| v > b) {
                    best = Some((y * self.w + x, v));
                }
            }
        }
        best.map(|(i, _)| i)
    }
}

fn planes_out<T: Float>(
    x: &Tensor<T>,
    oh: usize,
    ow: usize,
    f: impl Fn(&[T], &mut [T]) + Sync,
) -> Tensor<T> {
    let [n, c, h, w] = nchw(x);
    let mut y = Tensor::zeros(&[n, c, oh, ow]);
    if oh * ow == 0 || h * w == 0 {
        return y;
    }
    y.data
        .par_chunks_mut(oh * ow)
        .zip(x.data.par_chunks(h * w))
        .for_each(|(o, i)| f(i, o));
    y
}

/// Max pooling forward.
pub fn max_pool<T: Float>(x: &Tensor<T>, p: &Pool) -> Tensor<T> {
    let [_, _, h, w] = nchw(x);
    let win = Win::new(h, w, p);
    planes_out(x, win.oh, win.ow, |i, o| {
        for oy in 0..win.oh {
            for ox in 0..win.ow {
                o[oy * win.ow + ox] = win.argmax(i, oy, ox).map_or(T::ZERO, |a| i[a]);
            }
        }
    })
}

/// Max pooling backward: each output gradient goes to its window's (first) maximum, found
/// again from the input `x`.
pub fn max_pool_backward<T: Float>(x: &Tensor<T>, p: &Pool, dy: &Tensor<T>) -> Tensor<T> {
    let [n, c, h, w] = nchw(x);
    let win = Win::new(h, w, p);
    assert_eq!(dy.shape, [n, c, win.oh, win.ow], "maxpool: gradient shape");
    let mut dx = Tensor::zeros(&x.shape);
    if h * w == 0 || win.oh * win.ow == 0 {
        return dx;
    }
    dx.data
        .par_chunks_mut(h * w)
        .zip(
            x.data
                .par_chunks(h * w)
                .zip(dy.data.par_chunks(win.oh * win.ow)),
        )
        .for_each(|(d, (i, g))| {
            for oy in 0..win.oh {
                for ox in 0..win.ow {
                    if let Some(a) = win.argmax(i, oy, ox) {
                        d[a] += g[oy * win.ow + ox];
                    }
                }
            }
        });
    dx
}

/// Average pooling forward (padding counts as zeros: divides by `k*k`).
pub fn avg_pool<T: Float>(x: &Tensor<T>, p: &Pool) -> Tensor<T> {
    let [_, _, h, w] = nchw(x);
    let win = Win::new(h, w, p);
    let inv = T::ONE / T::from_f64((win.k * win.k) as f64);
    planes_out(x, win.oh, win.ow, |i, o| {
        for oy in 0..win.oh {
            for ox in 0..win.ow {
                let (ys, xs) = win.ranges(oy, ox);
                let mut s = T::ZERO;
                for y in ys {
                    for x in xs.clone() {
                        s += i[y * win.w + x];
                    }
                }
                o[oy * win.ow + ox] = s * inv;
            }
        }
    })
}

/// Average pooling backward.
pub fn avg_pool_backward<T: Float>(x_shape: &[usize], p: &Pool, dy: &Tensor<T>) -> Tensor<T> {
    assert_eq!(x_shape.len(), 4);
    let (n, c, h, w) = (x_shape[0], x_shape[1], x_shape[2], x_shape[3]);
    let win = Win::new(h, w, p);
    assert_eq!(dy.shape, [n, c, win.oh, win.ow], "avgpool: gradient shape");
    let inv = T::ONE / T::from_f64((win.k * win.k) as f64);
    let mut dx = Tensor::zeros(x_shape);
    if h * w == 0 || win.oh * win.ow == 0 {
        return dx;
    }
    dx.data
        .par_chunks_mut(h * w)
        .zip(dy.data.par_chunks(win.oh * win.ow))
        .for_each(|(d, g)| {
            for oy in 0..win.oh {
                for ox in 0..win.ow {
                    let (ys, xs) = win.ranges(oy, ox);
                    let v = g[oy * win.ow + ox] * inv;
                    for y in ys {
                        for x in xs.clone() {
                            d[y * win.w + x] += v;
                        }
                    }
                }
            }
        });
    dx
}

/// Global average pooling: `[N, C, H, W] -> [N, C, 1, 1]`.
pub fn global_avg_pool<T: Float>(x: &Tensor<T>) -> Tensor<T> {
    let [_, _, h, w] = nchw(x);
    let inv = T::ONE / T::from_f64((h * w) as f64);
    planes_out(x, 1, 1, |i, o| o[0] = i.iter().copied().sum::<T>() * inv)
}

/// Global average pooling backward.
pub fn global_avg_pool_backward<T: Float>(x_shape: &[usize], dy: &Tensor<T>) -> Tensor<T> {
    assert_eq!(x_shape.len(), 4);
    let (n, c, h, w) = (x_shape[0], x_shape[1], x_shape[2], x_shape[3]);
    assert_eq!(dy.shape, [n, c, 1, 1], "gap: gradient shape");
    let inv = T::ONE / T::from_f64((h * w) as f64);
    let mut dx = Tensor::zeros(x_shape);
    if h * w == 0 {
        return dx;
    }
    dx.data
        .par_chunks_mut(h * w)
        .zip(dy.data.par_iter())
        .for_each(|(d, &g)| d.fill(g * inv));
    dx
}

fn shortcut_pool(stride: u32) -> Pool {
    Pool {
        k: stride,
        stride,
        pad: 0,
    }
}

/// Zero-pad shortcut: average-pool by `stride` (k = stride), then append zero channels up to
/// `out_c` (`out_c >= C`).
pub fn zero_pad_shortcut<T: Float>(x: &Tensor<T>, out_c: usize, stride: u32) -> Tensor<T> {
    let [n, c, _, _] = nchw(x);
    assert!(out_c >= c, "zeropad: fewer output channels than input");
    let pooled = if stride == 1 {
        x.clone()
    } else {
        avg_pool(x, &shortcut_pool(stride))
    };
    let [_, _, oh, ow] = nchw(&pooled);
    let mut y = Tensor::zeros(&[n, out_c, oh, ow]);
    let (lin, lout) = (c * oh * ow, out_c * oh * ow);
    for i in 0..n {
        y.data[i * lout..i * lout + lin].copy_from_slice(&pooled.data[i * lin..(i + 1) * lin]);
    }
    y
}

/// Zero-pad shortcut backward: drop the padded channels' gradient, then average-pool backward.
pub fn zero_pad_shortcut_backward<T: Float>(
    x_shape: &[usize],
    stride: u32,
    dy: &Tensor<T>,
) -> Tensor<T> {
    assert_eq!(x_shape.len(), 4);
    let [n, out_c, oh, ow] = nchw(dy);
    let c = x_shape[1];
    assert!(out_c >= c && x_shape[0] == n, "zeropad: gradient shape");
    let (lin, lout) = (c * oh * ow, out_c * oh * ow);
    let mut dp = Tensor::zeros(&[n, c, oh, ow]);
    for i in 0..n {
        dp.data[i * lin..(i + 1) * lin].copy_from_slice(&dy.data[i * lout..i * lout + lin]);
    }
    if stride == 1 {
        assert_eq!(dp.shape, x_shape, "zeropad: gradient shape");
        dp
    } else {
        avg_pool_backward(x_shape, &shortcut_pool(stride), &dp)
    }
}
