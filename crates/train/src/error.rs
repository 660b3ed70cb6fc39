//! Errors of the training library.

use std::path::PathBuf;

/// Everything that can stop a training or evaluation run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A libtorch operation failed.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// Building, loading or saving the model failed.
    #[error(transparent)]
    Model(#[from] rsb_vision::VisionError),
    /// The input pipeline failed.
    #[error(transparent)]
    Data(#[from] rsb_data::DataError),
    /// The recipe asks for something this build cannot do.
    #[error("recipe: {0}")]
    Recipe(String),
    /// A file of the run directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A checkpoint is missing a part or does not fit the run.
    #[error("checkpoint {path}: {problem}")]
    Checkpoint {
        /// The checkpoint folder.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// A collective operation between ranks failed.
    #[error("collective operation between ranks failed")]
    Collective(#[from] rsb_collective::CollectiveError),
    /// The loss became NaN or infinite.
    #[error("loss is {value} at epoch {epoch}, update {update}: training diverged")]
    Diverged {
        /// Epoch.
        epoch: u64,
        /// Global optimizer update.
        update: u64,
        /// The non-finite value.
        value: f64,
    },
}

impl TrainError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> TrainError {
        TrainError::Io { path: path.into(), source }
    }
}
