//! timm 1.0.31 RandAugment (`timm/data/auto_augment.py`).
//!
//! [`RandAugmentConfig::parse`] (in `rsb_recipes`, so that a recipe is
//! checked when it is loaded) reads timm's config strings
//! (`rand-m7-mstd0.5-inc1`, ...), [`RandAugment::apply`] draws `n` ops
//! uniformly with replacement from timm's `_RAND_TRANSFORMS` or
//! `_RAND_INCREASING_TRANSFORMS` and applies each with probability `p`, with
//! per-call magnitude noise, timm's level-to-argument functions and random
//! negation, on top of the Pillow-exact image operations of
//! [`crate::image`]. The random draws come from our [`Rng`] rather than
//! Python's, so only their distributions match timm; [`RaOp::apply_level`]
//! and [`RaOp::apply`] are the deterministic entry points the parity tests use,
//! and [`RandAugment::apply_replayed`] runs the same decision code on draws
//! recorded from timm ([`RaDraw`]), so that the op choice, the apply
//! probability, the magnitude noise and clip, the sign and the interpolation
//! choice are checked against timm's own draws.

use std::borrow::Cow;

pub use rsb_recipes::rand_augment::{RandAugmentConfig, RandAugmentError, LEVEL_DENOM};

use crate::image::{geometry, ops, Filter, RgbImage};
use crate::replay::{Replay, ReplayError};
use crate::rng::Rng;

/// timm's default `translate_pct` for the relative translations.
pub const TRANSLATE_PCT: f64 = 0.45;

/// One RandAugment operation, named as in timm's `NAME_TO_OP`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RaOp {
    /// `ImageOps.autocontrast`.
    AutoContrast,
    /// `ImageOps.equalize`.
    Equalize,
    /// `ImageOps.invert`.
    Invert,
    /// `img.rotate(±30 m / 10 degrees)`.
    Rotate,
    /// Posterize to `int(4 m / 10)` bits.
    Posterize,
    /// Posterize to `4 - int(4 m / 10)` bits.
    PosterizeIncreasing,
    /// Solarize above `min(256, int(256 m / 10))`.
    Solarize,
    /// Solarize above `256 - min(256, int(256 m / 10))`.
    SolarizeIncreasing,
    /// Add `min(128, int(110 m / 10))` below 128.
    SolarizeAdd,
    /// Colour enhance by `1.8 m / 10 + 0.1`.
    Color,
    /// Colour enhance by `max(0.1, 1 ± 0.9 m / 10)`.
    ColorIncreasing,
    /// Contrast enhance by `1.8 m / 10 + 0.1`.
    Contrast,
    /// Contrast enhance by `max(0.1, 1 ± 0.9 m / 10)`.
    ContrastIncreasing,
    /// Brightness enhance by `1.8 m / 10 + 0.1`.
    Brightness,
    /// Brightness enhance by `max(0.1, 1 ± 0.9 m / 10)`.
    BrightnessIncreasing,
    /// Sharpness enhance by `1.8 m / 10 + 0.1`.
    Sharpness,
    /// Sharpness enhance by `max(0.1, 1 ± 0.9 m / 10)`.
    SharpnessIncreasing,
    /// Horizontal shear by `±0.3 m / 10`.
    ShearX,
    /// Vertical shear by `±0.3 m / 10`.
    ShearY,
    /// Horizontal translation by `±0.45 m / 10` of the width.
    TranslateXRel,
    /// Vertical translation by `±0.45 m / 10` of the height.
    TranslateYRel,
}

/// timm's `_RAND_TRANSFORMS` (the default op set), in timm's order.
pub const RAND_TRANSFORMS: [RaOp; 15] = [
    RaOp::AutoContrast,
    RaOp::Equalize,
    RaOp::Invert,
    RaOp::Rotate,
    RaOp::Posterize,
    RaOp::Solarize,
    RaOp::SolarizeAdd,
    RaOp::Color,
    RaOp::Contrast,
    RaOp::Brightness,
    RaOp::Sharpness,
    RaOp::ShearX,
    RaOp::ShearY,
    RaOp::TranslateXRel,
    RaOp::TranslateYRel,
];

