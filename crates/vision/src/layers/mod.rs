//! Building blocks shared by the model families: convolution, batch norm,
//! linear head, stochastic depth and their initialisers.
//!
//! Each layer keeps its parameters in `f32` and casts them to the dtype of the
//! activations it receives, which is how bf16 mixed precision runs on a GPU:
//! the network sees bf16 activations, the optimizer and BN statistics stay f32.

mod batch_norm;
mod conv;
mod drop_path;
mod linear;

pub use batch_norm::BatchNorm2d;
pub use conv::{Conv2d, ConvConfig};
pub use drop_path::{drop_path, stochastic_depth_rates};
pub use linear::Linear;

use tch::Kind;

/// What a forward pass is for, and in which dtype the network computes.
#[derive(Debug, Clone, Copy)]
pub struct ForwardCtx {
    /// Training mode: batch statistics in BN, stochastic depth active.
    pub train: bool,
    /// Dtype of the activations (`Float`, or `BFloat16` for mixed precision).
    pub compute_kind: Kind,
}
