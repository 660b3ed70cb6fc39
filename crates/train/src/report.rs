//! What a run tells the world: the typed [`MetricsRecord`]s, written to the
//! rank's `metrics.jsonl` (one JSON object per line, each in one write, so a
//! crash loses nothing already reported; see [`rsb_job::metrics_log`]) and handed to the job's sink on rank
//! 0, and the progress a person sees — a progress bar on a terminal, log
//! lines otherwise, from rank 0 only. The records are fsynced
//! ([`Records::sync`]) before each checkpoint that follows them is committed.

use crate::error::TrainError;
use rsb_data::labels::EvalCounts;
use rsb_job::records::{input_wait_note, skipped_images_note, skipped_updates_note};
use rsb_job::{EvalSetAccuracy, MetricsLog, MetricsLogError, MetricsRecord};
use std::path::Path;

/// Receives every metrics record of rank 0 (the worker forwards them to the coordinator).
pub type MetricsSink = Box<dyn FnMut(&MetricsRecord) + Send>;

/// A metrics log's failure as the trainer's error, naming the file.
fn log_error(error: MetricsLogError) -> TrainError {
    match error {
        MetricsLogError::Io { path, source } => TrainError::io(path, source),
        MetricsLogError::Encode { path, source, .. } => {
            TrainError::io(path, std::io::Error::new(std::io::ErrorKind::InvalidData, source))
        }
    }
}

/// Opens (appending; a resumed run continues the same file, a torn last
/// line cut off) the rank's metrics log at `path`, creating its folder.
pub fn open_metrics_log(path: &Path) -> Result<MetricsLog, TrainError> {
    MetricsLog::open(path).map_err(log_error)
}

/// Where a rank's records go: its own file, and on rank 0 the job's sink.
pub struct Records {
    log: MetricsLog,
    sink: Option<MetricsSink>,
}

impl std::fmt::Debug for Records {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Records")
            .field("log", &self.log)
            .field("sink", &self.sink.is_some())
            .finish()
    }
}

impl Records {
    /// Records into `log` only.
    pub fn new(log: MetricsLog) -> Records {
        Records { log, sink: None }
    }

    /// Also hands every published record to `sink` (rank 0 of a job).
    pub fn set_sink(&mut self, sink: Option<MetricsSink>) {
        self.sink = sink;
    }

    /// Writes a record to the rank's own file and hands it to the sink.
    pub fn publish(&mut self, record: &MetricsRecord) -> Result<(), TrainError> {
        self.log.append(record).map_err(log_error)?;
        if let Some(sink) = &mut self.sink {
            sink(record);
        }
        Ok(())
    }

    /// Writes a record to the rank's own file only (per-rank checksums).
    pub fn write_local(&mut self, record: &MetricsRecord) -> Result<(), TrainError> {
        self.log.append(record).map_err(log_error)
    }

    /// Makes the records written so far durable (fsync of the rank's
    /// file), as a checkpoint committed after them requires
    /// ([`rsb_job::MetricsLog::sync`]); a failure names the file.
    pub fn sync(&mut self) -> Result<(), TrainError> {
        self.log.sync().map_err(log_error)
    }
}

/// One finished epoch.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EpochReport {
    /// Epoch (0-based).
    pub epoch: u64,
    /// Optimizer updates done after it.
    pub updates: u64,
    /// Mean training loss over its updates.
    pub train_loss: f64,
    /// Training images per second (loading included, evaluation excluded).
    pub images_per_sec: f64,
    /// Validation top-1 in percent, when evaluated.
    pub top1: Option<f64>,
    /// Validation top-5 in percent, when evaluated.
    pub top5: Option<f64>,
    /// Validation mean cross-entropy, when evaluated.
    pub val_loss: Option<f64>,
    /// The recipe's further evaluation sets (`eval.sets`), when evaluated.
    pub eval_sets: Vec<SetResult>,
    /// Wall time since the start of this invocation, in seconds.
    pub elapsed_s: f64,
    /// Updates skipped because their gradient norm was not finite.
    pub skipped_updates: u64,
    /// Validation images left out because they could not be read or
    /// decoded, when evaluated.
    pub val_skipped_images: Option<u64>,
}

