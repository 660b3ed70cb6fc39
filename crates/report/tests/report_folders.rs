//! `rsb_report::report` and `compare` on sweep folders written here from
//! typed records: impossible metrics values and chart ranges are errors (not
//! a hang), run outcomes decide which runs count, files are replaced
//! atomically, identical values and grids get no Gaussian fit, a plain
//! report removes the comparison of an earlier one, and runs that did not
//! train in one generation (their `generation` records) are listed with
//! why, in `report.md` and `runs.csv`.
//!
//! Every report runs on its own thread with a time limit, so a report that
//! never returns fails its test instead of hanging the suite.

use rsb_job::sweep::{GridAxis, SweepLayout, SweepManifest};
use rsb_job::{GenerationReason, MetricsRecord, RunEnd, RunOutcome, SweepCell};
use rsb_report::runs::SkipReason;
use rsb_report::tables::{ComparisonRow, RunRow, SetRow};
use rsb_report::{ReportError, Written};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

const EPOCHS: u64 = 3;

/// Far longer than a report of a dozen runs takes (well under a second).
const LIMIT: Duration = Duration::from_secs(120);

fn tiny_recipe() -> PathBuf {
    rsb_test_support::workspace_root().join("recipes/debug/resnet18_tiny_cpu.yaml")
}

fn epoch_record(epoch: u64, top1: f64, loss: f64) -> MetricsRecord {
    MetricsRecord::Epoch {
        epoch,
        step: (epoch + 1) * 10,
        lr: 0.001,
        loss,
        images_per_sec: 100.0,
        top1: Some(top1),
        top5: Some(99.0),
        val_loss: Some(0.5),
        replaced_samples: 0,
        elapsed_s: 1.0,
        eval_sets: BTreeMap::new(),
        skipped_updates: 0,
        val_skipped_images: Some(0),
    }
}

/// A sweep folder over `seeds` (and `grid`) whose runs end at the final
/// val top-1 `top1(cell)`, each epoch record's loss 1.
fn sweep(
    dir: &Path,
    seeds: Vec<u64>,
    grid: &[&str],
    top1: impl Fn(&SweepCell) -> f64,
) -> SweepManifest {
    let base = vec![format!("schedule.cosine.epochs={EPOCHS}")];
    let grid: Vec<GridAxis> = grid.iter().map(|g| GridAxis::parse(g).unwrap()).collect();
    let manifest =
        SweepManifest::new("resnet18_tiny_cpu", "tiny", base.clone(), seeds, grid).unwrap();
    manifest.write(dir).unwrap();
    let layout = SweepLayout::new(dir);
    let source = rsb_recipes::RecipeSource::File(tiny_recipe());
    for cell in &manifest.cells {
        std::fs::create_dir_all(layout.run_dir(&cell.id)).unwrap();
        let recipe = cell.load(&source, &base).unwrap();
        std::fs::write(layout.run_recipe(&cell.id), rsb_recipes::to_yaml(&recipe)).unwrap();
        let records: Vec<MetricsRecord> = (0..EPOCHS)
            .map(|e| epoch_record(e, top1(cell) - (EPOCHS - 1 - e) as f64, 1.0))
            .collect();
        write_records(&layout.run_metrics(&cell.id), &records);
    }
    manifest
}

fn write_records(path: &Path, records: &[MetricsRecord]) {
    let text: String = records.iter().map(|r| serde_json::to_string(r).unwrap() + "\n").collect();
    std::fs::write(path, text).unwrap();
}

/// Ten seeds with a spread of final top-1 around 79.7.
fn seeds_sweep(dir: &Path) -> SweepManifest {
    sweep(dir, (0..10).collect(), &[], |c| 79.5 + 0.05 * c.seed as f64)
}

fn within_limit<T: Send + 'static>(what: String, work: impl FnOnce() -> T + Send + 'static) -> T {
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = sender.send(work());
    });
    receiver.recv_timeout(LIMIT).unwrap_or_else(|_| panic!("{what} did not return in {LIMIT:?}"))
}

fn report(dir: &Path) -> Result<Written, ReportError> {
    let dir = dir.to_path_buf();
    within_limit(format!("report of {}", dir.display()), move || rsb_report::report(&dir))
}

