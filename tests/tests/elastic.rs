//! Elastic membership end to end, with real binaries, CPU ranks and the tiny
//! recipe (6 sampler streams: worlds of 2 and 3 ranks both hold the batch):
//!
//! * `kill -9` of one of three `worker join` agents (and its rank) mid-run,
//!   with `--min-nodes 2`: the job finishes; `metrics.jsonl` shows the new
//!   generation of world size 2 and the checkpoint it resumed from; the
//!   updates lost (made after that checkpoint, before the generation) are at
//!   most one checkpoint interval (`runtime.checkpoint_every_updates`, 2
//!   here: the checkpoint resumed from is a mid-epoch one), the run ends with
//!   its planned number of updates, and the test prints the updates lost and
//!   the time from the kill to the first update of the new generation;
//! * a third host joins a running 2-host job (`--max-nodes 3`): it is
//!   admitted at the next committed checkpoint, losing no update;
//! * with the default `--min-nodes` (= `--nodes`) a lost host still fails
//!   the job at once, naming it.

use rsb_integration_tests::elastic_records::{
    all_records, assert_shrunk_without, planned_updates, position, steps_before,
};
use rsb_integration_tests::processes::{children_of, signal, wait_with_timeout};
use rsb_integration_tests::{binary, fashion_subset, records_in, workspace_root};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The job token of these jobs (given through the environment).
const TOKEN: &str = "elastic-test-token-7d2e91b3";

/// `runtime.checkpoint_every_updates` of the job that loses a host.
const CHECKPOINT_INTERVAL: u64 = 2;

fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap().local_addr().unwrap().port()
}

/// `coordinator up` for the tiny recipe over `epochs` short epochs, with
/// `extra` arguments.
fn coordinator(port: u16, data: &Path, out: &Path, epochs: u32, extra: &[&str]) -> Child {
    let sets = [
        format!("data.root={}", data.display()),
        "model.num_classes=10".into(),
        "batch.global_size=12".into(),
        "batch.micro_size=2".into(),
        format!("schedule.cosine.epochs={epochs}"),
        "eval.every_epochs=1000".into(),
        "runtime.log_every_steps=1".into(),
        // Every epoch's checkpoint stays: nothing a restart resumes from is pruned.
        "runtime.keep_last_checkpoints=1000".into(),
    ];
    let mut cmd = Command::new(binary("coordinator"));
    cmd.args(["up", "--listen", &format!("127.0.0.1:{port}"), "--recipe"])
        .arg(workspace_root().join("recipes/debug/resnet18_tiny_cpu.yaml"))
        .arg("--out")
        .arg(out);
    for s in sets {
        cmd.args(["--set", &s]);
    }
    cmd.args(extra)
        .env("RSB_JOB_TOKEN", TOKEN)
        .current_dir(workspace_root())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the coordinator")
}

fn worker(port: u16, name: &str) -> Child {
    Command::new(binary("worker"))
        .args(["join", "--coordinator", &format!("http://127.0.0.1:{port}")])
        .args(["--devices", "cpu", "--cores", "1", "--host-name", name])
        .env("RSB_JOB_TOKEN", TOKEN)
        .current_dir(workspace_root())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting worker join")
}

