//! A host cut off the network, end to end: an elastic job of three `worker
//! join` hosts, each in its own network namespace (the coordinator on the
//! host side of the bridge), CPU ranks and the tiny recipe (6 sampler
//! streams: worlds of 2 and 3 ranks both hold the batch), `--min-nodes 2`.
//! After a mid-epoch checkpoint is committed, host c's veth pair is brought
//! down at both ends: it reaches neither the coordinator nor its ring
//! neighbours, and nothing tells anyone so (no RST, no exit). Asserted:
//!
//! * the job finishes with its planned number of updates; a `generation`
//!   record of world size 2 names c as the lost host; the updates lost are at
//!   most the checkpoint interval;
//! * c's agent exits non-zero on its own, saying the coordinator stopped
//!   answering, within its `--coordinator-deadline-secs` plus a margin, and
//!   no process is left in c's namespace (its rank does not train on alone);
//! * the test prints the updates lost, the time from the cut to the first
//!   update of the new generation and the time until c's agent exited.

use rsb_integration_tests::elastic_records::{all_records, assert_shrunk_without, position};
use rsb_integration_tests::free_port;
use rsb_integration_tests::processes::children_of;
use rsb_integration_tests::{
    binary, fashion_subset, ip, is_root, on_path, require, workspace_root, Netns,
};
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The job token (given through the environment).
const TOKEN: &str = "partition-test-token-5b8e02c4";

/// `runtime.checkpoint_every_updates`.
const CHECKPOINT_INTERVAL: u64 = 2;

/// `coordinator up --heartbeat-timeout-secs`.
const HEARTBEAT_TIMEOUT_SECS: u64 = 8;

/// `distributed.collective_timeout_secs`.
const COLLECTIVE_TIMEOUT_SECS: u64 = 15;

/// `worker join --coordinator-deadline-secs`.
const COORDINATOR_DEADLINE_SECS: u64 = 20;

/// Room past the coordinator deadline for the cut agent to exit: its last
/// heartbeat call's deadline (10 s) and a loaded 2-core machine.
const EXIT_MARGIN: Duration = Duration::from_secs(30);

/// The subnet `10.78.0.0/24` (`distributed.rs` uses 10.77).
const SUBNET: u8 = 78;

/// A process of the test and the reader threads of its output; killed and
/// reaped on drop, so that a failing test leaves nothing behind.
struct Proc {
    child: Child,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
}

fn reader(pipe: Option<impl Read + Send + 'static>) -> Option<JoinHandle<String>> {
    pipe.map(|mut p| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = p.read_to_end(&mut bytes);
            String::from_utf8_lossy(&bytes).into_owned()
        })
    })
}

