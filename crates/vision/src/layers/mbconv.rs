//! The mobile inverted-bottleneck blocks of the EfficientNet family
//! (`timm/models/_efficientnet_blocks.py`): depthwise-separable (`ds`),
//! inverted residual / MBConv (`ir`, Sandler et al., arXiv 1801.04381) and
//! edge residual / FusedMBConv (`er`, Tan & Le, arXiv 2104.00298), with
//! EfficientNet's squeeze-excite and stochastic depth.

use super::{
    drop_path, make_divisible, symmetric_padding, Activation, ConvConfig, ConvInit, ConvNormAct,
    ForwardCtx, SqueezeExcite,
};
use tch::{nn, Tensor};

/// The block type of one EfficientNet stage (the leading token of timm's
/// block strings, e.g. `ir_r2_k3_s2_e6_c24_se0.25`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MbKind {
    /// `ds`: depthwise k x k (+ SE) then pointwise linear projection.
    DepthwiseSeparable,
    /// `ir`: pointwise expansion, depthwise k x k (+ SE), pointwise linear projection.
    InvertedResidual,
    /// `er`: dense k x k expansion (+ SE), pointwise linear projection.
    EdgeResidual,
}

/// Everything one block needs, after timm's builder resolved it.
#[derive(Debug, Clone, Copy)]
pub struct MbConfig {
    /// Block type.
    pub kind: MbKind,
    /// Input channels.
    pub in_chs: i64,
    /// Output channels (already rounded by the model's `round_chs_fn`).
    pub out_chs: i64,
    /// Kernel of the depthwise (`ds`, `ir`) or expansion (`er`) convolution.
    pub kernel: i64,
    /// Stride of that convolution.
    pub stride: i64,
    /// Expansion ratio (`ir`, `er`; 1 for `ds`).
    pub exp_ratio: f64,
    /// SE ratio relative to the block input (`se0.25`), 0 for none.
    pub se_ratio: f64,
    /// Whether the residual connection is forced off (`noskip`).
    pub noskip: bool,
    /// Activation of the block.
    pub act: Activation,
    /// Stochastic-depth rate of the residual branch.
    pub drop_path_rate: f64,
}

/// One EfficientNet block with timm's variable names.
#[derive(Debug)]
pub struct MbBlock {
    expand: Option<ConvNormAct>,
    depthwise: Option<ConvNormAct>,
    se: Option<SqueezeExcite>,
    project: ConvNormAct,
    has_skip: bool,
    drop_path_rate: f64,
}

impl MbBlock {
    /// Creates the block's variables under `p`.
    pub fn new(p: &nn::Path, c: &MbConfig) -> MbBlock {
        let conv = |k: i64, stride: i64, groups: i64| ConvConfig {
            stride,
            padding: symmetric_padding(k, stride, 1),
            groups,
            init: ConvInit::FanOutPerGroup,
            ..Default::default()
        };
        let cna = |conv_name: &str, bn_name: &str, c_in, c_out, k, config, act| {
            ConvNormAct::new(&(p / conv_name), &(p / bn_name), c_in, c_out, k, config, act)
        };
        // timm divides the SE ratio by the expansion ratio and applies it to the
        // expanded width; `SqueezeExcite` rounds with Python's round (half to even).
        let exp_ratio = match c.kind {
            MbKind::DepthwiseSeparable => 1.0,
            _ => c.exp_ratio,
        };
        let se = |chs: i64| {
            (c.se_ratio > 0.0).then(|| {
                let rd = (chs as f64 * (c.se_ratio / exp_ratio)).round_ties_even() as i64;
                SqueezeExcite::new(
                    &(p / "se"),
                    ("conv_reduce", "conv_expand"),
                    chs,
                    rd,
                    c.act,
                    ConvInit::FanOutPerGroup,
                )
            })
        };
        let has_skip = c.stride == 1 && c.in_chs == c.out_chs && !c.noskip;
        let (k, s) = (c.kernel, c.stride);
        let linear = Activation::Identity;
        match c.kind {
            MbKind::DepthwiseSeparable => MbBlock {
                expand: None,
                depthwise: Some(cna(
                    "conv_dw",
                    "bn1",
                    c.in_chs,
                    c.in_chs,
                    k,
                    conv(k, s, c.in_chs),
                    c.act,
                )),
                se: se(c.in_chs),
                project: cna("conv_pw", "bn2", c.in_chs, c.out_chs, 1, conv(1, 1, 1), linear),
                has_skip,
                drop_path_rate: c.drop_path_rate,
            },
            MbKind::InvertedResidual => {
                let mid = make_divisible(c.in_chs as f64 * c.exp_ratio, 8, 0.9);
                MbBlock {
                    expand: Some(cna("conv_pw", "bn1", c.in_chs, mid, 1, conv(1, 1, 1), c.act)),
                    depthwise: Some(cna("conv_dw", "bn2", mid, mid, k, conv(k, s, mid), c.act)),
                    se: se(mid),
                    project: cna("conv_pwl", "bn3", mid, c.out_chs, 1, conv(1, 1, 1), linear),
                    has_skip,
                    drop_path_rate: c.drop_path_rate,
                }
            }
            MbKind::EdgeResidual => {
                let mid = make_divisible(c.in_chs as f64 * c.exp_ratio, 8, 0.9);
                MbBlock {
                    expand: Some(cna("conv_exp", "bn1", c.in_chs, mid, k, conv(k, s, 1), c.act)),
                    depthwise: None,
                    se: se(mid),
                    project: cna("conv_pwl", "bn2", mid, c.out_chs, 1, conv(1, 1, 1), linear),
                    has_skip,
                    drop_path_rate: c.drop_path_rate,
                }
            }
        }
    }

    /// The block's stochastic-depth rate (used only when it has a skip connection).
    pub fn drop_path_rate(&self) -> f64 {
        self.drop_path_rate
    }

    /// Runs the block.
    pub fn forward(&self, xs: &Tensor, ctx: &ForwardCtx) -> Result<Tensor, tch::TchError> {
        let mut ys = match &self.expand {
            Some(expand) => expand.forward(xs, ctx)?,
            None => xs.shallow_clone(),
        };
        if let Some(dw) = &self.depthwise {
            ys = dw.forward(&ys, ctx)?;
        }
        if let Some(se) = &self.se {
            ys = se.forward(&ys, ctx)?;
        }
        ys = self.project.forward(&ys, ctx)?;
        if self.has_skip {
            ys = drop_path(&ys, self.drop_path_rate, ctx.train)?.f_add(xs)?;
        }
        Ok(ys)
    }
}
