//! The training loop: a run is epochs of optimizer updates (one update = one
//! micro-batch from each sampler stream, gradients accumulated), and each
//! epoch ends by averaging BN statistics over the ranks, evaluating,
//! recording and checkpointing. What the recipe describes is built by
//! [`crate::from_recipe`], evaluation is [`crate::evaluation`], and records
//! and progress are [`crate::report`]. In one process a rank runs every
//! stream; with [`Distributed`] it runs its share and the gradients, BN
//! statistics and evaluation counts are combined over the ranks.
//!
//! Exact resumption (and the equality of 1 rank x N streams with N ranks x 1
//! stream) rests on four facts: every data-side random draw is keyed by its
//! position in the run (see `rsb_data::pipeline`), libtorch's generator is
//! reseeded from (update, stream) before each micro-batch (drop-path masks),
//! each stream keeps its own BN statistics, averaged where timm averages
//! over GPUs ([`crate::stream_statistics`]), and the checkpoint holds the
//! model, the LAMB moments and the update count.
//!
//! Which samples a rank trains on comes from one place, its
//! [`RankSampler`]: built for the whole job in [`Trainer::new`], moved to
//! the checkpoint's position on a resume, and re-sharded to the rank's
//! streams ([`rsb_job::streams_of_rank`]) by [`Trainer::into_distributed`].
//! Since a stream's samples and random draws do not depend on the world
//! size, a run resumed at another world size (same global batch, same
//! streams, accumulation re-derived) trains the rest of the epoch exactly as
//! the uninterrupted run would. With `runtime.checkpoint_every_updates` a
//! checkpoint is also written mid-epoch every N updates, with the position
//! and the epoch's loss so far (see [`checkpoint`]).
//!
//! Non-finite values: every update checks the global gradient norm (which
//! LAMB computes anyway for clipping) and skips the update when it is NaN or
//! infinite: no parameter, moment, step count or BN statistic changes (the
//! BN buffers are restored from a copy taken before the forward passes). The
//! update still counts in the schedule and the sampler, and is counted in
//! the metrics (`skipped_updates` of step and epoch records).
//! `runtime.max_nonfinite_updates` in a row stop the run with
//! [`TrainError::NonFiniteUpdates`], and no checkpoint is ever written from
//! non-finite weights. With data parallelism every rank holds the same
//! reduced gradients and so skips the same updates, without a collective.
//!
//! No host read within an update: the skip is decided on the device
//! ([`Lamb::step_unless_nonfinite`], the loss scaler's own kernels, the BN
//! buffers selected there), and each update leaves a small record of what
//! it did on the device. The host reads them all at once at the next sync
//! point, the only places where the host waits for the device: a log step
//! (every `runtime.log_every_steps`), a mid-epoch checkpoint, an epoch's
//! last update, and the end of `max_updates`. There the skipped updates are
//! counted, logged and checked against `runtime.max_nonfinite_updates` (an
//! error still names the update that reached the limit; the updates run
//! past it until the sync point were all skipped too, or the streak would
//! have ended, so nothing changed), and the ranks vote on a stop
//! ([`RunOptions::stop`]). [`crate::host_read`] counts the reads and those
//! made within an update, which stay at zero.
//!
//! fp16 (`runtime.precision: fp16`) adds torch's dynamic loss scaler
//! ([`crate::grad_scaler`]): the loss is scaled before the backward passes,
//! the gradients are summed over the ranks scaled (as DDP sums them before
//! `GradScaler.unscale_`), then checked and unscaled before LAMB's norm,
//! clipping and step. An update whose scaled gradients hold an inf or NaN is
//! skipped (as above: nothing changes, BN buffers restored, counted in
//! `skipped_updates`) and the scale backs off. Such overflows are the
//! scaler's normal work (torch skips them silently, often a few at the start
//! of a run), so they do not count towards `runtime.max_nonfinite_updates`
//! while the scale they ran at is above 1, and leave the count as it was;
//! an update skipped at a scale of at most 1 had non-finite gradients
//! without any amplification, which no further backoff cures, so it counts
//! like a non-finite update of an fp32 run. A run fed bad data therefore
//! still stops, after the 16 backoffs from 65536 to 1 plus the limit. Where
//! torch's BN running statistics keep the skipped update's batch, ours are
//! restored, as for every skipped update. The scaler's state (torch's
//! `state_dict()` keys) is in the checkpoint and broadcast from rank 0 at
//! the start of a job.

use crate::batch::Normalizer;
use crate::checkpoint::{self, BatchShape, EpochSoFar, TrainState};
use crate::ddp::{
    broadcast_integers, reduce_tensors, sum_scalars, Calls, Reduction, BUCKET_FLOATS,
};
use crate::error::TrainError;
use crate::evaluation::{self, EvalCounts, EvalShard};
use crate::fabric::probe_fabric;
use crate::from_recipe;
use crate::grad_scaler::GradScaler;
use crate::host_read;
use crate::lamb::Lamb;
use crate::loss::Loss;
use crate::overlap::GradientBuckets;
use crate::report::{open_metrics_log, Progress, Records};
use crate::sample_trace::{SampleRecord, SampleTrace};
use crate::schedule::CosineWithWarmup;
use crate::stop::{poll_period, write_while_answering, StopRequest, CHECKPOINT_WRITE_DEADLINE};
use crate::stream_statistics::StreamStatistics;
use rsb_collective::Collective;
use rsb_data::eval_sets::EvalSet;
use rsb_data::loader::Loader;
use rsb_data::pipeline::{EvalData, MicroBatch, TrainData};
use rsb_data::rng::{Rng, Stream};
use rsb_data::sampler::{RankSampler, SamplerPosition};
use rsb_job::run_folder::{check_resume, recipe_value, RunFolderLock, LOCK_WAIT};
use rsb_job::{FabricProbe, MetricsRecord, RankBalance};
use rsb_recipes::schema::EvalSetTiming;
use rsb_recipes::{Precision, Recipe};
use rsb_vision::{ForwardMode, Model};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

pub use crate::evaluation::{evaluate, evaluate_set, score_logits};
pub use crate::from_recipe::{
    eval_sets, eval_transform, fill_colour, num_streams, train_data, train_transform,
};
pub use crate::report::{EpochReport, MetricsSink, RunSummary, SetResult};
pub use rsb_torch_shim::sync_debug::{self, SyncDebugMode};

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
    /// Start of this invocation: the records' `elapsed_s` count from here.
    pub started: Instant,
    /// How a resumed run's recipe is compared with its checkpoint's.
    pub recipe_check: RecipeCheck,
    /// Test hook: the input images of these updates (0-based, counted over
    /// the run) are made NaN before the forward pass, as corrupt data or an
    /// overflow would; empty in real runs.
    pub nonfinite_inputs_at: BTreeSet<u64>,
    /// Write which dataset indices every update consumed into
    /// `samples/rank-N.jsonl` of the run folder (see [`crate::sample_trace`]).
    pub trace_samples: bool,
    /// When requested (a signal), the run stops at the next sync point (a
    /// log step, checkpoint or epoch end: see the module documentation),
    /// every rank after the same one, rank 0 having written a checkpoint of
    /// that position (a single process: after the update it is in), and
    /// `run` fails with [`TrainError::Stopped`] (see [`crate::stop`]). At an
    /// epoch's last update the stop waits for the epoch's end, whose
    /// checkpoint is the one written.
    pub stop: Option<StopRequest>,
    /// Test hook: every checkpoint write takes this much longer (a slow
    /// disk); zero in real runs.
    pub checkpoint_delay: Duration,
    /// Test hook: a stop checkpoint's write takes this much longer again (a
    /// slow disk at a preemption); zero in real runs.
    pub stop_checkpoint_delay: Duration,
    /// How long rank 0 of a job, which began training without the run
    /// folder's lock (another process held it past [`LOCK_WAIT`]), waits
    /// for it before its first checkpoint write, then fails naming the
    /// holder: it never writes checkpoints beside another writer.
    /// [`rsb_job::run_folder::AUTO_RESUME_LOCK_WAIT`] (the previous rank
    /// 0's stop checkpoint fits in it); shorter only in tests.
    pub writer_lock_wait: Duration,
    /// On a CUDA device, libtorch's sync debug mode within every update
    /// (off between them): a synchronising CUDA call there warns or fails
    /// (`RSB_CUDA_SYNC_DEBUG=warn|error` of the worker). None: off.
    pub cuda_sync_debug: Option<SyncDebugMode>,
}

