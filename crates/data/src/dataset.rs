//! Datasets: which images exist, with which labels, and how to read them.
//!
//! Four layouts give the same [`ImageFolder`] (a list of labelled samples):
//!
//! * **class folders** ([`ImageFolder::open`]), `ROOT/<split>/<class>/<image>`:
//!   classes are the sub-folders of the split, in timm's natural sort order
//!   (`natural_key`: digit runs compare as numbers, so ImageNet-V2's folders
//!   `0`..`999` map to indices 0..999 and ImageNet's `n01440764`.. sort as
//!   text). Images are the files with an image extension anywhere below a
//!   class folder, in natural order of their path;
//! * **numbered class folders** ([`ImageFolder::open_numbered`], ImageNet-V2):
//!   the folder name *is* the class index, so a missing folder cannot shift
//!   the labels of the others;
//! * **a flat folder and a label file** ([`ImageFolder::open_flat`], ImageNet's
//!   `val/ILSVRC2012_val_00000001.JPEG`...), see [`crate::labels`] for the
//!   label-file formats;
//! * **WebDataset tar shards** ([`ImageFolder::open_shards`]), see
//!   [`crate::shards`]: samples are read by random access into the tar files.
//!
//! Hidden entries (names starting with `.`: Jupyter's `.ipynb_checkpoints/`,
//! macOS's `._x.JPEG` and `.DS_Store`, a `.cache/`) and Synology's `@eaDir`
//! thumbnail folders are not data: they are left out, as class folders,
//! below a class folder and in a flat folder, and counted in one warning per
//! split naming one of them ([`is_hidden_or_system`]).

use crate::error::DataError;
use crate::labels::{ClassRef, LabelFile};
use std::cmp::Ordering;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// File extensions treated as images (case-insensitive), as timm's `IMG_EXTENSIONS`.
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg"];

/// Where an image lies inside a tar shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardMember {
    /// Member name in the tar (`000123.jpg`).
    pub name: String,
    /// Byte offset of the member's data in the tar file.
    pub offset: u64,
    /// Length of the member's data.
    pub len: u64,
}

/// One labelled image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// The image file, or the tar shard holding it.
    pub path: PathBuf,
    /// Class index.
    pub label: u32,
    /// Where the image lies inside `path` when `path` is a tar shard.
    pub member: Option<ShardMember>,
}

impl Sample {
    /// A sample stored as its own file.
    pub fn file(path: PathBuf, label: u32) -> Sample {
        Sample { path, label, member: None }
    }

    /// The encoded image bytes.
    pub fn read(&self) -> Result<Vec<u8>, DataError> {
        match &self.member {
            None => read_image_file(&self.path),
            Some(m) => {
                use std::os::unix::fs::FileExt;
                let file =
                    std::fs::File::open(&self.path).map_err(|e| DataError::io(&self.path, e))?;
                let len = usize::try_from(m.len).map_err(|_| DataError::Format {
                    path: self.path.clone(),
                    problem: format!("member {} is too large ({} bytes)", m.name, m.len),
                })?;
                let mut buf = vec![0u8; len];
                file.read_exact_at(&mut buf, m.offset).map_err(|e| DataError::Format {
                    path: self.path.clone(),
                    problem: format!(
                        "member {} ({} bytes at offset {}): {e}",
                        m.name, m.len, m.offset
                    ),
                })?;
                Ok(buf)
            }
        }
    }

    /// The image's own name: the file name, or the member name in its shard
    /// (what ImageNet-ReaL labels are looked up by).
    pub fn file_name(&self) -> String {
        match &self.member {
            Some(m) => m.name.clone(),
            None => {
                self.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
            }
        }
    }

    /// `path` for a file, `shard.tar:member` for a shard member (for messages).
    pub fn display(&self) -> String {
        match &self.member {
            Some(m) => format!("{}:{}", self.path.display(), m.name),
            None => self.path.display().to_string(),
        }
    }
}

