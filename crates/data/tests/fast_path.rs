//! The loader's fast path against the reference path, on real photos
//! (`target/fixtures/decode_eval/files`, `target/fixtures/bad_images/files`):
//!
//! * partial JPEG decoding (only the iMCU columns and rows a crop needs)
//!   gives exactly the crop of a full decode, for every chroma subsampling,
//!   progressive, grayscale and CMYK files;
//! * `TrainTransform::apply_encoded` without DCT scaling equals
//!   `TrainTransform::apply` on the full decode (crop + resize fused, flip in
//!   place), pixel for pixel; with DCT scaling it stays close;
//! * micro-batches do not depend on the number of loader threads (1 vs 3),
//!   and a resumed epoch yields exactly the rest of the uninterrupted one.

use rsb_data::dataset::ImageFolder;
use rsb_data::decode::{decode_bytes, decode_for_crop, probe};
use rsb_data::image::{crop, resize_region_box, Filter};
use rsb_data::mixup::{MixMode, MixupConfig};
use rsb_data::pipeline::TrainData;
use rsb_data::rand_augment::{RaInterpolation, RandAugment, RandAugmentConfig};
use rsb_data::rng::Rng;
use rsb_data::sampler::{SamplerKind, SamplerPosition, StreamSampler};
use rsb_data::transforms::{random_resized_crop_box, CropInterpolation, TrainTransform};
use std::path::PathBuf;
use std::sync::Arc;

fn fixture_files(sub: &str) -> Vec<PathBuf> {
    let dir = rsb_test_support::fixtures(sub).join("files");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("jpg")))
        .collect();
    v.sort();
    v
}

/// Decodable JPEGs of at most ~4 MP from both fixture sets.
fn photos() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for p in fixture_files("decode_eval").into_iter().chain(fixture_files("bad_images")) {
        let bytes = std::fs::read(&p).unwrap();
        if let Ok(info) = probe(&bytes) {
            if u64::from(info.width) * u64::from(info.height) <= 4_000_000
                && decode_bytes(&bytes).is_ok()
            {
                out.push((p.file_name().unwrap().to_string_lossy().into_owned(), bytes));
            }
        }
    }
    assert!(out.len() >= 30, "only {} photos", out.len());
    out
}

fn transform(size: u32) -> TrainTransform {
    let ra = RandAugmentConfig::parse("rand-m7-mstd0.5-inc1").unwrap();
    TrainTransform {
        size,
        scale: [0.08, 1.0],
        ratio: [0.75, 4.0 / 3.0],
        interpolation: CropInterpolation::Random,
        hflip: 0.5,
        rand_augment: Some(RandAugment::new(ra, [124, 116, 104], RaInterpolation::Random)),
    }
}

#[test]
fn partial_decoding_equals_the_crop_of_a_full_decode() {
    let mut rng = Rng::from_key(&[11]);
    let mut checked = 0;
    for (name, bytes) in photos() {
        let info = probe(&bytes).unwrap();
        let full = decode_bytes(&bytes).unwrap();
        for _ in 0..6 {
            let b =
                random_resized_crop_box(info.width, info.height, [0.02, 1.0], [0.5, 2.0], &mut rng);
            let src = decode_for_crop(&bytes, &info, b, 16, 16, false).unwrap();
            assert_eq!(src.denom, 1);
            let got = crop(
                &src.image,
                src.region.left,
                src.region.top,
                src.region.width,
                src.region.height,
            );
            let want = crop(&full, b.left, b.top, b.width, b.height);
            assert!(got == want, "{name}: crop {b:?} differs from the full decode");
            checked += 1;
        }
    }
    assert!(checked > 100);
}

