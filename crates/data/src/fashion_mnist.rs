//! Importer for Fashion-MNIST's IDX files (Debian's `dataset-fashion-mnist`)
//! into an ImageNet-layout folder tree of grayscale PNGs:
//! `OUT/{train,val}/<NN_class_name>/<index>.png`. The class folders carry a
//! two-digit prefix so that their sorted order is the dataset's label order.
//! The tree is written into a temporary sibling and renamed into place at the
//! end, so an interrupted import never leaves a partial dataset behind.
//! [`import_subset`] keeps only the first N training images of each class
//! (in the IDX files' order): a smaller real training set for short runs,
//! such as the README's seed study; the validation split stays whole.

use crate::error::DataError;
use flate2::read::GzDecoder;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Class folder names in label order.
pub const CLASS_FOLDERS: [&str; 10] = [
    "00_tshirt_top",
    "01_trouser",
    "02_pullover",
    "03_dress",
    "04_coat",
    "05_sandal",
    "06_shirt",
    "07_sneaker",
    "08_bag",
    "09_ankle_boot",
];

/// Name of the marker written last into a complete import.
pub const MARKER: &str = "IMPORTED.json";

/// Counts of an import.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImportSummary {
    /// Training images written.
    pub train: usize,
    /// Validation (test-set) images written.
    pub val: usize,
    /// Training images kept per class, when the import was limited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_per_class: Option<usize>,
}

struct IdxImages {
    count: usize,
    rows: usize,
    cols: usize,
    pixels: Vec<u8>,
}

