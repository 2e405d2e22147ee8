//! wrnc's runtimes. The CPU reference backend is the numerical ground truth that every GPU
//! kernel is checked against, and lets everything run on a machine without a GPU.

pub mod cpu;
pub mod init;
pub mod loss;
pub mod ops;
pub mod optim;
pub mod tensor;

pub use tensor::Tensor;
