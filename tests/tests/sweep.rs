//! Sweeps that fail and are interrupted, end to end with real binaries, CPU
//! ranks and the tiny recipe (`coordinator up --local --seeds 0..3` on one
//! host, one run at a time):
//!
//! * the rank of the first run is killed (`kill -9`) after the run's first
//!   committed checkpoint: the run is retried, its second attempt resumes
//!   from that checkpoint (its generation record says so), finishes, and
//!   its outcome counts 2 attempts;
//! * the coordinator is then stopped (SIGINT) while the next run trains:
//!   no outcome is recorded for the runs left, and nothing is orphaned;
//! * the same command line again, with `--auto-resume` (as a scheduler
//!   starts it again), runs only those: the finished run's files are
//!   untouched, and every run ends finished;
//! * `coordinator up --resume DIR` of the finished sweep keeps every run
//!   and runs none.
//!
//! A sweep whose hosts are all gone fails after its join timeout, and
//! `--resume` of it refuses a run whose checkpoints are all torn rather
//! than starting the run afresh.
//!
//! And a run whose rank trained it to its end while its sweep's coordinator
//! was down (killed; the host, joined with `worker join`, outlived it): `up
//! --resume DIR` keeps it as finished, with the records that reached only
//! rank 0's own file, and the report counts it.

use rsb_integration_tests::elastic_records::planned_updates;
use rsb_integration_tests::processes::{cmdline, descendants, signal, wait_with_timeout};
use rsb_integration_tests::sweeps::{self, wait_until};
use rsb_integration_tests::{binary, fashion_subset, free_port, run_records};
use rsb_job::{RunEnd, RunOutcome, SweepLayout};
use std::path::Path;
use std::time::{Duration, Instant};

