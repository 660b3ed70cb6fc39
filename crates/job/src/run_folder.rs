//! The rules a run folder keeps, shared by `worker train` and `coordinator
//! up` (neither needs libtorch for them):
//!
//! * [`check_out_folder`]: an `--out` that already holds a run is only
//!   continued, never silently mixed with a new one: without `--resume` it
//!   is refused.
//! * [`compare_recipes`] / [`check_resumed_recipe`]: a resumed run uses the
//!   recipe its checkpoint was trained with. Every field that differs
//!   (compared field by field, as dotted paths like `optimizer.lamb.lr`) must
//!   be explained by a `--set` of that field; the explained ones are logged,
//!   any other refuses the resume with the list. Only [`HOST_FIELDS`] (what
//!   each host sets for itself, which changes no result) are not compared.

use crate::checkpoint::{self, CheckpointError, VerifiedCheckpoint, CHECKPOINTS};
use rsb_recipes::Recipe;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Key of the resolved recipe (the whole [`Recipe`] as JSON) in a
/// checkpoint's `state.json`.
pub const STATE_RECIPE_KEY: &str = "resolved_recipe";

/// Fields each host may set for itself, which change no result: they are
/// not compared. `worker join` gives a recipe's `data.loader_threads: 0` the
/// host's share of cores, so rank 0 saves its own value.
pub const HOST_FIELDS: [&str; 1] = ["data.loader_threads"];

/// What a folder holds that shows a run was there (in the order checked).
const RUN_MARKERS: [&str; 3] = ["metrics.jsonl", CHECKPOINTS, "ranks"];

/// One recipe field that differs between a checkpoint and this run.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldChange {
    /// Dotted path of the field (`optimizer.lamb.lr`).
    pub field: String,
    /// The checkpoint's value (`None`: the field is absent there).
    pub saved: Option<Value>,
    /// This run's value (`None`: the field is absent here).
    pub now: Option<Value>,
}

impl std::fmt::Display for FieldChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |v: &Option<Value>| v.as_ref().map_or_else(|| "absent".into(), Value::to_string);
        write!(f, "{} (checkpoint {}, now {})", self.field, show(&self.saved), show(&self.now))
    }
}

/// Why a run folder or a resume is refused.
#[derive(Debug, thiserror::Error)]
pub enum RunFolderError {
    /// `--out` holds another run and `--resume` was not given.
    #[error(
        "{path} already holds a run ({marker} is there); pass `--resume {path}` to continue it, \
         or choose another --out (or delete that folder) to start a new one"
    )]
    HoldsAnotherRun {
        /// The run folder.
        path: PathBuf,
        /// What shows the run (`metrics.jsonl`, `checkpoints`, `ranks`).
        marker: &'static str,
    },
    /// The checkpoint was trained with another recipe.
    #[error(
        "checkpoint {checkpoint} was trained with another recipe; these fields differ: {}. \
         Resume with the checkpoint's recipe, or give `--set FIELD=VALUE` for each field you \
         mean to change",
        .changes.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
    )]
    RecipeChanged {
        /// The checkpoint folder.
        checkpoint: PathBuf,
        /// The fields that differ and no `--set` explains.
        changes: Vec<FieldChange>,
    },
    /// The checkpoint to resume from is missing, torn or corrupt.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
}

/// Refuses an `--out` folder that already holds a run unless the run is
/// being resumed (`resume` given). An absent or empty folder, or one with
/// only unrelated files (or only a `recipe.yaml`, from a run that stopped
/// before its first record), is a new run folder.
pub fn check_out_folder(out: &Path, resume: Option<&Path>) -> Result<(), RunFolderError> {
    if resume.is_some() {
        return Ok(());
    }
    for marker in RUN_MARKERS {
        let path = out.join(marker);
        let holds = if path.is_dir() {
            std::fs::read_dir(&path).map(|mut d| d.next().is_some()).unwrap_or(true)
        } else {
            path.exists()
        };
        if holds {
            return Err(RunFolderError::HoldsAnotherRun { path: out.to_path_buf(), marker });
        }
    }
    Ok(())
}

/// A recipe as the JSON value that checkpoints store and compare.
pub fn recipe_value(recipe: &Recipe) -> Value {
    // Plain data (strings, numbers, lists, maps): serialization cannot fail.
    serde_json::to_value(recipe).unwrap_or(Value::Null)
}

