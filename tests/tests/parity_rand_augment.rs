//! RandAugment sampling replayed against timm 1.0.31's own draws
//! (`tests/oracle/rand_augment_draws.py`), as `parity_mixup.rs` does for Mixup.
//!
//! For each recorded config string (the RSB ones, `rand-m7-mstd0.5-inc1` and
//! `rand-m6-n1-mstd0.5-inc1`, and cases that clip the noisy magnitude at 10 and
//! at 0, draw it uniformly, and set `p`), the test checks that our parse gives
//! timm's op set (names, in order), `n`, `p`, `m`, `mstd` and `mmax`; then,
//! image by image, it feeds timm's recorded draws (numpy's op picks, Python's
//! apply, magnitude, sign and interpolation draws) to
//! [`RandAugment::apply_replayed`], which must consume exactly those draws,
//! take timm's decisions (which ops ran, the clipped magnitude and the level
//! argument, identical floats) and produce timm's output image bit for bit
//! (the op-by-op tests in `crates/data/tests/pil_parity.rs` are exact too).
//! The fixtures must exercise what they claim: both clips, skipped ops,
//! negated arguments and both interpolations occur in the records.

use rsb_data::image::{Filter, RgbImage};
use rsb_data::rand_augment::{
    RaDraw, RaInterpolation, RandAugment, RandAugmentConfig, RandAugmentOps,
};
use rsb_integration_tests::{fixtures, read_json, read_npy};
use serde_json::Value;
use tch::{Kind, Tensor};

/// `[N, H, W, 3]` uint8 array -> images.
fn images(array: &Tensor) -> Vec<RgbImage> {
    let size = array.size();
    assert!(size.len() == 4 && size[3] == 3, "image stack has shape {size:?}");
    (0..size[0])
        .map(|i| {
            let data: Vec<u8> =
                array.get(i).to_kind(Kind::Uint8).flatten(0, -1).try_into().unwrap();
            RgbImage::new(size[2] as u32, size[1] as u32, data)
        })
        .collect()
}

fn draw(entry: &Value) -> RaDraw {
    let kind = entry[0].as_str().unwrap();
    // Indices, or the IEEE-754 bits of float draws.
    let value = entry[1].as_u64().unwrap();
    let index = || value as usize;
    let float = || f64::from_bits(value);
    match kind {
        "op" => RaDraw::OpChoice(index()),
        "random" => RaDraw::Random(float()),
        "gauss" => RaDraw::Gauss(float()),
        "uniform" => RaDraw::Uniform(float()),
        "interp" => RaDraw::InterpolationChoice(index()),
        other => panic!("unknown draw kind {other:?}"),
    }
}

fn interpolation(name: &str) -> RaInterpolation {
    match name {
        "random" => RaInterpolation::Random,
        "bilinear" => RaInterpolation::Fixed(Filter::Bilinear),
        "bicubic" => RaInterpolation::Fixed(Filter::Bicubic),
        other => panic!("unknown interpolation {other:?}"),
    }
}

/// Counts of the situations a case must exercise.
#[derive(Default, Debug)]
struct Seen {
    skipped: usize,
    clipped_high: usize,
    clipped_low: usize,
    negated: usize,
    bilinear: usize,
    bicubic: usize,
}

