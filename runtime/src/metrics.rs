//! Per-epoch training metrics, appended to a JSON Lines file (one object a line), and read
//! back for plots and resumption.
//!
//! Invariant of the file: every complete line is one [`EpochMetrics`]. A crash can leave a
//! last line without its newline; [`read`] ignores such a line when it does not parse.
//! Numbers that are not finite (a diverged loss, or a test metric not measured this epoch)
//! are written as `null` and read back as NaN.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One epoch's numbers. Accuracies are fractions in `[0, 1]`; NaN means "not measured".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: u64,
    #[serde(with = "nan_as_null")]
    pub train_loss: f64,
    #[serde(with = "nan_as_null")]
    pub train_acc: f64,
    #[serde(with = "nan_as_null")]
    pub test_loss: f64,
    #[serde(with = "nan_as_null")]
    pub test_acc: f64,
    #[serde(with = "nan_as_null")]
    pub lr: f64,
    #[serde(with = "nan_as_null")]
    pub seconds: f64,
    #[serde(with = "nan_as_null")]
    pub images_per_s: f64,
}

impl EpochMetrics {
    /// Test error in percent, `100 * (1 - test_acc)`.
    pub fn test_error_percent(&self) -> f64 {
        100.0 * (1.0 - self.test_acc)
    }
}

mod nan_as_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else {
            s.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}: {message}", path.display())]
    Parse {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// Appends metrics to a JSONL file, flushing after every line.
pub struct MetricsWriter {
    path: PathBuf,
    file: File,
}

impl MetricsWriter {
    /// Opens `path` for appending, creating it (and its folder) if needed.
    pub fn open(path: &Path) -> Result<MetricsWriter, MetricsError> {
        let io = |source| MetricsError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io)?;
        Ok(MetricsWriter {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Writes one line and flushes it to the OS.
    pub fn append(&mut self, m: &EpochMetrics) -> Result<(), MetricsError> {
        let mut line = serde_json::to_string(m).map_err(|e| MetricsError::Parse {
            path: self.path.clone(),
            line: 0,
            message: e.to_string(),
        })?;
        line.push('\n');
        let io = |source| MetricsError::Io {
            path: self.path.clone(),
            source,
        };
        self.file.write_all(line.as_bytes()).map_err(io)?;
        self.file.flush().map_err(|source| MetricsError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

/// Reads every complete line of a metrics file (blank lines skipped). A malformed line is an
/// error naming its number (1-based), except a last line cut short by a crash.
pub fn read(path: &Path) -> Result<Vec<EpochMetrics>, MetricsError> {
    // at most MAX_READ bytes, whatever the file is (`/dev/zero` has no end)
    const MAX_READ: u64 = 256 << 20;
    let io = |source| MetricsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut std::io::Read::take(File::open(path).map_err(io)?, MAX_READ + 1),
        &mut text,
    )
    .map_err(io)?;
    if text.len() as u64 > MAX_READ {
        return Err(MetricsError::Parse {
            path: path.to_path_buf(),
            line: text.lines().count(),
            message: format!("more than {MAX_READ} bytes: not a metrics file"),
        });
    }
    let complete = text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(m) => out.push(m),
            Err(_) if i + 1 == lines.len() && !complete => break,
            Err(e) => {
                return Err(MetricsError::Parse {
                    path: path.to_path_buf(),
                    line: i + 1,
                    message: e.to_string(),
                })
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(epoch: u64, test_acc: f64) -> EpochMetrics {
        EpochMetrics {
            epoch,
            train_loss: 2.0 / (epoch as f64 + 1.0),
            train_acc: 0.5,
            test_loss: 1.0,
            test_acc,
            lr: 0.1,
            seconds: 12.5,
            images_per_s: 4000.0,
        }
    }

    #[test]
    fn append_and_read_back() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("run/metrics.jsonl");
        let rows = [m(1, 0.6), m(2, f64::NAN), m(3, 0.8)];
        {
            let mut w = MetricsWriter::open(&path).unwrap();
            w.append(&rows[0]).unwrap();
        }
        // Reopening appends.
        let mut w = MetricsWriter::open(&path).unwrap();
        w.append(&rows[1]).unwrap();
        w.append(&rows[2]).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 3);
        assert!(text.lines().nth(1).unwrap().contains("\"test_acc\":null"));
        let back = read(&path).unwrap();
        assert_eq!(back.len(), 3);
        assert_eq!(back[0], rows[0]);
        assert!(back[1].test_acc.is_nan());
        assert_eq!(back[2], rows[2]);
        assert!((back[2].test_error_percent() - 20.0).abs() < 1e-9);
    }

    #[test]
    fn cut_last_line_is_ignored_but_bad_middle_line_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("m.jsonl");
        let good = serde_json::to_string(&m(1, 0.5)).unwrap();
        std::fs::write(&path, format!("{good}\n\n{}", &good[..20])).unwrap();
        assert_eq!(read(&path).unwrap().len(), 1);
        std::fs::write(&path, format!("{good}\n{{\"epoch\": 2}}\n{good}\n")).unwrap();
        let err = read(&path).unwrap_err().to_string();
        assert!(
            err.contains("m.jsonl:2:") && err.contains("missing field"),
            "{err}"
        );
        let err = read(&tmp.path().join("none.jsonl"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("none.jsonl"), "{err}");
    }
}
