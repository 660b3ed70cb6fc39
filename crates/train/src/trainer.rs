//! The training loop: builds model, data, optimizer and schedule from a
//! recipe, runs the epochs (one optimizer update = one micro-batch from each
//! sampler stream, gradients accumulated), evaluates, logs `metrics.jsonl`,
//! checkpoints every epoch, and resumes exactly. In one process a rank runs
//! every stream; with [`Distributed`] it runs its share and the gradients,
//! BN statistics and evaluation counts are combined over the ranks.
//!
//! Exact resumption (and the equality of 1 rank x N streams with N ranks x 1
//! stream) rests on three facts: every data-side random draw is keyed by its
//! position in the run (see `rsb_data::pipeline`), libtorch's generator is
//! reseeded from (update, stream) before each micro-batch (drop-path masks),
//! and the checkpoint holds the model, the LAMB moments and the update count.

use crate::batch::Normalizer;
use crate::checkpoint::{self, TrainState};
use crate::ddp::{broadcast_integers, reduce_tensors, sum_scalars, Reduction};
use crate::error::TrainError;
use crate::lamb::Lamb;
use crate::loss::Loss;
use crate::metrics::{MetricsLog, TopK};
use crate::schedule::CosineWithWarmup;
use rsb_collective::Collective;
use rsb_data::dataset::{ImageFolder, Sample};
use rsb_data::eval_sets::{EvalSet, EvalSetKind as DataSetKind, EvalSetSpec};
use rsb_data::image::Filter;
use rsb_data::labels::{Scoring, SetScore};
use rsb_data::loader::default_threads;
use rsb_data::mixup::{MixMode, MixupConfig};
use rsb_data::pipeline::{EvalBatch, EvalData, TrainData};
use rsb_data::rand_augment::{RaInterpolation, RandAugment, RandAugmentConfig};
use rsb_data::rng::{Rng, Stream};
use rsb_data::sampler::{SamplerKind, StreamSampler};
use rsb_data::transforms::{CropInterpolation, EvalTransform, TrainTransform};
use rsb_recipes::schema::{
    EvalSetKind, Interpolation, MixupMode, OptimizerSection, Precision, Recipe, ScheduleSection,
};
use rsb_vision::{ForwardMode, Model, ModelConfig};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// How a run is executed (everything that is not part of the recipe).
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Run folder: `metrics.jsonl`, checkpoints.
    pub out_dir: PathBuf,
    /// Checkpoint (or run folder) to continue from.
    pub resume: Option<PathBuf>,
    /// Training device.
    pub device: Device,
    /// Draw a progress bar (a terminal); plain log lines otherwise.
    pub progress: bool,
    /// Stop after this many optimizer updates in this invocation (smoke tests).
    pub max_updates: Option<u64>,
    /// File of the run folder that gets the metrics records.
    pub metrics_file: String,
    /// Log a checksum of the parameters after every update (replica checks).
    pub checksum_every_update: bool,
}

impl RunOptions {
    /// Options for a single-process run writing `metrics.jsonl` into `out_dir`.
    pub fn new(out_dir: PathBuf, device: Device) -> RunOptions {
        RunOptions {
            out_dir,
            resume: None,
            device,
            progress: false,
            max_updates: None,
            metrics_file: "metrics.jsonl".into(),
            checksum_every_update: false,
        }
    }
}

/// Receives every metrics record (rank 0 forwards them to the coordinator).
pub type MetricsSink = Box<dyn FnMut(&serde_json::Value) + Send>;

/// Hears about each checkpoint written (epoch, folder).
pub type CheckpointSink = Box<dyn FnMut(u64, &Path) + Send>;

/// This process's part in a data-parallel job.
pub struct Distributed {
    /// The collective over all ranks.
    pub collective: Box<dyn Collective>,
    /// Sampler streams this rank runs, in accumulation order.
    pub streams: Vec<usize>,
    /// Metrics records of rank 0.
    pub on_metrics: Option<MetricsSink>,
    /// Checkpoints written by rank 0.
    pub on_checkpoint: Option<CheckpointSink>,
}

