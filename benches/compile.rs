//! Compile speed: the equivalent of `wrnc compile WRN-28-10 --train --emit ptx` (parse, build
//! the training-step schedule at batch 128, write the CUDA, NVRTC to PTX for sm_90).
//! Target (issue 4): under 10 s cold.
//!
//! "Cold" is measured once, before criterion's loop, in a fresh process: it includes loading
//! NVRTC. Criterion then times the warm pipeline (NVRTC already loaded; NVRTC itself keeps no
//! cache between programs, so every iteration compiles every kernel again), and the front half
//! (parse + schedule + CUDA text) on its own. Without NVRTC only the front half runs.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use std::time::Instant;
use wrnc_compiler::codegen::cuda;
use wrnc_compiler::schedule::{self, Options};
use wrnc_runtime::nvrtc;

const NET: &str = "WRN-28-10";

/// Parse, schedule (training step, batch 128, f32, all fusion passes) and write the CUDA.
fn generate(net: &str) -> String {
    let g = wrnc_grammar::build(&wrnc_grammar::Source::inline(net)).expect("valid network");
    let o = Options::default();
    let s = schedule::build(&g, &o).expect("schedule");
    cuda::write(&s, &o).expect("cuda")
}

fn compile(net: &str) -> usize {
    let src = generate(net);
    nvrtc::compile_ptx(&src, "sm_90")
        .expect("NVRTC compiles the generated CUDA")
        .len()
}

fn bench(c: &mut Criterion) {
    // Cold: this process's first compile, loading NVRTC included.
    let t = Instant::now();
    let have_nvrtc = match nvrtc::library() {
        Ok(_) => true,
        Err(e) => {
            eprintln!("NVRTC not available, timing code generation only: {e}");
            false
        }
    };
    if have_nvrtc {
        let ptx = compile(NET);
        eprintln!(
            "cold `wrnc compile {NET} --train --emit ptx` equivalent (NVRTC load included): \
             {:.2} s, {} bytes of PTX",
            t.elapsed().as_secs_f64(),
            ptx
        );
    }
    c.bench_function(&format!("parse+schedule+cuda {NET} train"), |b| {
        b.iter(|| generate(black_box(NET)).len())
    });
    if have_nvrtc {
        let mut g = c.benchmark_group("nvrtc");
        g.sample_size(10);
        g.bench_function(
            format!("parse+schedule+cuda+nvrtc sm_90 {NET} train"),
            |b| b.iter(|| compile(black_box(NET))),
        );
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