/// How a resumed run's recipe is compared with the recipe saved in its
/// checkpoint (see [`rsb_job::run_folder`]).
#[derive(Debug, Clone, PartialEq)]
pub enum RecipeCheck {
    /// Every differing field must be explained by one of these `--set`
    /// overrides (`key=value`); the explained ones are logged.
    ExplainedBy(Vec<String>),
    /// Already compared by whoever started this process (the coordinator,
    /// for the ranks of a job).
    Done,
}

impl RunOptions {
    /// Options for a single-process run writing `metrics.jsonl` into
    /// `out_dir`, started now.
    pub fn new(out_dir: PathBuf, device: Device) -> RunOptions {
        RunOptions {
            out_dir,
            resume: None,
            device,
            progress: false,
            max_updates: None,
            metrics_file: "metrics.jsonl".into(),
            checksum_every_update: false,
            started: Instant::now(),
            recipe_check: RecipeCheck::ExplainedBy(Vec::new()),
            nonfinite_inputs_at: BTreeSet::new(),
            trace_samples: false,
            stop: None,
            checkpoint_delay: Duration::ZERO,
            stop_checkpoint_delay: Duration::ZERO,
            writer_lock_wait: rsb_job::run_folder::AUTO_RESUME_LOCK_WAIT,
            cuda_sync_debug: None,
        }
    }
}

/// A checkpoint rank 0 has committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedCheckpoint {
    /// The epoch (0-based) it ends, or is in the middle of.
    pub epoch: u64,
    /// Optimizer updates done over the run (its position).
    pub updates: u64,
    /// Whether it was written at the end of `epoch` (else mid-epoch).
    pub epoch_end: bool,
    /// The checkpoint folder.
    pub path: PathBuf,
    /// The warning that the run folder's file system is short of space for
    /// the checkpoints still to come ([`checkpoint::space_warning`]), also
    /// logged.
    pub disk_warning: Option<String>,
}

/// Hears about each checkpoint committed.
pub type CheckpointSink = Box<dyn FnMut(&CommittedCheckpoint) + Send>;

/// This process's part in a data-parallel job. The rank's sampler streams
/// follow from its rank and the world size ([`rsb_job::streams_of_rank`]).
pub struct Distributed {
    /// The collective over all ranks.
    pub collective: Box<dyn Collective>,
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
            .finish()
    }
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
    records: Records,
    state: TrainState,
    /// This rank's streams and the next update's position.
    sampler: RankSampler,
    /// The sample trace, while `options.trace_samples` (opened by `run`).
    trace: Option<SampleTrace>,
    threads: usize,
    prefetch: usize,
    distributed: Option<Distributed>,
    /// The gradient buckets of a distributed run (hooked for overlap).
    gradient_buckets: Option<GradientBuckets>,
    /// Whether the allocator's refusal to give peak memory was logged.
    memory_unavailable_logged: bool,
    /// The BN statistics of each of this rank's streams, when it runs more
    /// than one (as timm's per GPU), and the copies from before the current
    /// update's forward passes, restored when the update is skipped.
    stream_statistics: StreamStatistics,
    /// Non-finite updates in a row, up to the last one read.
    nonfinite_streak: u64,
    /// Samples replaced (undecodable images) over every rank before this
    /// process started: the resumed checkpoint's count.
    replaced_before_this_run: u64,
    /// Updates whose records are still on the device (read at the next sync point).
    pending: Vec<PendingUpdate>,
    /// The dynamic loss scaler of an fp16 run.
    scaler: Option<GradScaler>,
    /// The ranks agreed to stop (see [`RunOptions::stop`]) at an epoch's
    /// last update: the run stops after the epoch's end.
    stopping: bool,
    /// The ranks whose stop request the ranks agreed on, in rank order.
    stop_requested_by: Vec<usize>,
    /// The last checkpoint this rank wrote.
    last_checkpoint: Option<PathBuf>,
    /// Rank 0 of a job, the run folder's checkpoint writer: its lock, held
    /// while the trainer lives (`worker train` holds its own).
    run_folder_lock: Option<RunFolderLock>,
    /// Rank 0 of a job that began training without that lock: it takes it
    /// before its first checkpoint write ([`RunOptions::writer_lock_wait`]).
    run_folder_lock_owed: bool,
}

/// libtorch's CUDA sync debug mode for the span of an update
/// ([`RunOptions::cuda_sync_debug`]), turned off when dropped.
struct CudaSyncCheck {
    /// The mode while open; `None` when off (on the CPU, or not asked for).
    mode: Option<SyncDebugMode>,
}

impl CudaSyncCheck {
    fn open(options: &RunOptions) -> Result<CudaSyncCheck, TrainError> {
        let Some(mode) = options.cuda_sync_debug.filter(|_| options.device.is_cuda()) else {
            return Ok(CudaSyncCheck { mode: None });
        };
        Self::set(mode)?;
        Ok(CudaSyncCheck { mode: Some(mode) })
    }

    fn set(mode: SyncDebugMode) -> Result<(), TrainError> {
        sync_debug::set_mode(mode).map(|_| ()).map_err(|e| TrainError::Recipe(e.to_string()))
    }

    /// Runs `read`, a deliberate read of device values within the update
    /// (the checksum a debugging run asks for), with the check off: the
    /// read is counted by `host_read`, not refused or warned about.
    fn allowing<T>(&self, read: impl FnOnce() -> Result<T, TrainError>) -> Result<T, TrainError> {
        let Some(mode) = self.mode else { return read() };
        Self::set(SyncDebugMode::Off)?;
        let result = read();
        Self::set(mode)?;
        result
    }
}

impl Drop for CudaSyncCheck {
    fn drop(&mut self) {
        if self.mode.is_some() {
            let _ = sync_debug::set_mode(SyncDebugMode::Off);
        }
    }
}

/// A libtorch seed derived from a purpose and position.
fn torch_seed(key: &[u64]) -> i64 {
    (Rng::from_key(key).next_u64() >> 1) as i64
}

/// The running sums of the updates since the last log step (or of an epoch).
struct LossWindow {
    /// Sum of the applied updates' losses, on the device (read only when
    /// logged, so a GPU never waits for the host between updates).
    loss: Tensor,
    /// Updates run (applied or skipped).
    updates: u64,
    /// Updates skipped for a non-finite gradient norm (not in `loss`).
    skipped: u64,
    started: Instant,
}

impl LossWindow {
    fn new(device: Device) -> Result<LossWindow, TrainError> {
        Ok(LossWindow {
            loss: Tensor::f_zeros([], (Kind::Float, device))?,
            updates: 0,
            skipped: 0,
            started: Instant::now(),
        })
    }

    /// Adds an update: its loss where `applied` (a 0-d bool tensor) holds,
    /// on the device. Its skip is counted when the records are read.
    fn add(&mut self, loss: &Tensor, applied: &Tensor) -> Result<(), TrainError> {
        self.updates += 1;
        self.loss = self.loss.f_add(&loss.f_where_scalarother(applied, 0.0)?)?;
        Ok(())
    }

    /// Updates applied (whose losses are summed).
    fn applied(&self) -> u64 {
        self.updates - self.skipped
    }
}

/// An epoch's training, before the end-of-epoch work.
type EpochTraining = LossWindow;

/// This rank's share of a log window's time, for [`RankBalance`].
#[derive(Debug, Default)]
struct OwnTimes {
    /// Wall time of the window's updates less the waits, after their
    /// backward passes, for the other ranks' gradient sums.
    own: Duration,
    /// Of `own`, the time spent waiting for the loader's batches (also
    /// rank 0's `input_wait_share` of the window).
    input_wait: Duration,
}

impl OwnTimes {
    /// Adds an update that took `wall`.
    fn add(&mut self, wall: Duration, update: &UpdateOnDevice) {
        self.own += wall.saturating_sub(update.sums_wait);
        self.input_wait += update.input_wait;
    }
}

/// What one update did, on the device.
struct UpdateOnDevice {
    /// This rank's share of the update's loss.
    loss: Tensor,
    /// A 0-d bool: whether the update was applied.
    applied: Tensor,
    /// The update's record: see [`PendingUpdate`].
    record: Tensor,
    /// How long the host waited for the loader's micro-batches.
    input_wait: Duration,
    /// How long the host waited, after the last backward pass, for the
    /// gradient sums over the ranks.
    sums_wait: Duration,
}

