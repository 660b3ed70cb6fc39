//! Ranks that stop, and ranks that wait for a checkpoint, with real binaries,
//! CPU ranks and the tiny recipe (2 hosts of one rank each, 6 sampler
//! streams):
//!
//! * the coordinator is SIGKILLed mid-epoch; each agent stops its rank at
//!   its `--coordinator-deadline-secs` (SIGTERM), the ranks agree to stop
//!   after the same update (the first SIGTERM suffices: a rank whose own
//!   comes later has already stopped at the other's request), rank 0
//!   writes a checkpoint of that position (newer than the last periodic one, verified by its manifest) and both
//!   exit non-zero saying so; `coordinator up --resume` then finishes the
//!   job from that checkpoint, and the metrics show every update of the run
//!   trained exactly once counting from the stop (none lost, none redone);
//! * one host is preempted (its rank alone gets SIGTERM): every rank stops
//!   after the same update, and the job's failure names that host's rank
//!   as the one that asked, not the healthy rank whose Leave came first;
//! * every checkpoint write takes longer than `distributed.collective_timeout_secs`
//!   (a test hook delays it): the other rank, waiting for rank 0, does not
//!   time out and blame it as silent; the job finishes;
//! * both agents get SIGTERM, and a second one while rank 0's stop
//!   checkpoint takes minutes: they kill their ranks at once and exit,
//!   saying so, instead of waiting out the ranks' stop grace;
//! * both agents get SIGTERM while one rank is frozen before the rendezvous
//!   and the other waits there: the ranks, which have not begun training,
//!   tell the coordinator so as they exit, and the job fails at once naming
//!   one of them, not when their hosts are found silent.

use rsb_integration_tests::processes::wait_with_timeout;
use rsb_integration_tests::{binary, fashion_subset, records_in, workspace_root};
use rsb_integration_tests::{free_port, small_batch_sets};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The job token of these jobs (given through the environment).
const TOKEN: &str = "stops-test-token-4c1a9e07b2";

/// Training images per class of the slow-checkpoint job: 120 images, 10
/// updates of 12 per epoch.
const TRAIN_PER_CLASS: usize = 12;

/// Training images per class of the stopped job: 240 images, 20 updates of
/// 12 per epoch (a stop 3 s after a kill mid-epoch lands mid-epoch).
const STOPPED_PER_CLASS: usize = 24;

/// Updates per epoch of the stopped job.
const STOPPED_UPDATES_PER_EPOCH: u64 = 20;

/// `worker join --coordinator-deadline-secs` of the stopped job.
const DEADLINE_SECS: u64 = 3;

/// `runtime.checkpoint_every_updates` of the stopped job: the coordinator
/// is killed just after the periodic checkpoint at update 10, and the stop
/// comes some updates later, before the epoch's end at 20 (else the stop
/// checkpoint is the epoch end's; the test holds either way).
const CHECKPOINT_INTERVAL: u64 = 10;

/// The `--set`s of a job of `epochs` epochs on `data`.
fn sets(data: &Path, epochs: u32) -> Vec<String> {
    let mut sets = small_batch_sets(data);
    sets.extend([
        "data.loader_threads=1".into(),
        format!("schedule.cosine.epochs={epochs}"),
        "eval.every_epochs=1000".into(),
        "runtime.keep_last_checkpoints=3".into(),
    ]);
    sets
}

/// `coordinator up` (2 hosts) on `port`, its output to `log`.
fn coordinator(port: u16, sets: &[String], out: &Path, resume: bool, log: &Path) -> Child {
    let mut cmd = Command::new(binary("coordinator"));
    cmd.args(["up", "--listen", &format!("127.0.0.1:{port}"), "--nodes", "2", "--recipe"])
        .arg(workspace_root().join("recipes/debug/resnet18_tiny_cpu.yaml"))
        .arg("--out")
        .arg(out);
    if resume {
        cmd.arg("--resume").arg(out);
    }
    for s in sets {
        cmd.args(["--set", s]);
    }
    let log = std::fs::File::create(log).expect("coordinator log");
    cmd.env("RSB_JOB_TOKEN", TOKEN)
        .current_dir(workspace_root())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("starting the coordinator")
}

