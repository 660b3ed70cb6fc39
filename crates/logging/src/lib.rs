//! How every process of the project logs: `tracing` events to stderr,
//! filtered by `RUST_LOG` (default `info`), either as plain text (colour only
//! when stderr is a terminal) or as one JSON object per line
//! (`--log-format json`, for log collectors).
//!
//! The format is also read from the environment variable [`FORMAT_ENV`], and
//! [`init`] exports the chosen one there, so the processes a coordinator or
//! an agent starts (workers, ranks) log the same way. The lines a process
//! writes that are not events are written in the format too, so a JSON log
//! stays one object per line: its last error ([`error_line`]), a panic's
//! report ([`panic_error_line`], with its stack in a JSON field when
//! `RUST_BACKTRACE` asks), a warning of its own ([`warning_line`]), and the lines
//! an agent relays from its ranks ([`relayed_line`]); [`error_reported_by`]
//! reads the error a line reports in either format (an agent keeps its
//! ranks' last errors).
//!
//! A process that must never stop on its stderr (an agent, which relays its
//! ranks' lines and must keep answering the coordinator when whoever reads
//! its stderr stalls) logs through [`init_non_blocking`]: its lines go
//! through a bounded buffer to a writer thread, and lines that do not fit
//! are dropped and counted ([`NonBlockingOutput::dropped_stderr_lines`]). Its
//! panics are reported the same way (Rust's own panic report waits on
//! stderr).

#![warn(missing_docs)]
#![warn(clippy::unwrap_used)]

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
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
    export_format(format);
    install(format, std::io::stderr);
    if format == LogFormat::Json {
        // Rust's own report is text on several lines: in a JSON log, one
        // error line holds it.
        std::panic::set_hook(Box::new(|info| report_panic(LogFormat::Json, info)));
    }
}

/// Exports `format` to [`FORMAT_ENV`] for child processes: first thing,
/// while the process runs no other thread.
fn export_format(format: LogFormat) {
    std::env::set_var(FORMAT_ENV, format.name());
}

/// Lines each non-blocking stream buffers before it drops them: a few MiB.
pub const BUFFERED_LINES: usize = 16 * 1024;

/// As [`init`], but the log lines (and [`stderr_line`]'s) go to stderr, and
/// [`stdout_line`]'s to stdout, each through a buffer of [`BUFFERED_LINES`]
/// lines and a writer thread, so that no thread of the process ever waits
/// on a stream nobody reads (nor panics on one closed): lines that do not
/// fit are dropped and counted. A panic's report goes the same way, in the
/// words of Rust's own (which would write to stderr directly): the panic
/// hook installed here replaces any installed before.
/// Keep the returned value until the process ends: dropping it gives the
/// buffered lines a bounded time to be written.
pub fn init_non_blocking(format: LogFormat) -> NonBlockingOutput {
    export_format(format);
    let stdout = NonBlockingStream::start(Stream::Stdout);
    let stderr = NonBlockingStream::start(Stream::Stderr);
    let _ = NON_BLOCKING_STDOUT.set(stdout.writer.clone());
    let _ = NON_BLOCKING_STDERR.set(stderr.writer.clone());
    install(format, stderr.writer.clone());
    std::panic::set_hook(Box::new(move |info| report_panic(format, info)));
    NonBlockingOutput { stdout, stderr }
}

/// The non-blocking stdout, once [`init_non_blocking`] installed it.
static NON_BLOCKING_STDOUT: OnceLock<CountingWriter> = OnceLock::new();

/// The non-blocking stderr, once [`init_non_blocking`] installed it.
static NON_BLOCKING_STDERR: OnceLock<CountingWriter> = OnceLock::new();

