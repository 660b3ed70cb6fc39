//! Child processes that never outlive their parent.
//!
//! A job is a tree: `coordinator up --local` starts `worker join` agents and
//! each agent starts one `worker rank` per device. Whatever kills a parent
//! (Ctrl-C, `kill`, `kill -9`, the OOM killer) must not leave the subtree
//! training on its own and heart-beating into the void:
//!
//! * [`die_with_parent`] asks Linux to send the child `SIGCONT` when its
//!   parent dies (`PR_SET_PDEATHSIG`), which covers even `SIGKILL` of the
//!   parent, where no handler runs, and tells the child its parent's pid
//!   ([`PARENT_PID_ENV`]). `SIGCONT`, not `SIGTERM`: a child stopped
//!   (`SIGSTOP`, a debugger) when its parent dies keeps a `SIGTERM` pending
//!   until something continues it, and with its parent gone nothing would;
//!   `SIGCONT` continues it, and the child's [`StopSignals`] then finds its
//!   parent gone and stops it as `SIGTERM` would;
//! * [`stop_signal`] resolves on `SIGINT`, on `SIGTERM`, or, in a child
//!   started through [`die_with_parent`], on its parent's death (also one
//!   that came before it listened), so that a parent can stop its children
//!   in order and say why;
//! * [`forget_inherited_parent`] keeps a process of ours started otherwise
//!   (with the variable inherited) from taking another for its parent;
//! * [`terminate`] stops children: `SIGTERM`, a grace period, then `SIGKILL`;
//! * [`exit_now`] ends a process that may be stuck, without the exit
//!   handlers that could keep it stuck.
#![warn(missing_docs, clippy::unwrap_used)]

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::time::Duration;
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, SignalKind};

/// The environment variable in which [`die_with_parent`] gives the child its
/// parent's pid, for its [`StopSignals`] to compare with `getppid()`. The
/// child's own children inherit it: one of ours that listens through
/// [`stop_signal`] must be started through [`die_with_parent`] (which sets
/// it anew) or without the variable (`env_remove`), or it would stop at once,
/// taking its grandparent for a parent that died.
pub const PARENT_PID_ENV: &str = "RSB_PARENT_PID";

/// The parent-death signal that [`die_with_parent`] arms. Only `SIGKILL` and
/// `SIGCONT` wake a stopped process, and `SIGKILL` would leave the child no
/// graceful stop; a running child ignores `SIGCONT` unless it listens
/// ([`stop_signal`]).
const DEATH_SIGNAL: Signal = Signal::SIGCONT;

/// Makes the child started by `command` stop as soon as this process dies,
/// however it dies, also if the child is stopped (`SIGSTOP`) then: Linux
/// sends it `SIGCONT` (`PR_SET_PDEATHSIG`), which continues it, and its
/// [`StopSignals`] resolve with [`StopSignal::ParentDied`] once `getppid()`
/// no longer is this process's pid (given to it in [`PARENT_PID_ENV`]).
/// The child must therefore be one of ours that listens through
/// [`stop_signal`]: any other child merely goes on.
///
/// Linux sends the death signal when the *thread* that forked exits, not
/// only when the process does (the child is then handed to another thread of
/// the same process, and is sent the signal again when the process dies): a
/// `SIGCONT` while `getppid()` is unchanged is not taken for the parent's
/// death, so the child may be spawned from any thread.
pub fn die_with_parent(command: &mut Command) {
    let parent = std::process::id();
    command.env(PARENT_PID_ENV, parent.to_string());
    // SAFETY: the closure runs in the forked child before exec and calls
    // only async-signal-safe functions (prctl, getppid, _exit); it allocates
    // nothing and takes no lock.
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(DEATH_SIGNAL)?;
            // The parent may have died between fork and prctl: then no signal
            // will ever come, and the child has been re-parented already.
            if nix::unistd::getppid().as_raw() as u32 != parent {
                nix::libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// Forgets a [`PARENT_PID_ENV`] that this process merely inherited: one of
/// ours started otherwise than through [`die_with_parent`] (by hand, by a
/// script) from a process that was would take that process for its parent,
/// find it is not, and stop at once. Call first thing in `main`, on the
/// main thread, before any other thread starts: the death signal is armed
/// per thread, on the one that exec'd, and the environment is changed.
/// Without an armed death signal the variable is removed, so that
/// [`stop_signal`] watches no parent.
pub fn forget_inherited_parent() {
    let armed = nix::sys::prctl::get_pdeathsig().ok().flatten().is_some();
    if !armed && std::env::var_os(PARENT_PID_ENV).is_some() {
        std::env::remove_var(PARENT_PID_ENV);
    }
}

/// The parent whose death this process must stop at: the pid in
/// [`PARENT_PID_ENV`], set by [`die_with_parent`]. (Its death signal,
/// which would tell a variable merely inherited from further up, can only
/// be read by the thread that exec'd, not by the one that listens.)
fn watched_parent() -> Option<u32> {
    std::env::var(PARENT_PID_ENV).ok()?.parse().ok()
}

/// Whether `parent` is no longer this process's parent: it died, and this
/// process was handed to init (or to a subreaper).
fn parent_died(parent: u32) -> bool {
    nix::unistd::getppid().as_raw() as u32 != parent
}

/// Which stop signal arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    /// `SIGINT` (Ctrl-C).
    Interrupt,
    /// `SIGTERM` (`kill`, a scheduler's stop).
    Terminate,
    /// The parent (pid `parent`) that started this process through
    /// [`die_with_parent`] died: its death signal (`SIGCONT`) came, or it
    /// was gone already when this process began to listen.
    ParentDied {
        /// The parent's pid.
        parent: u32,
    },
}

impl std::fmt::Display for StopSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopSignal::Interrupt => f.write_str("SIGINT"),
            StopSignal::Terminate => f.write_str("SIGTERM"),
            StopSignal::ParentDied { parent } => {
                write!(f, "the death of its parent process (pid {parent})")
            }
        }
    }
}

