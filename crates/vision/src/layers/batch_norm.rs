//! 2-D batch normalisation with PyTorch's defaults (momentum 0.1, eps 1e-5)
//! and parameter names (`weight`, `bias`, `running_mean`, `running_var`).
//!
//! Every model of the zoo uses these defaults: timm's `efficientnet_*` and
//! `efficientnetv2_rw_*` build `nn.BatchNorm2d` without `bn_eps`/`bn_momentum`
//! (only the `tf_*` ports use TensorFlow's eps 1e-3 / momentum 0.01), which is
//! why [`BatchNorm2d::with_options`] exists but is not needed by the registry.

use super::{Activation, ForwardCtx};
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
        BatchNorm2d::with_options(path, channels, 1e-5, 0.1)
    }

    /// Like [`BatchNorm2d::new`] with another `eps` and `momentum` (PyTorch's
    /// convention: `running = (1 - momentum) * running + momentum * batch`).
    pub fn with_options(path: &nn::Path, channels: i64, eps: f64, momentum: f64) -> BatchNorm2d {
        BatchNorm2d {
            weight: path.var("weight", &[channels], nn::Init::Const(1.0)),
            bias: path.var("bias", &[channels], nn::Init::Const(0.0)),
            running_mean: path.zeros_no_train("running_mean", &[channels]),
            running_var: path.ones_no_train("running_var", &[channels]),
            momentum,
            eps,
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

    /// Batch norm followed by an activation applied in place, as timm's
    /// `BatchNormAct2d` does.
    pub fn forward_act(
        &self,
        xs: &Tensor,
        act: Activation,
        ctx: &ForwardCtx,
    ) -> Result<Tensor, tch::TchError> {
        act.forward_(self.forward(xs, ctx)?)
    }
}
