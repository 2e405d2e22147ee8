//! [`GpuTrainer`]: the GPU's [`Backend`] for the one training loop,
//! [`crate::train::train_with`]: the same configuration ([`TrainConfig`]), events, metrics,
//! checkpoints and exact resumption as on the CPU, because they are the loop's, not the
//! backend's. This module only runs the network on the device.
//!
//! What is the same as on the CPU, by construction: the initial weights
//! ([`crate::cpu::Model::new`]'s initialisation, or a checkpoint), the epoch shuffle, the
//! learning-rate schedule, the loss and accuracy, the NaN stop (no update from a NaN loss), the
//! checkpoint format and the partial-epoch sums (all the loop's), the augmentation (the same
//! keys, see [`super::augment`]) and the dropout masks (the same counter-based generator).
//! Checkpoints are interchangeable with the CPU's: a run can be resumed on the other device.
//!
//! What differs: arithmetic order (GPU reductions), so values agree to rounding, not bit for
//! bit. The last batch of an epoch, when smaller, runs through its own schedule built for its
//! size (BN batch statistics depend on it); evaluation pads the last batch (inference is per
//! image).

use std::collections::BTreeMap;

use wrnc_compiler::ast::Precision;
use wrnc_compiler::graph::Graph;
use wrnc_compiler::passes::{Fusion, Mode};
use wrnc_compiler::schedule::{self, F32Math, Layout, Options, Tiles, TF32_WITH_BF16};

use super::augment::{Augmenter, DeviceDataset};
use super::cache::ModuleCache;
use super::device::{DeviceBuffer, Gpu, GraphExec};
use super::exec::{Executor, Shared};
use super::layout::Hyper;
use super::tune::{choose_tiles, TileMode, TuneReport};
use super::{CudaError, DeviceInfo};
use crate::data::{augment_seed, Dataset, Normalization};
use crate::train::{
    evaluate_with, train_with, Backend, Event, StepAt, Tensors, TrainConfig, TrainError,
    TrainReport,
};
use crate::Tensor;

