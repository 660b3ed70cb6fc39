//! Reading and writing model weights as `safetensors` with timm's keys.
//!
//! Files written here load into timm with
//! `timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))`,
//! and files saved from a timm model's `state_dict()` load here.

use crate::error::VisionError;
use crate::model::Model;
use std::path::Path;
use tch::{Device, Tensor};

/// Writes named tensors (moved to the CPU, made contiguous) as one
/// `safetensors` file at `path`, directly: a crash mid-write leaves a torn
/// file. Checkpoints write through a temporary file and rename it into place
/// (`rsb_train::atomic_file`).
pub fn write_safetensors(tensors: &[(String, Tensor)], path: &Path) -> Result<(), VisionError> {
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.f_to_device(Device::Cpu)?.f_contiguous()?)))
        .collect::<Result<_, tch::TchError>>()?;
    Tensor::write_safetensors(&cpu, path)
        .map_err(|source| VisionError::Safetensors { path: path.to_path_buf(), source })
}

/// Reads every tensor of a `safetensors` file.
pub fn read_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>, VisionError> {
    if !path.is_file() {
        return Err(VisionError::WeightsIo {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
    }
    Tensor::read_safetensors(path)
        .map_err(|source| VisionError::Safetensors { path: path.to_path_buf(), source })
}

impl Model {
    /// Saves the state dict (timm keys) to `path` (directly, see [`write_safetensors`]).
    pub fn save_safetensors(&self, path: &Path) -> Result<(), VisionError> {
        write_safetensors(&self.state_dict()?, path)
    }

    /// Loads a state dict saved by timm or by [`Model::save_safetensors`].
    pub fn load_safetensors(&mut self, path: &Path) -> Result<(), VisionError> {
        let entries = read_safetensors(path)?;
        self.load_state_dict(entries, path)
    }
}
