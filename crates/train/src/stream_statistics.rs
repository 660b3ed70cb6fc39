//! BN running statistics kept per sampler stream, as timm keeps them per GPU.
//!
//! A stream is one GPU of the paper's run ([`rsb_data::sampler`]). In timm
//! each GPU's BN layers keep their own running mean and variance (a moving
//! average over that GPU's micro-batches, momentum 0.1), and `--dist-bn
//! reduce` averages them over the GPUs at each epoch's end. A rank that runs
//! several streams in one model would chain one moving average through every
//! stream's micro-batch instead: its statistics would cover fewer images,
//! lag less, and count N forward passes per update (`num_batches_tracked`).
//! So a rank with more than one stream keeps one copy of the BN buffers per
//! stream, points the model's buffers at a stream's copy before that
//! stream's forward pass (and back at their own memory once the update's
//! passes are done), and averages the copies (then over the ranks) into the
//! model's own where timm averages over GPUs. Since a moving average is linear,
//! averaging at a mid-epoch checkpoint changes nothing at the epoch's end,
//! so a run resumed from one goes on as the uninterrupted run.
//!
//! A rank with one stream uses the model's own buffers: nothing is copied.

use crate::TrainError;
use rsb_vision::Model;
use tch::Tensor;

/// The BN statistics of one stream: a copy of each of the model's buffers
/// (running means and variances) and its count of BN batches.
#[derive(Debug)]
struct OneStream {
    buffers: Vec<Tensor>,
    num_batches_tracked: i64,
}

impl OneStream {
    fn of(model: &Model) -> Result<OneStream, TrainError> {
        let buffers = model
            .named_buffers()
            .iter()
            .map(|(_, b)| b.f_detach_copy())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(OneStream { buffers, num_batches_tracked: model.num_batches_tracked() })
    }
}

/// The BN statistics of each of a rank's streams, with the copies an update
/// that is skipped restores.
#[derive(Debug, Default)]
pub struct StreamStatistics {
    /// By stream position (the rank's streams in accumulation order); empty
    /// with one stream.
    streams: Vec<OneStream>,
    /// Copies of the statistics an update's forward passes change (every
    /// stream's, or with one stream the model's own), from before them.
    backup: Vec<Tensor>,
    /// The model's own buffers' memory (aliases taken before any stream's
    /// copy was pointed at): where the model's buffers point between
    /// updates, holding the last average.
    home: Vec<Tensor>,
}

/// The statistics an update's forward passes change: every one of
/// `streams`' copies, or with one stream (none kept) the `model`'s own buffers.
fn live<'a>(streams: &'a [OneStream], model: &'a Model) -> Vec<&'a Tensor> {
    if streams.is_empty() {
        model.named_buffers().iter().map(|(_, b)| b).collect()
    } else {
        streams.iter().flat_map(|s| &s.buffers).collect()
    }
}

/// `destination`'s storage overwritten with `source`'s values.
fn copy_into(destination: &Tensor, source: &Tensor) -> Result<(), TrainError> {
    destination.shallow_clone().f_copy_(source)?;
    Ok(())
}

impl StreamStatistics {
    /// Whether the streams keep their own copies (more than one stream).
    pub fn per_stream(&self) -> bool {
        !self.streams.is_empty()
    }

    /// Readies the copies for an update of `streams` streams: with more
    /// than one, each stream that has none yet starts from the `model`'s
    /// (the run's start, a checkpoint, rank 0's broadcast).
    pub fn prepare(&mut self, model: &Model, streams: usize) -> Result<(), TrainError> {
        if streams < 2 {
            self.forget();
            return Ok(());
        }
        if self.streams.len() == streams {
            return Ok(());
        }
        let _guard = tch::no_grad_guard();
        self.streams = (0..streams).map(|_| OneStream::of(model)).collect::<Result<_, _>>()?;
        self.home =
            model.named_buffers().iter().map(|(_, b)| b.f_alias()).collect::<Result<_, _>>()?;
        Ok(())
    }

