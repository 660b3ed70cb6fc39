//! WebDataset tar shards: reading an index of them, and writing them.
//!
//! A shard folder holds `*.tar` files (read in natural order of their names)
//! and optionally `classes.txt` (one class name per line, in index order).
//! Inside a tar, the members of one sample share a key, the member path up
//! to the first `.` of its file name (WebDataset's rule): `KEY.jpg` (or
//! `.jpeg`, `.png`) is the image and `KEY.cls` its class index as decimal
//! text. Other members are counted and logged, and not read. A sample
//! missing either part or with two of one, a `.cls` that is not a number, a
//! tar that does not parse or ends without tar's end-of-archive block (cut
//! short at a block boundary: a partial copy), and a shard with no sample
//! are errors naming the shard (and the key), before training starts.
//!
//! `worker data shard` writes `shards.json` last, listing each shard with
//! its size and sample count: a folder whose shards differ from that list
//! (one missing, a stale one from an earlier run, one copied in part) is
//! refused, naming the shard. A folder with `shards.writing` (made when the
//! writer starts, removed after `shards.json` is written) or a `*.tar.tmp`
//! holds what an interrupted `worker data shard` left, and is refused too;
//! a `shards.writing` beside a `shards.json` (the writer died between the
//! two) is logged, and the list decides.
//! Shards written by other tools (no `shards.json`) are read with a warning
//! that their set's completeness cannot be checked. The writer refuses a
//! folder that already holds shards.
//!
//! Unlike WebDataset's streaming reader, samples are read by random access
//! (the offset of each image inside its tar is indexed once), so the samplers
//! shuffle over the whole dataset exactly as for a folder of files.

use crate::dataset::{natural_cmp, Sample, ShardMember};
use crate::error::DataError;
use rsb_files::{write_atomically, Readers};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// Name of the optional class-name file of a shard folder.
pub const CLASSES_FILE: &str = "classes.txt";

/// Name of the list of shards that `worker data shard` writes last.
pub const MANIFEST_FILE: &str = "shards.json";

/// Version of [`ShardManifest`] this build writes and reads.
pub const MANIFEST_FORMAT: u32 = 1;

/// Suffix of a shard being written (renamed without it when complete).
const TEMPORARY_SUFFIX: &str = ".tar.tmp";

/// A file that says `worker data shard` writes into the folder: made
/// first, removed after [`MANIFEST_FILE`] is written.
pub const WRITING_FILE: &str = "shards.writing";

/// Size of a tar block.
const TAR_BLOCK: u64 = 512;

/// The shards a finished `worker data shard` wrote (`shards.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardManifest {
    /// [`MANIFEST_FORMAT`] of the writer.
    pub format: u32,
    /// Every shard of the folder, in order.
    pub shards: Vec<ShardListing>,
}

/// One shard as `shards.json` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardListing {
    /// File name in the folder.
    pub name: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// Samples in it.
    pub samples: u64,
}

/// Largest image member accepted (a guard against corrupt size fields).
pub const MAX_MEMBER_BYTES: u64 = 1 << 30;

/// Image member extensions (lower case).
const IMAGE_EXTS: &[&str] = &["jpg", "jpeg", "png"];

/// What one listing of a folder says of its shards.
#[derive(Debug, Clone, Default)]
pub struct FolderEntries {
    /// The `*.tar` files, in natural order.
    pub shards: Vec<PathBuf>,
    /// What a writer that has not finished leaves: its shard under a
    /// temporary name (`*.tar.tmp`), and its `shards.writing`; names in
    /// natural order.
    pub unfinished: Vec<String>,
}

/// Lists `root` once for its shards and what an unfinished writer left.
pub fn list_folder(root: &Path) -> Result<FolderEntries, DataError> {
    let mut entries = FolderEntries::default();
    for entry in std::fs::read_dir(root).map_err(|e| DataError::io(root, e))? {
        let path = entry.map_err(|e| DataError::io(root, e))?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("tar")) {
            entries.shards.push(path);
        } else if name.to_ascii_lowercase().ends_with(TEMPORARY_SUFFIX) || name == WRITING_FILE {
            entries.unfinished.push(name);
        }
    }
    entries.shards.sort_by(|a, b| natural_cmp(&a.to_string_lossy(), &b.to_string_lossy()));
    entries.unfinished.sort_by(|a, b| natural_cmp(a, b));
    Ok(entries)
}

