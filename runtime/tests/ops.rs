//! Forward values of the kernels against naive references and hand-computed numbers, the
//! dropout mask contract, executor errors and determinism.

mod common;

use common::{nets, randn, B};
use wrnc_compiler::graph::{Conv2d, Pool};
use wrnc_compiler::rng;
use wrnc_runtime::cpu::{Error, Mode, Model};
use wrnc_runtime::init::SplitMix64;
use wrnc_runtime::ops::{conv, elementwise as ew, norm, pool};
use wrnc_runtime::Tensor;

/// Direct 7-loop convolution in f64: the reference the GEMM path is checked against.
fn naive_conv(x: &Tensor<f64>, p: &Conv2d, w: &[f64], b: Option<&[f64]>) -> Tensor<f64> {
    let (n, c, h, wd) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3]);
    let (k, s, pad, g) = (
        p.k as usize,
        p.stride as usize,
        p.pad as usize,
        p.groups as usize,
    );
    let (oc, cg, ocg) = (p.out_c as usize, c / g, p.out_c as usize / g);
    let oh = (h + 2 * pad - k) / s + 1;
    let ow = (wd + 2 * pad - k) / s + 1;
    let mut y = Tensor::zeros(&[n, oc, oh, ow]);
    for ni in 0..n {
        for o in 0..oc {
            let grp = o / ocg;
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = b.map_or(0.0, |b| b[o]);
                    for ci in 0..cg {
                        for ky in 0..k {
                            for kx in 0..k {
                                let iy = (oy * s + ky) as isize - pad as isize;
                                let ix = (ox * s + kx) as isize - pad as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                    continue;
                                }
                                let xi =
                                    ((ni * c + grp * cg + ci) * h + iy as usize) * wd + ix as usize;
                                acc += x.data[xi] * w[((o * cg + ci) * k + ky) * k + kx];
                            }
                        }
                    }
                    y.data[((ni * oc + o) * oh + oy) * ow + ox] = acc;
                }
            }
        }
    }
    y
}

#[track_caller]
#[allow(clippy::too_many_arguments)]
fn check_conv(
    c: u32,
    out: u32,
    k: u32,
    s: u32,
    pad: u32,
    groups: u32,
    bias: bool,
    n: usize,
    h: usize,
    w: usize,
) {
    let p = Conv2d {
        in_c: c,
        out_c: out,
        k,
        stride: s,
        pad,
        groups,
        bias,
    };
    let mut g = SplitMix64(c as u64 * 1000 + k as u64 * 10 + s as u64);
    let x = randn(&mut g, &[n, c as usize, h, w], 1.0);
    let wt = randn(&mut g, &[(out * c / groups * k * k) as usize], 0.5);
    let bt = randn(&mut g, &[out as usize], 0.5);
    let b = bias.then_some(&bt.data[..]);
    let want = naive_conv(&x, &p, &wt.data, b);
    // f64 through the GEMM path: equal to rounding.
    let got = conv::conv2d_forward(&x, &p, &wt.data, b);
    assert_eq!(got.shape, want.shape);
    for (a, e) in got.data.iter().zip(&want.data) {
        assert!((a - e).abs() < 1e-10, "f64 conv {p:?}: {a} vs {e}");
    }
    // f32: the same kernel in single precision.
    let x32 = Tensor::from_vec(&x.shape, x.data.iter().map(|&v| v as f32).collect());
    let w32: Vec<f32> = wt.data.iter().map(|&v| v as f32).collect();
    let b32: Vec<f32> = bt.data.iter().map(|&v| v as f32).collect();
    let got = conv::conv2d_forward(&x32, &p, &w32, bias.then_some(&b32[..]));
    for (a, e) in got.data.iter().zip(&want.data) {
        assert!(
            (*a as f64 - e).abs() < 1e-4 * (1.0 + e.abs()),
            "f32 conv {p:?}: {a} vs {e}"
        );
    }
}

