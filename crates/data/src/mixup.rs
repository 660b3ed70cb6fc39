//! Mixup and CutMix over a micro-batch, as timm's `FastCollateMixup`: images
//! stay 8-bit (Mixup blends in `f32` and rounds half to even), sample `i` is
//! paired with sample `B-1-i`, CutMix's lambda is corrected to the clipped
//! box area, and targets are smoothed one-hot vectors mixed with the same
//! lambda. Batch mode draws one lambda (and one box) per micro-batch.

use crate::rng::Rng;

/// Per-batch or per-element mixing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MixMode {
    /// One decision for the whole micro-batch (RSB).
    Batch,
    /// One decision per sample.
    Elem,
}

/// timm `Mixup(mixup_alpha, cutmix_alpha, prob, switch_prob, mode, label_smoothing)`.
#[derive(Debug, Clone, PartialEq)]
pub struct MixupConfig {
    /// Beta(alpha, alpha) for Mixup; 0 = off.
    pub mixup_alpha: f64,
    /// Beta(alpha, alpha) for CutMix; 0 = off.
    pub cutmix_alpha: f64,
    /// Probability of mixing at all.
    pub prob: f64,
    /// Probability of CutMix when both are on.
    pub switch_prob: f64,
    /// Batch or element mode.
    pub mode: MixMode,
    /// Label smoothing of the targets.
    pub label_smoothing: f64,
}

/// One mixing decision: the raw lambda and, for CutMix, the box centre.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MixDecision {
    /// Lambda as drawn (1 = no mixing).
    pub lam: f64,
    /// CutMix box centre `(cy, cx)`, `None` for Mixup.
    pub cutmix_center: Option<(u32, u32)>,
}

impl MixDecision {
    /// No mixing.
    pub const NONE: MixDecision = MixDecision { lam: 1.0, cutmix_center: None };
}

/// The decisions for one micro-batch.
#[derive(Debug, Clone, PartialEq)]
pub enum MixPlan {
    /// One decision for every sample.
    Batch(MixDecision),
    /// One decision per sample (`B` of them).
    Elem(Vec<MixDecision>),
}

/// CutMix box `(yl, yh, xl, xh)` and corrected lambda, as timm's `rand_bbox`
/// plus `cutmix_bbox_and_lam(correct_lam=True)`.
pub fn cutmix_box(h: u32, w: u32, lam: f64, center: (u32, u32)) -> ([u32; 4], f64) {
    let ratio = (1.0 - lam).sqrt();
    let cut_h = (f64::from(h) * ratio) as i64;
    let cut_w = (f64::from(w) * ratio) as i64;
    let (cy, cx) = (i64::from(center.0), i64::from(center.1));
    let clip = |v: i64, hi: u32| v.clamp(0, i64::from(hi)) as u32;
    let yl = clip(cy - cut_h / 2, h);
    let yh = clip(cy + (cut_h + 1) / 2, h);
    let xl = clip(cx - cut_w / 2, w);
    let xh = clip(cx + (cut_w + 1) / 2, w);
    let area = f64::from((yh - yl) * (xh - xl));
    ([yl, yh, xl, xh], 1.0 - area / (f64::from(h) * f64::from(w)))
}

impl MixupConfig {
    /// Whether any mixing can happen.
    pub fn enabled(&self) -> bool {
        self.prob > 0.0 && (self.mixup_alpha > 0.0 || self.cutmix_alpha > 0.0)
    }

    fn draw_one(&self, h: u32, w: u32, rng: &mut Rng) -> MixDecision {
        if !rng.bernoulli(self.prob) {
            return MixDecision::NONE;
        }
        let use_cutmix = match (self.mixup_alpha > 0.0, self.cutmix_alpha > 0.0) {
            (true, true) => rng.bernoulli(self.switch_prob),
            (false, true) => true,
            (true, false) => false,
            (false, false) => return MixDecision::NONE,
        };
        if use_cutmix {
            let lam = rng.beta(self.cutmix_alpha, self.cutmix_alpha);
            let center = (rng.below(u64::from(h)) as u32, rng.below(u64::from(w)) as u32);
            MixDecision { lam, cutmix_center: Some(center) }
        } else {
            MixDecision { lam: rng.beta(self.mixup_alpha, self.mixup_alpha), cutmix_center: None }
        }
    }

    /// Draws the decisions for a micro-batch of `n` images of `h x w`.
    pub fn draw(&self, n: usize, h: u32, w: u32, rng: &mut Rng) -> MixPlan {
        match self.mode {
            MixMode::Batch => MixPlan::Batch(self.draw_one(h, w, rng)),
            MixMode::Elem => MixPlan::Elem((0..n).map(|_| self.draw_one(h, w, rng)).collect()),
        }
    }
}

