//! Vision Transformer (Dosovitskiy et al., "An Image is Worth 16x16 Words",
//! arXiv 2010.11929) as timm's `VisionTransformer` builds
//! `vit_{tiny,small,base}_patch16_224` (ViT-Ti/S as DeiT trained them,
//! Touvron et al., arXiv 2012.12877): 16x16 patch embedding with bias, a
//! class token, learned position embeddings (class token included), pre-norm
//! blocks (LayerNorm eps 1e-6, fused qkv with bias, exact GELU MLP of ratio 4),
//! a final LayerNorm, class-token pooling (`global_pool='token'`, so no
//! `fc_norm`) and a linear head.
//!
//! Position embeddings are stored for the 224 px grid (14 x 14), as timm's are;
//! other input sizes resample them as timm's `dynamic_img_size=True` does
//! (bicubic with antialiasing, class token untouched), so a model trained at
//! 160 px (A3) evaluates at 224 px and keeps timm's state-dict shapes.
//! Stochastic depth rises linearly over the blocks (`linspace(0, rate, depth)`);
//! `pos_embed` and `cls_token` are excluded from weight decay (timm's
//! `no_weight_decay()`).

use crate::layers::{
    drop_path, linspace_rates, Activation, Attention, Conv2d, ConvConfig, ConvInit, ForwardCtx,
    LayerNorm, Linear, LinearInit, Mlp,
};
use crate::model::{ModelConfig, Network};
use tch::{nn, TchError, Tensor};

/// The shape of a ViT variant.
#[derive(Debug, Clone, Copy)]
pub struct VitDef {
    /// Patch side in pixels.
    pub patch_size: i64,
    /// Token width.
    pub embed_dim: i64,
    /// Transformer blocks.
    pub depth: usize,
    /// Attention heads.
    pub num_heads: i64,
    /// Image side the position embeddings are stored for.
    pub img_size: i64,
}

/// `vit_tiny_patch16_224` (ViT-Ti/16, DeiT-Ti).
pub const VIT_TINY_PATCH16_224: VitDef =
    VitDef { patch_size: 16, embed_dim: 192, depth: 12, num_heads: 3, img_size: 224 };
/// `vit_small_patch16_224` (ViT-S/16, DeiT-S).
pub const VIT_SMALL_PATCH16_224: VitDef =
    VitDef { embed_dim: 384, num_heads: 6, ..VIT_TINY_PATCH16_224 };
/// `vit_base_patch16_224` (ViT-B/16).
pub const VIT_BASE_PATCH16_224: VitDef =
    VitDef { embed_dim: 768, num_heads: 12, ..VIT_TINY_PATCH16_224 };

/// timm's MLP ratio.
const MLP_RATIO: i64 = 4;
/// timm's `init_weights_vit_timm`: `trunc_normal_(std=.02)` on every Linear.
const LINEAR_INIT: LinearInit = LinearInit::Normal(0.02);

#[derive(Debug)]
struct Block {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    mlp: Mlp,
    drop_path_rate: f64,
}

impl Block {
    fn forward(&self, xs: &Tensor, ctx: &ForwardCtx) -> Result<Tensor, TchError> {
        let attn = self.attn.forward(&self.norm1.forward(xs, ctx)?, ctx)?;
        let xs = xs.f_add(&drop_path(&attn, self.drop_path_rate, ctx.train)?)?;
        let mlp = self.mlp.forward(&self.norm2.forward(&xs, ctx)?, ctx)?;
        xs.f_add(&drop_path(&mlp, self.drop_path_rate, ctx.train)?)
    }
}

/// A ViT with timm's variable names.
#[derive(Debug)]
pub struct VisionTransformer {
    patch_embed: Conv2d,
    cls_token: Tensor,
    pos_embed: Tensor,
    grid: i64,
    blocks: Vec<Block>,
    norm: LayerNorm,
    head: Linear,
}

