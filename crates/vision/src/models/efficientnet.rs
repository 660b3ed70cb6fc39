//! EfficientNet (Tan & Le, arXiv 1905.11946) and timm's EfficientNetV2 "rw"
//! variants (Tan & Le, "EfficientNetV2", arXiv 2104.00298; `rw` is Ross
//! Wightman's pre-release small/medium definition) as
//! `timm/models/efficientnet.py` builds them: a 3x3 stride-2 stem, stages of
//! depthwise-separable / inverted-residual (MBConv) / edge-residual
//! (FusedMBConv) blocks with squeeze-excite, a 1x1 head convolution, SiLU,
//! PyTorch-style symmetric padding (`pad_type=''`, not the `tf_*` "same"
//! padding) and PyTorch's BN defaults (eps 1e-5, momentum 0.1).
//!
//! Channels are scaled with `round_channels` (multiple of 8, never more than
//! 10% down), depths with `ceil(repeats * depth_multiplier)`. Stochastic depth
//! of block `i` of `n` is `drop_path_rate * i / n` (timm's builder rule).
//! Variable names: `conv_stem`, `bn1`, `blocks.{stage}.{block}.*`, `conv_head`,
//! `bn2`, `classifier`.

use crate::layers::{
    make_divisible, Activation, ConvConfig, ConvInit, ConvNormAct, ForwardCtx, Linear, LinearInit,
    MbBlock, MbConfig, MbKind,
};
use crate::model::{ModelConfig, Network};
use tch::{nn, TchError, Tensor};

/// One stage of an architecture definition (one timm block string).
#[derive(Debug, Clone, Copy)]
pub struct StageDef {
    /// Block type (`ds`, `ir`, `er`).
    pub kind: MbKind,
    /// Repeats before depth scaling (`r`).
    pub repeats: usize,
    /// Kernel (`k`).
    pub kernel: i64,
    /// Stride of the first block (`s`).
    pub stride: i64,
    /// Expansion ratio (`e`).
    pub exp_ratio: f64,
    /// Output channels before width scaling (`c`).
    pub channels: i64,
    /// Squeeze-excite ratio (`se`), 0 for none.
    pub se_ratio: f64,
}

const fn stage(
    kind: MbKind,
    repeats: usize,
    kernel: i64,
    stride: i64,
    exp_ratio: f64,
    channels: i64,
    se_ratio: f64,
) -> StageDef {
    StageDef { kind, repeats, kernel, stride, exp_ratio, channels, se_ratio }
}

use MbKind::{DepthwiseSeparable as DS, EdgeResidual as ER, InvertedResidual as IR};

/// EfficientNet-B0's stages (`ds_r1_k3_s1_e1_c16_se0.25`, `ir_r2_k3_s2_e6_c24_se0.25`, ...).
const EFFICIENTNET_STAGES: [StageDef; 7] = [
    stage(DS, 1, 3, 1, 1.0, 16, 0.25),
    stage(IR, 2, 3, 2, 6.0, 24, 0.25),
    stage(IR, 2, 5, 2, 6.0, 40, 0.25),
    stage(IR, 3, 3, 2, 6.0, 80, 0.25),
    stage(IR, 3, 5, 1, 6.0, 112, 0.25),
    stage(IR, 4, 5, 2, 6.0, 192, 0.25),
    stage(IR, 1, 3, 1, 6.0, 320, 0.25),
];

/// EfficientNetV2-S "rw" stages (`er_r2_k3_s1_e1_c24`, ..., `ir_r15_k3_s2_e6_c272_se0.25`).
const EFFICIENTNETV2_RW_STAGES: [StageDef; 6] = [
    stage(ER, 2, 3, 1, 1.0, 24, 0.0),
    stage(ER, 4, 3, 2, 4.0, 48, 0.0),
    stage(ER, 4, 3, 2, 4.0, 64, 0.0),
    stage(IR, 6, 3, 2, 4.0, 128, 0.25),
    stage(IR, 9, 3, 1, 6.0, 160, 0.25),
    stage(IR, 15, 3, 2, 6.0, 272, 0.25),
];

/// An EfficientNet variant: the stage table and its multipliers.
#[derive(Debug, Clone, Copy)]
pub struct EfficientNetDef {
    /// Stages before scaling.
    pub stages: &'static [StageDef],
    /// Width multiplier (`channel_multiplier`).
    pub channel_multiplier: f64,
    /// Depth multiplier of each stage (`depth_multiplier`, a tuple for v2-rw-m).
    pub depth_multipliers: &'static [f64],
    /// Stem channels before scaling.
    pub stem_size: i64,
    /// Head channels before scaling (`num_features`).
    pub num_features: i64,
}

const fn effnet(channel_multiplier: f64, depth: &'static [f64]) -> EfficientNetDef {
    EfficientNetDef {
        stages: &EFFICIENTNET_STAGES,
        channel_multiplier,
        depth_multipliers: depth,
        stem_size: 32,
        num_features: 1280,
    }
}

