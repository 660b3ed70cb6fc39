//! Table 3 of "ResNet strikes back" (`recipes/table3.csv`, embedded) and the
//! recipes it yields: any Table-3 architecture trained with the ResNet-50
//! procedure A1, A2 or A3, unchanged except for the model, its resolutions,
//! its per-GPU batch and its input normalisation.
//!
//! ```
//! use rsb_recipes::procedure::{procedure_recipe, Procedure};
//! let recipe = procedure_recipe(Procedure::A2, "efficientnet_b2", &[])?;
//! assert_eq!(recipe.name, "efficientnet_b2_a2");
//! assert_eq!((recipe.augment.input_size, recipe.eval.input_size), (260, 260));
//! // Table 3 trains EfficientNet-B2 on 8 GPUs: 2048 / 8 images per GPU.
//! assert_eq!((recipe.batch.global_size, recipe.batch.micro_size), (2048, 256));
//! # Ok::<(), rsb_recipes::procedure::ProcedureError>(())
//! ```
//!
//! The paper trains every architecture "without any hyper-parameter change":
//! the recipe is `recipes/resnet50_a{1,2,3}.yaml` with `model.name` set, the
//! training resolution (`augment.input_size`) and test resolution
//! (`eval.input_size`) taken from Table 3, and the test crop set to 0.95
//! (Table 1). The user's `--set` overrides come after, so they win.
//!
//! Two more values follow the architecture, as they did in the paper's runs:
//!
//! * `batch.micro_size`: the global batch (2048) stays, but timm splits it
//!   over the GPUs, and Table 3 gives each architecture its own "#GPU" (A1/A2
//!   and A3): `micro_size = global_size / #GPU`, from 1024 images per GPU for
//!   ResNet-18 (2 GPUs) to 64 for EfficientNet-B4 (32 GPUs). BN statistics and
//!   Mixup pairs are per micro-batch, as per GPU in timm, and a micro-batch is
//!   what one forward pass must hold. With 2 GPUs (ResNet-18/34) there are 2
//!   sampler streams for A1/A2's 3 repeats, so some copies of an image share
//!   a micro-batch, as they shared a GPU in timm's `RepeatAugSampler`.
//! * `data.mean` / `data.std`: timm's `train.py` normalises with the mean and
//!   std of the model's pretrained config, which is not ImageNet's for the
//!   ViTs ([`timm_normalization`]).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::OnceLock;

use crate::error::RecipeError;
use crate::schema::{Recipe, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD};

/// `recipes/table3.csv`, as compiled in.
pub const TABLE3_CSV: &str = include_str!("../table3.csv");

/// Where [`TABLE3_CSV`] lives in the repository (for error messages).
pub const TABLE3_PATH: &str = "recipes/table3.csv";

/// The columns of `recipes/table3.csv`, in order.
pub const TABLE3_COLUMNS: [&str; 10] = [
    "timm_name",
    "a1a2_train",
    "a1a2_test",
    "a3_train",
    "a3_test",
    "a1_top1",
    "a2_top1",
    "a3_top1",
    "a1a2_gpus",
    "a3_gpus",
];

/// The test crop fraction of every RSB procedure (the paper's Table 1).
pub const RSB_TEST_CROP_PCT: f64 = 0.95;

/// The global batch of every RSB procedure (the paper's Table 1), which
/// Table 3 splits over each architecture's GPUs: a GPU count of
/// `recipes/table3.csv` must divide it.
pub const RSB_GLOBAL_BATCH: u32 = 2048;

/// Per-channel input normalisation, `(x - mean) / std` for `x` in [0, 1]
/// (the recipe's `data.mean` and `data.std`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalization {
    /// Per-channel mean (RGB).
    pub mean: [f64; 3],
    /// Per-channel standard deviation (RGB).
    pub std: [f64; 3],
}

impl Normalization {
    /// timm's `IMAGENET_DEFAULT_MEAN` / `IMAGENET_DEFAULT_STD`: what the
    /// ResNet-50 recipes use.
    pub const IMAGENET: Normalization =
        Normalization { mean: IMAGENET_DEFAULT_MEAN, std: IMAGENET_DEFAULT_STD };

    /// timm's `IMAGENET_INCEPTION_MEAN` / `IMAGENET_INCEPTION_STD`: 0.5 for
    /// every channel, i.e. pixels mapped to [-1, 1].
    pub const INCEPTION: Normalization = Normalization { mean: [0.5; 3], std: [0.5; 3] };
}