fn read_maybe_gz(dir: &Path, stem: &str) -> Result<(PathBuf, Vec<u8>), DataError> {
    for (name, gz) in [(format!("{stem}.gz"), true), (stem.to_string(), false)] {
        let path = dir.join(&name);
        if path.is_file() {
            let raw = std::fs::read(&path).map_err(|e| DataError::io(&path, e))?;
            if !gz {
                return Ok((path, raw));
            }
            let mut out = Vec::new();
            GzDecoder::new(raw.as_slice()).read_to_end(&mut out).map_err(|e| {
                DataError::Format {
                    path: path.clone(),
                    problem: format!("not a valid gzip stream: {e}"),
                }
            })?;
            return Ok((path, out));
        }
    }
    Err(DataError::io(dir.join(format!("{stem}.gz")), std::io::ErrorKind::NotFound.into()))
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn read_images(dir: &Path, stem: &str) -> Result<IdxImages, DataError> {
    let (path, bytes) = read_maybe_gz(dir, stem)?;
    let bad = |problem: String| DataError::Format { path: path.clone(), problem };
    if bytes.len() < 16 {
        return Err(bad(format!("{} bytes is shorter than the 16-byte IDX header", bytes.len())));
    }
    let magic = be_u32(&bytes, 0);
    if magic != 0x0803 {
        return Err(bad(format!("magic 0x{magic:08x} at offset 0, expected 0x00000803 (images)")));
    }
    let (count, rows, cols) =
        (be_u32(&bytes, 4) as usize, be_u32(&bytes, 8) as usize, be_u32(&bytes, 12) as usize);
    let expected =
        count.checked_mul(rows).and_then(|n| n.checked_mul(cols)).and_then(|n| n.checked_add(16));
    if expected != Some(bytes.len()) {
        let expected =
            expected.map_or_else(|| "more than can be addressed".into(), |n| n.to_string());
        return Err(bad(format!(
            "header says {count} images of {rows}x{cols} ({expected} bytes) but the file has {} bytes",
            bytes.len()
        )));
    }
    Ok(IdxImages { count, rows, cols, pixels: bytes[16..].to_vec() })
}

fn read_labels(dir: &Path, stem: &str, classes: usize) -> Result<Vec<u8>, DataError> {
    let (path, bytes) = read_maybe_gz(dir, stem)?;
    let bad = |problem: String| DataError::Format { path: path.clone(), problem };
    if bytes.len() < 8 {
        return Err(bad(format!("{} bytes is shorter than the 8-byte IDX header", bytes.len())));
    }
    let magic = be_u32(&bytes, 0);
    if magic != 0x0801 {
        return Err(bad(format!("magic 0x{magic:08x} at offset 0, expected 0x00000801 (labels)")));
    }
    let count = be_u32(&bytes, 4) as usize;
    if bytes.len() != 8 + count {
        return Err(bad(format!(
            "header says {count} labels but the file has {} bytes",
            bytes.len()
        )));
    }
    let labels = bytes[8..].to_vec();
    if let Some((i, l)) = labels.iter().enumerate().find(|(_, l)| usize::from(**l) >= classes) {
        return Err(bad(format!(
            "label {l} of record {i} (offset {}) is not below {classes}",
            8 + i
        )));
    }
    Ok(labels)
}

fn write_split(
    out: &Path,
    split: &str,
    images: &IdxImages,
    labels: &[u8],
    per_class: Option<usize>,
) -> Result<usize, DataError> {
    for class in CLASS_FOLDERS {
        let dir = out.join(split).join(class);
        std::fs::create_dir_all(&dir).map_err(|e| DataError::io(&dir, e))?;
    }
    let per_image = images.rows * images.cols;
    let mut kept = [0usize; CLASS_FOLDERS.len()];
    for (i, label) in labels.iter().enumerate() {
        let class = &mut kept[usize::from(*label)];
        if per_class.is_some_and(|n| *class >= n) {
            continue;
        }
        *class += 1;
        let pixels = &images.pixels[i * per_image..(i + 1) * per_image];
        let path =
            out.join(split).join(CLASS_FOLDERS[usize::from(*label)]).join(format!("{i:05}.png"));
        ::image::save_buffer(
            &path,
            pixels,
            images.cols as u32,
            images.rows as u32,
            ::image::ExtendedColorType::L8,
        )
        .map_err(|e| DataError::io(&path, std::io::Error::other(e.to_string())))?;
    }
    Ok(kept.iter().sum())
}

/// Whether `out` already holds a complete import.
pub fn existing_import(out: &Path) -> Option<ImportSummary> {
    let text = std::fs::read_to_string(out.join(MARKER)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Converts the four IDX files in `idx_dir` into `out` (which must not exist,
/// unless it holds a complete earlier import, which is then kept as is).
pub fn import(idx_dir: &Path, out: &Path) -> Result<ImportSummary, DataError> {
    import_subset(idx_dir, out, None)
}

/// [`import`], keeping only the first `train_per_class` training images of
/// each class when given. An earlier complete import in `out` is kept if it
/// was made with the same limit, and refused otherwise.
pub fn import_subset(
    idx_dir: &Path,
    out: &Path,
    train_per_class: Option<usize>,
) -> Result<ImportSummary, DataError> {
    if let Some(done) = existing_import(out) {
        if done.train_per_class != train_per_class {
            let show = |n: Option<usize>| n.map_or_else(|| "all".to_string(), |n| n.to_string());
            return Err(DataError::Layout {
                path: out.to_path_buf(),
                problem: format!(
                    "holds an import of {} training image(s) per class, not {}; remove it or \
                     choose another --out",
                    show(done.train_per_class),
                    show(train_per_class)
                ),
            });
        }
        return Ok(done);
    }
    if train_per_class == Some(0) {
        return Err(DataError::Layout {
            path: out.to_path_buf(),
            problem: "--train-per-class 0 would leave every class without an image".into(),
        });
    }
    if out.exists() {
        return Err(DataError::Layout {
            path: out.to_path_buf(),
            problem: format!("exists but has no {MARKER}; remove it or choose another --out"),
        });
    }
    let train_images = read_images(idx_dir, "train-images-idx3-ubyte")?;
    let train_labels = read_labels(idx_dir, "train-labels-idx1-ubyte", CLASS_FOLDERS.len())?;
    let test_images = read_images(idx_dir, "t10k-images-idx3-ubyte")?;
    let test_labels = read_labels(idx_dir, "t10k-labels-idx1-ubyte", CLASS_FOLDERS.len())?;
    for (what, images, labels) in
        [("train", &train_images, &train_labels), ("t10k", &test_images, &test_labels)]
    {
        if images.count != labels.len() {
            return Err(DataError::Layout {
                path: idx_dir.to_path_buf(),
                problem: format!("{what}: {} images but {} labels", images.count, labels.len()),
            });
        }
    }
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| DataError::io(parent, e))?;
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let staging = parent.join(format!(".{name}.partial-{}", std::process::id()));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| DataError::io(&staging, e))?;
    }
    let summary = ImportSummary {
        train: write_split(&staging, "train", &train_images, &train_labels, train_per_class)?,
        val: write_split(&staging, "val", &test_images, &test_labels, None)?,
        train_per_class,
    };
    let marker = staging.join(MARKER);
    let json = serde_json::to_string_pretty(&summary).expect("summary serialises");
    std::fs::write(&marker, json).map_err(|e| DataError::io(&marker, e))?;
    std::fs::rename(&staging, out).map_err(|e| DataError::io(out, e))?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write_gz(path: &Path, bytes: &[u8]) {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(bytes).unwrap();
        std::fs::write(path, enc.finish().unwrap()).unwrap();
    }

    fn idx_images(count: u32, fill: impl Fn(u32) -> u8) -> Vec<u8> {
        let mut v = vec![0, 0, 8, 3];
        for d in [count, 2, 3] {
            v.extend_from_slice(&d.to_be_bytes());
        }
        for i in 0..count {
            v.extend(std::iter::repeat_n(fill(i), 6));
        }
        v
    }

    fn idx_labels(labels: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, 8, 1];
        v.extend_from_slice(&(labels.len() as u32).to_be_bytes());
        v.extend_from_slice(labels);
        v
    }

    #[test]
    fn imports_into_an_image_folder_tree() {
        let src = tempfile::tempdir().unwrap();
        write_gz(&src.path().join("train-images-idx3-ubyte.gz"), &idx_images(3, |i| i as u8 * 10));
        write_gz(&src.path().join("train-labels-idx1-ubyte.gz"), &idx_labels(&[9, 0, 9]));
        std::fs::write(src.path().join("t10k-images-idx3-ubyte"), idx_images(1, |_| 7)).unwrap();
        std::fs::write(src.path().join("t10k-labels-idx1-ubyte"), idx_labels(&[3])).unwrap();
        let out_root = tempfile::tempdir().unwrap();
        let out = out_root.path().join("fm");
        let summary = import(src.path(), &out).unwrap();
        assert_eq!(summary, ImportSummary { train: 3, val: 1, train_per_class: None });
        let folder = crate::dataset::ImageFolder::open(&out.join("train")).unwrap_err();
        // Classes with no training image make the folder unusable: here 8 classes are empty.
        assert!(folder.to_string().contains("holds no image"));
        let img = crate::decode::decode_file(&out.join("train/09_ankle_boot/00002.png")).unwrap();
        assert_eq!((img.width, img.height, img.pixel(0, 0)), (3, 2, [20, 20, 20]));
        // A second import keeps the complete one, unless it asks for another limit.
        assert_eq!(import(src.path(), &out).unwrap(), summary);
        let err = import_subset(src.path(), &out, Some(1)).unwrap_err().to_string();
        assert!(err.contains("all training image(s) per class, not 1"), "{err}");
        // The first image of each class only.
        let limited = out_root.path().join("fm1");
        let summary = import_subset(src.path(), &limited, Some(1)).unwrap();
        assert_eq!(summary, ImportSummary { train: 2, val: 1, train_per_class: Some(1) });
        assert!(limited.join("train/09_ankle_boot/00000.png").is_file());
        assert!(!limited.join("train/09_ankle_boot/00002.png").exists());
        assert!(limited.join("train/00_tshirt_top/00001.png").is_file());
        assert_eq!(existing_import(&limited), Some(summary));
    }

    #[test]
    fn malformed_files_are_named() {
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("train-images-idx3-ubyte"), idx_images(2, |_| 0)).unwrap();
        std::fs::write(src.path().join("train-labels-idx1-ubyte"), idx_labels(&[1, 12])).unwrap();
        let out = tempfile::tempdir().unwrap().path().join("x");
        let err = import(src.path(), &out).unwrap_err().to_string();
        assert!(
            err.contains("train-labels-idx1-ubyte") && err.contains("label 12 of record 1"),
            "{err}"
        );
        let mut bad = idx_images(2, |_| 0);
        bad.truncate(20);
        std::fs::write(src.path().join("train-images-idx3-ubyte"), bad).unwrap();
        let err = import(src.path(), &out).unwrap_err().to_string();
        assert!(err.contains("train-images-idx3-ubyte") && err.contains("20 bytes"), "{err}");
        // Dimensions whose product overflows are an error, not a wrapped size.
        let mut huge = vec![0, 0, 8, 3];
        huge.extend_from_slice(&[0xff; 12]);
        std::fs::write(src.path().join("train-images-idx3-ubyte"), huge).unwrap();
        let err = import(src.path(), &out).unwrap_err().to_string();
        assert!(err.contains("(more than can be addressed bytes)"), "{err}");
    }
}
