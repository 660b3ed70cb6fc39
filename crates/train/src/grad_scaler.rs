//! Dynamic loss scaling for fp16 training (`runtime.precision: fp16`, the
//! paper's AMP): `torch.amp.GradScaler`'s rule, as timm's `NativeScaler`
//! drives it, with its defaults (initial scale 65536, growth factor 2,
//! backoff factor 0.5, growth interval 2000).
//!
//! Each update the loss is multiplied by the scale before the backward
//! passes, so that small fp16 gradients do not flush to zero; the summed
//! (all-reduced) gradients are then checked and unscaled
//! ([`GradScaler::unscale`]): any non-finite element of the *scaled*
//! gradients (torch's `_amp_foreach_non_finite_check_and_unscale_` checks
//! before it multiplies) means the update is skipped, and every gradient is
//! multiplied by the reciprocal of the scale (computed in f64 and rounded to
//! f32, as torch's `_scale.double().reciprocal().float()`), so LAMB's
//! gradient norm, clipping and trust ratio see the true gradients. Then
//! [`GradScaler::update`] is `torch._amp_update_scale_`: a skipped update
//! halves the scale and resets the growth tracker; `growth_interval` applied
//! updates in a row double it (unless that would overflow f32).
//!
//! The state is host-side (the scale is an f32, as torch's scale tensor):
//! the decision needs one host read per update, which the trainer makes
//! anyway for LAMB's non-finite check. It is device-independent: the same
//! code scales f32 gradients on a CPU and fp16-produced ones on a GPU.
//! [`ScalerState`] is torch's `GradScaler.state_dict()` with its key names,
//! stored in checkpoints.

use crate::error::TrainError;
use tch::{Kind, Tensor};

/// torch's `GradScaler` defaults.
pub const INIT_SCALE: f32 = 65536.0;
/// Factor of the scale after `growth_interval` applied updates in a row.
pub const GROWTH_FACTOR: f64 = 2.0;
/// Factor of the scale after a skipped update.
pub const BACKOFF_FACTOR: f64 = 0.5;
/// Applied updates in a row before the scale grows.
pub const GROWTH_INTERVAL: u32 = 2000;

/// The scaler's state, as torch's `GradScaler.state_dict()` (the same keys:
/// `scale`, `growth_factor`, `backoff_factor`, `growth_interval`,
/// `_growth_tracker`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ScalerState {
    /// The current scale (an f32 value).
    pub scale: f64,
    /// Factor of a growth.
    pub growth_factor: f64,
    /// Factor of a backoff.
    pub backoff_factor: f64,
    /// Applied updates in a row before a growth.
    pub growth_interval: u64,
    /// Applied updates in a row since the last growth or backoff.
    #[serde(rename = "_growth_tracker")]
    pub growth_tracker: u64,
}

/// What [`GradScaler::update`] did to the scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleChange {
    /// Unchanged (one more applied update towards a growth).
    Kept,
    /// Multiplied by the growth factor.
    Grown,
    /// Multiplied by the backoff factor (the update was skipped).
    BackedOff,
}

/// torch's dynamic loss scaler.
#[derive(Debug, Clone, PartialEq)]
pub struct GradScaler {
    scale: f32,
    growth_factor: f64,
    backoff_factor: f64,
    growth_interval: u32,
    growth_tracker: u32,
}

impl Default for GradScaler {
    fn default() -> Self {
        GradScaler::new(INIT_SCALE, GROWTH_FACTOR, BACKOFF_FACTOR, GROWTH_INTERVAL)
    }
}

impl GradScaler {
    /// A scaler with these parameters (torch's `GradScaler(init_scale,
    /// growth_factor, backoff_factor, growth_interval)`).
    pub fn new(
        init_scale: f32,
        growth_factor: f64,
        backoff_factor: f64,
        growth_interval: u32,
    ) -> GradScaler {
        GradScaler {
            scale: init_scale,
            growth_factor,
            backoff_factor,
            growth_interval: growth_interval.max(1),
            growth_tracker: 0,
        }
    }

    /// The current scale.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// Applied updates in a row since the last growth or backoff.
    pub fn growth_tracker(&self) -> u32 {
        self.growth_tracker
    }

    /// `loss` times the scale (torch's `scaler.scale(loss)`: an f32 product).
    pub fn scale_loss(&self, loss: &Tensor) -> Result<Tensor, TrainError> {
        Ok(loss.f_mul_scalar(f64::from(self.scale))?)
    }

    /// The factor that unscales: `1 / scale` computed in f64, rounded to f32.
    pub fn inv_scale(&self) -> f32 {
        (1.0 / f64::from(self.scale)) as f32
    }

    /// Checks the scaled gradients and unscales them in place: returns
    /// whether any element was NaN or infinite before unscaling (the update
    /// must then be skipped). Undefined gradients are left alone.
    pub fn unscale(&self, grads: &[Tensor]) -> Result<bool, TrainError> {
        let _guard = tch::no_grad_guard();
        let inv_scale = self.inv_scale();
        let mut all_finite: Option<Tensor> = None;
        for grad in grads.iter().filter(|g| g.defined()) {
            let finite = grad.f_isfinite()?.f_all()?;
            all_finite = Some(match all_finite {
                None => finite,
                Some(so_far) => so_far.f_logical_and(&finite)?,
            });
            // torch leaves the values as they are when the factor is 1.
            if inv_scale != 1.0 {
                let _ = grad.shallow_clone().f_mul_scalar_(f64::from(inv_scale))?;
            }
        }
        match all_finite {
            Some(finite) => Ok(finite.f_to_kind(Kind::Int64)?.f_int64_value(&[])? == 0),
            None => Ok(false),
        }
    }

