//! The recipe schema: one strict struct per section, every struct
//! `deny_unknown_fields`, enums externally tagged (`optimizer: {lamb: {...}}`).
//!
//! A recipe is a whole run: model, data, augmentation, loss, optimizer,
//! schedule, batch layout and runtime knobs. A new feature is a new field
//! here, not a new command-line flag.
//!
//! serde_norway reads an externally tagged enum only from a YAML tag
//! (`!lamb`), not from a single-key mapping, unless the deserializer is wrapped
//! in `serde_norway::with::singleton_map_recursive`. [`crate::load`],
//! [`crate::load_str`] and [`crate::to_yaml`] do that: use them rather than
//! `serde_norway::from_str::<Recipe>`. (JSON's default enum form is already
//! the single-key mapping.)

use serde::{Deserialize, Serialize};

/// A complete training recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Human-readable name of the recipe (`resnet50_a1`).
    pub name: String,
    /// Seed of every random stream (init, sampler, augmentation, mixup, drop-path).
    #[serde(default)]
    pub seed: u64,
    /// The network.
    pub model: ModelSection,
    /// Where the images are.
    pub data: DataSection,
    /// Training-time augmentation of each image.
    pub augment: AugmentSection,
    /// Mixup / CutMix over each micro-batch; absent = off.
    #[serde(default)]
    pub mixup: Option<MixupSection>,
    /// Training loss.
    pub loss: LossSection,
    /// Optimizer.
    pub optimizer: OptimizerSection,
    /// Learning-rate schedule (its length is the training length).
    pub schedule: ScheduleSection,
    /// How the global batch is split.
    pub batch: BatchSection,
    /// Evaluation.
    pub eval: EvalSection,
    /// Precision, memory layout, logging, checkpoints.
    #[serde(default)]
    pub runtime: RuntimeSection,
    /// Collectives between the ranks of a job: backend and timeout.
    #[serde(default)]
    pub distributed: DistributedSection,
}

/// The network and its training-time regularisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// timm name (`resnet50`).
    pub name: String,
    /// Classifier outputs; must equal the number of class folders.
    pub num_classes: u32,
    /// Stochastic depth rate of the last block (linear from 0 over blocks).
    #[serde(default)]
    pub drop_path_rate: f64,
    /// Zero-init the last BN gamma of each residual branch.
    #[serde(default = "default_true")]
    pub zero_init_last: bool,
}

/// The dataset: an ImageNet-layout folder (`ROOT/train/<class>/*`, `ROOT/val/<class>/*`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Folder holding the splits.
    pub root: String,
    /// Training split folder under `root`.
    #[serde(default = "default_train_split")]
    pub train_split: String,
    /// Validation split folder under `root`.
    #[serde(default = "default_val_split")]
    pub val_split: String,
    /// Per-channel mean in [0, 1] (timm's `IMAGENET_DEFAULT_MEAN`).
    #[serde(default = "default_mean")]
    pub mean: [f64; 3],
    /// Per-channel std in [0, 1] (timm's `IMAGENET_DEFAULT_STD`).
    #[serde(default = "default_std")]
    pub std: [f64; 3],
    /// Decoding threads; 0 = the cores this process may use, divided by
    /// `LOCAL_WORLD_SIZE` (the ranks on this host) when set.
    #[serde(default)]
    pub loader_threads: u32,
    /// Micro-batches decoded ahead of the trainer (bounded queue).
    #[serde(default = "default_prefetch")]
    pub prefetch_batches: u32,
    /// Decode a training JPEG at 1/2, 1/4 or 1/8 scale (in the DCT) when its
    /// random crop stays at least the input size at that scale: faster on
    /// large photos, but pixels differ slightly from timm's full-size decode
    /// and resize (docs/data.md). Evaluation always decodes at full size.
    #[serde(default = "default_true")]
    pub scaled_decode: bool,
}

/// Resampling filter, with timm's `random` (bilinear or bicubic per image).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Interpolation {
    /// PIL bilinear (antialiased when downscaling).
    Bilinear,
    /// PIL bicubic (a = -0.5, antialiased when downscaling).
    Bicubic,
    /// Bilinear or bicubic, chosen uniformly per image (timm's train default).
    Random,
}

