//! The op graph: a petgraph DAG whose nodes are [`Op`]s with inferred shapes.
//!
//! Invariants (established by [`crate::lower`], kept by every pass):
//! - The graph is acyclic, and node indices in insertion order are a topological order
//!   (`Graph::order` lists them; passes that add nodes keep `order` topological).
//! - Every edge carries the operand slot it feeds (`0..op.arity()`); each slot of a node is fed
//!   by exactly one edge.
//! - `Node::shape` is the per-image output shape (C, H, W), already checked against the op's
//!   inputs: every dimension is >= 1.
//! - Node names are unique, deterministic, and follow the parameter naming scheme: the name of
//!   a parameter tensor is `<node name>.<suffix>` (e.g. `3.body.2.weight`), the layout of
//!   PyTorch's `nn.Sequential` state dicts.
//! - There is exactly one `Op::Input` node and one output node (the logits, shape classes x 1 x 1).

use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use serde::Serialize;

/// Per-image tensor shape: channels, height, width.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Shape {
    pub c: u32,
    pub h: u32,
    pub w: u32,
}

impl Shape {
    pub fn new(c: u32, h: u32, w: u32) -> Shape {
        Shape { c, h, w }
    }
    /// Elements per image.
    pub fn numel(&self) -> u64 {
        self.c as u64 * self.h as u64 * self.w as u64
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}x{}", self.c, self.h, self.w)
    }
}

/// 2-D convolution, NCHW, weights OIHW (`[out_c, in_c / groups, k, k]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Conv2d {
    pub in_c: u32,
    pub out_c: u32,
    pub k: u32,
    pub stride: u32,
    pub pad: u32,
    /// `in_c % groups == 0 && out_c % groups == 0`.
    pub groups: u32,
    pub bias: bool,
}

/// Window pooling (max or average), square window, zero padding that average pooling counts
/// (PyTorch's `count_include_pad=True`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Pool {
    pub k: u32,
    pub stride: u32,
    pub pad: u32,
}

/// The closed set of operations. Every backend (CPU reference, CUDA generator, ONNX export)
/// matches on this enum.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// The image batch, normalised. Arity 0.
    Input,
    /// Arity 1. Parameters `weight` `[out_c, in_c/groups, k, k]`, `bias` `[out_c]` if `bias`.
    Conv2d(Conv2d),
    /// Batch normalisation over (N, H, W) per channel. Arity 1. Parameters `weight` (gamma)
    /// and `bias` (beta) `[c]`; buffers `running_mean`, `running_var` `[c]`.
    /// Training: batch statistics (biased variance for normalising, unbiased for the running
    /// update); `running = (1 - momentum) * running + momentum * batch`.
    BatchNorm { c: u32, eps: f32, momentum: f32 },
    /// Arity 1.
    Relu,
    /// Inverted dropout: training `y = x * m / (1 - p)`, `m ~ Bernoulli(1 - p)` from the
    /// counter-based generator; inference identity. Arity 1.
    Dropout { p: f32 },
    /// Stochastic depth on a residual branch, per sample: training `y[n] = x[n] * m[n] / s`,
    /// `m[n] ~ Bernoulli(s)`; inference identity. Arity 1.
    DropPath { survival: f32 },
    /// Elementwise sum of two tensors of the same shape. Arity 2.
    Add,
    /// ResNet option A / PyramidNet shortcut: average-pool by `stride` (k = stride), then
    /// append zero channels up to `out_c`. Arity 1.
    ZeroPadShortcut { out_c: u32, stride: u32 },
    /// Channel concatenation of operand 0 then operand 1. Arity 2.
    Concat,
    /// Arity 1.
    MaxPool(Pool),
    /// Arity 1.
    AvgPool(Pool),
    /// Mean over H and W. Arity 1.
    GlobalAvgPool,
    /// Flattens its input (C*H*W features) and applies `y = W x + b`. Arity 1.
    /// Parameters `weight` `[out_f, in_f]`, `bias` `[out_f]`.
    Linear { in_f: u32, out_f: u32 },
}

/// What a parameter tensor is, for initialisation and weight decay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamKind {
    /// Convolution or linear weight: He (Kaiming normal, fan-out) init, weight-decayed.
    Weight,
    /// Convolution or linear bias: zero init.
    Bias,
    /// BN gamma: one init.
    BnWeight,
    /// BN beta: zero init.
    BnBias,
}

/// A trainable tensor of a node.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ParamSpec {
    /// `weight`, `bias`.
    pub suffix: &'static str,
    pub shape: Vec<usize>,
    pub kind: ParamKind,
}

impl Op {
    /// Number of operands.
    pub fn arity(&self) -> usize {
        match self {
            Op::Input => 0,
            Op::Add | Op::Concat => 2,
            _ => 1,
        }
    }

