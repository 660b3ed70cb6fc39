//! Layer normalisation over the last dimension, timm's `LayerNorm` (eps 1e-6).

use super::ForwardCtx;
use tch::{nn, Tensor};

/// `(x - mean) / sqrt(var + eps) * weight + bias` over the last dimension.
#[derive(Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    dim: i64,
    eps: f64,
}

impl LayerNorm {
    /// Creates `path.weight` (ones) and `path.bias` (zeros) with timm's eps 1e-6.
    pub fn new(path: &nn::Path, dim: i64) -> LayerNorm {
        LayerNorm::with_eps(path, dim, 1e-6)
    }

    /// Like [`LayerNorm::new`] with another eps.
    pub fn with_eps(path: &nn::Path, dim: i64, eps: f64) -> LayerNorm {
        LayerNorm {
            weight: path.var("weight", &[dim], nn::Init::Const(1.0)),
            bias: path.var("bias", &[dim], nn::Init::Const(0.0)),
            dim,
            eps,
        }
    }

    /// Normalises the last dimension of `xs`.
    pub fn forward(&self, xs: &Tensor, ctx: &ForwardCtx) -> Result<Tensor, tch::TchError> {
        let w = ctx.cast(&self.weight)?;
        let b = ctx.cast(&self.bias)?;
        xs.f_layer_norm([self.dim], Some(&w), Some(&b), self.eps, true)
    }
}
