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
    #[error("weights {path}: {problem}")]
    Safetensors {
        /// The weights file.
        path: PathBuf,
        /// What failed, in libtorch's (or the safetensors reader's) words.
        problem: String,
    },
    /// The weights file is a PyTorch pickle (`torch.save`, as timm's `.pth`
    /// and train.py's `.pth.tar` checkpoints are), which is not read here.
    #[error(
        "weights {path}: a PyTorch {format} file (torch.save), not safetensors; convert it once \
         with: python -c \"import torch, safetensors.torch as s; \
         sd = torch.load('{path}', map_location='cpu', weights_only=False); \
         s.save_file(sd.get('state_dict', sd), '{path}.safetensors')\" \
         (loading a pickle runs code from it: convert only a file you trust)"
    )]
    PytorchPickle {
        /// The weights file.
        path: PathBuf,
        /// `zip` (torch.save since PyTorch 1.6) or `pickle` (older).
        format: &'static str,
    },
    /// Reading or writing a weights file failed.
    // `error` is shown in the message, not chained as a source, so `{:#}`
    // does not print it twice.
    #[error("weights {path}: {error}")]
    WeightsIo {
        /// The weights file.
        path: PathBuf,
        /// The underlying error.
        error: std::io::Error,
    },
}
