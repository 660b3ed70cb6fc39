//! Training on libtorch: everything between a micro-batch and a checkpoint.
//!
//! [`loss`] (timm's BCE, soft-target CE), [`lamb`] (timm's LAMB with its
//! parameter groups), [`schedule`] (cosine with warmup, stepped per epoch or per update),
//! [`precision`] (what `precision: auto` picks on this CPU or GPU),
//! [`grad_scaler`] (fp16's dynamic loss scaling, torch's `GradScaler`),
//! [`host_read`] (every read of a device value on the host, counted),
//! [`checkpoint`] (committed with a manifest of checksums, verified on
//! resume), [`ddp`] (data parallelism over a collective), [`fabric`] (the
//! fabric probe before a distributed run's first update), [`overlap`]
//! (gradient buckets reduced during the backward pass), [`from_recipe`]
//! (the recipe as domain types),
//! [`evaluation`] (top-1/top-5 counts), [`report`] (metrics records and
//! progress), [`sample_trace`] (which samples each update used, for tests), [`stop`] (stopping
//! at an update boundary; checkpoint writes the other ranks wait for without
//! timing out), [`stream_statistics`] (BN statistics per sampler stream, as
//! timm's per GPU) and [`trainer`] (the loop: epochs of updates).

#![warn(missing_docs)]
#![warn(clippy::unwrap_used)]

pub mod atomic_file;
pub mod batch;
pub mod checkpoint;
pub mod ddp;
pub mod error;
pub mod evaluation;
pub mod fabric;
pub mod from_recipe;
pub mod grad_scaler;
pub mod host_read;
pub mod lamb;
pub mod loss;
pub mod overlap;
pub mod precision;
pub mod report;
pub mod sample_trace;
pub mod schedule;
pub mod stop;
pub mod stream_statistics;
pub mod trainer;

pub use error::TrainError;
