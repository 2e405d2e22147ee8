//! The CUDA driver API, loaded at run time with `libloading` (no link-time CUDA dependency).
//!
//! Only the handful of entry points wrnc uses are resolved. The library is searched in this
//! order (the first that loads wins):
//! 1. the path in the `WRNC_LIBCUDA` environment variable, when set (tests point it at a bogus
//!    path to exercise the "no driver" error);
//! 2. `libcuda.so.1`, then `libcuda.so`, by the dynamic loader's own search.
//!
//! Nothing here panics: a missing library or symbol is a [`CudaError`] that says what to
//! install. Every call's result code goes through [`Api::check`], which names the call and
//! CUDA's own error name and description.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::path::PathBuf;
use std::sync::OnceLock;

use super::CudaError;

pub type CuResult = c_int;
pub type CuDevice = c_int;
pub type CuDevicePtr = u64;
pub type Handle = *mut c_void;

/// `CUDA_SUCCESS`.
pub const SUCCESS: CuResult = 0;
/// `CUDA_ERROR_OUT_OF_MEMORY`.
pub const ERROR_OUT_OF_MEMORY: CuResult = 2;
/// `CUDA_ERROR_NO_DEVICE`.
pub const ERROR_NO_DEVICE: CuResult = 100;
/// `CUDA_ERROR_INSUFFICIENT_DRIVER`.
pub const ERROR_INSUFFICIENT_DRIVER: CuResult = 35;
/// `CUDA_ERROR_UNSUPPORTED_PTX_VERSION`.
pub const ERROR_UNSUPPORTED_PTX_VERSION: CuResult = 222;
/// `CUDA_ERROR_INVALID_IMAGE`: e.g. a CUBIN from a newer toolkit than the driver.
pub const ERROR_INVALID_IMAGE: CuResult = 200;
/// `CUDA_ERROR_NO_BINARY_FOR_GPU`: a CUBIN for another architecture.
pub const ERROR_NO_BINARY_FOR_GPU: CuResult = 209;
/// `CUDA_ERROR_INVALID_PTX`.
pub const ERROR_INVALID_PTX: CuResult = 218;
/// What the driver says of a module image it cannot use (as opposed to, say, no memory left):
/// a cached module refused with one of these is compiled again.
pub const IMAGE_ERRORS: [CuResult; 4] = [
    ERROR_INVALID_IMAGE,
    ERROR_NO_BINARY_FOR_GPU,
    ERROR_INVALID_PTX,
    ERROR_UNSUPPORTED_PTX_VERSION,
];

/// `CU_DEVICE_ATTRIBUTE_*` values used here.
pub mod attr {
    pub const MAX_SHARED_MEMORY_PER_BLOCK: i32 = 8;
    pub const MULTIPROCESSOR_COUNT: i32 = 16;
    /// `CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN`.
    pub const MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: i32 = 97;
    pub const COMPUTE_CAPABILITY_MAJOR: i32 = 75;
    pub const COMPUTE_CAPABILITY_MINOR: i32 = 76;
}

/// `CU_JIT_ERROR_LOG_BUFFER` / `CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES`.
pub const JIT_ERROR_LOG_BUFFER: c_int = 5;
pub const JIT_ERROR_LOG_BUFFER_SIZE_BYTES: c_int = 6;
/// `CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES` (a kernel's static shared memory).
pub const FUNC_SHARED_SIZE_BYTES: c_int = 1;
/// `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`.
pub const FUNC_MAX_DYNAMIC_SHARED_SIZE_BYTES: c_int = 8;
/// `CU_STREAM_NON_BLOCKING`.
pub const STREAM_NON_BLOCKING: c_uint = 1;
/// `CU_STREAM_CAPTURE_MODE_THREAD_LOCAL`.
pub const CAPTURE_MODE_THREAD_LOCAL: c_int = 1;

