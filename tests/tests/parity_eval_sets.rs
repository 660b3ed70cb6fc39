//! Evaluation-set scoring against timm 1.0.31 on the same logits:
//! ImageNet-ReaL (`timm.data.RealLabelsImagenet`, images looked up by name in
//! a shuffled order), plain top-1/top-5 (`timm.utils.accuracy`, what timm
//! reports for ImageNet-V2), and the class order timm's folder reader gives
//! ImageNet-V2's folders `0`..`999`. Scoring runs through the trainer's own
//! path (`score_logits`: `topk` on the logits, then the set's scoring).

use rsb_data::dataset::{ImageFolder, Sample};
use rsb_data::eval_sets::{EvalSet, EvalSetKind, EvalSetSpec};
use rsb_data::image::Filter;
use rsb_data::labels::{EvalCounts, RealLabels, Scoring};
use rsb_data::transforms::EvalTransform;
use rsb_integration_tests::{fixtures, read_json, read_npy};
use rsb_train::evaluation::score_logits;
use std::sync::Arc;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * b.abs().max(1.0)
}

#[test]
fn real_and_plain_accuracy_equal_timm() {
    let dir = fixtures("eval_sets");
    let m = read_json(&dir.join("manifest.json"));
    let logits = read_npy(&dir.join("logits.npy"));
    let files: Vec<String> =
        m["files"].as_array().unwrap().iter().map(|f| f.as_str().unwrap().to_string()).collect();
    let n = files.len();
    assert_eq!(logits.size(), vec![n as i64, 1000]);

    // ReaL: samples named as in the validation folder, in the fixture's shuffled order.
    let real = RealLabels::read(&dir.join("real.json")).unwrap();
    assert_eq!(real.len(), 50_000);
    let scoring = Scoring::Real(Arc::new(real));
    let samples: Vec<Sample> =
        files.iter().map(|f| Sample::file(format!("/imagenet/val/{f}").into(), 0)).collect();
    scoring.check(&samples, 1000).unwrap();
    let mut score = EvalCounts::default();
    let mut per_image = Vec::new();
    // Batches of 300 (timm's fixture used 256): batching must not matter.
    for start in (0..n).step_by(300) {
        let len = 300.min(n - start);
        let indices: Vec<usize> = (start..start + len).collect();
        let batch = logits.narrow(0, start as i64, len as i64);
        score_logits(&batch, &scoring, &samples, &indices, &mut score).unwrap();
        for &i in &indices {
            let mut one = EvalCounts::default();
            score_logits(&logits.narrow(0, i as i64, 1), &scoring, &samples, &[i], &mut one)
                .unwrap();
            if one.count == 1 {
                per_image.push((one.top1 == 1, one.top5 == 1));
            }
        }
    }
    let want1: Vec<bool> =
        m["real_correct_1"].as_array().unwrap().iter().map(|v| v.as_bool().unwrap()).collect();
    let want5: Vec<bool> =
        m["real_correct_5"].as_array().unwrap().iter().map(|v| v.as_bool().unwrap()).collect();
    assert_eq!(per_image.iter().map(|p| p.0).collect::<Vec<_>>(), want1, "ReaL top-1 per image");
    assert_eq!(per_image.iter().map(|p| p.1).collect::<Vec<_>>(), want5, "ReaL top-5 per image");
    assert_eq!(score.count as usize, want1.len());
    assert_eq!(score.count + score.excluded, n as u64);
    assert!(score.excluded > 0 && score.top1 > 0 && score.top5 > score.top1, "{score:?}");
    let (t1, t5) = (m["real_top1"].as_f64().unwrap(), m["real_top5"].as_f64().unwrap());
    assert!(close(score.top1_pct(), t1), "ReaL top-1 {} vs timm {t1}", score.top1_pct());
    assert!(close(score.top5_pct(), t5), "ReaL top-5 {} vs timm {t5}", score.top5_pct());

    // Plain labels (ImageNet val, ImageNet-V2): timm.utils.accuracy.
    let targets: Vec<u32> =
        m["targets"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let samples: Vec<Sample> = targets
        .iter()
        .enumerate()
        .map(|(i, &t)| Sample::file(format!("x/{i}.png").into(), t))
        .collect();
    let mut score = EvalCounts::default();
    let indices: Vec<usize> = (0..n).collect();
    score_logits(&logits, &Scoring::Labels, &samples, &indices, &mut score).unwrap();
    // timm.utils.accuracy computes in float32: equal up to its rounding.
    let (t1, t5) = (m["plain_top1"].as_f64().unwrap(), m["plain_top5"].as_f64().unwrap());
    assert!((score.top1_pct() - t1).abs() < 1e-4, "top-1 {} vs timm {t1}", score.top1_pct());
    assert!((score.top5_pct() - t5).abs() < 1e-4, "top-5 {} vs timm {t5}", score.top5_pct());
    assert_eq!(score.count, n as u64);
}

#[test]
fn imagenet_v2_folders_map_to_their_class_index_as_in_timm() {
    let dir = fixtures("eval_sets");
    let m = read_json(&dir.join("manifest.json"));
    let timm = m["v2_class_to_idx"].as_object().unwrap();
    assert_eq!(timm.len(), 1000);
    // Natural sort (class folders) and the numbered layout agree with timm.
    let natural = ImageFolder::open(&dir.join("v2")).unwrap();
    let numbered = ImageFolder::open_numbered(&dir.join("v2"), 1000).unwrap();
    for (i, class) in natural.classes().iter().enumerate() {
        assert_eq!(timm[class].as_u64().unwrap() as usize, i, "class folder {class}");
        assert_eq!(class.parse::<usize>().unwrap(), i);
    }
    for (a, b) in natural.samples().iter().zip(numbered.samples()) {
        assert_eq!(a.label, b.label);
        let folder = a.path.parent().unwrap().file_name().unwrap().to_str().unwrap();
        assert_eq!(timm[folder].as_u64().unwrap(), u64::from(a.label));
    }
    // As an evaluation set.
    let spec = EvalSetSpec {
        name: "v2".into(),
        kind: EvalSetKind::V2,
        root: dir.join("v2"),
        labels: None,
    };
    let set = EvalSet::open(&spec, EvalTransform::new(32, 0.95, Filter::Bicubic), 64, 1000, None)
        .unwrap();
    assert_eq!(set.data.folder().len(), 1000);
    let err = EvalSet::open(&spec, EvalTransform::new(32, 0.95, Filter::Bicubic), 64, 999, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("999") && err.contains("out of range"), "{err}");
}
