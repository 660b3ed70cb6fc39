//! An agent whose stderr nobody reads (a stalled log collector, a terminal
//! paused with Ctrl-S, a full pipe) still runs its job to the end: its own
//! log lines and the ranks' lines it relays go through a bounded buffer
//! and a writer thread, and what does not fit is dropped and counted,
//! instead of stopping the threads that answer the coordinator and drain
//! the ranks' pipes.
//!
//! So does a coordinator whose stdout and stderr nobody reads: it prints a
//! line for each update under the job's lock, and a line that waited there
//! would stop every call (its hosts would look silent).
//!
//! The agent's stdout and stderr are one pipe of one page that the test
//! fills before the agent starts and never reads, and it logs at `debug`:
//! any write that waits on it waits for ever. (With the agent's writes made
//! blocking again, by hand, the agent never exits and the test fails.)

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use rsb_integration_tests::processes::wait_with_timeout;
use rsb_integration_tests::sweeps::{self, TOKEN};
use rsb_integration_tests::{
    binary, fashion_subset, free_port, records_in, tiny_recipe, workspace_root,
};
use std::os::fd::OwnedFd;
use std::process::{Command, Stdio};
use std::time::Duration;

/// What a stalled process's pipe holds: one page.
const PIPE_BYTES: usize = 4096;

/// A pipe of [`PIPE_BYTES`], full: its read end (to keep open, unread) and
/// its write end, on which any blocking write waits for ever.
fn full_pipe() -> (OwnedFd, OwnedFd) {
    let (unread, written) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
    let capacity = fcntl(&written, FcntlArg::F_SETPIPE_SZ(PIPE_BYTES as i32)).unwrap() as usize;
    assert!(capacity >= PIPE_BYTES, "the pipe holds {capacity} bytes");
    fcntl(&written, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).unwrap();
    let mut filled = 0;
    loop {
        match nix::unistd::write(&written, &[b'.'; 512]) {
            Ok(n) => filled += n,
            Err(nix::errno::Errno::EAGAIN) => break,
            Err(e) => panic!("filling the pipe: {e}"),
        }
    }
    assert_eq!(filled, capacity, "the pipe is not full");
    fcntl(&written, FcntlArg::F_SETFL(OFlag::empty())).unwrap();
    (unread, written)
}

/// The run's settings: the tiny recipe on `data`, a log line every update.
fn settings(data: &std::path::Path) -> Vec<String> {
    vec![
        format!("data.root={}", data.display()),
        "model.num_classes=10".to_string(),
        "schedule.cosine.epochs=3".to_string(),
        "eval.every_epochs=1000".to_string(),
        "runtime.log_every_steps=1".to_string(),
    ]
}

#[test]
fn an_agent_whose_stderr_nobody_reads_still_runs_its_job_to_the_end() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fashion_subset(tmp.path(), 8, 2);
    let out = tmp.path().join("run");
    let sets = settings(&data);
    let port = free_port("127.0.0.1");
    let listen = format!("127.0.0.1:{port}");
    let log = tmp.path().join("coordinator.log");
    let coordinator = sweeps::coordinator_up(
        &out,
        &sets,
        &["--listen", &listen, "--nodes", "1", "--heartbeat-timeout-secs", "10"],
        &log,
    );

    // Full before the agent starts: its first write to stdout or stderr
    // would wait for ever.
    let (unread, written) = full_pipe();
    let agent = Command::new(binary("worker"))
        .args(["join", "--coordinator", &format!("http://127.0.0.1:{port}")])
        .args(["--devices", "cpu", "--cores", "1", "--host-name", "stalled"])
        .env("RSB_JOB_TOKEN", TOKEN)
        // Many lines: the agent's own and its rank's (which inherits it).
        .env("RUST_LOG", "debug")
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .stdout(Stdio::from(written.try_clone().unwrap()))
        .stderr(Stdio::from(written))
        .spawn()
        .unwrap();

    let finished = wait_with_timeout(coordinator, Duration::from_secs(300), "the job");
    let coordinator_log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(finished.status.success(), "the job failed:\n{coordinator_log}");
    let steps = records_in(&out.join("metrics.jsonl"), "step");
    let last = steps.last().expect("no step record");
    assert_eq!(last["step"], last["total_updates"], "the job stopped short");
    let agent = wait_with_timeout(agent, Duration::from_secs(60), "the agent's exit");
    assert!(agent.status.success(), "the agent failed: {:?}", agent.status);

    // Kept open until here: with no reader, writes would fail at once
    // instead of waiting.
    drop(unread);
}

#[test]
fn a_coordinator_whose_output_nobody_reads_still_runs_its_job_to_the_end() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fashion_subset(tmp.path(), 8, 2);
    let out = tmp.path().join("run");
    let port = free_port("127.0.0.1");
    // Full before the coordinator starts: its first line (the job token's
    // file, then a line per update and per generation, printed under the
    // job's lock) would wait for ever, and with it every call.
    let (unread, written) = full_pipe();
    let mut up = Command::new(binary("coordinator"));
    up.args(["up", "--recipe"]).arg(tiny_recipe()).arg("--out").arg(&out);
    for set in settings(&data) {
        up.args(["--set", &set]);
    }
    let coordinator = up
        .args(["--listen", &format!("127.0.0.1:{port}"), "--nodes", "1"])
        .args(["--heartbeat-timeout-secs", "10"])
        .env("RSB_JOB_TOKEN", TOKEN)
        .env("RUST_LOG", "debug")
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .stdout(Stdio::from(written.try_clone().unwrap()))
        .stderr(Stdio::from(written))
        .spawn()
        .unwrap();
    let agent_log = tmp.path().join("agent.log");
    let agent = sweeps::worker_join(port, "reader", &agent_log);

    let finished = wait_with_timeout(coordinator, Duration::from_secs(300), "the job");
    let agent_text = std::fs::read_to_string(&agent_log).unwrap_or_default();
    assert!(finished.status.success(), "the job failed; the agent's log:\n{agent_text}");
    let steps = records_in(&out.join("metrics.jsonl"), "step");
    let last = steps.last().expect("no step record");
    assert_eq!(last["step"], last["total_updates"], "the job stopped short");
    let agent = wait_with_timeout(agent, Duration::from_secs(60), "the agent's exit");
    assert!(agent.status.success(), "the agent failed:\n{agent_text}");
    drop(unread);
}
