//! ResNet (He et al., "Deep Residual Learning for Image Recognition",
//! arXiv 1512.03385) in timm's "v1.5" form: the stride of a bottleneck sits on
//! its 3x3 convolution, the shortcut is a 1x1 convolution plus BN.
//!
//! Variable names follow `timm.models.resnet.ResNet` exactly (`conv1`, `bn1`,
//! `layer{1..4}.{i}.{conv,bn}{1..3}`, `layer{k}.0.downsample.{0,1}`, `fc`).
//! Stochastic depth rises linearly over all blocks (timm's `drop_path_rate`),
//! and the last BN of every residual branch starts with gamma = 0.

use crate::layers::{
    drop_path, stochastic_depth_rates, BatchNorm2d, Conv2d, ConvConfig, ForwardCtx, Linear,
};
use crate::model::{ModelConfig, Network};
use tch::{nn, TchError, Tensor};

/// Residual block type of a ResNet variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// Two 3x3 convolutions (ResNet-18/34), expansion 1.
    Basic,
    /// 1x1 - 3x3 - 1x1 convolutions (ResNet-50 and deeper), expansion 4.
    Bottleneck,
}

impl BlockKind {
    fn expansion(self) -> i64 {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

/// The shape of a ResNet variant.
#[derive(Debug, Clone, Copy)]
pub struct ResNetDef {
    /// Block type.
    pub block: BlockKind,
    /// Number of blocks in each of the four stages.
    pub layers: [usize; 4],
}

/// `resnet18`: basic blocks `[2, 2, 2, 2]`.
pub const RESNET18: ResNetDef = ResNetDef { block: BlockKind::Basic, layers: [2, 2, 2, 2] };
/// `resnet34`: basic blocks `[3, 4, 6, 3]`.
pub const RESNET34: ResNetDef = ResNetDef { block: BlockKind::Basic, layers: [3, 4, 6, 3] };
/// `resnet50`: bottlenecks `[3, 4, 6, 3]`.
pub const RESNET50: ResNetDef = ResNetDef { block: BlockKind::Bottleneck, layers: [3, 4, 6, 3] };
/// `resnet101`: bottlenecks `[3, 4, 23, 3]`.
pub const RESNET101: ResNetDef = ResNetDef { block: BlockKind::Bottleneck, layers: [3, 4, 23, 3] };
/// `resnet152`: bottlenecks `[3, 8, 36, 3]`.
pub const RESNET152: ResNetDef = ResNetDef { block: BlockKind::Bottleneck, layers: [3, 8, 36, 3] };

#[derive(Debug)]
struct Block {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    conv2: Conv2d,
    bn2: BatchNorm2d,
    /// Third convolution of a bottleneck.
    conv3: Option<(Conv2d, BatchNorm2d)>,
    downsample: Option<(Conv2d, BatchNorm2d)>,
    drop_path_rate: f64,
}

impl Block {
    fn new(
        p: &nn::Path,
        kind: BlockKind,
        inplanes: i64,
        planes: i64,
        stride: i64,
        drop_path_rate: f64,
        zero_init_last: bool,
    ) -> Block {
        let outplanes = planes * kind.expansion();
        let downsample = (stride != 1 || inplanes != outplanes).then(|| {
            let d = p / "downsample";
            let conv = Conv2d::new(
                &(&d / 0),
                inplanes,
                outplanes,
                1,
                ConvConfig { stride, ..Default::default() },
            );
            (conv, BatchNorm2d::new(&(&d / 1), outplanes))
        });
        let k3 = |s| ConvConfig { stride: s, padding: 1, ..Default::default() };
        let mut block = match kind {
            BlockKind::Basic => Block {
                conv1: Conv2d::new(&(p / "conv1"), inplanes, planes, 3, k3(stride)),
                bn1: BatchNorm2d::new(&(p / "bn1"), planes),
                conv2: Conv2d::new(&(p / "conv2"), planes, planes, 3, k3(1)),
                bn2: BatchNorm2d::new(&(p / "bn2"), planes),
                conv3: None,
                downsample,
                drop_path_rate,
            },
            BlockKind::Bottleneck => Block {
                conv1: Conv2d::new(&(p / "conv1"), inplanes, planes, 1, ConvConfig::default()),
                bn1: BatchNorm2d::new(&(p / "bn1"), planes),
                conv2: Conv2d::new(&(p / "conv2"), planes, planes, 3, k3(stride)),
                bn2: BatchNorm2d::new(&(p / "bn2"), planes),
                conv3: Some((
                    Conv2d::new(&(p / "conv3"), planes, outplanes, 1, ConvConfig::default()),
                    BatchNorm2d::new(&(p / "bn3"), outplanes),
                )),
                downsample,
                drop_path_rate,
            },
        };
        if zero_init_last {
            match &mut block.conv3 {
                Some((_, bn3)) => bn3.zero_init_gamma(),
                None => block.bn2.zero_init_gamma(),
            }
        }
        block
    }

    fn forward(&self, xs: &Tensor, ctx: &ForwardCtx) -> Result<Tensor, TchError> {
        let mut ys = self.bn1.forward(&self.conv1.forward(xs, ctx)?, ctx)?.f_relu()?;
        ys = self.bn2.forward(&self.conv2.forward(&ys, ctx)?, ctx)?;
        if let Some((conv3, bn3)) = &self.conv3 {
            ys = bn3.forward(&conv3.forward(&ys.f_relu()?, ctx)?, ctx)?;
        }
        ys = drop_path(&ys, self.drop_path_rate, ctx.train)?;
        let shortcut = match &self.downsample {
            Some((conv, bn)) => bn.forward(&conv.forward(xs, ctx)?, ctx)?,
            None => xs.shallow_clone(),
        };
        ys.f_add(&shortcut)?.f_relu()
    }
}

/// A ResNet with timm's variable names.
#[derive(Debug)]
pub struct ResNet {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    stages: Vec<Vec<Block>>,
    fc: Linear,
}

impl ResNet {
    /// Builds the variables of `def` under `root` (the VarStore's root path).
    pub fn new(root: &nn::Path, def: ResNetDef, config: &ModelConfig) -> ResNet {
        let conv1 = Conv2d::new(
            &(root / "conv1"),
            config.in_chans,
            64,
            7,
            ConvConfig { stride: 2, padding: 3, ..Default::default() },
        );
        let bn1 = BatchNorm2d::new(&(root / "bn1"), 64);
        let total_blocks: usize = def.layers.iter().sum();
        let rates = stochastic_depth_rates(config.drop_path_rate, total_blocks);
        let mut block_index = 0;
        let mut inplanes = 64;
        let mut stages = Vec::with_capacity(4);
        for (stage, &depth) in def.layers.iter().enumerate() {
            let planes = 64 << stage;
            let stride = if stage == 0 { 1 } else { 2 };
            let stage_path = root / format!("layer{}", stage + 1);
            let mut blocks = Vec::with_capacity(depth);
            for i in 0..depth {
                let block = Block::new(
                    &(&stage_path / i),
                    def.block,
                    inplanes,
                    planes,
                    if i == 0 { stride } else { 1 },
                    rates[block_index],
                    config.zero_init_last,
                );
                inplanes = planes * def.block.expansion();
                block_index += 1;
                blocks.push(block);
            }
            stages.push(blocks);
        }
        let fc = Linear::new(&(root / "fc"), inplanes, config.num_classes);
        ResNet { conv1, bn1, stages, fc }
    }
}

impl Network for ResNet {
    fn forward(&self, xs: &Tensor, ctx: &ForwardCtx) -> Result<Tensor, TchError> {
        let mut ys = self.bn1.forward(&self.conv1.forward(xs, ctx)?, ctx)?.f_relu()?;
        ys = ys.f_max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false)?;
        for block in self.stages.iter().flatten() {
            ys = block.forward(&ys, ctx)?;
        }
        let pooled = ys.f_adaptive_avg_pool2d([1, 1])?.f_flatten(1, -1)?;
        self.fc.forward(&pooled, ctx)
    }
}
