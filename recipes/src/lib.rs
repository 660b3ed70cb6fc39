//! Training recipes: a strict serde schema ([`schema`]), loaded from YAML with
//! `--set key=value` overrides, validated, and written back as YAML.
//!
//! ```no_run
//! use std::path::Path;
//! let recipe = rsb_recipes::load(
//!     Path::new("recipes/resnet50_a1.yaml"),
//!     &["data.root=/mnt/imagenet".to_string()],
//! )?;
//! std::fs::write("runs/a1/recipe.yaml", rsb_recipes::to_yaml(&recipe))?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Errors name the field and where its value was written:
//!
//! ```text
//! recipes/x.yaml:33:5: optimizer.lamb: unknown field `lrr`, expected one of `lr`, ...
//! --set batch.micro_size=500: batch.micro_size: must divide batch.global_size (2048), got 500 (remainder 48)
//! ```
//!
//! Enum sections (`loss`, `optimizer`, `schedule`) are written as single-key
//! mappings (`optimizer: {lamb: {...}}`). serde_norway alone expects YAML tags
//! (`!lamb`) there, so always go through [`load`] / [`load_str`] / [`to_yaml`]
//! rather than calling `serde_norway::from_str::<Recipe>` directly.

#![warn(missing_docs)]
#![warn(clippy::unwrap_used)]

pub mod error;
mod locate;
mod overrides;
pub mod procedure;
pub mod rand_augment;
pub mod schema;
mod validate;

use std::path::Path;

use serde::de::DeserializeOwned;
use serde_norway::with::singleton_map_recursive;
use serde_norway::Value;

pub use error::{Location, Origin, RecipeError};
pub use procedure::{
    procedure_recipe, table3, table3_row, Procedure, ProcedureError, RecipeArgs, RecipeSource,
    Table3Row,
};
pub use schema::*;
pub use validate::{
    eval_resize_problem, validate, MAX_CLASSES, MAX_EPOCHS, MAX_EVAL_ASPECT, MAX_EVAL_RESIZE_SIDE,
    MAX_EVAL_SETS, MAX_EVAL_SET_NAME_LEN, MAX_THREADS,
};

use overrides::Override;

/// Reads the recipe at `path`, applies `overrides` (each `key=value`, as
/// given to `--set`), deserializes strictly and validates.
pub fn load(path: &Path, overrides: &[String]) -> Result<Recipe, RecipeError> {
    let source = std::fs::read_to_string(path)
        .map_err(|source| RecipeError::Io { path: path.to_owned(), source })?;
    load_str(&source, path, overrides)
}

/// As [`load`], from YAML text; `path` is only used in error messages.
///
/// The file alone is parsed first, so its own errors keep their line numbers.
/// Then the overrides are applied to the YAML tree, in order; an error that
/// appears only after them names the `--set` that caused it. Overrides may
/// also complete a file that lacks a required field.
pub fn load_str(source: &str, path: &Path, overrides: &[String]) -> Result<Recipe, RecipeError> {
    let tree: Value = serde_norway::from_str(source).map_err(|e| {
        let e = DeError::from_norway(Vec::new(), e);
        // The parser places a duplicate key at its mapping's start: name the
        // key and place it where it is given again.
        // Only where the key found is the one the parser names (the finder
        // compares keys as text, the parser as values: `1` and "1" differ).
        let named = e.message.split_once("duplicate entry with key ").map(|(_, key)| {
            key.strip_prefix('"').and_then(|k| k.strip_suffix('"')).unwrap_or(key).to_owned()
        });
        let duplicate = named.and_then(|key| {
            let (field, at) = locate::locate_duplicate_key(source)?;
            let last = field.rsplit('.').next().unwrap_or(&field);
            (last == key).then_some((field, at))
        });
        if let Some((field, at)) = duplicate {
            let first = locate::locate(source, &field)
                .map_or_else(String::new, |l| format!(" (first at line {})", l.line));
            return RecipeError::Yaml {
                path: path.to_owned(),
                location: Some(at),
                message: format!("{field}: given twice in one mapping{first}"),
            };
        }
        RecipeError::Yaml { path: path.to_owned(), location: e.location, message: e.message }
    })?;
    let from_file = deserialize::<Recipe, _>(serde_norway::Deserializer::from_str(source));
    let schema_error = |e: DeError| RecipeError::Schema {
        path: path.to_owned(),
        location: e.location,
        field: e.field(),
        message: e.message,
    };

    let overrides = overrides.iter().map(|s| Override::parse(s)).collect::<Result<Vec<_>, _>>()?;
    // What each override wrote, elements named by index: a validation
    // error's field is compared with its key.
    let mut applied = Vec::with_capacity(overrides.len());
    let recipe = if overrides.is_empty() {
        from_file.map_err(schema_error)?
    } else {
        let mut merged = tree.clone();
        for o in &overrides {
            applied.push(o.apply(&mut merged)?);
        }
        match deserialize::<Recipe, _>(merged) {
            Ok(recipe) => recipe,
            Err(e) => {
                let blame = match &from_file {
                    Ok(_) => blame_transition(&tree, &overrides),
                    Err(_) => overrides.iter().rev().find(|o| o.touches(&e.field())),
                };
                return Err(match (blame, from_file) {
                    (Some(o), _) => RecipeError::OverrideSchema {
                        set: o.raw.clone(),
                        field: e.field(),
                        message: e.message,
                    },
                    // The file's own error, still there: keep its position.
                    (None, Err(file_error))
                        if file_error.path == e.path && file_error.message == e.message =>
                    {
                        schema_error(file_error)
                    }
                    // The overrides fixed the file's first error but another
                    // one, which they did not touch, remains.
                    (None, Err(_)) => RecipeError::Schema {
                        path: path.to_owned(),
                        location: locate::locate(source, &e.field()),
                        field: e.field(),
                        message: e.message,
                    },
                    // Unreachable in practice (the file parsed and the merge did
                    // not, so some override made it fail); blame the last one.
                    (None, Ok(_)) => RecipeError::OverrideSchema {
                        set: overrides.last().map(|o| o.raw.clone()).unwrap_or_default(),
                        field: e.field(),
                        message: e.message,
                    },
                });
            }
        }
    };

    // Compared by what they wrote, not their keys as given: an element
    // named, or moved down by a later removal, has the index validation
    // names it by, and a removal names no element left.
    let written_keys = overrides::keys_written(&applied);
    validate::check(&recipe).map_err(|v| {
        let blamed = |field: &str| {
            overrides.iter().zip(&written_keys).rev().find_map(|(o, written)| {
                written.as_ref().is_some_and(|k| overrides::key_touches(k, field)).then_some(o)
            })
        };
        let origin = blamed(&v.field)
            .or_else(|| blamed(v.related.as_deref()?))
            .map(|o| Origin::Override { set: o.raw.clone() })
            .unwrap_or_else(|| Origin::File {
                path: path.to_owned(),
                location: locate::locate(source, &overrides::field_in_file(&v.field, &applied)),
            });
        v.into_error(origin)
    })?;
    Ok(recipe)
}

