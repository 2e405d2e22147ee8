//! Context, stream, device memory, modules, events and CUDA graphs: thin RAII wrappers over
//! [`super::driver`].
//!
//! One [`Gpu`] holds the device's primary context and one non-blocking stream; everything
//! runs on that stream in order, uploads, device copies and zero fills included (the
//! stream-ordered `cuMemcpyHtoDAsync` etc.: the synchronous forms run on the legacy stream,
//! which nothing orders before a non-blocking stream's launches, and an upload from pageable
//! memory returns before its DMA lands). A download first waits for the stream, so it sees
//! every launch before it. Objects keep the context alive (`Rc`) and free their resource when dropped.
//! None of these types is `Send`: one thread drives one GPU.
//!
//! With `WRNC_CUDA_SYNC=1` in the environment, every launch is followed by a stream
//! synchronisation, so an asynchronous fault is reported with the kernel that caused it.

use std::cell::Cell;
use std::ffi::{c_char, c_int, c_uint, c_void, CString};
use std::rc::Rc;

use super::driver::{self, attr, Api, CuDevice, Handle};
use super::layout::ArgValue;
use super::{CudaError, DeviceInfo};

pub(crate) struct Ctx {
    pub api: &'static Api,
    dev: CuDevice,
    ctx: Handle,
}

impl Ctx {
    /// Makes the context current on the calling thread.
    fn bind(&self) -> Result<(), CudaError> {
        // SAFETY: a retained primary context.
        let r = unsafe { (self.api.ctx_set_current)(self.ctx) };
        self.api.check(r, "cuCtxSetCurrent")
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        // SAFETY: retained once in `Gpu::open`, released once here.
        unsafe { (self.api.primary_ctx_release)(self.dev) };
    }
}

/// One GPU: primary context, one stream, device properties.
pub struct Gpu {
    ctx: Rc<Ctx>,
    stream: Handle,
    info: DeviceInfo,
    sync_each: bool,
    capturing: Cell<bool>,
}

/// Device memory, freed on drop.
pub struct DeviceBuffer {
    ctx: Rc<Ctx>,
    ptr: u64,
    bytes: u64,
}

impl DeviceBuffer {
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.ptr != 0 && self.ctx.bind().is_ok() {
            // SAFETY: allocated by cuMemAlloc in this context, freed once.
            unsafe { (self.ctx.api.mem_free)(self.ptr) };
        }
    }
}

/// A loaded module and the functions looked up in it, in the order asked for.
pub struct Module {
    ctx: Rc<Ctx>,
    module: Handle,
    pub(crate) functions: Vec<Handle>,
    pub names: Vec<String>,
}

impl Drop for Module {
    fn drop(&mut self) {
        if self.ctx.bind().is_ok() {
            // SAFETY: loaded once, unloaded once.
            unsafe { (self.ctx.api.module_unload)(self.module) };
        }
    }
}

/// A CUDA event (timing enabled).
pub struct Event {
    ctx: Rc<Ctx>,
    ev: Handle,
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: created once, destroyed once.
        unsafe { (self.ctx.api.event_destroy)(self.ev) };
    }
}

/// An instantiated CUDA graph.
pub struct GraphExec {
    ctx: Rc<Ctx>,
    graph: Handle,
    exec: Handle,
}

impl Drop for GraphExec {
    fn drop(&mut self) {
        // SAFETY: created once each, destroyed once each.
        unsafe {
            (self.ctx.api.graph_exec_destroy)(self.exec);
            (self.ctx.api.graph_destroy)(self.graph);
        }
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        if self.ctx.bind().is_ok() {
            // SAFETY: created once, destroyed once; pending work is waited for first.
            unsafe {
                (self.ctx.api.stream_synchronize)(self.stream);
                (self.ctx.api.stream_destroy)(self.stream);
            }
        }
    }
}

fn env_flag(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| !v.is_empty() && v != "0")
}

