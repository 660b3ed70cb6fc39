//! fp16 training with the dynamic loss scaler (`runtime.precision: fp16`),
//! end to end on the CPU, with ViT-Tiny in the tiny recipe (libtorch's CPU
//! fp16 kernels are slow, its convolutions most: see [`FP16_TEST_MODEL`]):
//! it trains with losses close to, but not equal to, its fp32 run; the
//! scaler's state is in the checkpoint with torch's `state_dict()` keys and a
//! resume continues from it; updates whose gradients overflow are skipped and
//! back the scale off without tripping `runtime.max_nonfinite_updates` while
//! the scale is above 1, and a run fed only bad data still stops once the
//! scale has reached 1 (see `rsb_train::trainer`).

use rsb_integration_tests::run_records as records;
use rsb_integration_tests::{fashion_subset, workspace_root};
use rsb_train::trainer::{RecipeCheck, RunOptions, Trainer};
use rsb_train::TrainError;
use std::path::Path;
use std::sync::Mutex;
use tch::Device;

/// The model of these tests. On an AMD EPYC with AVX2 only, `worker train`
/// of one epoch of these recipes (80 images of 32 px, updates of 8) took
/// 41 s in fp16 with ResNet-18 (4.6 s in f32, and 44 s at 16 px: the late
/// layers' weights, not the pixels, set the cost), 22 s with
/// EfficientNet-B0 and 7.5 s with ViT-Tiny (4 tokens). The loss scaler does
/// not depend on the model.
const FP16_TEST_MODEL: &str = "vit_tiny_patch16_224";

