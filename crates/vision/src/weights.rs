//! Reading and writing model weights as `safetensors` with timm's keys.
//!
//! Files written here load into timm with
//! `timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))`,
//! and files saved from a timm model's `state_dict()` load here. A PyTorch
//! pickle (`torch.save`: timm's `.pth`, train.py's `.pth.tar`) is recognised
//! and refused with the one-line conversion to safetensors.

use crate::error::VisionError;
use crate::model::Model;
use std::io::Read;
use std::path::Path;
use tch::{Device, TchError, Tensor};

/// Writes named tensors (moved to the CPU, made contiguous) as one
/// `safetensors` file at `path`, directly: a crash mid-write leaves a torn
/// file. Checkpoints write through a temporary file and rename it into place
/// (`rsb_train::atomic_file`).
pub fn write_safetensors(tensors: &[(String, Tensor)], path: &Path) -> Result<(), VisionError> {
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.f_to_device(Device::Cpu)?.f_contiguous()?)))
        .collect::<Result<_, tch::TchError>>()?;
    Tensor::write_safetensors(&cpu, path).map_err(|e| VisionError::Safetensors {
        path: path.to_path_buf(),
        problem: format!("cannot write it as safetensors: {}", safetensors_problem(e)),
    })
}

/// Reads every tensor of a `safetensors` file; a PyTorch pickle is refused
/// as such ([`VisionError::PytorchPickle`]).
pub fn read_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>, VisionError> {
    // What is there, if anything, is named as it is: missing, a link to
    // nothing, or not a file to read (a FIFO would be waited on for ever).
    let error = match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => None,
        Ok(_) => Some(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file (a FIFO, a device or a folder?)",
        )),
        Err(e) => Some(e),
    };
    if let Some(error) = error {
        return Err(VisionError::WeightsIo { path: path.to_path_buf(), error });
    }
    Tensor::read_safetensors(path).map_err(|e| {
        // Only a file that is not safetensors is looked at again: a header
        // length can begin with the same bytes as a pickle.
        if let Some(format) = pytorch_pickle_format(path) {
            return VisionError::PytorchPickle { path: path.to_path_buf(), format };
        }
        VisionError::Safetensors {
            path: path.to_path_buf(),
            problem: format!("not a readable safetensors file: {}", safetensors_problem(e)),
        }
    })
}

/// libtorch's error without the path it repeats.
fn safetensors_problem(error: TchError) -> String {
    match error {
        TchError::SafeTensorError { err, .. } => err.to_string(),
        other => other.to_string(),
    }
}

/// `zip` or `pickle` when the file starts as `torch.save` writes: a zip
/// archive (PyTorch 1.6 and later) or a pickle stream (protocol 2 to 5).
fn pytorch_pickle_format(path: &Path) -> Option<&'static str> {
    let mut start = [0u8; 4];
    std::fs::File::open(path).ok()?.read_exact(&mut start).ok()?;
    match start {
        [b'P', b'K', 3, 4] => Some("zip"),
        [0x80, 2..=5, ..] => Some("pickle"),
        _ => None,
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_not_a_weights_file_is_named_as_it_is() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("missing.safetensors");
        let err = read_safetensors(&missing).unwrap_err().to_string();
        assert!(err.contains("missing.safetensors") && err.contains("No such file"), "{err}");
        let fifo = tmp.path().join("fifo.safetensors");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(made.success());
        // Named, not opened (a reader would wait for a writer for ever).
        let err = read_safetensors(&fifo).unwrap_err().to_string();
        assert!(err.contains("fifo.safetensors") && err.contains("not a regular file"), "{err}");
        let folder = tmp.path().join("folder.safetensors");
        std::fs::create_dir(&folder).unwrap();
        let err = read_safetensors(&folder).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
    }
}
