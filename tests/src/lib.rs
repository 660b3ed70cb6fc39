//! Test harness shared by the integration tests: where the oracle fixtures
//! live (re-exported from `rsb-test-support`, which checks their version
//! stamp), how to read them, where the built binaries and the project's Python
//! are, and small comparison helpers.

use std::io::Read;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

pub use rsb_test_support::{
    fixtures, fixtures_root, in_ci, is_executable, is_root, on_path, require, workspace_root,
};

/// The records of one `kind` (`step`, `epoch`, ...) in a `metrics.jsonl`
/// file (a missing or malformed file fails the test, naming it).
pub fn records_in(metrics_file: &Path, kind: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(metrics_file)
        .unwrap_or_else(|e| panic!("{}: {e}", metrics_file.display()))
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .unwrap_or_else(|e| panic!("{}: {e}: {l}", metrics_file.display()))
        })
        .filter(|r| r["kind"] == kind)
        .collect()
}

/// The records of one `kind` in a run folder's `metrics.jsonl`.
pub fn run_records(run_dir: &Path, kind: &str) -> Vec<serde_json::Value> {
    records_in(&run_dir.join("metrics.jsonl"), kind)
}

/// Reads a JSON file.
pub fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Reads a `.npy` array as a tensor.
pub fn read_npy(path: &Path) -> Tensor {
    Tensor::read_npy(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Largest `|a - b| / max(|b|, floor)`, elementwise, in f64.
pub fn max_relative_error(a: &Tensor, b: &Tensor, floor: f64) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    let a = a.to_kind(Kind::Double);
    let b = b.to_kind(Kind::Double);
    let err = (&a - &b).abs() / b.abs().clamp_min(floor);
    err.max().double_value(&[])
}

/// A binary of this workspace (`target/<profile>/<name>`), rebuilt first with
/// the test's own profile so that a test never runs a stale binary (cargo does
/// not rebuild other packages' binaries for this package's tests).
///
/// All of the workspace's binaries are built at once, with the arguments of
/// [`BINARIES_BUILD`]: `--examples` makes cargo resolve features with the
/// dev-dependencies, as `cargo test --workspace` does, so the build reuses
/// every library that test build made. (`-p rsb-worker` alone resolves other
/// features, libc's among them, and rebuilt half the tree a second time.)
pub fn binary(name: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    // Test executables live in target/<profile>/deps/.
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>");
    let path = profile_dir.join(name);
    BUILT.get_or_init(|| {
        let mut cargo =
            std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cargo.current_dir(workspace_root()).args(BINARIES_BUILD);
        if profile_dir.file_name().is_some_and(|p| p == "release") {
            cargo.arg("--release");
        }
        without_package_variables(&mut cargo);
        let status = cargo.status().expect("running cargo build");
        assert!(status.success(), "cargo {} failed", BINARIES_BUILD.join(" "));
    });
    assert!(path.is_file(), "{} was not built", path.display());
    path
}

/// The cargo arguments that build the workspace's binaries with the feature
/// resolution of `cargo test --workspace`; `bench/gpu.sh --pack` uses the same.
pub const BINARIES_BUILD: [&str; 5] = ["build", "-q", "--workspace", "--bins", "--examples"];

/// Leaves out of `command`'s environment the variables cargo gives a test
/// process for its package (CARGO_MANIFEST_DIR, OUT_DIR, CARGO_PKG_*, ...),
/// for a command that runs cargo. Inherited, they change what build scripts
/// watch (ring reruns when CARGO_MANIFEST_DIR or OUT_DIR changes), so half
/// the workspace would be rebuilt there and again by the next `cargo test`.
pub fn without_package_variables(
    command: &mut std::process::Command,
) -> &mut std::process::Command {
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(is_package_variable) {
            command.env_remove(key);
        }
    }
    command
}

/// Whether `name` is one of the variables cargo sets for the package whose
/// target it runs, rather than one that configures cargo itself.
fn is_package_variable(name: &str) -> bool {
    const EXACT: [&str; 8] = [
        "OUT_DIR",
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_MANIFEST_LINKS",
        "CARGO_CRATE_NAME",
        "CARGO_BIN_NAME",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
    ];
    EXACT.contains(&name) || name.starts_with("CARGO_PKG_") || name.starts_with("CARGO_BIN_EXE_")
}

