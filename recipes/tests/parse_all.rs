//! Every `*.yaml` under `recipes/` loads and validates, survives the YAML round
//! trip, and the ResNet-50 A1/A2/A3 recipes hold the paper's Table-1 values.

use std::path::{Path, PathBuf};

use rsb_recipes::{
    load, load_str, to_yaml, validate, Interpolation, LossSection, OptimizerSection, Precision,
    Recipe, ScheduleSection, StepOn,
};

fn recipes_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// All `*.yaml` files under `dir`, recursively, skipping `target` and hidden folders.
fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for path in entries {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if path.is_dir() {
            if name != "target" && !name.starts_with('.') {
                yaml_files(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
}

fn all_recipes() -> Vec<PathBuf> {
    let mut files = Vec::new();
    yaml_files(&recipes_dir(), &mut files);
    files
}

fn load_named(name: &str) -> Recipe {
    let path = recipes_dir().join(name);
    load(&path, &[]).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn every_recipe_loads_validates_and_round_trips() {
    let files = all_recipes();
    let names: Vec<String> = files
        .iter()
        .map(|p| p.strip_prefix(recipes_dir()).unwrap().display().to_string())
        .collect();
    for expected in [
        "resnet50_a1.yaml",
        "resnet50_a2.yaml",
        "resnet50_a3.yaml",
        "fashion_mnist_resnet18.yaml",
        "fashion_mnist_a3_strict.yaml",
        "debug/resnet18_tiny_cpu.yaml",
    ] {
        assert!(names.iter().any(|n| n == expected), "{expected} missing from {names:?}");
    }
    for path in &files {
        let recipe = load(path, &[]).unwrap_or_else(|e| panic!("{e}"));
        validate(&recipe).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // The file name is the recipe name.
        let stem = path.file_stem().unwrap().to_str().unwrap();
        assert_eq!(recipe.name, stem, "{}", path.display());
        // Round trip through the resolved YAML.
        let yaml = to_yaml(&recipe);
        let back = load_str(&yaml, Path::new("resolved.yaml"), &[])
            .unwrap_or_else(|e| panic!("{}: {e}\n{yaml}", path.display()));
        assert_eq!(back, recipe, "{}", path.display());
    }
}

#[test]
fn round_trip_through_a_file() {
    let recipe = load_named("resnet50_a1.yaml");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("recipe.yaml");
    std::fs::write(&path, to_yaml(&recipe)).unwrap();
    assert_eq!(load(&path, &[]).unwrap(), recipe);
}

/// The values common to A1, A2 and A3 (Table 1 plus timm v0.5.x defaults).
fn assert_common_rsb(r: &Recipe) {
    assert_eq!(r.model.name, "resnet50");
    assert_eq!(r.model.num_classes, 1000);
    assert!(r.model.zero_init_last);
    assert_eq!(r.data.root, "/data/imagenet");
    assert_eq!(r.data.mean, rsb_recipes::IMAGENET_DEFAULT_MEAN);
    assert_eq!(r.data.std, rsb_recipes::IMAGENET_DEFAULT_STD);
    assert!(!r.data.scaled_decode, "timm decodes every JPEG at full size");
    assert_eq!(r.augment.scale, [0.08, 1.0]);
    assert_eq!(r.augment.ratio, [3.0 / 4.0, 4.0 / 3.0]);
    assert_eq!(r.augment.hflip, 0.5);
    assert_eq!(r.augment.interpolation, Interpolation::Random);
    let mixup = r.mixup.as_ref().expect("mixup on");
    assert_eq!(mixup.cutmix_alpha, 1.0);
    assert_eq!(mixup.prob, 1.0);
    assert_eq!(mixup.switch_prob, 0.5);
    let LossSection::Bce(bce) = &r.loss else { panic!("BCE loss expected") };
    assert_eq!(bce.target_threshold, Some(0.2));
    let OptimizerSection::Lamb(lamb) = &r.optimizer;
    assert_eq!(lamb.betas, [0.9, 0.999]);
    assert_eq!(lamb.eps, 1e-6);
    assert_eq!(lamb.max_grad_norm, Some(1.0));
    assert!(!lamb.trust_clip && !lamb.always_adapt);
    let ScheduleSection::Cosine(cos) = &r.schedule;
    assert_eq!(cos.warmup_epochs, 5.0);
    assert_eq!(cos.warmup_lr, 1e-4);
    assert_eq!(cos.min_lr, 1e-6);
    assert_eq!(cos.cooldown_epochs, 0);
    // timm v0.5.x (t_in_epochs=True): one LR per epoch.
    assert_eq!(cos.step_on, StepOn::Epoch);
    assert_eq!(r.batch.global_size, 2048);
    assert_eq!(r.batch.micro_size, 512);
    assert_eq!(r.eval.input_size, 224);
    assert_eq!(r.eval.crop_pct, 0.95);
    assert_eq!(r.eval.interpolation, Interpolation::Bicubic);
    assert_eq!(r.runtime.precision, rsb_recipes::Precision::Auto);
    assert!(r.runtime.channels_last);
    // Exact f32 gradient sums, as the paper's runs.
    assert_eq!(r.distributed.gradient_compression, rsb_recipes::GradientCompression::None);
}

#[test]
fn gradient_compression_is_off_unless_asked_for() {
    for path in all_recipes() {
        let r = load(&path, &[]).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(
            r.distributed.gradient_compression,
            rsb_recipes::GradientCompression::None,
            "{}",
            path.display()
        );
    }
    let on = load(
        &recipes_dir().join("resnet50_a2.yaml"),
        &["distributed.gradient_compression=bf16".to_string()],
    )
    .unwrap();
    assert_eq!(on.distributed.gradient_compression, rsb_recipes::GradientCompression::Bf16);
    let fp16 =
        load(&recipes_dir().join("resnet50_a2.yaml"), &["runtime.precision=fp16".to_string()])
            .unwrap();
    assert_eq!(fp16.runtime.precision, Precision::Fp16);
    assert!(load(
        &recipes_dir().join("resnet50_a2.yaml"),
        &["distributed.gradient_compression=fp8".to_string()]
    )
    .is_err());
}

/// The Table-1 rows that differ between A1, A2 and A3.
struct Table1 {
    epochs: u32,
    lr: f64,
    weight_decay: f64,
    mixup_alpha: f64,
    label_smoothing: f64,
    drop_path_rate: f64,
    repeated_augmentation: u32,
    rand_augment: &'static str,
    train_size: u32,
}

fn assert_table1(r: &Recipe, t: &Table1) {
    assert_common_rsb(r);
    let ScheduleSection::Cosine(cos) = &r.schedule;
    assert_eq!(cos.epochs, t.epochs, "epochs");
    let OptimizerSection::Lamb(lamb) = &r.optimizer;
    assert_eq!(lamb.lr, t.lr, "lr");
    assert_eq!(lamb.weight_decay, t.weight_decay, "weight decay");
    let mixup = r.mixup.as_ref().expect("mixup on");
    assert_eq!(mixup.mixup_alpha, t.mixup_alpha, "mixup alpha");
    assert_eq!(mixup.label_smoothing, t.label_smoothing, "label smoothing");
    let LossSection::Bce(bce) = &r.loss else { panic!("BCE loss expected") };
    assert_eq!(bce.smoothing, t.label_smoothing, "BCE smoothing mirrors --smoothing");
    assert_eq!(r.model.drop_path_rate, t.drop_path_rate, "drop path");
    assert_eq!(r.batch.repeated_augmentation, t.repeated_augmentation, "repeated aug");
    assert_eq!(r.augment.rand_augment.as_deref(), Some(t.rand_augment), "RandAugment");
    assert_eq!(r.augment.input_size, t.train_size, "train size");
}

#[test]
fn a1_matches_table_1() {
    let r = load_named("resnet50_a1.yaml");
    assert_eq!(r.name, "resnet50_a1");
    assert_table1(
        &r,
        &Table1 {
            epochs: 600,
            lr: 5e-3,
            weight_decay: 0.01,
            mixup_alpha: 0.2,
            label_smoothing: 0.1,
            drop_path_rate: 0.05,
            repeated_augmentation: 3,
            rand_augment: "rand-m7-mstd0.5-inc1",
            train_size: 224,
        },
    );
}

#[test]
fn a2_matches_table_1() {
    let r = load_named("resnet50_a2.yaml");
    assert_eq!(r.name, "resnet50_a2");
    assert_table1(
        &r,
        &Table1 {
            epochs: 300,
            lr: 5e-3,
            weight_decay: 0.02,
            mixup_alpha: 0.1,
            label_smoothing: 0.0,
            drop_path_rate: 0.05,
            repeated_augmentation: 3,
            rand_augment: "rand-m7-mstd0.5-inc1",
            train_size: 224,
        },
    );
}

#[test]
fn a3_matches_table_1() {
    let r = load_named("resnet50_a3.yaml");
    assert_eq!(r.name, "resnet50_a3");
    assert_table1(
        &r,
        &Table1 {
            epochs: 100,
            lr: 8e-3,
            weight_decay: 0.02,
            mixup_alpha: 0.1,
            label_smoothing: 0.0,
            drop_path_rate: 0.0,
            repeated_augmentation: 1,
            rand_augment: "rand-m6-mstd0.5-inc1",
            train_size: 160,
        },
    );
}

#[test]
fn fashion_mnist_default_keeps_every_ingredient() {
    // The values are tuning (see the recipe's comments); the ingredient list is not.
    let r = load_named("fashion_mnist_resnet18.yaml");
    assert_eq!((r.model.name.as_str(), r.model.num_classes), ("resnet18", 10));
    assert_eq!(r.data.root, "data/fashion-mnist");
    assert!(r.model.drop_path_rate > 0.0, "stochastic depth");
    assert!(r.augment.scale[0] < 1.0, "RandomResizedCrop");
    assert!(r.augment.hflip > 0.0, "flip");
    assert!(
        r.augment.rand_augment.as_deref().is_some_and(|s| s.starts_with("rand-")),
        "RandAugment"
    );
    let mixup = r.mixup.as_ref().expect("mixup on");
    assert!(
        mixup.mixup_alpha > 0.0 && mixup.cutmix_alpha > 0.0 && mixup.prob > 0.0,
        "Mixup and CutMix"
    );
    let LossSection::Bce(bce) = &r.loss else { panic!("BCE loss expected") };
    assert!(bce.target_threshold.is_some(), "BCE target threshold");
    let OptimizerSection::Lamb(lamb) = &r.optimizer;
    assert!(lamb.weight_decay > 0.0 && lamb.max_grad_norm == Some(1.0), "LAMB as timm's");
    let ScheduleSection::Cosine(cos) = &r.schedule;
    assert!(cos.warmup_epochs > 0.0, "cosine with warmup");
    let streams = r.batch.global_size / r.batch.micro_size;
    assert!(r.batch.repeated_augmentation >= 2, "repeated augmentation");
    assert!(
        streams >= r.batch.repeated_augmentation,
        "copies of an image must land in different micro-batches"
    );
    assert_eq!((r.eval.crop_pct, r.eval.interpolation), (0.95, Interpolation::Bicubic));
    // Fast on any x86-64 CPU: bf16 only where the CPU has it natively.
    assert_eq!(r.runtime.precision, Precision::Auto, "the main job must not force bf16");
}

#[test]
fn fashion_mnist_recipes_step_per_update() {
    // 8 epochs with a 1-epoch warmup: per-epoch stepping would hold the whole
    // first epoch at warmup_lr. The recipes say so in a comment.
    for name in ["fashion_mnist_resnet18.yaml", "fashion_mnist_a3_strict.yaml"] {
        let r = load_named(name);
        let ScheduleSection::Cosine(cos) = &r.schedule;
        assert_eq!(cos.step_on, StepOn::Update, "{name}");
        let text = std::fs::read_to_string(recipes_dir().join(name)).unwrap();
        assert!(text.contains("t_in_epochs=False"), "{name} must say why it steps per update");
    }
}

#[test]
fn tiny_debug_recipe_is_tiny_with_everything_on() {
    let r = load_named("debug/resnet18_tiny_cpu.yaml");
    assert_eq!(r.data.root, "data/tiny");
    assert_eq!((r.augment.input_size, r.eval.input_size), (32, 32));
    assert_eq!((r.batch.global_size, r.batch.micro_size), (16, 8));
    assert_eq!(r.batch.repeated_augmentation, 2);
    let ScheduleSection::Cosine(cos) = &r.schedule;
    assert_eq!(cos.epochs, 1);
    assert!(cos.warmup_epochs > 0.0);
    assert!(r.model.drop_path_rate > 0.0);
    assert!(r.augment.rand_augment.is_some());
    let mixup = r.mixup.as_ref().expect("mixup on");
    assert!(mixup.mixup_alpha > 0.0 && mixup.cutmix_alpha > 0.0);
    let LossSection::Bce(bce) = &r.loss else { panic!("BCE loss expected") };
    assert!(bce.target_threshold.is_some());
}
