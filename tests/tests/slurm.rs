//! `deploy/slurm/train.sbatch` on a real Slurm cluster: two emulated nodes on
//! this host (`scripts/slurm-local`), the coordinator on the head node, one
//! `worker join` with CPU ranks per node, the tiny recipe on real
//! Fashion-MNIST images. The job must end successfully with metrics and a
//! checkpoint in the run folder; the cluster is stopped afterwards.

use rsb_integration_tests::{
    binary, fashion_subset, is_executable, is_root, on_path, require, workspace_root,
};
use std::path::{Path, PathBuf};
use std::process::Command;

struct Cluster {
    dir: PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(workspace_root().join("scripts/slurm-local"))
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

#[test]
fn sbatch_runs_a_two_node_job() {
    if !require(is_root(), "root, to start slurmctld/slurmd/munged")
        || !require(
            ["/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/sbin/munged"]
                .iter()
                .all(|p| is_executable(Path::new(p)))
                && on_path("sbatch"),
            "Slurm and munge (slurmctld, slurmd, munged, sbatch; scripts/setup --test installs them)",
        )
    {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = fashion_subset(tmp.path(), 16, 4);
    let _ = (binary("worker"), binary("coordinator"));
    let state = tmp.path().join("slurm");
    let started = Command::new(workspace_root().join("scripts/slurm-local"))
        .arg("start")
        .arg(&state)
        .status()
        .unwrap();
    let cluster = Cluster { dir: state.clone() };
    assert!(started.success(), "the local Slurm cluster did not start");
    let out = tmp.path().join("run");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let bin = binary("worker").parent().unwrap().to_path_buf();
    let job_log = tmp.path().join("job.out");
    let run = Command::new("timeout")
        .args(["600", "sbatch", "--wait", "--nodes=2", "--chdir"])
        .arg(workspace_root())
        .arg(format!("--output={}", job_log.display()))
        .arg(workspace_root().join("deploy/slurm/train.sbatch"))
        .arg(workspace_root().join("recipes/debug/resnet18_tiny_cpu.yaml"))
        .arg(&data)
        .arg(&out)
        .args(["--set", "model.num_classes=10"])
        .env("SLURM_CONF", state.join("slurm.conf"))
        .env("RSB_DEVICES", "cpu")
        .env("RSB_PORT", port.to_string())
        .env("RSB_BIN", &bin)
        .output()
        .unwrap();
    let log = std::fs::read_to_string(&job_log).unwrap_or_default();
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
    drop(cluster);
}
