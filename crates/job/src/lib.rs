//! What every process of a job agrees on, without libtorch: the batch plan
//! and the one rule for which rank runs which sampler streams ([`plan`]), and
//! the metrics records the trainer writes to `metrics.jsonl` and rank 0 sends
//! to the coordinator ([`records`]).

#![warn(missing_docs)]
#![warn(clippy::unwrap_used)]

pub mod plan;
pub mod records;

pub use plan::{streams_of_rank, BatchPlan, PlanError};
pub use records::{EvalSetAccuracy, MetricsRecord};
