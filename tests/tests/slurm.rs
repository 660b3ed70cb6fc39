//! `deploy/slurm/train.sbatch` on a real Slurm cluster: two emulated nodes on
//! this host (`scripts/slurm-local`), the coordinator on the head node, one
//! `worker join` with CPU ranks per node, the tiny recipe on real
//! Fashion-MNIST images; the cluster is stopped afterwards.
//!
//! * A job ends successfully with metrics and a checkpoint in its run folder,
//!   its workers calling the coordinator over TLS (a certificate the start
//!   made, signed by its own CA). Submitted again on its run folder (as
//!   Slurm would requeue it after its end), it trains nothing and ends
//!   successfully at once: its coordinator finds the job finished, tells
//!   the workers that join so (they exit 0) and exits 0 once both hosts
//!   were told, where the workers retried it for minutes, then failed.
//! * A job given the signal Slurm sends before its time limit
//!   (`--signal=B:USR1@300`: SIGUSR1 to the batch shell alone, sent here with
//!   `scancel --batch`) stops its ranks with a checkpoint of the update they
//!   are at, requeues itself, and its next start continues from that
//!   checkpoint to the end, no update lost or trained twice.
//! * A job given that signal before it wrote a checkpoint (its hosts never
//!   trained) is not requeued: it fails, saying why, instead of starting
//!   again where it began, for ever.

use rsb_integration_tests::{
    binary, fashion_subset, is_executable, is_root, on_path, require, workspace_root,
};
use rsb_job::MetricsRecord;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The cluster's ports are fixed: one test at a time.
static ONE_CLUSTER: Mutex<()> = Mutex::new(());

/// A local cluster, stopped when dropped.
struct Cluster {
    dir: PathBuf,
}

impl Cluster {
    /// Starts one in `dir`, or returns `None` where Slurm cannot run (and
    /// CI is not set: there a missing Slurm fails the test).
    fn start(dir: &Path) -> Option<Cluster> {
        if !require(is_root(), "root, to start slurmctld/slurmd/munged")
            || !require(
                ["/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/sbin/munged"]
                    .iter()
                    .all(|p| is_executable(Path::new(p)))
                    && on_path("sbatch"),
                "Slurm and munge (slurmctld, slurmd, munged, sbatch; scripts/setup --test installs them)",
            )
        {
            return None;
        }
        let started = Command::new(workspace_root().join("scripts/slurm-local"))
            .arg("start")
            .arg(dir)
            .status()
            .unwrap();
        let cluster = Cluster { dir: dir.to_path_buf() };
        assert!(started.success(), "the local Slurm cluster did not start");
        Some(cluster)
    }

