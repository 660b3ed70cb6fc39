//! Colour goes only to a terminal: with stderr piped (as when a log is written
//! to a file or read by the coordinator), the worker's tracing lines carry no
//! ANSI escape codes. `worker train` on the tiny recipe, stopped after one
//! update, logs its `training` line at info.

use rsb_integration_tests::{binary, fashion_subset, workspace_root};

#[test]
fn logs_written_to_a_pipe_carry_no_colour_codes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fashion_subset(tmp.path(), 2, 1);
    let out = std::process::Command::new(binary("worker"))
        .arg("train")
        .arg("--recipe")
        .arg(workspace_root().join("recipes/debug/resnet18_tiny_cpu.yaml"))
        .args(["--set", &format!("data.root={}", data.display())])
        .args(["--set", "model.num_classes=10", "--max-updates", "1", "--device", "cpu"])
        .arg("--out")
        .arg(tmp.path().join("run"))
        // Nothing that would switch colour off by itself.
        .env_remove("NO_COLOR")
        .env("RUST_LOG", "info")
        .output()
        .expect("running worker train");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "worker train failed:\n{log}");
    assert!(log.contains("INFO") && log.contains("training"), "no info line was logged:\n{log}");
    assert!(!out.stderr.contains(&0x1b), "ANSI escape codes in a piped log:\n{log:?}");
}
