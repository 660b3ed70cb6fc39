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
//! * SIGTERM to the agent of rank 0's host (a preemption), whose stop
//!   checkpoint takes longer than the heartbeat timeout: the host leaves
//!   once it is written, and the job goes on without it from it, losing no
//!   update and spending no restart;
//! * a third host joins a running 2-host job (`--max-nodes 3`): it is
//!   admitted at the next committed checkpoint, losing no update;
//! * with the default `--min-nodes` (= `--nodes`) a lost host still fails
//!   the job at once, naming it;
//! * `kill -9` of one of four hosts of a 4-stream job: the 3 hosts left
//!   cannot split the batch, so 2 of them go on and the third stands by
//!   (its agent restarts its rank to wait); a fifth host's join then lets
//!   4 run again, at the next checkpoint, and the job finishes.

use rsb_integration_tests::elastic_records::{
    all_records, assert_shrunk_without, planned_updates, position, steps_before,
};
use rsb_integration_tests::processes::{children_of, signal, wait_with_timeout};
use rsb_integration_tests::{binary, fashion_subset, records_in, workspace_root};
use rsb_integration_tests::{free_port, small_batch_sets, tiny_recipe};
use rsb_train::sample_trace::SampleRecord;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The job token of these jobs (given through the environment).
const TOKEN: &str = "elastic-test-token-7d2e91b3";

/// `runtime.checkpoint_every_updates` of the job that loses a host.
const CHECKPOINT_INTERVAL: u64 = 2;

/// The `--set`s of a job of `epochs` short epochs on `data`.
fn sets(data: &Path, epochs: u32) -> Vec<String> {
    let mut sets = small_batch_sets(data);
    sets.extend([
        format!("schedule.cosine.epochs={epochs}"),
        "eval.every_epochs=1000".into(),
        // Three kept, not every one (a test's checkpoints once took
        // gigabytes): these jobs restart from the newest committed one before
        // the old ranks could write three more (and `a_grow_goes_on…` tests
        // a restart whose checkpoint retention deleted).
        "runtime.keep_last_checkpoints=3".into(),
    ]);
    sets
}

/// `coordinator up` for the tiny recipe over `epochs` short epochs, with
/// `extra` arguments.
fn coordinator(port: u16, data: &Path, out: &Path, epochs: u32, extra: &[&str]) -> Child {
    let sets = sets(data, epochs);
    let mut cmd = Command::new(binary("coordinator"));
    cmd.args(["up", "--listen", &format!("127.0.0.1:{port}"), "--recipe"])
        .arg(tiny_recipe())
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
    worker_command(port, name).spawn().expect("starting worker join")
}

/// The command line of [`worker`].
fn worker_command(port: u16, name: &str) -> Command {
    let mut command = Command::new(binary("worker"));
    command
        .args(["join", "--coordinator", &format!("http://127.0.0.1:{port}")])
        .args(["--devices", "cpu", "--cores", "1", "--host-name", name])
        .env("RSB_JOB_TOKEN", TOKEN)
        // Which samples each update used (cheap; read by the kill test).
        .env("RSB_TRACE_SAMPLES", "1")
        .current_dir(workspace_root())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command
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

/// Waits (at most 400 s) for the job of `up` to end, which must succeed
/// (else the failure `after` what, with every output, is the test's), then
/// for each of `workers`, which must succeed too.
fn assert_job_and_workers_succeed(up: Child, workers: Vec<Child>, out: &Path, after: &str) {
    let output = wait_with_timeout(up, Duration::from_secs(400), "the elastic job");
    if !output.status.success() {
        panic!("the job failed{after}:\n{}", report(&output, workers, out));
    }
    for (i, w) in workers.into_iter().enumerate() {
        let o = wait_with_timeout(w, Duration::from_secs(60), "worker join");
        assert!(o.status.success(), "worker {i}: {}", String::from_utf8_lossy(&o.stderr));
    }
}

fn setup(tag: &str) -> (tempfile::TempDir, PathBuf, PathBuf, u16) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = fashion_subset(tmp.path(), 4, 1);
    let out = tmp.path().join(tag);
    (tmp, data, out, free_port("127.0.0.1"))
}

/// Epochs of the job that loses a host.
const KILL_EPOCHS: u32 = 5;

