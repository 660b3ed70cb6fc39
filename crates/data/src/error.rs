//! Errors of the input pipeline.

use std::path::PathBuf;

/// Everything that can go wrong between a folder of images and a batch.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file or folder could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The dataset folder does not have the expected layout or content.
    #[error("dataset {path}: {problem}")]
    Layout {
        /// The folder.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// An image could not be decoded.
    #[error("cannot decode {path}: {reason}")]
    Decode {
        /// The image file.
        path: PathBuf,
        /// The decoder's message.
        reason: String,
    },
    /// A source file (IDX, label file) is malformed.
    #[error("{path}: {problem}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the offending offset or record.
        problem: String,
    },
    /// Too many undecodable files in a row: the data is broken, not a few files.
    #[error("gave up after {attempts} undecodable images in a row while filling sample {position} of epoch {epoch} (last: {last})")]
    TooManyBadFiles {
        /// Epoch being loaded.
        epoch: u64,
        /// Position in the epoch's sample order.
        position: u64,
        /// Replacement attempts made.
        attempts: u32,
        /// The last error.
        last: String,
    },
    /// A configuration value makes the pipeline impossible.
    #[error("invalid pipeline config: {0}")]
    Config(String),
    /// A loader thread stopped unexpectedly.
    #[error("loader thread failed: {0}")]
    Loader(String),
}

impl DataError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> DataError {
        DataError::Io { path: path.into(), source }
    }
}
