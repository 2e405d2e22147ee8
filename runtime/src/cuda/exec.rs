//! An [`Executor`]: one schedule compiled, loaded and laid out on a GPU, with the host-side
//! operations around it (upload, launch, download, graph capture).
//!
//! Several executors of one model share its parameters, gradients, momentum, BN state and
//! optimizer table through a [`Shared`] set (see [`super::layout`]): e.g. the training step at
//! the full batch, the step of the last partial batch, and inference.

use std::collections::BTreeMap;
use std::rc::Rc;

use wrnc_compiler::codegen;
use wrnc_compiler::passes::{Fusion, Mode};
use wrnc_compiler::schedule::{self, Dtype, Options, Role, Schedule};
use wrnc_compiler::schedule::{HYPER_LEN, HYPER_NONFINITE};

use super::cache::ModuleCache;
use super::device::{DeviceBuffer, Gpu, GraphExec, Module};
use super::layout::{self, Hyper, Layout, Place};
use super::CudaError;
use crate::Tensor;

/// Model-wide device buffers bound by name (see [`super::layout::SHARED`]).
#[derive(Default)]
pub struct Shared {
    bufs: BTreeMap<String, Rc<DeviceBuffer>>,
}

impl Shared {
    pub fn new() -> Shared {
        Shared::default()
    }
    pub fn ptr(&self, name: &str) -> Option<u64> {
        self.bufs.get(name).map(|b| b.ptr())
    }
    /// Bytes allocated so far.
    pub fn bytes(&self) -> u64 {
        self.bufs.values().map(|b| b.bytes()).sum()
    }
}

/// `f32` -> bf16 bits, round to nearest even, NaN kept (the generated code's `wrnc_st`).
pub fn f32_to_bf16(v: f32) -> u16 {
    crate::reference::bf16_bits(v)
}

