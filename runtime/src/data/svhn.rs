//! SVHN "format 2" (cropped 32x32 digits) from its MATLAB files `train_32x32.mat`,
//! `test_32x32.mat` and `extra_32x32.mat`, read by a small MATLAB v5 reader.
//!
//! The files hold `X`, a `uint8` array `32 x 32 x 3 x N` (MATLAB's column-major order: row,
//! column, channel, image) and `y`, `N` labels `1..=10` where 10 stands for the digit 0. Label
//! `y % 10` is used, so label `d` is the digit `d`.
//!
//! The train split is `train_32x32.mat` followed by `extra_32x32.mat` when that file is there
//! (the Wide ResNet paper trains on both); the test split is `test_32x32.mat`.
//!
//! Only what these files use is read: numeric arrays, possibly zlib-compressed
//! (`miCOMPRESSED`), little- or big-endian. Every size read from the file is checked against the
//! bytes actually there before anything is allocated from it.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::{read_file, DataError, Dataset, Split};

const MI_INT8: u32 = 1;
const MI_UINT8: u32 = 2;
const MI_INT16: u32 = 3;
const MI_UINT16: u32 = 4;
const MI_INT32: u32 = 5;
const MI_UINT32: u32 = 6;
const MI_SINGLE: u32 = 7;
const MI_DOUBLE: u32 = 9;
const MI_INT64: u32 = 12;
const MI_UINT64: u32 = 13;
const MI_MATRIX: u32 = 14;
const MI_COMPRESSED: u32 = 15;

/// Largest decompressed variable accepted (SVHN's `extra` X is 1.6 GB).
const MAX_INFLATED: u64 = 4 << 30;

/// The files of `split` at `path`: a `.mat` file itself, or the folder holding the standard
/// names. `None` when there is no SVHN `.mat` file there.
pub(crate) fn find(path: &Path, split: Split) -> Option<Vec<PathBuf>> {
    if path.is_file() {
        let is_mat = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("mat"));
        return is_mat.then(|| vec![path.to_path_buf()]);
    }
    let names: &[&str] = match split {
        Split::Train => &["train_32x32.mat", "extra_32x32.mat"],
        Split::Test => &["test_32x32.mat"],
    };
    let main = path.join(names[0]);
    if !main.is_file() {
        return None;
    }
    let mut files = vec![main];
    files.extend(
        names[1..]
            .iter()
            .map(|n| path.join(n))
            .filter(|p| p.is_file()),
    );
    Some(files)
}

pub(crate) fn load(files: &[PathBuf]) -> Result<Dataset, DataError> {
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for path in files {
        let bytes = read_file(path)?;
        let vars = read_mat(path, &bytes, &["X", "y"])?;
        let get = |name: &str| {
            vars.iter().find(|v| v.name == name).ok_or_else(|| {
                DataError::invalid(
                    path,
                    format!("no variable {name} (SVHN files hold X and y)"),
                )
            })
        };
        let (x, y) = (get("X")?, get("y")?);
        let Values::U8(px) = &x.values else {
            return Err(DataError::invalid(path, "X is not a uint8 array"));
        };
        let n = match x.dims.as_slice() {
            [32, 32, 3, n] => *n,
            [32, 32, 3] => 1,
            d => {
                return Err(DataError::invalid(
                    path,
                    format!("X has dimensions {d:?}, expected 32 x 32 x 3 x N"),
                ))
            }
        };
        let ys = y.values.to_f64();
        if ys.len() != n {
            return Err(DataError::invalid(
                path,
                format!("{} labels for {n} images", ys.len()),
            ));
        }
        for (i, &v) in ys.iter().enumerate() {
            if !(v.fract() == 0.0 && (1.0..=10.0).contains(&v)) {
                return Err(DataError::LabelOutOfRange {
                    path: path.clone(),
                    record: i,
                    offset: y.offset,
                    label: if v.is_finite() && v >= 0.0 {
                        v.min(u32::MAX as f64) as u32
                    } else {
                        u32::MAX
                    },
                    classes: 10,
                });
            }
            labels.push((v as u16) % 10);
        }
        // Column-major (row, column, channel, image) -> channel-major rows.
        images.reserve(px.len());
        for img in px.chunks_exact(3072) {
            for c in 0..3 {
                let plane = &img[c * 1024..(c + 1) * 1024];
                for row in 0..32 {
                    images.extend((0..32).map(|col| plane[row + 32 * col]));
                }
            }
        }
    }
    Ok(Dataset {
        n: labels.len(),
        images,
        labels,
        c: 3,
        h: 32,
        w: 32,
        classes: 10,
        class_names: (0..10).map(|d| d.to_string()).collect(),
    })
}