impl EpochReport {
    /// The epoch's metrics record; `lr` is the learning rate of its last
    /// update, `replaced_samples` the undecodable images replaced so far.
    pub fn record(&self, lr: f64, replaced_samples: u64) -> MetricsRecord {
        MetricsRecord::Epoch {
            epoch: self.epoch,
            step: self.updates,
            lr,
            loss: self.train_loss,
            images_per_sec: self.images_per_sec,
            top1: self.top1,
            top5: self.top5,
            val_loss: self.val_loss,
            replaced_samples,
            elapsed_s: self.elapsed_s,
            eval_sets: self
                .eval_sets
                .iter()
                .map(|s| {
                    let accuracy = EvalSetAccuracy {
                        top1: s.top1,
                        top5: s.top5,
                        count: s.count,
                        excluded: s.excluded,
                        skipped: s.skipped,
                    };
                    (s.name.clone(), accuracy)
                })
                .collect(),
            skipped_updates: self.skipped_updates,
            val_skipped_images: self.val_skipped_images,
        }
    }

    /// The line a person reads at the end of the epoch.
    pub fn line(&self) -> String {
        let mut accuracy = match (self.top1, self.top5) {
            (Some(t1), Some(t5)) => format!(" top1 {t1:.2} top5 {t5:.2}"),
            _ => String::new(),
        };
        for s in &self.eval_sets {
            accuracy.push_str(&format!(" | {} top1 {:.2} top5 {:.2}", s.name, s.top1, s.top5));
        }
        format!(
            "epoch {} done: loss {:.4} {:.0} img/s{accuracy} ({:.0} s){}{}",
            self.epoch,
            self.train_loss,
            self.images_per_sec,
            self.elapsed_s,
            skipped_updates_note(self.skipped_updates),
            skipped_images_note(
                self.val_skipped_images,
                self.eval_sets.iter().map(|s| (s.name.as_str(), s.skipped))
            ),
        )
    }
}

/// Accuracy on one further evaluation set.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SetResult {
    /// The set's name (`real`, `v2`, ...).
    pub name: String,
    /// Top-1 in percent.
    pub top1: f64,
    /// Top-5 in percent.
    pub top5: f64,
    /// Images scored.
    pub count: u64,
    /// Images left out (ReaL: no valid label).
    pub excluded: u64,
    /// Images left out because they could not be read or decoded.
    pub skipped: u64,
}

impl SetResult {
    /// The percentages of a set's counts (summed over the ranks), for a
    /// set of `images` images.
    pub fn new(name: &str, counts: &EvalCounts, images: usize) -> SetResult {
        SetResult {
            name: name.to_string(),
            top1: counts.top1_pct(),
            top5: counts.top5_pct(),
            count: counts.count,
            excluded: counts.excluded,
            skipped: counts.unread_of(images),
        }
    }
}

/// The result of a run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunSummary {
    /// Finished epochs of this invocation.
    pub epochs: Vec<EpochReport>,
    /// Optimizer updates done by this invocation.
    pub updates: u64,
    /// Wall time in seconds.
    pub wall_s: f64,
}

/// What a person sees of a run: a progress bar, or log lines; nothing on
/// ranks other than 0.
#[derive(Debug)]
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    speaks: bool,
}

