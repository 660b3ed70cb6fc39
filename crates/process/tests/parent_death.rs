//! A child started through `die_with_parent` stops when its parent dies,
//! also when it is stopped (`SIGSTOP`) at that moment, and only then.
//!
//! Each test runs three processes of this very test binary (started again
//! with `ROLE` set, running only the test that started it): the test
//! itself, a *parent* that starts a *child* through `die_with_parent`, and
//! that child, which listens with `stop_signal` and writes the first stop
//! signal it gets to `outcome` in the test's folder. The test process is a
//! subreaper: an orphaned child is handed to it, and it reaps it.

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use rsb_process::StopSignal;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Which process of a test this one is (unset: the test itself).
const ROLE: &str = "RSB_PROCESS_TEST_ROLE";
/// The test's folder, where the processes leave their files.
const DIR: &str = "RSB_PROCESS_TEST_DIR";
/// The test (its name) that the parent and the child run.
const TEST: &str = "RSB_PROCESS_TEST_NAME";
/// Set: the parent starts the child from a thread that then exits.
const FROM_THREAD: &str = "RSB_PROCESS_TEST_FROM_THREAD";
/// Set: the child waits for the file `go` before it listens.
const WAIT_FOR_GO: &str = "RSB_PROCESS_TEST_WAIT_FOR_GO";

/// Exit status of a child whose parent died.
const PARENT_DIED_EXIT: i32 = 10;

/// Runs this process's role, if it has one (never returns then).
fn play_role() {
    match std::env::var(ROLE).as_deref() {
        Ok("parent") => parent(),
        Ok("child") => child(),
        _ => {}
    }
}

/// This test binary, started again to run only `test` in `role`.
fn this_test(test: &str, role: &str, dir: &Path) -> Command {
    let mut command = Command::new(std::env::current_exe().expect("current_exe"));
    command
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .env(DIR, dir)
        .env(TEST, test)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    command
}

fn dir() -> PathBuf {
    PathBuf::from(std::env::var_os(DIR).expect("RSB_PROCESS_TEST_DIR"))
}

/// Writes `text` to `dir/name` whole (through a rename), so that a reader
/// never sees it half written.
fn publish(dir: &Path, name: &str, text: &str) {
    let part = dir.join(format!("{name}.part"));
    std::fs::write(&part, text).expect("write");
    std::fs::rename(part, dir.join(name)).expect("rename");
}

fn wait_for_file(path: &Path, within: Duration) -> Option<String> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            return Some(text);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The parent: starts the child through `die_with_parent`, writes its pid
/// to `child.pid`, and waits to be killed.
fn parent() -> ! {
    let dir = dir();
    let test = std::env::var(TEST).expect("RSB_PROCESS_TEST_NAME");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let spawn = {
        let dir = dir.clone();
        let handle = runtime.handle().clone();
        move || {
            let _inside = handle.enter();
            let mut command = tokio::process::Command::from(this_test(&test, "child", &dir));
            rsb_process::die_with_parent(&mut command);
            command.spawn().expect("starting the child")
        }
    };
    let child = if std::env::var_os(FROM_THREAD).is_some() {
        // Linux sends the death signal when this thread exits, the parent
        // alive: once the child listens, so that its handler gets it.
        let dir = dir.clone();
        std::thread::spawn(move || {
            let child = spawn();
            wait_for_file(&dir.join("ready"), Duration::from_secs(30));
            child
        })
        .join()
        .expect("the spawning thread")
    } else {
        spawn()
    };
    publish(&dir, "child.pid", &child.id().expect("pid").to_string());
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

/// The child: listens with `stop_signal` (once `go` exists, with
/// `WAIT_FOR_GO`), writes `ready`, then the first stop signal to `outcome`,
/// and exits with [`PARENT_DIED_EXIT`] for its parent's death (1 otherwise);
/// meanwhile it counts the `SIGCONT`s it gets in `conts`.
fn child() -> ! {
    let dir = dir();
    if std::env::var_os(WAIT_FOR_GO).is_some() {
        publish(&dir, "started", "");
        wait_for_file(&dir.join("go"), Duration::from_secs(30));
    }
    // The stop listener's own word on each SIGCONT it let pass, in
    // `listener.log`: the tests wait for it, not for a time.
    let log = std::fs::File::create(dir.join("listener.log")).expect("listener.log");
    tracing_subscriber::fmt()
        .with_writer(std::sync::Mutex::new(log))
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .init();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
    let mut signals = {
        let _inside = runtime.enter();
        rsb_process::stop_signal().expect("stop_signal")
    };
    // Counts the SIGCONTs it gets, in `conts`, for the tests to know that
    // one came.
    let mut conts = {
        let _inside = runtime.enter();
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::from_raw(
            Signal::SIGCONT as i32,
        ))
        .expect("SIGCONT")
    };
    let counted = dir.clone();
    runtime.spawn(async move {
        let mut n = 0;
        while conts.recv().await.is_some() {
            n += 1;
            publish(&counted, "conts", &n.to_string());
        }
    });
    publish(&dir, "ready", "");
    let signal = runtime.block_on(async {
        tokio::select! {
            signal = signals.recv() => Some(signal),
            // Whatever happens, no child outlives its test for long.
            () = tokio::time::sleep(Duration::from_secs(120)) => None,
        }
    });
    let Some(signal) = signal else { std::process::exit(2) };
    publish(&dir, "outcome", &signal.to_string());
    std::process::exit(match signal {
        StopSignal::ParentDied { .. } => PARENT_DIED_EXIT,
        _ => 1,
    })
}

