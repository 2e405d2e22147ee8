//! GPU training step and inference batch, fused against unfused, side by side in one run:
//! the same measurement as `wrnc bench`, under criterion. Time is GPU time between two CUDA
//! events around `iters` back-to-back launches of the whole step (`iter_custom`).
//!
//! `cargo bench -p wrnc-runtime --bench gpu_step`. Without a usable GPU (no driver, no device,
//! no NVRTC) it prints why and measures nothing. `WRNC_BENCH_NET` (default `WRN-16-4`),
//! `WRNC_BENCH_BATCH` (default 128) and `WRNC_BENCH_PRECISION` (`f32`, `bf16`, `tf32x3`:
//! f32 with the convolutions on the tensor cores as 3xTF32, or `tf32`: in plain TF32; default
//! f32) choose what is measured, at the default tensor-core tile.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::time::Duration;
use wrnc_compiler::ast::Precision;
use wrnc_compiler::passes::Mode;
use wrnc_runtime::cuda::bench::{hyper, prepare};
use wrnc_runtime::cuda::cache::ModuleCache;
use wrnc_runtime::cuda::device::Gpu;

fn bench(c: &mut Criterion) {
    if let Err(e) = wrnc_runtime::cuda::is_available() {
        eprintln!("gpu_step: skipped, no usable GPU: {e}");
        return;
    }
    let expr = std::env::var("WRNC_BENCH_NET").unwrap_or_else(|_| "WRN-16-4".into());
    let batch: u32 = std::env::var("WRNC_BENCH_BATCH")
        .ok()
        .and_then(|b| b.parse().ok())
        .unwrap_or(128);
    use wrnc_compiler::schedule::F32Math;
    let (precision, math) = match std::env::var("WRNC_BENCH_PRECISION").as_deref() {
        Ok("bf16") => (Precision::Bf16, F32Math::Fma),
        Ok("tf32x3") => (Precision::F32, F32Math::Tf32x3),
        Ok("tf32") => (Precision::F32, F32Math::Tf32),
        _ => (Precision::F32, F32Math::Fma),
    };
    let tiles = wrnc_compiler::schedule::Tiles::default().with_f32_math(math);
    let src = wrnc_grammar::Source::inline(format!("network {expr}"));
    let graph = wrnc_grammar::build(&src).unwrap_or_else(|d| panic!("{expr}: {}", d.message));
    let gpu = Gpu::open(0).unwrap_or_else(|e| panic!("{e}"));
    let cache = ModuleCache::default_location();
    for mode in [Mode::Train, Mode::Infer] {
        let mut group = c.benchmark_group(format!(
            "{}-{}-b{batch}-{}{}",
            graph.name,
            if mode == Mode::Train {
                "train"
            } else {
                "infer"
            },
            precision.name(),
            math.flag().trim_start_matches('-').replace("tf", "-tf")
        ));
        group.throughput(Throughput::Elements(batch as u64));
        group.sample_size(20);
        group.measurement_time(Duration::from_secs(10));
        for unfused in [false, true] {
            let (ex, _, _) = prepare(
                &gpu,
                &cache,
                &graph,
                mode,
                batch,
                precision,
                unfused,
                &tiles,
                Default::default(),
            )
            .unwrap_or_else(|e| panic!("{e}"));
            let (start, end) = (gpu.event().unwrap(), gpu.event().unwrap());
            let mut step = 0u32;
            group.bench_function(if unfused { "unfused" } else { "fused" }, |b| {
                b.iter_custom(|iters| {
                    gpu.record(&start).unwrap();
                    for _ in 0..iters {
                        step = step.wrapping_add(1);
                        ex.run(&gpu, &hyper(step)).unwrap();
                    }
                    gpu.record(&end).unwrap();
                    let ms = gpu.elapsed_ms(&start, &end).unwrap() as f64;
                    Duration::from_secs_f64(ms / 1e3)
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