/// An indexed split of a dataset, in any of the layouts of this module.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    root: PathBuf,
    classes: Vec<String>,
    samples: Vec<Sample>,
}

impl ImageFolder {
    /// Indexes `root` (one split in class folders). Fails with the folder
    /// named when it has no class folders or a class folder holds no image.
    pub fn open(root: &Path) -> Result<ImageFolder, DataError> {
        let mut left_out = LeftOut::default();
        let class_dirs = class_folders(root, &mut left_out)?;
        let layout = |problem: String| DataError::Layout { path: root.to_path_buf(), problem };
        let mut samples = Vec::new();
        for (label, class) in class_dirs.iter().enumerate() {
            let files = class_images(root, class, &mut left_out)?;
            samples.extend(files.into_iter().map(|path| Sample::file(path, label as u32)));
        }
        left_out.warn(root);
        if samples.is_empty() {
            return Err(layout("no images".into()));
        }
        Ok(ImageFolder { root: root.to_path_buf(), classes: class_dirs, samples })
    }

    /// Indexes class folders named by their class index (`0`, `1`, ...,
    /// ImageNet-V2's layout): a folder's number is its label, whatever other
    /// folders exist. `num_classes` bounds the numbers; `classes()` lists
    /// `"0"` to `num_classes - 1`.
    pub fn open_numbered(root: &Path, num_classes: usize) -> Result<ImageFolder, DataError> {
        let mut left_out = LeftOut::default();
        let class_dirs = class_folders(root, &mut left_out)?;
        let layout = |problem: String| DataError::Layout { path: root.to_path_buf(), problem };
        let mut samples = Vec::new();
        for class in &class_dirs {
            let label: usize = class.parse().map_err(|_| {
                layout(format!("class folder `{class}` is not a class index (expected 0, 1, ...)"))
            })?;
            if label >= num_classes {
                return Err(layout(format!(
                    "class folder `{class}` is out of range for {num_classes} classes"
                )));
            }
            let files = class_images(root, class, &mut left_out)?;
            samples.extend(files.into_iter().map(|path| Sample::file(path, label as u32)));
        }
        left_out.warn(root);
        let mut present = vec![false; num_classes];
        for sample in &samples {
            present[sample.label as usize] = true;
        }
        let missing: Vec<usize> = (0..num_classes).filter(|&i| !present[i]).collect();
        if let Some(first) = missing.first() {
            // A half-extracted archive: its score is over fewer classes
            // than the set has, and not comparable with a whole one's.
            tracing::warn!(
                folder = %root.display(),
                "{} of the {num_classes} class folders are missing (the first: `{first}`): the \
                 set is scored without their images",
                missing.len()
            );
        }
        let classes = (0..num_classes).map(|i| i.to_string()).collect();
        Ok(ImageFolder { root: root.to_path_buf(), classes, samples })
    }

