//! The two halves of a pre-norm transformer block (timm's `Attention` and `Mlp`).

use super::{Activation, ForwardCtx, Linear, LinearInit};
use tch::{nn, Tensor};

/// Multi-head self-attention with a fused `qkv` projection and an output
/// `proj`, computed with libtorch's `scaled_dot_product_attention` (timm's
/// `fused_attn` path; scale `head_dim^-0.5`).
#[derive(Debug)]
pub struct Attention {
    qkv: Linear,
    proj: Linear,
    num_heads: i64,
    head_dim: i64,
}

impl Attention {
    /// Creates `path.qkv` (`dim -> 3 dim`, bias if `qkv_bias`) and `path.proj`.
    pub fn new(
        path: &nn::Path,
        dim: i64,
        num_heads: i64,
        qkv_bias: bool,
        init: LinearInit,
    ) -> Attention {
        Attention {
            qkv: Linear::with_init(&(path / "qkv"), dim, 3 * dim, qkv_bias, init),
            proj: Linear::with_init(&(path / "proj"), dim, dim, true, init),
            num_heads,
            head_dim: dim / num_heads,
        }
    }

    /// `[B, N, C] -> [B, N, C]`.
    pub fn forward(&self, xs: &Tensor, ctx: &ForwardCtx) -> Result<Tensor, tch::TchError> {
        let (b, n, c) = xs.size3()?;
        let qkv = self
            .qkv
            .forward(xs, ctx)?
            .f_reshape([b, n, 3, self.num_heads, self.head_dim])?
            .f_permute([2, 0, 3, 1, 4])?;
        let parts = qkv.f_unbind(0)?;
        let out = Tensor::f_scaled_dot_product_attention(
            &parts[0],
            &parts[1],
            &parts[2],
            None::<&Tensor>,
            0.0,
            false,
            None,
            false,
        )?;
        let out = out.f_transpose(1, 2)?.f_reshape([b, n, c])?;
        self.proj.forward(&out, ctx)
    }
}

/// `fc2(act(fc1(x)))`, timm's `Mlp`.
#[derive(Debug)]
pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl Mlp {
    /// Creates `path.fc1` (`dim -> hidden`) and `path.fc2` (`hidden -> dim`).
    pub fn new(path: &nn::Path, dim: i64, hidden: i64, act: Activation, init: LinearInit) -> Mlp {
        Mlp {
            fc1: Linear::with_init(&(path / "fc1"), dim, hidden, true, init),
            fc2: Linear::with_init(&(path / "fc2"), hidden, dim, true, init),
            act,
        }
    }

    /// Applies the MLP to the last dimension.
    pub fn forward(&self, xs: &Tensor, ctx: &ForwardCtx) -> Result<Tensor, tch::TchError> {
        let hidden = self.act.forward(&self.fc1.forward(xs, ctx)?)?;
        self.fc2.forward(&hidden, ctx)
    }
}
