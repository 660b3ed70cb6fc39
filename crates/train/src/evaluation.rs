//! Evaluation: runs the model in eval mode, without gradients, over a shard
//! of an evaluation set's batches and counts its predictions into one
//! [`EvalCounts`] — against the images' own labels for the validation split
//! (with the cross-entropy), or through a set's [`Scoring`] (timm's
//! `accuracy`, or `RealLabelsImagenet` for ReaL). The counts (or the top-5
//! predictions) of the batches stay on the device and are read once, at the
//! end ([`LabelledTally`], [`PredictionTally`]), so a GPU is never made to
//! wait for the host between batches. Counts of the ranks are summed with
//! [`sum_over_ranks`].

use crate::batch::Normalizer;
use crate::ddp::{sum_scalars, Calls};
use crate::error::TrainError;
use crate::host_read;
use rsb_collective::Collective;
use rsb_data::dataset::Sample;
use rsb_data::eval_sets::EvalSet;
use rsb_data::labels::Scoring;
use rsb_data::pipeline::{EvalBatch, EvalData};
use rsb_vision::{ForwardMode, Model};
use std::sync::Arc;
use tch::{Kind, Tensor};

pub use rsb_data::labels::EvalCounts;

/// Where evaluation runs: the loader's threads and prefetch depth, and this
/// rank's shard `(rank, world)` of the batches (every `world`-th batch from
/// `rank` on).
#[derive(Debug, Clone, Copy)]
pub struct EvalShard {
    /// Loader threads.
    pub threads: usize,
    /// Batches kept ready.
    pub prefetch: usize,
    /// This rank.
    pub rank: usize,
    /// Ranks.
    pub world: usize,
}

impl EvalShard {
    /// The whole set in one process.
    pub fn whole(threads: usize, prefetch: usize) -> EvalShard {
        EvalShard { threads, prefetch, rank: 0, world: 1 }
    }
}

/// Runs the model over an evaluation set and counts top-1/top-5 against each
/// image's label, with the summed cross-entropy. The counts stay on the
/// device until the last batch: one host read for the whole evaluation.
pub fn evaluate(
    model: &mut Model,
    data: &Arc<EvalData>,
    normalizer: &Normalizer,
    shard: EvalShard,
) -> Result<EvalCounts, TrainError> {
    let mut tally = LabelledTally::default();
    for_each_eval_batch(model, data, normalizer, shard, |logits, batch| {
        tally.add(logits, &normalizer.labels(&batch.labels)?)
    })?;
    tally.finish()
}

/// Runs the model over an evaluation set and scores its top-5 predictions
/// with the set's [`Scoring`]. The predictions stay on the device until the
/// last batch: one host read for the whole evaluation.
pub fn evaluate_set(
    model: &mut Model,
    set: &EvalSet,
    normalizer: &Normalizer,
    shard: EvalShard,
) -> Result<EvalCounts, TrainError> {
    let mut tally = PredictionTally::default();
    for_each_eval_batch(model, &set.data, normalizer, shard, |logits, batch| {
        tally.add(logits, &batch.indices)
    })?;
    tally.finish(&set.scoring, set.data.folder().samples())
}

/// Top-1/top-5 hits and the summed cross-entropy of batches against integer
/// labels, summed on the device ([`LabelledTally::add`] reads nothing) and
/// read once by [`LabelledTally::finish`].
#[derive(Debug, Default)]
pub struct LabelledTally {
    count: u64,
    /// `[top1, top5, loss]` in f64 (exact for counts below 2^53).
    sums: Option<Tensor>,
}

impl LabelledTally {
    /// Adds a batch of `logits` `[N, C]` against `labels` `[N]`: top-1 and
    /// top-5 hits (`topk(5, sorted)` on the device, as timm) and the
    /// summed cross-entropy.
    pub fn add(&mut self, logits: &Tensor, labels: &Tensor) -> Result<(), TrainError> {
        let k = logits.size()[1].min(5);
        let (_, top) = logits.f_topk(k, 1, true, true)?;
        let hits = top.f_eq_tensor(&labels.f_unsqueeze(1)?)?;
        let top1 = hits.f_narrow(1, 0, 1)?.f_sum(Kind::Double)?;
        let top5 = hits.f_sum(Kind::Double)?;
        let loss = logits
            .f_cross_entropy_loss::<Tensor>(labels, None, tch::Reduction::Sum, -100, 0.0)?
            .f_to_kind(Kind::Double)?;
        let batch = Tensor::f_stack(&[top1, top5, loss], 0)?;
        self.sums = Some(match self.sums.take() {
            None => batch,
            Some(sums) => sums.f_add(&batch)?,
        });
        self.count += logits.size()[0] as u64;
        Ok(())
    }