impl std::fmt::Debug for Distributed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Distributed")
            .field("rank", &self.collective.rank())
            .field("world_size", &self.collective.world_size())
            .field("streams", &self.streams)
            .finish()
    }
}

/// One finished epoch.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EpochReport {
    /// Epoch (0-based).
    pub epoch: u64,
    /// Optimizer updates done after it.
    pub updates: u64,
    /// Mean training loss over its updates.
    pub train_loss: f64,
    /// Training images per second (loading included, evaluation excluded).
    pub images_per_sec: f64,
    /// Validation top-1 in percent, when evaluated.
    pub top1: Option<f64>,
    /// Validation top-5 in percent, when evaluated.
    pub top5: Option<f64>,
    /// The recipe's further evaluation sets (`eval.sets`), when evaluated.
    pub eval_sets: Vec<SetResult>,
    /// Wall time since the start of this invocation, in seconds.
    pub elapsed_s: f64,
}

/// Accuracy on one further evaluation set.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SetResult {
    /// The set's name (`real`, `v2`, ...).
    pub name: String,
    /// Top-1 in percent.
    pub top1: f64,
    /// Top-5 in percent.
    pub top5: f64,
    /// Images scored.
    pub count: u64,
    /// Images left out (ReaL: no valid label).
    pub excluded: u64,
}

impl SetResult {
    /// The percentages of a score.
    pub fn new(name: &str, score: &SetScore) -> SetResult {
        SetResult {
            name: name.to_string(),
            top1: score.top1_pct(),
            top5: score.top5_pct(),
            count: score.count,
            excluded: score.excluded,
        }
    }
}

/// The result of [`Trainer::run`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunSummary {
    /// Finished epochs of this invocation.
    pub epochs: Vec<EpochReport>,
    /// Optimizer updates done by this invocation.
    pub updates: u64,
    /// Wall time in seconds.
    pub wall_s: f64,
}

fn filter_of(interpolation: Interpolation) -> Option<Filter> {
    match interpolation {
        Interpolation::Bilinear => Some(Filter::Bilinear),
        Interpolation::Bicubic => Some(Filter::Bicubic),
        Interpolation::Random => None,
    }
}

/// timm's RandAugment fill colour: `min(255, round(255 * mean))` per channel.
pub fn fill_colour(mean: [f64; 3]) -> [u8; 3] {
    mean.map(|m| rsb_data::transforms::round_half_even(255.0 * m).clamp(0.0, 255.0) as u8)
}

/// The training transform a recipe describes.
pub fn train_transform(recipe: &Recipe) -> Result<TrainTransform, TrainError> {
    let a = &recipe.augment;
    let rand_augment = match &a.rand_augment {
        Some(spec) => {
            let config = RandAugmentConfig::parse(spec)
                .map_err(|e| TrainError::Recipe(format!("augment.rand_augment: {e}")))?;
            let interpolation = match filter_of(a.interpolation) {
                Some(f) => RaInterpolation::Fixed(f),
                None => RaInterpolation::Random,
            };
            Some(RandAugment::new(config, fill_colour(recipe.data.mean), interpolation))
        }
        None => None,
    };
    Ok(TrainTransform {
        size: a.input_size,
        scale: a.scale,
        ratio: a.ratio,
        interpolation: match filter_of(a.interpolation) {
            Some(f) => CropInterpolation::Fixed(f),
            None => CropInterpolation::Random,
        },
        hflip: a.hflip,
        rand_augment,
    })
}

/// The evaluation transform a recipe describes.
pub fn eval_transform(recipe: &Recipe) -> Result<EvalTransform, TrainError> {
    let e = &recipe.eval;
    let filter = filter_of(e.interpolation).ok_or_else(|| {
        TrainError::Recipe("eval.interpolation: `random` is for training only".into())
    })?;
    Ok(EvalTransform::new(e.input_size, e.crop_pct, filter))
}

/// Number of sampler streams (micro-batches per optimizer update).
pub fn num_streams(recipe: &Recipe) -> usize {
    (recipe.batch.global_size / recipe.batch.micro_size.max(1)) as usize
}

