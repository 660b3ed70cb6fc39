//! The worker's single-process commands: models, data import, train, eval, infer.

use anyhow::{bail, Context, Result};
use clap::builder::TypedValueParser;
use clap::Args;
use rsb_data::dataset::ImageFolder;
use rsb_data::eval_sets::EvalSet;
use rsb_data::image::Filter;
use rsb_data::pipeline::EvalData;
use rsb_data::transforms::EvalTransform;
use rsb_train::batch::Normalizer;
use rsb_train::evaluation::{evaluate, evaluate_set, EvalShard};
use rsb_train::stop::StopRequest;
use rsb_train::trainer::{RecipeCheck, RunOptions, Trainer};
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

/// `worker models`: Table 3 of the paper as the registry holds it: every
/// model with its parameter count (1000 classes), its A1/A2 and A3 training
/// and test resolutions, the test crop, and the paper's top-1 after A1/A2/A3.
pub fn models() -> Result<()> {
    rsb_logging::output!(
        "{:<22} {:<18} {:>11}  {:>11} {:>5}  {:>8} {:>5}  {:>5}  {:>16}",
        "name",
        "family",
        "params",
        "A1/A2 train",
        "test",
        "A3 train",
        "test",
        "crop",
        "paper A1/A2/A3"
    );
    for spec in registered_models() {
        let model = tch::no_grad(|| Model::new(spec.name, ModelConfig::default(), Device::Cpu))?;
        let paper = match rsb_recipes::table3_row(spec.name) {
            Ok(row) => format!("{:.1}/{:.1}/{:.1}", row.a1_top1, row.a2_top1, row.a3_top1),
            Err(_) => "-".to_string(),
        };
        let crop = if spec.crop_pct == spec.a3_crop_pct {
            format!("{:.2}", spec.crop_pct)
        } else {
            format!("{:.2}/{:.2}", spec.crop_pct, spec.a3_crop_pct)
        };
        rsb_logging::output!(
            "{:<22} {:<18} {:>11}  {:>11} {:>5}  {:>8} {:>5}  {:>5}  {:>16}",
            spec.name,
            spec.family,
            model.parameter_count(),
            spec.input_size,
            spec.test_input_size,
            spec.a3_input_size,
            spec.a3_test_input_size,
            crop,
            paper
        );
    }
    Ok(())
}

