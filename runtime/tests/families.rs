//! Whole networks built by the real front end (wrnc-grammar -> expand -> lower): tiny
//! structural networks in the style of every family are gradient-checked in f64; the smallest
//! family expressions run a training step in f32.

mod common;

use common::gradcheck;
use wrnc_grammar::{build, Source};
use wrnc_runtime::cpu::{Mode, Model};
use wrnc_runtime::init::SplitMix64;
use wrnc_runtime::loss::softmax_cross_entropy;
use wrnc_runtime::Tensor;

fn graph(text: &str) -> wrnc_compiler::graph::Graph {
    build(&Source::inline(text)).unwrap_or_else(|d| panic!("{text}\n{d:?}"))
}

#[track_caller]
fn check(name: &str, body: &str, mode: Mode) {
    let text = format!("network \"{name}\" {{ input 3x6x6 classes 3 {body} }}");
    if let Err(e) = gradcheck(graph(&text), 2, mode, 6) {
        panic!("{name}: gradient mismatch\n{e}");
    }
}

const TRAIN: Mode = Mode::Train { seed: 5, step: 3 };

#[test]
fn structural_networks_of_every_family() {
    check(
        "wrn",
        "conv(3x3, 4)
         residual { pre bn relu body conv(3x3, 6, stride=2) bn relu dropout(0.3) conv(3x3, 6) shortcut proj }
         residual { body bn relu conv(3x3, 6) bn relu conv(3x3, 6) }
         bn relu gap fc",
        TRAIN,
    );
    check(
        "resnet",
        "conv(3x3, 4) bn relu
         residual { body conv(3x3, 4) bn relu conv(3x3, 4) bn post relu }
         residual { body conv(3x3, 6, stride=2) bn relu conv(3x3, 6) bn shortcut zeropad post relu }
         gap fc",
        TRAIN,
    );
    check(
        "preresnet-bottleneck",
        "conv(3x3, 4)
         residual { pre bn relu body conv(1x1, 2) bn relu conv(3x3, 2, stride=2) bn relu conv(1x1, 8) shortcut proj }
         bn relu gap fc",
        TRAIN,
    );
    check(
        "resnext",
        "conv(3x3, 4) bn relu
         residual { body conv(1x1, 4) bn relu conv(3x3, 4, groups=2) bn relu conv(1x1, 8) bn shortcut projbn post relu }
         gap fc",
        TRAIN,
    );
    check(
        "densenet",
        "conv(3x3, 4)
         dense { bn relu conv(1x1, 4) bn relu conv(3x3, 2) }
         dense { bn relu conv(3x3, 2) }
         bn relu conv(1x1, 4) avgpool(2x2)
         bn relu gap fc",
        TRAIN,
    );
    check(
        "pyramidnet-droppath",
        "conv(3x3, 4) bn
         residual { body bn conv(3x3, 5) bn relu conv(3x3, 5) bn shortcut zeropad survival 0.5 }
         residual { body bn conv(3x3, 6, stride=2) bn relu conv(3x3, 6) bn shortcut zeropad survival 0.5 }
         bn relu gap fc",
        Mode::Train { seed: 1, step: 2 },
    );
    check(
        "imagenet-stem-eval",
        "conv(3x3, 4, stride=2) bn relu maxpool(3x3, stride=2, pad=1) bn relu gap fc",
        Mode::Eval,
    );
}

/// The smallest member of each family on its data set's input: one f32 training step gives
/// finite logits, loss and gradients for every parameter, and eval runs.
#[test]
fn family_expressions_run() {
    for (expr, settings) in [
        ("WRN-10-1", "dropout 0.3"),
        ("WRN-10-1-B(3,1,3)", "stochastic_depth 0.5"),
        ("ResNet-8", ""),
        ("PreResNet-8", ""),
        ("ResNeXt-11-2x4d", ""),
        ("DenseNet-BC-10-4", "dropout 0.2"),
        ("PyramidNet-8-8", "stochastic_depth 0.5"),
    ] {
        let g = graph(&format!("network {expr}\n{settings}"));
        let s = g.input_shape();
        let classes = g.classes as usize;
        let mut m = Model::<f32>::new(g, 1).unwrap_or_else(|e| panic!("{expr}: {e}"));
        let mut r = SplitMix64(3);
        let len = 2 * (s.c * s.h * s.w) as usize;
        let x = Tensor::from_vec(
            &[2, s.c as usize, s.h as usize, s.w as usize],
            (0..len).map(|_| r.normal() as f32).collect(),
        );
        let (logits, tape) = m.forward(&x, Mode::Train { seed: 0, step: 0 }).unwrap();
        assert_eq!(logits.shape, [2, classes], "{expr}");
        let out = softmax_cross_entropy(&logits, &[0, 1], 0.1).unwrap();
        assert!(out.loss.is_finite(), "{expr}: loss {}", out.loss);
        let grads = m.backward(tape, &out.dlogits).unwrap();
        assert_eq!(grads.len(), m.params.len());
        let norm: f64 = grads
            .values()
            .flat_map(|t| &t.data)
            .map(|&v| (v as f64).powi(2))
            .sum();
        assert!(
            norm.is_finite() && norm > 0.0,
            "{expr}: gradient norm {norm}"
        );
        assert!(
            m.infer(&x).unwrap().data.iter().all(|v| v.is_finite()),
            "{expr}"
        );
    }
}
