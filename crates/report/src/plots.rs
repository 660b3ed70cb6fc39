//! The report's PNG charts, drawn by plotters into an RGB buffer, encoded
//! by `image` and written atomically. Text uses the DejaVu Sans file
//! committed in `fonts/` (registered with plotters' `ab_glyph` backend), so
//! no system font is needed.
//!
//! An axis whose range is not finite (values near ±1.8e308, which the
//! metrics reader lets through only for a loss) is refused with an error
//! before plotters sees it: plotters never returns from such a range.

use crate::runs::{EpochPoint, Run};
use crate::stats::{normality, Normality, NormalityError, Summary};
use crate::ReportError;
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::coord::types::RangedCoordf64;
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
    let mut png = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| fail(e.to_string()))?;
    crate::write_file(path, &png)
}

/// A range around `lo..hi` with some margin, never empty; an error naming
/// the `axis` when the range (margins included) is not finite.
fn padded(lo: f64, hi: f64, axis: &str) -> Result<std::ops::Range<f64>, String> {
    let span = hi - lo;
    let pad = if span > 0.0 { span * 0.08 } else { lo.abs().max(1.0) * 0.01 };
    let range = (lo - pad)..(hi + pad);
    if range.start.is_finite() && range.end.is_finite() && (range.end - range.start).is_finite() {
        Ok(range)
    } else {
        Err(format!(
            "the {axis} axis would run from {} to {} plus margins, a range too wide to draw \
             (beyond ±{:e})",
            crate::readable_number(lo),
            crate::readable_number(hi),
            f64::MAX
        ))
    }
}

/// The tick values of a count axis from 0 to `top`: integers only (0,
/// step, 2 step, ...), the step 1, 2 or 5 times a power of ten, at most
/// 11 ticks. Plotters' own ticks for a short range fall on halves, which
/// a count's labels would round to repeated numbers.
fn count_ticks(top: f64) -> Vec<f64> {
    if !top.is_finite() || top < 1.0 {
        return vec![0.0];
    }
    let mut power = 1.0;
    let step = loop {
        if let Some(step) = [1.0, 2.0, 5.0].map(|m| m * power).into_iter().find(|s| top / s <= 10.0)
        {
            break step;
        }
        power *= 10.0;
    };
    (0u32..).map(|i| f64::from(i) * step).take_while(|v| *v <= top).collect()
}

/// How a label of the count axis reads.
fn count_label(value: &f64) -> String {
    format!("{value:.0}")
}

/// The histogram's y axis, `0..top` runs, ticked at [`count_ticks`] only
/// (plotters' `with_key_points` wrapper would do, but its labels cannot be
/// formatted for an `f64` axis).
struct CountAxis {
    range: RangedCoordf64,
    ticks: Vec<f64>,
}

impl CountAxis {
    fn new(top: f64) -> CountAxis {
        CountAxis { range: (0.0..top).into(), ticks: count_ticks(top) }
    }
}

impl Ranged for CountAxis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        self.range.map(value, limit)
    }

    /// The ticks for the labels and bold grid lines; no light grid lines,
    /// which would fall between the integers.
    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.range.range()
    }
}

/// What the histogram of a sample says about its spread: a Gaussian fit
/// and D'Agostino-Pearson's test, or why there is neither.
#[derive(Debug, Clone, PartialEq)]
pub enum Spread {
    /// The runs come from several grid cells: their spread mixes the
    /// grid's effect with seed noise, so neither is made.
    Pooled {
        /// Grid cells pooled.
        cells: usize,
    },
    /// Every run has the same value: no spread to fit or test.
    Constant {
        /// The value.
        value: f64,
    },
    /// Seed noise alone: the Gaussian (mean, sample std) is drawn and the
    /// test made, when it can be.
    Tested(Result<Normality, NormalityError>),
}

impl Spread {
    /// The spread of `values` (not empty), pooled from `grid_cells` grid cells.
    pub fn of(values: &[f64], grid_cells: usize) -> Spread {
        let constant = Summary::of(values).filter(Summary::is_constant);
        match constant {
            _ if grid_cells > 1 => Spread::Pooled { cells: grid_cells },
            Some(s) => Spread::Constant { value: s.mean },
            None => Spread::Tested(normality(values)),
        }
    }

    /// Whether the histogram draws the Gaussian fit.
    pub fn fits_gaussian(&self) -> bool {
        matches!(self, Spread::Tested(_))
    }

    /// The chart's caption line.
    pub fn caption(&self) -> String {
        match self {
            Spread::Pooled { cells } => {
                format!("pooled over {cells} grid cells: no Gaussian fit, no normality test")
            }
            Spread::Constant { value } => {
                format!(
                    "every run has the same value, {value:.2}: no Gaussian fit, no normality test"
                )
            }
            Spread::Tested(Ok(n)) => {
                format!("D'Agostino-Pearson normality test: p = {:.3}", n.p_value)
            }
            Spread::Tested(Err(e)) => {
                format!("D'Agostino-Pearson normality test: not computed ({e})")
            }
        }
    }

    /// The sentence under the histogram in `report.md`.
    pub fn markdown(&self) -> String {
        match self {
            Spread::Pooled { cells } => format!(
                "The histogram pools the runs of {cells} grid cells: their spread mixes the \
                 grid's effect with seed noise, so no Gaussian is fitted and no normality test \
                 is made (the grid tables give each value's mean ± std)."
            ),
            Spread::Constant { value } => format!(
                "Every run has the same value, {value:.2}: no spread, so no Gaussian is fitted \
                 and no normality test is made."
            ),
            Spread::Tested(Ok(_)) => {
                format!("{} (D'Agostino-Pearson K² test, scipy.stats.normaltest).", self.caption())
            }
            Spread::Tested(Err(_)) => format!("{}.", self.caption()),
        }
    }
}

