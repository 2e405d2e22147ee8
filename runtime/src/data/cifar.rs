//! The official CIFAR-10 and CIFAR-100 binary releases, as folders or as their `.tar.gz`.
//!
//! A CIFAR-10 record is 1 label byte + 3072 pixel bytes; a CIFAR-100 record is a coarse label
//! byte, a fine label byte (the one used) + 3072 pixel bytes. Pixels are the R, G, B planes of a
//! 32x32 image, row-major, which is already the channel-major layout of [`Dataset`].

use std::cell::Cell;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use super::{read_file, read_member, DataError, Dataset, DatasetKind, Split, CIFAR10_CLASSES};

const PIXELS: usize = 3 * 32 * 32;

/// Where a binary release lies.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Source {
    /// The folder holding the `.bin` files.
    Dir(PathBuf),
    /// The `.tar.gz` archive.
    TarGz(PathBuf),
}

/// The file names of one release.
struct Release {
    folder: &'static str,
    archive: &'static str,
    train: &'static [&'static str],
    test: &'static [&'static str],
    meta: &'static str,
    /// Bytes before the pixels, and which of them is the label.
    label_bytes: usize,
    label_at: usize,
    classes: usize,
}

const CIFAR10: Release = Release {
    folder: "cifar-10-batches-bin",
    archive: "cifar-10-binary.tar.gz",
    train: &[
        "data_batch_1.bin",
        "data_batch_2.bin",
        "data_batch_3.bin",
        "data_batch_4.bin",
        "data_batch_5.bin",
    ],
    test: &["test_batch.bin"],
    meta: "batches.meta.txt",
    label_bytes: 1,
    label_at: 0,
    classes: 10,
};

const CIFAR100: Release = Release {
    folder: "cifar-100-binary",
    archive: "cifar-100-binary.tar.gz",
    train: &["train.bin"],
    test: &["test.bin"],
    meta: "fine_label_names.txt",
    label_bytes: 2,
    label_at: 1,
    classes: 100,
};

fn release(kind: DatasetKind) -> Option<&'static Release> {
    match kind {
        DatasetKind::Cifar10 => Some(&CIFAR10),
        DatasetKind::Cifar100 => Some(&CIFAR100),
        _ => None,
    }
}

impl Release {
    fn members(&self, split: Split) -> &'static [&'static str] {
        match split {
            Split::Train => self.train,
            Split::Test => self.test,
        }
    }
    fn record_len(&self) -> usize {
        self.label_bytes + PIXELS
    }
}

fn is_tar_gz(path: &Path) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    name.ends_with(".tar.gz") || name.ends_with(".tgz")
}

/// Finds a binary release of `kind` at `path` (see [`super::load`] for the layouts).
pub(crate) fn find(
    kind: DatasetKind,
    path: &Path,
    split: Split,
) -> Result<Option<Source>, DataError> {
    let Some(rel) = release(kind) else {
        return Ok(None);
    };
    if path.is_file() {
        return Ok(is_tar_gz(path).then(|| Source::TarGz(path.to_path_buf())));
    }
    if !path.is_dir() {
        return Ok(None);
    }
    let has_members = |dir: &Path| rel.members(split).iter().any(|m| dir.join(m).is_file());
    if has_members(path) {
        return Ok(Some(Source::Dir(path.to_path_buf())));
    }
    let sub = path.join(rel.folder);
    if sub.is_dir() && has_members(&sub) {
        return Ok(Some(Source::Dir(sub)));
    }
    let archive = path.join(rel.archive);
    if archive.is_file() {
        return Ok(Some(Source::TarGz(archive)));
    }
    Ok(None)
}

/// Loads one split from a binary release found by [`find`].
pub(crate) fn load(kind: DatasetKind, source: &Source, split: Split) -> Result<Dataset, DataError> {
    let rel = release(kind)
        .ok_or_else(|| DataError::Unsupported(format!("{} has no binary release", kind.name())))?;
    let wanted = rel.members(split);
    // (path for messages, bytes) of each wanted member in order, and the meta file if any.
    let (files, meta): Members = match source {
        Source::Dir(dir) => {
            let mut files = Vec::new();
            for m in wanted {
                let p = dir.join(m);
                let bytes = read_file(&p)?;
                files.push((p, bytes));
            }
            let mp = dir.join(rel.meta);
            let meta = if mp.is_file() {
                Some((mp.clone(), read_file(&mp)?))
            } else {
                None
            };
            (files, meta)
        }
        Source::TarGz(archive) => read_tar_gz(archive, rel, wanted)?,
    };

    let mut images = Vec::new();
    let mut labels = Vec::new();
    for (path, bytes) in &files {
        parse(rel, path, bytes, &mut images, &mut labels)?;
    }
    let class_names = match meta {
        Some((path, bytes)) => parse_names(&path, &bytes, rel.classes)?,
        None => default_names(kind),
    };
    Ok(Dataset {
        n: labels.len(),
        images,
        labels,
        c: 3,
        h: 32,
        w: 32,
        classes: rel.classes,
        class_names,
    })
}

/// A reader that counts the bytes taken from the underlying file, so an error in a compressed
/// stream can say where it happened.
pub(super) struct Counting<R> {
    pub(super) inner: R,
    pub(super) count: Rc<Cell<u64>>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.set(self.count.get() + n as u64);
        Ok(n)
    }
}

type Members = (Vec<(PathBuf, Vec<u8>)>, Option<(PathBuf, Vec<u8>)>);

