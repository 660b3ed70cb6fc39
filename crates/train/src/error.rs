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
    /// The loss scaler's fused check-and-unscale failed.
    #[error("loss scaler: {0}")]
    Unscale(#[from] rsb_torch_shim::amp::UnscaleError),
    /// Setting the gradients to none failed in libtorch.
    #[error(transparent)]
    GradientsToNone(#[from] rsb_torch_shim::grads::SetToNoneError),
    /// One of torch's multi-tensor ops (norms, in-place sums) failed.
    #[error(transparent)]
    Foreach(#[from] rsb_torch_shim::foreach::ForeachError),
    /// The recipe asks for something this build cannot do.
    #[error("recipe: {0}")]
    Recipe(String),
    /// A file of the run directory could not be read or written.
    // `error` is shown in the message, not chained as a source, so `{:#}`
    // does not print it twice.
    #[error("{path}: {error}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        error: std::io::Error,
    },
    /// A checkpoint could not be written (a full disk, ...): nothing of it
    /// is left behind, and the checkpoints before it are as they were.
    #[error("checkpoint {folder} not written ({cause}); {previous}")]
    CheckpointNotWritten {
        /// The checkpoint folder's name (`epoch-0002`).
        folder: String,
        /// What failed, with its causes.
        cause: String,
        /// The newest intact checkpoint up to it (`epoch-0001 is intact`),
        /// or `no earlier checkpoint`.
        previous: String,
    },
    /// A checkpoint is missing a part or does not fit the run.
    #[error("checkpoint {path}: {problem}")]
    Checkpoint {
        /// The checkpoint folder.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// A checkpoint is torn or corrupt (the error names the file), or there
    /// is no intact checkpoint to resume from.
    #[error(transparent)]
    InvalidCheckpoint(#[from] rsb_job::CheckpointError),
    /// The checkpoint to resume was trained with another recipe (the error
    /// lists the fields), or the run folder refuses this run.
    #[error(transparent)]
    RunFolder(#[from] rsb_job::RunFolderError),
    /// An extra evaluation set of the recipe cannot be opened (missing
    /// folder or label file, labels that do not fit).
    #[error("eval.sets.{name}: {problem}")]
    EvalSet {
        /// The set's name.
        name: String,
        /// What is wrong, naming the file.
        problem: String,
    },
    /// Reducing the gradients during the backward pass failed.
    #[error("gradient reduction: {0}")]
    GradientReduction(String),
    /// A collective call between ranks failed or timed out (the error names
    /// the call, this rank and, when known, the peer).
    // `error` is shown in the message, not chained as a source, so `{:#}`
    // does not print it twice.
    #[error("{operation} failed: {error}")]
    Collective {
        /// The call: "all-reduce of gradients, bucket 2 (tensors 40..62)", ...
        operation: String,
        /// What the backend reported.
        error: rsb_collective::CollectiveError,
    },
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
    /// `runtime.max_nonfinite_updates` updates in a row had a non-finite
    /// gradient norm; each was skipped, so the weights (and every
    /// checkpoint) are those from before the first of them.
    #[error(
        "update {update} (epoch {epoch}) makes {consecutive} updates in a row with a \
         non-finite gradient norm (now {grad_norm}), the limit of \
         runtime.max_nonfinite_updates: stopping. Each was skipped, so the weights and the \
         last checkpoint are from before them"
    )]
    NonFiniteUpdates {
        /// Epoch.
        epoch: u64,
        /// The last bad update, counted from 1 (the `step` of metrics records).
        update: u64,
        /// Bad updates in a row.
        consecutive: u64,
        /// Its global gradient norm.
        grad_norm: f64,
    },
    /// Another rank's write (a checkpoint) failed, or did not finish within
    /// its deadline, while this rank waited for it.
    #[error("rank {rank}'s {what} failed or did not finish within {deadline:?} (see its log)")]
    PeerWrite {
        /// The rank that wrote.
        rank: usize,
        /// The write.
        what: String,
        /// Its deadline.
        deadline: std::time::Duration,
    },
    /// The run was asked to stop (a signal) and stopped at an update
    /// boundary, every rank after the same update.
    #[error("stopped by {reason} after update {update}: {checkpoint}")]
    Stopped {
        /// Who asked ("SIGTERM", ...).
        reason: String,
        /// Updates done over the run.
        update: u64,
        /// Where the run can resume from ("checkpoint PATH written", ...).
        checkpoint: String,
        /// The ranks that asked to stop (a signal to them or their agent),
        /// in rank order: this rank among them when it was asked itself.
        requested_by: Vec<usize>,
    },
    /// A weight or buffer is not finite at the end of an epoch, so no
    /// checkpoint is written from it.
    #[error("`{tensor}` holds non-finite values after epoch {epoch}: training diverged; no checkpoint written")]
    NonFiniteWeights {
        /// Epoch.
        epoch: u64,
        /// The parameter or buffer.
        tensor: String,
    },
    /// Not one image of an evaluation set could be read or decoded.
    #[error(
        "eval set `{set}`: none of its {images} images could be read or decoded (each is named \
         in a warning above); its accuracy would be 0% over no image"
    )]
    NothingScored {
        /// The set (`val` for the validation split).
        set: String,
        /// Images it holds.
        images: usize,
    },
}

impl TrainError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, error: std::io::Error) -> TrainError {
        TrainError::Io { path: path.into(), error }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_io_error_shows_its_cause_once_also_with_its_chain() {
        let err = TrainError::io("run/metrics.jsonl", std::io::Error::from_raw_os_error(28));
        let message = err.to_string();
        assert_eq!(message, "run/metrics.jsonl: No space left on device (os error 28)");
        // `{:#}` of anyhow appends every source: there is none to repeat it.
        assert!(std::error::Error::source(&err).is_none());
    }
}
