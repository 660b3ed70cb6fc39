//! ResNet (He et al., "Deep Residual Learning for Image Recognition",
//! arXiv 1512.03385) and the variants timm builds with the same class
//! (`timm/models/resnet.py`): the stride of a bottleneck sits on its 3x3
//! convolution ("v1.5"); ResNet-D (Bag of Tricks, arXiv 1812.01187: deep
//! 3x3 stem, average-pool shortcut), ResNeXt (cardinality, arXiv 1611.05431),
//! SE-ResNet / SENet-154 (squeeze-excite, arXiv 1709.01507) and ECA-ResNet
//! (efficient channel attention, arXiv 1910.03151) with its tiered stem.
//!
//! Variable names follow `timm.models.resnet.ResNet` exactly (`conv1` or the
//! deep stem `conv1.{0,1,3,4,6}`, `bn1`, `layer{1..4}.{i}.{conv,bn}{1..3}`,
//! `layer{k}.{i}.se.*`, `layer{k}.0.downsample.*`, `fc`). Stochastic depth
//! rises linearly over all blocks (`drop_path_rate * i / (n - 1)`), and the
//! last BN of every residual branch starts with gamma = 0.

use crate::layers::{
    drop_path, make_divisible, stochastic_depth_rates, Activation, BatchNorm2d, Conv2d, ConvConfig,
    ConvInit, Eca, ForwardCtx, Linear, SqueezeExcite,
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

/// timm's `stem_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StemType {
    /// One 7x7 stride-2 convolution of 64 channels.
    Single,
    /// `deep`: three 3x3 convolutions of `stem_width, stem_width, 2 * stem_width`.
    Deep,
    /// `deep_tiered`: three 3x3 convolutions of `3 * (stem_width / 4), stem_width, 2 * stem_width`.
    DeepTiered,
}

/// Channel attention after the last BN of each block (timm's `attn_layer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockAttn {
    /// None.
    None,
    /// `se`: `SEModule` with reduction 1/16 rounded to a multiple of 8.
    SqueezeExcite,
    /// `eca`: `EcaModule` with the adaptive kernel size.
    Eca,
}

/// The shape of a ResNet variant (the arguments of timm's `ResNet`).
#[derive(Debug, Clone, Copy)]
pub struct ResNetDef {
    /// Block type.
    pub block: BlockKind,
    /// Number of blocks in each of the four stages.
    pub layers: [usize; 4],
    /// Groups of the 3x3 bottleneck convolution.
    pub cardinality: i64,
    /// Bottleneck width per group at 64 planes.
    pub base_width: i64,
    /// Width of the deep stem's first convolutions.
    pub stem_width: i64,
    /// Stem layout.
    pub stem_type: StemType,
    /// Average-pool then 1x1 convolution on the downsampling shortcut (`avg_down`).
    pub avg_down: bool,
    /// Kernel of the strided shortcut convolution (`down_kernel_size`, 3 for SENet).
    pub down_kernel_size: i64,
    /// Width reduction of a block's first convolution (`block_reduce_first`, 2 for SENet).
    pub block_reduce_first: i64,
    /// Channel attention in every block.
    pub attn: BlockAttn,
}

/// `resnet18`: basic blocks `[2, 2, 2, 2]`.
pub const RESNET18: ResNetDef = ResNetDef {
    block: BlockKind::Basic,
    layers: [2, 2, 2, 2],
    cardinality: 1,
    base_width: 64,
    stem_width: 64,
    stem_type: StemType::Single,
    avg_down: false,
    down_kernel_size: 1,
    block_reduce_first: 1,
    attn: BlockAttn::None,
};
/// `resnet34`: basic blocks `[3, 4, 6, 3]`.
pub const RESNET34: ResNetDef = ResNetDef { layers: [3, 4, 6, 3], ..RESNET18 };
/// `resnet50`: bottlenecks `[3, 4, 6, 3]`.
pub const RESNET50: ResNetDef = ResNetDef { block: BlockKind::Bottleneck, ..RESNET34 };
/// `resnet101`: bottlenecks `[3, 4, 23, 3]`.
pub const RESNET101: ResNetDef = ResNetDef { layers: [3, 4, 23, 3], ..RESNET50 };
/// `resnet152`: bottlenecks `[3, 8, 36, 3]`.
pub const RESNET152: ResNetDef = ResNetDef { layers: [3, 8, 36, 3], ..RESNET50 };
/// `resnet50d`: deep stem of width 32, average-pool shortcuts.
pub const RESNET50D: ResNetDef =
    ResNetDef { stem_width: 32, stem_type: StemType::Deep, avg_down: true, ..RESNET50 };
