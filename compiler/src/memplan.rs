//! Memory plan and traffic estimates of a [`Schedule`].
//!
//! - Persistent buffers ([`Role::persistent`](crate::schedule::Role::persistent), and anything a setup launch touches) get their
//!   own storage for the whole run.
//! - Every other buffer lives from the first to the last launch that uses it (in launch order)
//!   and is placed in one arena by greedy first-fit, largest first: two buffers share bytes only
//!   when their live ranges are disjoint. Offsets are aligned to [`ALIGN`] bytes.
//! - The peak device bytes of a step are the persistent bytes plus the arena.
//! - DRAM traffic is estimated as the sum over launches of the bytes of every buffer range a
//!   launch reads or writes (read-write ranges count twice); caches are ignored, so it is the
//!   traffic of a kernel that touches each operand once.

use crate::ast::Precision;
use crate::graph::Graph;
use crate::passes::{Fusion, Mode};
use crate::schedule::{self, Access, Options, Schedule};
use serde::Serialize;

/// Arena alignment in bytes.
pub const ALIGN: u64 = 256;

/// Where each buffer lives.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemPlan {
    /// Per buffer (schedule order): `Some(offset)` in the arena, `None` for persistent buffers.
    pub offsets: Vec<Option<u64>>,
    /// Per buffer: the live range `(first, last)` launch indices; `None` if persistent or unused.
    pub live: Vec<Option<(usize, usize)>>,
    pub arena_bytes: u64,
    pub persistent_bytes: u64,
    /// `persistent_bytes + arena_bytes`.
    pub peak_bytes: u64,
    /// What the step would need without reuse (every buffer its own storage).
    pub no_reuse_bytes: u64,
}

fn align(x: u64) -> u64 {
    x.div_ceil(ALIGN) * ALIGN
}

/// Plans the buffers of `s` (see module docs).
pub fn plan(s: &Schedule) -> MemPlan {
    let nb = s.buffers.len();
    let mut persistent = vec![false; nb];
    for (i, b) in s.buffers.iter().enumerate() {
        persistent[i] = b.role.persistent();
    }
    for l in &s.setup {
        for a in &l.buffers {
            persistent[a.buffer] = true;
        }
    }
    let mut live: Vec<Option<(usize, usize)>> = vec![None; nb];
    for (li, l) in s.launches.iter().enumerate() {
        for a in &l.buffers {
            if persistent[a.buffer] {
                continue;
            }
            live[a.buffer] = Some(match live[a.buffer] {
                None => (li, li),
                Some((f, _)) => (f, li),
            });
        }
    }
    // the outputs the host reads after the step (logits, loss) stay live to the end
    let end = s.launches.len().saturating_sub(1);
    for b in [Some(s.logits), s.loss].into_iter().flatten() {
        if let Some((f, _)) = live[b] {
            live[b] = Some((f, end));
        }
    }
    let bytes = |i: usize| align(s.buffers[i].len * s.buffers[i].dtype.bytes());
    let mut order: Vec<usize> = (0..nb).filter(|&i| live[i].is_some()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(bytes(i)), i));
    // placed buffers by offset: first fit walks them upwards, over those live at the same
    // time, and stops at the first gap that holds the buffer (the lowest such offset)
    let mut placed: Vec<(u64, usize)> = Vec::new();
    let mut offsets = vec![None; nb];
    let mut arena = 0u64;
    for &i in &order {
        let (f, l) = live[i].unwrap();
        let size = bytes(i);
        let mut at = 0u64;
        for &(o, j) in &placed {
            let (f2, l2) = live[j].unwrap();
            if !(f2 <= l && f <= l2) {
                continue;
            }
            if at + size <= o {
                break;
            }
            at = at.max(o + bytes(j));
        }
        offsets[i] = Some(at);
        let k = placed.partition_point(|&(o, _)| o <= at);
        placed.insert(k, (at, i));
        arena = arena.max(at + size);
    }
    let persistent_bytes: u64 = (0..nb).filter(|&i| persistent[i]).map(bytes).sum();
    let no_reuse_bytes: u64 = (0..nb).map(bytes).sum();
    MemPlan {
        offsets,
        live,
        arena_bytes: arena,
        persistent_bytes,
        peak_bytes: persistent_bytes + arena,
        no_reuse_bytes,
    }
}

/// Estimated DRAM bytes moved by one step (the per-step launches; setup excluded).
pub fn dram_bytes(s: &Schedule) -> u64 {
    s.launches.iter().map(|l| launch_dram_bytes(s, l)).sum()
}

