//! LAMB exactly as timm's `Lamb` (You et al., arXiv 1904.00962): global
//! gradient-norm clipping inside the step, bias-corrected Adam moments, the
//! weight decay added to the update, and the layer-wise trust ratio applied
//! only to the weight-decay group (unless `always_adapt`). Parameters are split
//! into timm's two groups from the model itself
//! (`Model::excluded_from_weight_decay`). All state is named tensors plus a
//! step count per group, so it is saved and restored exactly.
//!
//! [`Lamb::step_unless_nonfinite`] skips an update whose global gradient
//! norm is NaN or infinite without the host ever seeing the norm: the step
//! counts live on the device, and the verdict turns the update's
//! coefficients into the identity there (see `Lamb::apply`), in place. So
//! an update on a GPU does not wait for the device, and costs one more pass
//! over the gradients than timm's.

use crate::error::TrainError;
use crate::host_read;
use rsb_recipes::schema::LambOptimizer;
use rsb_vision::Model;
use tch::{Device, Kind, TchError, Tensor};

/// One parameter group.
#[derive(Debug)]
struct Group {
    weight_decay: f64,
    /// Optimizer steps taken by this group: a 0-d f64 tensor on the
    /// parameters' device (a skipped update leaves it as it is, decided there).
    step: Tensor,
    params: Vec<Slot>,
}

impl Group {
    /// timm's name for the group: parameters with or without weight decay.
    fn name(&self) -> &'static str {
        if self.weight_decay == 0.0 {
            "no_decay"
        } else {
            "decay"
        }
    }
}

/// A parameter with its moments.
#[derive(Debug)]
struct Slot {
    name: String,
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// timm `Lamb` over a model's parameters.
#[derive(Debug)]
pub struct Lamb {
    config: LambOptimizer,
    /// `[no_decay, decay]`, timm's order.
    groups: Vec<Group>,
}

/// Serializable scalar part of the optimizer state.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LambSteps {
    /// Steps of each group, in group order.
    pub group_steps: Vec<u64>,
}

/// What [`Lamb::step_unless_nonfinite`] did, on the device.
#[derive(Debug)]
pub struct GatedStep {
    /// A 0-d bool tensor: whether the update was applied.
    pub applied: Tensor,
    /// The global gradient norm before clipping (a 0-d tensor; none when no
    /// parameter had a gradient).
    pub grad_norm: Option<Tensor>,
}

/// Saved optimizer state that does not fit this optimizer.
#[derive(Debug, thiserror::Error)]
pub enum LambStateError {
    /// The saved state has step counts for another number of parameter groups.
    #[error("{saved} parameter groups saved, {} in this run ({})", here.len(), here.join(", "))]
    GroupCount {
        /// Groups in the saved state.
        saved: usize,
        /// This optimizer's groups, by name (`no_decay`, `decay`).
        here: Vec<&'static str>,
    },
    /// A moment of one of this optimizer's parameters is not in the saved state.
    #[error("missing `{key}` (parameter group {group})")]
    MissingTensor {
        /// The parameter group (`no_decay` or `decay`).
        group: &'static str,
        /// The tensor name (`exp_avg.<param>` or `exp_avg_sq.<param>`).
        key: String,
    },
    /// A saved moment has another shape than its parameter.
    #[error("`{key}` (parameter group {group}) has shape {saved:?}, expected {expected:?}")]
    Shape {
        /// The parameter group (`no_decay` or `decay`).
        group: &'static str,
        /// The tensor name.
        key: String,
        /// Shape in the saved state.
        saved: Vec<i64>,
        /// Shape of the parameter here.
        expected: Vec<i64>,
    },
    /// The saved state has a tensor that belongs to no parameter here.
    #[error("unexpected optimizer tensor `{key}`")]
    UnexpectedTensor {
        /// The tensor name.
        key: String,
    },
    /// Copying a saved moment into place failed in libtorch.
    #[error("restoring `{key}`: {source}")]
    Copy {
        /// The tensor name.
        key: String,
        /// The libtorch error.
        source: TchError,
    },
}

