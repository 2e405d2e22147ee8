//! wrnc's runtimes. The CPU reference backend is the numerical ground truth that every GPU
//! kernel is checked against, and lets everything run on a machine without a GPU.

pub mod checkpoint;
pub mod cpu;
pub mod cuda;
pub mod data;
pub mod init;
pub mod loss;
pub mod metrics;
pub mod nvrtc;
pub mod onnx;
pub mod ops;
pub mod optim;
pub mod plot;
pub mod reference;
pub mod tensor;
pub mod train;

pub use tensor::Tensor;
