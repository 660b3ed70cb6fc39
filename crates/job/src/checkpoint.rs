//! What makes a checkpoint folder count, without libtorch: its manifest.
//!
//! A checkpoint is the folder `checkpoints/epoch-NNNN/` of a run folder with
//! fixed parts (`model.safetensors`, `optimizer.safetensors`, `state.json`)
//! and `manifest.json`, which lists the size and SHA-256 of every part. The
//! trainer writes the manifest last, atomically, after every part is fsynced,
//! so a folder counts as a checkpoint only when [`verify`] accepts it: the
//! manifest is there, lists every part, and every part has its size and
//! checksum. Anything else (no manifest, a missing or truncated part, a
//! flipped byte) is torn or corrupt.
//!
//! [`resolve`] is the one rule for `--resume PATH`: a checkpoint folder named
//! explicitly must be intact (else a [`CheckpointError`] naming the file); a
//! run folder resumes from its newest intact checkpoint, and every newer torn
//! or corrupt one is logged with its reason and skipped. The coordinator
//! uses it too, so both binaries pick the same checkpoint.
//!
//! [`resolve_weights`] is the rule for `--weights PATH` of `worker eval` and
//! `worker infer`: a checkpoint's `model.safetensors` is checked against its
//! manifest before it is read (as a resume checks it), and a checkpoint or run
//! folder stands for its weights file.

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Checkpoint sub-folder of a run folder.
pub const CHECKPOINTS: &str = "checkpoints";

/// Prefix of a checkpoint folder's name (`epoch-0001`).
pub const FOLDER_PREFIX: &str = "epoch-";

/// The manifest file of a checkpoint folder.
pub const MANIFEST: &str = "manifest.json";

/// The training state part (JSON) of a checkpoint.
pub const STATE: &str = "state.json";

/// The model weights part (timm keys) of a checkpoint.
pub const MODEL: &str = "model.safetensors";

/// The parts every checkpoint has.
pub const PARTS: [&str; 3] = [MODEL, "optimizer.safetensors", STATE];

/// Version of the manifest format.
pub const MANIFEST_FORMAT: u32 = 1;

/// Why a checkpoint folder does not count.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The manifest is missing: the checkpoint was never committed.
    #[error("{path}: no manifest, so the checkpoint was never committed (torn write, or written before manifests)")]
    MissingManifest {
        /// The manifest file that should be there.
        path: PathBuf,
    },
    /// The manifest cannot be read as a manifest.
    #[error("{path}: not a checkpoint manifest: {reason}")]
    BadManifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A part every checkpoint has is not listed in the manifest.
    #[error("{path}: the manifest does not list the part `{part}`")]
    UnlistedPart {
        /// The manifest file.
        path: PathBuf,
        /// The part.
        part: String,
    },
    /// The manifest is of a format this build does not read (written by
    /// another version).
    #[error("{path}: manifest format {format}, this build reads format {MANIFEST_FORMAT}")]
    ManifestFormat {
        /// The manifest file.
        path: PathBuf,
        /// The format it names.
        format: u32,
    },
    /// A listed part is missing.
    #[error("{path}: listed in the manifest but missing")]
    MissingPart {
        /// The part's file.
        path: PathBuf,
    },
    /// A part has another size than the manifest says (truncated, torn).
    #[error("{path}: {actual} bytes, the manifest says {expected} (truncated or torn)")]
    Size {
        /// The part's file.
        path: PathBuf,
        /// Size in the manifest.
        expected: u64,
        /// Size on disk.
        actual: u64,
    },
    /// A part's content does not match its checksum (corrupt).
    #[error("{path}: SHA-256 {actual} does not match the manifest's {expected} (corrupt)")]
    Checksum {
        /// The part's file.
        path: PathBuf,
        /// Checksum in the manifest.
        expected: String,
        /// Checksum of the file.
        actual: String,
    },
    /// A file could not be read.
    // `error` is shown in the message, not chained as a source, so `{:#}`
    // does not print it twice.
    #[error("{path}: {error}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The cause.
        error: std::io::Error,
    },
    /// `state.json` is not JSON.
    #[error("{path}: not JSON: {reason}")]
    BadState {
        /// The state file.
        path: PathBuf,
        /// The parser's message.
        reason: String,
    },
    /// The path is neither a checkpoint nor a run folder with checkpoints.
    #[error(
        "{path}: neither a checkpoint folder nor a run folder with {CHECKPOINTS}/{FOLDER_PREFIX}*"
    )]
    NotFound {
        /// The path given.
        path: PathBuf,
    },
    /// A run folder whose every checkpoint is torn or corrupt.
    #[error("{path}: no intact checkpoint ({})", .rejected.join("; "))]
    NoIntactCheckpoint {
        /// The run folder.
        path: PathBuf,
        /// Why each checkpoint was rejected, newest first.
        rejected: Vec<String>,
    },
}

impl CheckpointError {
    /// Whether this error, from checking a folder, shows the folder torn or
    /// corrupt: its manifest or a part missing, short, or not what the
    /// manifest says. Not so for a folder that could not be read (an I/O
    /// error: a failing disk, a network file system that lost its server, no
    /// permission) or whose manifest is of another format: it may hold a
    /// whole checkpoint, which nothing may delete as torn.
    pub fn shows_torn(&self) -> bool {
        match self {
            CheckpointError::MissingManifest { .. }
            | CheckpointError::BadManifest { .. }
            | CheckpointError::UnlistedPart { .. }
            | CheckpointError::MissingPart { .. }
            | CheckpointError::Size { .. }
            | CheckpointError::Checksum { .. }
            | CheckpointError::BadState { .. } => true,
            CheckpointError::ManifestFormat { .. }
            | CheckpointError::Io { .. }
            | CheckpointError::NotFound { .. }
            | CheckpointError::NoIntactCheckpoint { .. } => false,
        }
    }

