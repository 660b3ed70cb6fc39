//! Every registered model against timm 1.0.31 on timm-saved weights
//! (`tests/oracle/models.py`, float16 values saved as float16: the loader
//! widens them to the model's float32): identical state-dict keys and parameter counts,
//! and eval-mode logits within a relative error of 1e-4 (max |ours - timm|
//! over max |timm|, float32 on CPU), and the per-block stochastic-depth
//! rates timm builds for `drop_path_rate=0.1`, and the parameters left
//! without weight decay (timm's `param_groups_weight_decay`). Then the other direction, for one model
//! of each family: weights saved by us load into timm with
//! `pretrained_cfg_overlay=dict(file=...)` and give our logits. Last, the
//! worker: `worker models` lists the zoo, `worker infer` runs a zoo model on
//! timm's weights, and an unknown name is refused with the closest ones.

use rsb_integration_tests::{binary, fixtures, python, read_json, read_npy, workspace_root};
use rsb_vision::{registered_models, ForwardMode, Model, ModelConfig};
use std::time::Instant;
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
    let names: Vec<&str> =
        index.as_array().expect("index is a list").iter().map(|n| n.as_str().unwrap()).collect();
    // Every registered model has a fixture: the zoo is covered end to end.
    for spec in registered_models() {
        assert!(names.contains(&spec.name), "{}: no timm fixture in {}", spec.name, dir.display());
    }
    let mut failures = Vec::new();
    for name in names {
        let start = Instant::now();
        let folder = dir.join(name);
        let meta = read_json(&folder.join("meta.json"));
        let num_classes = meta["num_classes"].as_i64().unwrap();
        let drop_path_rate = meta["drop_path_rate"].as_f64().unwrap();
        let config = ModelConfig { num_classes, drop_path_rate, ..Default::default() };
        let mut model = Model::new(name, config, Device::Cpu).unwrap();
        let timm_rates: Vec<f64> = meta["drop_path_rates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_f64().unwrap())
            .collect();
        let rates = model.drop_path_rates();
        assert_eq!(rates.len(), timm_rates.len(), "{name}: number of residual blocks");
        for (i, (ours, theirs)) in rates.iter().zip(&timm_rates).enumerate() {
            assert!(
                (ours - theirs).abs() <= 1e-7,
                "{name}: block {i} drop path {ours} vs timm {theirs}"
            );
        }
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
        // The weight-decay groups come from the model, as timm's
        // `param_groups_weight_decay(model, wd, model.no_weight_decay())`.
        let mut no_decay: Vec<String> = model
            .named_parameters()
            .iter()
            .filter(|(n, t)| model.excluded_from_weight_decay(n, t))
            .map(|(n, _)| n.clone())
            .collect();
        no_decay.sort();
        let timm_no_decay: Vec<String> = meta["no_weight_decay"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap().to_string())
            .collect();
        assert_eq!(no_decay, timm_no_decay, "{name}: parameters without weight decay differ");
        model.load_safetensors(&folder.join("weights.safetensors")).unwrap();
        if theirs.iter().any(|k| k.ends_with(".num_batches_tracked")) {
            assert_eq!(model.num_batches_tracked(), 17, "{name}: num_batches_tracked not loaded");
        }
        let input = read_npy(&folder.join("input.npy"));
        let expected = read_npy(&folder.join("logits.npy"));
        let logits = tch::no_grad(|| model.forward(&input, ForwardMode::Eval)).unwrap();
        assert_eq!(logits.size(), expected.size(), "{name}: logits shape");
        let err = norm_relative_error(&logits, &expected);
        println!(
            "{name}: relative logit error {err:.2e} ({} px, {:.1} s)",
            meta["size"],
            start.elapsed().as_secs_f64()
        );
        if err.is_nan() || err > LOGITS_TOLERANCE {
            failures.push(format!("{name}: relative logit error {err:.3e} > {LOGITS_TOLERANCE:e}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Saves a model with moved BN statistics and no all-zero parameter, loads the
/// file into timm and compares timm's logits with ours.
fn our_weights_load_into_timm(name: &str, size: i64) {
    let dir = tempfile::tempdir().unwrap();
    tch::manual_seed(3);
    let mut model =
        Model::new(name, ModelConfig { num_classes: 7, ..Default::default() }, Device::Cpu)
            .unwrap();
    // Train-mode passes move the BN statistics and the counter away from their initial values.
    for _ in 0..2 {
        let xs = Tensor::randn([4, 3, size, size], (Kind::Float, Device::Cpu));
        let _ = model.forward(&xs, ForwardMode::Train).unwrap();
    }
    // Perturb the zero-initialised parameters (last-BN gammas, biases) so every branch matters.
    tch::no_grad(|| {
        for (_, p) in model.named_parameters() {
            if p.abs().max().double_value(&[]) == 0.0 {
                let _ = p.shallow_clone().uniform_(0.5, 1.5);
            }
        }
    });
    let weights = dir.path().join("ours.safetensors");
    model.save_safetensors(&weights).unwrap();
    let input = Tensor::randn([2, 3, size, size], (Kind::Float, Device::Cpu));
    let input_path = dir.path().join("input.npy");
    input.write_npy(&input_path).unwrap();
    let output_path = dir.path().join("timm_logits.npy");
    let status = std::process::Command::new(python())
        .arg(workspace_root().join("tests/oracle/load_into_timm.py"))
        .args(["--model", name, "--num-classes", "7"])
        .arg("--weights")
        .arg(&weights)
        .arg("--input")
        .arg(&input_path)
        .arg("--output")
        .arg(&output_path)
        .status()
        .expect("running the timm loader");
    assert!(status.success(), "{name}: timm could not load our weights");
    let ours = tch::no_grad(|| model.forward(&input, ForwardMode::Eval)).unwrap();
    let theirs = read_npy(&output_path);
    let err = norm_relative_error(&ours, &theirs);
    assert!(err <= LOGITS_TOLERANCE, "{name}: timm on our weights: relative logit error {err:.3e}");
}

#[test]
fn our_resnet_weights_load_into_timm() {
    our_weights_load_into_timm("resnet18", 48);
    our_weights_load_into_timm("ecaresnet50t", 48);
}

#[test]
fn our_regnet_weights_load_into_timm() {
    our_weights_load_into_timm("regnety_040", 48);
}

#[test]
fn our_efficientnet_weights_load_into_timm() {
    our_weights_load_into_timm("efficientnet_b0", 48);
}

#[test]
fn our_vit_weights_load_into_timm() {
    // timm's default ViT (no dynamic_img_size) takes only its 224 px input.
    our_weights_load_into_timm("vit_tiny_patch16_224", 224);
}

#[test]
fn worker_lists_runs_and_refuses_models_by_timm_name() {
    let worker = binary("worker");
    let listed = std::process::Command::new(&worker).arg("models").output().unwrap();
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    let table = String::from_utf8_lossy(&listed.stdout);
    for spec in registered_models() {
        let row = table
            .lines()
            .find(|l| l.split_whitespace().next() == Some(spec.name))
            .unwrap_or_else(|| panic!("{} missing from `worker models`:\n{table}", spec.name));
        let meta = read_json(&fixtures("models").join(spec.name).join("meta.json"));
        let count = meta["parameter_count_1000"].as_i64().unwrap().to_string();
        assert!(row.split_whitespace().any(|w| w == count), "{}: {row}", spec.name);
    }

    // `worker infer` on timm's efficientnet_b0 weights gives timm's logits.
    let folder = fixtures("models").join("efficientnet_b0");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("logits.npy");
    let infer = |model: &str| {
        std::process::Command::new(&worker)
            .args(["infer", "--model", model, "--num-classes", "10", "--weights"])
            .arg(folder.join("weights.safetensors"))
            .arg("--input")
            .arg(folder.join("input.npy"))
            .arg("--output")
            .arg(&out)
            .output()
            .unwrap()
    };
    let run = infer("efficientnet_b0");
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let err = norm_relative_error(&read_npy(&out), &read_npy(&folder.join("logits.npy")));
    assert!(err <= LOGITS_TOLERANCE, "worker infer: relative logit error {err:.3e}");

    let refused = infer("efficientnet_b9");
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        message.contains("unknown model `efficientnet_b9`") && message.contains("efficientnet_b0"),
        "{message}"
    );
}