    /// After an update's forward and backward passes: the `model`'s BN
    /// buffers pointed back at their own memory, which holds the last
    /// average, so that nothing read or written through the model between
    /// updates (a checkpoint's state, an evaluation, a weights load) reaches
    /// one stream's statistics.
    pub fn go_home(&self, model: &Model) -> Result<(), TrainError> {
        if self.home.is_empty() {
            return Ok(());
        }
        for ((_, buffer), home) in model.named_buffers().iter().zip(&self.home) {
            buffer.shallow_clone().f_set_data(home)?;
        }
        Ok(())
    }

    /// Forgets the copies: the model's statistics were replaced (rank 0's
    /// broadcast), and the next update starts every stream from them.
    pub fn forget(&mut self) {
        self.streams.clear();
        self.home.clear();
    }

    /// Before stream `position`'s forward pass: the `model`'s BN buffers
    /// made to hold the stream's own statistics, by pointing them at its
    /// copies' memory (`set_data`, as Python's `buffer.data = own`: no copy,
    /// no kernel), so that the forward pass updates the stream's statistics
    /// in place; and its count of BN batches.
    pub fn enter(&self, model: &mut Model, position: usize) -> Result<(), TrainError> {
        let Some(own) = self.streams.get(position) else { return Ok(()) };
        let _guard = tch::no_grad_guard();
        for ((_, buffer), own) in model.named_buffers().iter().zip(&own.buffers) {
            buffer.shallow_clone().f_set_data(own)?;
        }
        model.set_num_batches_tracked(own.num_batches_tracked);
        Ok(())
    }

    /// After stream `position`'s forward pass: the count of BN batches it
    /// made (its statistics were updated in its own memory).
    pub fn leave(&mut self, model: &Model, position: usize) {
        if let Some(own) = self.streams.get_mut(position) {
            own.num_batches_tracked = model.num_batches_tracked();
        }
    }

    /// Copies the statistics an update's forward passes change aside,
    /// before them.
    pub fn back_up(&mut self, model: &Model) -> Result<(), TrainError> {
        let _guard = tch::no_grad_guard();
        let live = live(&self.streams, model);
        if self.backup.len() != live.len() {
            self.backup = live.iter().map(|t| t.f_empty_like()).collect::<Result<_, _>>()?;
        }
        for (live, backup) in live.into_iter().zip(&self.backup) {
            copy_into(backup, live)?;
        }
        Ok(())
    }

    /// Puts those statistics back as [`StreamStatistics::back_up`] found
    /// them unless the update was `applied` (a 0-d bool tensor): a select
    /// on the device. The counts of BN batches go on, as when an update is
    /// applied.
    pub fn restore_unless(&self, model: &Model, applied: &Tensor) -> Result<(), TrainError> {
        let _guard = tch::no_grad_guard();
        for (live, backup) in live(&self.streams, model).into_iter().zip(&self.backup) {
            let _ = live.f_where_self_out(live, applied, backup)?;
        }
        Ok(())
    }

    /// Puts the average over the streams into the `model`: the running
    /// means and variances summed in stream order and divided by the stream
    /// count (as an all-reduce's mean over as many ranks); the count of BN
    /// batches, the same in every stream, copied.
    pub fn average_into(&self, model: &mut Model) -> Result<(), TrainError> {
        let Some((first, rest)) = self.streams.split_first() else { return Ok(()) };
        let _guard = tch::no_grad_guard();
        let count = self.streams.len() as f64;
        for (i, ((_, buffer), first)) in
            model.named_buffers().iter().zip(&first.buffers).enumerate()
        {
            let mut sum = first.f_detach_copy()?;
            for stream in rest {
                sum = sum.f_add(&stream.buffers[i])?;
            }
            copy_into(buffer, &sum.f_div_scalar(count)?)?;
        }
        model.set_num_batches_tracked(first.num_batches_tracked);
        Ok(())
    }

