//! wrnc's runtimes. The CPU reference backend is the numerical ground truth that every GPU
//! kernel is checked against, and lets everything run on a machine without a GPU.

pub mod tensor;

pub use tensor::Tensor;