#[test]
fn conv_matches_naive_reference() {
    check_conv(3, 4, 1, 1, 0, 1, false, 2, 5, 5);
    check_conv(3, 4, 1, 2, 0, 1, true, 2, 5, 6);
    check_conv(3, 8, 3, 1, 1, 1, false, 3, 8, 8);
    check_conv(3, 8, 3, 2, 1, 1, true, 2, 9, 7);
    check_conv(4, 6, 3, 1, 0, 2, false, 2, 6, 6);
    check_conv(8, 8, 3, 2, 1, 8, false, 1, 7, 7);
    check_conv(3, 5, 7, 2, 3, 1, false, 1, 11, 11);
    check_conv(16, 32, 3, 1, 1, 4, true, 2, 6, 6);
    check_conv(2, 3, 4, 3, 2, 1, true, 2, 9, 8);
}

#[test]
fn pooling_hand_computed() {
    // One 4x4 plane 0..16.
    let x = Tensor::from_vec(&[1, 1, 4, 4], (0..16).map(|v| v as f64).collect());
    let mp = pool::max_pool(
        &x,
        &Pool {
            k: 2,
            stride: 2,
            pad: 0,
        },
    );
    assert_eq!(mp.data, [5.0, 7.0, 13.0, 15.0]);
    let mp = pool::max_pool(
        &x,
        &Pool {
            k: 3,
            stride: 2,
            pad: 1,
        },
    );
    assert_eq!(mp.data, [5.0, 7.0, 13.0, 15.0]);
    let ap = pool::avg_pool(
        &x,
        &Pool {
            k: 2,
            stride: 2,
            pad: 0,
        },
    );
    assert_eq!(ap.data, [2.5, 4.5, 10.5, 12.5]);
    // count_include_pad: the corner window holds 0,1,4,5 out of 9 slots.
    let ap = pool::avg_pool(
        &x,
        &Pool {
            k: 3,
            stride: 2,
            pad: 1,
        },
    );
    assert_eq!(ap.data[0], 10.0 / 9.0);
    assert_eq!(pool::global_avg_pool(&x).data, [7.5]);
    // Max pool backward routes to the first maximum only.
    let flat = Tensor::from_vec(&[1, 1, 2, 2], vec![1.0, 3.0, 3.0, 0.0]);
    let d = pool::max_pool_backward(
        &flat,
        &Pool {
            k: 2,
            stride: 2,
            pad: 0,
        },
        &Tensor::from_vec(&[1, 1, 1, 1], vec![1.0]),
    );
    assert_eq!(d.data, [0.0, 1.0, 0.0, 0.0]);
}

#[test]
fn zero_pad_shortcut_hand_computed() {
    let x = Tensor::from_vec(&[1, 1, 2, 2], vec![1.0, 2.0, 3.0, 6.0]);
    let y = pool::zero_pad_shortcut(&x, 3, 2);
    assert_eq!(y.shape, [1, 3, 1, 1]);
    assert_eq!(y.data, [3.0, 0.0, 0.0]);
    let y = pool::zero_pad_shortcut(&x, 2, 1);
    assert_eq!(y.data, [1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 0.0, 0.0]);
}