/// Mixes an NHWC `u8` batch (`n` images of `h x w x 3`) by `plan`; returns the
/// mixed images and each sample's effective lambda (after box correction).
pub fn apply_plan(images: &[u8], n: usize, h: u32, w: u32, plan: &MixPlan) -> (Vec<u8>, Vec<f64>) {
    let per_image = h as usize * w as usize * 3;
    assert_eq!(images.len(), n * per_image, "batch buffer size");
    let mut out = images.to_vec();
    let mut lams = vec![1.0; n];
    for i in 0..n {
        let decision = match plan {
            MixPlan::Batch(d) => *d,
            MixPlan::Elem(ds) => ds[i],
        };
        if decision.lam == 1.0 {
            continue;
        }
        let j = n - 1 - i;
        let src = &images[j * per_image..(j + 1) * per_image];
        let dst = &mut out[i * per_image..(i + 1) * per_image];
        match decision.cutmix_center {
            Some(center) => {
                let ([yl, yh, xl, xh], lam) = cutmix_box(h, w, decision.lam, center);
                let row = w as usize * 3;
                for y in yl as usize..yh as usize {
                    let span = y * row + xl as usize * 3..y * row + xh as usize * 3;
                    dst[span.clone()].copy_from_slice(&src[span]);
                }
                lams[i] = lam;
            }
            None => {
                // numpy: uint8 -> float32, times lam and (1 - lam) as float32, rint.
                let a = decision.lam as f32;
                let b = (1.0 - decision.lam) as f32;
                for (d, s) in dst.iter_mut().zip(src) {
                    *d = (f32::from(*d) * a + f32::from(*s) * b).round_ties_even() as u8;
                }
                lams[i] = decision.lam;
            }
        }
    }
    (out, lams)
}

/// timm's `mixup_target`: smoothed one-hot targets of each sample mixed with
/// those of its partner `B-1-i`, `[n * num_classes]` row-major.
pub fn mixed_targets(labels: &[u32], lams: &[f64], num_classes: usize, smoothing: f64) -> Vec<f32> {
    let n = labels.len();
    let off = (smoothing / num_classes as f64) as f32;
    let on = (1.0 - smoothing + smoothing / num_classes as f64) as f32;
    let mut out = vec![0f32; n * num_classes];
    for i in 0..n {
        let lam = lams[i] as f32;
        let rest = (1.0 - lams[i]) as f32;
        let partner = labels[n - 1 - i] as usize;
        let row = &mut out[i * num_classes..(i + 1) * num_classes];
        for (c, v) in row.iter_mut().enumerate() {
            let y1 = if c == labels[i] as usize { on } else { off };
            let y2 = if c == partner { on } else { off };
            *v = y1 * lam + y2 * rest;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cutmix_box_matches_hand_computation() {
        // h = w = 10, lam = 0.64 -> ratio 0.6 -> cut 6; centre (1, 8).
        let (b, lam) = cutmix_box(10, 10, 0.64, (1, 8));
        assert_eq!(b, [0, 4, 5, 10]);
        assert!((lam - (1.0 - 20.0 / 100.0)).abs() < 1e-12);
    }

    #[test]
    fn mixup_blends_with_the_reversed_batch_and_rounds_half_to_even() {
        let images = vec![10u8, 10, 10, 11, 11, 11];
        let (out, lams) = apply_plan(
            &images,
            2,
            1,
            1,
            &MixPlan::Batch(MixDecision { lam: 0.5, cutmix_center: None }),
        );
        assert_eq!(out, vec![10, 10, 10, 10, 10, 10]); // 10.5 -> 10 both ways
        assert_eq!(lams, vec![0.5, 0.5]);
        let t = mixed_targets(&[0, 1], &lams, 2, 0.0);
        assert_eq!(t, vec![0.5, 0.5, 0.5, 0.5]);
    }

    #[test]
    fn targets_carry_label_smoothing() {
        let t = mixed_targets(&[2, 2], &[1.0, 1.0], 4, 0.1);
        assert!((t[2] - 0.925).abs() < 1e-7 && (t[0] - 0.025).abs() < 1e-7);
    }

    #[test]
    fn disabled_config_never_mixes() {
        let cfg = MixupConfig {
            mixup_alpha: 0.2,
            cutmix_alpha: 1.0,
            prob: 0.0,
            switch_prob: 0.5,
            mode: MixMode::Batch,
            label_smoothing: 0.0,
        };
        let mut rng = Rng::from_key(&[1]);
        for _ in 0..100 {
            assert_eq!(cfg.draw(4, 8, 8, &mut rng), MixPlan::Batch(MixDecision::NONE));
        }
    }
}