/// `worker join` with one CPU rank, its output to `log`.
fn worker(port: u16, name: &str, log: &Path) -> Child {
    worker_with_env(port, name, log, &[])
}

/// [`worker`], with `env` set for the agent and so for its rank.
fn worker_with_env(port: u16, name: &str, log: &Path, env: &[(&str, &str)]) -> Child {
    let log = std::fs::File::create(log).expect("worker log");
    Command::new(binary("worker"))
        .envs(env.iter().copied())
        .args(["join", "--coordinator", &format!("http://127.0.0.1:{port}")])
        .args(["--devices", "cpu", "--cores", "1", "--host-name", name])
        .args(["--coordinator-deadline-secs", &DEADLINE_SECS.to_string()])
        .env("RSB_JOB_TOKEN", TOKEN)
        .current_dir(workspace_root())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("starting worker join")
}

/// The `step` values of the step records of a records file, in order.
fn steps(records: &[serde_json::Value]) -> Vec<u64> {
    records
        .iter()
        .filter(|r| r["kind"] == "step")
        .map(|r| r["step"].as_u64().expect("step"))
        .collect()
}

/// Every record of a JSON-lines file (none when it is missing).
fn lines_of(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The updates done at a checkpoint (from its name, `...-update-UUUUUUUUU`,
/// or its state for an epoch end).
fn updates_of(checkpoint: &Path) -> u64 {
    let state = rsb_job::checkpoint::read_state(checkpoint).expect("state.json");
    state["updates"].as_u64().expect("updates")
}

#[test]
fn ranks_whose_coordinator_is_gone_stop_with_a_checkpoint_and_the_job_resumes_from_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = fashion_subset(tmp.path(), STOPPED_PER_CLASS, 1);
    let out = tmp.path().join("run");
    let logs = tmp.path();
    let epochs = 2;
    let mut sets = sets(&data, epochs);
    sets.push(format!("runtime.checkpoint_every_updates={CHECKPOINT_INTERVAL}"));
    let port = free_port("127.0.0.1");
    let mut up = coordinator(port, &sets, &out, false, &logs.join("up.log"));
    let workers: Vec<Child> =
        ["a", "b"].iter().map(|h| worker(port, h, &logs.join(format!("worker-{h}.log")))).collect();
    // Mid-epoch, just past the first periodic checkpoint.
    let deadline = Instant::now() + Duration::from_secs(240);
    while steps(&lines_of(&out.join("metrics.jsonl"))).last() < Some(&(CHECKPOINT_INTERVAL + 1)) {
        if let Some(status) = up.try_wait().expect("try_wait") {
            panic!("the coordinator exited with {status}:\n{}", read(&logs.join("up.log")));
        }
        assert!(Instant::now() < deadline, "no update past the first checkpoint within 240 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    let before: Vec<PathBuf> = rsb_job::checkpoint::list(&out);
    let newest_before = before.iter().map(|c| updates_of(c)).max().expect("a periodic checkpoint");
    up.kill().expect("kill -9 of the coordinator");
    let killed_at = Instant::now();
    let _ = up.wait();
    // Each agent stops its rank at its deadline; the ranks stop together.
    let mut exits = Vec::new();
    for (h, w) in ["a", "b"].iter().zip(workers) {
        let o = wait_with_timeout(
            w,
            Duration::from_secs(120),
            "worker join after the coordinator's death",
        );
        exits.push((h, o.status, killed_at.elapsed(), read(&logs.join(format!("worker-{h}.log")))));
    }
    let all_logs: String = exits.iter().map(|e| format!("worker {}:\n{}\n", e.0, e.3)).collect();
    for (h, status, _, log) in &exits {
        assert!(!status.success(), "worker {h} succeeded without its coordinator:\n{log}");
        assert!(log.contains("has not answered a heartbeat"), "worker {h}:\n{log}");
    }
    let stopped_after = exits.iter().map(|e| e.2).max().expect("two workers");
    println!("workers gone {stopped_after:.1?} after the coordinator's kill");
    // The deadline, a heartbeat call, the rank's stop: well within a minute here.
    assert!(
        stopped_after < Duration::from_secs(60),
        "agents exited {stopped_after:?} after the kill"
    );
    // The stop checkpoint: the newest, newer than anything before the kill,
    // intact.
    let after = rsb_job::checkpoint::list(&out);
    let stop_checkpoint = after.last().expect("checkpoints").clone();
    let stop = updates_of(&stop_checkpoint);
    assert!(
        stop > newest_before && !before.contains(&stop_checkpoint),
        "no checkpoint newer than update {newest_before}: {after:?}\n{all_logs}"
    );
    rsb_job::checkpoint::verify(&stop_checkpoint)
        .unwrap_or_else(|e| panic!("{}: {e}", stop_checkpoint.display()));
    // Both ranks say why they stopped, after the same update: each its own
    // agent's SIGTERM, or, when the ranks agreed to stop before its agent's
    // deadline came (the agents' heartbeats are out of phase), the other
    // rank's stop request; at least one of them its SIGTERM.
    let by_signal = format!("stopped by SIGTERM after update {stop}");
    let by_request = format!("'s stop request after update {stop}");
    let signalled = all_logs.lines().filter(|l| l.contains(&by_signal)).count();
    let requested = all_logs
        .lines()
        .filter(|l| l.contains("stopped by rank ") && l.contains(&by_request))
        .count();
    assert!(
        signalled >= 1 && signalled + requested >= 2,
        "both ranks should say `{by_signal}` (or one of them `{by_request}`):\n{all_logs}"
    );
    assert!(
        all_logs.contains(&format!("checkpoint {} written", stop_checkpoint.display())),
        "rank 0 should name its checkpoint:\n{all_logs}"
    );
    // Rank 0 trained updates 1..=stop exactly once, and none after the stop.
    let first_run = steps(&lines_of(&out.join("ranks/rank-0.jsonl")));
    assert_eq!(first_run, (1..=stop).collect::<Vec<_>>(), "updates of the stopped run");
    // The job resumed from the run folder: from the stop checkpoint.
    let metrics_before = lines_of(&out.join("metrics.jsonl")).len();
    let port = free_port("127.0.0.1");
    let up = coordinator(port, &sets, &out, true, &logs.join("resumed.log"));
    let workers: Vec<Child> = ["a", "b"]
        .iter()
        .map(|h| worker(port, h, &logs.join(format!("resumed-{h}.log"))))
        .collect();
    let output = wait_with_timeout(up, Duration::from_secs(300), "the resumed job");
    for w in workers {
        let _ = wait_with_timeout(w, Duration::from_secs(60), "worker join");
    }
    assert!(
        output.status.success(),
        "the resumed job failed:\n{}",
        read(&logs.join("resumed.log"))
    );
    let records = lines_of(&out.join("metrics.jsonl"));
    let resumed = &records[metrics_before..];
    let generation =
        resumed.iter().find(|r| r["kind"] == "generation").expect("a generation record");
    assert_eq!(
        generation["resume_from"].as_str(),
        Some(stop_checkpoint.to_string_lossy().as_ref()),
        "{generation}"
    );
    let total = records_in(&out.join("metrics.jsonl"), "step").last().expect("steps")
        ["total_updates"]
        .as_u64()
        .expect("total_updates");
    assert_eq!(total, STOPPED_UPDATES_PER_EPOCH * u64::from(epochs));
    // No update repeated or lost relative to the stop point.
    assert_eq!(steps(resumed), (stop + 1..=total).collect::<Vec<_>>(), "updates after the resume");
    let last_epoch = resumed.iter().rfind(|r| r["kind"] == "epoch").expect("epoch record");
    assert_eq!(last_epoch["step"].as_u64(), Some(total));
    assert_eq!(last_epoch["epoch"].as_u64(), Some(u64::from(epochs) - 1));
    println!(
        "MEASURED coordinator kill -9: the agents (deadline {DEADLINE_SECS} s) stopped their ranks \
         and exited {:.1} s after the kill; rank 0's stop checkpoint at update {stop} (last \
         periodic: update {newest_before}, every {CHECKPOINT_INTERVAL}), {}; the resume \
         trained updates {}..={total}, none lost or repeated",
        stopped_after.as_secs_f64(),
        if stop.is_multiple_of(STOPPED_UPDATES_PER_EPOCH) { "at the epoch's end" } else { "mid-epoch" },
        stop + 1,
    );
}

#[test]
fn a_checkpoint_write_slower_than_the_collective_timeout_blames_nobody() {
    const TIMEOUT_SECS: u64 = 3;
    const DELAY_MS: u64 = 8_000;
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = fashion_subset(tmp.path(), TRAIN_PER_CLASS, 1);
    let out = tmp.path().join("run");
    let mut sets = sets(&data, 1);
    sets.push("runtime.checkpoint_every_updates=5".into());
    sets.push(format!("distributed.collective_timeout_secs={TIMEOUT_SECS}"));
    let mut cmd = Command::new(binary("coordinator"));
    cmd.args(["up", "--local", "--nodes", "2", "--recipe"])
        .arg(workspace_root().join("recipes/debug/resnet18_tiny_cpu.yaml"))
        .arg("--out")
        .arg(&out);
    for s in &sets {
        cmd.args(["--set", s]);
    }
    let _ = binary("worker"); // built before the coordinator starts it
    let started = Instant::now();
    let child = cmd
        // Inherited by the ranks: every checkpoint write takes 8 s more.
        .env("RSB_CHECKPOINT_DELAY_MS", DELAY_MS.to_string())
        .current_dir(workspace_root())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the coordinator");
    let output = wait_with_timeout(child, Duration::from_secs(300), "the slow-checkpoint job");
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "a slow checkpoint failed the job:\n{stderr}");
    assert!(!stderr.contains("did not answer"), "a rank timed out:\n{stderr}");
    // The mid-epoch checkpoint after update 5 and the epoch's end, each
    // written in more than twice the collective timeout.
    let names: Vec<String> = rsb_job::checkpoint::list(&out)
        .iter()
        .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names[0].ends_with("update-000000005"), "{names:?}");
    // Each write was slow: the second manifest came at least one delay
    // after the first, and the job took at least both delays.
    let written: Vec<std::time::SystemTime> = rsb_job::checkpoint::list(&out)
        .iter()
        .map(|c| c.join("manifest.json").metadata().and_then(|m| m.modified()).expect("mtime"))
        .collect();
    let between = written[1].duration_since(written[0]).expect("in order");
    assert!(between >= Duration::from_millis(DELAY_MS), "the writes were {between:?} apart");
    assert!(took >= Duration::from_millis(2 * DELAY_MS), "the delay was not applied: {took:?}");
    println!(
        "MEASURED two checkpoint writes of {} s each, collective timeout {TIMEOUT_SECS} s: the \
         job finished in {:.1} s",
        DELAY_MS / 1000,
        took.as_secs_f64()
    );
}

/// Host a's rank (rank 0, which writes the stop checkpoint and flushes its
/// reports before it leaves, so that host b's Leave comes first) gets
/// SIGTERM, as a preempted node's processes do. Every rank stops after the
/// same update; the job fails naming rank 0 on a as the rank that asked,
/// where it named the first Leave's rank: "rank 1 on b failed: stopped by
/// another rank's stop request".
#[test]
fn a_signal_to_one_rank_is_blamed_on_that_rank_not_on_the_first_to_leave() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = fashion_subset(tmp.path(), STOPPED_PER_CLASS, 1);
    let out = tmp.path().join("run");
    let logs = tmp.path();
    let sets = sets(&data, 2);
    let port = free_port("127.0.0.1");
    let up_log = logs.join("up.log");
    let up = coordinator(port, &sets, &out, false, &up_log);
    // a joins first: it holds rank 0.
    let a = worker(port, "a", &logs.join("worker-a.log"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !read(&up_log).contains("joined (1/2 hosts)") {
        assert!(Instant::now() < deadline, "host a never joined:\n{}", read(&up_log));
        std::thread::sleep(Duration::from_millis(50));
    }
    let b = worker(port, "b", &logs.join("worker-b.log"));
    let deadline = Instant::now() + Duration::from_secs(240);
    while steps(&lines_of(&out.join("metrics.jsonl"))).last() < Some(&2) {
        assert!(Instant::now() < deadline, "no update within 240 s:\n{}", read(&up_log));
        std::thread::sleep(Duration::from_millis(100));
    }
    let ranks: Vec<u32> = rsb_integration_tests::processes::descendants(a.id())
        .into_iter()
        .filter(|&p| rsb_integration_tests::processes::cmdline(p).contains(" rank "))
        .collect();
    assert_eq!(ranks.len(), 1, "host a's rank: {ranks:?}");
    assert!(rsb_integration_tests::processes::signal(ranks[0], "TERM"));
    let output = wait_with_timeout(up, Duration::from_secs(120), "the coordinator");
    for w in [a, b] {
        let _ = wait_with_timeout(w, Duration::from_secs(60), "worker join");
    }
    let log = read(&up_log);
    assert!(!output.status.success(), "a stopped job succeeded:\n{log}");
    // Rank 0's own Leave may come first on a loaded machine (then it says
    // it was stopped by SIGTERM itself): either way it is named.
    assert!(
        log.contains("job failed: rank 0 on a asked every rank to stop (a stop signal")
            || log.contains("job failed: rank 0 on a failed: stopped by SIGTERM"),
        "the job's failure does not name the signalled rank:\n{log}"
    );
    let logs_b = read(&logs.join("worker-b.log"));
    assert!(logs_b.contains("stopped by rank 0's stop request after update"), "{logs_b}");
    println!("{}", log.lines().find(|l| l.contains("job failed:")).unwrap_or_default());
}

/// A user's second Ctrl-C (or a scheduler's second SIGTERM) means "now":
/// each agent kills its ranks at once instead of waiting up to their stop
/// grace (100 s) for rank 0's stop checkpoint, made to take 120 s here.
#[test]
fn a_second_sigterm_kills_the_ranks_without_waiting_for_the_stop_checkpoint() {
    const DELAY_MS: u64 = 120_000;
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = fashion_subset(tmp.path(), STOPPED_PER_CLASS, 1);
    let out = tmp.path().join("run");
    let logs = tmp.path();
    let port = free_port("127.0.0.1");
    let mut up = coordinator(port, &sets(&data, 2), &out, false, &logs.join("up.log"));
    let delay = DELAY_MS.to_string();
    let env = [("RSB_CHECKPOINT_DELAY_MS", delay.as_str())];
    let log_of = |h: &str| logs.join(format!("worker-{h}.log"));
    let mut workers: Vec<Child> =
        ["a", "b"].iter().map(|h| worker_with_env(port, h, &log_of(h), &env)).collect();
    let deadline = Instant::now() + Duration::from_secs(240);
    while steps(&lines_of(&out.join("metrics.jsonl"))).last() < Some(&2) {
        if let Some(status) = up.try_wait().expect("try_wait") {
            panic!("the coordinator exited with {status}:\n{}", read(&logs.join("up.log")));
        }
        assert!(Instant::now() < deadline, "no second update within 240 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    let signal = |w: &Child| {
        let sent = Command::new("kill").args(["-s", "TERM", &w.id().to_string()]).status();
        assert!(sent.expect("kill").success());
    };
    workers.iter().for_each(signal);
    // The ranks stop after the same update, and rank 0 starts its slow
    // stop checkpoint: its agent waits for it.
    std::thread::sleep(Duration::from_secs(5));
    let waiting: Vec<bool> =
        workers.iter_mut().map(|w| w.try_wait().expect("try_wait").is_none()).collect();
    assert!(
        waiting.contains(&true),
        "no agent waited for its rank's stop:\n{}\n{}",
        read(&log_of("a")),
        read(&log_of("b"))
    );
    let second = Instant::now();
    workers.iter().zip(&waiting).filter(|(_, w)| **w).for_each(|(w, _)| signal(w));
    for (h, w) in ["a", "b"].iter().zip(workers) {
        let o = wait_with_timeout(w, Duration::from_secs(60), "worker join after a second SIGTERM");
        let log = read(&log_of(h));
        assert!(!o.status.success(), "worker {h} succeeded:\n{log}");
        assert!(log.contains("worker stopped by SIGTERM"), "worker {h}:\n{log}");
    }
    let took = second.elapsed();
    let _ = up.kill();
    let _ = up.wait();
    let killed: Vec<&str> = ["a", "b"]
        .into_iter()
        .filter(|h| read(&log_of(h)).contains("its ranks killed at a second signal"))
        .collect();
    assert!(!killed.is_empty(), "no agent said it killed its ranks at the second signal");
    // SIGKILL and the reap: within seconds, where the grace was 100 s.
    assert!(took < Duration::from_secs(20), "the agents exited {took:?} after the second SIGTERM");
    println!(
        "MEASURED agents {killed:?} killed their ranks and exited {:.1} s after a second SIGTERM \
         (rank 0's stop checkpoint would have taken {} s)",
        took.as_secs_f64(),
        DELAY_MS / 1000
    );
}

/// A preemption of every host while the job starts (its ranks have their
/// assignments but have not begun training: one frozen before the
/// rendezvous, the other waiting at it) fails the job at once, naming a
/// rank and its stop, where it waited for the hosts' heartbeat deadline
/// (30 s) and then blamed their silence.
#[test]
fn ranks_stopped_before_training_tell_the_coordinator_so() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = fashion_subset(tmp.path(), TRAIN_PER_CLASS, 1);
    let out = tmp.path().join("run");
    let logs = tmp.path();
    let port = free_port("127.0.0.1");
    let up = coordinator(port, &sets(&data, 1), &out, false, &logs.join("up.log"));
    let env = [("RSB_STOP_BEFORE_RENDEZVOUS", "1")];
    let log_of = |h: &str| logs.join(format!("worker-{h}.log"));
    let workers: Vec<Child> =
        ["a", "b"].iter().map(|h| worker_with_env(port, h, &log_of(h), &env)).collect();
    let frozen = out.join("ranks/rank-1.log");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !read(&frozen).contains("stopping before the rendezvous") {
        assert!(Instant::now() < deadline, "rank 1 did not freeze within 120 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    for w in &workers {
        let sent = Command::new("kill").args(["-s", "TERM", &w.id().to_string()]).status();
        assert!(sent.expect("kill").success());
    }
    let signalled = Instant::now();
    let o = wait_with_timeout(up, Duration::from_secs(120), "the coordinator of the stopped job");
    let took = signalled.elapsed();
    for w in workers {
        let _ = wait_with_timeout(w, Duration::from_secs(60), "a stopped worker");
    }
    let log = read(&logs.join("up.log"));
    assert!(!o.status.success(), "the job succeeded:\n{log}");
    let failure = log.lines().find(|l| l.contains("job failed")).unwrap_or_default();
    assert!(
        failure.contains("stopped by SIGTERM before training began") && failure.contains("rank "),
        "the failure does not name a stopped rank: {failure}\n{log}"
    );
    assert!(took < Duration::from_secs(20), "the job failed {took:?} after the signals:\n{log}");
    println!(
        "MEASURED a job whose hosts were stopped before training failed {:.1} s after the \
         signals: {failure}",
        took.as_secs_f64()
    );
}