/// A failure of GPU training: the CPU loop's errors, or the GPU's.
#[derive(Debug, thiserror::Error)]
pub enum GpuTrainError {
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Cuda(#[from] CudaError),
    /// The device's f32 loss was not finite where the host's loss of the same logits was: the
    /// device skipped the update, so the run cannot go on as the loop expects.
    #[error("training stopped at step {step}: the GPU's f32 loss was not finite (so it skipped the update) although the host's loss of the same logits is; the logits are too large (lower the learning rate)")]
    DeviceNonFinite { step: u64 },
}

impl From<crate::checkpoint::CheckpointError> for GpuTrainError {
    fn from(e: crate::checkpoint::CheckpointError) -> Self {
        GpuTrainError::Train(e.into())
    }
}
impl From<crate::metrics::MetricsError> for GpuTrainError {
    fn from(e: crate::metrics::MetricsError) -> Self {
        GpuTrainError::Train(e.into())
    }
}
impl From<crate::cpu::Error> for GpuTrainError {
    fn from(e: crate::cpu::Error) -> Self {
        GpuTrainError::Train(e.into())
    }
}

/// A model on the GPU: its schedules (training step, partial last batch, inference) sharing
/// one set of weights, optimizer state and BN statistics on the device.
pub struct GpuTrainer {
    /// Whole training steps (forward, backward, update) captured as CUDA graphs, by batch
    /// size, with the values of the run they fix (all but step and lr, which the graphs read
    /// from the `hyper` buffer). Declared first: dropped before the executors whose kernels
    /// they launch.
    graphs: BTreeMap<usize, (Hyper, GraphExec)>,
    /// Whether steps replay graphs (off with `WRNC_NO_GRAPHS=1`, or after a capture failed).
    use_graphs: bool,
    gpu: Gpu,
    graph: Graph,
    precision: Precision,
    fusion: Fusion,
    batch: usize,
    eval_batch: usize,
    cache: ModuleCache,
    shared: Shared,
    /// Training steps by batch size (the full batch, and the last partial one when needed).
    steps: BTreeMap<usize, Executor>,
    infer: Option<Executor>,
    aug: Augmenter,
    shapes: BTreeMap<String, Vec<usize>>,
    /// The last training step, until the loop confirms its update: its step number and
    /// whether the device found its loss not finite (and so skipped the update).
    pending: Option<(u64, bool)>,
    /// Where evaluation's loader writes labels when the inference schedule has no labels
    /// buffer (allocated by [`Backend::begin_eval`]).
    eval_labels: Option<DeviceBuffer>,
    /// The tensor-core tiles every schedule is built with, and how they were chosen (bf16).
    tiles: Tiles,
    tile_report: Option<TuneReport>,
    /// The activation layout every schedule is built with.
    layout: Layout,
}

fn cfg_err(m: impl Into<String>) -> GpuTrainError {
    GpuTrainError::Train(TrainError::Config(m.into()))
}

impl GpuTrainer {
    /// Opens GPU `ordinal`, chooses the tensor-core tiles (bf16, or f32 with `f32_math` on
    /// the tensor cores: the convolutions in TF32 or 3xTF32, [`F32Math`]) as `tiles` says (see [`super::tune`]),
    /// compiles the training step of `graph` for `batch` with activations in
    /// `layout` and initialises the weights as [`crate::cpu::Model::new`] does with `seed`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ordinal: usize,
        graph: &Graph,
        batch: usize,
        eval_batch: usize,
        precision: Precision,
        fusion: Fusion,
        seed: u64,
        tiles: TileMode,
        f32_math: F32Math,
        layout: Layout,
    ) -> Result<GpuTrainer, GpuTrainError> {
        if batch == 0 || batch > 1 << 16 || eval_batch == 0 || eval_batch > 1 << 16 {
            return Err(cfg_err(format!(
                "batch sizes must lie in 1..=65536 (got {batch} and {eval_batch})"
            )));
        }
        crate::cpu::validate(graph)?;
        if f32_math.tensor_cores() && precision == Precision::Bf16 {
            return Err(cfg_err(TF32_WITH_BF16));
        }
        let gpu = Gpu::open(ordinal)?;
        let cache = ModuleCache::default_location();
        let aug = Augmenter::new(&gpu, precision, batch.max(eval_batch), &cache)?;
        let (tiles, tile_report) = if precision == Precision::Bf16 || f32_math.tensor_cores() {
            let bases = Self::tile_bases(batch, eval_batch, precision, &fusion, f32_math, layout);
            let (t, r) = choose_tiles(&gpu, &cache, graph, &bases, tiles)?;
            (t, Some(r))
        } else {
            (Tiles::default(), None)
        };
        let mut t = GpuTrainer {
            graphs: BTreeMap::new(),
            use_graphs: !std::env::var_os("WRNC_NO_GRAPHS")
                .is_some_and(|v| !v.is_empty() && v != "0"),
            gpu,
            graph: graph.clone(),
            precision,
            fusion,
            batch,
            eval_batch,
            cache,
            shared: Shared::new(),
            steps: BTreeMap::new(),
            infer: None,
            aug,
            shapes: graph
                .params()
                .into_iter()
                .map(|(n, p)| (n, p.shape))
                .collect(),
            pending: None,
            eval_labels: None,
            tiles,
            tile_report,
            layout,
        };
        t.step_executor(batch)?;
        let params = crate::init::init_params::<f32>(graph, seed);
        let buffers = crate::init::init_buffers::<f32>(graph);
        t.load(&params, &buffers, &BTreeMap::new())?;
        Ok(t)
    }

    pub fn device(&self) -> &DeviceInfo {
        self.gpu.info()
    }

    /// How the tensor-core tiles were chosen (`None` in f32 without 3xTF32: no tensor cores).
    pub fn tile_report(&self) -> Option<&TuneReport> {
        self.tile_report.as_ref()
    }

    fn build(&self, mode: Mode, batch: usize) -> Result<schedule::Schedule, GpuTrainError> {
        schedule::build(
            &self.graph,
            &Self::options(
                &self.tiles,
                self.layout,
                mode,
                batch,
                self.precision,
                &self.fusion,
            ),
        )
        .map_err(|e| cfg_err(e.message))
    }

