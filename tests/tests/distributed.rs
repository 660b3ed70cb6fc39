//! Data-parallel training end to end, on CPU ranks joined by the TCP ring:
//!
//! * 2 ranks x 1 micro-batch give the same parameters and losses, update for
//!   update, as 1 rank accumulating the same 2 micro-batches (tolerance: exact
//!   equality; both sum the same two gradients, and a + b == b + a);
//! * every rank holds bit-identical parameters after every update (checksums);
//! * the gradient all-reduce overlapped with the backward pass (the default)
//!   and done after it give the same parameters and losses, bit for bit;
//! * bf16 gradient compression keeps the losses within 1% of the exact
//!   sums' and the replicas identical;
//! * `coordinator up --nodes 2` with two `worker join` processes, on loopback
//!   and with the workers as separate hosts in network namespaces (their own
//!   addresses, loopback down), so nothing silently relies on 127.0.0.1.
//!
//! The data is a small real Fashion-MNIST subset, as in `worker_cli.rs`.

use rsb_integration_tests::processes::wait_with_timeout;
use rsb_integration_tests::records_in as records;
use rsb_integration_tests::{
    binary, fashion_subset, is_root, on_path, require, workspace_root, Netns,
};
use rsb_integration_tests::{free_port, tiny_recipe};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// The job token of the jobs started by hand here (`up --local` makes its own).
const TOKEN: &str = "distributed-test-token-4f1c9a7e";

fn common_sets(data: &Path) -> Vec<String> {
    [
        format!("data.root={}", data.display()),
        "model.num_classes=10".into(),
        "runtime.log_every_steps=1".into(),
    ]
    .into_iter()
    .flat_map(|s| ["--set".to_string(), s])
    .collect()
}

fn coordinator_local(data: &Path, out: &Path, nodes: u32) -> Output {
    coordinator_local_with(data, out, nodes, &[])
}

fn coordinator_local_with(data: &Path, out: &Path, nodes: u32, extra: &[&str]) -> Output {
    let child = Command::new(binary("coordinator"))
        .args(["up", "--local", "--nodes", &nodes.to_string(), "--recipe"])
        .arg(tiny_recipe())
        .arg("--out")
        .arg(out)
        .args(common_sets(data))
        .args(extra)
        .env("RSB_CHECKSUM_EVERY_UPDATE", "1")
        .current_dir(workspace_root())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the coordinator");
    let _ = binary("worker"); // built before the coordinator starts it
    wait_with_timeout(child, Duration::from_secs(300), "coordinator up --local")
}

/// A `--local` job whose global batch cannot split over its ranks is
/// refused before its workers start or anything is written, naming the
/// world: the tiny recipe's 2 micro-batches over 3 ranks.
#[test]
fn a_local_job_whose_batch_does_not_split_over_its_ranks_is_refused_before_it_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fashion_subset(tmp.path(), 2, 1);
    let out = tmp.path().join("run");
    let started = std::time::Instant::now();
    let refused = coordinator_local(&data, &out, 3);
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        stderr.contains("--local --nodes 3 --devices cpu: a world of 3 rank(s)")
            && stderr.contains("do not split over 3 ranks"),
        "{stderr}"
    );
    assert!(!out.join("recipe.yaml").exists(), "nothing is written for a refused job");
    println!("refused in {:.2} s", took.as_secs_f64());
}

