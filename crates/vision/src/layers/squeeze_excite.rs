//! Squeeze-and-excitation channel attention (Hu et al., arXiv 1709.01507):
//! timm's `SEModule` (`fc1`/`fc2`, ResNet and RegNet) and the EfficientNet
//! `SqueezeExcite` (`conv_reduce`/`conv_expand`), which differ only in names
//! and in how the reduced width is rounded (done by the caller).

use super::{Activation, Conv2d, ConvConfig, ConvInit, ForwardCtx};
use tch::{nn, Kind, Tensor};

/// `x * sigmoid(expand(act(reduce(mean_hw(x)))))` with 1x1 convolutions with bias.
#[derive(Debug)]
pub struct SqueezeExcite {
    reduce: Conv2d,
    expand: Conv2d,
    act: Activation,
}

impl SqueezeExcite {
    /// Creates `path.<names.0>` (`channels -> rd_channels`) and
    /// `path.<names.1>` (`rd_channels -> channels`).
    pub fn new(
        path: &nn::Path,
        names: (&str, &str),
        channels: i64,
        rd_channels: i64,
        act: Activation,
        init: ConvInit,
    ) -> SqueezeExcite {
        let config = ConvConfig { bias: true, init, ..Default::default() };
        SqueezeExcite {
            reduce: Conv2d::new(&(path / names.0), channels, rd_channels, 1, config),
            expand: Conv2d::new(&(path / names.1), rd_channels, channels, 1, config),
            act,
        }
    }

    /// Rescales the channels of `xs`.
    pub fn forward(&self, xs: &Tensor, ctx: &ForwardCtx) -> Result<Tensor, tch::TchError> {
        let squeezed = xs.f_mean_dim([2i64, 3].as_slice(), true, None::<Kind>)?;
        let hidden = self.act.forward_(self.reduce.forward(&squeezed, ctx)?)?;
        let gate = self.expand.forward(&hidden, ctx)?.f_sigmoid()?;
        xs.f_mul(&gate)
    }
}

/// timm's `make_divisible(v, divisor, min_value=None, round_limit)`: `v`
/// rounded to the nearest multiple of `divisor` (at least `divisor`), one
/// step up if that loses more than `1 - round_limit` of `v`.
pub fn make_divisible(v: f64, divisor: i64, round_limit: f64) -> i64 {
    let d = divisor as f64;
    // Python: int(v + divisor / 2) // divisor * divisor (v > 0, so floor == trunc).
    let mut new_v = divisor.max(((v + d / 2.0).trunc() as i64) / divisor * divisor);
    if (new_v as f64) < round_limit * v {
        new_v += divisor;
    }
    new_v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn make_divisible_matches_timm() {
        // SEModule of seresnet50: make_divisible(C / 16, 8, round_limit=0).
        assert_eq!(make_divisible(256.0 / 16.0, 8, 0.0), 16);
        assert_eq!(make_divisible(64.0 / 16.0, 8, 0.0), 8);
        // EfficientNet round_channels: 32 * 1.1 = 35.2 -> 32; 1280 * 1.1 -> 1408.
        assert_eq!(make_divisible(32.0 * 1.1, 8, 0.9), 32);
        assert_eq!(make_divisible(1280.0 * 1.1, 8, 0.9), 1408);
        // 40 * 1.4 = 56 exactly; 24 * 1.4 = 33.6 -> 32 (>= 0.9 * 33.6).
        assert_eq!(make_divisible(40.0 * 1.4, 8, 0.9), 56);
        assert_eq!(make_divisible(24.0 * 1.4, 8, 0.9), 32);
    }
}