/// `seresnet50`: ResNet-50 with squeeze-excite.
pub const SERESNET50: ResNetDef = ResNetDef { attn: BlockAttn::SqueezeExcite, ..RESNET50 };
/// `senet154`: `[3, 8, 36, 3]`, 64 groups of width 4, deep stem of width 64,
/// halved first convolution, 3x3 strided shortcuts, squeeze-excite.
pub const SENET154: ResNetDef = ResNetDef {
    layers: [3, 8, 36, 3],
    cardinality: 64,
    base_width: 4,
    stem_type: StemType::Deep,
    down_kernel_size: 3,
    block_reduce_first: 2,
    attn: BlockAttn::SqueezeExcite,
    ..RESNET50
};
/// `resnext50_32x4d`: ResNet-50 with 32 groups of width 4.
pub const RESNEXT50_32X4D: ResNetDef = ResNetDef { cardinality: 32, base_width: 4, ..RESNET50 };
/// `ecaresnet50t`: tiered deep stem of width 32, average-pool shortcuts, ECA.
pub const ECARESNET50T: ResNetDef = ResNetDef {
    stem_width: 32,
    stem_type: StemType::DeepTiered,
    avg_down: true,
    attn: BlockAttn::Eca,
    ..RESNET50
};
/// `ecaresnet269d`: `[3, 30, 48, 8]`, deep stem of width 32, average-pool shortcuts, ECA.
pub const ECARESNET269D: ResNetDef = ResNetDef {
    layers: [3, 30, 48, 8],
    stem_width: 32,
    stem_type: StemType::Deep,
    avg_down: true,
    attn: BlockAttn::Eca,
    ..RESNET50
};

/// The convolutions before the first stage.
#[derive(Debug)]
enum Stem {
    /// `conv1` (7x7).
    Single(Conv2d),
    /// `conv1.0`, `conv1.1` (BN), `conv1.3`, `conv1.4` (BN), `conv1.6`.
    Deep { convs: Box<[Conv2d; 3]>, norms: Box<[BatchNorm2d; 2]> },
}

#[derive(Debug)]
enum Attn {
    Se(SqueezeExcite),
    Eca(Eca),
}

impl Attn {
    fn new(p: &nn::Path, kind: BlockAttn, channels: i64) -> Option<Attn> {
        match kind {
            BlockAttn::None => None,
            BlockAttn::SqueezeExcite => {
                let rd = make_divisible(channels as f64 / 16.0, 8, 0.0);
                Some(Attn::Se(SqueezeExcite::new(
                    &(p / "se"),
                    ("fc1", "fc2"),
                    channels,
                    rd,
                    Activation::Relu,
                    ConvInit::KaimingFanOut,
                )))
            }
            BlockAttn::Eca => Some(Attn::Eca(Eca::new(&(p / "se"), channels))),
        }
    }

    fn forward(&self, xs: &Tensor, ctx: &ForwardCtx) -> Result<Tensor, TchError> {
        match self {
            Attn::Se(se) => se.forward(xs, ctx),
            Attn::Eca(eca) => eca.forward(xs, ctx),
        }
    }
}

#[derive(Debug)]
struct Shortcut {
    /// `avg_pool2d(2, stride, ceil_mode, count_include_pad=False)` first (`avg_down`).
    avg_pool: bool,
    conv: Conv2d,
    bn: BatchNorm2d,
}

impl Shortcut {
    fn forward(&self, xs: &Tensor, ctx: &ForwardCtx) -> Result<Tensor, TchError> {
        let pooled;
        let input = if self.avg_pool {
            pooled = xs.f_avg_pool2d([2, 2], [2, 2], [0, 0], true, false, None)?;
            &pooled
        } else {
            xs
        };
        self.bn.forward(&self.conv.forward(input, ctx)?, ctx)
    }
}

