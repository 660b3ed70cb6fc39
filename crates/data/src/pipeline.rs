//! From dataset indices to ready micro-batches: which samples a micro-batch
//! holds (the sampler streams), how each image is decoded and augmented, how
//! the micro-batch is mixed, and how undecodable files are survived.
//!
//! Every random draw is keyed by (seed, epoch, stream, position), so a
//! micro-batch is a pure function of where it sits in the run: the same
//! whatever the loader thread count, and the same after a resume.

use crate::dataset::ImageFolder;
use crate::decode::decode_file;
use crate::error::DataError;
use crate::image::RgbImage;
use crate::loader::Loader;
use crate::mixup::{apply_plan, mixed_targets, MixupConfig};
use crate::rng::{Rng, Stream};
use crate::sampler::StreamSampler;
use crate::transforms::{EvalTransform, TrainTransform};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Replacement attempts for one sample before the run stops.
pub const MAX_REPLACEMENTS: u32 = 16;

/// Files that failed to decode: each is logged once, every use is counted.
#[derive(Debug, Default)]
pub struct BadFiles {
    seen: Mutex<HashMap<PathBuf, String>>,
    replaced: AtomicU64,
}

impl BadFiles {
    /// Records a failure; logs it the first time this file fails.
    fn record(&self, path: &Path, reason: &str) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if !seen.contains_key(path) {
            tracing::warn!(file = %path.display(), %reason, "undecodable image; using another sample instead");
            seen.insert(path.to_path_buf(), reason.to_string());
        }
        self.replaced.fetch_add(1, Ordering::Relaxed);
    }

    fn is_bad(&self, path: &Path) -> Option<String> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).get(path).cloned()
    }

    /// Distinct files that failed.
    pub fn distinct(&self) -> usize {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Samples replaced (or skipped in evaluation) so far.
    pub fn replacements(&self) -> u64 {
        self.replaced.load(Ordering::Relaxed)
    }
}

/// The reason of a decode failure without the path (the log line names it).
fn failure_reason(error: &DataError) -> String {
    match error {
        DataError::Decode { reason, .. } => reason.clone(),
        DataError::Io { source, .. } => source.to_string(),
        other => other.to_string(),
    }
}

/// One micro-batch ready for the model: images NHWC `u8`, targets dense.
#[derive(Debug, Clone)]
pub struct MicroBatch {
    /// Epoch it belongs to.
    pub epoch: u64,
    /// Optimizer update within the epoch.
    pub step: u64,
    /// Sampler stream (micro-batch slot of the global batch).
    pub stream: usize,
    /// Images in the batch.
    pub len: usize,
    /// Image height.
    pub height: u32,
    /// Image width.
    pub width: u32,
    /// `len * height * width * 3` bytes, NHWC.
    pub images: Vec<u8>,
    /// Original labels.
    pub labels: Vec<u32>,
    /// `len * num_classes` soft targets (mixed and smoothed).
    pub targets: Vec<f32>,
}

/// Everything needed to build training micro-batches.
#[derive(Debug)]
pub struct TrainData {
    folder: ImageFolder,
    transform: TrainTransform,
    mixup: Option<MixupConfig>,
    smoothing: f64,
    sampler: StreamSampler,
    micro_size: usize,
    num_classes: usize,
    seed: u64,
    bad_files: Arc<BadFiles>,
}

