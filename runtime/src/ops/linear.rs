//! Fully connected layer on the flattened input: `y = x W^T + b`, `x` `[N, in_f]` (any
//! trailing shape with `in_f` elements per sample), `W` `[out_f, in_f]`, `y` `[N, out_f]`.

use super::{gemm, Float, Mat};
use crate::tensor::Tensor;

fn dims<T>(x: &Tensor<T>, in_f: usize) -> usize {
    let n = *x.shape.first().expect("linear: scalar input");
    assert_eq!(x.data.len(), n * in_f, "linear: input features");
    n
}

/// Forward. Output shape `[N, out_f]`.
pub fn linear<T: Float>(x: &Tensor<T>, w: &[T], b: &[T], in_f: usize, out_f: usize) -> Tensor<T> {
    let n = dims(x, in_f);
    assert_eq!(w.len(), out_f * in_f, "linear: weight length");
    assert_eq!(b.len(), out_f, "linear: bias length");
    let mut y = Tensor::zeros(&[n, out_f]);
    for row in y.data.chunks_mut(out_f.max(1)) {
        row.copy_from_slice(b);
    }
    gemm(
        T::ONE,
        Mat::rm(&x.data, n, in_f),
        Mat::rm(w, out_f, in_f).t(),
        T::ONE,
        &mut y.data,
    );
    y
}

/// Backward: `(dx` shaped like `x`, `dW`, `db)`.
pub fn linear_backward<T: Float>(
    x: &Tensor<T>,
    w: &[T],
    dy: &Tensor<T>,
    in_f: usize,
    out_f: usize,
) -> (Tensor<T>, Vec<T>, Vec<T>) {
    let n = dims(x, in_f);
    assert_eq!(dy.data.len(), n * out_f, "linear: gradient shape");
    let mut dx = Tensor::zeros(&x.shape);
    gemm(
        T::ONE,
        Mat::rm(&dy.data, n, out_f),
        Mat::rm(w, out_f, in_f),
        T::ZERO,
        &mut dx.data,
    );
    let mut dw = vec![T::ZERO; out_f * in_f];
    gemm(
        T::ONE,
        Mat::rm(&dy.data, n, out_f).t(),
        Mat::rm(&x.data, n, in_f),
        T::ZERO,
        &mut dw,
    );
    let mut db = vec![T::ZERO; out_f];
    for row in dy.data.chunks(out_f.max(1)) {
        super::add_assign(&mut db, row);
    }
    (dx, dw, db)
}