    fn io(path: &Path, error: std::io::Error) -> CheckpointError {
        CheckpointError::Io { path: path.to_path_buf(), error }
    }
}

/// Size and checksum of one part.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartDigest {
    /// Size in bytes.
    pub bytes: u64,
    /// SHA-256 of the content, lower-case hex.
    pub sha256: String,
}

/// `manifest.json`: what a committed checkpoint holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`].
    pub format: u32,
    /// Every part by file name.
    pub parts: BTreeMap<String, PartDigest>,
}

/// Size and SHA-256 of a file, read in blocks.
pub fn digest_file(path: &Path) -> Result<PartDigest, CheckpointError> {
    let mut file = rsb_files::open_regular_file(path).map_err(|e| CheckpointError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = match file.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CheckpointError::io(path, e)),
        };
        hasher.update(&buffer[..n]);
        bytes += n as u64;
    }
    let mut sha256 = String::with_capacity(64);
    for byte in hasher.finalize() {
        // Writing into a String cannot fail.
        let _ = write!(sha256, "{byte:02x}");
    }
    Ok(PartDigest { bytes, sha256 })
}

impl Manifest {
    /// The manifest of the parts `names` of the folder `dir`, as they are on disk.
    pub fn of_parts(dir: &Path, names: &[&str]) -> Result<Manifest, CheckpointError> {
        let mut parts = BTreeMap::new();
        for name in names {
            parts.insert((*name).to_string(), digest_file(&dir.join(name))?);
        }
        Ok(Manifest { format: MANIFEST_FORMAT, parts })
    }

    /// The manifest as the JSON text of `manifest.json`.
    pub fn to_json(&self) -> String {
        // A struct of strings and integers always serializes.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Reads `dir/manifest.json`. Its format is read first, leniently: a
    /// manifest another version wrote (other fields, too) is
    /// [`CheckpointError::ManifestFormat`], not a bad one; bytes read that
    /// are not a manifest (not UTF-8, not JSON) are
    /// [`CheckpointError::BadManifest`], and only a failed read is
    /// [`CheckpointError::Io`].
    pub fn read(dir: &Path) -> Result<Manifest, CheckpointError> {
        /// The one field every format has.
        #[derive(serde::Deserialize)]
        struct Format {
            format: u32,
        }
        let path = dir.join(MANIFEST);
        let mut bytes = Vec::new();
        let read = rsb_files::open_regular_file(&path).and_then(|mut f| f.read_to_end(&mut bytes));
        match read {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CheckpointError::MissingManifest { path });
            }
            Err(e) => return Err(CheckpointError::io(&path, e)),
        }
        let bad = |reason: String| CheckpointError::BadManifest { path: path.clone(), reason };
        let text = std::str::from_utf8(&bytes).map_err(|e| bad(format!("not UTF-8: {e}")))?;
        let format = serde_json::from_str::<Format>(text).map_err(|e| bad(e.to_string()))?.format;
        if format != MANIFEST_FORMAT {
            return Err(CheckpointError::ManifestFormat { path, format });
        }
        serde_json::from_str(text).map_err(|e| bad(e.to_string()))
    }
}

/// Checks the checkpoint folder `dir`: its manifest lists every part of
/// [`PARTS`], and every listed part has the size and SHA-256 it lists.
pub fn verify(dir: &Path) -> Result<Manifest, CheckpointError> {
    let manifest = Manifest::read(dir)?;
    for part in PARTS {
        manifest.listed(dir, part)?;
    }
    for (name, expected) in &manifest.parts {
        check_part(dir, name, expected)?;
    }
    Ok(manifest)
}

/// Checks the one part `name` of the checkpoint folder `dir` against its
/// manifest (listed, size, SHA-256), without reading the other parts: what
/// a reader of the weights alone needs.
pub fn verify_part(dir: &Path, name: &str) -> Result<(), CheckpointError> {
    let manifest = Manifest::read(dir)?;
    check_part(dir, name, manifest.listed(dir, name)?)
}

impl Manifest {
    /// What the manifest of the checkpoint folder `dir` lists for `part`;
    /// an unlisted part is an error naming the manifest.
    fn listed(&self, dir: &Path, part: &str) -> Result<&PartDigest, CheckpointError> {
        self.parts.get(part).ok_or_else(|| CheckpointError::UnlistedPart {
            path: dir.join(MANIFEST),
            part: part.to_string(),
        })
    }
}

/// Checks that the part `name` of `dir` has the size and SHA-256 `expected`.
fn check_part(dir: &Path, name: &str, expected: &PartDigest) -> Result<(), CheckpointError> {
    let path = check_part_size(dir, name, expected)?;
    let digest = digest_file(&path)?;
    if digest.sha256 != expected.sha256 {
        return Err(CheckpointError::Checksum {
            path,
            expected: expected.sha256.clone(),
            actual: digest.sha256,
        });
    }
    Ok(())
}

