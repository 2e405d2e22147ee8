//! `wrnc`: the command line. Only this crate uses clap.
//!
//! Exit codes: 0 success, 1 a failure while running (I/O, training diverged, ...),
//! 2 bad input (network, file, flag).

mod export_cmd;
mod gpu_cmd;
mod net;
mod precompile_cmd;
mod train_cmd;

use clap::{Parser, Subcommand, ValueEnum};
use net::UserError;
use std::path::PathBuf;
use std::process::ExitCode;
use wrnc_compiler::analysis::{human, human_bytes};

#[derive(Parser)]
#[command(
    name = "wrnc",
    version,
    about = "Compile Wide ResNets and their neighbours to fused CUDA kernels, and train them"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Shapes, parameters, multiply-accumulates and memory of a network.
    Info {
        /// A `.net` file or an inline expression such as `WRN-28-10`.
        net: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Batch size for the memory figures (default: the file's `batch`, else 128).
        #[arg(long)]
        batch: Option<u32>,
        /// Precision of the compiled step's DRAM and memory figures (default: the file's
        /// `precision`, else f32).
        #[arg(long, value_enum)]
        precision: Option<gpu_cmd::PrecisionArg>,
    },
    /// Parse and verify a network; print `ok:` and its name, nothing else (errors as
    /// everywhere: with line and column, exit code 2).
    Check { net: String },
    /// Write the compiler's outputs for a network.
    Compile {
        /// A `.net` file or an inline expression (not needed with --list-passes).
        #[arg(required_unless_present = "list_passes")]
        net: Option<String>,
        /// Comma-separated: expanded, graph, dot, cuda, ptx, resources, schedule.
        #[arg(long, value_delimiter = ',', default_value = "expanded")]
        emit: Vec<Emit>,
        /// Output directory (default: print to standard output).
        #[arg(short, long)]
        o: Option<PathBuf>,
        /// Compile a whole training step (the default).
        #[arg(long, conflicts_with = "infer")]
        train: bool,
        /// Compile inference.
        #[arg(long)]
        infer: bool,
        /// No fusion: one kernel per op (the baseline of `wrnc bench`).
        #[arg(long)]
        unfused: bool,
        /// Switch one fusion pass off (repeatable); see `--list-passes`.
        #[arg(long = "no-fuse", value_name = "PASS")]
        no_fuse: Vec<String>,
        /// Print the fusion plan after this pass.
        #[arg(long, value_name = "PASS")]
        dump_after: Option<String>,
        /// Print the fusion passes, in pipeline order, and exit.
        #[arg(long)]
        list_passes: bool,
        /// Batch size the schedule is built for (default: the file's `batch`, else 128).
        #[arg(long)]
        batch: Option<u32>,
        /// f32, or bf16 storage with fp32 accumulation (default: the file's `precision`).
        #[arg(long)]
        precision: Option<gpu_cmd::PrecisionArg>,
        /// Activation layout: auto (nhwc for bf16 and with --tf32 / --tf32x3, nchw for f32), nchw or nhwc (channels last).
        #[arg(long, default_value = "auto", value_parser = wrnc_compiler::schedule::Layout::parse)]
        layout: wrnc_compiler::schedule::Layout,
        /// GPU architecture for --emit ptx and --emit resources.
        #[arg(long, default_value = "sm_90")]
        arch: String,
        /// bf16 or --tf32: run the NHWC vector-loading convolutions (all three passes) on
        /// Hopper's warpgroup MMA (`wgmma`, sm_90 only; compiled for sm_90a) instead of
        /// `mma.sync`.
        #[arg(long)]
        wgmma: bool,
        /// bf16: the weight operand of the warpgroup-MMA convolutions arrives by Hopper's tensor
        /// memory accelerator (TMA, `cp.async.bulk.tensor` on an mbarrier), and so does the
        /// activation operand of the stride-1 ones with 32k channels per group whose tiles are
        /// boxes of the image. Implies --wgmma.
        #[arg(long)]
        tma: bool,
        /// bf16: the forward and data-gradient warpgroup-MMA convolutions take stages of 64
        /// reduction indices (128-byte rows and swizzle, four k16 steps per barrier instead of
        /// two) in dynamic shared memory. Implies --wgmma.
        #[arg(long)]
        k64: bool,
        /// bf16: `cp.async` pipeline stages of the NHWC convolutions (2 to 8), in dynamic
        /// shared memory where they need more than 48 KiB (default: as many as fit in 48 KiB,
        /// at most 4).
        #[arg(long, value_parser = clap::value_parser!(u32).range(2..=8))]
        stages: Option<u32>,
        /// f32: the convolutions on the tensor cores as 3xTF32 (`mma.sync` TF32, fp32
        /// accuracy; sm_80 and later) instead of as fp32 FMAs.
        #[arg(long)]
        tf32x3: bool,
        /// f32: the convolutions on the tensor cores in plain TF32 (operands rounded to 11
        /// significant bits, as PyTorch runs cuDNN's f32 convolutions by default; sm_80 and
        /// later) instead of as fp32 FMAs.
        #[arg(long, conflicts_with = "tf32x3")]
        tf32: bool,
        /// The data gradients of strided convolutions over every tap, masked, instead of in
        /// phase order (each output phase over only the taps that reach it).
        #[arg(long)]
        dense_dgrad: bool,
        /// No split-K: no GEMM cuts its reduction over more blocks (the weight gradients of
        /// every engine, the small-batch inference convolutions).
        #[arg(long)]
        no_split_k: bool,
    },
    /// Train or evaluate a network: on the GPU where one is usable, else on the CPU reference backend.
    Run {
        net: String,
        #[command(flatten)]
        args: train_cmd::RunArgs,
    },
    /// Time a network on the GPU: training step and inference, fused and unfused (CUDA
    /// events, median after warm-up), and peak device memory.
    Bench {
        net: String,
        #[command(flatten)]
        args: gpu_cmd::BenchArgs,
    },
    /// Check the GPU backend against the CPU reference on every example network (fused and
    /// unfused, f32 and bf16, inference and whole training steps).
    Selftest {
        #[command(flatten)]
        args: gpu_cmd::SelftestArgs,
    },
    /// Compile, without a GPU, the modules a `bench`, `selftest` or `run` would compile on a
    /// GPU of architecture --arch, into the module cache ($WRNC_CACHE_DIR, else
    /// ~/.cache/wrnc): carried to the GPU machine, they load there without compiling or the JIT
    /// (when its NVRTC has this one's version).
    Precompile {
        #[command(flatten)]
        args: precompile_cmd::PrecompileArgs,
    },
    /// Export the inference graph as ONNX (opset 17) with trained or fresh weights; write the
    /// CPU backend's logits for an input, or the weights as a checkpoint (docs/interop.md).
    Export {
        net: String,
        #[command(flatten)]
        args: export_cmd::ExportArgs,
    },
    /// Draw training loss and test error per epoch from a metrics file (.png or .svg).
    Plot {
        /// A metrics file written by `wrnc run --metrics`.
        file: PathBuf,
        #[arg(short, long)]
        o: PathBuf,
    },
    /// Data sets.
    Data {
        #[command(subcommand)]
        cmd: DataCmd,
    },
}

