//! Reading a sweep folder back: its manifest, then each cell's run folder
//! (`runs/<id>/recipe.yaml` and `metrics.jsonl`, typed [`MetricsRecord`]s).
//!
//! A run counts when its metrics hold an evaluated `epoch` record for the
//! recipe's last epoch (cosine plus cooldown epochs): its final top-1 on
//! `val` is that record's `top1`, and on every further set (`real`, `v2`)
//! the record's `eval_sets` entry. A run without `metrics.jsonl` (not
//! started) or without that record (stopped, failed or still running) is
//! skipped and listed with its reason. A line that is not a metrics record
//! (but an incomplete last line, still being written), or a run folder whose
//! `recipe.yaml` does not load, is an error naming the file (and line).

use crate::ReportError;
use rsb_job::sweep::{SweepCell, SweepLayout, SweepManifest};
use rsb_job::MetricsRecord;
use rsb_recipes::ScheduleSection;
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
}

/// Why a cell is not in the statistics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// No `metrics.jsonl`: the run never started.
    NotStarted,
    /// No evaluated record of the last epoch.
    Unfinished {
        /// Epochs of the recipe.
        epochs: u64,
        /// Epochs with a record (0: none).
        done: u64,
    },
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SkipReason::NotStarted => write!(f, "not started (no metrics.jsonl)"),
            SkipReason::Unfinished { epochs, done } => {
                write!(f, "unfinished ({done} of {epochs} epochs recorded, no final evaluation)")
            }
        }
    }
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
    /// Reads `dir/sweep.json` and every cell's run folder. Unfinished runs
    /// are skipped (and logged); a corrupt file is an error.
    pub fn read(dir: &Path) -> Result<Sweep, ReportError> {
        let manifest = SweepManifest::read(dir)?;
        let layout = SweepLayout::new(dir);
        let mut runs = Vec::new();
        let mut skipped = Vec::new();
        for cell in &manifest.cells {
            let metrics = layout.run_metrics(&cell.id);
            match read_run(&layout, cell)? {
                Ok(run) => runs.push(run),
                Err(reason) => {
                    tracing::warn!(run = %cell.id, metrics = %metrics.display(), %reason, "run skipped");
                    skipped.push(Skipped { id: cell.id.clone(), metrics, reason });
                }
            }
        }
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
    /// finished run has it (a grid has one per grid value: none is "the" seed 0).
    pub fn seed0(&self, set: &str) -> Option<f64> {
        let mut zero = self.runs.iter().filter(|r| r.cell.seed == 0);
        match (zero.next(), zero.next()) {
            (Some(run), None) => run.finals.get(set).copied(),
            _ => None,
        }
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
/// written while the report reads), which is left out with a warning.
pub fn read_metrics(path: &Path) -> Result<Vec<MetricsRecord>, ReportError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ReportError::Io { path: path.to_path_buf(), source })?;
    let mut records = Vec::new();
    for (index, line) in text.split_inclusive('\n').enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(record) => records.push(record),
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
                    message: e.to_string(),
                })
            }
        }
    }
    Ok(records)
}

/// Epochs of a recipe: cosine plus cooldown.
fn total_epochs(recipe: &rsb_recipes::Recipe) -> u64 {
    let ScheduleSection::Cosine(c) = &recipe.schedule;
    u64::from(c.epochs + c.cooldown_epochs)
}

/// A finished run, or why the cell is skipped.
fn read_run(
    layout: &SweepLayout,
    cell: &SweepCell,
) -> Result<Result<Run, SkipReason>, ReportError> {
    let metrics = layout.run_metrics(&cell.id);
    if !metrics.is_file() {
        return Ok(Err(SkipReason::NotStarted));
    }
    let recipe_path = layout.run_recipe(&cell.id);
    let recipe = rsb_recipes::load(&recipe_path, &[])
        .map_err(|source| ReportError::Recipe { path: recipe_path, source: Box::new(source) })?;
    let epochs = total_epochs(&recipe);
    let mut last: BTreeMap<u64, MetricsRecord> = BTreeMap::new();
    for record in read_metrics(&metrics)? {
        if let MetricsRecord::Epoch { epoch, .. } = &record {
            last.insert(*epoch, record);
        }
    }
    let done = last.keys().next_back().map_or(0, |e| e + 1);
    let final_record = epochs.checked_sub(1).and_then(|e| last.get(&e));
    let Some(MetricsRecord::Epoch { top1: Some(top1), eval_sets, .. }) = final_record else {
        return Ok(Err(SkipReason::Unfinished { epochs, done }));
    };
    let mut finals = BTreeMap::from([(VAL.to_string(), *top1)]);
    finals.extend(eval_sets.iter().map(|(name, acc)| (name.clone(), acc.top1)));
    let curve = last
        .values()
        .filter_map(|r| match r {
            MetricsRecord::Epoch { epoch, loss, lr, top1, .. } => {
                Some(EpochPoint { epoch: *epoch, loss: *loss, lr: *lr, top1: *top1 })
            }
            _ => None,
        })
        .collect();
    Ok(Ok(Run { cell: cell.clone(), finals, curve }))
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
