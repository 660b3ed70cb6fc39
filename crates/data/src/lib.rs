//! The input pipeline of the trainer, free of libtorch: datasets in the
//! ImageNet folder layout, decoding, timm-exact augmentation, Mixup/CutMix,
//! repeated-augmentation-aware samplers and the threaded loader.

pub mod dataset;
pub mod decode;
pub mod error;
pub mod fashion_mnist;
pub mod image;
pub mod loader;
pub mod mixup;
pub mod pipeline;
pub mod rand_augment;
pub mod rng;
pub mod sampler;
pub mod transforms;

pub use error::DataError;