impl TrainData {
    /// Ties a dataset to its transform, mixing and sampler. `smoothing` is the
    /// label smoothing used when Mixup is off (Mixup carries its own).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        folder: ImageFolder,
        transform: TrainTransform,
        mixup: Option<MixupConfig>,
        smoothing: f64,
        sampler: StreamSampler,
        micro_size: usize,
        num_classes: usize,
        seed: u64,
    ) -> Result<TrainData, DataError> {
        if folder.classes().len() != num_classes {
            return Err(DataError::Layout {
                path: folder.root().to_path_buf(),
                problem: format!(
                    "{} class folders but the model has {num_classes} classes",
                    folder.classes().len()
                ),
            });
        }
        let data = TrainData {
            folder,
            transform,
            mixup: mixup.filter(MixupConfig::enabled),
            smoothing,
            sampler,
            micro_size,
            num_classes,
            seed,
            bad_files: Arc::new(BadFiles::default()),
        };
        if data.steps_per_epoch() == 0 {
            return Err(DataError::Config(format!(
                "{} images give each of the {} streams {} samples, fewer than one micro-batch of {}",
                data.folder.len(),
                data.sampler.num_streams(),
                data.sampler.samples_per_stream(),
                micro_size
            )));
        }
        Ok(data)
    }

    /// Optimizer updates per epoch (the sampler's per-stream length over the
    /// micro-batch size, partial batches dropped as timm's `drop_last`).
    pub fn steps_per_epoch(&self) -> u64 {
        (self.sampler.samples_per_stream() / self.micro_size) as u64
    }

    /// The training images.
    pub fn folder(&self) -> &ImageFolder {
        &self.folder
    }

    /// The undecodable-file registry.
    pub fn bad_files(&self) -> &Arc<BadFiles> {
        &self.bad_files
    }

    /// Number of sampler streams (micro-batches per optimizer update).
    pub fn num_streams(&self) -> usize {
        self.sampler.num_streams()
    }

    /// Loads one sample, replacing it deterministically if its file is bad.
    fn load_sample(
        &self,
        epoch: u64,
        stream: usize,
        position: usize,
        index: usize,
    ) -> Result<(RgbImage, u32), DataError> {
        let mut index = index;
        let mut last = String::new();
        for attempt in 0..=MAX_REPLACEMENTS {
            let sample = &self.folder.samples()[index];
            let decoded = match self.bad_files.is_bad(&sample.path) {
                Some(reason) => Err(reason),
                None => decode_file(&sample.path).map_err(|e| failure_reason(&e)),
            };
            match decoded {
                Ok(img) => return Ok((img, sample.label)),
                Err(reason) => {
                    self.bad_files.record(&sample.path, &reason);
                    last = reason;
                    let mut rng = Rng::from_key(&[
                        self.seed,
                        Stream::Replacement as u64,
                        epoch,
                        stream as u64,
                        position as u64,
                        u64::from(attempt),
                    ]);
                    index = rng.below(self.folder.len() as u64) as usize;
                }
            }
        }
        Err(DataError::TooManyBadFiles {
            epoch,
            position: position as u64,
            attempts: MAX_REPLACEMENTS + 1,
            last,
        })
    }

    /// Builds micro-batch `step` of `stream` in `epoch` from that stream's
    /// index list (`stream_indices` of the sampler for this epoch).
    pub fn micro_batch(
        &self,
        epoch: u64,
        step: u64,
        stream: usize,
        stream_indices: &[usize],
    ) -> Result<MicroBatch, DataError> {
        let start = step as usize * self.micro_size;
        let indices = stream_indices.get(start..start + self.micro_size).ok_or_else(|| {
            DataError::Config(format!("step {step} is past the end of epoch {epoch}"))
        })?;
        let size = self.transform.size;
        let per_image = size as usize * size as usize * 3;
        let mut images = Vec::with_capacity(indices.len() * per_image);
        let mut labels = Vec::with_capacity(indices.len());
        for (offset, &index) in indices.iter().enumerate() {
            let position = start + offset;
            let (img, label) = self.load_sample(epoch, stream, position, index)?;
            let mut rng = Rng::from_key(&[
                self.seed,
                Stream::Augment as u64,
                epoch,
                stream as u64,
                position as u64,
            ]);
            let out = self.transform.apply(&img, &mut rng);
            images.extend_from_slice(&out.data);
            labels.push(label);
        }
        let n = labels.len();
        let (images, targets) = match &self.mixup {
            Some(mix) => {
                let mut rng =
                    Rng::from_key(&[self.seed, Stream::Mixup as u64, epoch, step, stream as u64]);
                let plan = mix.draw(n, size, size, &mut rng);
                let (mixed, lams) = apply_plan(&images, n, size, size, &plan);
                (mixed, mixed_targets(&labels, &lams, self.num_classes, mix.label_smoothing))
            }
            None => {
                let ones = vec![1.0; n];
                (images, mixed_targets(&labels, &ones, self.num_classes, self.smoothing))
            }
        };
        Ok(MicroBatch {
            epoch,
            step,
            stream,
            len: n,
            height: size,
            width: size,
            images,
            labels,
            targets,
        })
    }

    /// Starts loader threads producing the micro-batches of `epoch` from update
    /// `start_step` on, for the given streams (all of them in one process; a
    /// rank's share when distributed), ordered update by update and, within an
    /// update, in the order of `streams`.
    pub fn epoch_loader(
        self: &Arc<Self>,
        epoch: u64,
        start_step: u64,
        streams: Vec<usize>,
        threads: usize,
        prefetch: usize,
    ) -> Loader<MicroBatch> {
        let steps = self.steps_per_epoch().saturating_sub(start_step) as usize;
        let lists: Arc<Vec<Vec<usize>>> =
            Arc::new(streams.iter().map(|&s| self.sampler.stream_indices(epoch, s)).collect());
        let data = Arc::clone(self);
        let per_step = streams.len();
        Loader::spawn(steps * per_step, threads, prefetch, move |k| {
            let step = start_step + (k / per_step) as u64;
            let slot = k % per_step;
            data.micro_batch(epoch, step, streams[slot], &lists[slot])
        })
    }
}