/// One of the process's output streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    /// Writes `bytes` whole, a failure ignored (a closed stream takes
    /// nothing; `print!` would panic).
    fn write_all(self, bytes: &[u8]) {
        let _ = match self {
            Stream::Stdout => {
                let mut stdout = std::io::stdout().lock();
                stdout.write_all(bytes).and_then(|()| stdout.flush())
            }
            Stream::Stderr => std::io::stderr().write_all(bytes),
        };
    }

    /// Its non-blocking writer, once [`init_non_blocking`] installed it.
    fn non_blocking(self) -> Option<&'static CountingWriter> {
        match self {
            Stream::Stdout => NON_BLOCKING_STDOUT.get(),
            Stream::Stderr => NON_BLOCKING_STDERR.get(),
        }
    }

    /// Writes `line` and a newline in one write: through the non-blocking
    /// writer when there is one (never waiting), else directly.
    fn line(self, line: &str) {
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        match self.non_blocking() {
            Some(writer) => {
                let _ = writer.clone().write_all(&bytes);
            }
            None => self.write_all(&bytes),
        }
    }
}

/// The non-blocking writer, counting the lines handed to it (each write is
/// one line, and one message to the writer thread).
#[derive(Clone)]
struct CountingWriter {
    inner: NonBlocking,
    sent: Arc<AtomicUsize>,
}

impl Write for CountingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.sent.fetch_add(1, Ordering::SeqCst);
        self.inner.write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.write(buf).map(|_| ())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for CountingWriter {
    type Writer = CountingWriter;

    fn make_writer(&'a self) -> CountingWriter {
        self.clone()
    }
}

/// A stream as its writer thread sees it: each line is written whole, and
/// counted once written (or failed: a closed stream takes nothing).
struct CountingStream {
    stream: Stream,
    written: Arc<AtomicUsize>,
}

impl Write for CountingStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_all(buf).map(|()| buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(buf);
        self.written.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the subscriber writing to `writer` (see [`init`]).
fn install<W>(format: LogFormat, writer: W)
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
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
    Stream::Stderr.line(line);
}

/// Writes `line` and a newline to this process's stdout, as [`stderr_line`]
/// does to stderr: never waiting once [`init_non_blocking`] ran, never
/// panicking (`println!` panics when stdout is gone).
pub fn stdout_line(line: &str) {
    Stream::Stdout.line(line);
}

/// Whether stdout's reader went away (a `| head` that had its lines): then
/// [`output_line`] drops the lines that follow.
static STDOUT_READER_GONE: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// A command's result that could not be written to stdout (a full disk
/// behind `>`).
#[derive(Debug, thiserror::Error)]
#[error("writing the output to stdout")]
pub struct OutputError(#[source] pub std::io::Error);

/// Writes `line` and a newline to stdout for a command whose stdout is its
/// result (a table, a score, a report), blocking as `println!` does. A
/// reader that went away (`worker models | head -3`) ends the output
/// quietly: this line and the later ones are dropped, as for a tool that
/// SIGPIPE stopped, and the command goes on to its normal end. Any other
/// failure is returned, so that a result that could not be written (a full
/// disk behind `>`) is never taken for one that was. (`println!` panics in
/// both cases.)
pub fn output_line(line: &str) -> Result<(), OutputError> {
    if STDOUT_READER_GONE.load(Ordering::Relaxed) {
        return Ok(());
    }
    let mut bytes = Vec::with_capacity(line.len() + 1);
    bytes.extend_from_slice(line.as_bytes());
    bytes.push(b'\n');
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(&bytes).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            STDOUT_READER_GONE.store(true, Ordering::Relaxed);
            Ok(())
        }
        written => written.map_err(OutputError),
    }
}

/// `println!` for a command's result (`worker models`, `coordinator
/// report`): [`output_line`] of the formatted line, its [`OutputError`] the
/// calling function's error (`?`).
#[macro_export]
macro_rules! output {
    ($($arg:tt)*) => {
        $crate::output_line(&format!($($arg)*))?
    };
}

