//! Weights files that do not fit: a PyTorch pickle (timm's `.pth`) named as
//! such with its conversion, a torn safetensors file named once, and state
//! dicts whose `num_batches_tracked` is not a scalar or whose weights are
//! integers or hold NaN or infinity, refused naming the file and the key
//! (never a libtorch error); a file cut short said to be, and a wrapped
//! model's state dict (DDP's `module.`) said to be one.

use rsb_vision::{Model, ModelConfig, VisionError};
use std::path::Path;
use tch::{Device, Kind, Tensor};

fn resnet18() -> Model {
    Model::new("resnet18", ModelConfig { num_classes: 5, ..Default::default() }, Device::Cpu)
        .unwrap()
}

/// `resnet18`'s state dict with `key` replaced by `value`, written to `path`.
fn write_with(path: &Path, key: &str, value: Tensor) {
    let mut entries = resnet18().state_dict().unwrap();
    let entry = entries.iter_mut().find(|(name, _)| name == key).expect(key);
    entry.1 = value;
    rsb_vision::weights::write_safetensors(&entries, path).unwrap();
}

#[test]
fn a_pytorch_pickle_is_named_with_its_conversion() {
    let dir = tempfile::tempdir().unwrap();
    // torch.save since PyTorch 1.6 (a zip), and before (a pickle stream).
    for (name, start, format) in [
        ("resnet50_a1_in1k.pth", &b"PK\x03\x04\x00\x00\x08\x08archive/data.pkl"[..], "zip"),
        ("model_best.pth.tar", &b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."[..], "pickle"),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, start).unwrap();
        let err = resnet18().load_safetensors(&path).unwrap_err();
        assert!(matches!(&err, VisionError::PytorchPickle { format: f, .. } if *f == format));
        let message = err.to_string();
        for said in ["PyTorch", "torch.load", "safetensors.torch", "'state_dict'", name] {
            assert!(message.contains(said), "{said} missing: {message}");
        }
        assert!(!message.contains("HeaderTooLarge"), "{message}");
    }
}

#[test]
fn a_safetensors_file_that_starts_like_a_pickle_still_reads() {
    // A header of 640 bytes: its length starts with the bytes 0x80 0x02.
    let data_json = r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
    let header = format!("{data_json:<640}");
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    assert_eq!(&bytes[..2], [0x80, 0x02]);
    bytes.extend(header.as_bytes());
    bytes.extend(1.5f32.to_le_bytes());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    std::fs::write(&path, bytes).unwrap();
    let read = rsb_vision::weights::read_safetensors(&path).unwrap();
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].1.double_value(&[0]), 1.5);
}

#[test]
fn an_unreadable_file_is_named_once_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("torn.safetensors");
    std::fs::write(&path, [1u8, 2, 3]).unwrap();
    let err = resnet18().load_safetensors(&path).unwrap_err();
    let message = err.to_string();
    assert_eq!(message.matches(path.to_str().unwrap()).count(), 1, "{message}");
    assert!(message.contains("not a readable safetensors file"), "{message}");
    // `{:#}` appends every source: there is none to repeat the message.
    assert!(std::error::Error::source(&err).is_none(), "{message}");
}

#[test]
fn a_num_batches_tracked_that_is_not_a_scalar_is_refused_naming_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbt.safetensors");
    write_with(&path, "bn1.num_batches_tracked", Tensor::from_slice(&[3i64, 4]));
    let err = resnet18().load_safetensors(&path).unwrap_err();
    assert!(matches!(err, VisionError::WeightsMismatch { .. }), "{err}");
    let message = err.to_string();
    for said in [path.to_str().unwrap(), "bn1.num_batches_tracked", "[2]", "scalar"] {
        assert!(message.contains(said), "{said} missing: {message}");
    }
    // One value of shape [1] (older saves) is taken, as torch takes it.
    let one = dir.path().join("nbt1.safetensors");
    let mut entries = resnet18().state_dict().unwrap();
    for (name, value) in entries.iter_mut() {
        if name.ends_with("num_batches_tracked") {
            *value = Tensor::from_slice(&[7i64]);
        }
    }
    rsb_vision::weights::write_safetensors(&entries, &one).unwrap();
    let mut loaded = resnet18();
    loaded.load_safetensors(&one).unwrap();
    assert_eq!(loaded.num_batches_tracked(), 7);
}

