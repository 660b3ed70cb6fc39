//! Sweeps: one recipe turned into many runs by `--seeds` and `--grid`, without
//! scheduling (the coordinator queues the cells; `rsb-report` reads them back).
//!
//! * `--seeds` ([`parse_seeds`]): a half-open range `A..B` (`0..100` is the
//!   100 seeds 0 to 99), one seed `7`, or a list `0,3,9`.
//! * `--grid key=v1,v2,...` ([`GridAxis::parse`]): one recipe field (a dotted
//!   `--set` key) and its values. Commas inside brackets or braces belong to
//!   the value, so `--grid augment.scale=[0.08,1.0],[0.35,1.0]` has two values.
//!   Several grids make a product; the seeds combine with it ([`expand`]).
//! * A cell ([`SweepCell`]) is one run: its grid values and its seed. Its
//!   recipe is the base recipe with the base `--set` overrides, then one
//!   `key=value` override per grid axis, then `seed=N`, all through the recipe
//!   crate's `--set` machinery ([`SweepCell::load`]), so a bad value is refused
//!   with the same message as on the command line.
//!
//! Cell ids are run-folder names: `seed-007` for a seed-only sweep, and
//! `optimizer.lamb.lr=0.008,seed-007` with grids (each axis `key=value` in
//! `--grid` order, then the seed; seeds zero-padded to at least three digits,
//! so ids sort in seed order). Characters other than ASCII letters, digits
//! and `._+-` in a key or value become `_`; two cells whose ids would then
//! collide are refused.
//!
//! A sweep folder `DIR` holds the manifest [`SWEEP_MANIFEST`] (a
//! [`SweepManifest`], written atomically) and one run folder per cell,
//! `DIR/runs/<id>/`, with the same files a `coordinator up` run folder has:
//! the resolved `recipe.yaml` and `metrics.jsonl` ([`SweepLayout`]).

use rsb_recipes::{Recipe, RecipeSource};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The manifest file of a sweep folder.
pub const SWEEP_MANIFEST: &str = "sweep.json";
/// The folder of a sweep's run folders.
pub const RUNS: &str = "runs";
/// The resolved recipe of a run folder.
pub const RUN_RECIPE: &str = "recipe.yaml";
/// The metrics records of a run folder.
pub const RUN_METRICS: &str = "metrics.jsonl";
/// The folder `coordinator report` writes into.
pub const REPORT: &str = "report";
/// How a run of the sweep ended ([`RunOutcome`]); absent while it has not.
pub const RUN_OUTCOME: &str = "outcome.json";
/// Version of the manifest format this build writes and reads.
pub const MANIFEST_FORMAT: u32 = 1;
/// The most cells one sweep may have (a typo like `0..1000000` is refused).
pub const MAX_CELLS: usize = 100_000;

/// Why a sweep argument, cell or manifest is refused.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// A bad `--seeds`.
    #[error("--seeds {arg}: {problem}")]
    Seeds {
        /// The argument as given.
        arg: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A bad `--grid`.
    #[error("--grid {arg}: {problem}")]
    Grid {
        /// The argument as given.
        arg: String,
        /// What is wrong with it.
        problem: String,
    },
    /// Two `--grid` options name the same key.
    #[error("--grid {key} is given twice; give all its values in one --grid {key}=v1,v2,...")]
    DuplicateAxis {
        /// The key.
        key: String,
    },
    /// No seed at all.
    #[error("a sweep needs at least one seed")]
    NoSeeds,
    /// Too many cells.
    #[error(
        "the sweep has {cells} cells (seeds x grid values), more than the limit of {MAX_CELLS}"
    )]
    TooManyCells {
        /// Cells asked for.
        cells: usize,
    },
    /// Two cells get the same id after the unsafe characters are replaced.
    #[error(
        "cells {first} and {second} get the same run id `{id}` (characters other than letters, \
         digits and `._+-` become `_`); rename one of the values"
    )]
    IdCollision {
        /// The id.
        id: String,
        /// One cell, as `key=value` pairs.
        first: String,
        /// The other.
        second: String,
    },
    /// A cell's recipe is refused.
    // `error` is shown in the message, not chained as a source, so `{:#}`
    // does not print it twice (as for `Io`).
    #[error("sweep cell {id}: {error}")]
    Recipe {
        /// The cell id.
        id: String,
        /// The recipe error (names the `--set` it came from).
        error: Box<rsb_recipes::ProcedureError>,
    },
    /// A file could not be read or written.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        error: std::io::Error,
    },
    /// A run of the sweep started with a recipe that differs from the one
    /// its cell resolves to now.
    #[error(
        "sweep run {id} was started with another recipe ({path}); these fields differ: {}. \
         Resume the sweep with the recipe file it was started with: a study pools its runs as \
         runs of one recipe",
        changed_fields(.changes)
    )]
    RecipeChanged {
        /// The run's id.
        id: String,
        /// Its `recipe.yaml`.
        path: PathBuf,
        /// The fields that differ.
        changes: Vec<crate::run_folder::FieldChange>,
    },
    /// A started run's `recipe.yaml` does not load.
    // `error` names the file and line.
    #[error("sweep run {id}: its recipe does not load: {error}")]
    RunRecipe {
        /// The run's id.
        id: String,
        /// Why.
        error: Box<rsb_recipes::RecipeError>,
    },
    /// The manifest is not a valid [`SweepManifest`].
    #[error("{path}: {message}")]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// The field and position that are wrong.
        message: String,
    },
}