#[derive(Debug)]
struct Block {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    conv2: Conv2d,
    bn2: BatchNorm2d,
    /// Third convolution of a bottleneck.
    conv3: Option<(Conv2d, BatchNorm2d)>,
    attn: Option<Attn>,
    downsample: Option<Shortcut>,
    drop_path_rate: f64,
}

/// Where a block sits and what it gets.
#[derive(Debug, Clone, Copy)]
struct BlockArgs {
    inplanes: i64,
    planes: i64,
    stride: i64,
    drop_path_rate: f64,
}

impl Block {
    fn new(p: &nn::Path, def: &ResNetDef, a: BlockArgs, zero_init_last: bool) -> Block {
        let BlockArgs { inplanes, planes, stride, drop_path_rate } = a;
        let outplanes = planes * def.block.expansion();
        let downsample = (stride != 1 || inplanes != outplanes).then(|| {
            let d = p / "downsample";
            if def.avg_down {
                // Sequential(pool or Identity, conv, bn): the conv is always `.1`.
                let conv = Conv2d::new(&(&d / 1), inplanes, outplanes, 1, ConvConfig::default());
                Shortcut { avg_pool: stride != 1, conv, bn: BatchNorm2d::new(&(&d / 2), outplanes) }
            } else {
                let k = if stride == 1 { 1 } else { def.down_kernel_size };
                let conv = Conv2d::new(
                    &(&d / 0),
                    inplanes,
                    outplanes,
                    k,
                    ConvConfig::symmetric(k, stride),
                );
                Shortcut { avg_pool: false, conv, bn: BatchNorm2d::new(&(&d / 1), outplanes) }
            }
        });
        let conv3x3 = |s| ConvConfig::symmetric(3, s);
        let mut block = match def.block {
            BlockKind::Basic => {
                let first = planes / def.block_reduce_first;
                Block {
                    conv1: Conv2d::new(&(p / "conv1"), inplanes, first, 3, conv3x3(stride)),
                    bn1: BatchNorm2d::new(&(p / "bn1"), first),
                    conv2: Conv2d::new(&(p / "conv2"), first, outplanes, 3, conv3x3(1)),
                    bn2: BatchNorm2d::new(&(p / "bn2"), outplanes),
                    conv3: None,
                    attn: Attn::new(p, def.attn, outplanes),
                    downsample,
                    drop_path_rate,
                }
            }
            BlockKind::Bottleneck => {
                let width = planes * def.base_width / 64 * def.cardinality;
                let first = width / def.block_reduce_first;
                let grouped = ConvConfig { groups: def.cardinality, ..conv3x3(stride) };
                Block {
                    conv1: Conv2d::new(&(p / "conv1"), inplanes, first, 1, ConvConfig::default()),
                    bn1: BatchNorm2d::new(&(p / "bn1"), first),
                    conv2: Conv2d::new(&(p / "conv2"), first, width, 3, grouped),
                    bn2: BatchNorm2d::new(&(p / "bn2"), width),
                    conv3: Some((
                        Conv2d::new(&(p / "conv3"), width, outplanes, 1, ConvConfig::default()),
                        BatchNorm2d::new(&(p / "bn3"), outplanes),
                    )),
                    attn: Attn::new(p, def.attn, outplanes),
                    downsample,
                    drop_path_rate,
                }
            }
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
        let relu = Activation::Relu;
        let mut ys = self.bn1.forward_act(&self.conv1.forward(xs, ctx)?, relu, ctx)?;
        ys = self.bn2.forward(&self.conv2.forward(&ys, ctx)?, ctx)?;
        if let Some((conv3, bn3)) = &self.conv3 {
            ys = bn3.forward(&conv3.forward(&ys.f_relu_()?, ctx)?, ctx)?;
        }
        if let Some(attn) = &self.attn {
            ys = attn.forward(&ys, ctx)?;
        }
        ys = drop_path(&ys, self.drop_path_rate, ctx.train)?;
        let shortcut = match &self.downsample {
            Some(shortcut) => shortcut.forward(xs, ctx)?,
            None => xs.shallow_clone(),
        };
        ys = ys.f_add_(&shortcut)?;
        ys.f_relu_()
    }
}

/// A ResNet with timm's variable names.
#[derive(Debug)]
pub struct ResNet {
    stem: Stem,
    bn1: BatchNorm2d,
    stages: Vec<Vec<Block>>,
    fc: Linear,
}

impl ResNet {
    /// Builds the variables of `def` under `root` (the VarStore's root path).
    pub fn new(root: &nn::Path, def: ResNetDef, config: &ModelConfig) -> ResNet {
        let c1 = root / "conv1";
        let (stem, mut inplanes) = match def.stem_type {
            StemType::Single => {
                let conv = Conv2d::new(&c1, config.in_chans, 64, 7, ConvConfig::symmetric(7, 2));
                (Stem::Single(conv), 64)
            }
            StemType::Deep | StemType::DeepTiered => {
                let w = def.stem_width;
                let first = if def.stem_type == StemType::DeepTiered { 3 * (w / 4) } else { w };
                let inplanes = 2 * w;
                let convs = Box::new([
                    Conv2d::new(&(&c1 / 0), config.in_chans, first, 3, ConvConfig::symmetric(3, 2)),
                    Conv2d::new(&(&c1 / 3), first, w, 3, ConvConfig::symmetric(3, 1)),
                    Conv2d::new(&(&c1 / 6), w, inplanes, 3, ConvConfig::symmetric(3, 1)),
                ]);
                let norms = Box::new([
                    BatchNorm2d::new(&(&c1 / 1), first),
                    BatchNorm2d::new(&(&c1 / 4), w),
                ]);
                (Stem::Deep { convs, norms }, inplanes)
            }
        };
        let bn1 = BatchNorm2d::new(&(root / "bn1"), inplanes);
        let total_blocks: usize = def.layers.iter().sum();
        let rates = stochastic_depth_rates(config.drop_path_rate, total_blocks);
        let mut block_index = 0;
        let mut stages = Vec::with_capacity(4);
        for (stage, &depth) in def.layers.iter().enumerate() {
            let planes = 64 << stage;
            let stride = if stage == 0 { 1 } else { 2 };
            let stage_path = root / format!("layer{}", stage + 1);
            let mut blocks = Vec::with_capacity(depth);
            for i in 0..depth {
                let args = BlockArgs {
                    inplanes,
                    planes,
                    stride: if i == 0 { stride } else { 1 },
                    drop_path_rate: rates[block_index],
                };
                blocks.push(Block::new(&(&stage_path / i), &def, args, config.zero_init_last));
                inplanes = planes * def.block.expansion();
                block_index += 1;
            }
            stages.push(blocks);
        }
        let fc = Linear::new(&(root / "fc"), inplanes, config.num_classes);
        ResNet { stem, bn1, stages, fc }
    }
}

impl Network for ResNet {
    fn forward(&self, xs: &Tensor, ctx: &ForwardCtx) -> Result<Tensor, TchError> {
        let relu = Activation::Relu;
        let stem = match &self.stem {
            Stem::Single(conv) => conv.forward(xs, ctx)?,
            Stem::Deep { convs, norms } => {
                let mut ys = norms[0].forward_act(&convs[0].forward(xs, ctx)?, relu, ctx)?;
                ys = norms[1].forward_act(&convs[1].forward(&ys, ctx)?, relu, ctx)?;
                convs[2].forward(&ys, ctx)?
            }
        };
        let mut ys = self.bn1.forward_act(&stem, relu, ctx)?;
        ys = ys.f_max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false)?;
        for block in self.stages.iter().flatten() {
            ys = block.forward(&ys, ctx)?;
        }
        let pooled = ys.f_adaptive_avg_pool2d([1, 1])?.f_flatten(1, -1)?;
        self.fc.forward(&pooled, ctx)
    }

    fn drop_path_rates(&self) -> Vec<f64> {
        self.stages.iter().flatten().map(|b| b.drop_path_rate).collect()
    }
}
