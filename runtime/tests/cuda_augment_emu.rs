//! wrnc's own augmentation kernel run through the CUDA emulation (`emu/cuda_emu.h`, g++),
//! without a GPU, against `data::make_batch`: bit for bit in f32, bf16 rounding of the same
//! values in bf16. Skips with a message when g++ is missing.

use std::path::PathBuf;
use std::process::Command;

use wrnc_compiler::ast::Precision;
use wrnc_runtime::cuda::augment;
use wrnc_runtime::cuda::exec::f32_to_bf16;
use wrnc_runtime::data::{make_batch, Dataset, Normalization};

const DRIVER: &str = r#"
#include <cstdio>
#include <vector>
int main(int argc, char** argv) {
    const int N = 37, C = 3, H = 11, W = 9, B = 13;
    std::vector<unsigned char> images(N * C * H * W);
    std::vector<int> labels(N);
    std::vector<unsigned int> idx(B);
    std::vector<float> lut(C * 256);
    FILE* f = fopen(argv[1], "rb");
    if (!f) return 2;
    if (fread(images.data(), 1, images.size(), f) != images.size()) return 3;
    if (fread(labels.data(), 4, labels.size(), f) != labels.size()) return 3;
    if (fread(idx.data(), 4, idx.size(), f) != idx.size()) return 3;
    if (fread(lut.data(), 4, lut.size(), f) != lut.size()) return 3;
    unsigned int seed, step, stream; int augment;
    if (fscanf(f, "%u %u %u %d", &seed, &step, &stream, &augment) != 4) return 4;
    fclose(f);
    std::vector<act_t> out(B * C * H * W);
    std::vector<int> lab(B);
    wrnc_emu::launch(wrnc_augment, dim3(7), dim3(64), 0, out.data(), lab.data(), images.data(), labels.data(), idx.data(), lut.data(), B, C, H, W, augment, seed, step, stream, 4);
    FILE* o = fopen(argv[2], "wb");
    fwrite(out.data(), sizeof(act_t), out.size(), o);
    fwrite(lab.data(), 4, lab.size(), o);
    fclose(o);
    return 0;
}
"#;

#[test]
fn augmentation_kernel_matches_make_batch_in_the_emulation() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir().unwrap();
    let (n, c, h, w, b) = (37usize, 3usize, 11usize, 9usize, 13usize);
    let mut r = wrnc_runtime::init::SplitMix64(3);
    let ds = Dataset {
        images: (0..n * c * h * w)
            .map(|_| (r.next_u64() & 255) as u8)
            .collect(),
        labels: (0..n).map(|i| (i % 10) as u16).collect(),
        n,
        c,
        h,
        w,
        classes: 10,
        class_names: vec![],
    };
    let norm = Normalization {
        mean: vec![0.4, 0.5, 0.6],
        std: vec![0.2, 0.25, 0.3],
    };
    let indices: Vec<usize> = (0..b).map(|i| (i * 7 + 3) % n).collect();
    for precision in [Precision::F32, Precision::Bf16] {
        let src = dir.path().join("main.cpp");
        std::fs::write(
            &src,
            format!(
                "#include \"cuda_emu.h\"\n{}\n{DRIVER}",
                augment::source(precision)
            ),
        )
        .unwrap();
        let prog = dir.path().join("prog");
        let out = match Command::new("g++")
            .args(["-O1", "-std=c++20", "-pthread", "-w", "-I"])
            .arg(root.join("emu"))
            .arg(&src)
            .arg("-o")
            .arg(&prog)
            .output()
        {
            Ok(o) => o,
            Err(e) => {
                eprintln!("skipped: g++ not available ({e})");
                return;
            }
        };
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for (aug, seed) in [(false, 0u64), (true, (5u64 << 32) | 17)] {
            let mut input = ds.images.clone();
            for l in &ds.labels {
                input.extend((*l as i32).to_le_bytes());
            }
            for &i in &indices {
                input.extend((i as u32).to_le_bytes());
            }
            for v in augment::lut(&norm) {
                input.extend(v.to_le_bytes());
            }
            input.extend(
                format!(
                    "{} {} {} {}\n",
                    seed as u32,
                    (seed >> 32) as u32,
                    wrnc_compiler::rng::stream_id("data.augment"),
                    aug as i32
                )
                .bytes(),
            );
            let inp = dir.path().join("in.bin");
            let outp = dir.path().join("out.bin");
            std::fs::write(&inp, input).unwrap();
            let o = Command::new(&prog).arg(&inp).arg(&outp).output().unwrap();
            assert!(o.status.success(), "{o:?}");
            let bytes = std::fs::read(&outp).unwrap();
            let (want, want_labels) = make_batch(&ds, &indices, aug, seed, &norm);
            let count = b * c * h * w;
            let (vals, labs) = match precision {
                Precision::F32 => {
                    let got: Vec<u32> = bytes[..4 * count]
                        .chunks_exact(4)
                        .map(|x| u32::from_le_bytes([x[0], x[1], x[2], x[3]]))
                        .collect();
                    let w: Vec<u32> = want.data.iter().map(|v| v.to_bits()).collect();
                    assert_eq!(got, w, "f32 augment={aug}");
                    (4 * count, &bytes[4 * count..])
                }
                Precision::Bf16 => {
                    let got: Vec<u16> = bytes[..2 * count]
                        .chunks_exact(2)
                        .map(|x| u16::from_le_bytes([x[0], x[1]]))
                        .collect();
                    let w: Vec<u16> = want.data.iter().map(|&v| f32_to_bf16(v)).collect();
                    assert_eq!(got, w, "bf16 augment={aug}");
                    (2 * count, &bytes[2 * count..])
                }
            };
            let _ = vals;
            let got_labels: Vec<i32> = labs
                .chunks_exact(4)
                .map(|x| i32::from_le_bytes([x[0], x[1], x[2], x[3]]))
                .collect();
            let wl: Vec<i32> = want_labels.iter().map(|&l| l as i32).collect();
            assert_eq!(got_labels, wl);
        }
    }
}