/// The training data a recipe describes (class folders or tar shards).
pub fn train_data(recipe: &Recipe) -> Result<TrainData, TrainError> {
    let root = Path::new(&recipe.data.root).join(&recipe.data.train_split);
    let folder = ImageFolder::open_any(&root)?;
    let kind = match recipe.batch.repeated_augmentation {
        0 | 1 => SamplerKind::Distributed,
        r => SamplerKind::RepeatAug { num_repeats: r },
    };
    let sampler = StreamSampler::new(folder.len(), num_streams(recipe), kind, recipe.seed);
    let mixup = recipe.mixup.as_ref().map(|m| MixupConfig {
        mixup_alpha: m.mixup_alpha,
        cutmix_alpha: m.cutmix_alpha,
        prob: m.prob,
        switch_prob: m.switch_prob,
        mode: match m.mode {
            MixupMode::Batch => MixMode::Batch,
            MixupMode::Elem => MixMode::Elem,
        },
        label_smoothing: m.label_smoothing,
    });
    Ok(TrainData::new(
        folder,
        train_transform(recipe)?,
        mixup,
        Loss::smoothing(&recipe.loss),
        sampler,
        recipe.batch.micro_size as usize,
        recipe.model.num_classes as usize,
        recipe.seed,
    )?
    .with_scaled_decode(recipe.data.scaled_decode))
}

/// The further evaluation sets of a recipe (`eval.sets`), opened and
/// checked; relative paths are taken relative to `data.root`, and class names
/// of label files map through `train_classes`.
pub fn eval_sets(recipe: &Recipe, train_classes: &[String]) -> Result<Vec<EvalSet>, TrainError> {
    let root = Path::new(&recipe.data.root);
    let transform = eval_transform(recipe)?;
    let classes = (!train_classes.is_empty()).then_some(train_classes);
    recipe
        .eval
        .sets
        .iter()
        .map(|s| {
            let spec = EvalSetSpec {
                name: s.name.clone(),
                kind: match s.kind {
                    EvalSetKind::Folder => DataSetKind::Folder,
                    EvalSetKind::V2 => DataSetKind::V2,
                    EvalSetKind::Labelled => DataSetKind::Labelled,
                    EvalSetKind::Real => DataSetKind::Real,
                },
                root: root.join(&s.root),
                labels: s.labels.as_ref().map(|l| root.join(l)),
            };
            let set = EvalSet::open(
                &spec,
                transform,
                recipe.eval.batch_size as usize,
                recipe.model.num_classes as usize,
                classes,
            )?;
            Ok(set)
        })
        .collect()
}

/// Runs the model over an evaluation set and counts top-1/top-5. With
/// `shard = (rank, world)` only every `world`-th batch from `rank` on.
pub fn evaluate(
    model: &mut Model,
    data: &Arc<EvalData>,
    normalizer: &Normalizer,
    threads: usize,
    prefetch: usize,
    shard: (usize, usize),
) -> Result<TopK, TrainError> {
    let mut acc = TopK::default();
    for_each_eval_batch(model, data, normalizer, threads, prefetch, shard, |logits, batch| {
        Ok(acc.add(logits, &normalizer.labels(&batch.labels)?)?)
    })?;
    Ok(acc)
}

/// Runs the model in eval mode, without gradients, over this rank's share of
/// an evaluation set's batches and hands each batch's logits to `score`.
fn for_each_eval_batch(
    model: &mut Model,
    data: &Arc<EvalData>,
    normalizer: &Normalizer,
    threads: usize,
    prefetch: usize,
    shard: (usize, usize),
    mut score: impl FnMut(&Tensor, &EvalBatch) -> Result<(), TrainError>,
) -> Result<(), TrainError> {
    let _guard = tch::no_grad_guard();
    for batch in data.shard_loader(threads, prefetch, shard.0, shard.1) {
        let batch = batch?;
        if batch.len == 0 {
            continue;
        }
        let xs = normalizer.images(&batch.images, batch.len, batch.size, batch.size)?;
        let logits = model.forward(&xs, ForwardMode::Eval)?;
        score(&logits, &batch)?;
    }
    Ok(())
}