impl Proc {
    fn spawn(mut cmd: Command, what: &str) -> Proc {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {what}: {e}"));
        let stdout = reader(child.stdout.take());
        let stderr = reader(child.stderr.take());
        Proc { child, stdout, stderr }
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Waits (at most `limit`) for the exit; `None` past it.
    fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Its output so far, once it has exited (killing it first).
    fn output(&mut self) -> String {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let out = self.stdout.take().map(|h| h.join().unwrap_or_default()).unwrap_or_default();
        let err = self.stderr.take().map(|h| h.join().unwrap_or_default()).unwrap_or_default();
        format!("{out}\n{err}")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn coordinator(listen: &str, data: &Path, out: &Path) -> Proc {
    let sets = [
        format!("data.root={}", data.display()),
        "model.num_classes=10".into(),
        "batch.global_size=12".into(),
        "batch.micro_size=2".into(),
        "schedule.cosine.epochs=5".into(),
        "eval.every_epochs=1000".into(),
        "runtime.log_every_steps=1".into(),
        "runtime.keep_last_checkpoints=3".into(),
        format!("runtime.checkpoint_every_updates={CHECKPOINT_INTERVAL}"),
        format!("distributed.collective_timeout_secs={COLLECTIVE_TIMEOUT_SECS}"),
    ];
    let mut cmd = Command::new(binary("coordinator"));
    // The namespaces' bridge is beyond loopback: plain text by choice.
    cmd.args(["up", "--insecure-plaintext", "--listen", listen, "--recipe"])
        .arg(workspace_root().join("recipes/debug/resnet18_tiny_cpu.yaml"))
        .arg("--out")
        .arg(out)
        .args(["--nodes", "3", "--min-nodes", "2"])
        .args(["--heartbeat-timeout-secs", &HEARTBEAT_TIMEOUT_SECS.to_string()]);
    for s in sets {
        cmd.args(["--set", &s]);
    }
    cmd.env("RSB_JOB_TOKEN", TOKEN).current_dir(workspace_root());
    Proc::spawn(cmd, "the coordinator")
}

/// `worker join` as host `name` inside network namespace `netns`.
fn worker(url: &str, netns: &str, name: &str) -> Proc {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns])
        .arg(binary("worker"))
        .args(["join", "--coordinator", url, "--insecure-plaintext"])
        .args(["--devices", "cpu", "--cores", "1", "--host-name", name])
        .args(["--coordinator-deadline-secs", &COORDINATOR_DEADLINE_SECS.to_string()])
        .env("RSB_JOB_TOKEN", TOKEN)
        .current_dir(workspace_root());
    Proc::spawn(cmd, "worker join")
}

/// The processes in network namespace `netns` (`ip netns pids`).
fn pids_in(netns: &str) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "pids", netns]).output().expect("ip netns pids");
    String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_string).collect()
}

/// Everything the processes printed and `metrics.jsonl`, for a failure report.
fn report(up: &mut Proc, workers: &mut [Proc], out: &Path) -> String {
    let mut text = format!("coordinator:\n{}\n", up.output());
    for (w, name) in workers.iter_mut().zip(["a", "b", "c"]) {
        text += &format!("worker {name}:\n{}\n", w.output());
    }
    text + &format!(
        "metrics.jsonl:\n{}",
        std::fs::read_to_string(out.join("metrics.jsonl")).unwrap_or_default()
    )
}