/// The part `name` of `dir`, when it is a regular file of the size listed.
fn check_part_size(
    dir: &Path,
    name: &str,
    expected: &PartDigest,
) -> Result<PathBuf, CheckpointError> {
    if name.contains(['/', '\\']) || name.starts_with('.') {
        return Err(CheckpointError::BadManifest {
            path: dir.join(MANIFEST),
            reason: format!("part name `{name}` is not a file of the folder"),
        });
    }
    let path = dir.join(name);
    let actual = match std::fs::metadata(&path) {
        // A FIFO or a device has no size to compare: named as what it is.
        Ok(meta) if !meta.is_file() => {
            return Err(CheckpointError::io(&path, rsb_files::not_a_regular_file()))
        }
        Ok(meta) => meta.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CheckpointError::MissingPart { path });
        }
        Err(e) => return Err(CheckpointError::io(&path, e)),
    };
    if actual != expected.bytes {
        return Err(CheckpointError::Size { path, expected: expected.bytes, actual });
    }
    Ok(path)
}

/// A cheaper [`verify`] for a decision that reads only the state: the
/// manifest lists every part, every part has the size it lists, and
/// `state.json` its checksum. The weights are not hashed (they are, by
/// whoever reads them).
pub fn verify_committed(dir: &Path) -> Result<(), CheckpointError> {
    let manifest = Manifest::read(dir)?;
    for part in PARTS {
        let expected = manifest.listed(dir, part)?;
        if part == STATE {
            check_part(dir, part, expected)?;
        } else {
            check_part_size(dir, part, expected)?;
        }
    }
    Ok(())
}

/// Prefix of the folders that hold what a run set aside instead of
/// deleting it: the checkpoints of an abandoned run order (under
/// `checkpoints/`), or the records of a run started again (in the run folder).
pub const SET_ASIDE_PREFIX: &str = "abandoned-";

/// A new `abandoned-<unix seconds>[-n]` folder under `root` (a folder of
/// its own, also when an earlier set-aside had the same second), and
/// whether it could be made.
pub fn new_set_aside_folder(root: &Path) -> (PathBuf, std::io::Result<()>) {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut made = Err(std::io::Error::other("no name left"));
    let mut aside = root.join(format!("{SET_ASIDE_PREFIX}{seconds}"));
    for n in 0..100 {
        if n > 0 {
            aside = root.join(format!("{SET_ASIDE_PREFIX}{seconds}-{n}"));
        }
        made = std::fs::create_dir(&aside);
        if !matches!(&made, Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists) {
            break;
        }
    }
    (aside, made)
}

/// Where a checkpoint folder stands in its run, read from its name: after
/// `epochs_done` epochs (`epoch-NNNN`, the end of epoch NNNN), or
/// `updates` updates into the epoch after them
/// (`epoch-NNNN-update-UUUUUUUUU`). Ordered as the run wrote them: an
/// epoch's end, then the mid-epoch checkpoints of the next epoch by
/// update, then that epoch's end. Compared as numbers, not as names, so
/// that a number with more digits than the names are padded to (an
/// `epoch-10000` after an `epoch-9999`) still sorts in run order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct RunOrder {
    /// Epochs finished before the checkpoint.
    pub epochs_done: u64,
    /// Updates over the run of a mid-epoch checkpoint; `None` (sorting
    /// first) for an epoch's end.
    pub updates: Option<u64>,
}

