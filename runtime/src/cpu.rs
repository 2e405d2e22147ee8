//! The CPU executor: runs a [`Graph`] forward and backward with the reference kernels of
//! [`crate::ops`].
//!
//! A [`Model`] owns a validated graph, its parameters and its buffers (BN running statistics),
//! both keyed by the graph's names (`graph.params()`, `graph.buffers()`). Forward walks
//! `graph.order`; backward walks it in reverse, summing the gradients of nodes with several
//! users (or one user through several slots). Activations that no backward step reads are
//! freed as soon as their last consumer has run; backward frees the rest as it goes.
//!
//! Invariants:
//! - [`Model::new`] / [`Model::with_state`] validate the graph completely (topological
//!   `order`, operand slots, every node's shape re-inferred from its inputs, size limits), so
//!   a kernel never sees inconsistent shapes. User-facing failures are [`Error`]s, never panics.
//! - Training mode is deterministic: dropout/DropPath masks are a pure function of
//!   `(seed, node name, step, index)` and every reduction has a fixed order.

use std::collections::BTreeMap;

use petgraph::stable_graph::NodeIndex;
use petgraph::visit::NodeIndexable;
use wrnc_compiler::graph::{Graph, Op, Shape};
use wrnc_compiler::rng;

use crate::ops::{self, conv, elementwise as ew, linear, norm, pool, Float};
use crate::tensor::Tensor;

/// The most elements one tensor (a whole-batch activation or a parameter) may hold, and the
/// most parameter elements a model may hold. Keeps every allocation bounded and every index
/// representable in 32 bits on the GPU.
pub const MAX_TENSOR_ELEMENTS: u64 = 1 << 31;

/// What can go wrong running a model on user-supplied graphs, data and state.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// The graph breaks an invariant of `wrnc_compiler::graph`.
    #[error("invalid graph at node `{node}`: {message}")]
    Graph { node: String, message: String },
    /// A tensor would exceed [`MAX_TENSOR_ELEMENTS`].
    #[error("too large: {0}")]
    TooLarge(String),
    #[error("input has shape {got:?}; the network expects [N, {}, {}, {}] with N >= 1", expected.c, expected.h, expected.w)]
    InputShape { got: Vec<usize>, expected: Shape },
    #[error("logit gradient has shape {got:?}; expected {expected:?}")]
    GradShape {
        got: Vec<usize>,
        expected: Vec<usize>,
    },
    /// Training batch norm needs more than one value per channel (as in PyTorch).
    #[error(
        "batch norm `{node}` needs more than one value per channel in training (got {values})"
    )]
    BatchTooSmall { node: String, values: usize },
    /// Parameters or buffers missing, extra, or of the wrong shape.
    #[error("model state: {0}")]
    State(String),
    /// Labels that do not fit the logits (see [`crate::loss`]).
    #[error("loss: {0}")]
    Loss(String),
}

/// How a forward pass runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Batch statistics (running statistics updated), dropout and DropPath active with masks
    /// drawn from `(seed, node, step, index)`.
    Train { seed: u32, step: u32 },
    /// Running statistics; dropout and DropPath are the identity.
    Eval,
}

/// Per-node facts precomputed from the graph.
#[derive(Debug, Clone)]
struct NodePlan {
    id: NodeIndex,
    /// Operand node indices (`NodeIndex::index()`), in slot order.
    inputs: Vec<usize>,
    /// `<name>.weight`, `<name>.bias` (when the op has them).
    weight: String,
    bias: String,
    running_mean: String,
    running_var: String,
    stream: u32,
    /// Backward reads this node's output (ReLU reads its own; conv, BN, max pool and linear
    /// read their input's).
    keep: bool,
    /// Number of operand slots this node feeds.
    uses: usize,
}

