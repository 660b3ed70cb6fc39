//! timm-compatible image classification models on libtorch.
//!
//! Every model of the "ResNet strikes back" zoo is registered under its timm
//! name ([`registry`]) with its A1/A2 and A3 resolutions; its variables carry
//! timm's state-dict keys, so a `safetensors` file saved by timm loads here and
//! one saved here loads into timm ([`weights`]). Shared building blocks live
//! in [`layers`], one file per family in [`models`] (ResNet and its D / SE /
//! ResNeXt / ECA variants, RegNetY, EfficientNet and EfficientNetV2-rw, ViT).

#![warn(missing_docs)]
#![warn(clippy::unwrap_used)]

pub mod error;
pub mod layers;
pub mod model;
pub mod models;
pub mod registry;
pub mod weights;

pub use error::VisionError;
pub use model::{ForwardMode, Model, ModelConfig, Network, MAX_NUM_CLASSES};
pub use registry::{find_model, registered_models, ModelSpec};
