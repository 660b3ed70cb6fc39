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
//!
//! The same with the command line of the Kubernetes and Slurm deployments,
//! `coordinator up --auto-resume`, started again as it was: after a SIGTERM
//! (a pod evicted) the job is restored and the agents continue it; after
//! the coordinator and every host were killed, the restarted coordinator
//! waits one heartbeat timeout for the old agents, then continues the job
//! on the hosts that join, from the newest checkpoint on disk. A rank
//! whose call for its assignment the stop cut asks again and trains in the
//! restored generation.

use rsb_integration_tests::elastic_records::{all_records, planned_updates};
use rsb_integration_tests::free_port;
use rsb_integration_tests::processes::{signal, wait_with_timeout};
use rsb_integration_tests::sweeps::{self, wait_until};
use rsb_integration_tests::{fashion_subset, run_records};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// `runtime.checkpoint_every_updates` of the job.
const CHECKPOINT_INTERVAL: u64 = 2;

/// `runtime.keep_last_checkpoints` of the job: not every one (the tests'
/// run folders once took 6.6 GB at once). The ranks train on while their
/// coordinator is away, writing checkpoints the coordinator never hears
/// of, and their retention may delete the one the restored job resumes
/// from, its newest committed one: rank 0 then resumes from the newest
/// intact one after it, saying so ([`resumed_step`]).
const KEPT_CHECKPOINTS: u32 = 3;