/// The message of a panic (its payload, when it is a string).
pub fn panic_message<'a>(info: &'a std::panic::PanicHookInfo<'_>) -> &'a str {
    let payload = info.payload();
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("Box<dyn Any>")
}

/// A line of a JSON log: the fields of tracing-subscriber's JSON events that
/// [`error_line`] writes and [`error_reported_by`] reads (others ignored).
#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JsonLogLine {
    /// RFC 3339, UTC.
    pub timestamp: String,
    /// `ERROR`, `WARN`, `INFO`, `DEBUG` or `TRACE`.
    pub level: String,
    /// The event's fields.
    pub fields: JsonLogFields,
    /// Where it came from (a module path).
    pub target: String,
}

/// The fields of a [`JsonLogLine`].
#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JsonLogFields {
    /// The event's message.
    #[serde(default)]
    pub message: String,
    /// The stack of a panic's line ([`panic_error_line`]), when
    /// `RUST_BACKTRACE` asked for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backtrace: Option<String>,
}

/// The target of the lines [`error_line`] writes.
pub const ERROR_LINE_TARGET: &str = "error";

/// An error and its causes on one line, as anyhow's `{:#}` writes them
/// (`outer: inner: …`), without a cause whose text the line already holds:
/// an error type that shows its source in its own message and also chains
/// it (`#[error("{path}: {source}")]`, here or in a dependency) would
/// otherwise say it twice.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(next) = cause {
        let said = next.to_string();
        if !line.contains(&said) {
            line.push_str(": ");
            line.push_str(&said);
        }
        cause = next.source();
    }
    line
}

/// The line that says a process failed, or that a thread panicked, in the
/// format of [`FORMAT_ENV`]: `error: {message}` as text; as JSON, one event
/// at `ERROR` whose target is [`ERROR_LINE_TARGET`], with the message whole
/// (its line breaks escaped).
pub fn error_line(message: &str) -> String {
    error_line_in(format_from_env(), message)
}

/// [`error_line`] in `format`.
fn error_line_in(format: LogFormat, message: &str) -> String {
    match format {
        LogFormat::Text => format!("error: {message}"),
        LogFormat::Json => json_event("ERROR", ERROR_LINE_TARGET, message),
    }
}

/// A warning of this process that is not a tracing event, in the format of
/// [`FORMAT_ENV`]: `warning: {message}` as text; as JSON, an event at
/// `WARN` whose target is [`WARNING_LINE_TARGET`].
pub fn warning_line(message: &str) -> String {
    match format_from_env() {
        LogFormat::Text => format!("warning: {message}"),
        LogFormat::Json => json_event("WARN", WARNING_LINE_TARGET, message),
    }
}

/// The target of the lines [`warning_line`] writes.
pub const WARNING_LINE_TARGET: &str = "warning";

/// The target of the lines [`relayed_line`] wraps.
pub const RELAYED_LINE_TARGET: &str = "relayed";

/// A line another process wrote (a rank's stdout or stderr), as an agent
/// passes it on in the format of [`FORMAT_ENV`]: unchanged as text, and in
/// a JSON log unchanged when it is a JSON object already (the rank's own
/// events), else wrapped in an event at `INFO` whose target is
/// [`RELAYED_LINE_TARGET`] and whose message is the line (what NCCL,
/// CUDA or libtorch print themselves).
pub fn relayed_line(line: &str) -> std::borrow::Cow<'_, str> {
    relayed_line_in(format_from_env(), line)
}

/// [`relayed_line`] in `format`.
fn relayed_line_in(format: LogFormat, line: &str) -> std::borrow::Cow<'_, str> {
    let is_object =
        || serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(line).is_ok();
    match format {
        LogFormat::Json if !is_object() => json_event("INFO", RELAYED_LINE_TARGET, line).into(),
        _ => line.into(),
    }
}

/// One event as tracing-subscriber's JSON format writes it.
fn json_event(level: &str, target: &str, message: &str) -> String {
    json_event_with_backtrace(level, target, message, None)
}

