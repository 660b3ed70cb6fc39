//! Convolution, batch norm and activation in one block (timm's `ConvNormAct`,
//! and the `conv_*` + `bn*` pairs of the EfficientNet blocks).

use super::{Activation, BatchNorm2d, Conv2d, ConvConfig, ForwardCtx};
use tch::{nn, Tensor};

/// `act(bn(conv(x)))`, with the convolution and the norm under their own paths.
#[derive(Debug)]
pub struct ConvNormAct {
    conv: Conv2d,
    bn: BatchNorm2d,
    act: Activation,
}

impl ConvNormAct {
    /// Creates the convolution under `conv_path` and the batch norm under
    /// `bn_path` (timm's `ConvNormAct` uses `<name>.conv` and `<name>.bn`).
    pub fn new(
        conv_path: &nn::Path,
        bn_path: &nn::Path,
        c_in: i64,
        c_out: i64,
        k: i64,
        config: ConvConfig,
        act: Activation,
    ) -> ConvNormAct {
        ConvNormAct {
            conv: Conv2d::new(conv_path, c_in, c_out, k, config),
            bn: BatchNorm2d::new(bn_path, c_out),
            act,
        }
    }

    /// timm's `ConvNormAct(c_in, c_out, k, stride)` under `path`: `path.conv`, `path.bn`.
    pub fn timm(
        path: &nn::Path,
        c_in: i64,
        c_out: i64,
        k: i64,
        config: ConvConfig,
        act: Activation,
    ) -> ConvNormAct {
        ConvNormAct::new(&(path / "conv"), &(path / "bn"), c_in, c_out, k, config, act)
    }

    /// Sets the norm's gamma to zero (timm's `zero_init_last`).
    pub fn zero_init_gamma(&mut self) {
        self.bn.zero_init_gamma();
    }

    /// Convolution, norm, then the activation in place.
    pub fn forward(&self, xs: &Tensor, ctx: &ForwardCtx) -> Result<Tensor, tch::TchError> {
        self.bn.forward_act(&self.conv.forward(xs, ctx)?, self.act, ctx)
    }
}
