//! Which images each sampler stream sees in an epoch: timm's
//! `RepeatAugSampler` (repeated augmentation) and PyTorch's
//! `DistributedSampler`, index for index.
//!
//! A stream is one micro-batch slot of the global batch: the global batch of
//! every optimizer update is one micro-batch from each of the
//! `global_size / micro_size` streams. Streams play the role of timm's ranks
//! whatever the real world size is, so the data order (and with repeated
//! augmentation, the rule that the copies of an image land in different
//! micro-batches) does not change when ranks come and go, and a resumed or
//! re-sharded run continues with exactly the samples the epoch had left.
//!
//! Permutations are `torch.randperm(n, generator=torch.Generator().manual_seed(s))`
//! reproduced bit for bit (MT19937 and libtorch's Fisher-Yates), so with the
//! same seed the index lists equal timm's.
//!
//! Ranks own disjoint sets of streams ([`streams_of_rank`]: contiguous blocks,
//! as `coordinator plan` assigns them). [`RankSampler`] is one rank's view: its
//! streams and its position ([`SamplerPosition`], the next optimizer update);
//! [`RankSampler::reshard`] rebuilds it for another world size at the same
//! position, and [`StreamSampler::remaining_indices`] says what is left of an
//! epoch. Because the streams do not depend on the world size, the rest of an
//! epoch after a re-shard is exactly the rest of the uninterrupted epoch:
//! nothing dropped, nothing duplicated beyond repeated augmentation's copies.
//! The trainer draws every update from a `RankSampler` (built at the start,
//! moved to a checkpoint's position on a resume, re-sharded to the rank's
//! streams in a job), and `TrainData::epoch_loader` loads what it plans.

use crate::error::DataError;
use std::sync::Arc;

/// MT19937 as libtorch's CPU generator seeds and runs it.
#[derive(Debug, Clone)]
struct Mt19937 {
    state: [u32; 624],
    index: usize,
}

impl Mt19937 {
    fn new(seed: u64) -> Mt19937 {
        let mut state = [0u32; 624];
        state[0] = (seed & 0xffff_ffff) as u32;
        for i in 1..624 {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32.wrapping_mul(prev ^ (prev >> 30)).wrapping_add(i as u32);
        }
        Mt19937 { state, index: 624 }
    }

    fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            for k in 0..624 {
                let y = (self.state[k] & 0x8000_0000) | (self.state[(k + 1) % 624] & 0x7fff_ffff);
                let mut v = self.state[(k + 397) % 624] ^ (y >> 1);
                if y & 1 == 1 {
                    v ^= 0x9908_b0df;
                }
                self.state[k] = v;
            }
            self.index = 0;
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }
}

/// `torch.randperm(n, generator=torch.Generator().manual_seed(seed))` on a CPU.
pub fn torch_randperm(n: usize, seed: u64) -> Vec<usize> {
    let mut mt = Mt19937::new(seed);
    let mut perm: Vec<usize> = (0..n).collect();
    for i in 0..n.saturating_sub(1) {
        let z = mt.next_u32() as usize % (n - i);
        perm.swap(i, i + z);
    }
    perm
}

/// Which sampler, with its parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SamplerKind {
    /// timm `RepeatAugSampler(num_repeats, selected_round=256, selected_ratio=0)`.
    RepeatAug {
        /// Copies of each image per epoch (>= 2).
        num_repeats: u32,
    },
    /// `torch.utils.data.DistributedSampler(shuffle=True, drop_last=False)`.
    Distributed,
}

/// The per-epoch index lists of every stream.
#[derive(Debug, Clone)]
pub struct StreamSampler {
    dataset_len: usize,
    num_streams: usize,
    kind: SamplerKind,
    seed: u64,
}

impl StreamSampler {
    /// A sampler over `dataset_len` images split into `num_streams` streams.
    /// The permutation of epoch `e` is seeded with `seed + e` (timm's
    /// `RepeatAugSampler` uses `e` alone, i.e. seed 0).
    pub fn new(
        dataset_len: usize,
        num_streams: usize,
        kind: SamplerKind,
        seed: u64,
    ) -> StreamSampler {
        assert!(num_streams >= 1, "at least one stream");
        StreamSampler { dataset_len, num_streams, kind, seed }
    }

    /// The sampler's parameters.
    pub fn kind(&self) -> SamplerKind {
        self.kind
    }

    /// Number of streams.
    pub fn num_streams(&self) -> usize {
        self.num_streams
    }