#[test]
fn two_ranks_equal_one_rank_accumulating_and_replicas_stay_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fashion_subset(tmp.path(), 16, 4);

    // One process, the two streams accumulated.
    let single = tmp.path().join("single");
    let run = Command::new(binary("worker"))
        .args(["train", "--device", "cpu", "--recipe"])
        .arg(tiny_recipe())
        .arg("--out")
        .arg(&single)
        .args(common_sets(&data))
        .current_dir(workspace_root())
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));

    // Two ranks, one stream each.
    let multi = tmp.path().join("multi");
    let up = coordinator_local(&data, &multi, 2);
    assert!(
        up.status.success(),
        "coordinator failed:\n{}\n{}",
        String::from_utf8_lossy(&up.stdout),
        String::from_utf8_lossy(&up.stderr)
    );
    let stdout = String::from_utf8_lossy(&up.stdout);
    assert!(stdout.contains("img/s (all ranks)"), "no progress lines:\n{stdout}");
    assert!(multi.join("recipe.yaml").is_file());

    let a = records(&single.join("metrics.jsonl"), "step");
    let b = records(&multi.join("metrics.jsonl"), "step");
    assert!(!a.is_empty());
    assert_eq!(a.len(), b.len(), "different number of updates");
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x["step"], y["step"]);
        assert_eq!(x["loss"], y["loss"], "loss differs at update {}", x["step"]);
        assert_eq!(x["lr"], y["lr"]);
    }
    // Parameters and BN statistics after the last update: identical (each
    // stream keeps its own statistics, averaged at the epoch's end, as each
    // rank's are), and so the evaluations.
    let load = |p: PathBuf| -> Vec<(String, tch::Tensor)> {
        let mut v = tch::Tensor::read_safetensors(p).unwrap();
        v.sort_by(|x, y| x.0.cmp(&y.0));
        v
    };
    let wa = load(single.join("checkpoints/epoch-0001/model.safetensors"));
    let wb = load(multi.join("checkpoints/epoch-0001/model.safetensors"));
    assert_eq!(wa.len(), wb.len());
    assert!(wa.iter().any(|(k, _)| k.ends_with("running_var")), "no BN statistics compared");
    for ((ka, ta), (kb, tb)) in wa.iter().zip(&wb) {
        assert_eq!(ka, kb);
        assert!(
            ta.equal(tb),
            "{ka} differs between 1 rank x 2 micro-batches and 2 ranks x 1: {ta} {tb}"
        );
    }
    // The evaluations: the same accuracy, and the same loss to f32's
    // resolution. One rank evaluates batches of 16, 16 and 8 images, two
    // ranks 16 and 4 each, and on an AVX2-only CPU libtorch's kernels round
    // a batch's logits by its size: there the mean loss differed in its
    // last f32 bit (2.302983045578003 against 2.3029831409454347, the same
    // after the revert of every change of the session that met it).
    let evaluations = |run: &Path| -> Vec<(serde_json::Value, f64)> {
        let epochs = records(&run.join("metrics.jsonl"), "epoch");
        epochs.iter().map(|e| (e["top1"].clone(), e["val_loss"].as_f64().unwrap())).collect()
    };
    let (one, two) = (evaluations(&single), evaluations(&multi));
    assert_eq!(one.len(), two.len(), "{one:?} {two:?}");
    for ((top1_one, loss_one), (top1_two, loss_two)) in one.iter().zip(&two) {
        assert_eq!(top1_one, top1_two, "the evaluations differ: {one:?} {two:?}");
        let relative = (loss_one - loss_two).abs() / loss_one.abs().max(1e-12);
        assert!(relative < 1e-6, "the evaluations differ: {one:?} {two:?}");
    }
    // Every rank's parameters are bit-identical after every update.
    let r0 = records(&multi.join("ranks/rank-0.jsonl"), "checksum");
    let r1 = records(&multi.join("ranks/rank-1.jsonl"), "checksum");
    assert_eq!(r0.len(), a.len());
    for (x, y) in r0.iter().zip(&r1) {
        assert_eq!(
            (&x["step"], &x["sum"], &x["sum_of_squares"]),
            (&y["step"], &y["sum"], &y["sum_of_squares"])
        );
    }
    // Sharded evaluation covered the whole validation set once.
    let epoch = records(&multi.join("metrics.jsonl"), "epoch");
    assert!(epoch.last().unwrap()["top1"].is_number());

    // The gradient all-reduce overlapped with the backward pass (the default,
    // above) and after it: the same buckets in the same order, so the same bits.
    let after = tmp.path().join("after-backward");
    let up =
        coordinator_local_with(&data, &after, 2, &["--set", "distributed.overlap_backward=false"]);
    assert!(up.status.success(), "{}", String::from_utf8_lossy(&up.stderr));
    let c = records(&after.join("metrics.jsonl"), "step");
    assert_eq!(b.len(), c.len());
    for (x, y) in b.iter().zip(&c) {
        assert_eq!(x["loss"], y["loss"], "overlap changed the loss at update {}", x["step"]);
    }
    let wc = load(after.join("checkpoints/epoch-0001/model.safetensors"));
    for ((k, tb), (_, tc)) in wb.iter().zip(&wc) {
        assert!(tb.equal(tc), "{k} differs with and without overlap");
    }
}