/// `coordinator up` for the job that loses a host (3 hosts, `--min-nodes
/// 2`), with extra `--set`s and then `args`.
fn shrinking_job(port: u16, data: &Path, out: &Path, sets: &[String], args: &[&str]) -> Child {
    let interval = format!("runtime.checkpoint_every_updates={CHECKPOINT_INTERVAL}");
    let mut extra = vec!["--nodes", "3", "--min-nodes", "2", "--heartbeat-timeout-secs", "8"];
    extra.extend(args);
    extra.extend(["--set", &interval]);
    for set in sets {
        extra.extend(["--set", set]);
    }
    coordinator(port, data, out, KILL_EPOCHS, &extra)
}

/// The last epoch's (mean training loss, validation loss) of a finished run.
fn final_losses(out: &Path) -> (f64, f64) {
    let epochs = records_in(&out.join("metrics.jsonl"), "epoch");
    let last = epochs.last().expect("epoch records");
    (last["loss"].as_f64().expect("loss"), last["val_loss"].as_f64().expect("val_loss"))
}

/// Seed noise of the job that loses a host, run uninterrupted (the recipe's
/// seed 0 and four others): its last epoch's training and validation loss.
/// Measured once (the numbers are in the kill test's constants):
/// `cargo test --release -p rsb-integration-tests --test elastic seed_noise -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement (5 jobs, minutes): its results are constants of the kill test"]
fn seed_noise_of_the_uninterrupted_job() {
    let (tmp, data, _, _) = setup("seeds");
    for seed in 0..5 {
        let out = tmp.path().join(format!("seed-{seed}"));
        let port = free_port("127.0.0.1");
        let up = shrinking_job(port, &data, &out, &[format!("seed={seed}")], &[]);
        let workers: Vec<Child> = ["a", "b", "c"].iter().map(|h| worker(port, h)).collect();
        let output = wait_with_timeout(up, Duration::from_secs(400), "the uninterrupted job");
        assert!(output.status.success(), "{}", report(&output, workers, &out));
        for w in workers {
            let _ = wait_with_timeout(w, Duration::from_secs(60), "worker join");
        }
        let (loss, val_loss) = final_losses(&out);
        println!(
            "MEASURED seed {seed}: last epoch training loss {loss}, validation loss {val_loss}"
        );
    }
}

/// The sample records of a run folder that a killed rank may have left with
/// a torn last line (that line, of an update it never finished, is skipped).
fn sample_records(out: &Path) -> Vec<SampleRecord> {
    let folder = out.join("samples");
    let mut records = Vec::new();
    for entry in std::fs::read_dir(&folder).expect("samples/") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("a sample trace");
        let lines: Vec<&str> = text.lines().collect();
        for (n, line) in lines.iter().enumerate() {
            match serde_json::from_str::<SampleRecord>(line) {
                Ok(r) => records.push(r),
                Err(e) if n + 1 == lines.len() => {
                    eprintln!("{}: torn last line: {e}", path.display())
                }
                Err(e) => panic!("{} line {}: {e}", path.display(), n + 1),
            }
        }
    }
    records
}

/// Checks from the sample traces that every (update, stream) of the run
/// was trained, that an update redone after the shrink used the same
/// samples, and that, counting each update once (its last run), every
/// sample of every epoch was used exactly as often as the sampler planned
/// (repeated augmentation's copies included). Returns the updates trained
/// more than once (lost by the kill and redone).
fn assert_every_sample_as_planned(out: &Path, data: &Path, updates: u64) -> u64 {
    let recipe = rsb_recipes::load(&tiny_recipe(), &sets(data, KILL_EPOCHS)).expect("recipe");
    let train = rsb_train::trainer::train_data(&recipe).expect("training data");
    let sampler = train.sampler();
    let streams: Vec<usize> = (0..sampler.num_streams()).collect();
    let per_epoch = sampler.steps_per_epoch(2);
    assert_eq!(per_epoch * u64::from(KILL_EPOCHS), updates);
    // Per (update, stream): the run of the invocation that started last.
    let mut counted: BTreeMap<(u64, usize), SampleRecord> = BTreeMap::new();
    let mut runs: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    for r in sample_records(out) {
        runs.entry(r.update).or_default().insert(r.start_update);
        match counted.get(&(r.update, r.stream)) {
            Some(seen) => {
                assert_eq!(
                    seen.indices, r.indices,
                    "update {} stream {} redone with other samples",
                    r.update, r.stream
                );
                if r.start_update > seen.start_update {
                    counted.insert((r.update, r.stream), r);
                }
            }
            None => {
                counted.insert((r.update, r.stream), r);
            }
        }
    }
    let want: Vec<(u64, usize)> =
        (0..updates).flat_map(|u| streams.iter().map(move |&s| (u, s))).collect();
    assert_eq!(counted.keys().copied().collect::<Vec<_>>(), want, "updates or streams missing");
    for epoch in 0..u64::from(KILL_EPOCHS) {
        let mut planned: BTreeMap<usize, u32> = BTreeMap::new();
        for list in sampler.remaining_indices(epoch, 0, 2, &streams) {
            for index in list {
                *planned.entry(index).or_default() += 1;
            }
        }
        let mut seen: BTreeMap<usize, u32> = BTreeMap::new();
        for r in counted.values().filter(|r| r.epoch == epoch) {
            for &index in &r.indices {
                *seen.entry(index).or_default() += 1;
            }
        }
        assert_eq!(
            seen, planned,
            "epoch {epoch}: samples used (index -> times) differ from the plan"
        );
    }
    runs.values().filter(|starts| starts.len() > 1).count() as u64
}

