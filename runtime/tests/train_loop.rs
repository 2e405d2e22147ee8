//! The training loop: exact resumption after an interruption, and a NaN loss that stops
//! training while keeping the last good checkpoint; on the CPU backend, and on a fake backend
//! that shows the loop's logic does not depend on the backend.

use std::collections::BTreeMap;

use wrnc_compiler::ast::Schedule;
use wrnc_compiler::graph::Graph;
use wrnc_runtime::checkpoint;
use wrnc_runtime::cpu::Model;
use wrnc_runtime::data::{Dataset, Normalization};
use wrnc_runtime::metrics::{self, EpochMetrics};
use wrnc_runtime::optim::lr_at;
use wrnc_runtime::train::{
    evaluate_with, train, train_with, Backend, StepAt, Tensors, TrainConfig, TrainError,
};
use wrnc_runtime::Tensor;

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

/// A pin on the CPU loop's behaviour: the metrics of a fixed 3-epoch run (augmentation,
/// dropout, step schedule, Nesterov, weight decay, a short last batch) and a digest of the
/// final weights, to 6 significant digits. Any change to the loop, the data pipeline, the
/// initialisation or an op's numerics shows up here as a snapshot diff to review.
#[test]
fn a_fixed_run_is_pinned() {
    let ds = data();
    let dir = tempfile::tempdir().unwrap();
    let mut m: Model = Model::new(graph(), 7).unwrap();
    let r = train(&mut m, &ds, Some(&ds), &config(dir.path()), &mut |_| {}).unwrap();
    let g = |v: f64| format!("{v:.6e}");
    let mut out = String::new();
    for e in &r.epochs {
        out += &format!(
            "epoch {} lr {} train loss {} acc {} test loss {} acc {}\n",
            e.epoch,
            g(e.lr),
            g(e.train_loss),
            g(e.train_acc),
            g(e.test_loss),
            g(e.test_acc)
        );
    }
    for (name, t) in m.params.iter().chain(m.buffers.iter()) {
        let sum: f64 = t.data.iter().map(|&x| x as f64).sum();
        let sq: f64 = t.data.iter().map(|&x| (x as f64) * (x as f64)).sum();
        // a sum that cancels to rounding noise (the classifier's bias) prints as 0
        let sum = if sum.abs() < 1e-6 * sq.sqrt() {
            0.0
        } else {
            sum
        };
        out += &format!("{name} {:?} sum {} sumsq {}\n", t.shape, g(sum), g(sq));
    }
    insta::assert_snapshot!(out);
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

/// A backend without a network: the logits of image `i` are `w * ((i + j) % 3) - 0.1 j` for
/// class `j`, `w` being the first value of the first weight; the update moves `w` by SGD with
/// momentum on the host's gradient; a training forward bumps the first BN statistic (as a
/// training forward updates running statistics). It records what the loop asks of it.
struct Fake {
    graph: Graph,
    params: Tensors,
    buffers: Tensors,
    momentum: Tensors,
    /// The training forward at this step gives NaN logits.
    nan_at: Option<u64>,
    /// Refuse runs whose batch is not this one (as the GPU trainer, built for one batch).
    built_for: Option<usize>,
    /// The forward awaiting its update: learning rate and `d logits / d w`.
    pending: Option<(f64, Vec<f32>)>,
    /// `(step, epoch, lr, images)` of every training forward.
    forwards: Vec<(u64, u64, f64, Vec<usize>)>,
    updates: u64,
    uploads: usize,
    prepares: usize,
    epochs_ended: usize,
    evals: usize,
}

impl Fake {
    fn new(seed: u64) -> Fake {
        let graph = graph();
        Fake {
            params: wrnc_runtime::init::init_params(&graph, seed),
            buffers: wrnc_runtime::init::init_buffers(&graph),
            graph,
            momentum: BTreeMap::new(),
            nan_at: None,
            built_for: None,
            pending: None,
            forwards: vec![],
            updates: 0,
            uploads: 0,
            prepares: 0,
            epochs_ended: 0,
            evals: 0,
        }
    }

    fn w_name(&self) -> String {
        self.params.keys().next().unwrap().clone()
    }

    /// Logits and their derivative with respect to `w`.
    fn logits(&self, idx: &[usize]) -> (Tensor, Vec<f32>) {
        let classes = self.graph.classes as usize;
        let w = self.params[&self.w_name()].data[0];
        let (mut z, mut dz) = (vec![], vec![]);
        for &i in idx {
            for j in 0..classes {
                let c = ((i + j) % 3) as f32;
                z.push(w * c - 0.1 * j as f32);
                dz.push(c);
            }
        }
        (Tensor::from_vec(&[idx.len(), classes], z), dz)
    }
}

impl Backend for Fake {
    type Error = TrainError;
    /// The data set's size, to show the loop passes each set's upload back.
    type Data = usize;

    fn graph(&self) -> &Graph {
        &self.graph
    }

    fn check(&self, cfg: &TrainConfig) -> Result<(), TrainError> {
        match self.built_for {
            Some(b) if b != cfg.batch => Err(TrainError::Config(format!(
                "built for batch {b}, asked for {}",
                cfg.batch
            ))),
            _ => Ok(()),
        }
    }

    fn load_state(&mut self, p: Tensors, b: Tensors, m: Tensors) -> Result<(), TrainError> {
        (self.params, self.buffers, self.momentum) = (p, b, m);
        Ok(())
    }

    fn export_state(&self, _step: u64) -> Result<(Tensors, Tensors), TrainError> {
        let mut t = self.params.clone();
        t.extend(self.buffers.clone());
        Ok((t, self.momentum.clone()))
    }

    fn upload(&mut self, ds: &Dataset, _norm: &Normalization) -> Result<usize, TrainError> {
        self.uploads += 1;
        Ok(ds.n)
    }

    fn prepare(&mut self, _train: &Dataset, _cfg: &TrainConfig) -> Result<(), TrainError> {
        self.prepares += 1;
        Ok(())
    }

    fn train_forward(
        &mut self,
        data: &usize,
        ds: &Dataset,
        idx: &[usize],
        at: StepAt,
        _cfg: &TrainConfig,
    ) -> Result<Tensor, TrainError> {
        assert_eq!(*data, ds.n, "the loop passed another set's upload");
        self.forwards.push((at.step, at.epoch, at.lr, idx.to_vec()));
        let bn = self.buffers.keys().next().unwrap().clone();
        self.buffers.get_mut(&bn).unwrap().data[0] += 1.0;
        let (mut z, dz) = self.logits(idx);
        if self.nan_at == Some(at.step) {
            z.data[0] = f32::NAN;
        }
        self.pending = Some((at.lr, dz));
        Ok(z)
    }

    fn apply_update(&mut self, dlogits: &Tensor) -> Result<(), TrainError> {
        let (lr, dz) = self.pending.take().expect("a forward before every update");
        let g: f32 = dlogits.data.iter().zip(&dz).map(|(a, b)| a * b).sum();
        let name = self.w_name();
        let m = self
            .momentum
            .entry(name.clone())
            .or_insert_with(|| Tensor::from_vec(&[1], vec![0.0]));
        m.data[0] = 0.9 * m.data[0] + g;
        let step = lr as f32 * m.data[0];
        self.params.get_mut(&name).unwrap().data[0] -= step;
        self.updates += 1;
        Ok(())
    }

    fn end_epoch(&mut self) -> Result<(), TrainError> {
        self.epochs_ended += 1;
        Ok(())
    }

    fn begin_eval(&mut self) -> Result<(), TrainError> {
        self.evals += 1;
        Ok(())
    }

    fn infer(
        &mut self,
        data: &usize,
        ds: &Dataset,
        idx: &[usize],
        _norm: &Normalization,
    ) -> Result<Tensor, TrainError> {
        assert_eq!(*data, ds.n, "the loop passed another set's upload");
        Ok(self.logits(idx).0)
    }
}

/// Asserts that two runs' epochs agree in every number that does not depend on timing (to
/// the last few bits: a metrics file and a checkpoint's partial-epoch sums go through JSON).
fn assert_same_epochs(a: &[EpochMetrics], b: &[EpochMetrics]) {
    let numbers = |m: &EpochMetrics| [m.train_loss, m.train_acc, m.test_loss, m.test_acc, m.lr];
    assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.epoch, y.epoch);
        for (u, v) in numbers(x).into_iter().zip(numbers(y)) {
            assert!((u - v).abs() <= 1e-12 * u.abs().max(1.0), "{x:?} vs {y:?}");
        }
    }
}