    /// Samples each stream yields per epoch (timm's `len(sampler)`).
    pub fn samples_per_stream(&self) -> usize {
        let n = self.dataset_len;
        let w = self.num_streams;
        match self.kind {
            SamplerKind::Distributed => n.div_ceil(w),
            SamplerKind::RepeatAug { num_repeats } => {
                let num_samples = (n * num_repeats as usize).div_ceil(w);
                let selected = if n >= 256 { n / 256 * 256 / w } else { n.div_ceil(w) };
                selected.min(num_samples)
            }
        }
    }

    /// The dataset indices stream `stream` visits in `epoch`, in order.
    pub fn stream_indices(&self, epoch: u64, stream: usize) -> Vec<usize> {
        assert!(stream < self.num_streams, "stream {stream} of {}", self.num_streams);
        let n = self.dataset_len;
        if n == 0 {
            return Vec::new();
        }
        let w = self.num_streams;
        let perm = torch_randperm(n, self.seed + epoch);
        let take = self.samples_per_stream();
        match self.kind {
            SamplerKind::Distributed => {
                // Padded by wrapping around to ceil(n / w) * w, then strided.
                (stream..).step_by(w).take(take).map(|i| perm[i % n]).collect()
            }
            SamplerKind::RepeatAug { num_repeats } => {
                let r = num_repeats as usize;
                let total = (n * r).div_ceil(w) * w;
                // repeat_interleave: position p holds perm[p / r]; padding wraps.
                (stream..total).step_by(w).take(take).map(|p| perm[(p % (n * r)) / r]).collect()
            }
        }
    }
}

impl StreamSampler {
    /// Optimizer updates per epoch with micro-batches of `micro` samples per
    /// stream (a partial last micro-batch is dropped, timm's `drop_last`).
    pub fn steps_per_epoch(&self, micro: usize) -> u64 {
        (self.samples_per_stream() / micro.max(1)) as u64
    }

    /// What `streams` still visit in `epoch` from update `step` on, stream by
    /// stream: positions `step * micro` up to the last full micro-batch.
    pub fn remaining_indices(
        &self,
        epoch: u64,
        step: u64,
        micro: usize,
        streams: &[usize],
    ) -> Vec<Vec<usize>> {
        let end = self.steps_per_epoch(micro) as usize * micro;
        let start = (step as usize).saturating_mul(micro).min(end);
        streams
            .iter()
            .map(|&s| {
                let mut list = self.stream_indices(epoch, s);
                list.truncate(end);
                list.drain(..start);
                list
            })
            .collect()
    }
}

/// The sampler streams rank `rank` of `world` runs, in accumulation order:
/// the job's one stream rule, [`rsb_job::streams_of_rank`] (contiguous
/// blocks, as the coordinator's plan assigns them). The world size must
/// divide the stream count.
pub fn streams_of_rank(
    num_streams: usize,
    world: usize,
    rank: usize,
) -> Result<Vec<usize>, DataError> {
    rsb_job::streams_of_rank(num_streams, world, rank)
        .map(Iterator::collect)
        .map_err(|e| DataError::Config(format!("rank {rank}: {e}")))
}

/// A position in a run: the next optimizer update to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct SamplerPosition {
    /// Epoch.
    pub epoch: u64,
    /// Update within the epoch (0-based); every stream has consumed
    /// `step * micro` samples of the epoch.
    pub step: u64,
}

/// One rank's share of the sampler, with its position: yields, update by
/// update, the micro-batch index lists of the rank's streams.
#[derive(Debug, Clone)]
pub struct RankSampler {
    sampler: StreamSampler,
    micro: usize,
    streams: Vec<usize>,
    position: SamplerPosition,
    /// Index lists of the current epoch, one per stream (computed lazily).
    lists: Option<(u64, Arc<Vec<Vec<usize>>>)>,
}

impl RankSampler {
    /// Rank `rank` of `world` at the start of epoch 0.
    pub fn new(
        sampler: StreamSampler,
        micro: usize,
        world: usize,
        rank: usize,
    ) -> Result<RankSampler, DataError> {
        if micro == 0 || sampler.steps_per_epoch(micro) == 0 {
            return Err(DataError::Config(format!(
                "micro-batches of {micro} do not fit the {} samples of a stream",
                sampler.samples_per_stream()
            )));
        }
        let streams = streams_of_rank(sampler.num_streams(), world, rank)?;
        Ok(RankSampler {
            sampler,
            micro,
            streams,
            position: SamplerPosition::default(),
            lists: None,
        })
    }

