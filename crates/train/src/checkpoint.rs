//! Checkpoints: one folder per finished epoch, `checkpoints/epoch-NNNN/`, with
//! fixed parts: `model.safetensors` (timm keys, loads into timm as is),
//! `optimizer.safetensors` (LAMB moments) and `state.json` (position in the
//! run, optimizer step counts, loader counters). The folder is assembled under
//! a temporary name, every file written through [`crate::atomic_file`]
//! (fsynced), then the folder is fsynced and renamed into place, so a
//! checkpoint folder that exists is complete. The newest `keep_last` are kept.

use crate::atomic_file::{self, sync_and_rename, temporary_sibling};
use crate::error::TrainError;
use crate::lamb::{Lamb, LambSteps};
use rsb_vision::weights::{read_safetensors, write_safetensors};
use rsb_vision::Model;
use std::path::{Path, PathBuf};

/// Checkpoint sub-folder of a run directory.
pub const CHECKPOINTS: &str = "checkpoints";

/// The scalar part of a checkpoint.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainState {
    /// Recipe name, to refuse resuming a different run by mistake.
    pub recipe: String,
    /// Model name.
    pub model: String,
    /// Epoch to run next.
    pub next_epoch: u64,
    /// Update within `next_epoch` to run next.
    pub next_step: u64,
    /// Optimizer updates done so far (the schedule's position).
    pub updates: u64,
    /// LAMB step counts.
    pub optimizer: LambSteps,
    /// Samples replaced because their file was undecodable, so far.
    pub replaced_samples: u64,
    /// Best validation top-1 so far, in percent.
    pub best_top1: Option<f64>,
}

/// Folder name of the checkpoint written after epoch `epoch` (0-based).
pub fn folder_name(epoch: u64) -> String {
    format!("epoch-{:04}", epoch + 1)
}

/// Writes a checkpoint into `run_dir/checkpoints/<folder_name(epoch)>`.
pub fn save(
    run_dir: &Path,
    epoch: u64,
    model: &Model,
    optimizer: &Lamb,
    state: &TrainState,
    keep_last: usize,
) -> Result<PathBuf, TrainError> {
    let root = run_dir.join(CHECKPOINTS);
    std::fs::create_dir_all(&root).map_err(|e| TrainError::io(&root, e))?;
    let target = root.join(folder_name(epoch));
    let staging = temporary_sibling(&target);
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| TrainError::io(&staging, e))?;
    }
    std::fs::create_dir(&staging).map_err(|e| TrainError::io(&staging, e))?;
    atomic_file::write_with(&staging.join("model.safetensors"), |staged| {
        Ok(model.save_safetensors(staged)?)
    })?;
    let moments = optimizer.state_tensors();
    atomic_file::write_with(&staging.join("optimizer.safetensors"), |staged| {
        Ok(write_safetensors(&moments, staged)?)
    })?;
    let state_path = staging.join("state.json");
    let json = serde_json::to_string_pretty(state).map_err(|e| TrainError::Checkpoint {
        path: state_path.clone(),
        problem: format!("cannot serialise the training state: {e}"),
    })?;
    atomic_file::write_bytes(&state_path, json.as_bytes())?;
    if target.exists() {
        // Re-running an epoch (after a resume from an older checkpoint) replaces it.
        std::fs::remove_dir_all(&target).map_err(|e| TrainError::io(&target, e))?;
    }
    sync_and_rename(&staging, &target).map_err(|e| TrainError::io(&target, e))?;
    prune(&root, keep_last.max(1));
    Ok(target)
}

/// Complete checkpoint folders of a run, oldest first.
pub fn list(run_dir: &Path) -> Vec<PathBuf> {
    let root = run_dir.join(CHECKPOINTS);
    let mut found: Vec<PathBuf> = std::fs::read_dir(&root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("epoch-"))
                && p.join("state.json").is_file()
        })
        .collect();
    found.sort();
    found
}

fn prune(root: &Path, keep_last: usize) {
    let run_dir = root.parent().unwrap_or(root);
    let all = list(run_dir);
    if all.len() > keep_last {
        for old in &all[..all.len() - keep_last] {
            if let Err(e) = std::fs::remove_dir_all(old) {
                tracing::warn!(checkpoint = %old.display(), error = %e, "could not delete an old checkpoint; keeping it");
            }
        }
    }
}

/// Resolves `--resume PATH`: a checkpoint folder, or a run folder (its newest checkpoint).
pub fn resolve(path: &Path) -> Result<PathBuf, TrainError> {
    if path.join("state.json").is_file() {
        return Ok(path.to_path_buf());
    }
    list(path).pop().ok_or_else(|| TrainError::Checkpoint {
        path: path.to_path_buf(),
        problem: format!(
            "neither a checkpoint (no state.json) nor a run folder with {CHECKPOINTS}/epoch-*"
        ),
    })
}

/// Restores model, optimizer and returns the position saved in `checkpoint`.
pub fn load(
    checkpoint: &Path,
    model: &mut Model,
    optimizer: &mut Lamb,
) -> Result<TrainState, TrainError> {
    let bad = |problem: String| TrainError::Checkpoint { path: checkpoint.to_path_buf(), problem };
    let state_path = checkpoint.join("state.json");
    let text = std::fs::read_to_string(&state_path).map_err(|e| TrainError::io(&state_path, e))?;
    let state: TrainState =
        serde_json::from_str(&text).map_err(|e| bad(format!("state.json: {e}")))?;
    if state.model != model.spec().name {
        return Err(bad(format!(
            "saved for model `{}`, this run trains `{}`",
            state.model,
            model.spec().name
        )));
    }
    model.load_safetensors(&checkpoint.join("model.safetensors"))?;
    let moments = read_safetensors(&checkpoint.join("optimizer.safetensors"))?;
    optimizer
        .load_state(moments, &state.optimizer)
        .map_err(|p| bad(format!("optimizer.safetensors: {p}")))?;
    Ok(state)
}