/// [`json_event`] with a `backtrace` field when one is given.
fn json_event_with_backtrace(
    level: &str,
    target: &str,
    message: &str,
    backtrace: Option<&str>,
) -> String {
    use tracing_subscriber::fmt::time::FormatTime;
    let mut timestamp = String::new();
    let _ = tracing_subscriber::fmt::time::SystemTime
        .format_time(&mut tracing_subscriber::fmt::format::Writer::new(&mut timestamp));
    let line = JsonLogLine {
        timestamp,
        level: level.into(),
        fields: JsonLogFields {
            message: message.to_string(),
            backtrace: backtrace.map(str::to_string),
        },
        target: target.into(),
    };
    serde_json::to_string(&line).unwrap_or_else(|_| format!("{level} {target}: {message}"))
}

/// The error a line of a process's stderr reports, if it reports one, in
/// either format: an [`error_line`] (its message), or an event at `ERROR`
/// (`{target}: {message}`).
pub fn error_reported_by(line: &str) -> Option<String> {
    let line = line.trim();
    if let Ok(event) = serde_json::from_str::<JsonLogLine>(line) {
        return match (event.level.as_str(), event.target.as_str()) {
            ("ERROR", ERROR_LINE_TARGET) => Some(event.fields.message),
            ("ERROR", target) => Some(format!("{target}: {}", event.fields.message)),
            _ => None,
        };
    }
    if let Some(what) = line.strip_prefix("error: ") {
        return Some(what.to_string());
    }
    let (_, after) = line.split_once(" ERROR ")?;
    Some(after.trim().to_string())
}

/// The panic hooks' report of `info` through [`stderr_line`]: as Rust's own
/// ([`panic_report`]) in a text log, one [`panic_error_line`] in a JSON log.
fn report_panic(format: LogFormat, info: &std::panic::PanicHookInfo<'_>) {
    match format {
        LogFormat::Text => stderr_line(&panic_report(info)),
        LogFormat::Json => stderr_line(&panic_error_line_in(LogFormat::Json, info)),
    }
}

/// What Rust's default panic hook would print for `info`: the thread, the
/// place, the message, and a backtrace when `RUST_BACKTRACE` asks for one.
fn panic_report(info: &std::panic::PanicHookInfo<'_>) -> String {
    let thread = std::thread::current();
    let name = thread.name().unwrap_or("<unnamed>");
    let message = panic_message(info);
    let place = info.location().map(|l| format!(" at {l}")).unwrap_or_default();
    let tail = match requested_backtrace() {
        Some(backtrace) => format!("stack backtrace:\n{backtrace}"),
        None => "note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace"
            .to_string(),
    };
    format!("thread '{name}' panicked{place}:\n{message}\n{tail}")
}

/// This thread's stack, when `RUST_BACKTRACE` asks for it (set, and not
/// `0`, as Rust's default hook reads it; `full` for every frame's detail).
fn requested_backtrace() -> Option<String> {
    let style = std::env::var_os("RUST_BACKTRACE").filter(|v| v != "0")?;
    let backtrace = std::backtrace::Backtrace::force_capture();
    Some(match style == "full" {
        true => format!("{backtrace:#}"),
        false => format!("{backtrace}"),
    })
}

/// Where and why a thread panicked, on one line: `thread '{thread}'
/// panicked at {place}: {message}`, the message's line breaks as spaces.
pub fn panic_summary(thread: &str, place: Option<&str>, message: &str) -> String {
    let place = place.map(|p| format!(" at {p}")).unwrap_or_default();
    format!("thread '{thread}' panicked{place}: {}", message.replace('\n', " "))
}