fn compare(a: &Path, b: &Path) -> Result<Written, ReportError> {
    let (a, b) = (a.to_path_buf(), b.to_path_buf());
    within_limit(format!("comparison of {}", a.display()), move || rsb_report::compare(&a, &b))
}

fn read_csv<T: serde::de::DeserializeOwned>(path: &Path) -> Vec<T> {
    csv::Reader::from_path(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .deserialize()
        .collect::<Result<Vec<T>, _>>()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn a_loss_too_large_to_draw_is_an_error_not_a_hang() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = seeds_sweep(tmp.path());
    let id = &manifest.cells[3].id;
    let records: Vec<MetricsRecord> =
        (0..EPOCHS).map(|e| epoch_record(e, 79.0, if e == 0 { 1.7e308 } else { 1.0 })).collect();
    write_records(&SweepLayout::new(tmp.path()).run_metrics(id), &records);
    let err = report(tmp.path()).unwrap_err();
    assert!(matches!(err, ReportError::Plot { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains(&format!("curves/{id}.png")), "{text}");
    assert!(text.contains("training loss axis") && text.contains("too wide to draw"), "{text}");
}

#[test]
fn an_accuracy_outside_0_to_100_is_an_error_naming_file_line_and_field() {
    for (top1, shown) in [(1e308, "1e308"), (-1e308, "-1e308"), (100.5, "100.5")] {
        let tmp = tempfile::tempdir().unwrap();
        let manifest = seeds_sweep(tmp.path());
        let metrics = SweepLayout::new(tmp.path()).run_metrics(&manifest.cells[4].id);
        let records: Vec<MetricsRecord> =
            (0..EPOCHS).map(|e| epoch_record(e, if e == 2 { top1 } else { 50.0 }, 1.0)).collect();
        write_records(&metrics, &records);
        let err = report(tmp.path()).unwrap_err().to_string();
        let expected = format!("{}:3: top1 = {shown} is not 0..=100", metrics.display());
        assert_eq!(err, expected);
    }
}

#[test]
fn a_failed_run_is_skipped_with_its_reason_unless_its_final_evaluation_was_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = seeds_sweep(tmp.path());
    let layout = SweepLayout::new(tmp.path());
    let failure = "rank 0 on host h1: checkpoint write: No space left on device";
    let failed =
        RunOutcome { end: RunEnd::Failed, attempts: 3, failure: Some(failure.to_string()) };
    // Failed after its final evaluation was recorded (the final checkpoint
    // could not be written): its result is measured, so it counts, listed.
    failed.write(&layout, &manifest.cells[2].id).unwrap();
    let finished = RunOutcome { end: RunEnd::Finished, attempts: 1, failure: None };
    finished.write(&layout, &manifest.cells[3].id).unwrap();
    // Failed before its final evaluation: failed, not "unfinished".
    failed.write(&layout, &manifest.cells[4].id).unwrap();
    let first_epochs: Vec<MetricsRecord> =
        (0..EPOCHS - 1).map(|e| epoch_record(e, 70.0, 1.0)).collect();
    write_records(&layout.run_metrics(&manifest.cells[4].id), &first_epochs);
    // A run that failed before its first record: failed, not "not started".
    failed.write(&layout, &manifest.cells[5].id).unwrap();
    std::fs::remove_file(layout.run_metrics(&manifest.cells[5].id)).unwrap();
    // One never started: no metrics, no outcome.
    std::fs::remove_file(layout.run_metrics(&manifest.cells[6].id)).unwrap();

    let written = report(tmp.path()).unwrap();
    assert_eq!(written.runs, 7);
    let reasons: Vec<(&str, &SkipReason)> =
        written.skipped.iter().map(|s| (s.id.as_str(), &s.reason)).collect();
    let expected_failure = SkipReason::Failed { attempts: 3, failure: Some(failure.to_string()) };
    assert_eq!(
        reasons,
        [
            (manifest.cells[4].id.as_str(), &expected_failure),
            (manifest.cells[5].id.as_str(), &expected_failure),
            (manifest.cells[6].id.as_str(), &SkipReason::NotStarted),
        ]
    );
    assert_eq!(
        rsb_report::runs::skipped_text(&written.skipped),
        "3 run(s) skipped (2 failed, 1 not started)"
    );
    let rows: Vec<SetRow> = read_csv(&written.dir.join(rsb_report::REPORT_CSV));
    assert_eq!(rows[0].n, 7);
    let md = std::fs::read_to_string(written.dir.join(rsb_report::REPORT_MD)).unwrap();
    let line = format!("- `{}`: failed after 3 attempt(s): {failure}", manifest.cells[4].id);
    assert!(md.contains(&line), "{md}");
    assert!(md.contains("1 run(s) counted, although the coordinator recorded a failure"), "{md}");
    assert!(md.contains(&format!("- `{}`: {failure}", manifest.cells[2].id)), "{md}");
}

#[test]
fn a_corrupt_outcome_is_an_error_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = seeds_sweep(tmp.path());
    let outcome = SweepLayout::new(tmp.path()).run_outcome(&manifest.cells[5].id);
    std::fs::write(&outcome, "garbage{").unwrap();
    let err = report(tmp.path()).unwrap_err().to_string();
    assert!(err.starts_with(&format!("{}: ", outcome.display())), "{err}");
}

#[test]
fn a_run_without_its_recipe_is_skipped_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = seeds_sweep(tmp.path());
    let id = &manifest.cells[1].id;
    std::fs::remove_file(SweepLayout::new(tmp.path()).run_recipe(id)).unwrap();
    let written = report(tmp.path()).unwrap();
    assert_eq!(written.runs, 9);
    assert_eq!(written.skipped.len(), 1);
    assert_eq!((&written.skipped[0].id, &written.skipped[0].reason), (id, &SkipReason::NoRecipe));
}

