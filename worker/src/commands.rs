//! The worker's single-process commands: models, data import, train, eval, infer.

use anyhow::{bail, Context, Result};
use clap::Args;
use rsb_data::dataset::ImageFolder;
use rsb_data::image::Filter;
use rsb_data::pipeline::EvalData;
use rsb_data::transforms::EvalTransform;
use rsb_train::batch::Normalizer;
use rsb_train::trainer::{evaluate, RunOptions, Trainer};
use rsb_vision::{registered_models, ForwardMode, Model, ModelConfig};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// Which device to use: `auto` (the first GPU if any), `cpu`, or `cuda:N`.
pub fn parse_device(spec: &str) -> Result<Device> {
    match spec {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        other => {
            let index = other
                .strip_prefix("cuda:")
                .and_then(|i| i.parse::<usize>().ok())
                .with_context(|| format!("--device `{other}`: expected auto, cpu or cuda:N"))?;
            let count = tch::Cuda::device_count() as usize;
            if index >= count {
                bail!("--device {other}: this host has {count} CUDA device(s)");
            }
            Ok(Device::Cuda(index))
        }
    }
}

/// `worker models`.
pub fn models() -> Result<()> {
    println!("{:<12} {:>12} {:>6} {:>6} {:>6}", "name", "params", "train", "test", "crop");
    for spec in registered_models() {
        let model = tch::no_grad(|| Model::new(spec.name, ModelConfig::default(), Device::Cpu))?;
        println!(
            "{:<12} {:>12} {:>6} {:>6} {:>6.3}",
            spec.name,
            model.parameter_count(),
            spec.input_size,
            spec.test_input_size,
            spec.crop_pct
        );
    }
    Ok(())
}

/// `worker data import fashion-mnist`.
pub fn import_fashion_mnist(idx_dir: &Path, out: &Path) -> Result<()> {
    if let Some(done) = rsb_data::fashion_mnist::existing_import(out) {
        println!(
            "{} already holds a complete import ({} train, {} val images)",
            out.display(),
            done.train,
            done.val
        );
        return Ok(());
    }
    let summary = rsb_data::fashion_mnist::import(idx_dir, out)?;
    println!(
        "imported {} train and {} val images into {}",
        summary.train,
        summary.val,
        out.display()
    );
    Ok(())
}

/// Arguments of `worker train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Recipe YAML file.
    #[arg(long)]
    pub recipe: PathBuf,
    /// Override a recipe field, e.g. `--set optimizer.lamb.lr=0.004` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Run folder: metrics.jsonl, the resolved recipe, checkpoints.
    #[arg(long)]
    pub out: PathBuf,
    /// Continue from a checkpoint folder, or from the newest checkpoint of a run folder.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// auto, cpu or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Stop after this many optimizer updates (smoke tests, benchmarks).
    #[arg(long)]
    pub max_updates: Option<u64>,
}

/// `worker train`.
pub fn train(args: TrainArgs) -> Result<()> {
    let recipe = rsb_recipes::load(&args.recipe, &args.overrides)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let resolved = args.out.join("recipe.yaml");
    let tmp = args.out.join(".recipe.yaml.tmp");
    std::fs::write(&tmp, rsb_recipes::to_yaml(&recipe))
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &resolved).with_context(|| format!("writing {}", resolved.display()))?;
    let device = parse_device(&args.device)?;
    tracing::info!(recipe = %args.recipe.display(), ?device, out = %args.out.display(), "training");
    let mut options = RunOptions::new(args.out.clone(), device);
    options.resume = args.resume;
    options.progress = std::io::stderr().is_terminal();
    options.max_updates = args.max_updates;
    let mut trainer = Trainer::new(recipe, options)?;
    let summary = trainer.run()?;
    if let Some(last) = summary.epochs.last() {
        let acc = match (last.top1, last.top5) {
            (Some(t1), Some(t5)) => format!("val top-1 {t1:.2}%  top-5 {t5:.2}%"),
            _ => "not evaluated".into(),
        };
        println!("finished epoch {} after {:.0} s: {acc}", last.epoch, summary.wall_s);
    } else {
        println!("stopped after {} updates in {:.0} s", summary.updates, summary.wall_s);
    }
    Ok(())
}

