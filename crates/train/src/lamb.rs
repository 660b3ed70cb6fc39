//! LAMB exactly as timm's `Lamb` (You et al., arXiv 1904.00962): global
//! gradient-norm clipping inside the step, bias-corrected Adam moments, the
//! weight decay added to the update, and the layer-wise trust ratio applied
//! only to the weight-decay group (unless `always_adapt`). Parameters are split
//! into timm's two groups from the model itself
//! (`Model::excluded_from_weight_decay`). All state is named tensors plus a
//! step count per group, so it is saved and restored exactly.

use crate::error::TrainError;
use rsb_recipes::schema::LambOptimizer;
use rsb_vision::Model;
use tch::{Kind, TchError, Tensor};

/// One parameter group.
#[derive(Debug)]
struct Group {
    weight_decay: f64,
    /// Optimizer steps taken by this group.
    step: u64,
    params: Vec<Slot>,
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
        let mut groups = Vec::new();
        if !no_decay.is_empty() {
            groups.push(Group { weight_decay: 0.0, step: 0, params: no_decay });
        }
        if !decay.is_empty() {
            groups.push(Group { weight_decay: config.weight_decay, step: 0, params: decay });
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
        let clip = match (&global_norm, self.config.max_grad_norm) {
            (Some(norm), Some(max)) => Some(norm.f_div_scalar(max)?.f_clamp_min(1.0)?),
            _ => None,
        };
        let [beta1, beta2] = self.config.betas;
        let beta3 = 1.0 - beta1;
        for group in &mut self.groups {
            group.step += 1;
            let step = group.step as i32;
            let bias_correction1 = 1.0 - beta1.powi(step);
            let bias_correction2 = 1.0 - beta2.powi(step);
            let bc2_sqrt = bias_correction2.sqrt();
            let scale = bc2_sqrt / bias_correction1;
            let adapt = group.weight_decay != 0.0 || self.config.always_adapt;
            for slot in &mut group.params {
                let grad = slot.param.grad();
                if !grad.defined() {
                    continue;
                }
                let grad = match &clip {
                    Some(c) => grad.f_div(c)?,
                    None => grad,
                };
                let _ = slot.exp_avg.f_lerp_(&grad, beta3)?;
                let _ = slot.exp_avg_sq.f_mul_scalar_(beta2)?;
                // PyTorch's addcmul_(g, g, value=c) computes v + (c * g) * g.
                let _ = slot.exp_avg_sq.f_addcmul_(&grad.f_mul_scalar(1.0 - beta2)?, &grad)?;
                // As timm's multi-tensor path: the bias corrections are folded
                // into scalars (m_hat / (sqrt(v_hat) + eps) == scale * m /
                // (sqrt(v) + eps * sqrt(bc2)), scale = sqrt(bc2) / bc1), which
                // saves full passes over every parameter.
                let mut denom = slot.exp_avg_sq.f_sqrt()?;
                let _ = denom.f_add_scalar_(self.config.eps * bc2_sqrt)?;
                let mut update = slot.exp_avg.f_div(&denom)?;
                if group.weight_decay != 0.0 {
                    let _ = update.f_add_(&slot.param.f_mul_scalar(group.weight_decay / scale)?)?;
                }
                if adapt {
                    let w_norm = slot.param.f_norm()?;
                    let u_norm = update.f_norm()?.f_mul_scalar(scale)?;
                    let one = Tensor::f_ones([], (Kind::Float, w_norm.device()))?;
                    let ratio = w_norm.f_div(&u_norm)?;
                    let ratio = ratio.f_where_self(&u_norm.f_gt(0.0)?, &one)?;
                    let mut ratio = ratio.f_where_self(&w_norm.f_gt(0.0)?, &one)?;
                    if self.config.trust_clip {
                        ratio = ratio.f_clamp_max(1.0)?;
                    }
                    let step_size = ratio.f_mul_scalar(-lr * scale)?;
                    let _ = slot.param.f_addcmul_(&update, &step_size)?;
                } else {
                    let _ = update.f_mul_scalar_(-lr * scale)?;
                    let _ = slot.param.f_add_(&update)?;
                }
            }
        }
        Ok(global_norm)
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

    /// The step counts.
    pub fn steps(&self) -> LambSteps {
        LambSteps { group_steps: self.groups.iter().map(|g| g.step).collect() }
    }

    /// Sets the step counts (the moments are restored separately).
    pub fn load_steps(&mut self, steps: &LambSteps) -> Result<(), String> {
        if steps.group_steps.len() != self.groups.len() {
            return Err(format!(
                "{} parameter groups given, {} here",
                steps.group_steps.len(),
                self.groups.len()
            ));
        }
        for (group, &step) in self.groups.iter_mut().zip(&steps.group_steps) {
            group.step = step;
        }
        Ok(())
    }

    /// Restores moments and step counts saved by [`Lamb::state_tensors`] and [`Lamb::steps`].
    pub fn load_state(
        &mut self,
        tensors: Vec<(String, Tensor)>,
        steps: &LambSteps,
    ) -> Result<(), String> {
        if steps.group_steps.len() != self.groups.len() {
            return Err(format!(
                "{} parameter groups saved, {} in this run",
                steps.group_steps.len(),
                self.groups.len()
            ));
        }
        let mut by_name: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
        let _guard = tch::no_grad_guard();
        for (group, &step) in self.groups.iter_mut().zip(&steps.group_steps) {
            group.step = step;
            for slot in &mut group.params {
                for (prefix, target) in
                    [("exp_avg", &mut slot.exp_avg), ("exp_avg_sq", &mut slot.exp_avg_sq)]
                {
                    let key = format!("{prefix}.{}", slot.name);
                    let src = by_name.remove(&key).ok_or_else(|| format!("missing `{key}`"))?;
                    if src.size() != target.size() {
                        return Err(format!(
                            "`{key}` has shape {:?}, expected {:?}",
                            src.size(),
                            target.size()
                        ));
                    }
                    target.f_copy_(&src).map_err(|e| e.to_string())?;
                }
            }
        }
        if let Some(extra) = by_name.keys().next() {
            return Err(format!("unexpected optimizer tensor `{extra}`"));
        }
        Ok(())
    }
}
