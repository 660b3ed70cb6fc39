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
//! The state lives on the training device, as torch's `_scale` (an f32)
//! and `_growth_tracker` (an i32), and the check, the unscaling and the
//! update are torch's own kernels (`_amp_foreach_non_finite_check_and_unscale_`
//! and `_amp_update_scale_`): the decision never goes through the host, so
//! an update on a GPU does not wait for it. The same code runs on a CPU and
//! on a GPU. [`ScalerState`] is torch's `GradScaler.state_dict()` with its
//! key names, stored in checkpoints (reading it is a host read).

use crate::error::TrainError;
use crate::host_read;
use tch::{Device, Kind, Tensor};

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

/// torch's dynamic loss scaler.
#[derive(Debug)]
pub struct GradScaler {
    /// torch's `_scale`: a 0-d f32 tensor on the training device.
    scale: Tensor,
    /// torch's `_growth_tracker`: a 0-d i32 tensor on the training device.
    growth_tracker: Tensor,
    growth_factor: f64,
    backoff_factor: f64,
    growth_interval: u32,
}

impl GradScaler {
    /// A scaler with these parameters (torch's `GradScaler(init_scale,
    /// growth_factor, backoff_factor, growth_interval)`), its state on `device`.
    pub fn new(
        init_scale: f32,
        growth_factor: f64,
        backoff_factor: f64,
        growth_interval: u32,
        device: Device,
    ) -> Result<GradScaler, TrainError> {
        Ok(GradScaler {
            scale: Tensor::f_full([], f64::from(init_scale), (Kind::Float, device))?,
            growth_tracker: Tensor::f_zeros([], (Kind::Int, device))?,
            growth_factor,
            backoff_factor,
            growth_interval: growth_interval.max(1),
        })
    }

    /// A scaler with torch's defaults, on `device`.
    pub fn with_defaults(device: Device) -> Result<GradScaler, TrainError> {
        GradScaler::new(INIT_SCALE, GROWTH_FACTOR, BACKOFF_FACTOR, GROWTH_INTERVAL, device)
    }

    /// The current scale, as a 0-d f64 tensor on the device: a snapshot (a
    /// later update leaves it as it is), in the type of an update's record.
    pub fn scale_f64(&self) -> Result<Tensor, TrainError> {
        Ok(self.scale.f_to_kind(Kind::Double)?)
    }

    /// `loss` times the scale (torch's `scaler.scale(loss)`: an f32 product).
    pub fn scale_loss(&self, loss: &Tensor) -> Result<Tensor, TrainError> {
        Ok(loss.f_mul(&self.scale)?)
    }

    /// Checks the scaled gradients and unscales them in place, as torch's
    /// `unscale_`: returns `found_inf`, a 0-d f32 tensor on the device, 1
    /// when any element was NaN or infinite before unscaling (the update
    /// must then be skipped), else 0. The factor is `1 / scale` computed in
    /// f64 and rounded to f32 (`_scale.double().reciprocal().float()`).
    /// Undefined gradients are left alone. All gradients go to torch's
    /// fused kernel in one call, as `GradScaler.unscale_` hands them over.
    pub fn unscale(&self, grads: &[Tensor]) -> Result<Tensor, TrainError> {
        let _guard = tch::no_grad_guard();
        let mut found_inf = Tensor::f_zeros([], (Kind::Float, self.scale.device()))?;
        let inv_scale =
            self.scale.f_to_kind(Kind::Double)?.f_reciprocal()?.f_to_kind(Kind::Float)?;
        let defined: Vec<Tensor> =
            grads.iter().filter(|g| g.defined()).map(Tensor::shallow_clone).collect();
        // One fused call for all of them, as `GradScaler.unscale_`.
        rsb_torch_shim::amp::non_finite_check_and_unscale(&defined, &mut found_inf, &inv_scale)?;
        Ok(found_inf)
    }

    /// torch's `_amp_update_scale_` after an update whose scaled gradients
    /// were (`found_inf` 1) or were not (0) all finite: a skipped update
    /// multiplies the scale by the backoff factor and resets the growth
    /// tracker; `growth_interval` applied updates in a row multiply it by
    /// the growth factor (unless that would overflow f32).
    pub fn update(&mut self, found_inf: &Tensor) -> Result<(), TrainError> {
        let _guard = tch::no_grad_guard();
        let _ = self.scale.f_internal_amp_update_scale_(
            &self.growth_tracker,
            found_inf,
            self.growth_factor,
            self.backoff_factor,
            i64::from(self.growth_interval),
        )?;
        Ok(())
    }

