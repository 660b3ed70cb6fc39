//! The coordinator: batch planning ([`plan`]), the job state machine
//! ([`job`]) and its state file for a restart ([`saved`]), sweeps of many runs over the joined hosts ([`sweep`]), its
//! gRPC face ([`service`], taking connections through [`incoming`]), and what it prints ([`printer`], [`progress`]).
//! Nothing here links libtorch.

pub mod incoming;
pub mod job;
pub mod plan;
pub mod printer;
pub mod progress;
pub mod saved;
pub mod service;
pub mod state;
pub mod sweep;

/// `println!` that never waits on a stdout nobody reads once
/// `rsb_logging::init_non_blocking` ran (`coordinator up` runs it: a line
/// printed under the job's lock must not stop every call), and never panics
/// on a closed one: [`rsb_logging::stdout_line`] of the formatted line.
#[macro_export]
macro_rules! print_line {
    ($($arg:tt)*) => {
        rsb_logging::stdout_line(&format!($($arg)*))
    };
}