    /// Indexes a folder of images without class folders, labelled by the
    /// label file `labels` (formats: [`crate::labels`]). Class names in the
    /// file map to indices through `classes` (e.g. the training split's class
    /// folders) or, without it, through the natural-sorted set of names the
    /// file uses (for ImageNet: the 1000 sorted synsets, timm's order). A file
    /// matches the entry of its full name, else of its stem
    /// (`LOC_val_solution.csv` names stems). Every image must match an entry
    /// and every entry exactly one image: two files sharing a stem
    /// (`x.JPEG`, `x.png`) would score one image twice, and are refused.
    pub fn open_flat(
        root: &Path,
        labels: &Path,
        classes: Option<&[String]>,
    ) -> Result<ImageFolder, DataError> {
        let file = LabelFile::read(labels)?;
        let (classes, index) = file.class_index(classes)?;
        let mut left_out = LeftOut::default();
        let images = flat_images(root, &mut left_out)?;
        left_out.warn(root);
        let mut by_name: HashMap<&str, (usize, &ClassRef)> = HashMap::new();
        for (entry, (name, class)) in file.entries.iter().enumerate() {
            if by_name.insert(name.as_str(), (entry, class)).is_some() {
                return Err(DataError::Format {
                    path: labels.to_path_buf(),
                    problem: format!("`{name}` is labelled twice"),
                });
            }
        }
        let mut samples = Vec::with_capacity(images.len());
        // The file that matched each entry of the label file, in entry order.
        let mut claimed_by: Vec<Option<&Path>> = vec![None; file.entries.len()];
        for path in &images {
            let name =
                path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let stem =
                path.file_stem().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let found = by_name.get(name.as_str()).or_else(|| by_name.get(stem.as_str()));
            let Some(&(entry, class)) = found else {
                return Err(DataError::Layout {
                    path: root.to_path_buf(),
                    problem: format!("`{name}` has no label in {}", labels.display()),
                });
            };
            if let Some(first) = claimed_by[entry].replace(path) {
                return Err(DataError::Layout {
                    path: root.to_path_buf(),
                    problem: format!(
                        "`{}` and `{name}` both match the entry `{}` of {}: the image would be \
                         scored twice (keep one of the files)",
                        first.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
                        file.entries[entry].0,
                        labels.display()
                    ),
                });
            }
            samples.push(Sample::file(path.clone(), index.get(class)?));
        }
        if let Some(entry) = claimed_by.iter().position(Option::is_none) {
            return Err(DataError::Layout {
                path: root.to_path_buf(),
                problem: format!(
                    "{} labels `{}`, which is not an image of this folder",
                    labels.display(),
                    file.entries[entry].0
                ),
            });
        }
        if samples.is_empty() {
            return Err(DataError::Layout {
                path: root.to_path_buf(),
                problem: "no images".into(),
            });
        }
        Ok(ImageFolder { root: root.to_path_buf(), classes, samples })
    }

    /// Indexes a folder of images without labels (for sets scored by other
    /// means, e.g. ImageNet-ReaL): every label is 0 and there are no classes.
    pub fn open_unlabelled(root: &Path) -> Result<ImageFolder, DataError> {
        let mut left_out = LeftOut::default();
        let samples: Vec<Sample> =
            flat_images(root, &mut left_out)?.into_iter().map(|p| Sample::file(p, 0)).collect();
        left_out.warn(root);
        if samples.is_empty() {
            return Err(DataError::Layout {
                path: root.to_path_buf(),
                problem: "no images".into(),
            });
        }
        Ok(ImageFolder { root: root.to_path_buf(), classes: Vec::new(), samples })
    }

    /// Indexes the WebDataset tar shards of a folder (see [`crate::shards`]).
    pub fn open_shards(root: &Path) -> Result<ImageFolder, DataError> {
        let (classes, samples) = crate::shards::index_folder(root)?;
        Ok(ImageFolder { root: root.to_path_buf(), classes, samples })
    }

    /// Opens `root` in whichever layout it has: tar shards if it holds
    /// `*.tar` files and no folder with an image, else class folders.
    /// `*.tar` files beside folders of images (ImageNet's per-class
    /// archives, left where they were unpacked) are ignored, with a
    /// warning; folders without images beside shards (`lost+found`, a
    /// cache) leave the shards read.
    pub fn open_any(root: &Path) -> Result<ImageFolder, DataError> {
        ImageFolder::open_listed(root, crate::shards::list_folder(root)?)
    }

    /// [`ImageFolder::open_any`] of a folder already listed for its shards
    /// ([`crate::shards::list_folder`]).
    pub fn open_listed(
        root: &Path,
        entries: crate::shards::FolderEntries,
    ) -> Result<ImageFolder, DataError> {
        // A look only: what is left out is logged when the folder is opened.
        let has_class_images = || {
            let mut left_out = LeftOut::default();
            let folders = class_folders(root, &mut left_out).unwrap_or_default();
            folders.iter().any(|class| class_images(root, class, &mut left_out).is_ok())
        };
        let open_shards = |entries| {
            let (classes, samples) = crate::shards::index_listed_folder(root, entries)?;
            Ok(ImageFolder { root: root.to_path_buf(), classes, samples })
        };
        if entries.shards.is_empty() {
            // What an interrupted `worker data shard` left, before its
            // first shard was complete: named as such.
            if !entries.unfinished.is_empty() && !has_class_images() {
                return open_shards(entries);
            }
            return ImageFolder::open(root);
        }
        if !has_class_images() {
            return open_shards(entries);
        }
        tracing::warn!(
            folder = %root.display(),
            "{} .tar file(s) beside the class folders are ignored: the class folders are read",
            entries.shards.len()
        );
        ImageFolder::open(root)
    }