/// Reads `root/shards.json`, if there is one.
fn read_manifest(root: &Path) -> Result<Option<ShardManifest>, DataError> {
    let path = root.join(MANIFEST_FILE);
    let text = match rsb_files::read_regular_file(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(DataError::io(&path, e)),
    };
    let manifest: ShardManifest = serde_json::from_str(&text).map_err(|e| DataError::Format {
        path: path.clone(),
        problem: format!("line {}: {e}", e.line()),
    })?;
    if manifest.format != MANIFEST_FORMAT {
        return Err(DataError::Format {
            path,
            problem: format!(
                "format {} (this build reads format {MANIFEST_FORMAT})",
                manifest.format
            ),
        });
    }
    Ok(Some(manifest))
}

/// Splits a member path into (key, lower-case extension).
fn split_key(name: &str) -> (&str, String) {
    let base_start = name.rfind('/').map_or(0, |i| i + 1);
    match name[base_start..].find('.') {
        Some(dot) => (&name[..base_start + dot], name[base_start + dot + 1..].to_ascii_lowercase()),
        None => (name, String::new()),
    }
}

/// Members of a folder's shards that are not read (not an image or a label).
#[derive(Debug, Default)]
struct IgnoredMembers {
    count: usize,
    first: Option<String>,
}

impl IgnoredMembers {
    /// Logs the count, if any, naming the first.
    fn warn(&self, folder: &Path) {
        if let Some(first) = &self.first {
            tracing::warn!(
                folder = %folder.display(),
                %first,
                "{} shard member(s) ignored: only KEY.jpg, KEY.jpeg, KEY.png and KEY.cls are \
                 read (KEY: the path up to the first dot of the file name)",
                self.count
            );
        }
    }
}

/// Indexes one shard: its samples in member order, adding the members it
/// does not read to `ignored_so_far` (the folder's, logged once).
fn index_shard(path: &Path, ignored_so_far: &mut IgnoredMembers) -> Result<Vec<Sample>, DataError> {
    let bad = |problem: String| DataError::Format { path: path.to_path_buf(), problem };
    let file = rsb_files::open_regular_file(path).map_err(|e| DataError::io(path, e))?;
    let file_len = file.metadata().map_err(|e| DataError::io(path, e))?.len();
    let mut archive = tar::Archive::new(file);
    let entries = archive.entries_with_seek().map_err(|e| bad(format!("not a tar file: {e}")))?;
    // key -> (image member, label)
    let mut order: Vec<String> = Vec::new();
    let mut parts: HashMap<String, (Option<ShardMember>, Option<u32>)> = HashMap::new();
    // Where the data of the last member ends (block-aligned): tar's
    // end-of-archive block must follow it.
    let mut members_end = 0u64;
    let mut ignored: Vec<String> = Vec::new();
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(format!("corrupt tar: {e}")))?;
        // A GNU sparse member's size is the file's, not what the archive
        // stores of it, which its header's size field gives.
        let stored = if entry.header().entry_type().is_gnu_sparse() {
            entry.header().entry_size().map_err(|e| bad(format!("corrupt tar: {e}")))?
        } else {
            entry.size()
        };
        let data_end = entry.raw_file_position().saturating_add(stored);
        members_end = data_end.div_ceil(TAR_BLOCK).saturating_mul(TAR_BLOCK);
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let (key, ext) = split_key(&name);
        if !IMAGE_EXTS.contains(&ext.as_str()) && ext != "cls" {
            ignored.push(name);
            continue;
        }
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
            if entry.size() > 64 {
                return Err(bad(format!(
                    "member {name} is {} bytes: a class index is a few digits",
                    entry.size()
                )));
            }
            let mut text = String::new();
            entry
                .by_ref()
                .take(64)
                .read_to_string(&mut text)
                .map_err(|e| bad(format!("member {name}: {e}")))?;
            let label = text.trim().parse::<u32>().map_err(|_| {
                bad(format!("member {name}: expected a class index, got {:?}", text.trim()))
            })?;
            if slot.1.is_some() {
                return Err(bad(format!("sample `{key}` has two .cls labels")));
            }
            slot.1 = Some(label);
        }
    }
    if file_len == 0 {
        return Err(bad("empty file, not a tar".into()));
    }
    if !ends_with_end_of_archive(path, members_end, file_len)? {
        return Err(bad(format!(
            "ends after {file_len} bytes without tar's end-of-archive block after its last \
             member (at byte {members_end}): cut short, a partial copy?"
        )));
    }
    ignored_so_far.count += ignored.len();
    if ignored_so_far.first.is_none() {
        ignored_so_far.first = ignored.first().cloned();
    }
    let mut samples = Vec::with_capacity(order.len());
    for key in order {
        match parts.remove(&key) {
            Some((Some(member), Some(label))) => {
                samples.push(Sample { path: path.to_path_buf(), label, member: Some(member) })
            }
            Some((Some(_), None)) => return Err(bad(format!("sample `{key}` has no .cls label"))),
            Some((None, Some(_))) => return Err(bad(format!("sample `{key}` has no image"))),
            _ => {}
        }
    }
    if samples.is_empty() {
        let ignored = match ignored.first() {
            Some(first) => format!(
                " ({} member(s) ignored, the first `{first}`: only KEY.jpg, KEY.jpeg, KEY.png \
                 and KEY.cls are read, KEY the path up to the first dot of the file name)",
                ignored.len()
            ),
            None => String::new(),
        };
        return Err(bad(format!("holds no sample{ignored}")));
    }
    Ok(samples)
}