/// Arguments of `worker eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Registered model name (timm's).
    #[arg(long)]
    pub model: String,
    /// Weights (.safetensors with timm keys).
    #[arg(long)]
    pub weights: PathBuf,
    /// Image folder: a split (`<class>/<image>`) or a dataset root with `val/`.
    #[arg(long)]
    pub data: PathBuf,
    /// Classes of the head; default: the number of class folders.
    #[arg(long)]
    pub num_classes: Option<i64>,
    /// Centre-crop side; default: the model's test resolution.
    #[arg(long)]
    pub input_size: Option<u32>,
    /// Crop fraction; default: the model's.
    #[arg(long)]
    pub crop_pct: Option<f64>,
    /// Images per batch.
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    /// auto, cpu or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Loader threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

/// `worker eval`.
pub fn eval(args: EvalArgs) -> Result<()> {
    let split =
        if args.data.join("val").is_dir() { args.data.join("val") } else { args.data.clone() };
    let folder = ImageFolder::open(&split)?;
    let num_classes = args.num_classes.unwrap_or(folder.classes().len() as i64);
    let device = parse_device(&args.device)?;
    let spec = rsb_vision::find_model(&args.model)?;
    let mut model =
        Model::new(&args.model, ModelConfig { num_classes, ..Default::default() }, device)?;
    model.load_safetensors(&args.weights)?;
    let transform = EvalTransform::new(
        args.input_size.unwrap_or(spec.test_input_size as u32),
        args.crop_pct.unwrap_or(spec.crop_pct),
        Filter::Bicubic,
    );
    let images = folder.len();
    let data = Arc::new(EvalData::new(folder, transform, args.batch_size));
    let normalizer = Normalizer::new(
        rsb_recipes::schema::IMAGENET_DEFAULT_MEAN,
        rsb_recipes::schema::IMAGENET_DEFAULT_STD,
        device,
        false,
    );
    let threads =
        if args.threads == 0 { rsb_data::loader::default_threads() } else { args.threads };
    let acc = evaluate(&mut model, &data, &normalizer, threads, 4, (0, 1))?;
    let skipped = data.bad_files().replacements();
    println!(
        "{}: {} images ({} undecodable, skipped)  top-1 {:.3}%  top-5 {:.3}%  loss {:.4}",
        split.display(),
        images,
        skipped,
        acc.top1_pct(),
        acc.top5_pct(),
        acc.mean_loss()
    );
    Ok(())
}

/// Arguments of `worker infer`.
#[derive(Debug, Args)]
pub struct InferArgs {
    /// Registered model name (timm's).
    #[arg(long)]
    pub model: String,
    /// Classes of the head.
    #[arg(long)]
    pub num_classes: i64,
    /// Weights (.safetensors with timm keys).
    #[arg(long)]
    pub weights: PathBuf,
    /// float32 NCHW array, already normalised.
    #[arg(long)]
    pub input: PathBuf,
    /// Where to write the float32 logits `[N, num_classes]`.
    #[arg(long)]
    pub output: PathBuf,
    /// auto, cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// `worker infer`.
pub fn infer(args: InferArgs) -> Result<()> {
    let device = parse_device(&args.device)?;
    let mut model = Model::new(
        &args.model,
        ModelConfig { num_classes: args.num_classes, ..Default::default() },
        device,
    )?;
    model.load_safetensors(&args.weights)?;
    let input = Tensor::read_npy(&args.input)
        .with_context(|| format!("reading {}", args.input.display()))?;
    if input.kind() != Kind::Float || input.dim() != 4 || input.size()[1] != 3 {
        bail!(
            "{}: expected a float32 array of shape [N, 3, H, W], got {:?} {:?}",
            args.input.display(),
            input.kind(),
            input.size()
        );
    }
    let logits = tch::no_grad(|| model.forward(&input.to_device(device), ForwardMode::Eval))?;
    let tmp = args.output.with_extension("npy.tmp");
    logits
        .to_device(Device::Cpu)
        .write_npy(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &args.output)
        .with_context(|| format!("writing {}", args.output.display()))?;
    println!("{}: logits {:?}", args.output.display(), logits.size());
    Ok(())
}
