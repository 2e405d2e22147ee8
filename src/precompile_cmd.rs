//! `wrnc precompile`: compiles, on a machine without a GPU, the modules that a `wrnc bench`,
//! `wrnc selftest` or `wrnc run` would compile on a GPU of a given architecture, into the
//! module cache (`runtime::cuda::cache`). The cache's key is the source, the architecture and
//! NVRTC's version, nothing of the machine, so the folder, carried to the GPU machine
//! (`WRNC_CACHE_DIR`), serves those commands there without compiling (NVRTC is still loaded
//! there, for its version) or the driver's JIT, as long as that machine's NVRTC has the same
//! version (else every entry misses and they compile as usual).
//!
//! What cannot be known without the GPU is left to it: with `--tiles auto` the modules at the
//! tiles the search picks (the search's own candidate modules are precompiled). `run` reads
//! the training data's size (for the partial last batch's module) where `--data` can be read,
//! else takes the data set's official size and says so.

use crate::gpu_cmd::{self, BenchArgs, DeviceArg, SelftestArgs};
use crate::net::{Loaded, UserError};
use crate::train_cmd::{self, RunArgs};
use wrnc_compiler::ast::Precision;
use wrnc_compiler::passes::{Fusion, Mode};
use wrnc_compiler::schedule::{self, F32Math};
use wrnc_runtime::cuda::cache::ModuleCache;
use wrnc_runtime::cuda::exec::{self, ModuleSource};
use wrnc_runtime::cuda::trainer::GpuTrainer;
use wrnc_runtime::cuda::tune;

#[derive(clap::Args)]
pub struct PrecompileArgs {
    /// The GPU's architecture: sm_90 (H100, H200), sm_80 (A100), sm_89, ... (modules with
    /// Hopper's `wgmma` are compiled for sm_90a, as on the GPU).
    #[arg(long, default_value = "sm_90")]
    pub arch: String,
    #[command(subcommand)]
    pub what: What,
}

// parsed once per process: the size of a variant does not matter
#[allow(clippy::large_enum_variant)]
#[derive(clap::Subcommand)]
pub enum What {
    /// The modules of `wrnc bench NET ...` (same flags).
    Bench {
        net: String,
        #[command(flatten)]
        args: BenchArgs,
    },
    /// The modules of `wrnc selftest ...` (same flags).
    Selftest {
        #[command(flatten)]
        args: SelftestArgs,
    },
    /// The modules of `wrnc run NET --train DATASET ...` on the GPU (same flags): the
    /// training step, its partial last batch (from the data set's size and `--subset`), and
    /// inference for evaluation.
    Run {
        net: String,
        #[command(flatten)]
        args: RunArgs,
    },
}

/// `sm_90` -> `(9, 0)`; anything else is a user error.
fn compute_capability(arch: &str) -> Result<(i32, i32), UserError> {
    let bad = || {
        UserError(format!(
            "error: --arch `{arch}` is not a GPU architecture such as sm_90 or sm_80 (sm_ and the compute capability's digits; wgmma modules get sm_90a by themselves)"
        ))
    };
    let digits = arch.strip_prefix("sm_").ok_or_else(bad)?;
    if !(2..=3).contains(&digits.len()) || !digits.chars().all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    let (major, minor) = digits.split_at(digits.len() - 1);
    Ok((
        major.parse().map_err(|_| bad())?,
        minor.parse().map_err(|_| bad())?,
    ))
}

/// The training images `wrnc run --train DATASET` would read: the data at `--data` (else
/// `$WRNC_DATA`, else `./data/<dataset>`), limited by `--subset`; where it cannot be read, the
/// data set's official size, with a note saying so.
fn train_images(args: &RunArgs, dataset: &str) -> Result<(usize, Option<String>), UserError> {
    use wrnc_compiler::ast::Dataset as Kind;
    let k = train_cmd::kind(dataset)?;
    let dir = train_cmd::data_dir(args, k);
    match train_cmd::load_split(k, &dir, wrnc_runtime::data::Split::Train, args.subset) {
        Ok(d) => Ok((d.n, None)),
        Err(e) => {
            let official = match k {
                Kind::Svhn => 73_257,
                _ => 50_000,
            };
            let n = args.subset.unwrap_or(usize::MAX).min(official);
            Ok((
                n,
                Some(format!(
                    "the training data could not be read ({}): the partial last batch is taken from {n} images (the official size{})",
                    e.0.trim_start_matches("error: "),
                    if args.subset.is_some() { ", or --subset" } else { "" }
                )),
            ))
        }
    }
}