impl VisionTransformer {
    /// Builds the variables of `def` under `root`.
    pub fn new(root: &nn::Path, def: VitDef, config: &ModelConfig) -> VisionTransformer {
        let d = def.embed_dim;
        let grid = def.img_size / def.patch_size;
        let cls_token =
            root.var("cls_token", &[1, 1, d], nn::Init::Randn { mean: 0.0, stdev: 1e-6 });
        let pos_embed = root.var(
            "pos_embed",
            &[1, grid * grid + 1, d],
            nn::Init::Randn { mean: 0.0, stdev: 0.02 },
        );
        let patch_embed = Conv2d::new(
            &(root / "patch_embed" / "proj"),
            config.in_chans,
            d,
            def.patch_size,
            ConvConfig {
                stride: def.patch_size,
                bias: true,
                init: ConvInit::PyTorchDefault,
                ..Default::default()
            },
        );
        let rates = linspace_rates(config.drop_path_rate, def.depth);
        let blocks = (0..def.depth)
            .map(|i| {
                let p = root / "blocks" / i;
                Block {
                    norm1: LayerNorm::new(&(&p / "norm1"), d),
                    attn: Attention::new(&(&p / "attn"), d, def.num_heads, true, LINEAR_INIT),
                    norm2: LayerNorm::new(&(&p / "norm2"), d),
                    mlp: Mlp::new(&(&p / "mlp"), d, MLP_RATIO * d, Activation::Gelu, LINEAR_INIT),
                    drop_path_rate: rates[i],
                }
            })
            .collect();
        let norm = LayerNorm::new(&(root / "norm"), d);
        let head = Linear::with_init(&(root / "head"), d, config.num_classes, true, LINEAR_INIT);
        VisionTransformer { patch_embed, cls_token, pos_embed, grid, blocks, norm, head }
    }

    /// The position embeddings for an `h x w` patch grid: the stored ones, or
    /// their bicubic antialiased resampling in float32 (timm's `resample_abs_pos_embed`).
    fn pos_embed_for(&self, h: i64, w: i64) -> Result<Tensor, TchError> {
        if h == self.grid && w == self.grid {
            return Ok(self.pos_embed.shallow_clone());
        }
        let (_, _, d) = self.pos_embed.size3()?;
        let prefix = self.pos_embed.f_narrow(1, 0, 1)?;
        let grid = self
            .pos_embed
            .f_narrow(1, 1, self.grid * self.grid)?
            .f_reshape([1, self.grid, self.grid, d])?
            .f_permute([0, 3, 1, 2])?
            .f_internal_upsample_bicubic2d_aa([h, w], false, None, None)?
            .f_permute([0, 2, 3, 1])?
            .f_reshape([1, h * w, d])?;
        Tensor::f_cat(&[prefix, grid], 1)
    }
}

impl Network for VisionTransformer {
    fn forward(&self, xs: &Tensor, ctx: &ForwardCtx) -> Result<Tensor, TchError> {
        let patches = self.patch_embed.forward(xs, ctx)?;
        let (b, d, h, w) = patches.size4()?;
        let tokens = patches.f_flatten(2, 3)?.f_transpose(1, 2)?;
        let cls = ctx.cast(&self.cls_token)?.f_expand([b, 1, d], false)?;
        let pos = ctx.cast(&self.pos_embed_for(h, w)?)?;
        let mut ys = Tensor::f_cat(&[cls, tokens], 1)?.f_add(&pos)?;
        for block in &self.blocks {
            ys = block.forward(&ys, ctx)?;
        }
        ys = self.norm.forward(&ys, ctx)?;
        let pooled = ys.f_select(1, 0)?;
        self.head.forward(&pooled, ctx)
    }

    fn no_weight_decay(&self) -> Vec<String> {
        vec!["pos_embed".to_string(), "cls_token".to_string()]
    }

    fn drop_path_rates(&self) -> Vec<f64> {
        self.blocks.iter().map(|b| b.drop_path_rate).collect()
    }
}