#[test]
fn rand_augment_replays_timm_draws() {
    let dir = fixtures("rand_augment");
    let manifest = read_json(&dir.join("manifest.json"));
    let inputs = images(&read_npy(&dir.join("inputs.npy")));
    let mut seen = Seen::default();
    let mut failures = Vec::new();
    for case in manifest.as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let spec = case["spec"].as_str().unwrap();
        let config = RandAugmentConfig::parse(spec).unwrap();
        // The parsed config against timm's AugmentOps.
        let timm_ops = case["ops"].as_array().unwrap();
        let our_names: Vec<&str> = config.ops().iter().map(|op| op.timm_name()).collect();
        let timm_names: Vec<&str> = timm_ops.iter().map(|o| o["name"].as_str().unwrap()).collect();
        assert_eq!(our_names, timm_names, "{spec}: op set");
        assert_eq!(config.num_layers as u64, case["num_layers"].as_u64().unwrap(), "{spec}: n");
        for op in timm_ops {
            assert_eq!(config.prob, op["prob"].as_f64().unwrap(), "{spec}: p");
            assert_eq!(f64::from(config.magnitude), op["magnitude"].as_f64().unwrap(), "{spec}: m");
            // JSON has no infinity: the oracle writes an infinite std as "inf".
            let std = &op["magnitude_std"];
            match std.as_f64() {
                Some(v) => assert_eq!(config.magnitude_std, v, "{spec}: mstd"),
                None => {
                    assert_eq!(std.as_str(), Some("inf"), "{spec}: mstd");
                    assert_eq!(config.magnitude_std, f64::INFINITY, "{spec}: mstd");
                }
            }
            assert_eq!(
                config.magnitude_max.map(u64::from),
                op["magnitude_max"].as_u64(),
                "{spec}: mmax"
            );
        }
        let fill: Vec<u8> = serde_json::from_value(case["fill"].clone()).unwrap();
        let ra = RandAugment::new(
            config.clone(),
            [fill[0], fill[1], fill[2]],
            interpolation(case["interpolation"].as_str().unwrap()),
        );
        let outputs = images(&read_npy(&dir.join(format!("{name}.npy"))));
        let records = case["images"].as_array().unwrap();
        assert_eq!(records.len(), outputs.len(), "{name}: records and images");
        for (j, (record, want)) in records.iter().zip(&outputs).enumerate() {
            let plan: Vec<RaDraw> = record["draws"].as_array().unwrap().iter().map(draw).collect();
            let input = &inputs[record["input"].as_u64().unwrap() as usize];
            let (ours, decisions) = match ra.apply_replayed(input, &plan) {
                Ok(r) => r,
                Err(e) => {
                    failures.push(format!("{name} image {j}: {e}"));
                    continue;
                }
            };
            let timm_decisions = record["ops"].as_array().unwrap();
            assert_eq!(decisions.len(), timm_decisions.len(), "{name} image {j}: op count");
            for (k, (d, t)) in decisions.iter().zip(timm_decisions).enumerate() {
                let at = format!("{name} image {j} op {k} ({})", d.op.timm_name());
                assert_eq!(d.op.timm_name(), t["name"].as_str().unwrap(), "{at}: op");
                assert_eq!(d.applied, t["applied"].as_bool().unwrap(), "{at}: applied");
                if !d.applied {
                    seen.skipped += 1;
                    continue;
                }
                // timm records the magnitude only for ops with a level function.
                if let Some(m) = t["magnitude_bits"].as_u64().map(f64::from_bits) {
                    assert_eq!(d.magnitude, Some(m), "{at}: magnitude");
                    let upper = config.upper_bound();
                    if m == upper {
                        seen.clipped_high += 1;
                    }
                    if m == 0.0 {
                        seen.clipped_low += 1;
                    }
                }
                let timm_arg = t["args_bits"]
                    .as_array()
                    .and_then(|a| a.first())
                    .map(|v| f64::from_bits(v.as_u64().unwrap()));
                assert_eq!(d.arg, timm_arg, "{at}: level argument");
                if d.arg.is_some_and(|a| a.is_sign_negative()) && d.op.draws_sign() {
                    seen.negated += 1;
                }
                match d.filter {
                    Some(Filter::Bilinear) => seen.bilinear += 1,
                    Some(Filter::Bicubic) => seen.bicubic += 1,
                    _ => {}
                }
            }
            if &ours != want {
                let differing = ours.data.iter().zip(&want.data).filter(|(a, b)| a != b).count();
                failures.push(format!(
                    "{name} image {j}: {differing} bytes differ from timm's output ({:?})",
                    decisions
                ));
            }
        }
    }
    eprintln!("{seen:?}");
    assert!(failures.is_empty(), "RandAugment replay failures:\n{}", failures.join("\n"));
    for (what, count) in [
        ("skipped ops", seen.skipped),
        ("magnitudes clipped at the upper bound", seen.clipped_high),
        ("magnitudes clipped at 0", seen.clipped_low),
        ("negated arguments", seen.negated),
        ("bilinear geometric ops", seen.bilinear),
        ("bicubic geometric ops", seen.bicubic),
    ] {
        assert!(count > 0, "the fixtures exercise no {what}: regenerate them with other seeds");
    }
}
