//! Data sets for training and evaluation: loading (CIFAR-10/100 binary releases, their
//! `.tar.gz`, image folders and the `.tar.xz` JPEG copy), augmentation and batching, and the
//! download of the official archives.
//!
//! Invariants of a loaded [`Dataset`]:
//! - `images.len() == n * c * h * w`, one image after another, each channel-major
//!   (`C x H x W`, the R plane, then G, then B), `u8` pixels.
//! - `labels.len() == n` and every label is `< classes`.
//! - `class_names.len() == classes`; label `i` is the class named `class_names[i]`.
//! - The order of the images is deterministic: the record order of the binary files, or
//!   (image folders) round robin over the classes in label order, files sorted by name within
//!   a class, so that the first N images are balanced across classes.
//!
//! Nothing here panics on a bad file and no allocation is sized by a number read from a file
//! header: buffers grow only with bytes that were actually read.

pub mod augment;
mod cifar;
pub mod download;
mod folder;
mod svhn;

use std::path::{Path, PathBuf};

pub use augment::{augment_seed, make_batch, shuffle, Normalization, PAD_PIXELS};
pub use wrnc_compiler::ast::Dataset as DatasetKind;

/// An in-memory data set of small images (see the module docs for the invariants).
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// `n x c x h x w` bytes, channel-major per image.
    pub images: Vec<u8>,
    pub labels: Vec<u16>,
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub classes: usize,
    pub class_names: Vec<String>,
}

impl Dataset {
    /// Bytes per image, `c * h * w`.
    pub fn image_len(&self) -> usize {
        self.c * self.h * self.w
    }

    /// The pixels of image `i` (`c x h x w`). Panics if `i >= n`.
    pub fn image(&self, i: usize) -> &[u8] {
        let len = self.image_len();
        &self.images[i * len..(i + 1) * len]
    }

    /// Checks the invariants listed in the module docs.
    pub fn check(&self) -> Result<(), String> {
        let want = self
            .n
            .checked_mul(self.image_len())
            .ok_or("image count overflows")?;
        if self.images.len() != want {
            return Err(format!(
                "{} image bytes for {} images of {}x{}x{}",
                self.images.len(),
                self.n,
                self.c,
                self.h,
                self.w
            ));
        }
        if self.labels.len() != self.n {
            return Err(format!(
                "{} labels for {} images",
                self.labels.len(),
                self.n
            ));
        }
        if self.class_names.len() != self.classes {
            return Err(format!(
                "{} class names for {} classes",
                self.class_names.len(),
                self.classes
            ));
        }
        if let Some((i, l)) = self
            .labels
            .iter()
            .enumerate()
            .find(|(_, &l)| l as usize >= self.classes)
        {
            return Err(format!("label {l} of image {i} is out of range"));
        }
        Ok(())
    }

    /// How many images each class has, indexed by label.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.classes];
        for &l in &self.labels {
            if let Some(c) = counts.get_mut(l as usize) {
                *c += 1;
            }
        }
        counts
    }
}

/// Which half of a data set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Test,
}

impl Split {
    /// `train` or `test`: the folder and archive names of the image-folder layouts.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}

/// Why a data set could not be loaded or fetched. Every variant names the file (for a member of
/// an archive: the archive's path joined with the member's path).
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: truncated at byte {offset}: {message}", path.display())]
    Truncated {
        path: PathBuf,
        offset: u64,
        message: String,
    },
    #[error("{}: corrupt at byte {offset}: {message}", path.display())]
    Corrupt {
        path: PathBuf,
        offset: u64,
        message: String,
    },
    #[error("{}: record {record} (byte {offset}): label {label} is out of range: the data set has {classes} classes", path.display())]
    LabelOutOfRange {
        path: PathBuf,
        record: usize,
        offset: u64,
        label: u32,
        classes: usize,
    },
    #[error("{}: image is {width}x{height}, expected {expected_width}x{expected_height}", path.display())]
    WrongSize {
        path: PathBuf,
        width: u32,
        height: u32,
        expected_width: u32,
        expected_height: u32,
    },
    #[error("{}: cannot decode image: {message}", path.display())]
    Decode { path: PathBuf, message: String },
    #[error("no {dataset} data for the {split} split at {}; accepted layouts:\n{layouts}", path.display())]
    NotFound {
        path: PathBuf,
        dataset: &'static str,
        split: &'static str,
        layouts: String,
    },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    #[error("{}: MD5 is {actual}, expected {expected}", path.display())]
    Checksum {
        path: PathBuf,
        actual: String,
        expected: String,
    },
    #[error("downloading {url}: {message}")]
    Download { url: String, message: String },
    #[error("{0}")]
    Unsupported(String),
}

