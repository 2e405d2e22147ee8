//! The training loop: exact resumption after an interruption, and a NaN loss that stops
//! training while keeping the last good checkpoint.

use wrnc_compiler::ast::Schedule;
use wrnc_runtime::checkpoint;
use wrnc_runtime::cpu::Model;
use wrnc_runtime::data::{Dataset, Normalization};
use wrnc_runtime::train::{train, TrainConfig, TrainError};

const NET: &str = r#"network "tiny" {
  input 3x8x8
  classes 3
  conv(3x3, 8)
  residual { pre bn relu body conv(3x3, 8) bn relu dropout(0.2) conv(3x3, 8) shortcut proj }
  bn relu gap fc
}"#;

fn graph() -> wrnc_compiler::graph::Graph {
    wrnc_grammar::build(&wrnc_grammar::Source::inline(NET)).unwrap()
}

/// 48 images in 3 classes: class c is brighter in channel c.
fn data() -> Dataset {
    let (n, c, h, w) = (48, 3, 8, 8);
    let mut images = vec![0u8; n * c * h * w];
    let mut labels = vec![];
    for i in 0..n {
        let label = i % 3;
        labels.push(label as u16);
        for ch in 0..c {
            for p in 0..h * w {
                let noise = ((i * 31 + ch * 17 + p * 7) % 50) as u8;
                let base = if ch == label { 150 } else { 60 };
                images[((i * c + ch) * h * w) + p] = base + noise;
            }
        }
    }
    Dataset {
        images,
        labels,
        n,
        c,
        h,
        w,
        classes: 3,
        class_names: vec!["a".into(), "b".into(), "c".into()],
    }
}

fn config(dir: &std::path::Path) -> TrainConfig {
    TrainConfig {
        net: "tiny".into(),
        epochs: 3,
        batch: 10, // 5 steps an epoch, the last one short
        lr: 0.05,
        schedule: Schedule::Step {
            at: vec![0.5],
            gamma: 0.2,
        },
        momentum: 0.9,
        nesterov: true,
        weight_decay: 5e-4,
        label_smoothing: 0.0,
        seed: 7,
        augment: true,
        normalization: Normalization::identity(3),
        checkpoint: Some(dir.to_path_buf()),
        resume: false,
        metrics: None,
        max_steps: None,
        eval_batch: 16,
    }
}

#[test]
fn interrupted_and_resumed_equals_uninterrupted() {
    let ds = data();
    let a = tempfile::tempdir().unwrap();
    let mut m1: Model = Model::new(graph(), 7).unwrap();
    let r1 = train(&mut m1, &ds, Some(&ds), &config(a.path()), &mut |_| {}).unwrap();
    assert_eq!(r1.steps, 15);
    assert_eq!(r1.epochs.len(), 3);

    // Stopped in the middle of epoch 2, then resumed by a fresh process (a new model).
    let b = tempfile::tempdir().unwrap();
    let mut cfg = config(b.path());
    cfg.max_steps = Some(7);
    let mut m2: Model = Model::new(graph(), 7).unwrap();
    let r2 = train(&mut m2, &ds, Some(&ds), &cfg, &mut |_| {}).unwrap();
    assert!(r2.stopped_early);
    assert_eq!(r2.steps, 7);
    cfg.max_steps = None;
    cfg.resume = true;
    let mut m3: Model = Model::new(graph(), 999).unwrap(); // different init: the checkpoint must win
    let r3 = train(&mut m3, &ds, Some(&ds), &cfg, &mut |_| {}).unwrap();
    assert_eq!(r3.steps, 15);
    assert_eq!(
        m3.params, m1.params,
        "resumed weights differ from the uninterrupted run"
    );
    assert_eq!(m3.buffers, m1.buffers, "resumed BN statistics differ");
    // The resumed run reports epoch 2 whole (its first half ran before the interruption).
    let e2_1 = &r1.epochs[1];
    let e2_3 = &r3.epochs[0];
    assert_eq!(e2_3.epoch, 2);
    assert!((e2_1.train_loss - e2_3.train_loss).abs() < 1e-9);
    // Learning happened: the loss fell.
    assert!(r1.epochs[2].train_loss < r1.epochs[0].train_loss);
}

#[test]
fn nan_stops_training_and_keeps_the_last_good_checkpoint() {
    let ds = data();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.epochs = 1;
    let mut m: Model = Model::new(graph(), 7).unwrap();
    train(&mut m, &ds, None, &cfg, &mut |_| {}).unwrap();
    let good = checkpoint::load(dir.path()).unwrap();
    assert_eq!(good.meta.epoch, 1);

    // Poison a weight: the next step's loss is NaN.
    m.params.get_mut("5.weight").unwrap().data[0] = f32::NAN;
    cfg.epochs = 2;
    let err = train(&mut m, &ds, None, &cfg, &mut |_| {}).unwrap_err();
    match &err {
        TrainError::Diverged { loss, .. } => assert!(!loss.is_finite()),
        e => panic!("expected Diverged, got {e}"),
    }
    assert!(err.to_string().contains("last good checkpoint"), "{err}");
    let after = checkpoint::load(dir.path()).unwrap();
    assert_eq!(after, good, "the checkpoint on disk changed");
    assert!(after
        .tensors
        .values()
        .all(|t| t.data.iter().all(|v| v.is_finite())));
}