/// The update the restored job's rank 0 resumed after: `chosen`, the
/// coordinator's, or where the last generation's retention deleted that
/// checkpoint, the one rank 0 says it took instead (`…/epoch-NNNN-update-
/// UUUUUUUUU`, or an epoch's end `…/epoch-NNNN` of `per_epoch` updates).
fn resumed_step(out: &Path, chosen: u64, per_epoch: u64) -> u64 {
    let log = std::fs::read_to_string(out.join("ranks/rank-0.log")).unwrap_or_default();
    let Some(line) = log.lines().rev().find(|l| l.contains("was deleted by the last generation's"))
    else {
        return chosen;
    };
    let taken = line.rsplit(", ").next().unwrap_or_default().trim();
    let name = taken.rsplit('/').next().unwrap_or_default();
    let number = |s: &str| s.parse::<u64>().unwrap_or_else(|_| panic!("{name} in {line}"));
    match name.strip_prefix("epoch-").map(|rest| rest.split_once("-update-")) {
        Some(Some((_, updates))) => number(updates),
        Some(None) => number(&name["epoch-".len()..]) * per_epoch,
        None => panic!("no checkpoint named in: {line}"),
    }
}

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
        format!("runtime.keep_last_checkpoints={KEPT_CHECKPOINTS}"),
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
    // Killed mid-epoch (5 updates each), most often past a periodic
    // checkpoint.
    wait_until("a committed checkpoint and a few more updates", &first_log, || {
        std::fs::read_to_string(&first_log).unwrap_or_default().contains("checkpoint committed")
            && steps().last().is_some_and(|s| s["step"].as_u64().unwrap() >= 7)
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
        let mut cmd = sweeps::coordinator_up_command(&out, &sets, &restore_args);
        if let Some(token) = token {
            cmd.env("RSB_JOB_TOKEN", token);
        }
        let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn();
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
    // A periodic checkpoint (`…/epoch-0001-update-000000008`), or an
    // epoch's end (`…/epoch-0002`) should the kill come late.
    let resume_from = restored["resume_from"].as_str().unwrap_or_default();
    assert!(resume_from.contains("checkpoints/epoch-"), "{restored}");
    let resumed_at = restored["resume_step"].as_u64().expect("the restore resumes a checkpoint");
    let lost = recorded.saturating_sub(resumed_at);
    assert!(
        lost <= CHECKPOINT_INTERVAL,
        "{lost} updates lost: recorded {recorded}, resumed {resumed_at}"
    );
    let after: Vec<_> = all_records(&out).split_off(records_before);
    let first_step = after.iter().find(|r| r["kind"] == "step").expect("updates after the restore");
    // Right after the checkpoint rank 0 resumed from: none skipped, none
    // trained twice.
    let per_epoch = planned_updates(&out) / 6;
    let resumed_from = resumed_step(&out, resumed_at, per_epoch);
    assert_eq!(first_step["step"].as_u64().unwrap(), resumed_from + 1, "{first_step}");
    let last = run_records(&out, "step").last().cloned().unwrap();
    assert_eq!(last["step"].as_u64().unwrap(), planned_updates(&out), "{last}");
    println!(
        "coordinator kill -9 + restore: {lost} update(s) lost; first update {:.1} s after the \
         kill (restarted after about 0.1 s)",
        recovered.as_secs_f64()
    );
}

/// The job's `--set` options: `data` for data, `epochs` epochs of 2
/// updates each, a checkpoint every [`CHECKPOINT_INTERVAL`] updates,
/// [`KEPT_CHECKPOINTS`] kept.
fn job_sets(data: &Path, epochs: u32) -> Vec<String> {
    vec![
        format!("data.root={}", data.display()),
        "model.num_classes=10".to_string(),
        format!("schedule.cosine.epochs={epochs}"),
        "eval.every_epochs=1000".to_string(),
        format!("runtime.checkpoint_every_updates={CHECKPOINT_INTERVAL}"),
        format!("runtime.keep_last_checkpoints={KEPT_CHECKPOINTS}"),
    ]
}

/// The job of a Kubernetes or Slurm deployment: `coordinator up
/// --auto-resume` (the same command line at every start) on a free port,
/// with two `worker join` hosts, `a` and `b`, run until it committed a
/// checkpoint and made a few more updates; then the coordinator is stopped
/// with `signal` (and its exit checked). Returns the run folder, the command
/// line's `--set` options and arguments, the workers, when the coordinator
/// was stopped, the last update it recorded, and how many records it wrote.
struct KilledCoordinator {
    out: std::path::PathBuf,
    sets: Vec<String>,
    args: Vec<String>,
    workers: Vec<std::process::Child>,
    killed: Instant,
    recorded: u64,
    records_before: usize,
}

fn stop_an_auto_resume_coordinator(
    dir: &Path,
    signal_name: &str,
    epochs: u32,
    worker_env: &[(&str, &str)],
) -> KilledCoordinator {
    let data = fashion_subset(dir, 8, 2);
    let out = dir.join("run");
    let sets = job_sets(&data, epochs);
    let port = free_port("127.0.0.1");
    let listen = format!("127.0.0.1:{port}");
    // Hosts beat every second, and a restarted coordinator gives them 25 s
    // to call again (an agent waits up to 8 s between tries while it is
    // away), not 4.
    let args: Vec<String> =
        ["--listen", &listen, "--nodes", "2", "--auto-resume", "--heartbeat-timeout-secs", "4"]
            .map(String::from)
            .to_vec();
    let first_log = dir.join("coordinator-1.log");
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let first = sweeps::coordinator_up(&out, &sets, &arg_refs, &first_log);
    let workers: Vec<_> = ["a", "b"]
        .iter()
        .map(|name| {
            let log = dir.join(format!("worker-{name}.log"));
            sweeps::worker_join_with_env(port, name, &log, worker_env)
        })
        .collect();
    let steps = || run_records_or_empty(&out, "step");
    wait_until("a committed checkpoint and a few more updates", &first_log, || {
        std::fs::read_to_string(&first_log).unwrap_or_default().contains("checkpoint committed")
            && steps().last().is_some_and(|s| s["step"].as_u64().unwrap() >= 5)
    });
    assert!(signal(first.id(), signal_name));
    let status = wait_with_timeout(first, Duration::from_secs(30), "the stopped coordinator");
    assert!(!status.status.success());
    let killed = Instant::now();
    if signal_name == "TERM" {
        // Stopped by its scheduler (a pod evicted): the job is not ended.
        let output = std::fs::read_to_string(&first_log).unwrap();
        assert!(output.contains("the job is left to its restart"), "{output}");
        let state = std::fs::read_to_string(out.join("coordinator-state.json")).unwrap();
        let state: serde_json::Value = serde_json::from_str(&state).unwrap();
        assert!(state["ended"].is_null(), "{state}");
    }
    let recorded = steps().last().unwrap()["step"].as_u64().unwrap();
    let records_before = all_records(&out).len();
    KilledCoordinator { out, sets, args, workers, killed, recorded, records_before }
}

/// Waits for `child` to succeed (at most `limit`), failing with `log`.
fn assert_succeeds(child: std::process::Child, limit: Duration, what: &str, log: &Path) {
    let status = wait_with_timeout(child, limit, what).status;
    assert!(
        status.success(),
        "{what} failed:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// A Kubernetes coordinator pod evicted (SIGTERM) and started again 16.5 s
/// later while its job runs: the stopped coordinator leaves the job to its
/// restart, the same command line (`--auto-resume`) restores it from its
/// state file, and the agents, which outlived the old coordinator and
/// meanwhile wait up to 8 s between their heartbeat tries, continue it with
/// their own credentials, as after `--restore`, although the heartbeat
/// timeout is 4 s: by then they try every 8 s, and come back about 7 s
/// after the restart (with a wait of the heartbeat timeout, both were
/// dropped).
#[test]
fn an_auto_resume_restart_continues_the_job_with_the_agents_that_outlived_the_coordinator() {
    let tmp = tempfile::tempdir().unwrap();
    // The ranks train on while their coordinator is away, no longer
    // waiting on it: each checkpoint (every 2 updates) takes at least 1 s,
    // so that on the fastest machine they are still training when their
    // agents call the restarted coordinator (the job's last 55 updates
    // took 20 s on an AMD EPYC without it, and it ended unseen).
    let slow_disk = [("RSB_CHECKPOINT_DELAY_MS", "1000")];
    let k = stop_an_auto_resume_coordinator(tmp.path(), "TERM", 12, &slow_disk);
    std::thread::sleep(Duration::from_millis(16_500));
    let log = tmp.path().join("coordinator-2.log");
    let args: Vec<&str> = k.args.iter().map(String::as_str).collect();
    let second = sweeps::coordinator_up(&k.out, &k.sets, &args, &log);
    wait_until("the first update after the restart", &log, || {
        all_records(&k.out).iter().skip(k.records_before).any(|r| r["kind"] == "step")
    });
    let recovered = k.killed.elapsed();
    assert_succeeds(second, Duration::from_secs(240), "the restarted coordinator", &log);
    let output = std::fs::read_to_string(&log).unwrap();
    assert!(output.contains("the job's coordinator stopped while it ran"), "{output}");
    assert!(output.contains("restored job"), "{output}");
    for (i, worker) in k.workers.into_iter().enumerate() {
        let log = tmp.path().join(format!("worker-{}.log", ["a", "b"][i]));
        assert_succeeds(worker, Duration::from_secs(30), "a worker", &log);
    }
    let generations = run_records(&k.out, "generation");
    assert_eq!(generations.len(), 2, "{generations:?}");
    assert_eq!(generations[1]["reasons"][0]["kind"], "coordinator_restarted", "{generations:?}");
    // The restored generation keeps the ranks the hosts had: the first
    // generation's order, whichever host joined first.
    let mut first_hosts = generations[0]["hosts"].clone();
    assert_eq!(generations[1]["hosts"], first_hosts, "{generations:?}");
    first_hosts.as_array_mut().unwrap().sort_by_key(|h| h.as_str().unwrap().to_string());
    assert_eq!(first_hosts, serde_json::json!(["a", "b"]), "{generations:?}");
    let resumed_at = generations[1]["resume_step"].as_u64().expect("a committed checkpoint");
    let lost = k.recorded.saturating_sub(resumed_at);
    assert!(lost <= CHECKPOINT_INTERVAL, "{lost} updates lost");
    let last = run_records(&k.out, "step").last().cloned().unwrap();
    assert_eq!(last["step"].as_u64().unwrap(), planned_updates(&k.out), "{last}");
    println!(
        "coordinator SIGTERM, restarted 16.5 s later with the same --auto-resume command line: \
         {lost} update(s) lost; first update {:.1} s after the stop",
        recovered.as_secs_f64()
    );
}

/// A coordinator stopped (SIGTERM) while its job's ranks had a few updates
/// left: they train to the end without it, and their agents, their ranks
/// done, leave. Restarted with the same command line (`--auto-resume`), the
/// coordinator finds the run folder's newest checkpoint ends the last epoch
/// and ends the job as finished at once, saying so, without waiting the 25 s
/// that agents which outlived it have to call again. Before, it waited for
/// hosts to train the job anew and failed a finished job at the join
/// timeout; then, it waited the agents' 25 s first. `up --restore`, on a
/// copy of the run folder, ends it at once too, where it waited for the
/// agents and then failed the job as their hosts were lost.
#[test]
fn an_auto_resume_restart_after_the_ranks_finished_the_job_ends_it_as_finished() {
    let tmp = tempfile::tempdir().unwrap();
    // The ranks finish the job without their coordinator: their agents
    // must not give up on it (60 s by default) before, however slow the
    // machine; the ranks then wait 2 s, not 80, for it to take their last
    // reports before they exit.
    let patient =
        [("RSB_COORDINATOR_DEADLINE_SECS", "300"), ("RSB_REPORT_FLUSH_DEADLINE_SECS", "2")];
    let k = stop_an_auto_resume_coordinator(tmp.path(), "TERM", 4, &patient);
    for (i, worker) in k.workers.into_iter().enumerate() {
        let log = tmp.path().join(format!("worker-{}.log", ["a", "b"][i]));
        assert_succeeds(worker, Duration::from_secs(120), "a worker whose ranks finished", &log);
    }
    let last = rsb_job::checkpoint::list(&k.out).pop().expect("checkpoints");
    let state = rsb_job::checkpoint::read_position(&last).expect("the last checkpoint's state");
    assert_eq!(state.updates, planned_updates(&k.out), "{last:?}: {state:?}");
    let args: Vec<&str> = k.args.iter().map(String::as_str).collect();
    // A coordinator started with `args` on the run folder `out` ends the
    // job as finished at once, saying so, its state saved as finished:
    // what it said and how long it took (not answering workers after it:
    // --finished-linger-secs 0).
    let ends_at_once = |out: &Path, args: &[&str], log: &Path, what: &str| {
        let started = Instant::now();
        let at_once: Vec<&str> =
            args.iter().copied().chain(["--finished-linger-secs", "0"]).collect();
        let coordinator = sweeps::coordinator_up(out, &k.sets, &at_once, log);
        assert_succeeds(coordinator, Duration::from_secs(90), what, log);
        let ended_after = started.elapsed();
        let output = std::fs::read_to_string(log).unwrap();
        let end = out.join(last.strip_prefix(&k.out).unwrap());
        assert!(
            output.contains(&format!(
                "the job finished while no coordinator ran: {} ends its last epoch (4 of 4, {} \
                 updates), found as this coordinator started (its host(s) (",
                end.display(),
                state.updates
            )),
            "{output}"
        );
        // Well before the 25 s the agents would have had to call again.
        assert!(ended_after < Duration::from_secs(15), "{what} ended after {ended_after:?}");
        let saved = std::fs::read_to_string(out.join("coordinator-state.json")).unwrap();
        let saved: serde_json::Value = serde_json::from_str(&saved).unwrap();
        assert_eq!(saved["ended"], "finished", "{saved}");
        (output, ended_after)
    };
    // `--restore` (a copy of the run folder) ends it as finished at once
    // too, where it waited for agents that had left, and then failed the
    // job as their hosts were lost.
    let copy = tmp.path().join("run-restored");
    let copied = std::process::Command::new("cp").arg("-a").arg(&k.out).arg(&copy).status();
    assert!(copied.unwrap().success(), "copying {}", k.out.display());
    let restore_args: Vec<&str> =
        args.iter().map(|&a| if a == "--auto-resume" { "--restore" } else { a }).collect();
    let restore_log = tmp.path().join("coordinator-restore.log");
    let (_, restore_ended_after) = ends_at_once(&copy, &restore_args, &restore_log, "up --restore");

    let log = tmp.path().join("coordinator-2.log");
    let (output, ended_after) = ends_at_once(&k.out, &args, &log, "the restarted coordinator");
    assert!(output.contains("restored job"), "{output}");
    assert!(!output.contains("to come back"), "{output}");
    assert!(!output.contains("waiting for 2 host(s) to join"), "{output}");
    // The restored generation is the last: none was opened for hosts to
    // train the job again.
    let generations = run_records(&k.out, "generation");
    assert_eq!(generations.len(), 2, "{generations:?}");
    assert_eq!(generations[1]["reasons"][0]["kind"], "coordinator_restarted", "{generations:?}");
    // The records rank 0 made while no coordinator ran are in the job's
    // file, after the restored generation, and each record once: the
    // job's file, generations aside, is rank 0's own, checksums aside.
    let records = all_records(&k.out);
    let restored = records.iter().rposition(|r| r["kind"] == "generation").unwrap();
    let taken_after_restart = records.len() - restored - 1;
    assert!(taken_after_restart > 0, "no record was taken from rank 0's file");
    let job_file: Vec<_> = records.into_iter().filter(|r| r["kind"] != "generation").collect();
    let rank_zero_file = rsb_job::run_folder::rank_records_file(&k.out, 0);
    let rank_zero: Vec<serde_json::Value> = std::fs::read_to_string(&rank_zero_file)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .filter(|r: &serde_json::Value| r["kind"] != "checksum")
        .collect();
    assert_eq!(job_file, rank_zero, "metrics.jsonl against {}", rank_zero_file.display());
    let last_epoch = run_records(&k.out, "epoch").pop().expect("epoch records");
    assert_eq!(
        (last_epoch["epoch"].as_u64(), last_epoch["step"].as_u64()),
        (Some(3), Some(state.updates)),
        "{last_epoch}"
    );
    assert!(
        output.contains(&format!(
            "the {taken_after_restart} record(s) rank 0 made that no coordinator took are \
             appended to metrics.jsonl from {}",
            rank_zero_file.display()
        )),
        "{output}"
    );
    // Started once more as it was (killed between saving the end and
    // exiting, a pod restarted, a Slurm job submitted again): the job's
    // state says finished and its end is in the folder, so it says so,
    // tells the workers that join the job is finished (they exit
    // successfully, where they would retry a coordinator that had gone and
    // fail), exits once its --nodes 2 hosts were told (well before its
    // --finished-linger-secs 40) and changes nothing; before, it started a
    // job from that end and waited for hosts that were gone until the join
    // timeout failed the finished run.
    let again_log = tmp.path().join("coordinator-3.log");
    let metrics_before = std::fs::read(k.out.join("metrics.jsonl")).unwrap();
    let started = Instant::now();
    let lingering: Vec<&str> =
        args.iter().copied().chain(["--finished-linger-secs", "40"]).collect();
    let coordinator = sweeps::coordinator_up(&k.out, &k.sets, &lingering, &again_log);
    let listen = args[args.iter().position(|&a| a == "--listen").unwrap() + 1];
    let port: u16 = listen.rsplit(':').next().unwrap().parse().unwrap();
    for host in ["c", "d"] {
        let log = tmp.path().join(format!("worker-late-{host}.log"));
        let late = sweeps::worker_join(port, host, &log);
        assert_succeeds(late, Duration::from_secs(30), "a worker joining a finished job", &log);
        let said = std::fs::read_to_string(&log).unwrap();
        assert!(said.contains("the job is finished: nothing is left to train"), "{said}");
    }
    let told_after = started.elapsed();
    assert_succeeds(coordinator, Duration::from_secs(60), "a start on a finished job", &again_log);
    let again_after = started.elapsed();
    let output = std::fs::read_to_string(&again_log).unwrap();
    assert!(
        output.contains("--auto-resume: the job in ")
            && output.contains(&format!(
                "ends its last epoch: 4 of 4, {} updates); nothing is left to train",
                state.updates
            )),
        "{output}"
    );
    assert!(output.contains("2 host(s) told the job is finished"), "{output}");
    assert!(again_after < Duration::from_secs(20), "it ended after {again_after:?}");
    assert_eq!(std::fs::read(k.out.join("metrics.jsonl")).unwrap(), metrics_before);
    println!(
        "a job whose ranks finished while its coordinator was away ended {:.1} s after the \
         --auto-resume restart ({:.1} s after --restore on a copy); metrics.jsonl took the \
         {taken_after_restart} records rank 0 made after the first coordinator's last; a \
         third start on the finished job told its 2 hosts so within {:.1} s and exited after \
         {:.1} s",
        ended_after.as_secs_f64(),
        restore_ended_after.as_secs_f64(),
        told_after.as_secs_f64(),
        again_after.as_secs_f64(),
    );
}

/// A job whose coordinator and hosts were all killed (a Slurm requeue after
/// a node failure, a Kubernetes Job applied again): the restarted
/// coordinator (`--auto-resume`, its state file saying the job still ran)
/// waits for the old agents (25 s: an agent may take that long to call a
/// restarted coordinator), telling the new hosts to join again meanwhile; none comes back, so it takes the new hosts, which
/// continue from the newest checkpoint in the run folder, which the old
/// ranks may have written after the coordinator died (they stop with one
/// when their agents' death sends them SIGTERM): newer than the last one
/// the dead coordinator committed.
#[test]
fn an_auto_resume_restart_after_the_whole_job_died_continues_it_on_the_hosts_that_join() {
    let tmp = tempfile::tempdir().unwrap();
    let k = stop_an_auto_resume_coordinator(tmp.path(), "KILL", 6, &[]);
    let ranks: Vec<u32> = k
        .workers
        .iter()
        .flat_map(|w| rsb_integration_tests::processes::descendants(w.id()))
        .collect();
    assert!(!ranks.is_empty(), "the workers run ranks");
    for mut worker in k.workers {
        assert!(signal(worker.id(), "KILL"));
        let _ = worker.wait();
    }
    let start = Instant::now();
    while ranks.iter().any(|&pid| rsb_integration_tests::processes::parent_of(pid).is_some()) {
        assert!(start.elapsed() < Duration::from_secs(120), "the old ranks did not stop");
        std::thread::sleep(Duration::from_millis(100));
    }
    let newest = rsb_job::checkpoint::resolve(&k.out).expect("an intact checkpoint");
    let stopped_at = rsb_job::checkpoint::read_state(newest.path()).expect("state.json")["updates"]
        .as_u64()
        .expect("updates");
    let saved: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(k.out.join("coordinator-state.json")).unwrap(),
    )
    .unwrap();
    let committed = saved["checkpoints"].as_array().unwrap().last().unwrap()["step"].as_u64();
    let committed = committed.expect("the dead coordinator committed a checkpoint");
    assert!(stopped_at >= committed, "{stopped_at} < {committed}");

    let log = tmp.path().join("coordinator-2.log");
    let args: Vec<&str> = k.args.iter().map(String::as_str).collect();
    let second = sweeps::coordinator_up(&k.out, &k.sets, &args, &log);
    let port = k.args[1].rsplit(':').next().unwrap().parse().unwrap();
    let restarted = Instant::now();
    let workers: Vec<_> = ["c", "d"]
        .iter()
        .map(|name| sweeps::worker_join(port, name, &tmp.path().join(format!("worker-{name}.log"))))
        .collect();
    wait_until("the first update after the restart", &log, || {
        all_records(&k.out).iter().skip(k.records_before).any(|r| r["kind"] == "step")
    });
    let first_update = restarted.elapsed();
    assert_succeeds(second, Duration::from_secs(240), "the restarted coordinator", &log);
    let output = std::fs::read_to_string(&log).unwrap();
    let gave_up = ["(a, b)", "(b, a)"]
        .map(|hosts| format!("none of the job's host(s) {hosts} came back within 25s"));
    assert!(gave_up.iter().any(|line| output.contains(line.as_str())), "{output}");
    for (name, worker) in ["c", "d"].into_iter().zip(workers) {
        let log = tmp.path().join(format!("worker-{name}.log"));
        assert_succeeds(worker, Duration::from_secs(30), "a new worker", &log);
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("first waits for the job's own hosts"), "{text}");
    }
    let generations = run_records(&k.out, "generation");
    // Hosts in join order: the new ones in whichever order they came.
    let hosts: Vec<Vec<&str>> = generations
        .iter()
        .map(|g| {
            let mut hosts: Vec<&str> =
                g["hosts"].as_array().unwrap().iter().map(|h| h.as_str().unwrap()).collect();
            hosts.sort();
            hosts
        })
        .collect();
    assert_eq!(hosts, [["a", "b"], ["a", "b"], ["c", "d"]], "{generations:?}");
    let taken = &generations[2];
    assert_eq!(taken["reasons"][0]["kind"], "lost_host", "{taken}");
    assert_eq!(taken["resume_from"].as_str(), k.out.canonicalize().unwrap().to_str(), "{taken}");
    // The new ranks went on from the newest checkpoint on disk.
    let after: Vec<_> = all_records(&k.out).split_off(k.records_before);
    let first_step = after.iter().find(|r| r["kind"] == "step").expect("updates after the restart");
    assert_eq!(first_step["step"].as_u64().unwrap(), stopped_at + 1, "{first_step}");
    let last = run_records(&k.out, "step").last().cloned().unwrap();
    assert_eq!(last["step"].as_u64().unwrap(), planned_updates(&k.out), "{last}");
    println!(
        "coordinator and hosts kill -9, restarted with the same --auto-resume command line and \
         two new hosts: continued from update {stopped_at}, the newest checkpoint on disk (the \
         dead coordinator had recorded update {} and committed the checkpoint of update \
         {committed}); first update {:.1} s after the restart (the old hosts' wait: 25 s)",
        k.recorded,
        first_update.as_secs_f64()
    );
}

/// A job stopped (SIGTERM) while it waited for its hosts, one of two
/// joined: the same `--auto-resume` command line started again does not
/// restore it (no rank ever trained, and the joined host's rank died with
/// the old coordinator's connection) but starts it anew. The joined host's
/// agent, unknown to the new job, stops its ranks and joins it again; with
/// a second host, the job runs to its end.
#[test]
fn an_auto_resume_restart_of_a_job_that_never_started_starts_it_anew() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fashion_subset(tmp.path(), 8, 2);
    let out = tmp.path().join("run");
    let sets = job_sets(&data, 2);
    let port = free_port("127.0.0.1");
    let listen = format!("127.0.0.1:{port}");
    let args = ["--listen", listen.as_str(), "--nodes", "2", "--auto-resume"];
    let first_log = tmp.path().join("coordinator-1.log");
    let first = sweeps::coordinator_up(&out, &sets, &args, &first_log);
    let early_log = tmp.path().join("worker-a.log");
    let early = sweeps::worker_join(port, "a", &early_log);
    wait_until("one of the two hosts joined", &first_log, || {
        std::fs::read_to_string(&first_log).unwrap_or_default().contains("joined (1/2 hosts)")
    });
    assert!(signal(first.id(), "TERM"));
    let stopped = wait_with_timeout(first, Duration::from_secs(30), "the stopped coordinator");
    assert!(!stopped.status.success());
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("coordinator-state.json")).unwrap())
            .unwrap();
    assert!(state["ended"].is_null() && state["started"] == false, "{state}");

    let log = tmp.path().join("coordinator-2.log");
    let second = sweeps::coordinator_up(&out, &sets, &args, &log);
    let late_log = tmp.path().join("worker-b.log");
    let late = sweeps::worker_join(port, "b", &late_log);
    assert_succeeds(second, Duration::from_secs(240), "the restarted coordinator", &log);
    let output = std::fs::read_to_string(&log).unwrap();
    assert!(!output.contains("restored job"), "{output}");
    assert_succeeds(late, Duration::from_secs(30), "the new worker", &late_log);
    assert_succeeds(early, Duration::from_secs(30), "the early worker", &early_log);
    let said = std::fs::read_to_string(&early_log).unwrap();
    assert!(said.contains("does not know member") && said.contains("joining it again"), "{said}");
    let generations = run_records(&out, "generation");
    assert_eq!(generations.len(), 1, "{generations:?}");
    assert_eq!(generations[0]["reasons"][0]["kind"], "start", "{generations:?}");
    let mut hosts: Vec<&str> =
        generations[0]["hosts"].as_array().unwrap().iter().map(|h| h.as_str().unwrap()).collect();
    hosts.sort();
    assert_eq!(hosts, ["a", "b"]);
    let last = run_records(&out, "step").last().cloned().unwrap();
    assert_eq!(last["step"].as_u64().unwrap(), planned_updates(&out), "{last}");
}

