//! A job's process tree: stopping the coordinator never orphans its workers
//! or their ranks, and a rank that dies is reported at once.
//!
//! `coordinator up --local --nodes 2` starts two `worker join` agents, each of
//! which starts a `worker rank`. SIGINT, SIGTERM and SIGKILL of the
//! coordinator alone (not its process group, as `kill PID` does) must each
//! leave none of those four processes running within a deadline: SIGINT and
//! SIGTERM through the coordinator's own handler, SIGKILL through the death
//! signal (`PR_SET_PDEATHSIG`) armed in every child. A frozen coordinator
//! (SIGSTOP: the port open, no answer) makes the agents stop their ranks and
//! exit once `--coordinator-deadline-secs` has passed. A rank killed outright
//! (no chance to say so itself) is reported by its agent, and the job fails
//! naming it long before the host's heartbeat timeout.

use rsb_integration_tests::processes::{self, cmdline, parent_of};
use rsb_integration_tests::{binary, fashion_subset, free_port, workspace_root};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Every live descendant of `root`, with its command line.
fn descendants(root: u32) -> Vec<(u32, String)> {
    processes::descendants(root).into_iter().map(|pid| (pid, cmdline(pid))).collect()
}

/// The processes of `watched` still alive and still running our worker.
fn survivors(watched: &[(u32, String)]) -> Vec<(u32, String)> {
    watched
        .iter()
        .filter(|(pid, line)| parent_of(*pid).is_some() && cmdline(*pid) == *line)
        .cloned()
        .collect()
}

fn start_job(data: &Path, out: &Path) -> Child {
    let _ = binary("worker"); // built before the coordinator starts it
    Command::new(binary("coordinator"))
        // Inherited by the local agents (`worker join --coordinator-deadline-secs`).
        .env("RSB_COORDINATOR_DEADLINE_SECS", "3")
        .args(["up", "--local", "--nodes", "2", "--recipe"])
        .arg(workspace_root().join("recipes/debug/resnet18_tiny_cpu.yaml"))
        .arg("--out")
        .arg(out)
        .args(["--set", &format!("data.root={}", data.display())])
        .args(["--set", "model.num_classes=10"])
        // Long enough to be killed mid-run.
        .args(["--set", "schedule.cosine.epochs=500"])
        .current_dir(workspace_root())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the coordinator")
}

/// Waits until both ranks have joined the collective and are training.
fn wait_for_training(out: &Path, coordinator: &mut Child) {
    wait_for_ranks(out, coordinator, 2);
}