/// Each file is replaced by a new one (rename), never rewritten in place:
/// a hard link to the old file keeps the old bytes.
#[test]
fn report_files_are_replaced_not_rewritten_in_place() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("seeds");
    let manifest = seeds_sweep(&dir);
    let report_dir = SweepLayout::new(&dir).report_dir();
    let files = [
        PathBuf::from(rsb_report::REPORT_MD),
        PathBuf::from(rsb_report::REPORT_CSV),
        PathBuf::from(rsb_report::HISTOGRAM_PNG),
        Path::new(rsb_report::CURVES).join(format!("{}.png", manifest.cells[0].id)),
    ];
    std::fs::create_dir_all(report_dir.join(rsb_report::CURVES)).unwrap();
    let mut kept = Vec::new();
    for (i, file) in files.iter().enumerate() {
        let old = tmp.path().join(format!("old-{i}"));
        std::fs::write(&old, "old").unwrap();
        std::fs::hard_link(&old, report_dir.join(file)).unwrap();
        kept.push(old);
    }
    report(&dir).unwrap();
    for (file, old) in files.iter().zip(&kept) {
        let old_now = String::from_utf8_lossy(&std::fs::read(old).unwrap()).into_owned();
        assert_eq!(old_now, "old", "{} was written in place", file.display());
        assert_ne!(std::fs::read(report_dir.join(file)).unwrap(), b"old", "{}", file.display());
    }
    let leftovers: Vec<_> = std::fs::read_dir(&report_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn a_plain_report_removes_the_comparison_of_an_earlier_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    seeds_sweep(&a);
    sweep(&b, (0..10).collect(), &[], |c| 80.5 + 0.05 * c.seed as f64);
    let written = compare(&a, &b).unwrap();
    let comparison = written.dir.join(rsb_report::COMPARISON_CSV);
    assert!(comparison.is_file());
    let written = report(&a).unwrap();
    assert!(!comparison.exists(), "a stale comparison.csv is left next to the new report");
    assert!(!written.files.contains(&comparison));
}

