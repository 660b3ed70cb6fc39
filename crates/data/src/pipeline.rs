//! From dataset indices to ready micro-batches: which samples a micro-batch
//! holds (the sampler streams), how each image is decoded and augmented, how
//! the micro-batch is mixed, and how undecodable files are survived.
//!
//! Every random draw is keyed by (seed, epoch, stream, position), so a
//! micro-batch is a pure function of where it sits in the run: the same
//! whatever the loader thread count, and the same after a resume.

use crate::dataset::{ImageFolder, Sample};
use crate::decode::decode_bytes;
use crate::error::DataError;
use crate::loader::Loader;
use crate::mixup::{apply_plan, mixed_targets, MixupConfig};
use crate::rng::{Rng, Stream};
use crate::sampler::{RankSampler, SamplerPosition, StreamSampler};
use crate::transforms::{EvalTransform, TrainTransform};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Replacement attempts for one sample before the run stops.
pub const MAX_REPLACEMENTS: u32 = 16;

/// Files that failed to decode or to be read: each is logged once, every
/// use is counted; one that did not decode is not tried again.
#[derive(Debug, Default)]
pub struct BadFiles {
    seen: Mutex<HashMap<String, Failure>>,
    replaced: AtomicU64,
}

/// Why a file failed first, and whether that lasts.
#[derive(Debug, Clone)]
struct Failure {
    reason: String,
    /// Its bytes do not decode: they will not next time either. A file that
    /// could not be read (a network file system's timeout, too many open
    /// files) is read again at its next use: a passing fault must not
    /// replace a good image for the rest of the run.
    lasting: bool,
}

impl BadFiles {
    /// Records a failure of `sample` (`lasting`: its bytes do not decode);
    /// logs it the first time it fails.
    fn record(&self, sample: &Sample, reason: &str, lasting: bool, what: &str) {
        let name = sample.display();
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        match seen.entry(name) {
            std::collections::hash_map::Entry::Vacant(slot) => {
                let kind = if lasting { "undecodable image" } else { "unreadable image" };
                tracing::warn!(file = %slot.key(), %reason, "{kind}; {what}");
                slot.insert(Failure { reason: reason.to_string(), lasting });
            }
            std::collections::hash_map::Entry::Occupied(mut slot) if lasting => {
                slot.get_mut().lasting = true;
            }
            std::collections::hash_map::Entry::Occupied(_) => {}
        }
        self.replaced.fetch_add(1, Ordering::Relaxed);
    }

    /// The reason `sample` will fail again, when it will: its bytes did not
    /// decode.
    fn is_bad(&self, sample: &Sample) -> Option<String> {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.get(&sample.display()).filter(|f| f.lasting).map(|f| f.reason.clone())
    }

