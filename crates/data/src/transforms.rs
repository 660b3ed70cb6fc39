//! timm's per-image transforms: the training chain
//! (RandomResizedCrop -> horizontal flip -> RandAugment) and the evaluation
//! chain (resize the shorter side to `floor(size / crop_pct)`, centre crop).
//! Normalisation happens later, on the batch tensor, as timm's prefetcher does
//! (or in the loader threads, see [`crate::pipeline::normalize_nchw`]).
//!
//! [`TrainTransform::apply_encoded`] is the loader's fast path: it reads the
//! image header, draws the crop, decodes only what the crop needs
//! ([`crate::decode::decode_for_crop`]), resizes straight from the decoded
//! region and flips in place; with DCT scaling off its output equals
//! [`TrainTransform::apply`] on the fully decoded image.

use crate::decode::{decode_for_crop, probe, MAX_PIXELS};
use crate::error::DecodeError;
use crate::image::resize::{crop, resize, resize_region, resize_region_box, Region};
use crate::image::{Filter, RgbImage};
use crate::rand_augment::RandAugment;
use crate::rng::Rng;

/// Filter choice of the random crop: fixed, or timm's `random`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CropInterpolation {
    /// Always this filter.
    Fixed(Filter),
    /// Bilinear or bicubic, uniformly per image.
    Random,
}

/// A crop rectangle in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropBox {
    /// First row.
    pub top: u32,
    /// First column.
    pub left: u32,
    /// Rows.
    pub height: u32,
    /// Columns.
    pub width: u32,
}

/// Python's `round()` (halves to even), which torchvision and timm use.
pub fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 {
        2.0 * (x / 2.0).round()
    } else {
        r
    }
}

/// `RandomResizedCropAndInterpolation.get_params` of timm 1.0.31: up to ten
/// draws of (area fraction, log aspect ratio); the first crop that fits wins,
/// else a centre crop clamped to the ratio range.
pub fn random_resized_crop_box(
    width: u32,
    height: u32,
    scale: [f64; 2],
    ratio: [f64; 2],
    rng: &mut Rng,
) -> CropBox {
    let area = f64::from(width) * f64::from(height);
    let log_ratio = [ratio[0].ln(), ratio[1].ln()];
    for _ in 0..10 {
        let target_area = rng.uniform_range(scale[0], scale[1]) * area;
        let aspect = rng.uniform_range(log_ratio[0], log_ratio[1]).exp();
        let w = round_half_even((target_area * aspect).sqrt());
        let h = round_half_even((target_area / aspect).sqrt());
        // timm accepts w or h of 0 (and PIL then fails); a crop needs a pixel.
        if w >= 1.0 && h >= 1.0 && w <= f64::from(width) && h <= f64::from(height) {
            let (w, h) = (w as u32, h as u32);
            let top = rng.int_inclusive(0, i64::from(height - h)) as u32;
            let left = rng.int_inclusive(0, i64::from(width - w)) as u32;
            return CropBox { top, left, height: h, width: w };
        }
    }
    let in_ratio = f64::from(width) / f64::from(height);
    let (min_ratio, max_ratio) = (ratio[0].min(ratio[1]), ratio[0].max(ratio[1]));
    let (w, h) = if in_ratio < min_ratio {
        (width, (round_half_even(f64::from(width) / min_ratio) as u32).max(1))
    } else if in_ratio > max_ratio {
        ((round_half_even(f64::from(height) * max_ratio) as u32).max(1), height)
    } else {
        (width, height)
    };
    CropBox { top: (height - h) / 2, left: (width - w) / 2, height: h, width: w }
}

/// Mirrors an image left to right in place.
pub fn flip_horizontal_in_place(img: &mut RgbImage) {
    let row = img.width as usize * 3;
    if row == 0 {
        return;
    }
    for line in img.data.chunks_exact_mut(row) {
        let w = line.len() / 3;
        for x in 0..w / 2 {
            let (a, b) = (x * 3, (w - 1 - x) * 3);
            for c in 0..3 {
                line.swap(a + c, b + c);
            }
        }
    }
}