/// The resolved entry points. Signatures are the driver API's documented C prototypes
/// (`cuda.h`); `_v2` names are the ABI symbols the header maps the plain names to.
pub struct Api {
    _lib: libloading::Library,
    pub path: String,
    pub init: unsafe extern "C" fn(c_uint) -> CuResult,
    pub driver_version: unsafe extern "C" fn(*mut c_int) -> CuResult,
    pub device_count: unsafe extern "C" fn(*mut c_int) -> CuResult,
    pub device_get: unsafe extern "C" fn(*mut CuDevice, c_int) -> CuResult,
    pub device_name: unsafe extern "C" fn(*mut c_char, c_int, CuDevice) -> CuResult,
    pub device_attribute: unsafe extern "C" fn(*mut c_int, c_int, CuDevice) -> CuResult,
    pub device_total_mem: unsafe extern "C" fn(*mut usize, CuDevice) -> CuResult,
    pub primary_ctx_retain: unsafe extern "C" fn(*mut Handle, CuDevice) -> CuResult,
    pub primary_ctx_release: unsafe extern "C" fn(CuDevice) -> CuResult,
    pub ctx_set_current: unsafe extern "C" fn(Handle) -> CuResult,
    pub ctx_synchronize: unsafe extern "C" fn() -> CuResult,
    pub mem_get_info: unsafe extern "C" fn(*mut usize, *mut usize) -> CuResult,
    pub mem_alloc: unsafe extern "C" fn(*mut CuDevicePtr, usize) -> CuResult,
    pub mem_free: unsafe extern "C" fn(CuDevicePtr) -> CuResult,
    /// Stream-ordered (`cuMemcpyHtoDAsync_v2`): from pageable memory the driver stages the
    /// bytes before it returns. The synchronous forms run on the legacy stream, which nothing
    /// orders before work on wrnc's non-blocking stream.
    pub memcpy_htod_async:
        unsafe extern "C" fn(CuDevicePtr, *const c_void, usize, Handle) -> CuResult,
    pub memcpy_dtoh: unsafe extern "C" fn(*mut c_void, CuDevicePtr, usize) -> CuResult,
    pub memcpy_dtod_async:
        unsafe extern "C" fn(CuDevicePtr, CuDevicePtr, usize, Handle) -> CuResult,
    pub memset_d8_async: unsafe extern "C" fn(CuDevicePtr, u8, usize, Handle) -> CuResult,
    pub module_load_data_ex: unsafe extern "C" fn(
        *mut Handle,
        *const c_void,
        c_uint,
        *mut c_int,
        *mut *mut c_void,
    ) -> CuResult,
    pub module_get_function: unsafe extern "C" fn(*mut Handle, Handle, *const c_char) -> CuResult,
    pub module_unload: unsafe extern "C" fn(Handle) -> CuResult,
    pub func_get_attribute: unsafe extern "C" fn(*mut c_int, c_int, Handle) -> CuResult,
    pub func_set_attribute: unsafe extern "C" fn(Handle, c_int, c_int) -> CuResult,
    #[allow(clippy::type_complexity)]
    pub launch_kernel: unsafe extern "C" fn(
        Handle,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        Handle,
        *mut *mut c_void,
        *mut *mut c_void,
    ) -> CuResult,
    pub stream_create: unsafe extern "C" fn(*mut Handle, c_uint) -> CuResult,
    pub stream_destroy: unsafe extern "C" fn(Handle) -> CuResult,
    pub stream_synchronize: unsafe extern "C" fn(Handle) -> CuResult,
    pub event_create: unsafe extern "C" fn(*mut Handle, c_uint) -> CuResult,
    pub event_record: unsafe extern "C" fn(Handle, Handle) -> CuResult,
    pub event_synchronize: unsafe extern "C" fn(Handle) -> CuResult,
    pub event_elapsed: unsafe extern "C" fn(*mut f32, Handle, Handle) -> CuResult,
    pub event_destroy: unsafe extern "C" fn(Handle) -> CuResult,
    pub stream_begin_capture: unsafe extern "C" fn(Handle, c_int) -> CuResult,
    pub stream_end_capture: unsafe extern "C" fn(Handle, *mut Handle) -> CuResult,
    pub graph_instantiate: unsafe extern "C" fn(*mut Handle, Handle, u64) -> CuResult,
    pub graph_launch: unsafe extern "C" fn(Handle, Handle) -> CuResult,
    pub graph_exec_destroy: unsafe extern "C" fn(Handle) -> CuResult,
    pub graph_destroy: unsafe extern "C" fn(Handle) -> CuResult,
    pub error_name: unsafe extern "C" fn(CuResult, *mut *const c_char) -> CuResult,
    pub error_string: unsafe extern "C" fn(CuResult, *mut *const c_char) -> CuResult,
    /// `cuTensorMapEncodeTiled` (CUDA 12.0+ drivers; `None` in older ones): only launches
    /// with a tensor map (`--tma`) need it.
    #[allow(clippy::type_complexity)]
    pub tensor_map_encode_tiled: Option<
        unsafe extern "C" fn(
            *mut c_void,
            c_int,
            c_uint,
            *mut c_void,
            *const u64,
            *const u64,
            *const c_uint,
            *const c_uint,
            c_int,
            c_int,
            c_int,
            c_int,
        ) -> CuResult,
    >,
}

