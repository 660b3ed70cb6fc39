//! Real broken and unusual files (Pillow 13's own test images, plus the few
//! cases its sdist lacks), each with a defined behaviour:
//!
//! | input | behaviour |
//! | --- | --- |
//! | any file Pillow's `convert('RGB')` decodes (progressive, grayscale, CMYK, EXIF-rotated, ICC, junk after SOI, 16-bit tables, > 50 MP) | decoded, equal to Pillow's pixels (EXIF orientation not applied, as in timm) |
//! | truncated, zero-byte, non-image, header over the pixel limit | decode error; training replaces the sample deterministically and counts it (each file logged once), evaluation skips and counts it |
//! | a PNG whose final `IEND` chunk is cut off (`truncated_end_chunk.png`) | Pillow decodes it, we are stricter: decode error, handled as above |
//! | empty class folder, label out of range | error before training, naming the folder / sample |
//! | a validation or eval folder whose classes differ from the training split's | error before training, naming the first class that differs |
//!
//! Fixtures: `tests/oracle/bad_images.py` (via `gen_fixtures.py`).

use rsb_data::dataset::{ImageFolder, Sample};
use rsb_data::decode::{decode_bytes, decode_file, decode_for_crop, probe};
use rsb_data::eval_sets::{EvalSet, EvalSetKind, EvalSetSpec};
use rsb_data::image::{Filter, RgbImage};
use rsb_data::mixup::{MixMode, MixupConfig};
use rsb_data::pipeline::{EvalData, TrainData};
use rsb_data::rand_augment::{RaInterpolation, RandAugment, RandAugmentConfig};
use rsb_data::sampler::{SamplerKind, StreamSampler};
use rsb_data::transforms::{CropBox, CropInterpolation, EvalTransform, TrainTransform};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn fixtures() -> PathBuf {
    rsb_test_support::fixtures("bad_images")
}