#[test]
fn bf16_gradient_compression_trains_close_to_the_exact_sums() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fashion_subset(tmp.path(), 16, 4);
    let exact = tmp.path().join("exact");
    let up = coordinator_local(&data, &exact, 2);
    assert!(up.status.success(), "{}", String::from_utf8_lossy(&up.stderr));
    let compressed = tmp.path().join("bf16");
    let up = coordinator_local_with(
        &data,
        &compressed,
        2,
        &["--set", "distributed.gradient_compression=bf16"],
    );
    assert!(up.status.success(), "{}", String::from_utf8_lossy(&up.stderr));
    let a = records(&exact.join("metrics.jsonl"), "step");
    let b = records(&compressed.join("metrics.jsonl"), "step");
    assert!(a.len() >= 6);
    assert_eq!(a.len(), b.len());
    // The first update's loss comes before any reduction; afterwards the
    // bf16-rounded gradient sums move the weights slightly differently.
    assert_eq!(a[0]["loss"], b[0]["loss"]);
    let mut differ = false;
    for (x, y) in a.iter().zip(&b) {
        let (x, y) = (x["loss"].as_f64().unwrap(), y["loss"].as_f64().unwrap());
        assert!((x - y).abs() <= 1e-2 * x.abs(), "losses {x} (f32) and {y} (bf16) drifted apart");
        differ |= x != y;
    }
    assert!(differ, "bf16 compression changed no loss: was it applied?");
    // Both ranks hold the same compressed sums, so the same parameters.
    let r0 = records(&compressed.join("ranks/rank-0.jsonl"), "checksum");
    let r1 = records(&compressed.join("ranks/rank-1.jsonl"), "checksum");
    assert_eq!(r0.len(), a.len());
    for (x, y) in r0.iter().zip(&r1) {
        assert_eq!((&x["sum"], &x["sum_of_squares"]), (&y["sum"], &y["sum_of_squares"]));
    }
}

#[test]
fn a_job_resumed_through_the_coordinator_continues_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fashion_subset(tmp.path(), 16, 4);
    let two_epochs =
        ["--set", "schedule.cosine.epochs=2", "--set", "runtime.keep_last_checkpoints=2"];
    let full = tmp.path().join("full");
    let up = coordinator_local_with(&data, &full, 2, &two_epochs);
    assert!(up.status.success(), "{}", String::from_utf8_lossy(&up.stderr));
    let steps = records(&full.join("metrics.jsonl"), "step");
    let first_epoch_updates = records(&full.join("metrics.jsonl"), "epoch")[0]["step"].clone();
    // The run as it stood after its first epoch, continued by a new job.
    let resumed = tmp.path().join("resumed");
    let checkpoint = full.join("checkpoints/epoch-0001");
    let mut args = two_epochs.to_vec();
    args.extend(["--resume", checkpoint.to_str().unwrap()]);
    let up = coordinator_local_with(&data, &resumed, 2, &args);
    assert!(up.status.success(), "{}", String::from_utf8_lossy(&up.stderr));
    let after: Vec<_> = records(&resumed.join("metrics.jsonl"), "step");
    let expected: Vec<_> =
        steps.iter().filter(|r| r["step"].as_u64() > first_epoch_updates.as_u64()).collect();
    assert!(!expected.is_empty());
    assert_eq!(after.len(), expected.len(), "updates after the resume");
    for (a, b) in expected.iter().zip(&after) {
        assert_eq!(a["step"], b["step"]);
        assert_eq!(a["loss"], b["loss"], "loss after the resume differs at update {}", a["step"]);
    }
}

fn join_worker(coordinator: &str, netns: Option<&str>, name: &str) -> Child {
    let worker = binary("worker");
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(&worker);
            c
        }
        None => Command::new(&worker),
    };
    cmd.args(["join", "--coordinator", coordinator, "--devices", "cpu", "--host-name", name])
        .args(Some("--insecure-plaintext").filter(|_| netns.is_some()))
        .env("RSB_JOB_TOKEN", TOKEN)
        .current_dir(workspace_root())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting worker join")
}

