//! Decoding and the evaluation transform against Pillow and timm.
//!
//! Decoding: PNGs (RGBA, palette) must equal Pillow's `convert('RGB')`
//! exactly; 16-bit PNGs are scaled to 8 bits (Pillow clips them to 255 instead,
//! a quirk we do not copy). JPEGs are decoded by libjpeg-turbo with Pillow's
//! settings, so baseline, progressive, grayscale and CMYK JPEGs must equal
//! Pillow's pixels exactly too.
//!
//! Evaluation transform: fed Pillow-decoded pixels, ours equals timm's
//! `transforms_imagenet_eval(size, crop_pct, 'bicubic')` exactly.

use rsb_data::decode::decode_file;
use rsb_data::image::{Filter, RgbImage};
use rsb_data::transforms::EvalTransform;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    rsb_test_support::fixtures("decode_eval")
}

fn read_rgb(path: &std::path::Path) -> RgbImage {
    let bytes = std::fs::read(path).unwrap();
    let npy = npyz::NpyFile::new(&bytes[..]).unwrap();
    let shape = npy.shape().to_vec();
    let data: Vec<u8> = npy.into_vec().unwrap();
    assert_eq!(shape.len(), 3, "{}", path.display());
    RgbImage::new(shape[1] as u32, shape[0] as u32, data)
}

fn manifest() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("manifest.json")).unwrap())
        .unwrap()
}

#[test]
fn decoded_files_match_pillow() {
    let dir = fixtures().join("files");
    let m = manifest();
    let files = m["files"].as_array().unwrap();
    assert!(files.len() >= 14);
    for f in files {
        let name = f["file"].as_str().unwrap();
        let ours = decode_file(&dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let want = read_rgb(&dir.join(format!("{name}.rgb.npy")));
        assert_eq!((ours.width, ours.height), (want.width, want.height), "{name}: size");
        let diffs: Vec<u8> =
            ours.data.iter().zip(&want.data).map(|(a, b)| a.abs_diff(*b)).collect();
        let mean = diffs.iter().map(|&d| f64::from(d)).sum::<f64>() / diffs.len() as f64;
        let mut sorted = diffs.clone();
        sorted.sort_unstable();
        let p99 = sorted[sorted.len() * 99 / 100];
        println!(
            "{name}: mean |diff| {mean:.3}, 99th percentile {p99}, max {}",
            sorted.last().unwrap()
        );
        assert!(mean == 0.0, "{name}: decoding must equal Pillow's (mean {mean:.3}, p99 {p99})");
    }
}

#[test]
fn eval_transform_equals_timm() {
    let dir = fixtures();
    let m = manifest();
    let cases = m["eval"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let prefix = case["prefix"].as_str().unwrap();
        let size = case["size"].as_u64().unwrap() as u32;
        let crop_pct: f64 = case["crop_pct"].as_str().unwrap().parse().unwrap();
        let input = read_rgb(&dir.join(format!("{prefix}_in.npy")));
        let want = read_rgb(&dir.join(format!("{prefix}_out.npy")));
        let ours = EvalTransform::new(size, crop_pct, Filter::Bicubic).apply(&input).unwrap();
        assert_eq!((ours.width, ours.height), (want.width, want.height), "{prefix}");
        assert!(
            ours.data == want.data,
            "{prefix}: eval transform differs from timm ({size} px, crop {crop_pct})"
        );
    }
}