    /// A Slurm client command of this cluster.
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command.env("SLURM_CONF", self.dir.join("slurm.conf"));
        command
    }

    /// `sbatch --nodes=2` of the training script for the tiny recipe on
    /// `data` into `out`, its output into `log`, with `extra` overrides.
    fn sbatch(
        &self,
        options: &[&str],
        data: &Path,
        out: &Path,
        log: &Path,
        extra: &[&str],
    ) -> Command {
        let port = rsb_integration_tests::free_port("127.0.0.1");
        let bin = binary("worker").parent().unwrap().to_path_buf();
        let _ = binary("coordinator");
        let mut command = self.command("timeout");
        command
            .args(["600", "sbatch", "--nodes=2", "--chdir"])
            .arg(workspace_root())
            .arg(format!("--output={}", log.display()))
            .args(options)
            .arg(workspace_root().join("deploy/slurm/train.sbatch"))
            .arg(workspace_root().join("recipes/debug/resnet18_tiny_cpu.yaml"))
            .arg(data)
            .arg(out)
            .args(["--set", "model.num_classes=10"])
            .args(extra.iter().flat_map(|set| ["--set", set]))
            .env("RSB_DEVICES", "cpu")
            .env("RSB_PORT", port.to_string())
            .env("RSB_BIN", &bin);
        command
    }

    /// Sends job `id` the signal Slurm sends before its time limit
    /// (`--signal=B:USR1@300`: SIGUSR1 to the batch shell alone), and
    /// returns when it was sent.
    fn signal_time_limit(&self, id: &str) -> Instant {
        let signalled =
            self.command("scancel").args(["--batch", "--signal=USR1", id]).status().unwrap();
        assert!(signalled.success(), "scancel --batch --signal=USR1 {id}");
        Instant::now()
    }

    /// `scontrol show job ID` as one line.
    fn job(&self, id: &str) -> String {
        let shown = self.command("scontrol").args(["show", "job", "-o", id]).output().unwrap();
        String::from_utf8_lossy(&shown.stdout).into_owned()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(workspace_root().join("scripts/slurm-local"))
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

/// What each test starts from: the cluster (one test at a time), the
/// Fashion-MNIST images, the run folder and the job's log, in `tmp`.
struct Trial {
    cluster: Cluster,
    data: PathBuf,
    out: PathBuf,
    job_log: PathBuf,
    tmp: tempfile::TempDir,
    // Last: the cluster is stopped and its folder removed before the next
    // test may start one.
    _one: std::sync::MutexGuard<'static, ()>,
}

impl Trial {
    /// A started cluster, 16 training images a class and `val_per_class`
    /// validation images, or `None` where Slurm cannot run (see
    /// [`Cluster::start`]).
    fn start(val_per_class: usize) -> Option<Trial> {
        let one = ONE_CLUSTER.lock().unwrap_or_else(|p| p.into_inner());
        let tmp = tempfile::tempdir().unwrap();
        let cluster = Cluster::start(&tmp.path().join("slurm"))?;
        Some(Trial {
            cluster,
            data: fashion_subset(tmp.path(), 16, val_per_class),
            out: tmp.path().join("run"),
            job_log: tmp.path().join("job.out"),
            tmp,
            _one: one,
        })
    }
}

/// The value of `Field=value` in a line of `scontrol show -o`.
fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
}

#[test]
fn sbatch_runs_a_two_node_job() {
    let Some(trial) = Trial::start(4) else { return };
    let Trial { cluster, data, out, job_log, .. } = &trial;
    let run = cluster.sbatch(&["--wait"], data, out, job_log, &[]).output().unwrap();
    let log = std::fs::read_to_string(job_log).unwrap_or_default();
    assert!(
        run.status.success(),
        "sbatch job failed:\n{}\n{log}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        log.contains("every rank") || log.contains("img/s (all ranks)"),
        "no progress in the job log:\n{log}"
    );
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert!(metrics.lines().any(|l| l.contains("\"kind\":\"epoch\"")), "{metrics}");
    assert!(out.join("checkpoints/epoch-0001/model.safetensors").is_file());
    // Over TLS: the coordinator's certificate, signed by this start's CA,
    // whose key is gone; the coordinator's key is its owner's alone; no
    // clear-text warning.
    let tls = out.join("tls");
    for file in ["ca.pem", "coordinator.pem", "coordinator.key"] {
        assert!(tls.join(file).is_file(), "{file} missing in {}", tls.display());
    }
    assert!(!tls.join("ca.key").exists(), "the CA's key was kept");
    let mode = std::fs::metadata(tls.join("coordinator.key")).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "coordinator.key is mode {mode:o}");
    assert!(!log.contains("without TLS"), "{log}");

    // Started again: the coordinator tells the workers that join the job
    // is finished (they exit 0), and exits once both hosts were told;
    // before, the workers retried a coordinator that had gone for 2
    // minutes, then failed the job.
    let again_log = trial.tmp.path().join("again.out");
    let began = Instant::now();
    let again = cluster
        .sbatch(&["--wait"], data, out, &again_log, &[])
        .env("RSB_WORKER_GRACE_SECS", "5")
        .output()
        .unwrap();
    let took = began.elapsed();
    let log = std::fs::read_to_string(&again_log).unwrap_or_default();
    assert!(
        again.status.success(),
        "the finished job started again failed after {took:?}:\n{}\n{log}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert!(log.contains("nothing is left to train"), "{log}");
    assert!(log.contains("2 host(s) told the job is finished"), "{log}");
    assert!(!log.contains("stopping it"), "the workers' step was stopped:\n{log}");
    assert!(took < Duration::from_secs(60), "took {took:?}:\n{log}");
    eprintln!("the finished job, started again, ended successfully in {:.1} s", took.as_secs_f64());
}

