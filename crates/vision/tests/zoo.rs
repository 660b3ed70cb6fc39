//! Walks the registry: every model builds with 1000 classes and timm's
//! parameter count (read from the timm fixture's `meta.json`, written by
//! `tests/oracle/models.py`), runs a train-mode forward and backward pass with
//! stochastic depth on and an eval-mode forward pass on a tiny input, and
//! gives finite logits of the right shape and finite gradients.

use rsb_vision::{registered_models, ForwardMode, Model, ModelConfig};
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

/// `$RSB_FIXTURES/models`, or `target/fixtures/models` of the workspace
/// (stamp checked).
fn fixture_dir() -> PathBuf {
    rsb_test_support::fixtures("models")
}

/// timm's `sum(p.numel() for p in model.parameters())` with 1000 classes.
fn timm_parameter_count(name: &str) -> i64 {
    let path = fixture_dir().join(name).join("meta.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let meta: serde_json::Value = serde_json::from_str(&text).unwrap();
    meta["parameter_count_1000"].as_i64().unwrap_or_else(|| panic!("{}: no count", path.display()))
}

/// The smallest input each family handles: 32 px (a 1x1 map after stride 32,
/// a 2x2 patch grid for the ViTs).
const TINY: i64 = 32;

#[test]
fn every_registered_model_builds_runs_and_matches_timm_counts() {
    tch::manual_seed(0);
    let xs = Tensor::randn([2, 3, TINY, TINY], (Kind::Float, Device::Cpu));
    for spec in registered_models() {
        let config = ModelConfig { drop_path_rate: 0.1, ..Default::default() };
        let mut model = Model::new(spec.name, config, Device::Cpu).unwrap();
        assert_eq!(model.parameter_count(), timm_parameter_count(spec.name), "{}", spec.name);
        let logits = model.forward(&xs, ForwardMode::Train).unwrap();
        assert_eq!(logits.size(), vec![2, 1000], "{}", spec.name);
        assert!(bool::try_from(logits.isfinite().all()).unwrap(), "{}: train logits", spec.name);
        logits.sum(Kind::Float).backward();
        for (name, p) in model.named_parameters() {
            let grad = p.grad();
            assert!(grad.defined(), "{}: {name} has no gradient", spec.name);
            assert!(bool::try_from(grad.isfinite().all()).unwrap(), "{}: {name} grad", spec.name);
        }
        let logits = tch::no_grad(|| model.forward(&xs, ForwardMode::Eval)).unwrap();
        assert_eq!(logits.size(), vec![2, 1000], "{}", spec.name);
        assert!(bool::try_from(logits.isfinite().all()).unwrap(), "{}: eval logits", spec.name);
        let rates = model.drop_path_rates();
        assert!(!rates.is_empty() && rates[0] == 0.0, "{}: {rates:?}", spec.name);
        assert!((rates.iter().cloned().fold(0.0, f64::max) - 0.1).abs() < 0.02, "{}", spec.name);
    }
}

#[test]
fn vit_excludes_pos_embed_and_cls_token_from_weight_decay() {
    let model = Model::new("vit_tiny_patch16_224", ModelConfig::default(), Device::Cpu).unwrap();
    let excluded: Vec<&str> = model
        .named_parameters()
        .iter()
        .filter(|(n, t)| model.excluded_from_weight_decay(n, t))
        .map(|(n, _)| n.as_str())
        .collect();
    for name in ["pos_embed", "cls_token", "blocks.0.norm1.weight", "head.bias"] {
        assert!(excluded.contains(&name), "{name} should be excluded: {excluded:?}");
    }
    for (name, t) in model.named_parameters() {
        if name.ends_with(".weight") && t.dim() >= 2 {
            assert!(!excluded.contains(&name.as_str()), "{name} should be decayed");
        }
    }
}

#[test]
fn vit_resamples_position_embeddings_for_other_sizes() {
    tch::manual_seed(1);
    let config = ModelConfig { num_classes: 5, ..Default::default() };
    let mut model = Model::new("vit_tiny_patch16_224", config, Device::Cpu).unwrap();
    for side in [224, 160, 48] {
        let xs = Tensor::randn([1, 3, side, side], (Kind::Float, Device::Cpu));
        let logits = tch::no_grad(|| model.forward(&xs, ForwardMode::Eval)).unwrap();
        assert_eq!(logits.size(), vec![1, 5], "{side} px");
    }
}

#[test]
fn bf16_compute_runs_every_family() {
    // The GPU mixed-precision path (bf16 activations, f32 variables), on the CPU.
    tch::manual_seed(2);
    let xs = Tensor::randn([2, 3, TINY, TINY], (Kind::Float, Device::Cpu));
    for name in ["ecaresnet50t", "regnety_040", "efficientnet_b0", "vit_tiny_patch16_224"] {
        let config = ModelConfig { num_classes: 3, drop_path_rate: 0.1, ..Default::default() };
        let mut model = Model::new(name, config, Device::Cpu).unwrap();
        model.set_compute_kind(Kind::BFloat16);
        model.to_channels_last().unwrap();
        let logits = model.forward(&xs, ForwardMode::Train).unwrap();
        assert_eq!(logits.kind(), Kind::Float, "{name}");
        assert!(bool::try_from(logits.isfinite().all()).unwrap(), "{name}");
        logits.sum(Kind::Float).backward();
        for (p, t) in model.named_parameters() {
            assert_eq!(t.kind(), Kind::Float, "{name}: {p}");
            assert!(t.grad().defined(), "{name}: {p} has no gradient");
        }
    }
}

#[test]
fn a_head_past_a_recipes_most_classes_is_refused_before_it_is_allocated() {
    assert_eq!(rsb_vision::MAX_NUM_CLASSES, i64::from(rsb_recipes::MAX_CLASSES));
    for num_classes in [0, rsb_vision::MAX_NUM_CLASSES + 1, 100_000_000_000] {
        let config = ModelConfig { num_classes, ..Default::default() };
        let e = match Model::new("resnet18", config, Device::Cpu) {
            Ok(_) => panic!("{num_classes} classes were accepted"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(&format!("num_classes ({num_classes})")), "{e}");
    }
}
