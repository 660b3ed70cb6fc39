//! Datasets in the ImageNet folder layout: `ROOT/<split>/<class>/<image>`.
//!
//! Classes are the sub-folders of the split, in timm's natural sort order
//! (`natural_key`: digit runs compare as numbers, so ImageNet-V2's folders
//! `0`..`999` map to indices 0..999 and ImageNet's `n01440764`.. sort as
//! text). Images are the files with an image extension anywhere below a class
//! folder, in natural order of their path.

use crate::error::DataError;
use std::cmp::Ordering;
use std::path::{Path, PathBuf};

/// File extensions treated as images (case-insensitive), as timm's `IMG_EXTENSIONS`.
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg"];

/// One labelled image file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// The image file.
    pub path: PathBuf,
    /// Class index.
    pub label: u32,
}

/// An indexed split of an image-folder dataset.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    root: PathBuf,
    classes: Vec<String>,
    samples: Vec<Sample>,
}

impl ImageFolder {
    /// Indexes `root` (one split). Fails with the folder named when it has no
    /// class folders or a class folder holds no image.
    pub fn open(root: &Path) -> Result<ImageFolder, DataError> {
        let layout = |problem: String| DataError::Layout { path: root.to_path_buf(), problem };
        let entries = std::fs::read_dir(root).map_err(|e| DataError::io(root, e))?;
        let mut class_dirs = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| DataError::io(root, e))?;
            if entry.file_type().map_err(|e| DataError::io(entry.path(), e))?.is_dir() {
                class_dirs.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        if class_dirs.is_empty() {
            return Err(layout("no class folders (expected ROOT/<split>/<class>/<image>)".into()));
        }
        class_dirs.sort_by(|a, b| natural_cmp(a, b));
        let mut samples = Vec::new();
        for (label, class) in class_dirs.iter().enumerate() {
            let dir = root.join(class);
            let mut files = Vec::new();
            collect_images(&dir, &mut files)?;
            if files.is_empty() {
                return Err(layout(format!(
                    "class folder `{class}` holds no image ({})",
                    IMAGE_EXTENSIONS.join(", ")
                )));
            }
            files.sort_by(|a, b| natural_cmp(&a.to_string_lossy(), &b.to_string_lossy()));
            samples.extend(files.into_iter().map(|path| Sample { path, label: label as u32 }));
        }
        Ok(ImageFolder { root: root.to_path_buf(), classes: class_dirs, samples })
    }

    /// The split folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Class folder names in label order.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// All samples, grouped by class, in natural order.
    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether the split has no image (never true for an opened folder).
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

fn collect_images(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), DataError> {
    for entry in std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        let entry = entry.map_err(|e| DataError::io(dir, e))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(|e| DataError::io(&path, e))?;
        if kind.is_dir() {
            collect_images(&path, out)?;
        } else if has_image_extension(&path) {
            out.push(path);
        }
    }
    Ok(())
}

fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// timm's `natural_key` order: the text is split into digit and non-digit
/// runs; digit runs compare as numbers, the rest case-insensitively.
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let ka = natural_key(a);
    let kb = natural_key(b);
    ka.cmp(&kb)
}

/// One run of a natural-sort key. Keys always alternate text and number runs
/// starting with text (possibly empty), as Python's `re.split(r'(\d+)', s)`,
/// so parts at the same position always have the same kind.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum KeyPart {
    Text(String),
    Number(u128),
}

fn natural_key(s: &str) -> Vec<KeyPart> {
    let lower = s.to_lowercase();
    let mut parts = Vec::new();
    let mut run = String::new();
    let mut in_digits = false;
    for c in lower.chars() {
        if c.is_ascii_digit() != in_digits {
            parts.push(key_part(std::mem::take(&mut run), in_digits));
            in_digits = !in_digits;
        }
        run.push(c);
    }
    parts.push(key_part(run, in_digits));
    parts
}

fn key_part(run: String, digits: bool) -> KeyPart {
    if digits {
        KeyPart::Number(run.parse::<u128>().unwrap_or(u128::MAX))
    } else {
        KeyPart::Text(run)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order_sorts_numbers_numerically() {
        let mut v = vec!["10", "9", "100", "0", "n02", "n01440764", "img2.png", "img10.png"];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(v, vec!["0", "9", "10", "100", "img2.png", "img10.png", "n02", "n01440764"]);
    }

    #[test]
    fn indexes_an_imagenet_layout_and_rejects_empty_classes() {
        let dir = tempfile::tempdir().unwrap();
        for (class, files) in
            [("n015", vec!["b.JPEG", "a.jpeg"]), ("n002", vec!["x.png", "notes.txt"])]
        {
            let d = dir.path().join(class);
            std::fs::create_dir_all(&d).unwrap();
            for f in files {
                std::fs::write(d.join(f), b"").unwrap();
            }
        }
        let folder = ImageFolder::open(dir.path()).unwrap();
        assert_eq!(folder.classes(), &["n002".to_string(), "n015".to_string()]);
        let names: Vec<(String, u32)> = folder
            .samples()
            .iter()
            .map(|s| (s.path.file_name().unwrap().to_string_lossy().into_owned(), s.label))
            .collect();
        assert_eq!(names, vec![("x.png".into(), 0), ("a.jpeg".into(), 1), ("b.JPEG".into(), 1)]);

        std::fs::create_dir_all(dir.path().join("n999")).unwrap();
        let err = ImageFolder::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("n999") && err.contains("no image"), "{err}");
        let err = ImageFolder::open(&dir.path().join("missing")).unwrap_err().to_string();
        assert!(err.contains("missing"), "{err}");
    }
}