    /// A dataset made of the given samples (class names may be empty when
    /// unknown).
    pub fn from_samples(root: PathBuf, classes: Vec<String>, samples: Vec<Sample>) -> ImageFolder {
        ImageFolder { root, classes, samples }
    }

    /// The split folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Class names in label order (empty when the layout does not name them).
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// All samples, in the layout's order.
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

    /// Checks the dataset against a model with `num_classes` outputs: the
    /// class count (when the layout names classes) must match, and every
    /// label must be below `num_classes`. The error names the sample.
    pub fn check_labels(&self, num_classes: usize) -> Result<(), DataError> {
        if !self.classes.is_empty() && self.classes.len() != num_classes {
            return Err(DataError::Layout {
                path: self.root.clone(),
                problem: format!(
                    "{} classes but the model has {num_classes} classes",
                    self.classes.len()
                ),
            });
        }
        if let Some(bad) = self.samples.iter().find(|s| s.label as usize >= num_classes) {
            return Err(DataError::Layout {
                path: self.root.clone(),
                problem: format!(
                    "label {} of {} is out of range for {num_classes} classes",
                    bad.label,
                    bad.display()
                ),
            });
        }
        Ok(())
    }

    /// Checks that this split names the same classes in the same order as
    /// the training split (`train_classes`), so that a label means the same
    /// class in both: a validation folder missing one class folder would
    /// otherwise shift every later label by one and report a wrong accuracy.
    /// Nothing to check when either names no classes (label files, shards
    /// without class names).
    pub fn check_same_classes(&self, train_classes: &[String]) -> Result<(), DataError> {
        if self.classes.is_empty() || train_classes.is_empty() || self.classes == train_classes {
            return Ok(());
        }
        let problem = match self.classes.iter().zip(train_classes).position(|(a, b)| a != b) {
            Some(i) => format!(
                "class {i} is `{}` here but `{}` in the training split, so labels would name \
                 different classes",
                self.classes[i], train_classes[i]
            ),
            None => format!(
                "{} classes here but {} in the training split (first class only in one of \
                 them: `{}`)",
                self.classes.len(),
                train_classes.len(),
                self.classes
                    .get(train_classes.len())
                    .or(train_classes.get(self.classes.len()))
                    .map_or("", |c| c.as_str())
            ),
        };
        Err(DataError::Layout { path: self.root.clone(), problem })
    }
}

/// Whether an entry named `name` is hidden (its name starts with `.`:
/// `.ipynb_checkpoints`, `.DS_Store`, macOS's `._x.JPEG` metadata files) or
/// a system folder (Synology's `@eaDir`, which holds a folder of thumbnails
/// per image): never data, so never a class folder or a sample.
pub fn is_hidden_or_system(name: &std::ffi::OsStr) -> bool {
    let name = name.as_encoded_bytes();
    name.starts_with(b".") || name == b"@eaDir"
}

/// Hidden and system entries ([`is_hidden_or_system`]) left out of one
/// split: how many, and the first met (logged once per split).
#[derive(Debug, Default)]
struct LeftOut {
    count: usize,
    first: Option<PathBuf>,
}

impl LeftOut {
    fn add(&mut self, path: PathBuf) {
        self.count += 1;
        self.first.get_or_insert(path);
    }