/// timm's `_RAND_INCREASING_TRANSFORMS` (selected by `inc1`), in timm's order.
pub const RAND_INCREASING_TRANSFORMS: [RaOp; 15] = [
    RaOp::AutoContrast,
    RaOp::Equalize,
    RaOp::Invert,
    RaOp::Rotate,
    RaOp::PosterizeIncreasing,
    RaOp::SolarizeIncreasing,
    RaOp::SolarizeAdd,
    RaOp::ColorIncreasing,
    RaOp::ContrastIncreasing,
    RaOp::BrightnessIncreasing,
    RaOp::SharpnessIncreasing,
    RaOp::ShearX,
    RaOp::ShearY,
    RaOp::TranslateXRel,
    RaOp::TranslateYRel,
];

const ALL_OPS: [RaOp; 21] = [
    RaOp::AutoContrast,
    RaOp::Equalize,
    RaOp::Invert,
    RaOp::Rotate,
    RaOp::Posterize,
    RaOp::PosterizeIncreasing,
    RaOp::Solarize,
    RaOp::SolarizeIncreasing,
    RaOp::SolarizeAdd,
    RaOp::Color,
    RaOp::ColorIncreasing,
    RaOp::Contrast,
    RaOp::ContrastIncreasing,
    RaOp::Brightness,
    RaOp::BrightnessIncreasing,
    RaOp::Sharpness,
    RaOp::SharpnessIncreasing,
    RaOp::ShearX,
    RaOp::ShearY,
    RaOp::TranslateXRel,
    RaOp::TranslateYRel,
];

/// Python's `int(x)` for the non-negative levels timm converts.
fn py_int(x: f64) -> f64 {
    x.trunc()
}

fn maybe_negate(v: f64, negate: bool) -> f64 {
    if negate {
        -v
    } else {
        v
    }
}