/// The line that reports the panic `info` of the calling thread, in the
/// format of [`FORMAT_ENV`]: an [`error_line`] of its [`panic_summary`]
/// (what an agent relays as a rank's last error), which in a JSON log
/// carries the stack in its `backtrace` field when `RUST_BACKTRACE` asks
/// for one. Text needs Rust's own report after it for the stack.
pub fn panic_error_line(info: &std::panic::PanicHookInfo<'_>) -> String {
    panic_error_line_in(format_from_env(), info)
}

/// [`panic_error_line`] in `format`.
fn panic_error_line_in(format: LogFormat, info: &std::panic::PanicHookInfo<'_>) -> String {
    let place = info.location().map(|l| format!("{}:{}", l.file(), l.line()));
    let thread = std::thread::current();
    let summary =
        panic_summary(thread.name().unwrap_or("<unnamed>"), place.as_deref(), panic_message(info));
    match format {
        LogFormat::Text => error_line_in(LogFormat::Text, &summary),
        LogFormat::Json => json_event_with_backtrace(
            "ERROR",
            ERROR_LINE_TARGET,
            &summary,
            requested_backtrace().as_deref(),
        ),
    }
}

/// How long dropping a [`NonBlockingOutput`] waits for its buffered lines
/// of stderr.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(1);

/// How long dropping a [`NonBlockingOutput`] waits for its buffered lines
/// of stdout: a process's last lines say how it ended (a coordinator's
/// `sweep over`), and a slow reader (`| tee` to a network file system)
/// gets longer for them.
pub const STDOUT_DRAIN_DEADLINE: Duration = Duration::from_secs(5);

/// One stream written through a buffer and a writer thread.
struct NonBlockingStream {
    writer: CountingWriter,
    guard: Option<WorkerGuard>,
    dropped: ErrorCounter,
    /// Lines the writer thread has written.
    written: Arc<AtomicUsize>,
}

impl NonBlockingStream {
    fn start(stream: Stream) -> NonBlockingStream {
        let written = Arc::new(AtomicUsize::new(0));
        let name = match stream {
            Stream::Stdout => "stdout-writer",
            Stream::Stderr => "stderr-writer",
        };
        let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
            .lossy(true)
            .buffered_lines_limit(BUFFERED_LINES)
            .thread_name(name)
            .finish(CountingStream { stream, written: Arc::clone(&written) });
        let dropped = writer.error_counter();
        let writer = CountingWriter { inner: writer, sent: Arc::new(AtomicUsize::new(0)) };
        NonBlockingStream { writer, guard: Some(guard), dropped, written }
    }

    /// Whether every line handed over so far is written or dropped.
    fn drained(&self) -> bool {
        let handled = self.written.load(Ordering::SeqCst) + self.dropped.dropped_lines();
        handled >= self.writer.sent.load(Ordering::SeqCst)
    }
}

/// The non-blocking stdout and stderr of [`init_non_blocking`]: when
/// dropped, it waits up to [`DRAIN_DEADLINE`] for the lines handed to
/// stderr and [`STDOUT_DRAIN_DEADLINE`] for stdout's to be written (or
/// dropped), then leaves the rest: a reader that stalled gets no more time.
/// Each stream keeps its lines' order; the two streams have a writer thread
/// each, so a line of one and a line of the other written at nearly the
/// same time may reach a terminal they share in either order.
#[must_use = "dropping it ends the writing of buffered lines"]
pub struct NonBlockingOutput {
    stdout: NonBlockingStream,
    stderr: NonBlockingStream,
}

impl NonBlockingOutput {
    /// Lines of stderr dropped so far because its buffer was full.
    pub fn dropped_stderr_lines(&self) -> usize {
        self.stderr.dropped.dropped_lines()
    }

    /// Lines of stdout dropped so far because its buffer was full.
    pub fn dropped_stdout_lines(&self) -> usize {
        self.stdout.dropped.dropped_lines()
    }

    /// Whether every line handed over so far is written or dropped.
    #[cfg(test)]
    fn drained(&self) -> bool {
        self.stdout.drained() && self.stderr.drained()
    }
}