impl Progress {
    /// Progress of rank `rank` for a run of `total_updates` updates of which
    /// `done` are done; a bar where `bar` asks for one (a terminal).
    pub fn new(bar: bool, rank: usize, total_updates: u64, done: u64) -> Progress {
        let speaks = rank == 0;
        let bar = (bar && speaks).then(|| {
            let bar = indicatif::ProgressBar::new(total_updates);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} updates {msg} [{elapsed_precise}<{eta_precise}]",
            ) {
                bar.set_style(style);
            }
            bar.set_position(done);
            bar
        });
        Progress { bar, speaks }
    }

    /// A line that stays (printed above the bar, or logged).
    fn line(&self, line: String) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None if self.speaks => tracing::info!("{line}"),
            None => {}
        }
    }

    /// A passing status (the bar's message, or logged).
    fn status(&self, message: String, line: String) {
        match &self.bar {
            Some(bar) => bar.set_message(message),
            None if self.speaks => tracing::info!("{line}"),
            None => {}
        }
    }

    /// Says what a record says, where a person should hear it.
    pub fn show(&self, record: &MetricsRecord) {
        match record {
            MetricsRecord::Loading { epoch, .. } => {
                self.status("loading".into(), format!("epoch {epoch}: loading"));
            }
            MetricsRecord::FirstUpdate { elapsed_s, .. } => {
                self.line(format!("first update done in {elapsed_s:.1} s"));
            }
            MetricsRecord::Step {
                epoch,
                step,
                lr,
                loss,
                images_per_sec,
                skipped_updates,
                input_wait_share,
                ..
            } => {
                let skipped = format!(
                    "{}{}",
                    skipped_updates_note(*skipped_updates),
                    input_wait_note(*input_wait_share)
                );
                self.status(
                    format!("loss {loss:.4} {images_per_sec:.0} img/s{skipped}"),
                    format!(
                        "epoch {epoch} update {step} lr {lr:.3e} loss {loss:.4} {images_per_sec:.0} img/s{skipped}"
                    ),
                )
            }
            MetricsRecord::Epoch { .. }
            | MetricsRecord::Checksum { .. }
            | MetricsRecord::Fabric(_)
            | MetricsRecord::Generation { .. } => {}
        }
    }

    /// Says that an epoch is done.
    pub fn epoch_done(&self, report: &EpochReport) {
        self.line(report.line());
    }

    /// One more update done.
    pub fn update_done(&self) {
        if let Some(bar) = &self.bar {
            bar.inc(1);
        }
    }

    /// Clears the bar.
    pub fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_reach_the_file_and_the_sink() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ranks/rank-0.jsonl");
        let mut records = Records::new(MetricsLog::open(&path).unwrap());
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink_seen = std::sync::Arc::clone(&seen);
        records.set_sink(Some(Box::new(move |r: &MetricsRecord| {
            sink_seen.lock().unwrap().push(r.kind());
        })));
        records.publish(&MetricsRecord::Loading { epoch: 0, step: 0, elapsed_s: 0.5 }).unwrap();
        let checksum = MetricsRecord::Checksum { rank: 0, step: 1, sum: 1.0, sum_of_squares: 1.0 };
        records.write_local(&checksum).unwrap();
        assert_eq!(*seen.lock().unwrap(), ["loading"], "checksums stay local");
        let text = std::fs::read_to_string(&path).unwrap();
        let kinds: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["kind"].to_string())
            .collect();
        assert_eq!(kinds, ["\"loading\"", "\"checksum\""]);
    }

    #[test]
    fn an_epoch_record_carries_the_report() {
        let report = EpochReport {
            epoch: 1,
            updates: 20,
            train_loss: 0.5,
            images_per_sec: 10.0,
            top1: Some(75.0),
            top5: Some(100.0),
            val_loss: Some(0.7),
            eval_sets: vec![SetResult::new(
                "v2",
                &EvalCounts { count: 4, top1: 3, top5: 4, excluded: 1, loss_sum: 0.0 },
                7,
            )],
            elapsed_s: 3.0,
            skipped_updates: 1,
            val_skipped_images: Some(0),
        };
        let value = serde_json::to_value(report.record(1e-4, 2)).unwrap();
        assert_eq!(value["skipped_updates"], 1);
        assert!(report.line().ends_with(
            ", 1 update(s) skipped (non-finite gradients), \
             evaluation images unreadable and left out: 2 in v2"
        ));
        assert_eq!(value["val_skipped_images"], 0);
        assert_eq!(value["eval_sets"]["v2"]["skipped"], 2, "7 images, 4 scored, 1 excluded");
        assert_eq!(value["kind"], "epoch");
        assert_eq!(value["step"], 20);
        assert_eq!(value["val_loss"], 0.7);
        assert_eq!(value["replaced_samples"], 2);
        assert_eq!(value["eval_sets"]["v2"]["top1"], 75.0);
        assert_eq!(value["eval_sets"]["v2"]["excluded"], 1);
        assert!(report.line().contains("| v2 top1 75.00 top5 100.00"), "{}", report.line());
    }
}
