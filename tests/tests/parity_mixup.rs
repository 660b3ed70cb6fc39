//! Our Mixup/CutMix and BCE against timm's `FastCollateMixup` and
//! `BinaryCrossEntropy`. The random decisions timm drew (lambda, box centre)
//! are replayed through our code; mixed images must then be identical and the
//! targets equal within 1e-6. BCE losses and input gradients within 1e-6
//! relative.

use rsb_data::mixup::{apply_plan, mixed_targets, MixDecision, MixPlan};
use rsb_integration_tests::{fixtures, read_json, read_npy};
use rsb_train::loss::Loss;
use tch::Kind;

fn decision(value: &serde_json::Value) -> MixDecision {
    MixDecision {
        lam: value["lam"].as_f64().unwrap(),
        cutmix_center: value["center"]
            .as_array()
            .map(|c| (c[0].as_u64().unwrap() as u32, c[1].as_u64().unwrap() as u32)),
    }
}

#[test]
fn mixed_images_and_targets_equal_timm() {
    let dir = fixtures("mixup");
    let cases = read_json(&dir.join("cases.json"));
    let mut cutmix_seen = false;
    let mut mixup_seen = false;
    for case in cases.as_array().unwrap() {
        let prefix = case["prefix"].as_str().unwrap();
        let images = read_npy(&dir.join(format!("{prefix}_images.npy"))); // [B, 3, H, W] u8
        let expected = read_npy(&dir.join(format!("{prefix}_mixed.npy")));
        let targets = read_npy(&dir.join(format!("{prefix}_targets.npy")));
        let (b, h, w) =
            (images.size()[0] as usize, images.size()[2] as u32, images.size()[3] as u32);
        let nhwc: Vec<u8> = images.permute([0, 2, 3, 1]).contiguous().view(-1).try_into().unwrap();
        let plan = match case["mode"].as_str().unwrap() {
            "batch" => MixPlan::Batch(decision(&case["decisions"])),
            _ => {
                MixPlan::Elem(case["decisions"].as_array().unwrap().iter().map(decision).collect())
            }
        };
        for d in match &plan {
            MixPlan::Batch(d) => vec![*d],
            MixPlan::Elem(v) => v.clone(),
        } {
            cutmix_seen |= d.cutmix_center.is_some() && d.lam != 1.0;
            mixup_seen |= d.cutmix_center.is_none() && d.lam != 1.0;
        }
        let (mixed, lams) = apply_plan(&nhwc, b, h, w, &plan);
        let want: Vec<u8> =
            expected.permute([0, 2, 3, 1]).contiguous().view(-1).try_into().unwrap();
        assert_eq!(mixed, want, "{prefix}: mixed images differ");
        let labels: Vec<u32> =
            case["labels"].as_array().unwrap().iter().map(|l| l.as_u64().unwrap() as u32).collect();
        let ours = mixed_targets(
            &labels,
            &lams,
            case["num_classes"].as_u64().unwrap() as usize,
            case["smoothing"].as_f64().unwrap(),
        );
        let theirs: Vec<f32> = targets.view(-1).try_into().unwrap();
        for (i, (a, t)) in ours.iter().zip(&theirs).enumerate() {
            assert!((a - t).abs() <= 1e-6, "{prefix}: target {i}: {a} vs timm {t}");
        }
    }
    assert!(cutmix_seen && mixup_seen, "fixtures must exercise both CutMix and Mixup");
}

#[test]
fn bce_loss_and_gradient_equal_timm() {
    let dir = fixtures("bce");
    let cases = read_json(&dir.join("cases.json"));
    for case in cases.as_array().unwrap() {
        let prefix = case["prefix"].as_str().unwrap();
        let logits = read_npy(&dir.join(format!("{prefix}_logits.npy"))).set_requires_grad(true);
        let targets = read_npy(&dir.join(format!("{prefix}_targets.npy")));
        let grad_want = read_npy(&dir.join(format!("{prefix}_grad.npy")));
        let loss = Loss::Bce { target_threshold: case["target_threshold"].as_f64() }
            .compute(&logits, &targets)
            .unwrap();
        let want = case["loss"].as_f64().unwrap();
        let got = loss.double_value(&[]);
        assert!((got - want).abs() <= 1e-6 * want.abs(), "{prefix}: loss {got} vs timm {want}");
        loss.backward();
        let err = (logits.grad() - &grad_want).abs().max().to_kind(Kind::Double).double_value(&[]);
        let scale = grad_want.abs().max().to_kind(Kind::Double).double_value(&[]);
        assert!(err <= 1e-6 * scale, "{prefix}: gradient error {err:.2e}");
    }
}
