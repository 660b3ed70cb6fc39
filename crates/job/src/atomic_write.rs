//! Crash-safe replacement of a small file (a manifest, a recipe, a state
//! file, a checkpoint's JSON): the bytes go to a temporary file in the same
//! folder, created with mode 0600, which is fsynced and renamed over the
//! target, and the folder is fsynced, so a reader finds the old file or the
//! new one, never a torn one, and the rename survives a crash.

use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` atomically, creating its folder if need be.
/// The file has mode 0600 (it may hold a job's secrets). On failure the
/// temporary file is removed and `path` is left as it was.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut file = tempfile::NamedTempFile::new_in(dir)?;
    file.write_all(bytes)?;
    file.as_file().sync_all()?;
    file.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_file_is_replaced_whole_and_no_temporary_is_left() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("runs").join("seed-000").join("recipe.yaml");
        write_atomically(&path, b"first").expect("write");
        write_atomically(&path, b"second").expect("rewrite");
        assert_eq!(std::fs::read(&path).expect("read"), b"second");
        let names: Vec<_> = std::fs::read_dir(path.parent().expect("folder"))
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["recipe.yaml"]);
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("state.json");
        write_atomically(&path, b"old").expect("write");
        // A folder where the file should go: the rename fails.
        let blocked = tmp.path().join("blocked");
        std::fs::create_dir_all(blocked.join("inside")).expect("mkdir");
        assert!(write_atomically(&blocked, b"new").is_err());
        assert_eq!(std::fs::read(&path).expect("read"), b"old");
        let mut names: Vec<_> = std::fs::read_dir(tmp.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["blocked", "state.json"]);
    }
}