/// The values of a numeric array, as stored.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Values {
    U8(Vec<u8>),
    F64(Vec<f64>),
}

impl Values {
    fn to_f64(&self) -> Vec<f64> {
        match self {
            Values::U8(v) => v.iter().map(|&b| b as f64).collect(),
            Values::F64(v) => v.clone(),
        }
    }
}

/// One numeric variable of a MAT file.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Var {
    pub name: String,
    pub dims: Vec<usize>,
    pub values: Values,
    /// Byte offset of the variable's element in the file.
    pub offset: u64,
}

/// Little- or big-endian reads with bounds checks; `at` is the element's file offset for
/// messages, `inner` whether `bytes` is the inflated content of a compressed element.
struct Reader<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    be: bool,
    at: u64,
    inner: bool,
}

impl Reader<'_> {
    fn err(&self, pos: usize, message: impl Into<String>) -> DataError {
        let message = message.into();
        let (offset, message) = if self.inner {
            (
                self.at,
                format!("{message} (byte {pos} of the decompressed element)"),
            )
        } else {
            (pos as u64, message)
        };
        DataError::Corrupt {
            path: self.path.to_path_buf(),
            offset,
            message,
        }
    }
    fn truncated(&self, pos: usize, message: impl Into<String>) -> DataError {
        let message = message.into();
        if self.inner {
            return self.err(pos, message);
        }
        DataError::Truncated {
            path: self.path.to_path_buf(),
            offset: pos as u64,
            message,
        }
    }
    fn slice(&self, pos: usize, len: usize) -> Result<&[u8], DataError> {
        pos.checked_add(len)
            .and_then(|end| self.bytes.get(pos..end))
            .ok_or_else(|| {
                self.truncated(
                    pos,
                    format!(
                        "needs {len} bytes, {} left",
                        self.bytes.len().saturating_sub(pos)
                    ),
                )
            })
    }
    fn u32(&self, pos: usize) -> Result<u32, DataError> {
        let b: [u8; 4] = self.slice(pos, 4)?.try_into().expect("4 bytes");
        Ok(if self.be {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        })
    }
    /// A data element at `pos`: (type, data range, position of the next element).
    fn element(&self, pos: usize) -> Result<(u32, std::ops::Range<usize>, usize), DataError> {
        let first = self.u32(pos)?;
        if first >> 16 != 0 {
            // Small element: type and size in one word, data in the next 4 bytes.
            let (ty, n) = (first & 0xffff, (first >> 16) as usize);
            if n > 4 {
                return Err(self.err(pos, format!("small element of {n} bytes")));
            }
            self.slice(pos + 4, 4)?;
            return Ok((ty, pos + 4..pos + 4 + n, pos + 8));
        }
        let n = self.u32(pos + 4)? as usize;
        self.slice(pos + 8, n)?;
        let end = pos + 8 + n;
        // Compressed elements are not padded; the others are, to 8 bytes (the last one may
        // lack its padding).
        let next = if first == MI_COMPRESSED {
            end
        } else {
            end.div_ceil(8)
                .saturating_mul(8)
                .min(self.bytes.len())
                .max(end)
        };
        Ok((first, pos + 8..end, next))
    }
}

/// Reads the numeric variables named in `wanted` from a MATLAB v5 file.
pub(crate) fn read_mat(path: &Path, bytes: &[u8], wanted: &[&str]) -> Result<Vec<Var>, DataError> {
    if bytes.len() < 128 {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            offset: bytes.len() as u64,
            message: "shorter than the 128-byte MAT-file header".into(),
        });
    }
    let be = match &bytes[126..128] {
        b"IM" => false,
        b"MI" => true,
        _ => {
            let hint = if bytes.starts_with(b"\x89HDF")
                || bytes[..128].windows(4).any(|w| w == b"HDF\r")
            {
                " (MATLAB v7.3 / HDF5 files are not supported)"
            } else {
                ""
            };
            return Err(DataError::Corrupt {
                path: path.to_path_buf(),
                offset: 126,
                message: format!("not a MATLAB v5 MAT-file{hint}"),
            });
        }
    };
    let top = Reader {
        path,
        bytes,
        be,
        at: 0,
        inner: false,
    };
    let mut out = Vec::new();
    let mut pos = 128;
    while pos < bytes.len() {
        let (ty, data, next) = top.element(pos)?;
        match ty {
            MI_MATRIX => {
                if let Some(v) = matrix(&top, data, pos as u64, wanted)? {
                    out.push(v);
                }
            }
            MI_COMPRESSED => {
                let mut inflated = Vec::new();
                flate2::read::ZlibDecoder::new(&bytes[data])
                    .take(MAX_INFLATED + 1)
                    .read_to_end(&mut inflated)
                    .map_err(|e| DataError::Corrupt {
                        path: path.to_path_buf(),
                        offset: pos as u64,
                        message: format!("compressed element: {e}"),
                    })?;
                if inflated.len() as u64 > MAX_INFLATED {
                    return Err(top.err(pos, "compressed element inflates beyond 4 GiB"));
                }
                let inner = Reader {
                    path,
                    bytes: &inflated,
                    be,
                    at: pos as u64,
                    inner: true,
                };
                let (ity, idata, _) = inner.element(0)?;
                if ity == MI_MATRIX {
                    if let Some(v) = matrix(&inner, idata, pos as u64, wanted)? {
                        out.push(v);
                    }
                }
            }
            _ => {}
        }
        pos = next;
    }
    Ok(out)
}

