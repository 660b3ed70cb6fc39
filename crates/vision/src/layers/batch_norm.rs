//! 2-D batch normalisation with PyTorch's defaults (momentum 0.1, eps 1e-5)
//! and parameter names (`weight`, `bias`, `running_mean`, `running_var`).

use super::ForwardCtx;
use tch::{nn, Tensor};

/// Batch norm over the channel dimension of an NCHW tensor.
#[derive(Debug)]
pub struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    momentum: f64,
    eps: f64,
}

impl BatchNorm2d {
    /// Creates the four tensors under `path` (gamma 1, beta 0, mean 0, var 1).
    pub fn new(path: &nn::Path, channels: i64) -> BatchNorm2d {
        BatchNorm2d {
            weight: path.var("weight", &[channels], nn::Init::Const(1.0)),
            bias: path.var("bias", &[channels], nn::Init::Const(0.0)),
            running_mean: path.zeros_no_train("running_mean", &[channels]),
            running_var: path.ones_no_train("running_var", &[channels]),
            momentum: 0.1,
            eps: 1e-5,
        }
    }

    /// Sets gamma to zero (timm's `zero_init_last` for the last BN of a residual branch).
    pub fn zero_init_gamma(&mut self) {
        tch::no_grad(|| {
            let _ = self.weight.zero_();
        });
    }

    /// Normalises with batch statistics in training mode (and updates the
    /// running statistics), with the running statistics otherwise.
    pub fn forward(&self, xs: &Tensor, ctx: &ForwardCtx) -> Result<Tensor, tch::TchError> {
        Tensor::f_batch_norm(
            xs,
            Some(&self.weight),
            Some(&self.bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            ctx.train,
            self.momentum,
            self.eps,
            true,
        )
    }
}
