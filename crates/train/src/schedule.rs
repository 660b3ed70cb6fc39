//! timm's `CosineLRScheduler` with linear warmup, stepped per optimizer update
//! (`t_in_epochs=False`, cycle_limit 1, k_decay 1, `warmup_prefix=False`):
//!
//! ```text
//! t <  warmup_t:      lr = warmup_lr + t * (base_lr - warmup_lr) / warmup_t
//! warmup_t <= t < T:  lr = min_lr + 0.5 * (base_lr - min_lr) * (1 + cos(pi * t / T))
//! t >= T:             lr = min_lr            (cooldown)
//! ```
//! with `T = epochs * updates_per_epoch` and `warmup_t = warmup_epochs *
//! updates_per_epoch`. The schedule is a pure function of the update index, so
//! its only state is that index, which the checkpoint carries.

use rsb_recipes::schema::CosineSchedule;

/// A cosine schedule resolved to optimizer updates.
#[derive(Debug, Clone, PartialEq)]
pub struct CosineWithWarmup {
    /// Peak learning rate.
    pub base_lr: f64,
    /// Learning rate of update 0.
    pub warmup_lr: f64,
    /// Floor.
    pub min_lr: f64,
    /// Warmup length in updates (may be fractional).
    pub warmup_t: f64,
    /// Cosine length in updates.
    pub t_initial: f64,
    /// Updates of the whole run, cooldown included.
    pub total_updates: u64,
}

impl CosineWithWarmup {
    /// Resolves a recipe's schedule for `updates_per_epoch` updates per epoch.
    pub fn new(config: &CosineSchedule, base_lr: f64, updates_per_epoch: u64) -> CosineWithWarmup {
        let upe = updates_per_epoch as f64;
        CosineWithWarmup {
            base_lr,
            warmup_lr: config.warmup_lr,
            min_lr: config.min_lr,
            warmup_t: config.warmup_epochs * upe,
            t_initial: f64::from(config.epochs) * upe,
            total_updates: u64::from(config.epochs + config.cooldown_epochs) * updates_per_epoch,
        }
    }

    /// The learning rate of update `t` (0-based).
    pub fn lr(&self, t: u64) -> f64 {
        let t = t as f64;
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

    fn schedule() -> CosineWithWarmup {
        let config = CosineSchedule {
            epochs: 10,
            warmup_epochs: 2.0,
            warmup_lr: 1e-4,
            min_lr: 1e-6,
            cooldown_epochs: 1,
        };
        CosineWithWarmup::new(&config, 5e-3, 100)
    }

    #[test]
    fn warmup_is_linear_from_warmup_lr() {
        let s = schedule();
        assert_eq!(s.lr(0), 1e-4);
        assert!((s.lr(100) - (1e-4 + 0.5 * (5e-3 - 1e-4))).abs() < 1e-15);
        assert_eq!(s.total_updates, 1100);
    }

    #[test]
    fn cosine_is_not_shifted_by_warmup_and_ends_at_min() {
        let s = schedule();
        let expected =
            1e-6 + 0.5 * (5e-3 - 1e-6) * (1.0 + (std::f64::consts::PI * 200.0 / 1000.0).cos());
        assert!((s.lr(200) - expected).abs() < 1e-15);
        assert_eq!(s.lr(1000), 1e-6);
        assert_eq!(s.lr(1099), 1e-6);
        assert!(s.lr(500) < s.lr(300));
    }
}
