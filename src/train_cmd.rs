//! `wrnc run`: training and evaluation on the CPU reference backend.

use crate::net::{Loaded, UserError};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use wrnc_compiler::ast::{Dataset as Kind, Schedule};
use wrnc_runtime::cpu::Model;
use wrnc_runtime::data::{self, Dataset, Normalization, Split};
use wrnc_runtime::train::{self, Event, TrainConfig};

#[derive(clap::Args)]
pub struct RunArgs {
    /// Train on this data set: cifar10, cifar100 or svhn.
    #[arg(long, value_name = "DATASET", conflicts_with = "eval")]
    pub train: Option<String>,
    /// Evaluate trained weights (--weights) on this data set's test split.
    #[arg(
        long,
        value_name = "DATASET",
        requires = "weights",
        conflicts_with_all = ["epochs", "lr", "subset", "metrics", "checkpoint", "resume", "max_steps", "no_augment"]
    )]
    pub eval: Option<String>,
    /// Weights to evaluate: a checkpoint file or folder.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// The data: the official binary release (folder or .tar.gz), or an image folder
    /// (`DIR/train/<class>/*`, `DIR/test/<class>/*`), or the folder holding train.tar.xz/test.tar.xz.
    /// Default: $WRNC_DATA, else `./data/<dataset>`.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// cpu or cuda. Default: cuda where a GPU is usable, else cpu.
    #[arg(long)]
    pub device: Option<Device>,
    #[arg(long)]
    pub epochs: Option<u64>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub lr: Option<f64>,
    /// Train on the first N training images only.
    #[arg(long)]
    pub subset: Option<usize>,
    /// Evaluate on the first N test images only.
    #[arg(long)]
    pub test_subset: Option<usize>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Write one JSON object per epoch to this file.
    #[arg(long)]
    pub metrics: Option<PathBuf>,
    /// Write a checkpoint to this folder after every epoch (atomically).
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Continue from the checkpoint in --checkpoint.
    #[arg(long, requires = "checkpoint")]
    pub resume: bool,
    /// Stop after this many optimiser steps in total (the checkpoint lets --resume go on).
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Turn off pad-crop-flip augmentation.
    #[arg(long)]
    pub no_augment: bool,
    /// Arithmetic on the GPU: f32, or bf16 (bf16 activations and tensor-core convolutions, fp32
    /// master weights). Default: the file's `precision` setting, else f32. The CPU backend
    /// always computes in f32.
    #[arg(long, value_enum)]
    pub precision: Option<crate::gpu_cmd::PrecisionArg>,
    /// Tensor-core tiles on the GPU (bf16, or f32 with --tf32 or --tf32x3): auto (search on this GPU what the tile cache
    /// lacks), default (64x64), or one tile for every convolution (128x64, 128x128, 64x128,
    /// 32x64, 64x32).
    #[arg(long, default_value = "auto", value_parser = wrnc_runtime::cuda::tune::TileMode::parse)]
    pub tiles: wrnc_runtime::cuda::tune::TileMode,
    /// f32 on the GPU: the convolutions on the tensor cores as 3xTF32 (fp32 accuracy, sm_80
    /// and later; tiles as `--tiles` says) instead of as fp32 FMAs.
    #[arg(long)]
    pub tf32x3: bool,
    /// f32 on the GPU: the convolutions on the tensor cores in plain TF32 (as PyTorch runs
    /// cuDNN's f32 convolutions by default; sm_80 and later; tiles as `--tiles` says) instead
    /// of as fp32 FMAs.
    #[arg(long, conflicts_with = "tf32x3")]
    pub tf32: bool,
    /// Activation layout on the GPU: auto (nhwc for bf16 and with --tf32 / --tf32x3, nchw for f32), nchw or nhwc
    /// (channels last). Checkpoints are the same in every layout.
    #[arg(long, default_value = "auto", value_parser = wrnc_compiler::schedule::Layout::parse)]
    pub layout: wrnc_compiler::schedule::Layout,
    /// Print a JSON summary at the end instead of text.
    #[arg(long)]
    pub json: bool,
    /// No progress bars.
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    Cpu,
    Cuda,
}

pub(crate) fn kind(name: &str) -> Result<Kind, UserError> {
    match Kind::from_name(name) {
        Some(Kind::Imagenet) => Err(UserError("error: training on ImageNet is not supported by `wrnc run` (CIFAR-10, CIFAR-100, SVHN are)".into())),
        Some(k) => Ok(k),
        None => Err(UserError(format!("error: unknown data set `{name}`\n  = help: valid data sets are cifar10, cifar100, svhn"))),
    }
}

