//! Element-wise activations used by the model families (timm's `act_layer`).

use tch::Tensor;

/// A point-wise non-linearity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// No activation (`nn.Identity`).
    Identity,
    /// `nn.ReLU`.
    Relu,
    /// `nn.SiLU` (timm's `swish`).
    Silu,
    /// `nn.GELU` with the exact erf form.
    Gelu,
}

impl Activation {
    /// Applies the activation out of place.
    pub fn forward(self, xs: &Tensor) -> Result<Tensor, tch::TchError> {
        match self {
            Activation::Identity => Ok(xs.shallow_clone()),
            Activation::Relu => xs.f_relu(),
            Activation::Silu => xs.f_silu(),
            Activation::Gelu => xs.f_gelu("none"),
        }
    }

    /// Applies the activation in place where timm does (`inplace=True` ReLU and
    /// SiLU on a freshly computed tensor); GELU is never in place.
    pub fn forward_(self, mut xs: Tensor) -> Result<Tensor, tch::TchError> {
        match self {
            Activation::Identity => Ok(xs),
            Activation::Relu => xs.f_relu_(),
            Activation::Silu => xs.f_silu_(),
            Activation::Gelu => xs.f_gelu("none"),
        }
    }
}