#[test]
fn batch_norm_statistics() {
    // Channel 0 holds 1,2,3,4 (two images of 1x2); channel 1 holds 10 four times.
    let x = Tensor::from_vec(
        &[2, 2, 1, 2],
        vec![1.0, 2.0, 10.0, 10.0, 3.0, 4.0, 10.0, 10.0],
    );
    let (mut rm, mut rv) = (vec![0.0, 1.0], vec![1.0, 2.0]);
    let (y, saved) =
        norm::batch_norm_train(&x, &[2.0, 1.0], &[0.5, 0.0], 0.0, 0.1, &mut rm, &mut rv);
    assert_eq!(saved.mean, [2.5, 10.0]);
    // Biased variance 1.25 normalises; unbiased 5/3 updates the running variance.
    let s = 1.0 / 1.25f64.sqrt();
    let want0 = [
        -1.5 * s * 2.0 + 0.5,
        -0.5 * s * 2.0 + 0.5,
        0.5 * s * 2.0 + 0.5,
        1.5 * s * 2.0 + 0.5,
    ];
    let got0 = [y.data[0], y.data[1], y.data[4], y.data[5]];
    for (a, e) in got0.iter().zip(want0) {
        assert!((a - e).abs() < 1e-12, "{a} vs {e}");
    }
    // (momentum is an f32 in the graph: 0.1f32 is 0.1 to 1.5e-9)
    assert!((rm[0] - 0.25).abs() < 1e-7 && (rm[1] - (0.9 + 1.0)).abs() < 1e-7);
    assert!((rv[0] - (0.9 + 0.1 * 5.0 / 3.0)).abs() < 1e-7, "{}", rv[0]);
    assert!((rv[1] - 1.8).abs() < 1e-7, "{}", rv[1]);
    // Eval uses the running statistics.
    let (y, _) =
        norm::batch_norm_eval(&x, &[1.0, 1.0], &[0.0, 0.0], 0.0, &[1.0, 10.0], &[4.0, 1.0]);
    assert_eq!(&y.data[..4], [0.0, 0.5, 0.0, 0.0]);
}

#[test]
fn executor_updates_running_statistics() {
    let (mut b, x) = B::new(2, 3, 3);
    let y = b.bn(x);
    let mut m = Model::<f64>::new(b.finish(y), 1).unwrap();
    let mut g = SplitMix64(4);
    let x = randn(&mut g, &[4, 2, 3, 3], 2.0);
    m.forward(&x, Mode::Eval).unwrap();
    assert_eq!(
        m.buffers["0.bn.running_mean"].data,
        [0.0, 0.0],
        "eval must not update"
    );
    m.forward(&x, Mode::Train { seed: 0, step: 0 }).unwrap();
    let mean0: f64 = (0..4)
        .flat_map(|n| x.data[n * 18..n * 18 + 9].to_vec())
        .sum::<f64>()
        / 36.0;
    assert!((m.buffers["0.bn.running_mean"].data[0] - 0.1 * mean0).abs() < 1e-8);
}

#[test]
fn dropout_mask_contract() {
    // The mask of element i (flat index within the batch) is rng::keep(seed, stream_id(node
    // name), step, i, 1 - p); kept elements are scaled by 1 / (1 - p).
    let (mut b, x) = B::new(3, 4, 4);
    let y = b.dropout(x, 0.25);
    let g = b.finish(y);
    let name = g.node(g.output).name.clone();
    let mut m = Model::<f32>::new(g, 0).unwrap();
    let x = Tensor::from_vec(&[5, 3, 4, 4], vec![1.0f32; 240]);
    let (y, _) = m.forward(&x, Mode::Train { seed: 9, step: 4 }).unwrap();
    let mut dropped = 0;
    for (i, &v) in y.data.iter().enumerate() {
        let kept = rng::keep(9, rng::stream_id(&name), 4, i as u32, 0.75);
        assert_eq!(v, if kept { 1.0 / 0.75 } else { 0.0 }, "element {i}");
        dropped += usize::from(!kept);
    }
    assert!(dropped > 20 && dropped < 100, "{dropped} of 240 dropped");
    assert_eq!(m.infer(&x).unwrap().data, x.data, "eval is the identity");

    // DropPath: one draw per sample.
    let key = ew::MaskKey {
        seed: 2,
        stream: 77,
        step: 3,
    };
    let x = Tensor::from_vec(&[16, 2, 1, 1], vec![1.0f64; 32]);
    let y = ew::drop_path(&x, 0.5, key);
    for n in 0..16 {
        let kept = rng::keep(2, 77, 3, n as u32, 0.5);
        assert_eq!(
            &y.data[2 * n..2 * n + 2],
            if kept { [2.0, 2.0] } else { [0.0, 0.0] }
        );
    }
}