    /// The counts of every batch added: one host read.
    pub fn finish(self) -> Result<EvalCounts, TrainError> {
        let mut counts = EvalCounts::default();
        if let Some(sums) = self.sums {
            let sums = host_read::f64s_of(&sums)?;
            counts.count = self.count;
            counts.top1 = sums[0] as u64;
            counts.top5 = sums[1] as u64;
            counts.loss_sum = sums[2];
        }
        Ok(counts)
    }
}

/// The top-5 predictions of batches whose rows are given dataset samples,
/// kept on the device ([`PredictionTally::add`] reads nothing) and read and
/// scored once by [`PredictionTally::finish`].
#[derive(Debug, Default)]
pub struct PredictionTally {
    tops: Vec<Tensor>,
    indices: Vec<usize>,
}

impl PredictionTally {
    /// Adds a batch of `logits` `[N, C]` whose rows are the dataset samples
    /// `indices`: their top-5 (`topk(5, sorted)`, as timm).
    pub fn add(&mut self, logits: &Tensor, indices: &[usize]) -> Result<(), TrainError> {
        let rows = logits.size()[0];
        if rows != indices.len() as i64 {
            return Err(TrainError::Recipe(format!(
                "evaluation batch of {rows} logits rows names {} samples",
                indices.len()
            )));
        }
        let k = logits.size()[1].min(5);
        if let Some(first) = self.tops.first() {
            if first.size()[1] != k {
                return Err(TrainError::Recipe(format!(
                    "evaluation batch of {} classes gives top-{k} predictions after batches \
                     that gave top-{}",
                    logits.size()[1],
                    first.size()[1]
                )));
            }
        }
        let (_, top) = logits.f_topk(k, 1, true, true)?;
        self.tops.push(top);
        self.indices.extend_from_slice(indices);
        Ok(())
    }

    /// Reads every batch's predictions at once (one host read) and scores
    /// them with `scoring`; `samples` are the set's samples.
    pub fn finish(self, scoring: &Scoring, samples: &[Sample]) -> Result<EvalCounts, TrainError> {
        let mut counts = EvalCounts::default();
        let Some(k) = self.tops.first().map(|t| t.size()[1]) else {
            return Ok(counts);
        };
        let predictions = host_read::i64s_of(&Tensor::f_cat(&self.tops, 0)?)?;
        for (row, &index) in predictions.chunks_exact(k.max(1) as usize).zip(&self.indices) {
            let sample = samples.get(index).ok_or_else(|| {
                TrainError::Recipe(format!(
                    "evaluation batch names sample {index} of a set of {}",
                    samples.len()
                ))
            })?;
            scoring.add(&mut counts, sample, row);
        }
        Ok(counts)
    }
}

/// Scores a batch of `logits` `[N, C]` whose rows are the dataset samples
/// `indices` into `counts`: a [`PredictionTally`] of that one batch (the
/// path every evaluation takes), read at once.
pub fn score_logits(
    logits: &Tensor,
    scoring: &Scoring,
    samples: &[Sample],
    indices: &[usize],
    counts: &mut EvalCounts,
) -> Result<(), TrainError> {
    let mut tally = PredictionTally::default();
    tally.add(logits, indices)?;
    counts.merge(&tally.finish(scoring, samples)?);
    Ok(())
}

/// The counts of every rank, summed (every rank gets the total); `set`
/// names the evaluation set in errors.
pub fn sum_over_ranks(
    collective: &mut dyn Collective,
    calls: Calls,
    counts: EvalCounts,
    set: &str,
) -> Result<EvalCounts, TrainError> {
    let mut values = counts.to_array();
    sum_scalars(collective, calls, &mut values, &format!("evaluation sum of `{set}`"))?;
    Ok(EvalCounts::from_array(values))
}

