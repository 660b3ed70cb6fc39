//! Accuracy counting and the run's `metrics.jsonl` (one JSON object per line,
//! flushed as written so a crash loses nothing already reported).

use crate::error::TrainError;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use tch::{Kind, TchError, Tensor};

/// Counts of correct top-1 and top-5 predictions.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TopK {
    /// Samples seen.
    pub count: u64,
    /// Samples whose label is the top prediction.
    pub top1: u64,
    /// Samples whose label is among the five top predictions.
    pub top5: u64,
    /// Sum of per-sample cross-entropy.
    pub loss_sum: f64,
}

impl TopK {
    /// Adds a batch of `logits` `[N, C]` against integer `labels` `[N]`.
    pub fn add(&mut self, logits: &Tensor, labels: &Tensor) -> Result<(), TchError> {
        let n = logits.size()[0];
        let classes = logits.size()[1];
        let k = classes.min(5);
        let (_, top) = logits.f_topk(k, 1, true, true)?;
        let hits = top.f_eq_tensor(&labels.f_unsqueeze(1)?)?;
        let top1 = hits.f_narrow(1, 0, 1)?.f_sum(Kind::Int64)?.f_int64_value(&[])?;
        let top5 = hits.f_sum(Kind::Int64)?.f_int64_value(&[])?;
        let loss =
            logits.f_cross_entropy_loss::<Tensor>(labels, None, tch::Reduction::Sum, -100, 0.0)?;
        self.count += n as u64;
        self.top1 += top1 as u64;
        self.top5 += top5 as u64;
        self.loss_sum += loss.f_double_value(&[])?;
        Ok(())
    }

    /// Top-1 accuracy in percent.
    pub fn top1_pct(&self) -> f64 {
        100.0 * self.top1 as f64 / self.count.max(1) as f64
    }

    /// Top-5 accuracy in percent.
    pub fn top5_pct(&self) -> f64 {
        100.0 * self.top5 as f64 / self.count.max(1) as f64
    }

    /// Mean cross-entropy.
    pub fn mean_loss(&self) -> f64 {
        self.loss_sum / self.count.max(1) as f64
    }
}

/// Append-only JSON-lines log.
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    out: BufWriter<File>,
}

impl MetricsLog {
    /// Opens (appending; a resumed run continues the same file) `path`.
    pub fn open(path: &Path) -> Result<MetricsLog, TrainError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| TrainError::io(path, e))?;
        Ok(MetricsLog { path: path.to_path_buf(), out: BufWriter::new(file) })
    }

    /// Writes one record and flushes it.
    pub fn write(&mut self, record: &serde_json::Value) -> Result<(), TrainError> {
        let line = serde_json::to_string(record).expect("JSON values serialise");
        writeln!(self.out, "{line}")
            .and_then(|_| self.out.flush())
            .map_err(|e| TrainError::io(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topk_counts() {
        let logits = Tensor::from_slice(&[
            0.1f32, 0.9, 0.0, 0.0, 0.0, 0.0, //
            0.5, 0.1, 0.2, 0.3, 0.4, 0.0, //
        ])
        .view([2, 6]);
        let labels = Tensor::from_slice(&[1i64, 5]);
        let mut acc = TopK::default();
        acc.add(&logits, &labels).unwrap();
        assert_eq!((acc.count, acc.top1, acc.top5), (2, 1, 1));
        assert_eq!(acc.top1_pct(), 50.0);
    }
}
