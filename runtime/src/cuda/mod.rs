//! The CUDA backend: runs a compiled [`Schedule`](wrnc_compiler::schedule::Schedule) on an
//! NVIDIA GPU through the driver API, loaded at run time (no CUDA toolkit at build time).
//!
//! Pieces:
//! - [`driver`]: `libcuda.so.1` through `libloading`, every call checked;
//! - [`cache`]: NVRTC output on disk, keyed by source hash, compute capability and NVRTC version;
//! - [`layout`]: where each buffer of a schedule lives (one allocation per executor, the
//!   memory plan's arena inside it; parameters and optimizer state shared between executors)
//!   and how a launch's arguments are packed -- pure, tested without a GPU;
//! - [`device`]: context, stream, events, device memory, modules, CUDA graphs;
//! - [`exec`]: an [`Executor`](exec::Executor) that uploads, launches and downloads one schedule;
//! - [`augment`]: pad-crop-flip + normalisation as a CUDA kernel, bit-identical to
//!   [`crate::data::make_batch`];
//! - [`trainer`]: [`GpuTrainer`](trainer::GpuTrainer), the GPU's [`crate::train::Backend`] for [`crate::train::train_with`];
//! - [`check`]: GPU-vs-CPU comparisons (the `wrnc selftest` core) and [`bench`](mod@bench) timings.
//!
//! Invariant: nothing in this module panics when the driver, NVRTC or a GPU is missing; every
//! failure is a [`CudaError`] whose message says what to do.

pub mod augment;
pub mod bench;
pub mod cache;
pub mod check;
pub mod device;
pub mod driver;
pub mod exec;
pub mod layout;
pub mod probe;
pub mod trainer;
pub mod tune;

use crate::nvrtc::NvrtcError;

/// Everything that can go wrong on the GPU path.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CudaError {
    #[error(
        "the CUDA driver library (libcuda.so.1) was not found; tried: {tried}.\n\
         Install the NVIDIA driver (it provides libcuda.so.1; `nvidia-smi` must work), or point \
         WRNC_LIBCUDA at a libcuda.so file. Without a GPU, use --device cpu"
    )]
    NoDriver { tried: String },
    #[error("the CUDA driver {path} is missing symbol {symbol} (driver too old? wrnc needs CUDA 12 or newer)")]
    Symbol { path: String, symbol: String },
    #[error("{0}. Without a GPU, use --device cpu")]
    NoDevice(String),
    #[error("GPU {ordinal} does not exist ({count} visible)")]
    BadDevice { ordinal: usize, count: usize },
    #[error("{0}")]
    Nvrtc(#[from] NvrtcError),
    #[error("{call} failed: {name}{}{message}", if message.is_empty() { "" } else { ": " })]
    Call {
        call: String,
        code: i32,
        name: String,
        message: String,
    },
    #[error(
        "out of device memory: {what} at batch {batch} needs {} ({need} bytes) but the GPU has {} free of {}; use a smaller --batch",
        crate::cuda::mib(*need), crate::cuda::mib(*free), crate::cuda::mib(*total)
    )]
    OutOfMemory {
        what: String,
        batch: u32,
        need: u64,
        free: u64,
        total: u64,
    },
    #[error("kernel {kernel} ({note}) failed: {detail}")]
    Launch {
        kernel: String,
        note: String,
        detail: String,
    },
    #[error(
        "a kernel failed during {during}: {detail}; rerun with WRNC_CUDA_SYNC=1 to name the kernel"
    )]
    Fault { during: String, detail: String },
    #[error("loading the compiled kernels failed: {detail}")]
    Module { detail: String },
    /// The driver refused a module image (`cuModuleLoadDataEx` returned `code`).
    #[error("{detail}")]
    ModuleImage { code: i32, detail: String },
    #[error("{0}")]
    Plan(String),
    #[error("{0}")]
    Input(String),
}

/// The driver's errors after which the CUDA context cannot be used again (the process must
/// start over): a kernel that faulted, trapped, asserted or timed out.
const STICKY_ERRORS: [&str; 10] = [
    "CUDA_ERROR_ILLEGAL_ADDRESS",
    "CUDA_ERROR_LAUNCH_TIMEOUT",
    "CUDA_ERROR_ASSERT",
    "CUDA_ERROR_HARDWARE_STACK_ERROR",
    "CUDA_ERROR_ILLEGAL_INSTRUCTION",
    "CUDA_ERROR_MISALIGNED_ADDRESS",
    "CUDA_ERROR_INVALID_ADDRESS_SPACE",
    "CUDA_ERROR_INVALID_PC",
    "CUDA_ERROR_LAUNCH_FAILED",
    "CUDA_ERROR_UNKNOWN",
];

