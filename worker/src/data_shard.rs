//! `worker data shard`: packs an image dataset into WebDataset tar shards
//! (`shard-000000.tar` ..., each sample `KEY.jpg` + `KEY.cls`, plus
//! `classes.txt`), optionally re-encoding every image with its shorter side
//! reduced to `--resize-shorter` pixels (bicubic, as Pillow's antialiased
//! resize) at JPEG `--quality`. Keys are the source file stems, so ImageNet-ReaL
//! still finds `ILSVRC2012_val_*` images inside the shards.
//!
//! Source files that cannot be decoded are left out, each named in a warning
//! and counted in the summary (the shards only hold images that decode).

use anyhow::{bail, Context, Result};
use clap::Args;
use rsb_data::dataset::ImageFolder;
use rsb_data::decode::{decode_bytes, probe, Format};
use rsb_data::image::{resize, Filter};
use rsb_data::loader::{default_threads, Loader};
use rsb_data::shards::ShardWriter;
use rsb_data::DataError;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// Arguments of `worker data shard`.
#[derive(Debug, Args)]
pub struct ShardArgs {
    /// The images: class folders (`<class>/<image>`), or a flat folder with `--labels`.
    #[arg(long)]
    pub src: PathBuf,
    /// Output folder for the shards (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Samples per shard.
    #[arg(long, default_value_t = 1000)]
    pub shard_size: usize,
    /// Re-encode images whose shorter side exceeds this many pixels at that size.
    #[arg(long)]
    pub resize_shorter: Option<u32>,
    /// JPEG quality of re-encoded images.
    #[arg(long, default_value_t = 90)]
    pub quality: i32,
    /// Label file for a flat `--src` (`file<TAB>class` lines or LOC_val_solution.csv).
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// Worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

/// One prepared sample: key stem, extension, bytes, label; or why it was left out.
type Prepared = std::result::Result<(String, &'static str, Vec<u8>, u32), (String, String)>;

fn prepare(folder: &ImageFolder, index: usize, args: &ShardArgs) -> Result<Prepared, DataError> {
    let sample = &folder.samples()[index];
    let stem =
        sample.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let bytes = match sample.read() {
        Ok(b) => b,
        Err(e) => return Ok(Err((sample.display(), e.to_string()))),
    };
    let info = match probe(&bytes) {
        Ok(i) => i,
        Err(reason) => return Ok(Err((sample.display(), reason.to_string()))),
    };
    let ext = match info.format {
        Format::Jpeg => "jpg",
        Format::Png => "png",
    };
    let Some(short) = args.resize_shorter else {
        // Stored as it is; check it decodes so the shards hold no broken file.
        return Ok(match decode_bytes(&bytes) {
            Ok(_) => Ok((stem, ext, bytes, sample.label)),
            Err(reason) => Err((sample.display(), reason.to_string())),
        });
    };
    let img = match decode_bytes(&bytes) {
        Ok(img) => img,
        Err(reason) => return Ok(Err((sample.display(), reason.to_string()))),
    };
    let (w, h) = (u64::from(img.width), u64::from(img.height));
    if w.min(h) <= u64::from(short) && info.format == Format::Jpeg {
        return Ok(Ok((stem, ext, bytes, sample.label)));
    }
    let s = u64::from(short).min(w.min(h));
    // torchvision `Resize(short)`: the longer side is truncated.
    let (nw, nh) = if w <= h { (s, s * h / w) } else { (s * w / h, s) };
    let small = resize(&img, nw as u32, nh as u32, Filter::Bicubic);
    let jpeg = rsb_data::jpeg::encode_rgb(&small, args.quality)
        .map_err(|e| DataError::Decode { path: sample.path.clone(), error: e.into() })?;
    Ok(Ok((stem, "jpg", jpeg, sample.label)))
}

/// Runs `worker data shard`.
pub fn shard(args: ShardArgs) -> Result<()> {
    if args.shard_size == 0 {
        bail!("--shard-size must be at least 1");
    }
    if !(1..=100).contains(&args.quality) {
        bail!("--quality must be in 1..=100, got {}", args.quality);
    }
    if args.resize_shorter == Some(0) {
        bail!("--resize-shorter must be at least 1");
    }
    let folder = match &args.labels {
        Some(labels) => ImageFolder::open_flat(&args.src, labels, None)?,
        None => ImageFolder::open(&args.src)?,
    };
    // Refuses an --out holding shards already, before any image is read.
    let mut writer = ShardWriter::create(&args.out, args.shard_size)?;
    let start = Instant::now();
    let total = folder.len();
    let threads = if args.threads == 0 { default_threads() } else { args.threads };
    let folder = Arc::new(folder);
    let args = Arc::new(args);
    let (f, a) = (Arc::clone(&folder), Arc::clone(&args));
    let loader = Loader::spawn(total, threads, 4 * threads, move |k| prepare(&f, k, &a));
    let (mut written, mut skipped, mut bytes_out) = (0usize, 0usize, 0u64);
    for item in loader {
        match item.context("preparing a sample")? {
            Ok((stem, ext, bytes, label)) => {
                let key = writer.key_for(&stem);
                writer.add(&key, ext, &bytes, label)?;
                written += 1;
                bytes_out += bytes.len() as u64;
            }
            Err((name, reason)) => {
                tracing::warn!(file = %name, %reason, "undecodable image left out of the shards");
                skipped += 1;
            }
        }
    }
    let shards = writer.finish(folder.classes())?;
    rsb_logging::output!(
        "{written} samples ({:.1} MB) in {} shards in {} ({skipped} undecodable files left out) in {:.1} s",
        bytes_out as f64 / 1e6,
        shards.len(),
        args.out.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
