//! Our ResNets against timm 1.0.31 on timm-saved weights: identical state-dict
//! keys and parameter counts, and eval-mode logits within a relative error of
//! 1e-4 (max |ours - timm| over max |timm|, float32 on CPU). Then the other
//! direction: weights saved by us load into timm with
//! `pretrained_cfg_overlay=dict(file=...)` and give our logits.

use rsb_integration_tests::{fixtures, python, read_json, read_npy, workspace_root};
use rsb_vision::{ForwardMode, Model, ModelConfig};
use tch::{Device, Kind, Tensor};

/// Tolerance on max |ours - timm| / max |timm| of the logits.
const LOGITS_TOLERANCE: f64 = 1e-4;

fn norm_relative_error(ours: &Tensor, reference: &Tensor) -> f64 {
    let diff = (ours - reference).abs().max().double_value(&[]);
    diff / reference.abs().max().double_value(&[])
}

#[test]
fn timm_weights_give_timm_logits() {
    let dir = fixtures("models");
    let index = read_json(&dir.join("index.json"));
    let names = index.as_array().expect("index is a list");
    assert!(!names.is_empty());
    for name in names {
        let name = name.as_str().unwrap();
        let folder = dir.join(name);
        let meta = read_json(&folder.join("meta.json"));
        let num_classes = meta["num_classes"].as_i64().unwrap();
        let mut model =
            Model::new(name, ModelConfig { num_classes, ..Default::default() }, Device::Cpu)
                .unwrap();
        assert_eq!(
            model.parameter_count(),
            meta["parameter_count"].as_i64().unwrap(),
            "{name}: parameter count"
        );
        let mut ours: Vec<String> =
            model.state_dict().unwrap().into_iter().map(|(k, _)| k).collect();
        let mut theirs: Vec<String> = meta["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap().to_string())
            .collect();
        ours.sort();
        theirs.sort();
        assert_eq!(ours, theirs, "{name}: state-dict keys differ from timm's");
        model.load_safetensors(&folder.join("weights.safetensors")).unwrap();
        assert_eq!(model.num_batches_tracked(), 17, "{name}: num_batches_tracked not loaded");
        let input = read_npy(&folder.join("input.npy"));
        let expected = read_npy(&folder.join("logits.npy"));
        let logits = tch::no_grad(|| model.forward(&input, ForwardMode::Eval)).unwrap();
        let err = norm_relative_error(&logits, &expected);
        println!("{name}: relative logit error {err:.2e}");
        assert!(
            err <= LOGITS_TOLERANCE,
            "{name}: relative logit error {err:.3e} > {LOGITS_TOLERANCE:e}"
        );
    }
}

#[test]
fn our_weights_load_into_timm_and_give_our_logits() {
    let dir = tempfile::tempdir().unwrap();
    tch::manual_seed(3);
    let mut model =
        Model::new("resnet18", ModelConfig { num_classes: 7, ..Default::default() }, Device::Cpu)
            .unwrap();
    // Train-mode passes move the BN statistics and the counter away from their initial values.
    for _ in 0..3 {
        let xs = Tensor::randn([4, 3, 48, 48], (Kind::Float, Device::Cpu));
        let _ = model.forward(&xs, ForwardMode::Train).unwrap();
    }
    // Perturb the zero-initialised last-BN gammas so every branch matters.
    tch::no_grad(|| {
        for (name, p) in model.named_parameters() {
            if name.ends_with("bn2.weight") {
                let _ = p.shallow_clone().uniform_(0.5, 1.5);
            }
        }
    });
    let weights = dir.path().join("ours.safetensors");
    model.save_safetensors(&weights).unwrap();
    let input = Tensor::randn([2, 3, 48, 48], (Kind::Float, Device::Cpu));
    let input_path = dir.path().join("input.npy");
    input.write_npy(&input_path).unwrap();
    let output_path = dir.path().join("timm_logits.npy");
    let status = std::process::Command::new(python())
        .arg(workspace_root().join("tests/oracle/load_into_timm.py"))
        .args(["--model", "resnet18", "--num-classes", "7"])
        .arg("--weights")
        .arg(&weights)
        .arg("--input")
        .arg(&input_path)
        .arg("--output")
        .arg(&output_path)
        .status()
        .expect("running the timm loader");
    assert!(status.success(), "timm could not load our weights");
    let ours = tch::no_grad(|| model.forward(&input, ForwardMode::Eval)).unwrap();
    let theirs = read_npy(&output_path);
    let err = norm_relative_error(&ours, &theirs);
    assert!(err <= LOGITS_TOLERANCE, "timm on our weights: relative logit error {err:.3e}");
}
