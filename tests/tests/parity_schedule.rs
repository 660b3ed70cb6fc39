//! Our cosine-with-warmup schedule against timm's `CosineLRScheduler`
//! (`t_in_epochs=False`, stepped per update) for every update of three runs,
//! cooldown included. Tolerance: 1e-12 relative (both are f64 formulas).

use rsb_integration_tests::{fixtures, read_json};
use rsb_recipes::schema::CosineSchedule;
use rsb_train::schedule::CosineWithWarmup;

#[test]
fn learning_rates_match_timm_for_every_update() {
    let cases = read_json(&fixtures("schedule").join("cases.json"));
    for case in cases.as_array().unwrap() {
        let config = CosineSchedule {
            epochs: case["epochs"].as_u64().unwrap() as u32,
            warmup_epochs: case["warmup_epochs"].as_f64().unwrap(),
            warmup_lr: case["warmup_lr"].as_f64().unwrap(),
            min_lr: case["min_lr"].as_f64().unwrap(),
            cooldown_epochs: case["cooldown_epochs"].as_u64().unwrap() as u32,
        };
        let upe = case["updates_per_epoch"].as_u64().unwrap();
        let schedule = CosineWithWarmup::new(&config, case["lr"].as_f64().unwrap(), upe);
        let lrs = case["lrs"].as_array().unwrap();
        assert_eq!(schedule.total_updates, lrs.len() as u64);
        for (t, want) in lrs.iter().enumerate() {
            let want = want.as_f64().unwrap();
            let got = schedule.lr(t as u64);
            assert!(
                (got - want).abs() <= 1e-12 * want.abs().max(1e-12),
                "update {t}: {got} vs timm {want}"
            );
        }
    }
}
