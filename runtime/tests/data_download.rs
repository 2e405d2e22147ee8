//! The offline half of the download: MD5 check and unpacking of an archive the test makes.
//! (The network half, `fetch`, is a plain HTTP GET and is not run here: no network.)

use std::path::Path;

use wrnc_compiler::ast::Dataset as Kind;
use wrnc_runtime::data::download::{self, md5_file, verify_and_unpack};
use wrnc_runtime::data::{self, DataError, Split};

#[test]
fn md5_of_known_strings() {
    let tmp = tempfile::tempdir().unwrap();
    for (text, md5) in [
        ("", "d41d8cd98f00b204e9800998ecf8427e"),
        ("abc", "900150983cd24fb0d6963f7d28e17f72"),
        (
            "The quick brown fox jumps over the lazy dog",
            "9e107d9d372bb6826bd81d3542a419d6",
        ),
    ] {
        let p = tmp.path().join("f");
        std::fs::write(&p, text).unwrap();
        assert_eq!(md5_file(&p).unwrap(), md5, "{text:?}");
    }
}

#[test]
fn official_archives() {
    let a = download::archive(Kind::Cifar10).unwrap();
    assert_eq!(a.md5, "c32a1d4ab5d03f1284b67883e8d87530");
    assert!(a.url.ends_with("/cifar-10-binary.tar.gz"));
    let a = download::archive(Kind::Cifar100).unwrap();
    assert_eq!(a.md5, "03b5dce01913d631647c71ecec9e9cb8");
    assert!(a.url.ends_with("/cifar-100-binary.tar.gz"));
    for k in [Kind::Svhn, Kind::Imagenet] {
        let e = download::archive(k).unwrap_err();
        assert!(matches!(e, DataError::Unsupported(_)), "{e}");
    }
}

/// A miniature `cifar-10-binary.tar.gz`: one record per batch.
fn mini_archive(path: &Path) {
    let f = std::fs::File::create(path).unwrap();
    let gz = flate2::write::GzEncoder::new(f, flate2::Compression::default());
    let mut b = tar::Builder::new(gz);
    let names = [
        "data_batch_1.bin",
        "data_batch_2.bin",
        "data_batch_3.bin",
        "data_batch_4.bin",
        "data_batch_5.bin",
        "test_batch.bin",
    ];
    for (i, name) in names.iter().enumerate() {
        let mut rec = vec![i as u8];
        rec.extend(std::iter::repeat_n(i as u8 * 10, 3072));
        let mut h = tar::Header::new_gnu();
        h.set_size(rec.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(
            &mut h,
            format!("cifar-10-batches-bin/{name}"),
            rec.as_slice(),
        )
        .unwrap();
    }
    b.into_inner().unwrap().finish().unwrap();
}

#[test]
fn verified_archive_unpacks_to_a_loadable_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("cifar-10-binary.tar.gz");
    mini_archive(&archive);
    let md5 = md5_file(&archive).unwrap();
    let to = tmp.path().join("data");
    std::fs::create_dir_all(&to).unwrap();
    verify_and_unpack(&archive, &md5.to_uppercase(), &to).unwrap();
    let ds = data::load(Kind::Cifar10, &to, Split::Train).unwrap();
    assert_eq!(ds.labels, vec![0, 1, 2, 3, 4]);
    let ds = data::load(Kind::Cifar10, &to.join("cifar-10-batches-bin"), Split::Test).unwrap();
    assert_eq!((ds.labels.clone(), ds.images[0]), (vec![5], 50));
}

#[test]
fn wrong_md5_is_refused_before_unpacking() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("cifar-10-binary.tar.gz");
    mini_archive(&archive);
    let to = tmp.path().join("data");
    std::fs::create_dir_all(&to).unwrap();
    let err = verify_and_unpack(&archive, "c32a1d4ab5d03f1284b67883e8d87530", &to).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DataError::Checksum { .. }), "{msg}");
    assert!(
        msg.contains("cifar-10-binary.tar.gz") && msg.contains("c32a1d4a"),
        "{msg}"
    );
    assert_eq!(
        std::fs::read_dir(&to).unwrap().count(),
        0,
        "nothing unpacked"
    );
}
