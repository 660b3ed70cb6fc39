//! Reading and writing model weights as `safetensors` with timm's keys.
//!
//! Files written here load into timm with
//! `timm.create_model(name, pretrained=True, num_classes=K,
//! pretrained_cfg_overlay=dict(file=PATH, num_classes=K))` (K the file's
//! classes: without it in the overlay too, timm leaves the classifier
//! random or fails on its shape),
//! and files saved from a timm model's `state_dict()` load here. A PyTorch
//! pickle (`torch.save`: timm's `.pth`, train.py's `.pth.tar`) is recognised
//! and refused with the one-line conversion to safetensors.

use crate::error::VisionError;
use crate::model::Model;
use safetensors::tensor::{Dtype, Metadata};
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
    let file = rsb_files::open_regular_file(path)
        .map_err(|error| VisionError::WeightsIo { path: path.to_path_buf(), error })?;
    if let Some(problem) = unreadable_dtypes(file) {
        return Err(VisionError::Safetensors { path: path.to_path_buf(), problem });
    }
    Tensor::read_safetensors(path).map_err(|e| {
        // Only a file that is not safetensors is looked at again: a header
        // length can begin with the same bytes as a pickle.
        if let Some(format) = pytorch_pickle_format(path) {
            return VisionError::PytorchPickle { path: path.to_path_buf(), format };
        }
        if let Some(problem) = truncation(path) {
            return VisionError::Safetensors { path: path.to_path_buf(), problem };
        }
        VisionError::Safetensors {
            path: path.to_path_buf(),
            problem: format!("not a readable safetensors file: {}", safetensors_problem(e)),
        }
    })
}

/// The dtypes tch's safetensors reader converts to a libtorch kind.
const READABLE_DTYPES: [Dtype; 10] = [
    Dtype::F32,
    Dtype::F16,
    Dtype::BF16,
    Dtype::F64,
    Dtype::I8,
    Dtype::I16,
    Dtype::I32,
    Dtype::I64,
    Dtype::U8,
    Dtype::BOOL,
];

/// Names the tensors of the file whose dtype tch cannot read (F8, U16,
/// U32, U64, ...), which tch's older safetensors reader refuses without
/// naming the tensor, or refuses as an unreadable header (F8). `None` when
/// every dtype is readable, or when the header itself is unreadable: that
/// is left to the full read to report.
fn unreadable_dtypes(file: std::fs::File) -> Option<String> {
    let header = read_safetensors_header(file).ok()?;
    let metadata: Metadata = serde_json::from_slice(&header).ok()?;
    let tensors = metadata.tensors();
    let total = tensors.len();
    let mut unreadable: Vec<(String, Dtype)> = tensors
        .into_iter()
        .filter(|(_, info)| !READABLE_DTYPES.contains(&info.dtype))
        .map(|(name, info)| (name, info.dtype))
        .collect();
    if unreadable.is_empty() {
        return None;
    }
    unreadable.sort();
    const NAMED: usize = 5;
    let mut named: Vec<String> =
        unreadable.iter().take(NAMED).map(|(name, dtype)| format!("`{name}` ({dtype})")).collect();
    if unreadable.len() > NAMED {
        named.push(format!("and {} more", unreadable.len() - NAMED));
    }
    let readable: Vec<String> = READABLE_DTYPES.iter().map(Dtype::to_string).collect();
    let which = match (unreadable.len(), total) {
        (1, 1) => "its one tensor has".to_string(),
        (1, total) => format!("1 of its {total} tensors has"),
        (n, total) => format!("{n} of its {total} tensors have"),
    };
    Some(format!(
        "{which} a dtype libtorch's reader here cannot take: {}. It reads {}; convert them \
         first (in PyTorch, `t.float()` for a float, `t.to(torch.int64)` for an integer) and \
         save again",
        named.join(", "),
        readable.join(", ")
    ))
}

/// The JSON header of a safetensors file, read from its start: its first
/// 8 bytes give the header's length (little-endian), capped as the format
/// caps it.
fn read_safetensors_header(mut file: std::fs::File) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 8];
    file.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len);
    if len > MAX_HEADER_LEN {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "header too large"));
    }
    let mut header = Vec::with_capacity(len as usize);
    file.take(len).read_to_end(&mut header)?;
    Ok(header)
}