/// Listens for `SIGINT` and `SIGTERM` from now on (their default action,
/// dying on the spot, is replaced for this process), and, in a child started
/// through [`die_with_parent`], for `SIGCONT`, its death signal.
#[derive(Debug)]
pub struct StopSignals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    /// The parent to stop with, and `SIGCONT`.
    parent: Option<(u32, tokio::signal::unix::Signal)>,
}

/// Installs the `SIGINT`/`SIGTERM` handlers, and in a child started through
/// [`die_with_parent`] the `SIGCONT` one (a `SIGCONT` still continues a
/// stopped process); call inside a tokio runtime.
pub fn stop_signal() -> std::io::Result<StopSignals> {
    let parent = match watched_parent() {
        Some(pid) => Some((pid, signal(SignalKind::from_raw(DEATH_SIGNAL as i32))?)),
        None => None,
    };
    Ok(StopSignals {
        interrupt: signal(SignalKind::interrupt())?,
        terminate: signal(SignalKind::terminate())?,
        parent,
    })
}

impl StopSignals {
    /// Resolves with the first stop signal received; at once with
    /// [`StopSignal::ParentDied`] once the parent is gone (also if it died
    /// before [`stop_signal`] listened, whose `SIGCONT` found no handler).
    /// A `SIGCONT` while the parent lives (after a debugger's or a
    /// scheduler's `SIGSTOP`, or [`terminate`]'s) changes nothing.
    pub async fn recv(&mut self) -> StopSignal {
        loop {
            let parent_gone = async {
                match &mut self.parent {
                    Some((parent, cont)) => {
                        // No more SIGCONT (the runtime is shutting down):
                        // nothing to check ever again.
                        if !parent_died(*parent) && cont.recv().await.is_none() {
                            std::future::pending::<()>().await;
                        }
                        *parent
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.interrupt.recv() => return StopSignal::Interrupt,
                _ = self.terminate.recv() => return StopSignal::Terminate,
                parent = parent_gone => {
                    if parent_died(parent) {
                        return StopSignal::ParentDied { parent };
                    }
                    tracing::debug!(
                        parent,
                        "a SIGCONT with the parent alive: not a stop (a continue after a \
                         SIGSTOP, or the exit of the thread that started this process)"
                    );
                }
            }
        }
    }
}

/// Stops `children`: `SIGTERM` to each one still running, then `SIGCONT` (a
/// stopped process, `SIGSTOP`ped or a debugger's, acts on its `SIGTERM`
/// handler only once continued), then waits up to `grace` for all of them,
/// then `SIGKILL`s the rest and reaps them.
pub async fn terminate(children: &mut [Child], grace: Duration) {
    terminate_unless_hurried(children, grace, std::future::pending()).await;
}

/// As [`terminate`], but when `hurry` completes first (a second stop signal:
/// the user will not wait for the stop checkpoint) the grace ends there, and
/// the children still running are `SIGKILL`ed at once. Returns whether it
/// was hurried.
pub async fn terminate_unless_hurried(
    children: &mut [Child],
    grace: Duration,
    hurry: impl std::future::Future<Output = ()>,
) -> bool {
    for child in children.iter_mut() {
        if let Some(pid) = child.id() {
            for signal in [Signal::SIGTERM, Signal::SIGCONT] {
                if let Err(e) = kill(Pid::from_raw(pid as i32), signal) {
                    tracing::debug!(pid, error = %e, "{signal}");
                }
            }
        }
    }
    /// How one child's wait ended.
    enum Waited {
        Exited,
        GraceOver,
        Hurried,
    }
    let deadline = tokio::time::Instant::now() + grace;
    let mut hurry = std::pin::pin!(hurry);
    let mut hurried = false;
    let mut running = Vec::new();
    for child in children.iter_mut() {
        let waited = if hurried {
            Waited::Hurried
        } else {
            tokio::select! {
                exited = tokio::time::timeout_at(deadline, child.wait()) => match exited {
                    Ok(_) => Waited::Exited,
                    Err(_) => Waited::GraceOver,
                },
                () = &mut hurry => Waited::Hurried,
            }
        };
        match waited {
            Waited::Exited => {}
            Waited::GraceOver => {
                tracing::warn!(pid = child.id(), "still running {grace:?} after SIGTERM; killing");
                running.push(child);
            }
            Waited::Hurried => {
                if !hurried {
                    tracing::warn!("hurried before the grace of {grace:?} ended: killing at once");
                    hurried = true;
                }
                running.push(child);
            }
        }
    }
    kill_all_within(running, REAP_LIMIT).await;
    hurried
}

/// How long [`kill_all_within`]'s callers wait for SIGKILLed processes to end.
pub const REAP_LIMIT: Duration = Duration::from_secs(10);

/// `SIGKILL`s every one of `children` at once, then waits up to `limit` in
/// all for them to end and be reaped. One that outlives that (stuck in the
/// kernel: a write to a hung network file system, a wedged driver) is left
/// with a warning naming its pid, so that the caller goes on (heartbeats,
/// the next generation) instead of waiting for it for ever. Returns how many
/// were left.
pub async fn kill_all_within<'a>(
    children: impl IntoIterator<Item = &'a mut Child>,
    limit: Duration,
) -> usize {
    let children: Vec<&mut Child> = children.into_iter().collect();
    for child in &children {
        if let Some(pid) = child.id() {
            if let Err(e) = kill(Pid::from_raw(pid as i32), Signal::SIGKILL) {
                tracing::debug!(pid, error = %e, "SIGKILL");
            }
        }
    }
    let deadline = tokio::time::Instant::now() + limit;
    let mut left = 0;
    for child in children {
        if tokio::time::timeout_at(deadline, child.wait()).await.is_err() {
            left += 1;
            tracing::warn!(
                pid = child.id(),
                "still not ended {limit:?} after SIGKILL (stuck in the kernel: a hung file \
                 system or driver); going on without it"
            );
        }
    }
    left
}

/// Ends this process with `code` at once: no atexit handler or static
/// destructor runs (CUDA's and NCCL's can block for ever on a stream that a
/// dead peer hangs), as for a process past its deadline. Nothing is flushed
/// (a flush can block too): say why on stderr first, which is unbuffered.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: `_exit` has no preconditions; it ends the process.
    unsafe { nix::libc::_exit(code) }
}

