//! The coordinator killed (`kill -9`) mid-run and restarted with
//! `coordinator up --restore`, end to end with real binaries, two `worker
//! join` hosts of one CPU rank each and the tiny recipe with a checkpoint
//! every 2 updates: the agents keep their ranks' host alive through the
//! outage, heartbeat the new coordinator with their old credentials, and the
//! job goes on in a new generation (reason `coordinator_restarted`) from its
//! newest committed checkpoint and finishes with its planned updates. The
//! updates lost (recorded before the kill, after that checkpoint) are at
//! most one checkpoint interval. Nothing is left running. A restore with
//! another job token, or none, is refused at once and changes nothing.

use rsb_integration_tests::elastic_records::{all_records, planned_updates};
use rsb_integration_tests::free_port;
use rsb_integration_tests::processes::{signal, wait_with_timeout};
use rsb_integration_tests::sweeps::{self, wait_until};
use rsb_integration_tests::{binary, fashion_subset, run_records, tiny_recipe};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `runtime.checkpoint_every_updates` of the job.
const CHECKPOINT_INTERVAL: u64 = 2;

#[test]
fn a_killed_coordinator_restored_from_its_state_file_continues_the_job() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fashion_subset(tmp.path(), 8, 2);
    let out = tmp.path().join("run");
    let sets = vec![
        format!("data.root={}", data.display()),
        "model.num_classes=10".to_string(),
        "schedule.cosine.epochs=6".to_string(),
        "eval.every_epochs=1000".to_string(),
        format!("runtime.checkpoint_every_updates={CHECKPOINT_INTERVAL}"),
        "runtime.keep_last_checkpoints=1000".to_string(),
    ];
    let port = free_port("127.0.0.1");
    let listen = format!("127.0.0.1:{port}");
    let args = ["--listen", &listen, "--nodes", "2", "--heartbeat-timeout-secs", "10"];
    let first_log = tmp.path().join("coordinator-1.log");
    let mut first = sweeps::coordinator_up(&out, &sets, &args, &first_log);
    let workers: Vec<_> = ["a", "b"]
        .iter()
        .map(|name| sweeps::worker_join(port, name, &tmp.path().join(format!("worker-{name}.log"))))
        .collect();
    let steps = || run_records_or_empty(&out, "step");
    wait_until("a committed checkpoint and a few more updates", &first_log, || {
        std::fs::read_to_string(&first_log).unwrap_or_default().contains("checkpoint committed")
            && steps().last().is_some_and(|s| s["step"].as_u64().unwrap() >= 5)
    });
    assert!(signal(first.id(), "KILL"));
    let _ = first.wait();
    let killed = Instant::now();
    let recorded = steps().last().unwrap()["step"].as_u64().unwrap();
    let records_before = all_records(&out).len();

    let mut restore_args = args.to_vec();
    restore_args.push("--restore");
    // A restore with another job token, or with none, is refused at once,
    // saying why, and changes nothing: the agents present the job's token,
    // and a new one would lock them all out.
    let state_file = out.join("coordinator-state.json");
    let saved = std::fs::read(&state_file).unwrap();
    for (token, expected) in
        [(Some("another-token-0123456789"), "job token is not the one"), (None, "no job token")]
    {
        let mut cmd = Command::new(binary("coordinator"));
        cmd.args(["up", "--recipe"]).arg(tiny_recipe()).arg("--out").arg(&out);
        for set in &sets {
            cmd.args(["--set", set]);
        }
        cmd.args(&restore_args).env_remove("RSB_JOB_TOKEN");
        if let Some(token) = token {
            cmd.env("RSB_JOB_TOKEN", token);
        }
        let child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn();
        let refused = wait_with_timeout(
            child.unwrap(),
            Duration::from_secs(60),
            "a restore with a bad token",
        );
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success() && stderr.contains(expected), "{token:?}: {stderr}");
        assert_eq!(std::fs::read(&state_file).unwrap(), saved, "a refused restore wrote its state");
    }

    let log = tmp.path().join("coordinator-2.log");
    let second = sweeps::coordinator_up(&out, &sets, &restore_args, &log);
    wait_until("the first update after the restore", &log, || {
        all_records(&out).iter().skip(records_before).any(|r| r["kind"] == "step")
    });
    let recovered = killed.elapsed();
    let status =
        wait_with_timeout(second, Duration::from_secs(240), "the restored coordinator").status;
    let output = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "the restored job failed:\n{output}");
    assert!(output.contains("restored job"), "{output}");
    for (i, worker) in workers.into_iter().enumerate() {
        let status = wait_with_timeout(worker, Duration::from_secs(30), "a worker").status;
        assert!(status.success(), "worker {i} failed");
    }

    // The generation the restore opened: from a committed checkpoint, and
    // its first update came after the kill.
    let generations = run_records(&out, "generation");
    assert_eq!(generations.len(), 2, "{generations:?}");
    let restored = &generations[1];
    assert_eq!(restored["reasons"][0]["kind"], "coordinator_restarted", "{restored}");
    assert!(restored["resume_from"].as_str().is_some_and(|p| p.contains("update")), "{restored}");
    let resumed_at = restored["resume_step"].as_u64().expect("the restore resumes a checkpoint");
    let lost = recorded.saturating_sub(resumed_at);
    assert!(
        lost <= CHECKPOINT_INTERVAL,
        "{lost} updates lost: recorded {recorded}, resumed {resumed_at}"
    );
    let after: Vec<_> = all_records(&out).split_off(records_before);
    let first_step = after.iter().find(|r| r["kind"] == "step").expect("updates after the restore");
    assert_eq!(first_step["step"].as_u64().unwrap(), resumed_at + 1, "{first_step}");
    let last = run_records(&out, "step").last().cloned().unwrap();
    assert_eq!(last["step"].as_u64().unwrap(), planned_updates(&out), "{last}");
    println!(
        "coordinator kill -9 + restore: {lost} update(s) lost; first update {:.1} s after the \
         kill (restarted after about 0.1 s)",
        recovered.as_secs_f64()
    );
}

/// The records of `kind` so far (none while the file does not exist).
fn run_records_or_empty(out: &Path, kind: &str) -> Vec<serde_json::Value> {
    all_records(out).into_iter().filter(|r| r["kind"] == kind).collect()
}
