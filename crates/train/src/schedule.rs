//! timm's `CosineLRScheduler` with linear warmup (cycle_limit 1, k_decay 1,
//! `warmup_prefix=False`, no noise), stepped per epoch or per optimizer update
//! as the recipe's `schedule.cosine.step_on` says:
//!
//! ```text
//! t <  warmup_t:      lr = warmup_lr + t * (base_lr - warmup_lr) / warmup_t
//! warmup_t <= t < T:  lr = min_lr + 0.5 * (base_lr - min_lr) * (1 + cos(pi * t / T))
//! t >= T:             lr = min_lr            (cooldown)
//! ```
//!
//! * `step_on: epoch` is timm v0.5.x, the RSB-era code (`t_in_epochs=True`):
//!   t is the epoch index, `warmup_t = warmup_epochs`, `T = epochs`. train.py
//!   calls `step(epoch)` at each epoch boundary and `step_update` is a no-op,
//!   so every update of epoch e uses lr(e), warmup included (epoch 0 runs
//!   entirely at `warmup_lr`).
//! * `step_on: update` is timm's `--sched-on-updates` (`t_in_epochs=False`):
//!   t is the optimizer update index, and `create_scheduler_v2` scales the
//!   lengths by the updates per epoch U: `warmup_t = warmup_epochs * U`,
//!   `T = epochs * U`. train.py calls `step_update(n)` after update n - 1.
//!
//! In both modes the cooldown (`cooldown_epochs` more epochs at `min_lr`) only
//! lengthens the run. The schedule is a pure function of the update index, so
//! its only state is that index, which the checkpoint carries.

use rsb_recipes::schema::{CosineSchedule, StepOn};

/// A cosine schedule resolved to optimizer updates.
#[derive(Debug, Clone, PartialEq)]
pub struct CosineWithWarmup {
    /// Peak learning rate.
    pub base_lr: f64,
    /// Learning rate of update 0.
    pub warmup_lr: f64,
    /// Floor.
    pub min_lr: f64,
    /// Per epoch or per update: the unit of `warmup_t` and `t_initial`.
    pub step_on: StepOn,
    /// Warmup length in steps of `step_on` (may be fractional).
    pub warmup_t: f64,
    /// Cosine length in steps of `step_on`.
    pub t_initial: f64,
    /// Optimizer updates per epoch.
    pub updates_per_epoch: u64,
    /// Updates of the whole run, cooldown included.
    pub total_updates: u64,
}

impl CosineWithWarmup {
    /// Resolves a recipe's schedule for `updates_per_epoch` updates per epoch.
    pub fn new(config: &CosineSchedule, base_lr: f64, updates_per_epoch: u64) -> CosineWithWarmup {
        let steps_per_epoch = match config.step_on {
            StepOn::Epoch => 1.0,
            StepOn::Update => updates_per_epoch as f64,
        };
        CosineWithWarmup {
            base_lr,
            warmup_lr: config.warmup_lr,
            min_lr: config.min_lr,
            step_on: config.step_on,
            warmup_t: config.warmup_epochs * steps_per_epoch,
            t_initial: f64::from(config.epochs) * steps_per_epoch,
            updates_per_epoch,
            total_updates: (u64::from(config.epochs) + u64::from(config.cooldown_epochs))
                * updates_per_epoch,
        }
    }

    /// The learning rate of optimizer update `update` (0-based): timm's LR at
    /// step `update` in `update` mode, at epoch `update / updates_per_epoch`
    /// (rounded down) in `epoch` mode.
    pub fn lr(&self, update: u64) -> f64 {
        let t = match self.step_on {
            StepOn::Update => update,
            // No updates per epoch means no updates at all; any t will do.
            StepOn::Epoch => update.checked_div(self.updates_per_epoch).unwrap_or(0),
        };
        self.lr_at_step(t as f64)
    }