/// `field (run A, now B), ...` for [`SweepError::RecipeChanged`].
fn changed_fields(changes: &[crate::run_folder::FieldChange]) -> String {
    let shown: Vec<String> = changes.iter().map(|c| c.describe("run")).collect();
    shown.join(", ")
}

/// Parses `--seeds`: `A..B` (half-open, `B > A`), one seed, or a comma list
/// of distinct seeds. The result keeps the order given.
pub fn parse_seeds(arg: &str) -> Result<Vec<u64>, SweepError> {
    let fail = |problem: String| SweepError::Seeds { arg: arg.to_owned(), problem };
    let number = |s: &str| {
        let s = s.trim();
        s.parse::<u64>().map_err(|_| {
            fail(format!("`{s}` is not a seed (a whole number from 0 to {})", u64::MAX))
        })
    };
    let text = arg.trim();
    if text.is_empty() {
        return Err(fail("empty; expected `A..B` (e.g. `0..100`), `N` or `a,b,c`".into()));
    }
    if let Some((start, end)) = text.split_once("..") {
        if end.starts_with('=') {
            return Err(fail("ranges are half-open: write `A..B` (`0..100` is 0 to 99)".into()));
        }
        let (start, end) = (number(start)?, number(end)?);
        if end <= start {
            return Err(fail(format!(
                "the range {start}..{end} is empty (half-open: `0..100` is 0 to 99)"
            )));
        }
        let count = end - start;
        if count > MAX_CELLS as u64 {
            return Err(fail(format!("{count} seeds, more than the limit of {MAX_CELLS}")));
        }
        return Ok((start..end).collect());
    }
    let mut seeds = Vec::new();
    for part in text.split(',') {
        let seed = number(part)?;
        if seeds.contains(&seed) {
            return Err(fail(format!("seed {seed} is listed twice")));
        }
        seeds.push(seed);
    }
    if seeds.len() > MAX_CELLS {
        return Err(fail(format!("{} seeds, more than the limit of {MAX_CELLS}", seeds.len())));
    }
    Ok(seeds)
}

/// One `--grid` axis: a recipe field and the values it takes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GridAxis {
    /// Dotted recipe key, as given to `--set` (`optimizer.lamb.lr`).
    pub key: String,
    /// The values, as given (YAML scalars or flow values), in order.
    pub values: Vec<String>,
}

impl GridAxis {
    /// Parses `key=v1,v2,...`: commas inside `[]`/`{}` or quotes are part
    /// of a value; values are trimmed, non-empty and distinct; the key is a
    /// dotted path without empty segments and is not `seed` (use `--seeds`).
    pub fn parse(arg: &str) -> Result<GridAxis, SweepError> {
        let fail = |problem: String| SweepError::Grid { arg: arg.to_owned(), problem };
        let Some((key, values)) = arg.split_once('=') else {
            return Err(fail(
                "expected `key=v1,v2,...` (e.g. `optimizer.lamb.lr=0.004,0.008`), found no `=`"
                    .into(),
            ));
        };
        let key = key.trim();
        if key.is_empty() {
            return Err(fail("the key before `=` is empty".into()));
        }
        if key.split('.').any(|s| s.trim().is_empty()) {
            return Err(fail(format!("the key `{key}` has an empty segment")));
        }
        let key: String = key.split('.').map(str::trim).collect::<Vec<_>>().join(".");
        if key == "seed" {
            return Err(fail("the seed is swept with --seeds, not --grid".into()));
        }
        let values = split_values(values).map_err(fail)?;
        let mut seen = Vec::new();
        for value in &values {
            if value.is_empty() {
                return Err(fail(
                    "a value is empty (two commas in a row, or one at an end)".into(),
                ));
            }
            if seen.contains(&value) {
                return Err(fail(format!("the value `{value}` is listed twice")));
            }
            seen.push(value);
        }
        Ok(GridAxis { key, values })
    }
}