fn manifest() -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(fixtures().join("manifest.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["files"].as_array().unwrap().clone()
}

fn read_npy(path: &Path) -> RgbImage {
    let bytes = std::fs::read(path).unwrap();
    let npy = npyz::NpyFile::new(&bytes[..]).unwrap();
    let shape = npy.shape().to_vec();
    let data: Vec<u8> = npy.into_vec().unwrap();
    RgbImage::new(shape[1] as u32, shape[0] as u32, data)
}

/// Files Pillow decodes and we refuse (the `image` crate's PNG decoder wants
/// the end chunk Pillow does not read).
const STRICTER_THAN_PILLOW: &[&str] = &["truncated_end_chunk.png"];

#[test]
fn every_file_decodes_as_pillow_or_fails_as_pillow() {
    let dir = fixtures().join("files");
    let files = manifest();
    assert!(files.len() >= 50, "{} files", files.len());
    let mut seen = std::collections::HashSet::new();
    for f in &files {
        let name = f["file"].as_str().unwrap();
        let ours = decode_file(&dir.join(name));
        if !f["ok"].as_bool().unwrap() {
            let err = ours
                .err()
                .unwrap_or_else(|| panic!("{name}: Pillow fails ({}), we decode", f["error"]));
            assert!(err.to_string().contains(name), "{name}: the error names the file: {err}");
            seen.insert("pillow_fails");
            continue;
        }
        if STRICTER_THAN_PILLOW.contains(&name) {
            let err = ours.err().unwrap_or_else(|| panic!("{name}: expected to be refused"));
            assert!(err.to_string().contains(name), "{err}");
            continue;
        }
        let ours = ours
            .unwrap_or_else(|e| panic!("{name}: Pillow decodes it ({}), we fail: {e}", f["mode"]));
        let size = f["size"].as_array().unwrap();
        assert_eq!(
            (u64::from(ours.width), u64::from(ours.height)),
            (size[0].as_u64().unwrap(), size[1].as_u64().unwrap()),
            "{name}: size"
        );
        let (want, got) = if f["pixels"].as_bool().unwrap() {
            (read_npy(&dir.join(format!("{name}.rgb.npy"))), ours)
        } else {
            let want = read_npy(&dir.join(format!("{name}.grid64.npy")));
            let mut data = Vec::new();
            for y in (0..ours.height).step_by(64) {
                for x in (0..ours.width).step_by(64) {
                    data.extend_from_slice(&ours.pixel(x, y));
                }
            }
            (want, RgbImage::new(ours.width.div_ceil(64), ours.height.div_ceil(64), data))
        };
        let differing = want.data.iter().zip(&got.data).filter(|(a, b)| a != b).count();
        let max = want.data.iter().zip(&got.data).map(|(a, b)| a.abs_diff(*b)).max().unwrap_or(0);
        if name.ends_with(".png") {
            assert_eq!(differing, 0, "{name}: PNG decoding must equal Pillow's");
        } else {
            // Same library (libjpeg-turbo), same settings: the same pixels.
            assert!(
                differing == 0,
                "{name} ({}): {differing} values differ from Pillow's (max {max})",
                f["mode"]
            );
        }
        match f["mode"].as_str().unwrap() {
            "CMYK" => seen.insert("cmyk"),
            "L" => seen.insert("grayscale"),
            _ => false,
        };
        if f["progressive"].as_bool().unwrap_or(false) {
            seen.insert("progressive");
        }
        if f["orientation"].as_u64().is_some_and(|o| o > 1) {
            seen.insert("exif_rotated");
        }
        if ours_is_huge(f) {
            seen.insert("huge");
        }
    }
    for kind in ["pillow_fails", "cmyk", "grayscale", "progressive", "exif_rotated", "huge"] {
        assert!(seen.contains(kind), "the fixture has no {kind} file");
    }
}

fn ours_is_huge(f: &serde_json::Value) -> bool {
    let s = f["size"].as_array().unwrap();
    s[0].as_u64().unwrap() * s[1].as_u64().unwrap() > 50_000_000
}

#[test]
fn specific_bad_files_fail_with_a_reason() {
    let dir = fixtures().join("files");
    let cases = [
        ("truncated_jpeg.jpg", "truncated"),
        ("zero_bytes.JPEG", "empty"),
        ("not_an_image.JPEG", ""),
        ("bomb_200mp.jpg", "pixel limit"),
        ("truncated_image.png", ""),
    ];
    for (name, reason) in cases {
        let err = decode_file(&dir.join(name)).unwrap_err().to_string();
        assert!(err.contains(name) && err.contains(reason), "{name}: {err}");
    }
    // The bomb is refused from its header, before any allocation.
    let bytes = std::fs::read(dir.join("bomb_200mp.jpg")).unwrap();
    assert!(probe(&bytes).unwrap_err().to_string().contains("20000x10000"));
}

#[test]
fn huge_photo_decodes_scaled_for_training() {
    let bytes = std::fs::read(fixtures().join("files/huge_50mp.jpg")).unwrap();
    let info = probe(&bytes).unwrap();
    assert_eq!((info.width, info.height), (8200, 6200));
    let crop = CropBox { top: 100, left: 300, height: 6000, width: 7000 };
    let src = decode_for_crop(&bytes, &info, crop, 224, 224, true).unwrap();
    assert_eq!(src.denom, 8, "a 7000x6000 crop for 224 px decodes at 1/8");
    assert!(src.image.width <= 8200 / 8 + 32 && src.image.height <= 6200 / 8 + 48);
    let unscaled = decode_for_crop(&bytes, &info, crop, 224, 224, false).unwrap();
    assert_eq!(unscaled.denom, 1);
    assert_eq!((unscaled.region.width, unscaled.region.height), (7000, 6000));
    assert!(decode_bytes(&bytes).is_ok());
}

fn transform() -> TrainTransform {
    let ra = RandAugmentConfig::parse("rand-m7-mstd0.5-inc1").unwrap();
    TrainTransform {
        size: 64,
        scale: [0.08, 1.0],
        ratio: [0.75, 4.0 / 3.0],
        interpolation: CropInterpolation::Random,
        hflip: 0.5,
        rand_augment: Some(RandAugment::new(ra, [124, 116, 104], RaInterpolation::Random)),
    }
}

/// A two-class folder: class `a` holds good photos, class `b` good and broken ones.
fn mixed_folder(dir: &Path) -> (ImageFolder, Vec<&'static str>) {
    let files = fixtures().join("files");
    let good = [
        "hopper.jpg",
        "pil_sample_cmyk.jpg",
        "hopper_gray.jpg",
        "hopper_orientation_6.jpg",
        "flower.jpg",
    ];
    let bad = vec!["truncated_jpeg.jpg", "zero_bytes.JPEG", "not_an_image.JPEG"];
    for (class, names) in [("a", good.to_vec()), ("b", [&good[..2], &bad[..]].concat())] {
        std::fs::create_dir_all(dir.join(class)).unwrap();
        for n in names {
            std::fs::copy(files.join(n), dir.join(class).join(n)).unwrap();
        }
    }
    (ImageFolder::open(dir).unwrap(), bad)
}

#[test]
fn training_replaces_and_counts_bad_files_and_evaluation_skips_them() {
    let tmp = tempfile::tempdir().unwrap();
    let (folder, bad) = mixed_folder(tmp.path());
    let n = folder.len();
    let sampler = StreamSampler::new(n, 1, SamplerKind::Distributed, 3);
    let mix = MixupConfig {
        mixup_alpha: 0.1,
        cutmix_alpha: 1.0,
        prob: 1.0,
        switch_prob: 0.5,
        mode: MixMode::Batch,
        label_smoothing: 0.0,
    };
    let data = Arc::new(
        TrainData::new(folder.clone(), transform(), Some(mix), 0.0, sampler, n, 2, 3).unwrap(),
    );
    let batches: Vec<_> = data
        .epoch_loader(&mut data.rank_sampler(1, 0).unwrap(), 2, 2)
        .unwrap()
        .map(|b| b.unwrap())
        .collect();
    assert_eq!(batches.len(), 1);
    assert_eq!(batches[0].len, n, "every position is filled");
    let bad_files = data.bad_files();
    // Each bad position is replaced (a replacement may itself be bad and be replaced again).
    assert!(bad_files.replacements() >= bad.len() as u64, "{}", bad_files.replacements());
    let listed: Vec<String> = bad_files.list().into_iter().map(|(f, _)| f).collect();
    for b in &bad {
        assert!(listed.iter().any(|f| f.ends_with(b)), "{b} not recorded: {listed:?}");
    }
    // Deterministic: the same batch again, whatever was learned about bad files.
    let again: Vec<_> = data
        .epoch_loader(&mut data.rank_sampler(1, 0).unwrap(), 1, 1)
        .unwrap()
        .map(|b| b.unwrap())
        .collect();
    assert_eq!(again[0].images, batches[0].images);
    assert_eq!(again[0].labels, batches[0].labels);
    assert_eq!(bad_files.distinct(), bad.len(), "each file logged once");

    let eval = Arc::new(EvalData::new(folder, EvalTransform::new(32, 0.95, Filter::Bicubic), 4));
    let got: usize = eval.loader(2, 2).map(|b| b.unwrap().len).sum();
    assert_eq!(got, n - bad.len());
    assert_eq!(eval.bad_files().replacements(), bad.len() as u64);
}

#[test]
fn a_file_that_could_not_be_read_is_read_again_at_its_next_use() {
    let tmp = tempfile::tempdir().unwrap();
    let files = fixtures().join("files");
    for class in ["a", "b"] {
        std::fs::create_dir_all(tmp.path().join(class)).unwrap();
        std::fs::copy(files.join("hopper.jpg"), tmp.path().join(class).join("hopper.jpg")).unwrap();
    }
    // Unreadable for now (a link to a file not there yet): a passing fault,
    // as a network file system's timeout.
    let target = tmp.path().join("arrives-later.jpg");
    std::os::unix::fs::symlink(&target, tmp.path().join("b").join("flower.jpg")).unwrap();
    let folder = ImageFolder::open(tmp.path()).unwrap();
    let flower = folder.samples().iter().position(|s| s.display().ends_with("flower.jpg"));
    let flower = flower.expect("the link is a sample");
    let n = folder.len();
    let sampler = StreamSampler::new(n, 1, SamplerKind::Distributed, 0);
    let data = Arc::new(TrainData::new(folder, transform(), None, 0.0, sampler, n, 2, 0).unwrap());
    let labels_of = |data: &Arc<TrainData>| {
        let batch = data.epoch_loader(&mut data.rank_sampler(1, 0).unwrap(), 1, 1).unwrap();
        let batches: Vec<_> = batch.map(|b| b.unwrap()).collect();
        (batches[0].labels.clone(), batches[0].images.clone())
    };
    let unread = labels_of(&data);
    let replaced = data.bad_files().replacements();
    assert!(replaced >= 1, "the unreadable file was not replaced");
    std::fs::copy(files.join("flower.jpg"), &target).unwrap();
    let read = labels_of(&data);
    assert_eq!(data.bad_files().replacements(), replaced, "the file, readable now, was replaced");
    assert_ne!(unread, read, "the same samples as when the file was unreadable");
    // The same batch as a fresh run over the readable folder makes.
    let fresh = ImageFolder::open(tmp.path()).unwrap();
    assert!(fresh.samples()[flower].display().ends_with("flower.jpg"));
    let sampler = StreamSampler::new(n, 1, SamplerKind::Distributed, 0);
    let fresh = Arc::new(TrainData::new(fresh, transform(), None, 0.0, sampler, n, 2, 0).unwrap());
    assert_eq!(labels_of(&fresh), read);
}

#[test]
fn all_bad_files_stop_training_with_an_error_not_a_hang() {
    let tmp = tempfile::tempdir().unwrap();
    let files = fixtures().join("files");
    for class in ["a", "b"] {
        std::fs::create_dir_all(tmp.path().join(class)).unwrap();
        for n in ["truncated_jpeg.jpg", "zero_bytes.JPEG"] {
            std::fs::copy(files.join(n), tmp.path().join(class).join(n)).unwrap();
        }
    }
    let folder = ImageFolder::open(tmp.path()).unwrap();
    let sampler = StreamSampler::new(4, 1, SamplerKind::Distributed, 0);
    let data = Arc::new(TrainData::new(folder, transform(), None, 0.0, sampler, 2, 2, 0).unwrap());
    let err = data
        .epoch_loader(&mut data.rank_sampler(1, 0).unwrap(), 2, 2)
        .unwrap()
        .next()
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(err.contains("undecodable images in a row"), "{err}");
}

#[test]
fn empty_class_folders_and_out_of_range_labels_fail_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, _) = mixed_folder(tmp.path());
    std::fs::create_dir_all(tmp.path().join("c_empty")).unwrap();
    let err = ImageFolder::open(tmp.path()).unwrap_err().to_string();
    assert!(err.contains("c_empty") && err.contains("no image"), "{err}");

    // A flat folder whose label file uses class index 7 for a 3-class model.
    let flat = tmp.path().join("flat");
    std::fs::create_dir_all(&flat).unwrap();
    std::fs::copy(fixtures().join("files/hopper.jpg"), flat.join("x.jpg")).unwrap();
    std::fs::copy(fixtures().join("files/flower.jpg"), flat.join("y.jpg")).unwrap();
    let labels = tmp.path().join("labels.txt");
    std::fs::write(&labels, "x.jpg\t0\ny.jpg\t7\n").unwrap();
    let folder = ImageFolder::open_flat(&flat, &labels, None).unwrap();
    let sampler = StreamSampler::new(2, 1, SamplerKind::Distributed, 0);
    let err =
        TrainData::new(folder, transform(), None, 0.0, sampler, 1, 3, 0).unwrap_err().to_string();
    assert!(err.contains("label 7") && err.contains("y.jpg") && err.contains("3 classes"), "{err}");

    // A label file naming an image that does not exist.
    std::fs::write(&labels, "x.jpg\t0\ny.jpg\t1\nz.jpg\t1\n").unwrap();
    let err = ImageFolder::open_flat(&flat, &labels, None).unwrap_err().to_string();
    assert!(err.contains("z.jpg"), "{err}");
}