/// The Table-3 models that timm normalises with other than ImageNet's mean
/// and std; every other one uses [`Normalization::IMAGENET`].
///
/// timm's `train.py` takes the mean and std from the model's default
/// pretrained config (`resolve_data_config`). In timm at the RSB release
/// (commit `93901e99`, v0.5.0, the code the paper used) and in timm 1.0.31
/// that is `IMAGENET_INCEPTION_*` for the three ViTs (`_cfg` of
/// `vision_transformer.py`, their default tags `augreg*_in21k_ft_in1k`) and
/// ImageNet's for the other 22 rows, with one exception: timm 1.0.31's
/// default tag of `efficientnet_b1`, `ra4_e3600_r240_in1k` (weights trained
/// after the paper), uses 0.5 too. The paper's EfficientNet-B1 was trained
/// with the v0.5.0 config, ImageNet's, so it is not listed here.
pub const NON_IMAGENET_NORMALIZATION: [(&str, Normalization); 3] = [
    ("vit_tiny_patch16_224", Normalization::INCEPTION),
    ("vit_small_patch16_224", Normalization::INCEPTION),
    ("vit_base_patch16_224", Normalization::INCEPTION),
];

/// The input normalisation timm trains `timm_name` with (see
/// [`NON_IMAGENET_NORMALIZATION`]).
pub fn timm_normalization(timm_name: &str) -> Normalization {
    NON_IMAGENET_NORMALIZATION
        .iter()
        .find(|(name, _)| *name == timm_name)
        .map_or(Normalization::IMAGENET, |(_, normalization)| *normalization)
}

/// One of the paper's three training procedures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Procedure {
    /// 600 epochs, BCE, LAMB; the best accuracy.
    A1,
    /// 300 epochs.
    A2,
    /// 100 epochs at a reduced training resolution.
    A3,
}

impl Procedure {
    /// The three procedures, in order.
    pub const ALL: [Procedure; 3] = [Procedure::A1, Procedure::A2, Procedure::A3];

    /// Lower-case name (`a2`), as written on the command line and in recipe names.
    pub fn as_str(self) -> &'static str {
        match self {
            Procedure::A1 => "a1",
            Procedure::A2 => "a2",
            Procedure::A3 => "a3",
        }
    }

    /// The ResNet-50 recipe of this procedure, as compiled in, and its path
    /// in the repository (for error messages).
    pub fn base_recipe(self) -> (&'static str, &'static str) {
        match self {
            Procedure::A1 => (include_str!("../resnet50_a1.yaml"), "recipes/resnet50_a1.yaml"),
            Procedure::A2 => (include_str!("../resnet50_a2.yaml"), "recipes/resnet50_a2.yaml"),
            Procedure::A3 => (include_str!("../resnet50_a3.yaml"), "recipes/resnet50_a3.yaml"),
        }
    }
}

impl fmt::Display for Procedure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Procedure {
    type Err = ProcedureError;

    /// `a1`, `a2` or `a3` (any case).
    fn from_str(s: &str) -> Result<Procedure, ProcedureError> {
        Procedure::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| ProcedureError::UnknownProcedure { name: s.to_owned() })
    }
}

/// One row of Table 3: an architecture's resolutions, the paper's accuracies
/// and the GPU counts the paper trained it on.
#[derive(Debug, Clone, PartialEq)]
pub struct Table3Row {
    /// timm's name of the architecture (`efficientnet_b2`).
    pub timm_name: String,
    /// A1 and A2 training resolution (square, pixels).
    pub a1a2_train: u32,
    /// A1 and A2 test resolution.
    pub a1a2_test: u32,
    /// A3 training resolution.
    pub a3_train: u32,
    /// A3 test resolution.
    pub a3_test: u32,
    /// The paper's ImageNet-1k val top-1 (%) after A1.
    pub a1_top1: f64,
    /// After A2.
    pub a2_top1: f64,
    /// After A3.
    pub a3_top1: f64,
    /// GPUs of the paper's A1 and A2 runs ("A1/A2 #GPU"); divides [`RSB_GLOBAL_BATCH`].
    pub a1a2_gpus: u32,
    /// GPUs of the paper's A3 run ("A3 #GPU"); divides [`RSB_GLOBAL_BATCH`].
    pub a3_gpus: u32,
}

impl Table3Row {
    /// `(train, test)` resolution of `procedure`.
    pub fn resolutions(&self, procedure: Procedure) -> (u32, u32) {
        match procedure {
            Procedure::A1 | Procedure::A2 => (self.a1a2_train, self.a1a2_test),
            Procedure::A3 => (self.a3_train, self.a3_test),
        }
    }

    /// The paper's top-1 (%) after `procedure`.
    pub fn top1(&self, procedure: Procedure) -> f64 {
        match procedure {
            Procedure::A1 => self.a1_top1,
            Procedure::A2 => self.a2_top1,
            Procedure::A3 => self.a3_top1,
        }
    }

