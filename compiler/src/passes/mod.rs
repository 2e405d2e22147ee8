//! Fusion passes over the [`Plan`]: the op graph annotated with where each op's work happens.
//!
//! A [`Plan`] has one [`PNode`] per graph node, in the graph's topological order. Passes never
//! add or remove nodes; they only move work between kernels by setting [`Fuse`] fields. The
//! schedule builder ([`crate::schedule`]) then emits kernels and launches from the annotated
//! plan, forward and backward, so every pass is automatically differentiated.
//!
//! Every pass is a plain `fn(&mut Plan) -> bool` (true when it changed something), listed once
//! in [`PIPELINE`], so `--no-fuse PASS`, `--unfused` (no pass at all: one kernel per op, the
//! benchmark baseline) and `--dump-after PASS` need nothing but this table.
//!
//! Invariants kept by every pass (checked by [`Plan::verify`]):
//! - a node that some kernel reads through [`Plan::value_node`] is materialised (has a buffer);
//! - a conv has at most one prologue, one residual epilogue, one stats epilogue, one folded BN;
//! - inlined / removed nodes have no kernel of their own in the direction they were fused.

use crate::graph::{Graph, Op, Shape};
use serde::Serialize;
use std::fmt;

/// What the schedule computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Forward in eval mode (BN running statistics, dropout off).
    Infer,
    /// A whole training step: forward (train mode), loss, backward, optimizer update.
    Train,
}

/// A conv's (in inference also a global average pooling's) input transform, applied as each
/// input element is loaded (never stored):
/// `x -> drop(relu(x * scale[c] + shift[c]))`, zero padding applied after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ProloguePlan {
    /// The materialised tensor actually read (the BN's input, or the dropout's input).
    pub src: usize,
    /// BN whose scale/shift is applied.
    pub bn: Option<usize>,
    /// The ReLU node applied after the BN (if any).
    pub relu: Option<usize>,
    /// The dropout node applied last (train mode only).
    pub dropout: Option<usize>,
}

/// Fusion annotations. `Default` = unfused.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Fuse {
    /// The output is never written: every user recomputes it in its prologue
    /// (BN apply, ReLU, dropout of a prologue chain).
    pub inlined: bool,
    /// Identity in this mode, removed: the output *is* the input buffer (inference dropout).
    pub removed: bool,
    /// Conv: input transform applied on load.
    pub prologue: Option<ProloguePlan>,
    /// Conv: writes `conv + other` straight into this Add node's output
    /// (`(add, other operand)`); the conv's own output is never written.
    pub residual: Option<(usize, usize)>,
    /// Add or ReLU: computed by this conv's epilogue.
    pub computed_by: Option<usize>,
    /// Conv (inference): its epilogue applies this ReLU last (after the bias and the residual)
    /// and writes the ReLU's output; the values before it are never written.
    pub epi_relu: Option<usize>,
    /// Conv: its epilogue accumulates per-channel sum / sum of squares of the value it writes
    /// for this BN (atomics into the BN's stats slot).
    pub stats_for: Option<usize>,
    /// BN: batch statistics come from this conv's epilogue (no statistics kernel).
    pub stats_from: Option<usize>,
    /// Conv (inference): this BN is folded into the weights/bias; the conv writes the BN's output.
    pub folded_bn: Option<usize>,
    /// BN (inference): folded into this conv.
    pub folded_into: Option<usize>,
    /// BN chain (train): its backward reduction (sum dy, sum dy * xhat) and the dReLU/dropout
    /// masks happen in the epilogue of this conv's data-gradient kernel.
    pub bwd_from: Option<usize>,
    /// Conv: its data-gradient epilogue applies this BN chain's masks and reductions.
    pub bwd_for: Option<usize>,
    /// Add (train): the operand whose gradient buffer *is* this add's (no copy-accumulate in
    /// the add's backward; the operand's other contributions accumulate into it in place).
    /// Set by `residual_grad_alias`, which checks that this is exact (see there).
    pub grad_alias: Option<usize>,
}

/// One graph node with its fusion annotations.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PNode {
    pub name: String,
    pub op: Op,
    pub shape: Shape,
    /// Operand plan indices, in slot order.
    pub inputs: Vec<usize>,
    /// Consumer plan indices, sorted, deduplicated.
    pub users: Vec<usize>,
    pub fuse: Fuse,
}

/// The graph in topological order with fusion annotations (see module docs).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    pub name: String,
    pub mode: Mode,
    pub nodes: Vec<PNode>,
    /// Index of the logits node.
    pub output: usize,
    pub classes: u32,
}

impl Plan {
    /// An unfused plan of `graph`.
    pub fn new(graph: &Graph, mode: Mode) -> Plan {
        let mut index = std::collections::HashMap::new();
        for (i, &n) in graph.order.iter().enumerate() {
            index.insert(n, i);
        }
        let nodes = graph
            .order
            .iter()
            .map(|&n| {
                let node = graph.node(n);
                PNode {
                    name: node.name.clone(),
                    op: node.op.clone(),
                    shape: node.shape,
                    inputs: graph.inputs(n).iter().map(|i| index[i]).collect(),
                    users: {
                        let mut u: Vec<usize> = graph.users(n).iter().map(|i| index[i]).collect();
                        u.sort();
                        u
                    },
                    fuse: Fuse::default(),
                }
            })
            .collect();
        Plan {
            name: graph.name.clone(),
            mode,
            nodes,
            output: index[&graph.output],
            classes: graph.classes,
        }
    }

    /// The node whose buffer holds node `i`'s value, or `None` when the value is never
    /// materialised (inlined into prologues, or a conv that writes elsewhere).
    pub fn value_node(&self, i: usize) -> Option<usize> {
        let n = &self.nodes[i];
        if n.fuse.removed {
            return self.value_node(n.inputs[0]);
        }
        if n.fuse.inlined {
            return None;
        }
        // a conv's epilogue chain (the conv, a folded BN, a fused add, a ReLU): only the
        // last of them is written
        let w = self.writer(i);
        if self.is_conv(w) && self.epilogue_out(w) != i {
            return None;
        }
        Some(i)
    }

