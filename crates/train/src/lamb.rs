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
//! over the gradients than timm's (on the packed path, over its flat copy
//! of them).
//!
//! As timm picks its multi-tensor (`foreach`) path for CUDA tensors and its
//! per-tensor path otherwise, an update here takes one of two
//! [`UpdatePath`]s, by the same rule. Each group's moments live in one flat
//! buffer (each parameter's moments are views of it, shaped and strided as
//! the parameter), so the packed path runs a fixed number of kernels over a
//! group's flattened gradients, parameters and moments (flat copies of the
//! gradients and parameters, and per-element step sizes with their int32
//! index: a few times the parameters' size in temporaries), takes the trust ratio's per-parameter norms with torch's
//! multi-tensor `_foreach_norm` as timm does, and adds the update into the
//! parameters with torch's multi-tensor `_foreach_add_` (timm writes back
//! once per parameter), instead of about twenty kernels per parameter: launch
//! overhead, not the arithmetic, bounded ResNet-50's update on an H200
//! (18.6 ms per-tensor, as timm's per-tensor path, against timm's 5.9 ms).

use crate::error::TrainError;
use crate::host_read;
use rsb_recipes::schema::LambOptimizer;
use rsb_vision::Model;
use tch::{Device, Kind, TchError, Tensor};

/// How an update walks a group's parameters (timm's `foreach` choice).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdatePath {
    /// About twenty kernels per parameter, one parameter after another:
    /// timm's `_single_tensor_lamb`, which it takes off CUDA. The default on
    /// a CPU, where it is bit for bit timm's.
    PerTensor,
    /// A fixed number of kernels over each group's flattened tensors and
    /// lists of its parameters: timm's `_multi_tensor_lamb`, which it
    /// takes on CUDA (the same arithmetic; the global norm's sums taken in
    /// another order). The default on a GPU. A group with a parameter that
    /// has no gradient, or whose gradient or storage is not laid out as the
    /// parameter was when the optimizer was built, takes the per-tensor path
    /// for that step.
    Packed,
}

/// One parameter group.
#[derive(Debug)]
struct Group {
    weight_decay: f64,
    /// Optimizer steps taken by this group: a 0-d f64 tensor on the
    /// parameters' device (a skipped update leaves it as it is, decided there).
    step: Tensor,
    params: Vec<Slot>,
    /// The group's moments as flat buffers, which the slots' moments view;
    /// none when a parameter was not dense and non-empty, or not of one
    /// kind and device with the others, when the optimizer was built.
    packed: Option<PackedMoments>,
}

/// A group's moments, flat, in the parameters' order and memory order.
#[derive(Debug)]
struct PackedMoments {
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// Each parameter's element count.
    lengths: Vec<i64>,
    /// The same on the parameters' device (int32, unless the group has
    /// 2^31 elements or more), where each parameter's step size is spread
    /// over its elements.
    lengths_on_device: Tensor,
}