/// A parent and its child, started for `test`.
struct Job {
    dir: tempfile::TempDir,
    parent: std::process::Child,
    child: Pid,
    /// Whether this process has reaped the child (its pid may be reused).
    reaped: bool,
}

impl Job {
    fn start(test: &str, configure: impl FnOnce(&mut Command)) -> Job {
        // Orphans (the child, once its parent is killed) come to this
        // process, which can then reap them.
        nix::sys::prctl::set_child_subreaper(true).expect("PR_SET_CHILD_SUBREAPER");
        let dir = tempfile::tempdir().expect("tempdir");
        let mut command = this_test(test, "parent", dir.path());
        configure(&mut command);
        let parent = command.spawn().expect("starting the parent");
        let pid = wait_for_file(&dir.path().join("child.pid"), Duration::from_secs(30))
            .expect("the parent did not start its child within 30 s");
        let child = Pid::from_raw(pid.trim().parse().expect("pid"));
        Job { dir, parent, child, reaped: false }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn wait_until_ready(&self) {
        assert!(
            wait_for_file(&self.file("ready"), Duration::from_secs(30)).is_some(),
            "the child did not listen within 30 s"
        );
    }

    fn kill_parent(&mut self) {
        self.parent.kill().expect("SIGKILL of the parent");
        self.parent.wait().expect("reaping the parent");
    }

    /// The child's exit status, once this process reaps it (its parent
    /// dead), within `within`.
    fn child_exit(&mut self, within: Duration) -> Option<WaitStatus> {
        let deadline = Instant::now() + within;
        loop {
            match waitpid(self.child, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(WaitStatus::StillAlive) | Err(_) => return None,
                Ok(status) => {
                    self.reaped =
                        matches!(status, WaitStatus::Exited(..) | WaitStatus::Signaled(..));
                    return Some(status);
                }
            }
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = kill(self.child, Signal::SIGKILL);
        }
        let _ = self.parent.kill();
        let _ = self.parent.wait();
        if !self.reaped {
            // Handed to this process once its parent is gone (else ECHILD).
            let _ = waitpid(self.child, None);
        }
    }
}

/// The state letter of `pid` in `/proc` (`T`: stopped).
fn state(pid: Pid) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next())
}