#[derive(Subcommand)]
enum DataCmd {
    /// Fetch the official binary release, check its checksum and unpack it.
    Download {
        /// cifar10 or cifar100.
        dataset: String,
        #[arg(long)]
        to: PathBuf,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Emit {
    /// The structural form of the network (a `.net` file that parses back to the same graph).
    Expanded,
    /// The op graph as readable text.
    Graph,
    /// The op graph as Graphviz DOT.
    Dot,
    /// The generated CUDA C of the schedule (one module).
    Cuda,
    /// PTX from NVRTC (needs libnvrtc: `pip install nvidia-cuda-nvrtc==13.0.88`).
    Ptx,
    /// Per-kernel registers, spilled bytes, stack frame and static shared memory, as ptxas
    /// reports them for --arch (NVRTC runs ptxas; no GPU needed), as JSON.
    Resources,
    /// The schedule: buffers, kernels, launches (grid, block, arguments), as JSON.
    Schedule,
}

/// A closed standard output (`wrnc compile ... | head`) ends the process quietly, as it ends
/// other Unix tools, instead of making `println!` panic: Rust starts programs with SIGPIPE
/// ignored, so writes fail with EPIPE; this puts the default action back.
#[cfg(unix)]
fn quiet_on_closed_pipe() {
    extern "C" {
        fn signal(signum: i32, handler: usize) -> usize;
    }
    const SIGPIPE: i32 = 13;
    const SIG_DFL: usize = 0;
    // SAFETY: signal(2) with the default disposition, before any other thread starts
    unsafe {
        signal(SIGPIPE, SIG_DFL);
    }
}

fn main() -> ExitCode {
    #[cfg(unix)]
    quiet_on_closed_pipe();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(u) = e.downcast_ref::<UserError>() {
                eprintln!("{}", u.0.trim_end());
                ExitCode::from(2)
            } else {
                eprintln!("error: {}", chain_message(&e));
                ExitCode::from(1)
            }
        }
    }
}

