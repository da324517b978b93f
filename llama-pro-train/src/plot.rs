//! PNG line plots (plotters, bitmap backend): training and evaluation losses of a run, and the
//! demo's forgetting plot. Text is drawn with an embedded DejaVu Sans Mono (see
//! `assets/DejaVu-LICENSE`) so that no system font lookup is needed.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::error::{Result, TrainError};

static FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");
static REGISTER: Once = Once::new();

/// One line.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend text.
    pub label: String,
    /// (x, y) points in order.
    pub points: Vec<(f64, f64)>,
}

/// One chart.
#[derive(Debug, Clone)]
pub struct Panel {
    /// Caption.
    pub title: String,
    /// X axis description.
    pub x_label: String,
    /// Y axis description.
    pub y_label: String,
    /// Lines.
    pub series: Vec<Series>,
}

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// Color of the i-th series (the same order in every panel).
pub fn color(i: usize) -> RGBColor {
    COLORS[i % COLORS.len()]
}

fn range(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return None;
    }
    if hi - lo < 1e-9 {
        hi = lo + 1.0;
    }
    let pad = 0.05 * (hi - lo);
    Some((lo - pad, hi + pad))
}

/// Axis tick text: whole numbers on wide ranges (steps), two decimals on narrow ones (losses).
fn tick(v: f64, range: (f64, f64)) -> String {
    if range.1 - range.0 >= 20.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// Draw `panels` side by side into a PNG at `path` (written to a temporary file, then renamed).
pub fn write_png(path: &Path, panels: &[Panel], panel_size: (u32, u32)) -> Result<()> {
    REGISTER.call_once(|| {
        // Only fails on a corrupt font, which is a build-time constant here.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
    let err = |e: String| TrainError::Invalid(format!("writing plot {}: {e}", path.display()));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "plot.png".into());
    // The image encoder picks the format from the extension: keep `.png` last.
    let tmp = path.with_file_name(format!(".tmp-{}-{file_name}", std::process::id()));
    {
        let n = panels.len().max(1) as u32;
        let root = BitMapBackend::new(&tmp, (panel_size.0 * n, panel_size.1)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let areas = root.split_evenly((1, n as usize));
        for (panel, area) in panels.iter().zip(areas.iter()) {
            let pts = || panel.series.iter().flat_map(|s| s.points.iter());
            let (Some(xr), Some(yr)) = (range(pts().map(|p| p.0)), range(pts().map(|p| p.1)))
            else {
                continue;
            };
            let mut chart = ChartBuilder::on(area)
                .caption(&panel.title, ("sans-serif", 18))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(60)
                .build_cartesian_2d(xr.0..xr.1, yr.0..yr.1)
                .map_err(|e| err(e.to_string()))?;
            chart
                .configure_mesh()
                .x_desc(&panel.x_label)
                .y_desc(&panel.y_label)
                .label_style(("sans-serif", 13))
                .x_label_formatter(&|x| tick(*x, xr))
                .y_label_formatter(&|y| tick(*y, yr))
                .draw()
                .map_err(|e| err(e.to_string()))?;
            for (i, s) in panel.series.iter().enumerate() {
                let c = color(i);
                chart
                    .draw_series(LineSeries::new(s.points.iter().copied(), c.stroke_width(2)))
                    .map_err(|e| err(e.to_string()))?
                    .label(s.label.clone())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                    });
                if s.points.len() <= 40 {
                    chart
                        .draw_series(
                            s.points
                                .iter()
                                .map(|&(x, y)| Circle::new((x, y), 3, c.filled())),
                        )
                        .map_err(|e| err(e.to_string()))?;
                }
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font(("sans-serif", 13))
                .position(SeriesLabelPosition::UpperRight)
                .draw()
                .map_err(|e| err(e.to_string()))?;
        }
        root.present().map_err(|e| err(e.to_string()))?;
    }
    std::fs::rename(&tmp, path).map_err(|source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    })
}
