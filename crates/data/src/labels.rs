//! Label files for flat image folders, and ImageNet-ReaL's label sets.
//!
//! A flat folder (ImageNet's `val/ILSVRC2012_val_00000001.JPEG` ...) is
//! labelled by one of two formats, chosen by the file name:
//!
//! * **`*.csv`: Kaggle's `LOC_val_solution.csv`** (header
//!   `ImageId,PredictionString`; each row `ILSVRC2012_val_00008726,n02119789
//!   255 142 454 329 ...`): the image is `ImageId` (a file stem) and its class
//!   is the first token of `PredictionString` (a synset);
//! * **anything else: one `file<TAB>class` line per image** (any run of
//!   spaces or tabs separates the two fields; blank lines and lines starting
//!   with `#` are ignored). `file` is a file name or stem in the folder;
//!   `class` is a class name (a synset) or a class index (digits only).
//!
//! Class names become indices through a given class list (the training
//! split's class folders) or, without one, through the natural-sorted set of
//! names in the file: for ImageNet's 1000 synsets that is timm's order.
//!
//! ImageNet-ReaL ([`RealLabels`]) is `real.json`: a JSON list of 50,000 lists
//! of class indices, entry `i` for `ILSVRC2012_val_{i+1:08d}.JPEG`; an empty
//! list excludes the image. [`Scoring`] scores predictions as timm's
//! `RealLabelsImagenet` does (by file name, so loader order is irrelevant).

use crate::dataset::{natural_cmp, Sample};
use crate::error::DataError;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A class as a label file writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClassRef {
    /// A class index.
    Index(u32),
    /// A class name (e.g. a synset), mapped through a class list.
    Name(String),
}

/// A parsed label file: (file name or stem, class) in file order, with the
/// line each entry came from.
#[derive(Debug, Clone)]
pub struct LabelFile {
    /// Where it was read from.
    pub path: PathBuf,
    /// The entries.
    pub entries: Vec<(String, ClassRef)>,
    lines: Vec<usize>,
}

/// Maps the [`ClassRef`]s of one label file to indices.
#[derive(Debug, Clone)]
pub struct ClassIndex {
    path: PathBuf,
    names: HashMap<String, u32>,
}

impl ClassIndex {
    /// The index of `class`; an unknown name is an error naming the file.
    pub fn get(&self, class: &ClassRef) -> Result<u32, DataError> {
        match class {
            ClassRef::Index(i) => Ok(*i),
            ClassRef::Name(n) => self.names.get(n).copied().ok_or_else(|| DataError::Format {
                path: self.path.clone(),
                problem: format!("class `{n}` is not one of the dataset's classes"),
            }),
        }
    }
}

impl LabelFile {
    /// Reads and parses `path` (format chosen by its extension).
    pub fn read(path: &Path) -> Result<LabelFile, DataError> {
        let text = rsb_files::read_regular_file(path).map_err(|e| DataError::io(path, e))?;
        LabelFile::parse(&text, path)
    }

    /// Parses label-file text; `path` decides the format and names errors.
    pub fn parse(text: &str, path: &Path) -> Result<LabelFile, DataError> {
        let csv = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv"));
        let bad = |line: usize, problem: String| DataError::Format {
            path: path.to_path_buf(),
            problem: format!("line {line}: {problem}"),
        };
        let mut entries = Vec::new();
        let mut lines = Vec::new();
        let mut header_seen = false;
        // A byte-order mark (a file saved by Notepad or Excel) is no part of
        // the first line, and would make its header or entry differ unseen.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let t = raw.trim();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            if csv {
                if !header_seen {
                    header_seen = true;
                    if !t.starts_with("ImageId,PredictionString") {
                        return Err(bad(
                            line,
                            format!("expected the header `ImageId,PredictionString`, got `{t}`"),
                        ));
                    }
                    continue;
                }
                let (id, prediction) = t.split_once(',').ok_or_else(|| {
                    bad(line, format!("expected `ImageId,PredictionString`, got `{t}`"))
                })?;
                let synset = prediction
                    .split_whitespace()
                    .next()
                    .ok_or_else(|| bad(line, format!("`{id}` has an empty PredictionString")))?;
                entries.push((id.trim().to_string(), ClassRef::Name(synset.to_string())));
            } else {
                let mut fields = t.split_whitespace();
                let (Some(name), Some(class), None) = (fields.next(), fields.next(), fields.next())
                else {
                    return Err(bad(line, format!("expected `<file> <class>`, got `{t}`")));
                };
                let class =
                    if class.bytes().all(|b| b.is_ascii_digit()) {
                        ClassRef::Index(class.parse().map_err(|_| {
                            bad(line, format!("class index `{class}` is too large"))
                        })?)
                    } else {
                        ClassRef::Name(class.to_string())
                    };
                entries.push((name.to_string(), class));
            }
            lines.push(line);
        }
        if entries.is_empty() {
            return Err(DataError::Format {
                path: path.to_path_buf(),
                problem: "no labels".into(),
            });
        }
        Ok(LabelFile { path: path.to_path_buf(), entries, lines })
    }

    /// The class list of the labelled set and the mapping of this file's
    /// classes to indices: through `classes` when given, else through the
    /// natural-sorted names of the file (no names: the classes stay unnamed).
    pub fn class_index(
        &self,
        classes: Option<&[String]>,
    ) -> Result<(Vec<String>, ClassIndex), DataError> {
        let names: BTreeSet<&str> = self
            .entries
            .iter()
            .filter_map(|(_, c)| match c {
                ClassRef::Name(n) => Some(n.as_str()),
                ClassRef::Index(_) => None,
            })
            .collect();
        let list: Vec<String> = match classes {
            Some(c) => c.to_vec(),
            None if names.is_empty() => Vec::new(),
            None => {
                if let Some(k) =
                    self.entries.iter().position(|(_, c)| matches!(c, ClassRef::Index(_)))
                {
                    return Err(DataError::Format {
                        path: self.path.clone(),
                        problem: format!(
                            "line {}: a class index among class names; without a class list \
                             the names cannot be ordered against the indices",
                            self.lines[k]
                        ),
                    });
                }
                let mut v: Vec<String> = names.iter().map(|s| s.to_string()).collect();
                v.sort_by(|a, b| natural_cmp(a, b));
                v
            }
        };
        let map = list.iter().enumerate().map(|(i, n)| (n.clone(), i as u32)).collect();
        Ok((list, ClassIndex { path: self.path.clone(), names: map }))
    }
}

