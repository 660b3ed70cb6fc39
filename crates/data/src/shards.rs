//! WebDataset tar shards: reading an index of them, and writing them.
//!
//! A shard folder holds `*.tar` files (read in natural order of their names)
//! and optionally `classes.txt` (one class name per line, in index order).
//! Inside a tar, the members of one sample share a key, the member path up
//! to the first `.` of its file name (WebDataset's rule): `KEY.jpg` (or
//! `.jpeg`, `.png`) is the image and `KEY.cls` its class index as decimal
//! text. Other members are ignored. A sample missing either part, a `.cls`
//! that is not a number, or a tar that does not parse is an error naming the
//! shard and the key, before training starts.
//!
//! Unlike WebDataset's streaming reader, samples are read by random access
//! (the offset of each image inside its tar is indexed once), so the samplers
//! shuffle over the whole dataset exactly as for a folder of files.

use crate::dataset::{natural_cmp, Sample, ShardMember};
use crate::error::DataError;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// Name of the optional class-name file of a shard folder.
pub const CLASSES_FILE: &str = "classes.txt";

/// Largest image member accepted (a guard against corrupt size fields).
pub const MAX_MEMBER_BYTES: u64 = 1 << 30;

/// Image member extensions (lower case).
const IMAGE_EXTS: &[&str] = &["jpg", "jpeg", "png"];

/// Whether `root` holds at least one `*.tar` file.
pub fn has_shards(root: &Path) -> Result<bool, DataError> {
    Ok(!shard_files(root)?.is_empty())
}

/// The `*.tar` files of `root`, in natural order.
pub fn shard_files(root: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(root).map_err(|e| DataError::io(root, e))? {
        let path = entry.map_err(|e| DataError::io(root, e))?.path();
        if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("tar")) {
            out.push(path);
        }
    }
    out.sort_by(|a, b| natural_cmp(&a.to_string_lossy(), &b.to_string_lossy()));
    Ok(out)
}

/// Splits a member path into (key, lower-case extension).
fn split_key(name: &str) -> (&str, String) {
    let base_start = name.rfind('/').map_or(0, |i| i + 1);
    match name[base_start..].find('.') {
        Some(dot) => (&name[..base_start + dot], name[base_start + dot + 1..].to_ascii_lowercase()),
        None => (name, String::new()),
    }
}

/// Indexes one shard: its samples in member order.
pub fn index_shard(path: &Path) -> Result<Vec<Sample>, DataError> {
    let bad = |problem: String| DataError::Format { path: path.to_path_buf(), problem };
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let file_len = file.metadata().map_err(|e| DataError::io(path, e))?.len();
    let mut archive = tar::Archive::new(file);
    let entries = archive.entries_with_seek().map_err(|e| bad(format!("not a tar file: {e}")))?;
    // key -> (image member, label)
    let mut order: Vec<String> = Vec::new();
    let mut parts: HashMap<String, (Option<ShardMember>, Option<u32>)> = HashMap::new();
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(format!("corrupt tar: {e}")))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let (key, ext) = split_key(&name);
        let key = key.to_string();
        let slot = parts.entry(key.clone()).or_insert_with(|| {
            order.push(key.clone());
            (None, None)
        });
        if IMAGE_EXTS.contains(&ext.as_str()) {
            let (offset, len) = (entry.raw_file_position(), entry.size());
            if offset.checked_add(len).is_none_or(|end| end > file_len) || len > MAX_MEMBER_BYTES {
                return Err(bad(format!(
                    "member {name} claims {len} bytes at offset {offset}, beyond the shard's \
                     {file_len} bytes (or the {MAX_MEMBER_BYTES}-byte limit)"
                )));
            }
            if slot.0.is_some() {
                return Err(bad(format!("sample `{key}` has two images")));
            }
            slot.0 = Some(ShardMember { name: name.clone(), offset, len });
        } else if ext == "cls" {
            let mut text = String::new();
            entry
                .by_ref()
                .take(64)
                .read_to_string(&mut text)
                .map_err(|e| bad(format!("member {name}: {e}")))?;
            let label = text.trim().parse::<u32>().map_err(|_| {
                bad(format!("member {name}: expected a class index, got {:?}", text.trim()))
            })?;
            slot.1 = Some(label);
        }
    }
    let mut samples = Vec::with_capacity(order.len());
    for key in order {
        match parts.remove(&key) {
            Some((Some(member), Some(label))) => {
                samples.push(Sample { path: path.to_path_buf(), label, member: Some(member) })
            }
            Some((Some(_), None)) => return Err(bad(format!("sample `{key}` has no .cls label"))),
            Some((None, Some(_))) => return Err(bad(format!("sample `{key}` has no image"))),
            _ => {} // only members we ignore
        }
    }
    Ok(samples)
}