impl Gpu {
    /// Opens GPU `ordinal`: loads the driver, retains the primary context, creates a stream.
    pub fn open(ordinal: usize) -> Result<Gpu, CudaError> {
        let api = driver::api()?;
        let mut count: c_int = 0;
        // SAFETY: valid out-pointer.
        api.check(
            unsafe { (api.device_count)(&mut count) },
            "cuDeviceGetCount",
        )?;
        if count <= 0 {
            return Err(CudaError::NoDevice(format!(
                "the CUDA driver ({}) sees no GPU",
                api.path
            )));
        }
        if ordinal >= count as usize {
            return Err(CudaError::BadDevice {
                ordinal,
                count: count as usize,
            });
        }
        let mut dev: CuDevice = 0;
        // SAFETY: valid out-pointer, ordinal in range.
        api.check(
            unsafe { (api.device_get)(&mut dev, ordinal as c_int) },
            "cuDeviceGet",
        )?;
        let mut name = [0 as c_char; 256];
        // SAFETY: the buffer holds 256 bytes, as passed.
        api.check(
            unsafe { (api.device_name)(name.as_mut_ptr(), name.len() as c_int, dev) },
            "cuDeviceGetName",
        )?;
        let name: String = {
            let bytes: Vec<u8> = name
                .iter()
                .take_while(|&&c| c != 0)
                .map(|&c| c as u8)
                .collect();
            String::from_utf8_lossy(&bytes).into_owned()
        };
        let get_attr = |a: c_int, what: &str| -> Result<i32, CudaError> {
            let mut v: c_int = 0;
            // SAFETY: valid out-pointer and device.
            api.check(
                unsafe { (api.device_attribute)(&mut v, a, dev) },
                &format!("cuDeviceGetAttribute({what})"),
            )?;
            Ok(v)
        };
        let cc = (
            get_attr(attr::COMPUTE_CAPABILITY_MAJOR, "compute capability major")?,
            get_attr(attr::COMPUTE_CAPABILITY_MINOR, "compute capability minor")?,
        );
        let sms = get_attr(attr::MULTIPROCESSOR_COUNT, "multiprocessor count")?;
        let smem_optin = get_attr(
            attr::MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            "max shared memory per block (opt-in)",
        )?
        .max(0) as u32;
        let mut total: usize = 0;
        // SAFETY: valid out-pointer.
        api.check(
            unsafe { (api.device_total_mem)(&mut total, dev) },
            "cuDeviceTotalMem",
        )?;
        let mut version: c_int = 0;
        // SAFETY: valid out-pointer.
        api.check(
            unsafe { (api.driver_version)(&mut version) },
            "cuDriverGetVersion",
        )?;
        let mut ctx: Handle = std::ptr::null_mut();
        // SAFETY: valid out-pointer and device.
        api.check(
            unsafe { (api.primary_ctx_retain)(&mut ctx, dev) },
            "cuDevicePrimaryCtxRetain",
        )?;
        let ctx = Rc::new(Ctx { api, dev, ctx });
        ctx.bind()?;
        let mut stream: Handle = std::ptr::null_mut();
        // SAFETY: valid out-pointer; current context set.
        api.check(
            unsafe { (api.stream_create)(&mut stream, driver::STREAM_NON_BLOCKING) },
            "cuStreamCreate",
        )?;
        let mut gpu = Gpu {
            ctx,
            stream,
            info: DeviceInfo {
                ordinal,
                name,
                compute_capability: cc,
                multiprocessors: sms,
                smem_optin_bytes: smem_optin,
                total_bytes: total as u64,
                free_bytes: 0,
                driver_version: version,
                driver_library: api.path.clone(),
                nvrtc: crate::nvrtc::library().map_err(|e| e.to_string()),
            },
            sync_each: env_flag("WRNC_CUDA_SYNC"),
            capturing: Cell::new(false),
        };
        gpu.info.free_bytes = gpu.mem_info()?.0;
        Ok(gpu)
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// Synchronise after every launch (names the kernel of an asynchronous fault).
    pub fn set_sync_each(&mut self, on: bool) {
        self.sync_each = on;
    }

    fn api(&self) -> &'static Api {
        self.ctx.api
    }

    /// `(free, total)` device bytes.
    pub fn mem_info(&self) -> Result<(u64, u64), CudaError> {
        self.ctx.bind()?;
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: valid out-pointers.
        self.api().check(
            unsafe { (self.api().mem_get_info)(&mut free, &mut total) },
            "cuMemGetInfo",
        )?;
        Ok((free as u64, total as u64))
    }

