//! Structural AST -> op graph, with shape inference and every semantic check.
//!
//! Invariants of the result: those listed in [`crate::graph`]. Every check happens here, before
//! any allocation sized by a user's number: widths, kernel sizes, strides and repeat counts are
//! bounded first, and the total node count is bounded while unrolling.
//!
//! Naming (the parameter naming scheme, the layout of PyTorch `nn.Sequential` state dicts):
//! the top-level layers are numbered `0, 1, 2, ...` after `repeat` is unrolled; inside a
//! residual block the sections are `pre.j`, `body.j`, `shortcut.j`, `post.j`, plus `add` and
//! `droppath`; inside a dense unit the layers are `j` and the concatenation is `concat`.

use crate::ast::*;
use crate::graph::{Conv2d, Graph, Node, Op, Pool, Shape};
use crate::{Error, Result};
use petgraph::stable_graph::NodeIndex;

/// Largest channel count of any tensor.
pub const MAX_WIDTH: u64 = 65_536;
/// Largest input height or width.
pub const MAX_SPATIAL: u64 = 4096;
/// Largest kernel size.
pub const MAX_KERNEL: u64 = 15;
/// Largest stride.
pub const MAX_STRIDE: u64 = 8;
/// Largest number of nodes a network may lower to.
pub const MAX_NODES: usize = 200_000;
/// Largest number of parameters (about 17 G).
pub const MAX_PARAMS: u64 = 1 << 34;
/// BN epsilon and momentum (PyTorch's defaults).
pub const BN_EPS: f32 = 1e-5;
pub const BN_MOMENTUM: f32 = 0.1;

pub fn lower(net: &Structural) -> Result<Graph> {
    let input = net.input.ok_or_else(|| {
        Error::new(net.span, "the network has no input shape").help("write e.g. input 3x32x32")
    })?;
    let [c, h, w] = input.value;
    if c == 0 || c > MAX_WIDTH || h == 0 || w == 0 || h > MAX_SPATIAL || w > MAX_SPATIAL {
        return Err(
            Error::new(input.span, format!("input {c}x{h}x{w} is out of range")).help(format!(
                "channels 1..={MAX_WIDTH}, height and width 1..={MAX_SPATIAL}"
            )),
        );
    }
    let classes = net.classes.ok_or_else(|| {
        Error::new(net.span, "the network has no number of classes").help("write e.g. classes 10")
    })?;
    if classes.value == 0 || classes.value > 1_000_000 {
        return Err(Error::new(
            classes.span,
            format!("{} classes is out of range (1 to 1000000)", classes.value),
        ));
    }
    let mut cx = Lower {
        g: Graph::new(
            net.name.clone().unwrap_or_else(|| "network".into()),
            Shape::new(c as u32, h as u32, w as u32),
        ),
        classes: classes.value as u32,
        params: 0,
    };
    cx.g.classes = classes.value as u32;
    let start = cx.g.input;
    let out = cx.seq(&net.body, start, "", net.span)?;
    let last = cx.g.node(out);
    let ok = matches!(last.op, Op::Linear { .. })
        && last.shape == Shape::new(classes.value as u32, 1, 1);
    if !ok {
        let span = net.body.last().map(|l| l.span).unwrap_or(net.span);
        return Err(Error::new(
            span,
            format!("the network must end with `fc` giving {} class scores; it ends with {} of shape {}", classes.value, last.op.mnemonic(), last.shape),
        )
        .help("end the network with e.g. `bn relu gap fc`"));
    }
    cx.g.output = out;
    Ok(cx.g)
}

struct Lower {
    g: Graph,
    classes: u32,
    params: u64,
}

fn name(prefix: &str, i: usize) -> String {
    if prefix.is_empty() {
        i.to_string()
    } else {
        format!("{prefix}.{i}")
    }
}

fn conv_out(x: u32, k: u32, s: u32, p: u32) -> Option<u32> {
    let padded = x + 2 * p;
    if padded < k {
        None
    } else {
        Some((padded - k) / s + 1)
    }
}

impl Lower {
    fn push(
        &mut self,
        span: Span,
        op: Op,
        name: String,
        shape: Shape,
        inputs: &[NodeIndex],
    ) -> Result<NodeIndex> {
        if self.g.g.node_count() >= MAX_NODES {
            return Err(Error::new(
                span,
                format!("the network has more than {MAX_NODES} layers"),
            ));
        }
        for p in op.params() {
            self.params += p.shape.iter().map(|&d| d as u64).product::<u64>();
        }
        if self.params > MAX_PARAMS {
            return Err(Error::new(
                span,
                format!("the network has more than {MAX_PARAMS} parameters"),
            ));
        }
        Ok(self.g.push(Node { op, name, shape }, inputs))
    }

    /// Lowers a sequence; `prefix` names its layers, which are numbered after unrolling.
    fn seq(
        &mut self,
        layers: &[Layer],
        mut x: NodeIndex,
        prefix: &str,
        _span: Span,
    ) -> Result<NodeIndex> {
        let mut i = 0usize;
        self.seq_into(layers, &mut x, prefix, &mut i)?;
        Ok(x)
    }

