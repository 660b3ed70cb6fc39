//! Builds every ResNet variant and checks its parameter count against timm's
//! published figures and its forward pass on a tiny input.

use rsb_vision::{ForwardMode, Model, ModelConfig};
use tch::{Device, Kind, Tensor};

/// `sum(p.numel() for p in timm.create_model(name).parameters())` with 1000 classes.
const TIMM_PARAMETER_COUNTS: &[(&str, i64)] = &[
    ("resnet18", 11_689_512),
    ("resnet34", 21_797_672),
    ("resnet50", 25_557_032),
    ("resnet101", 44_549_160),
    ("resnet152", 60_192_808),
];

#[test]
fn parameter_counts_equal_timm() {
    for (name, expected) in TIMM_PARAMETER_COUNTS {
        let model = Model::new(name, ModelConfig::default(), Device::Cpu).unwrap();
        assert_eq!(model.parameter_count(), *expected, "{name}");
    }
}

#[test]
fn forward_gives_finite_logits_of_the_right_shape() {
    tch::manual_seed(0);
    let config = ModelConfig { num_classes: 7, drop_path_rate: 0.1, ..Default::default() };
    let mut model = Model::new("resnet18", config, Device::Cpu).unwrap();
    let xs = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
    for mode in [ForwardMode::Train, ForwardMode::Eval] {
        let logits = model.forward(&xs, mode).unwrap();
        assert_eq!(logits.size(), vec![2, 7]);
        assert!(bool::try_from(logits.isfinite().all()).unwrap());
    }
    assert_eq!(model.num_batches_tracked(), 1);
}

#[test]
fn zero_init_last_zeroes_the_last_bn_of_each_branch_only() {
    let model = Model::new("resnet50", ModelConfig::default(), Device::Cpu).unwrap();
    for (name, t) in model.named_parameters() {
        let is_zero = t.abs().sum(Kind::Float).double_value(&[]) == 0.0;
        let last_bn = name.ends_with(".bn3.weight");
        let bias = name.ends_with(".bias") && !name.starts_with("fc");
        assert_eq!(is_zero, last_bn || bias, "{name}");
    }
}

#[test]
fn weight_decay_groups_follow_timm() {
    let model = Model::new("resnet18", ModelConfig::default(), Device::Cpu).unwrap();
    let excluded: Vec<&str> = model
        .named_parameters()
        .iter()
        .filter(|(n, t)| model.excluded_from_weight_decay(n, t))
        .map(|(n, _)| n.as_str())
        .collect();
    assert!(excluded.contains(&"fc.bias") && excluded.contains(&"bn1.weight"));
    assert!(!excluded.contains(&"fc.weight") && !excluded.contains(&"conv1.weight"));
    assert!(excluded
        .iter()
        .all(|n| n.contains("bn") || n.contains("downsample.1") || *n == "fc.bias"));
}

#[test]
fn state_dict_round_trips_through_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    let mut a =
        Model::new("resnet18", ModelConfig { num_classes: 5, ..Default::default() }, Device::Cpu)
            .unwrap();
    let xs = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
    let _ = a.forward(&xs, ForwardMode::Train).unwrap();
    a.save_safetensors(&path).unwrap();
    let mut b =
        Model::new("resnet18", ModelConfig { num_classes: 5, ..Default::default() }, Device::Cpu)
            .unwrap();
    b.load_safetensors(&path).unwrap();
    assert_eq!(b.num_batches_tracked(), 1);
    let ya = a.forward(&xs, ForwardMode::Eval).unwrap();
    let yb = b.forward(&xs, ForwardMode::Eval).unwrap();
    assert!(ya.equal(&yb));
    let keys: Vec<String> = a.state_dict().unwrap().into_iter().map(|(k, _)| k).collect();
    assert!(keys.contains(&"layer1.0.bn1.num_batches_tracked".to_string()));
    // A model with another head does not accept these weights, and says why.
    let mut c =
        Model::new("resnet18", ModelConfig { num_classes: 6, ..Default::default() }, Device::Cpu)
            .unwrap();
    let err = c.load_safetensors(&path).unwrap_err().to_string();
    assert!(err.contains("fc.weight") && err.contains("shape mismatch"), "{err}");
}