/// The kill test's job run uninterrupted with the recipe's seed 0: its last
/// epoch's mean training loss and validation loss. Measured once with
/// `seed_noise_of_the_uninterrupted_job` (2-core Intel Xeon; other CPUs
/// differ by float rounding only, far below the seed noise).
const REFERENCE_LOSS: f64 = 0.583_013_9;
const REFERENCE_VAL_LOSS: f64 = 2.308_305_4;

/// Seed noise: the range (max - min) of the same numbers over seeds 0-4,
/// uninterrupted. Training loss: 0.56596, 0.57242, 0.57317, 0.58301,
/// 0.58670 (range 0.0207, standard deviation 0.0084); validation loss
/// (10 images, still near ln 10 = 2.303 after 5 tiny epochs, so the weaker
/// check): 2.3083, 2.3088, 2.3351, 2.3391, 2.3439 (range 0.0356). The kill
/// test's run (seed 0) must end within one range of seed 0's uninterrupted
/// numbers: the shrink changes only the order of the gradient sums (float
/// rounding, which LAMB amplifies), never the batches, the schedule or the
/// optimizer state, so it should differ no more than another seed does.
const LOSS_SEED_RANGE: f64 = 0.0207;
const VAL_LOSS_SEED_RANGE: f64 = 0.0356;

/// Waits until the job of `up` is mid-run: after the first epoch and a
/// mid-epoch checkpoint after it (a step record past it means rank 0
/// committed it: it commits before the next update).
fn wait_until_mid_run(out: &Path, up: &mut Child) {
    wait_for_records(out, up, "an update after a mid-epoch checkpoint", |records| {
        let first = records.iter().find(|r| r["kind"] == "epoch").and_then(|r| r["step"].as_u64());
        first.is_some_and(|f| {
            records
                .iter()
                .any(|r| r["kind"] == "step" && r["step"].as_u64() > Some(f + CHECKPOINT_INTERVAL))
        })
    });
}

/// Waits until the job of `up` has trained an update in a generation of 2
/// hosts (after losing one of its 3).
fn wait_until_shrunk(out: &Path, up: &mut Child) {
    wait_for_records(out, up, "an update after the shrink", |records| {
        position(records, "generation", |g| g["world_size"] == 2)
            .is_some_and(|at| records[at..].iter().any(|r| r["kind"] == "step"))
    });
}

/// Asserts that the finished run of `out` ended within seed noise of the
/// same job run uninterrupted; returns its (training, validation) loss.
fn assert_losses_within_seed_noise(out: &Path) -> (f64, f64) {
    // The shrink changes the order of the gradient sums (float rounding,
    // which LAMB amplifies) but not the batches, the schedule or the
    // optimizer state.
    let (loss, val_loss) = final_losses(out);
    assert!(
        (loss - REFERENCE_LOSS).abs() <= LOSS_SEED_RANGE,
        "last epoch's training loss {loss}, uninterrupted {REFERENCE_LOSS}: more than the seed \
         range {LOSS_SEED_RANGE} apart"
    );
    assert!(
        (val_loss - REFERENCE_VAL_LOSS).abs() <= VAL_LOSS_SEED_RANGE,
        "validation loss {val_loss}, uninterrupted {REFERENCE_VAL_LOSS}: more than the seed \
         range {VAL_LOSS_SEED_RANGE} apart"
    );
    (loss, val_loss)
}