#[test]
fn identical_values_give_their_mean_no_interval_and_no_gaussian() {
    let tmp = tempfile::tempdir().unwrap();
    sweep(tmp.path(), (0..13).collect(), &[], |_| 73.44);
    let written = report(tmp.path()).unwrap();
    let rows: Vec<SetRow> = read_csv(&written.dir.join(rsb_report::REPORT_CSV));
    let row = &rows[0];
    assert_eq!((row.n, row.mean, row.max, row.min), (13, 73.44, 73.44, 73.44));
    assert_eq!((row.std, row.ci95_low, row.ci95_high), (Some(0.0), None, None));
    let md = std::fs::read_to_string(written.dir.join(rsb_report::REPORT_MD)).unwrap();
    assert!(md.contains("Every run has the same value, 73.44"), "{md}");
    assert!(!md.contains("normality test: p ="), "{md}");
}

#[test]
fn two_sweeps_without_spread_need_no_number_of_seeds() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    sweep(&a, (0..5).collect(), &[], |_| 80.0);
    sweep(&b, (0..5).collect(), &[], |_| 81.0);
    let written = compare(&a, &b).unwrap();
    let rows: Vec<ComparisonRow> = read_csv(&written.dir.join(rsb_report::COMPARISON_CSV));
    assert_eq!((rows[0].difference, rows[0].seeds_needed, rows[0].p_value), (1.0, None, None));
}

#[test]
fn a_grid_histogram_is_pooled_without_a_gaussian_or_normality_test() {
    let tmp = tempfile::tempdir().unwrap();
    let top1 = |c: &SweepCell| {
        let lr = if c.value_of("optimizer.lamb.lr") == Some("0.008") { 1.5 } else { 0.0 };
        79.5 + lr + 0.05 * c.seed as f64
    };
    sweep(tmp.path(), (0..5).collect(), &["optimizer.lamb.lr=0.006,0.008"], top1);
    let written = report(tmp.path()).unwrap();
    let md = std::fs::read_to_string(written.dir.join(rsb_report::REPORT_MD)).unwrap();
    assert!(md.contains("The histogram pools the runs of 2 grid cells"), "{md}");
    assert!(!md.contains("normality test: p ="), "{md}");

    // One grid value is seed noise alone: fitted and tested as usual.
    let one = tmp.path().join("one");
    sweep(&one, (0..10).collect(), &["optimizer.lamb.lr=0.006"], top1);
    let written = report(&one).unwrap();
    let md = std::fs::read_to_string(written.dir.join(rsb_report::REPORT_MD)).unwrap();
    assert!(md.contains("D'Agostino-Pearson normality test: p = "), "{md}");

    // Nor is the grid compared with another sweep as seed noise; the sweep
    // of one grid value is.
    let seeds = tmp.path().join("seeds");
    seeds_sweep(&seeds);
    let written = compare(tmp.path(), &seeds).unwrap();
    let rows: Vec<ComparisonRow> = read_csv(&written.dir.join(rsb_report::COMPARISON_CSV));
    assert_eq!((rows[0].grid_cells_a, rows[0].grid_cells_b), (2, 1));
    assert_eq!((rows[0].p_value, rows[0].seeds_needed), (None, None));
    assert!(written.summary.contains("not compared with seed noise"), "{}", written.summary);
    assert!(written.summary.contains("pools the runs of several grid cells"));
    let written = compare(&one, &seeds).unwrap();
    let rows: Vec<ComparisonRow> = read_csv(&written.dir.join(rsb_report::COMPARISON_CSV));
    assert!(rows[0].p_value.is_some(), "{rows:?}");
}

/// Makes `path` a FIFO (a reader that opened it would wait for a writer).
fn fifo(path: &Path) {
    let _ = std::fs::remove_file(path);
    let made = std::process::Command::new("mkfifo").arg(path).status().unwrap();
    assert!(made.success());
}