/// `worker data import fashion-mnist`.
pub fn import_fashion_mnist(
    idx_dir: &Path,
    out: &Path,
    train_per_class: Option<usize>,
) -> Result<()> {
    if let Some(done) = rsb_data::fashion_mnist::existing_import(out)
        .filter(|done| done.train_per_class == train_per_class)
    {
        rsb_logging::output!(
            "{} already holds a complete import ({} train, {} val images)",
            out.display(),
            done.train,
            done.val
        );
        return Ok(());
    }
    let summary = rsb_data::fashion_mnist::import_subset(idx_dir, out, train_per_class)?;
    rsb_logging::output!(
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
    /// The recipe: `--recipe FILE`, or `--procedure a1|a2|a3 --model NAME`.
    #[command(flatten)]
    pub recipe: rsb_recipes::RecipeArgs,
    /// Override a recipe field, e.g. `--set optimizer.lamb.lr=0.004` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Run folder: metrics.jsonl, the resolved recipe, checkpoints. One that
    /// already holds a run is only continued, with `--resume` of its own
    /// checkpoints; one that another trainer is writing is refused.
    #[arg(long)]
    pub out: PathBuf,
    /// Continue from a checkpoint folder, or from the newest intact checkpoint
    /// of a run folder (newer torn or corrupt ones are skipped, with a
    /// warning). The recipe must be the checkpoint's, except for the fields
    /// that `--set` changes. Without it, `--out` must not hold a run; with
    /// it, an `--out` that holds a run must be the one resumed.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Continue the run in `--out` if it holds one, else start it: for a
    /// command a scheduler may run again (a Slurm requeue). The run
    /// continues from its newest intact checkpoint; one that wrote none
    /// starts again, its earlier records moved to `OUT/abandoned-<unix
    /// seconds>/`.
    #[arg(long, conflicts_with = "resume")]
    pub auto_resume: bool,
    /// auto, cpu or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Stop after this many optimizer updates (smoke tests, benchmarks).
    #[arg(long)]
    pub max_updates: Option<u64>,
    /// Loader threads (same as `--set data.loader_threads=N`; default: the
    /// recipe's, where 0 means this process's cores divided by
    /// `LOCAL_WORLD_SIZE`, the number of ranks on this host).
    #[arg(long)]
    pub loader_threads: Option<u32>,
    /// Write which dataset indices every update consumed into
    /// `<out>/samples/rank-0.jsonl` (sample accounting in tests).
    #[arg(long)]
    pub trace_samples: bool,
}

/// `worker train`.
pub fn train(args: TrainArgs) -> Result<()> {
    let mut overrides = args.overrides.clone();
    if let Some(n) = args.loader_threads {
        // The recipe's bound, said of the flag (the override below would
        // be named as a `--set` the user never typed).
        if n > rsb_recipes::MAX_THREADS {
            bail!("--loader-threads must be at most {}, got {n}", rsb_recipes::MAX_THREADS);
        }
        overrides.push(format!("data.loader_threads={n}"));
    }
    let source = args.recipe.source()?;
    let recipe = source.load(&overrides)?;
    // Held until this process ends: a second trainer on the same folder
    // fails here instead of truncating the metrics log or deleting this
    // one's staging folders. Taken first, so it is told that the folder is
    // in use, not that it holds a run. Started again by a scheduler
    // (`--auto-resume`), it waits longer: for the earlier start, still
    // writing its stop's checkpoint (see `stop_at_signals`).
    let lock_wait = if args.auto_resume {
        rsb_job::run_folder::AUTO_RESUME_LOCK_WAIT
    } else {
        rsb_job::run_folder::LOCK_WAIT
    };
    let _run_folder_lock = rsb_job::RunFolderLock::acquire(&args.out, lock_wait)?;
    let resume = if args.auto_resume {
        let found = rsb_job::auto_resume(&args.out, &recipe, &overrides)
            .with_context(|| format!("--auto-resume {}", args.out.display()))?;
        tracing::info!("{found}");
        found.checkpoint().map(Path::to_owned)
    } else {
        rsb_job::check_out_folder(&args.out, args.resume.as_deref())?;
        args.resume
    };
    let device = parse_device(&args.device)?;
    tracing::info!(recipe = %recipe.name, %source, ?device, out = %args.out.display(), "training");
    let yaml = rsb_recipes::to_yaml(&recipe);
    let mut options = RunOptions::new(args.out.clone(), device);
    options.resume = resume;
    // A bar on a terminal, unless the log is JSON (its lines are not).
    options.progress = std::io::stderr().is_terminal()
        && rsb_logging::format_from_env() == rsb_logging::LogFormat::Text;
    options.max_updates = args.max_updates;
    options.trace_samples = args.trace_samples;
    options.recipe_check = RecipeCheck::ExplainedBy(overrides);
    options.cuda_sync_debug = cuda_sync_debug_from_env()?;
    options.stop = Some(stop_at_signals()?);
    // Asked before the trainer opens the metrics log there.
    let held_run = rsb_job::run_folder::holds_run(&args.out);
    // Resolves and checks `--resume` before the run folder is written to.
    let mut trainer = Trainer::new(recipe, options)?;
    let resolved = args.out.join(rsb_job::run_folder::RESOLVED_RECIPE);
    rsb_job::write_resolved_recipe(&args.out, &yaml, held_run)
        .with_context(|| format!("writing {}", resolved.display()))?;
    let summary = trainer.run()?;
    if let Some(last) = summary.epochs.last() {
        let acc = match (last.top1, last.top5) {
            (Some(t1), Some(t5)) => format!("val top-1 {t1:.2}%  top-5 {t5:.2}%"),
            _ => "not evaluated".into(),
        };
        rsb_logging::output!("finished epoch {} after {:.0} s: {acc}", last.epoch, summary.wall_s);
    } else {
        rsb_logging::output!(
            "stopped after {} updates in {:.0} s",
            summary.updates,
            summary.wall_s
        );
    }
    Ok(())
}

/// Asks the training to stop at the first `SIGTERM` or `SIGINT` (a
/// scheduler's preemption, Ctrl-C): it stops after the update it is in,
/// logs that step and writes a checkpoint of that position, and `worker
/// train --auto-resume` continues from it.
/// A second signal exits at once, without it. Before, either signal killed
/// the process outright, and the updates since the last periodic
/// checkpoint were lost.
fn stop_at_signals() -> Result<StopRequest> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut signals = {
        let _inside = runtime.enter();
        rsb_process::stop_signal().context("installing signal handlers")?
    };
    let stop = StopRequest::new();
    let asked = stop.clone();
    std::thread::Builder::new().name("stop-signals".into()).spawn(move || {
        runtime.block_on(async {
            let first = signals.recv().await;
            asked.request(first.to_string());
            tracing::warn!(
                "{first}: stopping after this update with a checkpoint of it; a second signal \
                 exits at once, without one"
            );
            let second = signals.recv().await;
            // Not `eprintln!`, which panics when stderr is gone.
            rsb_logging::stderr_line(&rsb_logging::error_line(&format!(
                "{second} again: exiting at once, without a checkpoint of this position"
            )));
            rsb_process::exit_now(STOPPED_AGAIN_EXIT_CODE);
        })
    })?;
    Ok(stop)
}

