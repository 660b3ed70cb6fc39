//! `worker eval` end to end against timm 1.0.31: the built binary scores a
//! small ImageNet-layout validation folder (with `--real-labels`) and the same
//! images in ImageNet-V2's layout (`--v2 --real-labels`), with resnet18
//! weights saved by timm, and its printed top-1/top-5, loss and ReaL counts
//! must equal what timm reports on the same images (`timm.utils.accuracy`,
//! cross-entropy, `timm.data.RealLabelsImagenet`).
//!
//! Fixtures: `tests/oracle/eval_cli.py` (via `gen_fixtures.py`). Every top-k
//! boundary of timm's logits has a margin of at least 1e-3, so the counts must
//! match exactly; the percentages are compared to the printed precision
//! (3 decimals; timm's `accuracy` rounds in float32) and the loss to 1e-3.

use rsb_integration_tests::{binary, fixtures, read_json};
use serde_json::Value;
use std::path::Path;

/// The number after `key` in `line` (e.g. `top-1 ` in `top-1 33.333%`).
fn number_after(line: &str, key: &str) -> f64 {
    let start = line.find(key).unwrap_or_else(|| panic!("no `{key}` in `{line}`")) + key.len();
    let text: String = line[start..]
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == '-')
        .collect();
    text.parse().unwrap_or_else(|e| panic!("`{text}` after `{key}` in `{line}`: {e}"))
}

/// The number just before `key` in `line` (e.g. `30` in `30 images`).
fn number_before(line: &str, key: &str) -> f64 {
    let end = line.find(key).unwrap_or_else(|| panic!("no `{key}` in `{line}`"));
    let text = line[..end].split_whitespace().last().unwrap_or_default().trim_start_matches('(');
    text.parse().unwrap_or_else(|e| panic!("`{text}` before `{key}` in `{line}`: {e}"))
}

/// Runs `worker eval` on the fixture's `layout` (`imagenet`: a dataset root
/// whose `val/` it reads; `v2`: with `--v2`), with `--real-labels`.
fn eval(dir: &Path, manifest: &Value, layout: &str) -> String {
    let data = dir.join(layout);
    let setup = &manifest[layout];
    let mut cmd = std::process::Command::new(binary("worker"));
    cmd.args(["eval", "--model", manifest["model"].as_str().unwrap(), "--weights"])
        .arg(dir.join(setup["weights"].as_str().unwrap()))
        .arg("--data")
        .arg(data)
        .arg("--real-labels")
        .arg(dir.join("real.json"))
        .args(["--num-classes", &setup["num_classes"].to_string()])
        .args(["--input-size", &manifest["input_size"].to_string()])
        .args(["--crop-pct", &manifest["crop_pct"].to_string()])
        // Batches of 7 over 30 images: the last batch is partial.
        .args(["--batch-size", "7", "--device", "cpu", "--threads", "2"]);
    if layout == "v2" {
        cmd.arg("--v2");
    }
    let out = cmd.output().expect("running worker eval");
    assert!(
        out.status.success(),
        "worker eval failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn close(ours: f64, timm: &Value, tolerance: f64, what: &str) {
    let timm = timm.as_f64().unwrap_or_else(|| panic!("{what}: no number in the fixture"));
    assert!((ours - timm).abs() <= tolerance, "{what}: worker eval printed {ours}, timm {timm}");
}

/// Checks the split's line and the ReaL line of one `worker eval` output.
fn check(output: &str, manifest: &Value, layout: &str) {
    let images = manifest["images"].as_f64().unwrap();
    let split = output
        .lines()
        .find(|l| l.contains(" images (") && l.contains("loss"))
        .unwrap_or_else(|| panic!("{layout}: no accuracy line in `{output}`"));
    assert_eq!(number_before(split, " images"), images, "{layout}: `{split}`");
    assert_eq!(number_before(split, " undecodable"), 0.0, "{layout}: `{split}`");
    let timm = &manifest[layout];
    close(number_after(split, "top-1"), &timm["top1"], 1e-3, &format!("{layout} top-1"));
    close(number_after(split, "top-5"), &timm["top5"], 1e-3, &format!("{layout} top-5"));
    close(number_after(split, "loss"), &timm["loss"], 1e-3, &format!("{layout} loss"));

    let real = output
        .lines()
        .find(|l| l.starts_with("real:"))
        .unwrap_or_else(|| panic!("{layout}: no ReaL line in `{output}`"));
    let timm = &manifest[layout]["real"];
    let scored = number_before(real, " images scored");
    assert_eq!(scored, timm["scored"].as_f64().unwrap(), "{layout}: `{real}`");
    let excluded = number_before(real, " without a valid label");
    assert_eq!(excluded, timm["excluded"].as_f64().unwrap(), "{layout}: `{real}`");
    close(number_after(real, "top-1"), &timm["top1"], 1e-3, &format!("{layout} ReaL top-1"));
    close(number_after(real, "top-5"), &timm["top5"], 1e-3, &format!("{layout} ReaL top-5"));
}

#[test]
fn eval_with_real_labels_on_an_imagenet_folder_equals_timm() {
    let dir = fixtures("eval_cli");
    let manifest = read_json(&dir.join("manifest.json"));
    let output = eval(&dir, &manifest, "imagenet");
    check(&output, &manifest, "imagenet");
}

#[test]
fn eval_v2_with_real_labels_equals_timm() {
    let dir = fixtures("eval_cli");
    let manifest = read_json(&dir.join("manifest.json"));
    let output = eval(&dir, &manifest, "v2");
    check(&output, &manifest, "v2");
}

#[test]
fn the_line_parser_reads_the_printed_format() {
    let line =
        "x/val: 30 images (0 undecodable, skipped)  top-1 33.333%  top-5 66.667%  loss 3.3805";
    assert_eq!(number_before(line, " images"), 30.0);
    assert_eq!(number_before(line, " undecodable"), 0.0);
    assert_eq!(number_after(line, "top-1"), 33.333);
    assert_eq!(number_after(line, "top-5"), 66.667);
    assert_eq!(number_after(line, "loss"), 3.3805);
}
