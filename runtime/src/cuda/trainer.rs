//! [`GpuTrainer`]: the training loop of [`crate::train::train`] on the GPU, with the same
//! configuration ([`TrainConfig`]), events, metrics, checkpoints and exact resumption.
//!
//! What is the same as the CPU loop, by construction: the initial weights
//! ([`crate::cpu::Model::new`]'s initialisation, or a checkpoint), the epoch shuffle
//! ([`crate::data::shuffle`]), the augmentation (the same keys, see [`super::augment`]), the
//! dropout masks (the same counter-based generator), the learning-rate schedule
//! ([`crate::optim::lr_at`]), the loss and accuracy (computed on the host from the GPU's
//! logits with [`crate::loss::softmax_cross_entropy`]), the NaN stop before the update, the
//! checkpoint format and the partial-epoch sums. Checkpoints are interchangeable with the
//! CPU's: a run can be resumed on the other device.
//!
//! What differs: arithmetic order (GPU reductions), so values agree to rounding, not bit for
//! bit. The last batch of an epoch, when smaller, runs through its own schedule built for its
//! size (BN batch statistics depend on it); evaluation pads the last batch (inference is per
//! image).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use wrnc_compiler::ast::Precision;
use wrnc_compiler::graph::Graph;
use wrnc_compiler::passes::{Fusion, Mode};
use wrnc_compiler::schedule::{self, Options};

use super::augment::{Augmenter, DeviceDataset};
use super::cache::PtxCache;
use super::device::Gpu;
use super::exec::{Executor, Shared};
use super::layout::Hyper;
use super::{CudaError, DeviceInfo};
use crate::checkpoint::{self, Checkpoint, TrainState};
use crate::data::{augment_seed, shuffle, Dataset, Normalization};
use crate::loss::softmax_cross_entropy;
use crate::metrics::{EpochMetrics, MetricsWriter};
use crate::optim::lr_at;
use crate::train::{Event, TrainConfig, TrainError, TrainReport};
use crate::Tensor;