    /// The options of every schedule a trainer builds: its training steps (the full batch and
    /// a partial last one), and inference at the evaluation batch. `wrnc precompile run`
    /// builds the same.
    pub fn options(
        tiles: &Tiles,
        layout: Layout,
        mode: Mode,
        batch: usize,
        precision: Precision,
        fusion: &Fusion,
    ) -> Options {
        Options {
            tiles: tiles.clone(),
            layout,
            mode,
            batch: batch as u32,
            precision,
            fusion: fusion.clone(),
        }
    }

    /// The bases whose tiles a trainer chooses together ([`choose_tiles`]): the training step
    /// at `batch` and inference at `eval_batch`.
    pub fn tile_bases(
        batch: usize,
        eval_batch: usize,
        precision: Precision,
        fusion: &Fusion,
        f32_math: F32Math,
        layout: Layout,
    ) -> [Options; 2] {
        let base = |mode, batch| {
            Self::options(
                &Tiles::default().with_f32_math(f32_math),
                layout,
                mode,
                batch,
                precision,
                fusion,
            )
        };
        [base(Mode::Train, batch), base(Mode::Infer, eval_batch)]
    }

    fn step_executor(&mut self, batch: usize) -> Result<&Executor, GpuTrainError> {
        if !self.steps.contains_key(&batch) {
            let s = self.build(Mode::Train, batch)?;
            let ex = Executor::new(&self.gpu, s, &self.fusion, &mut self.shared, &self.cache)?;
            self.steps.insert(batch, ex);
        }
        Ok(&self.steps[&batch])
    }

    fn infer_executor(&mut self) -> Result<&Executor, GpuTrainError> {
        if self.infer.is_none() {
            let s = self.build(Mode::Infer, self.eval_batch)?;
            self.infer = Some(Executor::new(
                &self.gpu,
                s,
                &self.fusion,
                &mut self.shared,
                &self.cache,
            )?);
        }
        Ok(self.infer.as_ref().expect("just built"))
    }

    /// Runs one whole training step for batch `n` (forward, loss gradient, backward and the
    /// update, which the device skips when the loss is not finite) with the step's values `h`:
    /// as one replayed CUDA graph, captured at the first step of that batch size, or on the
    /// stream when graphs are off. A graph is captured again if a value it fixes (seed,
    /// momentum, weight decay, Nesterov, label smoothing) differs from the ones it was
    /// captured with.
    fn run_step(&mut self, n: usize, h: &Hyper) -> Result<(), GpuTrainError> {
        let ex = self
            .steps
            .get(&n)
            .ok_or_else(|| CudaError::Plan(format!("no training step for batch {n}")))?;
        if !self.use_graphs {
            ex.run(&self.gpu, h)?;
            return Ok(());
        }
        let fixed = |a: &Hyper| Hyper {
            step: 0,
            lr: 0.0,
            ..*a
        };
        let fresh = self
            .graphs
            .get(&n)
            .is_some_and(|(at, _)| fixed(at) == fixed(h));
        if !fresh {
            match ex.capture(&self.gpu, h) {
                Ok(g) => {
                    self.graphs.insert(n, (*h, g));
                }
                // a fault of an earlier step that surfaces here is the run's error, not the
                // capture's: no fallback, and no warning that would hide it
                Err(e) if e.poisons_context() => return Err(e.into()),
                Err(e) => {
                    eprintln!("warning: CUDA graph capture failed, launching on the stream: {e}");
                    self.use_graphs = false;
                    ex.run(&self.gpu, h)?;
                    return Ok(());
                }
            }
        }
        ex.replay(&self.gpu, &self.graphs[&n].1, h)?;
        Ok(())
    }

    fn any_step(&self) -> &Executor {
        self.steps
            .values()
            .next()
            .expect("the full-batch step exists")
    }

