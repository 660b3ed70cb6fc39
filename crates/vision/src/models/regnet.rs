//! RegNetY (Radosavovic et al., "Designing Network Design Spaces",
//! arXiv 2003.13678) as timm builds it (`timm/models/regnet.py`): a 3x3
//! stride-2 stem, four stages of grouped bottlenecks with squeeze-excite
//! after the 3x3 convolution, per-block widths from the quantised linear
//! rule `w_j = w0 + wa * j`.
//!
//! Variable names follow timm (`stem.{conv,bn}`, `s{1..4}.b{j}.conv{1,2,3}.{conv,bn}`,
//! `s{k}.b{j}.se.fc{1,2}`, `s{k}.b1.downsample.{conv,bn}`, `head.fc`).
//! Stochastic depth follows timm's `calculate_drop_path_rates(rate, depths,
//! stagewise=True)`, which is `torch.linspace(0, rate, total)` split by stage
//! (linear over all blocks); the last BN of each block starts at gamma = 0.

use crate::layers::{
    drop_path, linspace_rates, Activation, ConvConfig, ConvInit, ConvNormAct, ForwardCtx, Linear,
    LinearInit, SqueezeExcite,
};
use crate::model::{ModelConfig, Network};
use tch::{nn, TchError, Tensor};

/// timm's `RegNetCfg` for the Y models (bottleneck ratio 1, `conv1x1` shortcut,
/// stem width 32, ReLU, BN).
#[derive(Debug, Clone, Copy)]
pub struct RegNetDef {
    /// Number of blocks.
    pub depth: usize,
    /// Initial width `w0`.
    pub w0: i64,
    /// Width slope `wa`.
    pub wa: f64,
    /// Width multiplier `wm` between stages.
    pub wm: f64,
    /// Channels per group of the 3x3 convolutions.
    pub group_size: i64,
    /// SE reduction relative to the block input width.
    pub se_ratio: f64,
}

/// `regnety_040` (RegNetY-4.0GF).
pub const REGNETY_040: RegNetDef =
    RegNetDef { depth: 22, w0: 96, wa: 31.41, wm: 2.24, group_size: 64, se_ratio: 0.25 };
/// `regnety_080` (RegNetY-8.0GF).
pub const REGNETY_080: RegNetDef =
    RegNetDef { depth: 17, w0: 192, wa: 76.82, wm: 2.19, group_size: 56, se_ratio: 0.25 };
/// `regnety_160` (RegNetY-16GF).
pub const REGNETY_160: RegNetDef =
    RegNetDef { depth: 18, w0: 200, wa: 106.23, wm: 2.48, group_size: 112, se_ratio: 0.25 };
/// `regnety_320` (RegNetY-32GF).
pub const REGNETY_320: RegNetDef =
    RegNetDef { depth: 20, w0: 232, wa: 115.89, wm: 2.53, group_size: 232, se_ratio: 0.25 };

/// Width and group size of one stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StageShape {
    /// Output channels.
    pub width: i64,
    /// Blocks.
    pub depth: usize,
    /// Channels per group.
    pub group_size: i64,
}

/// timm's `generate_regnet` + `adjust_widths_groups_comp`: per-block widths
/// (computed in float32 as timm does with torch), grouped into stages of equal
/// width, then the widths made divisible by the (clamped) group size.
pub fn stage_shapes(def: &RegNetDef) -> Vec<StageShape> {
    const QUANT: f32 = 8.0;
    let (w0, wa, wm) = (def.w0 as f32, def.wa as f32, def.wm as f32);
    let log_wm = def.wm.ln() as f32;
    let widths: Vec<i64> = (0..def.depth)
        .map(|j| {
            let cont = j as f32 * wa + w0;
            let exp = ((cont / w0).ln() / log_wm).round_ties_even();
            ((w0 * wm.powf(exp)) / QUANT).round_ties_even() as i64 * QUANT as i64
        })
        .collect();
    // torch.unique(sorted) with counts; the widths never decrease.
    let mut stages: Vec<StageShape> = Vec::new();
    let mut sorted = widths;
    sorted.sort_unstable();
    for w in sorted {
        match stages.last_mut() {
            Some(s) if s.width == w => s.depth += 1,
            _ => stages.push(StageShape { width: w, depth: 1, group_size: def.group_size }),
        }
    }
    for s in &mut stages {
        // Bottleneck ratio 1: groups = min(g, w); w = int(round(w / g) * g) (Python round).
        s.group_size = s.group_size.min(s.width);
        let q = (s.width as f64 / s.group_size as f64).round_ties_even();
        s.width = (q * s.group_size as f64) as i64;
    }
    stages
}

#[derive(Debug)]
struct Block {
    conv1: ConvNormAct,
    conv2: ConvNormAct,
    se: SqueezeExcite,
    conv3: ConvNormAct,
    downsample: Option<ConvNormAct>,
    drop_path_rate: f64,
}