impl Drop for NonBlockingOutput {
    fn drop(&mut self) {
        let started = Instant::now();
        loop {
            let waited = started.elapsed();
            let stdout_done = self.stdout.drained() || waited >= STDOUT_DRAIN_DEADLINE;
            let stderr_done = self.stderr.drained() || waited >= DRAIN_DEADLINE;
            if stdout_done && stderr_done {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        // Not dropped: a guard's drop waits again, and when the buffer is
        // full it prints to stdout, which may be stalled too. The writer
        // threads end with the process.
        for stream in [&mut self.stdout, &mut self.stderr] {
            if let Some(guard) = stream.guard.take() {
                std::mem::forget(guard);
            }
        }
    }
}

impl std::fmt::Debug for NonBlockingOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NonBlockingOutput")
            .field("dropped_stdout_lines", &self.dropped_stdout_lines())
            .field("dropped_stderr_lines", &self.dropped_stderr_lines())
            .finish()
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

#[cfg(test)]
mod tests {
    use super::*;
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    use std::process::{Command, Stdio};

    /// An error that shows its cause in its message and chains it too.
    #[derive(Debug)]
    struct Shows(std::io::Error);

    impl std::fmt::Display for Shows {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "data/train: {}", self.0)
        }
    }

    impl std::error::Error for Shows {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    /// An error that chains its cause without showing it.
    #[derive(Debug)]
    struct Chains(Shows);

    impl std::fmt::Display for Chains {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("loading the training set")
        }
    }

    impl std::error::Error for Chains {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn an_error_chain_says_each_cause_once() {
        let missing = || std::io::Error::from(std::io::ErrorKind::NotFound);
        let cause = missing().to_string();
        let line = error_chain(&Chains(Shows(missing())));
        assert_eq!(line, format!("loading the training set: data/train: {cause}"));
        assert_eq!(line.matches(&cause).count(), 1, "{line}");
        assert_eq!(error_chain(&missing()), cause);
    }

    /// Set in the copy of this test binary that
    /// [`a_panic_is_reported_through_the_non_blocking_stderr_and_waits_on_nothing`]
    /// starts: that copy panics instead.
    const PANICKING_CHILD: &str = "RSB_LOGGING_TEST_PANICKING_CHILD";
    const PANIC_TEST: &str =
        "tests::a_panic_is_reported_through_the_non_blocking_stderr_and_waits_on_nothing";

    /// This test binary again, running only `test` as the panicking child
    /// in `role`.
    fn child_running(test: &str, role: &str) -> Command {
        let mut child = Command::new(std::env::current_exe().expect("the test binary"));
        child
            .args([test, "--exact", "--nocapture", "--test-threads", "1"])
            .env(PANICKING_CHILD, role)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        child
    }

    /// The panic test's child; `stderr_read`: whether the child may wait for
    /// its report to be written before it ends.
    fn panicking_child(stderr_read: bool) -> Command {
        let mut child = child_running(PANIC_TEST, if stderr_read { "read" } else { "stalled" });
        child.env_remove("RUST_BACKTRACE").env_remove("RUST_LIB_BACKTRACE");
        child
    }

