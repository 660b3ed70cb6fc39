//! Log formats. Colour goes only to a terminal: with stderr piped (as when a
//! log is written to a file or read by the coordinator), the worker's tracing
//! lines carry no ANSI escape codes. `worker train` on the tiny recipe,
//! stopped after one update, logs its `training` line at info. With
//! `--log-format json` (or `RSB_LOG_FORMAT=json`) every stderr line is one
//! JSON object with a level and a message: a failing process's last error
//! too, and in a job, the lines of the coordinator, of its agent and of the
//! rank the agent relays, a rank's panic among them (one line, with its
//! stack when `RUST_BACKTRACE` asks).

use rsb_integration_tests::processes::wait_with_timeout;
use rsb_integration_tests::{binary, fashion_subset, tiny_recipe, workspace_root};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Each non-empty line of `log` as JSON, with a level and a message.
fn json_lines(log: &str, what: &str) -> Vec<serde_json::Value> {
    let values: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{what}: not a JSON line: {e}: {line}\n{log}"));
            assert!(value["level"].is_string(), "{what}: no level in {line}");
            assert!(value["fields"]["message"].is_string(), "{what}: no message in {line}");
            value
        })
        .collect();
    assert!(!values.is_empty(), "{what}: nothing logged");
    values
}

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
        json_lines(&log, &format!("worker train ({format:?})"));
        assert!(
            log.lines().any(|l| l.contains("\"INFO\"") && l.contains("training")),
            "no info line about training ({format:?}):\n{log}"
        );
    }
    // The default stays text.
    let out = train_one_update(None);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.lines().any(|l| l.contains("INFO") && !l.starts_with('{')), "{log}");
}

#[test]
fn a_failing_process_says_why_in_a_json_line_when_its_log_is_json() {
    let missing = workspace_root().join("recipes/no-such-recipe.yaml");
    let out = Command::new(binary("worker"))
        .args(["--log-format", "json", "train", "--recipe"])
        .arg(&missing)
        .args(["--out", "/nonexistent/run", "--device", "cpu"])
        .env_remove("RSB_LOG_FORMAT")
        .output()
        .expect("running worker train");
    assert_eq!(out.status.code(), Some(1));
    let log = String::from_utf8_lossy(&out.stderr);
    let lines = json_lines(&log, "worker train of a missing recipe");
    let last = lines.last().unwrap();
    assert_eq!(last["level"], "ERROR", "{log}");
    let message = last["fields"]["message"].as_str().unwrap();
    assert!(message.contains("no-such-recipe.yaml"), "{log}");
}

/// `coordinator --log-format json up --local --nodes 1` of the tiny recipe,
/// with `env` added; its output.
fn json_job(env: &[(&str, &str)]) -> std::process::Output {
    let tmp = tempfile::tempdir().unwrap();
    let data = fashion_subset(tmp.path(), 2, 1);
    let _ = binary("worker"); // built before the coordinator starts it
    let child = Command::new(binary("coordinator"))
        .args(["--log-format", "json", "up", "--local", "--nodes", "1", "--recipe"])
        .arg(tiny_recipe())
        .arg("--out")
        .arg(tmp.path().join("run"))
        .args(["--set", &format!("data.root={}", data.display())])
        .args(["--set", "model.num_classes=10", "--set", "runtime.log_every_steps=1"])
        .env_remove("RSB_LOG_FORMAT")
        .env_remove("RUST_BACKTRACE")
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the coordinator");
    wait_with_timeout(child, Duration::from_secs(300), "coordinator up --local")
}

#[test]
fn a_json_job_logs_one_object_per_line_from_its_coordinator_agent_and_rank() {
    let out = json_job(&[]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the job failed:\n{log}");
    let lines = json_lines(&log, "coordinator up --local");
    let targets: Vec<&str> = lines.iter().filter_map(|l| l["target"].as_str()).collect();
    for (whose, prefix) in
        [("coordinator", "rsb_coordinator"), ("agent", "worker::join"), ("rank", "rsb_train")]
    {
        assert!(
            targets.iter().any(|t| t.starts_with(prefix)),
            "no line of the {whose} (target {prefix}*) among {targets:?}"
        );
    }
}

#[test]
fn a_ranks_panic_in_a_json_job_is_one_line_with_its_stack_and_fails_the_job() {
    // Inherited by the agent and its rank: rank 0 panics; the stack is asked for.
    let out = json_job(&[("RSB_PANIC_BEFORE_RENDEZVOUS", "0"), ("RUST_BACKTRACE", "1")]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a job whose rank panicked must fail:\n{log}");
    let lines = json_lines(&log, "coordinator up --local with a panicking rank");
    let panic = lines
        .iter()
        .find(|l| {
            l["target"] == "error"
                && l["fields"]["message"].as_str().is_some_and(|m| m.contains("panics as asked"))
        })
        .unwrap_or_else(|| panic!("no error line of the rank's panic:\n{log}"));
    let stack = panic["fields"]["backtrace"].as_str().unwrap_or_default();
    assert!(stack.contains("worker/src/join.rs:"), "the panic line carries no stack: {panic}");
    let last = lines.last().unwrap()["fields"]["message"].as_str().unwrap_or_default();
    assert!(
        last.contains("rank 0 on ") && last.contains("rank 0 panics as asked"),
        "the job's last error does not name the rank and its panic: {last}\n{log}"
    );
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
