//! Loading every accepted layout from tiny data sets written into a temp dir, and the errors
//! for broken ones. Nothing here reads /work/shared or the network.

use std::io::Write;
use std::path::{Path, PathBuf};

use wrnc_compiler::ast::Dataset as Kind;
use wrnc_runtime::data::{self, DataError, Dataset, Split, CIFAR10_CLASSES};

const PIX: usize = 3072;

/// A recognisable image: every byte depends on (record id, position).
fn pixels(id: usize) -> Vec<u8> {
    (0..PIX).map(|i| ((i * 7 + id * 31) % 251) as u8).collect()
}

/// CIFAR-10 records: (label, image id).
fn c10_records(recs: &[(u8, usize)]) -> Vec<u8> {
    let mut out = Vec::new();
    for &(l, id) in recs {
        out.push(l);
        out.extend(pixels(id));
    }
    out
}

/// The records of the CIFAR-10 fixture: train batch b holds ids 10b..10b+2, test ids 100, 101.
fn c10_batch(b: usize) -> Vec<(u8, usize)> {
    if b == 0 {
        vec![(3, 100), (9, 101)]
    } else {
        (0..3)
            .map(|i| (((b * 3 + i) % 10) as u8, b * 10 + i))
            .collect()
    }
}

fn c10_files() -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = (1..=5)
        .map(|b| (format!("data_batch_{b}.bin"), c10_records(&c10_batch(b))))
        .collect();
    files.push(("test_batch.bin".into(), c10_records(&c10_batch(0))));
    let meta = CIFAR10_CLASSES.join("\n") + "\n\n";
    files.push(("batches.meta.txt".into(), meta.into_bytes()));
    files
}

fn write_files(dir: &Path, files: &[(String, Vec<u8>)]) {
    std::fs::create_dir_all(dir).unwrap();
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

fn tar_gz(path: &Path, folder: &str, files: &[(String, Vec<u8>)]) {
    let f = std::fs::File::create(path).unwrap();
    let gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
    let mut b = tar::Builder::new(gz);
    for (name, bytes) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, format!("{folder}/{name}"), bytes.as_slice())
            .unwrap();
    }
    b.into_inner().unwrap().finish().unwrap();
}

/// What a loaded split should be: labels and image ids in order.
fn expect_c10(split: Split) -> Vec<(u8, usize)> {
    match split {
        Split::Train => (1..=5).flat_map(c10_batch).collect(),
        Split::Test => c10_batch(0),
    }
}

fn check_loaded(ds: &Dataset, expect: &[(u8, usize)], classes: usize) {
    assert_eq!(ds.check(), Ok(()));
    assert_eq!(
        (ds.n, ds.c, ds.h, ds.w, ds.classes),
        (expect.len(), 3, 32, 32, classes)
    );
    for (i, &(l, id)) in expect.iter().enumerate() {
        assert_eq!(ds.labels[i], l as u16, "label of image {i}");
        assert_eq!(ds.image(i), pixels(id).as_slice(), "pixels of image {i}");
    }
}

#[test]
fn cifar10_binary_layouts() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // Folder (given as itself and as its parent) and archive (as file and as its folder).
    write_files(&root.join("bin/cifar-10-batches-bin"), &c10_files());
    std::fs::create_dir_all(root.join("gz")).unwrap();
    tar_gz(
        &root.join("gz/cifar-10-binary.tar.gz"),
        "cifar-10-batches-bin",
        &c10_files(),
    );
    for path in [
        root.join("bin"),
        root.join("bin/cifar-10-batches-bin"),
        root.join("gz"),
        root.join("gz/cifar-10-binary.tar.gz"),
    ] {
        for split in [Split::Train, Split::Test] {
            let ds = data::load(Kind::Cifar10, &path, split)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            check_loaded(&ds, &expect_c10(split), 10);
            assert_eq!(ds.class_names, CIFAR10_CLASSES.to_vec());
        }
    }
}

#[test]
fn cifar10_without_meta_uses_official_names() {
    let tmp = tempfile::tempdir().unwrap();
    let files: Vec<_> = c10_files()
        .into_iter()
        .filter(|(n, _)| n.ends_with(".bin"))
        .collect();
    write_files(tmp.path(), &files);
    let ds = data::load(Kind::Cifar10, tmp.path(), Split::Test).unwrap();
    assert_eq!(ds.class_names, CIFAR10_CLASSES.to_vec());
}