/// An error and its causes, `: `-separated, leaving out a cause whose text the message
/// already holds (an error that prints its source, such as `path: io error`, would otherwise
/// repeat it).
fn chain_message(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg.push_str(": ");
            msg.push_str(&c);
        }
    }
    msg
}

fn batch_or(batch: Option<u32>, l: &net::Loaded) -> Result<u32, UserError> {
    let b = batch
        .or(l.file.settings.batch.map(|b| b.value as u32))
        .unwrap_or(128);
    if b == 0 || b > 1 << 16 {
        return Err(UserError(format!(
            "error: batch {b} is out of range (1 to {})",
            1 << 16
        )));
    }
    Ok(b)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Info {
            net,
            json,
            batch,
            precision,
        } => {
            let l = net::load(&net)?;
            let batch = batch
                .or(l.file.settings.batch.map(|b| b.value as u32))
                .unwrap_or(128);
            if batch == 0 || batch > 1 << 20 {
                return Err(UserError(format!(
                    "error: batch {batch} is out of range (1 to {})",
                    1 << 20
                ))
                .into());
            }
            let i = wrnc_compiler::analysis::info(&l.graph, batch);
            let precision = l.precision_or(precision);
            // The compiled step: launches, DRAM traffic and peak memory, fused and unfused.
            let compiled = wrnc_compiler::memplan::summarize(&l.graph, batch, precision);
            if json {
                let mut v = serde_json::to_value(&i)?;
                v["precision"] = precision.name().into();
                match &compiled {
                    Ok(c) => {
                        let c = serde_json::to_value(c)?;
                        for k in ["launches", "dram_bytes", "infer_dram_bytes", "peak_bytes"] {
                            v[k] = c[k].clone();
                        }
                    }
                    Err(e) => v["compile_error"] = e.message.clone().into(),
                }
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("network      {}", i.name);
                println!("input        {}x{}x{}", i.input[0], i.input[1], i.input[2]);
                println!("classes      {}", i.classes);
                println!("parameters   {} ({})", human(i.params), i.params);
                println!("MACs/image   {} ({})", human(i.macs), i.macs);
                println!(
                    "layers       {} conv, {} linear, {} batch norm",
                    i.conv_layers, i.linear_layers, i.bn_layers
                );
                println!(
                    "activations  {} for a batch of {} (fp32, every op's output)",
                    human_bytes(i.activation_bytes),
                    i.batch
                );
                match &compiled {
                    Ok(c) => {
                        println!("launches     training step {} fused, {} unfused; inference {} fused, {} unfused",
                            c.launches.train_fused, c.launches.train_unfused, c.launches.infer_fused, c.launches.infer_unfused);
                        let (b, p) = (i.batch, precision.name());
                        for (label, v, what) in [
                            (
                                "DRAM/step   ",
                                c.dram_bytes,
                                format!("estimate, batch {b}, {p}"),
                            ),
                            (
                                "DRAM/infer  ",
                                c.infer_dram_bytes,
                                format!("estimate, a batch of {b}, {p}; setup excluded"),
                            ),
                            ("peak memory ", c.peak_bytes, format!("training step, {p}")),
                        ] {
                            println!(
                                "{label} {} fused, {} unfused ({what})",
                                human_bytes(v.fused),
                                human_bytes(v.unfused)
                            );
                        }
                    }
                    Err(e) => println!("compiled     not available: {}", e.message),
                }
            }
        }
        Cmd::Check { net } => {
            let l = net::load(&net)?;
            eprintln!("ok: {} ({} nodes)", l.graph.name, l.graph.order.len());
        }
        Cmd::Compile {
            net,
            emit,
            o,
            train: _,
            infer,
            unfused,
            no_fuse,
            dump_after,
            list_passes,
            batch,
            precision,
            arch,
            layout,
            wgmma,
            tma,
            k64,
            stages,
            tf32x3,
            tf32,
            dense_dgrad,
            no_split_k,
        } => {
            let wgmma = wgmma || tma || k64;
            if list_passes {
                for (name, _) in wrnc_compiler::passes::PIPELINE {
                    println!("{name}");
                }
                return Ok(());
            }
            let l = net::load(net.as_deref().unwrap_or_default())?;
            let diag = |e: wrnc_compiler::Error| {
                UserError(wrnc_grammar::Diagnostic::from_error(&l.source, &e).render())
            };
            let mut outputs: Vec<(&str, String)> = vec![];
            let needs_schedule = emit
                .iter()
                .any(|e| matches!(e, Emit::Cuda | Emit::Ptx | Emit::Resources | Emit::Schedule))
                || dump_after.is_some();
            let opts = wrnc_compiler::schedule::Options {
                tiles: wrnc_compiler::schedule::Tiles {
                    wgmma,
                    tma,
                    k64,
                    stages: stages.unwrap_or(0),
                    tf32x3,
                    tf32,
                    dense_dgrad,
                    no_split_k,
                    ..Default::default()
                },
                layout,
                mode: if infer {
                    wrnc_compiler::passes::Mode::Infer
                } else {
                    wrnc_compiler::passes::Mode::Train
                },
                batch: batch_or(batch, &l)?,
                precision: l.precision_or(precision),
                fusion: wrnc_compiler::passes::Fusion {
                    unfused,
                    disabled: no_fuse,
                },
            };
            opts.fusion
                .validate()
                .map_err(|m| UserError(format!("error: {m}")))?;
            wrnc_compiler::schedule::check_engine_flags(
                opts.precision,
                opts.tiles.f32_math(),
                wgmma,
                tma,
                k64,
                stages.is_some(),
            )
            .map_err(|e| UserError(format!("error: {e}")))?;
            if let Some(p) = &dump_after {
                if !wrnc_compiler::passes::pass_names().contains(&p.as_str()) {
                    return Err(UserError(format!(
                        "error: unknown pass `{p}`; passes are: {}",
                        wrnc_compiler::passes::pass_names().join(", ")
                    ))
                    .into());
                }
            }
            let mut timing = vec![];
            let schedule = if needs_schedule {
                let t = std::time::Instant::now();
                let mut plan = wrnc_compiler::passes::Plan::new(&l.graph, opts.mode);
                let mut dump = String::new();
                wrnc_compiler::passes::run(&mut plan, &opts.fusion, |name, plan| {
                    if dump_after.as_deref() == Some(name) {
                        dump = format!("{plan}");
                    }
                });
                if dump_after.is_some() {
                    outputs.push(("plan.txt", dump));
                }
                let s = wrnc_compiler::schedule::lower(&plan, &opts).map_err(diag)?;
                timing.push(("schedule", t.elapsed().as_secs_f64()));
                Some(s)
            } else {
                None
            };
            for e in &emit {
                match e {
                    Emit::Expanded => {
                        let f = wrnc_compiler::expand::expand_file(&l.file).map_err(diag)?;
                        outputs.push(("expanded.net", wrnc_compiler::print::print_file(&f)));
                    }
                    Emit::Graph => {
                        outputs.push(("graph.txt", wrnc_compiler::dump::graph_text(&l.graph)))
                    }
                    Emit::Dot => outputs.push(("graph.dot", wrnc_compiler::dump::dot(&l.graph))),
                    Emit::Schedule => {
                        outputs.push(("schedule.json", schedule.as_ref().expect("built").to_json()))
                    }
                    Emit::Cuda | Emit::Ptx | Emit::Resources => {}
                }
            }
            if emit
                .iter()
                .any(|e| matches!(e, Emit::Cuda | Emit::Ptx | Emit::Resources))
            {
                let s = schedule.as_ref().expect("built");
                let t = std::time::Instant::now();
                let cuda = wrnc_compiler::codegen::cuda::write(s, &opts).map_err(diag)?;
                timing.push(("cuda", t.elapsed().as_secs_f64()));
                if emit.contains(&Emit::Ptx) || emit.contains(&Emit::Resources) {
                    if s.uses_wgmma() && arch != "sm_90" {
                        return Err(UserError(format!(
                            "--arch {arch}: {} needs sm_90 (Hopper's warpgroup MMA)",
                            if tma {
                                "--tma"
                            } else if k64 {
                                "--k64"
                            } else {
                                "--wgmma"
                            }
                        ))
                        .into());
                    }
                    let need = s.min_compute_capability();
                    if arch_number(&arch).is_some_and(|a| a < need) {
                        let engine = if s.precision == wrnc_compiler::ast::Precision::F32 {
                            "--tf32 and --tf32x3 run the f32 convolutions on TF32"
                        } else {
                            "--precision bf16 runs the convolutions on bf16"
                        };
                        return Err(UserError(format!(
                            "--arch {arch}: {engine} tensor cores, which need sm_{need} or later"
                        ))
                        .into());
                    }
                }
                // sm_90a where the module uses wgmma
                let arch = s.nvrtc_arch(&arch);
                if emit.contains(&Emit::Ptx) {
                    let t = std::time::Instant::now();
                    let ptx = wrnc_runtime::nvrtc::compile_ptx(&cuda, &arch)
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                    timing.push(("nvrtc", t.elapsed().as_secs_f64()));
                    outputs.push(("kernels.ptx", ptx));
                }
                if emit.contains(&Emit::Resources) {
                    let t = std::time::Instant::now();
                    let mut r = wrnc_runtime::nvrtc::ptxas_resources(&cuda, &arch)
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                    for k in &mut r {
                        if let Some(x) = s.kernels.iter().find(|x| x.name == k.name) {
                            k.dynamic_shared = x.spec.dynamic_smem() as u64;
                        }
                    }
                    timing.push(("ptxas", t.elapsed().as_secs_f64()));
                    let spill = r
                        .iter()
                        .filter(|k| k.spill_stores + k.spill_loads > 0)
                        .count();
                    if let Some(k) = r.iter().max_by_key(|k| k.registers) {
                        eprintln!(
                            "ptxas {arch}: {} kernels, at most {} registers per thread ({}), {spill} spilling",
                            r.len(),
                            k.registers,
                            k.name
                        );
                    }
                    let mut j = serde_json::to_string_pretty(&r).expect("plain data");
                    j.push('\n');
                    outputs.push(("resources.json", j));
                }
                if emit.contains(&Emit::Cuda) {
                    outputs.push(("kernels.cu", cuda));
                }
            }
            if let Some(s) = &schedule {
                let total: f64 = timing.iter().map(|t| t.1).sum();
                let parts: Vec<String> =
                    timing.iter().map(|(n, t)| format!("{n} {t:.2}s")).collect();
                eprintln!(
                    "{}: {} {} schedule, {} kernels, {} launches per {}; compiled in {total:.2}s ({})",
                    l.graph.name,
                    if opts.fusion.unfused { "unfused" } else { "fused" },
                    if infer { "inference" } else { "training" },
                    s.kernels.len(),
                    s.launches.len(),
                    if infer { "batch" } else { "step" },
                    parts.join(", ")
                );
            }
            match o {
                Some(dir) => {
                    std::fs::create_dir_all(&dir).map_err(|e| {
                        UserError(format!("error: cannot create `{}`: {e}", dir.display()))
                    })?;
                    for (name, text) in outputs {
                        let p = dir.join(name);
                        std::fs::write(&p, text)
                            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", p.display()))?;
                        eprintln!("wrote {}", p.display());
                    }
                }
                None => {
                    for (_, text) in outputs {
                        print!("{text}");
                    }
                }
            }
        }
        Cmd::Run { net, args } => {
            let l = net::load(&net)?;
            train_cmd::run(l, args)?;
        }
        Cmd::Bench { net, args } => gpu_cmd::bench(net::load(&net)?, args)?,
        Cmd::Selftest { args } => gpu_cmd::selftest(args)?,
        Cmd::Precompile { args } => {
            precompile_cmd::precompile(args, |n| net::load(n).map_err(Into::into))?
        }
        Cmd::Export { net, args } => export_cmd::run(net::load(&net)?, args)?,
        Cmd::Plot { file, o } => {
            wrnc_runtime::plot::plot(&file, &o).map_err(|e| UserError(format!("error: {e}")))?;
            eprintln!("wrote {}", o.display());
        }
        Cmd::Data {
            cmd: DataCmd::Download { dataset, to },
        } => {
            let kind = match dataset.as_str() {
                "cifar10" => wrnc_compiler::ast::Dataset::Cifar10,
                "cifar100" => wrnc_compiler::ast::Dataset::Cifar100,
                _ => return Err(UserError(format!("error: cannot download `{dataset}`\n  = help: valid choices are cifar10, cifar100")).into()),
            };
            let p = wrnc_runtime::data::download::download(kind, &to)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            eprintln!("data in {}", p.display());
        }
    }
    Ok(())
}

/// `sm_86` / `compute_90a` -> 86 / 90; `None` for anything else (NVRTC reports it).
fn arch_number(arch: &str) -> Option<u32> {
    let d = arch
        .strip_prefix("sm_")
        .or_else(|| arch.strip_prefix("compute_"))?;
    let digits: String = d.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}