/// The fields (dotted paths; lists compare whole) whose values differ
/// between `saved` and `now`, in path order.
pub fn compare_recipes(saved: &Value, now: &Value) -> Vec<FieldChange> {
    let mut changes = Vec::new();
    walk("", Some(saved), Some(now), &mut changes);
    changes
}

fn walk(path: &str, saved: Option<&Value>, now: Option<&Value>, out: &mut Vec<FieldChange>) {
    match (saved, now) {
        (Some(Value::Object(a)), Some(Value::Object(b))) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for key in keys {
                let child = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                walk(&child, a.get(key), b.get(key), out);
            }
        }
        (a, b) if a == b => {}
        (a, b) => {
            out.push(FieldChange { field: path.to_string(), saved: a.cloned(), now: b.cloned() })
        }
    }
}

/// Whether the `--set key=value` override `set` wrote `field`, or a value
/// above or below it (one dotted path is a prefix of the other).
pub fn override_explains(set: &str, field: &str) -> bool {
    let key = set.split_once('=').map_or(set, |(k, _)| k).trim();
    if key.is_empty() || field.is_empty() {
        return false;
    }
    key.split('.').map(str::trim).zip(field.split('.')).all(|(a, b)| a == b)
}

/// Checks `now` against the recipe saved in a checkpoint's state
/// (`saved`; the recipe as [`recipe_value`] wrote it): every differing field
/// but the [`HOST_FIELDS`] must be explained by one of `overrides`. Returns
/// the explained changes.
/// A saved recipe that still deserializes is compared with this build's
/// defaults filled in, so a field added since then is no difference.
pub fn check_resumed_recipe(
    checkpoint: &Path,
    saved: &Value,
    now: &Recipe,
    overrides: &[String],
) -> Result<Vec<FieldChange>, RunFolderError> {
    let saved = serde_json::from_value::<Recipe>(saved.clone())
        .map(|r| recipe_value(&r))
        .unwrap_or_else(|_| saved.clone());
    let (explained, unexplained): (Vec<FieldChange>, Vec<FieldChange>) =
        compare_recipes(&saved, &recipe_value(now))
            .into_iter()
            .filter(|c| !HOST_FIELDS.contains(&c.field.as_str()))
            .partition(|c| overrides.iter().any(|set| override_explains(set, &c.field)));
    if !unexplained.is_empty() {
        return Err(RunFolderError::RecipeChanged {
            checkpoint: checkpoint.to_path_buf(),
            changes: unexplained,
        });
    }
    Ok(explained)
}

