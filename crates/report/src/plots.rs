//! The report's PNG charts, drawn by plotters into an RGB buffer and encoded
//! by `image`. Text uses the DejaVu Sans file committed in `fonts/`
//! (registered with plotters' `ab_glyph` backend), so no system font is needed.

use crate::runs::{EpochPoint, Run};
use crate::stats::{normality, Summary, NORMALITY_MIN_N};
use crate::ReportError;
use plotters::prelude::*;
use plotters::style::FontStyle;
use std::path::Path;
use std::sync::OnceLock;

/// DejaVu Sans (license: `fonts/LICENSE-DejaVu.txt`).
static FONT: &[u8] = include_bytes!("../fonts/DejaVuSans.ttf");

/// Font family every chart asks for.
const FAMILY: &str = "sans-serif";

/// Size of the histogram and grid charts.
pub const CHART_SIZE: (u32, u32) = (800, 500);
/// Size of a run's training curves (three panels).
pub const CURVES_SIZE: (u32, u32) = (800, 900);

fn register_font() -> Result<(), String> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            plotters::style::register_font(FAMILY, FontStyle::Normal, FONT)
                .map_err(|_| "the committed DejaVu Sans font does not load".to_string())
        })
        .clone()
}

/// Draws with `draw` into a `size` RGB buffer and writes it to `path` as PNG.
fn render(
    path: &Path,
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>) -> Result<(), String>,
) -> Result<(), ReportError> {
    let fail = |message: String| ReportError::Plot { path: path.to_path_buf(), message };
    register_font().map_err(fail)?;
    let mut buffer = vec![0u8; size.0 as usize * size.1 as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buffer, size).into_drawing_area();
        root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
        draw(&root).map_err(fail)?;
        root.present().map_err(|e| fail(e.to_string()))?;
    }
    let image = image::RgbImage::from_raw(size.0, size.1, buffer)
        .ok_or_else(|| fail("buffer size mismatch".into()))?;
    image.save_with_format(path, image::ImageFormat::Png).map_err(|e| fail(e.to_string()))
}

/// A range around `lo..hi` with some margin; never empty.
fn padded(lo: f64, hi: f64) -> std::ops::Range<f64> {
    let span = hi - lo;
    let pad = if span > 0.0 { span * 0.08 } else { lo.abs().max(1.0) * 0.01 };
    (lo - pad)..(hi + pad)
}

/// The normality caption of `values`.
pub fn normality_caption(values: &[f64]) -> String {
    match normality(values) {
        Ok(n) => format!("D'Agostino-Pearson normality test: p = {:.3}", n.p_value),
        Err(e) => format!(
            "D'Agostino-Pearson normality test: not computed ({e}; it needs n >= {NORMALITY_MIN_N})"
        ),
    }
}

