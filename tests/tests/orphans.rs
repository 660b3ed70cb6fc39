//! A job's process tree: stopping the coordinator never orphans its workers
//! or their ranks, and a rank that dies is reported at once.
//!
//! `coordinator up --local --nodes 2` starts two `worker join` agents, each of
//! which starts a `worker rank`. SIGINT, SIGTERM and SIGKILL of the
//! coordinator alone (not its process group, as `kill PID` does) must each
//! leave none of those four processes running within a deadline: SIGINT and
//! SIGTERM through the coordinator's own handler, SIGKILL through the death
//! signal (`PR_SET_PDEATHSIG`) armed in every child; a rank that is stopped
//! (SIGSTOP) when its agent is killed outright is continued by that signal
//! (SIGCONT), finds its agent gone and stops as on SIGTERM, naming the
//! agent's death, instead of staying stopped for ever. A frozen coordinator
//! (SIGSTOP: the port open, no answer) makes the agents stop their ranks and
//! exit once `--coordinator-deadline-secs` has passed. A rank killed outright
//! (no chance to say so itself) is reported by its agent, and the job fails
//! naming it long before the host's heartbeat timeout.

use rsb_integration_tests::processes::{self, cmdline, parent_of};
use rsb_integration_tests::{binary, elastic_records, fashion_subset, free_port, workspace_root};
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
    start_job_on(data, out, 2)
}

/// `coordinator up --local` with `nodes` local agents.
fn start_job_on(data: &Path, out: &Path, nodes: u32) -> Child {
    let _ = binary("worker"); // built before the coordinator starts it
    Command::new(binary("coordinator"))
        // Inherited by the local agents (`worker join --coordinator-deadline-secs`).
        .env("RSB_COORDINATOR_DEADLINE_SECS", "3")
        .args(["up", "--local", "--nodes", &nodes.to_string(), "--recipe"])
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

/// The state letter of `pid` in `/proc` (`T`: stopped).
fn state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next())
}

#[test]
fn a_rank_stopped_when_its_agent_is_killed_stops_naming_the_agents_death() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = fashion_subset(tmp.path(), 16, 4);
    let out = tmp.path().join("run");
    // One host: with two, the job fails once the agent is gone, and the
    // other agent kills its rank, which may break the stopping rank's
    // checkpoint vote before it ends.
    let mut coordinator = start_job_on(&data, &out, 1);
    wait_for_ranks(&out, &mut coordinator, 1);
    // Training (a rank stopped before then exits at once, saying so only
    // on its stderr, which went to the dead agent).
    let deadline = Instant::now() + Duration::from_secs(120);
    while !elastic_records::all_records(&out).iter().any(|r| r["kind"] == "step") {
        assert!(Instant::now() < deadline, "no step record within 120 s of the collective");
        std::thread::sleep(Duration::from_millis(100));
    }
    let children = descendants(coordinator.id());
    let (agent, _) = children.iter().find(|(_, l)| l.contains(" join ")).expect("an agent");
    let agent = *agent;
    let ranks: Vec<u32> = descendants(agent)
        .into_iter()
        .filter(|(_, l)| l.contains(" rank "))
        .map(|(p, _)| p)
        .collect();
    assert_eq!(ranks.len(), 1, "expected one rank under agent {agent}: {children:#?}");
    let rank = ranks[0];
    let stopped = Command::new("kill").args(["-s", "STOP", &rank.to_string()]).status();
    assert!(stopped.expect("kill").success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while state(rank) != Some('T') {
        assert!(Instant::now() < deadline, "rank {rank} did not stop: {:?}", state(rank));
        std::thread::sleep(Duration::from_millis(10));
    }
    let killed = Command::new("kill").args(["-s", "KILL", &agent.to_string()]).status();
    assert!(killed.expect("kill").success());
    let killed_at = Instant::now();
    let deadline = killed_at + Duration::from_secs(60);
    while parent_of(rank).is_some() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let gone_after = killed_at.elapsed();
    let left = parent_of(rank).map(|parent| (parent, state(rank)));
    if left.is_some() {
        let _ = Command::new("kill").args(["-s", "KILL", &rank.to_string()]).status();
    }
    let logs: String = std::fs::read_dir(out.join("ranks"))
        .expect("ranks/")
        .filter_map(|entry| std::fs::read_to_string(entry.ok()?.path()).ok())
        .collect();
    let _ = coordinator.kill();
    let _ = coordinator.wait();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !survivors(&children).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        left, None,
        "60 s after its agent's SIGKILL the stopped rank {rank} still lives (parent, state)"
    );
    assert!(
        logs.contains(&format!("stopped by the death of its agent (pid {agent})")),
        "no rank log names the agent's death:\n{logs}"
    );
    println!(
        "a rank stopped (SIGSTOP) when its agent was killed was gone {:.1} s after",
        gone_after.as_secs_f64()
    );
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

