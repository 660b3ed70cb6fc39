//! The coordinator: batch planning ([`plan`]), the job state machine
//! ([`job`]) and its gRPC face ([`service`]). Nothing here links libtorch.

pub mod job;
pub mod plan;
pub mod service;