impl Group {
    /// A group of `params` with zero moments and no step taken. The moments
    /// are views of one flat buffer each when every parameter is dense and
    /// non-empty, with one kind, on `device`; else one tensor each.
    fn new(
        weight_decay: f64,
        params: Vec<(String, Tensor)>,
        device: Device,
    ) -> Result<Group, TchError> {
        let step = Tensor::f_zeros([], (Kind::Double, device))?;
        let kind = params.first().map(|(_, p)| p.kind());
        let layouts: Option<Vec<Layout>> = params
            .iter()
            .map(|(_, p)| {
                let packable = Some(p.kind()) == kind && p.device() == device && p.numel() > 0;
                packable.then(|| Layout::of(p)).flatten()
            })
            .collect();
        let (Some(layouts), Some(kind)) = (layouts, kind) else {
            let params = params
                .into_iter()
                .map(|(name, param)| {
                    Ok(Slot {
                        exp_avg: param.f_zeros_like()?,
                        exp_avg_sq: param.f_zeros_like()?,
                        name,
                        param,
                        layout: None,
                    })
                })
                .collect::<Result<_, TchError>>()?;
            return Ok(Group { weight_decay, step, params, packed: None });
        };
        let lengths: Vec<i64> = params.iter().map(|(_, p)| p.numel() as i64).collect();
        let total: i64 = lengths.iter().sum();
        let exp_avg = Tensor::f_zeros([total], (kind, device))?;
        let exp_avg_sq = Tensor::f_zeros([total], (kind, device))?;
        let mut slots = Vec::with_capacity(params.len());
        let mut offset = 0;
        for ((name, param), layout) in params.into_iter().zip(layouts) {
            let n = param.numel() as i64;
            let view = |flat: &Tensor| layout.view_of(&flat.f_narrow(0, offset, n)?);
            slots.push(Slot {
                exp_avg: view(&exp_avg)?,
                exp_avg_sq: view(&exp_avg_sq)?,
                name,
                param,
                layout: Some(layout),
            });
            offset += n;
        }
        // int32 when it can be: the per-element index it spreads step sizes
        // with (each update) is of its kind, half the bytes of int64.
        let index_kind = if total < i64::from(i32::MAX) { Kind::Int } else { Kind::Int64 };
        let lengths_on_device =
            Tensor::f_from_slice(&lengths)?.f_to_kind(index_kind)?.f_to_device(device)?;
        let packed = PackedMoments { exp_avg, exp_avg_sq, lengths, lengths_on_device };
        Ok(Group { weight_decay, step, params: slots, packed: Some(packed) })
    }

    /// The group's gradients flattened into one new tensor, in the order of
    /// its packed moments, with each parameter's flat view: none when it has
    /// no packed moments, or when a gradient is missing or a parameter or
    /// its gradient is not laid out as its moments (a parameter given
    /// another layout after the optimizer was built). The update then takes
    /// the per-tensor path.
    fn flat_gradients(&self) -> Result<Option<FlatGroup>, TchError> {
        if self.packed.is_none() {
            return Ok(None);
        }
        let mut grads = Vec::with_capacity(self.params.len());
        let mut params = Vec::with_capacity(self.params.len());
        for slot in &self.params {
            let Some(layout) = &slot.layout else { return Ok(None) };
            let grad = slot.param.grad();
            if !grad.defined() || !layout.fits(&slot.param) || !layout.fits(&grad) {
                return Ok(None);
            }
            grads.push(layout.flat(&grad)?);
            params.push(layout.flat(&slot.param)?);
        }
        Ok(Some(FlatGroup { grads: Tensor::f_cat(&grads, 0)?, params }))
    }

    /// The packed update of the group, given its flat gradients
    /// ([`Group::flat_gradients`]): the per-tensor update's arithmetic over
    /// flat tensors, the trust ratio's norms taken per parameter by one
    /// multi-tensor call each, each parameter's step size spread over its
    /// elements in the flat update, and the update added into the
    /// parameters by one multi-tensor call. So the update's kernels do not
    /// grow with the number of parameters (timm's multi-tensor path writes
    /// back one parameter at a time: its per-parameter step sizes have no
    /// multi-tensor fast path).
    fn apply_packed(&mut self, flat: FlatGroup, c: &Coefficients) -> Result<(), TrainError> {
        let Some(packed) = &mut self.packed else {
            return Err(TchError::Kind("the group has no packed moments".into()).into());
        };
        let FlatGroup { mut grads, params: param_views } = flat;
        let params =
            if self.weight_decay != 0.0 { Some(Tensor::f_cat(&param_views, 0)?) } else { None };
        let mut update =
            c.direction(&mut grads, &mut packed.exp_avg, &mut packed.exp_avg_sq, params.as_ref())?;
        drop((grads, params));
        // Views of the update, one per parameter, in one call.
        let pieces = update.f_split_with_sizes(packed.lengths.as_slice(), 0)?;
        if c.adapt {
            let w_norm = rsb_torch_shim::foreach::norms(&param_views)?;
            let step_sizes =
                c.trust_step_sizes(&w_norm, &rsb_torch_shim::foreach::norms(&pieces)?)?;
            // Each parameter's step size on each of its elements; the
            // output size is given, so nothing waits for the device.
            let per_element = step_sizes.f_repeat_interleave_self_tensor(
                &packed.lengths_on_device,
                0,
                update.size1()?,
            )?;
            let _ = update.f_mul_(&per_element)?;
        } else {
            let _ = update.f_mul_(c.neg_lr_scale)?;
        }
        // The pieces view the scaled update.
        rsb_torch_shim::foreach::add_(&param_views, &pieces)?;
        Ok(())
    }

