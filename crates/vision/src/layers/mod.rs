//! Building blocks shared by the model families: convolution, batch norm,
//! conv-norm-act, activations, squeeze-excite and ECA channel attention, the
//! EfficientNet mobile blocks, attention / MLP / layer norm for transformers,
//! linear heads, stochastic depth and their initialisers.
//!
//! Each layer keeps its parameters in `f32` and casts them to the dtype of the
//! activations it receives, which is how bf16 mixed precision runs on a GPU:
//! the network sees bf16 activations, the optimizer and BN statistics stay f32.

mod activation;
mod attention;
mod batch_norm;
mod conv;
mod conv_norm_act;
mod drop_path;
mod eca;
mod layer_norm;
mod linear;
mod mbconv;
mod squeeze_excite;

pub use activation::Activation;
pub use attention::{Attention, Mlp};
pub use batch_norm::BatchNorm2d;
pub use conv::{symmetric_padding, Conv2d, ConvConfig, ConvInit};
pub use conv_norm_act::ConvNormAct;
pub use drop_path::{drop_path, linspace_rates, stochastic_depth_rates};
pub use eca::{eca_kernel_size, Eca};
pub use layer_norm::LayerNorm;
pub use linear::{Linear, LinearInit};
pub use mbconv::{MbBlock, MbConfig, MbKind};
pub use squeeze_excite::{make_divisible, SqueezeExcite};

use tch::{Kind, TchError, Tensor};

/// What a forward pass is for, and in which dtype the network computes.
#[derive(Debug, Clone, Copy)]
pub struct ForwardCtx {
    /// Training mode: batch statistics in BN, stochastic depth active.
    pub train: bool,
    /// Dtype of the activations (`Float`, or `BFloat16` for mixed precision).
    pub compute_kind: Kind,
}

impl ForwardCtx {
    /// `t` in the compute dtype ([`cast`]).
    pub fn cast(&self, t: &Tensor) -> Result<Tensor, TchError> {
        cast(t, self.compute_kind)
    }
}

/// `t` as `kind`: a cast where its kind differs, else `t` itself (a shallow
/// clone, which calls no operator: `aten::to` would return `t` too, but
/// only after a trip through libtorch's dispatcher, some microseconds of
/// host time per weight per step in fp32).
pub fn cast(t: &Tensor, kind: Kind) -> Result<Tensor, TchError> {
    if t.f_kind()? == kind {
        Ok(t.shallow_clone())
    } else {
        t.f_to_kind(kind)
    }
}
