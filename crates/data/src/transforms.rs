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
//!
//! The crop box, its filter and the flip are drawn by one private decision
//! function, driven either by our [`Rng`] or by draws recorded from timm
//! ([`CropDraw`]): [`TrainTransform::crop_and_flip_replayed`] runs it on
//! timm's own draws so that the parity test can compare box, filter, flip and
//! pixels with timm's (RandAugment has its own replay,
//! [`RandAugment::apply_replayed`]).

use crate::decode::{decode_for_crop, probe, MAX_PIXELS};
use crate::error::DecodeError;
use crate::image::resize::{crop, resize, resize_region, resize_region_box, Region};
use crate::image::{Filter, RgbImage};
use crate::rand_augment::RandAugment;
use crate::replay::{Replay, ReplayError};
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
///
/// One deliberate deviation: timm accepts a crop `w` or `h` of 0 (rounded
/// from a tiny area), which PIL then fails to resize; here such an attempt
/// does not fit, and the fallback's clamped side is at least 1.
pub fn random_resized_crop_box(
    width: u32,
    height: u32,
    scale: [f64; 2],
    ratio: [f64; 2],
    rng: &mut Rng,
) -> CropBox {
    crop_box_with(width, height, scale, ratio, rng)
}

/// [`random_resized_crop_box`] on any source of draws (ours or timm's).
fn crop_box_with(
    width: u32,
    height: u32,
    scale: [f64; 2],
    ratio: [f64; 2],
    draws: &mut impl CropDraws,
) -> CropBox {
    let area = f64::from(width) * f64::from(height);
    let log_ratio = [ratio[0].ln(), ratio[1].ln()];
    for _ in 0..10 {
        let target_area = draws.uniform_range(scale[0], scale[1]) * area;
        let aspect = draws.uniform_range(log_ratio[0], log_ratio[1]).exp();
        let w = round_half_even((target_area * aspect).sqrt());
        let h = round_half_even((target_area / aspect).sqrt());
        // timm accepts w or h of 0 (and PIL then fails); a crop needs a pixel.
        if w >= 1.0 && h >= 1.0 && w <= f64::from(width) && h <= f64::from(height) {
            let (w, h) = (w as u32, h as u32);
            let top = draws.int_inclusive(0, i64::from(height - h)) as u32;
            let left = draws.int_inclusive(0, i64::from(width - w)) as u32;
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

/// timm's `_RANDOM_INTERPOLATION`, in its order.
const RANDOM_INTERPOLATION: [Filter; 2] = [Filter::Bilinear, Filter::Bicubic];

/// One random draw of timm's crop and flip (`RandomResizedCropAndInterpolation`
/// then `RandomHorizontalFlip`), as recorded from Python, in call order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CropDraw {
    /// The value `random.uniform` returned (per attempt: the area fraction,
    /// then the log aspect ratio).
    Uniform(f64),
    /// The value `random.randint` returned: top, then left.
    RandInt(i64),
    /// `random.choice` over `_RANDOM_INTERPOLATION` (bilinear, bicubic): the index.
    InterpolationChoice(usize),
    /// `torch.rand(1)` of `RandomHorizontalFlip`: below `hflip` flips.
    FlipRand(f64),
}

/// What the crop and flip decided for one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropDecision {
    /// The crop box in the input image.
    pub crop: CropBox,
    /// The filter of the crop's resize.
    pub filter: Filter,
    /// Whether the resized crop was mirrored.
    pub flipped: bool,
}

/// Why a recorded crop-and-flip plan could not be replayed.
pub type CropReplayError = ReplayError<CropDraw>;

/// Where the crop's and flip's random decisions come from: our [`Rng`], or
/// a plan of draws recorded from timm. One method per kind of draw timm makes.
trait CropDraws {
    /// Uniform in `[lo, hi)` (`random.uniform`).
    fn uniform_range(&mut self, lo: f64, hi: f64) -> f64;
    /// Uniform integer in `[lo, hi]` (`random.randint`).
    fn int_inclusive(&mut self, lo: i64, hi: i64) -> i64;
    /// An interpolation index in `[0, len)` (`random.choice`).
    fn interpolation_index(&mut self, len: usize) -> usize;
    /// Uniform in `[0, 1)` (`torch.rand(1)` of the flip).
    fn flip_uniform(&mut self) -> f64;
}

impl CropDraws for Rng {
    fn uniform_range(&mut self, lo: f64, hi: f64) -> f64 {
        Rng::uniform_range(self, lo, hi)
    }

    fn int_inclusive(&mut self, lo: i64, hi: i64) -> i64 {
        Rng::int_inclusive(self, lo, hi)
    }

    fn interpolation_index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }

    fn flip_uniform(&mut self) -> f64 {
        self.uniform()
    }
}