/// `efficientnet_b0`: width 1.0, depth 1.0.
pub const EFFICIENTNET_B0: EfficientNetDef = effnet(1.0, &[1.0; 7]);
/// `efficientnet_b1`: width 1.0, depth 1.1.
pub const EFFICIENTNET_B1: EfficientNetDef = effnet(1.0, &[1.1; 7]);
/// `efficientnet_b2`: width 1.1, depth 1.2.
pub const EFFICIENTNET_B2: EfficientNetDef = effnet(1.1, &[1.2; 7]);
/// `efficientnet_b3`: width 1.2, depth 1.4.
pub const EFFICIENTNET_B3: EfficientNetDef = effnet(1.2, &[1.4; 7]);
/// `efficientnet_b4`: width 1.4, depth 1.8.
pub const EFFICIENTNET_B4: EfficientNetDef = effnet(1.4, &[1.8; 7]);
/// `efficientnetv2_rw_s`: width 1.0, depth 1.0, head 1792.
pub const EFFICIENTNETV2_RW_S: EfficientNetDef = EfficientNetDef {
    stages: &EFFICIENTNETV2_RW_STAGES,
    channel_multiplier: 1.0,
    depth_multipliers: &[1.0; 6],
    stem_size: 24,
    num_features: 1792,
};
/// `efficientnetv2_rw_m`: width 1.2, depth 1.2 for the first four stages and 1.6 for the last two.
pub const EFFICIENTNETV2_RW_M: EfficientNetDef = EfficientNetDef {
    channel_multiplier: 1.2,
    depth_multipliers: &[1.2, 1.2, 1.2, 1.2, 1.6, 1.6],
    ..EFFICIENTNETV2_RW_S
};

impl EfficientNetDef {
    /// timm's `round_channels(c, multiplier, divisor=8)`.
    pub fn round_channels(&self, channels: i64) -> i64 {
        make_divisible(channels as f64 * self.channel_multiplier, 8, 0.9)
    }

    /// Blocks per stage after depth scaling (`ceil(repeats * multiplier)`).
    pub fn stage_depths(&self) -> Vec<usize> {
        self.stages
            .iter()
            .zip(self.depth_multipliers)
            .map(|(s, m)| (s.repeats as f64 * m).ceil() as usize)
            .collect()
    }
}

/// An EfficientNet with timm's variable names.
#[derive(Debug)]
pub struct EfficientNet {
    stem: ConvNormAct,
    blocks: Vec<MbBlock>,
    head: ConvNormAct,
    classifier: Linear,
}

impl EfficientNet {
    /// Builds the variables of `def` under `root`.
    pub fn new(root: &nn::Path, def: EfficientNetDef, config: &ModelConfig) -> EfficientNet {
        let act = Activation::Silu;
        let conv = |k: i64, stride: i64| ConvConfig {
            init: ConvInit::FanOutPerGroup,
            ..ConvConfig::symmetric(k, stride)
        };
        let stem_size = def.round_channels(def.stem_size);
        let stem = ConvNormAct::new(
            &(root / "conv_stem"),
            &(root / "bn1"),
            config.in_chans,
            stem_size,
            3,
            conv(3, 2),
            act,
        );
        let depths = def.stage_depths();
        let total: usize = depths.iter().sum();
        let mut blocks = Vec::with_capacity(total);
        let mut in_chs = stem_size;
        for (i, (s, &depth)) in def.stages.iter().zip(&depths).enumerate() {
            let out_chs = def.round_channels(s.channels);
            for j in 0..depth {
                let block_config = MbConfig {
                    kind: s.kind,
                    in_chs,
                    out_chs,
                    kernel: s.kernel,
                    stride: if j == 0 { s.stride } else { 1 },
                    exp_ratio: s.exp_ratio,
                    se_ratio: s.se_ratio,
                    noskip: false,
                    act,
                    drop_path_rate: config.drop_path_rate * blocks.len() as f64 / total as f64,
                };
                blocks.push(MbBlock::new(&(root / "blocks" / i / j), &block_config));
                in_chs = out_chs;
            }
        }
        let num_features = def.round_channels(def.num_features);
        let head = ConvNormAct::new(
            &(root / "conv_head"),
            &(root / "bn2"),
            in_chs,
            num_features,
            1,
            conv(1, 1),
            act,
        );
        let classifier = Linear::with_init(
            &(root / "classifier"),
            num_features,
            config.num_classes,
            true,
            LinearInit::UniformFanOut,
        );
        EfficientNet { stem, blocks, head, classifier }
    }
}

impl Network for EfficientNet {
    fn forward(&self, xs: &Tensor, ctx: &ForwardCtx) -> Result<Tensor, TchError> {
        let mut ys = self.stem.forward(xs, ctx)?;
        for block in &self.blocks {
            ys = block.forward(&ys, ctx)?;
        }
        ys = self.head.forward(&ys, ctx)?;
        let pooled = ys.f_adaptive_avg_pool2d([1, 1])?.f_flatten(1, -1)?;
        self.classifier.forward(&pooled, ctx)
    }

    fn drop_path_rates(&self) -> Vec<f64> {
        self.blocks.iter().map(MbBlock::drop_path_rate).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_scaling_matches_timm() {
        assert_eq!(EFFICIENTNET_B0.stage_depths(), vec![1, 2, 2, 3, 3, 4, 1]);
        assert_eq!(EFFICIENTNET_B1.stage_depths(), vec![2, 3, 3, 4, 4, 5, 2]);
        assert_eq!(EFFICIENTNET_B4.stage_depths(), vec![2, 4, 4, 6, 6, 8, 2]);
        assert_eq!(EFFICIENTNETV2_RW_M.stage_depths(), vec![3, 5, 5, 8, 15, 24]);
    }

    #[test]
    fn width_scaling_matches_timm() {
        assert_eq!(EFFICIENTNET_B2.round_channels(1280), 1408);
        assert_eq!(EFFICIENTNET_B4.round_channels(32), 48);
        assert_eq!(EFFICIENTNETV2_RW_M.round_channels(24), 32);
        assert_eq!(EFFICIENTNETV2_RW_M.round_channels(1792), 2152);
    }
}
