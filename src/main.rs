//! `wrnc`: the command line. Only this crate uses clap.
//!
//! Exit codes: 0 success, 1 a failure while running (I/O, training diverged, ...),
//! 2 bad input (network, file, flag).

mod net;
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
    },
    /// Parse and verify a network; print nothing else.
    Check { net: String },
    /// Write the compiler's outputs for a network.
    Compile {
        net: String,
        /// Comma-separated: expanded, graph, dot.
        #[arg(long, value_delimiter = ',', default_value = "expanded")]
        emit: Vec<Emit>,
        /// Output directory (default: print to standard output).
        #[arg(short, long)]
        o: Option<PathBuf>,
    },
    /// Train or evaluate a network (CPU reference backend).
    Run {
        net: String,
        #[command(flatten)]
        args: train_cmd::RunArgs,
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
}

fn main() -> ExitCode {
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
                eprintln!("error: {e:#}");
                ExitCode::from(1)
            }
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Info { net, json, batch } => {
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
            if json {
                println!("{}", serde_json::to_string_pretty(&i)?);
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
            }
        }
        Cmd::Check { net } => {
            let l = net::load(&net)?;
            eprintln!("ok: {} ({} nodes)", l.graph.name, l.graph.order.len());
        }
        Cmd::Compile { net, emit, o } => {
            let l = net::load(&net)?;
            let mut outputs: Vec<(&str, String)> = vec![];
            for e in &emit {
                match e {
                    Emit::Expanded => {
                        let f = wrnc_compiler::expand::expand_file(&l.file).map_err(|e| {
                            UserError(wrnc_grammar::Diagnostic::from_error(&l.source, &e).render())
                        })?;
                        outputs.push(("expanded.net", wrnc_compiler::print::print_file(&f)));
                    }
                    Emit::Graph => {
                        outputs.push(("graph.txt", wrnc_compiler::dump::graph_text(&l.graph)))
                    }
                    Emit::Dot => outputs.push(("graph.dot", wrnc_compiler::dump::dot(&l.graph))),
                }
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
