//! CPU reference backend: one WRN-16-4 training step (forward, loss, backward, SGD) at batch
//! 32 on CIFAR-sized inputs, in images/s; beside it, the GEMM crate alone running the same
//! GEMMs the step's convolutions run (forward, data gradient except for the first layer,
//! weight gradient; same shapes, same per-image rayon parallelism), also in images/s, so the
//! ratio "step / pure GEMM" is visible.
//!
//! `cargo bench -p wrnc-runtime --bench cpu_step`. Set `WRNC_BENCH_NET` to benchmark another
//! network expression (e.g. `WRN-10-1`), `WRNC_BENCH_BATCH` for another batch size.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rayon::prelude::*;
use wrnc_compiler::graph::{Graph, Op};
use wrnc_runtime::cpu::{Mode, Model};
use wrnc_runtime::init::SplitMix64;
use wrnc_runtime::loss::softmax_cross_entropy;
use wrnc_runtime::ops::{conv::gemm_shapes, gemm, Mat};
use wrnc_runtime::optim::Sgd;
use wrnc_runtime::Tensor;

fn net() -> (Graph, usize) {
    let expr = std::env::var("WRNC_BENCH_NET").unwrap_or_else(|_| "WRN-16-4".into());
    let batch = std::env::var("WRNC_BENCH_BATCH")
        .ok()
        .and_then(|b| b.parse().ok())
        .unwrap_or(32);
    let src = wrnc_grammar::Source::inline(format!("network {expr}"));
    let g = wrnc_grammar::build(&src).unwrap_or_else(|d| panic!("{expr}: {}", d.message));
    (g, batch)
}

/// `(m, k, n)` of every GEMM one image of a training step runs, with the flop count.
fn step_gemms(g: &Graph) -> (Vec<(usize, usize, usize)>, f64) {
    let mut v = Vec::new();
    for &n in &g.order {
        if let Op::Conv2d(c) = g.node(n).op {
            let x = g.node(g.inputs(n)[0]).shape;
            let [fwd, bwd_data, bwd_w] = gemm_shapes(&c, x.h as usize, x.w as usize).unwrap();
            for _ in 0..c.groups {
                v.push(fwd);
                if g.inputs(n)[0] != g.input {
                    v.push(bwd_data);
                }
                v.push(bwd_w);
            }
        }
    }
    let flops = v.iter().map(|&(m, k, n)| 2.0 * (m * k * n) as f64).sum();
    (v, flops)
}

fn bench(c: &mut Criterion) {
    let (graph, batch) = net();
    let name = graph.name.clone();
    let s = graph.input_shape();
    let (gemms, flops_per_image) = step_gemms(&graph);
    let mut model = Model::<f32>::new(graph, 0).expect("model");
    let mut opt = Sgd::<f32>::new(0.9, true, 5e-4);
    let mut r = SplitMix64(1);
    let len = batch * (s.c * s.h * s.w) as usize;
    let x = Tensor::from_vec(
        &[batch, s.c as usize, s.h as usize, s.w as usize],
        (0..len).map(|_| r.normal() as f32).collect(),
    );
    let classes = model.graph().classes;
    let labels: Vec<u32> = (0..batch as u32).map(|i| i % classes).collect();
    eprintln!(
        "{name}: {} parameters, {:.2} GFLOP of convolution GEMMs per training image, {} threads",
        model.param_count(),
        flops_per_image / 1e9,
        rayon::current_num_threads()
    );

    let mut train_step = |step: u32| {
        let (logits, tape) = model
            .forward(&x, Mode::Train { seed: 0, step })
            .expect("forward");
        let out = softmax_cross_entropy(&logits, &labels, 0.0).expect("loss");
        let grads = model.backward(tape, &out.dlogits).expect("backward");
        opt.step(&mut model.params, &grads, 0.01).expect("sgd");
    };
    // The same GEMMs on the bare GEMM crate (through the same thin wrapper), one image per
    // rayon task, buffers allocated once per thread.
    let max_a = gemms.iter().map(|&(m, k, _)| m * k).max().unwrap_or(0);
    let max_b = gemms.iter().map(|&(_, k, n)| k * n).max().unwrap_or(0);
    let max_c = gemms.iter().map(|&(m, _, n)| m * n).max().unwrap_or(0);
    let gemm_only = || {
        (0..batch).into_par_iter().for_each_init(
            || {
                (
                    vec![0.5f32; max_a],
                    vec![0.25f32; max_b],
                    vec![0.0f32; max_c],
                )
            },
            |(a, bb, cc), _| {
                for &(m, k, n) in &gemms {
                    gemm(
                        1.0,
                        Mat::rm(&a[..m * k], m, k),
                        Mat::rm(&bb[..k * n], k, n),
                        0.0,
                        &mut cc[..m * n],
                    );
                }
            },
        )
    };

    // Alternate the two and keep the fastest of each: on a shared machine the minimum is the
    // least disturbed measurement, and alternating exposes both to the same conditions.
    let rounds: u32 = std::env::var("WRNC_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    let (mut best_step, mut best_gemm) = (f64::INFINITY, f64::INFINITY);
    for round in 0..rounds {
        let t = std::time::Instant::now();
        train_step(round);
        best_step = best_step.min(t.elapsed().as_secs_f64());
        let t = std::time::Instant::now();
        gemm_only();
        best_gemm = best_gemm.min(t.elapsed().as_secs_f64());
    }
    let gflop = flops_per_image * batch as f64 / 1e9;
    eprintln!(
        "best of {rounds}: train step {:.3} s = {:.1} images/s ({:.1} GFLOP/s of conv GEMMs); \
         bare GEMMs {:.3} s = {:.1} images/s ({:.1} GFLOP/s); step/GEMM rate ratio {:.2}",
        best_step,
        batch as f64 / best_step,
        gflop / best_step,
        best_gemm,
        batch as f64 / best_gemm,
        gflop / best_gemm,
        best_gemm / best_step
    );

    let mut group = c.benchmark_group("cpu_step");
    group.sample_size(10);
    group.throughput(Throughput::Elements(batch as u64));
    let mut step = 0;
    group.bench_function(format!("{name} train step, batch {batch}"), |b| {
        b.iter(|| {
            train_step(step);
            step += 1;
        })
    });
    group.bench_function(format!("{name} conv GEMMs only, batch {batch}"), |b| {
        b.iter(gemm_only)
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
