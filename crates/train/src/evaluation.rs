//! Evaluation: runs the model in eval mode, without gradients, over a shard
//! of an evaluation set's batches and counts its predictions into one
//! [`EvalCounts`] — against the images' own labels for the validation split
//! (with the cross-entropy), or through a set's [`Scoring`] (timm's
//! `accuracy`, or `RealLabelsImagenet` for ReaL). Counts of the ranks are
//! summed with [`sum_over_ranks`].

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
/// image's label, with the summed cross-entropy.
pub fn evaluate(
    model: &mut Model,
    data: &Arc<EvalData>,
    normalizer: &Normalizer,
    shard: EvalShard,
) -> Result<EvalCounts, TrainError> {
    let mut counts = EvalCounts::default();
    for_each_eval_batch(model, data, normalizer, shard, |logits, batch| {
        count_labelled(&mut counts, logits, &normalizer.labels(&batch.labels)?)
    })?;
    Ok(counts)
}

/// Runs the model over an evaluation set and scores its top-5 predictions
/// with the set's [`Scoring`].
pub fn evaluate_set(
    model: &mut Model,
    set: &EvalSet,
    normalizer: &Normalizer,
    shard: EvalShard,
) -> Result<EvalCounts, TrainError> {
    let mut counts = EvalCounts::default();
    let samples = set.data.folder().samples();
    for_each_eval_batch(model, &set.data, normalizer, shard, |logits, batch| {
        score_logits(logits, &set.scoring, samples, &batch.indices, &mut counts)
    })?;
    Ok(counts)
}

/// Adds a batch of `logits` `[N, C]` against integer `labels` `[N]`: top-1
/// and top-5 hits (`topk(5, sorted)` on the device, as timm) and the summed
/// cross-entropy.
pub fn count_labelled(
    counts: &mut EvalCounts,
    logits: &Tensor,
    labels: &Tensor,
) -> Result<(), TrainError> {
    let n = logits.size()[0];
    let k = logits.size()[1].min(5);
    let (_, top) = logits.f_topk(k, 1, true, true)?;
    let hits = top.f_eq_tensor(&labels.f_unsqueeze(1)?)?;
    let top1 = hits.f_narrow(1, 0, 1)?.f_sum(Kind::Double)?;
    let top5 = hits.f_sum(Kind::Double)?;
    let loss = logits
        .f_cross_entropy_loss::<Tensor>(labels, None, tch::Reduction::Sum, -100, 0.0)?
        .f_to_kind(Kind::Double)?;
    // One read for the three sums.
    let sums = host_read::f64s_of(&Tensor::f_stack(&[top1, top5, loss], 0)?)?;
    counts.count += n as u64;
    counts.top1 += sums[0] as u64;
    counts.top5 += sums[1] as u64;
    counts.loss_sum += sums[2];
    Ok(())
}

/// Scores a batch of `logits` `[N, C]` whose rows are the dataset samples
/// `indices`: their top-5 (`topk(5, sorted)`, as timm) on the host, then
/// `scoring`.
pub fn score_logits(
    logits: &Tensor,
    scoring: &Scoring,
    samples: &[Sample],
    indices: &[usize],
    counts: &mut EvalCounts,
) -> Result<(), TrainError> {
    let k = logits.size()[1].min(5);
    let (_, top) = logits.f_topk(k, 1, true, true)?;
    let predictions = host_read::i64s_of(&top)?;
    for (row, &index) in predictions.chunks_exact(k.max(1) as usize).zip(indices) {
        let sample = samples.get(index).ok_or_else(|| {
            TrainError::Recipe(format!(
                "evaluation batch names sample {index} of a set of {}",
                samples.len()
            ))
        })?;
        scoring.add(counts, sample, row);
    }
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

    #[test]
    fn labelled_counts_follow_the_top_k() {
        let logits = Tensor::from_slice(&[
            0.1f32, 0.9, 0.0, 0.0, 0.0, 0.0, //
            0.5, 0.1, 0.2, 0.3, 0.4, 0.0, //
        ])
        .view([2, 6]);
        let labels = Tensor::from_slice(&[1i64, 5]);
        let mut counts = EvalCounts::default();
        count_labelled(&mut counts, &logits, &labels).unwrap();
        assert_eq!((counts.count, counts.top1, counts.top5, counts.excluded), (2, 1, 1, 0));
        assert_eq!(counts.top1_pct(), 50.0);
        let expected = logits.log_softmax(1, Kind::Float).neg();
        let expected = expected.double_value(&[0, 1]) + expected.double_value(&[1, 5]);
        assert!((counts.loss_sum - expected).abs() < 1e-5, "{} vs {expected}", counts.loss_sum);
    }

    #[test]
    fn scored_logits_count_through_the_scoring() {
        let logits = Tensor::from_slice(&[
            0.1f32, 0.9, 0.0, 0.0, 0.0, 0.0, //
            0.5, 0.1, 0.2, 0.3, 0.4, 0.0, //
        ])
        .view([2, 6]);
        let samples = [Sample::file("a/0.png".into(), 1), Sample::file("b/1.png".into(), 5)];
        let mut counts = EvalCounts::default();
        score_logits(&logits, &Scoring::Labels, &samples, &[0, 1], &mut counts).unwrap();
        assert_eq!((counts.count, counts.top1, counts.top5), (2, 1, 1));
        let err = score_logits(&logits, &Scoring::Labels, &samples, &[0, 7], &mut counts);
        assert!(err.unwrap_err().to_string().contains("sample 7"));
    }
}
