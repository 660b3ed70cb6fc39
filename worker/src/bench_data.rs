//! `worker bench data`: images per second of the training input pipeline on
//! a folder of photos: read -> decode -> RandomResizedCrop -> flip ->
//! RandAugment -> batch, and (unless `--u8`) normalisation to float NCHW in
//! the loader threads, the work timm's `create_loader(..., use_prefetcher=False)`
//! does in its worker processes. The transform is the recipe's (A2 by
//! default: 224 px, random bilinear/bicubic, RandAugment `rand-m7-mstd0.5-inc1`).
//! `bench/data_loader.py` runs this and timm's loader on the same folder and
//! cores and prints both. Prints one JSON line.

use anyhow::{bail, Result};
use clap::Args;
use rsb_data::dataset::ImageFolder;
use rsb_data::loader::{default_threads, Loader};
use rsb_data::pipeline::{normalize_nchw, TrainData};
use rsb_data::sampler::{SamplerKind, StreamSampler};
use rsb_train::trainer::train_transform;
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// Arguments of `worker bench data`.
#[derive(Debug, Args)]
pub struct DataArgs {
    /// Image folder in the class-folder layout (or tar shards).
    #[arg(long)]
    pub data: PathBuf,
    /// Recipe whose training transform and normalisation are used.
    #[arg(long, default_value = "recipes/resnet50_a2.yaml")]
    pub recipe: PathBuf,
    /// Override a recipe field (repeatable), e.g. `--set data.scaled_decode=false`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Loader threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Images per batch.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Images to time (after one untimed warm-up batch); rounded up to whole batches.
    #[arg(long, default_value_t = 2048)]
    pub images: usize,
    /// Keep batches as NHWC u8 (what the trainer takes; it normalises on the device).
    #[arg(long)]
    pub u8: bool,
}

/// Runs the benchmark.
pub fn data(args: DataArgs) -> Result<()> {
    let recipe = rsb_recipes::load(&args.recipe, &args.overrides)?;
    let folder = ImageFolder::open_any(&args.data)?;
    let n = folder.len();
    if args.batch == 0 || n < args.batch {
        bail!("{} holds {n} images, fewer than one batch of {}", args.data.display(), args.batch);
    }
    let classes = folder.classes().len().max(1);
    let sampler = StreamSampler::new(n, 1, SamplerKind::Distributed, recipe.seed);
    let data = TrainData::new(
        folder,
        train_transform(&recipe)?,
        None,
        0.0,
        sampler,
        args.batch,
        classes,
        recipe.seed,
    )?
    .with_scaled_decode(recipe.data.scaled_decode);
    let data = Arc::new(data);
    let threads = if args.threads == 0 { default_threads() } else { args.threads };
    let per_epoch = data.steps_per_epoch() as usize;
    let timed = args.images.div_ceil(args.batch);
    let jobs = timed + 1;
    let (mean, std) = (recipe.data.mean, recipe.data.std);
    let to_float = !args.u8;
    let d = Arc::clone(&data);
    let lists: Arc<Vec<Vec<usize>>> = Arc::new(
        (0..jobs.div_ceil(per_epoch) as u64).map(|e| d.sampler().stream_indices(e, 0)).collect(),
    );
    let loader = Loader::spawn(jobs, threads, 2 * threads, move |k| {
        let (epoch, step) = ((k / per_epoch) as u64, (k % per_epoch) as u64);
        let mb = d.micro_batch(epoch, step, 0, &lists[epoch as usize])?;
        if to_float {
            let x = normalize_nchw(&mb.images, mb.len, mb.height, mb.width, mean, std);
            std::hint::black_box(&x);
        }
        Ok(mb.len)
    });
    let mut first = None;
    let mut images = 0usize;
    for (k, batch) in loader.enumerate() {
        let len = batch?;
        if k == 0 {
            first = Some(Instant::now());
        } else {
            images += len;
        }
    }
    let secs = first.map_or(0.0, |t| t.elapsed().as_secs_f64());
    let ips = images as f64 / secs.max(1e-9);
    rsb_logging::output!(
        "{}",
        json!({
            "pipeline": "rsb", "images": images, "seconds": secs, "images_per_sec": ips,
            "threads": threads, "images_per_sec_per_thread": ips / threads as f64,
            "batch": args.batch, "normalized_float": to_float,
            "scaled_decode": data.scaled_decode(),
            "replaced_samples": data.bad_files().replacements(),
            "transform": {
                "input_size": recipe.augment.input_size,
                "rand_augment": recipe.augment.rand_augment,
                "interpolation": format!("{:?}", recipe.augment.interpolation).to_lowercase(),
            },
        })
    );
    Ok(())
}