    /// Uploads weights, BN statistics and momentum buffers (missing momentum is zero, as
    /// before a first step).
    pub fn load(
        &mut self,
        params: &BTreeMap<String, Tensor>,
        buffers: &BTreeMap<String, Tensor>,
        momentum: &BTreeMap<String, Tensor>,
    ) -> Result<(), GpuTrainError> {
        let ex = self.any_step();
        ex.load_state(&self.gpu, params, buffers)?;
        let m = ex.join_arena(momentum)?;
        let mb = ex
            .schedule
            .buffer("momentum")
            .ok_or_else(|| CudaError::Plan("no momentum buffer".into()))?;
        ex.write_f32(&self.gpu, mb, &m)?;
        Ok(())
    }

    /// Downloads weights and BN statistics (by the graph's names) and the momentum buffers.
    pub fn state(&self) -> Result<(Tensors, Tensors, Tensors), GpuTrainError> {
        let ex = self.any_step();
        let (p, b) = ex.save_state(&self.gpu, &self.shapes)?;
        let mb = ex
            .schedule
            .buffer("momentum")
            .ok_or_else(|| CudaError::Plan("no momentum buffer".into()))?;
        let m = ex.split_arena(&ex.read_f32(&self.gpu, mb)?, &self.shapes)?;
        Ok((p, b, m))
    }