    /// The number of GPUs the paper trained `procedure` on.
    pub fn gpus(&self, procedure: Procedure) -> u32 {
        match procedure {
            Procedure::A1 | Procedure::A2 => self.a1a2_gpus,
            Procedure::A3 => self.a3_gpus,
        }
    }

    /// The per-GPU batch of `procedure` for a global batch of `global_size`
    /// images: `global_size / gpus`; `None` when the GPUs do not split it
    /// evenly.
    pub fn micro_size(&self, procedure: Procedure, global_size: u32) -> Option<u32> {
        let gpus = self.gpus(procedure);
        (gpus > 0 && global_size.is_multiple_of(gpus)).then(|| global_size / gpus)
    }
}

/// A malformed line of a Table-3 CSV file.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}:{line}:{column}: {message}", source_name.display())]
pub struct Table3Error {
    /// The file (or a name for the text) being parsed.
    pub source_name: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based column (in characters) of the offending field.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

/// What can go wrong while resolving a recipe by procedure and model.
#[derive(Debug, thiserror::Error)]
pub enum ProcedureError {
    /// Not `a1`, `a2` or `a3`.
    #[error("unknown procedure `{name}`: expected a1, a2 or a3")]
    UnknownProcedure {
        /// The name given.
        name: String,
    },
    /// The recipe's global batch does not split evenly over the GPUs of the
    /// model's Table-3 row (only when `recipes/resnet50_*.yaml` no longer
    /// holds the global batch 2048 that the table was checked against).
    #[error(
        "Table 3 trains {model} with {procedure} on {gpus} GPUs, which do not split the \
         recipe's global batch of {global_size} images evenly"
    )]
    UnevenBatch {
        /// timm name of the model.
        model: String,
        /// The procedure.
        procedure: Procedure,
        /// Its Table-3 GPU count.
        gpus: u32,
        /// The recipe's `batch.global_size`.
        global_size: u32,
    },
    /// The model is not a row of Table 3.
    #[error("unknown model `{name}`: not in Table 3 ({TABLE3_PATH}); closest: {suggestions}")]
    UnknownModel {
        /// The name given.
        name: String,
        /// The closest timm names of Table 3, comma-separated.
        suggestions: String,
    },
    /// The embedded Table 3 does not parse (a broken build).
    #[error(transparent)]
    Table(#[from] Table3Error),
    /// Loading, overriding or validating the recipe failed.
    #[error(transparent)]
    Recipe(#[from] RecipeError),
    /// Neither or both of `--recipe` and `--procedure`/`--model`.
    #[error(transparent)]
    Args(#[from] RecipeArgsError),
}

/// Parses a Table-3 CSV: `#` comment lines and blank lines are skipped, the
/// first other line must be the header [`TABLE3_COLUMNS`], then one row per
/// architecture. `source_name` is only used in error messages.
pub fn parse_table3(text: &str, source_name: &Path) -> Result<Vec<Table3Row>, Table3Error> {
    let error = |line: usize, column: usize, message: String| Table3Error {
        source_name: source_name.to_owned(),
        line,
        column,
        message,
    };
    let mut rows: Vec<Table3Row> = Vec::new();
    let mut header_seen = false;
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        if raw.trim().is_empty() || raw.trim_start().starts_with('#') {
            continue;
        }
        // (1-based column where the field starts, the field trimmed)
        let mut fields: Vec<(usize, &str)> = Vec::new();
        let mut column = 1;
        for field in raw.split(',') {
            fields.push((column, field.trim()));
            column += field.chars().count() + 1;
        }
        if fields.len() != TABLE3_COLUMNS.len() {
            return Err(error(
                line,
                1,
                format!(
                    "expected {} comma-separated fields ({}), found {}",
                    TABLE3_COLUMNS.len(),
                    TABLE3_COLUMNS.join(","),
                    fields.len()
                ),
            ));
        }
        if !header_seen {
            for ((column, found), expected) in fields.iter().zip(TABLE3_COLUMNS) {
                if *found != expected {
                    return Err(error(
                        line,
                        *column,
                        format!("header: expected column `{expected}`, found `{found}`"),
                    ));
                }
            }
            header_seen = true;
            continue;
        }
        let name_of = |i: usize| TABLE3_COLUMNS.get(i).copied().unwrap_or("?");
        let resolution = |i: usize| -> Result<u32, Table3Error> {
            let (column, value) = fields.get(i).copied().unwrap_or((1, ""));
            match value.parse::<u32>() {
                Ok(v) if v > 0 => Ok(v),
                _ => Err(error(
                    line,
                    column,
                    format!(
                        "{}: expected a resolution in pixels (>= 1), found `{value}`",
                        name_of(i)
                    ),
                )),
            }
        };
        let accuracy = |i: usize| -> Result<f64, Table3Error> {
            let (column, value) = fields.get(i).copied().unwrap_or((1, ""));
            match value.parse::<f64>() {
                Ok(v) if (0.0..=100.0).contains(&v) => Ok(v),
                _ => Err(error(
                    line,
                    column,
                    format!("{}: expected a top-1 in [0, 100] (%), found `{value}`", name_of(i)),
                )),
            }
        };
        let gpu_count = |i: usize| -> Result<u32, Table3Error> {
            let (column, value) = fields.get(i).copied().unwrap_or((1, ""));
            match value.parse::<u32>() {
                Ok(v) if v > 0 && RSB_GLOBAL_BATCH.is_multiple_of(v) => Ok(v),
                Ok(v) if v > 0 => Err(error(
                    line,
                    column,
                    format!(
                        "{}: {v} GPUs do not split the global batch {RSB_GLOBAL_BATCH} evenly \
                         (remainder {})",
                        name_of(i),
                        RSB_GLOBAL_BATCH % v
                    ),
                )),
                _ => Err(error(
                    line,
                    column,
                    format!("{}: expected a GPU count (>= 1), found `{value}`", name_of(i)),
                )),
            }
        };
        let (name_column, timm_name) = fields.first().copied().unwrap_or((1, ""));
        let name_ok = !timm_name.is_empty()
            && timm_name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !name_ok {
            return Err(error(
                line,
                name_column,
                format!("timm_name: expected a timm name ([a-z0-9_]+), found `{timm_name}`"),
            ));
        }
        if rows.iter().any(|r| r.timm_name == timm_name) {
            return Err(error(line, name_column, format!("timm_name: `{timm_name}` repeated")));
        }
        rows.push(Table3Row {
            timm_name: timm_name.to_owned(),
            a1a2_train: resolution(1)?,
            a1a2_test: resolution(2)?,
            a3_train: resolution(3)?,
            a3_test: resolution(4)?,
            a1_top1: accuracy(5)?,
            a2_top1: accuracy(6)?,
            a3_top1: accuracy(7)?,
            a1a2_gpus: gpu_count(8)?,
            a3_gpus: gpu_count(9)?,
        });
    }
    if !header_seen {
        return Err(error(
            text.lines().count().max(1),
            1,
            format!("no header line ({})", TABLE3_COLUMNS.join(",")),
        ));
    }
    Ok(rows)
}

/// The rows of the embedded `recipes/table3.csv`, in the paper's order.
pub fn table3() -> Result<&'static [Table3Row], Table3Error> {
    static TABLE: OnceLock<Result<Vec<Table3Row>, Table3Error>> = OnceLock::new();
    TABLE
        .get_or_init(|| parse_table3(TABLE3_CSV, Path::new(TABLE3_PATH)))
        .as_ref()
        .map(Vec::as_slice)
        .map_err(Clone::clone)
}