fn read_tar_gz(archive: &Path, rel: &Release, wanted: &[&str]) -> Result<Members, DataError> {
    let file = std::fs::File::open(archive).map_err(|e| DataError::io(archive, e))?;
    let count = Rc::new(Cell::new(0u64));
    let reader = Counting {
        inner: std::io::BufReader::new(file),
        count: count.clone(),
    };
    let corrupt = |e: std::io::Error| DataError::Corrupt {
        path: archive.to_path_buf(),
        offset: count.get(),
        message: e.to_string(),
    };
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(reader));
    let mut found: Vec<Option<(PathBuf, Vec<u8>)>> = vec![None; wanted.len()];
    let mut meta = None;
    for entry in tar.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let member = entry.path().map_err(corrupt)?.into_owned();
        let Some(name) = member
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_owned)
        else {
            continue;
        };
        if let Some(i) = wanted.iter().position(|w| *w == name) {
            let bytes = read_member(&mut entry, archive, &member).map_err(|e| match e {
                DataError::Truncated { path, message, .. } => DataError::Truncated {
                    path,
                    offset: count.get(),
                    message: format!("{message} (byte offset in the compressed archive)"),
                },
                e => e,
            })?;
            found[i] = Some((archive.join(&member), bytes));
        } else if name == rel.meta {
            let bytes = read_member(&mut entry, archive, &member)?;
            meta = Some((archive.join(&member), bytes));
        }
    }
    let mut files = Vec::new();
    for (f, w) in found.into_iter().zip(wanted) {
        match f {
            Some(f) => files.push(f),
            None => {
                return Err(DataError::invalid(
                    archive,
                    format!("the archive has no member {}/{w}", rel.folder),
                ))
            }
        }
    }
    Ok((files, meta))
}

/// Appends the records of one `.bin` file.
fn parse(
    rel: &Release,
    path: &Path,
    bytes: &[u8],
    images: &mut Vec<u8>,
    labels: &mut Vec<u16>,
) -> Result<(), DataError> {
    let rec = rel.record_len();
    if bytes.is_empty() {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            offset: 0,
            message: format!("empty file, expected records of {rec} bytes"),
        });
    }
    let full = bytes.len() / rec;
    let rest = bytes.len() % rec;
    if rest != 0 {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            offset: (full * rec) as u64,
            message: format!("record {full} has {rest} of its {rec} bytes"),
        });
    }
    images.reserve(full * PIXELS);
    labels.reserve(full);
    for (r, record) in bytes.chunks_exact(rec).enumerate() {
        let label = record[rel.label_at];
        if label as usize >= rel.classes {
            return Err(DataError::LabelOutOfRange {
                path: path.to_path_buf(),
                record: r,
                offset: (r * rec + rel.label_at) as u64,
                label: label as u32,
                classes: rel.classes,
            });
        }
        labels.push(label as u16);
        images.extend_from_slice(&record[rel.label_bytes..]);
    }
    Ok(())
}

/// Class names from `batches.meta.txt` / `fine_label_names.txt`: one a line, blank lines
/// ignored; there must be exactly `classes` of them.
fn parse_names(path: &Path, bytes: &[u8], classes: usize) -> Result<Vec<String>, DataError> {
    let text = std::str::from_utf8(bytes).map_err(|e| DataError::Corrupt {
        path: path.to_path_buf(),
        offset: e.valid_up_to() as u64,
        message: "not UTF-8 text".into(),
    })?;
    let names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    if names.len() != classes {
        return Err(DataError::invalid(
            path,
            format!("{} class names, expected {classes}", names.len()),
        ));
    }
    Ok(names)
}

/// The official names when the release's meta file is absent.
fn default_names(kind: DatasetKind) -> Vec<String> {
    match kind {
        DatasetKind::Cifar10 => CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect(),
        _ => CIFAR100_CLASSES.iter().map(|s| s.to_string()).collect(),
    }
}

/// The official CIFAR-100 fine class names, in label order.
pub const CIFAR100_CLASSES: [&str; 100] = [
    "apple",
    "aquarium_fish",
    "baby",
    "bear",
    "beaver",
    "bed",
    "bee",
    "beetle",
    "bicycle",
    "bottle",
    "bowl",
    "boy",
    "bridge",
    "bus",
    "butterfly",
    "camel",
    "can",
    "castle",
    "caterpillar",
    "cattle",
    "chair",
    "chimpanzee",
    "clock",
    "cloud",
    "cockroach",
    "couch",
    "crab",
    "crocodile",
    "cup",
    "dinosaur",
    "dolphin",
    "elephant",
    "flatfish",
    "forest",
    "fox",
    "girl",
    "hamster",
    "house",
    "kangaroo",
    "keyboard",
    "lamp",
    "lawn_mower",
    "leopard",
    "lion",
    "lizard",
    "lobster",
    "man",
    "maple_tree",
    "motorcycle",
    "mountain",
    "mouse",
    "mushroom",
    "oak_tree",
    "orange",
    "orchid",
    "otter",
    "palm_tree",
    "pear",
    "pickup_truck",
    "pine_tree",
    "plain",
    "plate",
    "poppy",
    "porcupine",
    "possum",
    "rabbit",
    "raccoon",
    "ray",
    "road",
    "rocket",
    "rose",
    "sea",
    "seal",
    "shark",
    "shrew",
    "skunk",
    "skyscraper",
    "snail",
    "snake",
    "spider",
    "squirrel",
    "streetcar",
    "sunflower",
    "sweet_pepper",
    "table",
    "tank",
    "telephone",
    "television",
    "tiger",
    "tractor",
    "train",
    "trout",
    "tulip",
    "turtle",
    "wardrobe",
    "whale",
    "willow_tree",
    "wolf",
    "woman",
    "worm",
];
