//! `bench/gpu.sh` rehearsed on the CPU, as its header asks before any GPU
//! time is spent: `--pack` builds the bundle that travels to the GPU host
//! (stripped binaries that still run, the timm 1.0.31 wheel, the source
//! photos, all within the device tool's 64 MiB, with the commit they were
//! built from), and `--dry-run --bundle` runs every check of the real script
//! with the binaries that travel (ours and timm's synthetic steps, both
//! loaders on real JPEGs, a world-size-1 job with every collective call
//! made, a 2-rank ring job) at toy sizes. Every check must succeed, the
//! summary must hold a row with a throughput for each, and the output folder
//! must hold what the device tool brings back: three files, the logs packed.

use rsb_integration_tests::{binary, read_json, without_package_variables, workspace_root};
use std::process::Command;

#[test]
fn the_gpu_bench_packs_its_bundle_and_passes_its_dry_run_on_the_cpu() {
    let root = workspace_root();
    // The script runs target/release's binaries: build them first.
    binary("worker");
    binary("coordinator");

    // --pack runs cargo: without this test's package variables, as binary().
    let pack = without_package_variables(&mut Command::new(root.join("bench/gpu.sh")))
        .arg("--pack")
        .output()
        .expect("bench/gpu.sh --pack");
    assert!(
        pack.status.success(),
        "bench/gpu.sh --pack failed:\n{}{}",
        String::from_utf8_lossy(&pack.stdout),
        String::from_utf8_lossy(&pack.stderr)
    );
    let bundle = root.join("target/gpu-bundle");
    let mut bytes = 0u64;
    for entry in walk(&bundle) {
        bytes += entry.metadata().expect("bundle file").len();
    }
    assert!(
        bytes < 60 << 20,
        "the bundle is {} MiB, over what the device tool carries",
        bytes >> 20
    );
    let wheels: Vec<_> = std::fs::read_dir(bundle.join("wheels"))
        .expect("bundle wheels")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        wheels.iter().any(|w| w.starts_with("timm-1.0.31-")),
        "no timm 1.0.31 wheel in {wheels:?}"
    );
    let version = std::fs::read_to_string(bundle.join("VERSION")).expect("bundle VERSION");
    let head = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(&root)
        .output()
        .expect("git rev-parse");
    let head = String::from_utf8_lossy(&head.stdout).trim().to_string();
    assert!(!head.is_empty() && version.contains(&head), "VERSION {version:?} is not HEAD {head}");
    for b in ["worker", "coordinator"] {
        let out = Command::new(bundle.join("bin").join(b)).arg("--version").output().expect(b);
        assert!(
            out.status.success(),
            "stripped {b} does not run: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let out_dir = tempfile::tempdir().expect("tempdir");
    let run = Command::new(root.join("bench/gpu.sh"))
        .args(["--dry-run", "--bundle", "--out"])
        .arg(out_dir.path())
        .output()
        .expect("bench/gpu.sh --dry-run");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "bench/gpu.sh --dry-run failed:\n{stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let summary = read_json(&out_dir.path().join("summary.json"));
    let checks = summary["checks"].as_array().expect("checks");
    let names: Vec<&str> = checks.iter().map(|c| c["name"].as_str().unwrap_or("?")).collect();
    assert_eq!(names, ["synthetic", "jpeg", "nccl1", "ring2"]);
    assert!(
        summary["binaries"].as_str().is_some_and(|b| b.contains(&head)),
        "the summary does not name the bundle's commit: {}",
        summary["binaries"]
    );
    // The synthetic row says where each side's step time goes.
    let phases = checks[0]["note"].as_str().unwrap_or_default();
    for side in ["ours", "timm"] {
        let times = format!("{side} phase medians (ms): ");
        assert!(
            phases.contains(&(times.clone() + "zero_grad "))
                || phases.contains(&(times + "forward ")),
            "{side}'s phases are missing: {}",
            checks[0]
        );
    }
    assert!(phases.contains(", update "), "{}", checks[0]);
    // The jpeg row says how much of the time our trainer waited for input.
    let waited = checks[1]["note"].as_str().unwrap_or_default();
    let share = waited
        .strip_prefix("ours waited for input ")
        .and_then(|rest| rest.strip_suffix("% of the time"))
        .and_then(|percent| percent.parse::<u32>().ok());
    assert!(share.is_some_and(|p| p <= 100), "{}", checks[1]);
    // The sync check rides on the nccl1 job; a CPU has nothing to count.
    assert_eq!(
        checks[2]["note"], "synchronising CUDA calls within updates: not checked on a CPU",
        "{}",
        checks[2]
    );
    // The 2-rank job says what its fabric probe measured, links included.
    let ring = checks[3]["note"].as_str().unwrap_or_default();
    assert!(
        ring.starts_with("fabric probe: all-reduce of 25.0 MiB in ")
            && ring.contains(" GB/s, links "),
        "{}",
        checks[3]
    );
    for check in checks {
        assert_eq!(check["ok"], true, "{check}");
        let ours = check["ours"]["images_per_sec"].as_f64().unwrap_or(0.0);
        assert!(ours > 0.0, "{check}");
        if !check["timm"].is_null() {
            assert!(check["timm"]["images_per_sec"].as_f64().unwrap_or(0.0) > 0.0, "{check}");
            assert!(check["ratio"].as_f64().unwrap_or(0.0) > 0.0, "{check}");
        }
    }
    let table = std::fs::read_to_string(out_dir.path().join("summary.md")).expect("summary.md");
    assert_eq!(
        table,
        stdout.trim_end().to_string() + "\n",
        "summary.md differs from what was printed"
    );
    for name in names {
        assert!(table.contains(&format!("| {name} |")), "no row {name} in\n{table}");
    }
    // What comes back from the device: the summary and one archive of the
    // logs, each run's metrics and recipe (not the photos or checkpoints).
    let mut files: Vec<String> = std::fs::read_dir(out_dir.path())
        .expect("out dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, ["logs.tar.gz", "summary.json", "summary.md"]);
    let listing = Command::new("tar")
        .arg("tzf")
        .arg(out_dir.path().join("logs.tar.gz"))
        .output()
        .expect("tar");
    let listing = String::from_utf8_lossy(&listing.stdout);
    for member in ["logs/synthetic-ours-1.log", "logs/job-nccl1.log", "jpeg-ours/metrics.jsonl"] {
        assert!(listing.lines().any(|l| l == member), "{member} not in logs.tar.gz:\n{listing}");
    }
    assert!(!listing.contains("photos/") && !listing.contains(".safetensors"), "{listing}");
}

fn walk(dir: &std::path::Path) -> Vec<std::fs::DirEntry> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let entry = entry.expect("entry");
        if entry.file_type().expect("type").is_dir() {
            files.extend(walk(&entry.path()));
        } else {
            files.push(entry);
        }
    }
    files
}