#[test]
fn a_job_near_its_time_limit_stops_with_a_checkpoint_requeues_and_continues() {
    let Some(trial) = Trial::start(1) else { return };
    let Trial { cluster, data, out, job_log, .. } = &trial;
    // 10 updates an epoch, each logged (a sync point, where a stop is voted).
    let sets = ["schedule.cosine.epochs=4", "runtime.log_every_steps=1"];
    let submitted = cluster.sbatch(&["--parsable"], data, out, job_log, &sets).output().unwrap();
    assert!(submitted.status.success(), "{}", String::from_utf8_lossy(&submitted.stderr));
    let id = String::from_utf8_lossy(&submitted.stdout).trim().to_string();
    let log = || std::fs::read_to_string(job_log).unwrap_or_default();

    // Once it trains, the signal of a near time limit.
    let started = Instant::now();
    let metrics = out.join("metrics.jsonl");
    while !std::fs::read_to_string(&metrics).is_ok_and(|m| m.contains("\"kind\":\"step\"")) {
        assert!(started.elapsed() < Duration::from_secs(180), "no update:\n{}", log());
        std::thread::sleep(Duration::from_millis(200));
    }
    let signal_at = cluster.signal_time_limit(&id);
    let mut requeued_after = None;

    // Requeued; Slurm holds a requeued job for two minutes, released here
    // 3 s after it is seen pending: released at once, its second start
    // failed at launch in about 1 run in 4, starting and ending in the
    // second its first start ended (the hold Slurm puts on a requeued job
    // avoids that; our reading is that the job's old credentials are
    // revoked to the second).
    let mut released = false;
    let mut pending_since: Option<Instant> = None;
    loop {
        let job = cluster.job(&id);
        assert!(started.elapsed() < Duration::from_secs(420), "job {id}: {job}\n{}", log());
        // A controller too busy to answer at once: asked again.
        let Some(state) = field(&job, "JobState") else {
            std::thread::sleep(Duration::from_millis(500));
            continue;
        };
        if state == "COMPLETED" {
            break;
        }
        assert!(
            ["RUNNING", "PENDING", "COMPLETING", "REQUEUED", "CONFIGURING"].contains(&state),
            "job {id}: {job}\n{}",
            log()
        );
        let requeued = state == "PENDING" && field(&job, "Restarts") == Some("1");
        if requeued && pending_since.is_none() {
            pending_since = Some(Instant::now());
            requeued_after = Some(signal_at.elapsed());
        }
        if !released
            && requeued
            && pending_since.is_some_and(|t| t.elapsed() >= Duration::from_secs(3))
        {
            let update = cluster
                .command("scontrol")
                .args(["update", &format!("JobId={id}"), "StartTime=now"])
                .status()
                .unwrap();
            released = update.success();
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let log = log();
    assert_eq!(field(&cluster.job(&id), "Restarts"), Some("1"), "{log}");

    // The stop wrote a checkpoint of the update it stopped after, and the
    // requeued start continued from it.
    let written = log
        .lines()
        .find_map(|l| l.split_once(": checkpoint ")?.1.split_once(" written; resume from it"))
        .map(|(path, _)| path)
        .unwrap_or_else(|| panic!("no checkpoint written at the stop:\n{log}"));
    let continued = log
        .lines()
        .find_map(|l| l.strip_prefix("--auto-resume: continuing from "))
        .unwrap_or_else(|| panic!("the second start did not continue:\n{log}"));
    // Compared resolved (the checkpoint itself may be pruned since).
    let resolved = |path: &str| {
        let path = Path::new(path);
        std::fs::canonicalize(path.parent().unwrap()).unwrap().join(path.file_name().unwrap())
    };
    assert_eq!(resolved(continued), resolved(written), "{log}");
    assert!(log.contains("requeueing job"), "{log}");
    assert!(out.join("checkpoints/epoch-0004/manifest.json").is_file(), "{log}");

    // Every update once: the records of the second start's updates follow
    // the stop's update without a gap, up to the last.
    let records: Vec<MetricsRecord> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let generations: Vec<usize> = records
        .iter()
        .enumerate()
        .filter(|(_, r)| matches!(r, MetricsRecord::Generation { .. }))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(generations.len(), 2, "{log}");
    let steps = |records: &[MetricsRecord]| -> Vec<u64> {
        records
            .iter()
            .filter(|r| matches!(r, MetricsRecord::Step { .. }))
            .map(MetricsRecord::step)
            .collect()
    };
    let before = steps(&records[..generations[1]]);
    let after = steps(&records[generations[1]..]);
    let stopped_at = *before.last().expect("updates before the stop");
    // `epoch-EEEE-update-UUUUUUUUU` mid-epoch, `epoch-EEEE` at an epoch's end.
    let name = written.rsplit('/').next().unwrap();
    let checkpoint_update = match name.split_once("-update-") {
        Some((_, update)) => update.parse::<u64>().unwrap(),
        None => name.trim_start_matches("epoch-").parse::<u64>().unwrap() * 10,
    };
    assert_eq!(checkpoint_update, stopped_at, "{written}");
    let planned = 40;
    let expected: Vec<u64> = (stopped_at + 1..=planned).collect();
    assert_eq!(after, expected, "updates after the requeue, stopped after {stopped_at}:\n{log}");
    eprintln!(
        "stopped after update {stopped_at} with its checkpoint; requeued {:.1} s after the \
         signal; continued with updates {}..={planned}",
        requeued_after.expect("seen pending after the requeue").as_secs_f64(),
        stopped_at + 1
    );
}

#[test]
fn a_job_signalled_before_it_wrote_a_checkpoint_fails_instead_of_requeueing() {
    let Some(trial) = Trial::start(1) else { return };
    let Trial { cluster, data, out, job_log, .. } = &trial;
    // Hosts that never join, so that nothing trains before the signal: the
    // real coordinator, and a `worker` that only waits.
    let bin = trial.tmp.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(binary("coordinator"), bin.join("coordinator")).unwrap();
    std::fs::write(bin.join("worker"), "#!/bin/sh\nexec sleep 600\n").unwrap();
    std::fs::set_permissions(
        bin.join("worker"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let submitted = cluster
        .sbatch(&["--parsable"], data, out, job_log, &[])
        .args(["--join-timeout-secs", "20"])
        .env("RSB_BIN", &bin)
        .output()
        .unwrap();
    assert!(submitted.status.success(), "{}", String::from_utf8_lossy(&submitted.stderr));
    let id = String::from_utf8_lossy(&submitted.stdout).trim().to_string();
    let log = || std::fs::read_to_string(job_log).unwrap_or_default();

    // Signalled once the script has started (its trap is set before that line).
    let started = Instant::now();
    while !log().contains("start 1 on 2 node(s)") {
        assert!(started.elapsed() < Duration::from_secs(120), "job {id} did not start:\n{}", log());
        std::thread::sleep(Duration::from_millis(200));
    }
    let signal_at = cluster.signal_time_limit(&id);

    let job = loop {
        let job = cluster.job(&id);
        assert!(started.elapsed() < Duration::from_secs(240), "job {id}: {job}\n{}", log());
        let Some(state) = field(&job, "JobState") else {
            std::thread::sleep(Duration::from_millis(500));
            continue;
        };
        assert_eq!(field(&job, "Restarts"), Some("0"), "requeued: {job}\n{}", log());
        if state == "FAILED" {
            break job;
        }
        assert!(
            ["RUNNING", "COMPLETING", "CONFIGURING"].contains(&state),
            "job {id}: {job}\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let log = log();
    assert!(
        log.contains(&format!(
            "rsb: not requeueing job {id}: this start wrote no checkpoint in {}",
            out.display()
        )),
        "{job}\n{log}"
    );
    assert!(!log.contains("rsb: requeueing job"), "{log}");
    eprintln!(
        "failed without a requeue {:.1} s after the signal",
        signal_at.elapsed().as_secs_f64()
    );
}