/// The Table-3 row of `model`; an unknown name gets the closest ones.
pub fn table3_row(model: &str) -> Result<&'static Table3Row, ProcedureError> {
    let rows = table3()?;
    if let Some(row) = rows.iter().find(|r| r.timm_name == model) {
        return Ok(row);
    }
    let mut ranked: Vec<(usize, &str)> = rows
        .iter()
        .map(|r| (strsim::levenshtein(model, &r.timm_name), r.timm_name.as_str()))
        .collect();
    ranked.sort();
    let suggestions = ranked.iter().take(3).map(|(_, n)| *n).collect::<Vec<_>>().join(", ");
    Err(ProcedureError::UnknownModel { name: model.to_owned(), suggestions })
}

/// The overrides that turn the ResNet-50 recipe of a procedure, whose global
/// batch is `global_size`, into the one of `row`'s architecture: name,
/// model, train and test resolution, test crop, the per-GPU batch
/// `global_size / #GPU` of Table 3 as `batch.micro_size`, and, for a model
/// timm does not normalise with ImageNet's statistics, `data.mean` and
/// `data.std` ([`timm_normalization`]).
pub fn procedure_overrides(
    procedure: Procedure,
    row: &Table3Row,
    global_size: u32,
) -> Result<Vec<String>, ProcedureError> {
    let (train, test) = row.resolutions(procedure);
    let micro_size =
        row.micro_size(procedure, global_size).ok_or_else(|| ProcedureError::UnevenBatch {
            model: row.timm_name.clone(),
            procedure,
            gpus: row.gpus(procedure),
            global_size,
        })?;
    let mut overrides = vec![
        format!("name={}_{procedure}", row.timm_name),
        format!("model.name={}", row.timm_name),
        format!("augment.input_size={train}"),
        format!("eval.input_size={test}"),
        format!("eval.crop_pct={RSB_TEST_CROP_PCT}"),
        format!("batch.micro_size={micro_size}"),
    ];
    let normalization = timm_normalization(&row.timm_name);
    if normalization != Normalization::IMAGENET {
        let [m0, m1, m2] = normalization.mean;
        let [s0, s1, s2] = normalization.std;
        overrides.push(format!("data.mean=[{m0}, {m1}, {m2}]"));
        overrides.push(format!("data.std=[{s0}, {s1}, {s2}]"));
    }
    Ok(overrides)
}