    /// Every stream's statistics set to the `model`'s (once they hold the
    /// average over the streams and the ranks).
    pub fn set_all_from(&mut self, model: &Model) -> Result<(), TrainError> {
        let _guard = tch::no_grad_guard();
        for own in &mut self.streams {
            for ((_, buffer), own) in model.named_buffers().iter().zip(&own.buffers) {
                copy_into(own, buffer)?;
            }
            own.num_batches_tracked = model.num_batches_tracked();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rsb_vision::{ForwardMode, ModelConfig};
    use tch::{Device, Kind};

    /// A tiny ResNet's first BN layer's running mean, as a number per channel.
    fn first_running_mean(model: &Model) -> Vec<f64> {
        let (_, mean) =
            model.named_buffers().iter().find(|(n, _)| n.ends_with("running_mean")).unwrap();
        Vec::<f64>::try_from(&mean.to_kind(Kind::Double)).unwrap()
    }

    fn batch(value: f64) -> Tensor {
        Tensor::full([2, 3, 32, 32], value, (Kind::Float, Device::Cpu))
            + Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu))
    }

    #[test]
    fn each_stream_keeps_its_own_statistics_and_they_are_averaged_as_over_ranks() {
        // The same weights each time.
        let new_model = || {
            tch::manual_seed(0);
            let config = ModelConfig { num_classes: 4, ..Default::default() };
            Model::new("resnet18", config, Device::Cpu).unwrap()
        };
        let mut model = new_model();
        let start = first_running_mean(&model);
        // One model per stream, as one rank per stream would have.
        let mut alone = [new_model(), new_model()];
        let inputs = [batch(3.0), batch(-2.0)];
        let mut stats = StreamStatistics::default();
        stats.prepare(&model, 2).unwrap();
        assert!(stats.per_stream());
        for _update in 0..3 {
            stats.back_up(&model).unwrap();
            for (position, input) in inputs.iter().enumerate() {
                stats.enter(&mut model, position).unwrap();
                let _ = model.forward(input, ForwardMode::Train).unwrap();
                stats.leave(&model, position);
                let _ = alone[position].forward(input, ForwardMode::Train).unwrap();
            }
        }
        // Between updates the model holds its own statistics (the last
        // average: none yet), not the last stream's.
        stats.go_home(&model).unwrap();
        assert_eq!(first_running_mean(&model), start);
        // Stream 0 went on from its own statistics, not stream 1's.
        stats.enter(&mut model, 0).unwrap();
        assert_eq!(first_running_mean(&model), first_running_mean(&alone[0]));
        assert_eq!(model.num_batches_tracked(), 3, "one BN batch per update and stream");
        // A skipped update puts every stream back.
        stats.back_up(&model).unwrap();
        stats.enter(&mut model, 1).unwrap();
        let _ = model.forward(&batch(f64::NAN), ForwardMode::Train).unwrap();
        stats.leave(&model, 1);
        stats.restore_unless(&model, &Tensor::from(false)).unwrap();
        stats.enter(&mut model, 1).unwrap();
        assert_eq!(first_running_mean(&model), first_running_mean(&alone[1]), "undone");
        // The average of the two, as two ranks' means, into the model's own
        // statistics; every stream goes on from it.
        stats.go_home(&model).unwrap();
        stats.average_into(&mut model).unwrap();
        let (a, b) = (first_running_mean(&alone[0]), first_running_mean(&alone[1]));
        let mean: Vec<f64> =
            a.iter().zip(&b).map(|(x, y)| f64::from((*x as f32 + *y as f32) / 2.0)).collect();
        assert_eq!(first_running_mean(&model), mean);
        assert_ne!(mean, start);
        stats.set_all_from(&model).unwrap();
        stats.enter(&mut model, 0).unwrap();
        assert_eq!(first_running_mean(&model), mean);
    }

    #[test]
    fn one_stream_uses_the_models_own_statistics() {
        let config = ModelConfig { num_classes: 4, ..Default::default() };
        let mut model = Model::new("resnet18", config.clone(), Device::Cpu).unwrap();
        let mut stats = StreamStatistics::default();
        stats.prepare(&model, 1).unwrap();
        assert!(!stats.per_stream());
        let _ = model.forward(&batch(1.0), ForwardMode::Train).unwrap();
        let moved = first_running_mean(&model);
        stats.enter(&mut model, 0).unwrap();
        stats.average_into(&mut model).unwrap();
        assert_eq!(first_running_mean(&model), moved);
        assert_eq!(model.num_batches_tracked(), 1);
    }
}
