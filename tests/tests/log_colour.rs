//! Log formats. Colour goes only to a terminal: with stderr piped (as when a
//! log is written to a file or read by the coordinator), the worker's tracing
//! lines carry no ANSI escape codes. `worker train` on the tiny recipe,
//! stopped after one update, logs its `training` line at info. With
//! `--log-format json` (or `RSB_LOG_FORMAT=json`) every stderr line is one
//! JSON object with a level and a message.

use rsb_integration_tests::{binary, fashion_subset, workspace_root};

/// `worker train` of one update on the tiny recipe; its output.
fn train_one_update(format: Option<(&str, &str)>) -> std::process::Output {
    let tmp = tempfile::tempdir().unwrap();
    let data = fashion_subset(tmp.path(), 2, 1);
    let mut cmd = std::process::Command::new(binary("worker"));
    if let Some(("flag", value)) = format {
        cmd.args(["--log-format", value]);
    }
    cmd.arg("train")
        .arg("--recipe")
        .arg(workspace_root().join("recipes/debug/resnet18_tiny_cpu.yaml"))
        .args(["--set", &format!("data.root={}", data.display())])
        .args(["--set", "model.num_classes=10", "--max-updates", "1", "--device", "cpu"])
        .arg("--out")
        .arg(tmp.path().join("run"))
        .env_remove("RSB_LOG_FORMAT")
        .env("RUST_LOG", "info");
    if let Some(("env", value)) = format {
        cmd.env("RSB_LOG_FORMAT", value);
    }
    cmd.output().expect("running worker train")
}

#[test]
fn json_logs_are_one_object_per_line_by_flag_or_environment() {
    for format in [("flag", "json"), ("env", "json")] {
        let out = train_one_update(Some(format));
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "worker train ({format:?}) failed:\n{log}");
        let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(!lines.is_empty(), "nothing logged ({format:?})");
        for line in &lines {
            let value: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("({format:?}) not a JSON line: {e}: {line}"));
            assert!(value["level"].is_string(), "no level in {line}");
            assert!(value["fields"]["message"].is_string(), "no message in {line}");
        }
        assert!(
            lines.iter().any(|l| l.contains("\"INFO\"") && l.contains("training")),
            "no info line about training ({format:?}):\n{log}"
        );
    }
    // The default stays text.
    let out = train_one_update(None);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.lines().any(|l| l.contains("INFO") && !l.starts_with('{')), "{log}");
}

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