impl RunOrder {
    /// The position named by a checkpoint folder's name, `None` for a
    /// name the trainer does not write (`epoch-0003-copy`, `epoch-`).
    pub fn of_name(name: &str) -> Option<RunOrder> {
        let number = |digits: &str| {
            // `u64::from_str` also takes a leading `+`.
            (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
                .then(|| digits.parse::<u64>().ok())
                .flatten()
        };
        let rest = name.strip_prefix(FOLDER_PREFIX)?;
        let (epochs, updates) = match rest.split_once(MID_EPOCH_INFIX) {
            Some((epochs, updates)) => (epochs, Some(number(updates)?)),
            None => (rest, None),
        };
        Some(RunOrder { epochs_done: number(epochs)?, updates })
    }

    /// [`RunOrder::of_name`] of the last component of `path`.
    pub fn of_path(path: &Path) -> Option<RunOrder> {
        RunOrder::of_name(path.file_name()?.to_str()?)
    }
}

/// What separates a mid-epoch checkpoint's epochs from its updates
/// (`epoch-0001-update-000000013`).
pub const MID_EPOCH_INFIX: &str = "-update-";

/// Checkpoint folders of a run folder (`checkpoints/epoch-NNNN` and
/// `checkpoints/epoch-NNNN-update-UUUUUUUUU`), intact or not, oldest first
/// in run order ([`RunOrder`]). A folder of another name is no checkpoint
/// of the run (a copy someone made): not listed, so never resumed from,
/// pruned nor set aside.
pub fn list(run_dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<(RunOrder, PathBuf)> = std::fs::read_dir(run_dir.join(CHECKPOINTS))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .filter_map(|p| Some((RunOrder::of_path(&p)?, p)))
        .collect();
    // Two names of one position (`epoch-1`, `epoch-0001`) in name order.
    found.sort();
    found.into_iter().map(|(_, path)| path).collect()
}

/// Whether `path` looks like a checkpoint folder (it holds a manifest or a part).
pub fn is_checkpoint_folder(path: &Path) -> bool {
    std::iter::once(MANIFEST).chain(PARTS).any(|name| path.join(name).is_file())
}

/// A checkpoint folder whose manifest, sizes and checksums [`resolve`] has
/// verified in this process: what a loader may read without hashing every
/// part a second time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedCheckpoint(pub(crate) PathBuf);

impl VerifiedCheckpoint {
    /// The checkpoint folder.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

/// Resolves `--resume PATH` to an intact checkpoint folder: `path` itself
/// when it is a checkpoint folder (an error naming the bad file when it is
/// torn or corrupt), else the newest intact checkpoint of the run folder
/// `path`, logging each newer one skipped and why.
pub fn resolve(path: &Path) -> Result<VerifiedCheckpoint, CheckpointError> {
    if is_checkpoint_folder(path) {
        verify(path)?;
        return Ok(VerifiedCheckpoint(path.to_path_buf()));
    }
    let mut rejected = Vec::new();
    for candidate in list(path).into_iter().rev() {
        match verify(&candidate) {
            Ok(_) => return Ok(VerifiedCheckpoint(candidate)),
            Err(reason) => {
                tracing::warn!(
                    checkpoint = %candidate.display(),
                    %reason,
                    "skipping a torn or corrupt checkpoint for the one before"
                );
                rejected.push(reason.to_string());
            }
        }
    }
    if rejected.is_empty() {
        Err(CheckpointError::NotFound { path: path.to_path_buf() })
    } else {
        Err(CheckpointError::NoIntactCheckpoint { path: path.to_path_buf(), rejected })
    }
}

/// The checkpoint a job's next generation resumes from when the one it was
/// given (`wanted`, a committed checkpoint folder of a run) is gone: the
/// old generation trained on until its ranks were stopped, wrote newer
/// checkpoints, and its retention deleted `wanted`. The newest intact one
/// after it in the run's order (those are the same run's: checkpoints of
/// an abandoned order are set aside at the first save after a resume).
/// `None` when `wanted` exists, is not in a run's `checkpoints/`, or no
/// intact checkpoint follows it.
pub fn successor_of_deleted(wanted: &Path) -> Option<VerifiedCheckpoint> {
    if std::fs::symlink_metadata(wanted).is_ok() {
        return None;
    }
    let position = RunOrder::of_path(wanted)?;
    let folder = wanted.parent()?;
    if folder.file_name()? != CHECKPOINTS {
        return None;
    }
    let run = folder.parent()?;
    list(run)
        .into_iter()
        .rev()
        .take_while(|candidate| RunOrder::of_path(candidate).is_some_and(|p| p > position))
        .find(|candidate| verify(candidate).is_ok())
        .map(VerifiedCheckpoint)
}

/// Resolves `--weights PATH` of `worker eval` and `worker infer` to the
/// weights file to read:
///
/// * a checkpoint's `model.safetensors` (a file of that name beside a
///   manifest or another part) is checked against the manifest first, so a
///   corrupt or torn one is refused, naming the file, as a resume refuses it;
/// * a checkpoint folder stands for its `model.safetensors`, checked the same way;
/// * a folder holding a `model.safetensors` and no other checkpoint part nor
///   manifest, not named as checkpoints or their staging folders are (a
///   Hugging Face snapshot of a timm model, with its `config.json`), stands
///   for that file, read as it is;
/// * a run folder stands for the weights of its newest intact checkpoint
///   (chosen as `--resume` chooses it, see [`resolve`]);
/// * any other path (a timm `.safetensors`, or a path that does not exist,
///   which the reader then names) is returned as it is.
pub fn resolve_weights(path: &Path) -> Result<PathBuf, CheckpointError> {
    let holds_checkpoint_files = |folder: &Path| {
        [MANIFEST, PARTS[1], STATE].iter().any(|other| folder.join(other).is_file())
    };
    if path.is_dir() {
        // `epoch-NNNN`, or a save's staging folder `.epoch-NNNN.tmp-<pid>-<random>`.
        let named_as_checkpoint = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.trim_start_matches('.').starts_with(FOLDER_PREFIX));
        if path.join(MODEL).is_file() && !holds_checkpoint_files(path) && !named_as_checkpoint {
            tracing::info!(weights = %path.join(MODEL).display(), "the weights of a folder that is no checkpoint");
            return Ok(path.join(MODEL));
        }
        let checkpoint = if is_checkpoint_folder(path) {
            verify_part(path, MODEL)?;
            path.to_path_buf()
        } else {
            resolve(path)?.path().to_path_buf()
        };
        tracing::info!(checkpoint = %checkpoint.display(), "weights of a verified checkpoint");
        return Ok(checkpoint.join(MODEL));
    }
    let folder = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    // The weights of a checkpoint, committed or not: a torn one (no
    // manifest) is refused as a resume refuses it.
    let is_checkpoint_part =
        path.file_name().is_some_and(|n| n == MODEL) && holds_checkpoint_files(folder);
    if is_checkpoint_part {
        verify_part(folder, MODEL)?;
        tracing::info!(weights = %path.display(), "weights verified against the checkpoint's manifest");
    }
    Ok(path.to_path_buf())
}

/// The JSON of a checkpoint's `state.json`.
pub fn read_state(checkpoint: &Path) -> Result<serde_json::Value, CheckpointError> {
    let path = checkpoint.join(STATE);
    let text = rsb_files::read_regular_file(&path).map_err(|e| CheckpointError::io(&path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| CheckpointError::BadState { path, reason: e.to_string() })
}

/// Where a checkpoint stands in its run, and the recipe of the run: the
/// fields of its `state.json` that say whether the run is over, read
/// without libtorch (the trainer writes the whole state).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct RunPosition {
    /// The epoch training continues with (0-based): the run's epochs, once
    /// its last one ended.
    pub next_epoch: u64,
    /// Optimizer updates made since the run began.
    pub updates: u64,
    /// The step of `next_epoch` training continues with: 0 at an epoch's end.
    #[serde(default)]
    pub next_step: u64,
    /// The epoch under way when the checkpoint was written.
    #[serde(default)]
    pub epoch_so_far: EpochUnderWay,
    /// The recipe the checkpoint was trained with, as the trainer stored it
    /// (`crate::run_folder::STATE_RECIPE_KEY`); absent in checkpoints from
    /// before it was stored.
    #[serde(default)]
    pub resolved_recipe: Option<serde_json::Value>,
}

/// The part of `state.json` about the epoch under way.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
pub struct EpochUnderWay {
    /// Updates of the epoch under way made before the checkpoint: 0 at an
    /// epoch's end.
    #[serde(default)]
    pub updates: u64,
}

impl RunPosition {
    /// Whether the checkpoint ends a run of `epochs` epochs: written at the
    /// end of its last one.
    pub fn ends_run_of(&self, epochs: u64) -> bool {
        epochs > 0
            && self.next_epoch >= epochs
            && self.next_step == 0
            && self.epoch_so_far.updates == 0
    }
}

/// The [`RunPosition`] of a checkpoint, from its `state.json`.
pub fn read_position(checkpoint: &Path) -> Result<RunPosition, CheckpointError> {
    let path = checkpoint.join(STATE);
    let text = rsb_files::read_regular_file(&path).map_err(|e| CheckpointError::io(&path, e))?;
    let mut json = serde_json::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(&mut json)
        .map_err(|e| CheckpointError::BadState { path, reason: e.to_string() })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A committed checkpoint `run/checkpoints/epoch-000N` with small parts.
    fn committed(run: &Path, epoch: u32) -> PathBuf {
        let dir = run.join(CHECKPOINTS).join(format!("{FOLDER_PREFIX}{epoch:04}"));
        std::fs::create_dir_all(&dir).unwrap();
        for (i, part) in PARTS.iter().enumerate() {
            std::fs::write(dir.join(part), format!("part {i} of epoch {epoch}").repeat(100))
                .unwrap();
        }
        let manifest = Manifest::of_parts(&dir, &PARTS).unwrap();
        std::fs::write(dir.join(MANIFEST), manifest.to_json()).unwrap();
        dir
    }

    #[test]
    fn a_deleted_checkpoint_is_followed_by_the_newest_intact_one_after_it() {
        let run = tempfile::tempdir().unwrap();
        let first = committed(run.path(), 1);
        // Present: no successor is looked for.
        assert_eq!(successor_of_deleted(&first), None);
        let second = committed(run.path(), 2);
        let third = committed(run.path(), 3);
        std::fs::remove_file(third.join(PARTS[1])).unwrap();
        std::fs::remove_dir_all(&first).unwrap();
        // The torn newest is passed over for the intact one before it.
        assert_eq!(successor_of_deleted(&first).map(|v| v.0), Some(second.clone()));
        // Nothing after the one wanted: none (the resume then names it).
        std::fs::remove_dir_all(&second).unwrap();
        std::fs::remove_dir_all(&third).unwrap();
        committed(run.path(), 0);
        assert_eq!(successor_of_deleted(&first), None);
        // Not a run's checkpoint folder.
        assert_eq!(successor_of_deleted(&run.path().join("elsewhere/epoch-0001")), None);
    }

    #[test]
    fn checkpoints_are_listed_in_run_order_by_their_numbers_not_their_names() {
        let run = tempfile::tempdir().unwrap();
        // Past four digits of epochs, name order is not run order.
        let names = [
            "epoch-0002",
            "epoch-9999",
            "epoch-9999-update-000000007",
            "epoch-9999-update-000000012",
            "epoch-10000",
            "epoch-10000-update-1000000000",
            "epoch-10001",
        ];
        for name in names.iter().rev() {
            std::fs::create_dir_all(run.path().join(CHECKPOINTS).join(name)).unwrap();
        }
        // Not a name the trainer writes: no checkpoint of the run.
        for other in ["epoch-0003-copy", "epoch-", "epoch-+4", "epoch-0004-update-", "epoch-x"] {
            std::fs::create_dir_all(run.path().join(CHECKPOINTS).join(other)).unwrap();
            assert_eq!(RunOrder::of_name(other), None, "{other}");
        }
        let listed: Vec<String> = list(run.path())
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(listed, names);
        assert_eq!(
            RunOrder::of_name("epoch-0001-update-000000013"),
            Some(RunOrder { epochs_done: 1, updates: Some(13) })
        );
        assert!(RunOrder::of_name("epoch-0001") < RunOrder::of_name("epoch-0001-update-000000013"));
        assert!(RunOrder::of_name("epoch-0001-update-000000013") < RunOrder::of_name("epoch-0002"));

        // A deleted checkpoint's successor is after it in run order.
        let successor = tempfile::tempdir().unwrap();
        let ninth = committed_with_state(successor.path(), "epoch-9999", "{}");
        let tenth = committed_with_state(successor.path(), "epoch-10000", "{}");
        std::fs::remove_dir_all(&ninth).unwrap();
        assert_eq!(successor_of_deleted(&ninth).map(|v| v.0), Some(tenth.clone()));
        std::fs::remove_dir_all(&tenth).unwrap();
        committed_with_state(successor.path(), "epoch-9999", "{}");
        assert_eq!(successor_of_deleted(&tenth), None, "epoch-9999 is before epoch-10000");
    }

    #[test]
    fn a_committed_checkpoint_verifies_and_lists_every_part() {
        let run = tempfile::tempdir().unwrap();
        let dir = committed(run.path(), 1);
        let manifest = verify(&dir).unwrap();
        assert_eq!(manifest.parts.len(), 3);
        let state = &manifest.parts[STATE];
        assert_eq!(state.bytes, std::fs::metadata(dir.join(STATE)).unwrap().len());
        assert_eq!(state.sha256.len(), 64);
        // SHA-256 of a known input.
        std::fs::write(run.path().join("abc"), b"abc").unwrap();
        assert_eq!(
            digest_file(&run.path().join("abc")).unwrap().sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn a_part_that_is_a_fifo_is_named_not_waited_on() {
        let run = tempfile::tempdir().unwrap();
        let fifo = run.path().join("model.safetensors");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let (sender, receiver) = std::sync::mpsc::channel();
        let path = fifo.clone();
        std::thread::spawn(move || sender.send(digest_file(&path).map_err(|e| e.to_string())));
        let result = receiver
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("digesting a FIFO waited for a writer");
        let e = result.unwrap_err();
        assert!(e.contains("model.safetensors") && e.contains("not a regular file"), "{e}");
        // A manifest that is a FIFO, when the checkpoint is verified.
        let dir = committed(run.path(), 2);
        std::fs::remove_file(dir.join(MANIFEST)).unwrap();
        nix::unistd::mkfifo(&dir.join(MANIFEST), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            sender.send(verify(&dir).map(|_| ()).map_err(|e| e.to_string()))
        });
        let result = receiver
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("reading a FIFO manifest waited for a writer");
        let e = result.unwrap_err();
        assert!(e.contains(MANIFEST) && e.contains("not a regular file"), "{e}");
        // A part that is a FIFO, when the checkpoint is verified: named as
        // such, not as a part of 0 bytes.
        let dir = committed(run.path(), 3);
        let part = dir.join(PARTS[0]);
        std::fs::remove_file(&part).unwrap();
        nix::unistd::mkfifo(&part, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = verify(&dir).unwrap_err().to_string();
        assert!(e.contains(PARTS[0]) && e.contains("not a regular file"), "{e}");
    }

    #[test]
    fn flipped_truncated_missing_and_unlisted_are_each_named() {
        let run = tempfile::tempdir().unwrap();
        let dir = committed(run.path(), 1);
        let model = dir.join("model.safetensors");
        let good = std::fs::read(&model).unwrap();

        let mut flipped = good.clone();
        flipped[10] ^= 0x01;
        std::fs::write(&model, &flipped).unwrap();
        let err = verify(&dir).unwrap_err();
        assert!(matches!(&err, CheckpointError::Checksum { path, .. } if path == &model), "{err}");
        assert!(err.to_string().contains("model.safetensors"), "{err}");

        std::fs::write(&model, &good[..good.len() / 2]).unwrap();
        let err = verify(&dir).unwrap_err();
        assert!(matches!(&err, CheckpointError::Size { path, .. } if path == &model), "{err}");

        std::fs::remove_file(&model).unwrap();
        let err = verify(&dir).unwrap_err();
        assert!(matches!(&err, CheckpointError::MissingPart { path } if path == &model), "{err}");
        std::fs::write(&model, &good).unwrap();
        verify(&dir).unwrap();

        let mut manifest = Manifest::read(&dir).unwrap();
        manifest.parts.remove("optimizer.safetensors");
        std::fs::write(dir.join(MANIFEST), manifest.to_json()).unwrap();
        let err = verify(&dir).unwrap_err();
        assert!(
            matches!(&err, CheckpointError::UnlistedPart { part, .. } if part == "optimizer.safetensors"),
            "{err}"
        );

        std::fs::write(dir.join(MANIFEST), "{\"format\": 1, \"parts\": ").unwrap();
        assert!(matches!(verify(&dir), Err(CheckpointError::BadManifest { .. })));

        std::fs::remove_file(dir.join(MANIFEST)).unwrap();
        let err = verify(&dir).unwrap_err();
        assert!(
            matches!(&err, CheckpointError::MissingManifest { path } if path == &dir.join(MANIFEST)),
            "{err}"
        );
    }

    /// What retention may delete as torn: a folder whose check found a part
    /// missing, short or wrong; not one it could not read, nor one whose
    /// manifest another version wrote.
    #[test]
    fn only_a_missing_short_or_wrong_part_shows_a_folder_torn() {
        let run = tempfile::tempdir().unwrap();
        let dir = committed(run.path(), 1);
        let model = dir.join("model.safetensors");
        let good = std::fs::read(&model).unwrap();
        // Whether `change` to the model's part shows the folder torn; the
        // part is put back after.
        let torn_by = |change: &dyn Fn()| {
            change();
            let err = verify(&dir).unwrap_err();
            if model.is_dir() {
                std::fs::remove_dir(&model).unwrap();
            }
            std::fs::write(&model, &good).unwrap();
            (err.shows_torn(), err.to_string())
        };
        let mut flipped = good.clone();
        flipped[10] ^= 0x01;
        assert!(torn_by(&|| std::fs::write(&model, &flipped).unwrap()).0);
        assert!(torn_by(&|| std::fs::write(&model, &good[..10]).unwrap()).0);
        assert!(torn_by(&|| std::fs::remove_file(&model).unwrap()).0);
        // A directory where the part should be: an I/O error, as a disk
        // that fails to read it gives.
        let (torn, message) = torn_by(&|| {
            std::fs::remove_file(&model).unwrap();
            std::fs::create_dir(&model).unwrap();
        });
        assert!(!torn, "{message}");
        verify(&dir).unwrap();

        let manifest = std::fs::read_to_string(dir.join(MANIFEST)).unwrap();
        let newer = manifest.replacen(
            &format!("\"format\": {MANIFEST_FORMAT}"),
            &format!("\"format\": {}", MANIFEST_FORMAT + 1),
            1,
        );
        assert_ne!(newer, manifest, "{manifest}");
        std::fs::write(dir.join(MANIFEST), &newer).unwrap();
        let err = verify(&dir).unwrap_err();
        assert!(matches!(err, CheckpointError::ManifestFormat { .. }), "{err}");
        assert!(!err.shows_torn(), "{err}");
        assert!(err.to_string().contains("manifest format 2, this build reads format 1"), "{err}");
        // A later format that also adds a field: still not torn.
        let with_field = newer.replacen('{', "{\n  \"signed_by\": \"a later version\",", 1);
        std::fs::write(dir.join(MANIFEST), &with_field).unwrap();
        let err = verify(&dir).unwrap_err();
        assert!(matches!(err, CheckpointError::ManifestFormat { format: 2, .. }), "{err}");
        // The same field in this format, and bytes that are not UTF-8: read,
        // and not a manifest, so torn.
        std::fs::write(
            dir.join(MANIFEST),
            with_field.replacen("\"format\": 2", "\"format\": 1", 1),
        )
        .unwrap();
        assert!(verify(&dir).unwrap_err().shows_torn());
        std::fs::write(dir.join(MANIFEST), b"{\"format\": 1, \xff\xfe").unwrap();
        let err = verify(&dir).unwrap_err();
        assert!(matches!(err, CheckpointError::BadManifest { .. }) && err.shows_torn(), "{err}");
        std::fs::write(dir.join(MANIFEST), &manifest[..manifest.len() / 2]).unwrap();
        assert!(verify(&dir).unwrap_err().shows_torn());
        std::fs::remove_file(dir.join(MANIFEST)).unwrap();
        assert!(verify(&dir).unwrap_err().shows_torn());
    }

    #[test]
    fn weights_are_verified_against_their_manifest_and_folders_stand_for_them() {
        let run = tempfile::tempdir().unwrap();
        let first = committed(run.path(), 1);
        let second = committed(run.path(), 2);
        let weights = second.join(MODEL);
        assert_eq!(resolve_weights(&weights).unwrap(), weights);
        assert_eq!(resolve_weights(&second).unwrap(), weights);
        assert_eq!(resolve_weights(run.path()).unwrap(), weights);
        // Only the weights are read: a corrupt optimizer part does not matter.
        let optimizer = second.join(PARTS[1]);
        let good_optimizer = std::fs::read(&optimizer).unwrap();
        std::fs::write(&optimizer, b"torn").unwrap();
        assert_eq!(resolve_weights(&weights).unwrap(), weights);
        std::fs::write(&optimizer, good_optimizer).unwrap();

        let mut bytes = std::fs::read(&weights).unwrap();
        bytes[5] ^= 0x01;
        std::fs::write(&weights, bytes).unwrap();
        for given in [&weights, &second] {
            let err = resolve_weights(given).unwrap_err();
            assert!(
                matches!(&err, CheckpointError::Checksum { path, .. } if path == &weights),
                "{}: {err}",
                given.display()
            );
        }
        // A run folder falls back to its newest intact checkpoint.
        assert_eq!(resolve_weights(run.path()).unwrap(), first.join(MODEL));
        // A checkpoint whose manifest is gone is not taken on trust.
        std::fs::remove_file(first.join(MANIFEST)).unwrap();
        for given in [first.clone(), first.join(MODEL)] {
            assert!(
                matches!(resolve_weights(&given), Err(CheckpointError::MissingManifest { .. })),
                "{}",
                given.display()
            );
        }

        // Weights outside a checkpoint (timm's, a missing path) are read as they are.
        let timm = run.path().join("resnet50_a1_in1k.safetensors");
        std::fs::write(&timm, b"weights").unwrap();
        assert_eq!(resolve_weights(&timm).unwrap(), timm);
        let missing = run.path().join("missing.safetensors");
        assert_eq!(resolve_weights(&missing).unwrap(), missing);
        // A Hugging Face snapshot (its weights and config.json) stands for
        // its weights, where it was refused as a torn checkpoint; a folder
        // named as checkpoints are, holding the weights alone, is still one.
        let snapshot = run.path().join("models--timm--resnet50.a1_in1k/snapshots/0123abcd");
        std::fs::create_dir_all(&snapshot).unwrap();
        std::fs::write(snapshot.join(MODEL), b"weights").unwrap();
        std::fs::write(snapshot.join("config.json"), b"{}").unwrap();
        assert_eq!(resolve_weights(&snapshot).unwrap(), snapshot.join(MODEL));
        for torn in [format!("{FOLDER_PREFIX}0009"), format!(".{FOLDER_PREFIX}0009.tmp-123")] {
            let torn = run.path().join(torn);
            std::fs::create_dir_all(&torn).unwrap();
            std::fs::write(torn.join(MODEL), b"weights").unwrap();
            let resolved = resolve_weights(&torn);
            assert!(matches!(resolved, Err(CheckpointError::MissingManifest { .. })), "{torn:?}");
        }
    }

    #[test]
    fn a_run_folder_resumes_from_its_newest_intact_checkpoint() {
        let run = tempfile::tempdir().unwrap();
        let first = committed(run.path(), 1);
        let second = committed(run.path(), 2);
        let third = committed(run.path(), 3);
        // Staging folders of an interrupted save are not checkpoints.
        std::fs::create_dir_all(run.path().join(CHECKPOINTS).join(".epoch-0004.tmp-1")).unwrap();
        assert_eq!(list(run.path()), [first.clone(), second.clone(), third.clone()]);
        assert_eq!(resolve(run.path()).unwrap().path(), third);

        std::fs::remove_file(third.join(MANIFEST)).unwrap();
        assert_eq!(resolve(run.path()).unwrap().path(), second);
        let state = second.join(STATE);
        let mut bytes = std::fs::read(&state).unwrap();
        bytes[0] ^= 0x20;
        std::fs::write(&state, bytes).unwrap();
        assert_eq!(resolve(run.path()).unwrap().path(), first);

        // Named explicitly, a corrupt checkpoint is an error naming the file.
        let err = resolve(&second).unwrap_err();
        assert!(matches!(&err, CheckpointError::Checksum { path, .. } if path == &state), "{err}");
        let err = resolve(&third).unwrap_err();
        assert!(err.to_string().contains("manifest.json"), "{err}");

        std::fs::remove_file(first.join("optimizer.safetensors")).unwrap();
        let err = resolve(run.path()).unwrap_err();
        assert!(
            matches!(&err, CheckpointError::NoIntactCheckpoint { rejected, .. } if rejected.len() == 3),
            "{err}"
        );
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(resolve(empty.path()), Err(CheckpointError::NotFound { .. })));
    }

    /// A committed checkpoint `run/checkpoints/NAME` whose `state.json` is
    /// `state`, its other parts `weights` and `moments`.
    pub(crate) fn committed_with_state(run: &Path, name: &str, state: &str) -> PathBuf {
        let dir = run.join(CHECKPOINTS).join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(PARTS[0]), b"weights").unwrap();
        std::fs::write(dir.join(PARTS[1]), b"moments").unwrap();
        std::fs::write(dir.join(STATE), state).unwrap();
        let manifest = Manifest::of_parts(&dir, &PARTS).unwrap();
        std::fs::write(dir.join(MANIFEST), manifest.to_json()).unwrap();
        dir
    }

    #[test]
    fn a_checkpoint_says_whether_it_ends_its_run_and_a_cheap_check_finds_it_committed() {
        let run = tempfile::tempdir().unwrap();
        let state = |next_epoch: u64, next_step: u64, so_far: u64| {
            format!(
                r#"{{"next_epoch":{next_epoch},"next_step":{next_step},"updates":{},
                   "epoch_so_far":{{"updates":{so_far},"loss_sum":1.5}},"model":"m"}}"#,
                next_epoch * 5 + so_far
            )
        };
        let two = committed_with_state(run.path(), "epoch-0002", &state(2, 0, 0));
        assert!(!read_position(&two).unwrap().ends_run_of(3), "two epochs of three");
        let mid = committed_with_state(run.path(), "epoch-0002-update-000000012", &state(2, 2, 2));
        assert!(!read_position(&mid).unwrap().ends_run_of(3), "mid-epoch in the last one");
        assert!(!read_position(&mid).unwrap().ends_run_of(2), "mid-epoch past the end");
        let end = committed_with_state(run.path(), "epoch-0003", &state(3, 0, 0));
        let position = read_position(&end).unwrap();
        assert!(position.ends_run_of(3) && position.updates == 15, "{position:?}");
        assert!(!position.ends_run_of(4), "its recipe has more epochs");
        assert!(!position.ends_run_of(0), "no epochs is no run");
        // The cheap check: sizes, and the state's checksum.
        verify_committed(&end).unwrap();
        std::fs::write(end.join(PARTS[0]), b"weights, cut").unwrap();
        assert!(matches!(verify_committed(&end), Err(CheckpointError::Size { .. })));
        std::fs::write(end.join(PARTS[0]), b"weightz").unwrap();
        verify_committed(&end).expect("weights of the listed size are not hashed");
        assert!(verify(&end).is_err(), "verify hashes them");
        std::fs::write(end.join(PARTS[0]), b"weights").unwrap();
        let other = state(3, 0, 0).replace("\"model\":\"m\"", "\"model\":\"n\"");
        std::fs::write(end.join(STATE), other).unwrap();
        assert!(matches!(verify_committed(&end), Err(CheckpointError::Checksum { .. })));
        std::fs::remove_file(end.join(MANIFEST)).unwrap();
        assert!(matches!(verify_committed(&end), Err(CheckpointError::MissingManifest { .. })));
        // A state without the position's fields is an error naming them.
        let odd = committed_with_state(run.path(), "epoch-0004", r#"{"updates":"many"}"#);
        let e = read_position(&odd).unwrap_err();
        assert!(e.to_string().contains("state.json") && e.to_string().contains("updates"), "{e}");
        // A state from before the epoch under way was kept reads as at an
        // epoch's end.
        let old =
            committed_with_state(run.path(), "epoch-0005", r#"{"next_epoch":5,"updates":25}"#);
        assert!(read_position(&old).unwrap().ends_run_of(5));
    }
}