/// `CU_TENSOR_MAP_DATA_TYPE_BFLOAT16`.
pub const TENSOR_MAP_BF16: c_int = 9;
/// `CU_TENSOR_MAP_SWIZZLE_NONE`, `_32B`, `_64B`, `_128B`.
pub const TENSOR_MAP_SWIZZLE_NONE: c_int = 0;
pub const TENSOR_MAP_SWIZZLE_32B: c_int = 1;
pub const TENSOR_MAP_SWIZZLE_64B: c_int = 2;
pub const TENSOR_MAP_SWIZZLE_128B: c_int = 3;
/// `CU_TENSOR_MAP_L2_PROMOTION_L2_128B`.
pub const TENSOR_MAP_L2_128B: c_int = 2;

// SAFETY: the driver API is thread-safe; the struct holds only function pointers and the
// library handle.
unsafe impl Send for Api {}
unsafe impl Sync for Api {}

/// Candidate library names/paths, in search order (see module docs).
pub fn candidates() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(p) = std::env::var_os("WRNC_LIBCUDA") {
        v.push(PathBuf::from(p));
        // an explicit choice is final: do not fall back to the system's driver
        return v;
    }
    v.push(PathBuf::from("libcuda.so.1"));
    v.push(PathBuf::from("libcuda.so"));
    v
}