/// Resolves `--resume PATH` (see [`checkpoint::resolve`]) and checks `now`
/// against the recipe its state holds (see [`check_resumed_recipe`]), logging
/// every change a `--set` explains. Returns the verified checkpoint. A
/// checkpoint from before recipes were stored is accepted with a warning.
pub fn check_resume(
    resume: &Path,
    now: &Recipe,
    overrides: &[String],
) -> Result<VerifiedCheckpoint, RunFolderError> {
    let verified = checkpoint::resolve(resume)?;
    let checkpoint = verified.path();
    let state = checkpoint::read_state(checkpoint)?;
    match state.get(STATE_RECIPE_KEY) {
        Some(saved) => {
            for change in check_resumed_recipe(checkpoint, saved, now, overrides)? {
                tracing::info!(checkpoint = %checkpoint.display(), %change, "recipe field changed by --set");
            }
        }
        None => tracing::warn!(
            checkpoint = %checkpoint.display(),
            "the checkpoint does not record its recipe; it cannot be compared with this one"
        ),
    }
    Ok(verified)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_recipe(overrides: &[String]) -> Recipe {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../recipes/debug/resnet18_tiny_cpu.yaml");
        rsb_recipes::load(&root, overrides).unwrap()
    }

    #[test]
    fn a_folder_with_a_run_is_refused_without_resume() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("run");
        check_out_folder(&out, None).unwrap();
        std::fs::create_dir_all(out.join(CHECKPOINTS)).unwrap();
        std::fs::write(out.join("recipe.yaml"), "name: x").unwrap();
        std::fs::write(out.join("notes.txt"), "mine").unwrap();
        check_out_folder(&out, None).unwrap();
        std::fs::create_dir_all(out.join(CHECKPOINTS).join("epoch-0001")).unwrap();
        let err = check_out_folder(&out, None).unwrap_err();
        assert!(
            matches!(&err, RunFolderError::HoldsAnotherRun { marker: "checkpoints", .. }),
            "{err}"
        );
        assert!(err.to_string().contains("--resume"), "{err}");
        check_out_folder(&out, Some(&out)).unwrap();
        std::fs::remove_dir_all(out.join(CHECKPOINTS)).unwrap();
        std::fs::write(out.join("metrics.jsonl"), "").unwrap();
        assert!(matches!(
            check_out_folder(&out, None),
            Err(RunFolderError::HoldsAnotherRun { marker: "metrics.jsonl", .. })
        ));
    }

    #[test]
    fn differing_fields_are_listed_as_dotted_paths() {
        let saved = serde_json::json!({"a": {"b": 1, "c": [1, 2]}, "d": "x", "gone": 1});
        let now = serde_json::json!({"a": {"b": 2, "c": [1, 3]}, "d": "x", "new": {"e": 1}});
        let fields: Vec<String> =
            compare_recipes(&saved, &now).into_iter().map(|c| c.field).collect();
        assert_eq!(fields, ["a.b", "a.c", "gone", "new"]);
        assert!(compare_recipes(&saved, &saved).is_empty());
    }

    #[test]
    fn overrides_explain_their_field_and_what_is_above_or_below() {
        assert!(override_explains("optimizer.lamb.lr=0.01", "optimizer.lamb.lr"));
        assert!(override_explains("optimizer={lamb: {lr: 1}}", "optimizer.lamb.lr"));
        assert!(override_explains("mixup.mixup_alpha=0.2", "mixup"));
        assert!(!override_explains("optimizer.lamb.lr=0.01", "optimizer.lamb.eps"));
        assert!(!override_explains("optimizer.lamb.lr=0.01", "optimizer.lamb.lr_x"));
    }

    #[test]
    fn a_changed_recipe_is_refused_unless_set_explains_it() {
        let saved = recipe_value(&tiny_recipe(&[]));
        let checkpoint = Path::new("run/checkpoints/epoch-0001");
        let same = tiny_recipe(&[]);
        assert!(check_resumed_recipe(checkpoint, &saved, &same, &[]).unwrap().is_empty());

        let sets = vec!["optimizer.lamb.lr=0.01".to_string(), "eval.every_epochs=2".to_string()];
        let changed = tiny_recipe(&sets);
        let err = check_resumed_recipe(checkpoint, &saved, &changed, &[]).unwrap_err();
        let RunFolderError::RecipeChanged { changes, .. } = &err else { panic!("{err}") };
        let fields: Vec<&str> = changes.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(fields, ["eval.every_epochs", "optimizer.lamb.lr"]);
        let message = err.to_string();
        assert!(message.contains("optimizer.lamb.lr (checkpoint 0.005, now 0.01)"), "{message}");
        assert!(message.contains("--set"), "{message}");

        let explained = check_resumed_recipe(checkpoint, &saved, &changed, &sets).unwrap();
        assert_eq!(explained.len(), 2);
        let other_host = tiny_recipe(&["data.loader_threads=7".to_string()]);
        assert!(check_resumed_recipe(checkpoint, &saved, &other_host, &[]).unwrap().is_empty());
        let err = check_resumed_recipe(checkpoint, &saved, &changed, &sets[..1]).unwrap_err();
        assert!(err.to_string().contains("eval.every_epochs"), "{err}");
        assert!(!err.to_string().contains("optimizer.lamb.lr"), "{err}");
    }

    #[test]
    fn a_field_added_since_the_checkpoint_is_no_difference() {
        let mut saved = recipe_value(&tiny_recipe(&[]));
        let runtime = saved.get_mut("runtime").and_then(Value::as_object_mut).unwrap();
        // A checkpoint from before `runtime.max_nonfinite_updates` existed.
        assert!(runtime.remove("max_nonfinite_updates").is_some());
        let now = tiny_recipe(&[]);
        assert!(check_resumed_recipe(Path::new("c"), &saved, &now, &[]).unwrap().is_empty());
    }
}