    /// The node whose value conv `c`'s kernel writes: its epilogue ReLU, else its fused add,
    /// else its folded BN, else the conv itself.
    pub fn epilogue_out(&self, c: usize) -> usize {
        let f = &self.nodes[c].fuse;
        f.epi_relu
            .or(f.residual.map(|(a, _)| a))
            .or(f.folded_bn)
            .unwrap_or(c)
    }

    /// The node whose kernel writes node `i`'s buffer (the conv for a fused Add or folded BN).
    pub fn writer(&self, i: usize) -> usize {
        let f = &self.nodes[i].fuse;
        f.computed_by.or(f.folded_into).unwrap_or(i)
    }

    fn is_conv(&self, i: usize) -> bool {
        matches!(self.nodes[i].op, Op::Conv2d(_))
    }

    /// Checks the module invariants; returns the first violation.
    pub fn verify(&self) -> Result<(), String> {
        for (i, n) in self.nodes.iter().enumerate() {
            if let Some(p) = n.fuse.prologue {
                if self.value_node(p.src) != Some(p.src) {
                    return Err(format!(
                        "{}: prologue source {} is not materialised",
                        n.name, self.nodes[p.src].name
                    ));
                }
            }
            if let Some((_, other)) = n.fuse.residual {
                if self.value_node(other).is_none() || other >= i {
                    return Err(format!("{}: residual operand not available", n.name));
                }
            }
            for &u in &n.users {
                let un = &self.nodes[u];
                let reads_via_prologue = un.fuse.prologue.is_some();
                // (a user in the same epilogue chain is computed by the same kernel)
                let same_kernel = self.is_conv(self.writer(u)) && self.writer(u) == self.writer(i);
                if !reads_via_prologue
                    && !n.fuse.inlined
                    && self.value_node(i).is_none()
                    && !same_kernel
                {
                    return Err(format!(
                        "{} read by {} but not materialised",
                        n.name, un.name
                    ));
                }
                if n.fuse.inlined
                    && !(self.nodes[u].fuse.inlined
                        || self.nodes[u].fuse.removed
                        || reads_via_prologue
                        || matches!(self.nodes[u].op, Op::Relu | Op::Dropout { .. }))
                {
                    return Err(format!(
                        "{} is inlined but {} reads it directly",
                        n.name, un.name
                    ));
                }
            }
        }
        Ok(())
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "plan {} ({:?})", self.name, self.mode)?;
        for (i, n) in self.nodes.iter().enumerate() {
            let ins: Vec<String> = n.inputs.iter().map(|x| format!("%{x}")).collect();
            write!(
                f,
                "  %{i} = {}({}) {} [{}]",
                n.op.mnemonic(),
                ins.join(", "),
                n.shape,
                n.name
            )?;
            let u = &n.fuse;
            if u.inlined {
                write!(f, " inlined")?;
            }
            if u.removed {
                write!(f, " removed")?;
            }
            if let Some(p) = u.prologue {
                write!(f, " prologue(src=%{}", p.src)?;
                if let Some(b) = p.bn {
                    write!(f, " bn=%{b}")?;
                }
                if let Some(r) = p.relu {
                    write!(f, " relu=%{r}")?;
                }
                if let Some(d) = p.dropout {
                    write!(f, " dropout=%{d}")?;
                }
                write!(f, ")")?;
            }
            if let Some((a, o)) = u.residual {
                write!(f, " residual(add=%{a} other=%{o})")?;
            }
            if let Some(c) = u.computed_by {
                write!(f, " computed_by=%{c}")?;
            }
            if let Some(r) = u.epi_relu {
                write!(f, " epi_relu=%{r}")?;
            }
            if let Some(b) = u.stats_for {
                write!(f, " stats_for=%{b}")?;
            }
            if let Some(c) = u.stats_from {
                write!(f, " stats_from=%{c}")?;
            }
            if let Some(b) = u.folded_bn {
                write!(f, " folded_bn=%{b}")?;
            }
            if let Some(c) = u.folded_into {
                write!(f, " folded_into=%{c}")?;
            }
            if let Some(c) = u.bwd_from {
                write!(f, " bwd_from=%{c}")?;
            }
            if let Some(b) = u.bwd_for {
                write!(f, " bwd_for=%{b}")?;
            }
            if let Some(r) = u.grad_alias {
                write!(f, " grad_alias=%{r}")?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

/// A fusion pass: rewrites the plan in place, returns true when it changed something.
pub type Pass = fn(&mut Plan) -> bool;

/// Every pass, in the order they run. `--no-fuse NAME` skips one; `--unfused` skips all.
pub const PIPELINE: &[(&str, Pass)] = &[
    ("inference", fuse_inference),
    ("bn_relu_prologue", fuse_bn_relu_prologue),
    ("dropout_epilogue", fuse_dropout_epilogue),
    ("residual_add_epilogue", fuse_residual_add_epilogue),
    ("relu_epilogue", fuse_relu_epilogue),
    ("bn_stats_epilogue", fuse_bn_stats_epilogue),
    ("backward", fuse_backward),
    ("residual_grad_alias", alias_residual_grad),
];

/// Names of every pass, in pipeline order.
pub fn pass_names() -> Vec<&'static str> {
    PIPELINE.iter().map(|(n, _)| *n).collect()
}

/// Which passes run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Fusion {
    /// No pass at all (one kernel per op).
    pub unfused: bool,
    /// Passes skipped by name.
    pub disabled: Vec<String>,
}

impl Fusion {
    /// Checks that every disabled name is a pass.
    pub fn validate(&self) -> Result<(), String> {
        for d in &self.disabled {
            if !PIPELINE.iter().any(|(n, _)| n == d) {
                return Err(format!(
                    "unknown pass `{d}`; passes are: {}",
                    pass_names().join(", ")
                ));
            }
        }
        Ok(())
    }
    pub fn enabled(&self, name: &str) -> bool {
        !self.unfused && !self.disabled.iter().any(|d| d == name)
    }
}

/// Runs the enabled passes in pipeline order, calling `after(name, plan)` after each pass that
/// ran (for `--dump-after`). Returns the names of the passes that changed the plan.
pub fn run(
    plan: &mut Plan,
    fusion: &Fusion,
    mut after: impl FnMut(&str, &Plan),
) -> Vec<&'static str> {
    let mut changed = Vec::new();
    for (name, pass) in PIPELINE {
        if fusion.enabled(name) {
            if pass(plan) {
                changed.push(*name);
            }
            debug_assert_eq!(plan.verify(), Ok(()), "after pass {name}");
            after(name, plan);
        }
    }
    changed
}