/// Of a stop's deadline to exit by, what rank 0 keeps for the stop
/// checkpoint's write once it has the run folder's lock: its wait for the
/// lock gives up this long before the deadline.
const STOP_WRITE_MARGIN: Duration = Duration::from_secs(20);

/// When rank 0's wait for the run folder's lock gives up: [`STOP_WRITE_MARGIN`]
/// before the deadline of a stop requested with one, `None` otherwise.
fn lock_wait_limit(stop: Option<&StopRequest>) -> Option<Instant> {
    let deadline = stop?.deadline()?;
    Some(deadline.checked_sub(STOP_WRITE_MARGIN).unwrap_or(deadline))
}

/// An update whose record is still on the device: a 1-d f64 tensor of the
/// [`RECORD_LEN`] values at the `RECORD_*` indices.
#[derive(Debug)]
struct PendingUpdate {
    epoch: u64,
    update: u64,
    record: Tensor,
}

/// 1 when the update was applied, 0 when it was skipped.
const RECORD_APPLIED: usize = 0;
/// The global gradient norm before clipping (NaN when no parameter had a gradient).
const RECORD_GRAD_NORM: usize = 1;
/// fp16: 1 when the scaled gradients held an inf or NaN (0 without a scaler).
const RECORD_FOUND_INF: usize = 2;
/// fp16: the loss scale the update ran at (NaN without a scaler).
const RECORD_SCALE: usize = 3;
/// fp16: the loss scale after the update (NaN without a scaler).
const RECORD_NEXT_SCALE: usize = 4;
/// Values in a record.
const RECORD_LEN: usize = 5;

/// What the epochs of one invocation share.
struct Invocation {
    progress: Progress,
    /// Updates done by this invocation.
    updates: u64,
    /// The update (over the run) the invocation started at.
    start_update: u64,
}

impl Trainer {
    /// Builds everything the recipe describes and, with `options.resume`,
    /// restores the checkpoint.
    pub fn new(recipe: Recipe, options: RunOptions) -> Result<Trainer, TrainError> {
        let device = options.device;
        if recipe.runtime.torch_threads > 0 {
            let threads = i32::try_from(recipe.runtime.torch_threads).map_err(|_| {
                TrainError::Recipe(format!(
                    "runtime.torch_threads: {} is too many",
                    recipe.runtime.torch_threads
                ))
            })?;
            tch::set_num_threads(threads);
        }
        if device.is_cuda() {
            // As timm's train.py: cuDNN picks the fastest convolution
            // algorithm per shape (the shapes of a run are fixed).
            tch::Cuda::cudnn_set_benchmark(true);
        }
        tch::manual_seed(torch_seed(&[recipe.seed, Stream::Torch as u64, u64::MAX]));
        let mut model = from_recipe::model(&recipe, device)?;
        let mut optimizer = from_recipe::optimizer(&recipe, &model)?;
        let train = Arc::new(from_recipe::train_data(&recipe)?);
        let schedule = from_recipe::schedule(&recipe, train.steps_per_epoch());
        let eval = Arc::new(from_recipe::val_data(&recipe, train.folder().classes())?);
        let eval_sets = from_recipe::eval_sets(&recipe, train.folder().classes())?;
        let mut sampler = train.rank_sampler(1, 0)?;
        let batch = BatchShape {
            global_size: recipe.batch.global_size,
            streams: train.num_streams() as u32,
        };
        let mut state = TrainState {
            recipe: recipe.name.clone(),
            model: recipe.model.name.clone(),
            next_epoch: 0,
            next_step: 0,
            updates: 0,
            optimizer: optimizer.steps()?,
            replaced_samples: 0,
            best_top1: None,
            best_epoch: None,
            resolved_recipe: Some(recipe_value(&recipe)),
            batch: Some(batch),
            epoch_so_far: EpochSoFar::default(),
            nonfinite_streak: 0,
            scaler: None,
        };
        let mut scaler = (recipe.runtime.precision == Precision::Fp16)
            .then(|| GradScaler::with_defaults(device))
            .transpose()?;
        if let Some(resume) = &options.resume {
            let verified = match &options.recipe_check {
                RecipeCheck::ExplainedBy(overrides) => check_resume(resume, &recipe, overrides)?,
                RecipeCheck::Done => checkpoint::resolve(resume)?,
            };
            state = checkpoint::load(&verified, &mut model, &mut optimizer)?;
            let path = verified.path();
            // An fp16 run goes on at the saved scale; one resumed from a
            // checkpoint without a scaler (trained in another precision)
            // starts a fresh one, as timm's `--resume` does.
            if let (Some(scaler), Some(saved)) = (&mut scaler, &state.scaler) {
                *scaler = GradScaler::from_state(saved, device).map_err(|problem| {
                    TrainError::Checkpoint {
                        path: path.to_path_buf(),
                        problem: format!("scaler: {problem}"),
                    }
                })?;
            }
            check_batch(path, state.batch, batch)?;
            state.batch = Some(batch);
            // The run goes on with this recipe (changes, if any, explained).
            state.resolved_recipe = Some(recipe_value(&recipe));
            tracing::info!(
                checkpoint = %path.display(),
                epoch = state.next_epoch,
                step = state.next_step,
                update = state.updates,
                "resumed"
            );
        }
        sampler.seek(SamplerPosition { epoch: state.next_epoch, step: state.next_step })?;
        // Only once a resume is accepted does the run folder get a record.
        std::fs::create_dir_all(&options.out_dir)
            .map_err(|e| TrainError::io(&options.out_dir, e))?;
        let records = Records::new(open_metrics_log(&options.out_dir.join(&options.metrics_file))?);
        Ok(Trainer {
            loss: Loss::from_recipe(&recipe.loss),
            threads: from_recipe::loader_threads(&recipe),
            prefetch: from_recipe::prefetch_batches(&recipe),
            normalizer: from_recipe::normalizer(&recipe, device),
            recipe,
            options,
            model,
            optimizer,
            schedule,
            train,
            eval,
            eval_sets,
            records,
            nonfinite_streak: state.nonfinite_streak,
            replaced_before_this_run: state.replaced_samples,
            pending: Vec::new(),
            state,
            sampler,
            trace: None,
            distributed: None,
            gradient_buckets: None,
            memory_unavailable_logged: false,
            stream_statistics: StreamStatistics::default(),
            scaler,
            stopping: false,
            stop_requested_by: Vec::new(),
            last_checkpoint: None,
            run_folder_lock: None,
            run_folder_lock_owed: false,
        })
    }

