//! Reading a sweep folder back: its manifest, then each cell's run folder
//! (`runs/<id>/recipe.yaml` and `metrics.jsonl`, typed [`MetricsRecord`]s).
//!
//! A run counts when its metrics hold an evaluated `epoch` record for the
//! recipe's last epoch (cosine plus cooldown epochs): its final top-1 on
//! `val` is that record's `top1`, and on every further set (`real`, `v2`)
//! the record's `eval_sets` entry. Skipped, and listed with the reason:
//!
//! * a run whose `outcome.json` ([`RunOutcome`]) says it failed, unless
//!   its final evaluation was recorded (the final record is published
//!   before the final checkpoint is written and before every rank reports
//!   its end: a full disk then fails a run whose result is measured). Such
//!   a run counts, and the report lists it with the recorded failure;
//! * a run without `metrics.jsonl` (not started);
//! * a run with metrics but no `recipe.yaml` (its epochs are unknown);
//! * a run without that final record (stopped or still running).
//!
//! A run without `outcome.json` but with the final record counts: sweeps
//! interrupted after the final evaluation, and run folders of builds before
//! outcome files, have none.
//!
//! A counted run also carries its generations ([`Generations`]: how many
//! times its ranks (re)started, and why), from the `generation` records of
//! the same file; a run without any trained in one.
//!
//! Errors naming the file (and line): an `outcome.json` that is not a valid
//! outcome, a line that is not a metrics record (but an incomplete last
//! line, still being written), an epoch record with a top-1 or top-5
//! outside 0..=100 or a loss or learning rate that is not finite, and a
//! `recipe.yaml` that does not load.

use crate::generations::Generations;
use crate::ReportError;
use rsb_job::sweep::{SweepCell, SweepLayout, SweepManifest};
use rsb_job::{MetricsRecord, RunEnd, RunOutcome};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Name of the validation split in reports and in [`Run::finals`].
pub const VAL: &str = "val";

/// One epoch of a run's training curve.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochPoint {
    /// 0-based epoch.
    pub epoch: u64,
    /// Mean training loss.
    pub loss: f64,
    /// Learning rate of the epoch's last update.
    pub lr: f64,
    /// Validation top-1, when evaluated.
    pub top1: Option<f64>,
}

/// A finished run of a sweep.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    /// Its cell (id, seed, grid values).
    pub cell: SweepCell,
    /// Final top-1 (percent) by eval set: [`VAL`] and the recipe's further sets.
    pub finals: BTreeMap<String, f64>,
    /// The last record of each epoch, in epoch order.
    pub curve: Vec<EpochPoint>,
    /// The failure the coordinator recorded for the run after its final
    /// evaluation was logged (its final checkpoint could not be written, a
    /// rank failed on its way out): counted, and listed with it.
    pub failed_after_final: Option<String>,
    /// Images its final evaluation left out because they could not be read
    /// or decoded, by eval set ([`VAL`] and the recipe's further sets; only
    /// those with any): its accuracies there are over fewer images than
    /// other runs'. Counted, and listed with the counts, val first.
    pub skipped_images: Vec<(String, u64)>,
    /// Its generations: more than one when its ranks restarted (a lost,
    /// failed or admitted host, a coordinator restart, a retried attempt).
    pub generations: Generations,
}

/// Why a cell is not in the statistics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// No `metrics.jsonl`: the run never started.
    NotStarted,
    /// `metrics.jsonl` but no `recipe.yaml`: the recipe's epochs, and so
    /// which record is the final one, are unknown.
    NoRecipe,
    /// No evaluated record of the last epoch.
    Unfinished {
        /// Epochs of the recipe.
        epochs: u64,
        /// Epochs with a record (0: none).
        done: u64,
    },
    /// Its `outcome.json` says it failed (whatever its metrics hold).
    Failed {
        /// Attempts made.
        attempts: u32,
        /// Why the last attempt failed, as the coordinator recorded it.
        failure: Option<String>,
    },
}

