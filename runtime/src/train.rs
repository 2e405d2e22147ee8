//! The training loop on the CPU reference backend: epochs of SGD over a data set, evaluation,
//! metrics, atomic checkpoints and exact resumption.
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

use crate::checkpoint::{self, Checkpoint, TrainState};
use crate::cpu::{Mode, Model};
use crate::data::{augment_seed, make_batch, shuffle, Dataset, Normalization};
use crate::loss::softmax_cross_entropy;
use crate::metrics::{EpochMetrics, MetricsWriter};
use crate::optim::{lr_at, Sgd};

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

/// The outcome of [`train`].
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

/// Loss and accuracy of `model` on `ds` (eval mode).
pub fn evaluate(
    model: &Model,
    ds: &Dataset,
    norm: &Normalization,
    batch: usize,
    on_event: &mut dyn FnMut(Event),
) -> Result<(f64, f64), TrainError> {
    let batch = batch.max(1);
    let batches = ds.n.div_ceil(batch) as u64;
    on_event(Event::EvalStart { batches });
    let (mut loss_sum, mut correct) = (0.0, 0usize);
    for (b, chunk) in (0..ds.n).collect::<Vec<_>>().chunks(batch).enumerate() {
        let (x, labels) = make_batch(ds, chunk, false, 0, norm);
        let logits = model.infer(&x)?;
        let labels: Vec<u32> = labels.iter().map(|&l| l as u32).collect();
        let out = softmax_cross_entropy(&logits, &labels, 0.0)?;
        loss_sum += out.loss * chunk.len() as f64;
        correct += out.correct;
        on_event(Event::EvalBatch {
            batch: b as u64 + 1,
        });
    }
    let n = ds.n.max(1) as f64;
    Ok((loss_sum / n, correct as f64 / n))
}

fn check(cfg: &TrainConfig, train: &Dataset, model: &Model) -> Result<(), TrainError> {
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
    let s = model.graph().input_shape();
    if [train.c, train.h, train.w] != [s.c as usize, s.h as usize, s.w as usize] {
        return bad(format!(
            "the data set's images are {}x{}x{}, the network takes {}",
            train.c, train.h, train.w, s
        ));
    }
    if train.classes > model.graph().classes as usize {
        return bad(format!(
            "the data set has {} classes, the network only {}",
            train.classes,
            model.graph().classes
        ));
    }
    Ok(())
}

/// Trains `model` on `train` for `cfg.epochs`, evaluating on `test` after every epoch.
pub fn train(
    model: &mut Model,
    train: &Dataset,
    test: Option<&Dataset>,
    cfg: &TrainConfig,
    on_event: &mut dyn FnMut(Event),
) -> Result<TrainReport, TrainError> {
    check(cfg, train, model)?;
    let mut sgd: Sgd<f32> = Sgd::new(cfg.momentum, cfg.nesterov, cfg.weight_decay);
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
        let ck = checkpoint::load(&checkpoint::resolve(dir))?;
        let (params, buffers) = checkpoint::state_for(model.graph(), ck.tensors)?;
        model.params = params;
        model.buffers = buffers;
        sgd.state = ck.momentum;
        state = ck.meta;
        let get = |k: &str| state.extra.get(k).and_then(|v| v.as_f64()).unwrap_or(0.0);
        loss_sum = get("epoch_loss_sum");
        correct = get("epoch_correct") as u64;
        seen = get("epoch_seen") as u64;
        if state.seed != cfg.seed {
            return Err(TrainError::Config(format!(
                "the checkpoint was trained with seed {}, this run has seed {}",
                state.seed, cfg.seed
            )));
        }
    }
    let mut writer = match &cfg.metrics {
        Some(p) => Some(MetricsWriter::open(p)?),
        None => None,
    };
    let steps_per_epoch = train.n.div_ceil(cfg.batch) as u64;
    let mut report = TrainReport {
        epochs: vec![],
        steps: state.step,
        stopped_early: false,
        checkpoint: None,
    };
    let save = |model: &Model,
                sgd: &Sgd<f32>,
                state: &TrainState|
     -> Result<Option<PathBuf>, TrainError> {
        let Some(dir) = &cfg.checkpoint else {
            return Ok(None);
        };
        let mut tensors = BTreeMap::new();
        tensors.extend(model.params.iter().map(|(k, v)| (k.clone(), v.clone())));
        tensors.extend(model.buffers.iter().map(|(k, v)| (k.clone(), v.clone())));
        let ck = Checkpoint {
            tensors,
            momentum: sgd.state.clone(),
            meta: state.clone(),
        };
        Ok(Some(checkpoint::save(dir, &ck)?))
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
                report.checkpoint = save(model, &sgd, &state)?;
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
            let (x, labels) = make_batch(
                train,
                idx,
                cfg.augment,
                augment_seed(cfg.seed as u32, epoch as u32),
                &cfg.normalization,
            );
            let labels: Vec<u32> = labels.iter().map(|&l| l as u32).collect();
            let (logits, tape) = model.forward(
                &x,
                Mode::Train {
                    seed: cfg.seed as u32,
                    step: state.step as u32,
                },
            )?;
            let out = softmax_cross_entropy(&logits, &labels, cfg.label_smoothing)?;
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
                });
            }
            let grads = model.backward(tape, &out.dlogits)?;
            sgd.step(&mut model.params, &grads, lr)?;
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
        let seconds = t0.elapsed().as_secs_f64();
        let (test_loss, test_acc) = match test {
            Some(t) => evaluate(model, t, &cfg.normalization, cfg.eval_batch, on_event)?,
            None => (f64::NAN, f64::NAN),
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
        report.checkpoint = save(model, &sgd, &state)?;
    }
    report.steps = state.step;
    Ok(report)
}
