//! Our cosine-with-warmup schedule against timm's `CosineLRScheduler`, built
//! by `create_scheduler_v2` and driven as train.py drives it, in both modes:
//! `step_on: epoch` (`t_in_epochs=True`, timm v0.5.x: one LR per epoch) and
//! `step_on: update` (`t_in_epochs=False`). Every update of six runs per mode
//! is compared (whole and fractional warmup, none, cooldown, `warmup_lr` 0,
//! `min_lr` 0 and near the peak). Tolerance: 1e-12 relative (both are f64
//! formulas; timm's first LR comes from the constructor, not the formula).

use rsb_integration_tests::{fixtures, read_json};
use rsb_recipes::schema::{CosineSchedule, StepOn};
use rsb_train::schedule::CosineWithWarmup;

fn step_on(name: &str) -> StepOn {
    match name {
        "epoch" => StepOn::Epoch,
        "update" => StepOn::Update,
        other => panic!("fixture step_on `{other}` is neither `epoch` nor `update`"),
    }
}

#[test]
fn learning_rates_match_timm_for_every_update_in_both_modes() {
    let cases = read_json(&fixtures("schedule").join("cases.json"));
    let cases = cases.as_array().unwrap();
    let mut cases_per_mode = [0usize; 2];
    for case in cases {
        let mode = step_on(case["step_on"].as_str().expect("step_on"));
        cases_per_mode[mode as usize] += 1;
        let config = CosineSchedule {
            epochs: case["epochs"].as_u64().unwrap() as u32,
            warmup_epochs: case["warmup_epochs"].as_f64().unwrap(),
            warmup_lr: case["warmup_lr"].as_f64().unwrap(),
            min_lr: case["min_lr"].as_f64().unwrap(),
            cooldown_epochs: case["cooldown_epochs"].as_u64().unwrap() as u32,
            step_on: mode,
        };
        let upe = case["updates_per_epoch"].as_u64().unwrap();
        let schedule = CosineWithWarmup::new(&config, case["lr"].as_f64().unwrap(), upe);
        let lrs = case["lrs"].as_array().unwrap();
        assert_eq!(schedule.total_updates, lrs.len() as u64, "{config:?}: run length");
        for (t, want) in lrs.iter().enumerate() {
            let want = want.as_f64().unwrap();
            let got = schedule.lr(t as u64);
            assert!(
                (got - want).abs() <= 1e-12 * want.abs().max(1e-12),
                "{config:?}, update {t}: {got} vs timm {want}"
            );
        }
    }
    assert!(
        cases_per_mode.iter().all(|&n| n >= 4),
        "the fixture must cover both modes with several configs, got {cases_per_mode:?} \
         (epoch, update); regenerate it with tests/oracle/gen_fixtures.py"
    );
}