#[test]
fn a_run_file_that_cannot_be_read_is_an_error_naming_it_not_a_run_left_out() {
    type Spoil = fn(&Path);
    let spoils: [(&str, Spoil); 3] = [
        ("a FIFO", fifo),
        ("a dangling link", |p: &Path| {
            std::fs::remove_file(p).unwrap();
            std::os::unix::fs::symlink("/nonexistent/metrics.jsonl", p).unwrap();
        }),
        ("a folder", |p: &Path| {
            std::fs::remove_file(p).unwrap();
            std::fs::create_dir(p).unwrap();
        }),
    ];
    for (what, spoil) in spoils {
        for file in ["metrics.jsonl", "recipe.yaml", "outcome.json", "sweep.json"] {
            let tmp = tempfile::tempdir().unwrap();
            let manifest = seeds_sweep(tmp.path());
            let layout = SweepLayout::new(tmp.path());
            let id = &manifest.cells[3].id;
            let path = match file {
                "metrics.jsonl" => layout.run_metrics(id),
                "recipe.yaml" => layout.run_recipe(id),
                "outcome.json" => {
                    let outcome = RunOutcome { end: RunEnd::Finished, attempts: 1, failure: None };
                    outcome.write(&layout, id).unwrap()
                }
                _ => layout.manifest(),
            };
            spoil(&path);
            let err = report(tmp.path()).unwrap_err().to_string();
            assert!(err.contains(&path.display().to_string()), "{what} as {file}: {err}");
        }
    }
}

#[test]
fn a_line_that_is_not_utf8_or_not_a_number_is_named_with_its_line_and_text() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = seeds_sweep(tmp.path());
    let metrics = SweepLayout::new(tmp.path()).run_metrics(&manifest.cells[4].id);
    let good = std::fs::read(&metrics).unwrap();
    let mut bad = good.clone();
    bad.extend_from_slice(b"\xff\n");
    std::fs::write(&metrics, &bad).unwrap();
    let err = report(tmp.path()).unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "{}:4: not a metrics record: not UTF-8 text (byte 1 of the line)",
            metrics.display()
        )
    );
    // A last line cut inside a character is a record being written: left out.
    let mut torn = good.clone();
    torn.extend_from_slice("{\"kind\":\"generation\",\"hosts\":[\"h\u{e9}".as_bytes());
    torn.pop();
    std::fs::write(&metrics, &torn).unwrap();
    assert_eq!(report(tmp.path()).unwrap().runs, 10);
    let text = String::from_utf8(good).unwrap();
    let nan = text.replacen("\"top1\":77.7", "\"top1\":NaN", 1);
    assert_ne!(nan, text, "{text}");
    std::fs::write(&metrics, nan).unwrap();
    let err = report(tmp.path()).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("{}:1: not a metrics record: expected value", metrics.display()))
            && err.contains("\"top1\":NaN")
            && !err.contains("line 1 column"),
        "{err}"
    );
}

#[test]
fn a_recipe_that_does_not_load_is_named_once_with_its_line() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = seeds_sweep(tmp.path());
    let recipe = SweepLayout::new(tmp.path()).run_recipe(&manifest.cells[2].id);
    std::fs::write(&recipe, "name: x\nnot_a_field: 1\n").unwrap();
    let err = report(tmp.path()).unwrap_err().to_string();
    assert!(err.contains(&recipe.display().to_string()), "{err}");
    assert_eq!(err.matches("recipe.yaml").count(), 1, "{err}");
}

#[test]
fn the_curves_of_a_run_that_no_longer_counts_are_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = seeds_sweep(tmp.path());
    let layout = SweepLayout::new(tmp.path());
    let id = &manifest.cells[5].id;
    let curves = layout.report_dir().join(rsb_report::CURVES).join(format!("{id}.png"));
    report(tmp.path()).unwrap();
    assert!(curves.is_file());
    // Started again, it has no final record yet.
    write_records(&layout.run_metrics(id), &[epoch_record(0, 50.0, 1.0)]);
    let written = report(tmp.path()).unwrap();
    assert_eq!(written.runs, 9);
    assert!(!curves.exists(), "the curves of a run that no longer counts are left");
}

#[test]
fn a_sweep_with_no_finished_run_names_the_first_cells_and_counts_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = sweep(tmp.path(), (0..30).collect(), &[], |_| 50.0);
    let layout = SweepLayout::new(tmp.path());
    for cell in &manifest.cells {
        std::fs::remove_file(layout.run_metrics(&cell.id)).unwrap();
    }
    let err = report(tmp.path()).unwrap_err().to_string();
    assert!(err.contains("no finished run to report (30 cell(s) skipped: seed-000 not started"));
    assert!(err.contains("seed-019 not started") && !err.contains("seed-020"), "{err}");
    assert!(err.ends_with("; and 10 more)"), "{err}");
}