impl Lamb {
    /// Groups the model's trainable parameters as timm's
    /// `param_groups_weight_decay` does and zero-initialises the moments.
    pub fn new(model: &Model, config: &LambOptimizer) -> Result<Lamb, TrainError> {
        let params = model
            .named_parameters()
            .iter()
            .map(|(name, p)| {
                (name.clone(), p.shallow_clone(), !model.excluded_from_weight_decay(name, p))
            })
            .collect();
        Lamb::from_parameters(params, config)
    }

    /// Builds the optimizer over `(name, parameter, decays)` triples, in order;
    /// `decays` false puts the parameter in the no-decay group. With a weight
    /// decay of 0 every parameter is in the no-decay group, as in timm.
    pub fn from_parameters(
        params: Vec<(String, Tensor, bool)>,
        config: &LambOptimizer,
    ) -> Result<Lamb, TrainError> {
        let mut no_decay = Vec::new();
        let mut decay = Vec::new();
        for (name, param, decays) in params {
            let slot = Slot {
                exp_avg: param.f_zeros_like()?,
                exp_avg_sq: param.f_zeros_like()?,
                name,
                param,
            };
            if config.weight_decay == 0.0 || !decays {
                no_decay.push(slot);
            } else {
                decay.push(slot);
            }
        }
        let device = no_decay.iter().chain(&decay).next().map_or(Device::Cpu, |s| s.param.device());
        let zero_steps = || Tensor::f_zeros([], (Kind::Double, device));
        let mut groups = Vec::new();
        if !no_decay.is_empty() {
            groups.push(Group { weight_decay: 0.0, step: zero_steps()?, params: no_decay });
        }
        if !decay.is_empty() {
            groups.push(Group {
                weight_decay: config.weight_decay,
                step: zero_steps()?,
                params: decay,
            });
        }
        Ok(Lamb { config: config.clone(), groups })
    }

    /// Names of the parameters in each group (`[no_decay, decay]`).
    pub fn group_names(&self) -> Vec<Vec<String>> {
        self.groups.iter().map(|g| g.params.iter().map(|s| s.name.clone()).collect()).collect()
    }

    /// Clears the gradients of every parameter.
    pub fn zero_grad(&mut self) {
        for slot in self.groups.iter_mut().flat_map(|g| g.params.iter_mut()) {
            slot.param.zero_grad();
        }
    }

    /// The parameters (shallow clones), in the order of [`Lamb::gradients`].
    pub fn parameters(&self) -> Vec<Tensor> {
        self.groups.iter().flat_map(|g| g.params.iter()).map(|s| s.param.shallow_clone()).collect()
    }

    /// The parameters' gradients (undefined tensors for parameters without one).
    pub fn gradients(&self) -> Vec<Tensor> {
        self.groups.iter().flat_map(|g| g.params.iter()).map(|s| s.param.grad()).collect()
    }

    /// Global L2 norm of all gradients (a 0-d tensor on the parameters' device).
    pub fn global_grad_norm(&self) -> Result<Option<Tensor>, TchError> {
        let norms: Vec<Tensor> = self
            .gradients()
            .into_iter()
            .filter(Tensor::defined)
            .map(|g| g.f_norm())
            .collect::<Result<_, _>>()?;
        if norms.is_empty() {
            return Ok(None);
        }
        Ok(Some(Tensor::f_stack(&norms, 0)?.f_norm()?))
    }

    /// One optimizer update at learning rate `lr`. Returns the global gradient
    /// norm before clipping (a 0-d tensor, read it only when logging).
    pub fn step(&mut self, lr: f64) -> Result<Option<Tensor>, TrainError> {
        let _guard = tch::no_grad_guard();
        let global_norm = self.global_grad_norm()?;
        self.apply(lr, global_norm.as_ref(), None)?;
        Ok(global_norm)
    }