/// One evaluation batch: images NHWC `u8` and labels.
#[derive(Debug, Clone)]
pub struct EvalBatch {
    /// Images in the batch (undecodable ones are skipped).
    pub len: usize,
    /// Image side.
    pub size: u32,
    /// `len * size * size * 3` bytes, NHWC.
    pub images: Vec<u8>,
    /// Labels.
    pub labels: Vec<u32>,
    /// Dataset indices of the images (for per-image label sets such as ReaL).
    pub indices: Vec<usize>,
}

/// Everything needed to build evaluation batches.
#[derive(Debug)]
pub struct EvalData {
    folder: ImageFolder,
    transform: EvalTransform,
    batch_size: usize,
    bad_files: Arc<BadFiles>,
}

impl EvalData {
    /// An evaluation set.
    pub fn new(folder: ImageFolder, transform: EvalTransform, batch_size: usize) -> EvalData {
        EvalData {
            folder,
            transform,
            batch_size: batch_size.max(1),
            bad_files: Arc::new(BadFiles::default()),
        }
    }

    /// The images.
    pub fn folder(&self) -> &ImageFolder {
        &self.folder
    }

    /// Undecodable files met so far (skipped, and counted).
    pub fn bad_files(&self) -> &Arc<BadFiles> {
        &self.bad_files
    }

    /// Number of batches in one pass.
    pub fn num_batches(&self) -> usize {
        self.folder.len().div_ceil(self.batch_size)
    }

    /// Builds batch `k` of the pass.
    pub fn batch(&self, k: usize) -> Result<EvalBatch, DataError> {
        let start = k * self.batch_size;
        let end = (start + self.batch_size).min(self.folder.len());
        let size = self.transform.size;
        let mut batch =
            EvalBatch { len: 0, size, images: Vec::new(), labels: Vec::new(), indices: Vec::new() };
        for index in start..end {
            let sample = &self.folder.samples()[index];
            match decode_file(&sample.path) {
                Ok(img) => {
                    let out = self.transform.apply(&img);
                    batch.images.extend_from_slice(&out.data);
                    batch.labels.push(sample.label);
                    batch.indices.push(index);
                    batch.len += 1;
                }
                Err(e) => self.bad_files.record(&sample.path, &failure_reason(&e)),
            }
        }
        Ok(batch)
    }

    /// Starts loader threads over one full pass, in dataset order.
    pub fn loader(self: &Arc<Self>, threads: usize, prefetch: usize) -> Loader<EvalBatch> {
        self.shard_loader(threads, prefetch, 0, 1)
    }

    /// Starts loader threads over rank `rank`'s share of a pass: batches
    /// `rank, rank + world, ...`, so `world` ranks cover the set exactly once.
    pub fn shard_loader(
        self: &Arc<Self>,
        threads: usize,
        prefetch: usize,
        rank: usize,
        world: usize,
    ) -> Loader<EvalBatch> {
        let data = Arc::clone(self);
        let world = world.max(1);
        let mine = self.num_batches().saturating_sub(rank).div_ceil(world);
        Loader::spawn(mine, threads, prefetch, move |k| data.batch(rank + k * world))
    }
}
