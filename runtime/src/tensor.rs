//! A dense host tensor: row-major (NCHW for activations, OIHW for convolution weights).
//!
//! Invariant: `data.len() == shape.iter().product()`.

#[derive(Debug, Clone, PartialEq)]
pub struct Tensor<T = f32> {
    pub shape: Vec<usize>,
    pub data: Vec<T>,
}

impl<T: Copy + Default> Tensor<T> {
    pub fn zeros(shape: &[usize]) -> Self {
        Tensor {
            shape: shape.to_vec(),
            data: vec![T::default(); shape.iter().product()],
        }
    }
    pub fn from_vec(shape: &[usize], data: Vec<T>) -> Self {
        assert_eq!(
            data.len(),
            shape.iter().product::<usize>(),
            "tensor data length does not match its shape"
        );
        Tensor {
            shape: shape.to_vec(),
            data,
        }
    }
    pub fn numel(&self) -> usize {
        self.data.len()
    }
}
