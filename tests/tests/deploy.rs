//! The deployment files: the Kubernetes manifests validate against the
//! Kubernetes 1.33 schemas in strict mode (unknown fields are errors), with
//! `kubernetes-validate` from the project venv, offline; and the validator
//! itself rejects a manifest with a misspelt field, so the check can fail;
//! its containers' arguments are flags their binaries take; and the Slurm
//! script is valid bash (it runs on a real cluster in `tests/slurm.rs`).

use rsb_integration_tests::{binary, is_executable, require, workspace_root};
use std::path::{Path, PathBuf};
use std::process::Command;

/// `.venv/bin/kubernetes-validate`, installed by `scripts/setup --test`; None
/// (skip, outside CI only) when it is missing.
fn validator() -> Option<PathBuf> {
    let tool = workspace_root().join(".venv/bin/kubernetes-validate");
    let what = format!("{} (scripts/setup --test installs it)", tool.display());
    require(is_executable(&tool), &what).then_some(tool)
}

fn validate(tool: &Path, path: &Path) -> std::process::Output {
    Command::new(tool)
        .args(["--strict", "-k", "1.33.0"])
        .arg(path)
        .output()
        .expect("running kubernetes-validate")
}

#[test]
fn kubernetes_manifests_validate_strictly() {
    let Some(tool) = validator() else { return };
    let manifest = workspace_root().join("deploy/k8s/rsb-job.yaml");
    let out = validate(&tool, &manifest);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let tmp = tempfile::tempdir().unwrap();
    let broken = tmp.path().join("broken.yaml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    assert!(text.contains("backoffLimit:"));
    std::fs::write(&broken, text.replacen("backoffLimit:", "backofLimit:", 1)).unwrap();
    let out = validate(&tool, &broken);
    assert!(!out.status.success(), "a misspelt field passed validation");
}

#[test]
fn slurm_script_is_valid_bash() {
    let out = Command::new("bash")
        .arg("-n")
        .arg(workspace_root().join("deploy/slurm/train.sbatch"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Every container of the Kubernetes manifest runs its binary with flags it
/// takes: each container's arguments, with `--help` after them, are parsed
/// by the binary built here (clap refuses an unknown or misspelt flag before
/// it reaches `--help`).
#[test]
fn kubernetes_containers_run_their_binaries_with_flags_they_take() {
    let mut checked = Vec::new();
    for document in kubernetes_documents() {
        let containers = &document["spec"]["template"]["spec"]["containers"];
        for container in containers.as_sequence().into_iter().flatten() {
            let name = container["name"].as_str().unwrap();
            let args: Vec<String> = container["args"]
                .as_sequence()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap().to_string())
                .collect();
            let accepted = |args: &[String]| {
                let out = Command::new(binary(name)).args(args).arg("--help").output().unwrap();
                (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
            };
            let (ok, said) = accepted(&args);
            assert!(ok, "{name} {}: {said}", args.join(" "));
            let mut misspelt = args.clone();
            misspelt.push("--no-such-flag".into());
            assert!(!accepted(&misspelt).0, "{name} took a flag it does not have");
            checked.push(name.to_string());
        }
    }
    assert_eq!(checked, ["coordinator", "worker"]);
}

/// Both Jobs start their containers again after a failure, a bounded number
/// of times, and the coordinator with `--auto-resume`, so that a restarted
/// coordinator restores its job (which the agents continue) and a restarted
/// worker joins again (`coordinator_restart.rs` runs both cases).
#[test]
fn kubernetes_jobs_start_a_failed_coordinator_or_worker_again() {
    let mut jobs = Vec::new();
    for document in kubernetes_documents() {
        if document["kind"].as_str() != Some("Job") {
            continue;
        }
        let name = document["metadata"]["name"].as_str().unwrap().to_string();
        let spec = &document["spec"];
        let pod = &spec["template"]["spec"];
        assert_eq!(pod["restartPolicy"].as_str(), Some("OnFailure"), "{name}");
        let backoff = spec["backoffLimit"].as_u64().unwrap_or(0);
        assert!((1..=20).contains(&backoff), "{name}: backoffLimit {backoff}");
        let args = pod["containers"][0]["args"].as_sequence().unwrap();
        if name == "rsb-coordinator" {
            assert!(args.iter().any(|a| a.as_str() == Some("--auto-resume")), "{name}");
        }
        jobs.push(name);
    }
    assert_eq!(jobs, ["rsb-coordinator", "rsb-workers"]);
}

/// The documents of the Kubernetes manifest.
fn kubernetes_documents() -> Vec<serde_norway::Value> {
    use serde::Deserialize as _;
    let manifest = workspace_root().join("deploy/k8s/rsb-job.yaml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|document| serde_norway::Value::deserialize(document).unwrap())
        .collect()
}
