//! Finite-difference gradient checks (f64) of every op and of small networks, through the
//! executor: analytic input and parameter gradients against central differences.

mod common;

use common::{gradcheck, nets::Id, B};
use wrnc_compiler::graph::Graph;
use wrnc_runtime::cpu::Mode;

const TRAIN: Mode = Mode::Train { seed: 3, step: 11 };
const EVAL: Mode = Mode::Eval;

/// A one-op (or few-op) graph on an input of `c x h x w`.
fn net(c: u32, h: u32, w: u32, f: impl FnOnce(&mut B, Id) -> Id) -> Graph {
    let (mut b, x) = B::new(c, h, w);
    let y = f(&mut b, x);
    b.finish(y)
}

#[track_caller]
fn check(name: &str, graph: Graph, n: usize, mode: Mode) {
    match gradcheck(graph, n, mode, 12) {
        Ok(probed) => assert!(probed > 0, "{name}: nothing probed"),
        Err(e) => panic!("{name}: gradient mismatch\n{e}"),
    }
}

#[test]
fn conv_gradients() {
    check(
        "1x1 direct",
        net(3, 5, 5, |b, x| b.conv_full(x, 4, 1, 1, 0, 1, false)),
        2,
        TRAIN,
    );
    check(
        "1x1 stride 2",
        net(3, 5, 5, |b, x| b.conv_full(x, 4, 1, 2, 0, 1, false)),
        2,
        TRAIN,
    );
    check(
        "3x3 pad 1",
        net(3, 5, 5, |b, x| b.conv_full(x, 4, 3, 1, 1, 1, false)),
        2,
        TRAIN,
    );
    check(
        "3x3 stride 2 bias",
        net(3, 6, 6, |b, x| b.conv_full(x, 4, 3, 2, 1, 1, true)),
        2,
        TRAIN,
    );
    check(
        "3x3 no pad",
        net(2, 5, 4, |b, x| b.conv_full(x, 3, 3, 1, 0, 1, false)),
        2,
        TRAIN,
    );
    check(
        "5x5 stride 2 pad 2",
        net(2, 7, 7, |b, x| b.conv_full(x, 3, 5, 2, 2, 1, true)),
        1,
        TRAIN,
    );
    check(
        "7x7 stride 2 pad 3",
        net(3, 9, 9, |b, x| b.conv_full(x, 2, 7, 2, 3, 1, false)),
        1,
        TRAIN,
    );
    check(
        "2x2 stride 2 non-square",
        net(2, 6, 4, |b, x| b.conv_full(x, 3, 2, 2, 0, 1, true)),
        2,
        TRAIN,
    );
    check(
        "grouped 3x3",
        net(4, 5, 5, |b, x| b.conv_full(x, 6, 3, 1, 1, 2, false)),
        2,
        TRAIN,
    );
    check(
        "grouped 1x1",
        net(4, 4, 4, |b, x| b.conv_full(x, 4, 1, 1, 0, 2, true)),
        2,
        TRAIN,
    );
    check(
        "depthwise 3x3 s2",
        net(4, 6, 6, |b, x| b.conv_full(x, 4, 3, 2, 1, 4, false)),
        2,
        TRAIN,
    );
}

#[test]
fn normalisation_and_activation_gradients() {
    check("bn train", net(3, 4, 4, |b, x| b.bn(x)), 2, TRAIN);
    check(
        "bn train 1x1 spatial",
        net(3, 1, 1, |b, x| b.bn(x)),
        4,
        TRAIN,
    );
    check("bn eval", net(3, 4, 4, |b, x| b.bn(x)), 2, EVAL);
    check("relu", net(3, 4, 4, |b, x| b.relu(x)), 2, TRAIN);
    check("bn relu", net(3, 4, 4, |b, x| b.bn_relu(x)), 2, TRAIN);
}

#[test]
fn stochastic_gradients() {
    check(
        "dropout train",
        net(3, 4, 4, |b, x| b.dropout(x, 0.3)),
        2,
        TRAIN,
    );
    check(
        "dropout eval",
        net(3, 4, 4, |b, x| b.dropout(x, 0.3)),
        2,
        EVAL,
    );
    check(
        "droppath train",
        net(3, 3, 3, |b, x| b.droppath(x, 0.6)),
        6,
        TRAIN,
    );
    check(
        "droppath eval",
        net(3, 3, 3, |b, x| b.droppath(x, 0.6)),
        2,
        EVAL,
    );
}