/// Exit status of `worker train` ended by a second stop signal: 128 plus
/// SIGINT's number, as a shell reports a process that Ctrl-C ended.
const STOPPED_AGAIN_EXIT_CODE: i32 = 130;

/// Arguments of `worker eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Registered model name (timm's); default: the recipe's.
    #[arg(long)]
    pub model: Option<String>,
    /// Weights: a .safetensors file with timm keys, or a checkpoint folder
    /// or run folder (its newest intact checkpoint). A checkpoint's weights
    /// are checked against its manifest first.
    #[arg(long)]
    pub weights: PathBuf,
    /// Images: a split (class folders, or tar shards) or a dataset root with
    /// `val/`; default: the recipe's `data.root`/`data.val_split`.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// `--data` is a flat folder labelled by this file (`file<TAB>class`
    /// lines, or Kaggle's LOC_val_solution.csv; class names in natural order).
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// `--data` is ImageNet-V2: class folders named by class index.
    #[arg(long)]
    pub v2: bool,
    /// Also score the `--data` images against ImageNet-ReaL (`real.json`).
    #[arg(long)]
    pub real_labels: Option<PathBuf>,
    /// Recipe: model, classes, evaluation transform, normalisation, and its
    /// further evaluation sets (`eval.sets`), each reported.
    #[arg(long)]
    pub recipe: Option<PathBuf>,
    /// Override a recipe field (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Classes of the head; default: the recipe's, else the number of class folders.
    #[arg(long, value_parser = class_count)]
    pub num_classes: Option<i64>,
    /// Centre-crop side; default: the recipe's, else the model's test resolution.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub input_size: Option<u32>,
    /// Crop fraction, in (0, 1]; default: the recipe's, else the model's.
    #[arg(long, value_parser = crop_fraction)]
    pub crop_pct: Option<f64>,
    /// Images per batch.
    #[arg(
        long,
        default_value_t = 256,
        value_parser = clap::value_parser!(u32).range(1..=65_536).map(|n| n as usize)
    )]
    pub batch_size: usize,
    /// auto, cpu or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Loader threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

/// A `--num-classes`: 1 to a recipe's most (`rsb_recipes::MAX_CLASSES`).
fn class_count(text: &str) -> Result<i64, String> {
    let value: i64 = text.parse().map_err(|e| format!("{e}"))?;
    let max = i64::from(rsb_recipes::MAX_CLASSES);
    if (1..=max).contains(&value) {
        Ok(value)
    } else {
        Err(format!("must be between 1 and {max}, got {text}"))
    }
}

/// Warns when `weights` are a checkpoint's whose run scored its validation
/// at another size or crop than the model's defaults this evaluation uses
/// (a run trained at 32 px, scored here at 224): the numbers would not be
/// the run's. Nothing is said of plain weights files.
fn warn_of_the_runs_own_evaluation(weights: &Path, input_size: u32, crop_pct: f64) {
    let Some((checkpoint, trained)) = trained_with(weights) else { return };
    let (size, crop) = (trained.eval.input_size, trained.eval.crop_pct);
    if size != input_size || (crop - crop_pct).abs() > 1e-9 {
        tracing::warn!(
            "{}: its run scored its validation at {size} px with crop {crop} (its recipe); \
             this evaluation uses the model's defaults, {input_size} px with crop {crop_pct}. \
             Pass the run's recipe.yaml as --recipe, or --input-size {size} --crop-pct {crop}, \
             to score as the run did",
            checkpoint.display()
        );
    }
}