    /// Waits for `child` at most `limit`; kills it after.
    fn exited_within(child: &mut std::process::Child, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if child.try_wait().expect("wait").is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    #[test]
    fn error_lines_are_written_and_read_in_either_format() {
        for format in [LogFormat::Text, LogFormat::Json] {
            let line = error_line_in(format, "rank 1: boom\nsecond line");
            assert!(!line.contains('\n') || format == LogFormat::Text, "{line}");
            assert_eq!(
                error_reported_by(&line).as_deref(),
                Some("rank 1: boom\nsecond line"),
                "{line}"
            );
        }
        let json = error_line_in(LogFormat::Json, "boom");
        let event: JsonLogLine = serde_json::from_str(&json).unwrap();
        assert_eq!((event.level.as_str(), event.target.as_str()), ("ERROR", ERROR_LINE_TARGET));
        assert!(event.timestamp.ends_with('Z') && event.timestamp.len() > 20, "{json}");
        // Events as tracing-subscriber writes them.
        let traced = "2026-01-01T00:00:00.000Z ERROR rsb_collective::nccl: rank 0: aborted";
        assert_eq!(
            error_reported_by(traced).as_deref(),
            Some("rsb_collective::nccl: rank 0: aborted")
        );
        assert_eq!(error_reported_by("2026-01-01T00:00:00.000Z  INFO training"), None);
        let traced = r#"{"timestamp":"2026-01-01T00:00:00.000000Z","level":"ERROR","fields":{"message":"rank 0: aborted","rank":0},"target":"rsb_collective::nccl"}"#;
        assert_eq!(
            error_reported_by(traced).as_deref(),
            Some("rsb_collective::nccl: rank 0: aborted")
        );
        let info = r#"{"timestamp":"2026-01-01T00:00:00.000000Z","level":"INFO","fields":{"message":"training"},"target":"rsb_train"}"#;
        assert_eq!(error_reported_by(info), None);
        assert_eq!(error_reported_by("{not json"), None);
        // A line that only starts like JSON is read as text.
        assert_eq!(
            error_reported_by("{x} ERROR rsb_train: boom").as_deref(),
            Some("rsb_train: boom")
        );
    }

    #[test]
    fn relayed_lines_stay_as_they_are_unless_a_json_log_needs_them_wrapped() {
        let event = r#"{"timestamp":"2026-01-01T00:00:00.000000Z","level":"INFO","fields":{"message":"training"},"target":"rsb_train"}"#;
        let nccl = "host:1:1 [0] NCCL INFO Bootstrap: Using eth0";
        for line in [event, nccl] {
            assert_eq!(relayed_line_in(LogFormat::Text, line), line);
        }
        assert_eq!(relayed_line_in(LogFormat::Json, event), event);
        let wrapped: JsonLogLine =
            serde_json::from_str(&relayed_line_in(LogFormat::Json, nccl)).unwrap();
        assert_eq!(
            (wrapped.level.as_str(), wrapped.target.as_str(), wrapped.fields.message.as_str()),
            ("INFO", RELAYED_LINE_TARGET, nccl)
        );
    }

    const JSON_PANIC_TEST: &str =
        "tests::a_panic_in_a_json_log_is_one_json_line_with_its_stack_when_asked";

    #[test]
    fn a_panic_in_a_json_log_is_one_json_line_with_its_stack_when_asked() {
        if std::env::var_os(PANICKING_CHILD).is_some() {
            init(LogFormat::Json);
            panic!("the child panics as asked\non two lines");
        }
        for asked in [false, true] {
            let mut child = child_running(JSON_PANIC_TEST, "json");
            child.env_remove(FORMAT_ENV).env_remove("RUST_LIB_BACKTRACE");
            match asked {
                true => child.env("RUST_BACKTRACE", "1"),
                false => child.env_remove("RUST_BACKTRACE"),
            };
            let out = child.output().expect("the child");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(101), "{stderr}");
            let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
            assert_eq!(lines.len(), 1, "{stderr}");
            let event: JsonLogLine = serde_json::from_str(lines[0]).expect("a JSON line");
            assert_eq!((event.level.as_str(), event.target.as_str()), ("ERROR", ERROR_LINE_TARGET));
            let summary = &event.fields.message;
            assert!(
                summary.starts_with(&format!(
                    "thread '{JSON_PANIC_TEST}' panicked at crates/logging/src/lib.rs:"
                )) && summary.ends_with(": the child panics as asked on two lines"),
                "{stderr}"
            );
            // The stack, frames named, only when asked for.
            let test_function = JSON_PANIC_TEST.trim_start_matches("tests::");
            match (&event.fields.backtrace, asked) {
                (None, false) => {}
                (Some(stack), true) if stack.contains(test_function) => {}
                (stack, _) => panic!("asked: {asked}, stack: {stack:?}"),
            }
        }
    }