#[test]
fn integer_weights_are_refused_and_half_precision_ones_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("int.safetensors");
    let conv = resnet18().state_dict().unwrap().into_iter().find(|(n, _)| n == "conv1.weight");
    let conv = conv.unwrap().1;
    write_with(&path, "conv1.weight", conv.to_kind(Kind::Int64));
    let err = resnet18().load_safetensors(&path).unwrap_err();
    let message = err.to_string();
    for said in [path.to_str().unwrap(), "conv1.weight", "Int64", "Float"] {
        assert!(message.contains(said), "{said} missing: {message}");
    }

    // timm's fp16 weights are floats: cast, not refused.
    let half = dir.path().join("half.safetensors");
    let source = resnet18();
    let entries: Vec<(String, Tensor)> = source
        .state_dict()
        .unwrap()
        .into_iter()
        .map(|(n, t)| {
            let t = if t.is_floating_point() { t.to_kind(Kind::Half) } else { t };
            (n, t)
        })
        .collect();
    rsb_vision::weights::write_safetensors(&entries, &half).unwrap();
    let mut loaded = resnet18();
    loaded.load_safetensors(&half).unwrap();
    let conv1 = |model: &Model| {
        let found = model.named_parameters().iter().find(|(n, _)| n == "conv1.weight");
        found.unwrap().1.shallow_clone()
    };
    let expected = conv1(&source).to_kind(Kind::Half).to_kind(Kind::Float);
    assert!(conv1(&loaded).equal(&expected));
    assert!(!conv1(&source).equal(&expected), "fp16 rounding changed nothing: a weak test");
}

#[test]
fn weights_with_nan_or_infinity_are_refused_naming_file_and_keys() {
    let dir = tempfile::tempdir().unwrap();
    for (key, bad) in [("fc.bias", f64::NAN), ("layer1.0.bn1.running_var", f64::INFINITY)] {
        let path = dir.path().join("bad.safetensors");
        let entries = resnet18().state_dict().unwrap();
        let value = entries.iter().find(|(n, _)| n == key).unwrap().1.copy();
        let _ = value.get(0).fill_(bad);
        write_with(&path, key, value);
        let mut model = resnet18();
        let before = model.state_dict().unwrap();
        let err = model.load_safetensors(&path).unwrap_err().to_string();
        assert!(
            err.contains(path.to_str().unwrap())
                && err.contains(key)
                && err.contains("non-finite values"),
            "{err}"
        );
        // Nothing was loaded.
        for ((name, was), (_, is)) in before.iter().zip(model.state_dict().unwrap().iter()) {
            assert!(was.equal(is), "{name} changed");
        }
    }
}

#[test]
fn a_num_batches_tracked_that_is_not_a_count_is_refused_naming_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    for value in [f64::NAN, 1e30, -3.0] {
        let path = dir.path().join("nbt.safetensors");
        write_with(&path, "bn1.num_batches_tracked", Tensor::from(value));
        let err = resnet18().load_safetensors(&path).unwrap_err();
        assert!(matches!(err, VisionError::WeightsMismatch { .. }), "{value}: {err}");
        let message = err.to_string();
        for said in [path.to_str().unwrap(), "bn1.num_batches_tracked", "a count is expected"] {
            assert!(message.contains(said), "{said} missing: {message}");
        }
    }
}

#[test]
fn a_file_cut_short_is_said_to_be_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole.safetensors");
    resnet18().save_safetensors(&whole).unwrap();
    let bytes = std::fs::read(&whole).unwrap();
    // Cut in its tensor data, and in its header.
    for (name, keep, said) in [
        ("half.safetensors", bytes.len() / 2, "bytes of tensor data"),
        ("head.safetensors", 40, "header is"),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, &bytes[..keep]).unwrap();
        let message = resnet18().load_safetensors(&path).unwrap_err().to_string();
        for said in [path.to_str().unwrap(), "truncated", said, &format!("file is {keep} bytes")] {
            assert!(message.contains(said), "{said} missing: {message}");
        }
    }
    // A Git LFS pointer saved under the name is not called cut short.
    let pointer = dir.path().join("pointer.safetensors");
    let lfs = "version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 46830571\n";
    std::fs::write(&pointer, lfs).unwrap();
    let message = resnet18().load_safetensors(&pointer).unwrap_err().to_string();
    assert!(message.contains("not a readable safetensors file"), "{message}");
    assert!(!message.contains("truncated"), "{message}");
}

#[test]
fn a_wrapped_models_state_dict_is_said_to_be_one() {
    let dir = tempfile::tempdir().unwrap();
    for prefix in ["module.", "_orig_mod."] {
        let path = dir.path().join("wrapped.safetensors");
        let entries: Vec<(String, Tensor)> = resnet18()
            .state_dict()
            .unwrap()
            .into_iter()
            .map(|(name, t)| (format!("{prefix}{name}"), t))
            .collect();
        rsb_vision::weights::write_safetensors(&entries, &path).unwrap();
        let message = resnet18().load_safetensors(&path).unwrap_err().to_string();
        let said = format!("every unexpected key starts with `{prefix}`");
        assert!(message.contains(&said) && message.contains("clean_state_dict"), "{message}");
    }
}