    /// torch's `state_dict()` (a host read).
    pub fn state(&self) -> Result<ScalerState, TrainError> {
        Ok(ScalerState {
            scale: host_read::f64_of(&self.scale)?,
            growth_factor: self.growth_factor,
            backoff_factor: self.backoff_factor,
            growth_interval: u64::from(self.growth_interval),
            growth_tracker: host_read::i64_of(&self.growth_tracker)? as u64,
        })
    }

    /// The scaler of a saved state (torch's `load_state_dict`), on `device`.
    pub fn from_state(state: &ScalerState, device: Device) -> Result<GradScaler, String> {
        let scale = state.scale as f32;
        if !(scale.is_finite() && scale >= 0.0 && f64::from(scale) == state.scale) {
            return Err(format!("scale {} is not a finite, non-negative f32", state.scale));
        }
        let interval = u32::try_from(state.growth_interval)
            .ok()
            .filter(|i| *i > 0 && *i <= i32::MAX as u32)
            .ok_or_else(|| format!("growth_interval {} is out of range", state.growth_interval))?;
        let tracker = u32::try_from(state.growth_tracker)
            .ok()
            .filter(|t| *t < interval)
            .ok_or_else(|| format!("_growth_tracker {} is out of range", state.growth_tracker))?;
        let mut scaler =
            GradScaler::new(scale, state.growth_factor, state.backoff_factor, interval, device)
                .map_err(|e| e.to_string())?;
        scaler.growth_tracker = Tensor::f_full([], i64::from(tracker), (Kind::Int, device))
            .map_err(|e| e.to_string())?;
        Ok(scaler)
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    fn on_cpu(init_scale: f32, growth_interval: u32) -> GradScaler {
        GradScaler::new(init_scale, 2.0, 0.5, growth_interval, Device::Cpu).unwrap()
    }

    fn flag(found: bool) -> Tensor {
        Tensor::from(f32::from(u8::from(found)))
    }

    #[test]
    fn defaults_are_torchs() {
        let s = GradScaler::with_defaults(Device::Cpu).unwrap().state().unwrap();
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
        let mut s = on_cpu(4.0, 3);
        let at = |s: &GradScaler| {
            let state = s.state().unwrap();
            (state.scale, state.growth_tracker)
        };
        s.update(&flag(false)).unwrap();
        assert_eq!(at(&s), (4.0, 1));
        s.update(&flag(false)).unwrap();
        s.update(&flag(false)).unwrap();
        assert_eq!(at(&s), (8.0, 0));
        s.update(&flag(false)).unwrap();
        s.update(&flag(true)).unwrap();
        assert_eq!(at(&s), (4.0, 0));
        let mut top = on_cpu(f32::MAX / 1.5, 1);
        top.update(&flag(false)).unwrap();
        assert_eq!(at(&top), (f64::from(f32::MAX / 1.5), 0));
    }

    #[test]
    fn unscale_checks_before_it_multiplies() {
        let s = on_cpu(1024.0, 2000);
        let found = |grads: &[Tensor]| s.unscale(grads).unwrap().double_value(&[]);
        let a = Tensor::from_slice(&[1024.0f32, -2048.0]);
        let b = Tensor::from_slice(&[512.0f32]);
        assert_eq!(found(&[a.shallow_clone(), b.shallow_clone(), Tensor::new()]), 0.0);
        assert_eq!(Vec::<f32>::try_from(&a).unwrap(), [1.0, -2.0]);
        assert_eq!(Vec::<f32>::try_from(&b).unwrap(), [0.5]);
        let c = Tensor::from_slice(&[f32::INFINITY, 4.0]);
        assert_eq!(found(&[b, c]), 1.0);
        assert_eq!(found(&[Tensor::from_slice(&[f32::NAN])]), 1.0);
    }

    #[test]
    fn a_state_round_trips_and_bad_ones_are_refused() {
        let mut s = on_cpu(128.0, 5);
        s.update(&flag(false)).unwrap();
        s.update(&flag(false)).unwrap();
        let back = GradScaler::from_state(&s.state().unwrap(), Device::Cpu).unwrap();
        assert_eq!(back.state().unwrap(), s.state().unwrap());
        assert_eq!(back.state().unwrap().growth_tracker, 2);
        let bad = ScalerState { growth_tracker: 5, ..s.state().unwrap() };
        assert!(GradScaler::from_state(&bad, Device::Cpu).unwrap_err().contains("_growth_tracker"));
        let bad = ScalerState { scale: f64::INFINITY, ..s.state().unwrap() };
        assert!(GradScaler::from_state(&bad, Device::Cpu).is_err());
    }
}