/// Histogram of `values` (final top-1 on `set`, from `grid_cells` grid
/// cells) with, for seed noise alone, the fitted Gaussian (mean, sample
/// std) scaled to the counts; the caption gives [`Spread::caption`].
pub fn histogram(
    path: &Path,
    set: &str,
    values: &[f64],
    grid_cells: usize,
) -> Result<(), ReportError> {
    let Some(s) = Summary::of(values) else { return Ok(()) };
    let spread = Spread::of(values, grid_cells);
    // Identical values: three bins, so that theirs is the middle one rather
    // than one starting at the value.
    let bins = if s.max == s.min {
        3
    } else {
        ((values.len() as f64).sqrt().ceil() as usize).clamp(3, 30)
    };
    let range = padded(s.min, s.max, &format!("{set} top-1"))
        .map_err(|message| ReportError::Plot { path: path.to_path_buf(), message })?;
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
    let curve: Vec<(f64, f64)> = match s.std.filter(|&x| x > 0.0 && spread.fits_gaussian()) {
        Some(std) => (0..=200)
            .map(|i| range.start + (range.end - range.start) * i as f64 / 200.0)
            .map(|x| (x, gauss(x, std)))
            .collect(),
        None => Vec::new(),
    };
    let top = counts.iter().copied().max().unwrap_or(1) as f64;
    let top = curve.iter().map(|p| p.1).fold(top, f64::max) * 1.15;
    let std = s.std.map_or_else(|| "n/a".into(), |v| format!("{v:.2}"));
    let title = match &spread {
        Spread::Pooled { cells } => format!(
            "final {set} top-1 of {} runs pooled over {cells} grid cells: mean {:.2}, std {std}",
            s.n, s.mean
        ),
        Spread::Constant { value } => {
            format!("final {set} top-1 of {} runs: every run has {value:.2}", s.n)
        }
        Spread::Tested(_) => {
            format!("final {set} top-1 of {} runs: mean {:.2}, std {std}", s.n, s.mean)
        }
    };
    let caption = spread.caption();
    render(path, CHART_SIZE, |root| {
        let e = |e: plotters::drawing::DrawingAreaErrorKind<_>| e.to_string();
        let (body, foot) = root.split_vertically(CHART_SIZE.1 - 30);
        let mut chart = ChartBuilder::on(&body)
            .caption(&title, (FAMILY, 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(range.clone(), CountAxis::new(top))
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc(format!("{set} top-1 (%)"))
            .y_desc("runs")
            .y_label_formatter(&count_label)
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
                .label("Gaussian: mean, sample std (n − 1)")
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
            let y = if finite.is_empty() { 0.0..1.0 } else { padded(lo, hi, label)? };
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
    let y = if all.is_empty() {
        0.0..1.0
    } else {
        padded(lo, hi, &format!("{set} top-1"))
            .map_err(|message| ReportError::Plot { path: path.to_path_buf(), message })?
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_that_is_not_finite_is_refused_not_drawn() {
        assert!(padded(1.0, 3.0, "loss").is_ok());
        assert!(padded(-1e300, 1e300, "loss").is_ok());
        for (lo, hi) in [(1.0, 1.7e308), (-1e308, 1e308), (f64::MIN, 0.0), (0.0, f64::INFINITY)] {
            let err = padded(lo, hi, "training loss").unwrap_err();
            assert!(err.contains("training loss axis") && err.contains("too wide"), "{err}");
        }
    }

    #[test]
    fn the_count_axis_has_integer_ticks_with_distinct_labels() {
        for top in [1.15, 2.3, 3.45, 4.6, 6.9, 11.5, 13.8, 25.3, 115.0, 1150.0] {
            let ticks = count_ticks(top);
            let labels: Vec<String> = ticks.iter().map(count_label).collect();
            let mut distinct = labels.clone();
            distinct.dedup();
            assert_eq!(distinct, labels, "top {top}: repeated labels");
            assert!(ticks.iter().all(|t| t.fract() == 0.0 && *t <= top), "top {top}: {ticks:?}");
            assert!((2..=11).contains(&ticks.len()), "top {top}: {ticks:?}");
        }
    }

    #[test]
    fn a_pooled_or_constant_sample_gets_no_gaussian_and_no_test() {
        let spread: Vec<f64> = (0..10).map(|i| 79.5 + 0.05 * f64::from(i)).collect();
        let seeds = Spread::of(&spread, 1);
        assert!(seeds.fits_gaussian() && matches!(seeds, Spread::Tested(Ok(_))), "{seeds:?}");
        assert!(seeds.markdown().starts_with("D'Agostino-Pearson normality test: p = "));
        let pooled = Spread::of(&spread, 2);
        assert_eq!(pooled, Spread::Pooled { cells: 2 });
        assert!(!pooled.fits_gaussian());
        assert!(pooled.markdown().contains("pools the runs of 2 grid cells"), "{pooled:?}");
        let constant = Spread::of(&[73.44; 13], 1);
        assert_eq!(constant, Spread::Constant { value: 73.44 });
        assert!(!constant.fits_gaussian());
        assert!(constant.caption().contains("every run has the same value, 73.44"));
    }
}