    /// Allocates `bytes` (at least 1), zero-filled. Out of memory is reported with `what` and
    /// `batch`, and the bytes needed.
    pub fn alloc(&self, bytes: u64, what: &str, batch: u32) -> Result<DeviceBuffer, CudaError> {
        self.ctx.bind()?;
        let (free, total) = self.mem_info()?;
        let oom = || CudaError::OutOfMemory {
            what: what.to_string(),
            batch,
            need: bytes,
            free,
            total,
        };
        if bytes > free {
            return Err(oom());
        }
        let size = usize::try_from(bytes.max(1)).map_err(|_| oom())?;
        let mut ptr = 0u64;
        // SAFETY: valid out-pointer; current context set.
        let r = unsafe { (self.api().mem_alloc)(&mut ptr, size) };
        if r == driver::ERROR_OUT_OF_MEMORY {
            return Err(oom());
        }
        self.api().check(r, "cuMemAlloc")?;
        let b = DeviceBuffer {
            ctx: self.ctx.clone(),
            ptr,
            bytes,
        };
        self.memset(ptr, bytes)?;
        Ok(b)
    }

    /// Zeroes `bytes` at `ptr`, in order on the stream (before any later launch).
    pub fn memset(&self, ptr: u64, bytes: u64) -> Result<(), CudaError> {
        if bytes == 0 {
            return Ok(());
        }
        self.ctx.bind()?;
        self.synchronize("memset")?;
        // SAFETY: the range lies in an allocation of this context (callers pass their own).
        self.api().check(
            unsafe { (self.api().memset_d8_async)(ptr, 0, bytes as usize, self.stream) },
            "cuMemsetD8Async",
        )
    }

    /// Copies host bytes to `ptr`, after the stream's pending work and before any later launch
    /// (stream-ordered; the driver stages `data` before it returns).
    ///
    /// Callers guarantee that `[ptr, ptr + data.len())` lies inside one of their allocations
    /// (the executor checks ranges against its layout).
    pub fn upload(&self, ptr: u64, data: &[u8]) -> Result<(), CudaError> {
        if data.is_empty() {
            return Ok(());
        }
        self.ctx.bind()?;
        self.synchronize("upload")?;
        // SAFETY: valid host slice; device range per the contract above.
        self.api().check(
            unsafe {
                (self.api().memcpy_htod_async)(
                    ptr,
                    data.as_ptr() as *const c_void,
                    data.len(),
                    self.stream,
                )
            },
            "cuMemcpyHtoDAsync",
        )
    }

    /// Copies device bytes at `ptr` into `out`, after the stream's pending work.
    pub fn download(&self, ptr: u64, out: &mut [u8]) -> Result<(), CudaError> {
        if out.is_empty() {
            return Ok(());
        }
        self.ctx.bind()?;
        self.synchronize("download")?;
        // SAFETY: valid host slice; device range per `upload`'s contract.
        self.api().check(
            unsafe { (self.api().memcpy_dtoh)(out.as_mut_ptr() as *mut c_void, ptr, out.len()) },
            "cuMemcpyDtoH",
        )
    }

    /// Device-to-device copy, after the stream's pending work.
    pub fn copy(&self, dst: u64, src: u64, bytes: u64) -> Result<(), CudaError> {
        if bytes == 0 {
            return Ok(());
        }
        self.ctx.bind()?;
        self.synchronize("copy")?;
        // SAFETY: both ranges lie in allocations of this context (callers' contract).
        self.api().check(
            unsafe { (self.api().memcpy_dtod_async)(dst, src, bytes as usize, self.stream) },
            "cuMemcpyDtoDAsync",
        )
    }

    /// Waits for the stream. A failure is an asynchronous fault of an earlier launch.
    pub fn synchronize(&self, during: &str) -> Result<(), CudaError> {
        self.ctx.bind()?;
        // SAFETY: our stream.
        let r = unsafe { (self.api().stream_synchronize)(self.stream) };
        self.api()
            .check(r, "cuStreamSynchronize")
            .map_err(|e| CudaError::Fault {
                during: during.to_string(),
                detail: e.to_string(),
            })
    }

