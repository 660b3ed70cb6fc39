//! Fully connected layer (`weight` `[out, in]`, `bias` `[out]`) with the
//! initialisations of the model families.

use super::ForwardCtx;
use tch::{nn, Tensor};

/// How a linear layer starts out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LinearInit {
    /// PyTorch's `nn.Linear` default: weight and bias uniform in `±1/sqrt(in)`
    /// (ResNet's `fc`).
    PyTorchDefault,
    /// Normal weight with this standard deviation, zero bias (ViT's
    /// `trunc_normal_(std=.02)`, truncated at ±2, i.e. ±100 std; RegNet's `normal_(0, .01)`).
    Normal(f64),
    /// Uniform weight in `±1/sqrt(out)`, zero bias (EfficientNet's `_init_weight_goog`).
    UniformFanOut,
}

/// `y = x W^T + b` over the last dimension.
#[derive(Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// Creates `path.weight` and `path.bias` with PyTorch's default initialisation.
    pub fn new(path: &nn::Path, c_in: i64, c_out: i64) -> Linear {
        Linear::with_init(path, c_in, c_out, true, LinearInit::PyTorchDefault)
    }

    /// Creates `path.weight` (and `path.bias` if `bias`) with `init`.
    pub fn with_init(
        path: &nn::Path,
        c_in: i64,
        c_out: i64,
        bias: bool,
        init: LinearInit,
    ) -> Linear {
        let (w_init, b_init) = match init {
            LinearInit::PyTorchDefault => {
                let bound = 1.0 / (c_in as f64).sqrt();
                let u = nn::Init::Uniform { lo: -bound, up: bound };
                (u, u)
            }
            LinearInit::Normal(stdev) => {
                (nn::Init::Randn { mean: 0.0, stdev }, nn::Init::Const(0.0))
            }
            LinearInit::UniformFanOut => {
                let bound = 1.0 / (c_out as f64).sqrt();
                (nn::Init::Uniform { lo: -bound, up: bound }, nn::Init::Const(0.0))
            }
        };
        Linear {
            weight: path.var("weight", &[c_out, c_in], w_init),
            bias: bias.then(|| path.var("bias", &[c_out], b_init)),
        }
    }

    /// Applies the layer in the dtype of the context.
    pub fn forward(&self, xs: &Tensor, ctx: &ForwardCtx) -> Result<Tensor, tch::TchError> {
        let w = ctx.cast(&self.weight)?;
        let b = match &self.bias {
            Some(b) => Some(ctx.cast(b)?),
            None => None,
        };
        xs.f_linear(&w, b.as_ref())
    }
}
