//! Code generation: CUDA C for a schedule ([`cuda`]), and the host driver that runs a schedule
//! through the CUDA emulation on the CPU ([`emu`]).

pub mod cuda;
pub mod emu;
pub mod mma;
