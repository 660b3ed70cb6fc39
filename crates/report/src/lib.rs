//! Seed-study reports of sweeps (`coordinator report DIR [DIR_B]`), without
//! libtorch.
//!
//! [`report`] reads a sweep folder ([`runs::Sweep`]: `sweep.json`, then each
//! `runs/<id>/metrics.jsonl`) and writes `DIR/report/`:
//!
//! * `report.md`, `report.csv`: per eval set (`val`, and `real`/`v2` when the
//!   recipe evaluated them) the final top-1's mean, std (n − 1), max, min,
//!   seed 0, the mean's 95% confidence interval and n, shaped like the
//!   paper's seed table ([`tables::SetRow`]). `report.md` also lists the
//!   cells left out and why, and the runs counted with a caveat: a failure
//!   recorded after their final evaluation, or images their final evaluation
//!   could not decode (their accuracies are over fewer images);
//! * restarts ([`generations`]): `report.md` lists the runs that did not
//!   train in one generation, one line per generation after the first (its
//!   reasons, ranks and the update it resumed from), flagging a world size
//!   that changed, or says in one line that every run trained in one; it
//!   ends with a table of the finished runs (final top-1, restarts, world
//!   size per generation), which `runs.csv` holds too ([`tables::RunRow`]);
//! * `top1_histogram.png`: the final val top-1 with the fitted Gaussian
//!   (mean, sample std) and the normality test's p-value in the caption
//!   ([`stats::normality`]); neither when every run has the same value, nor
//!   when the runs come from several grid cells (their spread is not seed
//!   noise alone; [`plots::Spread`]);
//! * `curves/<id>.png`: loss, learning rate and val top-1 per epoch of each run;
//! * with grids, `grid.csv`, a section of `report.md` per axis (mean ± std
//!   over the seeds) and `grid_<axis>.png`.
//!
//! [`compare`] does the same for sweep A and adds the comparison of B
//! against A ([`tables::ComparisonRow`]): `comparison.csv` and a section of
//! A's `report.md` with the difference of means, its 95% CI, Welch's p-value,
//! a sentence saying whether the difference is within seed noise, and the
//! seeds per sweep needed to resolve it; a set only one sweep evaluated is
//! named as not compared. Nothing is written into B, and B
//! must be another folder than A (a sweep against itself is refused). A plain
//! report removes the `comparison.csv` of an earlier comparison, which would
//! no longer match `report.md`.
//!
//! Every file is written atomically (temporary file, fsync, rename), so a
//! reader sees an old file or a new one, never a torn one.
//!
//! The statistics match `scipy.stats` ([`stats`]; tested against it).

#![warn(missing_docs)]
#![warn(clippy::unwrap_used)]

pub mod generations;
pub mod plots;
pub mod runs;
pub mod stats;
pub mod tables;

use rsb_files::{write_atomically, Readers};
use rsb_job::sweep::{id_safe, SweepError};
use runs::{Skipped, Sweep, VAL};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use tables::{ComparisonRow, GridRow, RunRow, SetRow};

/// The report's Markdown file.
pub const REPORT_MD: &str = "report.md";
/// The seed table as CSV.
pub const REPORT_CSV: &str = "report.csv";
/// The finished runs, one line each, with their restarts.
pub const RUNS_CSV: &str = "runs.csv";
/// The grid table as CSV.
pub const GRID_CSV: &str = "grid.csv";
/// The comparison as CSV.
pub const COMPARISON_CSV: &str = "comparison.csv";
/// The histogram of the final val top-1.
pub const HISTOGRAM_PNG: &str = "top1_histogram.png";
/// The folder of per-run training curves.
pub const CURVES: &str = "curves";

