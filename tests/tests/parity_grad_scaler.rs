//! Our fp16 loss scaler against `torch.amp.GradScaler` on the CPU
//! (`tests/oracle/grad_scaler.py`): the same scripted sequences of finite,
//! infinite, NaN and overflowing-once-scaled gradients, with torch's defaults
//! and with short growth intervals (growth up to f32's ceiling, backoff into
//! the subnormals and to zero). Compared exactly, step by step: the scale
//! before, the skip decision, the unscaled gradients (bit for bit, NaN
//! included), the scale and growth tracker after, and the final
//! `state_dict()`. Our scaler runs torch's own kernels on the device
//! (`_amp_foreach_non_finite_check_and_unscale_`, `_amp_update_scale_`), so
//! this checks that we call them as `GradScaler` does.

use rsb_integration_tests::{fixtures, read_json};
use rsb_train::grad_scaler::{GradScaler, ScalerState, BACKOFF_FACTOR, GROWTH_FACTOR};
use std::collections::HashMap;
use tch::{Device, Tensor};

fn bits(t: &Tensor) -> Vec<u32> {
    Vec::<f32>::try_from(&t.reshape([-1])).unwrap().iter().map(|v| v.to_bits()).collect()
}

#[test]
fn the_scaler_replays_torchs_decisions_exactly() {
    let dir = fixtures("grad_scaler");
    let cases = read_json(&dir.join("cases.json"));
    let cases = cases["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    let mut skipped = 0;
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let tensors: HashMap<String, Tensor> =
            Tensor::read_safetensors(dir.join(case["file"].as_str().unwrap()))
                .unwrap()
                .into_iter()
                .collect();
        let mut scaler = GradScaler::new(
            case["init_scale"].as_f64().unwrap() as f32,
            GROWTH_FACTOR,
            BACKOFF_FACTOR,
            case["growth_interval"].as_u64().unwrap() as u32,
            Device::Cpu,
        )
        .unwrap();
        for (i, step) in case["steps"].as_array().unwrap().iter().enumerate() {
            let at = format!("{name}, step {i}");
            let before = scaler.state().unwrap();
            assert_eq!(before.scale, step["scale_before"].as_f64().unwrap(), "{at}");
            // The backward pass of sum(p * g) * scale gives p the gradient g * scale.
            let grads: Vec<Tensor> = (0..2)
                .map(|j| tensors[&format!("step{i}.g{j}")].f_mul_scalar(before.scale))
                .collect::<Result<_, _>>()
                .unwrap();
            let found_inf = scaler.unscale(&grads).unwrap();
            let found = found_inf.double_value(&[]) != 0.0;
            assert_eq!(found, step["found_inf"].as_bool().unwrap(), "{at}: found_inf");
            assert_eq!(!found, step["applied"].as_bool().unwrap(), "{at}: applied");
            skipped += usize::from(found);
            for (j, grad) in grads.iter().enumerate() {
                let want = &tensors[&format!("step{i}.u{j}")];
                assert_eq!(bits(grad), bits(want), "{at}: unscaled gradient {j}");
            }
            scaler.update(&found_inf).unwrap();
            let after = scaler.state().unwrap();
            assert_eq!(after.scale, step["scale_after"].as_f64().unwrap(), "{at}");
            assert_eq!(
                after.growth_tracker,
                step["growth_tracker"].as_u64().unwrap(),
                "{at}: growth tracker"
            );
        }
        let want: ScalerState = serde_json::from_value(case["state_dict"].clone()).unwrap();
        assert_eq!(scaler.state().unwrap(), want, "{name}: state_dict");
    }
    // The sequences exercise both outcomes.
    assert!(skipped >= 8, "{skipped} skipped steps");
}