    /// timm's name for the group: parameters with or without weight decay.
    fn name(&self) -> &'static str {
        if self.weight_decay == 0.0 {
            "no_decay"
        } else {
            "decay"
        }
    }
}

/// The coefficients of one update (see [`Lamb::apply`]), as both paths take them.
struct Coefficients<'a> {
    clip: Option<&'a Tensor>,
    gate: Option<&'a Tensor>,
    zero: &'a Tensor,
    lerp_weight: &'a Tensor,
    decay2: &'a Tensor,
    one_minus_beta2: f64,
    eps: &'a Tensor,
    decay_over_scale: &'a Tensor,
    scale_f32: &'a Tensor,
    neg_lr_scale: &'a Tensor,
    adapt: bool,
    trust_clip: bool,
}

impl Coefficients<'_> {
    /// The update's direction, as both paths take it: clips and gates
    /// `grad` in place (a skipped update's NaN and infinities become 0),
    /// moves the moments in place, and returns m / (sqrt(v) + eps), plus the
    /// weight decay of `decay_of` (the parameters, in a group that decays).
    fn direction(
        &self,
        grad: &mut Tensor,
        exp_avg: &mut Tensor,
        exp_avg_sq: &mut Tensor,
        decay_of: Option<&Tensor>,
    ) -> Result<Tensor, TchError> {
        if let Some(clip) = self.clip {
            let _ = grad.f_div_(clip)?;
        }
        if let Some(gate) = self.gate {
            let _ = grad.f_where_self_out(grad, gate, self.zero)?;
        }
        let _ = exp_avg.f_lerp_tensor_(grad, self.lerp_weight)?;
        let _ = exp_avg_sq.f_mul_(self.decay2)?;
        // PyTorch's addcmul_(g, g, value=c) computes v + (c * g) * g.
        let _ = exp_avg_sq.f_addcmul_(&grad.f_mul_scalar(self.one_minus_beta2)?, grad)?;
        // As timm's multi-tensor path: the bias corrections are folded
        // into scalars (m_hat / (sqrt(v_hat) + eps) == scale * m /
        // (sqrt(v) + eps * sqrt(bc2)), scale = sqrt(bc2) / bc1), which
        // saves full passes over every parameter.
        let mut denom = exp_avg_sq.f_sqrt()?;
        let _ = denom.f_add_(self.eps)?;
        let mut update = exp_avg.f_div(&denom)?;
        if let Some(params) = decay_of {
            let _ = update.f_add_(&params.f_mul(self.decay_over_scale)?)?;
        }
        Ok(update)
    }

    /// The step sizes (-lr * scale * trust ratio) of parameters with norms
    /// `w_norm` whose update directions have norms `u_norm`, as both paths
    /// take them (0-d for one parameter, 1-D for a packed group): a ratio of
    /// 1 where either norm is 0.
    fn trust_step_sizes(&self, w_norm: &Tensor, u_norm: &Tensor) -> Result<Tensor, TchError> {
        let u_norm = u_norm.f_mul(self.scale_f32)?;
        let one = Tensor::f_ones([], (Kind::Float, w_norm.device()))?;
        let ratio = w_norm.f_div(&u_norm)?;
        let ratio = ratio.f_where_self(&u_norm.f_gt(0.0)?, &one)?;
        let mut ratio = ratio.f_where_self(&w_norm.f_gt(0.0)?, &one)?;
        if self.trust_clip {
            ratio = ratio.f_clamp_max(1.0)?;
        }
        ratio.f_mul(self.neg_lr_scale)
    }
}

