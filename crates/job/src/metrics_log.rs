//! The append-only `metrics.jsonl` of a run (and each rank's own
//! `ranks/rank-N.jsonl`): one typed [`MetricsRecord`] per line, each line
//! handed to the kernel in one write, so a crash or a full disk can tear at
//! most the last line. Opening a log again (a resumed run, a restored
//! coordinator) cuts such a torn last line off, with a warning that names the
//! file and the bytes dropped, so the next record starts a line of its own
//! instead of gluing onto the fragment and spoiling the file for every reader.

use crate::records::MetricsRecord;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Why a metrics log could not be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum MetricsLogError {
    /// Reading, repairing or appending to the file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The metrics file (or the folder it was to be created in).
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A record could not be encoded as JSON.
    #[error("{}: a {kind} record cannot be written: {source}", path.display())]
    Encode {
        /// The metrics file.
        path: PathBuf,
        /// The record's kind (`step`, `epoch`, ...).
        kind: &'static str,
        /// The encoder's error.
        source: serde_json::Error,
    },
}

/// An open metrics log; every [`MetricsLog::append`] reaches the file before
/// it returns.
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    file: File,
    /// A write failed part-way: cut its fragment off before the next one.
    torn: bool,
}

impl MetricsLog {
    /// Opens `path` for appending, creating it and its folder when missing;
    /// anything there that is not a regular file (a FIFO, a device) is
    /// refused, naming the file. A last line without its newline (a record
    /// torn by a crash) is cut off and reported by a warning.
    pub fn open(path: &Path) -> Result<MetricsLog, MetricsLogError> {
        let io = |source| MetricsLogError::Io { path: path.to_path_buf(), source };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|source| MetricsLogError::Io { path: parent.to_path_buf(), source })?;
        }
        // Not a FIFO or a device: a log there would not take its records
        // (a FIFO blocks once its buffer is full), refused naming the file.
        let file = rsb_files::open_regular_file_to_append(path).map_err(io)?;
        let dropped = cut_torn_last_line(&file).map_err(io)?;
        if dropped > 0 {
            tracing::warn!(
                metrics = %path.display(),
                dropped_bytes = dropped,
                "the last line had no newline (a record torn by a crash); cut off before appending"
            );
        }
        Ok(MetricsLog { path: path.to_path_buf(), file, torn: false })
    }

    /// The file this log appends to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record as one line, in one write. A write that fails
    /// part-way (a full disk) leaves no fragment for the next record to
    /// glue onto: it is cut off at once, or before the next append.
    pub fn append(&mut self, record: &MetricsRecord) -> Result<(), MetricsLogError> {
        let io = |source| MetricsLogError::Io { path: self.path.clone(), source };
        let mut line = serde_json::to_vec(record).map_err(|source| MetricsLogError::Encode {
            path: self.path.clone(),
            kind: record.kind(),
            source,
        })?;
        line.push(b'\n');
        if self.torn {
            cut_torn_last_line(&self.file).map_err(io)?;
            self.torn = false;
        }
        self.file.write_all(&line).map_err(|e| {
            self.torn = cut_torn_last_line(&self.file).is_err();
            io(e)
        })
    }

    /// Makes the records appended so far durable (`fdatasync`): a caller that
    /// acknowledges a record, or commits a checkpoint made after it, syncs
    /// first, so that a crash or a power loss cannot take records from
    /// before a commit it kept.
    pub fn sync(&mut self) -> Result<(), MetricsLogError> {
        self.file
            .sync_data()
            .map_err(|source| MetricsLogError::Io { path: self.path.clone(), source })
    }
}

