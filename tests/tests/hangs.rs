//! No hang, ever:
//!
//! * one rank of a 3-rank TCP-ring job is frozen (SIGSTOP) mid-epoch, after
//!   its first step record. Its neighbours wait for it for
//!   `distributed.collective_timeout_secs` (15 s here), then fail with an
//!   error naming the collective call and their silent neighbour; the
//!   coordinator follows these reports to the rank that reported nothing and
//!   fails the job naming it (rank 1), and no process of the job is left
//!   behind;
//! * one rank of a 2-rank job freezes before it publishes its ring address
//!   (its agent still heartbeats): the coordinator fails the job at
//!   `--rendezvous-timeout-secs`, naming the rank and its host, and no
//!   process is left behind;
//! * one rank of a 2-rank job panics: the job fails at once, naming the rank
//!   and the panic's message and place, not only its exit status.

use rsb_integration_tests::processes::{descendants, holder_of, parent_of, signal, Drain};
use rsb_integration_tests::{binary, fashion_subset, workspace_root};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const TIMEOUT_SECS: u64 = 15;

/// `coordinator up --local` of `nodes` workers training the tiny recipe on
/// `data` into `out`, for 500 epochs (it does not end on its own).
fn tiny_job(nodes: u32, data: &Path, out: &Path) -> Command {
    let mut command = Command::new(binary("coordinator"));
    command
        .args(["up", "--local", "--nodes", &nodes.to_string(), "--recipe"])
        .arg(workspace_root().join("recipes/debug/resnet18_tiny_cpu.yaml"))
        .arg("--out")
        .arg(out)
        .args(["--set", &format!("data.root={}", data.display())])
        .args(["--set", "model.num_classes=10", "--set", "schedule.cosine.epochs=500"])
        .current_dir(workspace_root())
        .stdout(Stdio::null());
    command
}

/// Starts `command` with its stderr drained all along: the job's processes
/// share this pipe, and a full pipe would block them.
fn spawn_drained(command: &mut Command) -> (Child, Drain) {
    let mut child = command.stderr(Stdio::piped()).spawn().expect("starting the coordinator");
    let stderr = Drain::start(child.stderr.take());
    (child, stderr)
}