/// Whether a zero block (tar's end of archive) follows the members, which
/// end at byte `members_end` of the `file_len`-byte shard.
fn ends_with_end_of_archive(
    path: &Path,
    members_end: u64,
    file_len: u64,
) -> Result<bool, DataError> {
    use std::io::{Seek, SeekFrom};
    if members_end.saturating_add(TAR_BLOCK) > file_len {
        return Ok(false);
    }
    let mut file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut block = [0u8; TAR_BLOCK as usize];
    file.seek(SeekFrom::Start(members_end)).map_err(|e| DataError::io(path, e))?;
    file.read_exact(&mut block).map_err(|e| DataError::io(path, e))?;
    Ok(block.iter().all(|b| *b == 0))
}

/// Indexes every shard of `root`: class names (from `classes.txt`, else
/// none) and the samples, shard by shard.
pub fn index_folder(root: &Path) -> Result<(Vec<String>, Vec<Sample>), DataError> {
    index_listed_folder(root, list_folder(root)?)
}

/// [`index_folder`] of a folder already listed.
pub fn index_listed_folder(
    root: &Path,
    entries: FolderEntries,
) -> Result<(Vec<String>, Vec<Sample>), DataError> {
    let layout = |problem: String| DataError::Layout { path: root.to_path_buf(), problem };
    let FolderEntries { shards, unfinished } = entries;
    let manifest = read_manifest(root)?;
    if manifest.is_some() && unfinished == [WRITING_FILE] {
        // The writer wrote its list last and died before it removed its
        // mark (or a second writer, finding the shards, is about to remove
        // its own): the list says whether the set is complete, as below.
        tracing::warn!(
            folder = %root.display(),
            "{WRITING_FILE} beside {MANIFEST_FILE}: the writer stopped after it listed its \
             shards; the shards are checked against that list"
        );
    } else if let Some(first) = unfinished.first() {
        return Err(layout(format!(
            "{first}: `worker data shard` was interrupted while it wrote here, or still \
             runs, and the shards are incomplete (write them again into an empty folder)"
        )));
    }
    if shards.is_empty() {
        return Err(layout("no *.tar shards".into()));
    }
    let listed: Option<HashMap<&str, &ShardListing>> = manifest
        .as_ref()
        .map(|m| m.shards.iter().map(|listing| (listing.name.as_str(), listing)).collect());
    match &listed {
        Some(listed) => {
            let on_disk: BTreeSet<String> = shards.iter().map(|p| file_name(p)).collect();
            if let Some(stray) = on_disk.iter().find(|name| !listed.contains_key(name.as_str())) {
                return Err(layout(format!(
                    "{stray} is not in {MANIFEST_FILE}: a shard of another run? (the folder \
                     must hold only the shards one `worker data shard` wrote)"
                )));
            }
            // The first missing in the list's order.
            let mut in_order = manifest.iter().flat_map(|m| &m.shards);
            if let Some(missing) = in_order.find(|listing| !on_disk.contains(&listing.name)) {
                return Err(layout(format!(
                    "{} is listed in {MANIFEST_FILE} but missing (to read a subset of the \
                     shards on purpose, remove {MANIFEST_FILE})",
                    missing.name
                )));
            }
        }
        None => tracing::warn!(
            folder = %root.display(),
            "no {MANIFEST_FILE} beside the shards (not written by `worker data shard`): \
             a shard missing from the set cannot be noticed"
        ),
    }
    let mut samples = Vec::new();
    let mut ignored = IgnoredMembers::default();
    for shard in &shards {
        let in_shard = index_shard(shard, &mut ignored)?;
        if let Some(listing) = listed.as_ref().and_then(|l| l.get(file_name(shard).as_str())) {
            let bytes = std::fs::metadata(shard).map_err(|e| DataError::io(shard, e))?.len();
            if bytes != listing.bytes || in_shard.len() as u64 != listing.samples {
                return Err(DataError::Format {
                    path: shard.clone(),
                    problem: format!(
                        "{bytes} bytes and {} samples, where {MANIFEST_FILE} lists {} bytes \
                         and {} samples (changed or copied in part?)",
                        in_shard.len(),
                        listing.bytes,
                        listing.samples
                    ),
                });
            }
        }
        samples.extend(in_shard);
    }
    ignored.warn(root);
    let classes_path = root.join(CLASSES_FILE);
    let classes = if classes_path.is_file() {
        let text = rsb_files::read_regular_file(&classes_path)
            .map_err(|e| DataError::io(&classes_path, e))?;
        // A byte-order mark is no part of the first class's name.
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect()
    } else {
        Vec::new()
    };
    Ok((classes, samples))
}