/// Checks `op` against its operand shapes and returns its output shape.
pub fn infer_shape(op: &Op, ins: &[Shape]) -> Result<Shape, String> {
    if ins.len() != op.arity() {
        return Err(format!(
            "{} takes {} operands, has {}",
            op.mnemonic(),
            op.arity(),
            ins.len()
        ));
    }
    let win = |len: u32, k: u32, s: u32, p: u32| -> Result<u32, String> {
        ops::window_out(len as usize, k as usize, s as usize, p as usize)
            .map(|v| v as u32)
            .ok_or_else(|| format!("a {k}x{k} window (stride {s}, pad {p}) does not fit {len}"))
    };
    let same = |s: Shape| Ok(s);
    match *op {
        Op::Input => Err("a second input node".into()),
        Op::Conv2d(c) => {
            let x = ins[0];
            if x.c != c.in_c {
                return Err(format!("conv expects {} channels, gets {}", c.in_c, x.c));
            }
            if c.groups == 0 || c.in_c % c.groups != 0 || c.out_c % c.groups != 0 || c.out_c == 0 {
                return Err(format!(
                    "groups {} must divide {} and {}",
                    c.groups, c.in_c, c.out_c
                ));
            }
            if c.k == 0 || c.stride == 0 {
                return Err("kernel and stride must be >= 1".into());
            }
            Ok(Shape::new(
                c.out_c,
                win(x.h, c.k, c.stride, c.pad)?,
                win(x.w, c.k, c.stride, c.pad)?,
            ))
        }
        Op::BatchNorm { c, eps, momentum } => {
            if ins[0].c != c {
                return Err(format!("bn over {c} channels gets {}", ins[0].c));
            }
            if eps <= 0.0 || !eps.is_finite() || !(0.0..=1.0).contains(&momentum) {
                return Err(format!("bn eps {eps} / momentum {momentum} out of range"));
            }
            same(ins[0])
        }
        Op::Relu => same(ins[0]),
        Op::Dropout { p } => {
            if !(0.0..1.0).contains(&p) {
                return Err(format!("dropout probability {p} is outside [0, 1)"));
            }
            same(ins[0])
        }
        Op::DropPath { survival } => {
            if !(survival > 0.0 && survival <= 1.0) {
                return Err(format!("survival probability {survival} is outside (0, 1]"));
            }
            same(ins[0])
        }
        Op::Add => {
            if ins[0] != ins[1] {
                return Err(format!("add of {} and {}", ins[0], ins[1]));
            }
            same(ins[0])
        }
        Op::ZeroPadShortcut { out_c, stride } => {
            let x = ins[0];
            if out_c < x.c || stride == 0 {
                return Err(format!(
                    "zero-pad shortcut from {} channels to {out_c}, stride {stride}",
                    x.c
                ));
            }
            Ok(Shape::new(
                out_c,
                win(x.h, stride, stride, 0)?,
                win(x.w, stride, stride, 0)?,
            ))
        }
        Op::Concat => {
            let (a, b) = (ins[0], ins[1]);
            if (a.h, a.w) != (b.h, b.w) {
                return Err(format!("concat of {a} and {b}"));
            }
            let c = a.c.checked_add(b.c).ok_or("too many channels")?;
            Ok(Shape::new(c, a.h, a.w))
        }
        Op::MaxPool(p) | Op::AvgPool(p) => {
            if p.k == 0 || p.stride == 0 || p.pad > p.k / 2 {
                return Err(format!(
                    "pool {}x{} stride {} pad {}: need k, stride >= 1 and pad <= k/2",
                    p.k, p.k, p.stride, p.pad
                ));
            }
            let x = ins[0];
            Ok(Shape::new(
                x.c,
                win(x.h, p.k, p.stride, p.pad)?,
                win(x.w, p.k, p.stride, p.pad)?,
            ))
        }
        Op::GlobalAvgPool => Ok(Shape::new(ins[0].c, 1, 1)),
        Op::Linear { in_f, out_f } => {
            if ins[0].numel() != in_f as u64 || out_f == 0 {
                return Err(format!("linear over {in_f} features gets {}", ins[0]));
            }
            Ok(Shape::new(out_f, 1, 1))
        }
    }
}