impl RaOp {
    /// The op's name in timm (`'SolarizeIncreasing'`, ...).
    pub fn timm_name(self) -> &'static str {
        match self {
            RaOp::AutoContrast => "AutoContrast",
            RaOp::Equalize => "Equalize",
            RaOp::Invert => "Invert",
            RaOp::Rotate => "Rotate",
            RaOp::Posterize => "Posterize",
            RaOp::PosterizeIncreasing => "PosterizeIncreasing",
            RaOp::Solarize => "Solarize",
            RaOp::SolarizeIncreasing => "SolarizeIncreasing",
            RaOp::SolarizeAdd => "SolarizeAdd",
            RaOp::Color => "Color",
            RaOp::ColorIncreasing => "ColorIncreasing",
            RaOp::Contrast => "Contrast",
            RaOp::ContrastIncreasing => "ContrastIncreasing",
            RaOp::Brightness => "Brightness",
            RaOp::BrightnessIncreasing => "BrightnessIncreasing",
            RaOp::Sharpness => "Sharpness",
            RaOp::SharpnessIncreasing => "SharpnessIncreasing",
            RaOp::ShearX => "ShearX",
            RaOp::ShearY => "ShearY",
            RaOp::TranslateXRel => "TranslateXRel",
            RaOp::TranslateYRel => "TranslateYRel",
        }
    }

    /// The op with timm name `name`, if it is one of the RandAugment ops.
    pub fn from_timm_name(name: &str) -> Option<RaOp> {
        ALL_OPS.iter().copied().find(|op| op.timm_name() == name)
    }

    /// Whether the op resamples geometry (and so takes an interpolation and
    /// the fill colour).
    pub fn is_geometric(self) -> bool {
        matches!(
            self,
            RaOp::Rotate | RaOp::ShearX | RaOp::ShearY | RaOp::TranslateXRel | RaOp::TranslateYRel
        )
    }

    /// Whether timm's level function negates its value with probability 1/2.
    pub fn draws_sign(self) -> bool {
        matches!(
            self,
            RaOp::Rotate
                | RaOp::ColorIncreasing
                | RaOp::ContrastIncreasing
                | RaOp::BrightnessIncreasing
                | RaOp::SharpnessIncreasing
                | RaOp::ShearX
                | RaOp::ShearY
                | RaOp::TranslateXRel
                | RaOp::TranslateYRel
        )
    }

    /// timm's `LEVEL_TO_ARG[name](magnitude)`: the op argument for a (clipped)
    /// magnitude, with the random negation decided by `negate` (ignored by ops
    /// that do not negate). `None` for ops without argument. Integer arguments
    /// (posterize bits, solarize thresholds, solarize-add amount) are returned
    /// as integral floats.
    pub fn level_arg(self, magnitude: f64, negate: bool) -> Option<f64> {
        let level = magnitude / LEVEL_DENOM;
        let enhance = level * 1.8 + 0.1;
        let enhance_increasing = || {
            let v = 1.0 + maybe_negate(level * 0.9, negate);
            if v > 0.1 {
                v
            } else {
                0.1
            }
        };
        let posterize = py_int(level * 4.0);
        let solarize = py_int(level * 256.0).min(256.0);
        Some(match self {
            RaOp::AutoContrast | RaOp::Equalize | RaOp::Invert => return None,
            RaOp::Rotate => maybe_negate(level * 30.0, negate),
            RaOp::Posterize => posterize,
            RaOp::PosterizeIncreasing => 4.0 - posterize,
            RaOp::Solarize => solarize,
            RaOp::SolarizeIncreasing => 256.0 - solarize,
            RaOp::SolarizeAdd => py_int(level * 110.0).min(128.0),
            RaOp::Color | RaOp::Contrast | RaOp::Brightness | RaOp::Sharpness => enhance,
            RaOp::ColorIncreasing
            | RaOp::ContrastIncreasing
            | RaOp::BrightnessIncreasing
            | RaOp::SharpnessIncreasing => enhance_increasing(),
            RaOp::ShearX | RaOp::ShearY => maybe_negate(level * 0.3, negate),
            RaOp::TranslateXRel | RaOp::TranslateYRel => {
                maybe_negate(level * TRANSLATE_PCT, negate)
            }
        })
    }

    /// Applies the op with argument `arg` (as returned by
    /// [`RaOp::level_arg`]; ignored by ops without argument), exactly as
    /// timm's `NAME_TO_OP[name](img, arg, resample=filter, fillcolor=fill)`
    /// on Pillow 13 — except that posterize to 0 bits gives black where Pillow
    /// 13 raises (see [`ops::posterize`]).
    pub fn apply(self, img: &RgbImage, arg: f64, filter: Filter, fill: [u8; 3]) -> RgbImage {
        let int_arg = arg as i64;
        match self {
            RaOp::AutoContrast => ops::autocontrast(img),
            RaOp::Equalize => ops::equalize(img),
            RaOp::Invert => ops::invert(img),
            RaOp::Rotate => geometry::rotate(img, arg, filter, fill),
            RaOp::Posterize | RaOp::PosterizeIncreasing => ops::posterize(img, int_arg),
            RaOp::Solarize | RaOp::SolarizeIncreasing => ops::solarize(img, int_arg),
            RaOp::SolarizeAdd => ops::solarize_add(img, int_arg, 128),
            RaOp::Color | RaOp::ColorIncreasing => ops::enhance_color(img, arg),
            RaOp::Contrast | RaOp::ContrastIncreasing => ops::enhance_contrast(img, arg),
            RaOp::Brightness | RaOp::BrightnessIncreasing => ops::enhance_brightness(img, arg),
            RaOp::Sharpness | RaOp::SharpnessIncreasing => ops::enhance_sharpness(img, arg),
            RaOp::ShearX => geometry::affine(img, [1.0, arg, 0.0, 0.0, 1.0, 0.0], filter, fill),
            RaOp::ShearY => geometry::affine(img, [1.0, 0.0, 0.0, arg, 1.0, 0.0], filter, fill),
            RaOp::TranslateXRel => {
                let pixels = arg * f64::from(img.width);
                geometry::affine(img, [1.0, 0.0, pixels, 0.0, 1.0, 0.0], filter, fill)
            }
            RaOp::TranslateYRel => {
                let pixels = arg * f64::from(img.height);
                geometry::affine(img, [1.0, 0.0, 0.0, 0.0, 1.0, pixels], filter, fill)
            }
        }
    }

    /// [`RaOp::level_arg`] followed by [`RaOp::apply`]: timm's `AugmentOp`
    /// with probability 1 and a fixed, already clipped magnitude.
    pub fn apply_level(
        self,
        img: &RgbImage,
        magnitude: f64,
        negate: bool,
        filter: Filter,
        fill: [u8; 3],
    ) -> RgbImage {
        let arg = self.level_arg(magnitude, negate).unwrap_or(0.0);
        self.apply(img, arg, filter, fill)
    }
}

