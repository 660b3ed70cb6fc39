//! A straggler is named: rank 1 of a 3-rank TCP-ring job is slowed down from
//! outside (SIGSTOP and SIGCONT in turn: it runs a third of the time), as a
//! throttled or shared host would be. The step records written while it is
//! slowed name it as the rank the others wait for, the coordinator's progress
//! lines name it with its host, and rank 0's log warns about it.

use rsb_integration_tests::processes::{descendants, holder_of, parent_of, signal};
use rsb_integration_tests::sweeps::{start, wait_until};
use rsb_integration_tests::{binary, fashion_subset, records_in};
use rsb_job::{MetricsRecord, RankBalance};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Updates per log step (per window of rank times).
const LOG_EVERY: u64 = 4;
/// The warning threshold set for the job.
const WARN_RATIO: f64 = 1.3;

/// The step records a rank has written so far (none before its file
/// exists; a line still being written is left out).
fn steps_so_far(file: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["kind"] == "step")
        .collect()
}

#[test]
fn a_slowed_rank_is_named_as_the_straggler_in_the_records_and_the_coordinators_lines() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // 480 training images, 24 per update: 20 updates per epoch.
    let data = fashion_subset(tmp.path(), 48, 4);
    let out = tmp.path().join("run");
    let log = tmp.path().join("coordinator.log");
    let _ = binary("worker");
    let sets: Vec<String> = vec![
        format!("data.root={}", data.display()),
        "model.num_classes=10".into(),
        // Three sampler streams, one per rank.
        "batch.global_size=24".into(),
        "batch.repeated_augmentation=1".into(),
        "schedule.cosine.epochs=2".into(),
        "eval.every_epochs=2".into(),
        format!("runtime.log_every_steps={LOG_EVERY}"),
        format!("distributed.straggler_warn_ratio={WARN_RATIO}"),
    ];
    let mut coordinator = start(&out, &sets, &["--nodes", "3"], &log);
    let rank_file = |rank: u32, ext: &str| out.join(format!("ranks/rank-{rank}.{ext}"));
    wait_until("the first step record", &log, || {
        !steps_so_far(&rank_file(0, "jsonl")).is_empty()
            || coordinator.try_wait().ok().flatten().is_some()
    });
    let first_steps = steps_so_far(&rank_file(0, "jsonl"));
    let throttled_from = first_steps.last().expect("the job ended before its first step")["step"]
        .as_u64()
        .expect("a step record has a step");
    let job = descendants(coordinator.id());
    let slowed = holder_of(&job, &rank_file(1, "log")).expect("no process holds rank-1.log");
    // Rank 1 runs 60 ms in every 180.
    let done = Arc::new(AtomicBool::new(false));
    let throttle = {
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            // Until the job is over, or rank 1 is (its pid may be reused).
            while !done.load(Ordering::Relaxed) && parent_of(slowed).is_some() {
                signal(slowed, "STOP");
                std::thread::sleep(Duration::from_millis(120));
                signal(slowed, "CONT");
                std::thread::sleep(Duration::from_millis(60));
            }
            signal(slowed, "CONT");
        })
    };
    let limit = Duration::from_secs(400);
    let started = Instant::now();
    let status = loop {
        if let Some(status) = coordinator.try_wait().expect("try_wait") {
            break Some(status);
        }
        if started.elapsed() > limit {
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    done.store(true, Ordering::Relaxed);
    throttle.join().expect("the throttling thread");
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    if status.is_none() {
        let _ = coordinator.kill();
        for pid in descendants(coordinator.id()) {
            let _ = signal(pid, "KILL");
        }
        let _ = coordinator.wait();
        panic!("the job did not end within {limit:?}:\n{output}");
    }
    assert!(status.is_some_and(|s| s.success()), "the job failed:\n{output}");

    // Each step record's update count and balance, typed.
    let steps: Vec<(u64, Option<RankBalance>)> = records_in(&out.join("metrics.jsonl"), "step")
        .into_iter()
        .map(|r| match serde_json::from_value(r) {
            Ok(MetricsRecord::Step { step, rank_balance, .. }) => (step, rank_balance),
            other => panic!("not a step record: {other:?}"),
        })
        .collect();
    for (step, balance) in &steps {
        eprintln!("step {step}: {balance:?}");
    }
    eprintln!("slowed from step {throttled_from}");
    // Every window of the job measured its balance (a CPU ring job).
    assert!(steps.iter().all(|(_, b)| b.is_some()), "{steps:#?}");
    // The windows wholly inside the slowed time.
    let windows: Vec<RankBalance> = steps
        .iter()
        .filter(|(step, _)| *step >= throttled_from + 2 * LOG_EVERY)
        .filter_map(|(_, b)| *b)
        .collect();
    assert!(windows.len() >= 4, "only {} slowed windows:\n{output}", windows.len());
    let named = windows.iter().filter(|b| b.slowest_rank == 1 && b.straggles(WARN_RATIO)).count();
    // A loaded machine may blur a window; most must name rank 1.
    assert!(
        named * 4 >= windows.len() * 3,
        "{named} of {} slowed windows name rank 1 as the straggler: {windows:#?}",
        windows.len()
    );
    assert!(
        output.lines().any(|l| l.contains("; straggler: rank 1 on ")
            && l.contains("the other ranks' median time per update")),
        "the coordinator never named rank 1 and its host as the straggler:\n{output}"
    );
    let rank_log = std::fs::read_to_string(rank_file(0, "log")).unwrap_or_default();
    assert!(
        rank_log.lines().any(|l| l.contains("straggler at update") && l.contains("rank 1 took")),
        "rank 0 did not warn about rank 1:\n{rank_log}"
    );
}