/// Why a report cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The sweep manifest is missing or wrong.
    #[error(transparent)]
    Sweep(#[from] SweepError),
    /// A line of a metrics file is not a metrics record.
    #[error("{path}:{line}: not a metrics record: {message}")]
    Metrics {
        /// The metrics file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong with it.
        message: String,
    },
    /// An epoch record holds a value no run can produce.
    #[error("{path}:{line}: {field} = {} is not {allowed}", readable_number(*.value))]
    MetricsValue {
        /// The metrics file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// The field (`top1`, `eval_sets.real.top5`, `loss`, ...).
        field: String,
        /// Its value.
        value: f64,
        /// What it must be.
        allowed: &'static str,
    },
    /// A run's `recipe.yaml` does not load.
    // `error` names the file (and line), and is shown in the message, not
    // chained as a source, so `{:#}` does not print it twice.
    #[error("{error}")]
    Recipe {
        /// Why (naming the file).
        error: Box<rsb_recipes::RecipeError>,
    },
    /// No run of the sweep finished.
    #[error("{dir}: no finished run to report ({} cell(s) skipped: {})", .skipped.len(),
        skipped_list(.skipped))]
    NoFinishedRuns {
        /// The sweep folder.
        dir: PathBuf,
        /// Every cell, with why it was skipped.
        skipped: Vec<Skipped>,
    },
    /// A comparison was asked of a sweep against itself.
    #[error(
        "{} and {}: both are the sweep {}; a comparison needs two sweeps (it would find \
         no difference)",
        a.display(), b.display(), folder.display()
    )]
    SameSweep {
        /// Sweep A, as given.
        a: PathBuf,
        /// Sweep B, as given.
        b: PathBuf,
        /// The one folder both name.
        folder: PathBuf,
    },
    /// A file could not be read or written.
    // `error` is shown in the message, not chained as a source, so `{:#}`
    // does not print it twice.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        error: std::io::Error,
    },
    /// A CSV file could not be written.
    // `error` is shown in the message, not chained as a source, so `{:#}`
    // does not print it twice.
    #[error("{path}: {error}")]
    Csv {
        /// The file.
        path: PathBuf,
        /// The cause.
        error: csv::Error,
    },
    /// A chart could not be drawn or written.
    #[error("{path}: drawing the chart failed: {message}")]
    Plot {
        /// The PNG file.
        path: PathBuf,
        /// The cause.
        message: String,
    },
}

/// What a report wrote.
#[derive(Debug, Clone)]
pub struct Written {
    /// The report folder.
    pub dir: PathBuf,
    /// Every file written, in order.
    pub files: Vec<PathBuf>,
    /// The tables (and comparison sentences) as Markdown, for the terminal.
    pub summary: String,
    /// Cells left out, with why (of A for a comparison).
    pub skipped: Vec<Skipped>,
    /// Finished runs reported (of A for a comparison).
    pub runs: usize,
}

/// `v` as people read it: plain for everyday magnitudes, in scientific
/// notation when plain digits would run to dozens of places (1.7e308).
fn readable_number(v: f64) -> String {
    if v != 0.0 && v.is_finite() && !(1e-4..1e9).contains(&v.abs()) {
        format!("{v:e}")
    } else {
        format!("{v}")
    }
}

/// Writes `bytes` to `path` atomically, readable by everyone (results that
/// other accounts of a shared file system read).
fn write_file(path: &Path, bytes: &[u8]) -> Result<(), ReportError> {
    write_atomically(path, bytes, Readers::Everyone)
        .map_err(|source| ReportError::Io { path: path.to_path_buf(), error: source })
}

fn write_csv<T: serde::Serialize>(path: &Path, rows: &[T]) -> Result<(), ReportError> {
    let fail = |source| ReportError::Csv { path: path.to_path_buf(), error: source };
    let mut writer = csv::Writer::from_writer(Vec::new());
    for row in rows {
        writer.serialize(row).map_err(fail)?;
    }
    let bytes = writer.into_inner().map_err(|e| ReportError::Io {
        path: path.to_path_buf(),
        error: std::io::Error::other(e.to_string()),
    })?;
    write_file(path, &bytes)
}

/// The first skipped cells with why, and how many more (a sweep of
/// thousands of cells makes no line of megabytes).
fn skipped_list(skipped: &[Skipped]) -> String {
    const SHOWN: usize = 20;
    let mut shown: Vec<String> =
        skipped.iter().take(SHOWN).map(|s| format!("{} {}", s.id, s.reason)).collect();
    if skipped.len() > SHOWN {
        shown.push(format!("and {} more", skipped.len() - SHOWN));
    }
    shown.join("; ")
}