// inference (eval mode only):
//   bn(conv(x, W, b)) = conv(x, W * s[o], (b - mean) * s + beta),  s = gamma / sqrt(var + eps)
//     when the conv's only user is the BN (the folded weights are computed once, in setup);
//   dropout(x) = x,  droppath(x) = x  (removed: the output aliases the input).
// A BN that precedes a conv becomes a prologue in `bn_relu_prologue`.
fn fuse_inference(p: &mut Plan) -> bool {
    if p.mode != Mode::Infer {
        return false;
    }
    let mut changed = false;
    for i in 0..p.nodes.len() {
        match p.nodes[i].op {
            Op::Dropout { .. } | Op::DropPath { .. } if i != p.output => {
                p.nodes[i].fuse.removed = true;
                changed = true;
            }
            Op::BatchNorm { .. } => {
                let c = p.nodes[i].inputs[0];
                if p.is_conv(c)
                    && p.nodes[c].users == [i]
                    && p.nodes[c].fuse == Fuse::default()
                    && p.nodes[i].fuse == Fuse::default()
                {
                    p.nodes[c].fuse.folded_bn = Some(i);
                    p.nodes[i].fuse.folded_into = Some(c);
                    changed = true;
                }
            }
            _ => {}
        }
    }
    changed
}

// bn_relu_prologue:
//   conv(drop(relu(bn(x))), W) = conv'(x, W)   where conv' loads  drop(relu(x * s[c] + t[c]))
//   conv(drop(bn(x)), W)       = conv'(x, W)   where conv' loads  drop(x * s[c] + t[c])
//   conv(bn(x), W)             = conv'(x, W)   where conv' loads  x * s[c] + t[c]
//   gap(relu(bn(x)))           = gap'(x)       where gap' reads   relu(x * s[c] + t[c])  (eval)
//   s = gamma * rstd, t = beta - mean * s  (batch statistics in training, running in eval).
// The ReLU and the (train-mode) dropout are each optional: PyramidNet's residual body starts
// `bn conv`, a BN feeding a conv directly. Zero padding is applied after the transform in every
// form, as conv(bn(x)) pads bn(x), not x. Applies when the BN feeds only the ReLU (or the
// dropout, or the convolutions), the ReLU only the dropout, and the last of the chain only
// convolutions (as their input): the transformed tensor is never written. It does not apply
// when any node of the chain has another user (a shortcut, an add, a pool): that user reads the
// tensor, so it is written anyway. In training the backward recomputes the chain from x (see
// `backward`); without a ReLU the chain's backward is dBN alone (no mask).
fn fuse_bn_relu_prologue(p: &mut Plan) -> bool {
    let mut changed = false;
    for b in 0..p.nodes.len() {
        if !matches!(p.nodes[b].op, Op::BatchNorm { .. }) || p.nodes[b].fuse != Fuse::default() {
            continue;
        }
        let x = p.nodes[b].inputs[0];
        if p.value_node(x) != Some(x) || b == p.output {
            continue;
        }
        let mut last = b;
        let mut relu = None;
        let mut dropout = None;
        // follow the chain through an optional ReLU, then dropouts (train: part of the
        // prologue; eval: removed aliases)
        loop {
            let users = &p.nodes[last].users;
            if users.len() != 1 || last == p.output {
                break;
            }
            let d = users[0];
            match p.nodes[d].op {
                Op::Relu
                    if relu.is_none()
                        && dropout.is_none()
                        && last == b
                        && p.nodes[d].fuse == Fuse::default() =>
                {
                    relu = Some(d);
                    last = d;
                }
                Op::Dropout { .. } if p.nodes[d].fuse.removed => last = d,
                Op::Dropout { .. }
                    if p.mode == Mode::Train
                        && dropout.is_none()
                        && p.nodes[d].fuse == Fuse::default() =>
                {
                    dropout = Some(d);
                    last = d;
                }
                _ => break,
            }
        }
        let users = p.nodes[last].users.clone();
        if users.is_empty() || last == p.output {
            continue;
        }
        // inference: global average pooling of the chain reads it through the same transform
        let pool = p.mode == Mode::Infer
            && users.len() == 1
            && matches!(p.nodes[users[0]].op, Op::GlobalAvgPool)
            && p.nodes[users[0]].fuse == Fuse::default();
        if !pool
            && !users.iter().all(|&u| {
                p.is_conv(u) && p.nodes[u].fuse.prologue.is_none() && p.nodes[u].inputs[0] == last
            })
        {
            continue;
        }
        for &u in &users {
            p.nodes[u].fuse.prologue = Some(ProloguePlan {
                src: x,
                bn: Some(b),
                relu,
                dropout,
            });
        }
        for n in [Some(b), relu, dropout].into_iter().flatten() {
            p.nodes[n].fuse.inlined = true;
        }
        changed = true;
    }
    changed
}

