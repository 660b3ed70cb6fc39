//! The deployment files: the Kubernetes manifests validate against the
//! Kubernetes 1.33 schemas in strict mode (unknown fields are errors), with
//! `kubernetes-validate` from the project venv, offline; and the validator
//! itself rejects a manifest with a misspelt field, so the check can fail.

use rsb_integration_tests::{is_executable, require, workspace_root};
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
    std::fs::write(&broken, text.replacen("backoffLimit: 0", "backofLimit: 0", 1)).unwrap();
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