#[test]
fn cifar100_uses_the_fine_label() {
    let tmp = tempfile::tempdir().unwrap();
    let rec = |coarse: u8, fine: u8, id: usize| {
        let mut v = vec![coarse, fine];
        v.extend(pixels(id));
        v
    };
    let train = [rec(1, 99, 1), rec(19, 0, 2), rec(4, 57, 3)].concat();
    let test = [rec(2, 42, 4)].concat();
    let files = vec![
        ("train.bin".to_string(), train),
        ("test.bin".to_string(), test),
    ];
    write_files(&tmp.path().join("cifar-100-binary"), &files);
    tar_gz(&tmp.path().join("c100.tar.gz"), "cifar-100-binary", &files);
    for path in [tmp.path().to_path_buf(), tmp.path().join("c100.tar.gz")] {
        let ds = data::load(Kind::Cifar100, &path, Split::Train).unwrap();
        check_loaded(&ds, &[(99, 1), (0, 2), (57, 3)], 100);
        assert_eq!(ds.class_names[99], "worm");
        assert_eq!(ds.class_names[0], "apple");
        let ds = data::load(Kind::Cifar100, &path, Split::Test).unwrap();
        check_loaded(&ds, &[(42, 4)], 100);
    }
}

/// One broken-input case: how to break a valid CIFAR-10 folder, and what the error must say.
struct Broken {
    what: &'static str,
    split: Split,
    /// Files to overwrite (name, bytes); an empty name removes nothing.
    files: Vec<(String, Vec<u8>)>,
    remove: &'static [&'static str],
    /// Substrings the message must contain.
    expect: &'static [&'static str],
}

#[test]
fn broken_cifar_folders_are_named_errors() {
    let bad_label = {
        let mut v = c10_records(&[(1, 1), (2, 2), (10, 3)]);
        v.truncate(v.len());
        v
    };
    let mut truncated = c10_records(&c10_batch(3));
    truncated.extend([7u8; 100]);
    let cases = vec![
        Broken {
            what: "truncated batch",
            split: Split::Train,
            files: vec![("data_batch_3.bin".into(), truncated)],
            remove: &[],
            expect: &[
                "data_batch_3.bin",
                "truncated at byte 9219",
                "record 3 has 100 of its 3073 bytes",
            ],
        },
        Broken {
            what: "label out of range",
            split: Split::Test,
            files: vec![("test_batch.bin".into(), bad_label)],
            remove: &[],
            expect: &[
                "test_batch.bin",
                "record 2",
                "byte 6146",
                "label 10",
                "10 classes",
            ],
        },
        Broken {
            what: "empty batch",
            split: Split::Test,
            files: vec![("test_batch.bin".into(), vec![])],
            remove: &[],
            expect: &["test_batch.bin", "empty file"],
        },
        Broken {
            what: "missing batch",
            split: Split::Train,
            files: vec![],
            remove: &["data_batch_4.bin"],
            expect: &["data_batch_4.bin"],
        },
        Broken {
            what: "meta with the wrong count",
            split: Split::Test,
            files: vec![("batches.meta.txt".into(), b"cat\ndog\n".to_vec())],
            remove: &[],
            expect: &["batches.meta.txt", "2 class names, expected 10"],
        },
    ];
    for case in cases {
        let tmp = tempfile::tempdir().unwrap();
        write_files(tmp.path(), &c10_files());
        write_files(tmp.path(), &case.files);
        for r in case.remove {
            std::fs::remove_file(tmp.path().join(r)).unwrap();
        }
        let err = data::load(Kind::Cifar10, tmp.path(), case.split)
            .expect_err(case.what)
            .to_string();
        for e in case.expect {
            assert!(err.contains(e), "{}: {err:?} lacks {e:?}", case.what);
        }
    }
}

