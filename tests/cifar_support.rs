//! Shared by the tests that train (`#[path = "cifar_support.rs"] mod cifar;`): a tiny CIFAR-10
//! binary release written on the spot. No tests of its own.
#![allow(dead_code)]

use std::path::Path;

/// A CIFAR-10 binary release with `n` records per batch file, learnable: the class is the
/// brightest of ten fixed patterns.
pub fn write_cifar10(dir: &Path, n: usize) {
    let d = dir.join("cifar-10-batches-bin");
    std::fs::create_dir_all(&d).unwrap();
    let record = |i: usize| {
        let label = (i * 7) % 10;
        let mut r = vec![label as u8];
        for ch in 0..3 {
            for p in 0..1024 {
                let on = (p / 32 + ch * 3) % 10 == label;
                r.push(if on { 200 } else { 40 } + ((i * 13 + p) % 30) as u8);
            }
        }
        r
    };
    for b in 1..=5 {
        let bytes: Vec<u8> = (0..n).flat_map(|i| record(i + b * 1000)).collect();
        std::fs::write(d.join(format!("data_batch_{b}.bin")), bytes).unwrap();
    }
    let test: Vec<u8> = (0..n).flat_map(record).collect();
    std::fs::write(d.join("test_batch.bin"), test).unwrap();
}