/// RandomResizedCrop, flip and RandAugment, in timm's order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AugmentSection {
    /// Output side of the random crop, in pixels.
    pub input_size: u32,
    /// Crop area range as a fraction of the image.
    #[serde(default = "default_scale")]
    pub scale: [f64; 2],
    /// Crop aspect-ratio range.
    #[serde(default = "default_ratio")]
    pub ratio: [f64; 2],
    /// Resampling filter of the crop (and of RandAugment's geometric ops).
    #[serde(default = "default_train_interpolation")]
    pub interpolation: Interpolation,
    /// Horizontal flip probability.
    #[serde(default = "default_hflip")]
    pub hflip: f64,
    /// timm RandAugment string (`rand-m7-mstd0.5-inc1`); absent = off.
    #[serde(default)]
    pub rand_augment: Option<String>,
}

/// How Mixup and CutMix are applied (timm's `Mixup`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MixupMode {
    /// One lambda and one box for the whole micro-batch.
    Batch,
    /// Independent lambda per sample.
    Elem,
}

/// Mixup / CutMix (timm `Mixup`: reversed-batch pairing, corrected lambda).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixupSection {
    /// Beta(alpha, alpha) for Mixup; 0 = off.
    pub mixup_alpha: f64,
    /// Beta(alpha, alpha) for CutMix; 0 = off.
    pub cutmix_alpha: f64,
    /// Probability of mixing a batch at all.
    #[serde(default = "default_one")]
    pub prob: f64,
    /// Probability of CutMix instead of Mixup when both are on.
    #[serde(default = "default_switch_prob")]
    pub switch_prob: f64,
    /// Per batch or per element.
    #[serde(default = "default_mixup_mode")]
    pub mode: MixupMode,
    /// Label smoothing applied to the mixed targets.
    #[serde(default)]
    pub label_smoothing: f64,
}

/// Training loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum LossSection {
    /// timm `BinaryCrossEntropy` over (mixed) soft targets.
    Bce(BceLoss),
    /// Softmax cross-entropy over (mixed) soft targets.
    CrossEntropy(CrossEntropyLoss),
}

/// timm `BinaryCrossEntropy`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BceLoss {
    /// Targets above this become 1, the rest 0; absent = soft targets.
    #[serde(default)]
    pub target_threshold: Option<f64>,
    /// Label smoothing used when Mixup is off (Mixup smooths its own targets).
    #[serde(default)]
    pub smoothing: f64,
}

/// Softmax cross-entropy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CrossEntropyLoss {
    /// Label smoothing used when Mixup is off.
    #[serde(default)]
    pub smoothing: f64,
}

/// Optimizer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum OptimizerSection {
    /// timm `Lamb`.
    Lamb(LambOptimizer),
}

/// timm `Lamb` with its defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LambOptimizer {
    /// Peak learning rate (absolute, not scaled by batch size).
    pub lr: f64,
    /// Weight decay of the decay group (conv/linear weights).
    pub weight_decay: f64,
    /// Adam betas.
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    /// Adam epsilon.
    #[serde(default = "default_lamb_eps")]
    pub eps: f64,
    /// Global gradient-norm clip applied inside the step; absent = none.
    #[serde(default = "default_max_grad_norm")]
    pub max_grad_norm: Option<f64>,
    /// Clip the trust ratio at 1 (timm's `lambc`).
    #[serde(default)]
    pub trust_clip: bool,
    /// Apply the trust ratio to the no-decay group as well.
    #[serde(default)]
    pub always_adapt: bool,
}

/// Learning-rate schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ScheduleSection {
    /// timm `CosineLRScheduler` with linear warmup, stepped per epoch or per
    /// optimizer update (`step_on`).
    Cosine(CosineSchedule),
}

impl Recipe {
    /// The epochs a run of this recipe trains: the schedule's, cooldown
    /// included.
    pub fn total_epochs(&self) -> u64 {
        let ScheduleSection::Cosine(c) = &self.schedule;
        u64::from(c.epochs) + u64::from(c.cooldown_epochs)
    }
}

/// When the schedule advances: timm's `t_in_epochs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepOn {
    /// Once per epoch, the learning rate constant within it, warmup included:
    /// timm v0.5.x, the RSB-era code (`t_in_epochs=True`).
    Epoch,
    /// After every optimizer update: timm's later `--sched-on-updates`
    /// (`t_in_epochs=False`).
    Update,
}

