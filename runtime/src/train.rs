//! The training loop, one for every backend: epochs of SGD over a data set, evaluation,
//! metrics, atomic checkpoints and exact resumption.
//!
//! The loop ([`train_with`], [`evaluate_with`]) owns everything that does not depend on where
//! the arithmetic runs: configuration checks, the epoch shuffle, the learning-rate schedule,
//! the loss and accuracy (computed on the host from the backend's logits), the NaN stop, the
//! partial-epoch sums, metrics lines, checkpoints and resumption. A [`Backend`] only runs the
//! network: a training forward, the update, inference, and its state in and out as checkpoint
//! tensors. [`CpuBackend`] is the reference backend ([`train`] and [`evaluate`] use it);
//! [`crate::cuda::trainer::GpuTrainer`] is the GPU's.
//!
//! Determinism: everything random is a pure function of the run's seed and the position in
//! training (epoch shuffle of `(data_seed, epoch)`, augmentation of `(seed, epoch, image)`,
//! dropout of `(seed, step, node, element)`), so a run interrupted and resumed from a checkpoint
//! ends with the same weights as an uninterrupted one.
//!
//! Failure: a loss that is NaN or infinite stops training with [`TrainError::Diverged`]
//! before the bad step is applied; the last checkpoint on disk is the last good one.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use wrnc_compiler::ast::Schedule;
use wrnc_compiler::graph::Graph;

use crate::checkpoint::{self, Checkpoint, TrainState};
use crate::cpu::{Mode, Model, Tape};
use crate::data::{augment_seed, make_batch, shuffle, Dataset, Normalization};
use crate::loss::softmax_cross_entropy;
use crate::metrics::{EpochMetrics, MetricsWriter};
use crate::optim::{lr_at, Sgd};
use crate::Tensor;

/// Everything a run is configured by (the `.net` file's recipe, overridden by flags).
#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// The network, as named (goes into checkpoints).
    pub net: String,
    pub epochs: u64,
    pub batch: usize,
    pub lr: f64,
    pub schedule: Schedule,
    pub momentum: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
    pub label_smoothing: f64,
    pub seed: u64,
    /// Pad-crop-flip augmentation of the training images.
    pub augment: bool,
    pub normalization: Normalization,
    /// Folder for `last.safetensors`, written after every epoch (and when stopped early).
    pub checkpoint: Option<PathBuf>,
    /// Continue from the checkpoint in `checkpoint`.
    pub resume: bool,
    /// JSON lines, one object per epoch.
    pub metrics: Option<PathBuf>,
    /// Stop (and checkpoint) after this many optimiser steps in total: for tests of
    /// interruption, and for short runs.
    pub max_steps: Option<u64>,
    /// Batch size for evaluation.
    pub eval_batch: usize,
}

/// What the loop tells its caller as it goes (the CLI draws progress bars from it).
#[derive(Debug, Clone, Copy)]
pub enum Event {
    EpochStart {
        epoch: u64,
        epochs: u64,
        batches: u64,
    },
    Batch {
        batch: u64,
        loss: f64,
        acc: f64,
        images_per_s: f64,
    },
    EvalStart {
        batches: u64,
    },
    EvalBatch {
        batch: u64,
    },
    EpochEnd,
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Model(#[from] crate::cpu::Error),
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error("the loss became {loss} at epoch {epoch}, step {step}: training stopped; {kept}")]
    Diverged {
        loss: f64,
        epoch: u64,
        step: u64,
        kept: String,
    },
}

/// The outcome of [`train`] and [`train_with`].
#[derive(Debug, Clone)]
pub struct TrainReport {
    /// One entry per epoch completed in this call.
    pub epochs: Vec<EpochMetrics>,
    /// Optimiser steps completed in total (including before a resume).
    pub steps: u64,
    /// True when `max_steps` stopped the run before the last epoch ended.
    pub stopped_early: bool,
    pub checkpoint: Option<PathBuf>,
}

/// Tensors by name: weights and BN statistics (by the graph's names), or momentum buffers (by
/// parameter name).
pub type Tensors = BTreeMap<String, Tensor>;

