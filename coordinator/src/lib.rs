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

/// `println!` for a command whose stdout is its result (`coordinator
/// status`, `coordinator report`): [`rsb_logging::output_line`] of the
/// formatted line, its failure the calling function's error (`?`, anyhow):
/// a result that could not be written (a full disk behind `>`) is never
/// taken for one that was; a reader that went away (`| head`) ends the
/// output quietly.
#[macro_export]
macro_rules! output {
    ($($arg:tt)*) => {
        rsb_logging::output_line(&format!($($arg)*))
            .map_err(|e| anyhow::anyhow!("writing the output to stdout: {e}"))?
    };
}