    /// Loss and accuracy on `ds` (inference schedule, eval-mode BN), in batches of the
    /// evaluation batch size this trainer was built for.
    pub fn evaluate(
        &mut self,
        ds: &Dataset,
        norm: &Normalization,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<(f64, f64), GpuTrainError> {
        let dev = self.upload(ds, norm)?;
        let eb = self.eval_batch;
        evaluate_with(self, &dev, ds, norm, eb, on_event)
    }

    /// Trains on `train` for `cfg.epochs`, evaluating on `test` after every epoch: the loop
    /// [`crate::train::train_with`] on this backend. `cfg.batch` and `cfg.eval_batch` must be
    /// the sizes this trainer was built for.
    pub fn train(
        &mut self,
        train: &Dataset,
        test: Option<&Dataset>,
        cfg: &TrainConfig,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<TrainReport, GpuTrainError> {
        train_with(self, train, test, cfg, on_event)
    }
}

impl Backend for GpuTrainer {
    type Error = GpuTrainError;
    type Data = DeviceDataset;

    fn graph(&self) -> &Graph {
        &self.graph
    }

    fn check(&self, cfg: &TrainConfig) -> Result<(), GpuTrainError> {
        if cfg.batch != self.batch || cfg.eval_batch != self.eval_batch {
            return Err(cfg_err(format!(
                "the GPU trainer was built for batch {} / eval batch {}, the run asks for {} / {}",
                self.batch, self.eval_batch, cfg.batch, cfg.eval_batch
            )));
        }
        Ok(())
    }

    fn load_state(
        &mut self,
        params: Tensors,
        buffers: Tensors,
        momentum: Tensors,
    ) -> Result<(), GpuTrainError> {
        self.load(&params, &buffers, &momentum)
    }

    fn export_state(&self, step: u64) -> Result<(Tensors, Tensors), GpuTrainError> {
        let (p, b, m) = self.state()?;
        let mut tensors = p;
        tensors.extend(b);
        // as the CPU optimizer: no momentum buffers before the first step
        Ok((tensors, if step > 0 { m } else { BTreeMap::new() }))
    }

    fn upload(
        &mut self,
        ds: &Dataset,
        norm: &Normalization,
    ) -> Result<DeviceDataset, GpuTrainError> {
        Ok(DeviceDataset::upload(&self.gpu, ds, norm)?)
    }

    /// Builds the step for the epoch's last, smaller batch (when there is one).
    fn prepare(&mut self, train: &Dataset, cfg: &TrainConfig) -> Result<(), GpuTrainError> {
        let tail = train.n % cfg.batch;
        if tail != 0 {
            self.step_executor(tail)?;
        }
        Ok(())
    }

    /// Assembles the batch on the device and runs the whole step: the update is already
    /// applied when this returns, unless the device found the loss not finite (then it
    /// changed nothing, and the loop, seeing the same NaN in the logits, stops).
    fn train_forward(
        &mut self,
        data: &DeviceDataset,
        _ds: &Dataset,
        idx: &[usize],
        at: StepAt,
        cfg: &TrainConfig,
    ) -> Result<Tensor, GpuTrainError> {
        // an update is only ever for the latest forward
        self.pending = None;
        let classes = self.graph.classes as usize;
        let ex = self.steps.get(&idx.len()).ok_or_else(|| {
            CudaError::Plan(format!(
                "no training step was prepared for batch {} (call prepare first)",
                idx.len()
            ))
        })?;
        let labels_buf = ex
            .schedule
            .labels
            .ok_or_else(|| CudaError::Plan("the training step has no labels".into()))?;
        self.aug.run(
            &self.gpu,
            data,
            idx,
            idx.len(),
            cfg.augment,
            augment_seed(cfg.seed as u32, at.epoch as u32),
            ex.address(ex.schedule.input)?,
            ex.address(labels_buf)?,
        )?;
        let h = Hyper {
            seed: cfg.seed as u32,
            step: at.step as u32,
            lr: at.lr as f32,
            momentum: cfg.momentum as f32,
            weight_decay: cfg.weight_decay as f32,
            nesterov: cfg.nesterov,
            label_smoothing: cfg.label_smoothing as f32,
        };
        let logits_buf = ex.schedule.logits;
        self.run_step(idx.len(), &h)?;
        let ex = &self.steps[&idx.len()];
        let logits = ex.read_f32(&self.gpu, logits_buf)?;
        let skipped = ex.nonfinite_loss(&self.gpu)?;
        self.pending = Some((at.step, skipped));
        Ok(Tensor::from_vec(&[idx.len(), classes], logits))
    }

    /// Confirms the update the step already applied (the device computes its own loss
    /// gradient). The loop calls this only for a finite loss; if the device found its f32
    /// loss not finite all the same, it skipped the update, and this is an error.
    fn apply_update(&mut self, _dlogits: &Tensor) -> Result<(), GpuTrainError> {
        let (step, skipped) = self
            .pending
            .take()
            .ok_or_else(|| CudaError::Plan("an update without a forward".into()))?;
        if skipped {
            return Err(GpuTrainError::DeviceNonFinite { step });
        }
        Ok(())
    }

    fn end_epoch(&mut self) -> Result<(), GpuTrainError> {
        self.gpu.synchronize("the epoch's last step")?;
        Ok(())
    }

    /// Builds the inference schedule (once), runs its setup and, when it has no labels
    /// buffer, allocates a scratch slot for the loader's labels.
    fn begin_eval(&mut self) -> Result<(), GpuTrainError> {
        let eb = self.eval_batch;
        self.infer_executor()?;
        let ex = self.infer.as_ref().expect("built");
        ex.run_setup(&self.gpu, &Hyper::default())?;
        let has_labels = ex.schedule.buffer("labels").is_some();
        self.eval_labels = None;
        if !has_labels {
            self.eval_labels = Some(self.gpu.alloc(
                4 * eb as u64,
                "evaluation labels",
                eb as u32,
            )?);
        }
        Ok(())
    }

    /// Runs inference on images `idx` (padded to the evaluation batch size).
    fn infer(
        &mut self,
        data: &DeviceDataset,
        _ds: &Dataset,
        idx: &[usize],
        _norm: &Normalization,
    ) -> Result<Tensor, GpuTrainError> {
        let eb = self.eval_batch;
        let classes = self.graph.classes as usize;
        let ex = self
            .infer
            .as_ref()
            .ok_or_else(|| CudaError::Plan("inference before begin_eval".into()))?;
        let labels_ptr = match ex.schedule.buffer("labels") {
            Some(b) => ex.address(b)?,
            None => self
                .eval_labels
                .as_ref()
                .ok_or_else(|| CudaError::Plan("inference before begin_eval".into()))?
                .ptr(),
        };
        let h = Hyper::default();
        self.aug.run(
            &self.gpu,
            data,
            idx,
            eb,
            false,
            0,
            ex.address(ex.schedule.input)?,
            labels_ptr,
        )?;
        ex.run(&self.gpu, &h)?;
        let logits = ex.read_f32(&self.gpu, ex.schedule.logits)?;
        let m = idx.len();
        Ok(Tensor::from_vec(
            &[m, classes],
            logits[..m * classes].to_vec(),
        ))
    }
}
