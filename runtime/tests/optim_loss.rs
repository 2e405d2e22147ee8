//! SGD and schedules against hand-computed values; the loss against hand-computed values and
//! finite differences.

use std::collections::BTreeMap;

use wrnc_compiler::ast::Schedule;
use wrnc_runtime::loss::softmax_cross_entropy;
use wrnc_runtime::optim::{lr_at, Sgd};
use wrnc_runtime::Tensor;

fn one(v: f64) -> BTreeMap<String, Tensor<f64>> {
    BTreeMap::from([("w".to_string(), Tensor::from_vec(&[1], vec![v]))])
}

/// Two steps from p = 1 with gradient 0.5, lr 0.1, weight decay 0.1; expected p after each.
#[track_caller]
fn check_sgd(momentum: f64, nesterov: bool, expect: [f64; 2]) {
    let mut opt = Sgd::<f64>::new(momentum, nesterov, 0.1);
    let mut p = one(1.0);
    for e in expect {
        opt.step(&mut p, &one(0.5), 0.1).unwrap();
        let got = p["w"].data[0];
        assert!(
            (got - e).abs() < 1e-12,
            "momentum {momentum} nesterov {nesterov}: {got} vs {e}"
        );
    }
    assert_eq!(opt.state.is_empty(), momentum == 0.0);
}

#[test]
fn sgd_matches_pytorch_formulas() {
    // d = 0.5 + 0.1 p; plain: p -= 0.1 d.
    check_sgd(0.0, false, [0.94, 0.94 - 0.1 * (0.5 + 0.094)]);
    // buf1 = 0.6, p1 = 0.94; d2 = 0.594, buf2 = 0.54 + 0.594 = 1.134, p2 = 0.94 - 0.1134.
    check_sgd(0.9, false, [0.94, 0.8266]);
    // Nesterov: step 1 d = 0.6 + 0.9 * 0.6 = 1.14 -> 0.886; step 2 d = 0.5886,
    // buf = 0.54 + 0.5886 = 1.1286, d = 0.5886 + 1.01574 -> 0.886 - 0.160434.
    check_sgd(0.9, true, [0.886, 0.725566]);
}

#[test]
fn sgd_refuses_mismatched_gradients() {
    let mut opt = Sgd::<f64>::new(0.9, false, 0.0);
    let mut p = one(1.0);
    assert!(opt.step(&mut p, &BTreeMap::new(), 0.1).is_err());
    let bad = BTreeMap::from([("w".to_string(), Tensor::from_vec(&[2], vec![0.0, 0.0]))]);
    assert!(opt.step(&mut p, &bad, 0.1).is_err());
    assert_eq!(p["w"].data, [1.0], "nothing changed");
}

#[track_caller]
fn check_lr(s: &Schedule, epoch: u64, step: u64, spe: u64, total: u64, expect: f64) {
    let got = lr_at(s, 0.1, epoch, step, spe, total);
    assert!(
        (got - expect).abs() < 1e-12,
        "{s:?} epoch {epoch} step {step}: {got} vs {expect}"
    );
}