// dropout_epilogue (train mode; the consumer-prologue form):
//   conv(drop(x), W) = conv'(x, W)   where conv' loads  x * m / (1 - p),  m regenerated from the
//   counter-based RNG (seed, stream(dropout), step, element index): the mask is never stored,
//   and the backward regenerates it.
// Applies to a dropout not already in a BN-ReLU prologue whose users are all convolutions.
fn fuse_dropout_epilogue(p: &mut Plan) -> bool {
    if p.mode != Mode::Train {
        return false;
    }
    let mut changed = false;
    for d in 0..p.nodes.len() {
        if !matches!(p.nodes[d].op, Op::Dropout { .. })
            || p.nodes[d].fuse != Fuse::default()
            || d == p.output
        {
            continue;
        }
        let x = p.nodes[d].inputs[0];
        if p.value_node(x) != Some(x) {
            continue;
        }
        let users = p.nodes[d].users.clone();
        if users.is_empty()
            || !users
                .iter()
                .all(|&u| p.is_conv(u) && p.nodes[u].fuse.prologue.is_none())
        {
            continue;
        }
        for &u in &users {
            p.nodes[u].fuse.prologue = Some(ProloguePlan {
                src: x,
                bn: None,
                relu: None,
                dropout: Some(d),
            });
        }
        p.nodes[d].fuse.inlined = true;
        changed = true;
    }
    changed
}

// residual_add_epilogue:
//   add(conv(x, W), r) = conv'(x, W)  with epilogue  y = acc + r   (and add(r, conv(..)) alike)
//   add(bn(conv(x, W)), r) = conv'(x, W * s)  with epilogue  y = acc + b' + r   (inference: the
//     BN folded into the conv by `inference`, its bias b' added first, as bn(..) + r)
// when the conv's (or its folded BN's) only user is the add and `r` is computed before the conv.
// Backward (training, never folded): the conv's output gradient *is* the add's (aliased), only
// `r` gets a copy-accumulate.
fn fuse_residual_add_epilogue(p: &mut Plan) -> bool {
    let mut changed = false;
    for a in 0..p.nodes.len() {
        if !matches!(p.nodes[a].op, Op::Add) || p.nodes[a].fuse != Fuse::default() {
            continue;
        }
        let ins = p.nodes[a].inputs.clone();
        if ins[0] == ins[1] {
            continue;
        }
        // prefer the later conv (the block's last conv), so the other operand already exists
        for (ci, oi) in [(1usize, 0usize), (0, 1)] {
            let (x, o) = (ins[ci], ins[oi]);
            // the conv that writes operand x: x itself, or the conv x (a BN) is folded into
            let c = p.writer(x);
            if p.is_conv(c)
                && p.epilogue_out(c) == x
                && p.nodes[x].users == [a]
                && p.nodes[c].fuse.residual.is_none()
                && p.nodes[c].fuse.epi_relu.is_none()
                && p.nodes[c].fuse.stats_for.is_none()
                && o < c
                && p.value_node(o).is_some()
            {
                p.nodes[c].fuse.residual = Some((a, o));
                p.nodes[a].fuse.computed_by = Some(c);
                changed = true;
                break;
            }
        }
    }
    changed
}

// relu_epilogue (inference):
//   relu(e(conv(x, W))) = conv'(x, W)  with epilogue  y = relu(e(acc))
// where e is what the conv's epilogue already computes (a folded BN's bias, a fused residual
// add; relu(v) = v > 0 ? v : 0, as the ReLU kernel) and the ReLU is the only user of e's value:
// that value is never written, the ReLU has no kernel, and the conv writes the ReLU's output.
// Rounding to bf16 storage keeps signs and zeros, so relu(round(v)) = round(relu(v)): the same
// bits as the ReLU kernel. Inference only (in training a conv is followed by a BN, not a ReLU,
// in every family; its BN is folded only in inference).
fn fuse_relu_epilogue(p: &mut Plan) -> bool {
    if p.mode != Mode::Infer {
        return false;
    }
    let mut changed = false;
    for r in 0..p.nodes.len() {
        if !matches!(p.nodes[r].op, Op::Relu) || p.nodes[r].fuse != Fuse::default() {
            continue;
        }
        let v = p.nodes[r].inputs[0];
        let c = p.writer(v);
        if p.is_conv(c)
            && p.epilogue_out(c) == v
            && v != p.output
            && p.nodes[v].users == [r]
            && p.nodes[c].fuse.stats_for.is_none()
        {
            p.nodes[c].fuse.epi_relu = Some(r);
            p.nodes[r].fuse.computed_by = Some(c);
            changed = true;
        }
    }
    changed
}

// bn_stats_epilogue (train mode):
//   sum_{n,h,w} y[n,c,h,w] and sum y^2, for y = conv'(..) feeding a BN, are accumulated in the
//   conv's epilogue (a shared-memory column sum per block, then one atomicAdd per channel),
//   replacing the BN's statistics kernel (a full re-read of y).
// The producer is the conv writing the BN's input (directly, or through a fused residual add).
fn fuse_bn_stats_epilogue(p: &mut Plan) -> bool {
    if p.mode != Mode::Train {
        return false;
    }
    let mut changed = false;
    for b in 0..p.nodes.len() {
        if !matches!(p.nodes[b].op, Op::BatchNorm { .. }) || p.nodes[b].fuse.stats_from.is_some() {
            continue;
        }
        let x = p.nodes[b].inputs[0];
        if p.value_node(x) != Some(x) {
            continue;
        }
        let c = p.writer(x);
        if p.is_conv(c) && p.nodes[c].fuse.stats_for.is_none() {
            p.nodes[c].fuse.stats_for = Some(b);
            p.nodes[b].fuse.stats_from = Some(c);
            changed = true;
        }
    }
    changed
}

