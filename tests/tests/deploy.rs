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

/// The Slurm script's `newest_checkpoint`, which decides whether a start
/// that was stopped before its time limit wrote a checkpoint (and is
/// requeued), run alone on run folders laid out by hand: the newest
/// committed checkpoint in training order (a mid-epoch one after the end
/// of the epoch before it), a folder without a manifest ignored, and a
/// changed manifest seen, also under `set -euo pipefail` with none.
#[test]
fn the_slurm_scripts_newest_checkpoint_is_the_last_committed_one_in_training_order() {
    let script =
        std::fs::read_to_string(workspace_root().join("deploy/slurm/train.sbatch")).unwrap();
    let start = script.find("newest_checkpoint() {").expect("newest_checkpoint in the script");
    let end = start + script[start..].find("\n}\n").expect("its end") + 3;
    let function = &script[start..end];
    let run = tempfile::tempdir().unwrap();
    let out = run.path();
    let newest = || {
        let shell = Command::new("bash")
            .arg("-c")
            .arg(format!("set -euo pipefail\n{function}newest_checkpoint\necho end"))
            .env("out", out)
            .output()
            .unwrap();
        assert!(shell.status.success(), "{}", String::from_utf8_lossy(&shell.stderr));
        let printed = String::from_utf8(shell.stdout).unwrap();
        printed.strip_suffix("end\n").expect("the function returned").to_string()
    };
    let commit = |name: &str, manifest: &str| {
        let folder = out.join("checkpoints").join(name);
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::write(folder.join("manifest.json"), manifest).unwrap();
    };
    let folder = |line: &str| line.trim_end().splitn(3, ' ').nth(2).map(str::to_string);

    assert_eq!(newest(), "", "a run folder without checkpoints");
    commit("epoch-0002", "a");
    commit("epoch-0003", "b");
    let end_of_third = newest();
    assert_eq!(folder(&end_of_third), Some(format!("{}/checkpoints/epoch-0003", out.display())));
    commit("epoch-0003-update-000000035", "c");
    let mid_fourth = newest();
    assert_eq!(
        folder(&mid_fourth),
        Some(format!("{}/checkpoints/epoch-0003-update-000000035", out.display()))
    );
    std::fs::create_dir_all(out.join("checkpoints/epoch-0004")).unwrap();
    assert_eq!(newest(), mid_fourth, "a folder without a manifest is not committed");
    commit("epoch-0003-update-000000035", "d");
    assert_ne!(newest(), mid_fourth, "a checkpoint written again under the same name");
}

/// Every container of the Kubernetes manifest runs its binary with flags it
/// takes: each container's arguments, with `--help` after them, are parsed
/// by the binary built here (clap refuses an unknown or misspelt flag before
/// it reaches `--help`).
#[test]
fn kubernetes_containers_run_their_binaries_with_flags_they_take() {
    use serde::Deserialize as _;
    use serde_norway::Value;
    let manifest = workspace_root().join("deploy/k8s/rsb-job.yaml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let mut checked = Vec::new();
    for document in serde_norway::Deserializer::from_str(&text) {
        let document = Value::deserialize(document).unwrap();
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
