//! A built model: its variables (a tch `VarStore` with timm's key names), the
//! network that uses them, and the bookkeeping timm's state dict carries.

use crate::error::VisionError;
use crate::layers::ForwardCtx;
use crate::registry::{find_model, ModelSpec};
use tch::{nn, Device, Kind, TchError, Tensor};

/// The forward pass of a model family over variables it created at build time.
pub trait Network: Send + std::fmt::Debug {
    /// Maps a float NCHW batch to logits `[N, num_classes]`.
    fn forward(&self, xs: &Tensor, ctx: &ForwardCtx) -> Result<Tensor, TchError>;

    /// Parameter names that timm's `model.no_weight_decay()` excludes from weight
    /// decay, on top of the default rule (1-D tensors and biases).
    fn no_weight_decay(&self) -> Vec<String> {
        Vec::new()
    }

    /// The stochastic-depth rate of every residual block in block order (0 for
    /// a block timm builds without `DropPath`), for checking the per-family rule.
    fn drop_path_rates(&self) -> Vec<f64> {
        Vec::new()
    }
}

/// Options that change a model's variables or its training-time behaviour.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Classifier outputs.
    pub num_classes: i64,
    /// Input channels.
    pub in_chans: i64,
    /// Stochastic-depth rate of the last block (timm's `drop_path_rate`).
    pub drop_path_rate: f64,
    /// Start the last BN of each residual branch at gamma = 0 (the ResNet and
    /// RegNet families, as timm's `zero_init_last`; EfficientNet and ViT have none).
    pub zero_init_last: bool,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig { num_classes: 1000, in_chans: 3, drop_path_rate: 0.0, zero_init_last: true }
    }
}

/// Training or inference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardMode {
    /// Batch statistics, stochastic depth on; counts `num_batches_tracked`.
    Train,
    /// Running statistics, deterministic.
    Eval,
}

/// Suffix timm's BN layers carry in their state dict besides the four tensors.
const NUM_BATCHES_TRACKED: &str = "num_batches_tracked";

/// A registered model with its variables on one device.
#[derive(Debug)]
pub struct Model {
    spec: &'static ModelSpec,
    config: ModelConfig,
    vs: nn::VarStore,
    net: Box<dyn Network>,
    compute_kind: Kind,
    /// timm keeps one counter per BN layer; they always move together.
    num_batches_tracked: i64,
    /// Trainable variables in creation order: timm's `named_parameters`
    /// order, except that a ResNet block creates its `downsample` first
    /// (timm lists it after `bn3`).
    parameters: Vec<(String, Tensor)>,
    /// Running statistics, sorted by name.
    buffers: Vec<(String, Tensor)>,
    /// Prefixes of the BN layers (for the `num_batches_tracked` keys).
    batch_norms: Vec<String>,
}

/// Most classes a model may have, as a recipe's `model.num_classes`
/// (`rsb_recipes::MAX_CLASSES`): far more would only fail to allocate the
/// classifier, with a panic inside libtorch's bindings.
pub const MAX_NUM_CLASSES: i64 = 1_000_000;

impl Model {
    /// Builds the registered model `name` with freshly initialised variables.
    pub fn new(name: &str, config: ModelConfig, device: Device) -> Result<Model, VisionError> {
        let spec = find_model(name)?;
        if config.num_classes < 1 || config.in_chans < 1 {
            return Err(VisionError::InvalidConfig(format!(
                "num_classes ({}) and in_chans ({}) must be at least 1",
                config.num_classes, config.in_chans
            )));
        }
        if config.num_classes > MAX_NUM_CLASSES {
            return Err(VisionError::InvalidConfig(format!(
                "num_classes ({}) must be at most {MAX_NUM_CLASSES}",
                config.num_classes
            )));
        }
        if !(0.0..1.0).contains(&config.drop_path_rate) {
            return Err(VisionError::InvalidConfig(format!(
                "drop_path_rate must be in [0, 1), got {}",
                config.drop_path_rate
            )));
        }
        let vs = nn::VarStore::new(device);
        let net = (spec.build)(&vs.root(), &config);
        let named = vs.variables();
        let by_ptr: std::collections::HashMap<usize, &String> =
            named.iter().map(|(name, t)| (t.data_ptr() as usize, name)).collect();
        let parameters: Vec<(String, Tensor)> = vs
            .trainable_variables()
            .into_iter()
            .map(|t| (by_ptr[&(t.data_ptr() as usize)].clone(), t))
            .collect();
        let mut buffers: Vec<(String, Tensor)> =
            named.into_iter().filter(|(_, t)| !t.requires_grad()).collect();
        buffers.sort_by(|a, b| a.0.cmp(&b.0));
        let batch_norms = buffers
            .iter()
            .filter_map(|(name, _)| name.strip_suffix(".running_mean").map(str::to_string))
            .collect();
        Ok(Model {
            spec,
            config,
            vs,
            net,
            compute_kind: Kind::Float,
            num_batches_tracked: 0,
            parameters,
            buffers,
            batch_norms,
        })
    }

