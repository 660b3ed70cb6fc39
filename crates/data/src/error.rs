//! Errors of the input pipeline.

use crate::jpeg::JpegError;
use std::path::PathBuf;

/// Why encoded image bytes could not be turned into pixels.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// No bytes at all.
    #[error("empty file")]
    Empty,
    /// A format other than JPEG or PNG.
    #[error("unsupported image format {0:?}")]
    UnsupportedFormat(image::ImageFormat),
    /// The header gives a width or height of 0.
    #[error("image has no pixels ({width}x{height})")]
    NoPixels {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
    },
    /// More pixels than the decompression-bomb limit (refused from the header).
    #[error(
        "{width}x{height} exceeds the {limit}-pixel limit (Pillow's decompression-bomb limit)"
    )]
    TooManyPixels {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
        /// The limit, [`crate::decode::MAX_PIXELS`].
        limit: u64,
    },
    /// The evaluation resize of an extremely elongated image (its shorter
    /// side to the resize target) would make more pixels than the limit.
    #[error(
        "{width}x{height}: resizing its shorter side to {short} gives \
         {resized_width}x{resized_height}, over the {limit}-pixel limit"
    )]
    ResizedTooLarge {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
        /// The shorter side's target.
        short: u32,
        /// Width after the resize.
        resized_width: u64,
        /// Height after the resize.
        resized_height: u64,
        /// The limit, [`crate::decode::MAX_PIXELS`].
        limit: u64,
    },
    /// libjpeg-turbo failed.
    #[error(transparent)]
    Jpeg(#[from] JpegError),
    /// The `image` crate (format detection, PNG) failed.
    #[error(transparent)]
    Image(#[from] image::ImageError),
}

/// Everything that can go wrong between a folder of images and a batch.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file or folder could not be read or written.
    // `error` is shown in the message, not chained as a source, so `{:#}`
    // does not print it twice.
    #[error("{path}: {error}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        error: std::io::Error,
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
    // `error` is shown in the message, not chained as a source.
    #[error("cannot decode {path}: {error}")]
    Decode {
        /// The image file.
        path: PathBuf,
        /// Why.
        error: DecodeError,
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
    pub fn io(path: impl Into<PathBuf>, error: std::io::Error) -> DataError {
        DataError::Io { path: path.into(), error }
    }
}
