//! Training curves as a picture, like Figure 2 of the Wide ResNet paper: training loss and
//! test error (%) per epoch, in two panels side by side.
//!
//! The format follows the output's extension (`.png` or `.svg`). Text uses an embedded font
//! (DejaVu Sans Mono, `runtime/assets/`), so nothing depends on the system's fonts and the
//! output is the same on every machine.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::metrics::{self, EpochMetrics, MetricsError};

static FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");
const FAMILY: &str = "sans-serif";
const SIZE: (u32, u32) = (1200, 480);

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("{}: no metrics to plot", path.display())]
    Empty { path: PathBuf },
    #[error("{}: unknown image format (use .png or .svg)", path.display())]
    Format { path: PathBuf },
    #[error("{}: drawing failed: {message}", path.display())]
    Draw { path: PathBuf, message: String },
    #[error("cannot write {}: {message}", path.display())]
    Output { path: PathBuf, message: String },
}

fn register_font() -> Result<(), String> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        plotters::style::register_font(FAMILY, FontStyle::Normal, FONT)
            .map_err(|_| "the embedded font is invalid".to_string())
    })
    .clone()
}

/// Reads the JSONL metrics file and draws `out` (`.png` or `.svg`).
pub fn plot(metrics_file: &Path, out: &Path) -> Result<(), PlotError> {
    let ms = metrics::read(metrics_file)?;
    if ms.is_empty() {
        return Err(PlotError::Empty {
            path: metrics_file.to_path_buf(),
        });
    }
    plot_metrics(&ms, out)
}

/// Makes `out`'s folder and checks that `out` can be written, before drawing: the drawing
/// backends report a path that cannot be written in their own words, late.
fn writable(out: &Path) -> Result<(), PlotError> {
    let err = |e: std::io::Error| PlotError::Output {
        path: out.to_path_buf(),
        message: e.to_string(),
    };
    if out.is_dir() {
        return Err(PlotError::Output {
            path: out.to_path_buf(),
            message: "it is a directory".into(),
        });
    }
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(out)
        .map(drop)
        .map_err(err)
}

/// Draws already-read metrics to `out` (`.png` or `.svg`).
pub fn plot_metrics(ms: &[EpochMetrics], out: &Path) -> Result<(), PlotError> {
    let draw_err = |message: String| PlotError::Draw {
        path: out.to_path_buf(),
        message,
    };
    register_font().map_err(draw_err)?;
    writable(out)?;
    let ext = out
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "png" => draw(BitMapBackend::new(out, SIZE).into_drawing_area(), ms),
        "svg" => draw(SVGBackend::new(out, SIZE).into_drawing_area(), ms),
        _ => {
            return Err(PlotError::Format {
                path: out.to_path_buf(),
            })
        }
    }
    .map_err(draw_err)
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    ms: &[EpochMetrics],
) -> Result<(), String> {
    let e = |err: DrawingAreaErrorKind<DB::ErrorType>| err.to_string();
    root.fill(&WHITE).map_err(e)?;
    let (left, right) = root.split_horizontally(SIZE.0 / 2);
    let loss: Vec<(f64, f64)> = ms.iter().map(|m| (m.epoch as f64, m.train_loss)).collect();
    let err: Vec<(f64, f64)> = ms
        .iter()
        .map(|m| (m.epoch as f64, m.test_error_percent()))
        .collect();
    panel(&left, "training loss", &loss, &BLUE).map_err(e)?;
    panel(&right, "test error (%)", &err, &RED).map_err(e)?;
    root.present().map_err(e)
}

/// `[lo, hi]` of the finite values, widened so it is never empty.
fn range(vals: impl Iterator<Item = f64>, pad: f64) -> (f64, f64) {
    let (lo, hi) = vals
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let margin = if hi - lo < 1e-9 {
        (hi.abs() * 0.05).max(0.5)
    } else {
        (hi - lo) * pad
    };
    (lo - margin, hi + margin)
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    points: &[(f64, f64)],
    color: &RGBColor,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    // Epochs from 0, like the paper's figures; integer ticks only.
    let last = points.iter().map(|p| p.0).fold(1.0f64, f64::max).ceil();
    let (x0, x1) = (0.0, last);
    let ticks = (last as usize).min(10) + 1;
    let (y0, y1) = range(points.iter().map(|p| p.1), 0.05);
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FAMILY, 22))
        .margin(12)
        .margin_right(36)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, y0..y1)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .x_labels(ticks)
        .x_label_formatter(&|x| {
            if (x - x.round()).abs() < 1e-6 {
                format!("{x:.0}")
            } else {
                String::new()
            }
        })
        .y_desc(title)
        .label_style((FAMILY, 14))
        .draw()?;
    // Split the curve where a value is missing (NaN), so gaps stay gaps.
    for run in points.split(|p| !p.1.is_finite()) {
        if run.is_empty() {
            continue;
        }
        chart.draw_series(LineSeries::new(run.iter().copied(), color.stroke_width(2)))?;
        if run.len() == 1 {
            chart.draw_series(run.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::MetricsWriter;

    fn write_metrics(path: &Path, epochs: u64) {
        let mut w = MetricsWriter::open(path).unwrap();
        for e in 1..=epochs {
            w.append(&EpochMetrics {
                epoch: e,
                train_loss: 2.3 * (-(e as f64) / 10.0).exp(),
                train_acc: 1.0 - (-(e as f64) / 8.0).exp(),
                test_loss: 1.0,
                // One epoch without a test measurement leaves a gap.
                test_acc: if e == 5 {
                    f64::NAN
                } else {
                    0.95 - 0.5 * (-(e as f64) / 6.0).exp()
                },
                lr: 0.1,
                seconds: 30.0,
                images_per_s: 1700.0,
            })
            .unwrap();
        }
    }

    #[test]
    fn png_and_svg_are_written() {
        let tmp = tempfile::tempdir().unwrap();
        let metrics = tmp.path().join("metrics.jsonl");
        write_metrics(&metrics, 40);
        for name in ["curves.png", "curves.svg", "CURVES.PNG"] {
            let out = tmp.path().join(name);
            plot(&metrics, &out).unwrap();
            let bytes = std::fs::read(&out).unwrap();
            assert!(bytes.len() > 1000, "{name}: {} bytes", bytes.len());
            if name.ends_with(".svg") {
                let text = String::from_utf8(bytes).unwrap();
                assert!(text.starts_with("<svg") && text.contains("test error (%)"));
                assert!(text.contains("<polyline") || text.contains("<path"));
            } else {
                assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
                let img = image::load_from_memory(&bytes).unwrap();
                assert_eq!((img.width(), img.height()), SIZE);
            }
        }
    }

    #[test]
    fn single_epoch_and_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let metrics = tmp.path().join("metrics.jsonl");
        write_metrics(&metrics, 1);
        plot(&metrics, &tmp.path().join("one.svg")).unwrap();
        let err = plot(&metrics, &tmp.path().join("x.gif"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("x.gif") && err.contains(".png or .svg"),
            "{err}"
        );
        std::fs::write(&metrics, "").unwrap();
        let err = plot(&metrics, &tmp.path().join("e.png"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no metrics"), "{err}");
    }
}