impl Block {
    #[allow(clippy::too_many_arguments)]
    fn new(
        p: &nn::Path,
        in_chs: i64,
        out_chs: i64,
        stride: i64,
        group_size: i64,
        se_ratio: f64,
        drop_path_rate: f64,
        zero_init_last: bool,
    ) -> Block {
        let relu = Activation::Relu;
        let conv = |k: i64, stride: i64, groups: i64| ConvConfig {
            groups,
            init: ConvInit::FanOutPerGroup,
            ..ConvConfig::symmetric(k, stride)
        };
        let mut conv3 = ConvNormAct::timm(
            &(p / "conv3"),
            out_chs,
            out_chs,
            1,
            conv(1, 1, 1),
            Activation::Identity,
        );
        if zero_init_last {
            conv3.zero_init_gamma();
        }
        let se_channels = (in_chs as f64 * se_ratio).round_ties_even() as i64;
        Block {
            conv1: ConvNormAct::timm(&(p / "conv1"), in_chs, out_chs, 1, conv(1, 1, 1), relu),
            conv2: ConvNormAct::timm(
                &(p / "conv2"),
                out_chs,
                out_chs,
                3,
                conv(3, stride, out_chs / group_size),
                relu,
            ),
            se: SqueezeExcite::new(
                &(p / "se"),
                ("fc1", "fc2"),
                out_chs,
                se_channels,
                relu,
                ConvInit::FanOutPerGroup,
            ),
            conv3,
            downsample: (in_chs != out_chs || stride != 1).then(|| {
                ConvNormAct::timm(
                    &(p / "downsample"),
                    in_chs,
                    out_chs,
                    1,
                    conv(1, stride, 1),
                    Activation::Identity,
                )
            }),
            drop_path_rate,
        }
    }

    fn forward(&self, xs: &Tensor, ctx: &ForwardCtx) -> Result<Tensor, TchError> {
        let mut ys = self.conv1.forward(xs, ctx)?;
        ys = self.conv2.forward(&ys, ctx)?;
        ys = self.se.forward(&ys, ctx)?;
        ys = self.conv3.forward(&ys, ctx)?;
        let shortcut = match &self.downsample {
            Some(d) => d.forward(xs, ctx)?,
            None => xs.shallow_clone(),
        };
        let mut ys = drop_path(&ys, self.drop_path_rate, ctx.train)?;
        ys = ys.f_add_(&shortcut)?;
        ys.f_relu_()
    }
}

/// A RegNetY with timm's variable names.
#[derive(Debug)]
pub struct RegNet {
    stem: ConvNormAct,
    blocks: Vec<Block>,
    fc: Linear,
}

impl RegNet {
    /// Builds the variables of `def` under `root`.
    pub fn new(root: &nn::Path, def: RegNetDef, config: &ModelConfig) -> RegNet {
        const STEM_WIDTH: i64 = 32;
        let stem_conv =
            ConvConfig { init: ConvInit::FanOutPerGroup, ..ConvConfig::symmetric(3, 2) };
        let stem = ConvNormAct::timm(
            &(root / "stem"),
            config.in_chans,
            STEM_WIDTH,
            3,
            stem_conv,
            Activation::Relu,
        );
        let stages = stage_shapes(&def);
        let total: usize = stages.iter().map(|s| s.depth).sum();
        let rates = linspace_rates(config.drop_path_rate, total);
        let mut blocks = Vec::with_capacity(total);
        let mut in_chs = STEM_WIDTH;
        for (i, stage) in stages.iter().enumerate() {
            let stage_path = root / format!("s{}", i + 1);
            for j in 0..stage.depth {
                blocks.push(Block::new(
                    &(&stage_path / format!("b{}", j + 1)),
                    in_chs,
                    stage.width,
                    if j == 0 { 2 } else { 1 },
                    stage.group_size,
                    def.se_ratio,
                    rates[blocks.len()],
                    config.zero_init_last,
                ));
                in_chs = stage.width;
            }
        }
        let fc = Linear::with_init(
            &(root / "head" / "fc"),
            in_chs,
            config.num_classes,
            true,
            LinearInit::Normal(0.01),
        );
        RegNet { stem, blocks, fc }
    }
}

impl Network for RegNet {
    fn forward(&self, xs: &Tensor, ctx: &ForwardCtx) -> Result<Tensor, TchError> {
        let mut ys = self.stem.forward(xs, ctx)?;
        for block in &self.blocks {
            ys = block.forward(&ys, ctx)?;
        }
        let pooled = ys.f_adaptive_avg_pool2d([1, 1])?.f_flatten(1, -1)?;
        self.fc.forward(&pooled, ctx)
    }

    fn drop_path_rates(&self) -> Vec<f64> {
        self.blocks.iter().map(|b| b.drop_path_rate).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stage widths, depths and group sizes printed by timm 1.0.31
    /// (`[(s.b1.conv1.conv.out_channels, len(s), ...) for s in model.s1..s4]`).
    #[test]
    fn stage_shapes_match_timm() {
        let shape = |width, depth, group_size| StageShape { width, depth, group_size };
        assert_eq!(
            stage_shapes(&REGNETY_040),
            vec![shape(128, 2, 64), shape(192, 6, 64), shape(512, 12, 64), shape(1088, 2, 64)]
        );
        assert_eq!(
            stage_shapes(&REGNETY_080),
            vec![shape(168, 2, 56), shape(448, 4, 56), shape(896, 10, 56), shape(2016, 1, 56)]
        );
        assert_eq!(
            stage_shapes(&REGNETY_160),
            vec![shape(224, 2, 112), shape(448, 4, 112), shape(1232, 11, 112), shape(3024, 1, 112)]
        );
        assert_eq!(
            stage_shapes(&REGNETY_320),
            vec![shape(232, 2, 232), shape(696, 5, 232), shape(1392, 12, 232), shape(3712, 1, 232)]
        );
    }
}