    /// timm's `CosineLRScheduler._get_lr(t)`, in the same operation order.
    fn lr_at_step(&self, t: f64) -> f64 {
        if t < self.warmup_t {
            let slope = (self.base_lr - self.warmup_lr) / self.warmup_t;
            return self.warmup_lr + t * slope;
        }
        if t >= self.t_initial {
            return self.min_lr;
        }
        self.min_lr
            + 0.5
                * (self.base_lr - self.min_lr)
                * (1.0 + (std::f64::consts::PI * t / self.t_initial).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE_LR: f64 = 5e-3;
    const WARMUP_LR: f64 = 1e-4;
    const MIN_LR: f64 = 1e-6;

    fn schedule(step_on: StepOn, warmup_epochs: f64) -> CosineWithWarmup {
        let config = CosineSchedule {
            epochs: 10,
            warmup_epochs,
            warmup_lr: WARMUP_LR,
            min_lr: MIN_LR,
            cooldown_epochs: 1,
            step_on,
        };
        CosineWithWarmup::new(&config, BASE_LR, 100)
    }

    /// The cosine part of the formula at `t` of `t_initial`, written out.
    fn cosine(t: f64, t_initial: f64) -> f64 {
        MIN_LR + 0.5 * (BASE_LR - MIN_LR) * (1.0 + (std::f64::consts::PI * t / t_initial).cos())
    }

    fn close(got: f64, want: f64) -> bool {
        (got - want).abs() <= 1e-15
    }

    #[test]
    fn update_mode_warms_up_linearly_over_updates() {
        let s = schedule(StepOn::Update, 2.0);
        assert_eq!(s.total_updates, 1100);
        assert_eq!(s.lr(0), WARMUP_LR);
        assert!(close(s.lr(1), WARMUP_LR + (BASE_LR - WARMUP_LR) / 200.0));
        assert!(close(s.lr(100), WARMUP_LR + 0.5 * (BASE_LR - WARMUP_LR)));
        assert!(s.lr(99) < s.lr(100), "the LR changes within an epoch");
    }

    #[test]
    fn update_mode_cosine_is_not_shifted_by_warmup_and_ends_at_min() {
        let s = schedule(StepOn::Update, 2.0);
        assert!(close(s.lr(200), cosine(200.0, 1000.0)));
        assert!(close(s.lr(517), cosine(517.0, 1000.0)));
        assert_eq!(s.lr(1000), MIN_LR);
        assert_eq!(s.lr(1099), MIN_LR);
    }

    #[test]
    fn epoch_mode_holds_each_epochs_lr_for_all_its_updates() {
        let s = schedule(StepOn::Epoch, 2.0);
        assert_eq!(s.total_updates, 1100);
        for update in 0..100 {
            assert_eq!(s.lr(update), WARMUP_LR, "update {update}: epoch 0 is all warmup_lr");
        }
        let epoch1 = WARMUP_LR + 0.5 * (BASE_LR - WARMUP_LR);
        assert!(close(s.lr(100), epoch1));
        assert_eq!(s.lr(199), s.lr(100));
        assert!(close(s.lr(200), cosine(2.0, 10.0)));
        assert!(close(s.lr(599), cosine(5.0, 10.0)));
        assert!(close(s.lr(999), cosine(9.0, 10.0)));
        assert_eq!(s.lr(1000), MIN_LR);
        assert_eq!(s.lr(1099), MIN_LR);
    }

    #[test]
    fn epoch_mode_with_fractional_warmup_uses_the_epoch_index() {
        // timm: warmup_t = 1.5 epochs, so epochs 0 and 1 warm up, epoch 2 is cosine.
        let s = schedule(StepOn::Epoch, 1.5);
        assert_eq!(s.lr(50), WARMUP_LR);
        assert!(close(s.lr(150), WARMUP_LR + (BASE_LR - WARMUP_LR) / 1.5));
        assert!(close(s.lr(250), cosine(2.0, 10.0)));
    }

    #[test]
    fn modes_differ_inside_an_epoch_and_agree_at_its_start_after_warmup() {
        let by_epoch = schedule(StepOn::Epoch, 2.0);
        let by_update = schedule(StepOn::Update, 2.0);
        assert!(close(by_epoch.lr(300), by_update.lr(300)));
        assert!(by_epoch.lr(350) > by_update.lr(350));
    }

    #[test]
    fn epoch_mode_without_updates_does_not_divide_by_zero() {
        let config = CosineSchedule {
            epochs: 3,
            warmup_epochs: 1.0,
            warmup_lr: WARMUP_LR,
            min_lr: MIN_LR,
            cooldown_epochs: 0,
            step_on: StepOn::Epoch,
        };
        let s = CosineWithWarmup::new(&config, BASE_LR, 0);
        assert_eq!(s.total_updates, 0);
        assert_eq!(s.lr(0), WARMUP_LR);
    }
}
