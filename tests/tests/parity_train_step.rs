//! Train-mode parity with timm 1.0.31 (`tests/oracle/train_step.py`).
//!
//! Whole updates: resnet50, seresnet50, efficientnet_b0, regnety_040 and
//! vit_small_patch16_224 (10 classes, 64 px, batch 4, drop path off) start
//! from the same seeded state (the oracle's `torch.randn` draws replayed with
//! `tch::manual_seed`, checked against the squared norm of every entry), then
//! run three updates, each a train-mode forward (BN batch statistics), the RSB
//! BCE (`target_threshold` 0.2) on Mixup-style soft targets, backward and our
//! LAMB (lr 5e-3, weight decay 0.02, clipping at a global norm of 1), on the
//! batches timm used. After every update we compare with timm: the loss, the
//! logits, the global gradient norm, every BN running statistic, every
//! parameter of at most 4096 elements in full, and for larger parameters 256
//! evenly spaced elements plus the float64 norm of the parameter and of its
//! change since the start (which every element enters).
//!
//! Tolerances (float32 on CPU; relative errors `|ours - timm| / max(|timm|,
//! floor)`, elementwise):
//! * after the first update: loss, gradient norm, parameter and change norms
//!   1e-4; logits 1e-4 of the largest |logit|; parameters and running
//!   statistics 1e-4 with a floor of 1e-2 (the scale of the smallest weights
//!   and of one update, lr 5e-3). Measured: loss, logits, gradient norm and
//!   running statistics are bit-identical, parameters within 2e-7;
//! * after updates 2 and 3: the same, or 5 times timm's own `envelope`,
//!   whichever is larger. The envelope is how far timm itself moves, in each
//!   of these measures (parameter norms and change norms apart), when its
//!   parameters get a relative 1e-7 Gaussian perturbation (one float32
//!   rounding) after the first update: the largest move over 3 draws, as
//!   one draw's varies by an order of magnitude (and with the CPU's
//!   kernels). Measured on an AMD EPYC, with libtorch's AVX512 kernels and
//!   with AVX2 ones (`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`, the
//!   fixtures made under each): our largest error is 1.23 and 1.19 times
//!   the envelope. (With one draw, a 10x bound and the change norms held to
//!   the parameter norms' envelope, the AVX2 run reached 8.65 times it.) Our layers are written independently of
//!   timm's, so sums round in another order, and deep BN networks at batch 4
//!   amplify one rounding enormously: LAMB's no-decay group steps by about
//!   `lr * sign(grad)`, so a near-zero gradient whose sign flips moves a BN
//!   parameter by 2 lr, and train-mode BN divides by the variance of 16 values
//!   in the last stage. In timm itself, one rounding after update 1 becomes a
//!   5e-3 (resnet50) to 7e-3 (regnety_040) loss difference and 0.7 relative
//!   parameter differences after update 3; efficientnet_b0 and the ViT stay
//!   within 1e-5 and 2e-4, so they check updates 2 and 3 tightly (moment
//!   accumulation, bias corrections, BN momentum over several steps).
//!
//! A real mistake (a wrong BN momentum or variance correction, a missing
//! weight-decay group, a wrong clip or loss threshold) moves the first update
//! by 1e-3 or more and fails its bound.
//!
//! Drop path: resnet50 with `drop_path_rate` 0.1 in train mode after
//! `tch::manual_seed(S)` must give timm's logits after `torch.manual_seed(S)`
//! (1e-4 relative to the largest |logit|): our `DropPath` draws the same
//! Bernoulli masks from libtorch's generator, block by block in the same
//! order. The fixture also holds the logits without drop path, which must
//! differ from them by far more, so the masks are known to matter.

