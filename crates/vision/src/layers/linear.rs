//! Fully connected layer with PyTorch's default `nn.Linear` initialisation.

use super::ForwardCtx;
use tch::{nn, Tensor};

/// `y = x W^T + b`, weights `[out, in]`.
#[derive(Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    /// Creates `path.weight` and `path.bias`, both uniform in `±1/sqrt(in)` as PyTorch does.
    pub fn new(path: &nn::Path, c_in: i64, c_out: i64) -> Linear {
        let bound = 1.0 / (c_in as f64).sqrt();
        Linear {
            weight: path.var("weight", &[c_out, c_in], nn::Init::Uniform { lo: -bound, up: bound }),
            bias: path.var("bias", &[c_out], nn::Init::Uniform { lo: -bound, up: bound }),
        }
    }

    /// Applies the layer in the dtype of `xs`.
    pub fn forward(&self, xs: &Tensor, ctx: &ForwardCtx) -> Result<Tensor, tch::TchError> {
        let w = self.weight.f_to_kind(ctx.compute_kind)?;
        let b = self.bias.f_to_kind(ctx.compute_kind)?;
        xs.f_linear(&w, Some(&b))
    }
}