impl std::str::FromStr for GridAxis {
    type Err = SweepError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        GridAxis::parse(s)
    }
}

/// Splits at the commas outside brackets, braces and quotes; trims each part.
fn split_values(text: &str) -> Result<Vec<String>, String> {
    let mut values = Vec::new();
    let mut depth: i64 = 0;
    let mut quote: Option<char> = None;
    let mut current = String::new();
    for c in text.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '[' | '{') => depth += 1,
            (None, ']' | '}') => {
                depth -= 1;
                if depth < 0 {
                    return Err(format!("unbalanced `{c}` in the values `{text}`"));
                }
            }
            (None, ',') if depth == 0 => {
                values.push(current.trim().to_owned());
                current.clear();
                continue;
            }
            (None, _) => {}
        }
        current.push(c);
    }
    if quote.is_some() || depth != 0 {
        return Err(format!("unclosed bracket or quote in the values `{text}`"));
    }
    values.push(current.trim().to_owned());
    Ok(values)
}

/// One grid value of a cell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Assignment {
    /// Dotted recipe key.
    pub key: String,
    /// Its value, as given.
    pub value: String,
}

impl Assignment {
    /// The `--set` override `key=value`.
    pub fn to_override(&self) -> String {
        format!("{}={}", self.key, self.value)
    }
}

/// One run of a sweep.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepCell {
    /// Run-folder name (see the module doc).
    pub id: String,
    /// The run's seed (the recipe's `seed`).
    pub seed: u64,
    /// One value per grid axis, in `--grid` order.
    pub assignments: Vec<Assignment>,
}

impl SweepCell {
    /// The overrides of this cell's recipe: `base` (the sweep's own `--set`),
    /// then each grid value, then `seed=N`.
    pub fn overrides(&self, base: &[String]) -> Vec<String> {
        let mut all = base.to_vec();
        all.extend(self.assignments.iter().map(Assignment::to_override));
        all.push(format!("seed={}", self.seed));
        all
    }

    /// This cell's recipe: `source` with [`SweepCell::overrides`], validated.
    pub fn load(&self, source: &RecipeSource, base: &[String]) -> Result<Recipe, SweepError> {
        source
            .load(&self.overrides(base))
            .map_err(|source| SweepError::Recipe { id: self.id.clone(), error: Box::new(source) })
    }

    /// The grid value of `key`, if the cell has one.
    pub fn value_of(&self, key: &str) -> Option<&str> {
        self.assignments.iter().find(|a| a.key == key).map(|a| a.value.as_str())
    }
}

/// `text` with every character outside ASCII letters, digits and `._+-`
/// replaced by `_` (what a cell id keeps of a key or value).
pub fn id_safe(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_ascii_alphanumeric() || "._+-".contains(c) { c } else { '_' })
        .collect()
}

/// The cells of `seeds` x the product of `grid` (first axis outermost, seeds
/// innermost), with their ids.
pub fn expand(seeds: &[u64], grid: &[GridAxis]) -> Result<Vec<SweepCell>, SweepError> {
    if seeds.is_empty() {
        return Err(SweepError::NoSeeds);
    }
    for (i, axis) in grid.iter().enumerate() {
        if grid[..i].iter().any(|a| a.key == axis.key) {
            return Err(SweepError::DuplicateAxis { key: axis.key.clone() });
        }
    }
    let cells = grid
        .iter()
        .try_fold(seeds.len(), |n, axis| n.checked_mul(axis.values.len()))
        .unwrap_or(usize::MAX);
    if cells > MAX_CELLS {
        return Err(SweepError::TooManyCells { cells });
    }
    let width = seeds.iter().max().map_or(1, |s| s.to_string().len()).max(3);
    if let Some(empty) = grid.iter().find(|axis| axis.values.is_empty()) {
        return Err(SweepError::Grid {
            arg: empty.key.clone(),
            problem: "no values (a grid axis needs at least one)".into(),
        });
    }
    let mut combos: Vec<Vec<Assignment>> = vec![Vec::new()];
    for axis in grid {
        combos = combos
            .into_iter()
            .flat_map(|combo| {
                axis.values.iter().map(move |value| {
                    let mut next = combo.clone();
                    next.push(Assignment { key: axis.key.clone(), value: value.clone() });
                    next
                })
            })
            .collect();
    }
    let mut out = Vec::with_capacity(cells);
    let mut ids: BTreeMap<String, usize> = BTreeMap::new();
    for combo in combos {
        for &seed in seeds {
            let mut parts: Vec<String> = combo
                .iter()
                .map(|a| format!("{}={}", id_safe(&a.key), id_safe(&a.value)))
                .collect();
            parts.push(format!("seed-{seed:0width$}"));
            let id = parts.join(",");
            let cell = SweepCell { id: id.clone(), seed, assignments: combo.clone() };
            if let Some(&other) = ids.get(&id) {
                let describe = |c: &SweepCell| {
                    let mut parts: Vec<String> =
                        c.assignments.iter().map(Assignment::to_override).collect();
                    parts.push(format!("seed {}", c.seed));
                    parts.join(" ")
                };
                return Err(SweepError::IdCollision {
                    id,
                    first: describe(&out[other]),
                    second: describe(&cell),
                });
            }
            ids.insert(id, out.len());
            out.push(cell);
        }
    }
    Ok(out)
}

