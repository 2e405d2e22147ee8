//! The AST back to wrnc text: canonical, deterministic, indented by 2 spaces.
//!
//! Invariants:
//! - The output parses (with `wrnc-grammar`) to an AST equal to the input, spans aside, for
//!   every AST the parser can produce. Outside that set: NaN and infinities have no literal in
//!   the language (they print as Rust writes them, which does not parse), and an empty
//!   `repeat` body prints but is refused by the parser.
//! - Reals are printed with Rust's `{}` for `f64`, the shortest text that reads back to the
//!   same bits.
//! - The same AST always prints to the same text: layout depends only on the AST.
//!
//! Layout: runs of simple layers (`conv`, `bn`, `relu`, `dropout`, pools, `gap`, `fc`) share a
//! line; `residual`, `dense` and `repeat` start a block on their own line. A `residual`'s
//! sections (`pre`, `body`, `post`) keep their layers on the section's line when they are all
//! simple, else they list them on the lines below, one level deeper. Settings come in a fixed
//! order, the training recipe in a `train { .. }` block.

use crate::ast::*;
use std::fmt::Write as _;

const INDENT: &str = "  ";

/// A whole file: `network ..` and the settings that are set, in the canonical order
/// (dataset, dropout, shortcut, stochastic_depth, classes, batch, precision, seed, then
/// `train { epochs lr schedule momentum nesterov weight_decay label_smoothing }`).
pub fn print_file(file: &NetFile) -> String {
    let mut out = match &file.network {
        NetworkSpec::Family(f) => format!("network {}\n", family_expr(f)),
        NetworkSpec::Structural(s) => print_structural(s),
    };
    let s = &file.settings;
    let mut top = Vec::new();
    if let Some(d) = &s.dataset {
        top.push(format!("dataset {}", d.value.name()));
    }
    if let Some(v) = &s.dropout {
        top.push(format!("dropout {}", v.value));
    }
    if let Some(v) = &s.shortcut {
        top.push(format!("shortcut {}", v.value.name()));
    }
    if let Some(v) = &s.stochastic_depth {
        top.push(format!("stochastic_depth {}", v.value));
    }
    if let Some(v) = &s.classes {
        top.push(format!("classes {}", v.value));
    }
    if let Some(v) = &s.batch {
        top.push(format!("batch {}", v.value));
    }
    if let Some(v) = &s.precision {
        top.push(format!("precision {}", v.value.name()));
    }
    if let Some(v) = &s.seed {
        top.push(format!("seed {}", v.value));
    }
    let mut train = Vec::new();
    if let Some(v) = &s.epochs {
        train.push(format!("epochs {}", v.value));
    }
    if let Some(v) = &s.lr {
        train.push(format!("lr {}", v.value));
    }
    if let Some(v) = &s.schedule {
        train.push(format!("schedule {}", schedule(&v.value)));
    }
    if let Some(v) = &s.momentum {
        train.push(format!("momentum {}", v.value));
    }
    if let Some(v) = &s.nesterov {
        train.push(format!("nesterov {}", v.value));
    }
    if let Some(v) = &s.weight_decay {
        train.push(format!("weight_decay {}", v.value));
    }
    if let Some(v) = &s.label_smoothing {
        train.push(format!("label_smoothing {}", v.value));
    }
    for line in top {
        out += &line;
        out.push('\n');
    }
    if !train.is_empty() {
        out += "train {\n";
        for line in train {
            let _ = writeln!(out, "{INDENT}{line}");
        }
        out += "}\n";
    }
    out
}

/// A structural network as a complete file: `network ["name"] { input .. classes .. layers }`.
pub fn print_structural(net: &Structural) -> String {
    let mut out = String::from("network ");
    if let Some(name) = &net.name {
        out += &quote(name);
        out.push(' ');
    }
    out += "{\n";
    if let Some(i) = &net.input {
        let [c, h, w] = i.value;
        let _ = writeln!(out, "{INDENT}input {c}x{h}x{w}");
    }
    if let Some(c) = &net.classes {
        let _ = writeln!(out, "{INDENT}classes {}", c.value);
    }
    layers(&mut out, &net.body, 1);
    out += "}\n";
    out
}

/// A family expression, e.g. `WRN-28-10-B(3,3)@cifar10`.
pub fn family_expr(f: &FamilySpec) -> String {
    let mut s = match &f.family {
        Family::Wrn { depth, k, kernels } => {
            let mut s = format!("WRN-{}-{}", depth.value, k.value);
            if let Some(ks) = kernels {
                let list: Vec<String> = ks.value.iter().map(|k| k.value.to_string()).collect();
                let _ = write!(s, "-B({})", list.join(","));
            }
            s
        }
        Family::ResNet { depth } => format!("ResNet-{}", depth.value),
        Family::PreResNet { depth } => format!("PreResNet-{}", depth.value),
        Family::ResNeXt {
            depth,
            cardinality,
            width,
        } => format!(
            "ResNeXt-{}-{}x{}d",
            depth.value, cardinality.value, width.value
        ),
        Family::DenseNet { bc, depth, growth } => {
            let mut s = String::from(if *bc { "DenseNet-BC-" } else { "DenseNet-" });
            let _ = write!(s, "{}", depth.value);
            if let Some(g) = growth {
                let _ = write!(s, "-{}", g.value);
            }
            s
        }
        Family::PyramidNet {
            depth,
            alpha,
            bottleneck,
        } => {
            let mut s = format!("PyramidNet-{}-{}", depth.value, alpha.value);
            if *bottleneck {
                s += "-bottleneck";
            }
            s
        }
    };
    if let Some(d) = &f.dataset {
        let _ = write!(s, "@{}", d.value.name());
    }
    s
}