/// Indexes every shard of `root`: class names (from `classes.txt`, else
/// none) and the samples, shard by shard.
pub fn index_folder(root: &Path) -> Result<(Vec<String>, Vec<Sample>), DataError> {
    let shards = shard_files(root)?;
    if shards.is_empty() {
        return Err(DataError::Layout {
            path: root.to_path_buf(),
            problem: "no *.tar shards".into(),
        });
    }
    let mut samples = Vec::new();
    for shard in &shards {
        samples.extend(index_shard(shard)?);
    }
    if samples.is_empty() {
        return Err(DataError::Layout {
            path: root.to_path_buf(),
            problem: "the shards hold no sample".into(),
        });
    }
    let classes_path = root.join(CLASSES_FILE);
    let classes = if classes_path.is_file() {
        let text =
            std::fs::read_to_string(&classes_path).map_err(|e| DataError::io(&classes_path, e))?;
        text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect()
    } else {
        Vec::new()
    };
    Ok((classes, samples))
}

/// Writes samples into numbered WebDataset shards of at most `shard_size`
/// samples each: `shard-000000.tar`, ... Each shard is written under a
/// temporary name and renamed when complete.
pub struct ShardWriter {
    out: PathBuf,
    shard_size: usize,
    current: Option<(tar::Builder<BufWriter<File>>, PathBuf)>,
    in_shard: usize,
    written: Vec<PathBuf>,
    keys: HashSet<String>,
}

impl std::fmt::Debug for ShardWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardWriter")
            .field("out", &self.out)
            .field("shards_written", &self.written.len())
            .field("in_shard", &self.in_shard)
            .finish()
    }
}

impl ShardWriter {
    /// Starts writing into the folder `out` (created if missing).
    pub fn create(out: &Path, shard_size: usize) -> Result<ShardWriter, DataError> {
        if shard_size == 0 {
            return Err(DataError::Config("--shard-size must be at least 1".into()));
        }
        std::fs::create_dir_all(out).map_err(|e| DataError::io(out, e))?;
        Ok(ShardWriter {
            out: out.to_path_buf(),
            shard_size,
            current: None,
            in_shard: 0,
            written: Vec::new(),
            keys: HashSet::new(),
        })
    }

    /// A unique key for a sample from its original file stem (dots and
    /// slashes, which would break the key rule, become `_`).
    pub fn key_for(&mut self, stem: &str) -> String {
        let clean: String =
            stem.chars().map(|c| if c == '.' || c == '/' || c == '\\' { '_' } else { c }).collect();
        let clean = if clean.is_empty() { "sample".to_string() } else { clean };
        let mut key = clean.clone();
        let mut n = 1;
        while self.keys.contains(&key) {
            key = format!("{clean}_{n}");
            n += 1;
        }
        self.keys.insert(key.clone());
        key
    }

    fn append(&mut self, name: &str, data: &[u8]) -> Result<(), DataError> {
        let (builder, path) = self.current.as_mut().expect("a shard is open");
        let mut header = tar::Header::new_ustar();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        builder.append_data(&mut header, name, data).map_err(|e| DataError::io(path.as_path(), e))
    }

    /// Adds one sample: `KEY.EXT` with the image bytes and `KEY.cls`.
    pub fn add(&mut self, key: &str, ext: &str, image: &[u8], label: u32) -> Result<(), DataError> {
        if self.current.is_none() {
            let tmp = self.out.join(format!("shard-{:06}.tar.tmp", self.written.len()));
            let file = File::create(&tmp).map_err(|e| DataError::io(&tmp, e))?;
            self.current = Some((tar::Builder::new(BufWriter::new(file)), tmp));
            self.in_shard = 0;
        }
        self.append(&format!("{key}.{ext}"), image)?;
        self.append(&format!("{key}.cls"), label.to_string().as_bytes())?;
        self.in_shard += 1;
        if self.in_shard >= self.shard_size {
            self.close_shard()?;
        }
        Ok(())
    }