/// The op set a [`RandAugmentConfig`] draws from.
pub trait RandAugmentOps {
    /// timm's `_RAND_INCREASING_TRANSFORMS` with `inc1`, else `_RAND_TRANSFORMS`.
    fn ops(&self) -> &'static [RaOp];
}

impl RandAugmentOps for RandAugmentConfig {
    fn ops(&self) -> &'static [RaOp] {
        if self.increasing {
            &RAND_INCREASING_TRANSFORMS
        } else {
            &RAND_TRANSFORMS
        }
    }
}

/// Interpolation of the geometric ops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RaInterpolation {
    /// Always this filter (timm with `--train-interpolation bilinear|bicubic`).
    Fixed(Filter),
    /// Bilinear or bicubic with equal probability, drawn per geometric op call
    /// (timm with `--train-interpolation random`).
    Random,
}

/// timm's `RandAugment` transform.
#[derive(Debug, Clone)]
pub struct RandAugment {
    config: RandAugmentConfig,
    fill: [u8; 3],
    interpolation: RaInterpolation,
}

impl RandAugment {
    /// A RandAugment with the given config, fill colour of the geometric ops
    /// (timm's `img_mean`, e.g. (124, 116, 104)) and interpolation.
    pub fn new(config: RandAugmentConfig, fill: [u8; 3], interpolation: RaInterpolation) -> Self {
        RandAugment { config, fill, interpolation }
    }

    /// The config.
    pub fn config(&self) -> &RandAugmentConfig {
        &self.config
    }

    /// Draws one op-call magnitude (timm `AugmentOp.__call__`): `m`, plus
    /// Gaussian noise of std `mstd` (or uniform in [0, m] when `mstd` is
    /// infinite), clipped to [0, upper bound].
    pub fn sample_magnitude(&self, rng: &mut Rng) -> f64 {
        self.draw_magnitude(rng)
    }

    fn draw_magnitude(&self, draws: &mut impl Draws) -> f64 {
        let mut m = f64::from(self.config.magnitude);
        let std = self.config.magnitude_std;
        if std > 0.0 {
            m = if std == f64::INFINITY {
                draws.uniform_range(0.0, m)
            } else {
                draws.gauss(m, std)
            };
        }
        self.config.clip_magnitude(m)
    }

    /// Applies RandAugment to `img`: `num_layers` ops drawn uniformly with
    /// replacement, each applied with probability `prob`.
    pub fn apply(&self, img: &RgbImage, rng: &mut Rng) -> RgbImage {
        self.apply_with(img, rng, &mut Vec::new())
    }

    /// [`RandAugment::apply`] driven by draws recorded from timm's
    /// `RandAugment.__call__` (in the order timm makes them) instead of our
    /// [`Rng`]. Returns the image and what was decided for each chosen op.
    /// Fails if the plan does not hold the draw the next decision needs, holds
    /// an index out of range, or has draws left over.
    pub fn apply_replayed(
        &self,
        img: &RgbImage,
        plan: &[RaDraw],
    ) -> Result<(RgbImage, Vec<RaDecision>), RaReplayError> {
        let mut replay = Replay::new(plan);
        let mut decisions = Vec::new();
        let out = self.apply_with(img, &mut replay, &mut decisions);
        replay.finish()?;
        Ok((out, decisions))
    }