    fn seq_into(
        &mut self,
        layers: &[Layer],
        x: &mut NodeIndex,
        prefix: &str,
        i: &mut usize,
    ) -> Result<()> {
        for layer in layers {
            if let LayerKind::Repeat { count, body } = &layer.kind {
                if count.value == 0 || count.value > MAX_NODES as u64 {
                    return Err(Error::new(
                        count.span,
                        format!(
                            "repeat count {} is out of range (1 to {MAX_NODES})",
                            count.value
                        ),
                    ));
                }
                for _ in 0..count.value {
                    self.seq_into(body, x, prefix, i)?;
                }
                continue;
            }
            *x = self.layer(layer, *x, &name(prefix, *i))?;
            *i += 1;
        }
        Ok(())
    }

    fn layer(&mut self, layer: &Layer, x: NodeIndex, name: &str) -> Result<NodeIndex> {
        let span = layer.span;
        let s = self.g.node(x).shape;
        let err = |m: String| Error::new(span, m);
        match &layer.kind {
            LayerKind::Conv {
                k,
                out,
                stride,
                pad,
                groups,
                bias,
            } => {
                let (k, out, stride, groups) = (*k, *out, *stride, *groups);
                if k == 0 || k > MAX_KERNEL {
                    return Err(err(format!(
                        "kernel size {k} is out of range (1 to {MAX_KERNEL})"
                    )));
                }
                if out == 0 || out > MAX_WIDTH {
                    return Err(err(format!(
                        "width {out} is out of range (1 to {MAX_WIDTH})"
                    )));
                }
                if stride == 0 || stride > MAX_STRIDE {
                    return Err(err(format!(
                        "stride {stride} is out of range (1 to {MAX_STRIDE})"
                    )));
                }
                let pad = pad.unwrap_or((k - 1) / 2);
                if pad > k {
                    return Err(err(format!("padding {pad} is larger than the kernel {k}")));
                }
                if groups == 0
                    || !(s.c as u64).is_multiple_of(groups)
                    || !out.is_multiple_of(groups)
                {
                    return Err(err(format!(
                        "{groups} groups do not divide the {} input and {out} output channels",
                        s.c
                    )));
                }
                let (k, stride, pad) = (k as u32, stride as u32, pad as u32);
                let (Some(h), Some(w)) =
                    (conv_out(s.h, k, stride, pad), conv_out(s.w, k, stride, pad))
                else {
                    return Err(err(format!(
                        "a {k}x{k} kernel does not fit the {}x{} input",
                        s.h, s.w
                    )));
                };
                let op = Op::Conv2d(Conv2d {
                    in_c: s.c,
                    out_c: out as u32,
                    k,
                    stride,
                    pad,
                    groups: groups as u32,
                    bias: *bias,
                });
                self.push(span, op, name.into(), Shape::new(out as u32, h, w), &[x])
            }
            LayerKind::Bn => self.push(
                span,
                Op::BatchNorm {
                    c: s.c,
                    eps: BN_EPS,
                    momentum: BN_MOMENTUM,
                },
                name.into(),
                s,
                &[x],
            ),
            LayerKind::Relu => self.push(span, Op::Relu, name.into(), s, &[x]),
            LayerKind::Dropout { p } => {
                if !(0.0..1.0).contains(p) {
                    return Err(err(format!("dropout {p} is not a probability in [0, 1)")));
                }
                self.push(span, Op::Dropout { p: *p as f32 }, name.into(), s, &[x])
            }
            LayerKind::MaxPool { k, stride, pad } | LayerKind::AvgPool { k, stride, pad } => {
                if *k == 0
                    || *k > MAX_KERNEL
                    || *stride == 0
                    || *stride > MAX_KERNEL
                    || *pad * 2 > *k
                {
                    return Err(err(format!(
                        "pooling window {k}, stride {stride}, padding {pad} is not valid"
                    ))
                    .help("window 1 to 15, stride 1 to 15, padding at most half the window"));
                }
                let p = Pool {
                    k: *k as u32,
                    stride: *stride as u32,
                    pad: *pad as u32,
                };
                let (Some(h), Some(w)) = (
                    conv_out(s.h, p.k, p.stride, p.pad),
                    conv_out(s.w, p.k, p.stride, p.pad),
                ) else {
                    return Err(err(format!(
                        "a {k}x{k} window does not fit the {}x{} input",
                        s.h, s.w
                    )));
                };
                let op = if matches!(layer.kind, LayerKind::MaxPool { .. }) {
                    Op::MaxPool(p)
                } else {
                    Op::AvgPool(p)
                };
                self.push(span, op, name.into(), Shape::new(s.c, h, w), &[x])
            }
            LayerKind::GlobalAvgPool => self.push(
                span,
                Op::GlobalAvgPool,
                name.into(),
                Shape::new(s.c, 1, 1),
                &[x],
            ),
            LayerKind::Fc { out } => {
                let out = out.unwrap_or(self.classes as u64);
                if out == 0 || out > 1_000_000 {
                    return Err(err(format!(
                        "fc width {out} is out of range (1 to 1000000)"
                    )));
                }
                let in_f = s.numel();
                if in_f > 1 << 28 {
                    return Err(err(format!(
                        "fc input of {in_f} features is too large; pool first (gap)"
                    )));
                }
                let op = Op::Linear {
                    in_f: in_f as u32,
                    out_f: out as u32,
                };
                self.push(span, op, name.into(), Shape::new(out as u32, 1, 1), &[x])
            }
            LayerKind::Dense(body) => {
                if body.is_empty() {
                    return Err(err("empty dense unit".into()));
                }
                let y = self.seq(body, x, name, span)?;
                let ys = self.g.node(y).shape;
                if ys.h != s.h || ys.w != s.w {
                    return Err(err(format!(
                        "a dense unit must keep the spatial size: {}x{} became {}x{}",
                        s.h, s.w, ys.h, ys.w
                    )));
                }
                let c = s.c as u64 + ys.c as u64;
                if c > MAX_WIDTH {
                    return Err(err(format!(
                        "concatenation gives {c} channels (at most {MAX_WIDTH})"
                    )));
                }
                self.push(
                    span,
                    Op::Concat,
                    format!("{name}.concat"),
                    Shape::new(c as u32, s.h, s.w),
                    &[x, y],
                )
            }
            LayerKind::Residual(r) => self.residual(r, x, name, span),
            LayerKind::Repeat { .. } => unreachable!("repeat is unrolled by seq_into"),
        }
    }

