//! The coordinator: batch planning ([`plan`]), the job state machine
//! ([`job`]), sweeps of many runs over the joined hosts ([`sweep`]), its
//! gRPC face ([`service`]), and what it prints ([`printer`], [`progress`]).
//! Nothing here links libtorch.

pub mod job;
pub mod plan;
pub mod printer;
pub mod progress;
pub mod service;
pub mod state;
pub mod sweep;