    /// Loads `image` (a CUBIN from [`crate::nvrtc::compile_cubin`] for this GPU's
    /// architecture; PTX text, NUL-terminated, would be JIT-compiled) and looks up `names`.
    pub fn load_module(&self, image: &[u8], names: &[String]) -> Result<Module, CudaError> {
        self.ctx.bind()?;
        let mut log = vec![0u8; 16 * 1024];
        let mut opts: [c_int; 2] = [
            driver::JIT_ERROR_LOG_BUFFER,
            driver::JIT_ERROR_LOG_BUFFER_SIZE_BYTES,
        ];
        let mut vals: [*mut c_void; 2] = [
            log.as_mut_ptr() as *mut c_void,
            log.len() as usize as *mut c_void,
        ];
        let mut module: Handle = std::ptr::null_mut();
        // SAFETY: a whole image (an ELF's own headers give its size); option arrays of 2 with
        // a log buffer of the given size.
        let r = unsafe {
            (self.api().module_load_data_ex)(
                &mut module,
                image.as_ptr() as *const c_void,
                opts.len() as c_uint,
                opts.as_mut_ptr(),
                vals.as_mut_ptr(),
            )
        };
        if r != driver::SUCCESS {
            let (name, msg) = self.api().describe(r);
            let jit: String = String::from_utf8_lossy(&log)
                .trim_end_matches('\0')
                .trim()
                .to_string();
            let hint = if driver::IMAGE_ERRORS.contains(&r) {
                format!(
                    "; the module was compiled for {} by NVRTC {}, and the driver is CUDA {}.{}: use an NVRTC no newer than the driver's CUDA (see WRNC_NVRTC), and precompile (`wrnc precompile --arch`) for this GPU's architecture",
                    self.info.arch(),
                    crate::nvrtc::version()
                        .map_or("(unknown)".into(), |(a, b)| format!("{a}.{b}")),
                    self.info.driver_version / 1000,
                    self.info.driver_version % 1000 / 10
                )
            } else {
                String::new()
            };
            return Err(CudaError::ModuleImage {
                code: r,
                detail: format!("cuModuleLoadDataEx: {name}: {msg}{hint}\n{jit}"),
            });
        }
        let mut m = Module {
            ctx: self.ctx.clone(),
            module,
            functions: vec![],
            names: names.to_vec(),
        };
        for n in names {
            let c = CString::new(n.as_str()).map_err(|_| CudaError::Module {
                detail: format!("kernel name {n:?} contains a NUL byte"),
            })?;
            let mut f: Handle = std::ptr::null_mut();
            // SAFETY: loaded module, NUL-terminated name, valid out-pointer.
            self.api().check(
                unsafe { (self.api().module_get_function)(&mut f, m.module, c.as_ptr()) },
                &format!("cuModuleGetFunction({n})"),
            )?;
            m.functions.push(f);
        }
        Ok(m)
    }

    /// Lets every launch of function `index` of `module` (kernel `kernel`) use `bytes` of
    /// dynamic shared memory: beyond 48 KiB a kernel must opt in
    /// (`CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`). Refused, naming the kernel, where
    /// its static and dynamic shared memory together exceed what this GPU allows a block.
    pub fn allow_dynamic_smem(
        &self,
        module: &Module,
        index: usize,
        bytes: u32,
        kernel: &str,
    ) -> Result<(), CudaError> {
        let f = *module
            .functions
            .get(index)
            .ok_or_else(|| CudaError::Module {
                detail: format!("no function {index} in the module ({kernel})"),
            })?;
        let mut stat: c_int = 0;
        // SAFETY: a function of a loaded module, valid out-pointer.
        self.api().check(
            unsafe {
                (self.api().func_get_attribute)(&mut stat, driver::FUNC_SHARED_SIZE_BYTES, f)
            },
            &format!("cuFuncGetAttribute({kernel}, SHARED_SIZE_BYTES)"),
        )?;
        let total = stat.max(0) as u64 + bytes as u64;
        if total > self.info.smem_optin_bytes as u64 {
            return Err(CudaError::Module {
                detail: format!(
                    "kernel {kernel} needs {total} bytes of shared memory per block ({stat} static + {bytes} dynamic); {} allows {} bytes: use fewer --stages",
                    self.info.name, self.info.smem_optin_bytes
                ),
            });
        }
        // SAFETY: as above; the value is within the device's limit.
        self.api().check(
            unsafe {
                (self.api().func_set_attribute)(
                    f,
                    driver::FUNC_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes as c_int,
                )
            },
            &format!("cuFuncSetAttribute({kernel}, MAX_DYNAMIC_SHARED_SIZE_BYTES, {bytes})"),
        )
    }

    /// The driver can encode tensor maps (`cuTensorMapEncodeTiled`, CUDA 12.0+), which a
    /// schedule with TMA launches (`--tma`) needs; else an error that says so.
    pub fn check_tma(&self) -> Result<(), CudaError> {
        match self.api().tensor_map_encode_tiled {
            Some(_) => Ok(()),
            None => Err(CudaError::Call {
                call: "cuTensorMapEncodeTiled".into(),
                code: 0,
                name: "missing".into(),
                message: format!(
                    "the CUDA driver {} has no cuTensorMapEncodeTiled (TMA needs a CUDA 12.0 or later driver); run without --tma",
                    self.api().path
                ),
            }),
        }
    }

