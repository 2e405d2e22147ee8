//! Readable dumps of the op graph: text (one node a line, for snapshots and `--emit graph`)
//! and Graphviz DOT (`--emit dot`). Both are deterministic: nodes in topological order.

use crate::graph::{Graph, Op};
use std::fmt::Write;

/// The attributes of an op, as written in dumps.
pub fn op_text(op: &Op) -> String {
    match op {
        Op::Conv2d(c) => {
            let mut s = format!("conv {}x{} {}->{}", c.k, c.k, c.in_c, c.out_c);
            if c.stride != 1 {
                let _ = write!(s, " stride={}", c.stride);
            }
            if c.pad != (c.k - 1) / 2 {
                let _ = write!(s, " pad={}", c.pad);
            }
            if c.groups != 1 {
                let _ = write!(s, " groups={}", c.groups);
            }
            if c.bias {
                s += " bias";
            }
            s
        }
        Op::BatchNorm { c, .. } => format!("bn {c}"),
        Op::Dropout { p } => format!("dropout p={p}"),
        Op::DropPath { survival } => format!("droppath survival={survival}"),
        Op::ZeroPadShortcut { out_c, stride } => format!("zeropad ->{out_c} stride={stride}"),
        Op::MaxPool(p) | Op::AvgPool(p) => {
            format!(
                "{} {}x{} stride={} pad={}",
                op.mnemonic(),
                p.k,
                p.k,
                p.stride,
                p.pad
            )
        }
        Op::Linear { in_f, out_f } => format!("linear {in_f}->{out_f}"),
        _ => op.mnemonic().to_string(),
    }
}

/// `%12 = conv 3x3 160->160 (%11)  : 160x32x32  # 2.body.4`
pub fn graph_text(g: &Graph) -> String {
    let mut ids = std::collections::HashMap::new();
    for (i, &n) in g.order.iter().enumerate() {
        ids.insert(n, i);
    }
    let mut s = format!(
        "graph \"{}\" input {} classes {}\n",
        g.name,
        g.input_shape(),
        g.classes
    );
    for (i, &n) in g.order.iter().enumerate() {
        let node = g.node(n);
        let args: Vec<String> = g.inputs(n).iter().map(|a| format!("%{}", ids[a])).collect();
        let _ = writeln!(
            s,
            "%{i} = {} ({}) : {}  # {}",
            op_text(&node.op),
            args.join(", "),
            node.shape,
            node.name
        );
    }
    let _ = writeln!(s, "output %{}", ids[&g.output]);
    s
}

/// Graphviz DOT, one box per op, edges labelled with the tensor shape.
pub fn dot(g: &Graph) -> String {
    let mut ids = std::collections::HashMap::new();
    for (i, &n) in g.order.iter().enumerate() {
        ids.insert(n, i);
    }
    let mut s = format!(
        "digraph \"{}\" {{\n  rankdir=TB;\n  node [shape=box, fontname=\"monospace\"];\n",
        g.name.replace('"', "'")
    );
    for (i, &n) in g.order.iter().enumerate() {
        let node = g.node(n);
        let _ = writeln!(
            s,
            "  n{i} [label=\"{}\\n{}\"];",
            op_text(&node.op),
            node.name
        );
    }
    for &n in &g.order {
        for a in g.inputs(n) {
            let _ = writeln!(
                s,
                "  n{} -> n{} [label=\"{}\"];",
                ids[&a],
                ids[&n],
                g.node(a).shape
            );
        }
    }
    s += "}\n";
    s
}