#[test]
fn missing_data_lists_the_accepted_layouts() {
    let tmp = tempfile::tempdir().unwrap();
    for (kind, path) in [
        (Kind::Cifar10, tmp.path().join("nowhere")),
        (Kind::Cifar10, tmp.path().to_path_buf()),
        (Kind::Cifar100, tmp.path().to_path_buf()),
        (Kind::Svhn, tmp.path().to_path_buf()),
    ] {
        let err = data::load(kind, &path, Split::Train).unwrap_err();
        assert!(matches!(err, DataError::NotFound { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains(kind.name()), "{msg}");
        assert!(msg.contains("train/<class>"), "{msg}");
        if kind == Kind::Cifar10 {
            assert!(msg.contains("cifar-10-batches-bin"), "{msg}");
        }
    }
}

#[test]
fn corrupt_archive_names_the_archive() {
    let tmp = tempfile::tempdir().unwrap();
    let gz = tmp.path().join("cifar-10-binary.tar.gz");
    tar_gz(&gz, "cifar-10-batches-bin", &c10_files());
    let bytes = std::fs::read(&gz).unwrap();
    std::fs::write(&gz, &bytes[..bytes.len() / 2]).unwrap();
    let err = data::load(Kind::Cifar10, &gz, Split::Test)
        .unwrap_err()
        .to_string();
    assert!(err.contains("cifar-10-binary.tar.gz"), "{err}");
    // Garbage that is not gzip at all.
    std::fs::write(&gz, b"this is not a gzip stream at all").unwrap();
    let err = data::load(Kind::Cifar10, &gz, Split::Test)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cifar-10-binary.tar.gz") && err.contains("byte"),
        "{err}"
    );
}

// ---------------------------------------------------------------- image folders

/// A 32x32 image whose pixels encode (class, index).
fn rgb(class: usize, idx: usize) -> image::RgbImage {
    image::RgbImage::from_fn(32, 32, |x, y| {
        image::Rgb([(x * 8) as u8, (y * 8) as u8, (class * 20 + idx) as u8])
    })
}

/// CHW bytes of [`rgb`].
fn chw(class: usize, idx: usize) -> Vec<u8> {
    let img = rgb(class, idx);
    let mut out = vec![0u8; PIX];
    for (x, y, p) in img.enumerate_pixels() {
        for c in 0..3 {
            out[c * 1024 + (y * 32 + x) as usize] = p[c];
        }
    }
    out
}

/// Writes `DIR/<split>/<class>/<i>.png` for each class; class `j` gets `j % 3 + 1` images.
fn image_folder(dir: &Path, split: &str, classes: &[&str]) {
    for (j, class) in classes.iter().enumerate() {
        let d = dir.join(split).join(class);
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..(j % 3 + 1) {
            rgb(j, i).save(d.join(format!("{i:04}.png"))).unwrap();
        }
    }
}

/// (label, class index used to draw it, image index) in load order.
fn expected_folder(order: &[&str], written: &[&str]) -> Vec<(u16, usize, usize)> {
    let mut out = Vec::new();
    for (label, name) in order.iter().enumerate() {
        let j = written.iter().position(|w| w == name).unwrap();
        for i in 0..(j % 3 + 1) {
            out.push((label as u16, j, i));
        }
    }
    // Round robin over the classes: the i-th file of every class, in label order.
    out.sort_by_key(|&(label, _, i)| (i, label));
    out
}

#[test]
fn image_folder_uses_official_cifar10_order() {
    let tmp = tempfile::tempdir().unwrap();
    // Written in reverse order: the labels must still follow the official order.
    let written: Vec<&str> = CIFAR10_CLASSES.iter().rev().copied().collect();
    image_folder(tmp.path(), "train", &written);
    image_folder(tmp.path(), "test", &written);
    let ds = data::load(Kind::Cifar10, tmp.path(), Split::Train).unwrap();
    assert_eq!(ds.class_names, CIFAR10_CLASSES.to_vec());
    let expect = expected_folder(&CIFAR10_CLASSES, &written);
    assert_eq!(ds.n, expect.len());
    for (i, &(l, j, k)) in expect.iter().enumerate() {
        assert_eq!(ds.labels[i], l);
        assert_eq!(ds.image(i), chw(j, k).as_slice(), "image {i}");
    }
}

#[test]
fn image_folder_sorts_other_names_and_unions_splits() {
    let tmp = tempfile::tempdir().unwrap();
    let names = ["9", "8", "7", "6", "5", "4", "3", "2", "1", "0"];
    image_folder(tmp.path(), "train", &names);
    // The test split lacks class "0": its labels must still agree with train's.
    image_folder(tmp.path(), "test", &names[..9]);
    let sorted = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
    let train = data::load(Kind::Svhn, tmp.path(), Split::Train).unwrap();
    assert_eq!(train.class_names, sorted.to_vec());
    let test = data::load(Kind::Svhn, tmp.path(), Split::Test).unwrap();
    assert_eq!(test.class_names, sorted.to_vec());
    assert_eq!(test.class_counts()[0], 0);
    assert_eq!(test.class_counts()[9], train.class_counts()[9]);
    let expect = expected_folder(&sorted, &names);
    assert_eq!(train.labels, expect.iter().map(|e| e.0).collect::<Vec<_>>());
}

#[test]
fn jpeg_images_decode() {
    let tmp = tempfile::tempdir().unwrap();
    for (j, class) in CIFAR10_CLASSES.iter().enumerate() {
        let d = tmp.path().join("test").join(class);
        std::fs::create_dir_all(&d).unwrap();
        let flat = image::RgbImage::from_pixel(32, 32, image::Rgb([j as u8 * 20, 100, 200]));
        flat.save(d.join("a.JPG")).unwrap();
    }
    let ds = data::load(Kind::Cifar10, tmp.path(), Split::Test).unwrap();
    assert_eq!(ds.n, 10);
    for i in 0..10 {
        let img = ds.image(i);
        // A flat colour survives JPEG within a few levels.
        let near = |v: u8, want: u8| (v as i32 - want as i32).abs() <= 3;
        assert!(near(img[0], i as u8 * 20), "R of {i}: {}", img[0]);
        assert!(near(img[1024], 100) && near(img[2048], 200), "{i}");
    }
}

#[test]
fn broken_image_folders_are_named_errors() {
    struct Case {
        what: &'static str,
        /// Changes to a valid CIFAR-10 folder.
        setup: fn(&Path),
        expect: &'static [&'static str],
    }
    let cases = [
        Case {
            what: "wrong size",
            setup: |d| {
                image::RgbImage::new(31, 32)
                    .save(d.join("train/cat/big.png"))
                    .unwrap();
            },
            expect: &["big.png", "31x32", "expected 32x32"],
        },
        Case {
            what: "not an image",
            setup: |d| std::fs::write(d.join("train/dog/x.png"), b"not a png").unwrap(),
            expect: &["x.png", "cannot decode"],
        },
        Case {
            what: "too many classes",
            setup: |d| std::fs::create_dir_all(d.join("test/unicorn")).unwrap(),
            expect: &[
                "found 11 class folders",
                "in train/ and test/ together",
                "unicorn",
                "cifar10 has 10 classes",
            ],
        },
    ];
    for case in cases {
        let tmp = tempfile::tempdir().unwrap();
        image_folder(tmp.path(), "train", &CIFAR10_CLASSES);
        (case.setup)(tmp.path());
        let err = data::load(Kind::Cifar10, tmp.path(), Split::Train)
            .expect_err(case.what)
            .to_string();
        for e in case.expect {
            assert!(err.contains(e), "{}: {err:?} lacks {e:?}", case.what);
        }
    }
}

