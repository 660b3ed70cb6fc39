//! A coordinator frozen for a while mid-job (SIGSTOP, as a coordinator
//! paused by its host, swapped out or cut off without a reset would be),
//! end to end with `coordinator up --local`, one CPU rank and the tiny
//! recipe, reporting every update. Asserted:
//!
//! * the rank trains on while the coordinator does not answer: its own
//!   `ranks/rank-0.jsonl` gains step records during the freeze (a rank that
//!   waited for each report's answer, up to its deadline, made one update
//!   per deadline);
//! * once the coordinator runs again, the job finishes, and `metrics.jsonl`
//!   holds every update's step record once, in order, and every epoch's
//!   record: nothing reported during the freeze is lost, nor written twice.

use rsb_integration_tests::{binary, fashion_subset, workspace_root};
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long the coordinator stays frozen: longer than a report's old
/// deadline (5 s) and a try's (10 s), shorter than the coordinator's
/// heartbeat timeout (30 s) and the agent's `--coordinator-deadline-secs`
/// (60 s).
const FREEZE: Duration = Duration::from_secs(12);

/// Epochs of the job (10 updates each: 160 images, a global batch of 16).
const EPOCHS: u64 = 5;

/// Updates per epoch.
const UPDATES_PER_EPOCH: u64 = 10;

/// The records of `kind` in a JSON-lines metrics file.
fn records(file: &Path, kind: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["kind"] == kind)
        .collect()
}

fn signal(pid: u32, name: &str) {
    let status = Command::new("kill").args([&format!("-{name}"), &pid.to_string()]).status();
    assert!(status.is_ok_and(|s| s.success()), "kill -{name} {pid}");
}

#[test]
fn a_frozen_coordinator_neither_holds_up_training_nor_loses_its_reports() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = fashion_subset(tmp.path(), 16, 4);
    let out = tmp.path().join("run");
    let mut coordinator = Command::new(binary("coordinator"))
        .args(["up", "--local", "--nodes", "1", "--recipe"])
        .arg(workspace_root().join("recipes/debug/resnet18_tiny_cpu.yaml"))
        .arg("--out")
        .arg(&out)
        .args(["--set", &format!("data.root={}", data.display())])
        .args(["--set", "model.num_classes=10"])
        .args(["--set", &format!("schedule.cosine.epochs={EPOCHS}")])
        .args(["--set", "runtime.log_every_steps=1"])
        .current_dir(workspace_root())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting coordinator up --local");
    let mut stderr = coordinator.stderr.take().unwrap();
    let output = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let rank_file = out.join("ranks/rank-0.jsonl");
    let steps_of_rank = || records(&rank_file, "step").len();
    // Trained a few updates, well before the end.
    let deadline = Instant::now() + Duration::from_secs(240);
    while steps_of_rank() < 3 {
        if Instant::now() > deadline || coordinator.try_wait().unwrap().is_some() {
            let _ = coordinator.kill();
            let _ = coordinator.wait();
            panic!("no third update within 240 s:\n{}", output.join().unwrap());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let steps_at_freeze = steps_of_rank();
    signal(coordinator.id(), "STOP");
    std::thread::sleep(FREEZE);
    let steps_in_freeze = steps_of_rank() - steps_at_freeze;
    signal(coordinator.id(), "CONT");
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(status) = coordinator.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = coordinator.kill();
            let _ = coordinator.wait();
            panic!("the job did not end within 300 s of the thaw:\n{}", output.join().unwrap());
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let output = output.join().unwrap();
    assert!(status.success(), "the job failed ({status}):\n{output}");
    let total = EPOCHS * UPDATES_PER_EPOCH;
    let rank_steps = steps_of_rank() as u64;
    assert_eq!(rank_steps, total, "the rank's own records:\n{output}");
    // Before, a report waited for its answer up to 5 s: at most 3 updates
    // in 12 s. A tiny update takes well under a second here.
    println!("updates trained while the coordinator was frozen for {FREEZE:?}: {steps_in_freeze}");
    assert!(
        steps_in_freeze >= 8,
        "only {steps_in_freeze} updates trained in the {FREEZE:?} the coordinator was frozen: \
         the rank waited for it\n{output}"
    );
    let metrics = out.join("metrics.jsonl");
    let steps: Vec<u64> =
        records(&metrics, "step").iter().map(|r| r["step"].as_u64().unwrap()).collect();
    let expected: Vec<u64> = (1..=total).collect();
    assert_eq!(steps, expected, "metrics.jsonl's step records, in order, each once\n{output}");
    let epochs: Vec<u64> =
        records(&metrics, "epoch").iter().map(|r| r["epoch"].as_u64().unwrap()).collect();
    assert_eq!(epochs, (0..EPOCHS).collect::<Vec<_>>(), "epoch records\n{output}");
}