#[test]
fn encoded_path_equals_reference_path_and_scaled_decoding_stays_close() {
    let t = transform(64);
    let mut scaled_used = 0;
    let mut diffs = Vec::new();
    for (k, (name, bytes)) in photos().into_iter().enumerate() {
        let full = decode_bytes(&bytes).unwrap();
        for draw in 0..4u64 {
            let key = [k as u64, draw];
            let want = t.apply(&full, &mut Rng::from_key(&key));
            let got = t.apply_encoded(&bytes, &mut Rng::from_key(&key), false).unwrap();
            assert!(got == want, "{name} draw {draw}: fast path differs from apply()");
        }
        // DCT scaling: compare crop + resize only (RandAugment amplifies differences).
        let info = probe(&bytes).unwrap();
        let b = rsb_data::transforms::CropBox {
            top: 0,
            left: 0,
            width: info.width,
            height: info.height,
        };
        let src = decode_for_crop(&bytes, &info, b, 64, 64, true).unwrap();
        if src.denom > 1 {
            scaled_used += 1;
            let reference = rsb_data::image::resize(&full, 64, 64, Filter::Bilinear);
            let fast = resize_region_box(&src.image, src.region, src.bx, 64, 64, Filter::Bilinear);
            let mean = reference
                .data
                .iter()
                .zip(&fast.data)
                .map(|(a, b)| f64::from(a.abs_diff(*b)))
                .sum::<f64>()
                / reference.data.len() as f64;
            // Measured: 0.0 to 5.8 grey levels per photo (the most on Pillow's
            // fine-grained `hopper`), 1.7 on average: libjpeg's scaled IDCT
            // low-passes each block where Pillow's antialiased filter blurs more.
            assert!(
                mean < 8.0,
                "{name}: 1/{} decode differs by {mean:.2} grey levels on average",
                src.denom
            );
            diffs.push(mean);
        }
    }
    assert!(scaled_used >= 10, "scaled decoding used on {scaled_used} photos");
    let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
    assert!(mean < 2.5, "scaled decoding differs by {mean:.2} grey levels on average");
}

/// A class folder of real photos for the loader tests.
fn photo_folder(dir: &std::path::Path) -> ImageFolder {
    for (k, (name, bytes)) in photos().into_iter().enumerate().take(24) {
        let class = dir.join(format!("c{}", k % 3));
        std::fs::create_dir_all(&class).unwrap();
        std::fs::write(class.join(name), bytes).unwrap();
    }
    ImageFolder::open(dir).unwrap()
}

#[test]
fn batches_do_not_depend_on_the_thread_count_and_resume_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let folder = photo_folder(tmp.path());
    let n = folder.len();
    let mix = MixupConfig {
        mixup_alpha: 0.1,
        cutmix_alpha: 1.0,
        prob: 1.0,
        switch_prob: 0.5,
        mode: MixMode::Batch,
        label_smoothing: 0.1,
    };
    // 2 streams, repeated augmentation x2, micro-batches of 3.
    let sampler = StreamSampler::new(n, 2, SamplerKind::RepeatAug { num_repeats: 2 }, 5);
    let data =
        Arc::new(TrainData::new(folder, transform(48), Some(mix), 0.0, sampler, 3, 3, 5).unwrap());
    let spe = data.steps_per_epoch();
    assert!(spe >= 3, "{spe} steps");
    let run = |threads: usize, start: u64| -> Vec<_> {
        let mut sampler = data.rank_sampler(1, 0).unwrap();
        sampler.seek(SamplerPosition { epoch: 1, step: start }).unwrap();
        data.epoch_loader(&mut sampler, threads, 4).unwrap().map(|b| b.unwrap()).collect()
    };
    let one = run(1, 0);
    let three = run(3, 0);
    assert_eq!(one.len() as u64, spe * 2);
    for (a, b) in one.iter().zip(&three) {
        assert_eq!((a.step, a.stream), (b.step, b.stream));
        assert!(
            a.images == b.images && a.labels == b.labels && a.targets == b.targets,
            "step {} stream {}",
            a.step,
            a.stream
        );
    }
    let resumed = run(3, 2);
    assert_eq!(resumed.len(), one.len() - 4);
    for (a, b) in one[4..].iter().zip(&resumed) {
        assert!(a.images == b.images && a.targets == b.targets);
    }
}