/// Where a training step stands: what a backend needs besides the batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepAt {
    /// Epoch, counted from 0 (the augmentation key).
    pub epoch: u64,
    /// Optimiser steps done before this one (the dropout key).
    pub step: u64,
    /// This step's learning rate (from the schedule).
    pub lr: f64,
}

/// What the training loop needs from a device: run the network, update it, and move its
/// state in and out as checkpoint tensors. Everything else (shuffle, schedule, loss, NaN
/// stop, metrics, checkpoints, resumption) is the loop's, the same for every backend.
///
/// A training step is split in two around the NaN check: [`Backend::train_forward`] returns
/// the logits (and may change BN running statistics, as a training forward does), the loop
/// computes the loss on the host, and only when it is finite calls [`Backend::apply_update`].
pub trait Backend {
    /// The backend's failures; the loop's own ([`TrainError`]) convert into it.
    type Error: From<TrainError>;
    /// A data set made ready for the backend (the GPU's copy in device memory).
    type Data;

    /// The network (for the configuration checks and the checkpoint's tensor names).
    fn graph(&self) -> &Graph;

    /// Checks of `cfg` particular to the backend, before the loop's own.
    fn check(&self, _cfg: &TrainConfig) -> Result<(), Self::Error> {
        Ok(())
    }

    /// Adopts weights and BN statistics (exactly the graph's, checked by the caller) and the
    /// momentum buffers (absent ones are as before a first step).
    fn load_state(
        &mut self,
        params: Tensors,
        buffers: Tensors,
        momentum: Tensors,
    ) -> Result<(), Self::Error>;

    /// The state after `step` optimiser steps: `(weights and BN statistics, momentum)`.
    fn export_state(&self, step: u64) -> Result<(Tensors, Tensors), Self::Error>;

    /// Makes `ds`, normalised with `norm`, ready for [`Backend::train_forward`] and
    /// [`Backend::infer`].
    fn upload(&mut self, ds: &Dataset, norm: &Normalization) -> Result<Self::Data, Self::Error>;

    /// Called once before the first step of a run (after resumption and uploads), with the
    /// training set and the run's configuration.
    fn prepare(&mut self, _train: &Dataset, _cfg: &TrainConfig) -> Result<(), Self::Error> {
        Ok(())
    }

    /// Training-mode forward of images `idx` of `ds` (`data` is its upload), augmented as
    /// `cfg` says with the keys of `at`: returns the logits `[idx.len(), classes]`. The
    /// weights and momentum are not updated until [`Backend::apply_update`] (BN running
    /// statistics are: they move in the forward pass, as in PyTorch).
    fn train_forward(
        &mut self,
        data: &Self::Data,
        ds: &Dataset,
        idx: &[usize],
        at: StepAt,
        cfg: &TrainConfig,
    ) -> Result<Tensor, Self::Error>;

    /// Applies the step of the last [`Backend::train_forward`]; `dlogits` is the host's
    /// gradient of the loss with respect to its logits (a backend that computes it itself
    /// may ignore it).
    fn apply_update(&mut self, dlogits: &Tensor) -> Result<(), Self::Error>;

    /// Called after the last step of every epoch, before it is timed and evaluated.
    fn end_epoch(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }

    /// Called before every evaluation (a run of [`Backend::infer`] calls).
    fn begin_eval(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }

    /// Eval-mode logits `[idx.len(), classes]` of images `idx` of `ds` (`data` is its
    /// upload with `norm`).
    fn infer(
        &mut self,
        data: &Self::Data,
        ds: &Dataset,
        idx: &[usize],
        norm: &Normalization,
    ) -> Result<Tensor, Self::Error>;
}

/// The CPU reference backend: a [`Model`] and its SGD optimiser.
pub struct CpuBackend<'a> {
    pub model: &'a mut Model,
    /// The optimiser; its hyper-parameters are set from the run's configuration in
    /// [`Backend::prepare`], its momentum buffers come and go with the checkpoint.
    pub sgd: Sgd<f32>,
    /// The tape and learning rate of the forward awaiting its update.
    pending: Option<(Tape, f64)>,
}

