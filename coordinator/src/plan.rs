//! The batch plan of a job: how a recipe's global batch is split over the
//! ranks. The plan and its stream rule live in [`rsb_job::plan`], shared
//! with the worker's ranks and the data crate's samplers; this module is the
//! coordinator's name for them.

pub use rsb_job::plan::{hosts_that_split, streams_of_rank, BatchPlan, PlanError};

#[cfg(test)]
mod tests {
    use super::*;
    use rsb_recipes::Recipe;

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