    /// Logs what was left out of the split `root`, if anything.
    fn warn(&self, root: &Path) {
        if let Some(first) = &self.first {
            tracing::warn!(
                split = %root.display(),
                first = %first.display(),
                "{} hidden or system entries (names starting with `.`, such as \
                 `.ipynb_checkpoints`, and Synology `@eaDir` folders) are left out of the dataset",
                self.count
            );
        }
    }
}

/// The class sub-folders of `root`, natural-sorted; an error if none.
/// Hidden and system folders are left out (recorded in `left_out`).
fn class_folders(root: &Path, left_out: &mut LeftOut) -> Result<Vec<String>, DataError> {
    let entries = std::fs::read_dir(root).map_err(|e| DataError::io(root, e))?;
    let mut class_dirs = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| DataError::io(root, e))?;
        if std::fs::metadata(entry.path()).map_err(|e| DataError::io(entry.path(), e))?.is_dir() {
            let name = entry.file_name();
            if is_hidden_or_system(&name) {
                left_out.add(entry.path());
                continue;
            }
            let Some(name) = name.to_str() else {
                return Err(DataError::Layout {
                    path: root.to_path_buf(),
                    problem: format!(
                        "class folder `{}` has a name that is not UTF-8 text",
                        name.to_string_lossy()
                    ),
                });
            };
            class_dirs.push(name.to_string());
        }
    }
    if class_dirs.is_empty() {
        return Err(DataError::Layout {
            path: root.to_path_buf(),
            problem: "no class folders (expected ROOT/<split>/<class>/<image>)".into(),
        });
    }
    class_dirs.sort_by(|a, b| natural_cmp(a, b));
    Ok(class_dirs)
}

/// The images of one class folder, natural-sorted; an error if none.
/// Hidden and system entries below it are left out (recorded in `left_out`).
fn class_images(
    root: &Path,
    class: &str,
    left_out: &mut LeftOut,
) -> Result<Vec<PathBuf>, DataError> {
    let dir = root.join(class);
    let mut files = Vec::new();
    let mut not_files = Vec::new();
    collect_images_below(&dir, &mut files, &mut not_files, left_out, 0)?;
    warn_not_files(&dir, &not_files);
    if files.is_empty() {
        return Err(DataError::Layout {
            path: root.to_path_buf(),
            problem: format!(
                "class folder `{class}` holds no image ({})",
                IMAGE_EXTENSIONS.join(", ")
            ),
        });
    }
    files.sort_by(|a, b| natural_cmp(&a.to_string_lossy(), &b.to_string_lossy()));
    Ok(files)
}

/// The image files directly in `root`, natural-sorted; hidden ones are left
/// out (recorded in `left_out`).
fn flat_images(root: &Path, left_out: &mut LeftOut) -> Result<Vec<PathBuf>, DataError> {
    let mut files = Vec::new();
    let mut not_files = Vec::new();
    for entry in std::fs::read_dir(root).map_err(|e| DataError::io(root, e))? {
        let entry = entry.map_err(|e| DataError::io(root, e))?;
        let path = entry.path();
        if !has_image_extension(&path) {
            continue;
        }
        if is_hidden_or_system(&entry.file_name()) {
            left_out.add(path);
            continue;
        }
        match std::fs::metadata(&path) {
            Ok(m) if m.is_dir() => {}
            Ok(m) if !m.is_file() => not_files.push(path),
            _ => files.push(path),
        }
    }
    warn_not_files(root, &not_files);
    files.sort_by(|a, b| natural_cmp(&a.to_string_lossy(), &b.to_string_lossy()));
    Ok(files)
}

/// Logs the entries named like images that are not regular files (a FIFO,
/// a socket, a device), which are left out: reading one would block or
/// never end.
fn warn_not_files(dir: &Path, not_files: &[PathBuf]) {
    if let Some(first) = not_files.first() {
        tracing::warn!(
            folder = %dir.display(),
            first = %first.display(),
            "{} file(s) named like images are not regular files (FIFOs, sockets, devices): \
             left out, since reading one would block or never end",
            not_files.len()
        );
    }
}

