//! Image folders (`DIR/<split>/<class>/<file>.{png,jpg,jpeg}`) and the same layout inside
//! `DIR/<split>.tar.xz`, read without unpacking. Decoding runs in parallel (rayon).
//!
//! Class order: for CIFAR-10, the official label order when the class folders are exactly its
//! ten class names; otherwise sorted by name. For folders, the classes are the union of the
//! class folders of both splits, so the train and test labels always agree; for archives, the
//! class folders of the archive read. Either way there must be exactly as many classes as the
//! data set has. Image order: round robin over the classes (see [`decode_all`]).

use std::cell::Cell;
use std::collections::BTreeSet;
use std::io::{Cursor, Read};
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;

use rayon::prelude::*;

use super::cifar::Counting;
use super::{read_member, DataError, Dataset, DatasetKind, Split, CIFAR10_CLASSES};

/// Largest image file accepted (a 32x32 PNG is a few KB).
const MAX_IMAGE_FILE: u64 = 64 << 20;

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Source {
    /// `DIR`, holding `train/` and/or `test/`.
    Dir(PathBuf),
    /// `DIR/<split>.tar.xz`.
    TarXz(PathBuf),
}

/// Finds an image-folder layout at `path` for `split`.
pub(crate) fn find(path: &Path, split: Split) -> Result<Option<Source>, DataError> {
    if !path.is_dir() {
        return Ok(None);
    }
    if path.join(split.name()).is_dir() {
        return Ok(Some(Source::Dir(path.to_path_buf())));
    }
    let archive = path.join(format!("{}.tar.xz", split.name()));
    if archive.is_file() {
        return Ok(Some(Source::TarXz(archive)));
    }
    Ok(None)
}

fn is_image_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    !lower.starts_with('.')
        && (lower.ends_with(".png") || lower.ends_with(".jpg") || lower.ends_with(".jpeg"))
}

/// One image file before decoding: where it is (for messages), its class, its bytes.
struct Item {
    path: PathBuf,
    class: String,
    name: String,
    bytes: Vec<u8>,
}

pub(crate) fn load(kind: DatasetKind, source: &Source, split: Split) -> Result<Dataset, DataError> {
    let (items, class_set, where_) = match source {
        Source::Dir(dir) => {
            let mut classes = BTreeSet::new();
            for s in [Split::Train, Split::Test] {
                let d = dir.join(s.name());
                if d.is_dir() {
                    classes.extend(class_dirs(&d)?);
                }
            }
            (
                read_dir_items(&dir.join(split.name()))?,
                classes,
                dir.clone(),
            )
        }
        Source::TarXz(archive) => {
            let items = read_tar_xz(archive, split)?;
            let classes = items.iter().map(|i| i.class.clone()).collect();
            (items, classes, archive.clone())
        }
    };
    let class_names = class_order(kind, class_set);
    if class_names.len() != kind.classes() as usize {
        return Err(DataError::invalid(
            &where_,
            format!(
                "found {} class folders ({}){}, but {} has {} classes",
                class_names.len(),
                preview(&class_names),
                match source {
                    Source::Dir(_) => " in train/ and test/ together",
                    Source::TarXz(_) => "",
                },
                kind.name(),
                kind.classes()
            ),
        ));
    }
    decode_all(kind, items, class_names)
}

fn preview(names: &[String]) -> String {
    let mut s = names
        .iter()
        .take(12)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > 12 {
        s.push_str(", ...");
    }
    s
}

/// CIFAR-10's official order when the names are exactly its classes, else sorted by name.
fn class_order(kind: DatasetKind, set: BTreeSet<String>) -> Vec<String> {
    let official: BTreeSet<String> = CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect();
    if kind == DatasetKind::Cifar10 && set == official {
        CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect()
    } else {
        set.into_iter().collect()
    }
}

fn class_dirs(split_dir: &Path) -> Result<Vec<String>, DataError> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(split_dir).map_err(|e| DataError::io(split_dir, e))? {
        let e = e.map_err(|e| DataError::io(split_dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') && e.path().is_dir() {
            out.push(name);
        }
    }
    Ok(out)
}