/// Removes a file an earlier report wrote and this one does not (a missing
/// one is fine).
fn remove_stale(path: &Path) -> Result<(), ReportError> {
    match std::fs::remove_file(path) {
        Ok(()) => {
            tracing::info!(file = %path.display(), "removed the file of an earlier report");
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ReportError::Io { path: path.to_path_buf(), error: source }),
    }
}

fn read_finished(dir: &Path) -> Result<Sweep, ReportError> {
    let sweep = Sweep::read(dir)?;
    if sweep.runs.is_empty() {
        return Err(ReportError::NoFinishedRuns { dir: dir.to_path_buf(), skipped: sweep.skipped });
    }
    Ok(sweep)
}

/// The Markdown of one sweep: its seed table, the grid tables and the skips.
fn sweep_markdown(sweep: &Sweep, rows: &[SetRow], grid: &[GridRow]) -> String {
    let m = &sweep.manifest;
    let mut out = format!(
        "## {}: recipe `{}` ({})\n\n{} finished run(s) of {} cell(s); seeds {}{}.\n\n",
        sweep.name(),
        m.recipe,
        m.source,
        sweep.runs.len(),
        m.cells.len(),
        seeds_text(&m.seeds),
        m.grid
            .iter()
            .map(|a| format!("; grid {} = {}", a.key, a.values.join(", ")))
            .collect::<String>(),
    );
    out.push_str(if m.grid.is_empty() {
        "Final top-1 (%) per eval set:\n\n"
    } else {
        "Final top-1 (%) per eval set, over every cell of the grid:\n\n"
    });
    out.push_str(&tables::set_table_markdown(rows));
    if !grid.is_empty() {
        out.push_str("\n### Grid: final top-1, mean ± std over the runs with each value\n");
        out.push_str(&tables::grid_markdown(grid, &sweep.sets()));
    }
    if !sweep.skipped.is_empty() {
        let _ =
            writeln!(out, "\n{} cell(s) skipped (not in the statistics):\n", sweep.skipped.len());
        for s in &sweep.skipped {
            let _ = writeln!(out, "- `{}`: {}", s.id, s.reason);
        }
    }
    let failed_after_final: Vec<&runs::Run> =
        sweep.runs.iter().filter(|r| r.failed_after_final.is_some()).collect();
    if !failed_after_final.is_empty() {
        let _ = writeln!(
            out,
            "\n{} run(s) counted, although the coordinator recorded a failure after their final \
             evaluation:\n",
            failed_after_final.len()
        );
        for run in failed_after_final {
            let failure = run.failed_after_final.as_deref().unwrap_or_default();
            let _ = writeln!(out, "- `{}`: {failure}", run.cell.id);
        }
    }
    let skipped_images: Vec<&runs::Run> =
        sweep.runs.iter().filter(|r| !r.skipped_images.is_empty()).collect();
    if !skipped_images.is_empty() {
        let _ = writeln!(
            out,
            "\n{} run(s) counted whose final evaluation left out images it could not read or \
             decode (their accuracies there are over fewer images than the other runs'):\n",
            skipped_images.len()
        );
        for run in skipped_images {
            let sets: Vec<String> = run
                .skipped_images
                .iter()
                .map(|(set, n)| format!("{n} of {}", runs::display_name(set)))
                .collect();
            let _ = writeln!(out, "- `{}`: {}", run.cell.id, sets.join(", "));
        }
    }
    out.push_str(&restarts_markdown(sweep));
    out
}

/// The runs that did not train in one generation, each with one line per
/// generation after the first and a flag when its world size changed; or
/// one line saying that every run trained in one.
fn restarts_markdown(sweep: &Sweep) -> String {
    let restarted: Vec<&runs::Run> =
        sweep.runs.iter().filter(|r| r.generations.restarts() > 0).collect();
    if restarted.is_empty() {
        return "\nEvery run trained in one generation (no restart).\n".to_string();
    }
    let mut out = format!(
        "\n{} run(s) counted that did not train in one generation (a resume draws no data \
         again, but a change of world size maps the data streams onto other ranks, and updates \
         made after the checkpoint a generation resumes from are trained again):\n\n",
        restarted.len()
    );
    for run in restarted {
        let _ = writeln!(out, "- `{}`: {}", run.cell.id, run.generations.summary());
        for (i, generation) in run.generations.after_first() {
            let _ = writeln!(out, "  - generation {i}: {}", generation.describe());
        }
    }
    out
}

