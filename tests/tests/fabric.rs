//! A slow link is named before the first update: a job of three `worker
//! join` hosts, each in its own network namespace (the coordinator on the
//! host side of the bridge), CPU ranks over the TCP ring. Host b's outgoing
//! traffic is shaped to 200 Mbit/s (`tc ... tbf`, on its `eth0`), as a host
//! on a slower or misconfigured NIC would be, and the recipe expects a bus
//! bandwidth no fabric here delivers. Asserted:
//!
//! * `metrics.jsonl` holds one `fabric` record before the first step, with
//!   a rate for each of the three links, and its slowest link is the one out
//!   of b, at least `distributed.slow_link_warn_ratio` (3) times below the
//!   others' median, and under the shaped rate;
//! * the coordinator's line names that link with both ranks and hosts, and
//!   says the fabric under-delivers against the expectation;
//! * rank 0's log warns of both;
//! * the job then trains to its end.
//!
//! The test prints the measured rates.

use rsb_integration_tests::{
    binary, fashion_subset, is_root, on_path, records_in, require, tc, workspace_root, Netns,
};
use rsb_job::{FabricProbe, MetricsRecord};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The job token (given through the environment).
const TOKEN: &str = "fabric-test-token-7d1f44a0";

/// The subnet `10.79.0.0/24` (`distributed.rs` uses 10.77, `partition.rs` 10.78).
const SUBNET: u8 = 79;

/// The rate host b sends at, in bits per second (`tc` `tbf`).
const SHAPED_BITS_PER_SEC: f64 = 200e6;

/// A bus bandwidth (GB/s) far above what these veth links deliver.
const EXPECTED_BUS_GB_PER_S: f64 = 1000.0;

/// A process of the test, its output in a file; killed and reaped on drop.
struct Proc {
    child: Child,
    log: std::path::PathBuf,
}