    /// Short name used in dumps and kernel names.
    pub fn mnemonic(&self) -> &'static str {
        match self {
            Op::Input => "input",
            Op::Conv2d(_) => "conv",
            Op::BatchNorm { .. } => "bn",
            Op::Relu => "relu",
            Op::Dropout { .. } => "dropout",
            Op::DropPath { .. } => "droppath",
            Op::Add => "add",
            Op::ZeroPadShortcut { .. } => "zeropad",
            Op::Concat => "concat",
            Op::MaxPool(_) => "maxpool",
            Op::AvgPool(_) => "avgpool",
            Op::GlobalAvgPool => "gap",
            Op::Linear { .. } => "linear",
        }
    }

    /// Trainable parameters, in a fixed order.
    pub fn params(&self) -> Vec<ParamSpec> {
        match *self {
            Op::Conv2d(c) => {
                let mut v = vec![ParamSpec {
                    suffix: "weight",
                    shape: vec![
                        c.out_c as usize,
                        (c.in_c / c.groups) as usize,
                        c.k as usize,
                        c.k as usize,
                    ],
                    kind: ParamKind::Weight,
                }];
                if c.bias {
                    v.push(ParamSpec {
                        suffix: "bias",
                        shape: vec![c.out_c as usize],
                        kind: ParamKind::Bias,
                    });
                }
                v
            }
            Op::BatchNorm { c, .. } => vec![
                ParamSpec {
                    suffix: "weight",
                    shape: vec![c as usize],
                    kind: ParamKind::BnWeight,
                },
                ParamSpec {
                    suffix: "bias",
                    shape: vec![c as usize],
                    kind: ParamKind::BnBias,
                },
            ],
            Op::Linear { in_f, out_f } => vec![
                ParamSpec {
                    suffix: "weight",
                    shape: vec![out_f as usize, in_f as usize],
                    kind: ParamKind::Weight,
                },
                ParamSpec {
                    suffix: "bias",
                    shape: vec![out_f as usize],
                    kind: ParamKind::Bias,
                },
            ],
            _ => vec![],
        }
    }

    /// Non-trainable state (BN running statistics): `(suffix, len)`.
    pub fn buffers(&self) -> Vec<(&'static str, usize)> {
        match *self {
            Op::BatchNorm { c, .. } => {
                vec![("running_mean", c as usize), ("running_var", c as usize)]
            }
            _ => vec![],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Node {
    pub op: Op,
    /// Unique, deterministic; prefix of the node's parameter names.
    pub name: String,
    /// Per-image output shape.
    pub shape: Shape,
}

/// The edge weight: which operand slot of the target the source feeds.
pub type Slot = u32;

#[derive(Debug, Clone)]
pub struct Graph {
    pub g: StableDiGraph<Node, Slot>,
    /// Topological order of the live nodes (see module invariants).
    pub order: Vec<NodeIndex>,
    pub input: NodeIndex,
    pub output: NodeIndex,
    /// A display name (the family expression or the structural form's name).
    pub name: String,
    pub classes: u32,
}

impl Graph {
    pub fn new(name: impl Into<String>, input_shape: Shape) -> Graph {
        let mut g = StableDiGraph::new();
        let input = g.add_node(Node {
            op: Op::Input,
            name: "input".into(),
            shape: input_shape,
        });
        Graph {
            g,
            order: vec![input],
            input,
            output: input,
            name: name.into(),
            classes: 0,
        }
    }

    /// Appends a node fed by `inputs` (in slot order); keeps `order` topological because the
    /// inputs already exist.
    pub fn push(&mut self, node: Node, inputs: &[NodeIndex]) -> NodeIndex {
        debug_assert_eq!(inputs.len(), node.op.arity());
        let id = self.g.add_node(node);
        for (slot, &i) in inputs.iter().enumerate() {
            self.g.add_edge(i, id, slot as Slot);
        }
        self.order.push(id);
        id
    }

    pub fn node(&self, n: NodeIndex) -> &Node {
        &self.g[n]
    }

    /// The operands of `n`, in slot order.
    pub fn inputs(&self, n: NodeIndex) -> Vec<NodeIndex> {
        let mut v: Vec<(Slot, NodeIndex)> = self
            .g
            .edges_directed(n, Direction::Incoming)
            .map(|e| (*e.weight(), e.source()))
            .collect();
        v.sort();
        v.into_iter().map(|(_, s)| s).collect()
    }

    /// The consumers of `n`, sorted by index (deterministic).
    pub fn users(&self, n: NodeIndex) -> Vec<NodeIndex> {
        let mut v: Vec<NodeIndex> = self
            .g
            .edges_directed(n, Direction::Outgoing)
            .map(|e| e.target())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    pub fn input_shape(&self) -> Shape {
        self.g[self.input].shape
    }

    /// Every parameter tensor as `(full name, spec)`, in topological order.
    pub fn params(&self) -> Vec<(String, ParamSpec)> {
        let mut v = Vec::new();
        for &n in &self.order {
            let node = &self.g[n];
            for p in node.op.params() {
                v.push((format!("{}.{}", node.name, p.suffix), p));
            }
        }
        v
    }

    /// Every buffer (BN running statistics) as `(full name, len)`, in topological order.
    pub fn buffers(&self) -> Vec<(String, usize)> {
        let mut v = Vec::new();
        for &n in &self.order {
            let node = &self.g[n];
            for (s, len) in node.op.buffers() {
                v.push((format!("{}.{}", node.name, s), len));
            }
        }
        v
    }
}