/// A failure of GPU training: the CPU loop's errors, or the GPU's.
#[derive(Debug, thiserror::Error)]
pub enum GpuTrainError {
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Cuda(#[from] CudaError),
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
    gpu: Gpu,
    graph: Graph,
    precision: Precision,
    fusion: Fusion,
    batch: usize,
    eval_batch: usize,
    cache: PtxCache,
    shared: Shared,
    /// Training steps by batch size (the full batch, and the last partial one when needed).
    steps: BTreeMap<usize, Executor>,
    infer: Option<Executor>,
    aug: Augmenter,
    shapes: BTreeMap<String, Vec<usize>>,
}

fn cfg_err(m: impl Into<String>) -> GpuTrainError {
    GpuTrainError::Train(TrainError::Config(m.into()))
}

impl GpuTrainer {
    /// Opens GPU `ordinal`, compiles the training step of `graph` for `batch` and initialises
    /// the weights as [`crate::cpu::Model::new`] does with `seed`.
    pub fn new(
        ordinal: usize,
        graph: &Graph,
        batch: usize,
        eval_batch: usize,
        precision: Precision,
        fusion: Fusion,
        seed: u64,
    ) -> Result<GpuTrainer, GpuTrainError> {
        if batch == 0 || batch > 1 << 16 || eval_batch == 0 || eval_batch > 1 << 16 {
            return Err(cfg_err(format!(
                "batch sizes must lie in 1..=65536 (got {batch} and {eval_batch})"
            )));
        }
        crate::cpu::validate(graph)?;
        let gpu = Gpu::open(ordinal)?;
        let cache = PtxCache::default_location();
        let aug = Augmenter::new(&gpu, precision, batch.max(eval_batch), &cache)?;
        let mut t = GpuTrainer {
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

    fn build(&self, mode: Mode, batch: usize) -> Result<schedule::Schedule, GpuTrainError> {
        schedule::build(
            &self.graph,
            &Options {
                mode,
                batch: batch as u32,
                precision: self.precision,
                fusion: self.fusion.clone(),
            },
        )
        .map_err(|e| cfg_err(e.message))
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
    #[allow(clippy::type_complexity)]
    pub fn state(
        &self,
    ) -> Result<
        (
            BTreeMap<String, Tensor>,
            BTreeMap<String, Tensor>,
            BTreeMap<String, Tensor>,
        ),
        GpuTrainError,
    > {
        let ex = self.any_step();
        let (p, b) = ex.save_state(&self.gpu, &self.shapes)?;
        let mb = ex
            .schedule
            .buffer("momentum")
            .ok_or_else(|| CudaError::Plan("no momentum buffer".into()))?;
        let m = ex.split_arena(&ex.read_f32(&self.gpu, mb)?, &self.shapes)?;
        Ok((p, b, m))
    }

    /// Loss and accuracy on `ds` (inference schedule, eval-mode BN).
    pub fn evaluate(
        &mut self,
        ds: &Dataset,
        norm: &Normalization,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<(f64, f64), GpuTrainError> {
        let dev = DeviceDataset::upload(&self.gpu, ds, norm)?;
        self.evaluate_on(&dev, ds, on_event)
    }

    fn evaluate_on(
        &mut self,
        dev: &DeviceDataset,
        ds: &Dataset,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<(f64, f64), GpuTrainError> {
        let eb = self.eval_batch;
        self.infer_executor()?;
        let ex = self.infer.as_ref().expect("built");
        let h = Hyper::default();
        ex.run_setup(&self.gpu, &h)?;
        let batches = ds.n.div_ceil(eb) as u64;
        on_event(Event::EvalStart { batches });
        let classes = self.graph.classes as usize;
        let (mut loss_sum, mut correct) = (0.0, 0usize);
        let all: Vec<usize> = (0..ds.n).collect();
        let labels_buf = ex
            .schedule
            .buffer("labels")
            .map(|b| ex.address(b))
            .transpose()?;
        // inference has no labels buffer: the loader's labels go to a scratch slot
        let scratch = match labels_buf {
            Some(_) => None,
            None => Some(
                self.gpu
                    .alloc(4 * eb as u64, "evaluation labels", eb as u32)?,
            ),
        };
        let labels_ptr = labels_buf.unwrap_or_else(|| scratch.as_ref().expect("set").ptr());
        for (b, chunk) in all.chunks(eb).enumerate() {
            self.aug.run(
                &self.gpu,
                dev,
                chunk,
                eb,
                false,
                0,
                ex.address(ex.schedule.input)?,
                labels_ptr,
            )?;
            ex.run(&self.gpu, &h)?;
            let logits = ex.read_f32(&self.gpu, ex.schedule.logits)?;
            let m = chunk.len();
            let t = Tensor::from_vec(&[m, classes], logits[..m * classes].to_vec());
            let labels: Vec<u32> = chunk.iter().map(|&i| ds.labels[i] as u32).collect();
            let out = softmax_cross_entropy(&t, &labels, 0.0)?;
            loss_sum += out.loss * m as f64;
            correct += out.correct;
            on_event(Event::EvalBatch {
                batch: b as u64 + 1,
            });
        }
        let n = ds.n.max(1) as f64;
        Ok((loss_sum / n, correct as f64 / n))
    }

    fn save(
        &self,
        cfg: &TrainConfig,
        state: &TrainState,
    ) -> Result<Option<PathBuf>, GpuTrainError> {
        let Some(dir) = &cfg.checkpoint else {
            return Ok(None);
        };
        let (p, b, m) = self.state()?;
        let mut tensors = p;
        tensors.extend(b);
        let ck = Checkpoint {
            tensors,
            // as the CPU optimizer: no momentum buffers before the first step
            momentum: if state.step > 0 { m } else { BTreeMap::new() },
            meta: state.clone(),
        };
        Ok(Some(checkpoint::save(dir, &ck)?))
    }

    /// Trains on `train` for `cfg.epochs`, evaluating on `test` after every epoch: the
    /// semantics of [`crate::train::train`] (see module docs). `cfg.batch` and
    /// `cfg.eval_batch` must be the sizes this trainer was built for.
    pub fn train(
        &mut self,
        train: &Dataset,
        test: Option<&Dataset>,
        cfg: &TrainConfig,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<TrainReport, GpuTrainError> {
        if cfg.batch != self.batch || cfg.eval_batch != self.eval_batch {
            return Err(cfg_err(format!(
                "the GPU trainer was built for batch {} / eval batch {}, the run asks for {} / {}",
                self.batch, self.eval_batch, cfg.batch, cfg.eval_batch
            )));
        }
        if cfg.epochs == 0 {
            return Err(cfg_err("train for at least 1 epoch"));
        }
        if !(cfg.lr.is_finite() && cfg.lr > 0.0) {
            return Err(cfg_err(format!(
                "learning rate {} must be positive",
                cfg.lr
            )));
        }
        if !(0.0..=1.0).contains(&cfg.label_smoothing) {
            return Err(cfg_err(format!(
                "label smoothing {} must lie in [0, 1]",
                cfg.label_smoothing
            )));
        }
        if train.n == 0 {
            return Err(cfg_err("the training set is empty"));
        }
        let s = self.graph.input_shape();
        if [train.c, train.h, train.w] != [s.c as usize, s.h as usize, s.w as usize] {
            return Err(cfg_err(format!(
                "the data set's images are {}x{}x{}, the network takes {}",
                train.c, train.h, train.w, s
            )));
        }
        if train.classes > self.graph.classes as usize {
            return Err(cfg_err(format!(
                "the data set has {} classes, the network only {}",
                train.classes, self.graph.classes
            )));
        }
        let mut state = TrainState {
            net: cfg.net.clone(),
            seed: cfg.seed,
            data_seed: cfg.seed,
            ..Default::default()
        };
        let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0u64, 0u64);
        if cfg.resume {
            let dir = cfg
                .checkpoint
                .as_ref()
                .ok_or_else(|| cfg_err("--resume needs --checkpoint DIR"))?;
            let ck = checkpoint::load(&checkpoint::resolve(dir))?;
            let expected = checkpoint::expected_tensors(&self.graph);
            checkpoint::check_against(&ck.tensors, &expected)?;
            let buffer_names: std::collections::BTreeSet<String> =
                self.graph.buffers().into_iter().map(|(n, _)| n).collect();
            let (mut params, mut buffers) = (BTreeMap::new(), BTreeMap::new());
            for (n, t) in ck.tensors {
                if buffer_names.contains(&n) {
                    buffers.insert(n, t);
                } else {
                    params.insert(n, t);
                }
            }
            self.load(&params, &buffers, &ck.momentum)?;
            state = ck.meta;
            let get = |k: &str| state.extra.get(k).and_then(|v| v.as_f64()).unwrap_or(0.0);
            loss_sum = get("epoch_loss_sum");
            correct = get("epoch_correct") as u64;
            seen = get("epoch_seen") as u64;
            if state.seed != cfg.seed {
                return Err(cfg_err(format!(
                    "the checkpoint was trained with seed {}, this run has seed {}",
                    state.seed, cfg.seed
                )));
            }
        }
        let mut writer = match &cfg.metrics {
            Some(p) => Some(MetricsWriter::open(p)?),
            None => None,
        };
        let dev_train = DeviceDataset::upload(&self.gpu, train, &cfg.normalization)?;
        let dev_test = match test {
            Some(t) => Some(DeviceDataset::upload(&self.gpu, t, &cfg.normalization)?),
            None => None,
        };
        let tail = train.n % cfg.batch;
        if tail != 0 {
            self.step_executor(tail)?;
        }
        let steps_per_epoch = train.n.div_ceil(cfg.batch) as u64;
        let classes = self.graph.classes as usize;
        let mut report = TrainReport {
            epochs: vec![],
            steps: state.step,
            stopped_early: false,
            checkpoint: None,
        };
        while state.epoch < cfg.epochs {
            let epoch = state.epoch;
            let order = shuffle(train.n, state.data_seed, epoch);
            on_event(Event::EpochStart {
                epoch: epoch + 1,
                epochs: cfg.epochs,
                batches: steps_per_epoch,
            });
            let t0 = Instant::now();
            let mut epoch_images = 0u64;
            let mut lr = cfg.lr;
            let first = state.batch_in_epoch as usize;
            for (b, idx) in order.chunks(cfg.batch).enumerate().skip(first) {
                if cfg.max_steps.is_some_and(|m| state.step >= m) {
                    state.extra.insert("epoch_loss_sum".into(), loss_sum.into());
                    state
                        .extra
                        .insert("epoch_correct".into(), (correct as f64).into());
                    state
                        .extra
                        .insert("epoch_seen".into(), (seen as f64).into());
                    report.checkpoint = self.save(cfg, &state)?;
                    report.steps = state.step;
                    report.stopped_early = true;
                    return Ok(report);
                }
                lr = lr_at(
                    &cfg.schedule,
                    cfg.lr,
                    epoch,
                    b as u64,
                    steps_per_epoch,
                    cfg.epochs,
                );
                let ex = &self.steps[&idx.len()];
                let labels_buf = ex
                    .schedule
                    .labels
                    .ok_or_else(|| CudaError::Plan("the training step has no labels".into()))?;
                self.aug.run(
                    &self.gpu,
                    &dev_train,
                    idx,
                    idx.len(),
                    cfg.augment,
                    augment_seed(cfg.seed as u32, epoch as u32),
                    ex.address(ex.schedule.input)?,
                    ex.address(labels_buf)?,
                )?;
                let h = Hyper {
                    seed: cfg.seed as u32,
                    step: state.step as u32,
                    lr: lr as f32,
                    momentum: cfg.momentum as f32,
                    weight_decay: cfg.weight_decay as f32,
                    nesterov: cfg.nesterov,
                    label_smoothing: cfg.label_smoothing as f32,
                };
                let upd = ex.optimizer_launch().unwrap_or(ex.schedule.launches.len());
                ex.run_range(&self.gpu, &h, 0..upd)?;
                let logits = ex.read_f32(&self.gpu, ex.schedule.logits)?;
                let labels: Vec<u32> = idx.iter().map(|&i| train.labels[i] as u32).collect();
                let out = softmax_cross_entropy(
                    &Tensor::from_vec(&[idx.len(), classes], logits),
                    &labels,
                    cfg.label_smoothing,
                )?;
                if !out.loss.is_finite() {
                    let kept = match &cfg.checkpoint {
                        Some(d) => format!(
                            "the last good checkpoint is {}",
                            checkpoint::resolve(d).display()
                        ),
                        None => "no checkpoint was asked for (--checkpoint DIR)".into(),
                    };
                    return Err(TrainError::Diverged {
                        loss: out.loss,
                        epoch: epoch + 1,
                        step: state.step,
                        kept,
                    }
                    .into());
                }
                ex.run_range(&self.gpu, &h, upd..ex.schedule.launches.len())?;
                state.step += 1;
                state.batch_in_epoch = b as u64 + 1;
                loss_sum += out.loss * idx.len() as f64;
                correct += out.correct as u64;
                seen += idx.len() as u64;
                epoch_images += idx.len() as u64;
                on_event(Event::Batch {
                    batch: b as u64 + 1,
                    loss: loss_sum / seen as f64,
                    acc: correct as f64 / seen as f64,
                    images_per_s: epoch_images as f64 / t0.elapsed().as_secs_f64().max(1e-9),
                });
            }
            self.gpu.synchronize("the epoch's last step")?;
            let seconds = t0.elapsed().as_secs_f64();
            let (test_loss, test_acc) = match (test, &dev_test) {
                (Some(t), Some(d)) => self.evaluate_on(d, t, on_event)?,
                _ => (f64::NAN, f64::NAN),
            };
            let m = EpochMetrics {
                epoch: epoch + 1,
                train_loss: loss_sum / seen.max(1) as f64,
                train_acc: correct as f64 / seen.max(1) as f64,
                test_loss,
                test_acc,
                lr,
                seconds,
                images_per_s: epoch_images as f64 / seconds.max(1e-9),
            };
            on_event(Event::EpochEnd);
            if let Some(w) = writer.as_mut() {
                w.append(&m)?;
            }
            report.epochs.push(m);
            state.epoch += 1;
            state.batch_in_epoch = 0;
            (loss_sum, correct, seen) = (0.0, 0, 0);
            state.extra.clear();
            report.checkpoint = self.save(cfg, &state)?;
        }
        report.steps = state.step;
        Ok(report)
    }
}