/// One launch's share of [`dram_bytes`]: every argument range read or written once (twice
/// when read and written).
pub fn launch_dram_bytes(s: &Schedule, l: &crate::schedule::Launch) -> u64 {
    l.buffers
        .iter()
        .map(|a| {
            let b = a.len * s.buffers[a.buffer].dtype.bytes();
            if a.access == Access::ReadWrite {
                2 * b
            } else {
                b
            }
        })
        .sum()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Launches {
    pub train_fused: usize,
    pub train_unfused: usize,
    pub infer_fused: usize,
    pub infer_unfused: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct FusedUnfused {
    pub fused: u64,
    pub unfused: u64,
}

/// What `wrnc info --json` reports about the compiled step (training for bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub launches: Launches,
    /// Estimated DRAM bytes of one training step.
    pub dram_bytes: FusedUnfused,
    /// Estimated DRAM bytes of one inference batch (its setup launches excluded: they run
    /// once after the parameters change).
    pub infer_dram_bytes: FusedUnfused,
    /// Peak device bytes of one training step (parameters, gradients, momentum included).
    pub peak_bytes: FusedUnfused,
}

/// Builds the four schedules (train / infer, fused / unfused) and summarises them.
pub fn summarize(graph: &Graph, batch: u32, precision: Precision) -> crate::Result<Summary> {
    let build = |mode, unfused| {
        schedule::build(
            graph,
            &Options {
                tiles: Default::default(),
                layout: Default::default(),
                mode,
                batch,
                precision,
                fusion: Fusion {
                    unfused,
                    disabled: vec![],
                },
            },
        )
    };
    let (tf, tu) = (build(Mode::Train, false)?, build(Mode::Train, true)?);
    let (inf, inu) = (build(Mode::Infer, false)?, build(Mode::Infer, true)?);
    Ok(Summary {
        launches: Launches {
            train_fused: tf.launches.len(),
            train_unfused: tu.launches.len(),
            infer_fused: inf.launches.len(),
            infer_unfused: inu.launches.len(),
        },
        dram_bytes: FusedUnfused {
            fused: dram_bytes(&tf),
            unfused: dram_bytes(&tu),
        },
        infer_dram_bytes: FusedUnfused {
            fused: dram_bytes(&inf),
            unfused: dram_bytes(&inu),
        },
        peak_bytes: FusedUnfused {
            fused: plan(&tf).peak_bytes,
            unfused: plan(&tu).peak_bytes,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{Conv2d, Node, Op, Shape};

    fn net() -> Graph {
        let mut g = Graph::new("t", Shape::new(3, 8, 8));
        let s = Shape::new(8, 8, 8);
        let conv = |i| {
            Op::Conv2d(Conv2d {
                in_c: i,
                out_c: 8,
                k: 3,
                stride: 1,
                pad: 1,
                groups: 1,
                bias: false,
            })
        };
        let mut last = g.input;
        let push = |g: &mut Graph, op: Op, shape: Shape, ins: &[_]| {
            let name = format!("{}", g.order.len());
            g.push(Node { op, name, shape }, ins)
        };
        last = push(&mut g, conv(3), s, &[last]);
        for _ in 0..3 {
            let b = push(
                &mut g,
                Op::BatchNorm {
                    c: 8,
                    eps: 1e-5,
                    momentum: 0.1,
                },
                s,
                &[last],
            );
            let r = push(&mut g, Op::Relu, s, &[b]);
            let c = push(&mut g, conv(8), s, &[r]);
            last = push(&mut g, Op::Add, s, &[last, c]);
        }
        let gp = push(&mut g, Op::GlobalAvgPool, Shape::new(8, 1, 1), &[last]);
        let f = push(
            &mut g,
            Op::Linear { in_f: 8, out_f: 10 },
            Shape::new(10, 1, 1),
            &[gp],
        );
        g.output = f;
        g.classes = 10;
        g
    }

    #[test]
    fn live_buffers_never_overlap() {
        for unfused in [false, true] {
            let s = schedule::build(
                &net(),
                &Options {
                    batch: 4,
                    fusion: Fusion {
                        unfused,
                        disabled: vec![],
                    },
                    ..Options::default()
                },
            )
            .unwrap();
            let p = plan(&s);
            let bytes = |i: usize| align(s.buffers[i].len * s.buffers[i].dtype.bytes());
            for i in 0..s.buffers.len() {
                for j in 0..i {
                    if let (Some(a), Some(b), Some((f1, l1)), Some((f2, l2))) =
                        (p.offsets[i], p.offsets[j], p.live[i], p.live[j])
                    {
                        if f1 <= l2 && f2 <= l1 {
                            assert!(
                                a + bytes(i) <= b || b + bytes(j) <= a,
                                "{} and {} overlap",
                                s.buffers[i].name,
                                s.buffers[j].name
                            );
                        }
                    }
                }
            }
            assert!(p.peak_bytes < p.no_reuse_bytes, "no reuse happened");
        }
    }

    #[test]
    fn fusion_saves_launches_traffic_and_memory() {
        let s = summarize(&net(), 4, Precision::F32).unwrap();
        assert!(s.launches.train_fused < s.launches.train_unfused, "{s:?}");
        assert!(s.launches.infer_fused < s.launches.infer_unfused, "{s:?}");
        assert!(s.dram_bytes.fused < s.dram_bytes.unfused, "{s:?}");
        assert!(s.peak_bytes.fused < s.peak_bytes.unfused, "{s:?}");
    }
}
