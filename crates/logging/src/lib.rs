//! How every process of the project logs: `tracing` events to stderr,
//! filtered by `RUST_LOG` (default `info`), either as plain text (colour only
//! when stderr is a terminal) or as one JSON object per line
//! (`--log-format json`, for log collectors).
//!
//! The format is also read from the environment variable [`FORMAT_ENV`], and
//! [`init`] exports the chosen one there, so the processes a coordinator or
//! an agent starts (workers, ranks) log the same way.
//!
//! A process that must never stop on its stderr (an agent, which relays its
//! ranks' lines and must keep answering the coordinator when whoever reads
//! its stderr stalls) logs through [`init_non_blocking`]: its lines go
//! through a bounded buffer to a writer thread, and lines that do not fit
//! are dropped and counted ([`NonBlockingStderr::dropped_lines`]).

#![warn(missing_docs)]
#![warn(clippy::unwrap_used)]

use std::io::Write;
use std::sync::OnceLock;
use tracing::Subscriber;
use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, WorkerGuard};
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::fmt::MakeWriter;
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
    install(format, std::io::stderr);
}

/// Lines the non-blocking stderr buffers before it drops them: a few MiB.
pub const BUFFERED_LINES: usize = 16 * 1024;

/// As [`init`], but the log lines (and [`stderr_line`]'s) go to stderr
/// through a buffer of [`BUFFERED_LINES`] lines and a writer thread, so
/// that no thread of the process ever waits on a stderr nobody reads: lines
/// that do not fit are dropped and counted. Keep the returned value until
/// the process ends.
pub fn init_non_blocking(format: LogFormat) -> NonBlockingStderr {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(BUFFERED_LINES)
        .thread_name("stderr-writer")
        .finish(std::io::stderr());
    let dropped = writer.error_counter();
    let _ = NON_BLOCKING_STDERR.set(writer.clone());
    install(format, writer);
    NonBlockingStderr { guard: Some(guard), dropped }
}

/// The non-blocking stderr, once [`init_non_blocking`] installed it.
static NON_BLOCKING_STDERR: OnceLock<NonBlocking> = OnceLock::new();

/// Installs the subscriber writing to `writer` (see [`init`]).
fn install<W>(format: LogFormat, writer: W)
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    // Children inherit the environment; nothing else runs yet.
    std::env::set_var(FORMAT_ENV, format.name());
    let builder = tracing_subscriber::fmt().with_env_filter(env_filter()).with_writer(writer);
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

/// Writes `line` and a newline to this process's stderr, in one write:
/// through the non-blocking stderr when [`init_non_blocking`] installed it
/// (never waiting), else directly. A failed write is ignored (not
/// `eprintln!`, which panics when stderr is gone).
pub fn stderr_line(line: &str) {
    let mut bytes = Vec::with_capacity(line.len() + 1);
    bytes.extend_from_slice(line.as_bytes());
    bytes.push(b'\n');
    match NON_BLOCKING_STDERR.get() {
        Some(writer) => {
            let _ = writer.clone().write_all(&bytes);
        }
        None => {
            let _ = std::io::stderr().write_all(&bytes);
        }
    }
}

/// The non-blocking stderr of [`init_non_blocking`]: when dropped, it waits
/// (at most about a second) for the buffered lines to be written, unless
/// lines were dropped, which says the reader stalled; then the buffered
/// lines are left unwritten rather than waited for.
#[must_use = "dropping it ends the writing of buffered lines"]
pub struct NonBlockingStderr {
    guard: Option<WorkerGuard>,
    dropped: ErrorCounter,
}

impl NonBlockingStderr {
    /// Lines dropped so far because the buffer was full.
    pub fn dropped_lines(&self) -> usize {
        self.dropped.dropped_lines()
    }
}

impl Drop for NonBlockingStderr {
    fn drop(&mut self) {
        if let Some(guard) = self.guard.take() {
            if self.dropped_lines() == 0 {
                drop(guard);
            } else {
                // Its drop waits for a writer that is stuck, and then
                // prints to stdout, which may be stuck too.
                std::mem::forget(guard);
            }
        }
    }
}

impl std::fmt::Debug for NonBlockingStderr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NonBlockingStderr").field("dropped_lines", &self.dropped_lines()).finish()
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
