//! Checkpoints: round trip, determinism, damage detection, atomicity, name/shape checks.

use std::collections::BTreeMap;
use std::path::Path;

use wrnc_runtime::checkpoint::{self, Checkpoint, CheckpointError, TrainState, LAST};
use wrnc_runtime::Tensor;

fn t(shape: &[usize], start: f32) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::from_vec(shape, (0..n).map(|i| start + i as f32 * 0.25).collect())
}

fn sample() -> Checkpoint {
    let tensors = BTreeMap::from([
        ("0.weight".to_string(), t(&[4, 3, 3, 3], -1.0)),
        ("1.weight".to_string(), t(&[4], 1.0)),
        ("1.bias".to_string(), t(&[4], 0.5)),
        ("1.running_mean".to_string(), t(&[4], 0.0)),
        ("1.running_var".to_string(), t(&[4], 2.0)),
        ("5.weight".to_string(), t(&[10, 4], 3.0)),
        ("5.bias".to_string(), t(&[10], -3.0)),
    ]);
    let momentum = BTreeMap::from([
        ("0.weight".to_string(), t(&[4, 3, 3, 3], 0.125)),
        ("5.bias".to_string(), t(&[10], 9.0)),
    ]);
    Checkpoint {
        tensors,
        momentum,
        meta: TrainState {
            net: "WRN-16-1".into(),
            epoch: 3,
            step: 1173,
            seed: 42,
            data_seed: 43,
            batch_in_epoch: 0,
            extra: BTreeMap::from([("lr".to_string(), serde_json::json!(0.02))]),
        },
    }
}

#[test]
fn round_trip_and_determinism() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = sample();
    let path = checkpoint::save(tmp.path(), &ck).unwrap();
    assert_eq!(path, tmp.path().join(LAST));
    assert_eq!(checkpoint::load(tmp.path()).unwrap(), ck);
    assert_eq!(checkpoint::load(&path).unwrap(), ck);
    assert_eq!(checkpoint::load_weights(&path).unwrap(), ck.tensors);
    let first = std::fs::read(&path).unwrap();
    checkpoint::save(tmp.path(), &ck).unwrap();
    assert_eq!(
        std::fs::read(&path).unwrap(),
        first,
        "same checkpoint, same bytes"
    );
    // Only the checkpoint is left in the folder.
    let names: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec![LAST.to_string()]);
}

/// The file is plain safetensors: an 8-byte little-endian header length, a JSON header with
/// F32 tensors under the given names, `momentum.` names, and string metadata.
#[test]
fn file_is_plain_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    let path = checkpoint::save(tmp.path(), &sample()).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert_eq!(header["0.weight"]["dtype"], "F32");
    assert_eq!(header["0.weight"]["shape"], serde_json::json!([4, 3, 3, 3]));
    assert_eq!(header["1.running_var"]["shape"], serde_json::json!([4]));
    assert!(header["momentum.5.bias"].is_object());
    let meta = &header["__metadata__"];
    let wrnc: serde_json::Value = serde_json::from_str(meta["wrnc"].as_str().unwrap()).unwrap();
    assert_eq!(wrnc["state"]["step"], 1173);
    // Data of 1.bias: offsets into the data section, little-endian f32.
    let off = header["1.bias"]["data_offsets"][0].as_u64().unwrap() as usize;
    let at = 8 + n + off;
    assert_eq!(
        f32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()),
        0.5
    );
}

#[test]
fn foreign_file_loads_with_default_state() {
    let tmp = tempfile::tempdir().unwrap();
    let data: Vec<u8> = [1.5f32, -2.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2], &data).unwrap();
    let bytes = safetensors::serialize([("fc.bias", view)], None).unwrap();
    let p = tmp.path().join("py.safetensors");
    std::fs::write(&p, bytes).unwrap();
    let ck = checkpoint::load(&p).unwrap();
    assert_eq!(ck.meta, TrainState::default());
    assert_eq!(ck.tensors["fc.bias"].data, vec![1.5, -2.0]);
}

fn expect_corrupt(path: &Path, what: &str, needle: &str) {
    let err = checkpoint::load(path).expect_err(what);
    let msg = err.to_string();
    assert!(
        matches!(err, CheckpointError::Corrupt { .. }),
        "{what}: {msg}"
    );
    assert!(msg.contains(&path.display().to_string()), "{what}: {msg}");
    assert!(msg.contains(needle), "{what}: {msg:?} lacks {needle:?}");
}

#[test]
fn damaged_files_are_refused_with_their_name() {
    let tmp = tempfile::tempdir().unwrap();
    let path = checkpoint::save(tmp.path(), &sample()).unwrap();
    let good = std::fs::read(&path).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated data",
            good[..good.len() - 10].to_vec(),
            "truncated or damaged",
        ),
        ("truncated header", good[..100].to_vec(), "truncated"),
        ("tiny", good[..3].to_vec(), "shorter than the 8-byte header"),
        ("empty", vec![], "truncated"),
        (
            "flipped data byte",
            {
                let mut b = good.clone();
                let i = b.len() - 5;
                b[i] ^= 0x40;
                b
            },
            "checksum mismatch",
        ),
        (
            "garbage header",
            {
                let mut b = good.clone();
                b[10] = b'#';
                b
            },
            "not a valid checkpoint",
        ),
    ];
    for (what, bytes, needle) in cases {
        std::fs::write(&path, &bytes).unwrap();
        expect_corrupt(&path, what, needle);
    }
    let missing = tmp.path().join("nope.safetensors");
    let msg = checkpoint::load(&missing).unwrap_err().to_string();
    assert!(msg.contains("nope.safetensors"), "{msg}");
}