/// Waits (at most 240 s) until `ready` holds for the records so far.
fn wait_for_records(
    out: &Path,
    coordinator: &mut Child,
    what: &str,
    ready: impl Fn(&[serde_json::Value]) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(240);
    while !ready(&all_records(out)) {
        if let Some(status) = coordinator.try_wait().expect("try_wait") {
            panic!("the coordinator exited with {status} while waiting for {what}");
        }
        assert!(Instant::now() < deadline, "no {what} within 240 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The coordinator's output and every worker's, for a failure report.
fn report(up: &Output, workers: Vec<Child>, out: &Path) -> String {
    let mut text = format!(
        "coordinator ({}):\n{}\n{}\n",
        up.status,
        String::from_utf8_lossy(&up.stdout),
        String::from_utf8_lossy(&up.stderr)
    );
    for (i, w) in workers.into_iter().enumerate() {
        let o = wait_with_timeout(w, Duration::from_secs(30), "worker join");
        text += &format!("worker {i} ({}):\n{}\n", o.status, String::from_utf8_lossy(&o.stderr));
    }
    text += &format!(
        "metrics.jsonl:\n{}",
        std::fs::read_to_string(out.join("metrics.jsonl")).unwrap_or_default()
    );
    text
}

fn setup(tag: &str) -> (tempfile::TempDir, PathBuf, PathBuf, u16) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = fashion_subset(tmp.path(), 4, 1);
    let out = tmp.path().join(tag);
    (tmp, data, out, free_port())
}

#[test]
fn a_killed_host_is_dropped_and_the_job_finishes_from_its_last_checkpoint() {
    let (_tmp, data, out, port) = setup("shrink");
    let mut up = coordinator(
        port,
        &data,
        &out,
        5,
        &[
            "--nodes",
            "3",
            "--min-nodes",
            "2",
            "--heartbeat-timeout-secs",
            "8",
            "--set",
            &format!("runtime.checkpoint_every_updates={CHECKPOINT_INTERVAL}"),
        ],
    );
    let workers: Vec<Child> = ["a", "b", "c"].iter().map(|h| worker(port, h)).collect();
    // Mid-run: after the first epoch and a mid-epoch checkpoint after it (a
    // step record past it means rank 0 committed it: it commits before the
    // next update).
    wait_for_records(&out, &mut up, "an update after a mid-epoch checkpoint", |records| {
        let first = records.iter().find(|r| r["kind"] == "epoch").and_then(|r| r["step"].as_u64());
        first.is_some_and(|f| {
            records
                .iter()
                .any(|r| r["kind"] == "step" && r["step"].as_u64() > Some(f + CHECKPOINT_INTERVAL))
        })
    });
    let victim = workers[2].id();
    let ranks = children_of(victim);
    assert_eq!(ranks.len(), 1, "worker c runs one rank: {ranks:?}");
    assert!(signal(victim, "KILL"), "kill -9 of worker c ({victim})");
    for rank in ranks {
        assert!(signal(rank, "KILL"), "kill -9 of its rank ({rank})");
    }
    // Time to recover: from the kill to the first update of the new generation.
    let killed_at = Instant::now();
    wait_for_records(&out, &mut up, "an update after the shrink", |records| {
        position(records, "generation", |g| g["world_size"] == 2)
            .is_some_and(|at| records[at..].iter().any(|r| r["kind"] == "step"))
    });
    let recovery = killed_at.elapsed();
    let output = wait_with_timeout(up, Duration::from_secs(400), "the elastic job");
    let mut workers = workers;
    let _killed = workers.remove(2).wait();
    if !output.status.success() {
        panic!("the job failed after losing a host:\n{}", report(&output, workers, &out));
    }
    for (i, w) in workers.into_iter().enumerate() {
        let o = wait_with_timeout(w, Duration::from_secs(60), "worker join");
        assert!(o.status.success(), "worker {i}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let lost = assert_shrunk_without(&out, "c", CHECKPOINT_INTERVAL, 5);
    // Measured numbers for the README's table (the assertions above bound them).
    println!(
        "MEASURED kill -9 of 1 of 3 hosts: {lost} updates lost (checkpoint every \
         {CHECKPOINT_INTERVAL}), first update of the new generation {:.1} s after the kill \
         (heartbeat timeout 8 s)",
        recovery.as_secs_f64()
    );
}

#[test]
fn a_host_joining_a_running_job_is_admitted_at_the_next_checkpoint() {
    let (_tmp, data, out, port) = setup("grow");
    let mut up = coordinator(port, &data, &out, 5, &["--nodes", "2", "--max-nodes", "3"]);
    let mut workers: Vec<Child> = ["a", "b"].iter().map(|h| worker(port, h)).collect();
    wait_for_records(&out, &mut up, "the first update", |records| {
        records.iter().any(|r| r["kind"] == "step")
    });
    workers.push(worker(port, "c"));
    let output = wait_with_timeout(up, Duration::from_secs(400), "the growing job");
    if !output.status.success() {
        panic!("the job failed after a join:\n{}", report(&output, workers, &out));
    }
    for (i, w) in workers.into_iter().enumerate() {
        let o = wait_with_timeout(w, Duration::from_secs(60), "worker join");
        assert!(o.status.success(), "worker {i}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let records = all_records(&out);
    let first = position(&records, "generation", |g| g["generation"] == 1).expect("generation 1");
    assert_eq!(records[first]["world_size"], 2);
    let at = position(&records, "generation", |g| g["world_size"] == 3)
        .unwrap_or_else(|| panic!("no generation of world size 3: {records:#?}"));
    let grown = &records[at];
    assert_eq!(grown["accumulation"], 2, "6 streams over 3 ranks");
    assert_eq!(grown["reasons"][0]["kind"], "admitted", "{grown}");
    assert_eq!(grown["reasons"][0]["host"], "c", "{grown}");
    let resume_step = grown["resume_step"].as_u64().expect("admitted at a committed checkpoint");
    assert!(grown["resume_from"].as_str().is_some_and(|p| p.contains("epoch-")), "{grown}");
    // Admitted at a checkpoint: no update was made after it before the grow.
    assert_eq!(steps_before(&records, at), resume_step, "a grow lost updates");
    let planned = planned_updates(&out);
    let epochs = records_in(&out.join("metrics.jsonl"), "epoch");
    assert_eq!(epochs.last().expect("epoch records")["step"].as_u64(), Some(planned));
}

#[test]
fn without_min_nodes_a_lost_host_fails_the_job_at_once_naming_it() {
    let (_tmp, data, out, port) = setup("fixed");
    let mut up =
        coordinator(port, &data, &out, 200, &["--nodes", "2", "--heartbeat-timeout-secs", "5"]);
    let workers: Vec<Child> = ["a", "b"].iter().map(|h| worker(port, h)).collect();
    wait_for_records(&out, &mut up, "the first update", |records| {
        records.iter().any(|r| r["kind"] == "step")
    });
    // Host b goes silent (frozen, as a host cut off): its agent and its rank.
    let frozen: Vec<u32> =
        std::iter::once(workers[1].id()).chain(children_of(workers[1].id())).collect();
    for &pid in &frozen {
        assert!(signal(pid, "STOP"), "kill -STOP {pid}");
    }
    let started = Instant::now();
    let output = wait_with_timeout(up, Duration::from_secs(120), "the fixed job");
    let took = started.elapsed();
    for &pid in &frozen {
        let _ = signal(pid, "KILL");
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "a job that lost a host succeeded");
    assert!(
        stderr.contains("(b) missed heartbeats"),
        "the failure does not name host b:\n{stderr}"
    );
    // The 5 s heartbeat timeout, plus generous room for a loaded machine.
    assert!(took < Duration::from_secs(60), "the job took {took:?} to fail");
    let generations = records_in(&out.join("metrics.jsonl"), "generation");
    assert_eq!(generations.len(), 1, "a fixed job opened a generation: {generations:?}");
    for w in workers {
        let _ = wait_with_timeout(w, Duration::from_secs(60), "worker join");
    }
}