pub(crate) fn data_dir(args: &RunArgs, k: Kind) -> PathBuf {
    args.data
        .clone()
        .unwrap_or_else(|| match std::env::var_os("WRNC_DATA") {
            Some(d) => PathBuf::from(d),
            None => Path::new("data").join(k.name()),
        })
}

pub(crate) fn load_split(
    k: Kind,
    dir: &Path,
    split: Split,
    limit: Option<usize>,
) -> Result<Dataset, UserError> {
    let mut ds = data::load(k, dir, split).map_err(|e| UserError(format!("error: {e}")))?;
    if let Some(n) = limit {
        if n == 0 {
            return Err(UserError(format!(
                "error: {} 0: a subset must hold at least 1 image",
                match split {
                    Split::Train => "--subset",
                    Split::Test => "--test-subset",
                }
            )));
        }
        let n = n.min(ds.n);
        ds.images.truncate(n * ds.image_len());
        ds.labels.truncate(n);
        ds.n = n;
    }
    Ok(ds)
}

/// Where a run goes.
enum Backend {
    Cpu,
    Cuda,
}

/// `--device cuda` needs a usable GPU (or says why not); without `--device`, cuda where a GPU
/// is usable, else cpu, said aloud.
fn pick_device(d: Option<Device>, quiet: bool) -> anyhow::Result<Backend> {
    let probe = || wrnc_runtime::cuda::is_available();
    match d {
        Some(Device::Cpu) => Ok(Backend::Cpu),
        Some(Device::Cuda) => match probe() {
            Ok(info) => {
                if !quiet {
                    eprintln!("device: cuda ({}, {})", info.name, info.arch());
                }
                Ok(Backend::Cuda)
            }
            Err(e) => Err(anyhow::anyhow!("--device cuda: {e}")),
        },
        None => match probe() {
            Ok(info) => {
                if !quiet {
                    eprintln!(
                        "device: cuda ({}, {}); --device cpu for the CPU",
                        info.name,
                        info.arch()
                    );
                }
                Ok(Backend::Cuda)
            }
            Err(e) => {
                if !quiet {
                    let why = e.to_string();
                    eprintln!(
                        "device: cpu (no usable GPU: {})",
                        why.lines().next().unwrap_or("")
                    );
                }
                Ok(Backend::Cpu)
            }
        },
    }
}

fn gpu_err(e: wrnc_runtime::cuda::trainer::GpuTrainError) -> anyhow::Error {
    match e {
        wrnc_runtime::cuda::trainer::GpuTrainError::Train(train::TrainError::Config(m)) => {
            UserError(format!("error: {m}")).into()
        }
        e => anyhow::Error::from(e),
    }
}