/// The checkpoint folder of `weights` and the recipe its run trained with,
/// when `weights` are a checkpoint's (plain weights files hold no recipe).
fn trained_with(weights: &Path) -> Option<(&Path, rsb_recipes::Recipe)> {
    let checkpoint = weights.parent()?;
    if !checkpoint.join(rsb_job::checkpoint::STATE).is_file() {
        return None;
    }
    let state = rsb_job::checkpoint::read_state(checkpoint).ok()?;
    let saved = state.get(rsb_job::run_folder::STATE_RECIPE_KEY)?;
    let trained = serde_json::from_value::<rsb_recipes::Recipe>(saved.clone()).ok()?;
    Some((checkpoint, trained))
}

/// A `--crop-pct`: a number in (0, 1].
fn crop_fraction(text: &str) -> Result<f64, String> {
    let value: f64 = text.parse().map_err(|e| format!("{e}"))?;
    if value > 0.0 && value <= 1.0 {
        Ok(value)
    } else {
        Err(format!("must be in (0, 1], got {text}"))
    }
}

/// Batches `worker eval`'s loader prepares ahead of the model.
const EVAL_PREFETCH: usize = 4;

/// Of the memory available, the share a CPU evaluation plans to take: the
/// rest is headroom for the measurement's error and the decoders.
const EVAL_MEMORY_SHARE: f64 = 0.75;

/// The largest batch, up to `asked`, whose CPU evaluation at `size` px fits
/// in the memory this host has available, so that an evaluation too large
/// for it (`--input-size 3000` at the default batch of 256: hundreds of
/// GiB) runs in smaller batches, saying so, instead of being killed by the
/// kernel's OOM killer. An image's share is measured: the peak memory of
/// the model's forward pass over one image of that size (its input
/// included), plus the decoded bytes of it that the loader holds in the
/// batches it prepares ahead. A pass at half the side comes first: it pays
/// the one-time costs (library pages, thread pools) that would swell the
/// measure, and from 512 px its figure, scaled by the area, refuses an
/// image too large for the host before a pass at full size could be
/// killed. One image that does not fit in [`EVAL_MEMORY_SHARE`] of the
/// memory available is refused. Scores do not depend on the batch (the
/// model evaluates each image on its own). Where memory cannot be
/// measured, the batch asked for is kept. The warning counts the batch the
/// `images` of the set make at most (a batch of 256 over 30 images holds
/// 30).
fn eval_batch_that_fits(
    model: &mut Model,
    model_name: &str,
    size: u32,
    asked: usize,
    images: usize,
) -> Result<usize> {
    use crate::host_memory::{human, peak_growth};
    let Some(available) = crate::host_memory::available_bytes() else {
        return Ok(asked);
    };
    let mut forward_one = |side: u32| {
        let _guard = tch::no_grad_guard();
        let side = i64::from(side);
        let probe = Tensor::f_zeros([1, 3, side, side], (Kind::Float, Device::Cpu))?;
        model.forward(&probe, ForwardMode::Eval).map(drop)
    };
    let half = (size / 2).max(32).min(size);
    // A model that takes one size only fails here: the pass at full size
    // then measures alone. Below `EXTRAPOLATED_FROM` px the constant part
    // of the half pass (its one-time costs) outweighs the part that grows
    // with the area, and one image is small: the full pass is not refused
    // ahead.
    const EXTRAPOLATED_FROM: u32 = 512;
    if let (Ok(()), Some(growth)) = peak_growth(|| forward_one(half)) {
        let predicted = (growth as f64 * (f64::from(size) / f64::from(half)).powi(2)) as u64;
        if size >= EXTRAPOLATED_FROM && predicted > available {
            bail!(
                "one {size} px image would take about {} to evaluate with {model_name} \
                 (extrapolated by area from a pass at {half} px, measured: {}), more than the \
                 {} this host has available: choose a smaller --input-size, or give it more \
                 memory",
                human(predicted),
                human(growth),
                human(available)
            );
        }
    }
    let (forward, measured) = peak_growth(|| forward_one(size));
    forward.with_context(|| format!("{model_name}: a forward pass over one {size} px image"))?;
    let Some(forward) = measured else {
        return Ok(asked);
    };
    let decoded = 3 * u64::from(size) * u64::from(size) * (EVAL_PREFETCH as u64 + 2);
    let per_image = forward + decoded;
    let usable = (available as f64 * EVAL_MEMORY_SHARE) as u64;
    let fits = usize::try_from(usable / per_image.max(1)).unwrap_or(usize::MAX);
    let share = format!(
        "the {} an evaluation plans for ({:.0}% of the {} this host has available)",
        human(usable),
        EVAL_MEMORY_SHARE * 100.0,
        human(available)
    );
    if fits == 0 {
        // The pass over one image ran, but the evaluation holds more than
        // it: the process, the loader, the scores.
        bail!(
            "one {size} px image takes about {} to evaluate with {model_name} (its forward \
             pass, measured, and the loader's decoded copies), more than {share}: choose a \
             smaller --input-size, or give it more memory",
            human(per_image)
        );
    }
    let held = asked.min(images.max(1));
    if fits < held {
        tracing::warn!(
            "--batch-size {asked} at {size} px would take about {} for {held} images (about \
             {} an image: {model_name}'s forward pass, measured, and the loader's decoded \
             copies), more than {share}: evaluating {fits} image(s) per batch instead (the \
             scores do not depend on the batch)",
            human(per_image.saturating_mul(held as u64)),
            human(per_image)
        );
    } else if fits < asked {
        tracing::debug!("batches of at most {fits} at {size} px fit in {share}");
    }
    Ok(asked.min(fits))
}

