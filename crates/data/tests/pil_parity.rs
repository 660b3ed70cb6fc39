//! Parity of the PIL-exact image operations and timm RandAugment ops with
//! Pillow 13 / timm 1.0.31 on real photos.
//!
//! Reads `$RSB_FIXTURES/pil_ops/manifest.json` (default
//! `<workspace>/target/fixtures/pil_ops`), written by
//! `tests/oracle/pil_ops.py`, runs every case through our code and compares.
//!
//! Tolerance: none. Every case must be bit-identical to Pillow's output, and
//! the level arguments of timm's `AugmentOp` must be identical floats.

use std::fs::File;
use std::path::{Path, PathBuf};

use rsb_data::image::{affine, crop, ops, resize, resize_region, rotate, Filter, Region, RgbImage};
use rsb_data::rand_augment::{RaOp, RandAugmentConfig};
use serde_json::Value;

fn fixture_dir() -> PathBuf {
    rsb_test_support::fixtures("pil_ops")
}

fn load_npy(path: &Path) -> RgbImage {
    let file = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let npy = npyz::NpyFile::new(std::io::BufReader::new(file))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let shape = npy.shape().to_vec();
    assert!(shape.len() == 3 && shape[2] == 3, "{}: shape {shape:?} is not HxWx3", path.display());
    let data: Vec<u8> = npy.into_vec().unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    RgbImage::new(shape[1] as u32, shape[0] as u32, data)
}

fn filter(case: &Value) -> Filter {
    match case["filter"].as_str() {
        Some("nearest") => Filter::Nearest,
        Some("bilinear") => Filter::Bilinear,
        Some("bicubic") => Filter::Bicubic,
        other => panic!("bad filter {other:?} in {case}"),
    }
}

/// A number of the manifest: floats are stored as Python `repr` strings
/// (serde_json's default float parsing is not always correctly rounded;
/// `str::parse` is), integers as JSON integers.
fn num(v: &Value) -> f64 {
    match v {
        Value::String(s) => s.parse().unwrap_or_else(|e| panic!("bad float {s:?}: {e}")),
        Value::Number(n) if n.is_i64() || n.is_u64() => {
            n.as_i64().map(|i| i as f64).unwrap_or_else(|| n.as_u64().unwrap_or(0) as f64)
        }
        _ => panic!("not an integer or a float string: {v}"),
    }
}

fn uint(case: &Value, key: &str) -> u32 {
    case[key].as_u64().unwrap_or_else(|| panic!("no {key} in {case}")) as u32
}

fn fill(case: &Value) -> [u8; 3] {
    let f: Vec<u8> = case["fill"]
        .as_array()
        .unwrap_or_else(|| panic!("no fill in {case}"))
        .iter()
        .map(|v| v.as_u64().unwrap_or(0) as u8)
        .collect();
    [f[0], f[1], f[2]]
}

/// Runs one case; returns our image, and a level-argument mismatch if any.
fn run_case(case: &Value, img: &RgbImage) -> (RgbImage, Option<String>) {
    let kind = case["kind"].as_str().unwrap_or("");
    let out = match kind {
        "timm_op" => return run_timm_op(case, img),
        "resize" => resize(img, uint(case, "width"), uint(case, "height"), filter(case)),
        "resized_crop" => {
            let region = crop(
                img,
                uint(case, "left"),
                uint(case, "top"),
                uint(case, "crop_width"),
                uint(case, "crop_height"),
            );
            let out = resize(&region, uint(case, "width"), uint(case, "height"), filter(case));
            // The loader's fused form (resampling straight from the source
            // region) must give the same pixels, hence Pillow's.
            let fused = resize_region(
                img,
                Region {
                    left: uint(case, "left"),
                    top: uint(case, "top"),
                    width: uint(case, "crop_width"),
                    height: uint(case, "crop_height"),
                },
                uint(case, "width"),
                uint(case, "height"),
                filter(case),
            );
            assert!(fused == out, "fused resized crop differs from crop + resize: {case}");
            out
        }
        "op" => {
            let args: Vec<f64> =
                case["args"].as_array().map(|a| a.iter().map(num).collect()).unwrap_or_default();
            let arg = |i: usize| args[i];
            match case["op"].as_str().unwrap_or("") {
                "autocontrast" => ops::autocontrast(img),
                "equalize" => ops::equalize(img),
                "invert" => ops::invert(img),
                "smooth" => ops::smooth(img),
                "posterize" => ops::posterize(img, arg(0) as i64),
                "solarize" => ops::solarize(img, arg(0) as i64),
                "solarize_add" => ops::solarize_add(img, arg(0) as i64, arg(1) as i64),
                "color" => ops::enhance_color(img, arg(0)),
                "contrast" => ops::enhance_contrast(img, arg(0)),
                "brightness" => ops::enhance_brightness(img, arg(0)),
                "sharpness" => ops::enhance_sharpness(img, arg(0)),
                other => panic!("unknown op {other}"),
            }
        }
        "affine" => {
            let c: Vec<f64> = case["coeffs"].as_array().expect("coeffs").iter().map(num).collect();
            affine(img, [c[0], c[1], c[2], c[3], c[4], c[5]], filter(case), fill(case))
        }
        "rotate" => rotate(img, num(&case["degrees"]), filter(case), fill(case)),
        other => panic!("unknown case kind {other}"),
    };
    (out, None)
}