/// A group's flat gradients (a new tensor) and its parameters' flat views.
struct FlatGroup {
    grads: Tensor,
    params: Vec<Tensor>,
}

/// A dense parameter's layout when its packed group was built: its moments
/// keep it, and a flat view in memory order lines its elements up with
/// theirs.
#[derive(Debug)]
struct Layout {
    kind: Kind,
    size: Vec<i64>,
    stride: Vec<i64>,
    /// Its dimensions, outermost first in memory ([`memory_order`]).
    order: Vec<i64>,
}

impl Layout {
    /// The layout of `t`, when it is dense.
    fn of(t: &Tensor) -> Option<Layout> {
        let order = memory_order(t)?;
        Some(Layout { kind: t.kind(), size: t.size(), stride: t.stride(), order })
    }

    /// Whether `t` has this kind, shape and strides (those of dimensions of
    /// size 1 aside): its elements lie in memory as the moments' do.
    fn fits(&self, t: &Tensor) -> bool {
        t.kind() == self.kind
            && t.size() == self.size
            && t.stride()
                .iter()
                .zip(&self.stride)
                .zip(&self.size)
                .all(|((a, b), &n)| n == 1 || a == b)
    }

    /// `t` (which [`Layout::fits`]) as a 1-D view in memory order: a
    /// shallow clone for a 1-D tensor, no permutation for a contiguous one.
    fn flat(&self, t: &Tensor) -> Result<Tensor, TchError> {
        if self.size.len() == 1 {
            return Ok(t.shallow_clone());
        }
        if self.order.iter().enumerate().all(|(i, &d)| d == i as i64) {
            return t.f_view([-1]);
        }
        t.f_permute(self.order.as_slice())?.f_view([-1])
    }

    /// `flat` (a 1-D tensor of the layout's element count) viewed with the
    /// layout's sizes and strides.
    fn view_of(&self, flat: &Tensor) -> Result<Tensor, TchError> {
        let permuted: Vec<i64> = self.order.iter().map(|&d| self.size[d as usize]).collect();
        let mut inverse = vec![0i64; self.order.len()];
        for (i, &d) in self.order.iter().enumerate() {
            inverse[d as usize] = i as i64;
        }
        flat.f_view(permuted.as_slice())?.f_permute(inverse.as_slice())
    }
}

/// The permutation that lists `t`'s dimensions outermost first in memory,
/// when `t` is dense (its elements fill one block, each once, as a
/// contiguous or channels-last tensor's do); none otherwise.
fn memory_order(t: &Tensor) -> Option<Vec<i64>> {
    let (size, stride) = (t.size(), t.stride());
    let mut order: Vec<usize> = (0..size.len()).collect();
    order.sort_by(|&a, &b| stride[b].cmp(&stride[a]).then(a.cmp(&b)));
    let mut expected = 1;
    for &d in order.iter().rev() {
        if size[d] != 1 && stride[d] != expected {
            return None;
        }
        expected *= size[d];
    }
    Some(order.into_iter().map(|d| d as i64).collect())
}

/// A parameter with its moments.
#[derive(Debug)]
struct Slot {
    name: String,
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// Where its moments lie in the group's flat buffers (packed groups).
    layout: Option<Layout>,
}

