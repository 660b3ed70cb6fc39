//! What a recipe describes, as the domain types of the data, model and
//! optimisation crates: transforms, training data and its sampler, the
//! validation split and further evaluation sets, the model (with its compute
//! precision and memory layout), LAMB, the LR schedule and the loader's
//! threads. Everything here is a pure translation; the loop lives in
//! [`crate::trainer`].

use crate::batch::Normalizer;
use crate::error::TrainError;
use crate::lamb::Lamb;
use crate::loss::Loss;
use crate::schedule::CosineWithWarmup;
use rsb_data::dataset::ImageFolder;
use rsb_data::eval_sets::{EvalSet, EvalSetKind as DataSetKind, EvalSetSpec};
use rsb_data::image::Filter;
use rsb_data::loader::default_threads;
use rsb_data::mixup::{MixMode, MixupConfig};
use rsb_data::pipeline::{EvalData, TrainData};
use rsb_data::rand_augment::{RaInterpolation, RandAugment, RandAugmentConfig};
use rsb_data::sampler::{SamplerKind, StreamSampler};
use rsb_data::transforms::{CropInterpolation, EvalTransform, TrainTransform};
use rsb_recipes::schema::{
    EvalSetKind, Interpolation, MixupMode, OptimizerSection, Recipe, ScheduleSection,
};
use rsb_vision::{Model, ModelConfig};
use std::path::Path;
use tch::Device;

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

/// The Mixup/CutMix configuration of a recipe, if it mixes.
pub fn mixup(recipe: &Recipe) -> Option<MixupConfig> {
    recipe.mixup.as_ref().map(|m| MixupConfig {
        mixup_alpha: m.mixup_alpha,
        cutmix_alpha: m.cutmix_alpha,
        prob: m.prob,
        switch_prob: m.switch_prob,
        mode: match m.mode {
            MixupMode::Batch => MixMode::Batch,
            MixupMode::Elem => MixMode::Elem,
        },
        label_smoothing: m.label_smoothing,
    })
}

/// The seed of the training data's order, whatever the recipe's `seed`: 0,
/// as in timm, whose `RepeatAugSampler` shuffles with the epoch alone and
/// whose `DistributedSampler` (A3, no repeated augmentation) with its
/// default seed 0 plus the epoch. timm's `--seed` never changes the data
/// order, so a seed study varies what the paper's varied: initialisation,
/// augmentation, Mixup/CutMix and drop-path.
pub const SAMPLER_SEED: u64 = 0;

/// The training data a recipe describes (class folders or tar shards).
pub fn train_data(recipe: &Recipe) -> Result<TrainData, TrainError> {
    let root = Path::new(&recipe.data.root).join(&recipe.data.train_split);
    let folder = ImageFolder::open_any(&root)?;
    let kind = match recipe.batch.repeated_augmentation {
        0 | 1 => SamplerKind::Distributed,
        r => SamplerKind::RepeatAug { num_repeats: r },
    };
    let sampler = StreamSampler::new(folder.len(), num_streams(recipe), kind, SAMPLER_SEED);
    Ok(TrainData::new(
        folder,
        train_transform(recipe)?,
        mixup(recipe),
        Loss::smoothing(&recipe.loss),
        sampler,
        recipe.batch.micro_size as usize,
        recipe.model.num_classes as usize,
        recipe.seed,
    )?
    .with_scaled_decode(recipe.data.scaled_decode))
}

/// The validation split a recipe names (`data.root`/`data.val_split`),
/// checked as the training split is: every label below `model.num_classes`,
/// and the same classes in the same order as `train_classes` (the training
/// split's, when it names them).
pub fn val_data(recipe: &Recipe, train_classes: &[String]) -> Result<EvalData, TrainError> {
    let val_root = Path::new(&recipe.data.root).join(&recipe.data.val_split);
    let folder = ImageFolder::open_any(&val_root)?;
    folder.check_same_classes(train_classes)?;
    folder.check_labels(recipe.model.num_classes as usize)?;
    Ok(EvalData::new(folder, eval_transform(recipe)?, recipe.eval.batch_size as usize))
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
            // Named by its recipe field, so a missing set says which one.
            EvalSet::open(
                &spec,
                transform,
                recipe.eval.batch_size as usize,
                recipe.model.num_classes as usize,
                classes,
            )
            .map_err(|e| TrainError::EvalSet { name: s.name.clone(), problem: e.to_string() })
        })
        .collect()
}

/// The model configuration of a recipe (three input channels).
pub fn model_config(recipe: &Recipe) -> ModelConfig {
    ModelConfig {
        num_classes: i64::from(recipe.model.num_classes),
        in_chans: 3,
        drop_path_rate: recipe.model.drop_path_rate,
        zero_init_last: recipe.model.zero_init_last,
    }
}

/// Whether the run keeps activations channels-last (on GPUs and CPUs alike:
/// oneDNN's NHWC kernels are the faster ones on both CPU classes here).
pub fn channels_last(recipe: &Recipe) -> bool {
    recipe.runtime.channels_last
}

/// The recipe's model on `device`, initialised from libtorch's current
/// generator, computing in the recipe's precision and memory layout.
pub fn model(recipe: &Recipe, device: Device) -> Result<Model, TrainError> {
    let mut model = Model::new(&recipe.model.name, model_config(recipe), device)?;
    model.set_compute_kind(crate::precision::compute_kind(recipe.runtime.precision, device));
    if channels_last(recipe) {
        model.to_channels_last()?;
    }
    Ok(model)
}

