//! A coordinator frozen for a while mid-job (SIGSTOP, as a coordinator
//! paused by its host, swapped out or cut off without a reset would be),
//! end to end with `coordinator up --local`, one CPU rank and the tiny
//! recipe, reporting every update. The coordinator stays frozen until the
//! rank has trained its last update, and [`HOLD`] longer. Asserted:
//!
//! * the rank trains on while the coordinator does not answer: its own
//!   `ranks/rank-0.jsonl` gains its step records during the freeze (a rank
//!   that waited for each report's answer, up to its deadline, made one
//!   update per deadline);
//! * once the coordinator runs again, the job finishes, and `metrics.jsonl`
//!   holds every update's step record once, in order, and every epoch's
//!   record: the rank, done, waited for its reports to be taken before it
//!   left (a wait of 20 s lost them all), and nothing is written twice.

use rsb_integration_tests::{binary, fashion_subset, workspace_root};
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long the coordinator stays frozen after the rank trained its last
/// update: longer than a report's try (10 s) and than the wait of the
/// first version of the rank's reports (20 s).
const HOLD: Duration = Duration::from_secs(25);

/// The coordinator's heartbeat timeout and the agent's coordinator
/// deadline: longer than any freeze here.
const PATIENCE_SECS: u64 = 300;

/// Epochs of the job (10 updates each: 160 images, a global batch of 16).
const EPOCHS: u64 = 4;

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

/// A job of `nodes` local hosts of one CPU rank each, started with `coordinator up
/// --local` on a subset of Fashion-MNIST in `tmp`, reporting every update;
/// returns the coordinator, the thread collecting its stderr, and the run folder.
fn start_job(
    tmp: &Path,
    nodes: u32,
) -> (std::process::Child, std::thread::JoinHandle<String>, std::path::PathBuf) {
    let data = fashion_subset(tmp, 16, 4);
    let out = tmp.join("run");
    let mut coordinator = Command::new(binary("coordinator"))
        .args(["up", "--local", "--nodes", &nodes.to_string(), "--recipe"])
        .arg(workspace_root().join("recipes/debug/resnet18_tiny_cpu.yaml"))
        .arg("--out")
        .arg(&out)
        .args(["--set", &format!("data.root={}", data.display())])
        .args(["--set", "model.num_classes=10"])
        .args(["--set", &format!("schedule.cosine.epochs={EPOCHS}")])
        .args(["--set", "runtime.log_every_steps=1"])
        .args(["--heartbeat-timeout-secs", &PATIENCE_SECS.to_string()])
        .env("RSB_COORDINATOR_DEADLINE_SECS", PATIENCE_SECS.to_string())
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
    (coordinator, output, out)
}

/// Waits up to `limit` for the coordinator to exit; returns its status and
/// its stderr, or panics (killing it) with its stderr.
fn wait_for_end(
    mut coordinator: std::process::Child,
    output: std::thread::JoinHandle<String>,
    limit: Duration,
    what: &str,
) -> (std::process::ExitStatus, String) {
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = coordinator.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = coordinator.kill();
            let _ = coordinator.wait();
            panic!("the job did not end within {limit:?} of {what}:\n{}", output.join().unwrap());
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    (status, output.join().unwrap())
}

#[test]
fn a_frozen_coordinator_neither_holds_up_training_nor_loses_its_reports() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mut coordinator, output, out) = start_job(tmp.path(), 1);
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
    let total = EPOCHS * UPDATES_PER_EPOCH;
    let steps_at_freeze = steps_of_rank();
    let frozen_at = Instant::now();
    signal(coordinator.id(), "STOP");
    // Frozen until the rank trained its last update (it trains on), then
    // HOLD longer: the rank, done, waits for its reports to be taken.
    while (steps_of_rank() as u64) < total {
        if frozen_at.elapsed() > Duration::from_secs(2 * total) {
            signal(coordinator.id(), "CONT");
            let _ = coordinator.kill();
            let _ = coordinator.wait();
            panic!(
                "the rank trained {} of {total} updates in {} s with its coordinator frozen \
                 ({steps_at_freeze} before):\n{}",
                steps_of_rank(),
                2 * total,
                output.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let trained_frozen = frozen_at.elapsed();
    let steps_in_freeze = total - steps_at_freeze as u64;
    std::thread::sleep(HOLD);
    signal(coordinator.id(), "CONT");
    let (status, output) = wait_for_end(coordinator, output, Duration::from_secs(300), "the thaw");
    assert!(status.success(), "the job failed ({status}):\n{output}");
    println!(
        "with the coordinator frozen, the rank trained its last {steps_in_freeze} updates in \
         {trained_frozen:.1?}; the coordinator was thawed {HOLD:?} later"
    );
    // A tiny update takes well under a second here; a rank that waited for
    // each report's answer took its deadline, 5 s, for each.
    assert!(
        trained_frozen < Duration::from_secs(2 * steps_in_freeze),
        "{steps_in_freeze} updates took {trained_frozen:?} with the coordinator frozen: the \
         rank waited for it\n{output}"
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

/// A coordinator frozen as a two-host job ends: rank 1, with no report to
/// flush, leaves at once, while the coordinator does not answer for longer
/// than a Leave's try (5 s). The rank asks again until it is taken (its
/// agent, its rank done, has exited and heartbeats no more), so once the
/// coordinator runs again the job finishes at once; a Leave tried once was
/// lost, and the job waited for that host's heartbeat timeout (300 s here),
/// then failed for its silence.
#[test]
fn a_rank_leave_lost_to_a_frozen_coordinator_is_sent_again() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mut coordinator, output, out) = start_job(tmp.path(), 2);
    let rank_file = out.join("ranks/rank-0.jsonl");
    let total = (EPOCHS * UPDATES_PER_EPOCH) as usize;
    let deadline = Instant::now() + Duration::from_secs(300);
    // Frozen once rank 0 trained the last update: the ranks then evaluate,
    // rank 0 commits the last checkpoint, and they leave.
    while records(&rank_file, "step").len() < total {
        if Instant::now() > deadline || coordinator.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    signal(coordinator.id(), "STOP");
    let trained = records(&rank_file, "step").len();
    std::thread::sleep(Duration::from_secs(15));
    signal(coordinator.id(), "CONT");
    let thawed = Instant::now();
    let (status, output) = wait_for_end(coordinator, output, Duration::from_secs(90), "the thaw");
    assert_eq!(trained, total, "the ranks did not train every update within 300 s\n{output}");
    assert!(status.success(), "the job failed ({status}):\n{output}");
    println!("the job ended {:.1?} after its coordinator was thawed", thawed.elapsed());
    let epochs = records(&out.join("metrics.jsonl"), "epoch").len() as u64;
    assert_eq!(epochs, EPOCHS, "epoch records\n{output}");
}