/// bf16 bits -> `f32` (exact).
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// Host values as the bytes of a buffer of `dtype` (activations may be bf16).
pub fn encode(values: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::Bf16 => values
            .iter()
            .flat_map(|&v| f32_to_bf16(v).to_le_bytes())
            .collect(),
        _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// The inverse of [`encode`] for `F32` and `Bf16` buffers.
pub fn decode(bytes: &[u8], dtype: Dtype) -> Vec<f32> {
    match dtype {
        Dtype::Bf16 => bytes
            .chunks_exact(2)
            .map(|c| bf16_to_f32(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        _ => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    }
}

/// One schedule on one GPU.
pub struct Executor {
    pub schedule: Schedule,
    pub layout: Layout,
    module: Module,
    own: DeviceBuffer,
    shared: BTreeMap<String, Rc<DeviceBuffer>>,
    addr: Vec<Option<u64>>,
    /// Whether the PTX came from the on-disk cache.
    pub cache_hit: bool,
}

fn describe(s: &Schedule, fusion: &Fusion) -> String {
    format!(
        "the {} {} schedule of {}",
        if fusion.unfused { "unfused" } else { "fused" },
        match s.mode {
            Mode::Train => "training",
            Mode::Infer => "inference",
        },
        s.name
    )
}

impl Executor {
    /// Compiles (through the module cache), loads and lays out `s`, binding its shared buffers
    /// in `shared` (allocating those not there yet, zero-filled). The optimizer table is
    /// uploaded; everything else starts zero.
    pub fn new(
        gpu: &Gpu,
        s: Schedule,
        fusion: &Fusion,
        shared: &mut Shared,
        cache: &ModuleCache,
    ) -> Result<Executor, CudaError> {
        s.validate().map_err(CudaError::Plan)?;
        let what = describe(&s, fusion);
        let layout = Layout::new(&s);
        // memory check before anything is allocated
        let mut need = layout.own_bytes;
        for p in &layout.places {
            if let Place::Shared { name, bytes } = p {
                match shared.bufs.get(name) {
                    Some(b) if b.bytes() != *bytes => {
                        return Err(CudaError::Plan(format!(
                            "shared buffer `{name}` is {} bytes, {what} wants {bytes}",
                            b.bytes()
                        )))
                    }
                    Some(_) => {}
                    None => need += bytes,
                }
            }
        }
        let (major, minor) = gpu.info().compute_capability;
        let need_cc = s.min_compute_capability();
        if ((major * 10 + minor) as u32) < need_cc {
            let (engine, instead) = if s.precision == wrnc_compiler::ast::Precision::F32 {
                (
                    "--tf32 and --tf32x3 run the f32 convolutions on TF32",
                    "run without them",
                )
            } else {
                (
                    "--precision bf16 runs the convolutions on bf16",
                    "use --precision f32",
                )
            };
            return Err(CudaError::Plan(format!(
                "{what}: {engine} tensor cores, which need compute capability {}.{} or later; \
                 {} is {major}.{minor}. {instead}",
                need_cc / 10,
                need_cc % 10,
                gpu.info().name
            )));
        }
        if s.uses_wgmma() && (major, minor) != (9, 0) {
            return Err(CudaError::Plan(format!(
                "{what} uses Hopper's warpgroup MMA (--wgmma), which runs only on sm_90; {} is sm_{major}{minor}",
                gpu.info().name
            )));
        }
        if s.launches
            .iter()
            .chain(&s.setup)
            .any(|l| !l.tmaps.is_empty())
        {
            gpu.check_tma()?;
        }
        let (free, total) = gpu.mem_info()?;
        if need > free {
            return Err(CudaError::OutOfMemory {
                what,
                batch: s.batch,
                need,
                free,
                total,
            });
        }
        let source = module_source(&s, fusion)?;
        let names: Vec<String> = s.kernels.iter().map(|k| k.name.clone()).collect();
        let arch = source.arch(&gpu.info().arch());
        let (module, cache_hit) = load_cached(gpu, cache, &arch, &source.text, &names)?;
        // kernels whose shared memory outgrows the static 48 KiB opt in to what they launch with
        let mut dynamic = vec![0u32; s.kernels.len()];
        for l in s.launches.iter().chain(&s.setup) {
            dynamic[l.kernel] = dynamic[l.kernel].max(l.shared);
        }
        for (i, &bytes) in dynamic.iter().enumerate() {
            if bytes > 0 {
                gpu.allow_dynamic_smem(&module, i, bytes, &s.kernels[i].name)?;
            }
        }
        let own = gpu.alloc(layout.own_bytes, &what, s.batch)?;
        let mut mine = BTreeMap::new();
        for p in &layout.places {
            if let Place::Shared { name, bytes } = p {
                let b = match shared.bufs.get(name) {
                    Some(b) => b.clone(),
                    None => {
                        let b = Rc::new(gpu.alloc(*bytes, &what, s.batch)?);
                        shared.bufs.insert(name.clone(), b.clone());
                        b
                    }
                };
                mine.insert(name.clone(), b);
            }
        }
        let addr = layout.addresses(own.ptr(), &|n| mine.get(n).map(|b| b.ptr()))?;
        let ex = Executor {
            schedule: s,
            layout,
            module,
            own,
            shared: mine,
            addr,
            cache_hit,
        };
        if let Some(t) = ex.schedule.buffer("sgd_table") {
            let table: Vec<u8> = schedule::sgd_table(&ex.schedule)
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            ex.write_bytes(gpu, t, &table)?;
        }
        Ok(ex)
    }

    /// Device bytes this executor allocated itself (shared buffers not counted).
    pub fn own_bytes(&self) -> u64 {
        self.own.bytes()
    }

    /// Device bytes of the shared buffers it uses.
    pub fn shared_bytes(&self) -> u64 {
        self.shared.values().map(|b| b.bytes()).sum()
    }

    fn buffer_addr(&self, i: usize) -> Result<u64, CudaError> {
        self.addr.get(i).copied().flatten().ok_or_else(|| {
            CudaError::Plan(format!(
                "buffer {} has no device storage in {}",
                self.schedule
                    .buffers
                    .get(i)
                    .map(|b| b.name.as_str())
                    .unwrap_or("?"),
                self.schedule.name
            ))
        })
    }

    /// Writes a whole buffer's bytes (the length must match exactly).
    pub fn write_bytes(&self, gpu: &Gpu, i: usize, bytes: &[u8]) -> Result<(), CudaError> {
        let want = layout::buffer_bytes(&self.schedule, i);
        if bytes.len() as u64 != want {
            return Err(CudaError::Input(format!(
                "{}: {} bytes given, the buffer holds {want}",
                self.schedule.buffers[i].name,
                bytes.len()
            )));
        }
        gpu.upload(self.buffer_addr(i)?, bytes)
    }

    /// Reads a whole buffer's bytes.
    pub fn read_bytes(&self, gpu: &Gpu, i: usize) -> Result<Vec<u8>, CudaError> {
        let mut out = vec![0u8; layout::buffer_bytes(&self.schedule, i) as usize];
        gpu.download(self.buffer_addr(i)?, &mut out)?;
        Ok(out)
    }

    /// Writes `values` into an `F32` or `Bf16` buffer (converted to its element type).
    pub fn write_f32(&self, gpu: &Gpu, i: usize, values: &[f32]) -> Result<(), CudaError> {
        self.write_bytes(gpu, i, &encode(values, self.schedule.buffers[i].dtype))
    }

    /// Reads an `F32` or `Bf16` buffer as `f32`.
    pub fn read_f32(&self, gpu: &Gpu, i: usize) -> Result<Vec<f32>, CudaError> {
        Ok(decode(
            &self.read_bytes(gpu, i)?,
            self.schedule.buffers[i].dtype,
        ))
    }

    /// The device address of buffer `i` (for kernels of the caller's own, e.g. augmentation).
    pub fn address(&self, i: usize) -> Result<u64, CudaError> {
        self.buffer_addr(i)
    }

    fn launch_all(
        &self,
        gpu: &Gpu,
        launches: &[schedule::Launch],
        h: &Hyper,
    ) -> Result<(), CudaError> {
        for l in launches {
            let args = layout::pack(&self.schedule, l, &self.addr, h)?;
            let k = &self.schedule.kernels[l.kernel];
            gpu.launch(
                &self.module,
                l.kernel,
                l.grid,
                l.block,
                l.shared,
                &args,
                &k.name,
                &l.note,
            )?;
        }
        Ok(())
    }

    /// Runs the setup launches (inference: BN folding), once after the parameters change.
    pub fn run_setup(&self, gpu: &Gpu, h: &Hyper) -> Result<(), CudaError> {
        self.launch_all(gpu, &self.schedule.setup, h)
    }

    /// The schedule's `hyper` buffer (`Role::Hyper`), if it has one.
    fn hyper_buffer(&self) -> Option<usize> {
        self.schedule
            .buffers
            .iter()
            .position(|b| b.role == Role::Hyper)
    }

    /// Writes the per-step scalars of `h` (`[step, lr, 0]`: the non-finite-loss flag cleared)
    /// into the schedule's `hyper` buffer (`Role::Hyper`), after the stream's pending work; a
    /// no-op for schedules without one.
    pub fn write_hyper(&self, gpu: &Gpu, h: &Hyper) -> Result<(), CudaError> {
        match self.hyper_buffer() {
            Some(i) => {
                let mut words = vec![0u32; HYPER_LEN as usize];
                words[0] = h.step;
                words[1] = h.lr.to_bits();
                let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
                self.write_bytes(gpu, i, &bytes)
            }
            None => Ok(()),
        }
    }

    /// Whether the last step's loss kernel found a loss that is not finite (the `hyper`
    /// buffer's [`HYPER_NONFINITE`] word), in which case its optimizer changed nothing.
    /// `false` for schedules without a `hyper` buffer.
    pub fn nonfinite_loss(&self, gpu: &Gpu) -> Result<bool, CudaError> {
        match self.hyper_buffer() {
            Some(i) => {
                let b = self.read_bytes(gpu, i)?;
                let at = 4 * HYPER_NONFINITE;
                let w = b
                    .get(at..at + 4)
                    .ok_or_else(|| CudaError::Plan("the hyper buffer is too short".into()))?;
                Ok(u32::from_le_bytes([w[0], w[1], w[2], w[3]]) != 0)
            }
            None => Ok(false),
        }
    }

    fn launches(&self, range: std::ops::Range<usize>) -> Result<&[schedule::Launch], CudaError> {
        self.schedule
            .launches
            .get(range.clone())
            .ok_or_else(|| CudaError::Plan(format!("launch range {range:?} out of bounds")))
    }

    /// Enqueues the step's launches `range` (all of them: `0..launches.len()`), with the
    /// per-step scalars of `h`.
    pub fn run_range(
        &self,
        gpu: &Gpu,
        h: &Hyper,
        range: std::ops::Range<usize>,
    ) -> Result<(), CudaError> {
        let ls = self.launches(range)?;
        self.write_hyper(gpu, h)?;
        self.launch_all(gpu, ls, h)
    }

    /// Enqueues launch `li` alone, counting the setup launches first (as
    /// [`crate::reference::check_kernels`] numbers them).
    pub fn run_one(&self, gpu: &Gpu, h: &Hyper, li: usize) -> Result<(), CudaError> {
        let s = &self.schedule;
        let l = s
            .setup
            .iter()
            .chain(&s.launches)
            .nth(li)
            .ok_or_else(|| CudaError::Plan(format!("no launch {li}")))?;
        self.write_hyper(gpu, h)?;
        self.launch_all(gpu, std::slice::from_ref(l), h)
    }

    /// Times launch `li` of the step (an index into `launches`) alone: one launch to warm
    /// up, then the median of `reps` launches, each between two CUDA events, in microseconds.
    pub fn time_launch(
        &self,
        gpu: &Gpu,
        h: &Hyper,
        li: usize,
        reps: usize,
    ) -> Result<f64, CudaError> {
        let l = std::slice::from_ref(
            self.schedule
                .launches
                .get(li)
                .ok_or_else(|| CudaError::Plan(format!("no launch {li}")))?,
        );
        self.write_hyper(gpu, h)?;
        self.launch_all(gpu, l, h)?;
        let (start, end) = (gpu.event()?, gpu.event()?);
        let mut v = Vec::with_capacity(reps);
        for _ in 0..reps.max(1) {
            gpu.record(&start)?;
            self.launch_all(gpu, l, h)?;
            gpu.record(&end)?;
            v.push(gpu.elapsed_ms(&start, &end)? as f64 * 1000.0);
        }
        Ok(super::bench::Timing::from_samples(v).median_ms)
    }

    /// Times every launch of a step where it runs within the step: `reps` steps, each enqueued
    /// launch by launch with a CUDA event between every two (an event recorded on the stream
    /// between two launches adds no dependency they do not have on one stream), then per
    /// launch the median of its `reps` times, in milliseconds. `h`'s scalars are written once,
    /// before the first step.
    pub fn profile_step(&self, gpu: &Gpu, h: &Hyper, reps: usize) -> Result<Vec<f64>, CudaError> {
        let ls = &self.schedule.launches;
        let events = (0..=ls.len())
            .map(|_| gpu.event())
            .collect::<Result<Vec<_>, _>>()?;
        self.write_hyper(gpu, h)?;
        let mut samples = vec![Vec::with_capacity(reps); ls.len()];
        for _ in 0..reps.max(1) {
            gpu.record(&events[0])?;
            for (i, l) in ls.iter().enumerate() {
                self.launch_all(gpu, std::slice::from_ref(l), h)?;
                gpu.record(&events[i + 1])?;
            }
            for (i, v) in samples.iter_mut().enumerate() {
                v.push(gpu.elapsed_ms(&events[i], &events[i + 1])? as f64);
            }
        }
        Ok(samples
            .into_iter()
            .map(|v| super::bench::Timing::from_samples(v).median_ms)
            .collect())
    }

    /// Enqueues one whole step / batch without writing the per-step scalars: the caller has
    /// written `h`'s with [`Executor::write_hyper`] (timing loops keep that copy out of the
    /// timed region).
    pub fn enqueue(&self, gpu: &Gpu, h: &Hyper) -> Result<(), CudaError> {
        self.launch_all(gpu, &self.schedule.launches, h)
    }

    /// Enqueues one whole step / batch.
    pub fn run(&self, gpu: &Gpu, h: &Hyper) -> Result<(), CudaError> {
        self.run_range(gpu, h, 0..self.schedule.launches.len())
    }

    /// Captures one whole step into a CUDA graph. The per-step scalars (step, learning rate)
    /// are read from the `hyper` buffer when the graph runs, so [`Executor::replay`] runs any
    /// step; the others of `h` (seed, momentum, weight decay, Nesterov, label smoothing) are
    /// fixed in the graph.
    pub fn capture(&self, gpu: &Gpu, h: &Hyper) -> Result<GraphExec, CudaError> {
        self.capture_range(gpu, h, 0..self.schedule.launches.len())
    }

    /// [`Executor::capture`] of the launches `range` only.
    pub fn capture_range(
        &self,
        gpu: &Gpu,
        h: &Hyper,
        range: std::ops::Range<usize>,
    ) -> Result<GraphExec, CudaError> {
        let ls = self.launches(range)?;
        gpu.capture(|| self.launch_all(gpu, ls, h))
    }

    /// Runs a graph captured from this executor with the per-step scalars of `h`.
    pub fn replay(&self, gpu: &Gpu, g: &GraphExec, h: &Hyper) -> Result<(), CudaError> {
        self.write_hyper(gpu, h)?;
        gpu.replay(g)
    }

    fn f32_buffer(&self, name: &str) -> Result<usize, CudaError> {
        self.schedule
            .buffer(name)
            .ok_or_else(|| CudaError::Plan(format!("the schedule has no `{name}` buffer")))
    }

    /// Uploads parameters (by the graph's names) into the `params` arena, and BN running
    /// statistics (`<bn>.running_mean` / `.running_var`) into `state`. Every tensor of the
    /// schedule must be present with the right length.
    pub fn load_state(
        &self,
        gpu: &Gpu,
        params: &BTreeMap<String, Tensor>,
        buffers: &BTreeMap<String, Tensor>,
    ) -> Result<(), CudaError> {
        let s = &self.schedule;
        let pb = self.f32_buffer("params")?;
        let mut arena = vec![0f32; s.buffers[pb].len as usize];
        for p in &s.params {
            let t = params
                .get(&p.name)
                .ok_or_else(|| CudaError::Input(format!("parameter {} is missing", p.name)))?;
            if t.data.len() as u64 != p.len {
                return Err(CudaError::Input(format!(
                    "parameter {} has {} values, the network {}",
                    p.name,
                    t.data.len(),
                    p.len
                )));
            }
            arena[p.offset as usize..(p.offset + p.len) as usize].copy_from_slice(&t.data);
        }
        self.write_f32(gpu, pb, &arena)?;
        let sb = self.f32_buffer("state")?;
        let mut state = vec![0f32; s.buffers[sb].len as usize];
        for (bn, off, len) in &s.state {
            let c = (*len / 2) as usize;
            for (k, what) in ["running_mean", "running_var"].iter().enumerate() {
                let name = format!("{bn}.{what}");
                let t = buffers
                    .get(&name)
                    .ok_or_else(|| CudaError::Input(format!("buffer {name} is missing")))?;
                if t.data.len() != c {
                    return Err(CudaError::Input(format!(
                        "buffer {name} has {} values, the network {c}",
                        t.data.len()
                    )));
                }
                let o = *off as usize + k * c;
                state[o..o + c].copy_from_slice(&t.data);
            }
        }
        self.write_f32(gpu, sb, &state)
    }

    /// Downloads parameters and BN running statistics, with the graph's names and shapes.
    #[allow(clippy::type_complexity)]
    pub fn save_state(
        &self,
        gpu: &Gpu,
        shapes: &BTreeMap<String, Vec<usize>>,
    ) -> Result<(BTreeMap<String, Tensor>, BTreeMap<String, Tensor>), CudaError> {
        let s = &self.schedule;
        let arena = self.read_f32(gpu, self.f32_buffer("params")?)?;
        let params = self.split_arena(&arena, shapes)?;
        let state = self.read_f32(gpu, self.f32_buffer("state")?)?;
        let mut buffers = BTreeMap::new();
        for (bn, off, len) in &s.state {
            let c = (*len / 2) as usize;
            let o = *off as usize;
            buffers.insert(
                format!("{bn}.running_mean"),
                Tensor::from_vec(&[c], state[o..o + c].to_vec()),
            );
            buffers.insert(
                format!("{bn}.running_var"),
                Tensor::from_vec(&[c], state[o + c..o + 2 * c].to_vec()),
            );
        }
        Ok((params, buffers))
    }

    /// Cuts a parameter-shaped arena (params, grads, momentum) into named tensors.
    pub fn split_arena(
        &self,
        arena: &[f32],
        shapes: &BTreeMap<String, Vec<usize>>,
    ) -> Result<BTreeMap<String, Tensor>, CudaError> {
        let mut out = BTreeMap::new();
        for p in &self.schedule.params {
            let shape = shapes.get(&p.name).cloned().unwrap_or(vec![p.len as usize]);
            if shape.iter().product::<usize>() as u64 != p.len
                || (p.offset + p.len) as usize > arena.len()
            {
                return Err(CudaError::Plan(format!(
                    "parameter {} does not fit",
                    p.name
                )));
            }
            out.insert(
                p.name.clone(),
                Tensor::from_vec(
                    &shape,
                    arena[p.offset as usize..(p.offset + p.len) as usize].to_vec(),
                ),
            );
        }
        Ok(out)
    }

    /// Builds a parameter-shaped arena from named tensors (missing ones are zero).
    pub fn join_arena(&self, tensors: &BTreeMap<String, Tensor>) -> Result<Vec<f32>, CudaError> {
        let pb = self.f32_buffer("params")?;
        let mut arena = vec![0f32; self.schedule.buffers[pb].len as usize];
        for p in &self.schedule.params {
            if let Some(t) = tensors.get(&p.name) {
                if t.data.len() as u64 != p.len {
                    return Err(CudaError::Input(format!(
                        "{} has {} values, the network {}",
                        p.name,
                        t.data.len(),
                        p.len
                    )));
                }
                arena[p.offset as usize..(p.offset + p.len) as usize].copy_from_slice(&t.data);
            }
        }
        Ok(arena)
    }
}

/// The CUDA C of `s` exactly as [`Executor::new`] compiles it (one definition, so that
/// [`precompile`] fills the cache with the entries the executors look up).
pub fn module_source(s: &Schedule, fusion: &Fusion) -> Result<ModuleSource, CudaError> {
    let opts = Options {
        tiles: Default::default(),
        layout: s.layout,
        mode: s.mode,
        batch: s.batch,
        precision: s.precision,
        fusion: fusion.clone(),
    };
    Ok(ModuleSource {
        text: codegen::cuda::write(s, &opts).map_err(|e| CudaError::Plan(e.message))?,
        wgmma: s.uses_wgmma(),
    })
}

/// A schedule's CUDA C and what its target depends on.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleSource {
    pub text: String,
    /// Uses Hopper's `wgmma` ([`Schedule::uses_wgmma`]): compiled for `sm_90a`.
    pub wgmma: bool,
}

impl ModuleSource {
    /// The architecture to compile for on a GPU of architecture `gpu_arch`.
    pub fn arch(&self, gpu_arch: &str) -> String {
        schedule::nvrtc_arch(gpu_arch, self.wgmma)
    }
}

/// What [`precompile`] did.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Precompiled {
    /// Distinct modules asked for.
    pub modules: usize,
    /// Of those, how many NVRTC compiled now and the cache stored.
    pub compiled: usize,
    /// Of those, how many were in the cache already (the rest failed to compile: their
    /// executors compile them again and report the error).
    pub cached: usize,
    /// Threads used.
    pub threads: usize,
    pub seconds: f64,
    /// The first compile error, if a source failed (the others are the same kind, or are
    /// said when their executors compile them again).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
}

/// Compiles the distinct `sources` into `cache` for `gpu`, on up to `threads` threads at once
/// (NVRTC compiles separate programs concurrently), so that the executors built next find
/// their modules cached instead of compiling one after another. A source that fails to
/// compile is skipped: its executor compiles it again and reports the error itself. Without
/// a cache (`WRNC_NO_CACHE`) nothing is done.
pub fn precompile(
    gpu: &Gpu,
    cache: &ModuleCache,
    sources: Vec<ModuleSource>,
    threads: usize,
) -> Result<Precompiled, CudaError> {
    precompile_for(&gpu.info().arch(), cache, sources, threads)
}

/// [`precompile`] for an architecture such as `sm_90` (no GPU needed: NVRTC alone).
pub fn precompile_for(
    arch: &str,
    cache: &ModuleCache,
    sources: Vec<ModuleSource>,
    threads: usize,
) -> Result<Precompiled, CudaError> {
    let t0 = std::time::Instant::now();
    let version = crate::nvrtc::version()?;
    // distinct by cache key (the source's hash and target), not by comparing whole sources
    let mut keys = std::collections::BTreeSet::new();
    let distinct: Vec<(String, ModuleSource)> = sources
        .into_iter()
        .map(|m| (super::cache::key(&m.text, &m.arch(arch), version), m))
        .filter(|(k, _)| keys.insert(k.clone()))
        .collect();
    let todo: Vec<(String, &str)> = distinct
        .iter()
        .filter(|(k, _)| cache.root().is_some() && cache.get(k).is_none())
        .map(|(_, m)| (m.arch(arch), m.text.as_str()))
        .collect();
    let threads = threads.clamp(1, todo.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let compiled = std::sync::atomic::AtomicUsize::new(0);
    let first_error = std::sync::Mutex::new(None::<String>);
    std::thread::scope(|sc| {
        for _ in 0..threads {
            sc.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some((a, src)) = todo.get(i) else { break };
                // compiled and stored (one that could not be written is said and not counted)
                match cache.get_or_compile(src, a, version, crate::nvrtc::compile_cubin) {
                    Ok(c) => {
                        if let Some(w) = &c.warning {
                            eprintln!("warning: {w}");
                        } else if !c.hit {
                            compiled.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                    Err(e) => {
                        let mut f = first_error.lock().unwrap_or_else(|p| p.into_inner());
                        f.get_or_insert_with(|| e.to_string());
                    }
                }
            });
        }
    });
    Ok(Precompiled {
        modules: distinct.len(),
        cached: if cache.root().is_some() {
            distinct.len() - todo.len()
        } else {
            0
        },
        compiled: compiled.into_inner(),
        threads,
        seconds: t0.elapsed().as_secs_f64(),
        first_error: first_error.into_inner().unwrap_or_else(|p| p.into_inner()),
    })
}

/// Threads for [`precompile`]: the machine's cores (`WRNC_JOBS` overrides).
pub fn compile_threads() -> usize {
    std::env::var("WRNC_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Compiles `source` through the cache and loads it; a cached entry whose image the driver
/// refuses ([`super::driver::IMAGE_ERRORS`]) is dropped and compiled afresh once.
fn load_cached(
    gpu: &Gpu,
    cache: &ModuleCache,
    arch: &str,
    source: &str,
    names: &[String],
) -> Result<(Module, bool), CudaError> {
    let version = crate::nvrtc::version()?;
    let c = cache.get_or_compile(source, arch, version, crate::nvrtc::compile_cubin)?;
    if let Some(w) = &c.warning {
        eprintln!("warning: {w}");
    }
    match gpu.load_module(&c.image, names) {
        Ok(m) => Ok((m, c.hit)),
        // the driver refused the image itself (not, say, for want of memory): e.g. a module
        // precompiled elsewhere for another driver; said, not fatal
        Err(e @ CudaError::ModuleImage { code, .. })
            if c.hit && super::driver::IMAGE_ERRORS.contains(&code) =>
        {
            eprintln!(
                "warning: the cached module {} did not load ({e}); compiling it again",
                c.key
            );
            cache.remove(&c.key);
            let image = crate::nvrtc::compile_cubin(source, arch)?;
            let _ = cache.put(&c.key, &image);
            gpu.load_module(&image, names)
                .map(|m| (m, false))
                .map_err(|e2| CudaError::Module {
                    detail: format!("{e2} (the cached copy failed too: {e})"),
                })
        }
        Err(e) => Err(e),
    }
}

/// Compiles and loads a standalone CUDA source of wrnc's own (e.g. the augmentation kernel).
pub fn load_source(
    gpu: &Gpu,
    cache: &ModuleCache,
    source: &str,
    names: &[String],
) -> Result<Module, CudaError> {
    load_cached(gpu, cache, &gpu.info().arch(), source, names).map(|(m, _)| m)
}

/// [`load_source`] for a module that uses Hopper's `wgmma` when `wgmma` (compiled for
/// `sm_90a` on an sm_90 GPU, as [`ModuleSource::arch`]).
pub fn load_source_wgmma(
    gpu: &Gpu,
    cache: &ModuleCache,
    source: &str,
    names: &[String],
    wgmma: bool,
) -> Result<Module, CudaError> {
    let arch = schedule::nvrtc_arch(&gpu.info().arch(), wgmma);
    load_cached(gpu, cache, &arch, source, names).map(|(m, _)| m)
}