    /// Makes this trainer one rank of a data-parallel job: the fabric is
    /// probed (`distributed.fabric_probe_mib`; rank 0 publishes a `fabric`
    /// record), rank 0's model, buffers, optimizer state and position (it
    /// may have resumed from a checkpoint, written at any world size) are
    /// broadcast to every rank, and the sampler is re-sharded to this rank's
    /// streams at that position.
    pub fn into_distributed(mut self, mut distributed: Distributed) -> Result<Trainer, TrainError> {
        let calls = self.calls();
        let collective = distributed.collective.as_mut();
        if collective.rank() == 0 && self.run_folder_lock.is_none() {
            // Rank 0 writes the checkpoints; the other ranks share the folder
            // for their own logs only. A new generation's rank 0 waits a
            // little for the killed one before it to finish exiting. One
            // still held after that is not fatal: the previous rank 0 may
            // run on a host the coordinator gave up on, whose agent has not
            // stopped it yet (or a file system may keep a crashed host's
            // lock for its lease); failing here would spend the job's
            // restarts on a lock. It trains on, and takes the lock before its
            // first checkpoint write (waiting longer there, while the other
            // ranks wait for the write): it never writes beside another
            // writer, whose retention and set-asides would take its files.
            match RunFolderLock::acquire(&self.options.out_dir, LOCK_WAIT) {
                Ok(lock) => self.run_folder_lock = Some(lock),
                Err(rsb_job::RunFolderError::InUse { lock, holder, .. }) => {
                    tracing::warn!(
                        lock = %lock.display(),
                        %holder,
                        "another process still holds the run folder's lock after {LOCK_WAIT:?} \
                         (the previous generation's rank 0 on a host that has not stopped it \
                         yet, or another trainer on this folder); going on without it until the \
                         first checkpoint, which waits up to {:?} more for it",
                        self.options.writer_lock_wait
                    );
                    self.run_folder_lock_owed = true;
                }
                Err(e) => return Err(e.into()),
            }
        }
        if self.options.cuda_sync_debug == Some(SyncDebugMode::Error)
            && self.options.device.is_cuda()
            && !collective.reduces_device_memory()
            && calls.made(collective)
        {
            return Err(TrainError::Recipe(
                "RSB_CUDA_SYNC_DEBUG=error with a backend that reduces host memory (the ring): \
                 it stages every gradient bucket through pinned host memory, a synchronising \
                 copy within each update; use warn to count those, or NCCL"
                    .into(),
            ));
        }
        if collective.rank() == 0 {
            self.records.set_sink(distributed.on_metrics.take());
        }
        // The fabric first: a slow link is named before the start state
        // crawls over it. Rank 0 knows where the run stands.
        let probe_bytes = self.recipe.distributed.fabric_probe_mib as usize * 1024 * 1024;
        let (epoch, step) = (self.state.next_epoch, self.state.updates);
        if let Some(probe) = probe_fabric(collective, calls, probe_bytes, epoch, step)? {
            if collective.rank() == 0 {
                self.announce_fabric(probe)?;
            }
            // The probe's buffers are not the first window's.
            let _ = self.peak_gpu_memory_mib();
        }
        let tensors: Vec<Tensor> = self
            .model
            .named_parameters()
            .iter()
            .chain(self.model.named_buffers())
            .map(|(_, t)| t.shallow_clone())
            .chain(self.optimizer.state_tensors().into_iter().map(|(_, t)| t))
            .collect();
        let what = "broadcast of the start state (weights, buffers, optimizer state) from rank 0";
        reduce_tensors(collective, calls, &tensors, Reduction::Broadcast(0), what)?;
        // Every stream of this rank starts from rank 0's statistics.
        self.stream_statistics.forget();
        let so_far = self.state.epoch_so_far;
        let scaler_state = self.scaler.as_ref().map(GradScaler::state).transpose()?;
        let mut position = vec![
            self.state.next_epoch,
            self.state.next_step,
            self.state.updates,
            so_far.updates,
            so_far.skipped,
            self.nonfinite_streak,
            scaler_state.map_or(0, |s| u64::from((s.scale as f32).to_bits())),
            scaler_state.map_or(0, |s| s.growth_tracker),
        ];
        position.extend(self.state.optimizer.group_steps.iter().copied());
        let what = "broadcast of the start position from rank 0";
        broadcast_integers(collective, calls, &mut position, 0, what)?;
        self.state.next_epoch = position[0];
        self.state.next_step = position[1];
        self.state.updates = position[2];
        // The loss so far is summed over the ranks at the epoch's end: rank
        // 0 brings it, once.
        let loss_sum = if collective.rank() == 0 { so_far.loss_sum } else { 0.0 };
        self.state.epoch_so_far =
            EpochSoFar { loss_sum, updates: position[3], skipped: position[4] };
        self.nonfinite_streak = position[5];
        if let (Some(scaler), Some(mut state)) = (&mut self.scaler, scaler_state) {
            state.scale = f64::from(f32::from_bits(position[6] as u32));
            state.growth_tracker = position[7];
            *scaler = GradScaler::from_state(&state, self.options.device)
                .map_err(|p| TrainError::Recipe(format!("loss scaler from rank 0: {p}")))?;
        }
        self.state.optimizer.group_steps = position[8..].to_vec();
        self.optimizer
            .load_steps(&self.state.optimizer)
            .map_err(|p| TrainError::Recipe(format!("optimizer state from rank 0: {p}")))?;
        let (rank, world) = (collective.rank(), collective.world_size());
        self.sampler
            .seek(SamplerPosition { epoch: self.state.next_epoch, step: self.state.next_step })?;
        self.sampler = self.sampler.reshard(world, rank)?;
        self.gradient_buckets = Some(
            GradientBuckets::new(
                self.optimizer.parameters(),
                BUCKET_FLOATS,
                self.recipe.distributed.overlap_backward,
                self.recipe.distributed.gradient_compression,
            )?
            .with_names(self.optimizer.group_names().concat()),
        );
        self.distributed = Some(distributed);
        Ok(self)
    }

    /// Logs the fabric probe (warning of a slow link or a shortfall) and
    /// publishes its record; rank 0 only.
    fn announce_fabric(&mut self, probe: FabricProbe) -> Result<(), TrainError> {
        tracing::info!("fabric: {}", probe.summary());
        let section = &self.recipe.distributed;
        for warning in
            probe.warnings(section.slow_link_warn_ratio, section.expected_bus_gb_per_s, |_| None)
        {
            tracing::warn!("{warning}");
        }
        self.records.publish(&MetricsRecord::Fabric(probe))
    }

    fn rank(&self) -> usize {
        self.distributed.as_ref().map_or(0, |d| d.collective.rank())
    }

    fn world_size(&self) -> usize {
        self.distributed.as_ref().map_or(1, |d| d.collective.world_size())
    }

    /// The sampler streams this rank runs, in accumulation order.
    pub fn streams(&self) -> &[usize] {
        self.sampler.streams()
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
        self.recipe.total_epochs()
    }

    /// Seconds since the start of this invocation.
    fn elapsed_s(&self) -> f64 {
        self.options.started.elapsed().as_secs_f64()
    }

    /// Images of one optimizer update over all ranks.
    fn images_per_update(&self) -> u64 {
        u64::from(self.recipe.batch.micro_size) * self.train.num_streams() as u64
    }

    /// Records a metrics record (every rank into its own file, rank 0 also
    /// to the job) and shows it.
    fn publish(&mut self, record: MetricsRecord, progress: &Progress) -> Result<(), TrainError> {
        self.records.publish(&record)?;
        progress.show(&record);
        Ok(())
    }

    /// How this rank makes its collective calls.
    fn calls(&self) -> Calls {
        Calls {
            device: self.options.device,
            at_world_size_one: self.recipe.distributed.collectives_at_world_size_one,
        }
    }

    /// Samples this process replaced so far (undecodable images), as a sum
    /// over the ranks takes them: with the checkpoint's count from before
    /// this process, the run's count over every rank.
    fn replaced_by_this_rank(&self) -> f64 {
        self.train.bad_files().replacements() as f64
    }

    /// Sums host values over the ranks (a no-op in one process); `what`
    /// names the sum in errors.
    fn sum_over_ranks(&mut self, values: &mut [f64], what: &str) -> Result<(), TrainError> {
        let calls = self.calls();
        if let Some(d) = &mut self.distributed {
            sum_scalars(d.collective.as_mut(), calls, values, what)?;
        }
        Ok(())
    }

    /// This rank's share of the evaluation batches.
    fn eval_shard(&self) -> EvalShard {
        EvalShard {
            threads: self.threads,
            prefetch: self.prefetch,
            rank: self.rank(),
            world: self.world_size(),
        }
    }

    /// Evaluates the current weights on the validation split (each rank a
    /// shard of the batches, counts summed over the ranks).
    pub fn evaluate(&mut self) -> Result<EvalCounts, TrainError> {
        let shard = self.eval_shard();
        let counts = evaluate(&mut self.model, &self.eval, &self.normalizer, shard)?;
        let calls = self.calls();
        match &mut self.distributed {
            Some(d) => evaluation::sum_over_ranks(d.collective.as_mut(), calls, counts, "val"),
            None => Ok(counts),
        }
    }

    /// Evaluates the current weights on each further evaluation set of the
    /// recipe (each rank a shard of the batches, counts summed over the
    /// ranks); the sets marked `at: end` only when `last` (after the last epoch).
    pub fn evaluate_sets(&mut self, last: bool) -> Result<Vec<SetResult>, TrainError> {
        let shard = self.eval_shard();
        let calls = self.calls();
        let mut results = Vec::with_capacity(self.eval_sets.len());
        // `eval_sets` holds the recipe's sets, opened, in the recipe's order.
        for (set, spec) in self.eval_sets.iter().zip(&self.recipe.eval.sets) {
            if spec.at == EvalSetTiming::End && !last {
                continue;
            }
            let mut counts = evaluate_set(&mut self.model, set, &self.normalizer, shard)?;
            if let Some(d) = &mut self.distributed {
                counts =
                    evaluation::sum_over_ranks(d.collective.as_mut(), calls, counts, &set.name)?;
            }
            if counts.scored_nothing() {
                let images = set.data.folder().len();
                return Err(TrainError::NothingScored { set: set.name.clone(), images });
            }
            results.push(SetResult::new(&set.name, &counts, set.data.folder().len()));
        }
        Ok(results)
    }