impl SkipReason {
    /// A short name of the reason, for counts: `not started`, `no recipe`,
    /// `unfinished` or `failed`.
    pub fn kind(&self) -> &'static str {
        match self {
            SkipReason::NotStarted => "not started",
            SkipReason::NoRecipe => "no recipe",
            SkipReason::Unfinished { .. } => "unfinished",
            SkipReason::Failed { .. } => "failed",
        }
    }
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SkipReason::NotStarted => write!(f, "not started (no metrics.jsonl)"),
            SkipReason::NoRecipe => {
                write!(f, "no recipe.yaml next to its metrics.jsonl (its epochs are unknown)")
            }
            SkipReason::Unfinished { epochs, done } => {
                write!(f, "unfinished ({done} of {epochs} epochs recorded, no final evaluation)")
            }
            SkipReason::Failed { attempts, failure } => {
                write!(f, "failed after {attempts} attempt(s): ")?;
                match failure {
                    Some(failure) => write!(f, "{failure}"),
                    None => write!(f, "no reason recorded"),
                }
            }
        }
    }
}

/// How many cells were skipped, by reason: `3 run(s) skipped (1 not
/// started, 2 failed)`; empty when none was.
pub fn skipped_text(skipped: &[Skipped]) -> String {
    if skipped.is_empty() {
        return String::new();
    }
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for s in skipped {
        match counts.iter_mut().find(|(kind, _)| *kind == s.reason.kind()) {
            Some((_, count)) => *count += 1,
            None => counts.push((s.reason.kind(), 1)),
        }
    }
    let counts: Vec<String> = counts.iter().map(|(kind, n)| format!("{n} {kind}")).collect();
    format!("{} run(s) skipped ({})", skipped.len(), counts.join(", "))
}

/// A cell left out of the statistics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The cell id.
    pub id: String,
    /// Its metrics file.
    pub metrics: PathBuf,
    /// Why.
    pub reason: SkipReason,
}

/// How many skipped cells [`log_skipped`] logs one line each.
pub const SKIPS_LOGGED: usize = 10;

/// Logs the first [`SKIPS_LOGGED`] skipped cells of sweep `dir` a line
/// each, with why, and the others in one line of counts by reason: a sweep
/// of 100,000 cells not yet started logs 11 lines, not 100,000.
pub fn log_skipped(dir: &Path, skipped: &[Skipped]) {
    for s in skipped.iter().take(SKIPS_LOGGED) {
        tracing::warn!(
            sweep = %dir.display(),
            run = %s.id,
            metrics = %s.metrics.display(),
            reason = %s.reason,
            "run skipped"
        );
    }
    if let Some(rest) = skipped.get(SKIPS_LOGGED..).filter(|rest| !rest.is_empty()) {
        tracing::warn!(sweep = %dir.display(), "and {}", skipped_text(rest));
    }
}

/// A sweep folder read back.
#[derive(Debug, Clone)]
pub struct Sweep {
    /// The sweep folder.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: SweepManifest,
    /// Finished runs, in manifest order.
    pub runs: Vec<Run>,
    /// Cells left out, in manifest order.
    pub skipped: Vec<Skipped>,
}

impl Sweep {
    /// Reads `dir/sweep.json` and every cell's run folder. Runs that did
    /// not finish are skipped (and logged, [`log_skipped`]); a corrupt file
    /// is an error.
    pub fn read(dir: &Path) -> Result<Sweep, ReportError> {
        let manifest = SweepManifest::read(dir)?;
        let layout = SweepLayout::new(dir);
        let mut runs = Vec::new();
        let mut skipped = Vec::new();
        for cell in &manifest.cells {
            let metrics = layout.run_metrics(&cell.id);
            match read_run(&layout, cell)? {
                Ok(run) => runs.push(run),
                Err(reason) => skipped.push(Skipped { id: cell.id.clone(), metrics, reason }),
            }
        }
        log_skipped(dir, &skipped);
        Ok(Sweep { dir: dir.to_path_buf(), manifest, runs, skipped })
    }

    /// The eval sets of the finished runs: [`VAL`] first, then the others by name.
    pub fn sets(&self) -> Vec<String> {
        let mut sets: Vec<String> = Vec::new();
        for run in &self.runs {
            for name in run.finals.keys() {
                if !sets.contains(name) {
                    sets.push(name.clone());
                }
            }
        }
        sets.sort_by_key(|s| (s != VAL, s.clone()));
        sets
    }

    /// The final top-1 of every finished run that evaluated `set`.
    pub fn finals(&self, set: &str) -> Vec<f64> {
        self.runs.iter().filter_map(|r| r.finals.get(set).copied()).collect()
    }