/// ImageNet-ReaL label sets, by image file stem (`ILSVRC2012_val_00000001`).
#[derive(Debug, Clone)]
pub struct RealLabels {
    path: PathBuf,
    by_stem: HashMap<String, Vec<u32>>,
}

/// The stem of a file name: everything before the first `.` (WebDataset's
/// key rule; `ILSVRC2012_val_00000001.JPEG` -> `ILSVRC2012_val_00000001`).
pub fn stem_of(file_name: &str) -> &str {
    file_name.split('.').next().unwrap_or(file_name)
}

impl RealLabels {
    /// Reads `real.json` (a list of lists of class indices, entry `i` for
    /// `ILSVRC2012_val_{i+1:08d}.JPEG`).
    pub fn read(path: &Path) -> Result<RealLabels, DataError> {
        let text = rsb_files::read_regular_file(path).map_err(|e| DataError::io(path, e))?;
        let lists: Vec<Vec<u32>> = serde_json::from_str(&text).map_err(|e| DataError::Format {
            path: path.to_path_buf(),
            problem: format!(
                "expected real.json's list of lists of class indices (line {}, column {}): {e}",
                e.line(),
                e.column()
            ),
        })?;
        Ok(RealLabels::from_lists(path, lists))
    }

    /// Label sets given in ImageNet validation order.
    pub fn from_lists(path: &Path, lists: Vec<Vec<u32>>) -> RealLabels {
        let by_stem = lists
            .into_iter()
            .enumerate()
            .map(|(i, l)| (format!("ILSVRC2012_val_{:08}", i + 1), l))
            .collect();
        RealLabels { path: path.to_path_buf(), by_stem }
    }

    /// Number of images with an entry (including empty ones).
    pub fn len(&self) -> usize {
        self.by_stem.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.by_stem.is_empty()
    }

    /// The valid classes of an image, by file name or stem (`None`: unknown
    /// image; an empty slice: the image is excluded from ReaL accuracy).
    pub fn labels_of(&self, file_name: &str) -> Option<&[u32]> {
        self.by_stem.get(stem_of(file_name)).map(Vec::as_slice)
    }
}

/// What an evaluation counts: images scored, right top-1 and top-5
/// predictions, images left out and the summed loss. The one count type of
/// every evaluation (the validation split, ImageNet-V2, ReaL); counts of
/// shards (ranks, batches) add up with [`EvalCounts::merge`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EvalCounts {
    /// Images scored.
    pub count: u64,
    /// Images whose top prediction is right.
    pub top1: u64,
    /// Images with a right prediction among the top five.
    pub top5: u64,
    /// Images left out (ReaL: no valid label).
    pub excluded: u64,
    /// Sum of per-image cross-entropy (0 where the loss is not computed).
    pub loss_sum: f64,
}

impl EvalCounts {
    /// Top-1 accuracy in percent.
    pub fn top1_pct(&self) -> f64 {
        100.0 * self.top1 as f64 / self.count.max(1) as f64
    }

    /// Top-5 accuracy in percent.
    pub fn top5_pct(&self) -> f64 {
        100.0 * self.top5 as f64 / self.count.max(1) as f64
    }

