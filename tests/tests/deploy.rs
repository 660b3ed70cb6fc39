//! The deployment files: the Kubernetes manifests validate against the
//! Kubernetes 1.33 schemas in strict mode (unknown fields are errors), with
//! `kubernetes-validate` from the project venv, offline; and the validator
//! itself rejects a manifest with a misspelt field, so the check can fail.

use rsb_integration_tests::workspace_root;
use std::process::Command;

fn validate(path: &std::path::Path) -> std::process::Output {
    let tool = workspace_root().join(".venv/bin/kubernetes-validate");
    assert!(tool.is_file(), "{} is missing; run scripts/setup --test", tool.display());
    Command::new(tool)
        .args(["--strict", "-k", "1.33.0"])
        .arg(path)
        .output()
        .expect("running kubernetes-validate")
}

#[test]
fn kubernetes_manifests_validate_strictly() {
    let manifest = workspace_root().join("deploy/k8s/rsb-job.yaml");
    let out = validate(&manifest);
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
    let out = validate(&broken);
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
