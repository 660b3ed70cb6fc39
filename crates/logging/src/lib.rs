//! How every process of the project logs: `tracing` events to stderr,
//! filtered by `RUST_LOG` (default `info`), either as plain text (colour only
//! when stderr is a terminal) or as one JSON object per line
//! (`--log-format json`, for log collectors).
//!
//! The format is also read from the environment variable [`FORMAT_ENV`], and
//! [`init`] exports the chosen one there, so the processes a coordinator or
//! an agent starts (workers, ranks) log the same way.

#![warn(missing_docs)]
#![warn(clippy::unwrap_used)]

use tracing::Subscriber;
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{EnvFilter, Layer};

/// The environment variable that holds the log format (`text` or `json`).
pub const FORMAT_ENV: &str = "RSB_LOG_FORMAT";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines; colour only to a terminal.
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`, `fields`).
    Json,
}

impl LogFormat {
    /// The name used on the command line and in [`FORMAT_ENV`].
    pub fn name(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// The `RUST_LOG` filter, `info` when unset or invalid.
pub fn env_filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Installs the process's subscriber (stderr, [`env_filter`], `format`) and
/// exports `format` to [`FORMAT_ENV`] for child processes. Call it once, at
/// the start of `main`, before any thread is started.
pub fn init(format: LogFormat) {
    // Children inherit the environment; nothing else runs yet.
    std::env::set_var(FORMAT_ENV, format.name());
    let builder =
        tracing_subscriber::fmt().with_env_filter(env_filter()).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => {
            let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
            builder.with_ansi(colour).init();
        }
        LogFormat::Json => {
            builder.json().with_span_events(FmtSpan::NONE).with_current_span(false).init();
        }
    }
}

/// The format in [`FORMAT_ENV`] (text when unset or unknown): what a child
/// process started by [`init`]'s caller logs in.
pub fn format_from_env() -> LogFormat {
    match std::env::var(FORMAT_ENV).as_deref() {
        Ok("json") => LogFormat::Json,
        _ => LogFormat::Text,
    }
}

/// A stderr layer in `format`, for processes that compose their own
/// subscriber (a rank also logs to its file).
pub fn stderr_layer<S>(format: LogFormat) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    match format {
        LogFormat::Text => Box::new(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        ),
        LogFormat::Json => Box::new(
            tracing_subscriber::fmt::layer()
                .json()
                .with_current_span(false)
                .with_writer(std::io::stderr),
        ),
    }
}