    /// The final top-1 on `set` of the run with seed 0, when exactly one
    /// finished run has it and the sweep has one grid cell (a grid of more
    /// has one per cell: none is "the" seed 0, also when the others failed).
    pub fn seed0(&self, set: &str) -> Option<f64> {
        if self.manifest.grid.iter().any(|axis| axis.values.len() > 1) {
            return None;
        }
        let mut zero = self.runs.iter().filter(|r| r.cell.seed == 0);
        match (zero.next(), zero.next()) {
            (Some(run), None) => run.finals.get(set).copied(),
            _ => None,
        }
    }

    /// How many grid cells (distinct combinations of grid values) the
    /// finished runs with a final top-1 on `set` come from; 1 for a sweep
    /// of seeds alone.
    pub fn grid_cells(&self, set: &str) -> usize {
        let mut cells: Vec<&[rsb_job::sweep::Assignment]> = Vec::new();
        for run in self.runs.iter().filter(|r| r.finals.contains_key(set)) {
            if !cells.contains(&run.cell.assignments.as_slice()) {
                cells.push(&run.cell.assignments);
            }
        }
        cells.len().max(1)
    }

    /// The sweep's name in reports: its folder's name.
    pub fn name(&self) -> String {
        self.dir
            .canonicalize()
            .unwrap_or_else(|_| self.dir.clone())
            .file_name()
            .map_or_else(|| self.dir.display().to_string(), |n| n.to_string_lossy().into_owned())
    }
}