    /// The update's last backward pass, and the sum of the gradients over
    /// the ranks (each rank's micro-batch losses are already divided by the
    /// global number of micro-batches, so the sum is the mean over the global
    /// batch), bucket by bucket, during the pass or after it. Returns how
    /// long the sums kept this rank waiting after its pass.
    fn backward_and_reduce(&mut self, loss: &Tensor, update: u64) -> Result<Duration, TrainError> {
        let calls = self.calls();
        let deadline = Duration::from_secs(self.recipe.distributed.collective_timeout_secs);
        match (&mut self.distributed, &self.gradient_buckets) {
            (Some(d), Some(buckets)) => {
                buckets.backward_and_reduce(d.collective.as_mut(), calls, update, deadline, || {
                    Ok(loss.f_backward()?)
                })
            }
            _ => {
                loss.f_backward()?;
                Ok(Duration::ZERO)
            }
        }
    }

    /// Averages the BN running statistics over this rank's streams and
    /// over the ranks (timm's `--dist-bn reduce`, over its GPUs); every
    /// stream goes on from the average.
    fn reduce_batch_norm_statistics(&mut self, epoch: u64) -> Result<(), TrainError> {
        let calls = self.calls();
        self.stream_statistics.average_into(&mut self.model)?;
        if let Some(d) = &mut self.distributed {
            let buffers: Vec<Tensor> =
                self.model.named_buffers().iter().map(|(_, t)| t.shallow_clone()).collect();
            let what = format!("average of the BN statistics of epoch {epoch}");
            reduce_tensors(d.collective.as_mut(), calls, &buffers, Reduction::Mean, &what)?;
        }
        self.stream_statistics.set_all_from(&self.model)?;
        Ok(())
    }

    /// Sum and sum of squares of every parameter, for replica comparisons.
    fn parameter_checksum(&self) -> Result<(f64, f64), TrainError> {
        let mut sum = 0.0;
        let mut squares = 0.0;
        for (_, p) in self.model.named_parameters() {
            let p = p.f_to_kind(Kind::Double)?;
            sum += host_read::f64_of(&p.f_sum(Kind::Double)?)?;
            squares += host_read::f64_of(&p.f_square()?.f_sum(Kind::Double)?)?;
        }
        Ok((sum, squares))
    }

    /// Whether this invocation has done all the updates it may.
    fn reached_max_updates(&self, invocation: &Invocation) -> bool {
        self.options.max_updates.is_some_and(|m| invocation.updates >= m)
    }

    /// Trains until the recipe's last epoch (or `max_updates`).
    pub fn run(&mut self) -> Result<RunSummary, TrainError> {
        let total_updates = self.total_epochs() * self.steps_per_epoch();
        let progress =
            Progress::new(self.options.progress, self.rank(), total_updates, self.state.updates);
        let mut invocation = Invocation { progress, updates: 0, start_update: self.state.updates };
        if self.options.trace_samples && self.trace.is_none() {
            self.trace = Some(SampleTrace::open(&self.options.out_dir, self.rank())?);
        }
        let mut epochs = Vec::new();
        for epoch in self.state.next_epoch..self.total_epochs() {
            let Some(trained) = self.train_epoch(epoch, &mut invocation)? else {
                break;
            };
            epochs.push(self.end_epoch(epoch, trained, &invocation.progress)?);
            if self.stopping && epoch + 1 < self.total_epochs() {
                return Err(self.stopped());
            }
        }
        invocation.progress.finish();
        Ok(RunSummary { epochs, updates: invocation.updates, wall_s: self.elapsed_s() })
    }

    /// Runs the updates of an epoch (from where the run stands); `None` when
    /// `max_updates` stopped it before its end.
    fn train_epoch(
        &mut self,
        epoch: u64,
        invocation: &mut Invocation,
    ) -> Result<Option<EpochTraining>, TrainError> {
        let steps = self.steps_per_epoch();
        let position = self.sampler.position();
        if position.epoch != epoch {
            return Err(TrainError::Recipe(format!(
                "the sampler stands at epoch {}, update {}, not at epoch {epoch}",
                position.epoch, position.step
            )));
        }
        let start_step = position.step;
        if start_step < steps && self.reached_max_updates(invocation) {
            return Ok(None);
        }
        let loading =
            MetricsRecord::Loading { epoch, step: self.state.updates, elapsed_s: self.elapsed_s() };
        self.publish(loading, &invocation.progress)?;
        let device = self.options.device;
        let mut epoch_window = LossWindow::new(device)?;
        // A mid-epoch resume continues the epoch's sums where the
        // checkpoint left them.
        let so_far = std::mem::take(&mut self.state.epoch_so_far);
        if start_step > 0 {
            epoch_window.loss = epoch_window.loss.f_add_scalar(so_far.loss_sum)?;
            epoch_window.updates = so_far.updates;
            epoch_window.skipped = so_far.skipped;
        }
        let mut window = LossWindow::new(device)?;
        let mut own_times = OwnTimes::default();
        let log_every = u64::from(self.recipe.runtime.log_every_steps.max(1));
        let checkpoint_every = u64::from(self.recipe.runtime.checkpoint_every_updates);
        let mut loader = self.train.epoch_loader(&mut self.sampler, self.threads, self.prefetch)?;
        for step in start_step..steps {
            if self.reached_max_updates(invocation) {
                return Ok(None);
            }
            let span = host_read::UpdateSpan::open();
            let sync_check = CudaSyncCheck::open(&self.options)?;
            let update = epoch * steps + step;
            let lr = self.schedule.lr(update);
            let batches = self.sampler.next_update();
            self.trace_update(invocation.start_update, update, epoch, step, &batches)?;
            let update_started = Instant::now();
            let done = self.update(update, epoch, step, &batches, lr, &mut loader)?;
            own_times.add(update_started.elapsed(), &done);
            if self.options.checksum_every_update {
                sync_check.allowing(|| self.record_checksum(update + 1))?;
            }
            window.add(&done.loss, &done.applied)?;
            epoch_window.add(&done.loss, &done.applied)?;
            self.pending.push(PendingUpdate { epoch, update, record: done.record });
            invocation.updates += 1;
            self.state.updates = update + 1;
            invocation.progress.update_done();
            if invocation.updates == 1 {
                let first = MetricsRecord::FirstUpdate {
                    epoch,
                    step: update + 1,
                    elapsed_s: self.elapsed_s(),
                };
                self.publish(first, &invocation.progress)?;
            }
            drop(sync_check);
            drop(span);
            // The sync points: the only places where the host reads values
            // of the device (see the module documentation).
            let log_point = (update + 1).is_multiple_of(log_every);
            // The epoch's end writes its own checkpoint.
            let periodic = checkpoint_every > 0
                && (update + 1).is_multiple_of(checkpoint_every)
                && step + 1 < steps;
            let last = step + 1 == steps;
            // A single process stops after the update it is in: its stop
            // request is a host flag, read without a device sync, and it has
            // no other rank to agree with (a job's ranks vote at the sync
            // points above, which they all reach at the same update).
            let stop_here = self.world_size() == 1
                && self.options.stop.as_ref().is_some_and(|stop| stop.reason().is_some());
            if !(log_point || periodic || last || stop_here || self.reached_max_updates(invocation))
            {
                continue;
            }
            self.read_pending_updates(&mut [&mut window, &mut epoch_window])?;
            // A window of skipped updates only has no loss to report: it is
            // reported with the next log step that has one. A stop logs the
            // window it ends, so that the last step logged is its position.
            if (log_point || stop_here) && window.applied() > 0 {
                self.log_step(epoch, update, lr, &window, &own_times, &invocation.progress)?;
                window = LossWindow::new(device)?;
                own_times = OwnTimes::default();
            }
            if periodic {
                self.save_mid_epoch(epoch, step + 1, &epoch_window)?;
            }
            if (log_point || periodic || last || stop_here) && self.stop_agreed(update)? {
                if last {
                    // The epoch's end (next) writes the checkpoint.
                    self.stopping = true;
                    break;
                }
                if !periodic {
                    self.save_mid_epoch(epoch, step + 1, &epoch_window)?;
                }
                return Err(self.stopped());
            }
        }
        Ok(Some(epoch_window))
    }