fn coordinator_on(listen: &str, data: &Path, out: &Path) -> Child {
    Command::new(binary("coordinator"))
        .args(["up", "--nodes", "2", "--listen", listen])
        // The namespaces' bridge is beyond loopback: plain text by choice.
        .args(Some("--insecure-plaintext").filter(|_| !listen.starts_with("127.")))
        .arg("--recipe")
        .arg(tiny_recipe())
        .arg("--out")
        .arg(out)
        .args(common_sets(data))
        .env("RSB_JOB_TOKEN", TOKEN)
        .current_dir(workspace_root())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the coordinator")
}

/// Each rank's log (`ranks/rank-N.log`, written by `worker rank`) and
/// metrics (`ranks/rank-N.jsonl`), for a failure report; a missing file is
/// named as missing rather than left out silently.
fn rank_files(out: &Path) -> String {
    let mut report = String::new();
    for rank in 0..2 {
        for ext in ["log", "jsonl"] {
            let path = out.join(format!("ranks/rank-{rank}.{ext}"));
            match std::fs::read_to_string(&path) {
                Ok(text) => report += &format!("{}:\n{text}\n", path.display()),
                Err(e) => report += &format!("{}: not readable ({e})\n", path.display()),
            }
        }
    }
    report
}

fn check_job(out: &Path, coordinator: Child, workers: Vec<Child>) {
    let up = wait_with_timeout(coordinator, Duration::from_secs(300), "coordinator up");
    let joined: Vec<_> = workers
        .into_iter()
        .map(|w| wait_with_timeout(w, Duration::from_secs(60), "worker join"))
        .collect();
    // On any failure, show every process's log: the first failure is often
    // only visible in another process's output.
    let all_ok = up.status.success() && joined.iter().all(|o| o.status.success());
    if !all_ok {
        let mut report =
            format!("coordinator ({}):\n{}\n", up.status, String::from_utf8_lossy(&up.stderr));
        for (i, o) in joined.iter().enumerate() {
            report +=
                &format!("worker {i} ({}):\n{}\n", o.status, String::from_utf8_lossy(&o.stderr));
        }
        report += &rank_files(out);
        panic!("the distributed job failed:\n{report}");
    }
    assert!(!records(&out.join("metrics.jsonl"), "epoch").is_empty());
    assert!(out.join("checkpoints/epoch-0001/model.safetensors").is_file());
    // Every rank wrote its own log, without colour codes.
    for rank in 0..2 {
        let path = out.join(format!("ranks/rank-{rank}.log"));
        let log =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(log.contains("collective ready"), "{}:\n{log}", path.display());
        assert!(!log.contains('\x1b'), "{} carries ANSI codes", path.display());
    }
}

#[test]
fn coordinator_and_two_joined_workers_on_loopback() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fashion_subset(tmp.path(), 16, 4);
    let out = tmp.path().join("run");
    let port = free_port("127.0.0.1");
    let coordinator = coordinator_on(&format!("127.0.0.1:{port}"), &data, &out);
    let url = format!("http://127.0.0.1:{port}");
    let workers = vec![join_worker(&url, None, "a"), join_worker(&url, None, "b")];
    check_job(&out, coordinator, workers);
}

#[test]
fn workers_as_separate_hosts_in_network_namespaces() {
    if !require(is_root(), "root, to create network namespaces")
        || !require(on_path("ip"), "the `ip` tool (iproute2), to create network namespaces")
    {
        return;
    }
    let tag = format!("{}", std::process::id() % 1000);
    let netns = match Netns::create(&tag, 77, 2) {
        Ok(n) => n,
        Err(e) => panic!("could not create network namespaces: {e}"),
    };
    let tmp = tempfile::tempdir().unwrap();
    let data = fashion_subset(tmp.path(), 16, 4);
    let out = tmp.path().join("run");
    let port = free_port("10.77.0.1");
    let coordinator = coordinator_on(&format!("10.77.0.1:{port}"), &data, &out);
    let url = format!("http://10.77.0.1:{port}");
    let workers = vec![
        join_worker(&url, Some(&netns.names[0]), "w1"),
        join_worker(&url, Some(&netns.names[1]), "w2"),
    ];
    check_job(&out, coordinator, workers);
    // The ring really ran over the namespaces' own addresses.
    let log = std::fs::read_to_string(out.join("ranks/rank-0.jsonl")).unwrap();
    assert!(!log.is_empty());
    drop(netns);
}
