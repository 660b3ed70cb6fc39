//! Our LAMB against timm's `Lamb` on the same parameters and gradients: six
//! steps per case, clipping active on every other step, two weight-decay
//! groups, a zero-norm parameter. Tolerance: |ours - timm| <= 1e-5 * max(|timm|,
//! 1e-3) per element, float32 on CPU. The floor is the scale of one update
//! (lr ~ 1e-3): a parameter that the updates have cancelled down to ~1e-5 is
//! compared absolutely, since its relative error only measures the cancellation.
//! Both update paths are held to it: the per-tensor one (timm's on a CPU)
//! and the packed one (as timm's multi-tensor path, ours on a GPU).

use rsb_integration_tests::{fixtures, max_relative_error, read_json};
use rsb_recipes::schema::LambOptimizer;
use rsb_train::lamb::{Lamb, UpdatePath};
use std::collections::HashMap;
use tch::Tensor;

const TOLERANCE: f64 = 1e-5;

#[test]
fn lamb_steps_match_timm() {
    for path in [UpdatePath::PerTensor, UpdatePath::Packed] {
        lamb_steps_match_timm_on(path);
    }
}

fn lamb_steps_match_timm_on(path: UpdatePath) {
    let dir = fixtures("lamb");
    let cases = read_json(&dir.join("cases.json"));
    for case in cases.as_array().unwrap() {
        let file = dir.join(case["file"].as_str().unwrap());
        let tensors: HashMap<String, Tensor> =
            Tensor::read_safetensors(&file).unwrap().into_iter().collect();
        let names: Vec<String> = case["names"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_str().unwrap().to_string())
            .collect();
        let groups: Vec<Vec<String>> = case["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| {
                g.as_array().unwrap().iter().map(|n| n.as_str().unwrap().to_string()).collect()
            })
            .collect();
        let weight_decay = case["weight_decay"].as_f64().unwrap();
        // timm's groups: [no_decay, decay]; a parameter decays if it is in the group with wd > 0.
        let decays = |name: &str| {
            weight_decay > 0.0
                && groups.last().is_some_and(|g| g.iter().any(|n| n == name))
                && groups.len() == 2
        };
        let params: Vec<(String, Tensor, bool)> = names
            .iter()
            .map(|n| {
                let p = tensors[&format!("init.{n}")].copy().set_requires_grad(true);
                (n.clone(), p, decays(n))
            })
            .collect();
        let config = LambOptimizer {
            lr: 5e-3,
            weight_decay,
            betas: [0.9, 0.999],
            eps: 1e-6,
            max_grad_norm: case["max_grad_norm"].as_f64(),
            trust_clip: false,
            always_adapt: false,
        };
        let mut lamb = Lamb::from_parameters(
            params.iter().map(|(n, p, d)| (n.clone(), p.shallow_clone(), *d)).collect(),
            &config,
        )
        .unwrap();
        lamb.set_update_path(path);
        assert_eq!(lamb.group_names(), groups, "parameter groups differ from timm's");
        for (step, lr) in case["lrs"].as_array().unwrap().iter().enumerate() {
            for (name, p, _) in &params {
                let mut grad = p.grad();
                if !grad.defined() {
                    // First step: create the gradient by a backward pass of p * g.
                    (p * tensors[&format!("grad{step}.{name}")].copy())
                        .sum(tch::Kind::Float)
                        .backward();
                    continue;
                }
                tch::no_grad(|| grad.copy_(&tensors[&format!("grad{step}.{name}")]));
            }
            lamb.step(lr.as_f64().unwrap()).unwrap();
            let packed = if path == UpdatePath::Packed { groups.len() } else { 0 };
            assert_eq!(lamb.groups_packed_last_update(), packed, "{path:?}");
            for (name, p, _) in &params {
                let want = &tensors[&format!("param{step}.{name}")];
                let err = max_relative_error(&p.detach(), want, 1e-3);
                assert!(
                    err <= TOLERANCE,
                    "{path:?}: case {file:?} step {step} {name}: relative error {err:.2e}"
                );
            }
        }
    }
}