/// The project's Python (the venv with torch and timm).
pub fn python() -> PathBuf {
    let p = workspace_root().join(".venv").join("bin").join("python");
    assert!(p.is_file(), "{} is missing; run scripts/setup", p.display());
    p
}

/// Debian's `dataset-fashion-mnist` files.
pub const FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";

fn read_gz(path: &Path) -> Vec<u8> {
    let raw = std::fs::read(path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; install the Debian package dataset-fashion-mnist (scripts/setup does)",
            path.display()
        )
    });
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(raw.as_slice()).read_to_end(&mut out).unwrap();
    out
}

/// Writes IDX files holding the first `per_class` images of each class.
fn subset_idx(dir: &Path, stem: &str, labels_stem: &str, per_class: usize) {
    let images = read_gz(&Path::new(FASHION_MNIST).join(format!("{stem}.gz")));
    let labels = read_gz(&Path::new(FASHION_MNIST).join(format!("{labels_stem}.gz")));
    let mut counts = [0usize; 10];
    let mut keep = Vec::new();
    for (i, &l) in labels[8..].iter().enumerate() {
        if counts[l as usize] < per_class {
            counts[l as usize] += 1;
            keep.push(i);
        }
    }
    let mut img = vec![0, 0, 8, 3];
    img.extend_from_slice(&(keep.len() as u32).to_be_bytes());
    img.extend_from_slice(&28u32.to_be_bytes());
    img.extend_from_slice(&28u32.to_be_bytes());
    let mut lab = vec![0, 0, 8, 1];
    lab.extend_from_slice(&(keep.len() as u32).to_be_bytes());
    for &i in &keep {
        img.extend_from_slice(&images[16 + i * 784..16 + (i + 1) * 784]);
        lab.push(labels[8 + i]);
    }
    std::fs::write(dir.join(stem), img).unwrap();
    std::fs::write(dir.join(labels_stem), lab).unwrap();
}

