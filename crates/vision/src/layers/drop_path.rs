//! Stochastic depth (timm's `DropPath`): drops a residual branch per sample.

use tch::{Kind, Tensor};

/// Zeroes the whole residual branch of each sample with probability `rate`
/// and rescales the kept ones by `1 / (1 - rate)`; identity in eval mode.
/// The mask comes from libtorch's generator, which the trainer reseeds every
/// step so that a resumed run draws the same masks.
pub fn drop_path(xs: &Tensor, rate: f64, train: bool) -> Result<Tensor, tch::TchError> {
    if !train || rate <= 0.0 {
        return Ok(xs.shallow_clone());
    }
    let keep = 1.0 - rate;
    let batch = *xs
        .size()
        .first()
        .ok_or_else(|| tch::TchError::Shape("drop_path needs a batch dimension".to_string()))?;
    let mut mask_shape = vec![batch];
    mask_shape.extend(std::iter::repeat_n(1, xs.dim() - 1));
    let mut mask = Tensor::f_empty(mask_shape.as_slice(), (Kind::Float, xs.device()))?;
    let mask = mask.f_bernoulli_float_(keep)?.f_div_scalar(keep)?;
    let mask = super::cast(&mask, xs.f_kind()?)?;
    xs.f_mul(&mask)
}

/// timm's per-block rates: `rate * i / (n - 1)` for block `i` of `n`, so the
/// first block is never dropped and the last one is dropped at `rate`.
pub fn stochastic_depth_rates(rate: f64, num_blocks: usize) -> Vec<f64> {
    if num_blocks <= 1 {
        return vec![0.0; num_blocks];
    }
    (0..num_blocks).map(|i| rate * i as f64 / (num_blocks - 1) as f64).collect()
}

/// timm's `calculate_drop_path_rates(rate, n)` (RegNet, ViT): the values of
/// `torch.linspace(0, rate, n)`, which libtorch computes in float32 from both
/// ends (`start + step * i` for the first half, `end - step * (n - 1 - i)` after).
pub fn linspace_rates(rate: f64, num_blocks: usize) -> Vec<f64> {
    match num_blocks {
        0 => Vec::new(),
        1 => vec![0.0],
        n => {
            let end = rate as f32;
            let step = end / (n - 1) as f32;
            let halfway = n / 2;
            (0..n)
                .map(|i| {
                    let v =
                        if i < halfway { step * i as f32 } else { end - step * (n - 1 - i) as f32 };
                    f64::from(v)
                })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_rates_end_exactly_at_the_rate() {
        let rates = linspace_rates(0.1, 12);
        assert_eq!(rates.len(), 12);
        assert_eq!(rates[0], 0.0);
        assert_eq!(rates[11], f64::from(0.1f32));
        assert!((rates[6] - 0.1 * 6.0 / 11.0).abs() < 1e-7);
        assert_eq!(linspace_rates(0.1, 1), vec![0.0]);
    }

    #[test]
    fn rates_rise_linearly_from_zero() {
        let rates = stochastic_depth_rates(0.05, 16);
        assert_eq!(rates.len(), 16);
        assert_eq!(rates[0], 0.0);
        assert!((rates[15] - 0.05).abs() < 1e-12);
        assert!((rates[5] - 0.05 * 5.0 / 15.0).abs() < 1e-12);
    }

    #[test]
    fn drop_path_keeps_expectation_and_zeroes_whole_samples() {
        tch::manual_seed(0);
        let xs = Tensor::ones([4000, 3, 2, 2], (Kind::Float, tch::Device::Cpu));
        let ys = drop_path(&xs, 0.25, true).unwrap();
        let per_sample = ys.sum_dim_intlist([1, 2, 3].as_slice(), false, Kind::Float);
        let values: Vec<f32> = per_sample.try_into().unwrap();
        let expected_kept = 12.0 / 0.75;
        assert!(values.iter().all(|v| *v == 0.0 || (*v - expected_kept).abs() < 1e-4));
        let mean = ys.mean(Kind::Float).double_value(&[]);
        assert!((mean - 1.0).abs() < 0.05, "mean {mean}");
        let eval = drop_path(&xs, 0.25, false).unwrap();
        assert!(eval.equal(&xs));
    }
}