/// Deepest folder nesting followed below a class folder (a guard against
/// symbolic-link cycles).
const MAX_DEPTH: usize = 16;

/// Collects the image files below `dir` into `out`, following folders and
/// links; entries named like images that are not files go to `not_files`,
/// hidden and system entries (folders, or files named like images) to
/// `left_out`.
fn collect_images_below(
    dir: &Path,
    out: &mut Vec<PathBuf>,
    not_files: &mut Vec<PathBuf>,
    left_out: &mut LeftOut,
    depth: usize,
) -> Result<(), DataError> {
    for entry in std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        let entry = entry.map_err(|e| DataError::io(dir, e))?;
        let path = entry.path();
        if is_hidden_or_system(&entry.file_name()) {
            // Files not named like images are ignored anyway: not counted.
            if has_image_extension(&path) || std::fs::metadata(&path).is_ok_and(|m| m.is_dir()) {
                left_out.add(path);
            }
            continue;
        }
        // Follow symbolic links (folders of links into a shared copy are
        // common); a dangling link counts as a file, which then fails to
        // decode and is handled like any undecodable image.
        let metadata = std::fs::metadata(&path);
        let is_dir = metadata.as_ref().is_ok_and(|m| m.is_dir());
        if is_dir {
            if depth >= MAX_DEPTH {
                return Err(DataError::Layout {
                    path: path.clone(),
                    problem: format!(
                        "folders nested deeper than {MAX_DEPTH} levels (a link cycle?)"
                    ),
                });
            }
            collect_images_below(&path, out, not_files, left_out, depth + 1)?;
        } else if has_image_extension(&path) {
            if metadata.is_ok_and(|m| !m.is_file()) {
                not_files.push(path);
            } else {
                out.push(path);
            }
        }
    }
    Ok(())
}