/// `step(0.3, 0.6; gamma 0.2)`, `cosine`, `onecycle`.
fn schedule(s: &Schedule) -> String {
    match s {
        Schedule::Step { at, gamma } => {
            let list: Vec<String> = at.iter().map(|x| x.to_string()).collect();
            format!("step({}; gamma {gamma})", list.join(", "))
        }
        Schedule::Cosine => "cosine".into(),
        Schedule::OneCycle => "onecycle".into(),
    }
}

/// A quoted name: `"` and `\` escaped with `\`.
fn quote(name: &str) -> String {
    let mut s = String::from("\"");
    for c in name.chars() {
        if c == '"' || c == '\\' {
            s.push('\\');
        }
        s.push(c);
    }
    s.push('"');
    s
}

/// The text of a simple layer, or `None` for a block (`residual`, `dense`, `repeat`).
fn simple(l: &Layer) -> Option<String> {
    Some(match &l.kind {
        LayerKind::Conv {
            k,
            out,
            stride,
            pad,
            groups,
            bias,
        } => {
            let mut s = format!("conv({k}x{k}, {out}");
            if *stride != 1 {
                let _ = write!(s, ", stride={stride}");
            }
            if let Some(p) = pad {
                let _ = write!(s, ", pad={p}");
            }
            if *groups != 1 {
                let _ = write!(s, ", groups={groups}");
            }
            if *bias {
                s += ", bias";
            }
            s + ")"
        }
        LayerKind::Bn => "bn".into(),
        LayerKind::Relu => "relu".into(),
        LayerKind::Dropout { p } => format!("dropout({p})"),
        LayerKind::MaxPool { k, stride, pad } => pool("maxpool", *k, *stride, *pad),
        LayerKind::AvgPool { k, stride, pad } => pool("avgpool", *k, *stride, *pad),
        LayerKind::GlobalAvgPool => "gap".into(),
        LayerKind::Fc { out: None } => "fc".into(),
        LayerKind::Fc { out: Some(n) } => format!("fc({n})"),
        LayerKind::Residual(_) | LayerKind::Dense(_) | LayerKind::Repeat { .. } => return None,
    })
}

fn pool(name: &str, k: u64, stride: u64, pad: u64) -> String {
    let mut s = format!("{name}({k}x{k}");
    if stride != k {
        let _ = write!(s, ", stride={stride}");
    }
    if pad != 0 {
        let _ = write!(s, ", pad={pad}");
    }
    s + ")"
}

/// Writes `ls` at `depth` levels of indentation: simple runs on one line, blocks on their own.
fn layers(out: &mut String, ls: &[Layer], depth: usize) {
    let ind = INDENT.repeat(depth);
    let mut run: Vec<String> = Vec::new();
    let flush = |out: &mut String, run: &mut Vec<String>| {
        if !run.is_empty() {
            let _ = writeln!(out, "{ind}{}", run.join(" "));
            run.clear();
        }
    };
    for l in ls {
        if let Some(s) = simple(l) {
            run.push(s);
            continue;
        }
        flush(out, &mut run);
        match &l.kind {
            LayerKind::Dense(body) => {
                let _ = writeln!(out, "{ind}dense {{");
                layers(out, body, depth + 1);
                let _ = writeln!(out, "{ind}}}");
            }
            LayerKind::Repeat { count, body } => {
                let _ = writeln!(out, "{ind}repeat {} {{", count.value);
                layers(out, body, depth + 1);
                let _ = writeln!(out, "{ind}}}");
            }
            LayerKind::Residual(r) => {
                let _ = writeln!(out, "{ind}residual {{");
                let inner = INDENT.repeat(depth + 1);
                if !r.pre.is_empty() {
                    section(out, "pre", &r.pre, depth + 1);
                }
                section(out, "body", &r.body, depth + 1);
                if r.shortcut != ShortcutKind::Identity {
                    let _ = writeln!(out, "{inner}shortcut {}", r.shortcut.name());
                }
                if !r.post.is_empty() {
                    section(out, "post", &r.post, depth + 1);
                }
                if let Some(p) = r.survival {
                    let _ = writeln!(out, "{inner}survival {p}");
                }
                let _ = writeln!(out, "{ind}}}");
            }
            _ => {}
        }
    }
    flush(out, &mut run);
}

/// `body bn relu conv(3x3, 16)` on one line when every layer is simple; else the keyword alone
/// and the layers below it, one level deeper.
fn section(out: &mut String, name: &str, ls: &[Layer], depth: usize) {
    let ind = INDENT.repeat(depth);
    let simples: Option<Vec<String>> = ls.iter().map(simple).collect();
    match simples {
        Some(v) if v.is_empty() => {
            let _ = writeln!(out, "{ind}{name}");
        }
        Some(v) => {
            let _ = writeln!(out, "{ind}{name} {}", v.join(" "));
        }
        None => {
            let _ = writeln!(out, "{ind}{name}");
            layers(out, ls, depth + 1);
        }
    }
}
