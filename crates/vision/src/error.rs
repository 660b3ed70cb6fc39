//! Errors of the model library.

use std::path::PathBuf;

/// Everything that can go wrong while building, running, saving or loading a model.
#[derive(Debug, thiserror::Error)]
pub enum VisionError {
    /// A libtorch operation failed.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// The model name is not in the registry.
    #[error("unknown model `{name}`; closest registered names: {suggestions}")]
    UnknownModel {
        /// The name that was asked for.
        name: String,
        /// Registered names closest to it, comma separated.
        suggestions: String,
    },
    /// A model configuration value is out of range.
    #[error("invalid model config: {0}")]
    InvalidConfig(String),
    /// A weights file does not match the model's state dict.
    #[error("weights {path}: {problem}")]
    WeightsMismatch {
        /// The weights file.
        path: PathBuf,
        /// What does not match (missing, unexpected or mis-shaped keys).
        problem: String,
    },
    /// libtorch could not read or write a `safetensors` file.
    #[error("weights {path}: {source}")]
    Safetensors {
        /// The weights file.
        path: PathBuf,
        /// libtorch's error.
        source: tch::TchError,
    },
    /// Reading or writing a weights file failed.
    #[error("weights {path}: {source}")]
    WeightsIo {
        /// The weights file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}