/// A small ImageNet-layout copy of real Fashion-MNIST (`train_per_class` and
/// `val_per_class` images of each class), made with `worker data import`.
pub fn fashion_subset(root: &Path, train_per_class: usize, val_per_class: usize) -> PathBuf {
    let idx = root.join("idx");
    std::fs::create_dir_all(&idx).unwrap();
    subset_idx(&idx, "train-images-idx3-ubyte", "train-labels-idx1-ubyte", train_per_class);
    subset_idx(&idx, "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", val_per_class);
    let out = root.join("fashion");
    let run = std::process::Command::new(binary("worker"))
        .args([
            "data",
            "import",
            "fashion-mnist",
            "--idx-dir",
            idx.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .expect("running worker data import");
    assert!(run.status.success(), "import failed: {}", String::from_utf8_lossy(&run.stderr));
    out
}

/// The tiny CPU recipe most end-to-end tests train.
pub fn tiny_recipe() -> PathBuf {
    workspace_root().join("recipes/debug/resnet18_tiny_cpu.yaml")
}

/// A free TCP port on `ip` (free when asked; tests bind it soon after, and
/// some bind it again later: a coordinator restarted on its port). It is
/// picked below the kernel's ephemeral range
/// (`/proc/sys/net/ipv4/ip_local_port_range`), where no `bind` to port 0 of
/// another test or process (a rank's ring listener) can take it meanwhile;
/// each call of a process takes the next one from a start set by its pid.
pub fn free_port(ip: &str) -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static CALLS: AtomicU32 = AtomicU32::new(0);
    const LOWEST: u32 = 10_000;
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let span = ephemeral_start.saturating_sub(LOWEST);
    if span >= 1_000 {
        let start = std::process::id().wrapping_mul(7_919);
        for _ in 0..span {
            let offset = start.wrapping_add(CALLS.fetch_add(1, Ordering::Relaxed)) % span;
            let port = u16::try_from(LOWEST + offset).expect("below the ephemeral range");
            if std::net::TcpListener::bind((ip, port)).is_ok() {
                return port;
            }
        }
    }
    std::net::TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap().port()
}

/// The `--set`s of the multi-rank job tests on the tiny recipe: `data`'s 10
/// classes, a global batch of 12 in micro-batches of 2 (6 sampler streams:
/// worlds of 1, 2, 3 and 6 ranks), and a record per update.
pub fn small_batch_sets(data: &Path) -> Vec<String> {
    vec![
        format!("data.root={}", data.display()),
        "model.num_classes=10".into(),
        "batch.global_size=12".into(),
        "batch.micro_size=2".into(),
        "runtime.log_every_steps=1".into(),
    ]
}

/// Jobs and sweeps of the tiny recipe started from tests, their output
/// going to log files.
pub mod sweeps {
    pub use super::tiny_recipe;
    use super::{binary, workspace_root};
    use std::path::Path;
    use std::process::{Child, Command, Stdio};

    /// The job token of these jobs (given through the environment).
    pub const TOKEN: &str = "sweep-test-token-5c81f0aa";

    /// Starts `coordinator up --local` on the tiny recipe with `sets`
    /// (`--set`) and `extra` arguments, its output going to `log`.
    pub fn start(out: &Path, sets: &[String], extra: &[&str], log: &Path) -> Child {
        let mut args = vec!["--local"];
        args.extend_from_slice(extra);
        coordinator_up(out, sets, &args, log)
    }

    /// Starts `coordinator up` on the tiny recipe with `sets` (`--set`) and
    /// `extra` arguments, its output going to `log` (a file: a pipe nobody
    /// reads would fill and stop it).
    pub fn coordinator_up(out: &Path, sets: &[String], extra: &[&str], log: &Path) -> Child {
        spawn_logged(coordinator_up_command(out, sets, extra), log)
    }

    /// The command line `coordinator up` on the tiny recipe with `sets`
    /// (`--set`) and `extra` arguments, without a job token or a place for
    /// its output yet.
    pub fn coordinator_up_command(out: &Path, sets: &[String], extra: &[&str]) -> Command {
        let mut cmd = Command::new(binary("coordinator"));
        cmd.args(["up", "--recipe"]).arg(tiny_recipe()).arg("--out").arg(out);
        for set in sets {
            cmd.args(["--set", set]);
        }
        cmd.args(extra).env_remove("RSB_JOB_TOKEN").stdin(Stdio::null());
        cmd
    }

    /// Starts `worker join --devices cpu --cores 1` against the coordinator
    /// on `port` as host `name`, its output going to `log`.
    pub fn worker_join(port: u16, name: &str, log: &Path) -> Child {
        worker_join_with_env(port, name, log, &[])
    }

    /// [`worker_join`] with the variables `env` set (test hooks its ranks
    /// inherit).
    pub fn worker_join_with_env(port: u16, name: &str, log: &Path, env: &[(&str, &str)]) -> Child {
        let mut cmd = Command::new(binary("worker"));
        cmd.envs(env.iter().copied());
        cmd.args(["join", "--coordinator", &format!("http://127.0.0.1:{port}")]).args([
            "--devices",
            "cpu",
            "--cores",
            "1",
            "--host-name",
            name,
        ]);
        spawn_logged(cmd, log)
    }

    fn spawn_logged(mut cmd: Command, log: &Path) -> Child {
        let file = std::fs::File::create(log).expect("creating the log");
        cmd.env("RSB_JOB_TOKEN", TOKEN)
            .current_dir(workspace_root())
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .expect("starting a binary")
    }

    /// Waits (at most 180 s) until `ready` holds, failing with `log`.
    pub fn wait_until(what: &str, log: &Path, mut ready: impl FnMut() -> bool) {
        let start = std::time::Instant::now();
        while !ready() {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(180),
                "timed out waiting for {what}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// The losses of every step record of a run folder, in order.
    pub fn step_losses(run_dir: &Path) -> Vec<f64> {
        super::run_records(run_dir, "step")
            .iter()
            .map(|r| r["loss"].as_f64().expect("a step record has a loss"))
            .collect()
    }
}

/// Reading a job's `metrics.jsonl` while it runs, for the elastic tests.
pub mod elastic_records {
    use std::path::Path;

    /// Every record of `out/metrics.jsonl` in order (none while it does not
    /// exist; a line being written is left out).
    pub fn all_records(out: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The index of the first record of `kind` matching `pred`.
    pub fn position(
        records: &[serde_json::Value],
        kind: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<usize> {
        records.iter().position(|r| r["kind"] == kind && pred(r))
    }

    /// The most updates any step record before `index` reports.
    pub fn steps_before(records: &[serde_json::Value], index: usize) -> u64 {
        records[..index]
            .iter()
            .filter(|r| r["kind"] == "step")
            .filter_map(|r| r["step"].as_u64())
            .max()
            .unwrap_or(0)
    }

    /// Updates of the whole run, as the ranks planned it.
    pub fn planned_updates(out: &Path) -> u64 {
        let steps = crate::records_in(&out.join("metrics.jsonl"), "step");
        steps.last().expect("no step record")["total_updates"].as_u64().expect("total_updates")
    }

    /// Checks, from `out/metrics.jsonl`, a 3-host job of 6 sampler streams
    /// that lost `host` and finished its `epochs` epochs: a generation of 2
    /// hosts without it (accumulation 3), a generation naming it lost, a
    /// resume from a mid-epoch checkpoint, at most `interval` updates lost.
    /// Returns the updates lost.
    pub fn assert_shrunk_without(out: &Path, host: &str, interval: u64, epochs: u64) -> u64 {
        let records = all_records(out);
        let at = position(&records, "generation", |g| g["world_size"] == 2)
            .unwrap_or_else(|| panic!("no generation of world size 2: {records:#?}"));
        let generation = &records[at];
        assert_eq!(generation["accumulation"], 3, "6 streams over 2 ranks");
        let hosts: Vec<&str> = generation["hosts"]
            .as_array()
            .expect("hosts")
            .iter()
            .filter_map(|h| h.as_str())
            .collect();
        assert!(!hosts.contains(&host) && hosts.len() == 2, "{generation}");
        let lost_host = records[..=at].iter().filter(|r| r["kind"] == "generation").any(|g| {
            g["reasons"]
                .as_array()
                .is_some_and(|rs| rs.iter().any(|r| r["kind"] == "lost_host" && r["host"] == host))
        });
        assert!(lost_host, "no generation names the lost host {host}: {records:#?}");
        let resumed = generation["resume_from"].as_str().expect("a checkpoint to resume from");
        assert!(resumed.contains("epoch-"), "{resumed}");
        let resume_step = generation["resume_step"].as_u64().expect("resume_step");
        let epoch_records = crate::records_in(&out.join("metrics.jsonl"), "epoch");
        let epoch_updates = epoch_records[0]["step"].as_u64().expect("updates of an epoch");
        assert!(
            resume_step > epoch_updates,
            "resumed from an epoch end, not mid-epoch: {generation}"
        );
        let lost = steps_before(&records, at).saturating_sub(resume_step);
        assert!(
            lost <= interval,
            "{lost} updates lost, more than the checkpoint interval of {interval}"
        );
        let planned = planned_updates(out);
        assert_eq!(planned, epochs * epoch_updates);
        let last = epoch_records.last().expect("epoch records");
        assert_eq!(
            (last["epoch"].as_u64(), last["step"].as_u64()),
            (Some(epochs - 1), Some(planned))
        );
        lost
    }
}

/// The processes of the tests' jobs, read from `/proc`, and waits with deadlines.
pub mod processes {
    use std::process::{Child, Command, Output, Stdio};
    use std::time::{Duration, Instant};

    /// The parent pid of a live process, from `/proc/PID/stat` (`None` once
    /// it is gone or a zombie waiting to be reaped).
    pub fn parent_of(pid: u32) -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // "pid (comm) state ppid ...": comm may hold spaces, so split after ')'.
        let rest = &stat[stat.rfind(')')? + 2..];
        let mut fields = rest.split_whitespace();
        if fields.next()? == "Z" {
            return None;
        }
        fields.next()?.parse().ok()
    }

    /// The command line of `pid` (empty once it is gone).
    pub fn cmdline(pid: u32) -> String {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default()
    }

    /// The live children of `pid`.
    pub fn children_of(pid: u32) -> Vec<u32> {
        all_pids().into_iter().filter(|&p| parent_of(p) == Some(pid)).collect()
    }

    /// Every live descendant of `root`.
    pub fn descendants(root: u32) -> Vec<u32> {
        let pids = all_pids();
        let mut found = vec![root];
        loop {
            let before = found.len();
            for &pid in &pids {
                if !found.contains(&pid) && parent_of(pid).is_some_and(|p| found.contains(&p)) {
                    found.push(pid);
                }
            }
            if found.len() == before {
                break;
            }
        }
        found.split_off(1)
    }

    fn all_pids() -> Vec<u32> {
        std::fs::read_dir("/proc")
            .expect("/proc")
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect()
    }

    /// The process among `pids` that holds `file` open (a rank keeps its
    /// log open).
    pub fn holder_of(pids: &[u32], file: &std::path::Path) -> Option<u32> {
        pids.iter().copied().find(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
                fds.filter_map(Result::ok)
                    .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target == file))
            })
        })
    }

    /// Sends signal `name` (`KILL`, `STOP`, ...) to `pid`; whether it was sent.
    pub fn signal(pid: u32, name: &str) -> bool {
        Command::new("kill")
            .args(["-s", name, &pid.to_string()])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Waits for `child`, killing it and failing the test (with what its
    /// stderr said by then) past `limit`. Its piped stdout and stderr are
    /// read as it writes them, so that a child that says much never waits
    /// on a full pipe, nor loses what it said.
    pub fn wait_with_timeout(mut child: Child, limit: Duration, what: &str) -> Output {
        let (stdout, stderr) =
            (Drain::start(child.stdout.take()), Drain::start(child.stderr.take()));
        let start = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                break status;
            }
            if start.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                // Not read to its end: a process the child started may hold it.
                panic!(
                    "{what} did not finish within {limit:?}:\n{}",
                    String::from_utf8_lossy(&stderr.so_far())
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        Output { status, stdout: stdout.read_to_end(), stderr: stderr.read_to_end() }
    }

    /// A child's pipe, read on a thread of its own as the child writes
    /// (a full pipe would block the child, and every process sharing it).
    pub struct Drain {
        read: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
        reader: Option<std::thread::JoinHandle<()>>,
    }

    impl Drain {
        /// Starts reading `pipe` (none: nothing is read).
        pub fn start<R: std::io::Read + Send + 'static>(pipe: Option<R>) -> Drain {
            let read = std::sync::Arc::<std::sync::Mutex<Vec<u8>>>::default();
            let reader = pipe.map(|mut pipe| {
                let read = std::sync::Arc::clone(&read);
                std::thread::spawn(move || {
                    let mut chunk = [0u8; 8192];
                    while let Ok(n @ 1..) = pipe.read(&mut chunk) {
                        read.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .extend_from_slice(&chunk[..n]);
                    }
                })
            });
            Drain { read, reader }
        }

        /// What was read so far.
        pub fn so_far(&self) -> Vec<u8> {
            self.read.lock().unwrap_or_else(|p| p.into_inner()).clone()
        }

        /// Everything, once the pipe ends.
        pub fn read_to_end(mut self) -> Vec<u8> {
            if let Some(reader) = self.reader.take() {
                let _ = reader.join();
            }
            self.so_far()
        }
    }
}