    /// torch's `_amp_update_scale_` after an update whose scaled gradients
    /// were (`found_inf`) or were not all finite.
    pub fn update(&mut self, found_inf: bool) -> ScaleChange {
        if found_inf {
            self.scale = (f64::from(self.scale) * self.backoff_factor) as f32;
            self.growth_tracker = 0;
            return ScaleChange::BackedOff;
        }
        let successful = self.growth_tracker + 1;
        if successful == self.growth_interval {
            self.growth_tracker = 0;
            let grown = (f64::from(self.scale) * self.growth_factor) as f32;
            // torch does not grow the scale past f32's range.
            if grown.is_finite() {
                self.scale = grown;
                return ScaleChange::Grown;
            }
            ScaleChange::Kept
        } else {
            self.growth_tracker = successful;
            ScaleChange::Kept
        }
    }

    /// torch's `state_dict()`.
    pub fn state(&self) -> ScalerState {
        ScalerState {
            scale: f64::from(self.scale),
            growth_factor: self.growth_factor,
            backoff_factor: self.backoff_factor,
            growth_interval: u64::from(self.growth_interval),
            growth_tracker: u64::from(self.growth_tracker),
        }
    }

    /// The scaler of a saved state (torch's `load_state_dict`).
    pub fn from_state(state: &ScalerState) -> Result<GradScaler, String> {
        let scale = state.scale as f32;
        if !(scale.is_finite() && scale >= 0.0 && f64::from(scale) == state.scale) {
            return Err(format!("scale {} is not a finite, non-negative f32", state.scale));
        }
        let interval = u32::try_from(state.growth_interval)
            .ok()
            .filter(|i| *i > 0)
            .ok_or_else(|| format!("growth_interval {} is out of range", state.growth_interval))?;
        let tracker = u32::try_from(state.growth_tracker)
            .ok()
            .filter(|t| *t < interval)
            .ok_or_else(|| format!("_growth_tracker {} is out of range", state.growth_tracker))?;
        Ok(GradScaler {
            scale,
            growth_factor: state.growth_factor,
            backoff_factor: state.backoff_factor,
            growth_interval: interval,
            growth_tracker: tracker,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn defaults_are_torchs() {
        let s = GradScaler::default().state();
        assert_eq!(
            s,
            ScalerState {
                scale: 65536.0,
                growth_factor: 2.0,
                backoff_factor: 0.5,
                growth_interval: 2000,
                growth_tracker: 0
            }
        );
        let json = serde_json::to_value(s).unwrap();
        let mut keys: Vec<&String> = json.as_object().unwrap().keys().collect();
        keys.sort();
        assert_eq!(
            keys,
            ["_growth_tracker", "backoff_factor", "growth_factor", "growth_interval", "scale"]
        );
    }

    #[test]
    fn backoff_growth_and_the_f32_ceiling() {
        let mut s = GradScaler::new(4.0, 2.0, 0.5, 3);
        assert_eq!(s.update(false), ScaleChange::Kept);
        assert_eq!(s.update(false), ScaleChange::Kept);
        assert_eq!((s.update(false), s.scale(), s.growth_tracker()), (ScaleChange::Grown, 8.0, 0));
        s.update(false);
        assert_eq!(
            (s.update(true), s.scale(), s.growth_tracker()),
            (ScaleChange::BackedOff, 4.0, 0)
        );
        let mut top = GradScaler::new(f32::MAX / 1.5, 2.0, 0.5, 1);
        assert_eq!(top.update(false), ScaleChange::Kept);
        assert_eq!(top.scale(), f32::MAX / 1.5);
    }

    #[test]
    fn unscale_checks_before_it_multiplies() {
        let s = GradScaler::new(1024.0, 2.0, 0.5, 2000);
        let a = Tensor::from_slice(&[1024.0f32, -2048.0]);
        let b = Tensor::from_slice(&[512.0f32]);
        assert!(!s.unscale(&[a.shallow_clone(), b.shallow_clone(), Tensor::new()]).unwrap());
        assert_eq!(Vec::<f32>::try_from(&a).unwrap(), [1.0, -2.0]);
        assert_eq!(Vec::<f32>::try_from(&b).unwrap(), [0.5]);
        let c = Tensor::from_slice(&[f32::INFINITY, 4.0]).to_device(Device::Cpu);
        assert!(s.unscale(&[b, c]).unwrap());
        assert!(s.unscale(&[Tensor::from_slice(&[f32::NAN])]).unwrap());
    }

    #[test]
    fn a_state_round_trips_and_bad_ones_are_refused() {
        let mut s = GradScaler::new(128.0, 2.0, 0.5, 5);
        s.update(false);
        s.update(false);
        let back = GradScaler::from_state(&s.state()).unwrap();
        assert_eq!(back, s);
        let bad = ScalerState { growth_tracker: 5, ..s.state() };
        assert!(GradScaler::from_state(&bad).unwrap_err().contains("_growth_tracker"));
        let bad = ScalerState { scale: f64::INFINITY, ..s.state() };
        assert!(GradScaler::from_state(&bad).is_err());
    }
}
