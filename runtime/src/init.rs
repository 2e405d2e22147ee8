//! Parameter initialisation, deterministic from a seed.
//!
//! - Convolution and linear weights ([`ParamKind::Weight`]): He / Kaiming normal, fan-out mode
//!   (torchvision's ResNet init): `N(0, 2 / fan_out)`, `fan_out = shape[0] * prod(shape[2..])`.
//! - Biases and BN beta: 0. BN gamma: 1.
//! - Buffers: `running_mean` 0, `running_var` 1.
//!
//! Each tensor draws from its own stream (splitmix64 seeded by the seed and the FNV-1a hash of
//! the parameter's full name, Box-Muller for normals), so a tensor's values depend only on
//! `(seed, name, shape)`: adding a layer elsewhere does not change the others.

use std::collections::BTreeMap;

use wrnc_compiler::graph::{Graph, ParamKind, ParamSpec};

use crate::ops::Float;
use crate::tensor::Tensor;

/// splitmix64: a small, well-mixed 64-bit generator.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in (0, 1] (never 0, so `ln` is finite).
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64)
    }
    /// Standard normal (Box-Muller, one value per call).
    pub fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// FNV-1a (64-bit).
fn fnv64(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The generator for one named tensor.
pub fn stream(seed: u64, name: &str) -> SplitMix64 {
    let mut g = SplitMix64(seed ^ fnv64(name));
    g.next_u64();
    g
}

/// Standard deviation of the He fan-out init for a weight of this shape.
pub fn he_std(shape: &[usize]) -> f64 {
    let fan_out: usize =
        shape.first().copied().unwrap_or(1) * shape.iter().skip(2).product::<usize>();
    (2.0 / fan_out.max(1) as f64).sqrt()
}

/// The initial value of one parameter.
pub fn init_param<T: Float>(name: &str, spec: &ParamSpec, seed: u64) -> Tensor<T> {
    let len: usize = spec.shape.iter().product();
    let data = match spec.kind {
        ParamKind::Weight => {
            let std = he_std(&spec.shape);
            let mut g = stream(seed, name);
            (0..len).map(|_| T::from_f64(g.normal() * std)).collect()
        }
        ParamKind::Bias | ParamKind::BnBias => vec![T::ZERO; len],
        ParamKind::BnWeight => vec![T::ONE; len],
    };
    Tensor::from_vec(&spec.shape, data)
}

/// Every parameter of the graph, keyed by full name.
pub fn init_params<T: Float>(graph: &Graph, seed: u64) -> BTreeMap<String, Tensor<T>> {
    graph
        .params()
        .into_iter()
        .map(|(name, spec)| {
            let t = init_param(&name, &spec, seed);
            (name, t)
        })
        .collect()
}

/// Every buffer of the graph (`running_mean` 0, `running_var` 1), keyed by full name.
pub fn init_buffers<T: Float>(graph: &Graph) -> BTreeMap<String, Tensor<T>> {
    graph
        .buffers()
        .into_iter()
        .map(|(name, len)| {
            let v = if name.ends_with(".running_var") {
                T::ONE
            } else {
                T::ZERO
            };
            (name, Tensor::from_vec(&[len], vec![v; len]))
        })
        .collect()
}