/// Checks every invariant of `wrnc_compiler::graph` the executor relies on.
pub fn validate(graph: &Graph) -> Result<(), Error> {
    let bad = |n: NodeIndex, message: String| Error::Graph {
        node: graph
            .g
            .node_weight(n)
            .map_or_else(|| format!("#{}", n.index()), |x| x.name.clone()),
        message,
    };
    let bound = graph.g.node_bound();
    let mut seen = vec![false; bound];
    if graph.order.len() != graph.g.node_count() {
        return Err(bad(
            graph.input,
            format!(
                "order lists {} nodes, the graph has {}",
                graph.order.len(),
                graph.g.node_count()
            ),
        ));
    }
    if graph.order.first() != Some(&graph.input) {
        return Err(bad(graph.input, "order must start at the input".into()));
    }
    let mut names = std::collections::BTreeSet::new();
    for &n in &graph.order {
        let node = graph
            .g
            .node_weight(n)
            .ok_or_else(|| bad(n, "order lists a removed node".into()))?;
        if seen[n.index()] {
            return Err(bad(n, "listed twice in order".into()));
        }
        if !names.insert(node.name.as_str()) {
            return Err(bad(n, "duplicate node name".into()));
        }
        let s = node.shape;
        if s.c == 0 || s.h == 0 || s.w == 0 {
            return Err(bad(n, format!("empty shape {s}")));
        }
        if s.numel() > MAX_TENSOR_ELEMENTS {
            return Err(Error::TooLarge(format!(
                "node `{}` has shape {s}",
                node.name
            )));
        }
        if n == graph.input {
            if node.op != Op::Input {
                return Err(bad(n, "the input node is not an input op".into()));
            }
        } else {
            let mut slots: Vec<(u32, NodeIndex)> = graph
                .g
                .edges_directed(n, petgraph::Direction::Incoming)
                .map(|e| {
                    use petgraph::visit::EdgeRef;
                    (*e.weight(), e.source())
                })
                .collect();
            slots.sort();
            let expect: Vec<u32> = (0..node.op.arity() as u32).collect();
            if slots.iter().map(|s| s.0).collect::<Vec<_>>() != expect {
                return Err(bad(n, "operand slots are not exactly 0..arity".into()));
            }
            let mut in_shapes = Vec::new();
            for &(_, i) in &slots {
                if !seen[i.index()] {
                    return Err(bad(n, "an operand comes later in order".into()));
                }
                in_shapes.push(graph.g[i].shape);
            }
            let inferred = infer_shape(&node.op, &in_shapes).map_err(|m| bad(n, m))?;
            if inferred != s {
                return Err(bad(n, format!("shape is {s} but the op gives {inferred}")));
            }
            if let Op::Conv2d(c) = node.op {
                // The per-image im2col buffer: (in_c / groups) * k * k rows, one column per
                // output pixel.
                let col = (c.in_c / c.groups) as u64 * c.k as u64 * c.k as u64;
                if col.saturating_mul(s.h as u64 * s.w as u64) > MAX_TENSOR_ELEMENTS {
                    return Err(Error::TooLarge(format!(
                        "the column buffer of convolution `{}`",
                        node.name
                    )));
                }
            }
        }
        seen[n.index()] = true;
    }
    if !graph.g.contains_node(graph.output) || graph.output == graph.input {
        return Err(bad(graph.output, "no output node".into()));
    }
    let mut total: u64 = 0;
    for (name, spec) in graph.params() {
        let len = spec
            .shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d as u64));
        total = len
            .and_then(|l| total.checked_add(l))
            .filter(|&t| t <= MAX_TENSOR_ELEMENTS)
            .ok_or_else(|| Error::TooLarge(format!("parameters (at `{name}`)")))?;
    }
    Ok(())
}

/// What forward keeps for backward. Consumed by [`Model::backward`].
#[derive(Debug, Clone)]
pub struct Tape<T = f32> {
    acts: Vec<Option<Tensor<T>>>,
    bn: Vec<Option<norm::BnSaved<T>>>,
    mode: Mode,
    batch: usize,
}

impl<T> Tape<T> {
    pub fn mode(&self) -> Mode {
        self.mode
    }
    pub fn batch(&self) -> usize {
        self.batch
    }
}

/// Gradients of one backward pass.
#[derive(Debug, Clone, PartialEq)]
pub struct Gradients<T = f32> {
    /// `dL/dp` for every parameter, keyed like [`Model::params`] (zeros for parameters that do
    /// not reach the output).
    pub params: BTreeMap<String, Tensor<T>>,
    /// `dL/dx`, `[N, C, H, W]`.
    pub input: Tensor<T>,
}

/// A graph with its parameters and buffers, ready to run on the CPU.
#[derive(Debug, Clone)]
pub struct Model<T: Float = f32> {
    graph: Graph,
    plan: Vec<NodePlan>,
    /// Trainable tensors, keyed `<node name>.<suffix>`; shapes as `graph.params()` says.
    pub params: BTreeMap<String, Tensor<T>>,
    /// BN running statistics, keyed `<node name>.running_mean|running_var`, shape `[c]`.
    pub buffers: BTreeMap<String, Tensor<T>>,
}

