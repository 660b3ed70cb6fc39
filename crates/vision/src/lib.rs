//! timm-compatible image classification models on libtorch.
//!
//! Every model is registered under its timm name ([`registry`]); its variables
//! carry timm's state-dict keys, so a `safetensors` file saved by timm loads
//! here and one saved here loads into timm ([`weights`]). Shared building
//! blocks live in [`layers`], one file per family in [`models`].

pub mod error;
pub mod layers;
pub mod model;
pub mod models;
pub mod registry;
pub mod weights;

pub use error::VisionError;
pub use model::{ForwardMode, Model, ModelConfig, Network};
pub use registry::{find_model, registered_models, ModelSpec};