/// The file name of `path`, as text.
fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Writes samples into numbered WebDataset shards of at most `shard_size`
/// samples each: `shard-000000.tar`, ... Each shard is written under a
/// temporary name and renamed when complete.
pub struct ShardWriter {
    out: PathBuf,
    shard_size: usize,
    current: Option<(tar::Builder<BufWriter<File>>, PathBuf)>,
    in_shard: usize,
    written: Vec<ShardListing>,
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
    /// Starts writing into the folder `out` (created if missing), which
    /// must not hold shards, their list or `classes.txt` already: the new
    /// shards would be mixed with them.
    pub fn create(out: &Path, shard_size: usize) -> Result<ShardWriter, DataError> {
        if shard_size == 0 {
            return Err(DataError::Config("--shard-size must be at least 1".into()));
        }
        std::fs::create_dir_all(out).map_err(|e| DataError::io(out, e))?;
        // The mark is made first, and only if there is none (O_EXCL): of two
        // writers started into one folder at once, one gets it.
        let writing = out.join(WRITING_FILE);
        match std::fs::OpenOptions::new().write(true).create_new(true).open(&writing) {
            Ok(mut file) => {
                let pid = format!("{}\n", std::process::id());
                file.write_all(pid.as_bytes()).map_err(|e| DataError::io(&writing, e))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(DataError::Layout {
                    path: out.to_path_buf(),
                    problem: format!(
                        "holds {WRITING_FILE}: another `worker data shard` writes here, or \
                         one was interrupted (remove what it wrote, or choose another --out)"
                    ),
                })
            }
            Err(e) => return Err(DataError::io(&writing, e)),
        }
        let mut earlier: Vec<String> = Vec::new();
        for entry in std::fs::read_dir(out).map_err(|e| DataError::io(out, e))? {
            let name = entry.map_err(|e| DataError::io(out, e))?.file_name();
            let name = name.to_string_lossy().into_owned();
            let lower = name.to_ascii_lowercase();
            if lower.ends_with(".tar")
                || lower.ends_with(TEMPORARY_SUFFIX)
                || name == MANIFEST_FILE
                || name == CLASSES_FILE
            {
                earlier.push(name);
            }
        }
        if !earlier.is_empty() {
            // Ours: nothing was written.
            let _ = std::fs::remove_file(&writing);
            // Shards named first.
            let not_a_shard = |name: &str| !name.to_ascii_lowercase().ends_with(".tar");
            earlier.sort_by(|a, b| {
                not_a_shard(a).cmp(&not_a_shard(b)).then_with(|| natural_cmp(a, b))
            });
            return Err(DataError::Layout {
                path: out.to_path_buf(),
                problem: format!(
                    "already holds shards ({}{}): the new ones would be mixed with them; \
                     remove them or choose another --out",
                    earlier[0],
                    if earlier.len() > 1 {
                        format!(" and {} more", earlier.len() - 1)
                    } else {
                        String::new()
                    }
                ),
            });
        }
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
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .map_err(|e| DataError::io(&tmp, e))?;
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
            let bytes = file.metadata().map_err(|e| DataError::io(&tmp, e))?.len();
            let done = tmp.with_extension("");
            std::fs::rename(&tmp, &done).map_err(|e| DataError::io(&done, e))?;
            self.written.push(ShardListing {
                name: file_name(&done),
                bytes,
                samples: self.in_shard as u64,
            });
        }
        Ok(())
    }

    /// Closes the last shard, writes `classes.txt` and, last, the list of
    /// shards (`shards.json`); returns the shards.
    pub fn finish(mut self, classes: &[String]) -> Result<Vec<PathBuf>, DataError> {
        self.close_shard()?;
        if !classes.is_empty() {
            let path = self.out.join(CLASSES_FILE);
            let text: String = classes.iter().map(|c| format!("{c}\n")).collect();
            write_atomically(&path, text.as_bytes(), Readers::Everyone)
                .map_err(|e| DataError::io(&path, e))?;
        }
        let manifest =
            ShardManifest { format: MANIFEST_FORMAT, shards: std::mem::take(&mut self.written) };
        let path = self.out.join(MANIFEST_FILE);
        let text = serde_json::to_string_pretty(&manifest).expect("a shard list serialises");
        write_atomically(&path, text.as_bytes(), Readers::Everyone)
            .map_err(|e| DataError::io(&path, e))?;
        let writing = self.out.join(WRITING_FILE);
        std::fs::remove_file(&writing).map_err(|e| DataError::io(&writing, e))?;
        Ok(manifest.shards.iter().map(|listing| self.out.join(&listing.name)).collect())
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
        // Edited with a byte-order mark (Notepad): the same classes.
        std::fs::write(dir.path().join(CLASSES_FILE), "\u{feff}x\ny\nz\n").unwrap();
        assert_eq!(index_folder(dir.path()).unwrap().0, vec!["x", "y", "z"]);
    }

    /// A tar of `members` (name, data), with tar's end-of-archive blocks.
    fn tar_of(members: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in members {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn error_of(dir: &Path) -> String {
        index_folder(dir).unwrap_err().to_string()
    }

    #[test]
    fn a_shard_folder_that_is_not_what_its_writer_finished_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let write = |dir: &Path| {
            let mut w = ShardWriter::create(dir, 2).unwrap();
            for i in 0..5u32 {
                let key = w.key_for(&format!("img{i}"));
                w.add(&key, "jpg", format!("image {i}").as_bytes(), i % 2).unwrap();
            }
            w.finish(&["a".into(), "b".into()]).unwrap()
        };
        let shards = write(dir.path());
        assert!(!dir.path().join(WRITING_FILE).exists());
        assert_eq!(index_folder(dir.path()).unwrap().1.len(), 5);
        let other_dir = tempfile::tempdir().unwrap();
        let manifest = read_manifest(dir.path()).unwrap().unwrap();
        let counts: Vec<u64> = manifest.shards.iter().map(|l| l.samples).collect();
        assert_eq!(counts, vec![2, 2, 1]);

        // Written again into the same folder: refused before it writes.
        let err = ShardWriter::create(dir.path(), 2).unwrap_err().to_string();
        assert!(err.contains("already holds shards") && err.contains("shard-000000.tar"), "{err}");
        assert_eq!(index_folder(dir.path()).unwrap().1.len(), 5, "the refusal changed the set");

        // What an interrupted writer leaves: a shard under its temporary
        // name (refused even beside a list), or (stopped between two
        // shards, before its list) its mark.
        let partial = dir.path().join("shard-000003.tar.tmp");
        std::fs::write(&partial, b"partial").unwrap();
        let err = error_of(dir.path());
        assert!(err.contains("shard-000003.tar.tmp") && err.contains("interrupted"), "{err}");
        std::fs::remove_file(&partial).unwrap();
        let mut stopped = ShardWriter::create(other_dir.path(), 1).unwrap();
        stopped.add("k", "jpg", b"image", 0).unwrap();
        let err = error_of(other_dir.path());
        assert!(err.contains(WRITING_FILE) && err.contains("interrupted"), "{err}");
        // Its mark beside its list (it died between writing the one and
        // removing the other): the list decides, and here it holds.
        let mark = dir.path().join(WRITING_FILE);
        std::fs::write(&mark, b"1\n").unwrap();
        assert_eq!(index_folder(dir.path()).unwrap().1.len(), 5);
        // With a shard of the list missing, still refused, naming it.
        let moved = dir.path().join("moved");
        std::fs::rename(&shards[2], &moved).unwrap();
        let err = error_of(dir.path());
        assert!(err.contains("shard-000002.tar") && err.contains("missing"), "{err}");
        std::fs::rename(&moved, &shards[2]).unwrap();
        std::fs::remove_file(&mark).unwrap();
        // A second writer started while the first writes gets no share of
        // the folder (before the first shard, and after it).
        let live = tempfile::tempdir().unwrap();
        let _first = ShardWriter::create(live.path(), 1).unwrap();
        let err = ShardWriter::create(live.path(), 1).unwrap_err().to_string();
        assert!(err.contains(WRITING_FILE) && err.contains("another"), "{err}");
        let err = ShardWriter::create(other_dir.path(), 1).unwrap_err().to_string();
        assert!(err.contains(WRITING_FILE), "{err}");

        // A shard of another run beside them.
        let stray = dir.path().join("shard-000009.tar");
        std::fs::copy(&shards[0], &stray).unwrap();
        let err = error_of(dir.path());
        assert!(err.contains("shard-000009.tar") && err.contains(MANIFEST_FILE), "{err}");
        std::fs::remove_file(&stray).unwrap();

        // One shard copied in part (cut at a block boundary, so tar reads
        // it as a shorter archive), then one lost.
        let whole = std::fs::read(&shards[1]).unwrap();
        std::fs::write(&shards[1], &whole[..2048]).unwrap();
        let err = error_of(dir.path());
        assert!(err.contains("shard-000001.tar") && err.contains("end-of-archive"), "{err}");
        std::fs::remove_file(&shards[1]).unwrap();
        let err = error_of(dir.path());
        assert!(err.contains("shard-000001.tar") && err.contains("missing"), "{err}");

        // The same shard with another sample count than its listing.
        let other = tempfile::tempdir().unwrap();
        write(other.path());
        let mut manifest = read_manifest(other.path()).unwrap().unwrap();
        manifest.shards[2].samples = 2;
        std::fs::write(other.path().join(MANIFEST_FILE), serde_json::to_string(&manifest).unwrap())
            .unwrap();
        let err = error_of(other.path());
        assert!(err.contains("shard-000002.tar") && err.contains("1 samples"), "{err}");

        // A folder an interrupted writer left before its first shard was done.
        let early = tempfile::tempdir().unwrap();
        std::fs::write(early.path().join("shard-000000.tar.tmp"), b"partial").unwrap();
        let err = crate::dataset::ImageFolder::open_any(early.path()).unwrap_err().to_string();
        assert!(err.contains("shard-000000.tar.tmp"), "{err}");
    }

    #[test]
    fn a_shard_or_shard_list_that_is_a_fifo_is_named_not_waited_on() {
        for fifo in ["shard-000000.tar", MANIFEST_FILE] {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("shard-000001.tar"), tar_of(&[])).unwrap();
            let made =
                std::process::Command::new("mkfifo").arg(dir.path().join(fifo)).status().unwrap();
            assert!(made.success());
            let (sender, receiver) = std::sync::mpsc::channel();
            let root = dir.path().to_path_buf();
            std::thread::spawn(move || sender.send(index_folder(&root).map_err(|e| e.to_string())));
            let result = receiver
                .recv_timeout(std::time::Duration::from_secs(10))
                .expect("reading a FIFO waited for a writer");
            let e = result.unwrap_err();
            assert!(e.contains(fifo) && e.contains("not a regular file"), "{e}");
        }
    }

    #[test]
    fn shards_that_lost_their_samples_are_errors_not_fewer_samples() {
        let dir = tempfile::tempdir().unwrap();
        let shard = dir.path().join("s.tar");
        let one = [("k0.jpg", &b"x"[..]), ("k0.cls", &b"1"[..])];
        let two = [one[0], one[1], ("k1.jpg", &b"y"[..]), ("k1.cls", &b"0"[..])];
        std::fs::write(&shard, tar_of(&two)).unwrap();
        assert_eq!(index_folder(dir.path()).unwrap().1.len(), 2);

        std::fs::write(&shard, b"").unwrap();
        assert!(error_of(dir.path()).contains("empty file"), "{}", error_of(dir.path()));
        std::fs::write(&shard, vec![0u8; 10240]).unwrap();
        assert!(error_of(dir.path()).contains("holds no sample"), "{}", error_of(dir.path()));
        // Cut after the first sample, at a block boundary: each member
        // takes a header block and a data block.
        std::fs::write(&shard, &tar_of(&two)[..2048]).unwrap();
        let err = error_of(dir.path());
        assert!(err.contains("s.tar") && err.contains("end-of-archive"), "{err}");
        // Keys with a dot: WebDataset's rule makes `x.cls` their extension.
        std::fs::write(&shard, tar_of(&[("k0.a.jpg", b"x"), ("k0.a.cls", b"1")])).unwrap();
        let err = error_of(dir.path());
        assert!(err.contains("holds no sample") && err.contains("k0.a.jpg"), "{err}");
        std::fs::write(&shard, tar_of(&[one[0], ("k0.cls", &[b' '; 80][..])])).unwrap();
        let err = error_of(dir.path());
        assert!(err.contains("k0.cls is 80 bytes"), "{err}");
        std::fs::write(&shard, tar_of(&[one[0], one[1], ("k0.cls", b"7")])).unwrap();
        let err = error_of(dir.path());
        assert!(err.contains("`k0` has two .cls"), "{err}");
    }

    #[test]
    fn gnu_tar_shards_read_whatever_their_last_member() {
        // GNU tar's own archives: a sparse member (stored in less than its
        // size) last, and record padding after the end-of-archive blocks.
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("k0.jpg"), b"image").unwrap();
        std::fs::write(src.path().join("k0.cls"), b"3\n").unwrap();
        let sparse = std::fs::File::create(src.path().join("zz.bin")).unwrap();
        sparse.set_len(1 << 20).unwrap();
        let dir = tempfile::tempdir().unwrap();
        for (flags, name) in [(&["-S"][..], "sparse.tar"), (&["--format=posix"][..], "pax.tar")] {
            let status = std::process::Command::new("tar")
                .args(flags)
                .arg("-cf")
                .arg(dir.path().join(name))
                .args(["-C", src.path().to_str().unwrap(), "k0.jpg", "k0.cls", "zz.bin"])
                .status()
                .unwrap();
            assert!(status.success());
        }
        let (_, samples) = index_folder(dir.path()).unwrap();
        let got: Vec<(String, u32)> = samples.iter().map(|s| (s.display(), s.label)).collect();
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got.iter().all(|(name, label)| name.contains("k0.jpg") && *label == 3), "{got:?}");
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