/// New running `(mean, var)` of a BN node after a training forward.
type BnUpdate<T> = Option<(Vec<T>, Vec<T>)>;
/// One node's forward result: output, BN statistics for backward, running-stat update.
type NodeOut<T> = (Tensor<T>, Option<norm::BnSaved<T>>, BnUpdate<T>);

impl<T: Float> Model<T> {
    /// Validates `graph` and initialises its state deterministically from `seed` (see
    /// [`crate::init`]).
    pub fn new(graph: Graph, seed: u64) -> Result<Model<T>, Error> {
        validate(&graph)?;
        let params = crate::init::init_params(&graph, seed);
        let buffers = crate::init::init_buffers(&graph);
        Ok(Model {
            plan: plan(&graph),
            graph,
            params,
            buffers,
        })
    }

    /// Validates `graph` and adopts the given state (e.g. from a checkpoint), which must hold
    /// exactly the graph's parameters and buffers with their shapes.
    pub fn with_state(
        graph: Graph,
        params: BTreeMap<String, Tensor<T>>,
        buffers: BTreeMap<String, Tensor<T>>,
    ) -> Result<Model<T>, Error> {
        validate(&graph)?;
        let m = Model {
            plan: plan(&graph),
            graph,
            params,
            buffers,
        };
        m.check_state()?;
        let extra =
            m.params.len() + m.buffers.len() - m.graph.params().len() - m.graph.buffers().len();
        if extra != 0 {
            return Err(Error::State(format!(
                "{extra} tensors the graph does not have"
            )));
        }
        Ok(m)
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// Total number of trainable scalars.
    pub fn param_count(&self) -> usize {
        self.params.values().map(|t| t.numel()).sum()
    }

    /// Every parameter and buffer the graph names is present with the right shape.
    pub fn check_state(&self) -> Result<(), Error> {
        for (name, spec) in self.graph.params() {
            match self.params.get(&name) {
                Some(t)
                    if t.shape == spec.shape
                        && t.data.len() == t.shape.iter().product::<usize>() => {}
                Some(t) => {
                    return Err(Error::State(format!(
                        "`{name}` has shape {:?}, expected {:?}",
                        t.shape, spec.shape
                    )))
                }
                None => return Err(Error::State(format!("missing parameter `{name}`"))),
            }
        }
        for (name, len) in self.graph.buffers() {
            match self.buffers.get(&name) {
                Some(t) if t.shape == [len] && t.data.len() == len => {}
                Some(t) => {
                    return Err(Error::State(format!(
                        "`{name}` has shape {:?}, expected [{len}]",
                        t.shape
                    )))
                }
                None => return Err(Error::State(format!("missing buffer `{name}`"))),
            }
        }
        Ok(())
    }

    fn check_input(&self, x: &Tensor<T>) -> Result<usize, Error> {
        let s = self.graph.input_shape();
        let ok = x.shape.len() == 4
            && x.shape[0] >= 1
            && x.shape[1..] == [s.c as usize, s.h as usize, s.w as usize]
            && x.data.len() == x.shape.iter().product::<usize>();
        if !ok {
            return Err(Error::InputShape {
                got: x.shape.clone(),
                expected: s,
            });
        }
        let n = x.shape[0];
        for p in &self.plan {
            let node = &self.graph.g[p.id];
            if (n as u64).saturating_mul(node.shape.numel()) > MAX_TENSOR_ELEMENTS {
                return Err(Error::TooLarge(format!(
                    "batch {n} of node `{}` ({})",
                    node.name, node.shape
                )));
            }
        }
        Ok(n)
    }

    /// Runs the network on `x` (`[N, C, H, W]`), returning the logits (`[N, classes]`) and the
    /// tape for [`Model::backward`]. Training mode updates the BN running statistics.
    pub fn forward(&mut self, x: &Tensor<T>, mode: Mode) -> Result<(Tensor<T>, Tape<T>), Error> {
        let (logits, tape, updates) = self.run(x, mode, true)?;
        for (p, u) in self.plan.iter().zip(updates) {
            if let Some((mean, var)) = u {
                self.buffers.get_mut(&p.running_mean).expect("checked").data = mean;
                self.buffers.get_mut(&p.running_var).expect("checked").data = var;
            }
        }
        Ok((logits, tape))
    }

    /// Inference: eval mode, no tape, every activation freed after its last use.
    pub fn infer(&self, x: &Tensor<T>) -> Result<Tensor<T>, Error> {
        Ok(self.run(x, Mode::Eval, false)?.0)
    }

    #[allow(clippy::type_complexity)]
    fn run(
        &self,
        x: &Tensor<T>,
        mode: Mode,
        for_backward: bool,
    ) -> Result<(Tensor<T>, Tape<T>, Vec<BnUpdate<T>>), Error> {
        self.check_state()?;
        let n = self.check_input(x)?;
        let bound = self.graph.g.node_bound();
        let mut acts: Vec<Option<Tensor<T>>> = vec![None; bound];
        let mut bn: Vec<Option<norm::BnSaved<T>>> = vec![None; bound];
        let mut remaining: Vec<usize> = vec![0; bound];
        for p in &self.plan {
            remaining[p.id.index()] = p.uses;
        }
        let mut keep = vec![false; bound];
        for p in &self.plan {
            keep[p.id.index()] = for_backward && p.keep;
        }
        let mut updates = Vec::with_capacity(self.plan.len());
        let out_idx = self.graph.output.index();
        for p in &self.plan {
            let i = p.id.index();
            let (y, saved, upd) = if p.id == self.graph.input {
                (x.clone(), None, None)
            } else {
                let ins: Vec<&Tensor<T>> = p
                    .inputs
                    .iter()
                    .map(|&j| acts[j].as_ref().expect("operand freed before its last use"))
                    .collect();
                self.forward_node(p, &ins, mode, n)?
            };
            acts[i] = Some(y);
            bn[i] = saved;
            updates.push(upd);
            for &j in &p.inputs {
                remaining[j] -= 1;
                if remaining[j] == 0 && j != out_idx && !keep[j] {
                    acts[j] = None;
                }
            }
        }
        let out = acts[out_idx].as_ref().expect("output computed");
        let per: usize = out.shape[1..].iter().product();
        let logits = Tensor::from_vec(&[n, per], out.data.clone());
        if !for_backward {
            acts.clear();
            bn.clear();
        } else if !keep[out_idx] {
            acts[out_idx] = None;
        }
        Ok((
            logits,
            Tape {
                acts,
                bn,
                mode,
                batch: n,
            },
            updates,
        ))
    }

    fn p(&self, name: &str) -> &[T] {
        &self.params[name].data
    }

    fn forward_node(
        &self,
        p: &NodePlan,
        ins: &[&Tensor<T>],
        mode: Mode,
        n: usize,
    ) -> Result<NodeOut<T>, Error> {
        let node = &self.graph.g[p.id];
        let x = ins[0];
        let key = |seed, step| ew::MaskKey {
            seed,
            stream: p.stream,
            step,
        };
        Ok(match node.op {
            Op::Input => unreachable!("input handled by the caller"),
            Op::Conv2d(c) => {
                let b = c.bias.then(|| self.p(&p.bias));
                (
                    conv::conv2d_forward(x, &c, self.p(&p.weight), b),
                    None,
                    None,
                )
            }
            Op::BatchNorm { eps, momentum, .. } => {
                let (g, b) = (self.p(&p.weight), self.p(&p.bias));
                let (rm, rv) = (
                    &self.buffers[&p.running_mean],
                    &self.buffers[&p.running_var],
                );
                match mode {
                    Mode::Train { .. } => {
                        let values = x.data.len() / x.shape[1].max(1);
                        if values <= 1 {
                            return Err(Error::BatchTooSmall {
                                node: node.name.clone(),
                                values,
                            });
                        }
                        let (mut m, mut v) = (rm.data.clone(), rv.data.clone());
                        let (y, s) = norm::batch_norm_train(x, g, b, eps, momentum, &mut m, &mut v);
                        (y, Some(s), Some((m, v)))
                    }
                    Mode::Eval => {
                        let (y, s) = norm::batch_norm_eval(x, g, b, eps, &rm.data, &rv.data);
                        (y, Some(s), None)
                    }
                }
            }
            Op::Relu => (ew::relu(x), None, None),
            Op::Dropout { p: prob } => match mode {
                Mode::Train { seed, step } => (ew::dropout(x, prob, key(seed, step)), None, None),
                Mode::Eval => (x.clone(), None, None),
            },
            Op::DropPath { survival } => match mode {
                Mode::Train { seed, step } => {
                    (ew::drop_path(x, survival, key(seed, step)), None, None)
                }
                Mode::Eval => (x.clone(), None, None),
            },
            Op::Add => (ew::add(x, ins[1]), None, None),
            Op::ZeroPadShortcut { out_c, stride } => (
                pool::zero_pad_shortcut(x, out_c as usize, stride),
                None,
                None,
            ),
            Op::Concat => (ew::concat(x, ins[1]), None, None),
            Op::MaxPool(pp) => (pool::max_pool(x, &pp), None, None),
            Op::AvgPool(pp) => (pool::avg_pool(x, &pp), None, None),
            Op::GlobalAvgPool => (pool::global_avg_pool(x), None, None),
            Op::Linear { in_f, out_f } => {
                let (in_f, out_f) = (in_f as usize, out_f as usize);
                let mut y = linear::linear(x, self.p(&p.weight), self.p(&p.bias), in_f, out_f);
                y.shape = vec![n, out_f, 1, 1];
                (y, None, None)
            }
        })
    }

    /// Backward from `dlogits` (shaped like the logits), consuming the tape (activations are
    /// freed as soon as they are used). Returns the gradient of every parameter, by name.
    pub fn backward(
        &self,
        tape: Tape<T>,
        dlogits: &Tensor<T>,
    ) -> Result<BTreeMap<String, Tensor<T>>, Error> {
        Ok(self.backward_impl(tape, dlogits, false)?.params)
    }

    /// [`Model::backward`] plus the gradient with respect to the input.
    pub fn backward_full(&self, tape: Tape<T>, dlogits: &Tensor<T>) -> Result<Gradients<T>, Error> {
        self.backward_impl(tape, dlogits, true)
    }

    fn backward_impl(
        &self,
        mut tape: Tape<T>,
        dlogits: &Tensor<T>,
        want_input: bool,
    ) -> Result<Gradients<T>, Error> {
        self.check_state()?;
        let n = tape.batch;
        let out = self.graph.g[self.graph.output].shape;
        let per = out.numel() as usize;
        if tape.acts.len() != self.graph.g.node_bound() {
            return Err(Error::State(
                "the tape is not from this model's forward".into(),
            ));
        }
        if dlogits.data.len() != n * per || dlogits.shape.first() != Some(&n) {
            return Err(Error::GradShape {
                got: dlogits.shape.clone(),
                expected: vec![n, per],
            });
        }
        let mut grads: Vec<Option<Tensor<T>>> = vec![None; tape.acts.len()];
        grads[self.graph.output.index()] = Some(Tensor::from_vec(
            &[n, out.c as usize, out.h as usize, out.w as usize],
            dlogits.data.clone(),
        ));
        let mut pgrads = BTreeMap::new();
        let mut dinput = None;
        let input_idx = self.graph.input.index();
        let shape_of = |idx: usize| -> Vec<usize> {
            let s = self.graph.g[NodeIndex::new(idx)].shape;
            vec![n, s.c as usize, s.h as usize, s.w as usize]
        };
        for p in self.plan.iter().rev() {
            let i = p.id.index();
            let Some(g) = grads[i].take() else {
                tape.acts[i] = None;
                continue;
            };
            let node = &self.graph.g[p.id];
            let act = |j: usize| tape.acts[j].as_ref().expect("activation kept for backward");
            let needs = |j: usize| j != input_idx || want_input;
            let mut dins: Vec<Option<Tensor<T>>> = Vec::with_capacity(2);
            match node.op {
                Op::Input => dinput = Some(g),
                Op::Conv2d(c) => {
                    let j = p.inputs[0];
                    let r = conv::conv2d_backward(act(j), &c, self.p(&p.weight), &g, needs(j));
                    pgrads.insert(
                        p.weight.clone(),
                        Tensor::from_vec(&self.params[&p.weight].shape, r.dw),
                    );
                    if let Some(db) = r.db {
                        pgrads.insert(p.bias.clone(), Tensor::from_vec(&[db.len()], db));
                    }
                    dins.push(r.dx);
                }
                Op::BatchNorm { .. } => {
                    let saved = tape.bn[i].as_ref().expect("bn statistics saved");
                    let (dx, dg, db) =
                        norm::batch_norm_backward(act(p.inputs[0]), self.p(&p.weight), saved, &g);
                    pgrads.insert(p.weight.clone(), Tensor::from_vec(&[dg.len()], dg));
                    pgrads.insert(p.bias.clone(), Tensor::from_vec(&[db.len()], db));
                    dins.push(Some(dx));
                }
                Op::Relu => dins.push(Some(ew::relu_backward(act(i), &g))),
                Op::Dropout { p: prob } => dins.push(Some(match tape.mode {
                    Mode::Train { seed, step } => ew::dropout(
                        &g,
                        prob,
                        ew::MaskKey {
                            seed,
                            stream: p.stream,
                            step,
                        },
                    ),
                    Mode::Eval => g,
                })),
                Op::DropPath { survival } => dins.push(Some(match tape.mode {
                    Mode::Train { seed, step } => ew::drop_path(
                        &g,
                        survival,
                        ew::MaskKey {
                            seed,
                            stream: p.stream,
                            step,
                        },
                    ),
                    Mode::Eval => g,
                })),
                Op::Add => {
                    dins.push(Some(g.clone()));
                    dins.push(Some(g));
                }
                Op::ZeroPadShortcut { stride, .. } => dins.push(Some(
                    pool::zero_pad_shortcut_backward(&shape_of(p.inputs[0]), stride, &g),
                )),
                Op::Concat => {
                    let ca = self.graph.g[NodeIndex::new(p.inputs[0])].shape.c as usize;
                    let (a, b) = ew::concat_backward(&g, ca);
                    dins.push(Some(a));
                    dins.push(Some(b));
                }
                Op::MaxPool(pp) => {
                    dins.push(Some(pool::max_pool_backward(act(p.inputs[0]), &pp, &g)))
                }
                Op::AvgPool(pp) => dins.push(Some(pool::avg_pool_backward(
                    &shape_of(p.inputs[0]),
                    &pp,
                    &g,
                ))),
                Op::GlobalAvgPool => dins.push(Some(pool::global_avg_pool_backward(
                    &shape_of(p.inputs[0]),
                    &g,
                ))),
                Op::Linear { in_f, out_f } => {
                    let (in_f, out_f) = (in_f as usize, out_f as usize);
                    let (mut dx, dw, db) = linear::linear_backward(
                        act(p.inputs[0]),
                        self.p(&p.weight),
                        &g,
                        in_f,
                        out_f,
                    );
                    dx.shape = shape_of(p.inputs[0]);
                    pgrads.insert(p.weight.clone(), Tensor::from_vec(&[out_f, in_f], dw));
                    pgrads.insert(p.bias.clone(), Tensor::from_vec(&[out_f], db));
                    dins.push(Some(dx));
                }
            }
            for (&j, d) in p.inputs.iter().zip(dins) {
                let Some(d) = d else { continue };
                match grads[j].as_mut() {
                    Some(acc) => ops::add_assign(&mut acc.data, &d.data),
                    None => grads[j] = Some(d),
                }
            }
            tape.acts[i] = None;
            tape.bn[i] = None;
        }
        for (name, spec) in self.graph.params() {
            pgrads
                .entry(name)
                .or_insert_with(|| Tensor::zeros(&spec.shape));
        }
        let input = dinput.unwrap_or_else(|| Tensor::zeros(&shape_of(input_idx)));
        Ok(Gradients {
            params: pgrads,
            input,
        })
    }
}

fn plan(graph: &Graph) -> Vec<NodePlan> {
    let mut uses = vec![0usize; graph.g.node_bound()];
    let mut keep = vec![false; graph.g.node_bound()];
    for &n in &graph.order {
        let node = &graph.g[n];
        if node.op == Op::Relu {
            keep[n.index()] = true;
        }
        for i in graph.inputs(n) {
            uses[i.index()] += 1;
            if matches!(
                node.op,
                Op::Conv2d(_) | Op::BatchNorm { .. } | Op::MaxPool(_) | Op::Linear { .. }
            ) {
                keep[i.index()] = true;
            }
        }
    }
    graph
        .order
        .iter()
        .map(|&n| {
            let name = &graph.g[n].name;
            NodePlan {
                id: n,
                inputs: graph.inputs(n).iter().map(|i| i.index()).collect(),
                weight: format!("{name}.weight"),
                bias: format!("{name}.bias"),
                running_mean: format!("{name}.running_mean"),
                running_var: format!("{name}.running_var"),
                stream: rng::stream_id(name),
                keep: keep[n.index()],
                uses: uses[n.index()],
            }
        })
        .collect()
}