    /// As [`Lamb::step`], unless the global gradient norm (the one the
    /// clipping uses) is NaN or infinite, or `found_inf` (a 0-d tensor,
    /// fp16's loss scaler) is non-zero: then nothing changes, neither a
    /// parameter nor a moment nor a step count. The verdict stays on the
    /// device ([`GatedStep::applied`]): nothing here waits for the
    /// gradients. Under data parallelism every rank holds the same reduced
    /// gradients, so every rank decides alike.
    pub fn step_unless_nonfinite(
        &mut self,
        lr: f64,
        found_inf: Option<&Tensor>,
    ) -> Result<GatedStep, TrainError> {
        let _guard = tch::no_grad_guard();
        let norm = self.global_grad_norm()?;
        let mut applied = match (&norm, self.groups.first()) {
            (Some(norm), _) => norm.f_isfinite()?,
            (None, Some(group)) => Tensor::f_ones([], (Kind::Bool, group.step.device()))?,
            (None, None) => Tensor::f_ones([], (Kind::Bool, Device::Cpu))?,
        };
        if let Some(found_inf) = found_inf {
            applied = applied.f_logical_and(&found_inf.f_eq(0.0)?)?;
        }
        self.apply(lr, norm.as_ref(), Some(&applied))?;
        Ok(GatedStep { applied, grad_norm: norm })
    }

    /// The update itself, in place, given the global gradient norm. With
    /// `gate` (a 0-d bool tensor) a false gate changes nothing, on the
    /// device: the (clipped) gradients are zeroed there first (in place), and
    /// every coefficient becomes the identity (moment decays 1, lerp weight
    /// and step size 0, step count +0), so that no NaN reaches a moment or a
    /// parameter. A true gate gives exactly the ungated update: the factors
    /// are 1 and the same f32 values as timm's scalars.
    fn apply(
        &mut self,
        lr: f64,
        global_norm: Option<&Tensor>,
        gate: Option<&Tensor>,
    ) -> Result<(), TrainError> {
        let clip = match (global_norm, self.config.max_grad_norm) {
            (Some(norm), Some(max)) => Some(norm.f_div_scalar(max)?.f_clamp_min(1.0)?),
            _ => None,
        };
        let [beta1, beta2] = self.config.betas;
        let beta3 = 1.0 - beta1;
        for group in &mut self.groups {
            let device = group.step.device();
            let double = |v: f64| Tensor::f_full([], v, (Kind::Double, device));
            // 1 when the update is applied, else 0 (f32 and f64).
            let applied = match gate {
                Some(gate) => gate.f_to_kind(Kind::Float)?,
                None => Tensor::f_ones([], (Kind::Float, device))?,
            };
            // The coefficients of the step the update would take: finite
            // whether or not it is applied.
            let step = group.step.f_add_scalar(1.0)?;
            // As timm, in f64: 1 - beta ** step.
            let bias_correction1 = double(beta1)?.f_pow(&step)?.f_neg()?.f_add_scalar(1.0)?;
            let bias_correction2 = double(beta2)?.f_pow(&step)?.f_neg()?.f_add_scalar(1.0)?;
            let bc2_sqrt = bias_correction2.f_sqrt()?;
            let scale = bc2_sqrt.f_div(&bias_correction1)?;
            let scale_f32 = scale.f_to_kind(Kind::Float)?;
            let eps = bc2_sqrt.f_mul_scalar(self.config.eps)?;
            // -lr * scale, rounded to f32 once, as a Python float is when it
            // multiplies an f32 tensor; 0 when not applied.
            let neg_lr_scale = scale.f_mul_scalar(-lr)?.f_to_kind(Kind::Float)?.f_mul(&applied)?;
            let decay_over_scale = double(group.weight_decay)?.f_div(&scale)?;
            // The moments' lerp weight and decay: beta3 and beta2, or 0 and 1.
            let lerp_weight = applied.f_mul_scalar(beta3)?;
            let decay2 =
                applied.f_mul_scalar(beta2)?.f_add(&applied.f_neg()?.f_add_scalar(1.0)?)?;
            let zero = Tensor::f_zeros([], (Kind::Float, device))?;
            let adapt = group.weight_decay != 0.0 || self.config.always_adapt;
            for slot in &mut group.params {
                let mut grad = slot.param.grad();
                if !grad.defined() {
                    continue;
                }
                if let Some(c) = &clip {
                    let _ = grad.f_div_(c)?;
                }
                if let Some(gate) = gate {
                    // In place: a skipped update's NaN and infinities become 0.
                    let _ = grad.f_where_self_out(&grad, gate, &zero)?;
                }
                let _ = slot.exp_avg.f_lerp_tensor_(&grad, &lerp_weight)?;
                let _ = slot.exp_avg_sq.f_mul_(&decay2)?;
                // PyTorch's addcmul_(g, g, value=c) computes v + (c * g) * g.
                let _ = slot.exp_avg_sq.f_addcmul_(&grad.f_mul_scalar(1.0 - beta2)?, &grad)?;
                // As timm's multi-tensor path: the bias corrections are folded
                // into scalars (m_hat / (sqrt(v_hat) + eps) == scale * m /
                // (sqrt(v) + eps * sqrt(bc2)), scale = sqrt(bc2) / bc1), which
                // saves full passes over every parameter.
                let mut denom = slot.exp_avg_sq.f_sqrt()?;
                let _ = denom.f_add_(&eps)?;
                let mut update = slot.exp_avg.f_div(&denom)?;
                if group.weight_decay != 0.0 {
                    let _ = update.f_add_(&slot.param.f_mul(&decay_over_scale)?)?;
                }
                if adapt {
                    let w_norm = slot.param.f_norm()?;
                    let u_norm = update.f_norm()?.f_mul(&scale_f32)?;
                    let one = Tensor::f_ones([], (Kind::Float, w_norm.device()))?;
                    let ratio = w_norm.f_div(&u_norm)?;
                    let ratio = ratio.f_where_self(&u_norm.f_gt(0.0)?, &one)?;
                    let mut ratio = ratio.f_where_self(&w_norm.f_gt(0.0)?, &one)?;
                    if self.config.trust_clip {
                        ratio = ratio.f_clamp_max(1.0)?;
                    }
                    let step_size = ratio.f_mul(&neg_lr_scale)?;
                    let _ = slot.param.f_addcmul_(&update, &step_size)?;
                } else {
                    let _ = update.f_mul_(&neg_lr_scale)?;
                    let _ = slot.param.f_add_(&update)?;
                }
            }
            let _ = group.step.f_add_(&applied.f_to_kind(Kind::Double)?)?;
        }
        Ok(())
    }