    /// The files that failed so far, with the reason of their first failure,
    /// sorted by name.
    pub fn list(&self) -> Vec<(String, String)> {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<(String, String)> =
            seen.iter().map(|(k, f)| (k.clone(), f.reason.clone())).collect();
        v.sort();
        v
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
        DataError::Decode { error, .. } => error.to_string(),
        DataError::Io { error, .. } => error.to_string(),
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
    scaled_decode: bool,
    bad_files: Arc<BadFiles>,
}

impl TrainData {
    /// Ties a dataset to its transform, mixing and sampler. `smoothing` is the
    /// label smoothing used when Mixup is off (Mixup carries its own). The
    /// dataset's class count and labels are checked against `num_classes`.
    /// DCT-scaled JPEG decoding is on (see [`TrainData::with_scaled_decode`]).
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
        folder.check_labels(num_classes)?;
        let data = TrainData {
            folder,
            transform,
            mixup: mixup.filter(MixupConfig::enabled),
            smoothing,
            sampler,
            micro_size,
            num_classes,
            seed,
            scaled_decode: true,
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

    /// Turns DCT-scaled JPEG decoding on or off (recipe `data.scaled_decode`):
    /// when on, a crop at least twice the output size in both directions is
    /// decoded at 1/2, 1/4 or 1/8 scale, which is faster but not pixel-equal
    /// to timm's full-size decode and resize.
    pub fn with_scaled_decode(mut self, on: bool) -> TrainData {
        self.scaled_decode = on;
        self
    }

    /// Whether DCT-scaled decoding is on.
    pub fn scaled_decode(&self) -> bool {
        self.scaled_decode
    }

    /// The sampler.
    pub fn sampler(&self) -> &StreamSampler {
        &self.sampler
    }

    /// Images per micro-batch.
    pub fn micro_size(&self) -> usize {
        self.micro_size
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

    /// Loads and augments one sample, replacing it deterministically if its
    /// file is bad. The augmentation draws depend on the position, not on
    /// which file ends up being used.
    fn load_sample(
        &self,
        epoch: u64,
        stream: usize,
        position: usize,
        index: usize,
    ) -> Result<(Vec<u8>, u32), DataError> {
        let mut index = index;
        let mut last = String::new();
        for attempt in 0..=MAX_REPLACEMENTS {
            let sample = &self.folder.samples()[index];
            let mut rng = Rng::from_key(&[
                self.seed,
                Stream::Augment as u64,
                epoch,
                stream as u64,
                position as u64,
            ]);
            // Err((reason, lasting)): lasting when the bytes do not decode.
            let augmented = match self.bad_files.is_bad(sample) {
                Some(reason) => Err((reason, true)),
                None => sample.read().map_err(|e| (failure_reason(&e), false)).and_then(|bytes| {
                    self.transform
                        .apply_encoded(&bytes, &mut rng, self.scaled_decode)
                        .map_err(|e| (e.to_string(), true))
                }),
            };
            match augmented {
                Ok(img) => return Ok((img.data, sample.label)),
                Err((reason, lasting)) => {
                    self.bad_files.record(sample, &reason, lasting, "using another sample instead");
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
            let (pixels, label) = self.load_sample(epoch, stream, position, index)?;
            images.extend_from_slice(&pixels);
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

    /// Rank `rank` of `world`'s share of this data's sampler, at the start
    /// of epoch 0 (see [`RankSampler`]).
    pub fn rank_sampler(&self, world: usize, rank: usize) -> Result<RankSampler, DataError> {
        RankSampler::new(self.sampler.clone(), self.micro_size, world, rank)
    }

    /// Starts loader threads producing the rest of the current epoch of
    /// `sampler` (one rank's streams, from its position on), ordered update by
    /// update and, within an update, in the sampler's accumulation order: the
    /// micro-batches whose indices [`RankSampler::next_update`] yields.
    pub fn epoch_loader(
        self: &Arc<Self>,
        sampler: &mut RankSampler,
        threads: usize,
        prefetch: usize,
    ) -> Result<Loader<MicroBatch>, DataError> {
        if sampler.micro() != self.micro_size
            || sampler.sampler().num_streams() != self.sampler.num_streams()
        {
            return Err(DataError::Config(format!(
                "a sampler of {} streams of micro-batches of {} for data of {} streams of {}",
                sampler.sampler().num_streams(),
                sampler.micro(),
                self.sampler.num_streams(),
                self.micro_size
            )));
        }
        let SamplerPosition { epoch, step: start } = sampler.position();
        let lists = sampler.epoch_lists();
        let streams = sampler.streams().to_vec();
        let steps = self.steps_per_epoch().saturating_sub(start) as usize;
        let per_step = streams.len();
        let data = Arc::clone(self);
        Ok(Loader::spawn(steps * per_step, threads, prefetch, move |k| {
            let slot = k % per_step;
            data.micro_batch(epoch, start + (k / per_step) as u64, streams[slot], &lists[slot])
        }))
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
            let transformed =
                sample.read().map_err(|e| (failure_reason(&e), false)).and_then(|b| {
                    decode_bytes(&b)
                        .and_then(|img| self.transform.apply(&img))
                        .map_err(|e| (e.to_string(), true))
                });
            match transformed {
                Ok(out) => {
                    batch.images.extend_from_slice(&out.data);
                    batch.labels.push(sample.label);
                    batch.indices.push(index);
                    batch.len += 1;
                }
                Err((reason, lasting)) => {
                    self.bad_files.record(sample, &reason, lasting, "skipped")
                }
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

/// Normalises NHWC `u8` images into NCHW `f32`, `(x / 255 - mean) / std`
/// per channel (timm's `ToTensor` + `Normalize`, for consumers that want
/// float batches from the loader threads; the trainer normalises on the
/// device instead).
pub fn normalize_nchw(
    images: &[u8],
    n: usize,
    h: u32,
    w: u32,
    mean: [f64; 3],
    std: [f64; 3],
) -> Vec<f32> {
    let plane = h as usize * w as usize;
    let mut out = vec![0f32; n * 3 * plane];
    // (x - 255 mean) / (255 std) = x * scale + shift
    let scale: [f32; 3] = std::array::from_fn(|c| (1.0 / (255.0 * std[c])) as f32);
    let shift: [f32; 3] = std::array::from_fn(|c| (-mean[c] / std[c]) as f32);
    for (img, dst) in images.chunks_exact(plane * 3).zip(out.chunks_exact_mut(plane * 3)).take(n) {
        let (r, rest) = dst.split_at_mut(plane);
        let (g, b) = rest.split_at_mut(plane);
        for (i, px) in img.chunks_exact(3).enumerate() {
            r[i] = f32::from(px[0]) * scale[0] + shift[0];
            g[i] = f32::from(px[1]) * scale[1] + shift[1];
            b[i] = f32::from(px[2]) * scale[2] + shift[2];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation_matches_timm_formula() {
        let img = [0u8, 128, 255, 10, 20, 30];
        let out = normalize_nchw(&img, 1, 1, 2, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]);
        let want = |x: f64, c: usize| {
            let (m, s) = ([0.485, 0.456, 0.406][c], [0.229, 0.224, 0.225][c]);
            ((x / 255.0 - m) / s) as f32
        };
        let expect = [
            want(0.0, 0),
            want(10.0, 0),
            want(128.0, 1),
            want(20.0, 1),
            want(255.0, 2),
            want(30.0, 2),
        ];
        for (a, b) in out.iter().zip(expect) {
            assert!((a - b).abs() < 1e-5, "{a} {b}");
        }
    }
}
