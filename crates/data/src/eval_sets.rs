//! Evaluation sets beyond the validation split: ImageNet val in any layout,
//! ImageNet-V2, ImageNet-ReaL, each built from a [`EvalSetSpec`] into data
//! plus the way its predictions are scored ([`Scoring`]).

use crate::dataset::ImageFolder;
use crate::error::DataError;
use crate::labels::{RealLabels, Scoring};
use crate::pipeline::EvalData;
use crate::transforms::EvalTransform;
use std::path::PathBuf;
use std::sync::Arc;

/// The layout and scoring of an evaluation set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvalSetKind {
    /// Class folders in natural order (ImageNet `val/<synset>/`), or tar shards.
    Folder,
    /// Class folders named by class index (ImageNet-V2's `0`..`999`).
    V2,
    /// A flat folder with a label file (`labels`, see [`crate::labels`]).
    Labelled,
    /// ImageNet-ReaL: ImageNet val images (flat, class folders or shards)
    /// scored against `real.json` (`labels`).
    Real,
}

/// Where an evaluation set is and how to read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvalSetSpec {
    /// Name in reports (`real`, `v2`, ...).
    pub name: String,
    /// Layout and scoring.
    pub kind: EvalSetKind,
    /// The images.
    pub root: PathBuf,
    /// Label file (`Labelled`) or `real.json` (`Real`).
    pub labels: Option<PathBuf>,
}

/// An opened evaluation set.
#[derive(Debug, Clone)]
pub struct EvalSet {
    /// Name in reports.
    pub name: String,
    /// Batches of the set.
    pub data: Arc<EvalData>,
    /// How predictions are scored.
    pub scoring: Scoring,
}

impl EvalSet {
    /// Opens the set: indexes the images, reads the labels, and checks that
    /// every image can be scored with a model of `num_classes` outputs.
    /// `train_classes` maps class names of label files to indices, and a
    /// class-folder set must name the same classes in the same order.
    pub fn open(
        spec: &EvalSetSpec,
        transform: EvalTransform,
        batch_size: usize,
        num_classes: usize,
        train_classes: Option<&[String]>,
    ) -> Result<EvalSet, DataError> {
        let labels = || {
            spec.labels.clone().ok_or_else(|| {
                DataError::Config(format!("eval set `{}` needs a `labels` file", spec.name))
            })
        };
        let (folder, scoring) = match spec.kind {
            EvalSetKind::Folder => {
                let folder = ImageFolder::open_any(&spec.root)?;
                if let Some(train_classes) = train_classes {
                    folder
                        .check_same_classes(train_classes)
                        .map_err(|e| DataError::Config(format!("eval set `{}`: {e}", spec.name)))?;
                }
                (folder, Scoring::Labels)
            }
            EvalSetKind::V2 => {
                (ImageFolder::open_numbered(&spec.root, num_classes)?, Scoring::Labels)
            }
            EvalSetKind::Labelled => {
                (ImageFolder::open_flat(&spec.root, &labels()?, train_classes)?, Scoring::Labels)
            }
            EvalSetKind::Real => {
                let real = RealLabels::read(&labels()?)?;
                // Shards or class folders as a training split is read
                // (`ImageFolder::open_any`), else one flat folder.
                let entries = crate::shards::list_folder(&spec.root)?;
                let folder = if !entries.shards.is_empty() || has_class_folders(&spec.root)? {
                    ImageFolder::open_listed(&spec.root, entries)?
                } else {
                    ImageFolder::open_unlabelled(&spec.root)?
                };
                (folder, Scoring::Real(Arc::new(real)))
            }
        };
        if matches!(scoring, Scoring::Labels) {
            folder
                .check_labels(num_classes)
                .map_err(|e| DataError::Config(format!("eval set `{}`: {e}", spec.name)))?;
        }
        scoring
            .check(folder.samples(), num_classes)
            .map_err(|e| DataError::Config(format!("eval set `{}`: {e}", spec.name)))?;
        Ok(EvalSet {
            name: spec.name.clone(),
            data: Arc::new(EvalData::new(folder, transform, batch_size)),
            scoring,
        })
    }
}

/// Whether `root` holds a folder that may be a class folder (hidden and
/// system folders, such as `.ipynb_checkpoints`, are not).
fn has_class_folders(root: &std::path::Path) -> Result<bool, DataError> {
    for entry in std::fs::read_dir(root).map_err(|e| DataError::io(root, e))? {
        let entry = entry.map_err(|e| DataError::io(root, e))?;
        if crate::dataset::is_hidden_or_system(&entry.file_name()) {
            continue;
        }
        if std::fs::metadata(entry.path()).is_ok_and(|m| m.is_dir()) {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::Filter;

    #[test]
    fn a_flat_real_folder_with_a_hidden_folder_is_read_flat() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("val");
        std::fs::create_dir_all(root.join(".ipynb_checkpoints")).unwrap();
        for name in ["ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000002.JPEG"] {
            std::fs::write(root.join(name), b"").unwrap();
        }
        let copy = ".ipynb_checkpoints/ILSVRC2012_val_00000001-checkpoint.JPEG";
        std::fs::write(root.join(copy), b"").unwrap();
        let labels = dir.path().join("real.json");
        std::fs::write(&labels, "[[1], [2]]").unwrap();
        let spec = EvalSetSpec {
            name: "real".into(),
            kind: EvalSetKind::Real,
            root: root.clone(),
            labels: Some(labels),
        };
        let transform = EvalTransform::new(32, 0.95, Filter::Bicubic);
        let set = EvalSet::open(&spec, transform, 2, 3, None).unwrap();
        assert_eq!(set.data.num_batches(), 1);
        assert_eq!(set.data.folder().len(), 2);
    }
}