#[test]
fn schedules() {
    let wrn = Schedule::Step {
        at: vec![0.3, 0.6, 0.8],
        gamma: 0.2,
    };
    check_lr(&wrn, 0, 0, 390, 200, 0.1);
    check_lr(&wrn, 59, 389, 390, 200, 0.1);
    check_lr(&wrn, 60, 0, 390, 200, 0.02);
    check_lr(&wrn, 119, 5, 390, 200, 0.02);
    check_lr(&wrn, 120, 0, 390, 200, 0.004);
    check_lr(&wrn, 160, 0, 390, 200, 0.0008);
    check_lr(&wrn, 199, 389, 390, 200, 0.0008);
    // Fractions that fall between epochs drop at the next one.
    let half = Schedule::Step {
        at: vec![0.25],
        gamma: 0.1,
    };
    check_lr(&half, 2, 0, 10, 10, 0.1);
    check_lr(&half, 3, 0, 10, 10, 0.01);

    check_lr(&Schedule::Cosine, 0, 0, 10, 20, 0.1);
    check_lr(&Schedule::Cosine, 10, 0, 10, 20, 0.05);
    check_lr(
        &Schedule::Cosine,
        5,
        0,
        10,
        20,
        0.05 * (1.0 + (std::f64::consts::PI / 4.0).cos()),
    );
    check_lr(
        &Schedule::Cosine,
        19,
        5,
        10,
        20,
        0.05 * (1.0 + (std::f64::consts::PI * 0.975).cos()),
    );

    // One-cycle over 100 steps: 0.004 -> 0.1 at step 29 -> 4e-7 at step 99.
    check_lr(&Schedule::OneCycle, 0, 0, 10, 10, 0.004);
    check_lr(&Schedule::OneCycle, 1, 4, 10, 10, 0.04940133238789996);
    check_lr(&Schedule::OneCycle, 2, 9, 10, 10, 0.1);
    check_lr(&Schedule::OneCycle, 5, 0, 10, 10, 0.0793893450575732);
    check_lr(&Schedule::OneCycle, 9, 9, 10, 10, 4e-7);

    // Degenerate inputs do not panic.
    for s in [wrn, Schedule::Cosine, Schedule::OneCycle] {
        for (spe, total) in [(0, 10), (10, 0), (1, 1)] {
            assert!(lr_at(&s, 0.1, 0, 0, spe, total).is_finite());
        }
    }
}

#[test]
fn cross_entropy_hand_computed() {
    let logits = Tensor::from_vec(&[2, 3], vec![1.0f64, 2.0, 3.0, 1.0, 2.0, 3.0]);
    let out = softmax_cross_entropy(&logits, &[2, 0], 0.0).unwrap();
    // -log softmax: [2.40760596, 1.40760596, 0.40760596]; mean of samples 2 and 0.
    assert!((out.loss - (0.407_605_964_444_380_1 + 2.407_605_964_444_38) / 2.0).abs() < 1e-12);
    assert_eq!(out.correct, 1);
    let p = [0.09003057317038046, 0.24472847105479764, 0.6652409557748219];
    let want = [
        p[0] / 2.0,
        p[1] / 2.0,
        (p[2] - 1.0) / 2.0,
        (p[0] - 1.0) / 2.0,
        p[1] / 2.0,
        p[2] / 2.0,
    ];
    for (a, e) in out.dlogits.data.iter().zip(want) {
        assert!((a - e).abs() < 1e-12, "{a} vs {e}");
    }
    let smooth = softmax_cross_entropy(&logits.clone(), &[2, 2], 0.1).unwrap();
    assert!(
        (smooth.loss - 0.5076059644443801).abs() < 1e-12,
        "{}",
        smooth.loss
    );
}

#[test]
fn cross_entropy_gradient_matches_differences() {
    let z: Vec<f64> = (0..12).map(|i| ((i * 7 % 5) as f64 - 2.0) * 0.7).collect();
    let labels = [1, 3, 0];
    for eps in [0.0, 0.1] {
        let t = Tensor::from_vec(&[3, 4], z.clone());
        let out = softmax_cross_entropy(&t, &labels, eps).unwrap();
        for i in 0..12 {
            let mut p = t.clone();
            p.data[i] += 1e-6;
            let fp = softmax_cross_entropy(&p, &labels, eps).unwrap().loss;
            p.data[i] -= 2e-6;
            let fm = softmax_cross_entropy(&p, &labels, eps).unwrap().loss;
            let num = (fp - fm) / 2e-6;
            assert!(
                (num - out.dlogits.data[i]).abs() < 1e-8,
                "eps {eps} [{i}]: {num} vs {}",
                out.dlogits.data[i]
            );
        }
    }
}

#[test]
fn cross_entropy_rejects_bad_labels() {
    let logits = Tensor::from_vec(&[2, 3], vec![0.0f32; 6]);
    assert!(softmax_cross_entropy(&logits, &[0, 3], 0.0).is_err());
    assert!(softmax_cross_entropy(&logits, &[0], 0.0).is_err());
    assert!(softmax_cross_entropy(&logits, &[0, 1], 1.5).is_err());
    assert!(softmax_cross_entropy(&Tensor::<f32>::zeros(&[0, 3]), &[], 0.0).is_err());
    let out = softmax_cross_entropy(&logits, &[0, 1], 0.0).unwrap();
    assert!((out.loss - 3f64.ln()).abs() < 1e-6);
}