fn read_dir_items(split_dir: &Path) -> Result<Vec<Item>, DataError> {
    let mut paths = Vec::new();
    for class in class_dirs(split_dir)? {
        let cdir = split_dir.join(&class);
        for e in std::fs::read_dir(&cdir).map_err(|e| DataError::io(&cdir, e))? {
            let e = e.map_err(|e| DataError::io(&cdir, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if is_image_name(&name) && e.path().is_file() {
                paths.push((class.clone(), name, e.path()));
            }
        }
    }
    paths
        .into_par_iter()
        .map(|(class, name, path)| {
            let file = std::fs::File::open(&path).map_err(|e| DataError::io(&path, e))?;
            let mut bytes = Vec::new();
            file.take(MAX_IMAGE_FILE + 1)
                .read_to_end(&mut bytes)
                .map_err(|e| DataError::io(&path, e))?;
            if bytes.len() as u64 > MAX_IMAGE_FILE {
                return Err(DataError::invalid(
                    &path,
                    format!("image file larger than {MAX_IMAGE_FILE} bytes"),
                ));
            }
            Ok(Item {
                path,
                class,
                name,
                bytes,
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .collect()
}

/// The image members `<split>/<class>/<file>` of a `.tar.xz` (a leading `./` is allowed).
fn read_tar_xz(archive: &Path, split: Split) -> Result<Vec<Item>, DataError> {
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
    // Buffer the decoded side too: tar reads 512-byte headers, and each small read straight
    // from the decoder is slow.
    let mut tar = tar::Archive::new(std::io::BufReader::with_capacity(
        1 << 16,
        xz2::read::XzDecoder::new(reader),
    ));
    let mut items = Vec::new();
    for entry in tar.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let member = entry.path().map_err(corrupt)?.into_owned();
        let parts: Vec<String> = member
            .components()
            .filter_map(|c| match c {
                Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
                _ => None,
            })
            .collect();
        let [s, class, name] = parts.as_slice() else {
            continue;
        };
        if s != split.name() || class.starts_with('.') || !is_image_name(name) {
            continue;
        }
        if entry.header().size().unwrap_or(0) > MAX_IMAGE_FILE {
            return Err(DataError::invalid(
                &archive.join(&member),
                format!("image file larger than {MAX_IMAGE_FILE} bytes"),
            ));
        }
        let bytes = read_member(&mut entry, archive, &member).map_err(|e| match e {
            DataError::Truncated { path, message, .. } => DataError::Truncated {
                path,
                offset: count.get(),
                message: format!("{message} (byte offset in the compressed archive)"),
            },
            e => e,
        })?;
        items.push(Item {
            path: archive.join(&member),
            class: class.clone(),
            name: name.clone(),
            bytes,
        });
    }
    Ok(items)
}

/// Decodes every item in parallel into a [`Dataset`]. Order: round robin over the classes
/// (the first file of every class in label order, then the second of every class, ...), files
/// sorted by name within a class. So the first N images are balanced across the classes, as
/// the first N records of the (shuffled) official binary release are, and `--subset N` is a
/// fair sample.
fn decode_all(
    kind: DatasetKind,
    mut items: Vec<Item>,
    class_names: Vec<String>,
) -> Result<Dataset, DataError> {
    let [c, h, w] = kind.input();
    let label_of = |class: &str| class_names.iter().position(|n| n == class);
    let mut labelled = Vec::with_capacity(items.len());
    for item in items.drain(..) {
        let Some(label) = label_of(&item.class) else {
            return Err(DataError::invalid(
                &item.path,
                format!("class {} is not one of the data set's classes", item.class),
            ));
        };
        labelled.push((label, item));
    }
    labelled.sort_by(|a, b| (a.0, &a.1.name, &a.1.path).cmp(&(b.0, &b.1.name, &b.1.path)));
    let mut rank = vec![0usize; class_names.len()];
    let mut keyed: Vec<(usize, usize, Item)> = labelled
        .into_iter()
        .map(|(label, item)| {
            rank[label] += 1;
            (rank[label], label, item)
        })
        .collect();
    keyed.sort_by_key(|k| (k.0, k.1));
    let labelled: Vec<(usize, Item)> = keyed.into_iter().map(|(_, l, i)| (l, i)).collect();
    let per = (c * h * w) as usize;
    let decoded: Vec<Result<Vec<u8>, DataError>> = labelled
        .par_iter()
        .map(|(_, item)| decode(&item.path, &item.bytes, c, h, w))
        .collect();
    let mut images = Vec::with_capacity(labelled.len() * per);
    for d in decoded {
        images.extend_from_slice(&d?);
    }
    let labels = labelled.iter().map(|(l, _)| *l as u16).collect::<Vec<_>>();
    Ok(Dataset {
        n: labels.len(),
        images,
        labels,
        c: c as usize,
        h: h as usize,
        w: w as usize,
        classes: class_names.len(),
        class_names,
    })
}

/// Decodes one PNG or JPEG of exactly `w x h` into `c x h x w` bytes: grey for `c == 1`,
/// RGB planes otherwise (every data set kind has `c == 3`).
fn decode(path: &Path, bytes: &[u8], c: u32, h: u32, w: u32) -> Result<Vec<u8>, DataError> {
    let err = |e: image::ImageError| DataError::Decode {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let reader = || {
        image::ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| DataError::io(path, e))
    };
    // Check the size from the header before decoding anything.
    let (iw, ih) = reader()?.into_dimensions().map_err(err)?;
    if (iw, ih) != (w, h) {
        return Err(DataError::WrongSize {
            path: path.to_path_buf(),
            width: iw,
            height: ih,
            expected_width: w,
            expected_height: h,
        });
    }
    let img = reader()?.decode().map_err(err)?;
    let plane = (h * w) as usize;
    let mut out = vec![0u8; c as usize * plane];
    match c {
        1 => out.copy_from_slice(img.to_luma8().as_raw()),
        _ => {
            let rgb = img.to_rgb8();
            let (r, rest) = out.split_at_mut(plane);
            let (g, b) = rest.split_at_mut(plane);
            for (((px, r), g), b) in rgb.as_raw().chunks_exact(3).zip(r).zip(g).zip(b) {
                (*r, *g, *b) = (px[0], px[1], px[2]);
            }
        }
    }
    Ok(out)
}
