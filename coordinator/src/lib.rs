//! The coordinator: batch planning ([`plan`]), the job state machine
//! ([`job`]) and its state file for a restart ([`saved`]), sweeps of many runs over the joined hosts ([`sweep`]), its
//! gRPC face ([`service`]), and what it prints ([`printer`], [`progress`]).
//! Nothing here links libtorch.

pub mod job;
pub mod plan;
pub mod printer;
pub mod progress;
pub mod saved;
pub mod service;
pub mod state;
pub mod sweep;
