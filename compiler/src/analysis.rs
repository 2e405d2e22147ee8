//! Counts read off a graph: parameters, multiply-accumulates, layers, activation memory.

use crate::graph::{Graph, Op, Shape};
use serde::Serialize;

/// What `wrnc info` prints.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Info {
    pub name: String,
    /// Per-image input shape (C, H, W).
    pub input: [u32; 3],
    pub classes: u32,
    /// Trainable parameters: conv and linear weights, linear (and conv) biases, BN gamma and
    /// beta. BN running statistics are not counted.
    pub params: u64,
    /// Multiply-accumulates per image, forward: convolutions and linear layers.
    pub macs: u64,
    pub conv_layers: u32,
    pub linear_layers: u32,
    pub bn_layers: u32,
    /// Nodes in the op graph (input included).
    pub nodes: u32,
    /// The batch the memory figure is for.
    pub batch: u32,
    /// Bytes of every op's output for the batch in fp32: what an unfused framework keeps
    /// for backward in a training step.
    pub activation_bytes: u64,
}

pub fn conv_macs(c: &crate::graph::Conv2d, out: Shape) -> u64 {
    out.numel() * (c.in_c / c.groups) as u64 * (c.k * c.k) as u64
}

pub fn info(g: &Graph, batch: u32) -> Info {
    let mut i = Info {
        name: g.name.clone(),
        input: {
            let s = g.input_shape();
            [s.c, s.h, s.w]
        },
        classes: g.classes,
        params: 0,
        macs: 0,
        conv_layers: 0,
        linear_layers: 0,
        bn_layers: 0,
        nodes: g.order.len() as u32,
        batch,
        activation_bytes: 0,
    };
    for &n in &g.order {
        let node = g.node(n);
        for p in node.op.params() {
            i.params += p.shape.iter().map(|&d| d as u64).product::<u64>();
        }
        match &node.op {
            Op::Conv2d(c) => {
                i.conv_layers += 1;
                i.macs += conv_macs(c, node.shape);
            }
            Op::Linear { in_f, out_f } => {
                i.linear_layers += 1;
                i.macs += *in_f as u64 * *out_f as u64;
            }
            Op::BatchNorm { .. } => i.bn_layers += 1,
            _ => {}
        }
        // (saturating: the grammar's limits allow a network and batch whose total passes 2^64
        // bytes, which is then shown as the largest figure, never wrapped round)
        i.activation_bytes = i.activation_bytes.saturating_add(
            node.shape
                .numel()
                .saturating_mul(batch as u64)
                .saturating_mul(4),
        );
    }
    i
}

/// `36479194` -> `36.5M`, `5248000000` -> `5.25G`.
pub fn human(n: u64) -> String {
    let f = n as f64;
    if f >= 1e9 {
        format!("{:.2}G", f / 1e9)
    } else if f >= 1e6 {
        format!("{:.1}M", f / 1e6)
    } else if f >= 1e3 {
        format!("{:.1}K", f / 1e3)
    } else {
        n.to_string()
    }
}

/// Bytes in binary units: `1.50 GiB`.
pub fn human_bytes(n: u64) -> String {
    let f = n as f64;
    if n == u64::MAX {
        "16 EiB or more".to_string()
    } else if f >= (1u64 << 50) as f64 {
        format!("{:.2} PiB", f / (1u64 << 50) as f64)
    } else if f >= (1u64 << 40) as f64 {
        format!("{:.2} TiB", f / (1u64 << 40) as f64)
    } else if f >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", f / (1u64 << 30) as f64)
    } else if f >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", f / (1u64 << 20) as f64)
    } else if f >= 1024.0 {
        format!("{:.1} KiB", f / 1024.0)
    } else {
        format!("{n} B")
    }
}