#[test]
fn a_killed_host_is_dropped_and_the_job_finishes_from_its_last_checkpoint() {
    let (_tmp, data, out, port) = setup("shrink");
    let mut up = shrinking_job(port, &data, &out, &[], &[]);
    let workers: Vec<Child> = ["a", "b", "c"].iter().map(|h| worker(port, h)).collect();
    wait_until_mid_run(&out, &mut up);
    let victim = workers[2].id();
    let ranks = children_of(victim);
    assert_eq!(ranks.len(), 1, "worker c runs one rank: {ranks:?}");
    assert!(signal(victim, "KILL"), "kill -9 of worker c ({victim})");
    for rank in ranks {
        assert!(signal(rank, "KILL"), "kill -9 of its rank ({rank})");
    }
    // Time to recover: from the kill to the first update of the new generation.
    let killed_at = Instant::now();
    wait_until_shrunk(&out, &mut up);
    let recovery = killed_at.elapsed();
    let mut workers = workers;
    let _killed = workers.remove(2).wait();
    assert_job_and_workers_succeed(up, workers, &out, " after losing a host");
    let lost = assert_shrunk_without(&out, "c", CHECKPOINT_INTERVAL, u64::from(KILL_EPOCHS));
    let redone = assert_every_sample_as_planned(&out, &data, planned_updates(&out));
    // Trained twice: the lost updates and the one (or, if host c's rank had
    // begun the next, two) that the kill interrupted.
    assert!(redone <= CHECKPOINT_INTERVAL + 2, "{redone} updates trained twice ({lost} lost)");
    let (loss, val_loss) = assert_losses_within_seed_noise(&out);
    // Measured numbers for the README's table (the assertions above bound them).
    println!(
        "MEASURED kill -9 of 1 of 3 hosts: {lost} updates lost (checkpoint every \
         {CHECKPOINT_INTERVAL}), {redone} trained twice, first update of the new generation \
         {:.1} s after the kill (heartbeat timeout 8 s); last epoch loss {loss} (uninterrupted \
         {REFERENCE_LOSS}), validation loss {val_loss} (uninterrupted {REFERENCE_VAL_LOSS})",
        recovery.as_secs_f64()
    );
}

/// How much longer than its others a stop checkpoint's write takes in
/// [`a_stopped_host_leaves_at_once_and_the_job_resumes_from_its_stop_checkpoint`]:
/// more than the heartbeat timeout (8 s).
const STOP_CHECKPOINT_DELAY_MS: &str = "12000";