/// `DIR/sweep.json`: what a sweep is, written before its first run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepManifest {
    /// [`MANIFEST_FORMAT`] of the writer.
    pub format: u32,
    /// The base recipe's `name`.
    pub recipe: String,
    /// Where the base recipe came from (`recipes/x.yaml`, or `procedure a2
    /// model resnet50`), for people reading the manifest.
    pub source: String,
    /// The sweep's own `--set` overrides, applied to every cell first.
    pub overrides: Vec<String>,
    /// The seeds, in the order given.
    pub seeds: Vec<u64>,
    /// The grid axes, in `--grid` order (empty: seeds only).
    pub grid: Vec<GridAxis>,
    /// Every run, in [`expand`] order.
    pub cells: Vec<SweepCell>,
}

impl SweepManifest {
    /// The manifest of `seeds` x `grid` over a base recipe.
    pub fn new(
        recipe: &str,
        source: &str,
        overrides: Vec<String>,
        seeds: Vec<u64>,
        grid: Vec<GridAxis>,
    ) -> Result<SweepManifest, SweepError> {
        let cells = expand(&seeds, &grid)?;
        Ok(SweepManifest {
            format: MANIFEST_FORMAT,
            recipe: recipe.to_owned(),
            source: source.to_owned(),
            overrides,
            seeds,
            grid,
            cells,
        })
    }

    /// The cell named `id`.
    pub fn cell(&self, id: &str) -> Option<&SweepCell> {
        self.cells.iter().find(|c| c.id == id)
    }

    /// Writes `DIR/sweep.json` atomically (a temporary file in `DIR`,
    /// fsynced, renamed over the old one). Returns its path.
    pub fn write(&self, dir: &Path) -> Result<PathBuf, SweepError> {
        write_json_atomically(self, &SweepLayout::new(dir).manifest())
    }

    /// Reads and checks `DIR/sweep.json`: known format, and cells that are
    /// exactly the [`expand`] of its seeds and grid.
    pub fn read(dir: &Path) -> Result<SweepManifest, SweepError> {
        let path = SweepLayout::new(dir).manifest();
        let text = rsb_files::read_regular_file(&path)
            .map_err(|source| SweepError::Io { path: path.clone(), error: source })?;
        let fail = |message: String| SweepError::Manifest { path: path.clone(), message };
        let mut de = serde_json::Deserializer::from_str(&text);
        let manifest: SweepManifest = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let inner = e.inner();
            fail(format!("line {}: {}: {}", inner.line(), e.path(), inner))
        })?;
        if manifest.format != MANIFEST_FORMAT {
            return Err(fail(format!(
                "format: {} is not the format this build reads ({MANIFEST_FORMAT})",
                manifest.format
            )));
        }
        let expected = expand(&manifest.seeds, &manifest.grid).map_err(|e| fail(e.to_string()))?;
        if expected != manifest.cells {
            return Err(fail(
                "cells: they are not the cells of its seeds and grid (edited by hand?)".into(),
            ));
        }
        Ok(manifest)
    }
}

/// Checks the recipe cell `id` resolves to now against the one its run
/// started with (`runs/<id>/recipe.yaml`, written as it started): a sweep
/// resumed with another recipe file, or one edited since, would otherwise
/// pool runs of two recipes in one study. A run that never started has
/// nothing to check; neither has a field a host sets (`data.loader_threads`).
pub fn check_started_run_recipe(
    layout: &SweepLayout,
    id: &str,
    now: &Recipe,
) -> Result<(), SweepError> {
    let path = layout.run_recipe(id);
    let text = match rsb_files::read_regular_file_if_present(&path) {
        Ok(Some(text)) => text,
        Ok(None) => return Ok(()),
        Err(error) => return Err(SweepError::Io { path, error }),
    };
    let started = rsb_recipes::load_str(&text, &path, &[])
        .map_err(|e| SweepError::RunRecipe { id: id.to_string(), error: Box::new(e) })?;
    let saved = crate::run_folder::recipe_value(&started);
    match crate::run_folder::check_resumed_recipe(&path, &saved, now, &[]) {
        Ok(_) => Ok(()),
        Err(crate::RunFolderError::RecipeChanged { changes, .. }) => {
            Err(SweepError::RecipeChanged { id: id.to_string(), path, changes })
        }
        Err(other) => Err(SweepError::Manifest { path, message: other.to_string() }),
    }
}