/// The table of the finished runs, as a section of `report.md`.
fn runs_section(sweep: &Sweep) -> String {
    format!(
        "\nThe finished runs (final top-1 %; restarts: generations after the first):\n\n{}",
        tables::run_table_markdown(sweep, &sweep.sets())
    )
}

fn seeds_text(seeds: &[u64]) -> String {
    let contiguous = seeds.windows(2).all(|w| w[0].checked_add(1) == Some(w[1]));
    let end = seeds.last().and_then(|b| b.checked_add(1));
    match (seeds.first(), end) {
        (Some(a), Some(end)) if contiguous && seeds.len() > 2 => format!("{a}..{end}"),
        _ => seeds.iter().map(u64::to_string).collect::<Vec<_>>().join(", "),
    }
}

/// Writes the report of one sweep into `sweep.dir/report/`; returns what
/// was written and the Markdown of the sweep's section.
fn write_sweep(sweep: &Sweep) -> Result<(Written, String), ReportError> {
    let dir = rsb_job::SweepLayout::new(&sweep.dir).report_dir();
    let curves_dir = dir.join(CURVES);
    std::fs::create_dir_all(&curves_dir)
        .map_err(|source| ReportError::Io { path: curves_dir.clone(), error: source })?;
    let mut files = Vec::new();
    let rows = tables::set_rows(sweep);
    let csv = dir.join(REPORT_CSV);
    write_csv(&csv, &rows)?;
    files.push(csv);
    let csv = dir.join(RUNS_CSV);
    write_csv::<RunRow>(&csv, &tables::run_rows(sweep))?;
    files.push(csv);
    let grid = tables::grid_rows(sweep);
    if !grid.is_empty() {
        let csv = dir.join(GRID_CSV);
        write_csv(&csv, &grid)?;
        files.push(csv);
        for axis in &sweep.manifest.grid {
            let groups: Vec<(String, Vec<f64>)> = axis
                .values
                .iter()
                .map(|value| {
                    let values = sweep
                        .runs
                        .iter()
                        .filter(|r| r.cell.value_of(&axis.key) == Some(value.as_str()))
                        .filter_map(|r| r.finals.get(VAL).copied())
                        .collect();
                    (value.clone(), values)
                })
                .collect();
            let png = dir.join(format!("grid_{}.png", id_safe(&axis.key)));
            plots::grid_axis(&png, &axis.key, VAL, &groups)?;
            files.push(png);
        }
    }
    let values = sweep.finals(VAL);
    let grid_cells = sweep.grid_cells(VAL);
    if !values.is_empty() {
        let png = dir.join(HISTOGRAM_PNG);
        plots::histogram(&png, VAL, &values, grid_cells)?;
        files.push(png);
    }
    for run in &sweep.runs {
        let png = curves_dir.join(format!("{}.png", run.cell.id));
        plots::curves(&png, run)?;
        files.push(png);
    }
    // A run an earlier report drew that does not count now (a run that
    // failed or was started again since): its curves go with it.
    for skipped in &sweep.skipped {
        remove_stale(&curves_dir.join(format!("{}.png", skipped.id)))?;
    }
    let mut section = sweep_markdown(sweep, &rows, &grid);
    if !values.is_empty() {
        let _ = writeln!(
            section,
            "\n![final val top-1 histogram]({HISTOGRAM_PNG})\n\n{}",
            plots::Spread::of(&values, grid_cells).markdown()
        );
    }
    section.push_str(&runs_section(sweep));
    let written = Written {
        dir,
        files,
        summary: String::new(),
        skipped: sweep.skipped.clone(),
        runs: sweep.runs.len(),
    };
    Ok((written, section))
}

