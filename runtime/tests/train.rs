//! A tiny network learns a synthetic, separable task: loss falls and held-out accuracy beats
//! chance within a few dozen SGD steps.

mod common;

use common::B;
use wrnc_compiler::ast::Schedule;
use wrnc_runtime::cpu::{Mode, Model};
use wrnc_runtime::init::SplitMix64;
use wrnc_runtime::loss::softmax_cross_entropy;
use wrnc_runtime::optim::{lr_at, Sgd};
use wrnc_runtime::Tensor;

const S: usize = 8;

/// Class 0: horizontal stripes, 1: vertical stripes, 2: checkerboard; random phase, contrast
/// and Gaussian noise, 2 channels.
fn batch(g: &mut SplitMix64, n: usize) -> (Tensor<f32>, Vec<u32>) {
    let mut x = Vec::with_capacity(n * 2 * S * S);
    let mut labels = Vec::with_capacity(n);
    for _ in 0..n {
        let label = (g.next_u64() % 3) as u32;
        let phase = (g.next_u64() % 2) as usize;
        let amp = 0.5 + g.uniform();
        for _c in 0..2 {
            for y in 0..S {
                for xx in 0..S {
                    let on = match label {
                        0 => (y + phase) % 2,
                        1 => (xx + phase) % 2,
                        _ => (y + xx + phase) % 2,
                    };
                    x.push((amp * (on as f64 - 0.5) + 0.4 * g.normal()) as f32);
                }
            }
        }
        labels.push(label);
    }
    (Tensor::from_vec(&[n, 2, S, S], x), labels)
}

#[test]
fn tiny_net_learns() {
    let (mut b, x) = B::new(2, S as u32, S as u32);
    let y = b.conv(x, 8, 3, 1);
    let y = b.bn_relu(y);
    let y = b.preact_block(y, Some(0.1));
    let y = b.preact_head(y, 3);
    let mut model = Model::<f32>::new(b.finish(y), 42).unwrap();
    let mut opt = Sgd::new(0.9, true, 5e-4);
    let mut data = SplitMix64(7);
    let schedule = Schedule::Cosine;
    let steps = 40;
    let mut losses = Vec::new();
    for step in 0..steps {
        let (x, labels) = batch(&mut data, 16);
        let (logits, tape) = model.forward(&x, Mode::Train { seed: 1, step }).unwrap();
        let out = softmax_cross_entropy(&logits, &labels, 0.0).unwrap();
        assert!(out.loss.is_finite(), "step {step}: loss {}", out.loss);
        losses.push(out.loss);
        let grads = model.backward(tape, &out.dlogits).unwrap();
        let lr = lr_at(&schedule, 0.05, 0, step as u64, steps as u64, 1);
        opt.step(&mut model.params, &grads, lr).unwrap();
    }
    let first = losses[..5].iter().sum::<f64>() / 5.0;
    let last = losses[steps as usize - 5..].iter().sum::<f64>() / 5.0;
    assert!(
        last < 0.6 * first,
        "loss {first:.3} -> {last:.3}: {losses:?}"
    );

    let (x, labels) = batch(&mut SplitMix64(99), 60);
    let logits = model.infer(&x).unwrap();
    let out = softmax_cross_entropy(&logits, &labels, 0.0).unwrap();
    let acc = out.correct as f64 / labels.len() as f64;
    eprintln!("loss {first:.3} -> {last:.3}, held-out accuracy {acc:.2}");
    assert!(
        acc > 0.7,
        "held-out accuracy {acc} (chance 0.33), losses {losses:?}"
    );
}