/// Writes `value` as pretty JSON to `path` atomically: a temporary file in
/// its folder (created if need be), fsynced, renamed over the old one.
/// Returns the path.
/// `value` as the sweep's JSON files hold it.
fn json_text(value: &impl Serialize) -> String {
    // Plain data (strings, numbers, lists): serialization cannot fail.
    serde_json::to_string_pretty(value).unwrap_or_default() + "\n"
}

fn write_json_atomically(value: &impl Serialize, path: &Path) -> Result<PathBuf, SweepError> {
    let text = json_text(value);
    rsb_files::write_atomically(path, text.as_bytes(), rsb_files::Readers::Everyone)
        .map_err(|source| SweepError::Io { path: path.to_path_buf(), error: source })?;
    Ok(path.to_path_buf())
}

/// The paths of a sweep folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SweepLayout {
    dir: PathBuf,
}

impl SweepLayout {
    /// The layout of the sweep folder `dir`.
    pub fn new(dir: &Path) -> SweepLayout {
        SweepLayout { dir: dir.to_path_buf() }
    }
    /// The sweep folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// `DIR/sweep.json`.
    pub fn manifest(&self) -> PathBuf {
        self.dir.join(SWEEP_MANIFEST)
    }
    /// `DIR/runs/<id>/`.
    pub fn run_dir(&self, id: &str) -> PathBuf {
        self.dir.join(RUNS).join(id)
    }
    /// `DIR/runs/<id>/recipe.yaml`.
    pub fn run_recipe(&self, id: &str) -> PathBuf {
        self.run_dir(id).join(RUN_RECIPE)
    }
    /// `DIR/runs/<id>/metrics.jsonl`.
    pub fn run_metrics(&self, id: &str) -> PathBuf {
        self.run_dir(id).join(RUN_METRICS)
    }
    /// `DIR/runs/<id>/outcome.json`.
    pub fn run_outcome(&self, id: &str) -> PathBuf {
        self.run_dir(id).join(RUN_OUTCOME)
    }
    /// `DIR/report/`.
    pub fn report_dir(&self) -> PathBuf {
        self.dir.join(REPORT)
    }
}

/// How a run ended, as the coordinator recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunEnd {
    /// Every rank finished.
    Finished,
    /// Its last attempt failed, with no retry left.
    Failed,
}

/// `DIR/runs/<id>/outcome.json`: written atomically by the coordinator when
/// a run ends for good. A run without it was interrupted (or never
/// started): `coordinator up --resume DIR` runs it again, as it does a
/// failed one; a finished one is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunOutcome {
    /// How it ended.
    pub end: RunEnd,
    /// Attempts made (a failed attempt is retried from the run's own last
    /// checkpoint), over every invocation of the sweep.
    pub attempts: u32,
    /// Why the last attempt failed (absent when none did).
    pub failure: Option<String>,
}

impl RunOutcome {
    /// Writes the outcome of run `id` atomically (temporary file, fsync,
    /// rename).
    pub fn write(&self, layout: &SweepLayout, id: &str) -> Result<PathBuf, SweepError> {
        write_json_atomically(self, &layout.run_outcome(id))
    }

    /// The file [`RunOutcome::write`] writes.
    pub fn to_json(&self) -> String {
        json_text(self)
    }

