//! The batch plan: how a recipe's global batch is held constant over any
//! world size. A recipe fixes `global_size` and `micro_size`, hence
//! `streams = global_size / micro_size` sampler streams (micro-batch slots of
//! one optimizer update). `world_size` ranks share the streams evenly, each
//! running `accumulation = streams / world_size` micro-batches per update:
//! `global = micro x accumulation x world`, whatever the world size.
//!
//! [`streams_of_rank`] is the one place that says which streams a rank runs
//! (contiguous blocks); the coordinator's plan, the data crate's samplers and
//! the worker's ranks all ask it.

use rsb_recipes::Recipe;
use std::ops::Range;

/// Why a world size cannot run a recipe.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    /// No ranks.
    #[error("world size must be at least 1")]
    EmptyWorld,
    /// Micro-batches of no images.
    #[error("batch.micro_size must be at least 1")]
    EmptyMicroBatch,
    /// The streams of a recipe do not split evenly over the ranks.
    #[error(
        "{streams} micro-batches of {micro} per update (global batch {global}) do not split over {world} ranks; \
         use a world size that divides {streams}, or change batch.micro_size"
    )]
    Uneven {
        /// Sampler streams.
        streams: u32,
        /// Ranks.
        world: u32,
        /// Micro-batch size.
        micro: u32,
        /// Global batch size.
        global: u32,
    },
    /// A number of streams does not split evenly over the ranks.
    #[error(
        "{streams} sampler streams cannot be split over {world} ranks; \
         the world size must divide the stream count"
    )]
    UnevenStreams {
        /// Sampler streams.
        streams: usize,
        /// Ranks.
        world: usize,
    },
    /// A rank outside the world.
    #[error("rank {rank} is not in a world of {world} ranks")]
    NoSuchRank {
        /// The rank asked for.
        rank: usize,
        /// Ranks.
        world: usize,
    },
}

/// The sampler streams rank `rank` of `world` runs, in the order it
/// accumulates them: the contiguous block `rank * k .. (rank + 1) * k` with
/// `k = num_streams / world`. The world size must divide the stream count.
pub fn streams_of_rank(
    num_streams: usize,
    world: usize,
    rank: usize,
) -> Result<Range<usize>, PlanError> {
    if world == 0 {
        return Err(PlanError::EmptyWorld);
    }
    if !num_streams.is_multiple_of(world) {
        return Err(PlanError::UnevenStreams { streams: num_streams, world });
    }
    if rank >= world {
        return Err(PlanError::NoSuchRank { rank, world });
    }
    let per_rank = num_streams / world;
    Ok(rank * per_rank..(rank + 1) * per_rank)
}

/// The per-rank share of the global batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchPlan {
    /// Images per optimizer update over all ranks.
    pub global_size: u32,
    /// Images per forward pass.
    pub micro_size: u32,
    /// Ranks.
    pub world_size: u32,
    /// Micro-batches each rank accumulates per update.
    pub accumulation: u32,
    /// Sampler streams in all (`global_size / micro_size`).
    pub streams: u32,
}

impl BatchPlan {
    /// Plans `recipe` over `world_size` ranks.
    pub fn new(recipe: &Recipe, world_size: u32) -> Result<BatchPlan, PlanError> {
        BatchPlan::from_sizes(recipe.batch.global_size, recipe.batch.micro_size, world_size)
    }

    /// Plans a global batch of `global` images in micro-batches of `micro`
    /// over `world_size` ranks.
    pub fn from_sizes(global: u32, micro: u32, world_size: u32) -> Result<BatchPlan, PlanError> {
        if world_size == 0 {
            return Err(PlanError::EmptyWorld);
        }
        if micro == 0 {
            return Err(PlanError::EmptyMicroBatch);
        }
        let streams = global / micro;
        if !streams.is_multiple_of(world_size) {
            return Err(PlanError::Uneven { streams, world: world_size, micro, global });
        }
        Ok(BatchPlan {
            global_size: global,
            micro_size: micro,
            world_size,
            accumulation: streams / world_size,
            streams,
        })
    }

    /// The sampler streams rank `rank` runs, in the order it accumulates them
    /// (empty for a rank outside the world).
    pub fn streams_of(&self, rank: u32) -> Vec<u32> {
        streams_of_rank(self.streams as usize, self.world_size as usize, rank as usize)
            .map(|streams| streams.map(|s| s as u32).collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_own_disjoint_contiguous_blocks_that_cover_every_stream() {
        for world in [1usize, 2, 3, 4, 6, 12] {
            let mut seen = Vec::new();
            for rank in 0..world {
                let block = streams_of_rank(12, world, rank).unwrap();
                assert_eq!(block.len(), 12 / world);
                assert_eq!(block.start, rank * (12 / world), "world {world} rank {rank}");
                seen.extend(block);
            }
            assert_eq!(seen, (0..12).collect::<Vec<_>>(), "world {world}");
        }
    }

    #[test]
    fn impossible_splits_are_refused_with_the_reason() {
        let err = streams_of_rank(12, 5, 0).unwrap_err().to_string();
        assert!(err.contains("12") && err.contains("5 ranks"), "{err}");
        assert_eq!(streams_of_rank(12, 4, 4), Err(PlanError::NoSuchRank { rank: 4, world: 4 }));
        assert_eq!(streams_of_rank(12, 0, 0), Err(PlanError::EmptyWorld));
        assert_eq!(BatchPlan::from_sizes(16, 0, 1), Err(PlanError::EmptyMicroBatch));
    }

    #[test]
    fn the_plan_uses_the_stream_rule() {
        let plan = BatchPlan::from_sizes(2048, 128, 4).unwrap();
        assert_eq!((plan.streams, plan.accumulation), (16, 4));
        for rank in 0..4u32 {
            let expected: Vec<u32> =
                streams_of_rank(16, 4, rank as usize).unwrap().map(|s| s as u32).collect();
            assert_eq!(plan.streams_of(rank), expected);
        }
        assert!(plan.streams_of(4).is_empty());
    }
}
