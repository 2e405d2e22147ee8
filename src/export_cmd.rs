//! `wrnc export`: the inference graph as ONNX (opset 17) with trained or freshly initialised
//! weights, and, for cross-checking other implementations, the CPU backend's logits on a given
//! input and the weights as a checkpoint. See docs/interop.md.

use crate::net::{Loaded, UserError};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use wrnc_compiler::graph::Graph;
use wrnc_runtime::checkpoint::{self, Checkpoint};
use wrnc_runtime::cpu::Model;
use wrnc_runtime::Tensor;

/// Largest `--input` file read (raw f32 images).
const MAX_INPUT_BYTES: u64 = 1 << 30;

#[derive(clap::Args)]
pub struct ExportArgs {
    /// Write the ONNX model (opset 17, weights included) to this file.
    #[arg(long, value_name = "FILE")]
    pub onnx: Option<PathBuf>,
    /// Weights: a checkpoint file or folder (default: fresh initialisation from --seed).
    #[arg(long, value_name = "FILE")]
    pub weights: Option<PathBuf>,
    /// Seed of the fresh initialisation (default: the file's `seed`, else 1).
    #[arg(long, conflicts_with = "weights")]
    pub seed: Option<u64>,
    /// Images to run through the CPU backend: raw little-endian f32, NCHW, any N >= 1.
    #[arg(long, value_name = "FILE", requires = "logits")]
    pub input: Option<PathBuf>,
    /// Write the CPU backend's logits for --input here: raw little-endian f32, [N, classes].
    #[arg(long, value_name = "FILE", requires = "input")]
    pub logits: Option<PathBuf>,
    /// Write the weights used (parameters and BN statistics) as a safetensors checkpoint.
    #[arg(long, value_name = "FILE")]
    pub save_weights: Option<PathBuf>,
}

fn user(m: String) -> anyhow::Error {
    UserError(m).into()
}

/// The model of `graph` with the weights and buffers of a checkpoint, which must hold exactly
/// the graph's tensors (the error names the first that does not fit).
fn model_from_checkpoint(graph: &Graph, path: &Path) -> anyhow::Result<Model> {
    let tensors = checkpoint::load_weights(path).map_err(|e| user(format!("error: {e}")))?;
    let (params, buffers) = checkpoint::state_for(graph, tensors).map_err(|e| {
        user(format!(
            "error: {} does not fit {}: {e}",
            path.display(),
            graph.name
        ))
    })?;
    Ok(Model::with_state(graph.clone(), params, buffers)?)
}

/// Reads raw f32 images shaped like the network's input.
fn read_input(path: &Path, graph: &Graph) -> anyhow::Result<Tensor> {
    let s = graph.input_shape();
    let image = s.numel() * 4;
    let meta = std::fs::metadata(path)
        .map_err(|e| user(format!("error: cannot read `{}`: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(user(format!(
            "error: `{}` is not a file: --input takes a file of raw f32 images",
            path.display()
        )));
    }
    let len = meta.len();
    if len == 0 || len % image != 0 || len > MAX_INPUT_BYTES {
        return Err(user(format!(
            "error: `{}` is {len} bytes; expected a whole number (at least 1) of {s} f32 images \
             ({image} bytes each), at most {MAX_INPUT_BYTES} bytes",
            path.display()
        )));
    }
    let bytes = std::fs::read(path)
        .map_err(|e| user(format!("error: cannot read `{}`: {e}", path.display())))?;
    let data: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    let n = (len / image) as usize;
    Ok(Tensor::from_vec(
        &[n, s.c as usize, s.h as usize, s.w as usize],
        data,
    ))
}

fn write(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, bytes)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    eprintln!("wrote {} ({} bytes)", path.display(), bytes.len());
    Ok(())
}

pub fn run(l: Loaded, args: ExportArgs) -> anyhow::Result<()> {
    if args.onnx.is_none() && args.logits.is_none() && args.save_weights.is_none() {
        return Err(user(
            "error: say what to write: --onnx FILE, --input FILE --logits FILE, or --save-weights FILE"
                .into(),
        ));
    }
    let model = match &args.weights {
        Some(path) => model_from_checkpoint(&l.graph, path)?,
        None => {
            let seed = args
                .seed
                .or(l.file.settings.seed.map(|v| v.value))
                .unwrap_or(1);
            Model::new(l.graph.clone(), seed)?
        }
    };
    if let Some(path) = &args.onnx {
        let bytes = wrnc_runtime::onnx::export(&model).map_err(|e| user(format!("error: {e}")))?;
        write(path, &bytes)?;
    }
    if let (Some(input), Some(out)) = (&args.input, &args.logits) {
        let x = read_input(input, &l.graph)?;
        let y = model.infer(&x).map_err(|e| user(format!("error: {e}")))?;
        let mut bytes = Vec::with_capacity(y.data.len() * 4);
        for v in &y.data {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        write(out, &bytes)?;
    }
    if let Some(path) = &args.save_weights {
        let ck = Checkpoint {
            tensors: model
                .params
                .iter()
                .chain(model.buffers.iter())
                .map(|(n, t)| (n.clone(), t.clone()))
                .collect(),
            momentum: BTreeMap::new(),
            meta: checkpoint::TrainState {
                net: l.graph.name.clone(),
                ..Default::default()
            },
        };
        let bytes = checkpoint::to_safetensors(&ck)?;
        write(path, &bytes)?;
    }
    Ok(())
}