    /// The outcome of run `id`, `None` when it has none; a file that is
    /// not a valid outcome is an error naming it.
    pub fn read(layout: &SweepLayout, id: &str) -> Result<Option<RunOutcome>, SweepError> {
        let path = layout.run_outcome(id);
        let text = match rsb_files::read_regular_file_if_present(&path) {
            Ok(Some(text)) => text,
            Ok(None) => return Ok(None),
            Err(source) => return Err(SweepError::Io { path, error: source }),
        };
        let mut de = serde_json::Deserializer::from_str(&text);
        serde_path_to_error::deserialize(&mut de).map(Some).map_err(|e| {
            let inner = e.inner();
            SweepError::Manifest {
                path: path.clone(),
                message: format!("line {}: {}: {}", inner.line(), e.path(), inner),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn axis(arg: &str) -> GridAxis {
        GridAxis::parse(arg).unwrap()
    }

    #[test]
    fn run_outcomes_round_trip_and_bad_ones_are_named() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = SweepLayout::new(tmp.path());
        assert_eq!(RunOutcome::read(&layout, "seed-000").unwrap(), None);
        let outcome =
            RunOutcome { end: RunEnd::Failed, attempts: 3, failure: Some("rank 0 died".into()) };
        let path = outcome.write(&layout, "seed-000").unwrap();
        assert_eq!(path, layout.run_outcome("seed-000"));
        assert_eq!(RunOutcome::read(&layout, "seed-000").unwrap(), Some(outcome));
        std::fs::write(&path, "{\"end\": \"done\", \"attempts\": 1, \"failure\": null}").unwrap();
        let err = RunOutcome::read(&layout, "seed-000").unwrap_err().to_string();
        assert!(err.contains("outcome.json") && err.contains("end"), "{err}");
    }

    #[test]
    fn seeds_parse_as_range_number_or_list() {
        assert_eq!(parse_seeds("0..5").unwrap(), [0, 1, 2, 3, 4]);
        assert_eq!(parse_seeds(" 7 ").unwrap(), [7]);
        assert_eq!(parse_seeds("3, 1,9").unwrap(), [3, 1, 9]);
        assert_eq!(parse_seeds("0..100").unwrap().len(), 100);
    }

    #[test]
    fn bad_seeds_name_the_argument_and_the_problem() {
        for (arg, needle) in [
            ("5..5", "empty"),
            ("9..2", "empty"),
            ("0..=9", "half-open"),
            ("a..3", "`a` is not a seed"),
            ("1,2,1", "seed 1 is listed twice"),
            ("1,,2", "`` is not a seed"),
            ("", "empty"),
            ("-1", "`-1` is not a seed"),
            ("0..1000000", "limit"),
        ] {
            let err = parse_seeds(arg).unwrap_err().to_string();
            assert!(err.starts_with(&format!("--seeds {arg}:")), "{arg}: {err}");
            assert!(err.contains(needle), "{arg}: {err}");
        }
    }

    #[test]
    fn grid_values_keep_commas_inside_brackets() {
        let a = axis("augment.scale=[0.08, 1.0],[0.35,1.0]");
        assert_eq!(a.key, "augment.scale");
        assert_eq!(a.values, ["[0.08, 1.0]", "[0.35,1.0]"]);
        let b = axis(" optimizer.lamb.lr = 0.004, 0.008 ");
        assert_eq!(b.key, "optimizer.lamb.lr");
        assert_eq!(b.values, ["0.004", "0.008"]);
        assert_eq!(axis("loss={cross_entropy: {smoothing: 0.1}}").values.len(), 1);
        assert_eq!(axis("name='a,b',c").values, ["'a,b'", "c"]);
    }

    #[test]
    fn bad_grids_name_the_argument_and_the_problem() {
        for (arg, needle) in [
            ("lr", "no `=`"),
            ("=1,2", "key before `=` is empty"),
            ("a..b=1", "empty segment"),
            ("seed=1,2", "--seeds"),
            ("a.b=1,,2", "empty"),
            ("a.b=1,2,1", "`1` is listed twice"),
            ("a.b=[1,2", "unclosed"),
            ("a.b=1],2", "unbalanced"),
        ] {
            let err = GridAxis::parse(arg).unwrap_err().to_string();
            assert!(err.starts_with(&format!("--grid {arg}:")), "{arg}: {err}");
            assert!(err.contains(needle), "{arg}: {err}");
        }
    }

    #[test]
    fn seeds_and_grids_make_a_product_with_readable_ids() {
        let grid = [axis("optimizer.lamb.lr=0.004,0.008"), axis("mixup.mixup_alpha=0.1,0.2")];
        let cells = expand(&[0, 1], &grid).unwrap();
        assert_eq!(cells.len(), 8);
        assert_eq!(cells[0].id, "optimizer.lamb.lr=0.004,mixup.mixup_alpha=0.1,seed-000");
        assert_eq!(cells[1].id, "optimizer.lamb.lr=0.004,mixup.mixup_alpha=0.1,seed-001");
        assert_eq!(cells[2].id, "optimizer.lamb.lr=0.004,mixup.mixup_alpha=0.2,seed-000");
        assert_eq!(cells[7].value_of("optimizer.lamb.lr"), Some("0.008"));
        assert_eq!(cells[7].seed, 1);
        let seeds_only = expand(&[3, 1000], &[]).unwrap();
        assert_eq!(seeds_only[0].id, "seed-0003");
        assert_eq!(seeds_only[1].id, "seed-1000");
        assert_eq!(
            cells[5].overrides(&["eval.every_epochs=2".into()]),
            ["eval.every_epochs=2", "optimizer.lamb.lr=0.008", "mixup.mixup_alpha=0.1", "seed=1"]
        );
    }

    #[test]
    fn ids_are_filesystem_safe_and_collisions_are_refused() {
        let cells = expand(&[0], &[axis("augment.scale=[0.08,1.0],[0.35,1.0]")]).unwrap();
        assert_eq!(cells[0].id, "augment.scale=_0.08_1.0_,seed-000");
        let err = expand(&[0], &[axis("data.root=a/b,a b")]).unwrap_err();
        assert!(matches!(err, SweepError::IdCollision { .. }), "{err}");
        assert!(err.to_string().contains("data.root=a/b"), "{err}");
        let dup = expand(&[0], &[axis("a.b=1"), axis("a.b=2")]).unwrap_err();
        assert!(dup.to_string().contains("--grid a.b is given twice"), "{dup}");
        assert!(matches!(expand(&[], &[]), Err(SweepError::NoSeeds)));
        let wide: Vec<String> = (0..400).map(|v| v.to_string()).collect();
        let big = GridAxis { key: "a".into(), values: wide };
        let err = expand(&(0..300).collect::<Vec<_>>(), &[big]).unwrap_err();
        assert!(matches!(err, SweepError::TooManyCells { cells: 120_000 }), "{err}");
    }

    #[test]
    fn a_cell_recipe_goes_through_set() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../recipes/debug/resnet18_tiny_cpu.yaml");
        let source = RecipeSource::File(path);
        let cells = expand(&[42], &[axis("optimizer.lamb.lr=0.01")]).unwrap();
        let recipe = cells[0].load(&source, &[]).unwrap();
        assert_eq!(recipe.seed, 42);
        let rsb_recipes::OptimizerSection::Lamb(lamb) = &recipe.optimizer;
        assert_eq!(lamb.lr, 0.01);
        let bad = expand(&[0], &[axis("optimizer.lamb.lrr=1")]).unwrap();
        let err = bad[0].load(&source, &[]).unwrap_err().to_string();
        assert!(err.starts_with("sweep cell optimizer.lamb.lrr=1,seed-000:"), "{err}");
        assert!(err.contains("optimizer.lamb.lrr=1"), "{err}");
    }

    #[test]
    fn the_manifest_round_trips_and_refuses_edited_cells() {
        let tmp = tempfile::tempdir().unwrap();
        let manifest = SweepManifest::new(
            "tiny",
            "recipes/debug/resnet18_tiny_cpu.yaml",
            vec!["eval.every_epochs=1".into()],
            vec![0, 1, 2],
            vec![axis("optimizer.lamb.lr=0.004,0.008")],
        )
        .unwrap();
        let path = manifest.write(tmp.path()).unwrap();
        assert_eq!(path, tmp.path().join(SWEEP_MANIFEST));
        assert_eq!(SweepManifest::read(tmp.path()).unwrap(), manifest);
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file left behind");
        let layout = SweepLayout::new(tmp.path());
        assert_eq!(
            layout.run_metrics("seed-000"),
            tmp.path().join("runs").join("seed-000").join("metrics.jsonl")
        );

        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("0.008,seed-002\"", "0.008,seed-009\"")).unwrap();
        let err = SweepManifest::read(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("sweep.json") && err.contains("cells"), "{err}");
        std::fs::write(&path, text.replace("\"seeds\"", "\"seedz\"")).unwrap();
        let err = SweepManifest::read(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("sweep.json: line") && err.contains("seedz"), "{err}");
        // Edited by hand: a seed twice names both cells; an axis without values.
        let twice = text.replace("\"seeds\": [\n    0,\n    1,", "\"seeds\": [\n    0,\n    0,");
        assert_ne!(twice, text);
        std::fs::write(&path, twice).unwrap();
        let err = SweepManifest::read(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("optimizer.lamb.lr=0.004 seed 0 and"), "{err}");
        let empty =
            SweepManifest { grid: vec![GridAxis { key: "a".into(), values: vec![] }], ..manifest };
        std::fs::write(&path, json_text(&empty)).unwrap();
        let err = SweepManifest::read(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("sweep.json") && err.contains("--grid a: no values"), "{err}");
    }

    /// Makes `path` a FIFO (a reader that opened it would wait for a writer).
    fn fifo(path: &Path) {
        let _ = std::fs::remove_file(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let made = std::process::Command::new("mkfifo").arg(path).status().unwrap();
        assert!(made.success());
    }

    #[test]
    fn a_fifo_in_place_of_a_sweep_file_is_named_not_waited_on() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = SweepLayout::new(tmp.path());
        fifo(&layout.manifest());
        let err = SweepManifest::read(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("sweep.json") && err.contains("not a regular file"), "{err}");
        fifo(&layout.run_outcome("seed-000"));
        let err = RunOutcome::read(&layout, "seed-000").unwrap_err().to_string();
        assert!(err.contains("outcome.json") && err.contains("not a regular file"), "{err}");
        let recipe = tiny_cell_recipe(&[]);
        fifo(&layout.run_recipe("seed-000"));
        let err = check_started_run_recipe(&layout, "seed-000", &recipe).unwrap_err().to_string();
        assert!(err.contains("recipe.yaml") && err.contains("not a regular file"), "{err}");
    }

    /// Cell `seed-000`'s recipe: the tiny recipe with `sets`.
    fn tiny_cell_recipe(sets: &[String]) -> Recipe {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../recipes/debug/resnet18_tiny_cpu.yaml");
        expand(&[0], &[]).unwrap()[0].load(&RecipeSource::File(path), sets).unwrap()
    }

    #[test]
    fn a_started_run_is_resumed_only_with_the_recipe_it_started_with() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = SweepLayout::new(tmp.path());
        let recipe = tiny_cell_recipe(&[]);
        // Not started: nothing to compare.
        check_started_run_recipe(&layout, "seed-000", &recipe).unwrap();
        // Started with it, as the coordinator writes it.
        let path = layout.run_recipe("seed-000");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, rsb_recipes::to_yaml(&recipe)).unwrap();
        check_started_run_recipe(&layout, "seed-000", &recipe).unwrap();
        // A host's own setting is no difference.
        let threads = tiny_cell_recipe(&["data.loader_threads=7".into()]);
        check_started_run_recipe(&layout, "seed-000", &threads).unwrap();
        // Another learning rate is.
        let other = tiny_cell_recipe(&["optimizer.lamb.lr=0.5".into()]);
        let err = check_started_run_recipe(&layout, "seed-000", &other).unwrap_err();
        assert!(matches!(err, SweepError::RecipeChanged { .. }), "{err}");
        let err = err.to_string();
        assert!(
            err.starts_with("sweep run seed-000 was started with another recipe")
                && err.contains("optimizer.lamb.lr (run 0.005, now 0.5)")
                && err.contains("recipe.yaml"),
            "{err}"
        );
        // A recipe.yaml that does not load is named once, with its line.
        std::fs::write(&path, "name: x\nnot_a_field: 1\n").unwrap();
        let err = check_started_run_recipe(&layout, "seed-000", &recipe).unwrap_err().to_string();
        assert!(err.starts_with("sweep run seed-000: its recipe does not load:"), "{err}");
        assert_eq!(err.matches("recipe.yaml").count(), 1, "{err}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn a_range_is_its_half_open_interval(start in 0u64..u64::MAX - 2000, len in 1u64..2000) {
            let seeds = parse_seeds(&format!("{start}..{}", start + len)).unwrap();
            prop_assert_eq!(seeds, (start..start + len).collect::<Vec<_>>());
        }

