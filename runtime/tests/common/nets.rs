//! Building op graphs by hand (Graph::new + push), shapes inferred by the executor's rules.
//! Shared by the tests and the benchmark (`#[path]`-included there).
#![allow(dead_code)]

use petgraph::stable_graph::NodeIndex;
use wrnc_compiler::graph::{Conv2d, Graph, Node, Op, Pool, Shape};
use wrnc_runtime::cpu::infer_shape;

pub type Id = NodeIndex;

/// A graph under construction; node names are `<counter>.<mnemonic>`.
pub struct B {
    pub g: Graph,
    count: usize,
}

impl B {
    pub fn new(c: u32, h: u32, w: u32) -> (B, Id) {
        let g = Graph::new("test", Shape::new(c, h, w));
        let input = g.input;
        (B { g, count: 0 }, input)
    }

    pub fn op(&mut self, op: Op, ins: &[Id]) -> Id {
        let shapes: Vec<Shape> = ins.iter().map(|&i| self.g.node(i).shape).collect();
        let shape = infer_shape(&op, &shapes).unwrap_or_else(|e| panic!("test graph: {e}"));
        let name = format!("{}.{}", self.count, op.mnemonic());
        self.count += 1;
        self.g.push(Node { op, name, shape }, ins)
    }

    pub fn c(&self, x: Id) -> u32 {
        self.g.node(x).shape.c
    }

    #[allow(clippy::too_many_arguments)]
    pub fn conv_full(
        &mut self,
        x: Id,
        out: u32,
        k: u32,
        s: u32,
        p: u32,
        groups: u32,
        bias: bool,
    ) -> Id {
        let in_c = self.c(x);
        self.op(
            Op::Conv2d(Conv2d {
                in_c,
                out_c: out,
                k,
                stride: s,
                pad: p,
                groups,
                bias,
            }),
            &[x],
        )
    }
    /// Convolution with "same" padding `(k-1)/2`, no bias, one group.
    pub fn conv(&mut self, x: Id, out: u32, k: u32, s: u32) -> Id {
        self.conv_full(x, out, k, s, (k - 1) / 2, 1, false)
    }
    pub fn bn(&mut self, x: Id) -> Id {
        let c = self.c(x);
        self.op(
            Op::BatchNorm {
                c,
                eps: 1e-5,
                momentum: 0.1,
            },
            &[x],
        )
    }
    pub fn relu(&mut self, x: Id) -> Id {
        self.op(Op::Relu, &[x])
    }
    pub fn bn_relu(&mut self, x: Id) -> Id {
        let y = self.bn(x);
        self.relu(y)
    }
    pub fn dropout(&mut self, x: Id, p: f32) -> Id {
        self.op(Op::Dropout { p }, &[x])
    }
    pub fn droppath(&mut self, x: Id, survival: f32) -> Id {
        self.op(Op::DropPath { survival }, &[x])
    }
    pub fn add(&mut self, a: Id, b: Id) -> Id {
        self.op(Op::Add, &[a, b])
    }
    pub fn concat(&mut self, a: Id, b: Id) -> Id {
        self.op(Op::Concat, &[a, b])
    }
    pub fn zeropad(&mut self, x: Id, out_c: u32, stride: u32) -> Id {
        self.op(Op::ZeroPadShortcut { out_c, stride }, &[x])
    }
    pub fn maxpool(&mut self, x: Id, k: u32, stride: u32, pad: u32) -> Id {
        self.op(Op::MaxPool(Pool { k, stride, pad }), &[x])
    }
    pub fn avgpool(&mut self, x: Id, k: u32, stride: u32, pad: u32) -> Id {
        self.op(Op::AvgPool(Pool { k, stride, pad }), &[x])
    }
    pub fn gap(&mut self, x: Id) -> Id {
        self.op(Op::GlobalAvgPool, &[x])
    }
    pub fn linear(&mut self, x: Id, out_f: u32) -> Id {
        let in_f = self.g.node(x).shape.numel() as u32;
        self.op(Op::Linear { in_f, out_f }, &[x])
    }

    /// Marks `out` as the output (any shape; `classes` = its elements per image).
    pub fn finish(mut self, out: Id) -> Graph {
        self.g.output = out;
        self.g.classes = self.g.node(out).shape.numel() as u32;
        self.g
    }

    // ---- blocks of the families ----