// backward (train mode): with a BN(-ReLU)(-dropout) prologue chain feeding exactly one conv,
//   dx_act = conv_data_grad(dy, W)                      (the activation gradient)
//   g      = dx_act * [x*s + t > 0] * m / (1 - p)       (dReLU, dropout, recomputed from x;
//                                                        each factor only if the chain has it)
//   sum g, sum g * xhat                                 (dBN's reductions)
// all happen in the data-gradient conv's epilogue (atomics per channel); only dBN's elementwise
// apply remains. Without ReLU or dropout (`bn conv`), g = dx_act and only the reductions move. The activated tensor is never stored in any case: the weight-gradient kernel
// recomputes BN-ReLU-dropout from the stored pre-activation input (the conv's prologue).
fn fuse_backward(p: &mut Plan) -> bool {
    if p.mode != Mode::Train {
        return false;
    }
    let mut changed = false;
    for b in 0..p.nodes.len() {
        if !matches!(p.nodes[b].op, Op::BatchNorm { .. })
            || !p.nodes[b].fuse.inlined
            || p.nodes[b].fuse.bwd_from.is_some()
        {
            continue;
        }
        // the chain's consumers
        let convs: Vec<usize> = (0..p.nodes.len())
            .filter(|&u| p.nodes[u].fuse.prologue.map(|q| q.bn) == Some(Some(b)))
            .collect();
        if convs.len() != 1 {
            continue;
        }
        let c = convs[0];
        if p.nodes[c].fuse.bwd_for.is_some() {
            continue;
        }
        p.nodes[c].fuse.bwd_for = Some(b);
        p.nodes[b].fuse.bwd_from = Some(c);
        changed = true;
    }
    changed
}

