//! Front end speed: parse + expand + lower + info.
//! Targets (issue 2): WRN-28-10 under 5 ms, PreResNet-1001 under 50 ms.

use criterion::{black_box, criterion_group, criterion_main, Criterion};

fn front(net: &str) -> u64 {
    let src = wrnc_grammar::Source::inline(net);
    let g = wrnc_grammar::build(&src).expect("valid network");
    wrnc_compiler::analysis::info(&g, 128).params
}

fn bench(c: &mut Criterion) {
    for net in ["WRN-28-10", "PreResNet-1001", "DenseNet-BC-190-40"] {
        c.bench_function(&format!("parse+lower+info {net}"), |b| {
            b.iter(|| front(black_box(net)))
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
