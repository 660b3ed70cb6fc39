//! The training chain's random resized crop, its random interpolation and the
//! horizontal flip replayed against timm 1.0.31's own draws
//! (`tests/oracle/crop_draws.py`), as `parity_rand_augment.rs` does for
//! RandAugment.
//!
//! For each recorded case (the RSB crop with timm's random interpolation, a
//! fixed bicubic and a fixed bilinear one with wider scale and ratio ranges,
//! and a `near_whole` one without flip), image by image, the test feeds timm's
//! recorded draws (Python's `random.uniform`, `random.randint` and
//! `random.choice` of `RandomResizedCropAndInterpolation`, then the
//! `torch.rand(1)` of `RandomHorizontalFlip`) to
//! [`TrainTransform::crop_and_flip_replayed`], which must consume exactly
//! those draws, give timm's box (`get_params`' `i, j, h, w`), filter and flip
//! decision, and produce timm's output image bit for bit (the resized crop is
//! tested Pillow-exact in `crates/data/tests/pil_parity.rs` too).
//! The fixtures must exercise what they claim: a random crop, the centre
//! fallback of an image too tall and too wide for the ratio range (with a
//! side of exactly `x.5`, which Python's `round` takes to even) and of a
//! whole image, both interpolations, flipped and unflipped images, and a case
//! with `hflip` 0 (no flip draw).

use rsb_data::image::{Filter, RgbImage};
use rsb_data::transforms::{CropBox, CropDraw, CropInterpolation, TrainTransform};
use rsb_integration_tests::{fixtures, read_json, read_npy};
use serde_json::Value;
use tch::{Kind, Tensor};

/// `[H, W, 3]` uint8 array -> image.
fn image(array: &Tensor) -> RgbImage {
    let size = array.size();
    assert!(size.len() == 3 && size[2] == 3, "image has shape {size:?}");
    let data: Vec<u8> = array.to_kind(Kind::Uint8).flatten(0, -1).try_into().unwrap();
    RgbImage::new(size[1] as u32, size[0] as u32, data)
}

/// `[N, H, W, 3]` uint8 array -> images.
fn images(array: &Tensor) -> Vec<RgbImage> {
    let size = array.size();
    assert!(size.len() == 4 && size[3] == 3, "image stack has shape {size:?}");
    (0..size[0]).map(|i| image(&array.get(i))).collect()
}

fn bits(v: &Value) -> f64 {
    f64::from_bits(v.as_u64().unwrap())
}

fn pair(v: &Value) -> [f64; 2] {
    let a = v.as_array().unwrap();
    assert_eq!(a.len(), 2, "{v}");
    [bits(&a[0]), bits(&a[1])]
}

fn draw(entry: &Value) -> CropDraw {
    // Indices, randint values, or the IEEE-754 bits of float draws.
    match entry[0].as_str().unwrap() {
        "uniform" => CropDraw::Uniform(bits(&entry[1])),
        "randint" => CropDraw::RandInt(entry[1].as_i64().unwrap()),
        "interp" => CropDraw::InterpolationChoice(entry[1].as_u64().unwrap() as usize),
        "flip" => CropDraw::FlipRand(bits(&entry[1])),
        other => panic!("unknown draw kind {other:?}"),
    }
}

fn interpolation(name: &str) -> CropInterpolation {
    match name {
        "random" => CropInterpolation::Random,
        "bilinear" => CropInterpolation::Fixed(Filter::Bilinear),
        "bicubic" => CropInterpolation::Fixed(Filter::Bicubic),
        other => panic!("unknown interpolation {other:?}"),
    }
}

/// Counts of the situations the cases must exercise.
#[derive(Default, Debug)]
struct Seen {
    random_crop: usize,
    fallback_too_tall: usize,
    fallback_too_wide: usize,
    fallback_whole: usize,
    fallback_half_even: usize,
    bilinear: usize,
    bicubic: usize,
    flipped: usize,
    not_flipped: usize,
    without_flip_draw: usize,
}