/// A generation record as the coordinator writes it: hosts `host-0`...,
/// one rank each, resumed from the checkpoint of update `resume_step`.
fn generation(
    number: u64,
    world_size: u32,
    resume_step: Option<u64>,
    reasons: Vec<GenerationReason>,
) -> MetricsRecord {
    MetricsRecord::Generation {
        generation: number,
        hosts: (0..world_size).map(|i| format!("host-{i}")).collect(),
        world_size,
        accumulation: 2 / world_size,
        resume_from: resume_step.map(|s| format!("/runs/x/checkpoints/epoch-{:04}", s / 10)),
        resume_step,
        reasons,
    }
}

/// Rewrites each run's metrics of a [`sweep`] with its generation 1 (a
/// start on `world_size` ranks) before its records.
fn started_on(dir: &Path, manifest: &SweepManifest, world_size: u32) {
    let layout = SweepLayout::new(dir);
    for cell in &manifest.cells {
        let path = layout.run_metrics(&cell.id);
        let text = std::fs::read_to_string(&path).unwrap();
        let start = generation(1, world_size, None, vec![GenerationReason::Start]);
        std::fs::write(&path, serde_json::to_string(&start).unwrap() + "\n" + &text).unwrap();
    }
}

#[test]
fn a_run_restarted_after_a_lost_and_an_admitted_host_is_listed_with_its_generations() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = sweep(tmp.path(), (0..4).collect(), &[], |c| 79.5 + 0.1 * c.seed as f64);
    started_on(tmp.path(), &manifest, 2);
    let layout = SweepLayout::new(tmp.path());
    // seed-002: 2 ranks, host-1 lost after update 20 (resumed from the
    // checkpoint of update 10: 10 updates trained again on one rank), then
    // admitted again (2 ranks from update 20), and finished.
    let lost = GenerationReason::LostHost {
        host: "host-1".into(),
        detail: "no heartbeat for 30 s".into(),
    };
    let admitted = GenerationReason::Admitted { host: "host-1".into() };
    let records = vec![
        generation(1, 2, None, vec![GenerationReason::Start]),
        epoch_record(0, 78.0, 1.0),
        epoch_record(1, 79.0, 1.0),
        generation(2, 1, Some(10), vec![lost]),
        epoch_record(1, 79.0, 1.0),
        generation(3, 2, Some(20), vec![admitted]),
        epoch_record(2, 80.0, 1.0),
    ];
    write_records(&layout.run_metrics("seed-002"), &records);
    let written = report(tmp.path()).unwrap();
    assert_eq!(written.runs, 4, "a restarted run counts");
    let md = std::fs::read_to_string(layout.report_dir().join(rsb_report::REPORT_MD)).unwrap();
    let expected = "\n1 run(s) counted that did not train in one generation (";
    assert!(md.contains(expected), "{md}");
    let expected = "- `seed-002`: 3 generations, world size changed (2 → 1 → 2)\n  \
                    - generation 2: lost host host-1: no heartbeat for 30 s; 1 rank(s), resumed \
                    from update 10 (10 recorded update(s) trained again)\n  \
                    - generation 3: admitted host host-1; 2 rank(s), resumed from update 20\n";
    assert!(md.contains(expected), "{md}");
    assert!(!md.contains("`seed-001`: "), "a run of one generation is not listed: {md}");
    assert!(!md.contains("Every run trained in one generation"), "{md}");
    assert!(md.contains("| run | seed | val top-1 | restarts | world size |"), "{md}");
    assert!(md.contains("| `seed-002` | 2 | 80.00 | 2 | 2 → 1 → 2 |"), "{md}");
    assert!(md.contains("| `seed-001` | 1 | 79.60 | 0 | 2 |"), "{md}");
    assert_eq!(written.summary.matches("3 generations").count(), 1, "{}", written.summary);
    let rows: Vec<RunRow> = read_csv(&layout.report_dir().join(rsb_report::RUNS_CSV));
    let counts: Vec<(&str, usize, usize, &str, bool)> = rows
        .iter()
        .map(|r| {
            (r.id.as_str(), r.generations, r.restarts, r.world_sizes.as_str(), r.world_size_changed)
        })
        .collect();
    assert_eq!(
        counts,
        [
            ("seed-000", 1, 0, "2", false),
            ("seed-001", 1, 0, "2", false),
            ("seed-002", 3, 2, "2 1 2", true),
            ("seed-003", 1, 0, "2", false),
        ]
    );
    assert_eq!(rows[2].val_top1, Some(80.0), "the last generation's final record");
    // The statistics are those of the final records.
    let set: Vec<SetRow> = read_csv(&layout.report_dir().join(rsb_report::REPORT_CSV));
    assert_eq!(set[0].n, 4);
    assert!((set[0].max - 80.0).abs() < 1e-9, "{set:?}");
}