#[test]
fn fake_backend_resumes_exactly_and_writes_whole_epoch_metrics() {
    let ds = data();
    let a = tempfile::tempdir().unwrap();
    let mut cfg = config(a.path());
    cfg.metrics = Some(a.path().join("metrics.jsonl"));
    let mut f1 = Fake::new(7);
    let r1 = train_with(&mut f1, &ds, Some(&ds), &cfg, &mut |_| {}).unwrap();
    assert_eq!(
        (r1.steps, r1.epochs.len(), r1.stopped_early),
        (15, 3, false)
    );
    assert_eq!((f1.uploads, f1.prepares), (2, 1));
    assert_eq!((f1.updates, f1.epochs_ended, f1.evals), (15, 3, 3));
    assert_ne!(f1.params, Fake::new(7).params, "training changed nothing");
    // The loop drives the backend: every epoch a permutation of the images, in batches of
    // 10 (the last short), at the schedule's learning rate, with consecutive step numbers.
    for (e, epoch) in f1.forwards.chunks(5).enumerate() {
        let mut seen: Vec<usize> = epoch.iter().flat_map(|f| f.3.clone()).collect();
        assert_eq!(epoch[4].3.len(), 8);
        seen.sort();
        assert_eq!(seen, (0..48).collect::<Vec<_>>());
        for (b, f) in epoch.iter().enumerate() {
            assert_eq!((f.0, f.1), ((e * 5 + b) as u64, e as u64));
            assert_eq!(f.2, lr_at(&cfg.schedule, cfg.lr, e as u64, b as u64, 5, 3));
        }
    }
    let lines = metrics::read(cfg.metrics.as_ref().unwrap()).unwrap();
    assert_same_epochs(&lines, &r1.epochs);
    // The eval numbers come from the backend's logits through the same loop.
    let (loss, acc) =
        evaluate_with(&mut f1, &48, &ds, &cfg.normalization, 16, &mut |_| {}).unwrap();
    assert_eq!((loss, acc), (r1.epochs[2].test_loss, r1.epochs[2].test_acc));

    // Stopped in the middle of epoch 2, then resumed by a fresh backend with other weights.
    let b = tempfile::tempdir().unwrap();
    let mut cfg = config(b.path());
    cfg.metrics = Some(b.path().join("metrics.jsonl"));
    cfg.max_steps = Some(7);
    let mut f2 = Fake::new(7);
    let r2 = train_with(&mut f2, &ds, Some(&ds), &cfg, &mut |_| {}).unwrap();
    assert!(r2.stopped_early);
    assert_eq!((r2.steps, f2.updates), (7, 7));
    assert_eq!(
        metrics::read(cfg.metrics.as_ref().unwrap()).unwrap().len(),
        1
    );
    let ck = checkpoint::load(b.path()).unwrap();
    assert_eq!(
        (ck.meta.epoch, ck.meta.step, ck.meta.batch_in_epoch),
        (1, 7, 2)
    );
    cfg.max_steps = None;
    cfg.resume = true;
    let mut f3 = Fake::new(999);
    let r3 = train_with(&mut f3, &ds, Some(&ds), &cfg, &mut |_| {}).unwrap();
    assert_eq!(r3.steps, 15);
    assert_eq!(
        f3.forwards,
        f1.forwards[7..],
        "the resumed run asked for other steps"
    );
    assert_eq!(f3.params, f1.params, "resumed weights differ");
    assert_eq!(f3.buffers, f1.buffers, "resumed BN statistics differ");
    assert_eq!(f3.momentum, f1.momentum, "resumed momentum differs");
    // The metrics file holds each epoch once, epoch 2 whole across the interruption.
    let resumed = metrics::read(cfg.metrics.as_ref().unwrap()).unwrap();
    assert_same_epochs(&resumed, &lines);
    // and the checkpoints agree
    let (c1, c3) = (
        checkpoint::load(a.path()).unwrap(),
        checkpoint::load(b.path()).unwrap(),
    );
    assert_eq!(c1, c3);
}