#[test]
fn crop_and_flip_replay_timm_draws() {
    let dir = fixtures("crop");
    let manifest = read_json(&dir.join("manifest.json"));
    let inputs: Vec<RgbImage> = (0..manifest["inputs"].as_u64().unwrap())
        .map(|k| image(&read_npy(&dir.join(format!("input-{k}.npy")))))
        .collect();
    let mut seen = Seen::default();
    let mut failures = Vec::new();
    let mut checked = 0;
    for case in manifest["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let size = case["size"].as_u64().unwrap() as u32;
        let hflip = bits(&case["hflip_bits"]);
        let ratio = pair(&case["ratio_bits"]);
        let transform = TrainTransform {
            size,
            scale: pair(&case["scale_bits"]),
            ratio,
            interpolation: interpolation(case["interpolation"].as_str().unwrap()),
            hflip,
            rand_augment: None,
        };
        let outputs = images(&read_npy(&dir.join(format!("{name}.npy"))));
        let records = case["images"].as_array().unwrap();
        assert_eq!(records.len(), outputs.len(), "{name}: records and images");
        for (j, (record, want)) in records.iter().zip(&outputs).enumerate() {
            checked += 1;
            let plan: Vec<CropDraw> =
                record["draws"].as_array().unwrap().iter().map(draw).collect();
            let input = &inputs[record["input"].as_u64().unwrap() as usize];
            let (ours, decision) = match transform.crop_and_flip_replayed(input, &plan) {
                Ok(r) => r,
                Err(e) => {
                    failures.push(format!("{name} image {j}: {e}"));
                    continue;
                }
            };
            let b: Vec<u32> =
                serde_json::from_value(record["box"].clone()).expect("box [i, j, h, w]");
            let timm_box = CropBox { top: b[0], left: b[1], height: b[2], width: b[3] };
            assert_eq!(decision.crop, timm_box, "{name} image {j}: box");
            let flipped = record["flipped"].as_bool().unwrap();
            assert_eq!(decision.flipped, flipped, "{name} image {j}: flip");
            // Which branch of `get_params` made the box.
            if plan.iter().any(|d| matches!(d, CropDraw::RandInt(_))) {
                seen.random_crop += 1;
            } else {
                let (w, h) = (f64::from(input.width), f64::from(input.height));
                let (min_ratio, max_ratio) = (ratio[0].min(ratio[1]), ratio[0].max(ratio[1]));
                let side = if w / h < min_ratio {
                    seen.fallback_too_tall += 1;
                    Some(w / min_ratio)
                } else if w / h > max_ratio {
                    seen.fallback_too_wide += 1;
                    Some(h * max_ratio)
                } else {
                    assert_eq!((timm_box.width, timm_box.height), (input.width, input.height));
                    seen.fallback_whole += 1;
                    None
                };
                if side.is_some_and(|s| s.fract() == 0.5) {
                    seen.fallback_half_even += 1;
                }
            }
            match decision.filter {
                Filter::Bilinear => seen.bilinear += 1,
                Filter::Bicubic => seen.bicubic += 1,
                other => panic!("{name} image {j}: filter {other:?}"),
            }
            if flipped {
                seen.flipped += 1;
            } else if hflip > 0.0 {
                seen.not_flipped += 1;
            }
            if hflip == 0.0 {
                assert!(!plan.iter().any(|d| matches!(d, CropDraw::FlipRand(_))), "{name}");
                seen.without_flip_draw += 1;
            }
            if &ours != want {
                let differing = ours.data.iter().zip(&want.data).filter(|(a, b)| a != b).count();
                failures.push(format!(
                    "{name} image {j}: {differing} bytes differ from timm's output ({decision:?})"
                ));
            }
        }
    }
    eprintln!("{checked} images: {seen:?}");
    assert!(failures.is_empty(), "crop replay failures:\n{}", failures.join("\n"));
    for (what, count) in [
        ("random crops", seen.random_crop),
        ("centre fallbacks of a too tall image (in_ratio < min)", seen.fallback_too_tall),
        ("centre fallbacks of a too wide image (in_ratio > max)", seen.fallback_too_wide),
        ("whole-image fallbacks", seen.fallback_whole),
        ("fallback sides rounded from exactly .5", seen.fallback_half_even),
        ("bilinear crops", seen.bilinear),
        ("bicubic crops", seen.bicubic),
        ("flipped images", seen.flipped),
        ("images the flip draw left unflipped", seen.not_flipped),
        ("images of a case with hflip 0 (no flip draw)", seen.without_flip_draw),
    ] {
        assert!(count > 0, "the fixtures exercise no {what}: regenerate them with other seeds");
    }
}