fn recipe(data: &Path, precision: &str, epochs: u32, extra: &[&str]) -> rsb_recipes::Recipe {
    let mut sets = vec![
        format!("data.root={}", data.display()),
        "model.num_classes=10".into(),
        format!("runtime.precision={precision}"),
        format!("schedule.cosine.epochs={epochs}"),
        format!("model.name={FP16_TEST_MODEL}"),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    rsb_recipes::load(&workspace_root().join("recipes/debug/resnet18_tiny_cpu.yaml"), &sets)
        .unwrap()
}

fn losses(run: &Path) -> Vec<(u64, f64)> {
    records(run, "step")
        .iter()
        .map(|r| (r["step"].as_u64().unwrap(), r["loss"].as_f64().unwrap()))
        .collect()
}

fn skipped(run: &Path) -> u64 {
    records(run, "step").iter().map(|r| r["skipped_updates"].as_u64().unwrap()).sum()
}

fn scaler_state(checkpoint: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(checkpoint.join("state.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&text).unwrap();
    state["scaler"].clone()
}

/// libtorch's generator is global to the process, and the trainer reseeds
/// it before every micro-batch: two runs at once in this binary's test
/// threads would draw each other's drop-path masks.
static ONE_RUN_AT_A_TIME: Mutex<()> = Mutex::new(());

#[test]
fn overflows_back_the_scale_off_without_stopping_the_run_and_a_resume_keeps_the_scale() {
    let _one = ONE_RUN_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    // fp16 runs at a few images/s on a CPU: few images, small updates.
    let data = fashion_subset(tmp.path(), 8, 2);
    let small: &[&str] = &["batch.global_size=8", "batch.micro_size=4"];
    // Four bad updates in a row (0-based 2..=5): an fp32 run stops at the
    // third (the default limit), an fp16 run backs off four times and goes on.
    let mut options = RunOptions::new(tmp.path().join("fp32"), Device::Cpu);
    options.nonfinite_inputs_at = [2, 3, 4, 5].into();
    let fp32_recipe = recipe(&data, "fp32", 1, small);
    assert_eq!(fp32_recipe.runtime.max_nonfinite_updates, 3);
    let err = Trainer::new(fp32_recipe, options.clone()).unwrap().run().unwrap_err();
    assert!(
        matches!(err, TrainError::NonFiniteUpdates { update: 5, consecutive: 3, .. }),
        "{err:?}"
    );
    let out = tmp.path().join("fp16");
    options.out_dir = out.clone();
    let summary = Trainer::new(recipe(&data, "fp16", 1, small), options).unwrap().run().unwrap();
    let updates = summary.updates;
    assert!(updates >= 7, "{updates} updates");
    let skips = skipped(&out);
    assert!(skips >= 4, "{skips} skipped");

    // Before the bad updates the two runs trained the same weights up to
    // fp16 rounding (and the scaler may have skipped an overflowing first
    // update, as torch's does): close losses, yet not the same bits.
    let (a, b) = (losses(&tmp.path().join("fp32")), losses(&out));
    assert_eq!(b.len() as u64 + skips, updates, "{b:?}");
    let common: Vec<(f64, f64)> = b
        .iter()
        .filter(|(step, _)| *step <= 2)
        .filter_map(|(step, y)| a.iter().find(|(s, _)| s == step).map(|(_, x)| (*x, *y)))
        .collect();
    assert!(!common.is_empty(), "fp32 {a:?}, fp16 {b:?}");
    for (x, y) in &common {
        assert!((x - y).abs() <= 1e-2 * x.abs(), "fp32 {x}, fp16 {y}");
    }
    assert!(
        common.iter().any(|(x, y)| x != y),
        "fp16 gave fp32's losses bit for bit: did it run in fp16?"
    );
    assert!(b.iter().all(|(_, l)| l.is_finite()));

    // torch's state_dict keys; the scale backed off once per skip (the
    // growth interval of 2000 is far away), and the tracker counts the
    // applied updates since the last skip.
    let first = scaler_state(&out.join("checkpoints/epoch-0001"));
    let scale = first["scale"].as_f64().unwrap();
    assert_eq!(scale, 65536.0 * 0.5f64.powi(skips as i32), "{first}");
    assert_eq!(first["growth_factor"], 2.0);
    assert_eq!(first["backoff_factor"], 0.5);
    assert_eq!(first["growth_interval"], 2000);
    let tracker = first["_growth_tracker"].as_u64().unwrap();
    assert!(tracker <= updates - 6, "{first}");
    // The fp32 run keeps no scaler (its checkpoint was never written; a
    // state without one reads as None, see rsb_train::checkpoint).

    // A resume (one more epoch) starts at the saved scale, not at 65536.
    let mut resumed = RunOptions::new(out.clone(), Device::Cpu);
    resumed.resume = Some(out.clone());
    resumed.recipe_check = RecipeCheck::ExplainedBy(vec!["schedule.cosine.epochs=2".into()]);
    Trainer::new(recipe(&data, "fp16", 2, small), resumed).unwrap().run().unwrap();
    let second = scaler_state(&out.join("checkpoints/epoch-0002"));
    let skips_after = skipped(&out) - skips;
    assert_eq!(
        second["scale"].as_f64().unwrap(),
        scale * 0.5f64.powi(skips_after as i32),
        "{first} then {second}"
    );
    if skips_after == 0 {
        assert_eq!(second["_growth_tracker"].as_u64().unwrap(), tracker + updates, "{second}");
    }
}

#[test]
fn bad_data_still_stops_an_fp16_run_once_the_scale_is_down_to_one() {
    let _one = ONE_RUN_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    // Small updates, so that one epoch has the 19 needed (an epoch with none
    // applied ends the run as diverged, so the stop must come within it).
    let data = fashion_subset(tmp.path(), 16, 4);
    let small = ["batch.global_size=4", "batch.micro_size=2"];
    let recipe = recipe(&data, "fp16", 1, &small);
    let mut options = RunOptions::new(tmp.path().join("run"), Device::Cpu);
    let per_epoch = Trainer::new(recipe.clone(), options.clone()).unwrap().steps_per_epoch();
    // Every update bad from the first: 16 backoffs bring 65536 to 1, then
    // the limit's 3 updates at a scale of at most 1 stop the run at the 19th.
    assert!(per_epoch >= 19, "{per_epoch} updates per epoch");
    options.nonfinite_inputs_at = (0..per_epoch).collect();
    let err = Trainer::new(recipe, options).unwrap().run().unwrap_err();
    assert!(
        matches!(err, TrainError::NonFiniteUpdates { update: 19, consecutive: 3, .. }),
        "{err:?}"
    );
}