use rsb_integration_tests::{fixtures, max_relative_error, read_json};
use rsb_recipes::schema::{BceLoss, LambOptimizer, LossSection};
use rsb_train::lamb::Lamb;
use rsb_train::loss::Loss;
use rsb_vision::{ForwardMode, Model, ModelConfig};
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// libtorch's generator is global to the process: the tests that seed and
/// replay it take this lock so that they do not draw from each other's stream.
static GENERATOR: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Loss, gradient norm, parameter norms.
const SCALAR_TOLERANCE: f64 = 1e-4;
/// Logits, relative to the largest |logit|.
const LOGITS_TOLERANCE: f64 = 1e-4;
/// Parameters, elementwise with [`PARAMETER_FLOOR`].
const PARAMETER_TOLERANCE: f64 = 1e-4;
const PARAMETER_FLOOR: f64 = 1e-2;
/// BN running statistics, elementwise with [`BUFFER_FLOOR`].
const BUFFER_TOLERANCE: f64 = 1e-4;
const BUFFER_FLOOR: f64 = 1e-2;
/// After the first update: multiple of timm's own spread (its `envelope`).
const ENVELOPE_FACTOR: f64 = 5.0;

fn relative(ours: f64, timm: f64) -> f64 {
    (ours - timm).abs() / timm.abs().max(1e-12)
}

fn logits_error(ours: &Tensor, timm: &Tensor) -> f64 {
    let diff = (ours.to_kind(Kind::Double) - timm.to_kind(Kind::Double)).abs().max();
    diff.double_value(&[]) / timm.abs().max().double_value(&[])
}

fn load_tensors(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn tensor<'a>(tensors: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
    tensors.get(key).unwrap_or_else(|| panic!("fixture has no tensor `{key}`"))
}

/// Builds `name` and replays the oracle's seeded re-initialisation: after
/// `manual_seed(init_seed)`, each entry of `meta["init"]` in order becomes
/// `offset + scale * randn(shape)`.
fn seeded_model(name: &str, meta: &Value, drop_path_rate: f64) -> Model {
    let config = ModelConfig {
        num_classes: meta["num_classes"].as_i64().unwrap(),
        in_chans: 3,
        drop_path_rate,
        zero_init_last: true,
    };
    let mut model = Model::new(name, config, Device::Cpu).unwrap();
    let shapes: HashMap<String, Vec<i64>> =
        model.state_dict().unwrap().into_iter().map(|(n, t)| (n, t.size())).collect();
    tch::manual_seed(meta["init_seed"].as_i64().unwrap());
    let mut entries = Vec::new();
    for entry in meta["init"].as_array().unwrap() {
        let key = entry["name"].as_str().unwrap();
        let shape = shapes.get(key).unwrap_or_else(|| panic!("{name}: timm's `{key}` is not ours"));
        let drawn = Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu))
            * entry["scale"].as_f64().unwrap()
            + entry["offset"].as_f64().unwrap();
        let sum_sq = drawn.to_kind(Kind::Double).square().sum(Kind::Double).double_value(&[]);
        let want = entry["sum_sq"].as_f64().unwrap();
        assert!(
            relative(sum_sq, want) < 1e-9,
            "{name}: the replayed initial `{key}` differs from timm's (squared norm {sum_sq} vs {want})"
        );
        entries.push((key.to_string(), drawn));
    }
    model.load_state_dict(entries, Path::new("seeded initial state")).unwrap();
    model
}

fn lamb_config(meta: &Value) -> LambOptimizer {
    let betas = meta["betas"].as_array().unwrap();
    LambOptimizer {
        lr: meta["lr"].as_f64().unwrap(),
        weight_decay: meta["weight_decay"].as_f64().unwrap(),
        betas: [betas[0].as_f64().unwrap(), betas[1].as_f64().unwrap()],
        eps: meta["eps"].as_f64().unwrap(),
        max_grad_norm: meta["max_grad_norm"].as_f64(),
        trust_clip: false,
        always_adapt: false,
    }
}

/// Worst error of one kind of quantity over a model's updates, with where it was.
#[derive(Default)]
struct Worst {
    error: f64,
    at: String,
}

impl Worst {
    fn record(&mut self, error: f64, at: impl FnOnce() -> String) {
        if error > self.error || error.is_nan() {
            self.error = if error.is_nan() { f64::INFINITY } else { error };
            self.at = at();
        }
    }

