//! Where each buffer of a schedule lives on the device, and how a launch's arguments are
//! packed. Pure data: everything here is tested without a GPU.
//!
//! One executor (one schedule) owns a single device allocation:
//! `[ own persistent buffers | arena ]`. The arena is the memory plan's
//! ([`wrnc_compiler::memplan::plan`]): transient buffers at their planned offsets, sharing
//! bytes only when their live ranges are disjoint. Persistent buffers whose name is in
//! [`SHARED`] (parameters, gradients, momentum, BN state, the optimizer table) are not in that
//! allocation: they are bound by name to allocations shared by every executor of one model (the
//! training step, the last partial batch's step, and inference), so one set of weights serves
//! all of them. Buffers no launch touches get no storage.
//!
//! Invariants of a [`Layout`]: every `Own` offset is a multiple of [`ALIGN`] and
//! `offset + bytes <= own_bytes`; own persistent buffers never overlap each other or the
//! arena, which starts at `arena_offset` and is `arena_bytes` long.

use wrnc_compiler::memplan::{self, MemPlan};
use wrnc_compiler::schedule::{Access, Launch, Role, ScalarArg, Schedule};

use super::CudaError;

/// Alignment of every buffer, in bytes (the memory plan's).
pub const ALIGN: u64 = memplan::ALIGN;

/// Buffers bound by name to allocations shared between the executors of one model.
pub const SHARED: &[&str] = &["params", "grads", "momentum", "state", "sgd_table"];

fn align(x: u64) -> u64 {
    x.div_ceil(ALIGN) * ALIGN
}

/// Bytes of buffer `i` of `s` (unaligned).
pub fn buffer_bytes(s: &Schedule, i: usize) -> u64 {
    s.buffers[i].len * s.buffers[i].dtype.bytes()
}

/// Where one buffer lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// A model-wide allocation of exactly `bytes`, bound by name.
    Shared { name: String, bytes: u64 },
    /// At `offset` bytes into the executor's own allocation.
    Own { offset: u64 },
    /// Touched by no launch: no storage.
    Unused,
}

/// The device layout of one schedule (see module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    /// Per buffer, in schedule order.
    pub places: Vec<Place>,
    /// Size of the executor's own allocation (own persistent buffers + arena).
    pub own_bytes: u64,
    pub arena_offset: u64,
    pub arena_bytes: u64,
    /// Sum of the shared buffers' sizes (allocated once per model).
    pub shared_bytes: u64,
    pub plan: MemPlan,
}

impl Layout {
    /// Plans `s`.
    pub fn new(s: &Schedule) -> Layout {
        let plan = memplan::plan(s);
        let nb = s.buffers.len();
        let mut touched = vec![false; nb];
        let mut persistent: Vec<bool> = s.buffers.iter().map(|b| b.role.persistent()).collect();
        for l in &s.setup {
            for a in &l.buffers {
                persistent[a.buffer] = true;
                touched[a.buffer] = true;
            }
        }
        for l in &s.launches {
            for a in &l.buffers {
                touched[a.buffer] = true;
            }
        }
        // the host writes the input and labels, and reads logits and loss
        for b in [Some(s.input), s.labels, Some(s.logits), s.loss]
            .into_iter()
            .flatten()
        {
            touched[b] = true;
        }
        let mut places = vec![Place::Unused; nb];
        let mut own = 0u64;
        let mut shared_bytes = 0u64;
        // own persistent buffers first (and any touched buffer the plan did not place)
        for i in 0..nb {
            if !touched[i] || (!persistent[i] && plan.offsets[i].is_some()) {
                continue;
            }
            let bytes = buffer_bytes(s, i);
            if persistent[i] && SHARED.contains(&s.buffers[i].name.as_str()) {
                places[i] = Place::Shared {
                    name: s.buffers[i].name.clone(),
                    bytes,
                };
                shared_bytes += align(bytes);
            } else {
                places[i] = Place::Own { offset: own };
                own += align(bytes.max(1));
            }
        }
        // then the arena, at the plan's offsets
        let arena_offset = own;
        for i in 0..nb {
            if persistent[i] || !touched[i] {
                continue;
            }
            if let Some(o) = plan.offsets[i] {
                places[i] = Place::Own {
                    offset: arena_offset + o,
                };
            }
        }
        Layout {
            places,
            own_bytes: arena_offset + plan.arena_bytes,
            arena_offset,
            arena_bytes: plan.arena_bytes,
            shared_bytes,
            plan,
        }
    }