/// Waits until `ranks` ranks have joined the collective and are training.
fn wait_for_ranks(out: &Path, coordinator: &mut Child, ranks: u32) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let ready = (0..ranks).all(|r| {
            std::fs::read_to_string(out.join(format!("ranks/rank-{r}.log")))
                .is_ok_and(|log| log.contains("collective ready"))
        });
        if ready {
            return;
        }
        if let Some(status) = coordinator.try_wait().expect("try_wait") {
            panic!("the coordinator exited early with {status}");
        }
        assert!(Instant::now() < deadline, "the ranks did not start within 180 s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn stop_and_check(signal: &str) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = fashion_subset(tmp.path(), 16, 4);
    let out = tmp.path().join("run");
    let mut coordinator = start_job(&data, &out);
    wait_for_training(&out, &mut coordinator);
    let pid = coordinator.id();
    let children = descendants(pid);
    let agents = children.iter().filter(|(_, l)| l.contains(" join ")).count();
    let ranks = children.iter().filter(|(_, l)| l.contains(" rank ")).count();
    assert_eq!(
        (agents, ranks),
        (2, 2),
        "expected 2 agents and 2 ranks under the coordinator: {children:#?}"
    );

    let sent = Command::new("kill").args(["-s", signal, &pid.to_string()]).status().expect("kill");
    assert!(sent.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = coordinator.try_wait().expect("try_wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the coordinator did not exit within 30 s of SIG{signal}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success(), "a stopped job must not report success");
    loop {
        let left = survivors(&children);
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "30 s after SIG{signal} to the coordinator these still run: {left:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    if signal != "KILL" {
        let mut stderr = String::new();
        use std::io::Read;
        coordinator.stderr.take().expect("piped").read_to_string(&mut stderr).expect("stderr");
        assert!(
            stderr.contains(&format!("stopped by SIG{signal}")),
            "stderr does not name the signal:\n{stderr}"
        );
    }
}

#[test]
fn sigint_to_the_coordinator_stops_every_worker_and_rank() {
    stop_and_check("INT");
}

#[test]
fn sigterm_to_the_coordinator_stops_every_worker_and_rank() {
    stop_and_check("TERM");
}

#[test]
fn sigkill_of_the_coordinator_stops_every_worker_and_rank() {
    stop_and_check("KILL");
}

#[test]
fn a_frozen_coordinator_makes_the_agents_stop_their_ranks_after_the_deadline() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = fashion_subset(tmp.path(), 16, 4);
    let out = tmp.path().join("run");
    let mut coordinator = start_job(&data, &out);
    wait_for_training(&out, &mut coordinator);
    let pid = coordinator.id().to_string();
    let children = descendants(coordinator.id());
    assert_eq!(children.len(), 4, "{children:#?}");
    let stopped = Command::new("kill").args(["-s", "STOP", &pid]).status().expect("kill");
    assert!(stopped.success());
    // The agents' deadline is 3 s (their heartbeat calls time out after 3 s
    // too); then each stops its ranks, which finish their update, vote, and
    // write a checkpoint, wait up to 5 s for their reports and 5 s for their
    // `Leave` to the frozen coordinator: about 16 s before any slowness, so
    // 60 s leaves a loaded machine its margin.
    let frozen = Instant::now();
    let deadline = frozen + Duration::from_secs(60);
    let left = loop {
        let left = survivors(&children);
        if left.is_empty() || Instant::now() > deadline {
            break left;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = coordinator.kill();
    let _ = Command::new("kill").args(["-s", "CONT", &pid]).status();
    let _ = coordinator.wait();
    assert!(left.is_empty(), "60 s after the coordinator froze these still run: {left:#?}");
    println!(
        "every agent and rank of a job whose coordinator froze was gone {:.1} s after the freeze",
        frozen.elapsed().as_secs_f64()
    );
}

#[test]
fn a_killed_rank_is_reported_at_once_and_fails_the_job_naming_it() {
    const TOKEN: &str = "0123456789abcdef0123456789abcdef";
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = fashion_subset(tmp.path(), 16, 4);
    let out = tmp.path().join("run");
    let port = free_port("127.0.0.1");
    let _ = binary("worker");
    let mut coordinator = Command::new(binary("coordinator"))
        .args(["up", "--nodes", "1", "--listen", &format!("127.0.0.1:{port}")])
        // The host stays silent for at most 60 s before the coordinator would
        // notice by itself; the agent's report must come long before.
        .args(["--heartbeat-timeout-secs", "60", "--recipe"])
        .arg(workspace_root().join("recipes/debug/resnet18_tiny_cpu.yaml"))
        .arg("--out")
        .arg(&out)
        .args(["--set", &format!("data.root={}", data.display())])
        .args(["--set", "model.num_classes=10", "--set", "schedule.cosine.epochs=500"])
        .env("RSB_JOB_TOKEN", TOKEN)
        .current_dir(workspace_root())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the coordinator");
    let mut worker = Command::new(binary("worker"))
        .args(["join", "--coordinator", &format!("http://127.0.0.1:{port}")])
        .args(["--devices", "cpu", "--host-name", "victim"])
        .env("RSB_JOB_TOKEN", TOKEN)
        .current_dir(workspace_root())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting worker join");
    wait_for_ranks(&out, &mut coordinator, 1);
    let rank: Vec<u32> = descendants(worker.id())
        .into_iter()
        .filter(|(_, line)| line.contains(" rank "))
        .map(|(pid, _)| pid)
        .collect();
    assert_eq!(rank.len(), 1, "expected one rank process under the worker");
    let killed = Command::new("kill").args(["-s", "KILL", &rank[0].to_string()]).status();
    assert!(killed.expect("kill").success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = coordinator.try_wait().expect("try_wait") {
            break Some(status);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = worker.kill();
    let _ = worker.wait();
    let Some(status) = status else {
        let _ = coordinator.kill();
        panic!("the coordinator had not failed the job 20 s after its only rank was killed");
    };
    assert!(!status.success());
    let mut stderr = String::new();
    use std::io::Read;
    coordinator.stderr.take().expect("piped").read_to_string(&mut stderr).expect("stderr");
    assert!(
        stderr.contains("rank 0 on victim failed: rank process 0 exited with signal: 9"),
        "the failure does not name the killed rank:\n{stderr}"
    );
}
