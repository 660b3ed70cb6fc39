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

use rsb_integration_tests::processes::{cmdline, descendants, signal, wait_with_timeout};
use rsb_integration_tests::sweeps::{self, wait_until};
use rsb_integration_tests::{fashion_subset, run_records};
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