/// timm `Lamb` over a model's parameters.
#[derive(Debug)]
pub struct Lamb {
    config: LambOptimizer,
    /// `[no_decay, decay]`, timm's order.
    groups: Vec<Group>,
    path: UpdatePath,
    /// How many groups the last update took the packed path for.
    packed_last_update: usize,
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
            if config.weight_decay == 0.0 || !decays {
                no_decay.push((name, param));
            } else {
                decay.push((name, param));
            }
        }
        let device = no_decay.iter().chain(&decay).next().map_or(Device::Cpu, |(_, p)| p.device());
        let mut groups = Vec::new();
        if !no_decay.is_empty() {
            groups.push(Group::new(0.0, no_decay, device)?);
        }
        if !decay.is_empty() {
            groups.push(Group::new(config.weight_decay, decay, device)?);
        }
        // timm's rule (`_resolve_foreach`): multi-tensor for CUDA tensors.
        let path = if device.is_cuda() { UpdatePath::Packed } else { UpdatePath::PerTensor };
        Ok(Lamb { config: config.clone(), groups, path, packed_last_update: 0 })
    }

    /// The path updates take ([`UpdatePath`]; by default packed on a GPU).
    pub fn update_path(&self) -> UpdatePath {
        self.path
    }

    /// Makes updates take `path` (the benchmark and the tests compare them).
    pub fn set_update_path(&mut self, path: UpdatePath) {
        self.path = path;
    }

    /// How many parameter groups the last update took the packed path for
    /// (fewer than asked where a group's layouts did not allow it).
    pub fn groups_packed_last_update(&self) -> usize {
        self.packed_last_update
    }

    /// Names of the parameters in each group (`[no_decay, decay]`).
    pub fn group_names(&self) -> Vec<Vec<String>> {
        self.groups.iter().map(|g| g.params.iter().map(|s| s.name.clone()).collect()).collect()
    }

    /// Sets the gradient of every parameter to none, as timm's
    /// `optimizer.zero_grad()` (PyTorch's `set_to_none=True`): no kernel, and
    /// the next backward pass hands its gradients over instead of adding
    /// them into zeros. A parameter that the next backward pass does not
    /// reach is then left out of the update, as in timm.
    pub fn zero_grad(&mut self) -> Result<(), TrainError> {
        Ok(rsb_torch_shim::grads::set_to_none(&self.parameters())?)
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
        let flat = self.flat_gradients()?;
        self.global_norm_of(&flat)
    }

    /// Each group's gradients flattened into one tensor, when the packed path
    /// is taken and the group's layouts allow it ([`Group::flat_gradients`]).
    fn flat_gradients(&self) -> Result<Vec<Option<FlatGroup>>, TchError> {
        self.groups
            .iter()
            .map(|g| match self.path {
                UpdatePath::Packed => g.flat_gradients(),
                UpdatePath::PerTensor => Ok(None),
            })
            .collect()
    }

    /// The global gradient norm, as timm: the norm of the stacked norms of
    /// every gradient (of each group's flat gradients, where packed).
    fn global_norm_of(&self, flat: &[Option<FlatGroup>]) -> Result<Option<Tensor>, TchError> {
        let mut norms = Vec::new();
        for (group, flat) in self.groups.iter().zip(flat) {
            match flat {
                Some(flat) => norms.push(flat.grads.f_norm()?),
                None => {
                    for slot in &group.params {
                        let grad = slot.param.grad();
                        if grad.defined() {
                            norms.push(grad.f_norm()?);
                        }
                    }
                }
            }
        }
        if norms.is_empty() {
            return Ok(None);
        }
        Ok(Some(Tensor::f_stack(&norms, 0)?.f_norm()?))
    }

    /// One optimizer update at learning rate `lr`. Returns the global gradient
    /// norm before clipping (a 0-d tensor, read it only when logging).
    pub fn step(&mut self, lr: f64) -> Result<Option<Tensor>, TrainError> {
        let _guard = tch::no_grad_guard();
        let flat = self.flat_gradients()?;
        let global_norm = self.global_norm_of(&flat)?;
        self.apply(lr, global_norm.as_ref(), None, flat)?;
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
        let flat = self.flat_gradients()?;
        let norm = self.global_norm_of(&flat)?;
        let mut applied = match (&norm, self.groups.first()) {
            (Some(norm), _) => norm.f_isfinite()?,
            (None, Some(group)) => Tensor::f_ones([], (Kind::Bool, group.step.device()))?,
            (None, None) => Tensor::f_ones([], (Kind::Bool, Device::Cpu))?,
        };
        if let Some(found_inf) = found_inf {
            applied = applied.f_logical_and(&found_inf.f_eq(0.0)?)?;
        }
        self.apply(lr, norm.as_ref(), Some(&applied), flat)?;
        Ok(GatedStep { applied, grad_norm: norm })
    }

    /// The update itself, in place, given the global gradient norm. With
    /// `gate` (a 0-d bool tensor) a false gate changes nothing, on the
    /// device: the (clipped) gradients are zeroed there first (in place, or
    /// in the packed path's flat copy of them), and
    /// every coefficient becomes the identity (moment decays 1, lerp weight
    /// and step size 0, step count +0), so that no NaN reaches a moment or a
    /// parameter. A true gate gives exactly the ungated update: the factors
    /// are 1 and the same f32 values as timm's scalars.
    ///
    /// `flat` holds each group's flat gradients where the group takes the
    /// packed path ([`Lamb::flat_gradients`]), none where it does not.
    fn apply(
        &mut self,
        lr: f64,
        global_norm: Option<&Tensor>,
        gate: Option<&Tensor>,
        flat: Vec<Option<FlatGroup>>,
    ) -> Result<(), TrainError> {
        let clip = match (global_norm, self.config.max_grad_norm) {
            (Some(norm), Some(max)) => Some(norm.f_div_scalar(max)?.f_clamp_min(1.0)?),
            _ => None,
        };
        let [beta1, beta2] = self.config.betas;
        let beta3 = 1.0 - beta1;
        self.packed_last_update = 0;
        for (group, flat) in self.groups.iter_mut().zip(flat) {
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
            let coefficients = Coefficients {
                clip: clip.as_ref(),
                gate,
                zero: &zero,
                lerp_weight: &lerp_weight,
                decay2: &decay2,
                one_minus_beta2: 1.0 - beta2,
                eps: &eps,
                decay_over_scale: &decay_over_scale,
                scale_f32: &scale_f32,
                neg_lr_scale: &neg_lr_scale,
                adapt,
                trust_clip: self.config.trust_clip,
            };
            if let (Some(flat), Some(_)) = (flat, &group.packed) {
                group.apply_packed(flat, &coefficients)?;
                self.packed_last_update += 1;
            } else {
                for slot in &mut group.params {
                    let mut grad = slot.param.grad();
                    if !grad.defined() {
                        continue;
                    }
                    let decay_of = (group.weight_decay != 0.0).then_some(&slot.param);
                    let mut update = coefficients.direction(
                        &mut grad,
                        &mut slot.exp_avg,
                        &mut slot.exp_avg_sq,
                        decay_of,
                    )?;
                    if adapt {
                        let w_norm = slot.param.f_norm()?;
                        let step_size =
                            coefficients.trust_step_sizes(&w_norm, &update.f_norm()?)?;
                        let _ = slot.param.f_addcmul_(&update, &step_size)?;
                    } else {
                        let _ = update.f_mul_(&neg_lr_scale)?;
                        let _ = slot.param.f_add_(&update)?;
                    }
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
        fresh.zero_grad().unwrap();
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

    /// Values in [-1, 1] spread like random ones, the same for the same
    /// shape and seed (libtorch's global generator is shared with the
    /// other tests of this binary, which run at the same time).
    fn pseudo_random(shape: &[i64], seed: i64) -> Tensor {
        let n: i64 = shape.iter().product();
        let x = Tensor::arange(n, (Kind::Float, tch::Device::Cpu)) * 0.754_877_666;
        (x + seed as f64 * 0.569_840_29).sin().reshape(shape)
    }

    /// Parameters as a small network has them: channels-last convolution
    /// weights (a 1x1 one among them), a linear layer, a norm layer's
    /// weight and zero bias, a 0-d scale, and a zero weight (trust ratio 1).
    fn network_parameters() -> Vec<(String, Tensor, bool)> {
        let channels_last = |t: Tensor| t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2]);
        let float = (Kind::Float, tch::Device::Cpu);
        [
            ("conv1.weight", channels_last(pseudo_random(&[8, 3, 3, 3], 1)), true),
            ("conv2.weight", channels_last(pseudo_random(&[16, 8, 1, 1], 2)), true),
            ("bn.weight", Tensor::ones([8], float), false),
            ("bn.bias", Tensor::zeros([8], float), false),
            ("fc.weight", pseudo_random(&[10, 16], 3), true),
            ("fc.bias", pseudo_random(&[10], 4), false),
            ("scale", Tensor::from(0.5f32), false),
            ("zero.weight", Tensor::zeros([4, 4], float), true),
        ]
        .into_iter()
        .map(|(name, t, decays)| (name.to_string(), t.set_requires_grad(true), decays))
        .collect()
    }

    /// Gives every parameter the gradient of sum(p * r), r in [-3, 3] from
    /// `seed` (large enough that the clipping acts), in the logical order
    /// whatever the parameter's layout.
    fn set_gradients(lamb: &mut Lamb, seed: i64) {
        lamb.zero_grad().unwrap();
        let loss = lamb
            .parameters()
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let r = pseudo_random(&p.size(), seed * 31 + i as i64) * 3.0;
                (p * r).sum(Kind::Float)
            })
            .reduce(|a, b| a + b)
            .unwrap();
        loss.backward();
    }

    /// The largest difference between the two optimizers' parameters and
    /// moments, relative to the largest magnitude of each tensor.
    fn largest_difference(a: &Lamb, b: &Lamb) -> f64 {
        let tensors = |l: &Lamb| {
            l.parameters().into_iter().chain(l.state_tensors().into_iter().map(|(_, t)| t))
        };
        tensors(a)
            .zip(tensors(b))
            .map(|(x, y)| {
                let scale = x.abs().max().double_value(&[]).max(1e-12);
                (x - y).abs().max().double_value(&[]) / scale
            })
            .fold(0.0, f64::max)
    }

    #[test]
    fn the_packed_update_equals_the_per_tensor_update() {
        let mut configs = vec![config(0.02)];
        configs.push(LambOptimizer {
            weight_decay: 0.05,
            max_grad_norm: None,
            trust_clip: true,
            always_adapt: true,
            ..config(0.05)
        });
        for config in configs {
            let build = |path| {
                let mut lamb = Lamb::from_parameters(network_parameters(), &config).unwrap();
                lamb.set_update_path(path);
                lamb
            };
            let mut per_tensor = build(UpdatePath::PerTensor);
            let mut packed = build(UpdatePath::Packed);
            let before = packed.parameters().iter().map(Tensor::copy).collect::<Vec<_>>();
            let mut resumed = None;
            for update in 0..6i64 {
                for lamb in [&mut per_tensor, &mut packed] {
                    set_gradients(lamb, 100 + update);
                }
                if update == 3 {
                    // A non-finite gradient: neither changes anything.
                    let kept = packed.parameters().iter().map(Tensor::copy).collect::<Vec<_>>();
                    let _ = packed.groups[1].params[0].param.grad().get(0).fill_(f64::NAN);
                    let _ = per_tensor.groups[1].params[0].param.grad().get(0).fill_(f64::NAN);
                    let step = packed.step_unless_nonfinite(0.01, None).unwrap();
                    assert!(!step.applied.is_nonzero());
                    assert!(kept.iter().zip(packed.parameters()).all(|(a, b)| a.equal(&b)));
                    per_tensor.step_unless_nonfinite(0.01, None).unwrap();
                } else {
                    packed.step_unless_nonfinite(0.01, None).unwrap();
                    per_tensor.step_unless_nonfinite(0.01, None).unwrap();
                }
                assert_eq!(packed.groups_packed_last_update(), 2, "both groups packed");
                assert_eq!(per_tensor.groups_packed_last_update(), 0);
                if let Some(resumed) = &mut resumed {
                    set_gradients(resumed, 100 + update);
                    if update == 3 {
                        let _ = resumed.groups[1].params[0].param.grad().get(0).fill_(f64::NAN);
                    }
                    resumed.step_unless_nonfinite(0.01, None).unwrap();
                    assert_eq!(resumed.groups_packed_last_update(), 2);
                }
                if update == 1 {
                    // Restored moments land in the packed buffers.
                    let mut fresh = build(UpdatePath::Packed);
                    for (a, b) in fresh.parameters().iter_mut().zip(per_tensor.parameters()) {
                        tch::no_grad(|| a.copy_(&b));
                    }
                    fresh
                        .load_state(per_tensor.state_tensors(), &per_tensor.steps().unwrap())
                        .unwrap();
                    resumed = Some(fresh);
                }
                let difference = largest_difference(&packed, &per_tensor);
                assert!(difference < 1e-5, "update {update}: they differ by {difference:e}");
            }
            assert_eq!(packed.steps().unwrap(), per_tensor.steps().unwrap());
            assert_eq!(packed.steps().unwrap(), LambSteps { group_steps: vec![5, 5] });
            let resumed = resumed.unwrap();
            let difference = largest_difference(&resumed, &per_tensor);
            assert!(difference < 1e-5, "the resumed one differs by {difference:e}");
            let moved = before.iter().zip(packed.parameters()).filter(|(a, b)| !a.equal(b)).count();
            // The zero weight too: its trust ratio is 1.
            assert_eq!(moved, before.len(), "every parameter moves");
        }
    }

    #[test]
    fn a_parameter_given_another_layout_sends_its_group_the_per_tensor_way() {
        let mut packed = Lamb::from_parameters(network_parameters(), &config(0.02)).unwrap();
        packed.set_update_path(UpdatePath::Packed);
        let mut per_tensor = Lamb::from_parameters(network_parameters(), &config(0.02)).unwrap();
        assert_eq!(per_tensor.update_path(), UpdatePath::PerTensor, "the default on a CPU");
        // conv1.weight becomes contiguous, as a model's to_channels_last()
        // would change it the other way after the optimizer was built.
        let mut conv = packed.groups[1].params[0].param.shallow_clone();
        let contiguous = conv.contiguous();
        conv.set_data(&contiguous);
        for update in 0..3 {
            for lamb in [&mut per_tensor, &mut packed] {
                set_gradients(lamb, 7 + update);
                lamb.step(0.01).unwrap();
            }
            assert_eq!(packed.groups_packed_last_update(), 1, "only the no-decay group");
            let difference = largest_difference(&packed, &per_tensor);
            assert!(difference < 1e-5, "they differ by {difference:e}");
        }
    }

    #[test]
    fn flat_views_follow_memory_order() {
        let t = Tensor::arange(120, (Kind::Float, tch::Device::Cpu)).view([2, 3, 4, 5]);
        assert_eq!(memory_order(&t), Some(vec![0, 1, 2, 3]));
        let last = t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2]);
        let order = memory_order(&last).unwrap();
        assert_eq!(order, [0, 2, 3, 1]);
        let layout = Layout::of(&last).unwrap();
        let flat = layout.flat(&last).unwrap();
        assert!(flat.equal(&last.permute([0, 2, 3, 1]).reshape([-1])), "memory order");
        let back = layout.view_of(&flat).unwrap();
        assert!(back.equal(&last) && layout.fits(&back));
        assert!(!layout.fits(&t), "contiguous and channels-last differ");
        let contiguous = Layout::of(&t).unwrap();
        assert!(contiguous.flat(&t).unwrap().equal(&t.reshape([-1])));
        let row = Tensor::arange(5, (Kind::Float, tch::Device::Cpu));
        assert!(Layout::of(&row).unwrap().flat(&row).unwrap().equal(&row));
        assert_eq!(memory_order(&t.slice(3, 0, 5, 2)), None, "every other element");
        assert_eq!(memory_order(&t.get(0).expand([2, 3, 4, 5], false)), None, "overlapping");
    }
}