        #[test]
        fn a_list_reads_back_in_order(set in proptest::collection::btree_set(any::<u64>(), 1..20)) {
            let list: Vec<u64> = set.into_iter().collect();
            let text = list.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
            prop_assert_eq!(parse_seeds(&text).unwrap(), list);
        }

        #[test]
        fn parsers_never_panic(text in "\\PC{0,40}") {
            let _ = parse_seeds(&text);
            let _ = GridAxis::parse(&text);
        }

        #[test]
        fn grid_values_round_trip(
            key in "[a-z]{1,6}(\\.[a-z_]{1,6}){0,2}",
            values in proptest::collection::btree_set("[0-9a-z.]{1,5}|\\[[0-9.]{1,3},[0-9.]{1,3}\\]", 1..6),
        ) {
            let values: Vec<String> = values.into_iter().collect();
            prop_assume!(key != "seed");
            let axis = GridAxis::parse(&format!("{key}={}", values.join(","))).unwrap();
            prop_assert_eq!(axis.key, key);
            prop_assert_eq!(axis.values, values);
        }

        #[test]
        fn ids_are_unique_and_safe(
            seeds in proptest::collection::btree_set(0u64..10_000, 1..5),
            values in proptest::collection::btree_set("[0-9]{1,3}", 1..4),
        ) {
            let seeds: Vec<u64> = seeds.into_iter().collect();
            let grid = [GridAxis { key: "a.b".into(), values: values.into_iter().collect() }];
            let cells = expand(&seeds, &grid).unwrap();
            prop_assert_eq!(cells.len(), seeds.len() * grid[0].values.len());
            let mut ids: Vec<&str> = cells.iter().map(|c| c.id.as_str()).collect();
            prop_assert!(ids.iter().all(|id| id.chars().all(|c| c.is_ascii_alphanumeric() || "._+-=,".contains(c))));
            ids.sort();
            ids.dedup();
            prop_assert_eq!(ids.len(), cells.len());
        }
    }
}