/// `worker eval`: top-1/top-5 on the given images (and ReaL on them with
/// `--real-labels`), then on each of the recipe's `eval.sets`.
pub fn eval(args: EvalArgs) -> Result<()> {
    let recipe = match &args.recipe {
        Some(path) => Some(rsb_recipes::load(path, &args.overrides)?),
        None if !args.overrides.is_empty() => bail!("--set needs --recipe"),
        None => None,
    };
    let model_name = match (&args.model, &recipe) {
        (Some(m), _) => m.clone(),
        (None, Some(r)) => r.model.name.clone(),
        (None, None) => bail!("--model is required without --recipe"),
    };
    let spec = rsb_vision::find_model(&model_name)?;
    if args.input_size.is_some() || args.crop_pct.is_some() {
        // The recipe's bound, for the crop these options make.
        let size = args.input_size.unwrap_or(match &recipe {
            Some(r) => r.eval.input_size,
            None => spec.test_input_size as u32,
        });
        let crop_pct = args.crop_pct.unwrap_or(match &recipe {
            Some(r) => r.eval.crop_pct,
            None => spec.crop_pct,
        });
        if let Some(problem) = rsb_recipes::eval_resize_problem(size, crop_pct) {
            bail!("--input-size {size} --crop-pct {crop_pct}: {problem}");
        }
    }
    let split = match (&args.data, &recipe) {
        (Some(d), _) if d.join("val").is_dir() && args.labels.is_none() => d.join("val"),
        (Some(d), _) => d.clone(),
        (None, Some(r)) => Path::new(&r.data.root).join(&r.data.val_split),
        (None, None) => bail!("--data is required without --recipe"),
    };
    let recipe_classes = recipe.as_ref().map(|r| r.model.num_classes as usize);
    let folder = if let Some(labels) = &args.labels {
        ImageFolder::open_flat(&split, labels, None)?
    } else if args.v2 {
        let n = args.num_classes.map(|n| n as usize).or(recipe_classes).unwrap_or(1000);
        ImageFolder::open_numbered(&split, n)?
    } else {
        ImageFolder::open_any(&split)?
    };
    let num_classes = args
        .num_classes
        .or(recipe_classes.map(|n| n as i64))
        .unwrap_or(folder.classes().len() as i64);
    folder.check_labels(num_classes as usize)?;
    let device = parse_device(&args.device)?;
    let mut model =
        Model::new(&model_name, ModelConfig { num_classes, ..Default::default() }, device)?;
    let weights = rsb_job::checkpoint::resolve_weights(&args.weights)?;
    model.load_safetensors(&weights)?;
    if recipe.is_none() && args.input_size.is_none() && args.crop_pct.is_none() {
        warn_of_the_runs_own_evaluation(&weights, spec.test_input_size as u32, spec.crop_pct);
    }
    let transform = match &recipe {
        Some(r) => {
            let mut t = rsb_train::from_recipe::eval_transform(r)?;
            if args.input_size.is_some() || args.crop_pct.is_some() {
                t = EvalTransform::new(
                    args.input_size.unwrap_or(r.eval.input_size),
                    args.crop_pct.unwrap_or(r.eval.crop_pct),
                    t.filter,
                );
            }
            t
        }
        None => EvalTransform::new(
            args.input_size.unwrap_or(spec.test_input_size as u32),
            args.crop_pct.unwrap_or(spec.crop_pct),
            Filter::Bicubic,
        ),
    };
    let (mean, std) = match &recipe {
        Some(r) => (r.data.mean, r.data.std),
        // As the run trained, for a checkpoint's weights (a ViT trained
        // before its Table-3 normalisation was timm's kept ImageNet's);
        // otherwise as timm's data config for the model (the ViTs: 0.5).
        None => match trained_with(&weights) {
            Some((_, trained)) => (trained.data.mean, trained.data.std),
            None => {
                let timm = rsb_recipes::procedure::timm_normalization(&model_name);
                (timm.mean, timm.std)
            }
        },
    };
    let normalizer = Normalizer::new(mean, std, device, false);
    let threads =
        if args.threads == 0 { rsb_data::loader::default_threads() } else { args.threads };
    let images = folder.len();
    let batch_size = match device {
        Device::Cpu => {
            eval_batch_that_fits(&mut model, &model_name, transform.size, args.batch_size, images)?
        }
        // A GPU out of memory is libtorch's error, not the OOM killer.
        _ => args.batch_size,
    };
    // The class names eval sets are held to (and label files map through):
    // V2's numbered folders name indices, not classes.
    let classes = if args.v2 { Vec::new() } else { folder.classes().to_vec() };
    let real_set = match &args.real_labels {
        Some(path) => {
            let real = rsb_data::labels::RealLabels::read(path)?;
            let scoring = rsb_data::labels::Scoring::Real(Arc::new(real));
            scoring.check(folder.samples(), num_classes as usize)?;
            let data = Arc::new(EvalData::new(folder.clone(), transform, batch_size));
            Some(EvalSet { name: "real".into(), data, scoring })
        }
        None => None,
    };
    let mut sets: Vec<EvalSet> = real_set.into_iter().collect();
    // The recipe's eval sets are opened and checked before the val pass, so
    // that a broken one is named at once, not after it.
    if let Some(r) = &recipe {
        let mut r = r.clone();
        r.model.num_classes = num_classes as u32;
        r.eval.batch_size = batch_size as u32;
        // Scored as the given images are: at the size and crop asked for.
        r.eval.input_size = args.input_size.unwrap_or(r.eval.input_size);
        r.eval.crop_pct = args.crop_pct.unwrap_or(r.eval.crop_pct);
        sets.extend(rsb_train::from_recipe::eval_sets(&r, &classes)?);
    }
    let data = Arc::new(EvalData::new(folder, transform, batch_size));
    let acc = evaluate(&mut model, &data, &normalizer, EvalShard::whole(threads, EVAL_PREFETCH))?;
    if acc.scored_nothing() {
        bail!(
            "{}: none of its {images} images could be read or decoded (each is named in a \
             warning above)",
            split.display()
        );
    }
    let skipped = data.bad_files().replacements();
    rsb_logging::output!(
        "{}: {} images ({} undecodable, skipped)  top-1 {:.3}%  top-5 {:.3}%  loss {:.4}",
        split.display(),
        images,
        skipped,
        acc.top1_pct(),
        acc.top5_pct(),
        acc.mean_loss()
    );
    for set in &sets {
        let score =
            evaluate_set(&mut model, set, &normalizer, EvalShard::whole(threads, EVAL_PREFETCH))?;
        if score.scored_nothing() {
            bail!(
                "eval set `{}`: none of its {} images could be read or decoded (each is named \
                 in a warning above)",
                set.name,
                set.data.folder().len()
            );
        }
        rsb_logging::output!(
            "{}: {} images scored ({} without a valid label, {} undecodable)  top-1 {:.3}%  top-5 {:.3}%",
            set.name,
            score.count,
            score.excluded,
            set.data.bad_files().replacements(),
            score.top1_pct(),
            score.top5_pct()
        );
    }
    Ok(())
}