    /// WRN / PreResNet block whose width or stride changes: shared pre-activation, 3x3 body,
    /// 1x1 projection shortcut, optional dropout between the convolutions.
    pub fn preact_proj_block(&mut self, x: Id, out: u32, stride: u32, drop: Option<f32>) -> Id {
        let o = self.bn_relu(x);
        let mut y = self.conv(o, out, 3, stride);
        y = self.bn_relu(y);
        if let Some(p) = drop {
            y = self.dropout(y, p);
        }
        y = self.conv(y, out, 3, 1);
        let s = self.conv(o, out, 1, stride);
        self.add(y, s)
    }

    /// WRN block with identity shortcut.
    pub fn preact_block(&mut self, x: Id, drop: Option<f32>) -> Id {
        let out = self.c(x);
        let o = self.bn_relu(x);
        let mut y = self.conv(o, out, 3, 1);
        y = self.bn_relu(y);
        if let Some(p) = drop {
            y = self.dropout(y, p);
        }
        y = self.conv(y, out, 3, 1);
        self.add(y, x)
    }

    /// Post-activation ResNet block with the option-A (zero-pad) shortcut, optional stochastic
    /// depth on the body.
    pub fn zeropad_block(&mut self, x: Id, out: u32, stride: u32, survival: Option<f32>) -> Id {
        let mut y = self.conv(x, out, 3, stride);
        y = self.bn_relu(y);
        y = self.conv(y, out, 3, 1);
        y = self.bn(y);
        if let Some(s) = survival {
            y = self.droppath(y, s);
        }
        let s = self.zeropad(x, out, stride);
        let sum = self.add(y, s);
        self.relu(sum)
    }

    /// DenseNet-BC unit: bn relu conv1x1(4g) bn relu conv3x3(g), concatenated after its input.
    pub fn dense_unit(&mut self, x: Id, growth: u32) -> Id {
        let mut y = self.bn_relu(x);
        y = self.conv(y, 4 * growth, 1, 1);
        y = self.bn_relu(y);
        y = self.conv(y, growth, 3, 1);
        self.concat(x, y)
    }

    /// DenseNet transition: bn relu conv1x1 avgpool2.
    pub fn transition(&mut self, x: Id, out: u32) -> Id {
        let mut y = self.bn_relu(x);
        y = self.conv(y, out, 1, 1);
        self.avgpool(y, 2, 2, 0)
    }

    /// ResNeXt bottleneck: 1x1, grouped 3x3 (stride), 1x1, projection+BN shortcut, ReLU.
    pub fn grouped_bottleneck(
        &mut self,
        x: Id,
        width: u32,
        out: u32,
        groups: u32,
        stride: u32,
    ) -> Id {
        let mut y = self.conv(x, width, 1, 1);
        y = self.bn_relu(y);
        y = self.conv_full(y, width, 3, stride, 1, groups, false);
        y = self.bn_relu(y);
        y = self.conv(y, out, 1, 1);
        y = self.bn(y);
        let mut s = self.conv(x, out, 1, stride);
        s = self.bn(s);
        let sum = self.add(y, s);
        self.relu(sum)
    }

    /// ImageNet-style stem: 7x7/2 conv, BN, ReLU, 3x3/2 max pool.
    pub fn imagenet_stem(&mut self, x: Id, out: u32) -> Id {
        let mut y = self.conv_full(x, out, 7, 2, 3, 1, false);
        y = self.bn_relu(y);
        self.maxpool(y, 3, 2, 1)
    }

    /// Pre-activation head: bn relu gap fc.
    pub fn preact_head(&mut self, x: Id, classes: u32) -> Id {
        let y = self.bn_relu(x);
        let y = self.gap(y);
        self.linear(y, classes)
    }
}

/// WRN-depth-k (B(3,3)) on `h x h` RGB inputs, as in the paper (projection where the width
/// changes).
pub fn wrn(depth: u32, k: u32, classes: u32, h: u32, drop: Option<f32>) -> Graph {
    assert_eq!((depth - 4) % 6, 0);
    let n = (depth - 4) / 6;
    let (mut b, x) = B::new(3, h, h);
    let mut y = b.conv(x, 16, 3, 1);
    for (stage, width) in [16 * k, 32 * k, 64 * k].into_iter().enumerate() {
        for i in 0..n {
            let stride = if i == 0 && stage > 0 { 2 } else { 1 };
            y = if b.c(y) != width || stride != 1 {
                b.preact_proj_block(y, width, stride, drop)
            } else {
                b.preact_block(y, drop)
            };
        }
    }
    let out = b.preact_head(y, classes);
    b.finish(out)
}