    /// Device addresses of every buffer: `own_base` is the executor's allocation, `shared`
    /// resolves a shared buffer's name to its address. `None` for unused buffers.
    pub fn addresses(
        &self,
        own_base: u64,
        shared: &dyn Fn(&str) -> Option<u64>,
    ) -> Result<Vec<Option<u64>>, CudaError> {
        self.places
            .iter()
            .map(|p| match p {
                Place::Unused => Ok(None),
                Place::Own { offset } => Ok(Some(own_base + offset)),
                Place::Shared { name, .. } => shared(name).map(Some).ok_or_else(|| {
                    CudaError::Plan(format!("shared buffer `{name}` was not allocated"))
                }),
            })
            .collect()
    }

    /// Bytes this schedule needs on the device: its own allocation plus the shared buffers.
    pub fn total_bytes(&self) -> u64 {
        self.own_bytes + self.shared_bytes
    }
}

/// Values the host supplies to a step (the schedule's symbolic scalars).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Hyper {
    pub seed: u32,
    pub step: u32,
    pub lr: f32,
    pub momentum: f32,
    pub weight_decay: f32,
    pub nesterov: bool,
    pub label_smoothing: f32,
}

/// One packed kernel argument.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ArgValue {
    /// A device address.
    Ptr(u64),
    I32(i32),
    U32(u32),
    F32(f32),
    /// A `CUtensorMap` passed by value (128 bytes), to be encoded at launch
    /// (`cuTensorMapEncodeTiled`) from the dense bf16 tensor at device address `addr`
    /// ([`wrnc_compiler::schedule::TmapArg`]).
    TensorMap {
        addr: u64,
        dims: [u64; 4],
        box_dim: [u32; 4],
        /// The swizzle mode's row in bytes, 0 for none.
        swizzle: u32,
    },
}

impl ArgValue {
    /// The argument as the 8-byte slot `cuLaunchKernel` reads it from: pointers as 64 bits,
    /// 32-bit scalars in the low 4 bytes (little-endian), the rest zero. `None` for a tensor
    /// map, which the launch encodes into 128 bytes of its own.
    pub fn slot(self) -> Option<u64> {
        match self {
            ArgValue::Ptr(p) => Some(p),
            ArgValue::I32(v) => Some(v as u32 as u64),
            ArgValue::U32(v) => Some(v as u64),
            ArgValue::F32(v) => Some(v.to_bits() as u64),
            ArgValue::TensorMap { .. } => None,
        }
    }
}

/// Whether a launch takes a value that changes between steps (seed, step, lr, ...).
pub fn is_dynamic(l: &Launch) -> bool {
    l.scalars
        .iter()
        .any(|s| !matches!(s, ScalarArg::I32(_) | ScalarArg::U32(_) | ScalarArg::F32(_)))
}