/// Runs the model over an evaluation set and scores its top-5 predictions
/// with the set's [`rsb_data::labels::Scoring`] (timm's `accuracy`, or
/// `RealLabelsImagenet` for ReaL). With `shard = (rank, world)` only every
/// `world`-th batch from `rank` on.
pub fn evaluate_set(
    model: &mut Model,
    set: &EvalSet,
    normalizer: &Normalizer,
    threads: usize,
    prefetch: usize,
    shard: (usize, usize),
) -> Result<SetScore, TrainError> {
    let mut score = SetScore::default();
    let samples = set.data.folder().samples();
    for_each_eval_batch(
        model,
        &set.data,
        normalizer,
        threads,
        prefetch,
        shard,
        |logits, batch| score_logits(logits, &set.scoring, samples, &batch.indices, &mut score),
    )?;
    Ok(score)
}

/// Scores a batch of `logits` `[N, C]` whose rows are the dataset samples
/// `indices`: their top-5 (`topk(5, sorted)`, as timm) on the host, then
/// `scoring`.
pub fn score_logits(
    logits: &Tensor,
    scoring: &Scoring,
    samples: &[Sample],
    indices: &[usize],
    score: &mut SetScore,
) -> Result<(), TrainError> {
    let k = logits.size()[1].min(5);
    let (_, top) = logits.f_topk(k, 1, true, true)?;
    let top = top.f_to_device(Device::Cpu)?.f_contiguous()?.f_view([-1])?;
    let predictions = Vec::<i64>::try_from(&top)?;
    for (row, &index) in predictions.chunks_exact(k.max(1) as usize).zip(indices) {
        scoring.add(score, &samples[index], row);
    }
    Ok(())
}

/// A configured training run.
#[derive(Debug)]
pub struct Trainer {
    recipe: Recipe,
    options: RunOptions,
    model: Model,
    optimizer: Lamb,
    schedule: CosineWithWarmup,
    loss: Loss,
    train: Arc<TrainData>,
    eval: Arc<EvalData>,
    eval_sets: Vec<EvalSet>,
    normalizer: Normalizer,
    metrics: MetricsLog,
    state: TrainState,
    threads: usize,
    prefetch: usize,
    distributed: Option<Distributed>,
}

/// A libtorch seed derived from a purpose and position.
fn torch_seed(key: &[u64]) -> i64 {
    (Rng::from_key(key).next_u64() >> 1) as i64
}

