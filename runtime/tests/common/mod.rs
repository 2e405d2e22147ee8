//! Shared test support: a small graph builder and the finite-difference gradient check.
#![allow(dead_code)]

pub mod nets;

use std::collections::BTreeMap;

use wrnc_compiler::graph::Graph;
use wrnc_runtime::cpu::{Mode, Model};
use wrnc_runtime::init::SplitMix64;
use wrnc_runtime::Tensor;

#[allow(unused_imports)]
pub use nets::B;

/// Normal samples from a fixed stream.
pub fn randn(g: &mut SplitMix64, shape: &[usize], std: f64) -> Tensor<f64> {
    let len = shape.iter().product();
    Tensor::from_vec(shape, (0..len).map(|_| g.normal() * std).collect())
}

/// Indices to probe in a tensor of `len` elements: all of them when few, else `max` spread
/// deterministically.
fn probes(g: &mut SplitMix64, len: usize, max: usize) -> Vec<usize> {
    if len <= max {
        (0..len).collect()
    } else {
        let mut v: Vec<usize> = (0..max)
            .map(|_| (g.next_u64() % len as u64) as usize)
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

/// `sum(logits * r)`: a scalar whose logit gradient is `r`.
fn objective(model: &mut Model<f64>, x: &Tensor<f64>, r: &Tensor<f64>, mode: Mode) -> f64 {
    let (y, _) = model.forward(x, mode).expect("forward");
    y.data.iter().zip(&r.data).map(|(a, b)| a * b).sum()
}

/// Compares analytic input and parameter gradients of `graph` (in f64, batch `n`, `mode`)
/// with central differences. Returns a description of every mismatch, or the number of
/// probed entries. Parameters that are zero-initialised (biases, BN beta) and BN gamma and
/// running statistics are randomised first so that no gradient is trivially symmetric.
pub fn gradcheck(graph: Graph, n: usize, mode: Mode, max_probes: usize) -> Result<usize, String> {
    let mut rng = SplitMix64(0x5eed ^ graph.order.len() as u64);
    let mut model = Model::<f64>::new(graph, 7).map_err(|e| e.to_string())?;
    for (name, p) in model.params.iter_mut() {
        if !name.ends_with(".weight") || p.shape.len() == 1 {
            // biases, BN gamma/beta
            for v in &mut p.data {
                *v += 0.3 * rng.normal();
            }
        }
    }
    for (name, b) in model.buffers.iter_mut() {
        for v in &mut b.data {
            *v = if name.ends_with("running_var") {
                0.5 + rng.uniform()
            } else {
                0.5 * rng.normal()
            };
        }
    }
    let s = model.graph().input_shape();
    let x = randn(
        &mut rng,
        &[n, s.c as usize, s.h as usize, s.w as usize],
        1.0,
    );
    let (y, tape) = model.forward(&x, mode).map_err(|e| e.to_string())?;
    let r = randn(&mut rng, &y.shape, 1.0);
    let grads = model.backward_full(tape, &r).map_err(|e| e.to_string())?;

    let h = 1e-6;
    let mut errors = Vec::new();
    let mut probed = 0;
    let mut max_abs: f64 = 0.0;
    let mut compare = |what: String, a: f64, num: f64| {
        max_abs = max_abs.max(a.abs()).max(num.abs());
        if (a - num).abs() > 1e-7 + 1e-5 * a.abs().max(num.abs()) {
            errors.push(format!("{what}: analytic {a:.9e} numeric {num:.9e}"));
        }
    };
    let names: Vec<String> = model.params.keys().cloned().collect();
    for name in names {
        let len = model.params[&name].data.len();
        for i in probes(&mut rng, len, max_probes) {
            let orig = model.params[&name].data[i];
            model.params.get_mut(&name).unwrap().data[i] = orig + h;
            let fp = objective(&mut model, &x, &r, mode);
            model.params.get_mut(&name).unwrap().data[i] = orig - h;
            let fm = objective(&mut model, &x, &r, mode);
            model.params.get_mut(&name).unwrap().data[i] = orig;
            compare(
                format!("{name}[{i}]"),
                grads.params[&name].data[i],
                (fp - fm) / (2.0 * h),
            );
            probed += 1;
        }
    }
    let mut xp = x.clone();
    for i in probes(&mut rng, x.data.len(), 2 * max_probes) {
        xp.data[i] = x.data[i] + h;
        let fp = objective(&mut model, &xp, &r, mode);
        xp.data[i] = x.data[i] - h;
        let fm = objective(&mut model, &xp, &r, mode);
        xp.data[i] = x.data[i];
        compare(
            format!("input[{i}]"),
            grads.input.data[i],
            (fp - fm) / (2.0 * h),
        );
        probed += 1;
    }
    if max_abs == 0.0 {
        errors.push("every gradient is zero: the check proves nothing".into());
    }
    if errors.is_empty() {
        Ok(probed)
    } else {
        Err(errors.join("\n"))
    }
}

/// Total absolute difference between two maps of tensors (same keys).
pub fn max_diff(a: &BTreeMap<String, Tensor<f32>>, b: &BTreeMap<String, Tensor<f32>>) -> f32 {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    a.iter()
        .flat_map(|(k, t)| t.data.iter().zip(&b[k].data).map(|(x, y)| (x - y).abs()))
        .fold(0.0, f32::max)
}