impl<'a> CpuBackend<'a> {
    pub fn new(model: &'a mut Model) -> CpuBackend<'a> {
        CpuBackend {
            model,
            sgd: Sgd::new(0.0, false, 0.0),
            pending: None,
        }
    }
}

/// Eval-mode logits of images `idx` of `ds` on the CPU.
fn cpu_logits(
    model: &Model,
    ds: &Dataset,
    idx: &[usize],
    norm: &Normalization,
) -> Result<Tensor, TrainError> {
    let (x, _) = make_batch(ds, idx, false, 0, norm);
    Ok(model.infer(&x)?)
}

impl Backend for CpuBackend<'_> {
    type Error = TrainError;
    type Data = ();

    fn graph(&self) -> &Graph {
        self.model.graph()
    }

    fn load_state(
        &mut self,
        params: Tensors,
        buffers: Tensors,
        momentum: Tensors,
    ) -> Result<(), TrainError> {
        self.model.params = params;
        self.model.buffers = buffers;
        self.sgd.state = momentum;
        Ok(())
    }

    fn export_state(&self, _step: u64) -> Result<(Tensors, Tensors), TrainError> {
        let mut tensors = BTreeMap::new();
        tensors.extend(
            self.model
                .params
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        tensors.extend(
            self.model
                .buffers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        Ok((tensors, self.sgd.state.clone()))
    }

    fn upload(&mut self, _ds: &Dataset, _norm: &Normalization) -> Result<(), TrainError> {
        Ok(())
    }

    fn prepare(&mut self, _train: &Dataset, cfg: &TrainConfig) -> Result<(), TrainError> {
        self.sgd.momentum = cfg.momentum;
        self.sgd.nesterov = cfg.nesterov;
        self.sgd.weight_decay = cfg.weight_decay;
        Ok(())
    }

    fn train_forward(
        &mut self,
        _data: &(),
        ds: &Dataset,
        idx: &[usize],
        at: StepAt,
        cfg: &TrainConfig,
    ) -> Result<Tensor, TrainError> {
        // a forward whose update never came (a NaN stop) holds its tape no longer
        self.pending = None;
        let (x, _) = make_batch(
            ds,
            idx,
            cfg.augment,
            augment_seed(cfg.seed as u32, at.epoch as u32),
            &cfg.normalization,
        );
        let (logits, tape) = self.model.forward(
            &x,
            Mode::Train {
                seed: cfg.seed as u32,
                step: at.step as u32,
            },
        )?;
        self.pending = Some((tape, at.lr));
        Ok(logits)
    }

    fn apply_update(&mut self, dlogits: &Tensor) -> Result<(), TrainError> {
        let (tape, lr) = self
            .pending
            .take()
            .ok_or_else(|| crate::cpu::Error::State("an update without a forward".into()))?;
        let grads = self.model.backward(tape, dlogits)?;
        self.sgd.step(&mut self.model.params, &grads, lr)?;
        Ok(())
    }

    fn infer(
        &mut self,
        _data: &(),
        ds: &Dataset,
        idx: &[usize],
        norm: &Normalization,
    ) -> Result<Tensor, TrainError> {
        cpu_logits(self.model, ds, idx, norm)
    }
}

/// Loss and accuracy over `ds` in batches of `batch`, from `logits` of each batch's images.
fn eval_loop<E: From<TrainError>>(
    ds: &Dataset,
    batch: usize,
    on_event: &mut dyn FnMut(Event),
    mut logits: impl FnMut(&[usize]) -> Result<Tensor, E>,
) -> Result<(f64, f64), E> {
    let batch = batch.max(1);
    let batches = ds.n.div_ceil(batch) as u64;
    on_event(Event::EvalStart { batches });
    let (mut loss_sum, mut correct) = (0.0, 0usize);
    for (b, chunk) in (0..ds.n).collect::<Vec<_>>().chunks(batch).enumerate() {
        let logits = logits(chunk)?;
        let labels: Vec<u32> = chunk.iter().map(|&i| ds.labels[i] as u32).collect();
        let out = softmax_cross_entropy(&logits, &labels, 0.0).map_err(TrainError::from)?;
        loss_sum += out.loss * chunk.len() as f64;
        correct += out.correct;
        on_event(Event::EvalBatch {
            batch: b as u64 + 1,
        });
    }
    let n = ds.n.max(1) as f64;
    Ok((loss_sum / n, correct as f64 / n))
}

/// Loss and accuracy of `model` on `ds` (eval mode).
pub fn evaluate(
    model: &Model,
    ds: &Dataset,
    norm: &Normalization,
    batch: usize,
    on_event: &mut dyn FnMut(Event),
) -> Result<(f64, f64), TrainError> {
    eval_loop(ds, batch, on_event, |idx| cpu_logits(model, ds, idx, norm))
}

/// Loss and accuracy of `backend`'s network on `ds` (eval mode), `data` being its upload with
/// `norm`, in batches of `batch`.
pub fn evaluate_with<B: Backend>(
    backend: &mut B,
    data: &B::Data,
    ds: &Dataset,
    norm: &Normalization,
    batch: usize,
    on_event: &mut dyn FnMut(Event),
) -> Result<(f64, f64), B::Error> {
    check_data(ds, backend.graph())?;
    backend.begin_eval()?;
    eval_loop(ds, batch, on_event, |idx| {
        backend.infer(data, ds, idx, norm)
    })
}

fn check(cfg: &TrainConfig, train: &Dataset, graph: &Graph) -> Result<(), TrainError> {
    let bad = |m: String| Err(TrainError::Config(m));
    if cfg.batch == 0 {
        return bad("the batch size must be at least 1".into());
    }
    if cfg.epochs == 0 {
        return bad("train for at least 1 epoch".into());
    }
    if !(cfg.lr.is_finite() && cfg.lr > 0.0) {
        return bad(format!("learning rate {} must be positive", cfg.lr));
    }
    if !(0.0..=1.0).contains(&cfg.label_smoothing) {
        return bad(format!(
            "label smoothing {} must lie in [0, 1]",
            cfg.label_smoothing
        ));
    }
    if train.n == 0 {
        return bad("the training set is empty".into());
    }
    check_data(train, graph)
}

/// A data set's images and classes fit the network (the GPU backends write whole batches into
/// buffers sized for the network's input, so this must hold before any upload).
fn check_data(ds: &Dataset, graph: &Graph) -> Result<(), TrainError> {
    let s = graph.input_shape();
    if [ds.c, ds.h, ds.w] != [s.c as usize, s.h as usize, s.w as usize] {
        return Err(TrainError::Config(format!(
            "the data set's images are {}x{}x{}, the network takes {}",
            ds.c, ds.h, ds.w, s
        )));
    }
    if ds.classes > graph.classes as usize {
        return Err(TrainError::Config(format!(
            "the data set has {} classes, the network only {}",
            ds.classes, graph.classes
        )));
    }
    Ok(())
}

/// Trains `model` on `train` for `cfg.epochs` on the CPU, evaluating on `test` after every
/// epoch: [`train_with`] and a [`CpuBackend`].
pub fn train(
    model: &mut Model,
    train: &Dataset,
    test: Option<&Dataset>,
    cfg: &TrainConfig,
    on_event: &mut dyn FnMut(Event),
) -> Result<TrainReport, TrainError> {
    train_with(&mut CpuBackend::new(model), train, test, cfg, on_event)
}

/// The training loop: trains `backend` on `train` for `cfg.epochs`, evaluating on `test`
/// after every epoch, with metrics, checkpoints, resumption and the NaN stop (module docs).
pub fn train_with<B: Backend>(
    backend: &mut B,
    train: &Dataset,
    test: Option<&Dataset>,
    cfg: &TrainConfig,
    on_event: &mut dyn FnMut(Event),
) -> Result<TrainReport, B::Error> {
    backend.check(cfg)?;
    check(cfg, train, backend.graph())?;
    if let Some(t) = test {
        check_data(t, backend.graph())?;
    }
    let mut state = TrainState {
        net: cfg.net.clone(),
        seed: cfg.seed,
        data_seed: cfg.seed,
        ..Default::default()
    };
    // Partial-epoch sums, kept in the checkpoint so a resumed epoch reports the whole epoch.
    let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0u64, 0u64);
    if cfg.resume {
        let dir = cfg
            .checkpoint
            .as_ref()
            .ok_or_else(|| TrainError::Config("--resume needs --checkpoint DIR".into()))?;
        let file = checkpoint::resolve(dir);
        if !file.exists() {
            return Err(TrainError::Config(format!(
                "--resume: no checkpoint to resume from: `{}` does not exist (a run with \
                 --checkpoint {} writes it)",
                file.display(),
                dir.display()
            ))
            .into());
        }
        let ck = checkpoint::load(&file).map_err(TrainError::from)?;
        // a training checkpoint has taken steps and holds momentum; weights alone (`wrnc
        // export --save-weights`, a PyTorch state_dict) have neither
        if ck.meta.step == 0 && ck.momentum.is_empty() {
            return Err(TrainError::Config(format!(
                "--resume: `{}` holds weights only, no training state (step, seed, momentum); \
                 resume from a checkpoint `wrnc run --checkpoint` wrote, or evaluate these \
                 weights with --eval DATASET --weights {}",
                file.display(),
                file.display()
            ))
            .into());
        }
        let (params, buffers) =
            checkpoint::state_for(backend.graph(), ck.tensors).map_err(TrainError::from)?;
        backend.load_state(params, buffers, ck.momentum)?;
        state = ck.meta;
        let get = |k: &str| state.extra.get(k).and_then(|v| v.as_f64()).unwrap_or(0.0);
        loss_sum = get("epoch_loss_sum");
        correct = get("epoch_correct") as u64;
        seen = get("epoch_seen") as u64;
        if state.seed != cfg.seed {
            return Err(TrainError::Config(format!(
                "the checkpoint was trained with seed {}, this run has seed {}",
                state.seed, cfg.seed
            ))
            .into());
        }
    }
    let mut writer = match &cfg.metrics {
        Some(p) => Some(MetricsWriter::open(p).map_err(TrainError::from)?),
        None => None,
    };
    let train_data = backend.upload(train, &cfg.normalization)?;
    let test_data = match test {
        Some(t) => Some(backend.upload(t, &cfg.normalization)?),
        None => None,
    };
    backend.prepare(train, cfg)?;
    let steps_per_epoch = train.n.div_ceil(cfg.batch) as u64;
    let mut report = TrainReport {
        epochs: vec![],
        steps: state.step,
        stopped_early: false,
        checkpoint: None,
    };
    let save = |backend: &B, state: &TrainState| -> Result<Option<PathBuf>, B::Error> {
        let Some(dir) = &cfg.checkpoint else {
            return Ok(None);
        };
        let (tensors, momentum) = backend.export_state(state.step)?;
        let ck = Checkpoint {
            tensors,
            momentum,
            meta: state.clone(),
        };
        Ok(Some(checkpoint::save(dir, &ck).map_err(TrainError::from)?))
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
                report.checkpoint = save(backend, &state)?;
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
            let at = StepAt {
                epoch,
                step: state.step,
                lr,
            };
            let logits = backend.train_forward(&train_data, train, idx, at, cfg)?;
            let labels: Vec<u32> = idx.iter().map(|&i| train.labels[i] as u32).collect();
            let out = softmax_cross_entropy(&logits, &labels, cfg.label_smoothing)
                .map_err(TrainError::from)?;
            if !out.loss.is_finite() {
                let kept = match &cfg.checkpoint {
                    Some(d) if checkpoint::resolve(d).exists() => format!(
                        "the last good checkpoint is {}",
                        checkpoint::resolve(d).display()
                    ),
                    Some(d) => format!(
                        "no checkpoint had been written to {} yet (one is written at the end of every epoch)",
                        d.display()
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
            backend.apply_update(&out.dlogits)?;
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
        backend.end_epoch()?;
        let seconds = t0.elapsed().as_secs_f64();
        let (test_loss, test_acc) = match (test, &test_data) {
            (Some(t), Some(d)) => {
                evaluate_with(backend, d, t, &cfg.normalization, cfg.eval_batch, on_event)?
            }
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
            w.append(&m).map_err(TrainError::from)?;
        }
        report.epochs.push(m);
        state.epoch += 1;
        state.batch_in_epoch = 0;
        (loss_sum, correct, seen) = (0.0, 0, 0);
        state.extra.clear();
        report.checkpoint = save(backend, &state)?;
    }
    report.steps = state.step;
    Ok(report)
}