impl Trainer {
    /// Builds everything the recipe describes and, with `options.resume`,
    /// restores the checkpoint.
    pub fn new(recipe: Recipe, options: RunOptions) -> Result<Trainer, TrainError> {
        let device = options.device;
        let cuda = device != Device::Cpu;
        if recipe.runtime.torch_threads > 0 {
            tch::set_num_threads(recipe.runtime.torch_threads as i32);
        }
        // bf16 on a CPU is allowed when asked for explicitly: oneDNN runs it
        // fast on CPUs with AVX512-BF16 or AMX (and correctly, if slowly, elsewhere).
        let precision = match recipe.runtime.precision {
            Precision::Auto if cuda => Kind::BFloat16,
            Precision::Bf16 => Kind::BFloat16,
            Precision::Auto | Precision::Fp32 => Kind::Float,
        };
        let channels_last = cuda && recipe.runtime.channels_last;
        tch::manual_seed(torch_seed(&[recipe.seed, Stream::Torch as u64, u64::MAX]));
        let config = ModelConfig {
            num_classes: i64::from(recipe.model.num_classes),
            in_chans: 3,
            drop_path_rate: recipe.model.drop_path_rate,
            zero_init_last: recipe.model.zero_init_last,
        };
        let mut model = Model::new(&recipe.model.name, config, device)?;
        model.set_compute_kind(precision);
        if channels_last {
            model.to_channels_last()?;
        }
        let OptimizerSection::Lamb(lamb) = &recipe.optimizer;
        let mut optimizer = Lamb::new(&model, lamb)?;
        let train = Arc::new(train_data(&recipe)?);
        let ScheduleSection::Cosine(cosine) = &recipe.schedule;
        let schedule = CosineWithWarmup::new(cosine, lamb.lr, train.steps_per_epoch());
        let val_root = Path::new(&recipe.data.root).join(&recipe.data.val_split);
        let eval = Arc::new(EvalData::new(
            ImageFolder::open_any(&val_root)?,
            eval_transform(&recipe)?,
            recipe.eval.batch_size as usize,
        ));
        let eval_sets = eval_sets(&recipe, train.folder().classes())?;
        std::fs::create_dir_all(&options.out_dir)
            .map_err(|e| TrainError::io(&options.out_dir, e))?;
        let metrics_path = options.out_dir.join(&options.metrics_file);
        if let Some(parent) = metrics_path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| TrainError::io(parent, e))?;
        }
        let metrics = MetricsLog::open(&metrics_path)?;
        let mut state = TrainState {
            recipe: recipe.name.clone(),
            model: recipe.model.name.clone(),
            next_epoch: 0,
            next_step: 0,
            updates: 0,
            optimizer: optimizer.steps(),
            replaced_samples: 0,
            best_top1: None,
        };
        if let Some(resume) = &options.resume {
            let path = checkpoint::resolve(resume)?;
            state = checkpoint::load(&path, &mut model, &mut optimizer)?;
            tracing::info!(checkpoint = %path.display(), epoch = state.next_epoch, update = state.updates, "resumed");
        }
        let threads = match recipe.data.loader_threads {
            0 => default_threads(),
            n => n as usize,
        };
        let prefetch = recipe.data.prefetch_batches.max(1) as usize;
        let normalizer = Normalizer::new(recipe.data.mean, recipe.data.std, device, channels_last);
        Ok(Trainer {
            loss: Loss::from_recipe(&recipe.loss),
            recipe,
            options,
            model,
            optimizer,
            schedule,
            train,
            eval,
            eval_sets,
            normalizer,
            metrics,
            state,
            threads,
            prefetch,
            distributed: None,
        })
    }

    /// Makes this trainer one rank of a data-parallel job: rank 0's model,
    /// buffers, optimizer state and position (it may have resumed from a
    /// checkpoint) are broadcast to every rank.
    pub fn into_distributed(mut self, mut distributed: Distributed) -> Result<Trainer, TrainError> {
        let collective = distributed.collective.as_mut();
        let tensors: Vec<Tensor> = self
            .model
            .named_parameters()
            .iter()
            .chain(self.model.named_buffers())
            .map(|(_, t)| t.shallow_clone())
            .chain(self.optimizer.state_tensors().into_iter().map(|(_, t)| t))
            .collect();
        reduce_tensors(collective, &tensors, Reduction::Broadcast(0))?;
        let mut position = vec![self.state.next_epoch, self.state.next_step, self.state.updates];
        position.extend(self.state.optimizer.group_steps.iter().copied());
        broadcast_integers(collective, &mut position, 0)?;
        self.state.next_epoch = position[0];
        self.state.next_step = position[1];
        self.state.updates = position[2];
        self.state.optimizer.group_steps = position[3..].to_vec();
        self.optimizer
            .load_steps(&self.state.optimizer)
            .map_err(|p| TrainError::Recipe(format!("optimizer state from rank 0: {p}")))?;
        self.distributed = Some(distributed);
        Ok(self)
    }

    fn rank(&self) -> usize {
        self.distributed.as_ref().map_or(0, |d| d.collective.rank())
    }

    fn world_size(&self) -> usize {
        self.distributed.as_ref().map_or(1, |d| d.collective.world_size())
    }

    /// Writes a metrics record (every rank, into its own file) and hands rank
    /// 0's to the job's sink.
    fn record(&mut self, record: serde_json::Value) -> Result<(), TrainError> {
        self.metrics.write(&record)?;
        if let Some(Distributed { on_metrics: Some(sink), collective, .. }) = &mut self.distributed
        {
            if collective.rank() == 0 {
                sink(&record);
            }
        }
        Ok(())
    }

    /// The model being trained.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Optimizer updates per epoch.
    pub fn steps_per_epoch(&self) -> u64 {
        self.train.steps_per_epoch()
    }

    /// Total epochs of the recipe (cosine plus cooldown).
    pub fn total_epochs(&self) -> u64 {
        let ScheduleSection::Cosine(c) = &self.recipe.schedule;
        u64::from(c.epochs + c.cooldown_epochs)
    }

    /// Evaluates the current weights on the validation split (each rank a
    /// shard of the batches, counts summed over the ranks).
    pub fn evaluate(&mut self) -> Result<TopK, TrainError> {
        let shard = (self.rank(), self.world_size());
        let mut acc = evaluate(
            &mut self.model,
            &self.eval,
            &self.normalizer,
            self.threads,
            self.prefetch,
            shard,
        )?;
        if let Some(d) = &mut self.distributed {
            let mut counts = [acc.count as f64, acc.top1 as f64, acc.top5 as f64, acc.loss_sum];
            sum_scalars(d.collective.as_mut(), &mut counts)?;
            acc = TopK {
                count: counts[0].round() as u64,
                top1: counts[1].round() as u64,
                top5: counts[2].round() as u64,
                loss_sum: counts[3],
            };
        }
        Ok(acc)
    }

    /// Evaluates the current weights on each further evaluation set of the
    /// recipe (each rank a shard of the batches, counts summed over the ranks).
    pub fn evaluate_sets(&mut self) -> Result<Vec<SetResult>, TrainError> {
        let shard = (self.rank(), self.world_size());
        let mut results = Vec::with_capacity(self.eval_sets.len());
        for set in &self.eval_sets {
            let mut score = evaluate_set(
                &mut self.model,
                set,
                &self.normalizer,
                self.threads,
                self.prefetch,
                shard,
            )?;
            if let Some(d) = &mut self.distributed {
                let mut counts = [
                    score.count as f64,
                    score.top1 as f64,
                    score.top5 as f64,
                    score.excluded as f64,
                ];
                sum_scalars(d.collective.as_mut(), &mut counts)?;
                score = SetScore {
                    count: counts[0].round() as u64,
                    top1: counts[1].round() as u64,
                    top5: counts[2].round() as u64,
                    excluded: counts[3].round() as u64,
                };
            }
            results.push(SetResult::new(&set.name, &score));
        }
        Ok(results)
    }

    /// Sums the gradients over the ranks (each rank's micro-batch losses are
    /// already divided by the global number of micro-batches, so the sum is
    /// the mean over the global batch).
    fn reduce_gradients(&mut self) -> Result<(), TrainError> {
        if let Some(d) = &mut self.distributed {
            let grads: Vec<Tensor> =
                self.optimizer.gradients().into_iter().filter(Tensor::defined).collect();
            reduce_tensors(d.collective.as_mut(), &grads, Reduction::Sum)?;
        }
        Ok(())
    }

    /// Averages the BN running statistics over the ranks (timm's `--dist-bn reduce`).
    fn reduce_batch_norm_statistics(&mut self) -> Result<(), TrainError> {
        if let Some(d) = &mut self.distributed {
            let buffers: Vec<Tensor> =
                self.model.named_buffers().iter().map(|(_, t)| t.shallow_clone()).collect();
            reduce_tensors(d.collective.as_mut(), &buffers, Reduction::Mean)?;
        }
        Ok(())
    }

    /// Sum and sum of squares of every parameter, for replica comparisons.
    fn parameter_checksum(&self) -> Result<(f64, f64), TrainError> {
        let mut sum = 0.0;
        let mut squares = 0.0;
        for (_, p) in self.model.named_parameters() {
            let p = p.f_to_kind(Kind::Double)?;
            sum += p.f_sum(Kind::Double)?.f_double_value(&[])?;
            squares += p.f_square()?.f_sum(Kind::Double)?.f_double_value(&[])?;
        }
        Ok((sum, squares))
    }

    /// Trains until the recipe's last epoch (or `max_updates`).
    pub fn run(&mut self) -> Result<RunSummary, TrainError> {
        let start = Instant::now();
        let spe = self.train.steps_per_epoch();
        let total_streams = self.train.num_streams();
        let streams: Vec<usize> = match &self.distributed {
            Some(d) => d.streams.clone(),
            None => (0..total_streams).collect(),
        };
        let micro = self.recipe.batch.micro_size as u64;
        // Throughput counts the whole global batch (all ranks).
        let images_per_update = micro * total_streams as u64;
        let log_every = u64::from(self.recipe.runtime.log_every_steps.max(1));
        let total_epochs = self.total_epochs();
        let is_root = self.rank() == 0;
        let bar = (self.options.progress && is_root).then(|| {
            let bar = indicatif::ProgressBar::new(total_epochs * spe);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} updates {msg} [{elapsed_precise}<{eta_precise}]",
                )
                .expect("static template"),
            );
            bar.set_position(self.state.updates);
            bar
        });
        let mut summary = RunSummary { epochs: Vec::new(), updates: 0, wall_s: 0.0 };
        'epochs: for epoch in self.state.next_epoch..total_epochs {
            let start_step = if epoch == self.state.next_epoch { self.state.next_step } else { 0 };
            let epoch_start = Instant::now();
            // Losses stay on the device and are read only when logged, so a GPU
            // never waits for the host between updates.
            let mut epoch_loss = Tensor::zeros([], (Kind::Float, self.options.device));
            let mut epoch_updates = 0u64;
            let mut window_start = Instant::now();
            let mut window_updates = 0u64;
            let mut window_loss = Tensor::zeros([], (Kind::Float, self.options.device));
            let mut loader = self.train.epoch_loader(
                epoch,
                start_step,
                streams.clone(),
                self.threads,
                self.prefetch,
            );
            for step in start_step..spe {
                if self.options.max_updates.is_some_and(|m| summary.updates >= m) {
                    break 'epochs;
                }
                let update = epoch * spe + step;
                let lr = self.schedule.lr(update);
                self.optimizer.zero_grad();
                let mut update_loss = Tensor::zeros([], (Kind::Float, self.options.device));
                for &stream in &streams {
                    // Drop-path masks depend on (update, stream) only: the same
                    // whichever rank runs the stream.
                    tch::manual_seed(torch_seed(&[
                        self.recipe.seed,
                        Stream::Torch as u64,
                        update,
                        stream as u64,
                    ]));
                    let mb = loader
                        .next()
                        .ok_or_else(|| TrainError::Recipe("loader ended early".into()))??;
                    let xs = self.normalizer.images(&mb.images, mb.len, mb.height, mb.width)?;
                    let ys = self.normalizer.targets(&mb.targets, mb.len)?;
                    let logits = self.model.forward(&xs, ForwardMode::Train)?;
                    let loss =
                        self.loss.compute(&logits, &ys)?.f_div_scalar(total_streams as f64)?;
                    loss.f_backward()?;
                    update_loss = update_loss.f_add(&loss.f_detach()?)?;
                }
                self.reduce_gradients()?;
                self.optimizer.step(lr)?;
                if self.options.checksum_every_update {
                    let (sum, squares) = self.parameter_checksum()?;
                    self.metrics.write(&json!({
                        "kind": "checksum", "rank": self.rank(), "step": update + 1,
                        "sum": sum, "sum_of_squares": squares,
                    }))?;
                }
                window_loss = window_loss.f_add(&update_loss)?;
                epoch_loss = epoch_loss.f_add(&update_loss)?;
                epoch_updates += 1;
                summary.updates += 1;
                window_updates += 1;
                self.state.updates = update + 1;
                if let Some(bar) = &bar {
                    bar.inc(1);
                }
                if (update + 1).is_multiple_of(log_every) {
                    let secs = window_start.elapsed().as_secs_f64();
                    let ips = (window_updates * images_per_update) as f64 / secs.max(1e-9);
                    let mut window = [window_loss.f_double_value(&[])?];
                    if let Some(d) = &mut self.distributed {
                        sum_scalars(d.collective.as_mut(), &mut window)?;
                    }
                    let mean_loss = window[0] / window_updates as f64;
                    if !mean_loss.is_finite() {
                        return Err(TrainError::Diverged { epoch, update, value: mean_loss });
                    }
                    self.record(json!({
                        "kind": "step", "epoch": epoch, "step": update + 1, "lr": lr,
                        "loss": mean_loss, "images_per_sec": ips,
                        "total_updates": total_epochs * spe,
                    }))?;
                    let line = format!(
                        "epoch {epoch} update {} lr {lr:.3e} loss {mean_loss:.4} {ips:.0} img/s",
                        update + 1
                    );
                    match &bar {
                        Some(bar) => bar.set_message(format!("loss {mean_loss:.4} {ips:.0} img/s")),
                        None if is_root => tracing::info!("{line}"),
                        None => {}
                    }
                    window_start = Instant::now();
                    window_updates = 0;
                    window_loss = Tensor::zeros([], (Kind::Float, self.options.device));
                }
            }
            drop(loader);
            let mut epoch_sum = [epoch_loss.f_double_value(&[])?];
            if let Some(d) = &mut self.distributed {
                sum_scalars(d.collective.as_mut(), &mut epoch_sum)?;
            }
            let epoch_loss = epoch_sum[0] / epoch_updates.max(1) as f64;
            self.reduce_batch_norm_statistics()?;
            if !epoch_loss.is_finite() {
                return Err(TrainError::Diverged {
                    epoch,
                    update: self.state.updates,
                    value: epoch_loss,
                });
            }
            let train_secs = epoch_start.elapsed().as_secs_f64();
            let last_epoch = epoch + 1 == total_epochs;
            let every = u64::from(self.recipe.eval.every_epochs.max(1));
            let eval = if last_epoch || (epoch + 1).is_multiple_of(every) {
                Some(self.evaluate()?)
            } else {
                None
            };
            let eval_sets = if eval.is_some() { self.evaluate_sets()? } else { Vec::new() };
            if let Some(acc) = &eval {
                let best = self.state.best_top1.unwrap_or(f64::MIN).max(acc.top1_pct());
                self.state.best_top1 = Some(best);
            }
            self.state.next_epoch = epoch + 1;
            self.state.next_step = 0;
            self.state.optimizer = self.optimizer.steps();
            self.state.replaced_samples = self.train.bad_files().replacements();
            let report = EpochReport {
                epoch,
                updates: self.state.updates,
                train_loss: epoch_loss,
                images_per_sec: (epoch_updates * images_per_update) as f64 / train_secs.max(1e-9),
                top1: eval.map(|a| a.top1_pct()),
                top5: eval.map(|a| a.top5_pct()),
                eval_sets,
                elapsed_s: start.elapsed().as_secs_f64(),
            };
            let mut record = json!({
                "kind": "epoch", "epoch": epoch, "step": self.state.updates,
                "lr": self.schedule.lr(self.state.updates.saturating_sub(1)),
                "loss": report.train_loss, "images_per_sec": report.images_per_sec,
                "top1": report.top1, "top5": report.top5,
                "val_loss": eval.map(|a| a.mean_loss()),
                "replaced_samples": self.state.replaced_samples,
                "elapsed_s": report.elapsed_s,
            });
            if !report.eval_sets.is_empty() {
                record["eval_sets"] = report
                    .eval_sets
                    .iter()
                    .map(|s| {
                        let v = json!({"top1": s.top1, "top5": s.top5, "count": s.count,
                                       "excluded": s.excluded});
                        (s.name.clone(), v)
                    })
                    .collect::<serde_json::Map<String, serde_json::Value>>()
                    .into();
            }
            self.record(record)?;
            let mut acc_text = match (report.top1, report.top5) {
                (Some(t1), Some(t5)) => format!(" top1 {t1:.2} top5 {t5:.2}"),
                _ => String::new(),
            };
            for s in &report.eval_sets {
                acc_text.push_str(&format!(" | {} top1 {:.2} top5 {:.2}", s.name, s.top1, s.top5));
            }
            let line = format!(
                "epoch {epoch} done: loss {:.4} {:.0} img/s{acc_text} ({:.0} s)",
                report.train_loss, report.images_per_sec, report.elapsed_s
            );
            match &bar {
                Some(bar) => bar.println(line),
                None if is_root => tracing::info!("{line}"),
                None => {}
            }
            if is_root {
                let path = checkpoint::save(
                    &self.options.out_dir,
                    epoch,
                    &self.model,
                    &self.optimizer,
                    &self.state,
                    self.recipe.runtime.keep_last_checkpoints as usize,
                )?;
                if let Some(Distributed { on_checkpoint: Some(sink), .. }) = &mut self.distributed {
                    sink(epoch, &path);
                }
            }
            summary.epochs.push(report);
        }
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        summary.wall_s = start.elapsed().as_secs_f64();
        Ok(summary)
    }
}