    /// The streams this rank runs, in accumulation order.
    pub fn streams(&self) -> &[usize] {
        &self.streams
    }

    /// The next update this rank will produce (save it to resume).
    pub fn position(&self) -> SamplerPosition {
        self.position
    }

    /// Continues from `position` (e.g. a checkpoint's); refused past the
    /// end of an epoch.
    pub fn seek(&mut self, position: SamplerPosition) -> Result<(), DataError> {
        let steps = self.steps_per_epoch();
        if position.step >= steps {
            return Err(DataError::Config(format!(
                "position: update {} of epoch {} is past the epoch's {steps} updates",
                position.step, position.epoch
            )));
        }
        self.position = position;
        Ok(())
    }

    /// Optimizer updates per epoch.
    pub fn steps_per_epoch(&self) -> u64 {
        self.sampler.steps_per_epoch(self.micro)
    }

    /// Images per micro-batch.
    pub fn micro(&self) -> usize {
        self.micro
    }

    /// The stream sampler (all streams of the job).
    pub fn sampler(&self) -> &StreamSampler {
        &self.sampler
    }

    /// The full index lists of this rank's streams in the epoch of the
    /// current position, in accumulation order (what a loader slices its
    /// micro-batches from: micro-batch `step` of a stream is
    /// `list[step * micro..(step + 1) * micro]`).
    pub fn epoch_lists(&mut self) -> Arc<Vec<Vec<usize>>> {
        let epoch = self.position.epoch;
        match &self.lists {
            Some((e, lists)) if *e == epoch => Arc::clone(lists),
            _ => {
                let lists: Arc<Vec<Vec<usize>>> = Arc::new(
                    self.streams.iter().map(|&s| self.sampler.stream_indices(epoch, s)).collect(),
                );
                self.lists = Some((epoch, Arc::clone(&lists)));
                lists
            }
        }
    }

    /// The micro-batches of the next update, `(stream, indices)` in
    /// accumulation order; moves to the following update (and epoch).
    pub fn next_update(&mut self) -> Vec<(usize, Vec<usize>)> {
        let SamplerPosition { epoch, step } = self.position;
        let lists = self.epoch_lists();
        let start = step as usize * self.micro;
        let batches = self
            .streams
            .iter()
            .zip(lists.iter())
            .map(|(&s, list)| (s, list[start..start + self.micro].to_vec()))
            .collect();
        self.position = if step + 1 >= self.steps_per_epoch() {
            SamplerPosition { epoch: epoch + 1, step: 0 }
        } else {
            SamplerPosition { epoch, step: step + 1 }
        };
        batches
    }

    /// The same sampler at the same position, for rank `rank` of a world of
    /// `world` ranks (at an update boundary, which is where positions are).
    pub fn reshard(&self, world: usize, rank: usize) -> Result<RankSampler, DataError> {
        let mut next = RankSampler::new(self.sampler.clone(), self.micro, world, rank)?;
        next.position = self.position;
        Ok(next)
    }

    /// What this rank still visits in the current epoch (see
    /// [`StreamSampler::remaining_indices`]).
    pub fn remaining_indices(&self) -> Vec<Vec<usize>> {
        let p = self.position;
        self.sampler.remaining_indices(p.epoch, p.step, self.micro, &self.streams)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn randperm_matches_torch() {
        // torch.randperm(10, generator=torch.Generator().manual_seed(0)).tolist()
        assert_eq!(torch_randperm(10, 0), vec![4, 1, 7, 5, 3, 9, 0, 8, 6, 2]);
    }

    #[test]
    fn repeat_aug_sends_copies_to_different_streams() {
        let s = StreamSampler::new(1000, 4, SamplerKind::RepeatAug { num_repeats: 3 }, 0);
        assert_eq!(s.samples_per_stream(), 1000 / 256 * 256 / 4);
        let streams: Vec<Vec<usize>> = (0..4).map(|k| s.stream_indices(5, k)).collect();
        for (a, sa) in streams.iter().enumerate() {
            let set: std::collections::HashSet<_> = sa.iter().collect();
            assert_eq!(set.len(), sa.len(), "stream {a} repeats an image");
        }
    }

    #[test]
    fn distributed_covers_the_dataset_each_epoch() {
        let s = StreamSampler::new(10, 3, SamplerKind::Distributed, 7);
        let mut all: Vec<usize> = (0..3).flat_map(|k| s.stream_indices(2, k)).collect();
        assert_eq!(all.len(), 12);
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 10);
        assert_ne!(s.stream_indices(2, 0), s.stream_indices(3, 0));
    }
}