/// timm `CosineLRScheduler` (cycle_limit 1, k_decay 1, warmup_prefix false).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "CosineScheduleFields")]
pub struct CosineSchedule {
    /// Length of the cosine, in epochs (timm's `t_initial`).
    pub epochs: u32,
    /// Linear warmup from `warmup_lr` to the peak, in epochs.
    pub warmup_epochs: f64,
    /// Learning rate at the first update.
    pub warmup_lr: f64,
    /// Floor of the cosine.
    pub min_lr: f64,
    /// Extra epochs at `min_lr` after the cosine (timm's `--cooldown-epochs`).
    pub cooldown_epochs: u32,
    /// Per epoch (timm v0.5.x) or per optimizer update. Required: the two
    /// give different runs, so a recipe must say which it follows.
    pub step_on: StepOn,
}

/// [`CosineSchedule`] as read, before the required `step_on` is checked (so
/// that its absence is refused with the choices, not serde's bare
/// "missing field").
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CosineScheduleFields {
    epochs: u32,
    warmup_epochs: f64,
    warmup_lr: f64,
    min_lr: f64,
    #[serde(default)]
    cooldown_epochs: u32,
    #[serde(default)]
    step_on: Option<StepOn>,
}

impl TryFrom<CosineScheduleFields> for CosineSchedule {
    type Error = String;

    fn try_from(fields: CosineScheduleFields) -> Result<CosineSchedule, String> {
        let step_on = fields.step_on.ok_or_else(|| {
            "missing field `step_on`: choose `epoch` (the learning rate constant within \
             each epoch, timm v0.5.x's t_in_epochs=True) or `update` (a new learning \
             rate after every optimizer update, t_in_epochs=False)"
                .to_owned()
        })?;
        Ok(CosineSchedule {
            epochs: fields.epochs,
            warmup_epochs: fields.warmup_epochs,
            warmup_lr: fields.warmup_lr,
            min_lr: fields.min_lr,
            cooldown_epochs: fields.cooldown_epochs,
            step_on,
        })
    }
}

/// How the global batch is made of micro-batches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchSection {
    /// Images per optimizer update, over all ranks and accumulation steps.
    pub global_size: u32,
    /// Images per forward pass; BN statistics and Mixup pairs are per
    /// micro-batch, as timm's per-GPU batch. `global_size / micro_size`
    /// sampler streams exist whatever the world size.
    pub micro_size: u32,
    /// Repeated augmentation: copies of each sampled image per epoch (1 = off).
    #[serde(default = "default_repeats")]
    pub repeated_augmentation: u32,
}

/// Evaluation after each epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    /// Centre-crop side, in pixels.
    pub input_size: u32,
    /// Fraction kept by the centre crop: resize the shorter side to
    /// `floor(input_size / crop_pct)` first.
    pub crop_pct: f64,
    /// Resampling filter of the resize.
    #[serde(default = "default_eval_interpolation")]
    pub interpolation: Interpolation,
    /// Images per evaluation forward pass.
    pub batch_size: u32,
    /// Evaluate every this many epochs (and after the last).
    #[serde(default = "default_one_u32")]
    pub every_epochs: u32,
    /// Further evaluation sets (ImageNet-ReaL, ImageNet-V2, ...), each
    /// reported with its own top-1/top-5 next to the validation split's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sets: Vec<EvalSetSection>,
}

/// Layout and scoring of an extra evaluation set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvalSetKind {
    /// Class folders in timm's natural order (or a folder of tar shards),
    /// scored against each image's class.
    Folder,
    /// ImageNet-V2: class folders named `0`..`999`, the name being the index.
    V2,
    /// A flat folder of images plus `labels`, a label file
    /// (`file<TAB>class` lines, or Kaggle's `LOC_val_solution.csv`).
    Labelled,
    /// ImageNet-ReaL: the ImageNet validation images (flat, class folders or
    /// shards) scored against `labels`, a `real.json` (timm's `RealLabelsImagenet`).
    Real,
}

/// An extra evaluation set (`eval.sets`). Relative paths are taken relative to `data.root`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSetSection {
    /// Name in metrics and reports (`real`, `v2`); unique, not `val`.
    pub name: String,
    /// Layout and scoring.
    pub kind: EvalSetKind,
    /// Folder of the images.
    pub root: String,
    /// Label file: required for `labelled` and `real`, refused otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<String>,
    /// When it is evaluated: with every evaluation of the validation split,
    /// or only after the last epoch (the RSB recipes' ReaL and V2).
    #[serde(default)]
    pub at: EvalSetTiming,
}

/// When an extra evaluation set is evaluated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvalSetTiming {
    /// Whenever the validation split is evaluated (`eval.every_epochs`).
    #[default]
    EveryEvaluation,
    /// Only after the last epoch.
    End,
}