/// Runs the model in eval mode, without gradients, over this rank's share of
/// an evaluation set's batches and hands each batch's logits to `score`.
fn for_each_eval_batch(
    model: &mut Model,
    data: &Arc<EvalData>,
    normalizer: &Normalizer,
    shard: EvalShard,
    mut score: impl FnMut(&Tensor, &EvalBatch) -> Result<(), TrainError>,
) -> Result<(), TrainError> {
    let _guard = tch::no_grad_guard();
    for batch in data.shard_loader(shard.threads, shard.prefetch, shard.rank, shard.world) {
        let batch = batch?;
        if batch.len == 0 {
            continue;
        }
        let xs = normalizer.images(&batch.images, batch.len, batch.size, batch.size)?;
        let logits = model.forward(&xs, ForwardMode::Eval)?;
        score(&logits, &batch)?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    fn two_rows() -> Tensor {
        Tensor::from_slice(&[
            0.1f32, 0.9, 0.0, 0.0, 0.0, 0.0, //
            0.5, 0.1, 0.2, 0.3, 0.4, 0.0, //
        ])
        .view([2, 6])
    }

    #[test]
    fn labelled_counts_follow_the_top_k() {
        let logits = two_rows();
        let labels = Tensor::from_slice(&[1i64, 5]);
        let mut tally = LabelledTally::default();
        tally.add(&logits, &labels).unwrap();
        let counts = tally.finish().unwrap();
        assert_eq!((counts.count, counts.top1, counts.top5, counts.excluded), (2, 1, 1, 0));
        assert_eq!(counts.top1_pct(), 50.0);
        let expected = logits.log_softmax(1, Kind::Float).neg();
        let expected = expected.double_value(&[0, 1]) + expected.double_value(&[1, 5]);
        assert!((counts.loss_sum - expected).abs() < 1e-5, "{} vs {expected}", counts.loss_sum);
        assert_eq!(LabelledTally::default().finish().unwrap(), EvalCounts::default());
    }

    #[test]
    fn many_batches_are_counted_on_the_device_and_read_once() {
        // Three batches: row 0 is a top-1 hit in each; row 1's label is
        // outside the top 5 in the first, within it but not first after.
        let batches: Vec<(Tensor, Tensor)> = (0..3)
            .map(|i| {
                (two_rows() * (1.0 + f64::from(i)), Tensor::from_slice(&[1i64, 5 - i64::from(i)]))
            })
            .collect();
        let before = host_read::counts().total;
        let mut tally = LabelledTally::default();
        for (logits, labels) in &batches {
            tally.add(logits, labels).unwrap();
        }
        assert_eq!(host_read::counts().total, before, "add reads nothing");
        let counts = tally.finish().unwrap();
        assert_eq!(host_read::counts().total, before + 1, "finish reads once");
        // The same as counting batch by batch.
        let mut expected = EvalCounts::default();
        for (logits, labels) in &batches {
            let mut one = LabelledTally::default();
            one.add(logits, labels).unwrap();
            expected.merge(&one.finish().unwrap());
        }
        assert_eq!(counts, expected);
        assert_eq!((counts.count, counts.top1, counts.top5), (6, 3, 5));

        // Predictions too: one read for the three batches, scored as one
        // batch at a time would be.
        let samples: Vec<Sample> = (0..6)
            .map(|i| Sample::file(format!("c/{i}.png").into(), [1, 5, 1, 4, 1, 3][i]))
            .collect();
        let before = host_read::counts().total;
        let mut predictions = PredictionTally::default();
        for (i, (logits, _)) in batches.iter().enumerate() {
            predictions.add(logits, &[2 * i, 2 * i + 1]).unwrap();
        }
        let scored = predictions.finish(&Scoring::Labels, &samples).unwrap();
        assert_eq!(host_read::counts().total, before + 1);
        let mut one_by_one = EvalCounts::default();
        for (i, (logits, _)) in batches.iter().enumerate() {
            score_logits(logits, &Scoring::Labels, &samples, &[2 * i, 2 * i + 1], &mut one_by_one)
                .unwrap();
        }
        assert_eq!((scored.count, scored.top1, scored.top5), (6, 3, 5));
        assert_eq!(
            (scored.count, scored.top1, scored.top5, scored.excluded),
            (one_by_one.count, one_by_one.top1, one_by_one.top5, one_by_one.excluded)
        );

        // Batches that disagree with the tally are refused, naming why.
        let mut bad = PredictionTally::default();
        let err = bad.add(&two_rows(), &[0]).unwrap_err();
        assert!(err.to_string().contains("batch of 2 logits rows names 1 samples"), "{err}");
        bad.add(&two_rows(), &[0, 1]).unwrap();
        let err = bad.add(&two_rows().narrow(1, 0, 3), &[2, 3]).unwrap_err();
        assert!(
            err.to_string().contains("top-3 predictions after batches that gave top-5"),
            "{err}"
        );
    }

    #[test]
    fn scored_logits_count_through_the_scoring() {
        let logits = two_rows();
        let samples = [Sample::file("a/0.png".into(), 1), Sample::file("b/1.png".into(), 5)];
        let mut counts = EvalCounts::default();
        score_logits(&logits, &Scoring::Labels, &samples, &[0, 1], &mut counts).unwrap();
        assert_eq!((counts.count, counts.top1, counts.top5), (2, 1, 1));
        let err = score_logits(&logits, &Scoring::Labels, &samples, &[0, 7], &mut counts);
        assert!(err.unwrap_err().to_string().contains("sample 7"));
    }
}