    fn check(&self, what: &str, tolerance: f64, model: &str, failures: &mut Vec<String>) {
        eprintln!("  {model}: {what} {:.2e} <= {tolerance:.1e}? (at {})", self.error, self.at);
        if self.error > tolerance {
            failures.push(format!(
                "{model}: {what} relative error {:.2e} > {tolerance:.0e} at {}",
                self.error, self.at
            ));
        }
    }
}

fn sample_indices(numel: i64, samples: i64) -> Tensor {
    let idx: Vec<i64> = (0..samples).map(|i| i * (numel - 1) / (samples - 1)).collect();
    Tensor::from_slice(&idx)
}

fn run_updates(name: &str, dir: &Path, failures: &mut Vec<String>) {
    let start = Instant::now();
    let meta = read_json(&dir.join("meta.json"));
    let tensors = load_tensors(&dir.join("updates.safetensors"));
    let mut model = seeded_model(name, &meta, 0.0);
    let config = lamb_config(&meta);
    let mut lamb = Lamb::new(&model, &config).unwrap();
    let initial: HashMap<String, Tensor> =
        model.named_parameters().iter().map(|(n, p)| (n.clone(), p.detach().copy())).collect();
    // The same parameters in each group. The order within a group may differ
    // (our ResNet creates `downsample` before `conv1`, timm registers it after
    // `bn3`); it only changes the summation order of the global gradient norm.
    let sorted = |groups: Vec<Vec<String>>| -> Vec<Vec<String>> {
        groups
            .into_iter()
            .map(|mut g| {
                g.sort();
                g
            })
            .collect()
    };
    let timm_groups: Vec<Vec<String>> = serde_json::from_value(meta["groups"].clone()).unwrap();
    assert_eq!(
        sorted(lamb.group_names()),
        sorted(timm_groups),
        "{name}: LAMB parameter groups differ from timm's"
    );
    let loss = Loss::from_recipe(&LossSection::Bce(BceLoss {
        target_threshold: meta["target_threshold"].as_f64(),
        smoothing: 0.0,
    }));
    let full_numel = meta["full_numel"].as_i64().unwrap();
    let samples = meta["samples"].as_i64().unwrap();
    let mut compared_parameters = 0;
    for (step, update) in meta["updates"].as_array().unwrap().iter().enumerate() {
        let [mut w_loss, mut w_grad, mut w_logits, mut w_param, mut w_norm, mut w_change, mut w_buffer] =
            std::array::from_fn(|_| Worst::default());
        let x = tensor(&tensors, &format!("step{step}.input"));
        let targets = tensor(&tensors, &format!("step{step}.targets"));
        lamb.zero_grad().unwrap();
        let logits = model.forward(x, ForwardMode::Train).unwrap();
        let value = loss.compute(&logits, targets).unwrap();
        value.backward();
        let grad_norm = lamb.step(config.lr).unwrap().expect("gradients exist");
        let at = |what: &str| format!("update {step} {what}");
        w_loss.record(relative(value.double_value(&[]), update["loss"].as_f64().unwrap()), || {
            at("loss")
        });
        w_grad.record(
            relative(grad_norm.double_value(&[]), update["grad_norm"].as_f64().unwrap()),
            || at("gradient norm"),
        );
        w_logits.record(
            logits_error(&logits.detach(), tensor(&tensors, &format!("step{step}.logits"))),
            || at("logits"),
        );
        let norms = &update["norms"];
        for (pname, p) in model.named_parameters() {
            let p = p.detach();
            if p.numel() as i64 <= full_numel {
                let want = tensor(&tensors, &format!("step{step}.param.{pname}"));
                w_param.record(max_relative_error(&p, want, PARAMETER_FLOOR), || at(pname));
            } else {
                let want = tensor(&tensors, &format!("step{step}.sample.{pname}"));
                let ours =
                    p.flatten(0, -1).index_select(0, &sample_indices(p.numel() as i64, samples));
                w_param.record(max_relative_error(&ours, want, PARAMETER_FLOOR), || at(pname));
                let p64 = p.to_kind(Kind::Double);
                let norm = p64.norm().double_value(&[]);
                w_norm.record(relative(norm, norms[pname]["norm"].as_f64().unwrap()), || {
                    at(&format!("{pname} norm"))
                });
                let delta = (&p64 - initial[pname].to_kind(Kind::Double)).norm().double_value(&[]);
                w_change
                    .record(relative(delta, norms[pname]["delta_norm"].as_f64().unwrap()), || {
                        at(&format!("{pname} change norm"))
                    });
            }
            compared_parameters += 1;
        }
        for (bname, b) in model.named_buffers() {
            let want = tensor(&tensors, &format!("step{step}.buffer.{bname}"));
            w_buffer.record(max_relative_error(b, want, BUFFER_FLOOR), || at(bname));
        }
        // The first update must match to rounding; later ones within
        // ENVELOPE_FACTOR times timm's own move under a one-rounding perturbation.
        let envelope = &update["envelope"];
        let bound = |tolerance: f64, key: &str| {
            let timm_spread =
                envelope[key].as_f64().unwrap_or_else(|| panic!("no envelope `{key}`"));
            if step == 0 {
                tolerance
            } else {
                tolerance.max(ENVELOPE_FACTOR * timm_spread)
            }
        };
        let model_step = format!("{name} update {step}");
        w_loss.check("loss", bound(SCALAR_TOLERANCE, "loss"), &model_step, failures);
        w_grad.check("gradient norm", bound(SCALAR_TOLERANCE, "grad_norm"), &model_step, failures);
        w_logits.check("logits", bound(LOGITS_TOLERANCE, "logits"), &model_step, failures);
        w_param.check(
            "parameters",
            bound(PARAMETER_TOLERANCE, "parameters"),
            &model_step,
            failures,
        );
        w_norm.check("parameter norms", bound(SCALAR_TOLERANCE, "norms"), &model_step, failures);
        w_change.check(
            "change norms",
            bound(SCALAR_TOLERANCE, "change_norms"),
            &model_step,
            failures,
        );
        w_buffer.check(
            "running statistics",
            bound(BUFFER_TOLERANCE, "running_stats"),
            &model_step,
            failures,
        );
    }
    assert!(compared_parameters > 0, "{name}: no parameter compared");
    eprintln!("  {name}: {:.1} s", start.elapsed().as_secs_f64());
}