    /// The decision code shared by [`RandAugment::apply`] and
    /// [`RandAugment::apply_replayed`], in timm's draw order: all op choices
    /// first (numpy), then per op the apply draw, the magnitude noise, the
    /// sign and the interpolation (Python's `random`).
    fn apply_with(
        &self,
        img: &RgbImage,
        draws: &mut impl Draws,
        decisions: &mut Vec<RaDecision>,
    ) -> RgbImage {
        let set = self.config.ops();
        let chosen: Vec<RaOp> =
            (0..self.config.num_layers).map(|_| set[draws.op_index(set.len())]).collect();
        let mut cur = Cow::Borrowed(img);
        for op in chosen {
            if self.config.prob < 1.0 && draws.random() > self.config.prob {
                decisions.push(RaDecision {
                    op,
                    applied: false,
                    magnitude: None,
                    arg: None,
                    filter: None,
                });
                continue;
            }
            let magnitude = self.draw_magnitude(draws);
            let negate = op.draws_sign() && draws.random() > 0.5;
            let filter = match self.interpolation {
                _ if !op.is_geometric() => Filter::Bicubic,
                RaInterpolation::Fixed(f) => f,
                RaInterpolation::Random => RANDOM_INTERPOLATION[draws.interpolation_index(2)],
            };
            let arg = op.level_arg(magnitude, negate);
            cur = Cow::Owned(op.apply(&cur, arg.unwrap_or(0.0), filter, self.fill));
            decisions.push(RaDecision {
                op,
                applied: true,
                magnitude: Some(magnitude),
                arg,
                filter: op.is_geometric().then_some(filter),
            });
        }
        cur.into_owned()
    }
}

/// timm's `_RANDOM_INTERPOLATION`, in its order.
const RANDOM_INTERPOLATION: [Filter; 2] = [Filter::Bilinear, Filter::Bicubic];

/// One random draw of timm's RandAugment, as recorded from Python, in call order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RaDraw {
    /// One `np.random.choice` pick of an op: its index in the op set.
    OpChoice(usize),
    /// `random.random()` (the apply draw, `> p` skips the op; the sign draw,
    /// `> 0.5` negates).
    Random(f64),
    /// The value `random.gauss(m, mstd)` returned (before the clip).
    Gauss(f64),
    /// The value `random.uniform(0, m)` returned (`mstd` above 100).
    Uniform(f64),
    /// `random.choice` over `_RANDOM_INTERPOLATION` (bilinear, bicubic): the index.
    InterpolationChoice(usize),
}

/// What RandAugment decided for one chosen op.
#[derive(Debug, Clone, PartialEq)]
pub struct RaDecision {
    /// The op drawn.
    pub op: RaOp,
    /// Whether the apply draw let it run.
    pub applied: bool,
    /// The magnitude after noise and clip (applied ops only).
    pub magnitude: Option<f64>,
    /// timm's level argument (applied ops with an argument only).
    pub arg: Option<f64>,
    /// The interpolation (applied geometric ops only).
    pub filter: Option<Filter>,
}

/// Why a recorded RandAugment plan could not be replayed.
pub type RaReplayError = ReplayError<RaDraw>;

/// Where RandAugment's random decisions come from: our [`Rng`], or a plan of
/// draws recorded from timm. One method per kind of draw timm makes.
trait Draws {
    /// An op index in `[0, len)` (numpy's choice with replacement).
    fn op_index(&mut self, len: usize) -> usize;
    /// Uniform in `[0, 1)` (`random.random()`).
    fn random(&mut self) -> f64;
    /// Normal(`mean`, `std`) (`random.gauss`).
    fn gauss(&mut self, mean: f64, std: f64) -> f64;
    /// Uniform in `[lo, hi)` (`random.uniform`).
    fn uniform_range(&mut self, lo: f64, hi: f64) -> f64;
    /// An interpolation index in `[0, len)` (`random.choice`).
    fn interpolation_index(&mut self, len: usize) -> usize;
}

impl Draws for Rng {
    fn op_index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }

    fn random(&mut self) -> f64 {
        self.uniform()
    }

    fn gauss(&mut self, mean: f64, std: f64) -> f64 {
        Rng::gauss(self, mean, std)
    }

    fn uniform_range(&mut self, lo: f64, hi: f64) -> f64 {
        Rng::uniform_range(self, lo, hi)
    }

    fn interpolation_index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }
}

