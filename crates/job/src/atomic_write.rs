//! Crash-safe replacement of a small file (a manifest, a recipe): the bytes
//! go to a temporary file in the same folder, which is fsynced and renamed
//! over the target, so a reader finds the old file or the new one, never a
//! torn one.

use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` atomically, creating its folder if need be.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut file = tempfile::NamedTempFile::new_in(dir)?;
    file.write_all(bytes)?;
    file.as_file().sync_all()?;
    file.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
