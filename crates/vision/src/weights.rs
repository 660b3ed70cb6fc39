//! Reading and writing model weights as `safetensors` with timm's keys.
//!
//! Files written here load into timm with
//! `timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))`,
//! and files saved from a timm model's `state_dict()` load here.

use crate::error::VisionError;
use crate::model::Model;
use std::fs::File;
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

/// Writes named tensors as one `safetensors` file, atomically: a temporary file
/// in the same folder, fsync, rename over `path`, fsync of the folder. A crash
/// leaves either the old file or the new one, never a torn one.
pub fn write_safetensors_atomic(
    tensors: &[(String, Tensor)],
    path: &Path,
) -> Result<(), VisionError> {
    let io_err = |source| VisionError::WeightsIo { path: path.to_path_buf(), source };
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.f_to_device(Device::Cpu)?.f_contiguous()?)))
        .collect::<Result<_, tch::TchError>>()?;
    let tmp = temporary_sibling(path);
    Tensor::write_safetensors(&cpu, &tmp)?;
    sync_and_rename(&tmp, path).map_err(io_err)
}

/// Fsyncs `tmp`, renames it to `path` and fsyncs the parent folder.
pub fn sync_and_rename(tmp: &Path, path: &Path) -> std::io::Result<()> {
    File::open(tmp)?.sync_all()?;
    std::fs::rename(tmp, path)?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// `dir/.name.tmp-<pid>`: a hidden sibling on the same file system.
pub fn temporary_sibling(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Reads every tensor of a `safetensors` file.
pub fn read_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>, VisionError> {
    if !path.is_file() {
        return Err(VisionError::WeightsIo {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
    }
    Ok(Tensor::read_safetensors(path)?)
}

impl Model {
    /// Saves the state dict (timm keys) to `path`, atomically.
    pub fn save_safetensors(&self, path: &Path) -> Result<(), VisionError> {
        write_safetensors_atomic(&self.state_dict()?, path)
    }

    /// Loads a state dict saved by timm or by [`Model::save_safetensors`].
    pub fn load_safetensors(&mut self, path: &Path) -> Result<(), VisionError> {
        let entries = read_safetensors(path)?;
        self.load_state_dict(entries, path)
    }
}