impl CropDraws for Replay<'_, CropDraw> {
    fn uniform_range(&mut self, _lo: f64, _hi: f64) -> f64 {
        self.take("uniform", |d| match d {
            CropDraw::Uniform(v) => Some(v),
            _ => None,
        })
        .unwrap_or(0.0)
    }

    fn int_inclusive(&mut self, lo: i64, hi: i64) -> i64 {
        let draw = self.take("randint", |d| match d {
            CropDraw::RandInt(v) => Some(v),
            _ => None,
        });
        self.int_in(lo, hi, draw)
    }

    fn interpolation_index(&mut self, len: usize) -> usize {
        let draw = self.take("interpolation choice", |d| match d {
            CropDraw::InterpolationChoice(i) => Some(i),
            _ => None,
        });
        self.index(len, draw)
    }

    fn flip_uniform(&mut self) -> f64 {
        self.take("flip rand", |d| match d {
            CropDraw::FlipRand(v) => Some(v),
            _ => None,
        })
        .unwrap_or(1.0)
    }
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
    /// Flip probability (no flip, and no flip draw, when not above 0).
    pub hflip: f64,
    /// RandAugment, if on.
    pub rand_augment: Option<RandAugment>,
}

impl TrainTransform {
    /// The crop's and flip's decisions for a `width` x `height` image, in
    /// timm's draw order: the box, the filter (only when random), the flip
    /// (only when `hflip > 0`, as timm adds `RandomHorizontalFlip` only then).
    fn decide(&self, width: u32, height: u32, draws: &mut impl CropDraws) -> CropDecision {
        let crop = crop_box_with(width, height, self.scale, self.ratio, draws);
        let filter = self.draw_filter(draws);
        let flipped = self.hflip > 0.0 && draws.flip_uniform() < self.hflip;
        CropDecision { crop, filter, flipped }
    }

    fn draw_filter(&self, draws: &mut impl CropDraws) -> Filter {
        match self.interpolation {
            CropInterpolation::Fixed(f) => f,
            CropInterpolation::Random => RANDOM_INTERPOLATION[draws.interpolation_index(2)],
        }
    }

    /// The resized crop of `img`, mirrored when the decision says so.
    fn crop_and_flip(&self, img: &RgbImage, decision: &CropDecision) -> RgbImage {
        let b = decision.crop;
        let region = Region { left: b.left, top: b.top, width: b.width, height: b.height };
        let mut out = resize_region(img, region, self.size, self.size, decision.filter);
        if decision.flipped {
            flip_horizontal_in_place(&mut out);
        }
        out
    }

    /// RandAugment of an already cropped and flipped image.
    fn finish(&self, out: RgbImage, rng: &mut Rng) -> RgbImage {
        match &self.rand_augment {
            Some(ra) => ra.apply(&out, rng),
            None => out,
        }
    }

    /// Augments one decoded image with draws from `rng`.
    pub fn apply(&self, img: &RgbImage, rng: &mut Rng) -> RgbImage {
        let decision = self.decide(img.width, img.height, rng);
        let out = self.crop_and_flip(img, &decision);
        self.finish(out, rng)
    }