#[test]
fn a_run_without_generation_records_trained_in_one_generation() {
    let tmp = tempfile::tempdir().unwrap();
    // `sweep` writes no generation record (as one `worker train` process).
    let manifest = sweep(tmp.path(), (0..3).collect(), &[], |c| 79.5 + 0.1 * c.seed as f64);
    let layout = SweepLayout::new(tmp.path());
    // Another run's generation record being written as the report reads
    // it: its torn last line is left out, as any record's.
    let path = layout.run_metrics(&manifest.cells[1].id);
    let mut text = std::fs::read_to_string(&path).unwrap();
    let restart = generation(2, 1, Some(20), vec![GenerationReason::CoordinatorRestarted]);
    let line = serde_json::to_string(&restart).unwrap();
    text.push_str(&line[..line.len() / 2]);
    std::fs::write(&path, text).unwrap();
    let written = report(tmp.path()).unwrap();
    assert_eq!(written.runs, 3);
    let md = std::fs::read_to_string(layout.report_dir().join(rsb_report::REPORT_MD)).unwrap();
    assert!(md.contains("\nEvery run trained in one generation (no restart).\n"), "{md}");
    assert!(md.contains("| `seed-000` | 0 | 79.50 | 0 | — |"), "{md}");
    assert!(md.contains("| `seed-001` | 1 | 79.60 | 0 | — |"), "{md}");
    let rows: Vec<RunRow> = read_csv(&layout.report_dir().join(rsb_report::RUNS_CSV));
    assert_eq!(rows.len(), 3);
    for row in &rows {
        assert_eq!(
            (row.generations, row.restarts, row.world_sizes.as_str(), row.world_size_changed),
            (1, 0, "", false),
            "{row:?}"
        );
    }
}

#[test]
fn a_sweep_whose_runs_all_trained_in_one_generation_says_so_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = sweep(tmp.path(), (0..5).collect(), &[], |c| 79.5 + 0.1 * c.seed as f64);
    started_on(tmp.path(), &manifest, 2);
    let written = report(tmp.path()).unwrap();
    let md = std::fs::read_to_string(written.dir.join(rsb_report::REPORT_MD)).unwrap();
    assert_eq!(md.matches("one generation").count(), 1, "one line about generations: {md}");
    assert!(!md.contains("  - generation"), "{md}");
    assert!(md.contains("\nEvery run trained in one generation (no restart).\n"), "{md}");
    assert!(!md.contains("did not train in one generation"), "{md}");
    assert!(md.contains("| `seed-004` | 4 | 79.90 | 0 | 2 |"), "{md}");
    let rows: Vec<RunRow> = read_csv(&written.dir.join(rsb_report::RUNS_CSV));
    assert!(rows.iter().all(|r| (r.generations, r.restarts) == (1, 0)), "{rows:?}");
    assert!(rows.iter().all(|r| r.world_sizes == "2" && !r.world_size_changed), "{rows:?}");
    // A sweep compared against it gets its own run table and line.
    let b = tempfile::tempdir().unwrap();
    sweep(b.path(), (0..5).collect(), &[], |c| 79.4 + 0.1 * c.seed as f64);
    let md = compare(tmp.path(), b.path()).unwrap().summary;
    assert_eq!(md.matches("Every run trained in one generation").count(), 2, "{md}");
    assert_eq!(md.matches("| run | seed |").count(), 2, "{md}");
}
