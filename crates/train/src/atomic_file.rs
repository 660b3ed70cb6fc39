//! Crash-safe file and folder replacement for checkpoints: "write to a
//! temporary sibling, fsync it, rename it over the target, fsync the parent
//! folder", for folders and for files that a library writes by path (the
//! safetensors weights). Small files given as bytes go through
//! [`rsb_files`], the one writer the coordinator uses too.
//!
//! The temporary sibling lives in the target's folder, so the rename stays on
//! one file system and is atomic: after a crash, the target is either absent,
//! or the old complete version, or the new complete version, never a torn
//! one. Fsyncing the parent folder makes the rename itself durable.

use crate::error::TrainError;
use std::fs::File;
use std::path::{Path, PathBuf};

/// What every temporary name holds after the name it stands for
/// (`.epoch-0001.tmp-…`): how retention recognises what a save left.
pub const TEMPORARY_MARK: &str = ".tmp-";

/// `dir/.name.tmp-<pid>-<random>`: a hidden sibling of `path` on the same
/// file system, named as by no other call. The PID alone is not enough:
/// two writers in containers (rank 0 of two jobs) are both often PID 1,
/// and a shared name would let one replace or delete the other's save in
/// progress. Fails only when the system has no random numbers to give.
pub fn temporary_sibling(path: &Path) -> std::io::Result<PathBuf> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let random = getrandom::u64().map_err(|e| {
        std::io::Error::other(format!("no random number for a temporary name: {e}"))
    })?;
    Ok(path.with_file_name(format!(".{name}{TEMPORARY_MARK}{}-{random:016x}", std::process::id())))
}

/// Fsyncs `staged` (a file or a folder), renames it to `target` (replacing a
/// file of that name) and fsyncs the folder that holds `target`.
pub fn sync_and_rename(staged: &Path, target: &Path) -> std::io::Result<()> {
    File::open(staged)?.sync_all()?;
    std::fs::rename(staged, target)?;
    let parent = target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(parent)?.sync_all()
}

/// Puts the folder `staged` in the place of `target`, after fsyncing
/// `staged`: a missing `target` is renamed into place; an existing one is
/// exchanged with `staged` in one step (`renameat2(RENAME_EXCHANGE)`), so
/// that `target` names a complete folder at every moment. Where the file
/// system cannot exchange, the old folder is first renamed to a hidden
/// sibling (a moment without `target`, as before a first save).
///
/// Returns where the folder that `target` held now is (`staged`, or that
/// hidden sibling), or `None` when there was none: it is not deleted, the
/// caller keeps or moves it. The parent folder is not fsynced: the caller
/// does ([`sync_folder`]) once it has moved the old folder too. On error
/// nothing has moved: `staged` holds the new folder, `target` the old one.
pub fn replace_folder(staged: &Path, target: &Path) -> std::io::Result<Option<PathBuf>> {
    use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
    File::open(staged)?.sync_all()?;
    if !target.exists() {
        std::fs::rename(staged, target)?;
        return Ok(None);
    }
    match renameat2(AT_FDCWD, staged, AT_FDCWD, target, RenameFlags::RENAME_EXCHANGE) {
        Ok(()) => Ok(Some(staged.to_path_buf())),
        Err(
            nix::errno::Errno::EINVAL | nix::errno::Errno::ENOSYS | nix::errno::Errno::EOPNOTSUPP,
        ) => {
            let aside = temporary_sibling(&target.with_file_name(format!(
                "{}.old",
                target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
            )))?;
            std::fs::rename(target, &aside)?;
            if let Err(e) = std::fs::rename(staged, target) {
                // Put the old folder back: the hidden name would be pruned.
                let _ = std::fs::rename(&aside, target);
                return Err(e);
            }
            Ok(Some(aside))
        }
        Err(errno) => Err(errno.into()),
    }
}

