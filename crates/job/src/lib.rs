//! What every process of a job agrees on, without libtorch: the batch plan
//! and the one rule for which rank runs which sampler streams ([`plan`]), the
//! metrics records the trainer writes to `metrics.jsonl` and rank 0 sends
//! to the coordinator ([`records`]) and the log they are appended to
//! ([`metrics_log`]), what makes a checkpoint folder count
//! and which one a resume uses ([`checkpoint`]), and the rules of a run
//! folder: no second run in one `--out`, no resume of another run into it,
//! one checkpoint writer at a time, no silent recipe change on resume
//! ([`run_folder`]), and what a sweep of seeds and grids is: its arguments,
//! cells, manifest and folder layout ([`sweep`]). The small files they
//! write are replaced atomically through `rsb_files`.

#![warn(missing_docs)]
#![warn(clippy::unwrap_used)]

pub mod checkpoint;
pub mod metrics_log;
pub mod plan;
pub mod records;
pub mod run_folder;
pub mod sweep;

pub use checkpoint::CheckpointError;
pub use metrics_log::{MetricsLog, MetricsLogError};
pub use plan::{hosts_that_split, streams_of_rank, BatchPlan, PlanError};
pub use records::{
    EvalSetAccuracy, FabricProbe, GenerationReason, LinkSpeed, MetricsRecord, RankBalance, SlowLink,
};
pub use run_folder::{
    auto_resume, check_out_folder, check_resume, write_resolved_recipe, AutoResume, FieldChange,
    RunFolderError, RunFolderLock,
};
pub use sweep::{
    parse_seeds, GridAxis, RunEnd, RunOutcome, SweepCell, SweepError, SweepLayout, SweepManifest,
};