    /// The moments as named tensors (`exp_avg.<param>`, `exp_avg_sq.<param>`).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for slot in self.groups.iter().flat_map(|g| g.params.iter()) {
            out.push((format!("exp_avg.{}", slot.name), slot.exp_avg.shallow_clone()));
            out.push((format!("exp_avg_sq.{}", slot.name), slot.exp_avg_sq.shallow_clone()));
        }
        out
    }

    /// The step counts (a host read).
    pub fn steps(&self) -> Result<LambSteps, TrainError> {
        let group_steps = self
            .groups
            .iter()
            .map(|g| Ok(host_read::f64_of(&g.step)? as u64))
            .collect::<Result<_, TchError>>()?;
        Ok(LambSteps { group_steps })
    }

    /// Sets the step counts (the moments are restored separately).
    pub fn load_steps(&mut self, steps: &LambSteps) -> Result<(), LambStateError> {
        self.check_group_count(steps)?;
        for (group, &step) in self.groups.iter_mut().zip(&steps.group_steps) {
            set_step(group, step)?;
        }
        Ok(())
    }

    /// Restores moments and step counts saved by [`Lamb::state_tensors`] and [`Lamb::steps`].
    pub fn load_state(
        &mut self,
        tensors: Vec<(String, Tensor)>,
        steps: &LambSteps,
    ) -> Result<(), LambStateError> {
        self.check_group_count(steps)?;
        let mut by_name: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
        let _guard = tch::no_grad_guard();
        for (group, &step) in self.groups.iter_mut().zip(&steps.group_steps) {
            set_step(group, step)?;
            let group_name = group.name();
            for slot in &mut group.params {
                for (prefix, target) in
                    [("exp_avg", &mut slot.exp_avg), ("exp_avg_sq", &mut slot.exp_avg_sq)]
                {
                    let key = format!("{prefix}.{}", slot.name);
                    let Some(src) = by_name.remove(&key) else {
                        return Err(LambStateError::MissingTensor { group: group_name, key });
                    };
                    if src.size() != target.size() {
                        return Err(LambStateError::Shape {
                            group: group_name,
                            key,
                            saved: src.size(),
                            expected: target.size(),
                        });
                    }
                    target
                        .f_copy_(&src)
                        .map_err(|source| LambStateError::Copy { key: key.clone(), source })?;
                }
            }
        }
        let mut extra: Vec<String> = by_name.into_keys().collect();
        extra.sort();
        if let Some(key) = extra.into_iter().next() {
            return Err(LambStateError::UnexpectedTensor { key });
        }
        Ok(())
    }

    fn check_group_count(&self, steps: &LambSteps) -> Result<(), LambStateError> {
        if steps.group_steps.len() != self.groups.len() {
            return Err(LambStateError::GroupCount {
                saved: steps.group_steps.len(),
                here: self.groups.iter().map(Group::name).collect(),
            });
        }
        Ok(())
    }
}