/// Stops this process (`SIGSTOP` to itself) until something sends it
/// `SIGCONT` or kills it: a frozen process, for the tests of what a job does
/// about one.
pub fn stop_self() {
    let _ = nix::sys::signal::raise(Signal::SIGSTOP);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alive(pid: u32) -> bool {
        // Signal 0 checks existence; a zombie (exited, not reaped) counts as gone.
        kill(Pid::from_raw(pid as i32), None).is_ok()
            && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| s.contains(") Z "))
                .unwrap_or(true)
    }

    #[tokio::test]
    async fn terminate_stops_a_child_at_sigterm_within_the_grace() {
        let child = Command::new("sleep").arg("30").spawn().expect("sleep");
        let pid = child.id().expect("pid");
        let mut children = [child];
        let start = std::time::Instant::now();
        terminate(&mut children, Duration::from_secs(5)).await;
        assert!(start.elapsed() < Duration::from_secs(4), "SIGTERM alone should stop sleep");
        assert!(!alive(pid));
    }

    /// A stopped child with a SIGTERM handler acts on it at once, where it
    /// kept the signal pending until the grace ran out and it was killed
    /// (and a parent killed before then left it stopped for ever).
    #[tokio::test]
    async fn terminate_continues_a_stopped_child_so_that_its_handler_runs() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "trap 'exit 7' TERM; while :; do sleep 0.1; done"]);
        let child = cmd.spawn().expect("sh");
        let pid = child.id().expect("pid");
        tokio::time::sleep(Duration::from_millis(200)).await;
        kill(Pid::from_raw(pid as i32), Signal::SIGSTOP).expect("SIGSTOP");
        let mut children = [child];
        let start = std::time::Instant::now();
        terminate(&mut children, Duration::from_secs(5)).await;
        assert!(start.elapsed() < Duration::from_secs(4), "{:?}", start.elapsed());
        let status = children[0].try_wait().expect("wait").expect("reaped");
        assert_eq!(status.code(), Some(7), "the child's own SIGTERM handler ended it: {status:?}");
    }

    #[tokio::test]
    async fn terminate_kills_a_child_that_ignores_sigterm() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "trap '' TERM; while :; do sleep 0.1; done"]);
        let child = cmd.spawn().expect("sh");
        let pid = child.id().expect("pid");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut children = [child];
        let start = std::time::Instant::now();
        terminate(&mut children, Duration::from_millis(500)).await;
        assert!(start.elapsed() >= Duration::from_millis(500));
        assert!(!alive(pid));
    }

    /// A second stop signal while children take their grace (rank 0
    /// writing its stop checkpoint) kills them at once, where the caller
    /// waited out the whole grace.
    #[tokio::test]
    async fn a_hurried_terminate_kills_the_children_still_running_at_once() {
        let spawn = |script: &str| {
            let mut cmd = Command::new("sh");
            cmd.args(["-c", script]);
            cmd.spawn().expect("sh")
        };
        // One that exits at its SIGTERM, and two that take their time.
        let mut children = [
            spawn("trap 'exit 0' TERM; while :; do sleep 0.1; done"),
            spawn("trap '' TERM; while :; do sleep 0.1; done"),
            spawn("trap '' TERM; while :; do sleep 0.1; done"),
        ];
        let pids: Vec<u32> = children.iter().map(|c| c.id().expect("pid")).collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let start = std::time::Instant::now();
        let hurry = tokio::time::sleep(Duration::from_millis(300));
        let hurried = terminate_unless_hurried(&mut children, Duration::from_secs(60), hurry).await;
        assert!(hurried);
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(10), "{took:?}");
        assert!(pids.iter().all(|&pid| !alive(pid)));
        let status = children[0].try_wait().expect("wait").expect("reaped");
        assert_eq!(status.code(), Some(0), "the first one exited at its SIGTERM: {status:?}");
        // Not hurried: the grace decides, as terminate's.
        let mut quick = [spawn("trap 'exit 0' TERM; while :; do sleep 0.1; done")];
        tokio::time::sleep(Duration::from_millis(200)).await;
        let never = std::future::pending();
        assert!(!terminate_unless_hurried(&mut quick, Duration::from_secs(5), never).await);
    }

    #[tokio::test]
    async fn kill_all_within_ends_and_reaps_stopped_children_at_once() {
        let mut children: Vec<Child> =
            (0..3).map(|_| Command::new("sleep").arg("30").spawn().expect("sleep")).collect();
        let pids: Vec<u32> = children.iter().map(|c| c.id().expect("pid")).collect();
        for &pid in &pids {
            kill(Pid::from_raw(pid as i32), Signal::SIGSTOP).expect("SIGSTOP");
        }
        let start = std::time::Instant::now();
        assert_eq!(kill_all_within(children.iter_mut(), Duration::from_secs(5)).await, 0);
        assert!(start.elapsed() < Duration::from_secs(4));
        assert!(pids.iter().all(|&pid| !alive(pid)));
        // Children already reaped: nothing to wait for.
        assert_eq!(kill_all_within(children.iter_mut(), Duration::from_secs(5)).await, 0);
    }
}
