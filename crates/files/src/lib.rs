//! Crash-safe replacement of a small file (a manifest, a recipe, a state
//! file, a checkpoint's JSON): the bytes go to a temporary file in the same
//! folder, created with mode 0600 (so a secret is never readable by others,
//! even for a moment), given its final mode, fsynced and renamed over the
//! target, and the folder is fsynced, so a reader finds the old file or the
//! new one, never a torn one, and the rename survives a crash. Such files
//! are read back with [`read_regular_file`] ([`open_regular_file`]), which
//! refuses what is not a regular file (a FIFO would make the reader wait for a writer for ever);
//! an append-only log is opened with [`open_regular_file_to_append`], which
//! refuses them as well.

#![warn(missing_docs)]
#![warn(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::path::Path;

/// Who may read a file once it is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readers {
    /// Its owner only (mode 0600): a file that holds secrets.
    Owner,
    /// Everyone (mode 0644): results, recipes, checkpoints, which other
    /// accounts of a shared file system may read.
    Everyone,
}

impl Readers {
    fn mode(self) -> u32 {
        match self {
            Readers::Owner => 0o600,
            Readers::Everyone => 0o644,
        }
    }
}

/// Writes `bytes` to `path` atomically, creating its folder if need be,
/// readable by `readers`. On failure the temporary file is removed and
/// `path` is left as it was.
pub fn write_atomically(path: &Path, bytes: &[u8], readers: Readers) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut file = tempfile::NamedTempFile::new_in(dir)?;
    file.write_all(bytes)?;
    file.as_file().set_permissions(std::fs::Permissions::from_mode(readers.mode()))?;
    file.as_file().sync_all()?;
    file.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Opens a file to read, refusing anything that is not a regular file (or
/// a link to one) with an `InvalidInput` error instead of opening it:
/// opening a FIFO waits for a writer for ever, and a device may never end.
pub fn open_regular_file(path: &Path) -> std::io::Result<std::fs::File> {
    if !std::fs::metadata(path)?.file_type().is_file() {
        return Err(not_a_regular_file());
    }
    std::fs::File::open(path)
}

/// Opens a file to read and append (a log), creating it when nothing is
/// at `path`, and refusing anything that is not a regular file (or a link
/// to one) as [`open_regular_file`] does: a FIFO would take the appends
/// until its buffer fills and then wait for a reader for ever, and a
/// device is no log a run can continue.
pub fn open_regular_file_to_append(path: &Path) -> std::io::Result<std::fs::File> {
    match std::fs::metadata(path) {
        Ok(metadata) if !metadata.file_type().is_file() => return Err(not_a_regular_file()),
        // Nothing there yet: created below.
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::OpenOptions::new().read(true).append(true).create(true).open(path)
}

/// The error [`open_regular_file`] refuses with.
pub fn not_a_regular_file() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        "not a regular file (a FIFO, a device or a folder?)",
    )
}

/// [`read_regular_file`], `None` when nothing is at `path`. A link to
/// nothing is an error (`NotFound`, naming no file the caller could mean
/// as absent), as is anything that is not a regular file.
pub fn read_regular_file_if_present(path: &Path) -> std::io::Result<Option<String>> {
    if nothing_at(path) {
        return Ok(None);
    }
    match read_regular_file(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "a link to nothing (its target does not exist)",
        )),
        other => other.map(Some),
    }
}

/// Whether nothing at all is at `path`: not a file, a folder, a FIFO, nor
/// a link (even to nothing), so a reader may treat it as not written yet.
pub fn nothing_at(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
}

/// Reads a small text file (a manifest, a list, a label file) opened with
/// [`open_regular_file`].
pub fn read_regular_file(path: &Path) -> std::io::Result<String> {
    let mut text = String::new();
    open_regular_file(path)?.read_to_string(&mut text)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_file_is_replaced_whole_and_no_temporary_is_left() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("runs").join("seed-000").join("recipe.yaml");
        write_atomically(&path, b"first", Readers::Everyone).expect("write");
        write_atomically(&path, b"second", Readers::Everyone).expect("rewrite");
        assert_eq!(std::fs::read(&path).expect("read"), b"second");
        let names: Vec<_> = std::fs::read_dir(path.parent().expect("folder"))
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["recipe.yaml"]);
        let mode =
            |path: &Path| std::fs::metadata(path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o644, "others cannot read a result");
        let secret = path.with_file_name("coordinator-state.json");
        write_atomically(&secret, b"secret", Readers::Owner).expect("write");
        assert_eq!(mode(&secret), 0o600, "others can read a secret");
    }

    #[test]
    fn a_log_is_created_or_appended_to_and_a_fifo_is_refused_without_waiting() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let log = tmp.path().join("metrics.jsonl");
        open_regular_file_to_append(&log).expect("create").write_all(b"one\n").expect("write");
        open_regular_file_to_append(&log).expect("reopen").write_all(b"two\n").expect("write");
        assert_eq!(std::fs::read_to_string(&log).expect("read"), "one\ntwo\n");
        let folder = open_regular_file_to_append(tmp.path()).expect_err("a folder");
        assert_eq!(folder.kind(), std::io::ErrorKind::InvalidInput, "{folder}");
        let fifo = tmp.path().join("fifo.jsonl");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
        assert!(made.success(), "mkfifo failed");
        // In a thread: a regression would wait here for a reader for ever.
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = sender.send(open_regular_file_to_append(&fifo).map(|_| ()));
        });
        let opened = receiver
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("opening a FIFO to append did not return");
        let e = opened.expect_err("a FIFO was opened as a log");
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("state.json");
        write_atomically(&path, b"old", Readers::Owner).expect("write");
        // A folder where the file should go: the rename fails.
        let blocked = tmp.path().join("blocked");
        std::fs::create_dir_all(blocked.join("inside")).expect("mkdir");
        assert!(write_atomically(&blocked, b"new", Readers::Owner).is_err());
        assert_eq!(std::fs::read(&path).expect("read"), b"old");
        let mut names: Vec<_> = std::fs::read_dir(tmp.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["blocked", "state.json"]);
    }
}