/// Loads the driver from `candidates`, resolving every symbol.
pub fn load_from(candidates: &[PathBuf]) -> Result<Api, CudaError> {
    let mut tried = Vec::new();
    for c in candidates {
        // SAFETY: loading the vendor's driver library runs its initialisers only.
        let lib = match unsafe { libloading::Library::new(c) } {
            Ok(l) => l,
            Err(e) => {
                tried.push(format!("{} ({e})", c.display()));
                continue;
            }
        };
        let path = c.display().to_string();
        macro_rules! sym {
            ($($name:literal),+) => {{
                let mut found = None;
                $(
                    if found.is_none() {
                        // SAFETY: the signature is the driver API's documented prototype.
                        if let Ok(s) = unsafe { lib.get(concat!($name, "\0").as_bytes()) } {
                            found = Some(*s);
                        }
                    }
                )+
                found.ok_or_else(|| CudaError::Symbol {
                    path: path.clone(),
                    symbol: [$($name),+].join(" or "),
                })?
            }};
        }
        let api = Api {
            init: sym!("cuInit"),
            driver_version: sym!("cuDriverGetVersion"),
            device_count: sym!("cuDeviceGetCount"),
            device_get: sym!("cuDeviceGet"),
            device_name: sym!("cuDeviceGetName"),
            device_attribute: sym!("cuDeviceGetAttribute"),
            device_total_mem: sym!("cuDeviceTotalMem_v2"),
            primary_ctx_retain: sym!("cuDevicePrimaryCtxRetain"),
            primary_ctx_release: sym!("cuDevicePrimaryCtxRelease_v2", "cuDevicePrimaryCtxRelease"),
            ctx_set_current: sym!("cuCtxSetCurrent"),
            ctx_synchronize: sym!("cuCtxSynchronize"),
            mem_get_info: sym!("cuMemGetInfo_v2"),
            mem_alloc: sym!("cuMemAlloc_v2"),
            mem_free: sym!("cuMemFree_v2"),
            memcpy_htod_async: sym!("cuMemcpyHtoDAsync_v2"),
            memcpy_dtoh: sym!("cuMemcpyDtoH_v2"),
            memcpy_dtod_async: sym!("cuMemcpyDtoDAsync_v2"),
            memset_d8_async: sym!("cuMemsetD8Async"),
            module_load_data_ex: sym!("cuModuleLoadDataEx"),
            module_get_function: sym!("cuModuleGetFunction"),
            module_unload: sym!("cuModuleUnload"),
            func_get_attribute: sym!("cuFuncGetAttribute"),
            func_set_attribute: sym!("cuFuncSetAttribute"),
            launch_kernel: sym!("cuLaunchKernel"),
            stream_create: sym!("cuStreamCreate"),
            stream_destroy: sym!("cuStreamDestroy_v2", "cuStreamDestroy"),
            stream_synchronize: sym!("cuStreamSynchronize"),
            event_create: sym!("cuEventCreate"),
            event_record: sym!("cuEventRecord"),
            event_synchronize: sym!("cuEventSynchronize"),
            event_elapsed: sym!("cuEventElapsedTime_v2", "cuEventElapsedTime"),
            event_destroy: sym!("cuEventDestroy_v2", "cuEventDestroy"),
            stream_begin_capture: sym!("cuStreamBeginCapture_v2", "cuStreamBeginCapture"),
            stream_end_capture: sym!("cuStreamEndCapture"),
            graph_instantiate: sym!("cuGraphInstantiateWithFlags"),
            graph_launch: sym!("cuGraphLaunch"),
            graph_exec_destroy: sym!("cuGraphExecDestroy"),
            graph_destroy: sym!("cuGraphDestroy"),
            error_name: sym!("cuGetErrorName"),
            error_string: sym!("cuGetErrorString"),
            // SAFETY: the driver API's documented prototype of cuTensorMapEncodeTiled.
            tensor_map_encode_tiled: unsafe { lib.get(b"cuTensorMapEncodeTiled\0") }
                .ok()
                .map(|s| *s),
            path,
            _lib: lib,
        };
        return Ok(api);
    }
    Err(CudaError::NoDriver {
        tried: tried.join("; "),
    })
}

/// The process-wide driver, loaded and `cuInit`-ed once.
pub fn api() -> Result<&'static Api, CudaError> {
    static API: OnceLock<Result<Api, CudaError>> = OnceLock::new();
    API.get_or_init(|| {
        let a = load_from(&candidates())?;
        // SAFETY: cuInit with flags 0 is the documented first call.
        let r = unsafe { (a.init)(0) };
        if r == ERROR_NO_DEVICE {
            return Err(CudaError::NoDevice(format!(
                "the CUDA driver ({}) found no GPU (cuInit: CUDA_ERROR_NO_DEVICE)",
                a.path
            )));
        }
        a.check(r, "cuInit")?;
        Ok(a)
    })
    .as_ref()
    .map_err(Clone::clone)
}

impl Api {
    /// CUDA's `(name, description)` of a result code.
    pub fn describe(&self, r: CuResult) -> (String, String) {
        let get = |f: unsafe extern "C" fn(CuResult, *mut *const c_char) -> CuResult| {
            let mut p: *const c_char = std::ptr::null();
            // SAFETY: valid out-pointer; the driver returns a static string or an error.
            let ok = unsafe { f(r, &mut p) } == SUCCESS && !p.is_null();
            if ok {
                // SAFETY: non-null, NUL-terminated, static.
                Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
            } else {
                None
            }
        };
        (
            get(self.error_name).unwrap_or_else(|| format!("CUDA error {r}")),
            get(self.error_string).unwrap_or_default(),
        )
    }

    /// `Ok` for `CUDA_SUCCESS`, else a [`CudaError::Call`] naming `call`.
    pub fn check(&self, r: CuResult, call: &str) -> Result<(), CudaError> {
        if r == SUCCESS {
            return Ok(());
        }
        let (name, message) = self.describe(r);
        Err(CudaError::Call {
            call: call.to_string(),
            code: r,
            name,
            message,
        })
    }
}