/// The recipe as YAML, every field written out (defaults included), enum
/// sections as single-key mappings. [`load_str`] of the result gives back an
/// equal recipe (for any recipe that passes [`validate`]: NaN is not equal to
/// itself).
pub fn to_yaml(recipe: &Recipe) -> String {
    let mut out = Vec::new();
    let written =
        singleton_map_recursive::serialize(recipe, &mut serde_norway::Serializer::new(&mut out));
    match (written, String::from_utf8(out)) {
        (Ok(()), Ok(yaml)) => yaml,
        // Cannot happen: the schema holds only strings, numbers, booleans,
        // fixed arrays, options and enums, which serde_norway always writes as
        // UTF-8. Still, keep the failure visible in the file instead of panicking.
        (Err(e), _) => format!("# rsb-recipes: failed to serialise the recipe: {e}\n"),
        (_, Err(e)) => format!("# rsb-recipes: failed to serialise the recipe: {e}\n"),
    }
}

/// A deserialization error, with the path split out of the message.
#[derive(Debug)]
struct DeError {
    /// Segments of the path to the offending value (or its parent mapping).
    path: Vec<String>,
    /// The message, without serde_norway's own path prefix and position suffix.
    message: String,
    /// Position in the source, for errors from text.
    location: Option<Location>,
}

impl DeError {
    /// Splits a serde_norway error whose path serde_path_to_error tracked.
    fn from_norway(mut path: Vec<String>, e: serde_norway::Error) -> DeError {
        let location = e.location().map(|l| Location { line: l.line(), column: l.column() });
        let mut message = e.to_string();
        if let Some(l) = location {
            let suffix = format!(" at line {} column {}", l.line, l.column);
            if let Some(stripped) = message.strip_suffix(&suffix) {
                message = stripped.to_owned();
            }
        }
        // serde_norway prefixes its own view of the path (for an unknown key or
        // variant, the parent mapping's); strip the longest matching ancestor.
        for depth in (1..=path.len()).rev() {
            let prefix = format!("{}: ", path.get(..depth).unwrap_or_default().join("."));
            if let Some(stripped) = message.strip_prefix(&prefix) {
                message = stripped.to_owned();
                break;
            }
        }
        // For an unknown key (or variant given as a key), name the mapping that
        // holds it, as serde does; the path ends with the bad name itself.
        let bad_name = ["unknown field `", "unknown variant `"]
            .iter()
            .find_map(|p| message.strip_prefix(p))
            .and_then(|rest| rest.split_once('`'))
            .map(|(name, _)| name);
        if bad_name.is_some() && path.last().map(String::as_str) == bad_name {
            path.pop();
        }
        DeError { path, message, location }
    }

    /// The dotted path; empty for the top level.
    fn field(&self) -> String {
        self.path.join(".")
    }
}

/// Strict deserialization with path tracking; enum sections as single-key maps.
fn deserialize<'de, T, D>(deserializer: D) -> Result<T, DeError>
where
    T: DeserializeOwned,
    D: serde::Deserializer<'de, Error = serde_norway::Error>,
{
    let mut track = serde_path_to_error::Track::new();
    let tracked = serde_path_to_error::Deserializer::new(deserializer, &mut track);
    singleton_map_recursive::deserialize(tracked).map_err(|e| {
        let path = track.path().iter().map(|s| s.to_string()).collect();
        DeError::from_norway(path, e)
    })
}

/// With the file parsing alone, the override after which the recipe stops
/// parsing for good: the last `k` where the file plus overrides `..k` parses
/// and the file plus overrides `..=k` does not. (A later override may complete
/// a section an earlier one created, so the first failure is not the culprit.)
fn blame_transition<'o>(tree: &Value, overrides: &'o [Override]) -> Option<&'o Override> {
    let mut merged = tree.clone();
    let mut culprit = None;
    let mut parsed = true;
    for o in overrides {
        if o.apply(&mut merged).is_err() {
            return Some(o);
        }
        let now = deserialize::<Recipe, _>(merged.clone()).is_ok();
        if parsed && !now {
            culprit = Some(o);
        }
        parsed = now;
    }
    culprit
}