    fn residual(
        &mut self,
        r: &Residual,
        x: NodeIndex,
        name: &str,
        span: Span,
    ) -> Result<NodeIndex> {
        if r.body.is_empty() {
            return Err(Error::new(span, "a residual block needs a `body`"));
        }
        let pre = self.seq(&r.pre, x, &format!("{name}.pre"), span)?;
        let mut body = self.seq(&r.body, pre, &format!("{name}.body"), span)?;
        let i = self.g.node(pre).shape;
        let o = self.g.node(body).shape;
        let err = |m: String| Error::new(span, m);
        // The stride s with ceil(i / s) == o, as a strided 1x1 convolution gives.
        let stride =
            (1..=MAX_STRIDE as u32).find(|&s| (i.h - 1) / s + 1 == o.h && (i.w - 1) / s + 1 == o.w);
        let sc_name = format!("{name}.shortcut");
        let shortcut = match r.shortcut {
            ShortcutKind::Identity => {
                if i != o {
                    return Err(err(format!(
                        "identity shortcut, but the body changes the shape from {i} to {o}"
                    ))
                    .help("use `shortcut proj`, `shortcut projbn` or `shortcut zeropad`"));
                }
                pre
            }
            ShortcutKind::Proj | ShortcutKind::ProjBn => {
                let Some(stride) = stride else {
                    return Err(err(format!("no 1x1 projection maps {i} to {o}")));
                };
                let conv = Op::Conv2d(Conv2d {
                    in_c: i.c,
                    out_c: o.c,
                    k: 1,
                    stride,
                    pad: 0,
                    groups: 1,
                    bias: false,
                });
                let mut y = self.push(span, conv, format!("{sc_name}.0"), o, &[pre])?;
                if r.shortcut == ShortcutKind::ProjBn {
                    y = self.push(
                        span,
                        Op::BatchNorm {
                            c: o.c,
                            eps: BN_EPS,
                            momentum: BN_MOMENTUM,
                        },
                        format!("{sc_name}.1"),
                        o,
                        &[y],
                    )?;
                }
                y
            }
            ShortcutKind::ZeroPad => {
                let exact = (1..=MAX_STRIDE as u32).find(|&s| {
                    i.h / s == o.h
                        && i.w / s == o.w
                        && i.h.is_multiple_of(s)
                        && i.w.is_multiple_of(s)
                });
                let (Some(stride), true) = (exact, o.c >= i.c) else {
                    return Err(
                        err(format!("a zero-padding shortcut cannot map {i} to {o}"))
                            .help("it average-pools by an exact stride and can only add channels"),
                    );
                };
                if stride == 1 && o.c == i.c {
                    pre
                } else {
                    self.push(
                        span,
                        Op::ZeroPadShortcut { out_c: o.c, stride },
                        format!("{sc_name}.0"),
                        o,
                        &[pre],
                    )?
                }
            }
        };
        if let Some(p) = r.survival {
            if !(p > 0.0 && p <= 1.0) {
                return Err(err(format!("survival {p} is not a probability in (0, 1]")));
            }
            if p < 1.0 {
                body = self.push(
                    span,
                    Op::DropPath { survival: p as f32 },
                    format!("{name}.droppath"),
                    o,
                    &[body],
                )?;
            }
        }
        let sum = self.push(span, Op::Add, format!("{name}.add"), o, &[body, shortcut])?;
        self.seq(&r.post, sum, &format!("{name}.post"), span)
    }
}