/// Parses a `miMATRIX` element's content (`range` of `r`); `None` for a variable not wanted
/// or not a plain numeric array.
fn matrix(
    r: &Reader,
    range: std::ops::Range<usize>,
    offset: u64,
    wanted: &[&str],
) -> Result<Option<Var>, DataError> {
    let end = range.end;
    let sub = Reader {
        path: r.path,
        bytes: &r.bytes[..end],
        be: r.be,
        at: r.at,
        inner: r.inner,
    };
    let (ty, flags, pos) = sub.element(range.start)?;
    if ty != MI_UINT32 || flags.len() < 8 {
        return Err(sub.err(range.start, "array flags missing"));
    }
    let class = sub.u32(flags.start)? & 0xff;
    let complex = sub.u32(flags.start)? & 0x800 != 0;
    // Numeric classes are 6 (double) ..= 15 (uint64); cell, struct, char, sparse are skipped.
    if !(6..=15).contains(&class) || complex {
        return Ok(None);
    }
    let (ty, dims_r, pos) = sub.element(pos)?;
    if ty != MI_INT32 {
        return Err(sub.err(dims_r.start, "dimensions missing"));
    }
    let mut dims = Vec::new();
    for p in dims_r.step_by(4) {
        let d = sub.u32(p)? as i32;
        if d < 0 {
            return Err(sub.err(p, format!("negative dimension {d}")));
        }
        dims.push(d as usize);
    }
    let (_, name_r, pos) = sub.element(pos)?;
    let name = String::from_utf8_lossy(&sub.bytes[name_r]).into_owned();
    if !wanted.contains(&name.as_str()) {
        return Ok(None);
    }
    let (ty, data, _) = sub.element(pos)?;
    let count = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| sub.err(pos, format!("dimensions {dims:?} overflow")))?;
    let raw = &sub.bytes[data.clone()];
    let width = match ty {
        MI_INT8 | MI_UINT8 => 1,
        MI_INT16 | MI_UINT16 => 2,
        MI_INT32 | MI_UINT32 | MI_SINGLE => 4,
        MI_DOUBLE | MI_INT64 | MI_UINT64 => 8,
        other => return Err(sub.err(pos, format!("{name}: unsupported data type {other}"))),
    };
    if raw.len() != count.saturating_mul(width) {
        return Err(sub.err(
            pos,
            format!(
                "{name}: {} bytes of data for dimensions {dims:?} of {width}-byte values",
                raw.len()
            ),
        ));
    }
    let be = sub.be;
    let word = |c: &[u8]| -> u64 {
        let mut b = [0u8; 8];
        if be {
            b[8 - c.len()..].copy_from_slice(c);
            u64::from_be_bytes(b)
        } else {
            b[..c.len()].copy_from_slice(c);
            u64::from_le_bytes(b)
        }
    };
    let values = if ty == MI_UINT8 {
        Values::U8(raw.to_vec())
    } else {
        Values::F64(
            raw.chunks_exact(width)
                .map(|c| {
                    let w = word(c);
                    match ty {
                        MI_INT8 => w as u8 as i8 as f64,
                        MI_INT16 => w as u16 as i16 as f64,
                        MI_UINT16 => w as u16 as f64,
                        MI_INT32 => w as u32 as i32 as f64,
                        MI_UINT32 => w as u32 as f64,
                        MI_SINGLE => f32::from_bits(w as u32) as f64,
                        MI_DOUBLE => f64::from_bits(w),
                        MI_INT64 => w as i64 as f64,
                        _ => w as f64,
                    }
                })
                .collect(),
        )
    };
    Ok(Some(Var {
        name,
        dims,
        values,
        offset,
    }))
}