// residual_grad_alias (train mode):
//   y = a + r  =>  dL/dr = dL/dy + (the contributions of r's other users)
// so r's gradient buffer can *be* y's: no kernel copies dL/dy into a buffer of r's own (a
// read and a write of a whole activation), and r's other contributions are accumulated into
// it in place, each of them when its user's backward runs. The backward runs the nodes in
// reverse order, so this is exact when every one of those contributions comes after every
// read of dL/dy, and of the gradients further up that share the buffer: with `floor(y)` the
// lowest node index whose backward reads one of them (y itself; the conv whose residual
// epilogue computes y, which reads dL/dy as its output gradient; the floor of the add that y
// is aliased into), every other user u of r must have u < floor(y). That also keeps out a
// conv of the add's own block that reads r (u = the conv: not below itself) and two operands
// of one kernel in one buffer. r must hold a gradient buffer of its own (materialised, not
// the input); a residual-fused add's conv operand already shares y's (residual_add_epilogue),
// so the other operand is r; an add computed by its own kernel aliases one operand, and its
// backward copies dL/dy into the other before any contribution to r.
fn alias_residual_grad(p: &mut Plan) -> bool {
    if p.mode != Mode::Train {
        return false;
    }
    let n = p.nodes.len();
    // floor of the add each node's gradient is aliased into, for adds below it
    let mut floor_up: Vec<Option<usize>> = vec![None; n];
    let mut changed = false;
    for y in (0..n).rev() {
        if !matches!(p.nodes[y].op, Op::Add) || p.nodes[y].fuse.grad_alias.is_some() {
            continue;
        }
        let c = p.nodes[y].fuse.computed_by;
        let floor = [Some(y), c, floor_up[y]]
            .into_iter()
            .flatten()
            .min()
            .unwrap();
        let ins = p.nodes[y].inputs.clone();
        if ins[0] == ins[1] {
            continue;
        }
        // the later operand first (the block's body), unless the conv computing y is it
        let r = ins.iter().rev().copied().find(|&r| {
            Some(r) != c
                && !matches!(p.nodes[r].op, Op::Input)
                && !p.nodes[r].fuse.inlined
                && !p.nodes[r].fuse.removed
                && p.value_node(r) == Some(r)
                && p.nodes[r].users.iter().all(|&u| u == y || u < floor)
        });
        if let Some(r) = r {
            p.nodes[y].fuse.grad_alias = Some(r);
            floor_up[r] = Some(floor);
            changed = true;
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{Conv2d, Node};

    fn conv(c: u32, o: u32) -> Op {
        Op::Conv2d(Conv2d {
            in_c: c,
            out_c: o,
            k: 3,
            stride: 1,
            pad: 1,
            groups: 1,
            bias: false,
        })
    }

    /// A pre-activation block: x -> conv0 -> bn -> relu -> drop -> conv1 -> add(conv0) -> gap -> fc.
    fn block() -> Graph {
        let mut g = Graph::new("t", Shape::new(3, 8, 8));
        let s = Shape::new(4, 8, 8);
        let push = |g: &mut Graph, name: &str, op: Op, shape: Shape, ins: &[_]| {
            g.push(
                Node {
                    op,
                    name: name.into(),
                    shape,
                },
                ins,
            )
        };
        let i = g.input;
        let c0 = push(&mut g, "0", conv(3, 4), s, &[i]);
        let b = push(
            &mut g,
            "1",
            Op::BatchNorm {
                c: 4,
                eps: 1e-5,
                momentum: 0.1,
            },
            s,
            &[c0],
        );
        let r = push(&mut g, "2", Op::Relu, s, &[b]);
        let d = push(&mut g, "3", Op::Dropout { p: 0.3 }, s, &[r]);
        let c1 = push(&mut g, "4", conv(4, 4), s, &[d]);
        let a = push(&mut g, "5", Op::Add, s, &[c0, c1]);
        let gp = push(&mut g, "6", Op::GlobalAvgPool, Shape::new(4, 1, 1), &[a]);
        let f = push(
            &mut g,
            "7",
            Op::Linear { in_f: 4, out_f: 10 },
            Shape::new(10, 1, 1),
            &[gp],
        );
        g.output = f;
        g.classes = 10;
        g
    }

    fn check(mode: Mode, disabled: &[&str], expect: &str) {
        let mut p = Plan::new(&block(), mode);
        let fusion = Fusion {
            unfused: false,
            disabled: disabled.iter().map(|s| s.to_string()).collect(),
        };
        run(&mut p, &fusion, |_, _| {});
        p.verify().unwrap();
        let got = p.to_string();
        assert_eq!(got.trim(), expect.trim(), "\n{got}");
    }

    #[test]
    fn train_all_passes() {
        check(
            Mode::Train,
            &[],
            "
plan t (Train)
  %0 = input() 3x8x8 [input]
  %1 = conv(%0) 4x8x8 [0] stats_for=%2
  %2 = bn(%1) 4x8x8 [1] inlined stats_from=%1 bwd_from=%5
  %3 = relu(%2) 4x8x8 [2] inlined
  %4 = dropout(%3) 4x8x8 [3] inlined
  %5 = conv(%4) 4x8x8 [4] prologue(src=%1 bn=%2 relu=%3 dropout=%4) residual(add=%6 other=%1) bwd_for=%2
  %6 = add(%1, %5) 4x8x8 [5] computed_by=%5 grad_alias=%1
  %7 = gap(%6) 4x1x1 [6]
  %8 = linear(%7) 10x1x1 [7]
",
        );
    }

    #[test]
    fn train_without_prologue_uses_dropout_prologue() {
        check(
            Mode::Train,
            &["bn_relu_prologue", "bn_stats_epilogue"],
            "
plan t (Train)
  %0 = input() 3x8x8 [input]
  %1 = conv(%0) 4x8x8 [0]
  %2 = bn(%1) 4x8x8 [1]
  %3 = relu(%2) 4x8x8 [2]
  %4 = dropout(%3) 4x8x8 [3] inlined
  %5 = conv(%4) 4x8x8 [4] prologue(src=%3 dropout=%4) residual(add=%6 other=%1)
  %6 = add(%1, %5) 4x8x8 [5] computed_by=%5 grad_alias=%1
  %7 = gap(%6) 4x1x1 [6]
  %8 = linear(%7) 10x1x1 [7]
",
        );
    }

    #[test]
    fn infer_folds_removes_and_inlines() {
        check(
            Mode::Infer,
            &[],
            "
plan t (Infer)
  %0 = input() 3x8x8 [input]
  %1 = conv(%0) 4x8x8 [0]
  %2 = bn(%1) 4x8x8 [1] inlined
  %3 = relu(%2) 4x8x8 [2] inlined
  %4 = dropout(%3) 4x8x8 [3] removed
  %5 = conv(%4) 4x8x8 [4] prologue(src=%1 bn=%2 relu=%3) residual(add=%6 other=%1)
  %6 = add(%1, %5) 4x8x8 [5] computed_by=%5
  %7 = gap(%6) 4x1x1 [6]
  %8 = linear(%7) 10x1x1 [7]
",
        );
    }

    fn bn(c: u32) -> Op {
        Op::BatchNorm {
            c,
            eps: 1e-5,
            momentum: 0.1,
        }
    }

    /// A graph from `(name, op, operand indices)` rows; index 0 is the input, row `k` is node
    /// `k + 1`; every node is 4x8x8 but the last two (gap, fc).
    fn net(rows: &[(&str, Op, &[usize])]) -> Graph {
        let mut g = Graph::new("t", Shape::new(3, 8, 8));
        let mut ids = vec![g.input];
        for (name, op, ins) in rows {
            let shape = match op {
                Op::GlobalAvgPool => Shape::new(4, 1, 1),
                Op::Linear { out_f, .. } => Shape::new(*out_f, 1, 1),
                _ => Shape::new(4, 8, 8),
            };
            let ins: Vec<_> = ins.iter().map(|&i| ids[i]).collect();
            let id = g.push(
                Node {
                    op: op.clone(),
                    name: (*name).into(),
                    shape,
                },
                &ins,
            );
            ids.push(id);
        }
        g.output = *ids.last().unwrap();
        g.classes = 10;
        g
    }

    fn plan_of(g: &Graph, mode: Mode) -> String {
        let mut p = Plan::new(g, mode);
        run(&mut p, &Fusion::default(), |_, _| {});
        p.verify().unwrap();
        p.to_string()
    }

    /// PyramidNet's block: bn(x) feeds the body's first conv with no ReLU in between.
    fn pyramid() -> Graph {
        net(&[
            ("0", conv(3, 4), &[0]),
            ("1", bn(4), &[1]),
            ("2.body.0", bn(4), &[2]),
            ("2.body.1", conv(4, 4), &[3]),
            ("2.body.2", bn(4), &[4]),
            ("2.add", Op::Add, &[2, 5]),
            ("3", Op::GlobalAvgPool, &[6]),
            ("4", Op::Linear { in_f: 4, out_f: 10 }, &[7]),
        ])
    }

    #[test]
    fn bn_without_relu_becomes_a_prologue() {
        let train = plan_of(&pyramid(), Mode::Train);
        assert_eq!(
            train.trim(),
            "plan t (Train)
  %0 = input() 3x8x8 [input]
  %1 = conv(%0) 4x8x8 [0] stats_for=%2
  %2 = bn(%1) 4x8x8 [1] stats_from=%1
  %3 = bn(%2) 4x8x8 [2.body.0] inlined bwd_from=%4
  %4 = conv(%3) 4x8x8 [2.body.1] prologue(src=%2 bn=%3) stats_for=%5 bwd_for=%3
  %5 = bn(%4) 4x8x8 [2.body.2] stats_from=%4
  %6 = add(%2, %5) 4x8x8 [2.add] grad_alias=%5
  %7 = gap(%6) 4x1x1 [3]
  %8 = linear(%7) 10x1x1 [4]",
            "\n{train}"
        );
        let infer = plan_of(&pyramid(), Mode::Infer);
        assert!(
            infer.contains("%3 = bn(%2) 4x8x8 [2.body.0] inlined\n")
                && infer.contains("prologue(src=%2 bn=%3) residual(add=%6 other=%2) folded_bn=%5")
                && infer.contains("%6 = add(%2, %5) 4x8x8 [2.add] computed_by=%4\n"),
            "\n{infer}"
        );
    }

    /// A post-activation block (ResNet's): relu(bn(conv(relu(bn(conv(x))))) + x).
    fn post_activation() -> Graph {
        net(&[
            ("0", conv(3, 4), &[0]),
            ("1", bn(4), &[1]),
            ("2", Op::Relu, &[2]),
            ("3.body.0", conv(4, 4), &[3]),
            ("3.body.1", bn(4), &[4]),
            ("3.body.2", Op::Relu, &[5]),
            ("3.body.3", conv(4, 4), &[6]),
            ("3.body.4", bn(4), &[7]),
            ("3.add", Op::Add, &[8, 3]),
            ("3.post.0", Op::Relu, &[9]),
            ("4", Op::GlobalAvgPool, &[10]),
            ("5", Op::Linear { in_f: 4, out_f: 10 }, &[11]),
        ])
    }

    #[test]
    fn infer_folds_the_residual_add_and_the_relu_into_the_conv() {
        assert_eq!(
            plan_of(&post_activation(), Mode::Infer).trim(),
            "plan t (Infer)
  %0 = input() 3x8x8 [input]
  %1 = conv(%0) 4x8x8 [0] epi_relu=%3 folded_bn=%2
  %2 = bn(%1) 4x8x8 [1] folded_into=%1
  %3 = relu(%2) 4x8x8 [2] computed_by=%1
  %4 = conv(%3) 4x8x8 [3.body.0] epi_relu=%6 folded_bn=%5
  %5 = bn(%4) 4x8x8 [3.body.1] folded_into=%4
  %6 = relu(%5) 4x8x8 [3.body.2] computed_by=%4
  %7 = conv(%6) 4x8x8 [3.body.3] residual(add=%9 other=%3) epi_relu=%10 folded_bn=%8
  %8 = bn(%7) 4x8x8 [3.body.4] folded_into=%7
  %9 = add(%8, %3) 4x8x8 [3.add] computed_by=%7
  %10 = relu(%9) 4x8x8 [3.post.0] computed_by=%7
  %11 = gap(%10) 4x1x1 [4]
  %12 = linear(%11) 10x1x1 [5]"
        );
        // training: nothing is folded, and no ReLU goes into an epilogue
        let train = plan_of(&post_activation(), Mode::Train);
        assert!(
            !train.contains("epi_relu") && !train.contains("residual"),
            "\n{train}"
        );
        // without the residual pass the add stays, and so does the ReLU after it
        let mut p = Plan::new(&post_activation(), Mode::Infer);
        let fusion = Fusion {
            unfused: false,
            disabled: vec!["residual_add_epilogue".into()],
        };
        run(&mut p, &fusion, |_, _| {});
        p.verify().unwrap();
        let got = p.to_string();
        assert!(
            got.contains("%9 = add(%8, %3) 4x8x8 [3.add]\n")
                && got.contains("%10 = relu(%9) 4x8x8 [3.post.0]\n")
                && got.contains("[3.body.3] folded_bn=%8\n")
                && got.contains("epi_relu=%6"),
            "\n{got}"
        );
    }

    /// The network's last BN-ReLU, read by the global pooling alone: in inference the pooling
    /// reads the BN's input through the transform; in training both stay kernels (the backward
    /// of a pooling prologue is not fused).
    #[test]
    fn a_bn_relu_before_global_pooling_is_inlined_in_inference() {
        let g = net(&[
            ("0", conv(3, 4), &[0]),
            ("1", Op::Relu, &[1]),
            ("2", conv(4, 4), &[2]),
            ("3", Op::Add, &[1, 3]),
            ("4", bn(4), &[4]),
            ("5", Op::Relu, &[5]),
            ("6", Op::GlobalAvgPool, &[6]),
            ("7", Op::Linear { in_f: 4, out_f: 10 }, &[7]),
        ]);
        let infer = plan_of(&g, Mode::Infer);
        assert!(
            infer.contains("%5 = bn(%4) 4x8x8 [4] inlined\n")
                && infer.contains("%6 = relu(%5) 4x8x8 [5] inlined\n")
                && infer.contains("%7 = gap(%6) 4x1x1 [6] prologue(src=%4 bn=%5 relu=%6)\n"),
            "\n{infer}"
        );
        let train = plan_of(&g, Mode::Train);
        assert!(
            train.contains("%7 = gap(%6) 4x1x1 [6]\n")
                && !train.contains("%6 = relu(%5) 4x8x8 [5] inlined"),
            "\n{train}"
        );
    }

    #[test]
    fn a_relu_whose_input_has_another_reader_stays_a_kernel() {
        // bn(conv) feeds the ReLU and the add: its value is written, and the ReLU reads it
        let g = net(&[
            ("0", conv(3, 4), &[0]),
            ("1", bn(4), &[1]),
            ("2", Op::Relu, &[2]),
            ("3", Op::Add, &[2, 3]),
            ("4", Op::GlobalAvgPool, &[4]),
            ("5", Op::Linear { in_f: 4, out_f: 10 }, &[5]),
        ]);
        let got = plan_of(&g, Mode::Infer);
        assert!(
            got.contains("%3 = relu(%2) 4x8x8 [2]\n") && !got.contains("epi_relu"),
            "\n{got}"
        );
    }

    #[test]
    fn bn_read_by_another_user_is_not_inlined() {
        // bn(x) feeds the conv and the add: it must be written, so no prologue
        let g = net(&[
            ("0", conv(3, 4), &[0]),
            ("1", bn(4), &[1]),
            ("2", conv(4, 4), &[2]),
            ("3", Op::Add, &[2, 3]),
            ("4", Op::GlobalAvgPool, &[4]),
            ("5", Op::Linear { in_f: 4, out_f: 10 }, &[5]),
        ]);
        for mode in [Mode::Train, Mode::Infer] {
            let got = plan_of(&g, mode);
            assert!(
                !got.contains("inlined") && !got.contains("prologue"),
                "\n{got}"
            );
        }
        // bn(x) feeding a ReLU and a conv, or the network's output, is not inlined either
        let g = net(&[
            ("0", conv(3, 4), &[0]),
            ("1", bn(4), &[1]),
            ("2", Op::Relu, &[2]),
            ("3", conv(4, 4), &[2]),
            ("4", Op::Add, &[3, 4]),
            ("5", Op::GlobalAvgPool, &[5]),
            ("6", Op::Linear { in_f: 4, out_f: 10 }, &[6]),
            ("7", bn(10), &[7]),
        ]);
        for mode in [Mode::Train, Mode::Infer] {
            let got = plan_of(&g, mode);
            assert!(
                !got.contains("inlined") && !got.contains("prologue"),
                "\n{got}"
            );
        }
    }

    #[test]
    fn bn_dropout_chain_without_relu() {
        // train: bn -> dropout -> conv is one prologue; eval: the dropout is removed and the
        // BN folded into the conv before it (folding comes first and writes the BN's output)
        let g = net(&[
            ("0", conv(3, 4), &[0]),
            ("1", bn(4), &[1]),
            ("2", Op::Dropout { p: 0.3 }, &[2]),
            ("3", conv(4, 4), &[3]),
            ("4", Op::GlobalAvgPool, &[4]),
            ("5", Op::Linear { in_f: 4, out_f: 10 }, &[5]),
        ]);
        let train = plan_of(&g, Mode::Train);
        assert!(
            train.contains("prologue(src=%1 bn=%2 dropout=%3) bwd_for=%2"),
            "\n{train}"
        );
        let infer = plan_of(&g, Mode::Infer);
        assert!(
            infer.contains("%3 = dropout(%2) 4x8x8 [2] removed")
                && infer.contains("folded_bn=%2")
                && !infer.contains("prologue"),
            "\n{infer}"
        );
    }

    /// The adds' gradient aliases after every pass, for a graph written as lines `name op
    /// inputs...` (ops: `conv`, `bn`, `relu`, `add`; every tensor 4x8x8; the last line feeds a
    /// global pool and a linear layer): `add:operand` per aliased add, in node order.
    fn check_alias(net: &str, expect: &str) {
        let s = Shape::new(4, 8, 8);
        let mut g = Graph::new("t", s);
        let mut ids = std::collections::HashMap::new();
        ids.insert("x".to_string(), g.input);
        let mut last = g.input;
        for line in net.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let w: Vec<&str> = line.split_whitespace().collect();
            let op = match w[1] {
                "conv" => conv(4, 4),
                "bn" => Op::BatchNorm {
                    c: 4,
                    eps: 1e-5,
                    momentum: 0.1,
                },
                "relu" => Op::Relu,
                "add" => Op::Add,
                o => panic!("op {o}"),
            };
            let ins: Vec<_> = w[2..].iter().map(|i| ids[*i]).collect();
            let name = w[0].to_string();
            last = g.push(
                Node {
                    op,
                    name: name.clone(),
                    shape: s,
                },
                &ins,
            );
            ids.insert(name, last);
        }
        let gp = g.push(
            Node {
                op: Op::GlobalAvgPool,
                name: "gap".into(),
                shape: Shape::new(4, 1, 1),
            },
            &[last],
        );
        g.output = g.push(
            Node {
                op: Op::Linear { in_f: 4, out_f: 10 },
                name: "fc".into(),
                shape: Shape::new(10, 1, 1),
            },
            &[gp],
        );
        g.classes = 10;
        let mut p = Plan::new(&g, Mode::Train);
        run(&mut p, &Fusion::default(), |_, _| {});
        p.verify().unwrap();
        let got: Vec<String> = p
            .nodes
            .iter()
            .filter_map(|n| {
                n.fuse
                    .grad_alias
                    .map(|r| format!("{}:{}", n.name, p.nodes[r].name))
            })
            .collect();
        assert_eq!(got.join(" "), expect, "\n{p}");
    }

    #[test]
    fn residual_grad_alias() {
        // pre-activation blocks: each add's shortcut operand shares its gradient, down the chain
        check_alias(
            "c0 conv x
             b1 bn c0
             r1 relu b1
             c1 conv r1
             a1 add c0 c1
             b2 bn a1
             r2 relu b2
             c2 conv r2
             a2 add a1 c2",
            "a1:c0 a2:a1",
        );
        // the block's own conv reads the shortcut: its data gradient would land in the buffer
        // it reads
        check_alias(
            "c0 conv x
             c1 conv c0
             a1 add c0 c1",
            "",
        );
        // a user of the shortcut after the add: its contribution would land before the conv
        // read the add's gradient
        check_alias(
            "c0 conv x
             b1 bn c0
             r1 relu b1
             c1 conv r1
             a1 add c0 c1
             c2 conv c0
             a2 add a1 c2",
            "a2:a1",
        );
        // an add of its own kernel (no conv operand): its later operand is aliased
        check_alias(
            "c0 conv x
             b1 bn c0
             r1 relu b1
             a1 add c0 r1",
            "a1:r1",
        );
        // the same tensor twice
        check_alias(
            "c0 conv x
             a1 add c0 c0",
            "",
        );
    }

    #[test]
    fn unknown_pass_is_an_error() {
        let f = Fusion {
            unfused: false,
            disabled: vec!["nope".into()],
        };
        assert!(f.validate().unwrap_err().contains("bn_relu_prologue"));
    }
}