fn bar(quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(0);
    pb.set_style(
        ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {msg} ({elapsed})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb
}

pub fn run(l: Loaded, args: RunArgs) -> anyhow::Result<()> {
    let backend = pick_device(args.device, args.quiet || args.json)?;
    let precision = l.precision_or(args.precision);
    let f32_math = wrnc_compiler::schedule::F32Math::from_flags(args.tf32, args.tf32x3)
        .map_err(|e| UserError(format!("error: {e}")))?;
    if f32_math.tensor_cores() && precision == wrnc_compiler::ast::Precision::Bf16 {
        return Err(UserError(format!(
            "error: {}",
            wrnc_compiler::schedule::TF32_WITH_BF16
        ))
        .into());
    }
    check_ranges(&args)?;
    let s = &l.file.settings;
    let seed = args.seed.or(s.seed.map(|v| v.value)).unwrap_or(1);
    if let Some(ds_name) = &args.eval {
        let k = kind(ds_name)?;
        let weights = args
            .weights
            .as_ref()
            .expect("clap: --eval requires --weights");
        let tensors = wrnc_runtime::checkpoint::load_weights(weights)
            .map_err(|e| UserError(format!("error: {e}")))?;
        let g = &l.graph;
        let (params, buffers) = wrnc_runtime::checkpoint::state_for(g, tensors).map_err(|e| {
            UserError(format!(
                "error: {} does not fit {}: {e}",
                weights.display(),
                g.name
            ))
        })?;
        let test = load_split(k, &data_dir(&args, k), Split::Test, args.test_subset)?;
        let pb = bar(args.quiet || args.json);
        pb.set_prefix("eval");
        let mut on_event = |e| {
            if let Event::EvalStart { batches } = e {
                pb.set_length(batches);
            } else if let Event::EvalBatch { batch } = e {
                pb.set_position(batch);
            }
        };
        let norm = Normalization::for_dataset(k);
        let (loss, acc) = match backend {
            Backend::Cpu => {
                let model = Model::with_state(l.graph.clone(), params, buffers)?;
                train::evaluate(&model, &test, &norm, 256, &mut on_event)?
            }
            Backend::Cuda => {
                let mut t = wrnc_runtime::cuda::trainer::GpuTrainer::new(
                    0,
                    g,
                    256,
                    256,
                    precision,
                    Default::default(),
                    seed,
                    args.tiles,
                    f32_math,
                    args.layout,
                )
                .map_err(gpu_err)?;
                t.load(&params, &buffers, &Default::default())
                    .map_err(gpu_err)?;
                t.evaluate(&test, &norm, &mut on_event).map_err(gpu_err)?
            }
        };
        pb.finish_and_clear();
        if args.json {
            println!(
                "{}",
                serde_json::json!({"net": g.name, "dataset": k.name(), "images": test.n, "test_loss": loss, "test_acc": acc})
            );
        } else {
            println!(
                "{}: test loss {loss:.4}, test accuracy {acc:.4} on {} images",
                g.name, test.n
            );
        }
        return Ok(());
    }
    let Some(ds_name) = &args.train else {
        return Err(UserError(
            "error: say what to do: --train DATASET, or --eval DATASET --weights FILE".into(),
        )
        .into());
    };
    let k = kind(ds_name)?;
    let dir = data_dir(&args, k);
    let train_ds = load_split(k, &dir, Split::Train, args.subset)?;
    let test_ds = load_split(k, &dir, Split::Test, args.test_subset)?;
    let cfg = TrainConfig {
        net: l.graph.name.clone(),
        epochs: args.epochs.or(s.epochs.map(|v| v.value)).unwrap_or(200),
        batch: args
            .batch_size
            .or(s.batch.map(|v| v.value as usize))
            .unwrap_or(128),
        lr: args.lr.or(s.lr.map(|v| v.value)).unwrap_or(0.1),
        schedule: s
            .schedule
            .as_ref()
            .map(|v| v.value.clone())
            .unwrap_or(Schedule::Step {
                at: vec![0.3, 0.6, 0.8],
                gamma: 0.2,
            }),
        momentum: s.momentum.map(|v| v.value).unwrap_or(0.9),
        nesterov: s.nesterov.map(|v| v.value).unwrap_or(true),
        weight_decay: s.weight_decay.map(|v| v.value).unwrap_or(5e-4),
        label_smoothing: s.label_smoothing.map(|v| v.value).unwrap_or(0.0),
        seed,
        augment: !args.no_augment,
        normalization: Normalization::for_dataset(k),
        checkpoint: args.checkpoint.clone(),
        resume: args.resume,
        metrics: args.metrics.clone(),
        max_steps: args.max_steps,
        eval_batch: 256,
    };
    let quiet = args.quiet || args.json;
    // more outputs than the data has classes trains (the extra ones are never a label), but is
    // seldom meant: `WRN-28-10@cifar100` on CIFAR-10
    if (l.graph.classes as usize) > train_ds.classes && !quiet {
        eprintln!(
            "note: {} has {} outputs, {} has {} classes: {} outputs are never a label (the network's `@dataset` or `classes` may not be the one meant)",
            l.graph.name,
            l.graph.classes,
            k.name(),
            train_ds.classes,
            l.graph.classes as usize - train_ds.classes
        );
    }
    if !quiet {
        eprintln!(
            "training {} on {} ({} train, {} test images) for {} epochs, batch {}, lr {}",
            l.graph.name,
            k.name(),
            train_ds.n,
            test_ds.n,
            cfg.epochs,
            cfg.batch,
            cfg.lr
        );
    }
    let pb = bar(quiet);
    let mut on_event = |e| match e {
        Event::EpochStart {
            epoch,
            epochs,
            batches,
        } => {
            pb.reset();
            pb.set_length(batches);
            pb.set_prefix(format!("epoch {epoch}/{epochs}"));
        }
        Event::Batch {
            batch,
            loss,
            acc,
            images_per_s,
        } => {
            pb.set_position(batch);
            pb.set_message(format!(
                "loss {loss:.3} acc {acc:.3} {images_per_s:.0} img/s"
            ));
        }
        Event::EvalStart { batches } => {
            pb.reset();
            pb.set_length(batches);
            pb.set_prefix("eval");
        }
        Event::EvalBatch { batch } => pb.set_position(batch),
        Event::EpochEnd => pb.finish_and_clear(),
    };
    // how the tensor-core tiles were chosen (GPU, bf16)
    let mut tiles = None;
    let report = match backend {
        Backend::Cpu => {
            if precision != wrnc_compiler::ast::Precision::F32 && !quiet {
                eprintln!(
                    "note: the CPU backend computes in f32 (precision {} applies on the GPU)",
                    precision.name()
                );
            }
            if f32_math.tensor_cores() && !quiet {
                eprintln!(
                    "note: {} applies on the GPU; the CPU backend computes in f32",
                    f32_math.flag()
                );
            }
            if args.layout != wrnc_compiler::schedule::Layout::Auto && !quiet {
                eprintln!(
                    "note: --layout {} applies on the GPU; the CPU backend keeps NCHW",
                    args.layout.name()
                );
            }
            let mut model: Model = Model::new(l.graph.clone(), seed)?;
            train::train(&mut model, &train_ds, Some(&test_ds), &cfg, &mut on_event)
        }
        Backend::Cuda => {
            let mut t = wrnc_runtime::cuda::trainer::GpuTrainer::new(
                0,
                &l.graph,
                cfg.batch,
                cfg.eval_batch,
                precision,
                Default::default(),
                seed,
                args.tiles,
                f32_math,
                args.layout,
            )
            .map_err(gpu_err)?;
            if let (Some(r), false) = (t.tile_report(), quiet) {
                eprintln!("{}", crate::gpu_cmd::tile_summary(r));
            }
            tiles = t.tile_report().cloned();
            match t.train(&train_ds, Some(&test_ds), &cfg, &mut on_event) {
                Ok(r) => Ok(r),
                Err(wrnc_runtime::cuda::trainer::GpuTrainError::Train(e)) => Err(e),
                Err(e) => return Err(gpu_err(e)),
            }
        }
    };
    pb.finish_and_clear();
    let report = report.map_err(|e| match e {
        train::TrainError::Config(m) => anyhow::Error::from(UserError(format!("error: {m}"))),
        e => anyhow::Error::from(e),
    })?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "net": l.graph.name, "dataset": k.name(), "steps": report.steps, "stopped_early": report.stopped_early,
                "device": match backend { Backend::Cpu => "cpu", Backend::Cuda => "cuda" },
                "precision": match backend { Backend::Cpu => "f32", Backend::Cuda => precision.name() },
                // how the f32 convolutions computed: fma, tf32 or tf32x3 (null in bf16 or on the CPU)
                "f32_convolutions": match (&backend, precision) {
                    (Backend::Cuda, wrnc_compiler::ast::Precision::F32) => Some(match f32_math {
                        wrnc_compiler::schedule::F32Math::Fma => "fma",
                        wrnc_compiler::schedule::F32Math::Tf32 => "tf32",
                        wrnc_compiler::schedule::F32Math::Tf32x3 => "tf32x3",
                    }),
                    _ => None,
                },
                "layout": match backend { Backend::Cpu => "nchw", Backend::Cuda => args.layout.resolve(precision, f32_math).name() },
                "checkpoint": report.checkpoint, "epochs": report.epochs,
                "tiles": tiles,
            })
        );
    } else {
        for m in &report.epochs {
            println!(
                "epoch {:>3}  train loss {:.4} acc {:.4}  test loss {:.4} acc {:.4}  lr {:.4}  {:.1}s  {:.0} img/s",
                m.epoch, m.train_loss, m.train_acc, m.test_loss, m.test_acc, m.lr, m.seconds, m.images_per_s
            );
        }
        if report.stopped_early {
            println!("stopped after {} steps (--max-steps)", report.steps);
        }
        if let Some(p) = &report.checkpoint {
            println!("checkpoint: {}", p.display());
        }
    }
    Ok(())
}

/// The flags that set what a `.net` file's settings set are held to the same ranges
/// (`compiler::expand`'s `check_settings`): `--lr` positive and at most 100, `--epochs` 1 to
/// 100000, `--seed` at most 2^32 - 1.
fn check_ranges(args: &RunArgs) -> Result<(), UserError> {
    if let Some(lr) = args.lr {
        if !(lr.is_finite() && lr > 0.0 && lr <= 100.0) {
            return Err(UserError(format!(
                "error: --lr {lr:e} is out of range: it must be positive and at most 100 (as a file's `lr`)"
            )));
        }
    }
    if let Some(e) = args.epochs {
        if !(1..=100_000).contains(&e) {
            return Err(UserError(format!(
                "error: --epochs {e} is out of range: 1 to 100000 (as a file's `epochs`)"
            )));
        }
    }
    if let Some(seed) = args.seed {
        if seed > u64::from(u32::MAX) {
            return Err(UserError(format!(
                "error: --seed {seed} is out of range: 0 to {} (as a file's `seed`)",
                u32::MAX
            )));
        }
    }
    Ok(())
}