fn tar_xz(path: &Path, root: &Path, split: &str) {
    let f = std::fs::File::create(path).unwrap();
    let xz = xz2::write::XzEncoder::new(f, 1);
    let mut b = tar::Builder::new(xz);
    b.append_dir_all(split, root.join(split)).unwrap();
    b.into_inner().unwrap().finish().unwrap().flush().unwrap();
}

#[test]
fn tar_xz_reads_like_the_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    image_folder(&src, "train", &CIFAR10_CLASSES);
    image_folder(&src, "test", &CIFAR10_CLASSES);
    let arch = tmp.path().join("arch");
    std::fs::create_dir_all(&arch).unwrap();
    for split in ["train", "test"] {
        tar_xz(&arch.join(format!("{split}.tar.xz")), &src, split);
    }
    for split in [Split::Train, Split::Test] {
        let a = data::load(Kind::Cifar10, &src, split).unwrap();
        let b = data::load(Kind::Cifar10, &arch, split).unwrap();
        assert_eq!(a, b);
    }
    // A damaged archive names itself.
    let p: PathBuf = arch.join("test.tar.xz");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 40]).unwrap();
    let err = data::load(Kind::Cifar10, &arch, Split::Test)
        .unwrap_err()
        .to_string();
    assert!(err.contains("test.tar.xz"), "{err}");
}