    /// The crop, resize and flip of [`TrainTransform::apply`] (without
    /// RandAugment, which has its own replay) driven by draws recorded from
    /// timm's `RandomResizedCropAndInterpolation` and `RandomHorizontalFlip`
    /// (in the order timm makes them) instead of our [`Rng`]. Returns the
    /// image and the decisions. Fails if the plan does not hold the draw the
    /// next decision needs, holds an index or a `randint` value out of range,
    /// or has draws left over.
    pub fn crop_and_flip_replayed(
        &self,
        img: &RgbImage,
        plan: &[CropDraw],
    ) -> Result<(RgbImage, CropDecision), CropReplayError> {
        let mut replay = Replay::new(plan);
        let decision = self.decide(img.width, img.height, &mut replay);
        replay.finish()?;
        Ok((self.crop_and_flip(img, &decision), decision))
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
        let decision = self.decide(info.width, info.height, rng);
        let b = decision.crop;
        let src = decode_for_crop(bytes, &info, b, self.size, self.size, scaled_decode)?;
        let mut out = resize_region_box(
            &src.image,
            src.region,
            src.bx,
            self.size,
            self.size,
            decision.filter,
        );
        if decision.flipped {
            flip_horizontal_in_place(&mut out);
        }
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

    fn gradient(width: u32, height: u32) -> RgbImage {
        let data = (0..width * height)
            .flat_map(|i| [(i * 5 % 256) as u8, (i * 11 % 256) as u8, (i * 3 % 256) as u8])
            .collect();
        RgbImage::new(width, height, data)
    }

    fn train(interpolation: CropInterpolation, hflip: f64) -> TrainTransform {
        TrainTransform {
            size: 12,
            scale: [0.08, 1.0],
            ratio: [0.75, 4.0 / 3.0],
            interpolation,
            hflip,
            rand_augment: None,
        }
    }

    /// Our `Rng`, recording what it draws as a replay plan.
    struct Recorder {
        rng: Rng,
        plan: Vec<CropDraw>,
    }

    impl CropDraws for Recorder {
        fn uniform_range(&mut self, lo: f64, hi: f64) -> f64 {
            let v = CropDraws::uniform_range(&mut self.rng, lo, hi);
            self.plan.push(CropDraw::Uniform(v));
            v
        }
        fn int_inclusive(&mut self, lo: i64, hi: i64) -> i64 {
            let v = CropDraws::int_inclusive(&mut self.rng, lo, hi);
            self.plan.push(CropDraw::RandInt(v));
            v
        }
        fn interpolation_index(&mut self, len: usize) -> usize {
            let i = self.rng.interpolation_index(len);
            self.plan.push(CropDraw::InterpolationChoice(i));
            i
        }
        fn flip_uniform(&mut self) -> f64 {
            let v = self.rng.flip_uniform();
            self.plan.push(CropDraw::FlipRand(v));
            v
        }
    }

    #[test]
    fn seeded_crop_draws_are_the_ones_made_before_the_replay() {
        // The box, then `below(2)` for a random filter, then `bernoulli(hflip)`
        // (now skipped when hflip is 0, as timm makes no flip draw then).
        for key in 0..200 {
            for (interpolation, hflip) in [
                (CropInterpolation::Random, 0.5),
                (CropInterpolation::Fixed(Filter::Bicubic), 0.3),
                (CropInterpolation::Random, 0.0),
            ] {
                let mut old = Rng::from_key(&[key]);
                let crop =
                    random_resized_crop_box(57, 31, [0.08, 1.0], [0.75, 4.0 / 3.0], &mut old);
                let filter = match interpolation {
                    CropInterpolation::Fixed(f) => f,
                    CropInterpolation::Random if old.below(2) == 0 => Filter::Bilinear,
                    CropInterpolation::Random => Filter::Bicubic,
                };
                let flipped = hflip > 0.0 && old.bernoulli(hflip);
                let mut new = Rng::from_key(&[key]);
                let decision = train(interpolation, hflip).decide(57, 31, &mut new);
                assert_eq!(decision, CropDecision { crop, filter, flipped }, "{key}");
                assert_eq!(new, old, "{key}: the streams diverge after the crop");
            }
        }
    }

    #[test]
    fn replaying_our_own_draws_gives_our_output() {
        let mut seen = [0usize; 4]; // bilinear, bicubic, flipped, not flipped
        for (w, h) in [(37, 23), (9, 40), (64, 64), (120, 6)] {
            let img = gradient(w, h);
            for interpolation in [
                CropInterpolation::Random,
                CropInterpolation::Fixed(Filter::Bilinear),
                CropInterpolation::Fixed(Filter::Bicubic),
            ] {
                for hflip in [0.5, 0.0, 1.0] {
                    let t = train(interpolation, hflip);
                    for key in 0..40 {
                        let mut recorder =
                            Recorder { rng: Rng::from_key(&[key, u64::from(w)]), plan: Vec::new() };
                        let decision = t.decide(w, h, &mut recorder);
                        let recorded = t.crop_and_flip(&img, &decision);
                        let ours = t.apply(&img, &mut Rng::from_key(&[key, u64::from(w)]));
                        assert_eq!(recorded, ours, "{w}x{h} {interpolation:?} {hflip} {key}");
                        let (replayed, replayed_decision) =
                            t.crop_and_flip_replayed(&img, &recorder.plan).unwrap();
                        assert_eq!(replayed, ours, "{w}x{h} {interpolation:?} {hflip} {key}");
                        assert_eq!(replayed_decision, decision);
                        seen[usize::from(decision.filter == Filter::Bicubic)] += 1;
                        seen[2 + usize::from(!decision.flipped)] += 1;
                    }
                }
            }
        }
        assert!(seen.iter().all(|&n| n > 0), "{seen:?}");
    }

    #[test]
    fn replay_takes_the_planned_box_filter_and_flip() {
        let img = gradient(10, 10);
        let t = train(CropInterpolation::Random, 0.5);
        // Area 0.25 * 100 at aspect e^0 = 1: a 5x5 box at top 1, left 2.
        let plan = |flip: f64| {
            [
                CropDraw::Uniform(0.25),
                CropDraw::Uniform(0.0),
                CropDraw::RandInt(1),
                CropDraw::RandInt(2),
                CropDraw::InterpolationChoice(1),
                CropDraw::FlipRand(flip),
            ]
        };
        let crop = CropBox { top: 1, left: 2, height: 5, width: 5 };
        let (out, decision) = t.crop_and_flip_replayed(&img, &plan(0.3)).unwrap();
        assert_eq!(decision, CropDecision { crop, filter: Filter::Bicubic, flipped: true });
        let region = Region { left: 2, top: 1, width: 5, height: 5 };
        assert_eq!(out, flip_horizontal(&resize_region(&img, region, 12, 12, Filter::Bicubic)));
        // torch.rand(1) < p flips: a draw equal to p does not.
        let (_, decision) = t.crop_and_flip_replayed(&img, &plan(0.5)).unwrap();
        assert!(!decision.flipped);
        // Ten attempts that do not fit (area 1, aspect e^0.5: 13x8 > 10x10),
        // then the whole-image fallback (10x10 is inside the ratio range).
        let mut plan: Vec<CropDraw> =
            (0..10).flat_map(|_| [CropDraw::Uniform(1.0), CropDraw::Uniform(0.5)]).collect();
        plan.extend([CropDraw::InterpolationChoice(0), CropDraw::FlipRand(0.9)]);
        let (_, decision) = t.crop_and_flip_replayed(&img, &plan).unwrap();
        let whole = CropBox { top: 0, left: 0, height: 10, width: 10 };
        assert_eq!(
            decision,
            CropDecision { crop: whole, filter: Filter::Bilinear, flipped: false }
        );
    }

    #[test]
    fn replay_refuses_plans_that_do_not_fit() {
        let img = gradient(10, 10);
        let t = train(CropInterpolation::Random, 0.5);
        let good = [
            CropDraw::Uniform(0.25),
            CropDraw::Uniform(0.0),
            CropDraw::RandInt(1),
            CropDraw::RandInt(2),
            CropDraw::InterpolationChoice(1),
            CropDraw::FlipRand(0.3),
        ];
        let with = |i: usize, d: CropDraw| {
            let mut plan = good.to_vec();
            plan[i] = d;
            plan
        };
        assert_eq!(
            t.crop_and_flip_replayed(&img, &with(0, CropDraw::RandInt(0))).unwrap_err(),
            CropReplayError::Mismatch {
                position: 0,
                needed: "uniform",
                found: Some(CropDraw::RandInt(0))
            }
        );
        assert_eq!(
            t.crop_and_flip_replayed(&img, &good[..5]).unwrap_err(),
            CropReplayError::Mismatch { position: 5, needed: "flip rand", found: None }
        );
        // A 5x5 box in a 10x10 image: top and left in [0, 5].
        assert_eq!(
            t.crop_and_flip_replayed(&img, &with(3, CropDraw::RandInt(6))).unwrap_err(),
            CropReplayError::IntOutOfRange { position: 3, value: 6, lo: 0, hi: 5 }
        );
        assert_eq!(
            t.crop_and_flip_replayed(&img, &with(2, CropDraw::RandInt(-1))).unwrap_err(),
            CropReplayError::IntOutOfRange { position: 2, value: -1, lo: 0, hi: 5 }
        );
        assert_eq!(
            t.crop_and_flip_replayed(&img, &with(4, CropDraw::InterpolationChoice(2))).unwrap_err(),
            CropReplayError::OutOfRange { position: 4, index: 2, len: 2 }
        );
        let mut longer = good.to_vec();
        longer.push(CropDraw::FlipRand(0.1));
        assert_eq!(
            t.crop_and_flip_replayed(&img, &longer).unwrap_err(),
            CropReplayError::Unused { left: 1 }
        );
        // Without a flip (hflip 0) and with a fixed filter, neither is drawn.
        let fixed = train(CropInterpolation::Fixed(Filter::Bilinear), 0.0);
        assert_eq!(
            fixed.crop_and_flip_replayed(&img, &good).unwrap_err(),
            CropReplayError::Unused { left: 2 }
        );
        assert!(fixed.crop_and_flip_replayed(&img, &good[..4]).is_ok());
        assert_eq!(
            t.crop_and_flip_replayed(&img, &with(4, CropDraw::FlipRand(0.1)))
                .unwrap_err()
                .to_string(),
            "draw 4: the replay needs interpolation choice, the plan has Some(FlipRand(0.1))"
        );
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