    /// Reads the records of the updates since the last sync point, all at
    /// once, and accounts for them in order: skips counted in `windows`,
    /// fp16 overflows logged, non-finite updates counted towards
    /// `runtime.max_nonfinite_updates` (which stops the run).
    fn read_pending_updates(&mut self, windows: &mut [&mut LossWindow]) -> Result<(), TrainError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        let records: Vec<Tensor> = pending.iter().map(|p| p.record.shallow_clone()).collect();
        let values = host_read::f64s_of(&Tensor::f_stack(&records, 0)?)?;
        for (p, record) in pending.iter().zip(values.chunks_exact(RECORD_LEN)) {
            if record[RECORD_APPLIED] == 1.0 {
                self.nonfinite_streak = 0;
                continue;
            }
            for window in windows.iter_mut() {
                window.skipped += 1;
            }
            let scale = record[RECORD_SCALE];
            if record[RECORD_FOUND_INF] != 0.0 && scale > 1.0 {
                self.log_overflow(p.epoch, p.update, scale, record[RECORD_NEXT_SCALE]);
            } else {
                self.count_nonfinite(p.epoch, p.update, record[RECORD_GRAD_NORM])?;
            }
        }
        Ok(())
    }

    /// Whether the ranks agree to stop after `update`, a sync point (see
    /// [`RunOptions::stop`]): one vote, summed over the ranks, when a stop
    /// can be requested at all.
    /// Each rank votes in its own slot, so that every rank learns which
    /// ranks asked: the job names them, not whichever rank told it first.
    fn stop_agreed(&mut self, update: u64) -> Result<bool, TrainError> {
        let Some(stop) = &self.options.stop else { return Ok(false) };
        let mut vote = vec![0.0; self.world_size()];
        vote[self.rank()] = f64::from(u8::from(stop.reason().is_some()));
        self.sum_over_ranks(&mut vote, &format!("stop vote after update {}", update + 1))?;
        if !self.stopping {
            self.stop_requested_by =
                vote.iter().enumerate().filter(|(_, v)| **v > 0.0).map(|(r, _)| r).collect();
            self.stopping = !self.stop_requested_by.is_empty();
        }
        Ok(self.stopping)
    }

    /// The error a run agreed to stop ends with.
    fn stopped(&self) -> TrainError {
        let reason = self.options.stop.as_ref().and_then(StopRequest::reason);
        let checkpoint = match (&self.last_checkpoint, self.rank()) {
            (Some(path), 0) => format!("checkpoint {} written; resume from it", path.display()),
            (None, 0) => "no checkpoint written".to_string(),
            _ => "rank 0 wrote the checkpoint".to_string(),
        };
        let reason = match reason {
            Some(own) => own.to_string(),
            None => match &self.stop_requested_by[..] {
                [] => "another rank's stop request".to_string(),
                [rank] => format!("rank {rank}'s stop request"),
                ranks => format!(
                    "the stop requests of ranks {}",
                    ranks.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")
                ),
            },
        };
        TrainError::Stopped {
            reason,
            update: self.state.updates,
            checkpoint,
            requested_by: self.stop_requested_by.clone(),
        }
    }

    /// Appends an update's micro-batches to the sample trace, when on.
    fn trace_update(
        &mut self,
        start_update: u64,
        update: u64,
        epoch: u64,
        step: u64,
        batches: &[(usize, Vec<usize>)],
    ) -> Result<(), TrainError> {
        let (rank, world_size) = (self.rank(), self.world_size());
        let Some(trace) = &mut self.trace else {
            return Ok(());
        };
        let records: Vec<SampleRecord> = batches
            .iter()
            .map(|(stream, indices)| SampleRecord {
                start_update,
                update,
                epoch,
                step,
                stream: *stream,
                rank,
                world_size,
                indices: indices.clone(),
            })
            .collect();
        trace.write(&records)
    }

    /// A checkpoint in the middle of `epoch`, before its update `next_step`:
    /// every rank averages the BN statistics (as at an epoch's end; the
    /// average is linear, so the epoch-end average is unchanged) and sums
    /// the epoch's loss so far, then rank 0 writes it.
    fn save_mid_epoch(
        &mut self,
        epoch: u64,
        next_step: u64,
        trained: &LossWindow,
    ) -> Result<(), TrainError> {
        self.reduce_batch_norm_statistics(epoch)?;
        let mut sums = [host_read::f64_of(&trained.loss)?, self.replaced_by_this_rank()];
        self.sum_over_ranks(
            &mut sums,
            "sum of the epoch's loss and replaced samples before a mid-epoch checkpoint",
        )?;
        let replaced = self.replaced_before_this_run + sums[1] as u64;
        if let Some(tensor) = self.first_nonfinite_tensor()? {
            return Err(TrainError::NonFiniteWeights { epoch, tensor });
        }
        self.state.next_epoch = epoch;
        self.state.next_step = next_step;
        self.state.optimizer = self.optimizer.steps()?;
        self.state.replaced_samples = replaced;
        self.state.nonfinite_streak = self.nonfinite_streak;
        self.state.scaler = self.scaler.as_ref().map(GradScaler::state).transpose()?;
        self.state.epoch_so_far =
            EpochSoFar { loss_sum: sums[0], updates: trained.updates, skipped: trained.skipped };
        let saved = self.save_checkpoint(epoch);
        self.state.epoch_so_far = EpochSoFar::default();
        saved
    }

    /// Logs an fp16 update skipped by the loss scaler at a scale above 1:
    /// the scaler's normal work, not counted towards
    /// `runtime.max_nonfinite_updates` (see the module documentation).
    fn log_overflow(&self, epoch: u64, update: u64, scale: f64, next_scale: f64) {
        if self.rank() == 0 {
            tracing::info!(
                epoch,
                update = update + 1,
                loss_scale = scale,
                next_scale,
                "update skipped: fp16 gradients overflowed at this loss scale; backing off"
            );
        }
    }

    /// Counts a skipped update and stops the run at
    /// `runtime.max_nonfinite_updates` in a row.
    fn count_nonfinite(
        &mut self,
        epoch: u64,
        update: u64,
        grad_norm: f64,
    ) -> Result<(), TrainError> {
        self.nonfinite_streak += 1;
        let limit = u64::from(self.recipe.runtime.max_nonfinite_updates.max(1));
        if self.rank() == 0 {
            tracing::warn!(
                epoch,
                update = update + 1,
                grad_norm,
                in_a_row = self.nonfinite_streak,
                limit,
                "update skipped: its global gradient norm is not finite"
            );
        }
        if self.nonfinite_streak >= limit {
            return Err(TrainError::NonFiniteUpdates {
                epoch,
                update: update + 1,
                consecutive: self.nonfinite_streak,
                grad_norm,
            });
        }
        Ok(())
    }

    /// One optimizer update: a micro-batch from each of this rank's streams
    /// (gradients accumulated), gradients summed over the ranks, a LAMB step
    /// unless the global gradient norm is not finite (then the BN buffers
    /// are restored too, and nothing has changed). Returns this rank's share
    /// of the update's loss, whether it was applied and its record, all on
    /// the device: nothing here waits for the device.
    fn update(
        &mut self,
        update: u64,
        epoch: u64,
        step: u64,
        batches: &[(usize, Vec<usize>)],
        lr: f64,
        loader: &mut Loader<MicroBatch>,
    ) -> Result<UpdateOnDevice, TrainError> {
        let total_streams = self.train.num_streams() as f64;
        self.optimizer.zero_grad()?;
        self.stream_statistics.prepare(&self.model, batches.len())?;
        self.stream_statistics.back_up(&self.model)?;
        let poison = self.options.nonfinite_inputs_at.contains(&update);
        let mut update_loss = Tensor::f_zeros([], (Kind::Float, self.options.device))?;
        let last_stream = batches.len().saturating_sub(1);
        let mut input_wait = Duration::ZERO;
        let mut sums_wait = Duration::ZERO;
        for (position, &(stream, _)) in batches.iter().enumerate() {
            // Drop-path masks depend on (update, stream) only: the same
            // whichever rank runs the stream.
            tch::manual_seed(torch_seed(&[
                self.recipe.seed,
                Stream::Torch as u64,
                update,
                stream as u64,
            ]));
            let waiting = Instant::now();
            let mb =
                loader.next().ok_or_else(|| TrainError::Recipe("loader ended early".into()))??;
            input_wait += waiting.elapsed();
            if (mb.epoch, mb.step, mb.stream) != (epoch, step, stream) {
                return Err(TrainError::Recipe(format!(
                    "the loader produced epoch {} update {} stream {}, the sampler planned \
                     epoch {epoch} update {step} stream {stream}",
                    mb.epoch, mb.step, mb.stream
                )));
            }
            let mut xs = self.normalizer.images(&mb.images, mb.len, mb.height, mb.width)?;
            if poison {
                xs = xs.f_mul_scalar(f64::NAN)?;
            }
            let ys = self.normalizer.targets(&mb.targets, mb.len)?;
            self.stream_statistics.enter(&mut self.model, position)?;
            let logits = self.model.forward(&xs, ForwardMode::Train)?;
            self.stream_statistics.leave(&self.model, position);
            let loss = self.loss.compute(&logits, &ys)?.f_div_scalar(total_streams)?;
            // fp16: the backward passes run on the scaled loss.
            let backward_loss = match &self.scaler {
                Some(scaler) => scaler.scale_loss(&loss)?,
                None => loss.shallow_clone(),
            };
            if position == last_stream {
                // The last backward pass sums the gradients over the ranks
                // (overlapped with it when `distributed.overlap_backward`).
                sums_wait = self.backward_and_reduce(&backward_loss, update)?;
            } else {
                backward_loss.f_backward()?;
            }
            update_loss = update_loss.f_add(&loss.f_detach()?)?;
        }
        self.stream_statistics.go_home(&self.model)?;
        let device = self.options.device;
        let nan = || Tensor::f_full([], f64::NAN, (Kind::Double, device));
        // torch's order: unscale (checking the scaled gradients), step
        // unless an inf or NaN was found, update the scale.
        let (found_inf, scale) = match &self.scaler {
            Some(scaler) => {
                (Some(scaler.unscale(&self.optimizer.gradients())?), Some(scaler.scale_f64()?))
            }
            None => (None, None),
        };
        let step = self.optimizer.step_unless_nonfinite(lr, found_inf.as_ref())?;
        if let (Some(scaler), Some(found_inf)) = (&mut self.scaler, &found_inf) {
            scaler.update(found_inf)?;
        }
        self.stream_statistics.restore_unless(&self.model, &step.applied)?;
        let as_double = |t: &Tensor| t.f_to_kind(Kind::Double);
        let record = Tensor::f_stack(
            &[
                as_double(&step.applied)?,
                match &step.grad_norm {
                    Some(norm) => as_double(norm)?,
                    None => nan()?,
                },
                match &found_inf {
                    Some(found_inf) => as_double(found_inf)?,
                    None => Tensor::f_zeros([], (Kind::Double, device))?,
                },
                match scale {
                    Some(scale) => scale,
                    None => nan()?,
                },
                match &self.scaler {
                    Some(scaler) => scaler.scale_f64()?,
                    None => nan()?,
                },
            ],
            0,
        )?;
        Ok(UpdateOnDevice {
            loss: update_loss,
            applied: step.applied,
            record,
            input_wait,
            sums_wait,
        })
    }

    /// The first parameter or buffer holding a NaN or an infinity, if any.
    fn first_nonfinite_tensor(&self) -> Result<Option<String>, TrainError> {
        let _guard = tch::no_grad_guard();
        for (name, tensor) in self.model.named_parameters().iter().chain(self.model.named_buffers())
        {
            if tensor.is_floating_point() && host_read::i64_of(&tensor.f_isfinite()?.f_all()?)? == 0
            {
                return Ok(Some(name.clone()));
            }
        }
        Ok(None)
    }

    /// Writes this rank's parameter checksum after `step` updates into its own file.
    fn record_checksum(&mut self, step: u64) -> Result<(), TrainError> {
        let (sum, sum_of_squares) = self.parameter_checksum()?;
        let rank = self.rank() as u64;
        self.records.write_local(&MetricsRecord::Checksum { rank, step, sum, sum_of_squares })
    }

    /// Records a log step: the mean loss of the window over all ranks, the
    /// throughput of the whole global batch and, where it can be measured,
    /// which rank held the others back (in the same one sum: each rank
    /// fills its own slots of the rank times).
    fn log_step(
        &mut self,
        epoch: u64,
        update: u64,
        lr: f64,
        window: &LossWindow,
        own_times: &OwnTimes,
        progress: &Progress,
    ) -> Result<(), TrainError> {
        let secs = window.started.elapsed().as_secs_f64();
        let images_per_sec = (window.updates * self.images_per_update()) as f64 / secs.max(1e-9);
        let world = self.world_size();
        let balance_known = self.rank_balance_known();
        let mut sum = vec![host_read::f64_of(&window.loss)?];
        if balance_known {
            sum.resize(1 + 2 * world, 0.0);
            sum[1 + self.rank()] = own_times.own.as_secs_f64();
            sum[1 + world + self.rank()] = own_times.input_wait.as_secs_f64();
        }
        self.sum_over_ranks(
            &mut sum,
            &format!("metric sum (loss of the log step at update {})", update + 1),
        )?;
        let rank_balance = if balance_known {
            RankBalance::of_ranks(&sum[1..=world], &sum[1 + world..], window.updates)
        } else {
            None
        };
        if let Some(balance) = rank_balance {
            let warn_ratio = self.recipe.distributed.straggler_warn_ratio;
            if self.rank() == 0 && balance.straggles(warn_ratio) {
                tracing::warn!(
                    "straggler at update {}: {balance}; the other ranks wait for it \
                     (distributed.straggler_warn_ratio {warn_ratio})",
                    update + 1
                );
            }
        }
        let loss = sum[0] / window.applied() as f64;
        if !loss.is_finite() {
            return Err(TrainError::Diverged { epoch, update, value: loss });
        }
        let total_updates = self.total_epochs() * self.steps_per_epoch();
        let step = MetricsRecord::Step {
            epoch,
            step: update + 1,
            lr,
            loss,
            images_per_sec,
            total_updates,
            skipped_updates: window.skipped,
            peak_gpu_memory_mib: self.peak_gpu_memory_mib(),
            rank_balance,
            input_wait_share: Some((own_times.input_wait.as_secs_f64() / secs.max(1e-9)).min(1.0)),
        };
        self.publish(step, progress)
    }

    /// Whether this job's log steps can say which rank held the others back
    /// ([`RankBalance`]): CPU ranks of a job of two or more. A GPU rank's
    /// host does not wait for its own device's backward pass, so its wait
    /// for the sums would mix the device's time with the other ranks'.
    fn rank_balance_known(&self) -> bool {
        self.options.device == Device::Cpu && self.world_size() > 1
    }

    /// The peak GPU memory held by tensors since the previous call (MiB),
    /// on a CUDA device; `None` on a CPU, or (logged once) when libtorch's
    /// allocator cannot say.
    fn peak_gpu_memory_mib(&mut self) -> Option<f64> {
        let Device::Cuda(index) = self.options.device else { return None };
        match rsb_torch_shim::memory::cuda_peak_memory(index, true) {
            Ok(peak) => Some(peak.allocated_bytes as f64 / (1024.0 * 1024.0)),
            Err(e) => {
                if !self.memory_unavailable_logged {
                    tracing::warn!("peak GPU memory is not recorded: {e}");
                    self.memory_unavailable_logged = true;
                }
                None
            }
        }
    }

    /// Whether the epoch ends with an evaluation (every `eval.every_epochs`,
    /// and always after the last).
    fn evaluates_after(&self, epoch: u64) -> bool {
        let every = u64::from(self.recipe.eval.every_epochs.max(1));
        epoch + 1 == self.total_epochs() || (epoch + 1).is_multiple_of(every)
    }

    /// The end of an epoch: mean loss over the ranks, BN statistics averaged,
    /// evaluation, the record, and the checkpoint.
    fn end_epoch(
        &mut self,
        epoch: u64,
        trained: EpochTraining,
        progress: &Progress,
    ) -> Result<EpochReport, TrainError> {
        let mut sums = [host_read::f64_of(&trained.loss)?, self.replaced_by_this_rank()];
        self.sum_over_ranks(
            &mut sums,
            &format!("metric sum (training loss and replaced samples of epoch {epoch})"),
        )?;
        let replaced = self.replaced_before_this_run + sums[1] as u64;
        // NaN when every update of the epoch was skipped.
        let train_loss = sums[0] / trained.applied() as f64;
        self.reduce_batch_norm_statistics(epoch)?;
        if !train_loss.is_finite() {
            return Err(TrainError::Diverged {
                epoch,
                update: self.state.updates,
                value: train_loss,
            });
        }
        // Replicas hold the same weights and (averaged) buffers: every rank
        // decides alike, and no checkpoint is written from poisoned weights.
        if let Some(tensor) = self.first_nonfinite_tensor()? {
            return Err(TrainError::NonFiniteWeights { epoch, tensor });
        }
        let train_secs = trained.started.elapsed().as_secs_f64();
        let (val, eval_sets) = if self.evaluates_after(epoch) {
            let last = epoch + 1 == self.total_epochs();
            let val = self.evaluate()?;
            if val.scored_nothing() {
                let images = self.eval.folder().len();
                return Err(TrainError::NothingScored { set: "val".into(), images });
            }
            (Some(val), self.evaluate_sets(last)?)
        } else {
            (None, Vec::new())
        };
        if let Some(val) = &val {
            let top1 = val.top1_pct();
            if self.state.best_top1.is_none_or(|best| top1 > best) {
                self.state.best_top1 = Some(top1);
                self.state.best_epoch = Some(epoch);
            }
        }
        self.state.next_epoch = epoch + 1;
        self.state.next_step = 0;
        self.state.epoch_so_far = EpochSoFar::default();
        self.state.nonfinite_streak = self.nonfinite_streak;
        self.state.scaler = self.scaler.as_ref().map(GradScaler::state).transpose()?;
        self.state.optimizer = self.optimizer.steps()?;
        self.state.replaced_samples = replaced;
        let report = EpochReport {
            epoch,
            updates: self.state.updates,
            train_loss,
            images_per_sec: (trained.updates * self.images_per_update()) as f64
                / train_secs.max(1e-9),
            top1: val.map(|v| v.top1_pct()),
            top5: val.map(|v| v.top5_pct()),
            val_loss: val.map(|v| v.mean_loss()),
            val_skipped_images: val.map(|v| v.unread_of(self.eval.folder().len())),
            eval_sets,
            elapsed_s: self.elapsed_s(),
            skipped_updates: trained.skipped,
        };
        let lr = self.schedule.lr(self.state.updates.saturating_sub(1));
        self.records.publish(&report.record(lr, self.state.replaced_samples))?;
        progress.epoch_done(&report);
        self.save_checkpoint(epoch)?;
        Ok(report)
    }

    /// Rank 0 writes the checkpoint of the current state (an epoch's end
    /// or mid-`epoch`) and tells the job, while the other ranks wait for it
    /// in short votes that it answers ([`write_while_answering`]): a write
    /// slower than the collective timeout gets nobody blamed as silent.
    fn save_checkpoint(&mut self, epoch: u64) -> Result<(), TrainError> {
        let calls = self.calls();
        let collective_timeout =
            Duration::from_secs(self.recipe.distributed.collective_timeout_secs);
        let keep = self.recipe.runtime.keep_last_checkpoints as usize;
        let saves_left = checkpoint::saves_still_to_come(
            self.total_epochs(),
            self.state.next_epoch,
            self.steps_per_epoch(),
            self.state.updates,
            u64::from(self.recipe.runtime.checkpoint_every_updates),
        );
        let delay = match self.stopping {
            true => self.options.checkpoint_delay + self.options.stop_checkpoint_delay,
            false => self.options.checkpoint_delay,
        };
        let (options, model, optimizer, state, records) =
            (&self.options, &self.model, &self.optimizer, &self.state, &mut self.records);
        let (lock, lock_owed) = (&mut self.run_folder_lock, &mut self.run_folder_lock_owed);
        let mut write = |sink: Option<&mut CheckpointSink>| -> Result<PathBuf, TrainError> {
            if *lock_owed {
                // Another writer's files are not this run's to replace:
                // wait for it to exit, or fail naming it.
                // A stopping rank gives up while it can still say why: its
                // process ends at the stop's deadline, written or not.
                let give_up_at = || lock_wait_limit(options.stop.as_ref());
                // Whole seconds: what is left of a stop's deadline, logged.
                let wait = match give_up_at() {
                    Some(at) => options.writer_lock_wait.min(Duration::from_secs(
                        at.saturating_duration_since(Instant::now()).as_secs(),
                    )),
                    None => options.writer_lock_wait,
                };
                tracing::warn!(
                    "waiting up to {wait:?} for the run folder's lock before the first checkpoint \
                     write"
                );
                *lock = Some(RunFolderLock::acquire_until(
                    &options.out_dir,
                    wait,
                    &give_up_at,
                    "stopping, with a deadline to exit by",
                )?);
                *lock_owed = false;
                tracing::info!("took the run folder's lock before the first checkpoint write");
            }
            std::thread::sleep(delay);
            // The writer's records (the epoch's, published just before)
            // reach the disk before the checkpoint after them is committed.
            let path = checkpoint::save(&options.out_dir, model, optimizer, state, keep, || {
                records.sync()
            })?;
            let disk_warning = checkpoint::space_warning(&options.out_dir, &path, keep, saves_left);
            let committed = CommittedCheckpoint {
                epoch,
                updates: state.updates,
                epoch_end: state.at_epoch_start(),
                path,
                disk_warning,
            };
            tracing::info!(
                epoch,
                update = committed.updates,
                checkpoint = %committed.path.display(),
                "checkpoint committed"
            );
            if let Some(warning) = &committed.disk_warning {
                tracing::warn!("{warning}");
            }
            if let Some(sink) = sink {
                sink(&committed);
            }
            Ok(committed.path)
        };
        let written = match &mut self.distributed {
            Some(Distributed { collective, on_checkpoint, .. }) if collective.world_size() > 1 => {
                write_while_answering(
                    collective.as_mut(),
                    calls,
                    0,
                    poll_period(collective_timeout),
                    CHECKPOINT_WRITE_DEADLINE,
                    "checkpoint write",
                    || write(on_checkpoint.as_mut()),
                )?
            }
            Some(Distributed { on_checkpoint, .. }) => Some(write(on_checkpoint.as_mut())?),
            None => Some(write(None)?),
        };
        if written.is_some() {
            self.last_checkpoint = written;
        }
        Ok(())
    }
}

