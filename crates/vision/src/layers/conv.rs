//! 2-D convolution with timm/PyTorch parameter names (`weight`, `bias`).

use super::ForwardCtx;
use tch::{nn, Tensor};

/// How a convolution's weight (and bias) start out; each family follows its
/// timm `init_weights`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvInit {
    /// `kaiming_normal_(mode='fan_out', nonlinearity='relu')` with PyTorch's
    /// fan-out (groups ignored), bias PyTorch's default (ResNet family).
    KaimingFanOut,
    /// `normal_(0, sqrt(2 / fan_out))` with `fan_out //= groups`, zero bias
    /// (RegNet's `_init_weights`, EfficientNet's `_init_weight_goog`).
    FanOutPerGroup,
    /// PyTorch's `nn.Conv2d` default: uniform in `±1/sqrt(fan_in)` for weight
    /// and bias (ViT's patch embedding, which timm leaves as built).
    PyTorchDefault,
}

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
    /// Initialisation of the variables.
    pub init: ConvInit,
}

impl Default for ConvConfig {
    fn default() -> Self {
        ConvConfig {
            stride: 1,
            padding: 0,
            dilation: 1,
            groups: 1,
            bias: false,
            init: ConvInit::KaimingFanOut,
        }
    }
}

impl ConvConfig {
    /// A `k x k` convolution with timm's default symmetric padding
    /// (`get_padding`: `((stride - 1) + dilation * (k - 1)) // 2`), as every
    /// model here builds with `pad_type=''`.
    pub fn symmetric(k: i64, stride: i64) -> ConvConfig {
        ConvConfig { stride, padding: symmetric_padding(k, stride, 1), ..Default::default() }
    }
}

/// timm's `get_padding(kernel_size, stride, dilation)`.
pub fn symmetric_padding(k: i64, stride: i64, dilation: i64) -> i64 {
    ((stride - 1) + dilation * (k - 1)) / 2
}

/// A 2-D convolution.
#[derive(Debug)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    config: ConvConfig,
}

impl Conv2d {
    /// Creates `path.weight` (and `path.bias`) for `c_in -> c_out` with a `k x k` kernel.
    pub fn new(path: &nn::Path, c_in: i64, c_out: i64, k: i64, config: ConvConfig) -> Conv2d {
        let fan_in = c_in / config.groups * k * k;
        let bound = 1.0 / (fan_in as f64).sqrt();
        let default = nn::Init::Uniform { lo: -bound, up: bound };
        let (weight_init, bias_init) = match config.init {
            // PyTorch computes fan_out as out_channels * kernel area, whatever the groups.
            ConvInit::KaimingFanOut => {
                let std = (2.0 / (c_out * k * k) as f64).sqrt();
                (nn::Init::Randn { mean: 0.0, stdev: std }, default)
            }
            ConvInit::FanOutPerGroup => {
                let std = (2.0 / (c_out * k * k / config.groups) as f64).sqrt();
                (nn::Init::Randn { mean: 0.0, stdev: std }, nn::Init::Const(0.0))
            }
            ConvInit::PyTorchDefault => (default, default),
        };
        let weight = path.var("weight", &[c_out, c_in / config.groups, k, k], weight_init);
        let bias = config.bias.then(|| path.var("bias", &[c_out], bias_init));
        Conv2d { weight, bias, config }
    }

    /// Applies the convolution in the dtype of the context.
    pub fn forward(&self, xs: &Tensor, ctx: &ForwardCtx) -> Result<Tensor, tch::TchError> {
        let weight = ctx.cast(&self.weight)?;
        let bias = match &self.bias {
            Some(b) => Some(ctx.cast(b)?),
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
