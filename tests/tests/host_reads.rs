//! An update reads nothing from the device on the host (on a GPU each such
//! read waits for the device): the trainer reads only at its sync points
//! (log steps, checkpoints, epoch ends), counted by `rsb_train::host_read`,
//! through which the crate's clippy configuration forces every read. Run on
//! the CPU, where the same code runs as on a GPU: fp32 with a skipped
//! (non-finite) update and fp16 with its loss scaler both read nothing
//! within an update, while a run that asks for a checksum after every
//! update shows that reads within one are seen.

use rsb_integration_tests::run_records as records;
use rsb_integration_tests::{fashion_subset, workspace_root};
use rsb_train::host_read::{self, Counts};
use rsb_train::trainer::{RunOptions, Trainer};
use std::path::Path;
use tch::Device;

fn recipe(data: &Path, precision: &str) -> rsb_recipes::Recipe {
    let sets = [
        format!("data.root={}", data.display()),
        "model.num_classes=10".into(),
        format!("runtime.precision={precision}"),
        "schedule.cosine.epochs=1".into(),
        "batch.global_size=8".into(),
        "batch.micro_size=4".into(),
        "runtime.log_every_steps=4".into(),
    ];
    rsb_recipes::load(&workspace_root().join("recipes/debug/resnet18_tiny_cpu.yaml"), &sets)
        .unwrap()
}

/// The host reads of one run on this thread, and its updates.
fn run(recipe: rsb_recipes::Recipe, options: RunOptions) -> (Counts, u64) {
    let before = host_read::counts();
    let summary = Trainer::new(recipe, options).unwrap().run().unwrap();
    let after = host_read::counts();
    let reads = Counts {
        total: after.total - before.total,
        within_updates: after.within_updates - before.within_updates,
    };
    (reads, summary.updates)
}

#[test]
fn updates_read_nothing_on_the_host_only_the_sync_points_do() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fashion_subset(tmp.path(), 8, 2);

    // fp32, one skipped update (its inputs NaN): 10 updates, sync points at
    // the log steps 4 and 8 and the epoch's end.
    let out = tmp.path().join("fp32");
    let mut options = RunOptions::new(out.clone(), Device::Cpu);
    options.nonfinite_inputs_at.insert(1);
    let (reads, updates) = run(recipe(&data, "fp32"), options.clone());
    assert_eq!(updates, 10);
    assert_eq!(reads.within_updates, 0, "{reads:?}");
    assert!(reads.total > 0, "{reads:?}");
    // The skip was made on the device, and counted when read.
    let steps = records(&out, "step");
    let logged: Vec<u64> = steps.iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(logged, [4, 8], "log steps");
    assert_eq!(steps[0]["skipped_updates"], 1);
    assert_eq!(records(&out, "epoch")[0]["skipped_updates"], 1);

    // fp16: the loss scaler's check, unscaling and update stay on the device.
    let mut fp16 = RunOptions::new(tmp.path().join("fp16"), Device::Cpu);
    fp16.max_updates = Some(4);
    let (reads, updates) = run(recipe(&data, "fp16"), fp16);
    assert_eq!(updates, 4);
    assert_eq!(reads.within_updates, 0, "{reads:?}");

    // The count sees reads within an update: a checksum after every update
    // reads the parameters there.
    options.out_dir = tmp.path().join("checksums");
    options.checksum_every_update = true;
    let (reads, _) = run(recipe(&data, "fp32"), options);
    assert!(reads.within_updates >= 10, "{reads:?}");
}