/// Numeric precision of the forward/backward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// bf16 activations on a GPU, and on a CPU with native bf16 (AVX512-BF16 or
    /// AMX, unless capped by `ONEDNN_MAX_CPU_ISA`/`ATEN_CPU_CAPABILITY`); f32 elsewhere.
    Auto,
    /// f32 everywhere.
    Fp32,
    /// bf16 activations, on a GPU or a CPU (fast on CPUs with AVX512-BF16 or AMX).
    Bf16,
    /// fp16 activations with dynamic loss scaling (the paper's AMP: torch's
    /// `GradScaler` with its defaults, initial scale 65536, growth factor
    /// 2 every 2000 applied updates, backoff 0.5 on a non-finite gradient);
    /// meant for GPUs (libtorch's CPU fp16 kernels are slow).
    Fp16,
}

/// Runtime knobs that do not change the maths (except precision).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeSection {
    /// Mixed precision.
    #[serde(default = "default_precision")]
    pub precision: Precision,
    /// Channels-last (NHWC) memory layout, on GPUs and CPUs: speed only, the
    /// maths is the same up to float rounding.
    #[serde(default = "default_true")]
    pub channels_last: bool,
    /// One metrics line every this many optimizer updates.
    #[serde(default = "default_log_every")]
    pub log_every_steps: u32,
    /// Checkpoints kept (the newest ones; the best by validation top-1 is kept too).
    #[serde(default = "default_keep_last")]
    pub keep_last_checkpoints: u32,
    /// libtorch intra-op threads on a CPU; 0 = libtorch's default.
    #[serde(default)]
    pub torch_threads: u32,
    /// An update whose global gradient norm is NaN or infinite is skipped
    /// (counted in the metrics); this many in a row stop the run (at least 1).
    #[serde(default = "default_max_nonfinite_updates")]
    pub max_nonfinite_updates: u32,
    /// Also write a checkpoint every this many optimizer updates (counted
    /// over the run), mid-epoch, with the sampler position; 0 = at epoch
    /// ends only. Resumes (at any world size the batch plan allows) lose at
    /// most this many updates.
    #[serde(default)]
    pub checkpoint_every_updates: u32,
}

impl Default for RuntimeSection {
    fn default() -> Self {
        RuntimeSection {
            precision: default_precision(),
            channels_last: true,
            log_every_steps: default_log_every(),
            keep_last_checkpoints: default_keep_last(),
            torch_threads: 0,
            max_nonfinite_updates: default_max_nonfinite_updates(),
            checkpoint_every_updates: 0,
        }
    }
}

/// Which collective backend the ranks of a job use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CollectiveBackend {
    /// NCCL on CUDA ranks, the TCP ring on CPU ranks.
    Auto,
    /// The TCP ring (CPU ranks; CUDA tensors are staged through pinned host memory).
    Ring,
    /// NCCL (CUDA ranks only).
    Nccl,
}

/// Collectives between the ranks of a job (ignored by a single-process run).
/// None of these fields changes the maths, except `gradient_compression`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistributedSection {
    /// Collective backend: `auto` (NCCL on CUDA, the ring on CPU), `ring` or `nccl`.
    #[serde(default = "default_backend")]
    pub backend: CollectiveBackend,
    /// Seconds a rank waits for its peers inside one collective before it
    /// gives up with an error naming the collective and the peer (at least 1;
    /// the default 600 is torch's NCCL default of 10 minutes).
    #[serde(default = "default_collective_timeout_secs")]
    pub collective_timeout_secs: u64,
    /// Make every collective call even at world size 1 (normally skipped
    /// there): exercises a backend on one device, e.g. NCCL in `bench/gpu.sh`.
    #[serde(default)]
    pub collectives_at_world_size_one: bool,
    /// Reduce each ~25 MB bucket of gradients as soon as the backward pass
    /// has produced it, while the pass still runs (PyTorch DDP's overlap);
    /// off: after the backward pass. Same buckets, same order: same results.
    #[serde(default = "default_true")]
    pub overlap_backward: bool,
    /// Gradient buckets travel compressed: `none` (f32, the default, and
    /// every RSB recipe's) or `bf16` (PyTorch DDP's `bf16_compress_hook`:
    /// each bucket rounded to bf16 before the all-reduce, summed in bf16,
    /// widened back to f32 after; half the bytes on the wire, at bf16's
    /// 8-bit precision on the summed gradients). Changes the maths slightly.
    #[serde(default)]
    pub gradient_compression: GradientCompression,
    /// Each log step names the rank that held the others back (its own
    /// time per update: wall time less the wait for its peers' gradient
    /// sums) and warns when it took at least this many times the other
    /// ranks' median: a straggler (between 1.05 and 1000; default 1.5).
    #[serde(default = "default_straggler_warn_ratio")]
    pub straggler_warn_ratio: f64,
    /// MiB of the fabric probe made before the first update of a run of two
    /// or more ranks: an all-reduce of this size through the gradients' own
    /// path and, on the TCP ring, every link's rate with all links busy at
    /// once (a `fabric` record in `metrics.jsonl`). 0: no probe; at most
    /// 1024; default 25, one gradient bucket.
    #[serde(default = "default_fabric_probe_mib")]
    pub fabric_probe_mib: u32,
    /// The probe warns, naming both ends, when a link carried this many
    /// times less than the other links' median (between 1.05 and 1000;
    /// default 3).
    #[serde(default = "default_slow_link_warn_ratio")]
    pub slow_link_warn_ratio: f64,
    /// The bus bandwidth (GB/s, nccl-tests' definition) this fabric should
    /// deliver, e.g. what `all_reduce_perf` measured on it: the probe warns
    /// when it measures less. Unset (the default): no expectation.
    #[serde(default)]
    pub expected_bus_gb_per_s: Option<f64>,
}