#[test]
fn fake_backend_nan_stops_before_the_update_and_keeps_the_last_good_checkpoint() {
    let ds = data();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.metrics = Some(dir.path().join("metrics.jsonl"));
    let mut f = Fake::new(7);
    f.nan_at = Some(7); // in epoch 2, after the checkpoint of epoch 1
    let err = train_with(&mut f, &ds, Some(&ds), &cfg, &mut |_| {}).unwrap_err();
    match &err {
        TrainError::Diverged {
            loss, epoch, step, ..
        } => {
            assert!(!loss.is_finite());
            assert_eq!((*epoch, *step), (2, 7));
        }
        e => panic!("expected Diverged, got {e}"),
    }
    assert!(err.to_string().contains("last good checkpoint"), "{err}");
    assert_eq!(f.updates, 7, "the bad step was applied");
    let ck = checkpoint::load(dir.path()).unwrap();
    assert_eq!((ck.meta.epoch, ck.meta.step), (1, 5));
    assert_eq!(
        metrics::read(cfg.metrics.as_ref().unwrap()).unwrap().len(),
        1
    );

    // Resuming from the kept checkpoint (the NaN gone) replays the run from epoch 2.
    cfg.resume = true;
    let mut g = Fake::new(1);
    let r = train_with(&mut g, &ds, Some(&ds), &cfg, &mut |_| {}).unwrap();
    assert_eq!((r.steps, r.epochs.len()), (15, 2));
    assert_eq!(g.forwards[..3], f.forwards[5..]);
    let lines = metrics::read(cfg.metrics.as_ref().unwrap()).unwrap();
    assert_eq!(lines.iter().map(|m| m.epoch).collect::<Vec<_>>(), [1, 2, 3]);
}

