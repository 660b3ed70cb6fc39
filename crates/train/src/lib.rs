//! Training on libtorch: everything between a micro-batch and a checkpoint.
//!
//! [`loss`] (timm's BCE, soft-target CE), [`lamb`] (timm's LAMB with its
//! parameter groups), [`schedule`] (cosine with warmup per update),
//! [`metrics`] (top-k, `metrics.jsonl`), [`checkpoint`] (atomic, resumable)
//! [`ddp`] (data parallelism over a collective) and [`trainer`] (the loop).

pub mod batch;
pub mod checkpoint;
pub mod ddp;
pub mod error;
pub mod lamb;
pub mod loss;
pub mod metrics;
pub mod schedule;
pub mod trainer;

pub use error::TrainError;
