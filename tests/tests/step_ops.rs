//! One training step's ATen operators, ours against timm 1.0.31's
//! (`bench/compare_step_ops.py`, counted by libtorch's RecordFunction on
//! both sides), in the GPU configuration (channels-last, LAMB's packed path
//! against timm's multi-tensor path) and in the CPU one (contiguous,
//! per-tensor paths). On a GPU each operator that computes is a kernel
//! launch and each host read a wait for the device, so, on a CPU:
//!
//! * the backward pass calls exactly timm's operators, op for op;
//! * the forward pass calls no operator more often than timm's does (a
//!   cast of a weight that already has the compute dtype is no call);
//! * no phase of our step reads a value on the host.
//!
//! The update is not held to timm's calls: timm's multi-tensor update is
//! fewer calls of more kernels each (`bench/compare_step_ops.py` reports
//! both).

use rsb_integration_tests::{binary, python, workspace_root};
use serde_json::Value;
use std::collections::BTreeMap;
use std::process::Command;

fn counts(phases: &Value, phase: &str, side: &str) -> BTreeMap<String, u64> {
    serde_json::from_value(phases[phase][side].clone())
        .unwrap_or_else(|e| panic!("{phase}/{side} is not a map of counts ({e}): {phases}"))
}

fn compare(extra: &[&str]) -> Value {
    let worker = binary("worker");
    let out = Command::new(python())
        .arg(workspace_root().join("bench/compare_step_ops.py"))
        .args(["--model", "resnet18", "--batch", "2", "--size", "32", "--threads", "1"])
        .arg("--worker")
        .arg(&worker)
        .args(extra)
        .output()
        .expect("bench/compare_step_ops.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "compare_step_ops.py {extra:?} failed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {stdout}"))
}

fn check(extra: &[&str]) {
    let report = compare(extra);
    let phases = &report["phases"];
    let (ours, timm) = (counts(phases, "backward", "ours"), counts(phases, "backward", "timm"));
    assert!(ours.values().sum::<u64>() > 100, "a resnet18 backward pass counted: {ours:?}");
    assert_eq!(ours, timm, "{extra:?}: the backward passes call different operators");

    let (ours, timm) = (counts(phases, "forward", "ours"), counts(phases, "forward", "timm"));
    assert_eq!(ours.get("aten::conv2d"), Some(&20), "{extra:?}: {ours:?}");
    for (op, &calls) in &ours {
        let theirs = timm.get(op).copied().unwrap_or(0);
        assert!(
            calls <= theirs,
            "{extra:?}: our forward pass calls {op} {calls} times, timm's {theirs}:\n{ours:?}\n{timm:?}"
        );
    }

    for phase in ["forward", "backward", "update"] {
        assert!(
            !counts(phases, phase, "ours").is_empty(),
            "{extra:?}: nothing counted in our {phase}"
        );
    }
    // The script's own list of the operators that read on the host.
    let reads = &report["totals"]["ours"]["host_reads"];
    assert_eq!(reads.as_u64(), Some(0), "{extra:?}: our step reads on the host: {phases}");
}

#[test]
fn in_the_gpu_configuration_the_backward_pass_matches_timms_and_the_forward_calls_no_more() {
    check(&[]);
}

#[test]
fn in_the_cpu_configuration_the_backward_pass_matches_timms_and_the_forward_calls_no_more() {
    check(&["--contiguous", "--update-path", "per-tensor"]);
}
