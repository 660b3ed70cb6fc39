//! Training losses over dense (mixed, smoothed) targets: timm's
//! `BinaryCrossEntropy` and softmax cross-entropy.

use rsb_recipes::schema::LossSection;
use tch::{Reduction, TchError, Tensor};

/// A training loss.
#[derive(Debug, Clone, PartialEq)]
pub enum Loss {
    /// timm `BinaryCrossEntropy`: optional binarisation of the targets at a
    /// threshold, then mean of BCE-with-logits over batch and classes.
    Bce {
        /// Targets above this become 1, others 0.
        target_threshold: Option<f64>,
    },
    /// `-sum(target * log_softmax(logits))`, averaged over the batch.
    CrossEntropy,
}

impl Loss {
    /// The loss a recipe asks for.
    pub fn from_recipe(section: &LossSection) -> Loss {
        match section {
            LossSection::Bce(b) => Loss::Bce { target_threshold: b.target_threshold },
            LossSection::CrossEntropy(_) => Loss::CrossEntropy,
        }
    }

    /// Label smoothing to apply to one-hot targets when Mixup is off.
    pub fn smoothing(section: &LossSection) -> f64 {
        match section {
            LossSection::Bce(b) => b.smoothing,
            LossSection::CrossEntropy(c) => c.smoothing,
        }
    }

    /// Mean loss of `logits` `[N, C]` against dense `targets` `[N, C]`.
    pub fn compute(&self, logits: &Tensor, targets: &Tensor) -> Result<Tensor, TchError> {
        match self {
            Loss::Bce { target_threshold } => {
                let targets = match target_threshold {
                    Some(t) => targets.f_gt(*t)?.f_to_kind(targets.kind())?,
                    None => targets.shallow_clone(),
                };
                logits.f_binary_cross_entropy_with_logits::<Tensor>(
                    &targets,
                    None,
                    None,
                    Reduction::Mean,
                )
            }
            Loss::CrossEntropy => {
                let logp = logits.f_log_softmax(-1, tch::Kind::Float)?;
                targets
                    .f_mul(&logp)?
                    .f_sum_dim_intlist([1i64].as_slice(), false, tch::Kind::Float)?
                    .f_mean(tch::Kind::Float)?
                    .f_neg()
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn bce_thresholds_targets_and_averages_over_classes() {
        let logits = Tensor::from_slice(&[0.0f32, 2.0, -1.0, 0.5]).view([2, 2]);
        let soft = Tensor::from_slice(&[0.9f32, 0.1, 0.3, 0.7]).view([2, 2]);
        let loss = Loss::Bce { target_threshold: Some(0.2) }.compute(&logits, &soft).unwrap();
        // Binarised targets: [[1, 0], [1, 1]].
        let x = [0.0f64, 2.0, -1.0, 0.5];
        let y = [1.0f64, 0.0, 1.0, 1.0];
        let want: f64 = x
            .iter()
            .zip(y)
            .map(|(x, y)| x.max(0.0) - x * y + (1.0 + (-x.abs()).exp()).ln())
            .sum::<f64>()
            / 4.0;
        assert!((loss.double_value(&[]) - want).abs() < 1e-6);
    }

    #[test]
    fn cross_entropy_with_one_hot_equals_nll() {
        let logits = Tensor::randn([3, 5], (Kind::Float, Device::Cpu));
        let labels = Tensor::from_slice(&[1i64, 4, 0]);
        let one_hot = labels.one_hot(5).to_kind(Kind::Float);
        let ours = Loss::CrossEntropy.compute(&logits, &one_hot).unwrap().double_value(&[]);
        let reference = logits.cross_entropy_for_logits(&labels).double_value(&[]);
        assert!((ours - reference).abs() < 1e-5);
    }
}
