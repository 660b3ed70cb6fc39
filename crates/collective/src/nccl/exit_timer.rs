//! The process's exit timer for NCCL failures: the thread that ends the
//! process [`EXIT_GRACE`](super::EXIT_GRACE) after the first failure, in
//! case the rank cannot end by itself (its thread blocked on the aborted
//! collective's stream, `ncclCommAbort` not returning).
//!
//! The thread is started before the first communicator is made, not when a
//! failure comes: a process that cannot start a thread then gets an error
//! it can report while it still works, and a failure never finds the
//! process without a timer. Should one find no timer all the same, the
//! process ends at once.

use std::sync::mpsc::{channel, Sender};
use std::sync::Mutex;
use std::time::Duration;

/// Why the process ends, and with which exit status.
type LastWords = (String, i32);

/// How a timer ends the process, given why and the exit status (a test
/// records the call instead).
type End = Box<dyn FnOnce(LastWords) + Send>;

/// The process's timer, once started: arming it sends why.
static TIMER: Mutex<Option<Sender<LastWords>>> = Mutex::new(None);

/// Starts the process's exit timer, if it is not running yet.
pub(crate) fn start() -> std::io::Result<()> {
    let mut timer = TIMER.lock().unwrap_or_else(|p| p.into_inner());
    if timer.is_none() {
        *timer = Some(spawn("nccl-exit", super::EXIT_GRACE, Box::new(end_process))?);
    }
    Ok(())
}

/// Arms the process's exit timer with `why` (printed when the process
/// ends) and the exit `status` it ends with, then logs it; with no timer
/// running, ends the process at once.
/// The timer is armed first: the log line goes to a file and to stderr,
/// either of which may block.
pub(crate) fn arm(why: &str, status: i32) {
    let timer = TIMER.lock().unwrap_or_else(|p| p.into_inner()).clone();
    arm_or_end(timer.as_ref(), (why.to_string(), status), Box::new(end_process));
    tracing::error!("{why}");
}

/// A timer thread called `name` that waits to be armed, then waits `grace`
/// and calls `end` with why it was armed.
fn spawn(name: &str, grace: Duration, end: End) -> std::io::Result<Sender<LastWords>> {
    let (arm, armed) = channel::<LastWords>();
    std::thread::Builder::new().name(name.into()).spawn(move || {
        // Every sender gone (a test's timer dropped): nothing to do.
        if let Ok(last_words) = armed.recv() {
            std::thread::sleep(grace);
            end(last_words);
        }
    })?;
    Ok(arm)
}

/// Arms `timer` with `why`; without a timer (or with one whose thread is
/// gone), calls `end` at once.
fn arm_or_end(timer: Option<&Sender<LastWords>>, last_words: LastWords, end: End) {
    let unsent = match timer {
        Some(timer) => timer.send(last_words).err().map(|unsent| unsent.0),
        None => Some(last_words),
    };
    if let Some((why, status)) = unsent {
        end((format!("{why} (no NCCL exit timer running: ending at once)"), status));
    }
}

/// How long the process's last words may wait for stderr to take them.
const LAST_WORDS_WAIT_MS: libc::c_int = 100;

/// Ends the process with exit `status`, saying why on stderr if it takes
/// the line within [`LAST_WORDS_WAIT_MS`], with `_exit`:
/// `std::process::exit` would run the atexit handlers (CUDA's and NCCL's
/// among them), which can block for ever on the stream the aborted
/// collective hangs on. The line is written to file descriptor 2 directly:
/// std's stderr takes a lock that a thread stuck writing to a stalled
/// stderr holds, and nothing here may wait for ever.
fn end_process((why, status): LastWords) {
    let line = format!("{}\n", rsb_logging::error_line(&why));
    let mut stderr = libc::pollfd { fd: 2, events: libc::POLLOUT, revents: 0 };
    // SAFETY: `stderr` is one valid pollfd for the call.
    let ready = unsafe { libc::poll(&mut stderr, 1, LAST_WORDS_WAIT_MS) };
    if ready == 1 && stderr.revents & libc::POLLOUT != 0 {
        // SAFETY: the pointer and length are the line's; a failed or short
        // write is of no consequence (the process ends either way).
        let _ = unsafe { libc::write(2, line.as_ptr().cast(), line.len()) };
    }
    // SAFETY: `_exit` has no preconditions; it ends the process.
    unsafe { libc::_exit(status) };
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::mpsc::Receiver;
    use std::time::Instant;

    /// An `End` that reports its call on the returned receiver.
    fn recorded() -> (End, Receiver<LastWords>) {
        let (tx, rx) = channel();
        (Box::new(move |why| tx.send(why).unwrap()), rx)
    }

    #[test]
    fn an_armed_timer_ends_after_its_grace_and_an_unarmed_one_never() {
        let grace = Duration::from_millis(200);
        let (end, ended) = recorded();
        let timer = spawn("test-exit", grace, end).unwrap();
        assert!(ended.recv_timeout(grace * 2).is_err(), "ended without being armed");
        let armed_at = Instant::now();
        let (unused, _) = recorded();
        arm_or_end(Some(&timer), ("rank 1: all-reduce timed out".into(), 86), unused);
        let last_words = ended.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(armed_at.elapsed() >= grace, "ended before its grace");
        assert_eq!(last_words, ("rank 1: all-reduce timed out".into(), 86));
    }

    #[test]
    fn without_a_timer_the_process_ends_at_once() {
        let (end, ended) = recorded();
        arm_or_end(None, ("rank 0: broadcast failed".into(), 1), end);
        let (why, status) = ended.try_recv().unwrap();
        assert!(why.starts_with("rank 0: broadcast failed (no NCCL exit timer"), "{why}");
        assert_eq!(status, 1);
        // A timer whose thread is gone is no timer either.
        let (gone, _) = channel::<LastWords>();
        let (end, ended) = recorded();
        arm_or_end(Some(&gone), ("rank 2: reduce failed".into(), 86), end);
        let (why, status) = ended.try_recv().unwrap();
        assert!(why.starts_with("rank 2: reduce failed (no NCCL"), "{why}");
        assert_eq!(status, 86);
    }

    /// This process's threads called `name`.
    fn threads_called(name: &str) -> usize {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
            .filter(|comm| comm.trim_end() == name)
            .count()
    }

    #[test]
    fn the_process_timer_starts_once() {
        start().unwrap();
        start().unwrap();
        // A new thread names itself once it runs: wait for it (a deadline).
        let deadline = Instant::now() + Duration::from_secs(10);
        while threads_called("nccl-exit") == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(threads_called("nccl-exit"), 1);
    }
}