/// Histogram of `values` (final top-1 on `set`) with the fitted Gaussian
/// (mean, sample std) scaled to the counts; the caption gives the normality
/// test's p-value.
pub fn histogram(path: &Path, set: &str, values: &[f64]) -> Result<(), ReportError> {
    let Some(s) = Summary::of(values) else { return Ok(()) };
    let bins = ((values.len() as f64).sqrt().ceil() as usize).clamp(3, 30);
    let range = padded(s.min, s.max);
    let width = (range.end - range.start) / bins as f64;
    let mut counts = vec![0u32; bins];
    for v in values {
        let i = (((v - range.start) / width) as usize).min(bins - 1);
        counts[i] += 1;
    }
    let gauss = |x: f64, std: f64| {
        let z = (x - s.mean) / std;
        values.len() as f64 * width * (-0.5 * z * z).exp()
            / (std * (2.0 * std::f64::consts::PI).sqrt())
    };
    let curve: Vec<(f64, f64)> = match s.std.filter(|&x| x > 0.0) {
        Some(std) => (0..=200)
            .map(|i| range.start + (range.end - range.start) * i as f64 / 200.0)
            .map(|x| (x, gauss(x, std)))
            .collect(),
        None => Vec::new(),
    };
    let top = counts.iter().copied().max().unwrap_or(1) as f64;
    let top = curve.iter().map(|p| p.1).fold(top, f64::max) * 1.15;
    let title = format!(
        "final {set} top-1 of {} runs: mean {:.2}, std {}",
        s.n,
        s.mean,
        s.std.map_or_else(|| "n/a".into(), |v| format!("{v:.2}"))
    );
    let caption = normality_caption(values);
    render(path, CHART_SIZE, |root| {
        let e = |e: plotters::drawing::DrawingAreaErrorKind<_>| e.to_string();
        let (body, foot) = root.split_vertically(CHART_SIZE.1 - 30);
        let mut chart = ChartBuilder::on(&body)
            .caption(&title, (FAMILY, 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(range.clone(), 0f64..top)
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc(format!("{set} top-1 (%)"))
            .y_desc("runs")
            .y_label_formatter(&|v| format!("{v:.0}"))
            .x_label_formatter(&|v| format!("{v:.2}"))
            .draw()
            .map_err(e)?;
        chart
            .draw_series(counts.iter().enumerate().map(|(i, &c)| {
                let x0 = range.start + i as f64 * width;
                Rectangle::new([(x0, 0.0), (x0 + width, f64::from(c))], BLUE.mix(0.45).filled())
            }))
            .map_err(e)?;
        if !curve.is_empty() {
            chart
                .draw_series(LineSeries::new(curve.iter().copied(), RED.stroke_width(2)))
                .map_err(e)?
                .label("Gaussian fit")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .label_font((FAMILY, 14))
                .draw()
                .map_err(e)?;
        }
        foot.draw_text(&caption, &(FAMILY, 16).into_font().color(&BLACK), (14, 6)).map_err(e)?;
        Ok(())
    })
}

/// One run's training curves: loss, learning rate and val top-1 per epoch.
pub fn curves(path: &Path, run: &Run) -> Result<(), ReportError> {
    let points: &[EpochPoint] = &run.curve;
    let x_end = points.iter().map(|p| p.epoch + 1).max().unwrap_or(1) as f64;
    let panels: [(&str, Vec<(f64, f64)>); 3] = [
        ("training loss", points.iter().map(|p| ((p.epoch + 1) as f64, p.loss)).collect()),
        ("learning rate", points.iter().map(|p| ((p.epoch + 1) as f64, p.lr)).collect()),
        (
            "val top-1 (%)",
            points.iter().filter_map(|p| p.top1.map(|t| ((p.epoch + 1) as f64, t))).collect(),
        ),
    ];
    let title = format!("{} (seed {})", run.cell.id, run.cell.seed);
    render(path, CURVES_SIZE, |root| {
        let e = |e: plotters::drawing::DrawingAreaErrorKind<_>| e.to_string();
        let root = root.titled(&title, (FAMILY, 18)).map_err(e)?;
        let areas = root.split_evenly((3, 1));
        for (area, (label, series)) in areas.iter().zip(panels.iter()) {
            let finite: Vec<(f64, f64)> =
                series.iter().copied().filter(|p| p.1.is_finite()).collect();
            let lo = finite.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
            let hi = finite.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
            let y = if finite.is_empty() { 0.0..1.0 } else { padded(lo, hi) };
            let mut chart = ChartBuilder::on(area)
                .margin(10)
                .x_label_area_size(35)
                .y_label_area_size(70)
                .build_cartesian_2d(0.0..x_end, y)
                .map_err(e)?;
            let small = hi.abs().max(lo.abs()) < 0.1;
            chart
                .configure_mesh()
                .x_desc("epoch")
                .y_desc(*label)
                .y_label_formatter(&|v| if small { format!("{v:.1e}") } else { format!("{v:.2}") })
                .draw()
                .map_err(e)?;
            chart
                .draw_series(LineSeries::new(finite.iter().copied(), BLUE.stroke_width(2)))
                .map_err(e)?;
            chart
                .draw_series(finite.iter().map(|&p| Circle::new(p, 3, BLUE.filled())))
                .map_err(e)?;
        }
        Ok(())
    })
}

/// One grid axis against final top-1: each run as a dot and each value's
/// mean ± std as a bar, values in `--grid` order along the x axis.
pub fn grid_axis(
    path: &Path,
    key: &str,
    set: &str,
    groups: &[(String, Vec<f64>)],
) -> Result<(), ReportError> {
    let all: Vec<f64> = groups.iter().flat_map(|g| g.1.iter().copied()).collect();
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = all.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let y = if all.is_empty() { 0.0..1.0 } else { padded(lo, hi) };
    let n = groups.len().max(1) as f64;
    let names: Vec<String> = groups.iter().map(|g| g.0.clone()).collect();
    let title = format!("final {set} top-1 by {key} (mean ± std over runs)");
    render(path, CHART_SIZE, |root| {
        let e = |e: plotters::drawing::DrawingAreaErrorKind<_>| e.to_string();
        let mut chart = ChartBuilder::on(root)
            .caption(&title, (FAMILY, 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.5..n - 0.5, y)
            .map_err(e)?;
        let label_of = |v: &f64| {
            let i = v.round();
            if (v - i).abs() < 1e-6 && i >= 0.0 {
                names.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        };
        chart
            .configure_mesh()
            .x_labels(groups.len().max(1) * 2 + 1)
            .x_label_formatter(&label_of)
            .x_desc(key)
            .y_desc(format!("{set} top-1 (%)"))
            .draw()
            .map_err(e)?;
        for (i, (_, values)) in groups.iter().enumerate() {
            let x = i as f64;
            chart
                .draw_series(values.iter().map(|&v| Circle::new((x, v), 3, BLUE.mix(0.5).filled())))
                .map_err(e)?;
            if let Some(s) = Summary::of(values) {
                let std = s.std.unwrap_or(0.0);
                chart
                    .draw_series([
                        PathElement::new(
                            vec![(x, s.mean - std), (x, s.mean + std)],
                            RED.stroke_width(2),
                        ),
                        PathElement::new(
                            vec![(x - 0.15, s.mean), (x + 0.15, s.mean)],
                            RED.stroke_width(3),
                        ),
                    ])
                    .map_err(e)?;
            }
        }
        Ok(())
    })
}