/// The recipe of Table-3 architecture `model` trained with `procedure`:
/// `recipes/resnet50_<procedure>.yaml` with the model, its Table-3
/// resolutions, the test crop 0.95, its Table-3 per-GPU batch and timm's
/// normalisation of it filled in ([`procedure_overrides`]), named
/// `<model>_<procedure>` (`efficientnet_b2_a2`), then `overrides`
/// (`key=value`, as `--set`) applied, then validated. The per-GPU batch
/// splits the global batch of the procedure's file, not one set by
/// `overrides`: after a `--set batch.global_size`, the micro-batch stays
/// Table 3's unless `batch.micro_size` is set too.
pub fn procedure_recipe(
    procedure: Procedure,
    model: &str,
    overrides: &[String],
) -> Result<Recipe, ProcedureError> {
    let row = table3_row(model)?;
    let (source, path) = procedure.base_recipe();
    let base = crate::load_str(source, Path::new(path), &[])?;
    let mut all = procedure_overrides(procedure, row, base.batch.global_size)?;
    all.extend(overrides.iter().cloned());
    Ok(crate::load_str(source, Path::new(path), &all)?)
}

/// Where a command's recipe comes from: a file, or a procedure and a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecipeSource {
    /// A recipe YAML file.
    File(PathBuf),
    /// [`procedure_recipe`] of a Table-3 model.
    Procedure {
        /// A1, A2 or A3.
        procedure: Procedure,
        /// timm name of a Table-3 architecture.
        model: String,
    },
}

impl RecipeSource {
    /// Loads the recipe, applies `overrides` and validates.
    pub fn load(&self, overrides: &[String]) -> Result<Recipe, ProcedureError> {
        match self {
            RecipeSource::File(path) => Ok(crate::load(path, overrides)?),
            RecipeSource::Procedure { procedure, model } => {
                procedure_recipe(*procedure, model, overrides)
            }
        }
    }
}

impl fmt::Display for RecipeSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecipeSource::File(path) => write!(f, "{}", path.display()),
            RecipeSource::Procedure { procedure, model } => {
                write!(f, "procedure {procedure} with model {model}")
            }
        }
    }
}

/// The command-line flags that choose a recipe: `--recipe FILE`, or
/// `--procedure a1|a2|a3 --model NAME`; exactly one of the two forms.
#[derive(Debug, Clone, clap::Args)]
#[command(group(clap::ArgGroup::new("recipe_source").required(true).args(["recipe", "procedure"])))]
pub struct RecipeArgs {
    /// Recipe YAML file.
    #[arg(long)]
    pub recipe: Option<PathBuf>,
    /// Train a Table-3 model (`--model`) with the ResNet-50 procedure a1, a2
    /// or a3 at its Table-3 resolutions (instead of `--recipe`).
    #[arg(long, requires = "model", value_name = "a1|a2|a3")]
    pub procedure: Option<Procedure>,
    /// timm name of a Table-3 architecture, with `--procedure` (`worker models` lists them).
    #[arg(long, requires = "procedure", conflicts_with = "recipe", value_name = "NAME")]
    pub model: Option<String>,
}

impl RecipeArgs {
    /// The source the flags name. clap enforces exactly one form; a
    /// hand-built value with neither, or with both, is refused here.
    pub fn source(&self) -> Result<RecipeSource, RecipeArgsError> {
        match (&self.recipe, self.procedure, &self.model) {
            (Some(path), None, None) => Ok(RecipeSource::File(path.clone())),
            (None, Some(procedure), Some(model)) => {
                Ok(RecipeSource::Procedure { procedure, model: model.clone() })
            }
            _ => Err(RecipeArgsError),
        }
    }

    /// Loads the recipe the flags name, with `overrides` (`--set`) applied.
    pub fn load(&self, overrides: &[String]) -> Result<Recipe, ProcedureError> {
        self.source()?.load(overrides)
    }
}