/// A timm `AugmentOp` call: our level argument must equal timm's, and the image Pillow's.
fn run_timm_op(case: &Value, img: &RgbImage) -> (RgbImage, Option<String>) {
    let name = case["name"].as_str().unwrap_or("");
    let op = RaOp::from_timm_name(name).unwrap_or_else(|| panic!("unknown timm op {name}"));
    let config = RandAugmentConfig {
        magnitude_max: case["magnitude_max"].as_u64().map(|m| m as u32),
        ..RandAugmentConfig::default()
    };
    // AugmentOp: max(0, min(magnitude, magnitude_max or 10)).
    let m = config.clip_magnitude(num(&case["magnitude"]));
    let negate = case["negate"].as_bool().expect("negate");
    let want: Vec<f64> =
        case["level_args"].as_array().expect("level_args").iter().map(num).collect();
    let got: Vec<f64> = op.level_arg(m, negate).into_iter().collect();
    let arg_err = (got != want).then(|| format!("level args {got:?}, timm {want:?}"));
    (op.apply_level(img, m, negate, filter(case), fill(case)), arg_err)
}

#[test]
fn pil_ops_match_pillow_and_timm_bit_for_bit() {
    let dir = fixture_dir();
    let manifest_path = dir.join("manifest.json");
    let Ok(text) = std::fs::read_to_string(&manifest_path) else {
        panic!(
            "missing {}: generate the fixtures with `{}`",
            manifest_path.display(),
            rsb_test_support::GENERATE_FIXTURES
        );
    };
    let manifest: Value = serde_json::from_str(&text).expect("manifest.json is not JSON");
    let inputs = manifest["inputs"].as_object().expect("inputs");
    let images: std::collections::HashMap<&str, RgbImage> = inputs
        .iter()
        .map(|(name, file)| (name.as_str(), load_npy(&dir.join(file.as_str().expect("file")))))
        .collect();
    let cases = manifest["cases"].as_array().expect("cases");
    assert!(cases.len() > 100, "suspiciously few cases: {}", cases.len());

    let mut failures = Vec::new();
    let mut per_kind: std::collections::BTreeMap<&str, usize> = Default::default();
    for case in cases {
        let id = case["id"].as_str().unwrap_or("?");
        let img = &images[case["input"].as_str().expect("input")];
        let want = load_npy(&dir.join(case["output"].as_str().expect("output")));
        let (got, arg_err) = run_case(case, img);
        *per_kind.entry(case["kind"].as_str().unwrap_or("?")).or_default() += 1;
        if let Some(e) = arg_err {
            failures.push(format!("{id}: {e}"));
        }
        if (got.width, got.height) != (want.width, want.height) {
            failures.push(format!(
                "{id}: size {}x{}, Pillow {}x{}",
                got.width, got.height, want.width, want.height
            ));
            continue;
        }
        let diffs: Vec<u8> = got
            .data
            .iter()
            .zip(&want.data)
            .map(|(&a, &b)| a.abs_diff(b))
            .filter(|&d| d > 0)
            .collect();
        if !diffs.is_empty() {
            failures.push(format!(
                "{id}: {} of {} values differ, max {} ({case})",
                diffs.len(),
                want.data.len(),
                diffs.iter().max().copied().unwrap_or(0)
            ));
        }
    }
    eprintln!("pil_parity: {} cases, {per_kind:?}", cases.len());
    assert!(
        failures.is_empty(),
        "{} of {} cases differ from Pillow/timm:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
