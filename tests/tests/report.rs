//! `coordinator report` end to end: sweep folders built from typed metrics
//! records (and two swept for real by `coordinator up --local --seeds` and
//! `--grid` on a tiny recipe), reported by the binary, checked against the runs' own `metrics.jsonl`:
//! the CSV's numbers, the PNGs (decodable, of the right size), the skipped
//! runs, the grid tables, the comparison sentence that flips between a pair
//! within seed noise and a clearly different pair, the errors for a
//! corrupt metrics file, and the per-run table of restarts (`runs.csv`).

use rsb_integration_tests::processes::wait_with_timeout;
use rsb_integration_tests::sweeps::{self, tiny_recipe};
use rsb_integration_tests::{binary, fashion_subset};
use rsb_job::sweep::{GridAxis, SweepLayout, SweepManifest};
use rsb_job::{EvalSetAccuracy, MetricsRecord};
use rsb_recipes::RecipeSource;
use rsb_report::tables::{ComparisonRow, GridRow, RunRow, SetRow};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

const EPOCHS: u64 = 3;

fn coordinator(args: &[&Path]) -> Output {
    Command::new(binary("coordinator"))
        .arg("report")
        .args(args)
        .output()
        .expect("running coordinator report")
}

fn ok(run: Output) -> String {
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(
        run.status.success(),
        "coordinator report failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    stdout
}

/// A deterministic spread of values around 0 (sd about 0.29 x `scale`).
fn noise(i: u64, salt: u64, scale: f64) -> f64 {
    let x = (i.wrapping_mul(2654435761).wrapping_add(salt * 40503)) % 1000;
    (x as f64 / 1000.0 - 0.5) * scale
}

fn epoch_record(epoch: u64, top1: f64, real: f64, v2: f64) -> MetricsRecord {
    let last = epoch + 1 == EPOCHS;
    let mut eval_sets = BTreeMap::new();
    if last {
        for (name, value) in [("real", real), ("v2", v2)] {
            eval_sets.insert(
                name.to_string(),
                EvalSetAccuracy { top1: value, top5: 99.0, count: 100, excluded: 0, skipped: 0 },
            );
        }
    }
    MetricsRecord::Epoch {
        epoch,
        step: (epoch + 1) * 10,
        lr: 0.005 * (1.0 - epoch as f64 / EPOCHS as f64),
        loss: 2.0 / (epoch + 1) as f64,
        images_per_sec: 100.0,
        top1: Some(top1 - (EPOCHS - 1 - epoch) as f64),
        top5: Some(99.0),
        val_loss: Some(0.5),
        replaced_samples: 0,
        elapsed_s: 1.0,
        eval_sets,
        skipped_updates: 0,
        val_skipped_images: Some(0),
    }
}

fn write_records(path: &Path, records: &[MetricsRecord]) {
    let mut text = String::new();
    for r in records {
        text.push_str(&serde_json::to_string(r).unwrap());
        text.push('\n');
    }
    std::fs::write(path, text).unwrap();
}

/// A sweep folder whose finished runs have final val top-1 `top1(cell index)`;
/// cells listed in `unfinished` stop after one epoch, those in `missing`
/// never start.
fn synthetic_sweep(
    dir: &Path,
    seeds: &str,
    grid: &[&str],
    top1: impl Fn(usize, &rsb_job::SweepCell) -> f64,
    unfinished: &[usize],
    missing: &[usize],
) -> SweepManifest {
    let base = vec![format!("schedule.cosine.epochs={EPOCHS}")];
    let grid: Vec<GridAxis> = grid.iter().map(|g| GridAxis::parse(g).unwrap()).collect();
    let seeds = rsb_job::parse_seeds(seeds).unwrap();
    let manifest =
        SweepManifest::new("resnet18_tiny_cpu", "tiny", base.clone(), seeds, grid).unwrap();
    manifest.write(dir).unwrap();
    let layout = SweepLayout::new(dir);
    let source = RecipeSource::File(tiny_recipe());
    for (i, cell) in manifest.cells.iter().enumerate() {
        if missing.contains(&i) {
            continue;
        }
        std::fs::create_dir_all(layout.run_dir(&cell.id)).unwrap();
        let recipe = cell.load(&source, &base).unwrap();
        std::fs::write(layout.run_recipe(&cell.id), rsb_recipes::to_yaml(&recipe)).unwrap();
        let v = top1(i, cell);
        let epochs = if unfinished.contains(&i) { 1 } else { EPOCHS };
        let records: Vec<MetricsRecord> = (0..epochs)
            .flat_map(|e| {
                [
                    MetricsRecord::Loading { epoch: e, step: e * 10, elapsed_s: 0.1 },
                    epoch_record(e, v, v + 5.6 + noise(i as u64, 7, 0.2), v - 11.7),
                ]
            })
            .collect();
        write_records(&layout.run_metrics(&cell.id), &records);
    }
    manifest
}

/// Final top-1 per set of every finished run, read back from its own metrics.jsonl.
fn finals_from_metrics(dir: &Path) -> BTreeMap<String, Vec<(u64, f64)>> {
    let manifest = SweepManifest::read(dir).unwrap();
    let layout = SweepLayout::new(dir);
    let mut out: BTreeMap<String, Vec<(u64, f64)>> = BTreeMap::new();
    for cell in &manifest.cells {
        let Ok(text) = std::fs::read_to_string(layout.run_metrics(&cell.id)) else { continue };
        let last = text
            .lines()
            .map(|l| serde_json::from_str::<MetricsRecord>(l).unwrap())
            .rfind(|r| matches!(r, MetricsRecord::Epoch { epoch, .. } if *epoch + 1 == EPOCHS));
        if let Some(MetricsRecord::Epoch { top1: Some(top1), eval_sets, .. }) = last {
            out.entry("val".into()).or_default().push((cell.seed, top1));
            for (name, acc) in eval_sets {
                out.entry(name).or_default().push((cell.seed, acc.top1));
            }
        }
    }
    out
}

fn read_csv<T: serde::de::DeserializeOwned>(path: &Path) -> Vec<T> {
    csv::Reader::from_path(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .deserialize()
        .collect::<Result<Vec<T>, _>>()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[track_caller]
fn close(what: &str, a: f64, b: f64) {
    assert!((a - b).abs() <= 1e-9 * b.abs().max(1.0), "{what}: report {a}, metrics {b}");
}

/// The report's rows equal the statistics of the runs' own metrics.
fn check_rows_against_metrics(dir: &Path) -> Vec<SetRow> {
    let rows: Vec<SetRow> = read_csv(&dir.join("report/report.csv"));
    let finals = finals_from_metrics(dir);
    assert_eq!(
        rows.iter().map(|r| r.set.as_str()).collect::<Vec<_>>(),
        ["val", "real", "v2"],
        "val first, then the further sets"
    );
    for row in &rows {
        let values: Vec<f64> = finals[&row.set].iter().map(|v| v.1).collect();
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let std = (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
        assert_eq!(row.n, values.len(), "{}", row.set);
        close(&format!("{} mean", row.set), row.mean, mean);
        close(&format!("{} std", row.set), row.std.unwrap(), std);
        close(
            &format!("{} max", row.set),
            row.max,
            values.iter().copied().fold(f64::MIN, f64::max),
        );
        close(
            &format!("{} min", row.set),
            row.min,
            values.iter().copied().fold(f64::MAX, f64::min),
        );
        let (lo, hi) = (row.ci95_low.unwrap(), row.ci95_high.unwrap());
        assert!(lo < mean && mean < hi, "{}: CI {lo}..{hi} around {mean}", row.set);
        close(&format!("{} CI centre", row.set), (lo + hi) / 2.0, mean);
        let zero: Vec<f64> = finals[&row.set].iter().filter(|v| v.0 == 0).map(|v| v.1).collect();
        match zero.as_slice() {
            [only] => close(&format!("{} seed 0", row.set), row.seed0.unwrap(), *only),
            _ => assert_eq!(row.seed0, None, "{}: no single seed-0 run", row.set),
        }
    }
    rows
}

#[track_caller]
fn png_of_size(path: &Path, size: (u32, u32)) {
    let img = image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!((img.width(), img.height()), size, "{}", path.display());
    let rgb = img.to_rgb8();
    let first = rgb.get_pixel(0, 0);
    assert!(rgb.pixels().any(|p| p != first), "{} is blank", path.display());
}

#[test]
fn a_seed_sweep_report_matches_its_metrics_and_skips_unfinished_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("seeds");
    // 12 cells: 10 finished, one stopped after an epoch, one never started.
    let manifest =
        synthetic_sweep(&dir, "0..12", &[], |i, _| 79.7 + noise(i as u64, 1, 0.4), &[10], &[11]);
    let ids = &manifest.cells;
    // Run 3's final evaluation left out 40 val and 3 V2 images it could not
    // decode: counted, and listed with its counts.
    let metrics = SweepLayout::new(&dir).run_metrics(&ids[3].id);
    let text = std::fs::read_to_string(&metrics).unwrap();
    let (before, last) = text.trim_end().rsplit_once('\n').unwrap();
    let v2 = last.rfind(r#""skipped":0"#).unwrap();
    let last = format!("{}\"skipped\":3{}", &last[..v2], &last[v2 + r#""skipped":0"#.len()..]);
    let last = last.replace(r#""val_skipped_images":0"#, r#""val_skipped_images":40"#);
    std::fs::write(&metrics, format!("{before}\n{last}\n")).unwrap();
    let stdout = ok(coordinator(&[&dir]));
    let rows = check_rows_against_metrics(&dir);
    assert_eq!(rows[0].n, 10);
    assert!(
        stdout.contains("1 run(s) counted whose final evaluation left out images")
            && stdout.contains(&format!("- `{}`: 40 of val, 3 of V2", ids[3].id)),
        "{stdout}"
    );
    assert!(stdout.contains("| val |"), "{stdout}");
    assert!(
        stdout.contains("2 run(s) skipped (1 unfinished, 1 not started), 10 reported"),
        "{stdout}"
    );
    assert!(stdout.contains(&format!("`{}`: unfinished (1 of 3 epochs", ids[10].id)), "{stdout}");
    assert!(stdout.contains(&format!("`{}`: not started", ids[11].id)), "{stdout}");
    let md = std::fs::read_to_string(dir.join("report/report.md")).unwrap();
    assert!(md.contains("| set | mean | std | max | min | seed 0 |"), "{md}");
    assert!(md.contains("| ReaL |") && md.contains("| V2 |"), "{md}");
    assert!(md.contains("D'Agostino-Pearson normality test: p = "), "{md}");
    // No generation record (as one `worker train` process): one generation each.
    assert!(md.contains("\nEvery run trained in one generation (no restart).\n"), "{md}");
    assert!(md.contains("| run | seed | val top-1 | ReaL top-1 | V2 top-1 | restarts |"), "{md}");
    assert!(md.contains(&format!("| `{}` | 3 | ", ids[3].id)), "{md}");
    let runs: Vec<RunRow> = read_csv(&dir.join("report/runs.csv"));
    assert_eq!(runs.len(), 10, "the finished runs: {runs:?}");
    assert!(runs.iter().all(|r| (r.generations, r.restarts) == (1, 0)), "{runs:?}");
    png_of_size(&dir.join("report/top1_histogram.png"), rsb_report::plots::CHART_SIZE);
    for cell in &ids[..10] {
        png_of_size(
            &dir.join(format!("report/curves/{}.png", cell.id)),
            rsb_report::plots::CURVES_SIZE,
        );
    }
    assert!(!dir.join(format!("report/curves/{}.png", ids[10].id)).exists());
}

#[test]
fn a_sweep_of_many_unstarted_cells_logs_ten_of_them_and_counts_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("seeds");
    // 200 cells: 3 finished, 197 never started (a big study just begun).
    let missing: Vec<usize> = (3..200).collect();
    synthetic_sweep(&dir, "0..200", &[], |i, _| 79.7 + noise(i as u64, 1, 0.4), &[], &missing);
    let run = coordinator(&[&dir]);
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    let stdout = ok(run);
    assert!(stdout.contains("197 run(s) skipped (197 not started), 3 reported"), "{stdout}");
    assert_eq!(stderr.matches("run skipped").count(), rsb_report::runs::SKIPS_LOGGED, "{stderr}");
    assert!(stderr.contains("and 187 run(s) skipped (187 not started)"), "{stderr}");
    assert!(!stderr.contains("not started) more"), "{stderr}");
}

/// The report's tables are its result: when they cannot be written (a
/// full disk behind `>`), `coordinator report` fails naming stdout and the
/// cause, where it said nothing and succeeded.
#[test]
fn a_report_whose_tables_cannot_be_written_fails_naming_stdout() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("seeds");
    synthetic_sweep(&dir, "0..3", &[], |i, _| 79.7 + noise(i as u64, 1, 0.4), &[], &[]);
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").expect("/dev/full");
    let run = Command::new(binary("coordinator"))
        .arg("report")
        .arg(&dir)
        .stdout(full)
        .output()
        .expect("running coordinator report");
    let said = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{said}");
    assert!(said.contains("writing the output to stdout: No space left on device"), "{said}");
}

#[test]
fn a_grid_report_has_a_table_and_a_chart_per_axis() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("grid");
    let grid = ["optimizer.lamb.lr=0.004,0.008", "mixup.mixup_alpha=0.1,0.2"];
    let top1 = |i: usize, cell: &rsb_job::SweepCell| {
        let lr = if cell.value_of("optimizer.lamb.lr") == Some("0.008") { 1.0 } else { 0.0 };
        80.0 + lr + noise(i as u64, 3, 0.2)
    };
    synthetic_sweep(&dir, "0..3", &grid, top1, &[], &[]);
    let stdout = ok(coordinator(&[&dir]));
    check_rows_against_metrics(&dir);
    let rows: Vec<GridRow> = read_csv(&dir.join("report/grid.csv"));
    let finals = finals_from_metrics(&dir);
    let manifest = SweepManifest::read(&dir).unwrap();
    for value in ["0.004", "0.008"] {
        let row = rows
            .iter()
            .find(|r| r.axis == "optimizer.lamb.lr" && r.value == value && r.set == "val")
            .unwrap_or_else(|| panic!("no grid row for lr {value}: {rows:?}"));
        let values: Vec<f64> = manifest
            .cells
            .iter()
            .zip(&finals["val"])
            .filter(|(c, _)| c.value_of("optimizer.lamb.lr") == Some(value))
            .map(|(_, v)| v.1)
            .collect();
        assert_eq!(row.n, 6);
        close("grid mean", row.mean, values.iter().sum::<f64>() / 6.0);
    }
    let combos = rows.iter().filter(|r| r.axis.contains(" × ") && r.set == "val").count();
    assert_eq!(combos, 4, "2x2 combinations: {rows:?}");
    assert!(stdout.contains("#### optimizer.lamb.lr"), "{stdout}");
    assert!(stdout.contains("| 0.008 | 81."), "{stdout}");
    for axis in ["optimizer.lamb.lr", "mixup.mixup_alpha"] {
        png_of_size(&dir.join(format!("report/grid_{axis}.png")), rsb_report::plots::CHART_SIZE);
    }
}

#[test]
fn the_comparison_sentence_flips_with_the_difference() {
    let tmp = tempfile::tempdir().unwrap();
    let base = |i: usize, _: &rsb_job::SweepCell| 79.7 + noise(i as u64, 1, 0.4);
    let a = tmp.path().join("baseline");
    synthetic_sweep(&a, "0..10", &[], base, &[], &[]);
    let near = tmp.path().join("near");
    synthetic_sweep(&near, "0..10", &[], |i, _| 79.71 + noise(i as u64, 2, 0.4), &[], &[]);
    let far = tmp.path().join("far");
    synthetic_sweep(&far, "0..10", &[], |i, _| 81.2 + noise(i as u64, 2, 0.4), &[], &[]);

    let stdout = ok(coordinator(&[&a, &near]));
    assert!(stdout.contains("val: near − baseline = "), "{stdout}");
    assert!(stdout.contains("within seed noise"), "{stdout}");
    assert!(!stdout.contains("outside seed noise"), "{stdout}");
    let rows: Vec<ComparisonRow> = read_csv(&a.join("report/comparison.csv"));
    let val = &rows[0];
    assert_eq!((val.set.as_str(), val.within_noise), ("val", Some(true)));
    let fa = finals_from_metrics(&a);
    let fb = finals_from_metrics(&near);
    let mean = |v: &[(u64, f64)]| v.iter().map(|x| x.1).sum::<f64>() / v.len() as f64;
    close("difference", val.difference, mean(&fb["val"]) - mean(&fa["val"]));
    assert!(val.seeds_needed.unwrap() > 10, "{val:?}");

    let stdout = ok(coordinator(&[&a, &far]));
    assert!(stdout.contains("outside seed noise, far is better"), "{stdout}");
    let rows: Vec<ComparisonRow> = read_csv(&a.join("report/comparison.csv"));
    assert_eq!(rows[0].within_noise, Some(false));
    assert!(rows[0].p_value.unwrap() < 1e-6 && rows[0].ci95_low.unwrap() > 0.0, "{:?}", rows[0]);
    let md = std::fs::read_to_string(a.join("report/report.md")).unwrap();
    assert!(md.contains("## Comparison: far against baseline"), "{md}");
    assert!(!far.join("report").exists(), "nothing is written into B");

    // A sweep that did not evaluate V2: ReaL and val are compared, and V2
    // is named as evaluated by one sweep only, where it was left out
    // without a word.
    let no_v2 = tmp.path().join("no-v2");
    let manifest =
        synthetic_sweep(&no_v2, "0..10", &[], |i, _| 79.8 + noise(i as u64, 3, 0.4), &[], &[]);
    for cell in &manifest.cells {
        let metrics = SweepLayout::new(&no_v2).run_metrics(&cell.id);
        let lines: Vec<String> = std::fs::read_to_string(&metrics)
            .unwrap()
            .lines()
            .map(|line| {
                let mut record: serde_json::Value = serde_json::from_str(line).unwrap();
                if let Some(sets) = record.get_mut("eval_sets").and_then(|s| s.as_object_mut()) {
                    sets.remove("v2");
                }
                record.to_string() + "\n"
            })
            .collect();
        std::fs::write(&metrics, lines.concat()).unwrap();
    }
    let stdout = ok(coordinator(&[&a, &no_v2]));
    let rows: Vec<ComparisonRow> = read_csv(&a.join("report/comparison.csv"));
    let sets: Vec<&str> = rows.iter().map(|r| r.set.as_str()).collect();
    assert_eq!(sets, ["val", "real"], "{stdout}");
    assert!(
        stdout.contains("Not compared, as only one sweep evaluated them: V2 (only baseline)."),
        "{stdout}"
    );

    // A sweep against itself, by its path or through a link, is refused,
    // where it printed "no evidence of a difference".
    let link = tmp.path().join("baseline-link");
    std::os::unix::fs::symlink(&a, &link).unwrap();
    for b in [&a, &link] {
        let run = coordinator(&[&a, b]);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "{}", String::from_utf8_lossy(&run.stdout));
        assert!(stderr.contains("a comparison needs two sweeps"), "{stderr}");
    }
}

#[test]
fn a_corrupt_metrics_file_is_an_error_naming_its_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("corrupt");
    let manifest = synthetic_sweep(&dir, "0..3", &[], |_, _| 80.0, &[], &[]);
    let metrics = SweepLayout::new(&dir).run_metrics(&manifest.cells[1].id);
    let mut text = std::fs::read_to_string(&metrics).unwrap();
    text.push_str("{\"kind\":\"epoch\",\"epoch\":\"x\"}\n");
    std::fs::write(&metrics, text).unwrap();
    let run = coordinator(&[&dir]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(stderr.contains(&format!("{}:7: not a metrics record", metrics.display())), "{stderr}");

    let empty = tmp.path().join("nothing");
    synthetic_sweep(&empty, "0..2", &[], |_, _| 80.0, &[], &[0, 1]);
    let run = coordinator(&[&empty]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(stderr.contains("no finished run to report (2 cell(s) skipped"), "{stderr}");
    let run = coordinator(&[&tmp.path().join("absent")]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success() && stderr.contains("sweep.json"), "{stderr}");
}

/// The final val top-1 and the last epoch record's loss of a run folder.
fn final_of(run_dir: &Path) -> (f64, f64) {
    let epochs = rsb_integration_tests::run_records(run_dir, "epoch");
    let last = epochs.last().unwrap_or_else(|| panic!("{}: no epoch record", run_dir.display()));
    (last["top1"].as_f64().unwrap(), last["loss"].as_f64().unwrap())
}

/// `coordinator up --local` with `--seeds`, then with a 2x2 `--grid`, on
/// two local hosts: every cell runs and is recorded finished, the reports'
/// numbers are the runs' own, the PNGs are valid, and the grid cell that
/// equals seed 0 of the seed sweep repeats its every step loss exactly
/// (while another seed does not).
#[test]
fn sweeps_through_coordinator_up_run_every_cell_and_report_their_own_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fashion_subset(tmp.path(), 8, 2);
    let base = vec![
        format!("data.root={}", data.display()),
        "model.num_classes=10".to_string(),
        "schedule.cosine.epochs=1".to_string(),
    ];
    let run = |name: &str, extra: &[&str]| {
        let dir = tmp.path().join(name);
        let log = tmp.path().join(format!("{name}.log"));
        let child = sweeps::start(&dir, &base, extra, &log);
        let status = wait_with_timeout(child, Duration::from_secs(300), name).status;
        let output = std::fs::read_to_string(&log).unwrap();
        assert!(status.success(), "sweep {name} failed:\n{output}");
        (dir, output)
    };
    let (seeds, output) = run("seeds", &["--nodes", "2", "--seeds", "0..3"]);
    assert!(output.contains("sweep over: 3 finished, 0 failed of 3 run(s)"), "{output}");
    let grid_args = [
        "--nodes",
        "2",
        "--grid",
        "optimizer.lamb.lr=5.0e-3,8.0e-3",
        "--grid",
        "optimizer.lamb.weight_decay=0.01,0.05",
    ];
    let (grid, output) = run("grid", &grid_args);
    assert!(output.contains("sweep over: 4 finished, 0 failed of 4 run(s)"), "{output}");
    for dir in [&seeds, &grid] {
        let manifest = SweepManifest::read(dir).unwrap();
        let layout = SweepLayout::new(dir);
        let finals: Vec<(u64, f64)> = manifest
            .cells
            .iter()
            .map(|cell| {
                let outcome = rsb_job::RunOutcome::read(&layout, &cell.id).unwrap().unwrap();
                assert_eq!(outcome.end, rsb_job::RunEnd::Finished, "{}", cell.id);
                (cell.seed, final_of(&layout.run_dir(&cell.id)).0)
            })
            .collect();
        ok(coordinator(&[dir]));
        let rows: Vec<SetRow> = read_csv(&dir.join("report/report.csv"));
        assert_eq!(rows.len(), 1, "val only: {rows:?}");
        let values: Vec<f64> = finals.iter().map(|f| f.1).collect();
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        assert_eq!(rows[0].n, values.len());
        close("mean", rows[0].mean, mean);
        close("max", rows[0].max, values.iter().copied().fold(f64::MIN, f64::max));
        close("min", rows[0].min, values.iter().copied().fold(f64::MAX, f64::min));
        let seed0: Vec<f64> = finals.iter().filter(|f| f.0 == 0).map(|f| f.1).collect();
        if let [only] = seed0.as_slice() {
            close("seed 0", rows[0].seed0.unwrap(), *only);
        }
        // The coordinator recorded each run's start, and no restart.
        let md = std::fs::read_to_string(dir.join("report/report.md")).unwrap();
        assert!(md.contains("\nEvery run trained in one generation (no restart).\n"), "{md}");
        let runs: Vec<RunRow> = read_csv(&dir.join("report/runs.csv"));
        assert_eq!(runs.len(), manifest.cells.len(), "{runs:?}");
        for run in &runs {
            assert_eq!((run.generations, run.restarts), (1, 0), "{run:?}");
            assert!(!run.world_sizes.is_empty() && !run.world_size_changed, "{run:?}");
        }
        png_of_size(&dir.join("report/top1_histogram.png"), rsb_report::plots::CHART_SIZE);
        for cell in &manifest.cells {
            png_of_size(
                &dir.join(format!("report/curves/{}.png", cell.id)),
                rsb_report::plots::CURVES_SIZE,
            );
        }
    }
    let grid_rows: Vec<GridRow> = read_csv(&grid.join("report/grid.csv"));
    for axis in ["optimizer.lamb.lr", "optimizer.lamb.weight_decay"] {
        let rows: Vec<&GridRow> = grid_rows.iter().filter(|r| r.axis == axis).collect();
        assert_eq!(rows.len(), 2, "{axis}: {grid_rows:?}");
        assert!(rows.iter().all(|r| r.n == 2), "{axis}: {rows:?}");
    }
    // The same seed gives the same run: the grid's corner at the recipe's
    // own values is seed 0 of the seed sweep, update for update.
    let seeds_layout = SweepLayout::new(&seeds);
    let seed0 = sweeps::step_losses(&seeds_layout.run_dir("seed-000"));
    let corner = SweepLayout::new(&grid)
        .run_dir("optimizer.lamb.lr=5.0e-3,optimizer.lamb.weight_decay=0.01,seed-000");
    assert!(!seed0.is_empty());
    assert_eq!(sweeps::step_losses(&corner), seed0, "same seed, same recipe, other losses");
    assert_eq!(final_of(&corner), final_of(&seeds_layout.run_dir("seed-000")));
    assert_ne!(sweeps::step_losses(&seeds_layout.run_dir("seed-001")), seed0, "seed had no effect");
}