/// Fsyncs the folder `dir`, so that the renames and new entries in it
/// survive a crash.
pub fn sync_folder(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes the file `path` atomically: `write` fills a temporary sibling (the
/// path it is given), which is then fsynced and renamed over `path`, and the
/// folder is fsynced. If `write` or any step fails, the temporary file is
/// removed and `path` is left as it was.
pub fn write_with(
    path: &Path,
    write: impl FnOnce(&Path) -> Result<(), TrainError>,
) -> Result<(), TrainError> {
    let staged = temporary_sibling(path).map_err(|e| TrainError::io(path, e))?;
    let result = write(&staged)
        .and_then(|()| sync_and_rename(&staged, path).map_err(|e| TrainError::io(path, e)));
    if result.is_err() && staged.exists() {
        // Best effort: the error being returned matters more than a leftover
        // hidden file, which the next write of `path` replaces anyway.
        let _ = std::fs::remove_file(&staged);
    }
    result
}

/// Writes `bytes` to the file `path` atomically, readable by everyone like
/// the checkpoint's weights ([`rsb_files::write_atomically`]).
pub fn write_bytes(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    use rsb_files::{write_atomically, Readers};
    write_atomically(path, bytes, Readers::Everyone).map_err(|e| TrainError::io(path, e))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    /// Files in `dir`, hidden ones included, sorted.
    pub(crate) fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn the_target_appears_only_complete() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("state.json");
        write_with(&target, |staged| {
            let mut file = File::create(staged).unwrap();
            file.write_all(b"{\"half\":").unwrap();
            file.flush().unwrap();
            // Half written: a crash now would leave no `state.json` at all.
            assert!(!target.exists(), "the target exists before the write finished");
            file.write_all(b" false}").unwrap();
            Ok(())
        })
        .unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "{\"half\": false}");
        assert_eq!(names(dir.path()), ["state.json"], "the temporary file is left behind");
    }

    #[test]
    fn a_failed_write_leaves_no_target_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("model.safetensors");
        let err = write_with(&target, |staged| {
            std::fs::write(staged, b"torn").unwrap();
            Err(TrainError::Recipe("the writer crashed".into()))
        })
        .unwrap_err();
        assert!(err.to_string().contains("the writer crashed"), "{err}");
        assert!(names(dir.path()).is_empty(), "left behind: {:?}", names(dir.path()));
    }

    #[test]
    fn a_failed_write_keeps_the_old_target() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("state.json");
        std::fs::write(&target, b"old, complete").unwrap();
        let result = write_with(&target, |staged| {
            std::fs::write(staged, b"new bu").unwrap();
            Err(TrainError::Recipe("interrupted".into()))
        });
        assert!(result.is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"old, complete");
        assert_eq!(names(dir.path()), ["state.json"]);
    }

    #[test]
    fn an_existing_target_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("state.json");
        std::fs::write(&target, vec![b'x'; 10_000]).unwrap();
        write_bytes(&target, b"short").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"short");
        assert_eq!(names(dir.path()), ["state.json"]);
        // Like the weights: another account may evaluate the checkpoint.
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&target).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644, "mode {mode:o}");
    }

    #[test]
    fn a_staged_folder_is_renamed_into_place() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("epoch-0001");
        let staged = temporary_sibling(&target).unwrap();
        std::fs::create_dir(&staged).unwrap();
        write_bytes(&staged.join("state.json"), b"{}").unwrap();
        sync_and_rename(&staged, &target).unwrap();
        assert_eq!(names(dir.path()), ["epoch-0001"]);
        assert_eq!(std::fs::read(target.join("state.json")).unwrap(), b"{}");
    }

    #[test]
    fn a_folder_replaces_an_existing_one_whole_and_hands_the_old_one_back() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("epoch-0004");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("old.bin"), "old 0").unwrap();
        for round in 0..2 {
            let staged = temporary_sibling(&target).unwrap();
            std::fs::create_dir(&staged).unwrap();
            std::fs::write(staged.join("model.safetensors"), format!("new {round}")).unwrap();
            let old = replace_folder(&staged, &target).unwrap().expect("the replaced folder");
            assert_eq!(names(&target), ["model.safetensors"]);
            let text = std::fs::read_to_string(target.join("model.safetensors")).unwrap();
            assert_eq!(text, format!("new {round}"));
            // The replaced folder is handed back whole, not deleted.
            let kept = if round == 0 { "old.bin" } else { "model.safetensors" };
            assert_eq!(names(&old), [kept]);
            let expected = if round == 0 { "old 0".to_string() } else { "new 0".to_string() };
            assert_eq!(std::fs::read_to_string(old.join(kept)).unwrap(), expected);
            std::fs::remove_dir_all(&old).unwrap();
            sync_folder(dir.path()).unwrap();
            assert_eq!(names(dir.path()), ["epoch-0004"]);
        }
        // A missing target: the staged folder is renamed into place.
        let fresh = dir.path().join("epoch-0005");
        let staged = temporary_sibling(&fresh).unwrap();
        std::fs::create_dir(&staged).unwrap();
        assert_eq!(replace_folder(&staged, &fresh).unwrap(), None);
        assert_eq!(names(dir.path()), ["epoch-0004", "epoch-0005"]);
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        // A file where the folder should be.
        std::fs::write(dir.path().join("not-a-folder"), b"").unwrap();
        let target = dir.path().join("not-a-folder").join("state.json");
        let err = write_bytes(&target, b"{}").unwrap_err().to_string();
        assert!(err.contains("not-a-folder"), "{err}");
    }

    #[test]
    fn the_temporary_is_a_hidden_sibling() {
        let staged = temporary_sibling(Path::new("/runs/a/state.json")).unwrap();
        assert_eq!(staged.parent(), Some(Path::new("/runs/a")));
        let name = staged.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with(".state.json.tmp-"), "{name}");
    }

    #[test]
    fn two_temporary_names_of_one_path_in_one_process_differ() {
        // Two writers of one PID (PID 1 in two containers) are two calls
        // of one process here.
        let target = Path::new("/runs/a/checkpoints/epoch-0001");
        let first = temporary_sibling(target).unwrap();
        let second = temporary_sibling(target).unwrap();
        assert_ne!(first, second, "two writers would share a staging folder");
        for staged in [first, second] {
            let name = staged.file_name().unwrap().to_string_lossy().into_owned();
            let own = format!(".epoch-0001{TEMPORARY_MARK}{}-", std::process::id());
            assert!(name.starts_with(&own), "{name} lacks the PID after {TEMPORARY_MARK}");
        }
    }
}