/// Mirrors an image left to right.
pub fn flip_horizontal(img: &RgbImage) -> RgbImage {
    let row = img.width as usize * 3;
    let mut data = Vec::with_capacity(img.data.len());
    for line in img.data.chunks_exact(row) {
        for px in line.chunks_exact(3).rev() {
            data.extend_from_slice(px);
        }
    }
    RgbImage::new(img.width, img.height, data)
}

/// The training chain of timm's `transforms_imagenet_train` (no colour jitter,
/// no random erasing: RSB disables both).
#[derive(Debug, Clone)]
pub struct TrainTransform {
    /// Output side in pixels.
    pub size: u32,
    /// Area fraction range of the crop.
    pub scale: [f64; 2],
    /// Aspect-ratio range of the crop.
    pub ratio: [f64; 2],
    /// Filter of the crop's resize.
    pub interpolation: CropInterpolation,
    /// Flip probability.
    pub hflip: f64,
    /// RandAugment, if on.
    pub rand_augment: Option<RandAugment>,
}

impl TrainTransform {
    fn draw_filter(&self, rng: &mut Rng) -> Filter {
        match self.interpolation {
            CropInterpolation::Fixed(f) => f,
            CropInterpolation::Random => {
                if rng.below(2) == 0 {
                    Filter::Bilinear
                } else {
                    Filter::Bicubic
                }
            }
        }
    }

    /// Flip and RandAugment of an already cropped image.
    fn finish(&self, mut out: RgbImage, rng: &mut Rng) -> RgbImage {
        if rng.bernoulli(self.hflip) {
            flip_horizontal_in_place(&mut out);
        }
        match &self.rand_augment {
            Some(ra) => ra.apply(&out, rng),
            None => out,
        }
    }

    /// Augments one decoded image with draws from `rng`.
    pub fn apply(&self, img: &RgbImage, rng: &mut Rng) -> RgbImage {
        let b = random_resized_crop_box(img.width, img.height, self.scale, self.ratio, rng);
        let filter = self.draw_filter(rng);
        let region = Region { left: b.left, top: b.top, width: b.width, height: b.height };
        let out = resize_region(img, region, self.size, self.size, filter);
        self.finish(out, rng)
    }

    /// Augments one encoded image (JPEG or PNG bytes): the same draws from
    /// `rng` as [`TrainTransform::apply`], but only the part of the file the
    /// crop needs is decoded. With `scaled_decode`, a JPEG crop much larger
    /// than the output is decoded at a DCT scale of 1/2, 1/4 or 1/8 (see
    /// [`crate::decode::decode_for_crop`]); without it the result equals
    /// `apply` on the full decode, pixel for pixel.
    pub fn apply_encoded(
        &self,
        bytes: &[u8],
        rng: &mut Rng,
        scaled_decode: bool,
    ) -> Result<RgbImage, DecodeError> {
        let info = probe(bytes)?;
        let b = random_resized_crop_box(info.width, info.height, self.scale, self.ratio, rng);
        let filter = self.draw_filter(rng);
        let src = decode_for_crop(bytes, &info, b, self.size, self.size, scaled_decode)?;
        let out = resize_region_box(&src.image, src.region, src.bx, self.size, self.size, filter);
        Ok(self.finish(out, rng))
    }
}

/// The evaluation chain of timm's `transforms_imagenet_eval` (crop mode `center`).
#[derive(Debug, Clone, Copy)]
pub struct EvalTransform {
    /// Output side in pixels.
    pub size: u32,
    /// Shorter side after the resize: `floor(size / crop_pct)`.
    pub resize_to: u32,
    /// Filter of the resize.
    pub filter: Filter,
}

impl EvalTransform {
    /// Builds the chain for a crop of `size` keeping `crop_pct` of the resized image.
    pub fn new(size: u32, crop_pct: f64, filter: Filter) -> EvalTransform {
        let resize_to = (f64::from(size) / crop_pct).floor() as u32;
        EvalTransform { size, resize_to: resize_to.max(size), filter }
    }