/// The bytes of the image file `path`, refused unread when it is larger than
/// [`crate::shards::MAX_MEMBER_BYTES`] (1 GiB: no JPEG or PNG within the
/// pixel limit is): a misnamed video or disk image would be read whole into
/// a loader thread's memory at every use, only to be refused by its decoder.
pub fn read_image_file(path: &Path) -> Result<Vec<u8>, DataError> {
    use std::io::Read;
    let limit = crate::shards::MAX_MEMBER_BYTES;
    let too_large = |bytes: u64| DataError::Format {
        path: path.to_path_buf(),
        problem: format!(
            "{bytes} bytes or more; an image file is at most {limit} bytes (no JPEG or PNG within \
             the pixel limit is larger): not read"
        ),
    };
    let file = rsb_files::open_regular_file(path).map_err(|e| DataError::io(path, e))?;
    let size = file.metadata().map_err(|e| DataError::io(path, e))?.len();
    if size > limit {
        return Err(too_large(size));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    // Taken up to one byte past the limit: a file that grew since is refused too.
    file.take(limit + 1).read_to_end(&mut bytes).map_err(|e| DataError::io(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// Whether `path` ends in one of [`IMAGE_EXTENSIONS`] (any case).
pub fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// timm's `natural_key` order: the text is split into digit and non-digit
/// runs; digit runs compare as numbers, the rest case-insensitively. Names
/// that key alike (`img01` and `img1`, `A.JPEG` and `a.jpeg`) are ordered
/// by their bytes: timm's stable sort leaves them in the order the file
/// system listed them, which differs between copies of a dataset, so that
/// hosts could map one sample index (or, for class folders, one label) to
/// different files.
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let ka = natural_key(a);
    let kb = natural_key(b);
    ka.cmp(&kb).then_with(|| a.cmp(b))
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
    fn an_image_file_past_the_size_limit_is_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.jpg");
        let file = std::fs::File::create(&path).unwrap();
        // Sparse: nothing is written, and nothing may be read.
        file.set_len(crate::shards::MAX_MEMBER_BYTES + 1).unwrap();
        let err = Sample::file(path.clone(), 0).read().unwrap_err().to_string();
        assert!(err.contains("huge.jpg") && err.contains("not read"), "{err}");
        file.set_len(3).unwrap();
        assert_eq!(Sample::file(path, 0).read().unwrap(), [0, 0, 0]);
    }

    #[test]
    fn names_that_key_alike_sort_the_same_in_any_listing_order() {
        for names in [["img1", "img01", "IMG1"], ["n01", "N01", "n1"]] {
            let mut orders: Vec<Vec<&str>> = Vec::new();
            for rotation in 0..names.len() {
                let mut listed = names.to_vec();
                listed.rotate_left(rotation);
                listed.sort_by(|a, b| natural_cmp(a, b));
                orders.push(listed);
            }
            assert!(orders.windows(2).all(|w| w[0] == w[1]), "{orders:?}");
        }
        assert_eq!(natural_cmp("img2", "IMG10"), Ordering::Less, "numbers still decide first");
    }

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

    #[test]
    fn tar_files_beside_class_folders_leave_the_folders_read() {
        let dir = tempfile::tempdir().unwrap();
        for class in ["n01", "n02"] {
            std::fs::create_dir_all(dir.path().join(class)).unwrap();
            std::fs::write(dir.path().join(class).join("a.JPEG"), b"").unwrap();
            // The class's archive, left where it was unpacked.
            std::fs::write(dir.path().join(format!("{class}.tar")), b"not read").unwrap();
        }
        let folder = ImageFolder::open_any(dir.path()).unwrap();
        assert_eq!(folder.classes(), &["n01".to_string(), "n02".to_string()]);
        assert_eq!(folder.len(), 2);
        // Nor does a download's partial file, with no .tar beside it.
        for class in ["n01", "n02"] {
            std::fs::remove_file(dir.path().join(format!("{class}.tar"))).unwrap();
        }
        std::fs::write(dir.path().join("n03.tar.tmp"), b"partial").unwrap();
        assert_eq!(ImageFolder::open_any(dir.path()).unwrap().len(), 2);
    }

    #[test]
    fn entries_named_like_images_that_are_not_files_are_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let class = dir.path().join("n01");
        std::fs::create_dir_all(class.join("deeper")).unwrap();
        std::fs::write(class.join("a.JPEG"), b"").unwrap();
        // Reading a FIFO blocks until a writer comes: for ever.
        for fifo in [class.join("pipe.JPEG"), class.join("deeper/pipe.jpg")] {
            let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
            assert!(made.success());
        }
        std::os::unix::fs::symlink("/dev/zero", class.join("zero.png")).unwrap();
        let folder = ImageFolder::open(dir.path()).unwrap();
        let names: Vec<String> = folder.samples().iter().map(|s| s.file_name()).collect();
        assert_eq!(names, vec!["a.JPEG"]);
        let flat = ImageFolder::open_unlabelled(&class).unwrap();
        let names: Vec<String> = flat.samples().iter().map(|s| s.file_name()).collect();
        assert_eq!(names, vec!["a.JPEG"]);
    }

    #[test]
    fn a_class_folder_name_that_is_not_utf8_is_named_as_such() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let class = dir.path().join(std::ffi::OsStr::from_bytes(b"n09\xff"));
        std::fs::create_dir_all(&class).unwrap();
        std::fs::write(class.join("a.JPEG"), b"").unwrap();
        let err = ImageFolder::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("n09") && err.contains("not UTF-8"), "{err}");
    }

    #[test]
    fn folders_without_images_beside_shards_leave_the_shards_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("lost+found")).unwrap();
        std::fs::create_dir_all(dir.path().join(".cache/x")).unwrap();
        // Not a tar archive: opening it as shards fails naming it, where
        // class folders would fail naming `.cache`.
        std::fs::write(dir.path().join("shard-000.tar"), b"not a tar").unwrap();
        let err = ImageFolder::open_any(dir.path()).unwrap_err().to_string();
        assert!(err.contains("shard-000.tar"), "{err}");
    }

    #[test]
    fn a_flat_folder_scores_each_labelled_image_once() {
        let dir = tempfile::tempdir().unwrap();
        let flat = dir.path().join("val");
        std::fs::create_dir_all(&flat).unwrap();
        let labels = dir.path().join("labels.txt");
        let open = |files: &[&str], entries: &str| {
            std::fs::remove_dir_all(&flat).unwrap();
            std::fs::create_dir_all(&flat).unwrap();
            for f in files {
                std::fs::write(flat.join(f), b"").unwrap();
            }
            std::fs::write(&labels, entries).unwrap();
            ImageFolder::open_flat(&flat, &labels, None)
        };
        // Matched by full name or by stem, each entry once.
        let folder = open(&["x.JPEG", "y.png"], "x\tn01\ny.png\tn02\n").unwrap();
        let labelled: Vec<(String, u32)> =
            folder.samples().iter().map(|s| (s.file_name(), s.label)).collect();
        assert_eq!(labelled, vec![("x.JPEG".into(), 0), ("y.png".into(), 1)]);
        // Two files sharing a stem claim one entry, while another entry has
        // no image: as many matches as entries, but one image scored twice.
        let err = open(&["x.JPEG", "x.png", "y.png"], "x\tn01\ny.png\tn02\nz\tn02\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`x.JPEG` and `x.png` both match the entry `x`")
                && err.contains("labels.txt"),
            "{err}"
        );
        // The same without the entry left over.
        let err = open(&["x.JPEG", "x.png"], "x\tn01\n").unwrap_err().to_string();
        assert!(err.contains("`x.JPEG` and `x.png` both match the entry `x`"), "{err}");
        // An entry no file matches is named.
        let err = open(&["x.JPEG"], "x\tn01\nz\tn02\n").unwrap_err().to_string();
        assert!(err.contains("labels `z`, which is not an image"), "{err}");
    }

    #[test]
    fn hidden_and_system_entries_are_neither_classes_nor_samples() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("train");
        let files = [
            "n01/a.JPEG",
            "n01/.ipynb_checkpoints/a-checkpoint.JPEG",
            "n01/@eaDir/a.JPEG/SYNOPHOTO_THUMB_M.jpg",
            "n01/._a.JPEG",
            "n01/.DS_Store",
            "n02/deeper/b.JPEG",
            "n02/deeper/.hidden/c.png",
            "@eaDir/n01/SYNOPHOTO_THUMB_S.jpg",
        ];
        for f in files {
            let path = root.join(f);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, b"").unwrap();
        }
        // An empty hidden folder at the split root is no empty class.
        std::fs::create_dir_all(root.join(".ipynb_checkpoints")).unwrap();
        let folder = ImageFolder::open(&root).unwrap();
        assert_eq!(folder.classes(), &["n01".to_string(), "n02".to_string()]);
        let samples: Vec<(String, u32)> =
            folder.samples().iter().map(|s| (s.file_name(), s.label)).collect();
        assert_eq!(samples, vec![("a.JPEG".into(), 0), ("b.JPEG".into(), 1)]);
        // Counted for the split's one warning: 2 root folders, 3 entries
        // below n01 (`.DS_Store` is no image: ignored anyway), 1 below n02.
        let mut left_out = LeftOut::default();
        let classes = class_folders(&root, &mut left_out).unwrap();
        for class in &classes {
            class_images(&root, class, &mut left_out).unwrap();
        }
        assert_eq!(left_out.count, 6);
        assert!(left_out.first.is_some_and(|p| p.starts_with(&root)));

        // ImageNet-V2's numbered folders and flat folders alike.
        for class in ["n01", "n02"] {
            std::fs::rename(root.join(class), root.join(&class[2..])).unwrap();
        }
        let numbered = ImageFolder::open_numbered(&root, 3).unwrap();
        assert_eq!(numbered.len(), 2);
        let flat = ImageFolder::open_unlabelled(&root.join("1")).unwrap();
        let names: Vec<String> = flat.samples().iter().map(|s| s.file_name()).collect();
        assert_eq!(names, vec!["a.JPEG"]);
    }
}