#[test]
fn concat_and_add() {
    let a = Tensor::from_vec(&[2, 1, 1, 2], vec![1.0, 2.0, 3.0, 4.0]);
    let b = Tensor::from_vec(
        &[2, 2, 1, 2],
        vec![5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0],
    );
    let c = ew::concat(&a, &b);
    assert_eq!(
        c.data,
        [1.0, 2.0, 5.0, 6.0, 7.0, 8.0, 3.0, 4.0, 9.0, 10.0, 11.0, 12.0]
    );
    let (da, db) = ew::concat_backward(&c, 1);
    assert_eq!((da, db), (a.clone(), b));
    assert_eq!(ew::add(&a, &a).data, [2.0, 4.0, 6.0, 8.0]);
}

#[test]
fn errors_not_panics() {
    let g = nets::wrn(10, 1, 3, 8, None);
    let mut m = Model::<f32>::new(g.clone(), 0).unwrap();
    let train = Mode::Train { seed: 0, step: 0 };
    // Wrong input shapes.
    for shape in [
        vec![2, 3, 8],
        vec![0, 3, 8, 8],
        vec![2, 1, 8, 8],
        vec![2, 3, 8, 9],
    ] {
        let x = Tensor::zeros(&shape);
        assert!(
            matches!(m.forward(&x, train), Err(Error::InputShape { .. })),
            "{shape:?}"
        );
    }
    // Batch norm on one value per channel.
    let x = Tensor::zeros(&[1, 3, 8, 8]);
    let (b, x1) = B::new(3, 1, 1);
    let mut b = b;
    let y = b.bn(x1);
    let mut one = Model::<f32>::new(b.finish(y), 0).unwrap();
    assert!(matches!(
        one.forward(&Tensor::zeros(&[1, 3, 1, 1]), train),
        Err(Error::BatchTooSmall { .. })
    ));
    assert!(one
        .forward(&Tensor::zeros(&[1, 3, 1, 1]), Mode::Eval)
        .is_ok());
    // Wrong logit gradient.
    let (y, tape) = m.forward(&x, train).unwrap();
    assert_eq!(y.shape, [1, 3]);
    assert!(matches!(
        m.backward(tape, &Tensor::zeros(&[1, 4])),
        Err(Error::GradShape { .. })
    ));
    // Missing / misshapen state.
    let mut broken = m.clone();
    broken.params.remove("0.conv.weight");
    assert!(matches!(broken.forward(&x, train), Err(Error::State(_))));
    let mut broken = m.clone();
    broken.params.get_mut("0.conv.weight").unwrap().shape = vec![16, 3, 3, 3, 1];
    assert!(matches!(broken.forward(&x, train), Err(Error::State(_))));
    assert!(Model::with_state(g.clone(), m.params.clone(), m.buffers.clone()).is_ok());
    let mut extra = m.params.clone();
    extra.insert("nope".into(), Tensor::zeros(&[1]));
    assert!(Model::with_state(g.clone(), extra, m.buffers.clone()).is_err());
    // Invalid graphs.
    let mut bad = g.clone();
    let conv = bad.order[1];
    bad.g[conv].shape.c += 1;
    assert!(matches!(
        Model::<f32>::new(bad, 0),
        Err(Error::Graph { .. })
    ));
    let mut bad = g.clone();
    bad.order.swap(1, 2);
    assert!(matches!(
        Model::<f32>::new(bad, 0),
        Err(Error::Graph { .. })
    ));
    let mut bad = g;
    bad.output = bad.input;
    assert!(Model::<f32>::new(bad, 0).is_err());
    // Huge shapes are refused before allocating.
    let (mut b, x) = B::new(3, 8, 8);
    let y = b.conv(x, 4, 3, 1);
    let mut huge = b.finish(y);
    let conv = huge.order[1];
    huge.g[conv].shape = wrnc_compiler::graph::Shape::new(1 << 20, 1 << 20, 1 << 20);
    assert!(Model::<f32>::new(huge, 0).is_err());
    // A giant kernel whose output and weight fit but whose im2col buffer would not.
    let (mut b, x) = B::new(3, 8, 8);
    let y = b.conv_full(x, 4, 4000, 1, 2000, 1, false);
    assert!(matches!(
        Model::<f32>::new(b.finish(y), 0),
        Err(Error::TooLarge(_))
    ));
}

