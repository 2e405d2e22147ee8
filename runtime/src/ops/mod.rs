//! CPU reference kernels for every [`wrnc_compiler::graph::Op`], forward and backward, NCHW.
//!
//! Every kernel is generic over [`Float`] (implemented for `f32` and `f64`), so the
//! finite-difference gradient checks run in `f64` through exactly the code that trains in
//! `f32`.
//!
//! Conventions shared by every kernel:
//! - Activations are [`Tensor`]s of shape `[N, C, H, W]` (row-major). The kernels check their
//!   shape arguments with `assert!`: shapes are validated once by the executor
//!   ([`crate::cpu::Model::new`] checks the graph, `forward` the input), so a failing assert
//!   here is a bug in the caller, never a user error.
//! - Every matrix product goes through [`gemm`] (the `matrixmultiply` crate); there are no
//!   hand-written GEMM loops.
//! - Work is parallelised with rayon over independent images, planes or channels. Reductions
//!   over the batch (weight gradients) use a fixed chunking that does not depend on the number
//!   of threads, so results are bit-for-bit deterministic.

pub mod conv;
pub mod elementwise;
pub mod linear;
pub mod norm;
pub mod pool;

use crate::tensor::Tensor;

/// The float types the CPU backend computes in.
pub trait Float:
    Copy
    + Default
    + Send
    + Sync
    + PartialOrd
    + std::fmt::Debug
    + std::fmt::Display
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
    + std::ops::AddAssign
    + std::ops::SubAssign
    + std::ops::MulAssign
    + std::iter::Sum
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INFINITY: Self;
    /// Short name for messages (`f32`, `f64`).
    const NAME: &'static str;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    fn sqrt(self) -> Self;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    /// `C <- alpha * A B + beta * C` on raw strided matrices (see [`gemm`], the safe entry).
    ///
    /// # Safety
    /// The pointers and strides must describe in-bounds matrices; C must not alias A or B and
    /// its strides must not make elements alias. `beta == 0` means C is not read.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    );
}

macro_rules! impl_float {
    ($t:ty, $gemm:path) => {
        impl Float for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
            const NAME: &'static str = stringify!($t);
            #[inline]
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            #[inline]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline]
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            #[inline]
            unsafe fn gemm_raw(
                m: usize,
                k: usize,
                n: usize,
                alpha: Self,
                a: *const Self,
                rsa: isize,
                csa: isize,
                b: *const Self,
                rsb: isize,
                csb: isize,
                beta: Self,
                c: *mut Self,
                rsc: isize,
                csc: isize,
            ) {
                $gemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
            }
        }
    };
}

impl_float!(f32, matrixmultiply::sgemm);
impl_float!(f64, matrixmultiply::dgemm);

/// A read-only strided matrix view: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct Mat<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// A row-major `rows x cols` matrix.
    pub fn rm(data: &'a [T], rows: usize, cols: usize) -> Self {
        Mat {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }
    /// The transpose (a view; no copy).
    pub fn t(self) -> Self {
        Mat {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// Highest index a strided view touches, plus one (0 for an empty view).
fn extent(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

/// `C <- alpha * A B + beta * C`, with C a row-major `a.rows x b.cols` matrix in `c`.
/// `beta == 0` overwrites C without reading it.
///
/// Panics if the shapes disagree or a view reaches past its slice (caller bugs).
pub fn gemm<T: Float>(alpha: T, a: Mat<T>, b: Mat<T>, beta: T, c: &mut [T]) {
    assert_eq!(a.cols, b.rows, "gemm: inner dimensions differ");
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(
        extent(m, k, a.rs, a.cs) <= a.data.len(),
        "gemm: A out of bounds"
    );
    assert!(
        extent(k, n, b.rs, b.cs) <= b.data.len(),
        "gemm: B out of bounds"
    );
    assert!(m * n <= c.len(), "gemm: C out of bounds");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        // matrixmultiply handles k == 0, but be explicit: C <- beta * C.
        for v in &mut c[..m * n] {
            *v = if beta == T::ZERO { T::ZERO } else { beta * *v };
        }
        return;
    }
    // SAFETY: the asserts above keep every access in bounds; `c` is a distinct &mut slice,
    // so it cannot alias `a` or `b`; row-major C strides (n, 1) never alias.
    unsafe {
        T::gemm_raw(
            m,
            k,
            n,
            alpha,
            a.data.as_ptr(),
            a.rs as isize,
            a.cs as isize,
            b.data.as_ptr(),
            b.rs as isize,
            b.cs as isize,
            beta,
            c.as_mut_ptr(),
            n as isize,
            1,
        )
    }
}

/// `[N, C, H, W]` of an activation tensor.
pub fn nchw<T>(t: &Tensor<T>) -> [usize; 4] {
    assert_eq!(
        t.shape.len(),
        4,
        "expected an NCHW tensor, got {:?}",
        t.shape
    );
    [t.shape[0], t.shape[1], t.shape[2], t.shape[3]]
}

/// Output length of a window op: `floor((len + 2 pad - k) / stride) + 1`, or `None` when the
/// window does not fit or `stride == 0`.
pub fn window_out(len: usize, k: usize, stride: usize, pad: usize) -> Option<usize> {
    if stride == 0 || k == 0 {
        return None;
    }
    let padded = len.checked_add(pad.checked_mul(2)?)?;
    if padded < k {
        return None;
    }
    Some((padded - k) / stride + 1)
}

/// Elements per parallel task for elementwise kernels.
pub(crate) const CHUNK: usize = 1 << 14;

/// Number of fixed partitions of the batch for weight-gradient reductions (independent of the
/// thread count, so sums are deterministic).
pub(crate) const REDUCE_PARTS: usize = 8;

/// Splits `0..n` into at most `parts` contiguous ranges of near-equal length (fixed, so the
/// summation order never depends on the thread pool).
pub(crate) fn partitions(n: usize, parts: usize) -> Vec<std::ops::Range<usize>> {
    let parts = parts.clamp(1, n.max(1));
    let base = n / parts;
    let extra = n % parts;
    let mut v = Vec::with_capacity(parts);
    let mut start = 0;
    for p in 0..parts {
        let len = base + usize::from(p < extra);
        v.push(start..start + len);
        start += len;
    }
    v
}

/// `dst += src`, elementwise.
pub fn add_assign<T: Float>(dst: &mut [T], src: &[T]) {
    assert_eq!(dst.len(), src.len());
    for (d, &s) in dst.iter_mut().zip(src) {
        *d += s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_transposed_views() {
        // A = [[1,2,3],[4,5,6]] (2x3), B = A^T (3x2): A A^T = [[14,32],[32,77]].
        let a = [1.0f64, 2.0, 3.0, 4.0, 5.0, 6.0];
        let mut c = [0.0; 4];
        gemm(1.0, Mat::rm(&a, 2, 3), Mat::rm(&a, 2, 3).t(), 0.0, &mut c);
        assert_eq!(c, [14.0, 32.0, 32.0, 77.0]);
        gemm(1.0, Mat::rm(&a, 2, 3), Mat::rm(&a, 2, 3).t(), 1.0, &mut c);
        assert_eq!(c, [28.0, 64.0, 64.0, 154.0]);
    }

    #[test]
    fn partitions_cover() {
        for n in 0..20 {
            let p = partitions(n, REDUCE_PARTS);
            assert_eq!(p.iter().map(|r| r.len()).sum::<usize>(), n);
            assert!(p.windows(2).all(|w| w[0].end == w[1].start));
        }
    }
}