    #[test]
    fn a_panic_summary_is_one_line_that_an_agent_reads_as_the_error() {
        let summary = panic_summary("main", Some("worker/src/join.rs:7"), "first\nsecond");
        assert_eq!(summary, "thread 'main' panicked at worker/src/join.rs:7: first second");
        for format in [LogFormat::Text, LogFormat::Json] {
            let line = error_line_in(format, &summary);
            assert_eq!(error_reported_by(&line).as_deref(), Some(summary.as_str()), "{line}");
        }
        assert_eq!(panic_summary("loader-0", None, "boom"), "thread 'loader-0' panicked: boom");
    }

    #[test]
    fn a_panic_is_reported_through_the_non_blocking_stderr_and_waits_on_nothing() {
        if let Some(role) = std::env::var_os(PANICKING_CHILD) {
            let output = init_non_blocking(LogFormat::Text);
            let panicked =
                std::panic::catch_unwind(|| panic!("the child panics as asked ({})", 6 * 7))
                    .expect_err("the child panicked");
            // Read: the report gets all the time a loaded machine may need
            // (the exit's own wait is 1 s).
            let deadline = Instant::now() + Duration::from_secs(20);
            while role == "read" && !output.drained() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            std::panic::resume_unwind(panicked);
        }
        // Read: the report is Rust's, written by the writer thread.
        let read = panicking_child(true).stderr(Stdio::piped()).output().expect("the child");
        let stderr = String::from_utf8_lossy(&read.stderr);
        assert_eq!(read.status.code(), Some(101), "the child's test failed: {stderr}");
        assert!(
            stderr
                .contains(&format!("thread '{PANIC_TEST}' panicked at crates/logging/src/lib.rs:"))
                && stderr.contains(
                    ":\nthe child panics as asked (42)\nnote: run with `RUST_BACKTRACE=1`"
                ),
            "{stderr}"
        );
        // Never read, and full before the child starts: Rust's own report
        // would wait on it for ever.
        let (_unread, written) = nix::unistd::pipe2(OFlag::O_CLOEXEC).expect("pipe");
        fcntl(&written, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).expect("non-blocking");
        loop {
            match nix::unistd::write(&written, &[b'.'; 512]) {
                Ok(_) => {}
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(e) => panic!("filling the pipe: {e}"),
            }
        }
        fcntl(&written, FcntlArg::F_SETFL(OFlag::empty())).expect("blocking again");
        let mut stalled =
            panicking_child(false).stderr(Stdio::from(written)).spawn().expect("the child");
        assert!(
            exited_within(&mut stalled, Duration::from_secs(30)),
            "the child waited on its full stderr for 30 s after its panic"
        );
    }

    #[test]
    fn the_non_blocking_streams_count_their_lines_and_drain_them() {
        let output = init_non_blocking(LogFormat::Text);
        for i in 0..3 {
            stderr_line(&format!("a line relayed by the test ({i})"));
        }
        tracing::info!("a log line of the test");
        stdout_line("a line the test prints");
        assert_eq!(output.stderr.writer.sent.load(Ordering::SeqCst), 4, "stderr lines");
        assert_eq!(output.stdout.writer.sent.load(Ordering::SeqCst), 1, "stdout lines");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !output.drained() {
            assert!(Instant::now() < deadline, "the lines were never written");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(output.stderr.written.load(Ordering::SeqCst), 4);
        assert_eq!(output.stdout.written.load(Ordering::SeqCst), 1);
        assert_eq!((output.dropped_stderr_lines(), output.dropped_stdout_lines()), (0, 0));
        assert_eq!(format_from_env(), LogFormat::Text);
    }
}
