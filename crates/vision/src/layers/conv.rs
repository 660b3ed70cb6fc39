//! 2-D convolution with timm/PyTorch parameter names (`weight`, `bias`).

use super::ForwardCtx;
use tch::{nn, Tensor};

/// Shape options of a convolution (square kernels only, as every model here uses).
#[derive(Debug, Clone, Copy)]
pub struct ConvConfig {
    /// Stride.
    pub stride: i64,
    /// Zero padding on each side.
    pub padding: i64,
    /// Dilation.
    pub dilation: i64,
    /// Channel groups.
    pub groups: i64,
    /// Whether the convolution has a bias.
    pub bias: bool,
}

impl Default for ConvConfig {
    fn default() -> Self {
        ConvConfig { stride: 1, padding: 0, dilation: 1, groups: 1, bias: false }
    }
}

/// A 2-D convolution whose weight is initialised as timm's ResNet does
/// (`kaiming_normal_(mode='fan_out', nonlinearity='relu')`).
#[derive(Debug)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    config: ConvConfig,
}

impl Conv2d {
    /// Creates `path.weight` (and `path.bias`) for `c_in -> c_out` with a `k x k` kernel.
    pub fn new(path: &nn::Path, c_in: i64, c_out: i64, k: i64, config: ConvConfig) -> Conv2d {
        // PyTorch computes fan_out as out_channels * kernel area, whatever the groups.
        let fan_out = c_out * k * k;
        let std = (2.0 / fan_out as f64).sqrt();
        let weight = path.var(
            "weight",
            &[c_out, c_in / config.groups, k, k],
            nn::Init::Randn { mean: 0.0, stdev: std },
        );
        let bias = config.bias.then(|| path.var("bias", &[c_out], nn::Init::Const(0.0)));
        Conv2d { weight, bias, config }
    }

    /// Applies the convolution in the dtype of `xs`.
    pub fn forward(&self, xs: &Tensor, ctx: &ForwardCtx) -> Result<Tensor, tch::TchError> {
        let weight = self.weight.f_to_kind(ctx.compute_kind)?;
        let bias = match &self.bias {
            Some(b) => Some(b.f_to_kind(ctx.compute_kind)?),
            None => None,
        };
        let c = &self.config;
        xs.f_conv2d(
            &weight,
            bias.as_ref(),
            [c.stride, c.stride],
            [c.padding, c.padding],
            [c.dilation, c.dilation],
            c.groups,
        )
    }
}