/// A worker started by hand (or by a script) from the environment of a
/// rank, which holds the agent's `RSB_PARENT_PID`, armed with no death
/// signal: it forgets the inherited pid (`forget_inherited_parent`), where
/// it took that process for its parent, found it was not, and stopped at
/// once as if its parent had died. It joins, waits in the job, and stops
/// only when told to.
#[test]
fn a_worker_that_inherited_a_parent_pid_does_not_stop_at_once() {
    const TOKEN: &str = "orphans-inherited-parent-token-5d1e";
    let tmp = tempfile::tempdir().expect("tempdir");
    let port = free_port("127.0.0.1");
    let up_log = tmp.path().join("up.log");
    let mut coordinator = Command::new(binary("coordinator"))
        // Two hosts: the job waits for the second, which never comes.
        .args(["up", "--nodes", "2", "--listen", &format!("127.0.0.1:{port}"), "--recipe"])
        .arg(workspace_root().join("recipes/debug/resnet18_tiny_cpu.yaml"))
        .arg("--out")
        .arg(tmp.path().join("run"))
        .env("RSB_JOB_TOKEN", TOKEN)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&up_log).expect("log"))
        .spawn()
        .expect("starting the coordinator");
    let worker_log = tmp.path().join("worker.log");
    let mut worker = Command::new(binary("worker"))
        .args(["join", "--coordinator", &format!("http://127.0.0.1:{port}")])
        .args(["--devices", "cpu", "--cores", "1", "--host-name", "a"])
        // Not its parent (the test is), as a rank's agent would not be.
        .env("RSB_PARENT_PID", coordinator.id().to_string())
        .env("RSB_JOB_TOKEN", TOKEN)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&worker_log).expect("log"))
        .spawn()
        .expect("starting worker join");
    let read = |path: &Path| std::fs::read_to_string(path).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !read(&up_log).contains("joined (1/2 hosts)") {
        assert!(
            worker.try_wait().expect("try_wait").is_none(),
            "the worker exited before it joined:\n{}",
            read(&worker_log)
        );
        assert!(Instant::now() < deadline, "the worker never joined:\n{}", read(&up_log));
        std::thread::sleep(Duration::from_millis(50));
    }
    // Its stop signals are heard while it waits in the job.
    std::thread::sleep(Duration::from_secs(3));
    let exited = worker.try_wait().expect("try_wait");
    let _ = Command::new("kill").args(["-s", "TERM", &worker.id().to_string()]).status();
    let _ = worker.wait();
    let _ = coordinator.kill();
    let _ = coordinator.wait();
    let log = read(&worker_log);
    assert_eq!(exited, None, "the worker stopped on its own:\n{log}");
    assert!(log.contains("stopped by SIGTERM"), "{log}");
    assert!(!log.contains("death of its"), "{log}");
}

/// An agent still waiting for its coordinator (started first, as a Slurm
/// step or a pod may be) stops at once at SIGTERM, saying so, and exits 1.
/// Before, its handler came after that wait (up to 2 minutes): as any
/// process it died of the signal unannounced, and as a container's process
/// 1, which the kernel sends no signal it has no handler for, it ignored
/// the SIGTERM and its pod waited out the grace period for the SIGKILL.
#[test]
fn an_agent_waiting_for_its_coordinator_stops_at_sigterm_saying_so() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let log = tmp.path().join("worker.log");
    // No coordinator listens there.
    let port = free_port("127.0.0.1");
    let agent = rsb_integration_tests::sweeps::worker_join(port, "early", &log);
    let pid = agent.id();
    // Well into its wait for the coordinator.
    std::thread::sleep(Duration::from_millis(1500));
    let signalled = Instant::now();
    assert!(processes::signal(pid, "TERM"), "signalling the agent");
    let ended = processes::wait_with_timeout(agent, Duration::from_secs(15), "the agent");
    let said = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(ended.status.code(), Some(1), "{:?}: {said}", ended.status);
    assert!(
        said.contains(&format!(
            "worker stopped by SIGTERM while connecting to the coordinator at \
             http://127.0.0.1:{port}"
        )),
        "{said}"
    );
    assert!(signalled.elapsed() < Duration::from_secs(5), "{:?}", signalled.elapsed());
}