fn wait_for_state(pid: Pid, wanted: impl Fn(Option<char>) -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !wanted(state(pid)) {
        assert!(Instant::now() < deadline, "{what}: state {:?}", state(pid));
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A child that is stopped when its parent is killed used to keep the
/// death signal (`SIGTERM`) pending for ever, nobody left to continue it:
/// stopped, handed to init, holding its GPU and ports. Its death signal
/// (`SIGCONT`) now continues it, and it stops as for `SIGTERM`.
#[test]
fn a_stopped_child_stops_when_its_parent_is_killed() {
    play_role();
    let mut job = Job::start("a_stopped_child_stops_when_its_parent_is_killed", |_| {});
    job.wait_until_ready();
    kill(job.child, Signal::SIGSTOP).expect("SIGSTOP");
    wait_for_state(job.child, |s| s == Some('T'), "the child did not stop");
    let parent = job.parent.id();
    job.kill_parent();
    let status = job.child_exit(Duration::from_secs(10));
    let outcome = std::fs::read_to_string(job.file("outcome"));
    assert_eq!(
        status,
        Some(WaitStatus::Exited(job.child, PARENT_DIED_EXIT)),
        "10 s after its parent's SIGKILL the child (state {:?}) has not stopped on its own: \
         outcome {outcome:?}",
        state(job.child),
    );
    assert_eq!(
        outcome.expect("outcome"),
        StopSignal::ParentDied { parent }.to_string(),
        "the child names its parent's death"
    );
}

/// `SIGCONT`s that come while the parent lives (after a debugger's or a
/// scheduler's `SIGSTOP`, and the death signal that Linux sends when the
/// thread that started the child exits) do not stop the child, which still
/// acts on `SIGTERM` afterwards.
#[test]
fn a_sigcont_while_the_parent_lives_changes_nothing() {
    play_role();
    let job = Job::start("a_sigcont_while_the_parent_lives_changes_nothing", |command| {
        command.env(FROM_THREAD, "1");
    });
    job.wait_until_ready();
    // `child.pid` is written once the thread that started the child is
    // gone; the death signal that its exit sends comes just after.
    assert_eq!(
        wait_for_file(&job.file("conts"), Duration::from_secs(10)).as_deref(),
        Some("1"),
        "the exit of the thread that started the child sent it no SIGCONT (outcome {:?})",
        std::fs::read_to_string(job.file("outcome"))
    );
    kill(job.child, Signal::SIGSTOP).expect("SIGSTOP");
    wait_for_state(job.child, |s| s == Some('T'), "the child did not stop");
    kill(job.child, Signal::SIGCONT).expect("SIGCONT");
    wait_for_state(job.child, |s| s.is_some_and(|s| s != 'T'), "the child did not continue");
    // The child's stop listener takes both SIGCONTs (its turn may come late
    // on a loaded machine) and lets them pass: it says so for each, and
    // writes no outcome. The SIGTERM after them is then the first stop
    // signal it acts on (asserted below), which a late stop for a SIGCONT
    // would have come before.
    let deadline = Instant::now() + Duration::from_secs(10);
    let passed = || {
        std::fs::read_to_string(job.file("listener.log"))
            .map_or(0, |log| log.matches("a SIGCONT with the parent alive: not a stop").count())
    };
    while passed() < 2 {
        assert!(
            Instant::now() < deadline,
            "the child's stop listener let {} SIGCONT(s) pass, not 2 (outcome {:?})",
            passed(),
            std::fs::read_to_string(job.file("outcome")).ok()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        std::fs::read_to_string(job.file("outcome")).ok(),
        None,
        "the child stopped while its parent lives"
    );
    assert!(
        state(job.child).is_some_and(|s| s != 'Z'),
        "the child is gone: {:?}",
        state(job.child)
    );
    kill(job.child, Signal::SIGTERM).expect("SIGTERM");
    assert_eq!(
        wait_for_file(&job.file("outcome"), Duration::from_secs(10)).as_deref(),
        Some("SIGTERM"),
        "the child still listens"
    );
}

/// A parent that dies after the child started but before it listened sent
/// its `SIGCONT` to nobody: the child finds it gone when it begins to
/// listen, and stops at once.
#[test]
fn a_child_whose_parent_died_before_it_listened_stops_at_once() {
    play_role();
    let mut job = Job::start("a_child_whose_parent_died_before_it_listened_stops_at_once", |c| {
        c.env(WAIT_FOR_GO, "1");
    });
    assert!(wait_for_file(&job.file("started"), Duration::from_secs(30)).is_some());
    let parent = job.parent.id();
    job.kill_parent();
    publish(job.dir.path(), "go", "");
    let status = job.child_exit(Duration::from_secs(10));
    assert_eq!(
        status,
        Some(WaitStatus::Exited(job.child, PARENT_DIED_EXIT)),
        "outcome {:?}",
        std::fs::read_to_string(job.file("outcome"))
    );
    assert_eq!(
        std::fs::read_to_string(job.file("outcome")).expect("outcome"),
        StopSignal::ParentDied { parent }.to_string()
    );
}