#[test]
fn crash_while_saving_leaves_the_last_good_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = sample();
    checkpoint::save(tmp.path(), &ck).unwrap();
    // A crash mid-write leaves a partial temp file (and no rename).
    let tmpfile = tmp
        .path()
        .join(format!(".{LAST}.tmp{}", std::process::id()));
    std::fs::write(&tmpfile, b"partial").unwrap();
    std::fs::write(tmp.path().join(format!(".{LAST}.tmp99999")), b"older crash").unwrap();
    assert_eq!(checkpoint::load(tmp.path()).unwrap(), ck);
    // The next save goes through and replaces this process's temp file.
    let mut next = ck.clone();
    next.meta.epoch = 4;
    checkpoint::save(tmp.path(), &next).unwrap();
    assert_eq!(checkpoint::load(tmp.path()).unwrap().meta.epoch, 4);
    assert!(!tmpfile.exists());
}

#[test]
fn invalid_checkpoints_are_not_written() {
    let tmp = tempfile::tempdir().unwrap();
    let mut ck = sample();
    ck.tensors.get_mut("1.bias").unwrap().data.push(1.0);
    let msg = checkpoint::save(tmp.path(), &ck).unwrap_err().to_string();
    assert!(
        msg.contains("1.bias") && msg.contains("5 values for shape [4]"),
        "{msg}"
    );
    let mut ck = sample();
    ck.tensors.insert("momentum.x".into(), t(&[1], 0.0));
    let msg = checkpoint::save(tmp.path(), &ck).unwrap_err().to_string();
    assert!(msg.contains("momentum.x"), "{msg}");
    assert!(!tmp.path().join(LAST).exists());
}

#[test]
fn check_against_names_the_first_mismatch() {
    let w = sample().tensors;
    let spec = |extra: &[(&str, &[usize])]| -> Vec<(String, Vec<usize>)> {
        let mut v: Vec<(String, Vec<usize>)> = w
            .iter()
            .map(|(n, t)| (n.clone(), t.shape.clone()))
            .collect();
        for (n, s) in extra {
            match v.iter_mut().find(|(m, _)| m == n) {
                Some(e) => e.1 = s.to_vec(),
                None => v.push((n.to_string(), s.to_vec())),
            }
        }
        v
    };
    type Spec = Vec<(String, Vec<usize>)>;
    let cases: Vec<(&str, Spec, Option<&str>)> = vec![
        ("exact", spec(&[]), None),
        (
            "missing",
            spec(&[("7.weight", &[10, 4])]),
            Some("tensor 7.weight is missing from the checkpoint (expected shape [10, 4])"),
        ),
        (
            "shape",
            spec(&[("5.weight", &[100, 4])]),
            Some(
                "tensor 5.weight has shape [10, 4] in the checkpoint, the network expects [100, 4]",
            ),
        ),
        (
            "unexpected",
            spec(&[])
                .into_iter()
                .filter(|(n, _)| n != "1.bias")
                .collect(),
            Some("tensor 1.bias is in the checkpoint but not in the network"),
        ),
    ];
    for (what, expected, want) in cases {
        let got = checkpoint::check_against(&w, &expected)
            .err()
            .map(|e| e.to_string());
        assert_eq!(got.as_deref(), want, "{what}");
    }
}

fn graph(text: &str) -> wrnc_compiler::graph::Graph {
    use wrnc_grammar::{build, Source};
    build(&Source::inline(text)).unwrap_or_else(|d| panic!("{text}\n{d:?}"))
}

#[test]
fn expected_tensors_of_a_real_network() {
    let g = graph("WRN-16-1@cifar10");
    let expected = checkpoint::expected_tensors(&g);
    let names: Vec<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    let shapes: Vec<&[usize]> = expected.iter().map(|(_, s)| s.as_slice()).collect();
    // The stem convolution and the classifier, whatever the nodes are called.
    assert!(
        shapes.contains(&[16usize, 3, 3, 3].as_slice()),
        "{expected:?}"
    );
    assert!(shapes.contains(&[10usize, 64].as_slice()), "{expected:?}");
    // Every BN has its four tensors, each of its channel count.
    for (n, s) in &expected {
        if let Some(node) = n.strip_suffix(".running_mean") {
            for suffix in ["weight", "bias", "running_var"] {
                let i = names.iter().position(|m| *m == format!("{node}.{suffix}"));
                let i = i.unwrap_or_else(|| panic!("{node}.{suffix} missing"));
                assert_eq!(shapes[i], s.as_slice());
            }
        }
    }
    let params: usize = g
        .params()
        .iter()
        .map(|(_, p)| p.shape.iter().product::<usize>())
        .sum();
    assert_eq!(params, 175_066, "WRN-16-1 has 0.175M parameters");
    // A checkpoint of this graph round-trips and matches; WRN-16-2's does not.
    let ck = Checkpoint {
        tensors: expected
            .iter()
            .map(|(n, s)| (n.clone(), Tensor::zeros(s)))
            .collect(),
        ..Checkpoint::default()
    };
    let tmp = tempfile::tempdir().unwrap();
    checkpoint::save(tmp.path(), &ck).unwrap();
    let w = checkpoint::load_weights(tmp.path()).unwrap();
    checkpoint::check_against(&w, &expected).unwrap();
    // CIFAR-100's classifier has another shape; WRN-16-2's first block has a shared
    // pre-activation that WRN-16-1's lacks.
    for (other, want) in [
        (
            "WRN-16-1@cifar100",
            "has shape [10, 64] in the checkpoint, the network expects [100, 64]",
        ),
        ("WRN-16-2@cifar10", "tensor 1.pre.0.weight is missing"),
    ] {
        let err = checkpoint::check_against(&w, &checkpoint::expected_tensors(&graph(other)))
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{other}: {err}");
    }
}