impl Draws for Replay<'_, RaDraw> {
    fn op_index(&mut self, len: usize) -> usize {
        let draw = self.take("op choice", |d| match d {
            RaDraw::OpChoice(i) => Some(i),
            _ => None,
        });
        self.index(len, draw)
    }

    fn random(&mut self) -> f64 {
        self.take("random", |d| match d {
            RaDraw::Random(v) => Some(v),
            _ => None,
        })
        .unwrap_or(0.0)
    }

    fn gauss(&mut self, _mean: f64, _std: f64) -> f64 {
        self.take("gauss", |d| match d {
            RaDraw::Gauss(v) => Some(v),
            _ => None,
        })
        .unwrap_or(0.0)
    }

    fn uniform_range(&mut self, _lo: f64, _hi: f64) -> f64 {
        self.take("uniform", |d| match d {
            RaDraw::Uniform(v) => Some(v),
            _ => None,
        })
        .unwrap_or(0.0)
    }

    fn interpolation_index(&mut self, len: usize) -> usize {
        let draw = self.take("interpolation choice", |d| match d {
            RaDraw::InterpolationChoice(i) => Some(i),
            _ => None,
        });
        self.index(len, draw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> RandAugmentConfig {
        RandAugmentConfig::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn inc1_draws_from_the_increasing_set_and_any_other_set_name_from_the_default() {
        assert_eq!(parse("rand-m7-mstd0.5-inc1").ops(), &RAND_INCREASING_TRANSFORMS);
        assert_eq!(parse("rand-m9-n3-mstd0.5").ops(), &RAND_TRANSFORMS);
        assert_eq!(parse("rand-inc0").ops(), &RAND_TRANSFORMS);
        assert_eq!(parse("rand-tdefault-tweights").ops(), &RAND_TRANSFORMS);
    }

    #[test]
    fn level_args_at_m7_match_timm() {
        // Values printed by timm 1.0.31 LEVEL_TO_ARG at magnitude 7 (no negation).
        let want = [
            (RaOp::Rotate, 21.0),
            (RaOp::Posterize, 2.0),
            (RaOp::PosterizeIncreasing, 2.0),
            (RaOp::Solarize, 179.0),
            (RaOp::SolarizeIncreasing, 77.0),
            (RaOp::SolarizeAdd, 77.0),
            (RaOp::Color, 1.36),
            (RaOp::ColorIncreasing, 1.63),
            (RaOp::Sharpness, 1.36),
            (RaOp::BrightnessIncreasing, 1.63),
            (RaOp::ShearX, 0.21),
            (RaOp::TranslateYRel, 0.315),
        ];
        for (op, v) in want {
            assert_eq!(op.level_arg(7.0, false), Some(v), "{op:?}");
        }
        assert_eq!(RaOp::Rotate.level_arg(7.0, true), Some(-21.0));
        assert_eq!(RaOp::ContrastIncreasing.level_arg(7.0, true), Some(1.0 - 0.63));
        assert_eq!(RaOp::Contrast.level_arg(7.0, true), Some(1.36));
        assert_eq!(RaOp::Brightness.level_arg(7.3, false), Some(1.4140000000000001));
        assert_eq!(RaOp::TranslateXRel.level_arg(7.3, false), Some(0.3285));
        assert_eq!(RaOp::Solarize.level_arg(7.3, false), Some(186.0));
        assert_eq!(RaOp::SolarizeAdd.level_arg(10.0, false), Some(110.0));
        assert_eq!(RaOp::SolarizeAdd.level_arg(15.0, false), Some(128.0));
        assert_eq!(RaOp::PosterizeIncreasing.level_arg(10.0, false), Some(0.0));
        assert_eq!(RaOp::ColorIncreasing.level_arg(10.0, true), Some(0.1));
        assert_eq!(RaOp::Equalize.level_arg(7.0, true), None);
    }

    #[test]
    fn names_round_trip() {
        for op in ALL_OPS {
            assert_eq!(RaOp::from_timm_name(op.timm_name()), Some(op));
        }
        assert_eq!(RaOp::from_timm_name("Cutout"), None);
    }

    #[test]
    fn magnitude_distribution() {
        let mut rng = Rng::from_key(&[3]);
        let ra = RandAugment::new(parse("rand-m7-mstd0.5"), [0; 3], RaInterpolation::Random);
        let n = 20_000;
        let s: Vec<f64> = (0..n).map(|_| ra.sample_magnitude(&mut rng)).collect();
        let mean = s.iter().sum::<f64>() / n as f64;
        assert!((mean - 7.0).abs() < 0.02, "{mean}");
        let ra = RandAugment::new(parse("rand-m9-mstd101"), [0; 3], RaInterpolation::Random);
        let s: Vec<f64> = (0..n).map(|_| ra.sample_magnitude(&mut rng)).collect();
        assert!(s.iter().all(|&m| (0.0..=9.0).contains(&m)));
        assert!((s.iter().sum::<f64>() / n as f64 - 4.5).abs() < 0.1);
        // Clipped to [0, 10] by default, to mmax when set.
        let ra = RandAugment::new(parse("rand-m15"), [0; 3], RaInterpolation::Random);
        assert_eq!(ra.sample_magnitude(&mut rng), 10.0);
        let ra = RandAugment::new(parse("rand-m15-mmax12"), [0; 3], RaInterpolation::Random);
        assert_eq!(ra.sample_magnitude(&mut rng), 12.0);
        let ra = RandAugment::new(parse("rand-m0-mstd3"), [0; 3], RaInterpolation::Random);
        assert!((0..100).all(|_| ra.sample_magnitude(&mut rng) >= 0.0));
    }

    #[test]
    fn apply_is_deterministic_and_total() {
        let mut data = Vec::new();
        for i in 0..(23 * 17) {
            data.extend_from_slice(&[(i * 7 % 256) as u8, (i * 13 % 256) as u8, (i % 256) as u8]);
        }
        let img = RgbImage::new(23, 17, data);
        let ra = RandAugment::new(
            parse("rand-m9-n4-mstd101-inc1-p0.9"),
            [124, 116, 104],
            RaInterpolation::Random,
        );
        let a = ra.apply(&img, &mut Rng::from_key(&[1, 2]));
        let b = ra.apply(&img, &mut Rng::from_key(&[1, 2]));
        assert_eq!(a, b);
        for key in 0..200 {
            let out = ra.apply(&img, &mut Rng::from_key(&[key]));
            assert_eq!((out.width, out.height), (23, 17));
        }
        let one = RgbImage::filled(1, 1, [9, 9, 9]);
        for key in 0..200 {
            assert_eq!(ra.apply(&one, &mut Rng::from_key(&[key])).data.len(), 3);
        }
        let none = RandAugment::new(parse("rand-n0"), [0; 3], RaInterpolation::Random);
        assert_eq!(none.apply(&img, &mut Rng::from_key(&[0])), img);
    }

    #[test]
    fn every_op_applies_with_probability_p() {
        let img = RgbImage::filled(8, 8, [100, 50, 25]);
        // With `p0` nothing is applied.
        let ra = RandAugment::new(parse("rand-n5-p0"), [0; 3], RaInterpolation::Random);
        assert_eq!(ra.apply(&img, &mut Rng::from_key(&[5])), img);
        // With m0 and increasing ops, a flat image changes only through
        // Invert, AutoContrast/Equalize (no-ops here), SolarizeIncreasing (256: no-op)...
        let ra = RandAugment::new(parse("rand-m0-n1-p1-inc1"), [0; 3], RaInterpolation::Random);
        let mut changed = 0;
        for key in 0..300 {
            if ra.apply(&img, &mut Rng::from_key(&[key])) != img {
                changed += 1;
            }
        }
        // ... and PosterizeIncreasing (4 bits: 100 -> 96, 50 -> 48, 25 -> 16):
        // 2 ops of 15 change the image.
        let frac = changed as f64 / 300.0;
        assert!((frac - 2.0 / 15.0).abs() < 0.07, "{frac}");
    }

    /// Our `Rng`, recording what it draws as a replay plan.
    struct Recorder {
        rng: Rng,
        plan: Vec<RaDraw>,
    }

    impl Draws for Recorder {
        fn op_index(&mut self, len: usize) -> usize {
            let i = self.rng.op_index(len);
            self.plan.push(RaDraw::OpChoice(i));
            i
        }
        fn random(&mut self) -> f64 {
            let v = Draws::random(&mut self.rng);
            self.plan.push(RaDraw::Random(v));
            v
        }
        fn gauss(&mut self, mean: f64, std: f64) -> f64 {
            let v = Draws::gauss(&mut self.rng, mean, std);
            self.plan.push(RaDraw::Gauss(v));
            v
        }
        fn uniform_range(&mut self, lo: f64, hi: f64) -> f64 {
            let v = Draws::uniform_range(&mut self.rng, lo, hi);
            self.plan.push(RaDraw::Uniform(v));
            v
        }
        fn interpolation_index(&mut self, len: usize) -> usize {
            let i = self.rng.interpolation_index(len);
            self.plan.push(RaDraw::InterpolationChoice(i));
            i
        }
    }

    #[test]
    fn replaying_our_own_draws_gives_our_output() {
        let mut data = Vec::new();
        for i in 0..(19 * 13) {
            data.extend_from_slice(&[
                (i * 5 % 256) as u8,
                (i * 11 % 256) as u8,
                (i * 3 % 256) as u8,
            ]);
        }
        let img = RgbImage::new(19, 13, data);
        for spec in ["rand-m7-mstd0.5-inc1", "rand-m9-n3-mstd101-p0.9", "rand-m1-n4-mstd3"] {
            let ra = RandAugment::new(parse(spec), [124, 116, 104], RaInterpolation::Random);
            for key in 0..50 {
                let mut recorder = Recorder { rng: Rng::from_key(&[key]), plan: Vec::new() };
                let recorded = ra.apply_with(&img, &mut recorder, &mut Vec::new());
                assert_eq!(recorded, ra.apply(&img, &mut Rng::from_key(&[key])), "{spec} {key}");
                let (replayed, decisions) = ra.apply_replayed(&img, &recorder.plan).unwrap();
                assert_eq!(replayed, recorded, "{spec} {key}");
                assert_eq!(decisions.len(), ra.config().num_layers);
            }
        }
    }

    #[test]
    fn replay_clips_the_planned_magnitude_and_reads_the_sign() {
        let img = RgbImage::filled(6, 5, [10, 20, 30]);
        let ra = RandAugment::new(parse("rand-m9-n1-mstd2"), [0; 3], RaInterpolation::Random);
        // Rotate is op 3 of the default set; apply (0.1 <= 0.5), magnitude
        // 12.5 clipped to 10, sign draw 0.7 > 0.5 negates, bicubic.
        let plan = [
            RaDraw::OpChoice(3),
            RaDraw::Random(0.1),
            RaDraw::Gauss(12.5),
            RaDraw::Random(0.7),
            RaDraw::InterpolationChoice(1),
        ];
        let (_, decisions) = ra.apply_replayed(&img, &plan).unwrap();
        assert_eq!(
            decisions,
            vec![RaDecision {
                op: RaOp::Rotate,
                applied: true,
                magnitude: Some(10.0),
                arg: Some(-30.0),
                filter: Some(Filter::Bicubic),
            }]
        );
        let plan = [
            RaDraw::OpChoice(3),
            RaDraw::Random(0.1),
            RaDraw::Gauss(-0.5),
            RaDraw::Random(0.2),
            RaDraw::InterpolationChoice(0),
        ];
        let (_, decisions) = ra.apply_replayed(&img, &plan).unwrap();
        assert_eq!(
            (decisions[0].magnitude, decisions[0].filter),
            (Some(0.0), Some(Filter::Bilinear))
        );
        // An apply draw above p skips the op and draws nothing else.
        let (out, decisions) =
            ra.apply_replayed(&img, &[RaDraw::OpChoice(3), RaDraw::Random(0.6)]).unwrap();
        assert_eq!(out, img);
        assert!(!decisions[0].applied);
    }

    #[test]
    fn replay_refuses_plans_that_do_not_fit() {
        let img = RgbImage::filled(4, 4, [1, 2, 3]);
        let ra = RandAugment::new(parse("rand-m5-n1"), [0; 3], RaInterpolation::Random);
        assert_eq!(
            ra.apply_replayed(&img, &[RaDraw::Random(0.1)]).unwrap_err(),
            RaReplayError::Mismatch {
                position: 0,
                needed: "op choice",
                found: Some(RaDraw::Random(0.1))
            }
        );
        assert_eq!(
            ra.apply_replayed(&img, &[RaDraw::OpChoice(0)]).unwrap_err(),
            RaReplayError::Mismatch { position: 1, needed: "random", found: None }
        );
        assert_eq!(
            ra.apply_replayed(&img, &[RaDraw::OpChoice(15), RaDraw::Random(0.9)]).unwrap_err(),
            RaReplayError::OutOfRange { position: 0, index: 15, len: 15 }
        );
        assert_eq!(
            ra.apply_replayed(
                &img,
                &[RaDraw::OpChoice(0), RaDraw::Random(0.9), RaDraw::Random(0.9)]
            )
            .unwrap_err(),
            RaReplayError::Unused { left: 1 }
        );
    }
}