/// How gradient buckets travel between the ranks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GradientCompression {
    /// f32, exact sums.
    #[default]
    None,
    /// bf16 (PyTorch DDP's `bf16_compress_hook`).
    Bf16,
}

impl Default for DistributedSection {
    fn default() -> Self {
        DistributedSection {
            backend: default_backend(),
            collective_timeout_secs: default_collective_timeout_secs(),
            collectives_at_world_size_one: false,
            overlap_backward: true,
            gradient_compression: GradientCompression::None,
            straggler_warn_ratio: default_straggler_warn_ratio(),
            fabric_probe_mib: default_fabric_probe_mib(),
            slow_link_warn_ratio: default_slow_link_warn_ratio(),
            expected_bus_gb_per_s: None,
        }
    }
}

fn default_backend() -> CollectiveBackend {
    CollectiveBackend::Auto
}
fn default_collective_timeout_secs() -> u64 {
    600
}
fn default_straggler_warn_ratio() -> f64 {
    1.5
}
fn default_fabric_probe_mib() -> u32 {
    25
}
fn default_slow_link_warn_ratio() -> f64 {
    3.0
}
fn default_true() -> bool {
    true
}
fn default_one() -> f64 {
    1.0
}
fn default_one_u32() -> u32 {
    1
}
fn default_train_split() -> String {
    "train".into()
}
fn default_val_split() -> String {
    "val".into()
}
/// timm's `IMAGENET_DEFAULT_MEAN`.
pub const IMAGENET_DEFAULT_MEAN: [f64; 3] = [0.485, 0.456, 0.406];
/// timm's `IMAGENET_DEFAULT_STD`.
pub const IMAGENET_DEFAULT_STD: [f64; 3] = [0.229, 0.224, 0.225];
fn default_mean() -> [f64; 3] {
    IMAGENET_DEFAULT_MEAN
}
fn default_std() -> [f64; 3] {
    IMAGENET_DEFAULT_STD
}
fn default_prefetch() -> u32 {
    4
}
fn default_scale() -> [f64; 2] {
    [0.08, 1.0]
}
fn default_ratio() -> [f64; 2] {
    [3.0 / 4.0, 4.0 / 3.0]
}
fn default_train_interpolation() -> Interpolation {
    Interpolation::Random
}
fn default_eval_interpolation() -> Interpolation {
    Interpolation::Bicubic
}
fn default_hflip() -> f64 {
    0.5
}
fn default_switch_prob() -> f64 {
    0.5
}
fn default_mixup_mode() -> MixupMode {
    MixupMode::Batch
}
fn default_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn default_lamb_eps() -> f64 {
    1e-6
}
fn default_max_grad_norm() -> Option<f64> {
    Some(1.0)
}
fn default_repeats() -> u32 {
    1
}
fn default_precision() -> Precision {
    Precision::Auto
}
fn default_log_every() -> u32 {
    50
}
fn default_keep_last() -> u32 {
    2
}
fn default_max_nonfinite_updates() -> u32 {
    3
}