/// Waits up to `limit` for `child` to exit.
fn exit_within(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Kills what is left of `job` (after 30 s for it to go on its own) and
/// returns the processes that were still there.
fn left_behind(job: &[u32]) -> Vec<u32> {
    let cleanup = Instant::now() + Duration::from_secs(30);
    while !job.iter().all(|&pid| parent_of(pid).is_none()) && Instant::now() < cleanup {
        std::thread::sleep(Duration::from_millis(200));
    }
    let left: Vec<u32> = job.iter().copied().filter(|&pid| parent_of(pid).is_some()).collect();
    for &pid in &left {
        let _ = signal(pid, "KILL");
    }
    left
}

/// Waits (up to `limit`) until `ready` holds, failing early if the coordinator exits.
fn wait_until(coordinator: &mut Child, limit: Duration, what: &str, ready: impl Fn() -> bool) {
    let deadline = Instant::now() + limit;
    while !ready() {
        if let Some(status) = coordinator.try_wait().expect("try_wait") {
            panic!("the coordinator exited with {status} before {what}");
        }
        assert!(Instant::now() < deadline, "{what} did not happen within {limit:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Whether a rank's metrics file holds a step record.
fn has_step_record(file: &Path) -> bool {
    std::fs::read_to_string(file).is_ok_and(|text| {
        text.lines().any(|l| {
            serde_json::from_str::<serde_json::Value>(l).is_ok_and(|r| r["kind"] == "step")
        })
    })
}

#[test]
fn a_stopped_rank_makes_the_others_fail_within_the_collective_timeout_naming_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = fashion_subset(tmp.path(), 16, 4);
    let out = tmp.path().join("run");
    let _ = binary("worker");
    let started = Instant::now();
    let (mut coordinator, stderr) = spawn_drained(
        tiny_job(3, &data, &out)
            // Three sampler streams, one per rank.
            .args(["--set", "batch.global_size=24", "--set", "batch.repeated_augmentation=1"])
            .args(["--set", &format!("distributed.collective_timeout_secs={TIMEOUT_SECS}")]),
    );
    let log = |rank: u32| out.join(format!("ranks/rank-{rank}.log"));
    wait_until(&mut coordinator, Duration::from_secs(300), "the 3 ranks' first steps", || {
        (0..3).all(|r| has_step_record(&out.join(format!("ranks/rank-{r}.jsonl"))))
    });
    let job = descendants(coordinator.id());
    let stopped = holder_of(&job, &log(1)).expect("no process holds ranks/rank-1.log open");
    let others: Vec<u32> = [0, 2]
        .iter()
        .map(|&r| holder_of(&job, &log(r)).unwrap_or_else(|| panic!("rank {r} not found")))
        .collect();
    assert!(signal(stopped, "STOP"), "SIGSTOP of rank 1 ({stopped})");
    let frozen_at = Instant::now();
    eprintln!("rank 1 (pid {stopped}) frozen {:?} after the job started", started.elapsed());

    // Timeout plus a generous margin for a loaded machine.
    let limit = Duration::from_secs(TIMEOUT_SECS + 120);
    let status = exit_within(&mut coordinator, limit);
    let failed_after = frozen_at.elapsed();
    eprintln!("the coordinator exited {failed_after:?} after the freeze");
    // Ranks 0 and 2 failed before the job did; they may still be on their
    // way out (their last calls made) as the coordinator exits.
    let gone_by = Instant::now() + Duration::from_secs(10);
    let others_left = loop {
        let left: Vec<u32> =
            others.iter().copied().filter(|&pid| parent_of(pid).is_some()).collect();
        if left.is_empty() || Instant::now() > gone_by {
            break left;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // Clean up before asserting: the frozen rank first, then whatever is left.
    let _ = signal(stopped, "KILL");
    if status.is_none() {
        let _ = coordinator.kill();
    }
    let _ = coordinator.wait();
    let left = left_behind(&job);
    let output = String::from_utf8_lossy(&stderr.read_to_end()).into_owned();

    let status = status.unwrap_or_else(|| {
        panic!("the job had not failed {limit:?} after rank 1 froze:\n{output}")
    });
    assert!(!status.success(), "a job with a frozen rank must fail:\n{output}");
    assert!(
        failed_after >= Duration::from_secs(TIMEOUT_SECS - 1),
        "the job failed {failed_after:?} after the freeze, before the {TIMEOUT_SECS} s timeout:\n{output}"
    );
    assert!(
        others_left.is_empty(),
        "ranks 0 and 2 still run 10 s after the job failed: {others_left:?}\n{output}"
    );
    assert!(left.is_empty(), "processes of the job left behind: {left:?}\n{output}");
    // The job's failure names the frozen rank (the one the ranks' reports of
    // silent neighbours lead to, whichever neighbour timed out first), the
    // timeout and the collective call.
    let failure = job_failed_line(&output);
    assert!(
        failure.contains("rank 1 on ")
            && failure.contains("stopped answering in a collective")
            && failure.contains(&format!("did not answer for {TIMEOUT_SECS} s")),
        "the failure does not name the frozen rank and the timeout: {failure}"
    );
    // A rank frozen after its gradients are summed is waited for at the
    // next sync point (the log step's metric sum, or the stop vote).
    let calls = ["gradients", "metric sum", "evaluation sum", "BN statistics", "stop vote"];
    assert!(
        calls.iter().any(|call| failure.contains(call)),
        "the failure does not name the collective call: {failure}"
    );
    // A rank that timed out says so in its own log too, naming its silent peer.
    let logged = [0u32, 2].iter().any(|&r| {
        std::fs::read_to_string(log(r)).is_ok_and(|text| {
            text.lines().any(|l| {
                l.starts_with("error: ")
                    && l.contains(&format!("did not answer for {TIMEOUT_SECS} s"))
            })
        })
    });
    assert!(logged, "neither rank 0 nor rank 2 logged its collective timeout:\n{output}");
}

#[test]
fn a_rank_frozen_before_the_rendezvous_fails_the_job_at_its_deadline_naming_it() {
    const RENDEZVOUS_TIMEOUT_SECS: u64 = 8;
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = fashion_subset(tmp.path(), 16, 4);
    let out = tmp.path().join("run");
    let _ = binary("worker");
    let started = Instant::now();
    let (mut coordinator, stderr) = spawn_drained(
        tiny_job(2, &data, &out)
            .args(["--rendezvous-timeout-secs", &RENDEZVOUS_TIMEOUT_SECS.to_string()])
            // Inherited by the workers and their ranks: rank 1 stops itself.
            .env("RSB_STOP_BEFORE_RENDEZVOUS", "1"),
    );
    let log = out.join("ranks/rank-1.log");
    wait_until(&mut coordinator, Duration::from_secs(120), "rank 1's log", || log.exists());
    let job = descendants(coordinator.id());
    let status = exit_within(&mut coordinator, Duration::from_secs(RENDEZVOUS_TIMEOUT_SECS + 120));
    let took = started.elapsed();
    if status.is_none() {
        let _ = coordinator.kill();
    }
    let _ = coordinator.wait();
    let left = left_behind(&job);
    let output = String::from_utf8_lossy(&stderr.read_to_end()).into_owned();
    let status = status
        .unwrap_or_else(|| panic!("the job had not failed {took:?} after it started:\n{output}"));
    assert!(!status.success(), "a job with a frozen rank must fail:\n{output}");
    assert!(
        took >= Duration::from_secs(RENDEZVOUS_TIMEOUT_SECS),
        "the job failed {took:?} after its start, before the rendezvous deadline:\n{output}"
    );
    assert!(left.is_empty(), "processes of the job left behind: {left:?}\n{output}");
    let text = std::fs::read_to_string(&log).expect("rank 1's log");
    assert!(text.contains("stopping before the rendezvous"), "the hook did not fire:\n{text}");
    // Its agent killed it for the job's failure: that is not a failure of
    // the rank's to report, nor the reason the agent ends with.
    assert!(
        !output.contains("exited with signal: 9"),
        "an agent reported the rank it killed itself as failed:\n{output}"
    );
    let failure = job_failed_line(&output);
    assert!(
        failure.contains("rank 1 on ")
            && failure.contains(&format!(
                "did not reach the rendezvous of generation 1 within {RENDEZVOUS_TIMEOUT_SECS}s"
            ))
            && failure.contains("1 of 2 rank(s) missing"),
        "the failure does not name the frozen rank and the deadline: {failure}"
    );
}

#[test]
fn a_rank_that_panics_fails_the_job_at_once_naming_it_and_the_panic() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = fashion_subset(tmp.path(), 16, 4);
    let out = tmp.path().join("run");
    let _ = binary("worker");
    let (mut coordinator, stderr) = spawn_drained(
        // Inherited by the workers and their ranks: rank 1 panics.
        tiny_job(2, &data, &out).env("RSB_PANIC_BEFORE_RENDEZVOUS", "1"),
    );
    let status = exit_within(&mut coordinator, Duration::from_secs(120));
    if status.is_none() {
        let _ = coordinator.kill();
    }
    let _ = coordinator.wait();
    let output = String::from_utf8_lossy(&stderr.read_to_end()).into_owned();
    let status = status.unwrap_or_else(|| panic!("the job had not failed in 120 s:\n{output}"));
    assert!(!status.success(), "a job with a panicking rank must fail:\n{output}");
    let failure = job_failed_line(&output);
    assert!(
        failure.contains("rank 1 on ")
            && failure.contains("panicked at worker/src/join.rs:")
            && failure.contains("rank 1 panics as asked"),
        "the failure does not name the rank and its panic: {failure}"
    );
}

/// The coordinator's `job failed` line in `output`, which names who failed.
fn job_failed_line(output: &str) -> &str {
    output
        .lines()
        .find(|l| l.contains("job failed"))
        .unwrap_or_else(|| panic!("no `job failed` line:\n{output}"))
}