#[test]
fn three_updates_match_timm() {
    let _generator = GENERATOR.lock().unwrap_or_else(|p| p.into_inner());
    let dir = fixtures("train_step/updates");
    let index = read_json(&dir.join("index.json"));
    let names: Vec<&str> = index.as_array().unwrap().iter().map(|n| n.as_str().unwrap()).collect();
    for required in
        ["resnet50", "seresnet50", "efficientnet_b0", "regnety_040", "vit_small_patch16_224"]
    {
        assert!(names.contains(&required), "no train-step fixture for {required}");
    }
    let mut failures = Vec::new();
    for name in names {
        run_updates(name, &dir.join(name), &mut failures);
    }
    assert!(failures.is_empty(), "train-mode parity failures:\n{}", failures.join("\n"));
}

#[test]
fn drop_path_masks_replay_from_the_seed() {
    let _generator = GENERATOR.lock().unwrap_or_else(|p| p.into_inner());
    let dir = fixtures("train_step/drop_path");
    let meta = read_json(&dir.join("meta.json"));
    let tensors = load_tensors(&dir.join("drop_path.safetensors"));
    let name = meta["name"].as_str().unwrap();
    let mut model = seeded_model(name, &meta, meta["drop_path_rate"].as_f64().unwrap());
    tch::manual_seed(meta["seed"].as_i64().unwrap());
    let logits =
        tch::no_grad(|| model.forward(tensor(&tensors, "input"), ForwardMode::Train).unwrap());
    let want = tensor(&tensors, "logits");
    let without = tensor(&tensors, "logits_without_drop_path");
    let masks_matter = logits_error(without, want);
    assert!(
        masks_matter > 100.0 * LOGITS_TOLERANCE,
        "drop path changed timm's logits by only {masks_matter:.2e}"
    );
    let error = logits_error(&logits, want);
    assert!(
        error <= LOGITS_TOLERANCE,
        "{name}: train-mode logits with drop path differ from timm's by {error:.2e} \
         (without drop path timm's differ by {masks_matter:.2e})"
    );
}
