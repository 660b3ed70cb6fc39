//! The input pipeline of the trainer, free of libtorch: datasets (ImageNet
//! folder layout, flat folders with label files, WebDataset tar shards),
//! libjpeg-turbo decoding (partial and DCT-scaled), timm-exact augmentation,
//! Mixup/CutMix, repeated-augmentation-aware samplers, the threaded loader,
//! and the evaluation sets (ImageNet-ReaL, ImageNet-V2).

#![warn(missing_docs)]
#![warn(clippy::unwrap_used)]

pub mod dataset;
pub mod decode;
pub mod error;
pub mod eval_sets;
pub mod fashion_mnist;
pub mod image;
pub mod jpeg;
pub mod labels;
pub mod loader;
pub mod mixup;
pub mod pipeline;
pub mod rand_augment;
pub mod replay;
pub mod rng;
pub mod sampler;
pub mod shards;
pub mod transforms;

pub use error::DataError;