impl CudaError {
    /// Whether the context is unusable after this error (every later driver call returns
    /// it again): a kernel fault, reported by the launch, a synchronisation or a copy.
    pub fn poisons_context(&self) -> bool {
        let text = match self {
            CudaError::Call { name, .. } => name.clone(),
            CudaError::Launch { detail, .. } | CudaError::Fault { detail, .. } => detail.clone(),
            _ => return false,
        };
        STICKY_ERRORS.iter().any(|e| {
            text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .any(|w| w == *e)
        })
    }
}

/// `12.3 MiB`.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// What [`is_available`] found.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// `(major, minor)`.
    pub compute_capability: (i32, i32),
    pub multiprocessors: i32,
    /// Shared memory one block may use when its kernel opts in
    /// (`MAX_SHARED_MEMORY_PER_BLOCK_OPTIN`: 227 KiB on sm_90, 163 KiB on sm_80).
    pub smem_optin_bytes: u32,
    pub total_bytes: u64,
    pub free_bytes: u64,
    /// `cuDriverGetVersion`: e.g. 13000 for CUDA 13.0.
    pub driver_version: i32,
    pub driver_library: String,
    /// Where NVRTC was loaded from, or why it was not.
    pub nvrtc: Result<String, String>,
}

impl DeviceInfo {
    /// `sm_90` for compute capability 9.0.
    pub fn arch(&self) -> String {
        format!(
            "sm_{}{}",
            self.compute_capability.0, self.compute_capability.1
        )
    }
}

impl std::fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GPU {}: {} ({}, {} SMs, {} total, {} free), driver CUDA {}.{} ({}), NVRTC: {}",
            self.ordinal,
            self.name,
            self.arch(),
            self.multiprocessors,
            mib(self.total_bytes),
            mib(self.free_bytes),
            self.driver_version / 1000,
            self.driver_version % 1000 / 10,
            self.driver_library,
            match &self.nvrtc {
                Ok(p) => p.clone(),
                Err(e) => format!("not usable ({})", e.lines().next().unwrap_or("")),
            }
        )
    }
}

/// Whether a GPU is usable: the driver loads, `cuInit` succeeds and GPU 0 exists. Reports
/// its properties, and where NVRTC is (or why it is not usable).
pub fn is_available() -> Result<DeviceInfo, CudaError> {
    device::Gpu::open(0).map(|g| g.info().clone())
}

#[cfg(test)]
mod tests {
    use super::CudaError;

    /// A kernel fault poisons the context wherever it surfaces; other errors do not.
    #[test]
    fn which_errors_poison_the_context() {
        let call = |name: &str| CudaError::Call {
            call: "cuStreamSynchronize".into(),
            code: 0,
            name: name.into(),
            message: String::new(),
        };
        assert!(call("CUDA_ERROR_ILLEGAL_ADDRESS").poisons_context());
        assert!(call("CUDA_ERROR_LAUNCH_FAILED").poisons_context());
        assert!(!call("CUDA_ERROR_INVALID_VALUE").poisons_context());
        assert!(!call("CUDA_ERROR_OUT_OF_MEMORY").poisons_context());
        let launch = |detail: &str| CudaError::Launch {
            kernel: "conv_fwd".into(),
            note: "1 fwd".into(),
            detail: detail.into(),
        };
        assert!(
            launch("cuStreamSynchronize failed: CUDA_ERROR_MISALIGNED_ADDRESS: misaligned")
                .poisons_context()
        );
        assert!(!launch(
            "cuLaunchKernel failed: CUDA_ERROR_INVALID_VALUE: CUDA_ERROR_INVALID_VALUE"
        )
        .poisons_context());
        // a name that merely contains a sticky one is not it
        assert!(!launch("CUDA_ERROR_UNKNOWN_THING").poisons_context());
        let fault = CudaError::Fault {
            during: "download".into(),
            detail: "CUDA_ERROR_ILLEGAL_INSTRUCTION".into(),
        };
        assert!(fault.poisons_context());
        assert!(!CudaError::Plan("CUDA_ERROR_ILLEGAL_ADDRESS".into()).poisons_context());
    }
}