    /// Mean cross-entropy over the scored images.
    pub fn mean_loss(&self) -> f64 {
        self.loss_sum / self.count.max(1) as f64
    }

    /// Whether no image was scored nor excluded: every image of the set
    /// failed to read or decode, and its accuracy would be a number of
    /// nothing (0%, with a mean loss of 0).
    pub fn scored_nothing(&self) -> bool {
        self.count + self.excluded == 0
    }

    /// Images of a set of `images` that these counts (of every rank) leave
    /// out because they could not be read or decoded: neither scored nor
    /// excluded.
    pub fn unread_of(&self, images: usize) -> u64 {
        (images as u64).saturating_sub(self.count + self.excluded)
    }

    /// Adds another shard's counts.
    pub fn merge(&mut self, other: &EvalCounts) {
        self.count += other.count;
        self.top1 += other.top1;
        self.top5 += other.top5;
        self.excluded += other.excluded;
        self.loss_sum += other.loss_sum;
    }

    /// The counts as floats, in a fixed order (for sums over ranks).
    pub fn to_array(&self) -> [f64; 5] {
        [self.count as f64, self.top1 as f64, self.top5 as f64, self.excluded as f64, self.loss_sum]
    }

    /// The counts of [`EvalCounts::to_array`] (whole numbers rounded).
    pub fn from_array(values: [f64; 5]) -> EvalCounts {
        EvalCounts {
            count: values[0].round() as u64,
            top1: values[1].round() as u64,
            top5: values[2].round() as u64,
            excluded: values[3].round() as u64,
            loss_sum: values[4],
        }
    }
}

/// How predictions are scored against an evaluation set.
#[derive(Debug, Clone)]
pub enum Scoring {
    /// Against each sample's own label (ImageNet val, ImageNet-V2).
    Labels,
    /// Against ImageNet-ReaL's label sets, looked up by file name.
    Real(Arc<RealLabels>),
}

impl Scoring {
    /// Checks before evaluating that every sample can be scored (ReaL: every
    /// image has an entry, and its labels are below `num_classes`, which a
    /// prediction could never match); the error names the first that cannot.
    /// A ReaL set none of whose images has a valid label is refused too: its
    /// accuracy would be of no image (timm's mean of nothing), not 0%.
    pub fn check(&self, samples: &[Sample], num_classes: usize) -> Result<(), DataError> {
        if let Scoring::Real(real) = self {
            let labelled = |sample: &Sample| {
                real.labels_of(&sample.file_name()).is_some_and(|labels| !labels.is_empty())
            };
            if !samples.is_empty() && !samples.iter().any(labelled) {
                let problem = format!(
                    "none of the {} images ({} first) has a valid ReaL label (each has an empty \
                     list): no image would be scored (ReaL leaves out only the images its raters \
                     could not label, about 1% of ImageNet's validation set)",
                    samples.len(),
                    samples[0].display()
                );
                return Err(DataError::Format { path: real.path.clone(), problem });
            }
            for sample in samples {
                let problem = match real.labels_of(&sample.file_name()) {
                    None => format!(
                        "no ReaL entry for {} (expected ImageNet validation names, \
                         ILSVRC2012_val_00000001 to ILSVRC2012_val_{:08})",
                        sample.display(),
                        real.len()
                    ),
                    Some(labels) => match labels.iter().find(|&&l| l as usize >= num_classes) {
                        Some(label) => format!(
                            "ReaL label {label} of {} is out of range for {num_classes} classes",
                            sample.display()
                        ),
                        None => continue,
                    },
                };
                return Err(DataError::Format { path: real.path.clone(), problem });
            }
        }
        Ok(())
    }