/// Truncates `file` after its last newline when its last byte is not one;
/// returns the number of bytes cut.
fn cut_torn_last_line(file: &File) -> std::io::Result<u64> {
    const BLOCK: u64 = 64 * 1024;
    let len = file.metadata()?.len();
    let mut end = len;
    let mut block = Vec::new();
    while end > 0 {
        let start = end.saturating_sub(BLOCK);
        block.resize((end - start) as usize, 0);
        file.read_exact_at(&mut block, start)?;
        if end == len && block.last() == Some(&b'\n') {
            return Ok(0);
        }
        if let Some(newline) = block.iter().rposition(|&b| b == b'\n') {
            let keep = start + newline as u64 + 1;
            file.set_len(keep)?;
            return Ok(len - keep);
        }
        end = start;
    }
    file.set_len(0)?;
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::GenerationReason;
    use std::fs::OpenOptions;

    fn record(generation: u64) -> MetricsRecord {
        MetricsRecord::Generation {
            generation,
            hosts: vec!["host-a".into(), "host-b".into()],
            world_size: 2,
            accumulation: 1,
            resume_from: None,
            resume_step: None,
            reasons: vec![GenerationReason::Start],
        }
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path).expect("read").lines().map(str::to_owned).collect()
    }

    #[test]
    fn records_are_whole_lines_and_survive_reopening() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("run").join("metrics.jsonl");
        let mut log = MetricsLog::open(&path).expect("open");
        log.append(&record(0)).expect("append");
        drop(log);
        let mut log = MetricsLog::open(&path).expect("reopen");
        log.append(&record(1)).expect("append");
        let lines = lines(&path);
        assert_eq!(lines.len(), 2);
        for (generation, line) in lines.iter().enumerate() {
            let parsed: MetricsRecord = serde_json::from_str(line).expect("a whole record");
            assert_eq!(parsed, record(generation as u64));
        }
    }

    #[test]
    fn a_fifo_at_the_log_path_is_refused_naming_the_file_without_waiting() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("ranks").join("rank-0.jsonl");
        std::fs::create_dir_all(path.parent().expect("folder")).expect("mkdir");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
        // In a thread, so that a regression fails here instead of hanging.
        let (sender, receiver) = std::sync::mpsc::channel();
        let fifo = path.clone();
        std::thread::spawn(move || {
            let _ = sender.send(MetricsLog::open(&fifo).map(|_| ()).map_err(|e| e.to_string()));
        });
        let opened = receiver
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("opening a FIFO as a metrics log did not return");
        let e = opened.expect_err("a FIFO was opened as a metrics log");
        assert!(e.contains(&path.display().to_string()), "{e}");
        assert!(e.contains("not a regular file"), "{e}");
    }

    #[test]
    fn a_torn_last_line_is_cut_before_the_next_record() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("metrics.jsonl");
        let whole = serde_json::to_string(&record(0)).expect("encode");
        let torn = &serde_json::to_string(&record(1)).expect("encode")[..17];
        std::fs::write(&path, format!("{whole}\n{torn}")).expect("write");
        let mut log = MetricsLog::open(&path).expect("open");
        log.append(&record(2)).expect("append");
        assert_eq!(lines(&path), vec![whole, serde_json::to_string(&record(2)).expect("encode")]);
    }

    #[test]
    fn a_write_that_failed_part_way_is_cut_before_the_next_record() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("metrics.jsonl");
        let mut log = MetricsLog::open(&path).expect("open");
        log.append(&record(0)).expect("append");
        // What a write cut short by a full disk leaves, with the cut failed.
        let fragment = &serde_json::to_string(&record(1)).expect("encode")[..9];
        OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(fragment.as_bytes()))
            .expect("fragment");
        log.torn = true;
        log.append(&record(2)).expect("append");
        let expected: Vec<String> =
            [0, 2].iter().map(|&g| serde_json::to_string(&record(g)).expect("encode")).collect();
        assert_eq!(lines(&path), expected);
    }

    #[test]
    fn a_file_that_is_one_torn_line_longer_than_a_block_is_emptied() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("metrics.jsonl");
        std::fs::write(&path, "x".repeat(200_000)).expect("write");
        let file = OpenOptions::new().read(true).append(true).open(&path).expect("open");
        assert_eq!(cut_torn_last_line(&file).expect("cut"), 200_000);
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), 0);
    }

    #[test]
    fn a_newline_a_block_back_is_found() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("metrics.jsonl");
        std::fs::write(&path, format!("{{}}\n{}", "y".repeat(150_000))).expect("write");
        let file = OpenOptions::new().read(true).append(true).open(&path).expect("open");
        assert_eq!(cut_torn_last_line(&file).expect("cut"), 150_000);
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "{}\n");
    }

    #[test]
    fn a_clean_or_empty_file_is_left_alone() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("metrics.jsonl");
        std::fs::write(&path, "{}\n{}\n").expect("write");
        let file = OpenOptions::new().read(true).append(true).open(&path).expect("open");
        assert_eq!(cut_torn_last_line(&file).expect("cut"), 0);
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "{}\n{}\n");
        std::fs::write(&path, "").expect("write");
        assert_eq!(cut_torn_last_line(&file).expect("cut"), 0);
    }
}