/// Arguments of `worker infer`.
#[derive(Debug, Args)]
pub struct InferArgs {
    /// Registered model name (timm's).
    #[arg(long)]
    pub model: String,
    /// Classes of the head.
    #[arg(long, value_parser = class_count)]
    pub num_classes: i64,
    /// Weights: a .safetensors file with timm keys, or a checkpoint folder
    /// or run folder (its newest intact checkpoint). A checkpoint's weights
    /// are checked against its manifest first.
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
    model.load_safetensors(&rsb_job::checkpoint::resolve_weights(&args.weights)?)?;
    let input = read_input_npy(&args.input)?;
    let logits = tch::no_grad(|| model.forward(&input.to_device(device), ForwardMode::Eval))?;
    let tmp = args.output.with_extension("npy.tmp");
    logits
        .to_device(Device::Cpu)
        .write_npy(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &args.output)
        .with_context(|| format!("writing {}", args.output.display()))?;
    rsb_logging::output!("{}: logits {:?}", args.output.display(), logits.size());
    Ok(())
}

/// Reads `worker infer`'s input, a C-order float32 `.npy` of shape
/// `[N, 3, H, W]`, its data checked against the shape its header gives
/// (libtorch's own reader trusts the header, and read past the end of a
/// file shorter than that).
fn read_input_npy(path: &Path) -> Result<Tensor> {
    let name = path.display();
    let file = std::fs::File::open(path).with_context(|| format!("reading {name}"))?;
    let file_len = file.metadata().with_context(|| format!("reading {name}"))?.len();
    let npy = npyz::NpyFile::new(std::io::BufReader::new(file))
        .with_context(|| format!("{name}: not a .npy file"))?;
    let shape = npy.shape().to_vec();
    let dtype = match npy.dtype() {
        npyz::DType::Plain(type_str) => type_str.to_string(),
        other => format!("{other:?}"),
    };
    if dtype != "<f4" || shape.len() != 4 || shape[1] != 3 {
        bail!("{name}: expected a float32 array of shape [N, 3, H, W], got {dtype} {shape:?}");
    }
    if npy.order() != npyz::Order::C {
        bail!("{name}: a Fortran-order array; expected C order (numpy's default)");
    }
    let data_bytes = shape.iter().try_fold(4u64, |bytes, &d| bytes.checked_mul(d));
    if data_bytes.is_none_or(|bytes| bytes > file_len) {
        bail!(
            "{name}: its header gives shape {shape:?}, {} bytes of float32, but the file holds \
             only {file_len} bytes",
            data_bytes.map_or("more than 2^64".to_string(), |b| b.to_string())
        );
    }
    let values: Vec<f32> = npy.into_vec().with_context(|| {
        format!("{name}: reading the {shape:?} float32 its header gives (cut short?)")
    })?;
    let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    Ok(Tensor::from_slice(&values).f_view(dims.as_slice())?)
}

/// `RSB_CUDA_SYNC_DEBUG` (`off`, `warn` or `error`): libtorch's CUDA sync
/// debug mode within every training update on a GPU, to show that an update
/// makes no synchronising CUDA call (`bench/gpu.sh` sets `warn`). `error`
/// is refused with the ring backend on a GPU, which stages each gradient
/// bucket through host memory by design; a checksum a debugging run asks
/// for after each update (`RSB_CHECKSUM_EVERY_UPDATE`) is read with the
/// check off.
pub fn cuda_sync_debug_from_env() -> Result<Option<rsb_train::trainer::SyncDebugMode>> {
    use rsb_train::trainer::SyncDebugMode;
    let Ok(value) = std::env::var("RSB_CUDA_SYNC_DEBUG") else { return Ok(None) };
    match value.as_str() {
        "" | "off" => Ok(None),
        "warn" => Ok(Some(SyncDebugMode::Warn)),
        "error" => Ok(Some(SyncDebugMode::Error)),
        other => bail!("RSB_CUDA_SYNC_DEBUG=`{other}`: expected off, warn or error"),
    }
}