/// Runs `ip` (iproute2) with `args`; its stderr on failure.
pub fn ip(args: &[&str]) -> Result<(), String> {
    run_tool("ip", args)
}

/// Runs `tc` (iproute2, traffic control) with `args`; its stderr on failure.
pub fn tc(args: &[&str]) -> Result<(), String> {
    run_tool("tc", args)
}

/// Runs the tool `name` with `args`; its stderr on failure.
fn run_tool(name: &str, args: &[&str]) -> Result<(), String> {
    let out =
        std::process::Command::new(name).args(args).output().map_err(|e| format!("{name}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{name} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr)))
    }
}

/// Hosts as network namespaces `rsbw{tag}{i}` (i = 1..), each with a veth
/// pair (`rsbv{tag}{i}` on the host side, `eth0` inside) on a bridge
/// `rsbbr{tag}` holding `10.{subnet}.0.1/24`; host i is `10.{subnet}.0.{i+1}`.
/// Everything is removed on drop, also when a test fails.
pub struct Netns {
    /// The namespaces, host 1 first.
    pub names: Vec<String>,
    /// The host-side end of each namespace's veth pair.
    pub host_ends: Vec<String>,
    /// The host side's address on the bridge (where a coordinator listens).
    pub bridge_address: String,
    bridge: String,
}

impl Netns {
    /// `hosts` namespaces on subnet `10.{subnet}.0.0/24` (a distinct subnet
    /// per test file, so that concurrent test binaries do not collide).
    pub fn create(tag: &str, subnet: u8, hosts: usize) -> Result<Netns, String> {
        remove_leftovers(subnet);
        let bridge = format!("rsbbr{tag}");
        let bridge_address = format!("10.{subnet}.0.1");
        let mut ns = Netns {
            names: Vec::new(),
            host_ends: Vec::new(),
            bridge_address: bridge_address.clone(),
            bridge: bridge.clone(),
        };
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{bridge_address}/24"), "dev", &bridge])?;
        ip(&["link", "set", &bridge, "up"])?;
        for i in 1..=hosts {
            let name = format!("rsbw{tag}{i}");
            let host_end = format!("rsbv{tag}{i}");
            ip(&["netns", "add", &name])?;
            ns.names.push(name.clone());
            ip(&[
                "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &name,
            ])?;
            ns.host_ends.push(host_end.clone());
            ip(&["link", "set", &host_end, "master", &bridge])?;
            ip(&["link", "set", &host_end, "up"])?;
            let addr = format!("10.{subnet}.0.{}/24", i + 1);
            ip(&["-n", &name, "addr", "add", &addr, "dev", "eth0"])?;
            ip(&["-n", &name, "link", "set", "eth0", "up"])?;
        }
        Ok(ns)
    }
}

/// Removes what a killed run of a test on `subnet` left (its `Drop` never
/// ran): a bridge `rsbbr{tag}` holding `10.{subnet}.0.1/24`, and its
/// namespaces `rsbw{tag}{i}`, whose removal takes their veth pairs along.
/// Each test file has its own subnet and one test that uses it, so such a
/// bridge is no live test's; left there, the new bridge's address would be
/// held twice, and the namespaces' hosts could not reach it.
fn remove_leftovers(subnet: u8) {
    let listed = |args: &[&str]| {
        std::process::Command::new("ip")
            .args(args)
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
            .unwrap_or_default()
    };
    let address = format!("10.{subnet}.0.1/24");
    let addresses = listed(&["-o", "-4", "addr", "show"]);
    let namespaces = listed(&["netns", "list"]);
    for line in addresses.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(device), Some(held)) = (fields.get(1), fields.get(3)) else { continue };
        let Some(tag) = device.strip_prefix("rsbbr") else { continue };
        if *held != address {
            continue;
        }
        eprintln!("removing {device} ({address}) and its namespaces, left by a killed test run");
        let prefix = format!("rsbw{tag}");
        for name in namespaces.lines().filter_map(|l| l.split_whitespace().next()) {
            if name.strip_prefix(&prefix).is_some_and(|i| i.parse::<u32>().is_ok()) {
                let _ = ip(&["netns", "del", name]);
            }
        }
        let _ = ip(&["link", "del", device]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = ip(&["netns", "del", n]);
        }
        for end in &self.host_ends {
            let _ = ip(&["link", "del", end]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

#[cfg(test)]
mod tests {
    use super::{is_package_variable, workspace_root, BINARIES_BUILD};

    #[test]
    fn only_the_package_variables_are_left_out_of_a_nested_build() {
        for name in ["CARGO_MANIFEST_DIR", "OUT_DIR", "CARGO_PKG_NAME", "CARGO_BIN_EXE_worker"] {
            assert!(is_package_variable(name), "{name}");
        }
        for name in ["CARGO_HOME", "CARGO_TARGET_DIR", "CARGO_BUILD_JOBS", "CARGO", "PATH"] {
            assert!(!is_package_variable(name), "{name}");
        }
    }

    #[test]
    fn the_gpu_bundle_builds_the_binaries_as_the_tests_do() {
        // Another build would resolve other features and rebuild the tree
        // under CI, where the GPU dry run packs its bundle.
        let script = std::fs::read_to_string(workspace_root().join("bench/gpu.sh")).unwrap();
        let command = format!("cargo {} --release", BINARIES_BUILD.join(" "));
        assert!(script.contains(&command), "bench/gpu.sh does not run `{command}`");
        assert!(!script.contains("cargo build --release -q -p"), "bench/gpu.sh builds one package");
    }
}