impl DataError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> DataError {
        DataError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
    pub(crate) fn invalid(path: &Path, message: impl Into<String>) -> DataError {
        DataError::Invalid {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}

/// The official CIFAR-10 class names, in label order.
pub const CIFAR10_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// Loads one split of a data set from `path`.
///
/// Accepted layouts (the first that matches wins; binary releases before image folders):
/// - CIFAR-10: `cifar-10-batches-bin/` (`data_batch_1.bin`..`data_batch_5.bin`,
///   `test_batch.bin`, optional `batches.meta.txt`), given as that folder or its parent; or
///   `cifar-10-binary.tar.gz` given as the file or its folder.
/// - CIFAR-100: `cifar-100-binary/` (`train.bin`, `test.bin`, optional
///   `fine_label_names.txt`; the fine label is used), as that folder or its parent; or
///   `cifar-100-binary.tar.gz` as the file or its folder.
/// - Any data set: an image folder `DIR/train/<class>/*.{png,jpg,jpeg}` and
///   `DIR/test/<class>/*`, classes sorted by name (CIFAR-10's official order when the folders
///   are exactly its class names); or `DIR/train.tar.xz`/`DIR/test.tar.xz` holding that layout,
///   read without unpacking. Every image must have the data set's input size.
/// - SVHN: `train_32x32.mat` (followed by `extra_32x32.mat` when present) and
///   `test_32x32.mat` of the cropped-digits release, as their folder or one `.mat` file
///   (which is then the split, whichever is asked); label `d` is the digit `d`.
pub fn load(kind: DatasetKind, path: &Path, split: Split) -> Result<Dataset, DataError> {
    let svhn = match kind {
        DatasetKind::Svhn => svhn::find(path, split),
        _ => None,
    };
    if let Some(files) = svhn {
        let ds = svhn::load(&files)?;
        debug_assert_eq!(ds.check(), Ok(()));
        return Ok(ds);
    }
    let ds = match cifar::find(kind, path, split)? {
        Some(source) => cifar::load(kind, &source, split)?,
        None => match folder::find(path, split)? {
            Some(source) => folder::load(kind, &source, split)?,
            None => {
                return Err(DataError::NotFound {
                    path: path.to_path_buf(),
                    dataset: kind.name(),
                    split: split.name(),
                    layouts: layouts(kind),
                })
            }
        },
    };
    debug_assert_eq!(ds.check(), Ok(()));
    Ok(ds)
}

/// The layouts [`load`] accepts for `kind`, one a line (for error messages and `--help`).
pub fn layouts(kind: DatasetKind) -> String {
    let mut lines = Vec::new();
    match kind {
        DatasetKind::Cifar10 => {
            lines.push("  cifar-10-batches-bin/ with data_batch_1.bin..data_batch_5.bin and test_batch.bin (the folder or its parent)");
            lines.push("  cifar-10-binary.tar.gz (the file or its folder)");
        }
        DatasetKind::Cifar100 => {
            lines
                .push("  cifar-100-binary/ with train.bin and test.bin (the folder or its parent)");
            lines.push("  cifar-100-binary.tar.gz (the file or its folder)");
        }
        DatasetKind::Svhn => {
            lines.push("  train_32x32.mat (+ extra_32x32.mat, added to train when present) and test_32x32.mat: SVHN format 2, MATLAB v5 (the folder, or one .mat file)");
        }
        DatasetKind::Imagenet => {}
    }
    lines.push("  DIR/train/<class>/*.png|jpg|jpeg and DIR/test/<class>/* (image folders)");
    lines.push("  DIR/train.tar.xz and DIR/test.tar.xz holding train/<class>/* and test/<class>/*");
    lines.join("\n")
}

/// Reads a whole file; the buffer is sized by the bytes actually read.
pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>, DataError> {
    std::fs::read(path).map_err(|e| DataError::io(path, e))
}

/// Largest archive member read into memory (a CIFAR-100 `train.bin` is 153 MB).
pub(crate) const MAX_MEMBER: u64 = 1 << 30;

/// Reads the current entry of a tar archive, at most [`MAX_MEMBER`] bytes.
pub(crate) fn read_member(
    entry: &mut impl std::io::Read,
    archive: &Path,
    member: &Path,
) -> Result<Vec<u8>, DataError> {
    use std::io::Read;
    let mut buf = Vec::new();
    let at = archive.join(member);
    entry
        .take(MAX_MEMBER + 1)
        .read_to_end(&mut buf)
        .map_err(|e| DataError::Truncated {
            path: at.clone(),
            offset: buf.len() as u64,
            message: e.to_string(),
        })?;
    if buf.len() as u64 > MAX_MEMBER {
        return Err(DataError::invalid(
            &at,
            format!("member larger than {MAX_MEMBER} bytes"),
        ));
    }
    Ok(buf)
}