/// The records of a metrics file; an unreadable line is an error naming
/// `path:line`, except a last line without its newline (a record being
/// written while the report reads), which is left out with a warning. An
/// epoch record with an impossible value ([`check_epoch_record`]) is an
/// error naming `path:line` and the field.
pub fn read_metrics(path: &Path) -> Result<Vec<MetricsRecord>, ReportError> {
    use std::io::Read;
    let io = |error| ReportError::Io { path: path.to_path_buf(), error };
    let mut bytes = Vec::new();
    rsb_files::open_regular_file(path)
        .and_then(|mut file| file.read_to_end(&mut bytes))
        .map_err(io)?;
    let mut records = Vec::new();
    for (index, line) in bytes.split_inclusive(|&b| b == b'\n').enumerate() {
        let line = match std::str::from_utf8(line) {
            Ok(line) => line,
            // Cut inside a character: an incomplete last line, as below.
            Err(e) if !line.ends_with(b"\n") => {
                std::str::from_utf8(&line[..e.valid_up_to()]).unwrap_or_default()
            }
            Err(e) => {
                return Err(ReportError::Metrics {
                    path: path.to_path_buf(),
                    line: index + 1,
                    message: format!("not UTF-8 text (byte {} of the line)", e.valid_up_to() + 1),
                })
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(record) => {
                check_epoch_record(&record).map_err(|(field, value, allowed)| {
                    ReportError::MetricsValue {
                        path: path.to_path_buf(),
                        line: index + 1,
                        field,
                        value,
                        allowed,
                    }
                })?;
                records.push(record)
            }
            Err(_) if !line.ends_with('\n') => {
                tracing::warn!(
                    metrics = %path.display(),
                    line = index + 1,
                    "last line is incomplete (still being written?); left out"
                );
            }
            Err(e) => {
                return Err(ReportError::Metrics {
                    path: path.to_path_buf(),
                    line: index + 1,
                    message: json_problem(&e, line),
                })
            }
        }
    }
    Ok(records)
}

/// A JSON error of one line, placed by column and shown with the text
/// around it (serde's own position says `line 1`, of the line alone; a
/// `NaN` or a cut field is then seen with its key).
fn json_problem(error: &serde_json::Error, line: &str) -> String {
    let message = error.to_string();
    let message = match message.rfind(" at line ") {
        Some(at) => &message[..at],
        None => &message,
    };
    let line = line.trim_end();
    let column = error.column().min(line.len());
    // Byte offsets on character boundaries around the column.
    let boundary = |mut i: usize| {
        while !line.is_char_boundary(i) {
            i -= 1;
        }
        i
    };
    let start = boundary(column.saturating_sub(30));
    let end = boundary((column + 10).min(line.len()));
    let near = &line[start..end];
    format!("{message}, at column {column}, in `{near}`")
}

/// What [`check_epoch_record`] allows of a percentage.
const PERCENT: &str = "0..=100";
/// What [`check_epoch_record`] allows of a loss or a learning rate.
const FINITE: &str = "a finite number";

/// Refuses an epoch record whose accuracies are not percentages or whose
/// loss or learning rate is not finite, as `(field, value, what is
/// allowed)`. Such a value is a bug or a corrupt file, and would otherwise
/// reach the statistics and stretch a chart's axis past what can be drawn.
pub fn check_epoch_record(record: &MetricsRecord) -> Result<(), (String, f64, &'static str)> {
    let MetricsRecord::Epoch { lr, loss, top1, top5, eval_sets, .. } = record else {
        return Ok(());
    };
    let mut percentages: Vec<(String, f64)> = Vec::new();
    percentages.extend(top1.map(|v| ("top1".to_string(), v)));
    percentages.extend(top5.map(|v| ("top5".to_string(), v)));
    for (name, accuracy) in eval_sets {
        percentages.push((format!("eval_sets.{name}.top1"), accuracy.top1));
        percentages.push((format!("eval_sets.{name}.top5"), accuracy.top5));
    }
    if let Some((field, value)) = percentages.into_iter().find(|(_, v)| !(0.0..=100.0).contains(v))
    {
        return Err((field, value, PERCENT));
    }
    for (field, value) in [("loss", *loss), ("lr", *lr)] {
        if !value.is_finite() {
            return Err((field.to_string(), value, FINITE));
        }
    }
    Ok(())
}

/// A finished run, or why the cell is skipped.
fn read_run(
    layout: &SweepLayout,
    cell: &SweepCell,
) -> Result<Result<Run, SkipReason>, ReportError> {
    // A run the coordinator recorded as failed is skipped as failed, with
    // its failure, unless its final evaluation was recorded: the final
    // record is published before the final checkpoint is written and
    // before every rank has reported its end, so a full disk at that save,
    // or a rank that fails on its way out, fails a run whose result is
    // measured. That run counts, and the report lists it with the failure.
    let failed = RunOutcome::read(layout, &cell.id)?.filter(|o| o.end == RunEnd::Failed);
    let skip = |otherwise: SkipReason| match &failed {
        Some(outcome) => {
            SkipReason::Failed { attempts: outcome.attempts, failure: outcome.failure.clone() }
        }
        None => otherwise,
    };
    let metrics = layout.run_metrics(&cell.id);
    // Absent: not started. Anything else there is read (a folder, a FIFO, a
    // dangling link: an error naming it, not a run quietly left out).
    if rsb_files::nothing_at(&metrics) {
        return Ok(Err(skip(SkipReason::NotStarted)));
    }
    let recipe_path = layout.run_recipe(&cell.id);
    let recipe_text = match rsb_files::read_regular_file_if_present(&recipe_path) {
        Ok(Some(text)) => text,
        Ok(None) => return Ok(Err(skip(SkipReason::NoRecipe))),
        Err(error) => return Err(ReportError::Io { path: recipe_path, error }),
    };
    let recipe = rsb_recipes::load_str(&recipe_text, &recipe_path, &[])
        .map_err(|source| ReportError::Recipe { error: Box::new(source) })?;
    let epochs = recipe.total_epochs();
    let records = read_metrics(&metrics)?;
    let mut last: BTreeMap<u64, &MetricsRecord> = BTreeMap::new();
    for record in &records {
        if let MetricsRecord::Epoch { epoch, .. } = record {
            last.insert(*epoch, record);
        }
    }
    let done = last.keys().next_back().map_or(0, |e| e + 1);
    let final_record = epochs.checked_sub(1).and_then(|e| last.get(&e).copied());
    let Some(MetricsRecord::Epoch { top1: Some(top1), eval_sets, val_skipped_images, .. }) =
        final_record
    else {
        return Ok(Err(skip(SkipReason::Unfinished { epochs, done })));
    };
    let mut finals = BTreeMap::from([(VAL.to_string(), *top1)]);
    finals.extend(eval_sets.iter().map(|(name, acc)| (name.clone(), acc.top1)));
    let skipped_images: Vec<(String, u64)> =
        std::iter::once((VAL.to_string(), val_skipped_images.unwrap_or(0)))
            .chain(eval_sets.iter().map(|(name, acc)| (name.clone(), acc.skipped)))
            .filter(|&(_, skipped)| skipped > 0)
            .collect();
    if !skipped_images.is_empty() {
        tracing::warn!(
            run = %cell.id,
            skipped = ?skipped_images,
            "counted: the run's final evaluation left out images it could not read or decode"
        );
    }
    let curve = last
        .values()
        .filter_map(|r| match r {
            MetricsRecord::Epoch { epoch, loss, lr, top1, .. } => {
                Some(EpochPoint { epoch: *epoch, loss: *loss, lr: *lr, top1: *top1 })
            }
            _ => None,
        })
        .collect();
    let failed_after_final = failed.map(|outcome| {
        let failure = outcome.failure.unwrap_or_else(|| "no reason recorded".to_string());
        tracing::warn!(
            run = %cell.id,
            %failure,
            "counted: the coordinator recorded a failure after the run's final evaluation"
        );
        failure
    });
    let generations = Generations::of_records(&records);
    if generations.restarts() > 0 {
        tracing::info!(
            run = %cell.id,
            generations = generations.count(),
            world_sizes = %generations.world_sizes_text(),
            "counted: the run did not train in one generation"
        );
    }
    Ok(Ok(Run {
        cell: cell.clone(),
        finals,
        curve,
        failed_after_final,
        skipped_images,
        generations,
    }))
}

/// How a set is named in tables: `ReaL` and `V2` as in the paper, others as recorded.
pub fn display_name(set: &str) -> String {
    match set {
        "real" => "ReaL".into(),
        "v2" => "V2".into(),
        other => other.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rsb_job::sweep::GridAxis;

    /// A sweep of `seeds` (over `grid`, `key=a,b`, when given) whose runs
    /// `finished` (cell indices) reached a final top-1 of 70 + index.
    fn sweep_of(seeds: Vec<u64>, grid: Option<&str>, finished: &[usize]) -> Sweep {
        let grid = grid.map(|g| GridAxis::parse(g).unwrap()).into_iter().collect();
        let manifest = SweepManifest::new("r", "r.yaml", Vec::new(), seeds, grid).unwrap();
        let runs = finished
            .iter()
            .map(|&i| Run {
                cell: manifest.cells[i].clone(),
                finals: BTreeMap::from([(VAL.to_string(), 70.0 + i as f64)]),
                curve: Vec::new(),
                failed_after_final: None,
                skipped_images: Vec::new(),
                generations: Generations::default(),
            })
            .collect();
        Sweep { dir: PathBuf::from("sweep"), manifest, runs, skipped: Vec::new() }
    }

    #[test]
    fn seed_0_is_one_runs_only_without_a_grid() {
        assert_eq!(sweep_of(vec![0, 1], None, &[0, 1]).seed0(VAL), Some(70.0));
        assert_eq!(sweep_of(vec![1, 2], None, &[0, 1]).seed0(VAL), None);
        // A grid's seed-0 runs: one per value, none "the" seed 0, also when
        // only one of them finished.
        let grid = Some("optimizer.lamb.lr=0.001,0.002");
        assert_eq!(sweep_of(vec![0, 1], grid, &[0, 1, 2, 3]).seed0(VAL), None);
        let one_left = sweep_of(vec![0, 1], grid, &[0, 1, 3]);
        assert_eq!(one_left.runs.iter().filter(|r| r.cell.seed == 0).count(), 1);
        assert_eq!(one_left.seed0(VAL), None);
        // A grid of one value has one seed-0 run.
        let one_value = Some("optimizer.lamb.lr=0.001");
        assert_eq!(sweep_of(vec![0, 1], one_value, &[0, 1]).seed0(VAL), Some(70.0));
    }

    #[test]
    fn a_torn_last_line_is_left_out_and_a_bad_line_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("metrics.jsonl");
        let good = r#"{"kind":"loading","epoch":0,"step":0,"elapsed_s":0.5}"#;
        std::fs::write(&path, format!("{good}\n\n{good}\n{{\"kind\":\"epo")).unwrap();
        assert_eq!(read_metrics(&path).unwrap().len(), 2);
        std::fs::write(&path, format!("{good}\n{{\"kind\":\"epo\n{good}\n")).unwrap();
        let err = read_metrics(&path).unwrap_err().to_string();
        assert!(err.starts_with(&format!("{}:2: not a metrics record", path.display())), "{err}");
        std::fs::write(&path, format!("{good}\n{{\"kind\":\"epo\n")).unwrap();
        assert!(read_metrics(&path).is_err(), "a complete bad last line is an error");
    }
}
