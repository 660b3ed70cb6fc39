//! Sample accounting: an optional trace of which dataset indices every
//! update consumed, one typed line ([`SampleRecord`]) per micro-batch, in
//! `<run folder>/samples/rank-N.jsonl` (appended, so the invocations of a
//! resumed run follow each other). Tests read it back with [`read_run`] to
//! check that every sample of an epoch is used the planned number of times
//! across resumes and re-shards. Off by default; it costs one short line per
//! micro-batch.

use crate::error::TrainError;
use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};

/// Folder of the run folder that holds the traces.
pub const FOLDER: &str = "samples";

/// One micro-batch of one update, as the trainer consumed it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleRecord {
    /// The update (counted over the run) the invocation started at: when an
    /// update is replayed after a resume, the record of the invocation that
    /// started latest is the one that counts.
    pub start_update: u64,
    /// The update (0-based, counted over the run).
    pub update: u64,
    /// Epoch.
    pub epoch: u64,
    /// Update within the epoch.
    pub step: u64,
    /// Sampler stream.
    pub stream: usize,
    /// Rank that ran it, in a world of `world_size`.
    pub rank: usize,
    /// Ranks of the invocation.
    pub world_size: usize,
    /// Dataset indices of the micro-batch, in order.
    pub indices: Vec<usize>,
}

/// The trace file of rank `rank` in `run_dir`.
pub fn file_of(run_dir: &Path, rank: usize) -> PathBuf {
    run_dir.join(FOLDER).join(format!("rank-{rank}.jsonl"))
}

/// An open trace file.
#[derive(Debug)]
pub struct SampleTrace {
    path: PathBuf,
    writer: BufWriter<std::fs::File>,
}

impl SampleTrace {
    /// Opens (appending) the trace of rank `rank` in `run_dir`.
    pub fn open(run_dir: &Path, rank: usize) -> Result<SampleTrace, TrainError> {
        let path = file_of(run_dir, rank);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| TrainError::io(parent, e))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| TrainError::io(&path, e))?;
        Ok(SampleTrace { path, writer: BufWriter::new(file) })
    }

    /// Appends the records of one update and flushes them.
    pub fn write(&mut self, records: &[SampleRecord]) -> Result<(), TrainError> {
        for record in records {
            let line = serde_json::to_string(record).map_err(|e| TrainError::Checkpoint {
                path: self.path.clone(),
                problem: format!("cannot serialise a sample record: {e}"),
            })?;
            writeln!(self.writer, "{line}").map_err(|e| TrainError::io(&self.path, e))?;
        }
        self.writer.flush().map_err(|e| TrainError::io(&self.path, e))
    }
}

/// Every record of every rank's trace in `run_dir`, file by file (ranks in
/// order), line by line. A line that is not a record is an error naming the
/// file and line.
pub fn read_run(run_dir: &Path) -> Result<Vec<SampleRecord>, TrainError> {
    let folder = run_dir.join(FOLDER);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&folder)
        .map_err(|e| TrainError::io(&folder, e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    files.sort();
    let mut records = Vec::new();
    for file in files {
        let reader = std::io::BufReader::new(
            std::fs::File::open(&file).map_err(|e| TrainError::io(&file, e))?,
        );
        for (n, line) in reader.lines().enumerate() {
            let line = line.map_err(|e| TrainError::io(&file, e))?;
            let record = serde_json::from_str(&line).map_err(|e| TrainError::Checkpoint {
                path: file.clone(),
                problem: format!("line {}: not a sample record: {e}", n + 1),
            })?;
            records.push(record);
        }
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_across_invocations_and_bad_lines_are_named() {
        let run = tempfile::tempdir().unwrap();
        let record = |start_update, update, rank| SampleRecord {
            start_update,
            update,
            epoch: 0,
            step: update,
            stream: rank,
            rank,
            world_size: 2,
            indices: vec![3, 1, 4],
        };
        let mut a = SampleTrace::open(run.path(), 0).unwrap();
        a.write(&[record(0, 0, 0), record(0, 1, 0)]).unwrap();
        drop(a);
        SampleTrace::open(run.path(), 0).unwrap().write(&[record(1, 1, 0)]).unwrap();
        SampleTrace::open(run.path(), 1).unwrap().write(&[record(1, 1, 1)]).unwrap();
        let all = read_run(run.path()).unwrap();
        assert_eq!(all, [record(0, 0, 0), record(0, 1, 0), record(1, 1, 0), record(1, 1, 1)]);

        std::fs::write(file_of(run.path(), 1), "{\"update\": 1}\n").unwrap();
        let err = read_run(run.path()).unwrap_err().to_string();
        assert!(err.contains("rank-1.jsonl") && err.contains("line 1"), "{err}");
    }
}