#[test]
fn a_failed_run_retries_from_its_checkpoint_and_an_interrupted_sweep_resumes_what_was_left() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fashion_subset(tmp.path(), 8, 2);
    let dir = tmp.path().join("sweep");
    let layout = SweepLayout::new(&dir);
    let sets = vec![
        format!("data.root={}", data.display()),
        "model.num_classes=10".to_string(),
        // Long enough to kill a rank between the first checkpoint and the end.
        "schedule.cosine.epochs=6".to_string(),
        "runtime.keep_last_checkpoints=3".to_string(),
    ];
    let args = [
        "--nodes",
        "1",
        "--seeds",
        "0..3",
        "--max-parallel-runs",
        "1",
        "--max-retries",
        "1",
        "--auto-resume",
    ];
    let log = tmp.path().join("first.log");
    let up = sweeps::start(&dir, &sets, &args, &log);
    let first = layout.run_dir("seed-000");
    let committed = |run: &Path| {
        let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap_or_default();
        text.lines().filter(|l| l.contains(r#""kind":"epoch""#)).count()
    };
    wait_until("the first run's first checkpoint", &log, || {
        committed(&first) >= 1
            && std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("[seed-000] checkpoint committed")
    });
    let ranks: Vec<u32> =
        descendants(up.id()).into_iter().filter(|&p| cmdline(p).contains(" rank ")).collect();
    assert_eq!(ranks.len(), 1, "one rank process: {ranks:?}");
    assert!(signal(ranks[0], "KILL"));
    wait_until("the retried first run to finish", &log, || {
        RunOutcome::read(&layout, "seed-000").unwrap().is_some()
    });
    let outcome = RunOutcome::read(&layout, "seed-000").unwrap().unwrap();
    assert_eq!((outcome.end, outcome.attempts), (RunEnd::Finished, 2), "{outcome:?}");
    assert!(outcome.failure.as_deref().is_some_and(|f| f.contains("rank 0")), "{outcome:?}");
    let generations = run_records(&first, "generation");
    assert_eq!(generations.len(), 2, "{generations:?}");
    let resumed = generations[1]["resume_from"].as_str().expect("the retry resumes");
    assert!(resumed.starts_with(first.join("checkpoints").to_str().unwrap()), "{resumed}");
    // Its record says from which update, and why the run is tried again.
    assert!(generations[1]["resume_step"].as_u64().is_some_and(|s| s > 0), "{generations:?}");
    let retry = &generations[1]["reasons"][1];
    assert_eq!((retry["kind"].as_str(), retry["attempt"].as_u64()), (Some("retry"), Some(2)));
    assert!(retry["failure"].as_str().is_some_and(|f| f.contains("rank 0")), "{retry}");
    assert_eq!(run_records(&first, "epoch").last().unwrap()["epoch"], 5);

    // Stop the sweep while the second run trains.
    wait_until("the second run's first checkpoint", &log, || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("[seed-001] checkpoint committed")
    });
    let tree = descendants(up.id());
    assert!(signal(up.id(), "INT"));
    let status = wait_with_timeout(up, Duration::from_secs(60), "the stopped coordinator").status;
    assert!(!status.success(), "an interrupted sweep exits non-zero");
    let start = Instant::now();
    while tree.iter().any(|&p| !cmdline(p).is_empty()) {
        assert!(start.elapsed() < Duration::from_secs(30), "processes left: {tree:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(RunOutcome::read(&layout, "seed-001").unwrap().is_none());
    assert!(RunOutcome::read(&layout, "seed-002").unwrap().is_none());
    let first_metrics = std::fs::read(first.join("metrics.jsonl")).unwrap();

    // The same command again: only the two runs left run.
    let log = tmp.path().join("resumed.log");
    let up = sweeps::start(&dir, &sets, &args, &log);
    let status = wait_with_timeout(up, Duration::from_secs(300), "the resumed sweep").status;
    let output = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{output}");
    assert!(output.contains("--auto-resume: continuing the sweep in"), "{output}");
    assert!(output.contains("1 finished before (kept), 2 to run"), "{output}");
    assert!(!output.contains("[seed-000]"), "the finished run ran again:\n{output}");
    assert_eq!(std::fs::read(first.join("metrics.jsonl")).unwrap(), first_metrics);
    // The interrupted run went on from its own checkpoint.
    let generations = run_records(&layout.run_dir("seed-001"), "generation");
    assert_eq!(generations.len(), 2, "{generations:?}");
    assert!(generations[1]["resume_from"].as_str().is_some(), "{generations:?}");
    for id in ["seed-001", "seed-002"] {
        let outcome = RunOutcome::read(&layout, id).unwrap().unwrap();
        assert_eq!(outcome.end, RunEnd::Finished, "{id}: {outcome:?}");
        assert_eq!(run_records(&layout.run_dir(id), "epoch").last().unwrap()["epoch"], 5, "{id}");
    }

    // Resumed once more, by name: every run kept, none run.
    let log = tmp.path().join("finished.log");
    let resume = ["--nodes", "1", "--resume", dir.to_str().unwrap()];
    let up = sweeps::start(&dir, &sets, &resume, &log);
    let status = wait_with_timeout(up, Duration::from_secs(120), "the finished sweep").status;
    let output = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{output}");
    assert!(output.contains("3 finished before (kept), 0 to run"), "{output}");
    assert!(!output.contains("[seed-0"), "a finished run ran again:\n{output}");
}

/// A run its rank trained to the end while the sweep's coordinator was down
/// (killed after the run's first checkpoint; the host's agent, told to wait
/// 300 s for its coordinator, kept its rank training): its final records
/// reached only rank 0's own file. `up --resume DIR` finds the run's end in
/// its folder and keeps it as finished, appending those records to its
/// metrics.jsonl, where it queued the run to resume from its end, which
/// trained no epoch and recorded none, and the report left it out as
/// unfinished. The report counts it.
#[test]
fn a_run_finished_while_its_sweeps_coordinator_was_down_is_kept_as_finished_on_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fashion_subset(tmp.path(), 8, 2);
    let dir = tmp.path().join("sweep");
    let layout = SweepLayout::new(&dir);
    let run = layout.run_dir("seed-000");
    let sets = vec![
        format!("data.root={}", data.display()),
        "model.num_classes=10".to_string(),
        "schedule.cosine.epochs=4".to_string(),
        "runtime.checkpoint_every_updates=2".to_string(),
    ];
    let port = free_port("127.0.0.1");
    let listen = format!("127.0.0.1:{port}");
    let args = ["--listen", &listen, "--nodes", "1", "--seeds", "0..1"];
    let log = tmp.path().join("first.log");
    let up = sweeps::coordinator_up(&dir, &sets, &args, &log);
    // The rank finishes the run without the coordinator (its agent must not
    // give up on it first), then waits 2 s, not 80, for it to take its last
    // reports.
    let patient =
        [("RSB_COORDINATOR_DEADLINE_SECS", "300"), ("RSB_REPORT_FLUSH_DEADLINE_SECS", "2")];
    let worker_log = tmp.path().join("worker.log");
    let worker = sweeps::worker_join_with_env(port, "a", &worker_log, &patient);
    let steps = || {
        let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap_or_default();
        text.lines().filter(|l| l.contains(r#""kind":"step""#)).count()
    };
    wait_until("the run's first checkpoint and another update", &log, || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("[seed-000] checkpoint committed")
            && steps() >= 3
    });
    assert!(signal(up.id(), "KILL"));
    let _ = wait_with_timeout(up, Duration::from_secs(30), "the killed coordinator");
    // The rank trains on to the run's end without it, then exits.
    let start = Instant::now();
    let rank_left = || descendants(worker.id()).iter().any(|&p| cmdline(p).contains(" rank "));
    while rank_left() {
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "the rank did not finish:\n{}",
            std::fs::read_to_string(&worker_log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(signal(worker.id(), "TERM"));
    let _ = wait_with_timeout(worker, Duration::from_secs(30), "the worker");
    assert_eq!(RunOutcome::read(&layout, "seed-000").unwrap(), None, "no coordinator ended it");
    let last = rsb_job::checkpoint::list(&run).pop().expect("checkpoints");
    let end = rsb_job::checkpoint::read_position(&last).expect("the last checkpoint's state");
    assert_eq!(end.updates, planned_updates(&run), "the rank did not reach the end: {last:?}");
    let epochs_before = run_records(&run, "epoch").len();
    assert!(epochs_before < 4, "the coordinator took every epoch record before its kill");

    // Resumed: no host is needed, as no run is left.
    let log = tmp.path().join("resumed.log");
    let resume = ["--listen", &listen, "--nodes", "1", "--resume", dir.to_str().unwrap()];
    let up = sweeps::coordinator_up(&dir, &sets, &resume, &log);
    let status = wait_with_timeout(up, Duration::from_secs(60), "the resumed sweep").status;
    let output = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{output}");
    assert!(
        output.contains(&format!(
            "[seed-000] the run finished while no coordinator ran: {} ends its last epoch (4 of \
             4, {} updates);",
            last.display(),
            end.updates
        )),
        "{output}"
    );
    assert!(output.contains("1 finished before (kept), 0 to run"), "{output}");
    let outcome = RunOutcome::read(&layout, "seed-000").unwrap().expect("an outcome");
    assert_eq!((outcome.end, outcome.attempts), (RunEnd::Finished, 1), "{outcome:?}");
    // Every epoch's record is in the run's file now, the last one evaluated.
    let epochs = run_records(&run, "epoch");
    let numbers: Vec<u64> = epochs.iter().map(|e| e["epoch"].as_u64().unwrap()).collect();
    assert_eq!(numbers, [0, 1, 2, 3], "{epochs:?}");
    assert!(epochs[3]["top1"].as_f64().is_some(), "{}", epochs[3]);

    let report = std::process::Command::new(binary("coordinator"))
        .arg("report")
        .arg(&dir)
        .output()
        .expect("running coordinator report");
    let stdout = String::from_utf8_lossy(&report.stdout);
    assert!(report.status.success(), "{stdout}{}", String::from_utf8_lossy(&report.stderr));
    // Its one run counted: a sweep with none finished is an error.
    let md = std::fs::read_to_string(layout.report_dir().join("report.md")).unwrap();
    assert!(!md.contains("unfinished"), "{md}");
    println!(
        "a sweep run its rank finished while the coordinator was down: {epochs_before} of 4 \
         epoch records taken before the kill, the rest from rank 0's file on resume"
    );
}

/// A sweep whose only host dies mid-run (its agent and rank killed with
/// `kill -9`): the run fails at the heartbeat timeout and is queued again,
/// and with no host left to take it the coordinator gives up once
/// `--join-timeout-secs` passed without a host, naming what is left and how
/// to go on, where it waited for ever. Nothing is recorded as an outcome:
/// `--resume` runs both runs.
#[test]
fn a_sweep_whose_hosts_are_all_gone_fails_after_the_join_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fashion_subset(tmp.path(), 8, 2);
    let dir = tmp.path().join("sweep");
    let layout = SweepLayout::new(&dir);
    let sets = vec![
        format!("data.root={}", data.display()),
        "model.num_classes=10".to_string(),
        "schedule.cosine.epochs=50".to_string(),
    ];
    let port = free_port("127.0.0.1");
    let listen = format!("127.0.0.1:{port}");
    let (heartbeat, join) = (4, 4);
    let args = [
        "--listen",
        &listen,
        "--nodes",
        "1",
        "--seeds",
        "0..2",
        "--max-retries",
        "3",
        "--heartbeat-timeout-secs",
        &heartbeat.to_string(),
        "--join-timeout-secs",
        &join.to_string(),
    ];
    let log = tmp.path().join("up.log");
    let up = sweeps::coordinator_up(&dir, &sets, &args, &log);
    let worker_log = tmp.path().join("worker.log");
    let worker = sweeps::worker_join(port, "a", &worker_log);
    let run = layout.run_dir("seed-000");
    wait_until("the first run's first step", &log, || {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap_or_default()
            .contains(r#""kind":"step""#)
    });
    let host = descendants(worker.id());
    assert!(signal(worker.id(), "KILL"));
    for &p in &host {
        signal(p, "KILL");
    }
    let killed = Instant::now();
    let out = wait_with_timeout(up, Duration::from_secs(120), "the coordinator without hosts");
    let waited = killed.elapsed();
    let output = std::fs::read_to_string(&log).unwrap();
    assert!(!out.status.success(), "{output}");
    assert!(
        output.contains("no run of the sweep trained and no worker host asked for one for 4 s")
            && output.contains("with 2 of 2 run(s) left (0 finished, 0 failed)")
            && output.contains(&format!("coordinator up --resume {}", dir.display())),
        "{output}"
    );
    // The heartbeat timeout, then the join timeout, and the checks' margin.
    let bound = Duration::from_secs(heartbeat + join + 20);
    assert!(waited < bound, "gave up after {waited:?}, past {bound:?}:\n{output}");
    assert!(RunOutcome::read(&layout, "seed-000").unwrap().is_none());
    let _ = wait_with_timeout(worker, Duration::from_secs(10), "the killed worker");
    println!("a sweep without hosts gave up {:.1} s after they were killed", waited.as_secs_f64());

    // A run whose checkpoints are there but none can be resumed from (all
    // torn: a partial copy, a corrupted disk) is refused by `--resume`,
    // naming it, where it started afresh and its first save set them all
    // aside; it waited here for a host until the join timeout.
    let torn = run.join("checkpoints").join("epoch-0001");
    std::fs::create_dir_all(&torn).unwrap();
    std::fs::write(torn.join("model.safetensors"), b"torn").unwrap();
    let log = tmp.path().join("resumed.log");
    let resume = ["--listen", &listen, "--nodes", "1", "--join-timeout-secs", "4"];
    let resume: Vec<&str> = resume.into_iter().chain(["--resume", dir.to_str().unwrap()]).collect();
    let up = sweeps::coordinator_up(&dir, &sets, &resume, &log);
    let out = wait_with_timeout(up, Duration::from_secs(60), "the resumed sweep");
    let output = std::fs::read_to_string(&log).unwrap();
    assert!(!out.status.success(), "{output}");
    assert!(
        output.contains(&format!(
            "sweep run seed-000: its checkpoints cannot be resumed from; move {} aside to run it \
             afresh",
            run.join("checkpoints").display()
        )),
        "{output}"
    );
    assert!(torn.join("model.safetensors").exists(), "the torn checkpoint was moved");
}