#[test]
fn a_host_cut_off_the_network_is_dropped_and_stops_itself() {
    if !require(is_root(), "root, to create network namespaces")
        || !require(on_path("ip"), "the `ip` tool (iproute2), to create network namespaces")
    {
        return;
    }
    let tag = format!("p{}", std::process::id() % 1000);
    // Dropped last (declared first): the processes go before their namespaces.
    let netns = Netns::create(&tag, SUBNET, 3)
        .unwrap_or_else(|e| panic!("could not create network namespaces: {e}"));
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = fashion_subset(tmp.path(), 4, 1);
    let out = tmp.path().join("run");
    let host = netns.bridge_address.clone();
    let port = free_port(&host);
    let mut up = coordinator(&format!("{host}:{port}"), &data, &out);
    let url = format!("http://{host}:{port}");
    let mut workers: Vec<Proc> =
        ["a", "b", "c"].iter().zip(&netns.names).map(|(h, ns)| worker(&url, ns, h)).collect();

    // Mid-run: after the first epoch and a mid-epoch checkpoint after it (a
    // step record past it means rank 0 committed it before that update).
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let records = all_records(&out);
        let first = records.iter().find(|r| r["kind"] == "epoch").and_then(|r| r["step"].as_u64());
        if first.is_some_and(|f| {
            records
                .iter()
                .any(|r| r["kind"] == "step" && r["step"].as_u64() > Some(f + CHECKPOINT_INTERVAL))
        }) {
            break;
        }
        if up.exited().is_some() || Instant::now() > deadline {
            panic!(
                "no update after a mid-epoch checkpoint within 300 s:\n{}",
                report(&mut up, &mut workers, &out)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let victim = workers[2].child.id();
    let comm = std::fs::read_to_string(format!("/proc/{victim}/comm")).unwrap_or_default();
    assert_eq!(comm.trim(), "worker", "`ip netns exec` runs the worker as itself");
    let ranks = children_of(victim);
    assert_eq!(ranks.len(), 1, "worker c runs one rank: {ranks:?}");

    // The cut: both ends of c's veth pair down. Its TCP connections stay
    // open, unanswered, as a real partition leaves them.
    ip(&["link", "set", &netns.host_ends[2], "down"]).expect("cutting the host side");
    ip(&["-n", &netns.names[2], "link", "set", "eth0", "down"]).expect("cutting the host");
    let cut_at = Instant::now();

    // Until the new generation has made an update and c's agent has exited.
    let mut recovery = None;
    let mut victim_exit = None;
    let deadline = cut_at + Duration::from_secs(300);
    while recovery.is_none() || victim_exit.is_none() {
        if recovery.is_none() {
            let records = all_records(&out);
            if position(&records, "generation", |g| g["world_size"] == 2)
                .is_some_and(|at| records[at..].iter().any(|r| r["kind"] == "step"))
            {
                recovery = Some(cut_at.elapsed());
            }
        }
        if victim_exit.is_none() {
            if let Some(status) = workers[2].exited() {
                victim_exit = Some((cut_at.elapsed(), status));
            }
        }
        let coordinator_gone = up.exited().is_some();
        if Instant::now() > deadline || (coordinator_gone && recovery.is_none()) {
            panic!(
                "after the cut: new generation's first update {recovery:?}, c's agent exit \
                 {victim_exit:?}, coordinator exited {coordinator_gone}:\n{}",
                report(&mut up, &mut workers, &out)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let recovery = recovery.unwrap();
    let (victim_took, victim_status) = victim_exit.unwrap();

    // The job goes on to its end on a and b.
    let finished = up.wait(Duration::from_secs(400));
    if !finished.is_some_and(|s| s.success()) {
        panic!(
            "the job did not finish successfully after the cut ({finished:?}):\n{}",
            report(&mut up, &mut workers, &out)
        );
    }
    for (i, name) in ["a", "b"].iter().enumerate() {
        let status = workers[i].wait(Duration::from_secs(60));
        assert!(
            status.is_some_and(|s| s.success()),
            "worker {name} ({status:?}):\n{}",
            workers[i].output()
        );
    }

    // c's agent stopped itself, for the right reason, in time, and left nothing.
    let victim_log = workers[2].output();
    assert!(!victim_status.success(), "the cut host's agent succeeded:\n{victim_log}");
    assert!(
        victim_log.contains("has not answered a heartbeat"),
        "the cut host's agent did not stop for its coordinator deadline:\n{victim_log}"
    );
    let bound = Duration::from_secs(COORDINATOR_DEADLINE_SECS) + EXIT_MARGIN;
    assert!(victim_took <= bound, "the cut agent exited {victim_took:?} after the cut");
    let gone_by = Instant::now() + Duration::from_secs(10);
    while !pids_in(&netns.names[2]).is_empty() && Instant::now() < gone_by {
        std::thread::sleep(Duration::from_millis(100));
    }
    let left = pids_in(&netns.names[2]);
    assert!(left.is_empty(), "processes left in the cut host's namespace: {left:?}");
    for rank in ranks {
        // Gone, or a zombie its parent has yet to reap: it runs no more.
        let parent = rsb_integration_tests::processes::parent_of(rank);
        assert!(parent.is_none(), "c's rank process {rank} still runs (parent {parent:?})");
    }

    // The new generation, from the metrics.
    let lost = assert_shrunk_without(&out, "c", CHECKPOINT_INTERVAL, 5);
    println!(
        "MEASURED host cut off (veth down) 1 of 3, --min-nodes 2: {lost} updates lost \
         (checkpoint every {CHECKPOINT_INTERVAL}); first update of the new generation {:.1} s \
         after the cut (heartbeat timeout {HEARTBEAT_TIMEOUT_SECS} s, collective timeout \
         {COLLECTIVE_TIMEOUT_SECS} s); the cut host's agent exited {:.1} s after the cut \
         (coordinator deadline {COORDINATOR_DEADLINE_SECS} s)",
        recovery.as_secs_f64(),
        victim_took.as_secs_f64()
    );
    drop(workers);
    drop(up);
    drop(netns);
}
