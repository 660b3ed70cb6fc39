//! The batch plan: how a recipe's global batch is held constant over any
//! world size. A recipe fixes `global_size` and `micro_size`, hence
//! `streams = global_size / micro_size` sampler streams (micro-batch slots of
//! one optimizer update). `world_size` ranks share the streams evenly, each
//! running `accumulation = streams / world_size` micro-batches per update:
//! `global = micro x accumulation x world`, whatever the world size.

use rsb_recipes::Recipe;

/// Why a world size cannot run a recipe.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    /// No ranks.
    #[error("world size must be at least 1")]
    EmptyWorld,
    /// The streams do not split evenly over the ranks.
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
        if world_size == 0 {
            return Err(PlanError::EmptyWorld);
        }
        let (global, micro) = (recipe.batch.global_size, recipe.batch.micro_size);
        let streams = global / micro;
        if streams % world_size != 0 {
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

    /// The sampler streams rank `rank` runs, in the order it accumulates them.
    pub fn streams_of(&self, rank: u32) -> Vec<u32> {
        (0..self.accumulation).map(|a| rank * self.accumulation + a).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe(global: u32, micro: u32) -> Recipe {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes/resnet50_a1.yaml");
        let mut r = rsb_recipes::load(&path, &[]).unwrap();
        r.batch.global_size = global;
        r.batch.micro_size = micro;
        r
    }

    #[test]
    fn global_batch_is_constant_over_world_sizes() {
        let r = recipe(2048, 128);
        for world in [1, 2, 4, 8, 16] {
            let plan = BatchPlan::new(&r, world).unwrap();
            assert_eq!(plan.micro_size * plan.accumulation * plan.world_size, 2048);
            let mut all: Vec<u32> = (0..world).flat_map(|k| plan.streams_of(k)).collect();
            all.sort();
            assert_eq!(all, (0..16).collect::<Vec<_>>());
        }
    }

    #[test]
    fn uneven_world_sizes_are_refused_with_a_reason() {
        let err = BatchPlan::new(&recipe(2048, 512), 3).unwrap_err().to_string();
        assert!(err.contains("4 micro-batches") && err.contains("3 ranks"), "{err}");
        assert_eq!(BatchPlan::new(&recipe(2048, 512), 0), Err(PlanError::EmptyWorld));
    }
}