#[test]
fn a_stopped_host_leaves_at_once_and_the_job_resumes_from_its_stop_checkpoint() {
    // A preemption (a pod deleted, a node drained): SIGTERM to the agent of
    // rank 0's host, which stops its rank; every rank stops after the same
    // update, rank 0 writing a stop checkpoint, which takes longer than the
    // heartbeat timeout (a slow disk). That host leaves the job: the next
    // generation runs without it from that checkpoint, spending no restart
    // (`--max-restarts 0`); its agent heartbeats while its rank stops, so it
    // is not dropped for its silence before the checkpoint is written.
    let (_tmp, data, out, port) = setup("stop");
    let mut up = shrinking_job(port, &data, &out, &[], &["--max-restarts", "0"]);
    let hosts = ["a", "b", "c"];
    let mut workers: Vec<Child> = hosts
        .iter()
        .map(|h| {
            let mut command = worker_command(port, h);
            command.env("RSB_STOP_CHECKPOINT_DELAY_MS", STOP_CHECKPOINT_DELAY_MS);
            command.spawn().expect("starting worker join")
        })
        .collect();
    wait_until_mid_run(&out, &mut up);
    // Ranks follow the hosts' join order, one each.
    let first = &records_in(&out.join("metrics.jsonl"), "generation")[0];
    let stopped_host = first["hosts"][0].as_str().expect("the host of rank 0").to_string();
    let index = hosts.iter().position(|h| *h == stopped_host).expect("one of the hosts");
    assert!(signal(workers[index].id(), "TERM"), "SIGTERM to worker {stopped_host}");
    let stopped_at = Instant::now();
    wait_until_shrunk(&out, &mut up);
    let recovery = stopped_at.elapsed();
    let stopped = wait_with_timeout(workers.remove(index), Duration::from_secs(60), "its worker");
    assert_job_and_workers_succeed(up, workers, &out, " after a host stopped");
    let stderr = String::from_utf8_lossy(&stopped.stderr);
    assert!(
        !stopped.status.success() && stderr.contains("worker stopped by SIGTERM"),
        "worker {stopped_host} ({}): {stderr}",
        stopped.status
    );
    let lost =
        assert_shrunk_without(&out, &stopped_host, CHECKPOINT_INTERVAL, u64::from(KILL_EPOCHS));
    assert_eq!(lost, 0, "the new generation resumed from before the stop checkpoint");
    // One generation after the first, dropping the host for its stop alone:
    // no restart of every rank with it still in, no drop for its silence.
    let generations = records_in(&out.join("metrics.jsonl"), "generation");
    assert_eq!(generations.len(), 2, "{generations:#?}");
    let reasons = generations[1]["reasons"].as_array().expect("reasons");
    assert_eq!(reasons.len(), 1, "{reasons:#?}");
    assert_eq!(
        (&reasons[0]["kind"], reasons[0]["host"].as_str()),
        (&"lost_host".into(), Some(stopped_host.as_str()))
    );
    let detail = reasons[0]["detail"].as_str().expect("detail");
    assert!(detail.starts_with("stopped: its rank(s) asked every rank to stop"), "{detail}");
    let redone = assert_every_sample_as_planned(&out, &data, planned_updates(&out));
    assert_eq!(redone, 0, "updates trained twice");
    let (loss, val_loss) = assert_losses_within_seed_noise(&out);
    println!(
        "MEASURED SIGTERM to the host of rank 0, 1 of 3 hosts, its stop checkpoint \
         {STOP_CHECKPOINT_DELAY_MS} ms slower: {lost} updates lost, {redone} trained twice, first \
         update of the new generation {:.1} s after the signal (heartbeat timeout 8 s); last \
         epoch loss {loss} (uninterrupted {REFERENCE_LOSS}), validation loss {val_loss}",
        recovery.as_secs_f64()
    );
}

/// Once the job of `up` and `workers` has trained its first update, host c
/// joins; the job must then finish, and every worker with it.
fn grow_by_host_c(mut up: Child, mut workers: Vec<Child>, port: u16, out: &Path) {
    wait_for_records(out, &mut up, "the first update", |records| {
        records.iter().any(|r| r["kind"] == "step")
    });
    workers.push(worker(port, "c"));
    assert_job_and_workers_succeed(up, workers, out, " after a join");
}