    /// Encodes the tensor map of a dense bf16 tensor at `addr` (innermost dimension first,
    /// [`ArgValue::TensorMap`]) into `slot` with `cuTensorMapEncodeTiled`: no interleave, the
    /// swizzle mode of `swizzle` bytes (0: none), element strides 1, zeros outside the tensor.
    fn encode_tensor_map(
        &self,
        slot: &mut ArgSlot,
        addr: u64,
        dims: [u64; 4],
        box_dim: [u32; 4],
        swizzle: u32,
    ) -> Result<(), CudaError> {
        let Some(encode) = self.api().tensor_map_encode_tiled else {
            // the error that says which driver and what to do
            return self.check_tma();
        };
        let strides = [
            dims[0] * 2,
            dims[0] * dims[1] * 2,
            dims[0] * dims[1] * dims[2] * 2,
        ];
        let elem_strides = [1u32; 4];
        let swizzle_mode = match swizzle {
            0 => driver::TENSOR_MAP_SWIZZLE_NONE,
            32 => driver::TENSOR_MAP_SWIZZLE_32B,
            64 => driver::TENSOR_MAP_SWIZZLE_64B,
            128 => driver::TENSOR_MAP_SWIZZLE_128B,
            other => {
                return Err(CudaError::Plan(format!(
                    "a tensor map with a {other}-byte swizzle (TMA has 32, 64 and 128)"
                )))
            }
        };
        // SAFETY: `slot` is 128 writable, 64-byte aligned bytes; the arrays hold `rank` (4)
        // dimensions and `rank - 1` strides, as the prototype reads them.
        let r = unsafe {
            encode(
                slot.0.as_mut_ptr() as *mut c_void,
                driver::TENSOR_MAP_BF16,
                4,
                addr as *mut c_void,
                dims.as_ptr(),
                strides.as_ptr(),
                box_dim.as_ptr(),
                elem_strides.as_ptr(),
                0,
                swizzle_mode,
                driver::TENSOR_MAP_L2_128B,
                0,
            )
        };
        self.api().check(
            r,
            &format!("cuTensorMapEncodeTiled(bf16 {dims:?} at {addr:#x}, box {box_dim:?}, swizzle {swizzle} bytes)"),
        )
    }