    /// The registry entry this model was built from.
    pub fn spec(&self) -> &'static ModelSpec {
        self.spec
    }

    /// The options it was built with.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The device holding the variables.
    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Computes in `kind` (`Float`, or `BFloat16` for mixed precision on a GPU);
    /// the variables themselves stay `f32`.
    pub fn set_compute_kind(&mut self, kind: Kind) {
        self.compute_kind = kind;
    }

    /// Stores every 4-D variable (convolution weights) in channels-last memory
    /// order, so that NHWC inputs run channels-last kernels end to end.
    pub fn to_channels_last(&mut self) -> Result<(), VisionError> {
        for (_, t) in self.parameters.iter_mut().chain(self.buffers.iter_mut()) {
            if t.dim() == 4 {
                let nhwc = t.f_permute([0, 2, 3, 1])?.f_contiguous()?.f_permute([0, 3, 1, 2])?;
                t.f_set_data(&nhwc)?;
            }
        }
        Ok(())
    }

    /// Runs the network on a float NCHW batch and returns `f32` logits.
    pub fn forward(&mut self, xs: &Tensor, mode: ForwardMode) -> Result<Tensor, VisionError> {
        let train = mode == ForwardMode::Train;
        let ctx = ForwardCtx { train, compute_kind: self.compute_kind };
        let input = ctx.cast(xs)?;
        let logits = crate::layers::cast(&self.net.forward(&input, &ctx)?, Kind::Float)?;
        if train {
            self.num_batches_tracked += 1;
        }
        Ok(logits)
    }

    /// Trainable variables in creation order (timm's `named_parameters()`
    /// order, but for a ResNet block's `downsample`, which comes first here).
    /// The names, not the order, are what checkpoints and timm share.
    pub fn named_parameters(&self) -> &[(String, Tensor)] {
        &self.parameters
    }

    /// Non-trainable tensors (BN running statistics).
    pub fn named_buffers(&self) -> &[(String, Tensor)] {
        &self.buffers
    }

    /// Number of trainable scalars, as timm's `sum(p.numel() for p in model.parameters())`.
    pub fn parameter_count(&self) -> i64 {
        self.parameters.iter().map(|(_, t)| t.numel() as i64).sum()
    }

    /// Whether timm's `param_groups_weight_decay` puts `name` in the no-decay
    /// group: 1-D tensors, biases, and the model's own `no_weight_decay()` list.
    pub fn excluded_from_weight_decay(&self, name: &str, tensor: &Tensor) -> bool {
        tensor.dim() <= 1
            || name.ends_with(".bias")
            || self.net.no_weight_decay().iter().any(|n| n == name)
    }

    /// The stochastic-depth rate of every residual block, in block order.
    pub fn drop_path_rates(&self) -> Vec<f64> {
        self.net.drop_path_rates()
    }

    /// BN batches seen in training (timm's `num_batches_tracked`).
    pub fn num_batches_tracked(&self) -> i64 {
        self.num_batches_tracked
    }

    /// Sets the count of BN batches seen in training (a sampler stream's
    /// own count, when a trainer keeps the statistics of several).
    pub fn set_num_batches_tracked(&mut self, count: i64) {
        self.num_batches_tracked = count;
    }

    /// The full state dict with timm's keys: parameters, running statistics
    /// and one `num_batches_tracked` per BN layer.
    pub fn state_dict(&self) -> Result<Vec<(String, Tensor)>, VisionError> {
        let mut entries: Vec<(String, Tensor)> = Vec::new();
        for (name, t) in self.parameters.iter().chain(self.buffers.iter()) {
            entries.push((name.clone(), t.shallow_clone()));
        }
        let counter = Tensor::from(self.num_batches_tracked);
        for bn in &self.batch_norms {
            entries.push((format!("{bn}.{NUM_BATCHES_TRACKED}"), counter.copy()));
        }
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(entries)
    }

    /// Copies a state dict into the variables. Every parameter and running
    /// statistic must be present with the right shape and a floating-point
    /// type (cast to `f32`: timm's half-precision weights load), and nothing
    /// else may be; `num_batches_tracked` keys are optional and, as in
    /// torch, scalars. Every problem names `source` and the key.
    pub fn load_state_dict(
        &mut self,
        entries: Vec<(String, Tensor)>,
        source: &std::path::Path,
    ) -> Result<(), VisionError> {
        let mismatch =
            |problem: String| VisionError::WeightsMismatch { path: source.to_path_buf(), problem };
        let mut incoming: std::collections::BTreeMap<String, Tensor> =
            entries.into_iter().collect();
        let mut tracked = None;
        let mut misshaped = Vec::new();
        let mut mistyped = Vec::new();
        for bn in &self.batch_norms {
            let key = format!("{bn}.{NUM_BATCHES_TRACKED}");
            let Some(t) = incoming.remove(&key) else { continue };
            // Read as one integer: anything but one value would make
            // libtorch fail without naming the key. One value of shape [1]
            // is taken, as torch's `load_state_dict` takes it (older saves).
            if t.numel() != 1 {
                misshaped.push(format!("{key}: file has {:?}, a scalar is expected", t.size()));
            } else if t.is_complex() || t.kind() == Kind::Bool {
                mistyped.push(format!("{key}: file has {:?}, an integer is expected", t.kind()));
            } else {
                // A float counter is read as its value: one that is not a
                // count (NaN, infinite, negative, beyond i64) is named, where
                // libtorch's conversion failed without the key.
                let value = t.reshape([]).f_double_value(&[])?;
                if value.is_finite() && (0.0..9.2e18).contains(&value) {
                    tracked = Some(t.reshape([]).f_int64_value(&[])?);
                } else {
                    mistyped.push(format!("{key}: file has {value}, a count is expected"));
                }
            }
        }
        let mut missing = Vec::new();
        let mut pairs = Vec::new();
        let mut nonfinite = Vec::new();
        for (name, target) in self.parameters.iter().chain(self.buffers.iter()) {
            match incoming.remove(name) {
                None => missing.push(name.clone()),
                Some(src) if src.size() != target.size() => misshaped.push(format!(
                    "{name}: file has {:?}, model has {:?}",
                    src.size(),
                    target.size()
                )),
                // An integer tensor would be cast into the weights without a
                // word: it is not a float model's state.
                Some(src) if target.is_floating_point() && !src.is_floating_point() => mistyped
                    .push(format!(
                        "{name}: file has {:?}, model has {:?}",
                        src.kind(),
                        target.kind()
                    )),
                Some(src) => {
                    if src.is_floating_point()
                        && src.f_isfinite()?.f_all()?.f_int64_value(&[])? == 0
                    {
                        nonfinite.push(name.clone());
                    }
                    pairs.push((target.shallow_clone(), src))
                }
            }
        }
        let unexpected: Vec<String> = incoming.into_keys().collect();
        let mut problems = Vec::new();
        if !missing.is_empty() {
            problems.push(format!("missing keys: {}", abbreviate(&missing)));
        }
        if !unexpected.is_empty() {
            problems.push(format!("unexpected keys: {}", abbreviate(&unexpected)));
            // A state dict saved from a wrapped model: DDP's `module.`, or
            // `torch.compile`'s `_orig_mod.` (timm's `clean_state_dict`
            // strips both).
            for prefix in ["module.", "_orig_mod."] {
                if !missing.is_empty() && unexpected.iter().all(|k| k.starts_with(prefix)) {
                    problems.push(format!(
                        "every unexpected key starts with `{prefix}`: the file holds a wrapped \
                         model's state dict; save the model inside the wrapper, or strip the \
                         prefix (timm's `clean_state_dict` does)"
                    ));
                }
            }
        }
        if !misshaped.is_empty() {
            problems.push(format!("shape mismatch: {}", abbreviate(&misshaped)));
        }
        if !mistyped.is_empty() {
            problems.push(format!("type mismatch: {}", abbreviate(&mistyped)));
        }
        if !problems.is_empty() {
            return Err(mismatch(format!(
                "does not fit `{}` with {} classes ({})",
                self.spec.name,
                self.config.num_classes,
                problems.join("; ")
            )));
        }
        if !nonfinite.is_empty() {
            // They would evaluate to NaN, or fail a resumed run as diverged.
            return Err(mismatch(format!(
                "non-finite values (NaN or infinity) in {}",
                abbreviate(&nonfinite)
            )));
        }
        tch::no_grad(|| -> Result<(), TchError> {
            for (mut target, src) in pairs {
                target.f_copy_(&src.f_to_kind(Kind::Float)?)?;
            }
            Ok(())
        })?;
        if let Some(n) = tracked {
            self.num_batches_tracked = n;
        }
        Ok(())
    }
}

/// Joins up to eight items and says how many more there are.
fn abbreviate(items: &[String]) -> String {
    const SHOWN: usize = 8;
    let mut text = items.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
    if items.len() > SHOWN {
        text.push_str(&format!(" and {} more", items.len() - SHOWN));
    }
    text
}