#[test]
fn a_host_joining_a_running_job_is_admitted_at_the_next_checkpoint() {
    let (_tmp, data, out, port) = setup("grow");
    let up = coordinator(port, &data, &out, 5, &["--nodes", "2", "--max-nodes", "3"]);
    let workers: Vec<Child> = ["a", "b"].iter().map(|h| worker(port, h)).collect();
    grow_by_host_c(up, workers, port, &out);
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

/// One checkpoint kept, written every update, and host a's agent slow to
/// restart its rank for a new generation (`RSB_GENERATION_KILL_DELAY_MS`):
/// when host c is admitted at a commit, a's old rank trains on, writes newer
/// checkpoints, and its retention deletes the one the coordinator chose to
/// resume from. Rank 0 of the next generation resumes from the newest
/// intact one after it, saying so, and the job finishes; before, it failed
/// on the missing folder, restart after restart, until the job failed.
#[test]
fn a_grow_goes_on_when_retention_deleted_the_checkpoint_it_was_admitted_at() {
    let (_tmp, data, out, port) = setup("grow-pruned");
    let extra = [
        "--nodes",
        "1",
        "--max-nodes",
        "2",
        "--set",
        "runtime.keep_last_checkpoints=1",
        "--set",
        "runtime.checkpoint_every_updates=1",
    ];
    let up = coordinator(port, &data, &out, 20, &extra);
    let mut a = worker_command(port, "a");
    a.env("RSB_GENERATION_KILL_DELAY_MS", "4000");
    grow_by_host_c(up, vec![a.spawn().expect("starting worker join")], port, &out);
    let records = all_records(&out);
    let at =
        position(&records, "generation", |g| g["world_size"] == 2).expect("a grown generation");
    let chosen = records[at]["resume_from"].as_str().expect("admitted at a checkpoint").to_string();
    let log = std::fs::read_to_string(out.join("ranks/rank-0.log")).unwrap_or_default();
    assert!(
        log.contains(&format!(
            "the checkpoint to resume from, {chosen}, was deleted by the last generation's \
             retention"
        )),
        "the grown generation did not say it resumed past {chosen}:\n{log}"
    );
    // The run ends with its planned updates (its last checkpoint's).
    let last = rsb_job::checkpoint::list(&out).pop().expect("checkpoints");
    let state = rsb_job::checkpoint::read_state(&last).expect("the last checkpoint's state");
    assert_eq!(state["updates"].as_u64(), Some(planned_updates(&out)), "{last:?}: {state}");
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

/// Waits until the job of `up` has trained an update in a generation
/// that `which` picks; returns that generation's record.
fn wait_for_generation(
    out: &Path,
    up: &mut Child,
    what: &str,
    which: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    wait_for_records(out, up, what, |records| {
        position(records, "generation", &which)
            .is_some_and(|at| records[at..].iter().any(|r| r["kind"] == "step"))
    });
    let records = all_records(out);
    records[position(&records, "generation", which).unwrap()].clone()
}

#[test]
fn hosts_left_that_cannot_split_the_batch_go_on_without_one_that_stands_by() {
    let (_tmp, data, out, port) = setup("standby");
    // 4 sampler streams (8 images in micro-batches of 2): worlds of 1, 2, 4.
    let extra = [
        "--nodes",
        "4",
        "--min-nodes",
        "2",
        "--heartbeat-timeout-secs",
        "8",
        "--set",
        "batch.global_size=8",
        "--set",
        "runtime.checkpoint_every_updates=2",
    ];
    let mut up = coordinator(port, &data, &out, 3, &extra);
    let mut workers: Vec<Child> = ["a", "b", "c", "d"].iter().map(|h| worker(port, h)).collect();
    wait_for_generation(&out, &mut up, "the first update", |g| g["world_size"] == 4);
    let victim = workers[3].id();
    let ranks = children_of(victim);
    assert!(signal(victim, "KILL"), "kill -9 of worker d ({victim})");
    for rank in ranks {
        assert!(signal(rank, "KILL"), "kill -9 of its rank ({rank})");
    }
    let _killed = workers.remove(3).wait();
    let shrunk =
        wait_for_generation(&out, &mut up, "an update on 2 hosts", |g| g["world_size"] == 2);
    // The hosts in join order (their ranks'), d left out: the first two go
    // on, the third stands by.
    let first = all_records(&out).into_iter().find(|r| r["kind"] == "generation").unwrap();
    let order: Vec<&str> = first["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|h| h.as_str())
        .filter(|h| *h != "d")
        .collect();
    assert_eq!(order.len(), 3, "{first}");
    assert_eq!(shrunk["hosts"], serde_json::json!(order[..2]), "{shrunk}");
    // (Host d's rank may first be blamed for the collective it broke: a
    // restart with d, until d is found silent.)
    let reason = |kind: &str, host: &str| {
        shrunk["reasons"].as_array().unwrap().iter().any(|r| r["kind"] == kind && r["host"] == host)
    };
    assert!(reason("lost_host", "d") && reason("standing_by", order[2]), "{shrunk}");
    // Host e joins: with it, 4 hosts run again, from a checkpoint.
    workers.push(worker(port, "e"));
    let grown = wait_for_generation(&out, &mut up, "an update with host e", |g| {
        g["hosts"].as_array().is_some_and(|h| h.iter().any(|h| h == "e"))
    });
    assert_eq!(grown["hosts"], serde_json::json!([order[0], order[1], order[2], "e"]), "{grown}");
    assert!(grown["resume_from"].as_str().is_some(), "{grown}");
    assert_job_and_workers_succeed(up, workers, &out, "");
    let records = all_records(&out);
    // No regroup while c stood by: the generation after the shrink is the grown one.
    let generation = |g: &serde_json::Value| g["generation"].as_u64().unwrap();
    let last = records.iter().rfind(|r| r["kind"] == "generation").unwrap();
    assert_eq!(generation(last), generation(&grown), "a later generation: {last}");
    assert_eq!(generation(&grown), generation(&shrunk) + 1, "regrouped between: {grown}");
    let epochs = records_in(&out.join("metrics.jsonl"), "epoch");
    assert_eq!(epochs.last().expect("epoch records")["step"].as_u64(), Some(planned_updates(&out)));
}