/// Writes `DIR/report/` for the sweep folder `dir` (see the crate doc).
pub fn report(dir: &Path) -> Result<Written, ReportError> {
    let sweep = read_finished(dir)?;
    let (mut written, section) = write_sweep(&sweep)?;
    remove_stale(&written.dir.join(COMPARISON_CSV))?;
    let md = written.dir.join(REPORT_MD);
    write_file(&md, format!("# Seed study\n\n{section}").as_bytes())?;
    written.files.insert(0, md);
    written.summary = section;
    Ok(written)
}

/// Writes `A/report/` for sweep `a` plus the comparison of sweep `b`
/// against it (`comparison.csv`, a section of `report.md`).
/// The same sweep twice (one folder through two paths, a link) is refused.
pub fn compare(a: &Path, b: &Path) -> Result<Written, ReportError> {
    let resolved = |dir: &Path| {
        dir.canonicalize().map_err(|error| ReportError::Io { path: dir.to_path_buf(), error })
    };
    let folder = resolved(a)?;
    if folder == resolved(b)? {
        return Err(ReportError::SameSweep { a: a.to_path_buf(), b: b.to_path_buf(), folder });
    }
    let sweep_a = read_finished(a)?;
    // Its skipped runs are logged as it is read, naming its folder.
    let sweep_b = read_finished(b)?;
    let (mut written, section_a) = write_sweep(&sweep_a)?;
    let rows_b = tables::set_rows(&sweep_b);
    let section_b =
        sweep_markdown(&sweep_b, &rows_b, &tables::grid_rows(&sweep_b)) + &runs_section(&sweep_b);
    let (name_a, name_b) = (sweep_a.name(), sweep_b.name());
    let (name_a, name_b) =
        if name_a == name_b { ("A".to_string(), "B".to_string()) } else { (name_a, name_b) };
    let rows: Vec<ComparisonRow> = tables::comparison_rows(&sweep_a, &sweep_b);
    let csv = written.dir.join(COMPARISON_CSV);
    write_csv(&csv, &rows)?;
    let mut comparison = format!(
        "## Comparison: {name_b} against {name_a}\n\n\
         Welch's t-test (unequal variances); 95% CIs by Welch–Satterthwaite. Seeds needed: \
         n = ⌈2 (z₀.₉₇₅ + z₀.₈₀)² σ² / δ²⌉ per sweep, σ² the mean of the two variances, δ the \
         difference (80% power, two-sided 5%).\n\n{}",
        tables::comparison_markdown(&rows, &name_a, &name_b)
    );
    // Sets only one sweep evaluated are not compared: said, not dropped.
    let (sets_a, sets_b) = (sweep_a.sets(), sweep_b.sets());
    let only = |sets: &[String], other: &[String], name: &str| {
        sets.iter()
            .filter(|set| !other.contains(set))
            .map(|set| format!("{} (only {name})", runs::display_name(set)))
            .collect::<Vec<_>>()
    };
    let one_sided = [only(&sets_a, &sets_b, &name_a), only(&sets_b, &sets_a, &name_b)].concat();
    if !one_sided.is_empty() {
        let _ = writeln!(
            comparison,
            "\nNot compared, as only one sweep evaluated them: {}.",
            one_sided.join(", ")
        );
    }
    let md = written.dir.join(REPORT_MD);
    let text = format!("# Seed study comparison\n\n{comparison}\n{section_a}\n{section_b}");
    write_file(&md, text.as_bytes())?;
    written.files.insert(0, md);
    written.files.push(csv);
    written.summary = format!("{comparison}\n{section_a}\n{section_b}");
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_read_as_a_range_when_contiguous() {
        assert_eq!(seeds_text(&[0, 1, 2, 3]), "0..4");
        assert_eq!(seeds_text(&[0, 1]), "0, 1");
        assert_eq!(seeds_text(&[5, 2, 9]), "5, 2, 9");
        // The last seed of u64 has no exclusive end: listed, not wrapped to 0.
        let top = [u64::MAX - 2, u64::MAX - 1, u64::MAX];
        assert_eq!(seeds_text(&top), top.map(|s| s.to_string()).join(", "));
    }
}
