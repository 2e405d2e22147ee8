//! Checkpoints: weights, batch-norm statistics, momentum buffers and training state in one
//! safetensors file, written atomically.
//!
//! Layout of a checkpoint folder: `DIR/last.safetensors`, nothing else (a crash while saving
//! can leave a `DIR/.last.safetensors.tmp*` file behind; it is never read and the next save
//! replaces it).
//!
//! The file is plain safetensors, loadable from Python (`safetensors.torch.load_file`):
//! - weights and buffers under the graph's names (`<node name>.weight`, `.bias`,
//!   `.running_mean`, `.running_var`), f32, little-endian;
//! - optimizer momentum buffers under `momentum.<parameter name>`;
//! - `__metadata__` holds a single key, `wrnc`, whose value is a JSON string
//!   `{"format": 1, "state": TrainState, "crc32": "<hex>"}`. The CRC-32 covers every tensor's
//!   name, shape and bytes in name order, so a damaged file is refused instead of loaded.
//!
//! A file without the `wrnc` key (e.g. written by Python) loads with a default [`TrainState`]
//! and no checksum check. Output is deterministic: the same checkpoint gives the same bytes.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use crate::Tensor;

/// File name of the checkpoint in its folder.
pub const LAST: &str = "last.safetensors";
/// Prefix of the momentum buffers' names in the file.
pub const MOMENTUM_PREFIX: &str = "momentum.";
const META_KEY: &str = "wrnc";
const FORMAT: u32 = 1;

/// Where training stands, enough to resume it exactly.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TrainState {
    /// The network, as the user named or wrote it.
    pub net: String,
    /// Epochs completed.
    pub epoch: u64,
    /// Optimiser steps completed.
    pub step: u64,
    /// The run's seed (initialisation, dropout, augmentation).
    pub seed: u64,
    /// The seed of the epoch shuffles ([`crate::data::shuffle`]).
    #[serde(default)]
    pub data_seed: u64,
    /// Batches of the current epoch already consumed (0 at an epoch boundary).
    #[serde(default)]
    pub batch_in_epoch: u64,
    /// Anything else the trainer wants back (learning rate, best accuracy, ...).
    #[serde(default)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// A checkpoint in memory.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Checkpoint {
    /// Weights and buffers, by the graph's names.
    pub tensors: BTreeMap<String, Tensor>,
    /// Momentum buffers, by parameter name (without the `momentum.` prefix).
    pub momentum: BTreeMap<String, Tensor>,
    pub meta: TrainState,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a valid checkpoint: {message}", path.display())]
    Corrupt { path: PathBuf, message: String },
    #[error("tensor {name}: {message}")]
    Invalid { name: String, message: String },
    #[error("tensor {name} is missing from the checkpoint (expected shape {expected:?})")]
    Missing { name: String, expected: Vec<usize> },
    #[error("tensor {name} is in the checkpoint but not in the network")]
    Unexpected { name: String },
    #[error(
        "tensor {name} has shape {found:?} in the checkpoint, the network expects {expected:?}"
    )]
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Serialize, Deserialize)]
struct Meta {
    format: u32,
    state: TrainState,
    crc32: String,
}

