//! Non-finite updates, through the trainer's test hook
//! (`RunOptions::nonfinite_inputs_at` makes the input images of chosen
//! updates NaN, so the forward pass poisons the BN statistics and the
//! gradients as corrupt data would): a bad update is skipped (parameters,
//! LAMB state and BN buffers unchanged) and counted in the metrics;
//! `runtime.max_nonfinite_updates` in a row stop the run with an error naming
//! the update, and the last checkpoint stays intact and finite.

use rsb_integration_tests::run_records as records;
use rsb_integration_tests::{fashion_subset, workspace_root};
use rsb_train::trainer::{RunOptions, Trainer};
use rsb_train::TrainError;
use std::path::Path;
use tch::Device;

fn recipe(data: &Path, epochs: u32) -> rsb_recipes::Recipe {
    let sets = [
        format!("data.root={}", data.display()),
        "model.num_classes=10".into(),
        format!("schedule.cosine.epochs={epochs}"),
    ];
    rsb_recipes::load(&workspace_root().join("recipes/debug/resnet18_tiny_cpu.yaml"), &sets)
        .unwrap()
}

/// The parameter checksum after `step` updates.
fn checksum(run_dir: &Path, step: u64) -> (f64, f64) {
    let record = records(run_dir, "checksum")
        .into_iter()
        .find(|r| r["step"] == step)
        .unwrap_or_else(|| panic!("no checksum after update {step}"));
    (record["sum"].as_f64().unwrap(), record["sum_of_squares"].as_f64().unwrap())
}

/// Checks that a checkpoint verifies and holds only finite weights and buffers.
fn assert_intact_and_finite(checkpoint: &Path) {
    rsb_job::checkpoint::verify(checkpoint).unwrap();
    let tensors =
        rsb_vision::weights::read_safetensors(&checkpoint.join("model.safetensors")).unwrap();
    assert!(tensors.iter().any(|(name, _)| name.ends_with("running_mean")));
    for (name, tensor) in tensors {
        if tensor.is_floating_point() {
            assert!(tensor.isfinite().all().int64_value(&[]) == 1, "{name} is not finite");
        }
    }
}

fn group_steps(checkpoint: &Path) -> Vec<u64> {
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(checkpoint.join("state.json")).unwrap())
            .unwrap();
    state["optimizer"]["group_steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_u64().unwrap())
        .collect()
}

#[test]
fn a_non_finite_update_is_skipped_counted_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fashion_subset(tmp.path(), 16, 4);
    let out = tmp.path().join("run");
    let mut options = RunOptions::new(out.clone(), Device::Cpu);
    options.checksum_every_update = true;
    // The fourth update (0-based 3).
    options.nonfinite_inputs_at.insert(3);
    let mut trainer = Trainer::new(recipe(&data, 1), options).unwrap();
    let updates = trainer.steps_per_epoch();
    assert!(updates >= 6, "{updates} updates per epoch");
    let summary = trainer.run().unwrap();
    assert_eq!(summary.updates, updates, "the skipped update still counts as one");

    // The parameters after the skipped update are those from before it ...
    assert_eq!(checksum(&out, 4), checksum(&out, 3));
    // ... and the neighbouring updates did change them.
    assert_ne!(checksum(&out, 3), checksum(&out, 2));
    assert_ne!(checksum(&out, 5), checksum(&out, 4));

    // Counted: the log step of update 4 has no loss to show, so the next one
    // carries the skip; the epoch counts it; every loss stays finite.
    let steps = records(&out, "step");
    assert!(steps.iter().all(|r| r["step"] != 4), "a loss was logged for the skipped update");
    let carried = steps.iter().find(|r| r["step"] == 5).expect("log step of update 5");
    assert_eq!(carried["skipped_updates"], 1);
    let skipped: u64 = steps.iter().map(|r| r["skipped_updates"].as_u64().unwrap()).sum();
    assert_eq!(skipped, 1);
    assert!(steps.iter().all(|r| r["loss"].as_f64().is_some_and(f64::is_finite)));
    let epoch = &records(&out, "epoch")[0];
    assert_eq!(epoch["skipped_updates"], 1);
    assert!(epoch["loss"].as_f64().is_some_and(f64::is_finite), "{epoch}");

    // The checkpoint: intact, finite (the BN statistics the NaN batch
    // poisoned were restored), and LAMB stepped one time less.
    let checkpoint = out.join("checkpoints/epoch-0001");
    assert_intact_and_finite(&checkpoint);
    for steps in group_steps(&checkpoint) {
        assert_eq!(steps, updates - 1);
    }
}

#[test]
fn consecutive_non_finite_updates_stop_the_run_and_the_last_checkpoint_stays_clean() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fashion_subset(tmp.path(), 16, 4);
    let out = tmp.path().join("run");
    let mut options = RunOptions::new(out.clone(), Device::Cpu);
    options.checksum_every_update = true;
    let recipe = recipe(&data, 2);
    assert_eq!(recipe.runtime.max_nonfinite_updates, 3, "the default");
    let trainer = Trainer::new(recipe.clone(), options.clone()).unwrap();
    let per_epoch = trainer.steps_per_epoch();
    drop(trainer);
    // Updates 2, 3 and 4 of the second epoch (0-based), with an isolated one
    // before them that does not count towards the limit.
    options.nonfinite_inputs_at = [per_epoch, per_epoch + 2, per_epoch + 3, per_epoch + 4].into();
    let mut trainer = Trainer::new(recipe, options).unwrap();
    let err = trainer.run().unwrap_err();
    let last = per_epoch + 5; // 1-based
    assert!(
        matches!(err, TrainError::NonFiniteUpdates { epoch: 1, update, consecutive: 3, .. } if update == last),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(message.contains(&format!("update {last} (epoch 1)")), "{message}");
    assert!(message.contains("runtime.max_nonfinite_updates"), "{message}");

    // Nothing moved during the three, and no checkpoint was written after
    // them; the one before is intact and finite.
    assert_eq!(checksum(&out, last), checksum(&out, per_epoch + 2));
    let checkpoints = out.join("checkpoints");
    assert!(!checkpoints.join("epoch-0002").exists());
    assert_intact_and_finite(&checkpoints.join("epoch-0001"));
    let epochs = records(&out, "epoch");
    assert_eq!(epochs.len(), 1);
    assert_eq!(epochs[0]["skipped_updates"], 0);
}