/// Sets a group's step count (a value from the host).
fn set_step(group: &mut Group, step: u64) -> Result<(), LambStateError> {
    group.step.f_fill_(step as f64).map(|_| ()).map_err(|source| LambStateError::Copy {
        key: format!("step count of group {}", group.name()),
        source,
    })
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    fn config(weight_decay: f64) -> LambOptimizer {
        LambOptimizer {
            lr: 1e-3,
            weight_decay,
            betas: [0.9, 0.999],
            eps: 1e-6,
            max_grad_norm: Some(1.0),
            trust_clip: false,
            always_adapt: false,
        }
    }

    /// A weight (decay group) and a bias (no-decay group), with gradients.
    fn optimizer() -> Lamb {
        let weight = Tensor::from_slice(&[0.5f32, -1.0, 2.0, 0.25]).reshape([2, 2]);
        let bias = Tensor::from_slice(&[0.1f32, -0.2]);
        let params = vec![
            ("fc.weight".to_string(), weight.set_requires_grad(true), true),
            ("fc.bias".to_string(), bias.set_requires_grad(true), false),
        ];
        let mut lamb = Lamb::from_parameters(params, &config(0.02)).unwrap();
        let loss = lamb
            .groups
            .iter()
            .flat_map(|g| g.params.iter())
            .map(|s| s.param.square().sum(Kind::Float))
            .reduce(|a, b| a + b)
            .unwrap();
        loss.backward();
        lamb.step(0.01).unwrap();
        lamb
    }

    #[test]
    fn saved_state_restores_moments_and_steps() {
        let saved = optimizer();
        let mut fresh = optimizer();
        fresh.zero_grad();
        fresh.load_steps(&LambSteps { group_steps: vec![0, 0] }).unwrap();
        for (_, t) in fresh.state_tensors() {
            let _ = t.detach().zero_();
        }
        fresh.load_state(saved.state_tensors(), &saved.steps().unwrap()).unwrap();
        assert_eq!(fresh.steps().unwrap(), LambSteps { group_steps: vec![1, 1] });
        for ((name, a), (_, b)) in saved.state_tensors().iter().zip(fresh.state_tensors()) {
            assert!(a.equal(&b), "{name} differs after the restore");
            assert!(a.abs().sum(Kind::Float).double_value(&[]) > 0.0, "{name} is all zeros");
        }
    }

    #[test]
    fn a_non_finite_gradient_or_a_found_inf_changes_nothing() {
        let mut lamb = optimizer();
        let params: Vec<Tensor> =
            lamb.groups.iter().flat_map(|g| g.params.iter()).map(|s| s.param.copy()).collect();
        let moments: Vec<Tensor> =
            lamb.state_tensors().into_iter().map(|(_, t)| t.copy()).collect();
        let steps = lamb.steps().unwrap();
        let no_inf = Tensor::from(0.0f32);
        let cases = [(f64::NAN, &no_inf), (f64::INFINITY, &no_inf), (1.0, &Tensor::from(1.0f32))];
        for (poison, found_inf) in cases {
            let mut grad = lamb.groups[1].params[0].param.grad();
            let _ = grad.fill_(1.0);
            let _ = grad.get(0).get(1).fill_(poison);
            let outcome = lamb.step_unless_nonfinite(0.01, Some(found_inf)).unwrap();
            assert!(!outcome.applied.is_nonzero(), "applied with {poison} and {found_inf}");
            let norm = outcome.grad_norm.unwrap().double_value(&[]);
            assert_eq!(norm.is_finite(), poison.is_finite(), "norm {norm}");
            let after = lamb.groups.iter().flat_map(|g| g.params.iter()).map(|s| &s.param);
            for (a, b) in params.iter().zip(after) {
                assert!(a.equal(b), "a parameter changed");
            }
            for (a, (name, b)) in moments.iter().zip(lamb.state_tensors()) {
                assert!(a.equal(&b), "{name} changed");
            }
            assert_eq!(lamb.steps().unwrap(), steps);
        }
        let _ = lamb.groups[1].params[0].param.grad().fill_(0.5);
        let outcome = lamb.step_unless_nonfinite(0.01, Some(&no_inf)).unwrap();
        assert!(outcome.applied.is_nonzero());
        assert!(outcome.grad_norm.unwrap().double_value(&[]) > 0.0);
        assert_eq!(lamb.steps().unwrap(), LambSteps { group_steps: vec![2, 2] });
        let after = lamb.groups.iter().flat_map(|g| g.params.iter()).map(|s| &s.param);
        assert!(params.iter().zip(after).all(|(a, b)| !a.equal(b)), "every parameter moves");
    }

    #[test]
    fn the_gated_step_equals_the_plain_step_when_applied() {
        let mut plain = optimizer();
        let mut gated = optimizer();
        for lamb in [&mut plain, &mut gated] {
            for slot in lamb.groups.iter().flat_map(|g| g.params.iter()) {
                let _ = slot.param.grad().fill_(0.25);
            }
        }
        plain.step(0.01).unwrap();
        let applied = gated.step_unless_nonfinite(0.01, None).unwrap().applied;
        assert!(applied.is_nonzero());
        for ((name, a), (_, b)) in plain.state_tensors().iter().zip(gated.state_tensors()) {
            assert!(a.equal(&b), "{name} differs");
        }
        for (a, b) in plain.parameters().iter().zip(gated.parameters()) {
            assert!(a.equal(&b), "a parameter differs");
        }
        assert_eq!(plain.steps().unwrap(), gated.steps().unwrap());
    }

    #[test]
    fn group_count_mismatch_names_the_groups() {
        let mut lamb = optimizer();
        let err = lamb.load_steps(&LambSteps { group_steps: vec![3] }).unwrap_err();
        assert!(matches!(err, LambStateError::GroupCount { saved: 1, .. }), "{err:?}");
        assert_eq!(err.to_string(), "1 parameter groups saved, 2 in this run (no_decay, decay)");
        let err = lamb.load_state(lamb.state_tensors(), &LambSteps { group_steps: vec![] });
        assert!(matches!(err, Err(LambStateError::GroupCount { saved: 0, .. })), "{err:?}");
    }

    #[test]
    fn missing_misshapen_and_extra_tensors_are_named() {
        let mut lamb = optimizer();
        let steps = lamb.steps().unwrap();

        let mut tensors = lamb.state_tensors();
        tensors.retain(|(name, _)| name != "exp_avg_sq.fc.weight");
        let err = lamb.load_state(tensors, &steps).unwrap_err();
        assert!(
            matches!(&err, LambStateError::MissingTensor { group: "decay", key }
                if key == "exp_avg_sq.fc.weight"),
            "{err:?}"
        );

        let mut tensors = lamb.state_tensors();
        for (name, tensor) in &mut tensors {
            if name == "exp_avg.fc.bias" {
                *tensor = Tensor::zeros([3], (Kind::Float, tch::Device::Cpu));
            }
        }
        let err = lamb.load_state(tensors, &steps).unwrap_err();
        assert!(
            matches!(&err, LambStateError::Shape { group: "no_decay", saved, expected, .. }
                if saved == &[3] && expected == &[2]),
            "{err:?}"
        );
        assert!(err.to_string().contains("`exp_avg.fc.bias`"), "{err}");

        let mut tensors = lamb.state_tensors();
        tensors.push((
            "exp_avg.head.weight".into(),
            Tensor::zeros([1], (Kind::Float, tch::Device::Cpu)),
        ));
        let err = lamb.load_state(tensors, &steps).unwrap_err();
        assert!(
            matches!(&err, LambStateError::UnexpectedTensor { key } if key == "exp_avg.head.weight"),
            "{err:?}"
        );
    }
}