    /// Launches function `index` of `module` on the stream with `args` (packed per [`super::layout::pack`]).
    #[allow(clippy::too_many_arguments)]
    pub fn launch(
        &self,
        module: &Module,
        index: usize,
        grid: [u32; 3],
        block: [u32; 3],
        shared: u32,
        args: &[ArgValue],
        kernel: &str,
        note: &str,
    ) -> Result<(), CudaError> {
        let f = *module
            .functions
            .get(index)
            .ok_or_else(|| CudaError::Launch {
                kernel: kernel.to_string(),
                note: note.to_string(),
                detail: format!("no function {index} in the module"),
            })?;
        let fail = |e: CudaError| CudaError::Launch {
            kernel: kernel.to_string(),
            note: note.to_string(),
            detail: e.to_string(),
        };
        // one 64-byte aligned, 128-byte slot per argument: a scalar or pointer in its first 8
        // bytes, a tensor map (which must be 64-byte aligned) in all of it
        let mut slots: Vec<ArgSlot> = Vec::with_capacity(args.len());
        for a in args {
            let mut s = ArgSlot([0; 16]);
            match (a.slot(), a) {
                (Some(v), _) => s.0[0] = v,
                (
                    None,
                    &ArgValue::TensorMap {
                        addr,
                        dims,
                        box_dim,
                        swizzle,
                    },
                ) => self
                    .encode_tensor_map(&mut s, addr, dims, box_dim, swizzle)
                    .map_err(fail)?,
                (None, _) => unreachable!("only tensor maps have no 8-byte slot"),
            }
            slots.push(s);
        }
        let mut ptrs: Vec<*mut c_void> = slots
            .iter_mut()
            .map(|s| s as *mut ArgSlot as *mut c_void)
            .collect();
        // SAFETY: `f` comes from a loaded module (kept alive by `module`); `ptrs` holds one pointer per kernel
        // parameter (the schedule was validated against the kernel's signature), each to an
        // 8-byte slot that outlives the call (the driver copies the values).
        let r = unsafe {
            (self.api().launch_kernel)(
                f,
                grid[0],
                grid[1],
                grid[2],
                block[0],
                block[1],
                block[2],
                shared,
                self.stream,
                ptrs.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        };
        self.api().check(r, "cuLaunchKernel").map_err(fail)?;
        if self.sync_each && !self.capturing.get() {
            // SAFETY: our stream.
            let r = unsafe { (self.api().stream_synchronize)(self.stream) };
            self.api().check(r, "cuStreamSynchronize").map_err(fail)?;
        }
        Ok(())
    }

    pub fn event(&self) -> Result<Event, CudaError> {
        self.ctx.bind()?;
        let mut ev: Handle = std::ptr::null_mut();
        // SAFETY: valid out-pointer; flags 0 (timing enabled).
        self.api().check(
            unsafe { (self.api().event_create)(&mut ev, 0) },
            "cuEventCreate",
        )?;
        Ok(Event {
            ctx: self.ctx.clone(),
            ev,
        })
    }

    pub fn record(&self, e: &Event) -> Result<(), CudaError> {
        // SAFETY: our event and stream.
        self.api().check(
            unsafe { (self.api().event_record)(e.ev, self.stream) },
            "cuEventRecord",
        )
    }

    /// Milliseconds between two recorded events (waits for `end`).
    pub fn elapsed_ms(&self, start: &Event, end: &Event) -> Result<f32, CudaError> {
        // SAFETY: recorded events.
        let r = unsafe { (self.api().event_synchronize)(end.ev) };
        self.api()
            .check(r, "cuEventSynchronize")
            .map_err(|e| CudaError::Fault {
                during: "a timed run".into(),
                detail: e.to_string(),
            })?;
        let mut ms = 0f32;
        // SAFETY: valid out-pointer, recorded events.
        self.api().check(
            unsafe { (self.api().event_elapsed)(&mut ms, start.ev, end.ev) },
            "cuEventElapsedTime",
        )?;
        Ok(ms)
    }

    /// Records everything `body` launches on the stream into a CUDA graph instead of running
    /// it, and instantiates the graph.
    pub fn capture(
        &self,
        body: impl FnOnce() -> Result<(), CudaError>,
    ) -> Result<GraphExec, CudaError> {
        self.ctx.bind()?;
        self.synchronize("capture")?;
        // SAFETY: our stream, thread-local capture mode.
        self.api().check(
            unsafe {
                (self.api().stream_begin_capture)(self.stream, driver::CAPTURE_MODE_THREAD_LOCAL)
            },
            "cuStreamBeginCapture",
        )?;
        self.capturing.set(true);
        let res = body();
        self.capturing.set(false);
        let mut graph: Handle = std::ptr::null_mut();
        // SAFETY: ends the capture begun above (also after a failed body).
        let r = unsafe { (self.api().stream_end_capture)(self.stream, &mut graph) };
        if let Err(e) = res {
            if !graph.is_null() {
                // SAFETY: the partial graph the capture made, destroyed once.
                unsafe { (self.api().graph_destroy)(graph) };
            }
            return Err(e);
        }
        self.api().check(r, "cuStreamEndCapture")?;
        let mut exec: Handle = std::ptr::null_mut();
        // SAFETY: a captured graph, valid out-pointer.
        let r = unsafe { (self.api().graph_instantiate)(&mut exec, graph, 0) };
        if let Err(e) = self.api().check(r, "cuGraphInstantiate") {
            // SAFETY: the graph was created by the capture and is destroyed once.
            unsafe { (self.api().graph_destroy)(graph) };
            return Err(e);
        }
        Ok(GraphExec {
            ctx: self.ctx.clone(),
            graph,
            exec,
        })
    }

    /// Launches an instantiated graph on the stream.
    pub fn replay(&self, g: &GraphExec) -> Result<(), CudaError> {
        // SAFETY: an instantiated graph; our stream.
        self.api().check(
            unsafe { (self.api().graph_launch)(g.exec, self.stream) },
            "cuGraphLaunch",
        )
    }
}

/// One kernel argument as `cuLaunchKernel` reads it: 128 bytes, 64-byte aligned (a
/// `CUtensorMap`'s size and alignment; a scalar or pointer uses the first 8).
#[repr(C, align(64))]
struct ArgSlot([u64; 16]);