/// Refuses a resume whose checkpoint was planned with another global batch
/// or stream count (`saved` is absent in checkpoints from before it was
/// kept): the world size may change across a resume, the batch may not.
fn check_batch(
    checkpoint: &Path,
    saved: Option<BatchShape>,
    now: BatchShape,
) -> Result<(), TrainError> {
    match saved {
        Some(saved) if saved != now => Err(TrainError::Checkpoint {
            path: checkpoint.to_path_buf(),
            problem: format!(
                "written with a global batch of {} images in {} sampler streams, this run plans \
                 a global batch of {} in {} streams; a resume may change the world size \
                 (accumulation is re-derived), never the global batch or the stream count",
                saved.global_size, saved.streams, now.global_size, now.streams
            ),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopping_rank_0_waits_for_the_lock_until_its_write_margin_before_the_deadline() {
        assert_eq!(lock_wait_limit(None), None);
        let stop = StopRequest::new();
        assert_eq!(lock_wait_limit(Some(&stop)), None, "no stop, no limit");
        stop.request("SIGTERM");
        assert_eq!(lock_wait_limit(Some(&stop)), None, "a stop without a deadline: no limit");
        let stop = StopRequest::new();
        stop.request_within("SIGTERM", Duration::from_secs(90));
        let deadline = stop.deadline().unwrap();
        assert_eq!(lock_wait_limit(Some(&stop)), Some(deadline - STOP_WRITE_MARGIN));
    }

    #[test]
    fn a_resume_may_change_the_world_size_but_not_the_batch() {
        let path = Path::new("run/checkpoints/epoch-0001-update-000000004");
        let planned = BatchShape { global_size: 12, streams: 6 };
        assert!(check_batch(path, Some(planned), planned).is_ok());
        // Checkpoints from before the batch was kept are compared by recipe only.
        assert!(check_batch(path, None, planned).is_ok());
        let bigger = BatchShape { global_size: 24, streams: 6 };
        let err = check_batch(path, Some(planned), bigger).unwrap_err().to_string();
        assert!(err.contains("epoch-0001-update-000000004"), "{err}");
        assert!(err.contains("global batch of 12") && err.contains("global batch of 24"), "{err}");
        let finer = BatchShape { global_size: 12, streams: 12 };
        let err = check_batch(path, Some(planned), finer).unwrap_err().to_string();
        assert!(err.contains("in 6 sampler streams") && err.contains("in 12 streams"), "{err}");
    }
}