#[test]
fn deterministic_init_and_steps() {
    let g = nets::wrn(10, 1, 3, 8, Some(0.3));
    let mut a = Model::<f32>::new(g.clone(), 5).unwrap();
    let mut b = Model::<f32>::new(g.clone(), 5).unwrap();
    let c = Model::<f32>::new(g, 6).unwrap();
    assert_eq!(a.params, b.params);
    assert_ne!(a.params, c.params);
    // He fan-out init: the first conv (16 x 3 x 3 x 3) has std sqrt(2 / 144).
    let w = &a.params["0.conv.weight"].data;
    let std = (w.iter().map(|v| v * v).sum::<f32>() / w.len() as f32).sqrt();
    assert!((std - (2.0f32 / 144.0).sqrt()).abs() < 0.04, "std {std}");
    let mut g = SplitMix64(1);
    let x = randn(&mut g, &[4, 3, 8, 8], 1.0);
    let x = Tensor::from_vec(&x.shape, x.data.iter().map(|&v| v as f32).collect());
    let mode = Mode::Train { seed: 1, step: 2 };
    let (ya, ta) = a.forward(&x, mode).unwrap();
    let (yb, tb) = b.forward(&x, mode).unwrap();
    assert_eq!(ya, yb);
    let ga = a.backward(ta, &ya).unwrap();
    let gb = b.backward(tb, &yb).unwrap();
    assert_eq!(ga, gb, "bit-identical gradients");
    assert_eq!(common::max_diff(&ga, &gb), 0.0);
    assert_eq!(
        ga.keys().collect::<Vec<_>>(),
        a.params.keys().collect::<Vec<_>>()
    );
}

#[test]
fn f32_and_f64_agree() {
    let g = nets::wrn(10, 1, 4, 8, Some(0.2));
    let mut m64 = Model::<f64>::new(g.clone(), 3).unwrap();
    let mut m32 = Model::<f32>::new(g, 3).unwrap();
    let mut r = SplitMix64(2);
    let x = randn(&mut r, &[3, 3, 8, 8], 1.0);
    let x32 = Tensor::from_vec(&x.shape, x.data.iter().map(|&v| v as f32).collect());
    let mode = Mode::Train { seed: 4, step: 1 };
    let (y64, t64) = m64.forward(&x, mode).unwrap();
    let (y32, t32) = m32.forward(&x32, mode).unwrap();
    for (a, b) in y32.data.iter().zip(&y64.data) {
        assert!((*a as f64 - b).abs() < 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
    }
    let g64 = m64.backward(t64, &y64).unwrap();
    let g32 = m32.backward(t32, &y32).unwrap();
    for (k, t) in &g64 {
        let scale = t.data.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        for (a, b) in g32[k].data.iter().zip(&t.data) {
            assert!(
                (*a as f64 - b).abs() < 1e-3 * (scale + 1e-3),
                "{k}: {a} vs {b}"
            );
        }
    }
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let g = nets::wrn(10, 1, 3, 8, Some(0.3));
    let mut r = SplitMix64(8);
    let x = randn(&mut r, &[11, 3, 8, 8], 1.0);
    let x = Tensor::from_vec(&x.shape, x.data.iter().map(|&v| v as f32).collect());
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut m = Model::<f32>::new(g.clone(), 2).unwrap();
            let (y, tape) = m.forward(&x, Mode::Train { seed: 3, step: 4 }).unwrap();
            let grads = m.backward(tape, &y).unwrap();
            (y, grads, m.buffers)
        })
    };
    let one = run(1);
    assert_eq!(one, run(3));
    assert_eq!(one, run(8));
}