/// The arguments of launch `l` of `s`, in kernel-signature order: buffers (`addr[buffer] +
/// offset * element size`), then scalars with the symbolic ones taken from `h`.
pub fn pack(
    s: &Schedule,
    l: &Launch,
    addr: &[Option<u64>],
    h: &Hyper,
) -> Result<Vec<ArgValue>, CudaError> {
    let mut v = Vec::with_capacity(l.buffers.len() + l.scalars.len());
    for a in &l.buffers {
        let b = s
            .buffers
            .get(a.buffer)
            .ok_or_else(|| CudaError::Plan(format!("{}: no buffer {}", l.note, a.buffer)))?;
        let base = addr.get(a.buffer).copied().flatten().ok_or_else(|| {
            CudaError::Plan(format!("{}: buffer {} has no storage", l.note, b.name))
        })?;
        if a.offset + a.len > b.len {
            return Err(CudaError::Plan(format!(
                "{}: argument out of range of {}",
                l.note, b.name
            )));
        }
        v.push(ArgValue::Ptr(base + a.offset * b.dtype.bytes()));
    }
    for sc in &l.scalars {
        v.push(match *sc {
            ScalarArg::I32(x) => ArgValue::I32(x),
            ScalarArg::U32(x) => ArgValue::U32(x),
            ScalarArg::F32(x) => ArgValue::F32(x),
            ScalarArg::Seed => ArgValue::U32(h.seed),
            ScalarArg::Step => ArgValue::U32(h.step),
            ScalarArg::Lr => ArgValue::F32(h.lr),
            ScalarArg::Momentum => ArgValue::F32(h.momentum),
            ScalarArg::WeightDecay => ArgValue::F32(h.weight_decay),
            ScalarArg::Nesterov => ArgValue::I32(h.nesterov as i32),
            ScalarArg::LabelSmoothing => ArgValue::F32(h.label_smoothing),
        });
    }
    for t in &l.tmaps {
        let addr = match v.get(t.buffer) {
            Some(&ArgValue::Ptr(p)) if t.buffer < l.buffers.len() => p,
            _ => {
                return Err(CudaError::Plan(format!(
                    "{}: tensor map over no buffer argument",
                    l.note
                )))
            }
        };
        v.push(ArgValue::TensorMap {
            addr,
            dims: t.dims,
            box_dim: t.box_dim,
            swizzle: t.swizzle,
        });
    }
    Ok(v)
}

/// Checks that no launch reads device memory the step has not written first, for buffers
/// that live in the arena (whose bytes are left over from other buffers): in launch order,
/// every range a launch reads of a transient buffer must be covered by earlier writes of
/// that buffer in the same step. The emulation zero-fills every buffer, so this is what the
/// GPU needs beyond the emulation tests.
pub fn check_written_before_read(s: &Schedule) -> Result<(), String> {
    let l = Layout::new(s);
    let transient: Vec<bool> = (0..s.buffers.len())
        .map(|i| {
            l.plan.offsets[i].is_some()
                && !matches!(s.buffers[i].role, Role::Input | Role::Labels | Role::Hyper)
        })
        .collect();
    // written intervals per buffer, kept sorted and merged
    let mut written: Vec<Vec<(u64, u64)>> = vec![vec![]; s.buffers.len()];
    let covered = |iv: &[(u64, u64)], a: u64, b: u64| iv.iter().any(|&(x, y)| x <= a && b <= y);
    for (li, launch) in s.launches.iter().enumerate() {
        let (params, scalars) = s.kernels[launch.kernel].spec.signature();
        // a read-write gradient whose `accum` flag is 0 is overwritten, not read
        let overwrites = |param: &str| {
            let flag = match param {
                "dx" | "y" => "accum",
                "dx0" => "accum0",
                "dx1" => "accum1",
                _ => return false,
            };
            scalars
                .iter()
                .zip(&launch.scalars)
                .any(|((n, _), v)| *n == flag && *v == ScalarArg::I32(0))
        };
        for (a, p) in launch.buffers.iter().zip(&params) {
            if !transient[a.buffer] || a.access == Access::Write || a.len == 0 || overwrites(p.name)
            {
                continue;
            }
            if !covered(&written[a.buffer], a.offset, a.offset + a.len) {
                return Err(format!(
                    "launch {li} ({}) reads {}[{}..{}] before the step wrote it",
                    launch.note,
                    s.buffers[a.buffer].name,
                    a.offset,
                    a.offset + a.len
                ));
            }
        }
        for a in &launch.buffers {
            if a.access == Access::Read {
                continue;
            }
            let iv = &mut written[a.buffer];
            iv.push((a.offset, a.offset + a.len));
            iv.sort();
            let mut merged: Vec<(u64, u64)> = vec![];
            for &(x, y) in iv.iter() {
                match merged.last_mut() {
                    Some(last) if x <= last.1 => last.1 = last.1.max(y),
                    _ => merged.push((x, y)),
                }
            }
            *iv = merged;
        }
    }
    Ok(())
}