#[test]
fn structural_gradients() {
    check(
        "add",
        net(3, 4, 4, |b, x| {
            let r = b.relu(x);
            b.add(x, r)
        }),
        2,
        TRAIN,
    );
    check(
        "add same operand twice",
        net(3, 4, 4, |b, x| b.add(x, x)),
        2,
        TRAIN,
    );
    check(
        "concat",
        net(3, 4, 4, |b, x| {
            let r = b.relu(x);
            b.concat(r, x)
        }),
        2,
        TRAIN,
    );
    check(
        "zeropad stride 2",
        net(3, 6, 6, |b, x| b.zeropad(x, 5, 2)),
        2,
        TRAIN,
    );
    check(
        "zeropad stride 2 odd",
        net(2, 5, 5, |b, x| b.zeropad(x, 4, 2)),
        2,
        TRAIN,
    );
    check(
        "zeropad stride 1",
        net(3, 4, 4, |b, x| b.zeropad(x, 4, 1)),
        2,
        TRAIN,
    );
}

#[test]
fn pooling_gradients() {
    check(
        "maxpool 3 s2 p1",
        net(2, 7, 7, |b, x| b.maxpool(x, 3, 2, 1)),
        2,
        TRAIN,
    );
    check(
        "maxpool 2 s2",
        net(2, 6, 6, |b, x| b.maxpool(x, 2, 2, 0)),
        2,
        TRAIN,
    );
    check(
        "maxpool 3 s1 p1",
        net(2, 4, 5, |b, x| b.maxpool(x, 3, 1, 1)),
        2,
        TRAIN,
    );
    check(
        "avgpool 3 s2 p1",
        net(2, 7, 7, |b, x| b.avgpool(x, 3, 2, 1)),
        2,
        TRAIN,
    );
    check(
        "avgpool 2 s2",
        net(2, 6, 6, |b, x| b.avgpool(x, 2, 2, 0)),
        2,
        TRAIN,
    );
    check("gap", net(3, 4, 5, |b, x| b.gap(x)), 2, TRAIN);
    check(
        "linear on 1x1",
        net(3, 4, 4, |b, x| {
            let g = b.gap(x);
            b.linear(g, 5)
        }),
        3,
        TRAIN,
    );
    check(
        "linear on a plane",
        net(2, 3, 3, |b, x| b.linear(x, 4)),
        3,
        TRAIN,
    );
}

#[test]
fn network_gradients() {
    check(
        "pre-activation block with projection, dropout",
        net(3, 6, 6, |b, x| {
            let y = b.conv(x, 4, 3, 1);
            let y = b.preact_proj_block(y, 6, 2, Some(0.3));
            b.preact_head(y, 3)
        }),
        2,
        TRAIN,
    );
    check(
        "pre-activation identity block, eval",
        net(3, 5, 5, |b, x| {
            let y = b.conv(x, 4, 3, 1);
            let y = b.preact_block(y, Some(0.3));
            b.preact_head(y, 3)
        }),
        2,
        EVAL,
    );
    check(
        "zero-pad shortcut block with droppath",
        net(3, 6, 6, |b, x| {
            let y = b.conv(x, 3, 3, 1);
            let y = b.bn_relu(y);
            let y = b.zeropad_block(y, 5, 2, Some(0.5));
            let y = b.gap(y);
            b.linear(y, 3)
        }),
        4,
        TRAIN,
    );
    check(
        "dense units and transition",
        net(3, 6, 6, |b, x| {
            let y = b.conv(x, 4, 3, 1);
            let y = b.dense_unit(y, 2);
            let y = b.dense_unit(y, 2);
            let y = b.transition(y, 4);
            b.preact_head(y, 3)
        }),
        2,
        TRAIN,
    );
    check(
        "grouped bottleneck",
        net(3, 6, 6, |b, x| {
            let y = b.conv(x, 4, 3, 1);
            let y = b.bn_relu(y);
            let y = b.grouped_bottleneck(y, 4, 8, 2, 2);
            let y = b.gap(y);
            b.linear(y, 3)
        }),
        2,
        TRAIN,
    );
    check(
        "pooling stem",
        net(3, 12, 12, |b, x| {
            let y = b.imagenet_stem(x, 4);
            let y = b.gap(y);
            b.linear(y, 3)
        }),
        2,
        TRAIN,
    );
}