    fn close_shard(&mut self) -> Result<(), DataError> {
        if let Some((builder, tmp)) = self.current.take() {
            let mut w = builder.into_inner().map_err(|e| DataError::io(&tmp, e))?;
            w.flush().map_err(|e| DataError::io(&tmp, e))?;
            let file = w.into_inner().map_err(|e| DataError::io(&tmp, e.into_error()))?;
            file.sync_all().map_err(|e| DataError::io(&tmp, e))?;
            let done = tmp.with_extension("");
            std::fs::rename(&tmp, &done).map_err(|e| DataError::io(&done, e))?;
            self.written.push(done);
        }
        Ok(())
    }

    /// Closes the last shard and writes `classes.txt`; returns the shards.
    pub fn finish(mut self, classes: &[String]) -> Result<Vec<PathBuf>, DataError> {
        self.close_shard()?;
        if !classes.is_empty() {
            let path = self.out.join(CLASSES_FILE);
            let text: String = classes.iter().map(|c| format!("{c}\n")).collect();
            std::fs::write(&path, text).map_err(|e| DataError::io(&path, e))?;
        }
        Ok(std::mem::take(&mut self.written))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_webdataset() {
        assert_eq!(split_key("000123.jpg"), ("000123", "jpg".into()));
        assert_eq!(split_key("a/b.c/x.seg.PNG"), ("a/b.c/x", "seg.png".into()));
        assert_eq!(split_key("noext"), ("noext", String::new()));
    }

    #[test]
    fn written_shards_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ShardWriter::create(dir.path(), 2).unwrap();
        for (i, stem) in ["a.b", "c", "c", "d", "e"].iter().enumerate() {
            let key = w.key_for(stem);
            w.add(&key, "jpg", format!("image {i}").as_bytes(), i as u32 % 3).unwrap();
        }
        let shards = w.finish(&["x".into(), "y".into(), "z".into()]).unwrap();
        assert_eq!(shards.len(), 3);
        let (classes, samples) = index_folder(dir.path()).unwrap();
        assert_eq!(classes, vec!["x", "y", "z"]);
        let got: Vec<(String, u32, Vec<u8>)> =
            samples.iter().map(|s| (s.file_name(), s.label, s.read().unwrap())).collect();
        assert_eq!(got[0], ("a_b.jpg".into(), 0, b"image 0".to_vec()));
        assert_eq!(got[2], ("c_1.jpg".into(), 2, b"image 2".to_vec()));
        assert_eq!(got[4], ("e.jpg".into(), 1, b"image 4".to_vec()));
        assert!(samples[0].display().contains("shard-000000.tar:a_b.jpg"));
    }

    #[test]
    fn broken_shards_are_named_errors() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let mut add = |name: &str, data: &[u8]| {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, name, data).unwrap();
        };
        add("k1.jpg", b"x");
        add("k1.cls", b"seven");
        let bytes = b.into_inner().unwrap();
        std::fs::write(dir.path().join("s.tar"), &bytes).unwrap();
        let err = index_folder(dir.path()).unwrap_err().to_string();
        assert!(err.contains("s.tar") && err.contains("k1.cls"), "{err}");

        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_size(1);
        b.append_data(&mut h, "k2.png", &b"x"[..]).unwrap();
        std::fs::write(dir.path().join("s.tar"), b.into_inner().unwrap()).unwrap();
        let err = index_folder(dir.path()).unwrap_err().to_string();
        assert!(err.contains("k2") && err.contains("no .cls"), "{err}");

        std::fs::write(dir.path().join("s.tar"), &bytes[..700]).unwrap();
        assert!(index_folder(dir.path()).is_err());

        // A size field claiming far more data than the file holds.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_size(1);
        b.append_data(&mut h, "k3.jpg", &b"x"[..]).unwrap();
        let mut bytes = b.into_inner().unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_path("k3.jpg").unwrap();
        h.set_size(1 << 40);
        h.set_cksum();
        bytes[..512].copy_from_slice(h.as_bytes());
        std::fs::write(dir.path().join("s.tar"), &bytes).unwrap();
        let err = index_folder(dir.path()).unwrap_err().to_string();
        assert!(err.contains("k3.jpg"), "{err}");
    }
}