    /// Scores one image from its predictions (class indices, best first; five
    /// or fewer): timm's `accuracy` for labels, `RealLabelsImagenet` for ReaL
    /// (an image counts when any of its top-k predictions is a valid label).
    pub fn add(&self, score: &mut EvalCounts, sample: &Sample, predictions: &[i64]) {
        let top5 = &predictions[..predictions.len().min(5)];
        let (hit1, hit5) = match self {
            Scoring::Labels => {
                let l = i64::from(sample.label);
                (top5.first() == Some(&l), top5.contains(&l))
            }
            Scoring::Real(real) => match real.labels_of(&sample.file_name()) {
                Some(valid) if !valid.is_empty() => {
                    let ok = |p: &i64| valid.iter().any(|&v| i64::from(v) == *p);
                    (top5.first().is_some_and(ok), top5.iter().any(ok))
                }
                _ => {
                    score.excluded += 1;
                    return;
                }
            },
        };
        score.count += 1;
        score.top1 += u64::from(hit1);
        score.top5 += u64::from(hit5);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_labels_with_names_and_indices() {
        let f = LabelFile::parse(
            "# comment\nILSVRC2012_val_00000002.JPEG\tn015\n\nb.jpg  n002\n",
            Path::new("val.txt"),
        )
        .unwrap();
        assert_eq!(f.entries.len(), 2);
        let (classes, index) = f.class_index(None).unwrap();
        assert_eq!(classes, vec!["n002".to_string(), "n015".to_string()]);
        assert_eq!(index.get(&f.entries[0].1).unwrap(), 1);
        let (_, index) = f.class_index(Some(&["n015".into(), "n002".into()])).unwrap();
        assert_eq!(index.get(&f.entries[0].1).unwrap(), 0);
        let err = index.get(&ClassRef::Name("n999".into())).unwrap_err().to_string();
        assert!(err.contains("n999") && err.contains("val.txt"), "{err}");

        let f = LabelFile::parse("a.jpg 3\nb.jpg 0\n", Path::new("v.tsv")).unwrap();
        assert_eq!(f.class_index(None).unwrap().0, Vec::<String>::new());
        let err = LabelFile::parse("a.jpg 3\nb.jpg n01\n", Path::new("v.tsv"))
            .unwrap()
            .class_index(None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1"), "{err}");
        let err = LabelFile::parse("a.jpg\n", Path::new("v.tsv")).unwrap_err().to_string();
        assert!(err.contains("v.tsv") && err.contains("line 1"), "{err}");
    }

    #[test]
    fn kaggle_solution_csv() {
        let text = "ImageId,PredictionString\n\
                    ILSVRC2012_val_00008726,n02119789 255 142 454 329 n02119789 44 21 322 295\n\
                    ILSVRC2012_val_00000001,n01751748 111 0 499 333\n";
        let f = LabelFile::parse(text, Path::new("LOC_val_solution.csv")).unwrap();
        assert_eq!(
            f.entries[0],
            ("ILSVRC2012_val_00008726".into(), ClassRef::Name("n02119789".into()))
        );
        assert_eq!(f.class_index(None).unwrap().0, vec!["n01751748", "n02119789"]);
        let err = LabelFile::parse("Id,Label\nx,y\n", Path::new("s.csv")).unwrap_err().to_string();
        assert!(err.contains("line 1") && err.contains("ImageId"), "{err}");
        // Saved with a byte-order mark (Excel, Notepad): the same file.
        let marked = format!("\u{feff}{text}");
        let g = LabelFile::parse(&marked, Path::new("LOC_val_solution.csv")).unwrap();
        assert_eq!(g.entries, f.entries);
        let tsv = LabelFile::parse("\u{feff}a.jpg\t3\n", Path::new("v.tsv")).unwrap();
        assert_eq!(
            tsv.entries,
            LabelFile::parse("a.jpg\t3\n", Path::new("v.tsv")).unwrap().entries
        );
    }

    #[test]
    fn real_scoring_follows_timm() {
        let real = Arc::new(RealLabels::from_lists(
            Path::new("real.json"),
            vec![vec![3, 7], vec![], vec![1]],
        ));
        let scoring = Scoring::Real(real);
        let s = |i: usize| Sample::file(format!("val/ILSVRC2012_val_{:08}.JPEG", i + 1).into(), 0);
        let mut score = EvalCounts::default();
        scoring.add(&mut score, &s(0), &[7, 0, 1, 2, 4]); // top-1 hit
        scoring.add(&mut score, &s(1), &[7, 0, 1, 2, 4]); // excluded
        scoring.add(&mut score, &s(2), &[7, 0, 1, 2, 4]); // top-5 hit only
        assert_eq!(score, EvalCounts { count: 2, top1: 1, top5: 2, excluded: 1, loss_sum: 0.0 });
        let mut twice = score;
        twice.merge(&score);
        assert_eq!(EvalCounts::from_array(twice.to_array()), twice);
        assert_eq!((twice.count, twice.excluded), (4, 2));
        assert!(scoring.check(&[s(0), s(2)], 8).is_ok());
        // Some images without a valid label are left out; all of them is a
        // set that scores nothing.
        assert!(scoring.check(&[s(1), s(2)], 8).is_ok());
        let err = scoring.check(&[s(1), s(1)], 8).unwrap_err().to_string();
        assert!(
            err.contains("real.json")
                && err.contains("none of the 2 images")
                && err.contains("ILSVRC2012_val_00000002"),
            "{err}"
        );
        let err = scoring.check(&[s(5)], 8).unwrap_err().to_string();
        assert!(err.contains("ILSVRC2012_val_00000006"), "{err}");
        // A label no prediction of a 7-class model could match.
        let err = scoring.check(&[s(0), s(2)], 7).unwrap_err().to_string();
        assert!(
            err.contains("real.json")
                && err.contains("ReaL label 7")
                && err.contains("ILSVRC2012_val_00000001"),
            "{err}"
        );
    }
}