pub fn precompile(
    a: PrecompileArgs,
    load: impl Fn(&str) -> anyhow::Result<Loaded>,
) -> anyhow::Result<()> {
    let cc = compute_capability(&a.arch)?;
    // as the GPU names itself (`sm_90`, whatever the spelling given)
    let arch = format!("sm_{}{}", cc.0, cc.1);
    let cache = ModuleCache::default_location();
    let Some(root) = cache.root() else {
        return Err(UserError(
            "error: precompile needs a module cache, and caching is off (WRNC_NO_CACHE)".into(),
        )
        .into());
    };
    let mut notes: Vec<String> = vec![];
    let (sources, json) = match a.what {
        What::Bench { net, args } => {
            let l = load(&net)?;
            let plan = gpu_cmd::bench_plan(&args)?;
            let mut sources = vec![];
            let tiles = if plan.bases.is_empty() {
                Some(wrnc_compiler::schedule::Tiles {
                    dense_dgrad: args.dense_dgrad,
                    no_split_k: args.no_split_k,
                    ..Default::default()
                })
            } else {
                tune::fixed_tiles(&plan.bases, args.tiles)
            };
            match tiles {
                Some(t) => sources.extend(gpu_cmd::bench_sources(&l.graph, &args, &plan, &t)?),
                None => {
                    sources.extend(tune::search_sources(&l.graph, &plan.bases)?);
                    notes.push(auto_note());
                }
            }
            (sources, args.json)
        }
        What::Selftest { args } => {
            gpu_cmd::check_range(args.batch, "batch", 64)?;
            if args.device == DeviceArg::Cpu {
                notes.push("--device cpu: the selftest compiles nothing".into());
                (vec![], args.json)
            } else {
                let mut nets = gpu_cmd::selftest_nets(&args)?;
                let jobs = gpu_cmd::selftest_jobs(&args, &mut nets, cc)?;
                let built = gpu_cmd::job_schedules(&args, &nets, &jobs);
                (gpu_cmd::selftest_sources(&built, cc), args.json)
            }
        }
        What::Run { net, args } => {
            let l = load(&net)?;
            if args.device == Some(train_cmd::Device::Cpu) {
                notes.push("--device cpu: the run compiles nothing".into());
                (vec![], args.json)
            } else {
                let (sources, more) = run_sources(&l, &args)?;
                notes.extend(more);
                (sources, args.json)
            }
        }
    };
    let threads = exec::compile_threads();
    let p = exec::precompile_for(&arch, &cache, sources, threads)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "arch": arch,
                "compute_capability": [cc.0, cc.1],
                "nvrtc": wrnc_runtime::nvrtc::version().ok().map(|(x, y)| format!("{x}.{y}")),
                "cache": root.display().to_string(),
                "modules": p.modules,
                "compiled": p.compiled,
                "cached": p.cached,
                "threads": p.threads,
                "seconds": p.seconds,
                "notes": notes,
            }))?
        );
    } else {
        println!(
            "{} modules for {} ({} compiled now, {} already cached) in {:.1} s on {} threads, in {}",
            p.modules,
            arch,
            p.compiled,
            p.cached,
            p.seconds,
            p.threads,
            root.display()
        );
        for n in notes {
            println!("note: {n}");
        }
    }
    // a module that did not compile, or could not be stored, is not in the cache: say so
    let failed = p.modules - p.compiled - p.cached;
    if failed > 0 {
        match &p.first_error {
            Some(e) => anyhow::bail!(
                "{failed} of {} modules are not in the cache: they did not compile; the first: {}",
                p.modules,
                e.lines().take(6).collect::<Vec<_>>().join("\n")
            ),
            None => anyhow::bail!(
                "{failed} of {} modules are not in the cache: they could not be written (a warning above says why)",
                p.modules
            ),
        }
    }
    Ok(())
}

fn auto_note() -> String {
    "--tiles auto: the tile search's candidate modules are compiled; the modules at the tiles it picks depend on its timings and compile on the GPU (or pass --tiles default / a tile)".into()
}

/// The modules of `wrnc run NET --train DATASET` (or `--eval`) on the GPU, and notes on
/// what was assumed.
fn run_sources(l: &Loaded, args: &RunArgs) -> anyhow::Result<(Vec<ModuleSource>, Vec<String>)> {
    let mut notes = vec![];
    let precision = l.precision_or(args.precision);
    let f32_math = F32Math::from_flags(args.tf32, args.tf32x3)
        .map_err(|e| UserError(format!("error: {e}")))?;
    if f32_math.tensor_cores() && precision == Precision::Bf16 {
        return Err(UserError(format!("error: {}", schedule::TF32_WITH_BF16)).into());
    }
    // as `wrnc run`: the training step at the batch, its partial last batch, evaluation at
    // 256; evaluation alone builds its trainer at 256 and 256
    let (batch, tail, eval_batch) =
        match (&args.train, &args.eval) {
            (Some(ds), _) => {
                let s = &l.file.settings;
                let batch = args
                    .batch_size
                    .or(s.batch.map(|v| v.value as usize))
                    .unwrap_or(128);
                if batch == 0 {
                    return Err(UserError("error: --batch-size must be at least 1".into()).into());
                }
                let (n, note) = train_images(args, ds)?;
                notes.extend(note);
                (batch, n % batch, 256)
            }
            (None, Some(ds)) => {
                train_cmd::kind(ds)?;
                (256, 0, 256)
            }
            (None, None) => return Err(UserError(
                "error: say what to precompile: --train DATASET, or --eval DATASET --weights FILE"
                    .into(),
            )
            .into()),
        };
    let fusion = Fusion::default();
    let bases =
        GpuTrainer::tile_bases(batch, eval_batch, precision, &fusion, f32_math, args.layout);
    let tensor_cores = precision == Precision::Bf16 || f32_math.tensor_cores();
    let tiles = if tensor_cores {
        tune::fixed_tiles(&bases, args.tiles)
    } else {
        Some(Default::default())
    };
    let mut sources = vec![ModuleSource {
        text: wrnc_runtime::cuda::augment::source(precision),
        wgmma: false,
    }];
    let Some(tiles) = tiles else {
        sources.extend(tune::search_sources(&l.graph, &bases)?);
        notes.push(auto_note());
        return Ok((sources, notes));
    };
    let mut shapes = vec![(Mode::Train, batch), (Mode::Infer, eval_batch)];
    if tail != 0 {
        shapes.push((Mode::Train, tail));
    }
    for (mode, b) in shapes {
        let o = GpuTrainer::options(&tiles, args.layout, mode, b, precision, &fusion);
        let s = schedule::build(&l.graph, &o)
            .map_err(|e| UserError(format!("error: {}", e.message)))?;
        sources.push(exec::module_source(&s, &fusion)?);
    }
    Ok((sources, notes))
}