    /// torchvision `Resize(resize_to)` (shorter side, longer side truncated)
    /// then `CenterCrop(size)` (offsets rounded half to even). An image so
    /// elongated that the resized one would exceed [`MAX_PIXELS`] (a
    /// 65000x1 strip) is refused, as its decoding would be.
    pub fn apply(&self, img: &RgbImage) -> Result<RgbImage, DecodeError> {
        let (w, h) = (u64::from(img.width), u64::from(img.height));
        let short = u64::from(self.resize_to);
        let (new_w, new_h) = if w <= h { (short, short * h / w) } else { (short * w / h, short) };
        if new_w.saturating_mul(new_h) > MAX_PIXELS {
            return Err(DecodeError::ResizedTooLarge {
                width: img.width,
                height: img.height,
                short: self.resize_to,
                resized_width: new_w,
                resized_height: new_h,
                limit: MAX_PIXELS,
            });
        }
        // Both sides fit in u32: their product is at most MAX_PIXELS.
        let resized = resize(img, new_w as u32, new_h as u32, self.filter);
        let size = self.size.min(resized.width).min(resized.height);
        let top = round_half_even(f64::from(resized.height - size) / 2.0) as u32;
        let left = round_half_even(f64::from(resized.width - size) / 2.0) as u32;
        Ok(crop(&resized, left, top, size, size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_rounding() {
        assert_eq!(round_half_even(2.5), 2.0);
        assert_eq!(round_half_even(3.5), 4.0);
        assert_eq!(round_half_even(2.4999), 2.0);
        assert_eq!(round_half_even(-1.5), -2.0);
    }

    #[test]
    fn crop_boxes_stay_inside_and_cover_the_scale_range() {
        let mut rng = Rng::from_key(&[3]);
        let mut areas = Vec::new();
        for _ in 0..2000 {
            let b = random_resized_crop_box(500, 375, [0.08, 1.0], [0.75, 4.0 / 3.0], &mut rng);
            assert!(b.width >= 1 && b.height >= 1);
            assert!(b.left + b.width <= 500 && b.top + b.height <= 375);
            areas.push(f64::from(b.width * b.height) / (500.0 * 375.0));
        }
        let min = areas.iter().cloned().fold(1.0, f64::min);
        let max = areas.iter().cloned().fold(0.0, f64::max);
        assert!(min < 0.1 && max > 0.9, "{min} {max}");
    }

    #[test]
    fn fallback_is_a_centre_crop_clamped_to_the_ratio() {
        // A 1000x10 strip: no random crop with ratio <= 4/3 fits, so the centre fallback runs.
        let mut rng = Rng::from_key(&[1]);
        let b = random_resized_crop_box(1000, 10, [0.9, 1.0], [0.75, 4.0 / 3.0], &mut rng);
        assert_eq!((b.width, b.height), (13, 10));
        assert_eq!(b.left, (1000 - 13) / 2);
    }

    #[test]
    fn flip_mirrors_rows() {
        let img = RgbImage::new(2, 1, vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(flip_horizontal(&img).data, vec![4, 5, 6, 1, 2, 3]);
        let mut odd = RgbImage::new(3, 2, (0..18).collect());
        let want = flip_horizontal(&odd);
        flip_horizontal_in_place(&mut odd);
        assert_eq!(odd, want);
    }

    #[test]
    fn eval_resize_size_follows_timm() {
        let t = EvalTransform::new(224, 0.95, Filter::Bicubic);
        assert_eq!(t.resize_to, 235);
        let t = EvalTransform::new(32, 0.95, Filter::Bicubic);
        assert_eq!(t.resize_to, 33);
        let img = RgbImage::filled(500, 375, [9, 8, 7]);
        let out = EvalTransform::new(224, 0.95, Filter::Bicubic).apply(&img).unwrap();
        assert_eq!((out.width, out.height), (224, 224));
        assert_eq!(out.pixel(100, 100), [9, 8, 7]);
    }

    #[test]
    fn an_image_too_elongated_to_resize_for_evaluation_is_refused_not_allocated() {
        // 40000x1: its shorter side to 235 px would make 9.4 M x 235 pixels.
        let strip = RgbImage::filled(40_000, 1, [1, 2, 3]);
        let error = EvalTransform::new(224, 0.95, Filter::Bicubic).apply(&strip).unwrap_err();
        assert_eq!(
            error.to_string(),
            "40000x1: resizing its shorter side to 235 gives 9400000x235, over the \
             178956970-pixel limit"
        );
        let tall = RgbImage::filled(1, 40_000, [1, 2, 3]);
        assert!(EvalTransform::new(224, 0.95, Filter::Bicubic).apply(&tall).is_err());
    }
}