fn checksum<'a>(tensors: impl Iterator<Item = (&'a str, &'a [usize], &'a [u8])>) -> String {
    let mut h = crc32fast::Hasher::new();
    for (name, shape, bytes) in tensors {
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(&(shape.len() as u64).to_le_bytes());
        for &d in shape {
            h.update(&(d as u64).to_le_bytes());
        }
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    format!("{:08x}", h.finalize())
}

fn to_bytes(t: &Tensor) -> Vec<u8> {
    let mut out = Vec::with_capacity(t.data.len() * 4);
    for v in &t.data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// The checkpoint as safetensors bytes (deterministic).
pub fn to_safetensors(ck: &Checkpoint) -> Result<Vec<u8>, CheckpointError> {
    let mut named: BTreeMap<String, (&Tensor, Vec<u8>)> = BTreeMap::new();
    for (name, t) in &ck.tensors {
        if name.starts_with(MOMENTUM_PREFIX) {
            return Err(CheckpointError::Invalid {
                name: name.clone(),
                message: format!("weight names may not start with {MOMENTUM_PREFIX}"),
            });
        }
        named.insert(name.clone(), (t, to_bytes(t)));
    }
    for (name, t) in &ck.momentum {
        named.insert(format!("{MOMENTUM_PREFIX}{name}"), (t, to_bytes(t)));
    }
    for (name, (t, _)) in &named {
        if t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) != Some(t.data.len()) {
            return Err(CheckpointError::Invalid {
                name: name.clone(),
                message: format!("{} values for shape {:?}", t.data.len(), t.shape),
            });
        }
    }
    let crc32 = checksum(
        named
            .iter()
            .map(|(n, (t, b))| (n.as_str(), t.shape.as_slice(), b.as_slice())),
    );
    let meta = Meta {
        format: FORMAT,
        state: ck.meta.clone(),
        crc32,
    };
    let meta_json = serde_json::to_string(&meta).map_err(|e| CheckpointError::Invalid {
        name: "__metadata__".into(),
        message: e.to_string(),
    })?;
    let mut views = Vec::with_capacity(named.len());
    for (name, (t, bytes)) in &named {
        let view = TensorView::new(Dtype::F32, t.shape.clone(), bytes).map_err(|e| {
            CheckpointError::Invalid {
                name: name.clone(),
                message: e.to_string(),
            }
        })?;
        views.push((name.as_str(), view));
    }
    let info = HashMap::from([(META_KEY.to_string(), meta_json)]);
    safetensors::serialize(views, Some(info)).map_err(|e| CheckpointError::Invalid {
        name: "(file)".into(),
        message: e.to_string(),
    })
}

/// Writes `ck` to `dir/last.safetensors` atomically: to a temporary file in `dir`, fsync,
/// rename over the old one, fsync the folder. A crash at any point leaves either the old or
/// the new checkpoint. Creates `dir` if needed. Returns the checkpoint's path.
pub fn save(dir: &Path, ck: &Checkpoint) -> Result<PathBuf, CheckpointError> {
    let bytes = to_safetensors(ck)?;
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let path = dir.join(LAST);
    let tmp = dir.join(format!(".{LAST}.tmp{}", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    // Make the rename itself durable; not every platform can open a folder, so best effort.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(path)
}

/// The checkpoint file for `path`: `path/last.safetensors` for a folder, else `path`.
pub fn resolve(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join(LAST)
    } else {
        path.to_path_buf()
    }
}

/// Loads a checkpoint (a file, or a folder holding `last.safetensors`).
pub fn load(path: &Path) -> Result<Checkpoint, CheckpointError> {
    read(path, true)
}

/// Loads only the weights and buffers of a checkpoint (no momentum).
pub fn load_weights(path: &Path) -> Result<BTreeMap<String, Tensor>, CheckpointError> {
    Ok(read(path, false)?.tensors)
}

/// Parses safetensors bytes; `path` is for messages.
pub fn from_safetensors(
    path: &Path,
    bytes: &[u8],
    with_momentum: bool,
) -> Result<Checkpoint, CheckpointError> {
    let corrupt = |message: String| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        message,
    };
    if bytes.len() < 8 {
        return Err(corrupt(format!(
            "truncated: {} bytes, shorter than the 8-byte header length",
            bytes.len()
        )));
    }
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    if header_len > bytes.len() as u64 - 8 {
        return Err(corrupt(format!(
            "truncated: the header claims {header_len} bytes but the file has {}",
            bytes.len()
        )));
    }
    let (_, metadata) = SafeTensors::read_metadata(bytes).map_err(|e| {
        corrupt(format!(
            "{e} (file is {} bytes: truncated or damaged?)",
            bytes.len()
        ))
    })?;
    let st = SafeTensors::deserialize(bytes).map_err(|e| corrupt(e.to_string()))?;
    let meta = match metadata.metadata().as_ref().and_then(|m| m.get(META_KEY)) {
        Some(json) => {
            let m: Meta = serde_json::from_str(json)
                .map_err(|e| corrupt(format!("metadata {META_KEY}: {e}")))?;
            if m.format != FORMAT {
                return Err(corrupt(format!(
                    "checkpoint format {} (this build reads format {FORMAT})",
                    m.format
                )));
            }
            let mut views = st.tensors();
            views.sort_by(|a, b| a.0.cmp(&b.0));
            let crc = checksum(views.iter().map(|(n, v)| (n.as_str(), v.shape(), v.data())));
            if crc != m.crc32 {
                return Err(corrupt(format!(
                    "checksum mismatch (stored {}, computed {crc}): the tensor data is damaged",
                    m.crc32
                )));
            }
            Some(m.state)
        }
        None => None,
    };
    let mut ck = Checkpoint {
        meta: meta.unwrap_or_default(),
        ..Checkpoint::default()
    };
    for (name, view) in st.iter() {
        let momentum = name.strip_prefix(MOMENTUM_PREFIX);
        if momentum.is_some() && !with_momentum {
            continue;
        }
        if view.dtype() != Dtype::F32 {
            return Err(corrupt(format!(
                "tensor {name} is {:?}, only F32 is read",
                view.dtype()
            )));
        }
        let data: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        // safetensors has checked that the byte length matches the shape.
        let t = Tensor {
            shape: view.shape().to_vec(),
            data,
        };
        match momentum {
            Some(p) => ck.momentum.insert(p.to_string(), t),
            None => ck.tensors.insert(name.to_string(), t),
        };
    }
    Ok(ck)
}

fn read(path: &Path, with_momentum: bool) -> Result<Checkpoint, CheckpointError> {
    let file = resolve(path);
    let bytes = std::fs::read(&file).map_err(io(&file))?;
    from_safetensors(&file, &bytes, with_momentum)
}

/// The tensors a checkpoint of `graph` holds, as `(name, shape)` for [`check_against`]: every
/// parameter, then every buffer (BN running statistics), in the graph's topological order.
pub fn expected_tensors(graph: &wrnc_compiler::graph::Graph) -> Vec<(String, Vec<usize>)> {
    let mut v: Vec<(String, Vec<usize>)> = graph
        .params()
        .into_iter()
        .map(|(name, p)| (name, p.shape))
        .collect();
    v.extend(
        graph
            .buffers()
            .into_iter()
            .map(|(name, len)| (name, vec![len])),
    );
    v
}

/// Checks that `weights` holds exactly the tensors `expected` (name, shape), in the order
/// given; the error names the first tensor missing or of the wrong shape, then the first
/// (by name) that the network does not have.
pub fn check_against(
    weights: &BTreeMap<String, Tensor>,
    expected: &[(String, Vec<usize>)],
) -> Result<(), CheckpointError> {
    for (name, shape) in expected {
        match weights.get(name) {
            None => {
                return Err(CheckpointError::Missing {
                    name: name.clone(),
                    expected: shape.clone(),
                })
            }
            Some(t) if &t.shape != shape => {
                return Err(CheckpointError::Shape {
                    name: name.clone(),
                    expected: shape.clone(),
                    found: t.shape.clone(),
                })
            }
            Some(_) => {}
        }
    }
    let known: std::collections::BTreeSet<&str> =
        expected.iter().map(|(n, _)| n.as_str()).collect();
    if let Some(name) = weights.keys().find(|n| !known.contains(n.as_str())) {
        return Err(CheckpointError::Unexpected { name: name.clone() });
    }
    Ok(())
}

/// The weights and BN statistics of `graph` from checkpoint tensors, split into
/// `(params, buffers)` as [`crate::cpu::Model::with_state`] takes them. The tensors must be
/// exactly the graph's (see [`check_against`]: the error names the first that does not fit).
#[allow(clippy::type_complexity)]
pub fn state_for(
    graph: &wrnc_compiler::graph::Graph,
    tensors: BTreeMap<String, Tensor>,
) -> Result<(BTreeMap<String, Tensor>, BTreeMap<String, Tensor>), CheckpointError> {
    check_against(&tensors, &expected_tensors(graph))?;
    let buffer_names: std::collections::BTreeSet<String> =
        graph.buffers().into_iter().map(|(n, _)| n).collect();
    let (mut params, mut buffers) = (BTreeMap::new(), BTreeMap::new());
    for (n, t) in tensors {
        if buffer_names.contains(&n) {
            buffers.insert(n, t);
        } else {
            params.insert(n, t);
        }
    }
    Ok((params, buffers))
}