impl Proc {
    fn spawn(mut cmd: Command, log: &Path) -> Proc {
        let file = std::fs::File::create(log).expect("log file");
        let child = cmd
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", log.display()));
        Proc { child, log: log.to_path_buf() }
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[test]
fn a_slow_link_is_named_with_its_hosts_before_the_first_update() {
    if !require(is_root(), "root, to create network namespaces and shape a link")
        || !require(on_path("ip"), "the `ip` tool (iproute2), to create network namespaces")
        || !require(on_path("tc"), "the `tc` tool (iproute2), to shape a link")
    {
        return;
    }
    let tag = format!("f{}", std::process::id() % 1000);
    // Dropped last (declared first): the processes go before their namespaces.
    let netns = Netns::create(&tag, SUBNET, 3)
        .unwrap_or_else(|e| panic!("could not create network namespaces: {e}"));
    let rate = format!("{}mbit", SHAPED_BITS_PER_SEC / 1e6);
    tc(&[
        "-n",
        &netns.names[1],
        "qdisc",
        "add",
        "dev",
        "eth0",
        "root",
        "tbf",
        "rate",
        &rate,
        "burst",
        "256kb",
        "latency",
        "100ms",
    ])
    .unwrap_or_else(|e| panic!("could not shape host b's link: {e}"));
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = fashion_subset(tmp.path(), 4, 1);
    let out = tmp.path().join("run");
    let host = netns.bridge_address.clone();
    let port = rsb_integration_tests::free_port(&host);
    let sets = [
        format!("data.root={}", data.display()),
        "model.num_classes=10".into(),
        "batch.global_size=12".into(),
        "batch.micro_size=2".into(),
        "eval.every_epochs=1000".into(),
        "runtime.log_every_steps=1".into(),
        "distributed.collective_timeout_secs=120".into(),
        format!("distributed.expected_bus_gb_per_s={EXPECTED_BUS_GB_PER_S}"),
    ];
    let mut cmd = Command::new(binary("coordinator"));
    // The namespaces' bridge is beyond loopback: plain text by choice.
    cmd.args(["up", "--insecure-plaintext", "--listen", &format!("{host}:{port}"), "--recipe"])
        .arg(workspace_root().join("recipes/debug/resnet18_tiny_cpu.yaml"))
        .arg("--out")
        .arg(&out)
        .args(["--nodes", "3"]);
    for s in &sets {
        cmd.args(["--set", s]);
    }
    cmd.env("RSB_JOB_TOKEN", TOKEN).current_dir(workspace_root());
    let mut up = Proc::spawn(cmd, &tmp.path().join("coordinator.log"));
    let url = format!("http://{host}:{port}");
    let _workers: Vec<Proc> = ["a", "b", "c"]
        .iter()
        .zip(&netns.names)
        .map(|(name, ns)| {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", ns])
                .arg(binary("worker"))
                .args(["join", "--coordinator", &url, "--insecure-plaintext"])
                .args(["--devices", "cpu", "--cores", "1"])
                .args(["--host-name", name])
                .env("RSB_JOB_TOKEN", TOKEN)
                .current_dir(workspace_root());
            Proc::spawn(cmd, &tmp.path().join(format!("worker-{name}.log")))
        })
        .collect();

    let limit = Duration::from_secs(400);
    let started = Instant::now();
    let status = loop {
        if let Some(status) = up.child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(started.elapsed() < limit, "the job ran past {limit:?}:\n{}", up.text());
        std::thread::sleep(Duration::from_millis(200));
    };
    let said = up.text();
    assert!(status.success(), "the job failed ({status}):\n{said}");

    let records = records_in(&out.join("metrics.jsonl"), "fabric");
    assert_eq!(records.len(), 1, "one probe, at the start:\n{said}");
    let Ok(MetricsRecord::Fabric(probe)) = serde_json::from_value(records[0].clone()) else {
        panic!("not a fabric record: {}", records[0]);
    };
    let generation = &records_in(&out.join("metrics.jsonl"), "generation")[0];
    let hosts: Vec<String> = serde_json::from_value(generation["hosts"].clone()).expect("hosts");
    let rank_of_b = hosts.iter().position(|h| h == "b").expect("b has a rank") as u64;
    let to = (rank_of_b + 1) % 3;
    report(&probe, &hosts);

    assert_eq!((probe.world_size, probe.probe_bytes), (3, 25 << 20), "the default probe");
    assert_eq!(probe.links.len(), 3, "{probe:?}");
    let slow = probe.slowest_link().expect("three links");
    assert_eq!((slow.link.from_rank, slow.link.to_rank), (rank_of_b, to), "{probe:?}");
    assert!(slow.is_slow(3.0), "{probe:?}");
    assert!(slow.link.gb_per_s < SHAPED_BITS_PER_SEC / 8e9 * 1.1, "faster than shaped: {probe:?}");
    assert!(probe.below(Some(EXPECTED_BUS_GB_PER_S)), "{probe:?}");

    let to_host = &hosts[to as usize];
    let named = format!("slow link: the link from rank {rank_of_b} on b to rank {to} on {to_host}");
    assert!(said.contains(&named), "the coordinator does not say `{named}`:\n{said}");
    assert!(said.contains("the fabric under-delivers: bus bandwidth"), "{said}");
    let rank0 = std::fs::read_to_string(out.join("ranks/rank-0.log")).unwrap_or_default();
    assert!(rank0.contains("WARN") && rank0.contains("slow link: the link from rank"), "{rank0}");
    assert!(rank0.contains("the fabric under-delivers"), "{rank0}");
    // The probe came before the first update.
    let all = std::fs::read_to_string(out.join("metrics.jsonl")).expect("metrics.jsonl");
    let (fabric_at, step_at) = (all.find("\"kind\":\"fabric\""), all.find("\"kind\":\"step\""));
    assert!(fabric_at.is_some() && fabric_at < step_at, "{all}");
}

/// Prints the probe's numbers (`-- --nocapture`).
fn report(probe: &FabricProbe, hosts: &[String]) {
    println!("fabric probe: {}", probe.summary());
    for link in &probe.links {
        println!(
            "  rank {} ({}) -> rank {} ({}): {:.4} GB/s",
            link.from_rank,
            hosts[link.from_rank as usize],
            link.to_rank,
            hosts[link.to_rank as usize],
            link.gb_per_s
        );
    }
}