#[test]
fn backend_checks_come_before_any_work() {
    let ds = data();
    let dir = tempfile::tempdir().unwrap();
    let mut f = Fake::new(7);
    f.built_for = Some(4);
    let err = train_with(&mut f, &ds, None, &config(dir.path()), &mut |_| {}).unwrap_err();
    assert!(
        matches!(err, TrainError::Config(ref m) if m.contains("built for batch 4")),
        "{err}"
    );
    let mut cfg = config(dir.path());
    cfg.epochs = 0;
    let err = train_with(&mut Fake::new(7), &ds, None, &cfg, &mut |_| {}).unwrap_err();
    assert!(matches!(err, TrainError::Config(_)), "{err}");
    assert_eq!((f.uploads, f.forwards.len()), (0, 0));
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
    // a test set whose images do not fit the network is refused before training starts, and
    // an evaluation of one before anything runs (a GPU backend would write past its buffers)
    let mut big = data();
    big.h = 16;
    big.w = 4;
    let mut f = Fake::new(7);
    let err = train_with(&mut f, &ds, Some(&big), &config(dir.path()), &mut |_| {}).unwrap_err();
    assert!(
        matches!(err, TrainError::Config(ref m) if m.contains("images are 3x16x4")),
        "{err}"
    );
    assert_eq!((f.uploads, f.forwards.len()), (0, 0));
    let err = evaluate_with(
        &mut f,
        &48,
        &big,
        &config(dir.path()).normalization,
        16,
        &mut |_| {},
    )
    .unwrap_err();
    assert!(matches!(err, TrainError::Config(_)), "{err}");
    assert_eq!(f.evals, 0);
    let mut many = data();
    many.classes = 11;
    let err = evaluate_with(
        &mut f,
        &48,
        &many,
        &config(dir.path()).normalization,
        16,
        &mut |_| {},
    )
    .unwrap_err();
    assert!(
        matches!(err, TrainError::Config(ref m) if m.contains("11 classes")),
        "{err}"
    );
}