#[test]
fn a_validation_folder_with_other_classes_than_training_is_refused_naming_the_class() {
    let tmp = tempfile::tempdir().unwrap();
    let photo = fixtures().join("files/hopper.jpg");
    let split = |name: &str, classes: &[&str]| {
        let root = tmp.path().join(name);
        for class in classes {
            std::fs::create_dir_all(root.join(class)).unwrap();
            std::fs::copy(&photo, root.join(class).join("a.jpg")).unwrap();
        }
        ImageFolder::open(&root).unwrap()
    };
    let train = split("train", &["n01", "n02", "n03"]);
    train.check_same_classes(train.classes()).unwrap();
    // One class folder missing: every later label would shift by one.
    let missing = split("val_missing", &["n01", "n03"]);
    let err = missing.check_same_classes(train.classes()).unwrap_err().to_string();
    assert!(
        err.contains("val_missing") && err.contains("class 1 is `n03`") && err.contains("`n02`"),
        "{err}"
    );
    // The same names but one short, or one more.
    let short = split("val_short", &["n01", "n02"]);
    let err = short.check_same_classes(train.classes()).unwrap_err().to_string();
    assert!(err.contains("2 classes here but 3") && err.contains("`n03`"), "{err}");
    let long = split("val_long", &["n01", "n02", "n03", "n04"]);
    let err = long.check_same_classes(train.classes()).unwrap_err().to_string();
    assert!(err.contains("4 classes here but 3") && err.contains("`n04`"), "{err}");
    // A class-folder evaluation set is held to the same, and named.
    let spec = EvalSetSpec {
        name: "val_missing".into(),
        kind: EvalSetKind::Folder,
        root: tmp.path().join("val_missing"),
        labels: None,
    };
    let transform = EvalTransform::new(32, 0.95, Filter::Bicubic);
    let err = EvalSet::open(&spec, transform, 2, 3, Some(train.classes())).unwrap_err().to_string();
    assert!(err.contains("eval set `val_missing`") && err.contains("`n03`"), "{err}");
    let same = EvalSetSpec { root: tmp.path().join("train"), ..spec };
    EvalSet::open(&same, transform, 2, 3, Some(train.classes())).unwrap();
}

#[test]
fn samples_display_their_file() {
    let s = Sample::file("/d/x/ILSVRC2012_val_00000001.JPEG".into(), 3);
    assert_eq!(s.file_name(), "ILSVRC2012_val_00000001.JPEG");
    assert_eq!(s.display(), "/d/x/ILSVRC2012_val_00000001.JPEG");
}