/// LAMB over `model`'s parameters with the recipe's settings.
pub fn optimizer(recipe: &Recipe, model: &Model) -> Result<Lamb, TrainError> {
    let OptimizerSection::Lamb(lamb) = &recipe.optimizer;
    Lamb::new(model, lamb)
}

/// The recipe's LR schedule for `steps_per_epoch` updates per epoch.
pub fn schedule(recipe: &Recipe, steps_per_epoch: u64) -> CosineWithWarmup {
    let OptimizerSection::Lamb(lamb) = &recipe.optimizer;
    let ScheduleSection::Cosine(cosine) = &recipe.schedule;
    CosineWithWarmup::new(cosine, lamb.lr, steps_per_epoch)
}

/// The input normalisation of a recipe on `device`.
pub fn normalizer(recipe: &Recipe, device: Device) -> Normalizer {
    Normalizer::new(recipe.data.mean, recipe.data.std, device, channels_last(recipe))
}

/// Loader threads (`data.loader_threads`, 0: this process's share of the cores).
pub fn loader_threads(recipe: &Recipe) -> usize {
    match recipe.data.loader_threads {
        0 => default_threads(),
        n => n as usize,
    }
}

/// Batches each loader keeps ready (at least one).
pub fn prefetch_batches(recipe: &Recipe) -> usize {
    recipe.data.prefetch_batches.max(1) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Tensor;

    fn default_recipe(overrides: &[String]) -> Recipe {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../recipes/fashion_mnist_resnet18.yaml");
        rsb_recipes::load(&path, overrides).expect("the default recipe loads")
    }

    /// A channels-last tensor of shape NCHW has stride 1 along C.
    fn is_channels_last(t: &Tensor) -> bool {
        t.size().len() == 4 && t.stride()[1] == 1 && t.size()[1] > 1
    }

    #[test]
    fn the_default_recipe_runs_channels_last_on_a_cpu() {
        let recipe = default_recipe(&[]);
        assert!(channels_last(&recipe));
        let images = normalizer(&recipe, Device::Cpu)
            .images(&[7u8; 2 * 4 * 4 * 3], 2, 4, 4)
            .expect("normalised");
        assert!(is_channels_last(&images), "input strides {:?}", images.stride());
        let model = model(&recipe, Device::Cpu).expect("model");
        let (name, conv) = &model.named_parameters()[0];
        assert!(is_channels_last(conv), "{name} strides {:?}", conv.stride());
    }

    #[test]
    fn the_data_order_does_not_follow_the_recipes_seed_as_in_timm() {
        let tmp = tempfile::tempdir().unwrap();
        for class in ["n01", "n02"] {
            let folder = tmp.path().join("train").join(class);
            std::fs::create_dir_all(&folder).unwrap();
            for i in 0..24 {
                std::fs::write(folder.join(format!("{i}.jpg")), b"").unwrap();
            }
        }
        let order = |seed: u64, repeats: u32| {
            let recipe = default_recipe(&[
                format!("data.root={}", tmp.path().display()),
                "data.train_split=train".to_owned(),
                "model.num_classes=2".to_owned(),
                format!("seed={seed}"),
                format!("batch.repeated_augmentation={repeats}"),
                "batch.global_size=16".to_owned(),
                "batch.micro_size=8".to_owned(),
            ]);
            let data = train_data(&recipe).expect("train data");
            let sampler = data.sampler();
            (0..sampler.num_streams()).map(|s| sampler.stream_indices(1, s)).collect::<Vec<_>>()
        };
        for repeats in [1, 3] {
            let order_at_seed_0 = order(0, repeats);
            assert_eq!(order(7, repeats), order_at_seed_0, "{repeats} repeats");
            // Shuffled by the epoch: timm's epoch 1 is not the file order.
            let in_file_order: Vec<usize> = (0..48).collect();
            assert_ne!(order_at_seed_0.concat()[..8], in_file_order[..8], "{repeats} repeats");
        }
    }

    #[test]
    fn a_validation_split_missing_a_class_is_refused_naming_it() {
        let tmp = tempfile::tempdir().unwrap();
        // Opening a split reads names only: empty files stand for photos.
        let split = |name: &str, classes: &[&str]| {
            for class in classes {
                let folder = tmp.path().join(name).join(class);
                std::fs::create_dir_all(&folder).unwrap();
                std::fs::write(folder.join("a.jpg"), b"").unwrap();
            }
        };
        split("train", &["n01", "n02", "n03"]);
        split("val", &["n01", "n03"]);
        let recipe = default_recipe(&[
            format!("data.root={}", tmp.path().display()),
            "data.train_split=train".to_owned(),
            "data.val_split=val".to_owned(),
            "model.num_classes=3".to_owned(),
        ]);
        let train = ImageFolder::open_any(&tmp.path().join("train")).unwrap();
        let Err(e) = val_data(&recipe, train.classes()) else {
            panic!("a validation split missing a class was taken")
        };
        let e = e.to_string();
        assert!(e.contains("val") && e.contains("class 1 is `n03`"), "{e}");
        split("val", &["n02"]);
        assert!(val_data(&recipe, train.classes()).is_ok());
    }

    #[test]
    fn channels_last_false_keeps_nchw_on_a_cpu() {
        let recipe = default_recipe(&["runtime.channels_last=false".to_owned()]);
        let images = normalizer(&recipe, Device::Cpu)
            .images(&[7u8; 2 * 4 * 4 * 3], 2, 4, 4)
            .expect("normalised");
        assert!(images.is_contiguous() && !is_channels_last(&images));
        let model = model(&recipe, Device::Cpu).expect("model");
        assert!(model.named_parameters()[0].1.is_contiguous());
    }
}