/// Host c joins the running job of host a and its rank waits for its
/// assignment, which comes when c is admitted at the next committed
/// checkpoint; before then the coordinator is stopped (SIGTERM, a pod
/// evicted) and started again with the same command line. The restored
/// generation admits c, and c's rank, whose call the stop cut, asks again
/// until the coordinator answers and trains in that generation: the job
/// needs no generation but the restored one, and no rank fails. Before, c's
/// rank died with the coordinator's connection; its agent, which had never
/// seen a generation of its own, took the restored one for its dead ranks'
/// and waited, and the job lost a rendezvous deadline and a restart to c.
#[test]
fn a_rank_waiting_for_its_assignment_outlives_a_coordinator_restart() {
    let tmp = tempfile::tempdir().unwrap();
    // 125 updates an epoch, checkpoints at epoch ends only: c waits long
    // enough for the stop to come first.
    let data = fashion_subset(tmp.path(), 200, 2);
    let out = tmp.path().join("run");
    let mut sets = job_sets(&data, 1);
    sets.retain(|s| !s.starts_with("runtime.checkpoint_every_updates"));
    let port = free_port("127.0.0.1");
    let listen = format!("127.0.0.1:{port}");
    let args = ["--listen", &listen, "--nodes", "1", "--max-nodes", "2", "--auto-resume"];
    let first_log = tmp.path().join("coordinator-1.log");
    let first = sweeps::coordinator_up(&out, &sets, &args, &first_log);
    let a = sweeps::worker_join(port, "a", &tmp.path().join("worker-a.log"));
    wait_until("the first update", &first_log, || !run_records_or_empty(&out, "step").is_empty());
    let c_log = tmp.path().join("worker-c.log");
    let c = sweeps::worker_join(port, "c", &c_log);
    wait_until("host c's rank process", &first_log, || {
        std::fs::read_to_string(&first_log).unwrap_or_default().contains("admitted at its next")
            && !rsb_integration_tests::processes::descendants(c.id()).is_empty()
    });
    // Its rank loads libtorch, connects and asks for its assignment (the
    // call is sent on the connection made before it says so).
    wait_until("host c's rank to ask for its assignment", &first_log, || {
        std::fs::read_to_string(&c_log)
            .unwrap_or_default()
            .contains("asking the coordinator for this rank's assignment")
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(run_records_or_empty(&out, "generation").len() == 1, "c was admitted too soon");
    assert!(signal(first.id(), "TERM"));
    let stopped = wait_with_timeout(first, Duration::from_secs(30), "the stopped coordinator");
    assert!(!stopped.status.success());
    let stopped_at = Instant::now();
    let records_before = all_records(&out).len();
    std::thread::sleep(Duration::from_secs(2));
    let log = tmp.path().join("coordinator-2.log");
    let second = sweeps::coordinator_up(&out, &sets, &args, &log);
    wait_until("the first update after the restart", &log, || {
        all_records(&out).iter().skip(records_before).any(|r| r["kind"] == "step")
    });
    let recovered = stopped_at.elapsed();
    assert_succeeds(second, Duration::from_secs(240), "the restarted coordinator", &log);
    assert_succeeds(c, Duration::from_secs(30), "worker c", &c_log);
    assert_succeeds(a, Duration::from_secs(30), "worker a", &tmp.path().join("worker-a.log"));
    let said = std::fs::read_to_string(&c_log).unwrap();
    assert!(!said.contains("exited with"), "a rank of c failed:\n{said}");
    // Its call was cut, and made again (the stop came first).
    assert!(said.contains("no assignment from the coordinator"), "{said}");
    assert!(said.contains("assignment received"), "{said}");
    let generations = run_records(&out, "generation");
    let kinds: Vec<&serde_json::Value> =
        generations.iter().map(|g| &g["reasons"][0]["kind"]).collect();
    assert_eq!(kinds, ["start", "coordinator_restarted"], "{generations:#?}");
    assert_eq!(generations[1]["world_size"], 2, "{generations:#?}");
    let last = run_records(&out, "step").last().cloned().unwrap();
    assert_eq!(last["step"].as_u64().unwrap(), planned_updates(&out), "{last}");
    println!(
        "coordinator SIGTERM while host c's rank waited for its assignment, started again 2 s \
         later: first update of the restored generation (a, c) {:.1} s after the stop",
        recovered.as_secs_f64()
    );
}

/// A job started with `--auto-resume` and no token writes one into the run
/// folder for its workers; started again the same way, it keeps that token
/// (its workers may have read the file), as `--restore` does, unless the
/// file cannot be used.
#[test]
fn an_auto_resume_start_without_a_token_keeps_the_one_the_first_start_wrote() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fashion_subset(tmp.path(), 2, 1);
    let out = tmp.path().join("run");
    let start = |name: &str| {
        let listen = format!("127.0.0.1:{}", free_port("127.0.0.1"));
        let args =
            ["--listen", &listen, "--nodes", "1", "--join-timeout-secs", "1", "--auto-resume"];
        let mut cmd = sweeps::coordinator_up_command(&out, &job_sets(&data, 6), &args);
        let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn();
        let done = wait_with_timeout(child.unwrap(), Duration::from_secs(60), name);
        assert!(!done.status.success(), "no host joined: the job fails");
        String::from_utf8_lossy(&done.stdout).into_owned()
    };
    let first = start("the first start");
    assert!(first.contains("job token written to"), "{first}");
    let token = std::fs::read_to_string(out.join("job.token")).unwrap();
    let second = start("the second start");
    assert!(second.contains("job token from") && second.contains("job.token"), "{second}");
    assert_eq!(std::fs::read_to_string(out.join("job.token")).unwrap(), token);
    // One that cannot be used (emptied) is named and replaced, not fatal.
    std::fs::write(out.join("job.token"), "").unwrap();
    let third = start("the third start");
    assert!(third.contains("cannot be used") && third.contains("job token written to"), "{third}");
    let replaced = std::fs::read_to_string(out.join("job.token")).unwrap();
    assert!(replaced.trim().len() >= 16 && replaced != token, "{replaced:?}");
}

/// The records of `kind` so far (none while the file does not exist).
fn run_records_or_empty(out: &Path, kind: &str) -> Vec<serde_json::Value> {
    all_records(out).into_iter().filter(|r| r["kind"] == kind).collect()
}