/// Says how a safetensors file is cut short (a copy or download that
/// stopped), which the reader reports as `MetadataIncompleteBuffer` or
/// `InvalidHeaderLength`: the header its first 8 bytes announce, or the
/// tensor data its header lists, runs past the file's end. `None` when it
/// is not cut short so, or cannot be read.
fn truncation(path: &Path) -> Option<String> {
    let mut file = std::fs::File::open(path).ok()?;
    let size = file.metadata().ok()?.len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len).ok()?;
    let header_len = u64::from_le_bytes(len);
    // Only a file that starts as safetensors does (a header of sane length
    // opening a JSON object) is called cut short: a Git LFS pointer or an
    // HTML page saved under the name is not one.
    let mut first = [0u8; 1];
    if header_len > MAX_HEADER_LEN || file.read_exact(&mut first).is_err() || first[0] != b'{' {
        return None;
    }
    let header_end = header_len.checked_add(8)?;
    if header_end > size {
        return Some(format!(
            "truncated: its header is {header_len} bytes long, and the file is {size} bytes"
        ));
    }
    let mut header = first.to_vec();
    file.take(header_len - 1).read_to_end(&mut header).ok()?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).ok()?;
    let data_end =
        header.values().filter_map(|entry| entry.get("data_offsets")?.get(1)?.as_u64()).max()?;
    let needed = header_end.checked_add(data_end)?;
    (needed > size).then(|| {
        format!(
            "truncated: its header lists {data_end} bytes of tensor data after {header_end} \
             bytes of header, and the file is {size} bytes"
        )
    })
}

/// The longest safetensors header read (the safetensors crate's own limit).
const MAX_HEADER_LEN: u64 = 100_000_000;

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

    /// A safetensors file laid out by hand: its header, then `data`.
    fn write_raw_safetensors(path: &Path, header: &str, data: &[u8]) {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn tensors_of_a_dtype_libtorch_cannot_read_here_are_named() {
        let tmp = tempfile::tempdir().unwrap();
        // F8 (which tch's own reader takes for an unreadable header) and
        // U32 (which it refuses without naming the tensor), beside F32.
        let path = tmp.path().join("mixed.safetensors");
        write_raw_safetensors(
            &path,
            r#"{"conv1.weight":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},
                "fc.weight":{"dtype":"F8_E4M3","shape":[4],"data_offsets":[8,12]},
                "fc.bias":{"dtype":"U32","shape":[1],"data_offsets":[12,16]}}"#,
            &[0u8; 16],
        );
        let err = read_safetensors(&path).unwrap_err().to_string();
        assert!(err.contains("mixed.safetensors"), "{err}");
        assert!(err.contains("2 of its 3 tensors"), "{err}");
        assert!(err.contains("`fc.bias` (U32), `fc.weight` (F8_E4M3)"), "{err}");
        assert!(!err.contains("conv1.weight"), "{err}");
        // Many are counted past the first five.
        let many = (0..7)
            .map(|i| {
                format!(
                    r#""w{i}":{{"dtype":"U16","shape":[1],"data_offsets":[{},{}]}}"#,
                    2 * i,
                    2 * i + 2
                )
            })
            .collect::<Vec<_>>()
            .join(",");
        let path = tmp.path().join("many.safetensors");
        write_raw_safetensors(&path, &format!("{{{many}}}"), &[0u8; 14]);
        let err = read_safetensors(&path).unwrap_err().to_string();
        assert!(err.contains("7 of its 7") && err.contains("`w4` (U16), and 2 more"), "{err}");
        // Readable dtypes pass the check and are read.
        let path = tmp.path().join("fine.safetensors");
        write_raw_safetensors(
            &path,
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},
                "b":{"dtype":"I64","shape":[1],"data_offsets":[8,16]}}"#,
            &[0u8; 16],
        );
        let read = read_safetensors(&path).unwrap();
        assert_eq!(read.len(), 2);
    }
}