/// [`RecipeArgs`] without exactly one of `--recipe` or `--procedure` + `--model`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("give either --recipe FILE or --procedure a1|a2|a3 --model NAME")]
pub struct RecipeArgsError;

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn sizes(recipe: &Recipe) -> (u32, u32, f64) {
        (recipe.augment.input_size, recipe.eval.input_size, recipe.eval.crop_pct)
    }

    #[test]
    fn embedded_table_has_the_25_architectures() {
        let rows = table3().unwrap();
        assert_eq!(rows.len(), 25);
        assert_eq!(rows[0].timm_name, "resnet18");
        assert_eq!(rows[24].timm_name, "ecaresnet269d");
        let v2s = table3_row("efficientnetv2_rw_s").unwrap();
        assert_eq!(v2s.resolutions(Procedure::A2), (288, 384));
        assert_eq!(v2s.resolutions(Procedure::A3), (224, 288));
        assert_eq!(v2s.top1(Procedure::A2), 82.9);
        assert_eq!((v2s.gpus(Procedure::A1), v2s.gpus(Procedure::A3)), (16, 16));
        let resnext = table3_row("resnext50_32x4d").unwrap();
        assert_eq!((resnext.gpus(Procedure::A2), resnext.gpus(Procedure::A3)), (8, 4));
    }

    #[test]
    fn procedure_recipe_takes_table_3_resolutions() {
        let a3 = procedure_recipe(Procedure::A3, "efficientnetv2_rw_s", &[]).unwrap();
        assert_eq!(sizes(&a3), (224, 288, 0.95));
        assert_eq!(a3.name, "efficientnetv2_rw_s_a3");
        assert_eq!(a3.model.name, "efficientnetv2_rw_s");
        let a2 = procedure_recipe(Procedure::A2, "efficientnetv2_rw_s", &[]).unwrap();
        assert_eq!(sizes(&a2), (288, 384, 0.95));
        let r50 = procedure_recipe(Procedure::A3, "resnet50", &[]).unwrap();
        assert_eq!(sizes(&r50), (160, 224, 0.95));
        let b2 = procedure_recipe(Procedure::A1, "efficientnet_b2", &[]).unwrap();
        assert_eq!(sizes(&b2), (260, 260, 0.95));
    }

    #[test]
    fn procedure_recipe_keeps_the_resnet50_hyper_parameters() {
        for procedure in Procedure::ALL {
            let (source, path) = procedure.base_recipe();
            let base = crate::load_str(source, Path::new(path), &[]).unwrap();
            // regnety_040 shares ResNet-50's resolutions, GPU count (4) and
            // normalisation: only the name and the model differ.
            let mut ours = procedure_recipe(procedure, "regnety_040", &[]).unwrap();
            assert_eq!(ours.model.name, "regnety_040");
            ours.name = base.name.clone();
            ours.model.name = base.model.name.clone();
            assert_eq!(ours, base, "{procedure}");
        }
    }

    #[test]
    fn every_row_and_procedure_validates_changing_only_what_table_3_and_timm_set() {
        let rows = table3().unwrap();
        for procedure in Procedure::ALL {
            let (source, path) = procedure.base_recipe();
            let base = crate::load_str(source, Path::new(path), &[]).unwrap();
            assert_eq!(base.batch.global_size, RSB_GLOBAL_BATCH, "{path}");
            for row in rows {
                let what = format!("{} {procedure}", row.timm_name);
                let mut ours = procedure_recipe(procedure, &row.timm_name, &[])
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_eq!(ours.name, format!("{}_{procedure}", row.timm_name));
                assert_eq!(ours.model.name, row.timm_name);
                let (train, test) = row.resolutions(procedure);
                assert_eq!(sizes(&ours), (train, test, RSB_TEST_CROP_PCT), "{what}");
                // The global batch stays; the paper's GPUs share it evenly.
                let gpus = row.gpus(procedure);
                assert_eq!(ours.batch.global_size, RSB_GLOBAL_BATCH, "{what}");
                assert_eq!(ours.batch.micro_size * gpus, RSB_GLOBAL_BATCH, "{what}");
                let normalization = timm_normalization(&row.timm_name);
                assert_eq!(
                    (ours.data.mean, ours.data.std),
                    (normalization.mean, normalization.std)
                );
                // Nothing else moves.
                ours.name = base.name.clone();
                ours.model.name = base.model.name.clone();
                ours.augment.input_size = base.augment.input_size;
                ours.eval.input_size = base.eval.input_size;
                ours.batch.micro_size = base.batch.micro_size;
                ours.data.mean = base.data.mean;
                ours.data.std = base.data.std;
                assert_eq!(ours, base, "{what}");
            }
        }
    }

    #[test]
    fn the_micro_batch_is_the_global_batch_over_table_3_gpus() {
        let micro = |procedure: Procedure, model: &str| {
            procedure_recipe(procedure, model, &[]).unwrap().batch.micro_size
        };
        // ResNet-18: 2 GPUs for A1/A2 and A3.
        assert_eq!(micro(Procedure::A1, "resnet18"), 1024);
        assert_eq!(micro(Procedure::A3, "resnet18"), 1024);
        // ResNet-50: 4 GPUs, the micro-batch of the recipe files.
        for procedure in Procedure::ALL {
            assert_eq!(micro(procedure, "resnet50"), 512, "{procedure}");
        }
        // EfficientNet-B4: 32 GPUs (20.4 GB per GPU at 64 images and 380 px).
        assert_eq!(micro(Procedure::A1, "efficientnet_b4"), 64);
        assert_eq!(micro(Procedure::A3, "efficientnet_b4"), 64);
        // ResNeXt-50: 8 GPUs for A1/A2, 4 for A3.
        assert_eq!(micro(Procedure::A2, "resnext50_32x4d"), 256);
        assert_eq!(micro(Procedure::A3, "resnext50_32x4d"), 512);
        // A --set still wins.
        let sets = ["batch.micro_size=128".to_string()];
        let r = procedure_recipe(Procedure::A1, "resnet18", &sets).unwrap();
        assert_eq!(r.batch.micro_size, 128);
    }

    #[test]
    fn a_global_batch_the_gpus_do_not_split_is_refused_naming_the_row() {
        let row = table3_row("resnet18").unwrap();
        assert_eq!(row.micro_size(Procedure::A2, 2048), Some(1024));
        assert_eq!(row.micro_size(Procedure::A2, 1001), None);
        let err = procedure_overrides(Procedure::A2, row, 1001).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Table 3 trains resnet18 with a2 on 2 GPUs, which do not split the recipe's \
             global batch of 1001 images evenly"
        );
    }

    #[test]
    fn vits_are_normalised_as_timm_does_and_the_rest_with_imagenet_statistics() {
        for procedure in Procedure::ALL {
            for model in ["vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224"] {
                let r = procedure_recipe(procedure, model, &[]).unwrap();
                assert_eq!(r.data.mean, [0.5, 0.5, 0.5], "{model} {procedure}");
                assert_eq!(r.data.std, [0.5, 0.5, 0.5], "{model} {procedure}");
            }
            // ImageNet's, as timm v0.5.0 (the paper's code) had it for every
            // other row, efficientnet_b1 included.
            for model in ["resnet50", "efficientnet_b1", "efficientnetv2_rw_m"] {
                let r = procedure_recipe(procedure, model, &[]).unwrap();
                assert_eq!(r.data.mean, [0.485, 0.456, 0.406], "{model} {procedure}");
                assert_eq!(r.data.std, [0.229, 0.224, 0.225], "{model} {procedure}");
            }
        }
        let sets = ["data.mean=[0.4, 0.4, 0.4]".to_string()];
        let r = procedure_recipe(Procedure::A2, "vit_base_patch16_224", &sets).unwrap();
        assert_eq!((r.data.mean, r.data.std), ([0.4; 3], [0.5; 3]), "a --set still wins");
    }

    #[test]
    fn every_non_imagenet_normalisation_names_a_table_3_row() {
        for (name, normalization) in NON_IMAGENET_NORMALIZATION {
            assert!(table3_row(name).is_ok(), "{name} is not a Table-3 row");
            assert_ne!(normalization, Normalization::IMAGENET, "{name}");
        }
        assert_eq!(timm_normalization("resnet50"), Normalization::IMAGENET);
    }

    #[test]
    fn overrides_apply_after_the_table() {
        let sets = ["eval.input_size=320".to_string(), "name=mine".to_string()];
        let r = procedure_recipe(Procedure::A2, "efficientnet_b2", &sets).unwrap();
        assert_eq!((r.augment.input_size, r.eval.input_size), (260, 320));
        assert_eq!(r.name, "mine");
        let bad = ["batch.micro_size=500".to_string()];
        let err = procedure_recipe(Procedure::A2, "efficientnet_b2", &bad).unwrap_err();
        assert!(
            err.to_string().starts_with("--set batch.micro_size=500: batch.micro_size"),
            "{err}"
        );
    }

    #[test]
    fn unknown_model_names_the_closest_ones() {
        let err = procedure_recipe(Procedure::A1, "efficientnet_b9", &[]).unwrap_err();
        assert!(matches!(err, ProcedureError::UnknownModel { .. }), "{err:?}");
        let message = err.to_string();
        assert!(message.contains("unknown model `efficientnet_b9`"), "{message}");
        assert!(message.contains("closest: efficientnet_b"), "{message}");
        let err = table3_row("resnet5").unwrap_err().to_string();
        assert!(err.contains("resnet50"), "{err}");
    }

    #[test]
    fn procedure_parses_any_case() {
        assert_eq!("a2".parse::<Procedure>().unwrap(), Procedure::A2);
        assert_eq!("A3".parse::<Procedure>().unwrap(), Procedure::A3);
        let err = "a4".parse::<Procedure>().unwrap_err().to_string();
        assert_eq!(err, "unknown procedure `a4`: expected a1, a2 or a3");
    }

    const HEADER: &str =
        "timm_name,a1a2_train,a1a2_test,a3_train,a3_test,a1_top1,a2_top1,a3_top1,a1a2_gpus,a3_gpus";

    fn parse_err(text: &str) -> String {
        parse_table3(text, Path::new("t.csv")).unwrap_err().to_string()
    }

    #[test]
    fn parse_errors_name_line_and_column() {
        let row = "resnet18,224,224,160,224,71.5,70.6,68.2,8,4";
        let ok = parse_table3(&format!("# c\n\n{HEADER}\n{row}\n"), Path::new("t.csv")).unwrap();
        assert_eq!(ok.len(), 1);
        assert_eq!(ok[0].a3_train, 160);
        assert_eq!((ok[0].a1a2_gpus, ok[0].a3_gpus), (8, 4));
        assert_eq!((ok[0].gpus(Procedure::A2), ok[0].gpus(Procedure::A3)), (8, 4));
        assert_eq!(
            parse_err(&format!("# c\n{HEADER}\nresnet18,224,22x,160,224,71.5,70.6,68.2,2,2\n")),
            "t.csv:3:14: a1a2_test: expected a resolution in pixels (>= 1), found `22x`"
        );
        assert_eq!(
            parse_err(&format!("{HEADER}\nresnet18,224,224,160,224,71.5,170.6,68.2,2,2\n")),
            "t.csv:2:31: a2_top1: expected a top-1 in [0, 100] (%), found `170.6`"
        );
        assert_eq!(
            parse_err(&format!("{HEADER}\nresnet18,224,224,160,224,71.5,70.6,68.2,two,2\n")),
            "t.csv:2:41: a1a2_gpus: expected a GPU count (>= 1), found `two`"
        );
        assert_eq!(
            parse_err(&format!("{HEADER}\nresnet18,224,224,160,224,71.5,70.6,68.2,2,0\n")),
            "t.csv:2:43: a3_gpus: expected a GPU count (>= 1), found `0`"
        );
        assert_eq!(
            parse_err(&format!("{HEADER}\nresnet18,224,224,160,224,71.5,70.6,68.2,3,2\n")),
            "t.csv:2:41: a1a2_gpus: 3 GPUs do not split the global batch 2048 evenly \
             (remainder 2)"
        );
        assert!(parse_err(&format!("{HEADER}\nresnet18,224,224\n"))
            .starts_with("t.csv:2:1: expected 10 comma-separated fields"));
        assert!(parse_err(&format!("{HEADER}\nresnet18,224,224,160,224,71.5,70.6,68.2\n"))
            .starts_with("t.csv:2:1: expected 10 comma-separated fields"));
        assert_eq!(
            parse_err(&HEADER.replace("a3_test", "a3_tst")),
            "t.csv:1:41: header: expected column `a3_test`, found `a3_tst`"
        );
        assert_eq!(
            parse_err(&format!("{HEADER}\n{row}\n{row}\n")),
            "t.csv:3:1: timm_name: `resnet18` repeated"
        );
        assert_eq!(
            parse_err(&format!("{HEADER}\nResNet-18,224,224,160,224,71.5,70.6,68.2,2,2\n")),
            "t.csv:2:1: timm_name: expected a timm name ([a-z0-9_]+), found `ResNet-18`"
        );
        assert!(parse_err("# only a comment\n").contains("no header line"));
    }

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        recipe: RecipeArgs,
    }

    #[test]
    fn recipe_flags_take_exactly_one_form() {
        let parse = |args: &[&str]| Cli::try_parse_from(["x"].iter().chain(args));
        let file = parse(&["--recipe", "r.yaml"]).unwrap().recipe.source().unwrap();
        assert_eq!(file, RecipeSource::File("r.yaml".into()));
        let by_procedure = parse(&["--procedure", "a2", "--model", "efficientnet_b2"]).unwrap();
        assert_eq!(
            by_procedure.recipe.source().unwrap(),
            RecipeSource::Procedure { procedure: Procedure::A2, model: "efficientnet_b2".into() }
        );
        assert!(parse(&[]).is_err());
        assert!(parse(&["--recipe", "r.yaml", "--procedure", "a1", "--model", "resnet50"]).is_err());
        assert!(parse(&["--recipe", "r.yaml", "--model", "resnet50"]).is_err());
        assert!(parse(&["--procedure", "a1"]).is_err());
        assert!(parse(&["--model", "resnet50"]).is_err());
        let bad = parse(&["--procedure", "b1", "--model", "resnet50"]).unwrap_err().to_string();
        assert!(bad.contains("unknown procedure `b1`"), "{bad}");
    }
}
