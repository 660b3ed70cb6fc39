//! Checkpoints: one folder per finished epoch, `checkpoints/epoch-NNNN/`
//! (`NNNN` epochs done), and with `runtime.checkpoint_every_updates` one
//! mid-epoch folder every N updates, `checkpoints/epoch-NNNN-update-UUUUUUUUU/`
//! (`NNNN` epochs done, then `UUUUUUUUU` updates done over the run). Their
//! numbers give the run order (`epoch-0001` < `epoch-0001-update-…` <
//! `epoch-0002`, [`RunOrder`]), which [`list`] and so the resume and the
//! retention go by; the recipe caps a run at 9,999 epochs, so the names
//! sort in that order too.
//! Every folder has the same fixed parts: `model.safetensors` (timm keys, loads into timm as is),
//! `optimizer.safetensors` (LAMB moments) and `state.json` (position in the
//! run, optimizer step counts, loader counters, the resolved recipe, and in
//! fp16 runs the loss scaler as torch's `GradScaler.state_dict()`), and
//! `manifest.json` (size and SHA-256 of every part, see
//! [`rsb_job::checkpoint`]).
//!
//! Commit protocol: the records the run published before the checkpoint
//! are made durable first (see [`save`]); the folder is assembled under a
//! temporary name of its own ([`temporary_sibling`]: no other writer's),
//! every part written through [`crate::atomic_file`] (fsynced); then the manifest
//! is computed from the parts as they are on disk and written the same way;
//! then the folder is fsynced and renamed into place and its parent fsynced
//! (and the run folder, when the save created `checkpoints/`). A save that
//! fails removes its temporary folder and says which checkpoint is still
//! the newest intact one ([`TrainError::CheckpointNotWritten`]).
//! A checkpoint counts only when its manifest verifies, so a torn or corrupt
//! folder (however it came about) is never resumed from: [`resolve`] skips it
//! for the one before, with a warning, or refuses a folder named directly,
//! naming the file; [`load`] reads only what [`resolve`] verified (a
//! [`VerifiedCheckpoint`]), so each part is hashed once per resume.
//!
//! Retention: the newest `keep_last` checkpoints are kept, and the best by
//! validation top-1 ([`TrainState::best_epoch`]) is never pruned while it is
//! the best. The checkpoint just written is the newest: any that sort after
//! it (from before a resume of an older checkpoint) are set aside, never
//! counted, so retention cannot delete what a save just wrote; so is the
//! folder of the same name that a save replaces (the epoch trained again).
//! Retention deletes the incomplete staging folders of saves that never
//! finished (the run folder has one checkpoint writer at a time,
//! [`rsb_job::RunFolderLock`], so none of them is another live save's), and
//! sets aside a complete one (a save interrupted between its renames left
//! the checkpoint it replaced, or its own, under a temporary name). One that
//! cannot be read to the end (an I/O error) may be whole, so it is kept,
//! with a warning: only a part or manifest missing, short or wrong shows a
//! folder torn ([`rsb_job::CheckpointError::shows_torn`]). A save
//! that fails deletes the incomplete ones too, and tries once more: on a
//! disk they nearly fill, every save would fail, and retention would never
//! run.
//!
//! Disk: after each save, [`space_warning`] compares the file system's free
//! space with the checkpoints retention will still add, so a run that will
//! fill its disk says so saves before one fails.

use crate::atomic_file::{self, replace_folder, sync_folder, temporary_sibling};
use crate::error::TrainError;
use crate::grad_scaler::ScalerState;
use crate::lamb::{Lamb, LambSteps};
use rsb_job::checkpoint::{
    new_set_aside_folder, Manifest, RunOrder, FOLDER_PREFIX, MANIFEST, PARTS, STATE,
};
use rsb_vision::weights::{read_safetensors, write_safetensors};
use rsb_vision::Model;
use std::path::{Path, PathBuf};

pub use rsb_job::checkpoint::{list, verify, VerifiedCheckpoint, CHECKPOINTS};

/// The scalar part of a checkpoint.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainState {
    /// Recipe name.
    pub recipe: String,
    /// Model name.
    pub model: String,
    /// Epoch to run next.
    pub next_epoch: u64,
    /// Update within `next_epoch` to run next.
    pub next_step: u64,
    /// Optimizer updates done so far (the schedule's position; skipped
    /// non-finite updates included).
    pub updates: u64,
    /// LAMB step counts (skipped updates excluded).
    pub optimizer: LambSteps,
    /// Samples replaced because their file was undecodable, so far.
    pub replaced_samples: u64,
    /// Best validation top-1 so far, in percent.
    pub best_top1: Option<f64>,
    /// The epoch (0-based) whose checkpoint scored `best_top1`: never pruned
    /// while it is the best. Absent in checkpoints from before it was kept.
    #[serde(default)]
    pub best_epoch: Option<u64>,
    /// The whole resolved recipe ([`rsb_job::run_folder::recipe_value`]),
    /// compared with the recipe of a resume. Absent in checkpoints from
    /// before it was stored.
    #[serde(default)]
    pub resolved_recipe: Option<serde_json::Value>,
    /// The batch the run was planned with: a resume must keep it (the
    /// world size may change). Absent in checkpoints from before it was kept.
    #[serde(default)]
    pub batch: Option<BatchShape>,
    /// What the epoch `next_epoch` had trained before `next_step`, so a
    /// mid-epoch resume reports the same epoch loss (zero at epoch ends).
    #[serde(default)]
    pub epoch_so_far: EpochSoFar,
    /// Non-finite updates in a row up to `updates` (the stop rule's count).
    #[serde(default)]
    pub nonfinite_streak: u64,
    /// fp16 runs: the dynamic loss scaler, with the keys of torch's
    /// `GradScaler.state_dict()` (timm saves it as `scaler`). Absent in
    /// other precisions and in checkpoints from before fp16.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaler: Option<ScalerState>,
}

/// The batch plan's invariants: what stays fixed whatever the world size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BatchShape {
    /// Images per optimizer update over all ranks.
    pub global_size: u32,
    /// Sampler streams (micro-batches per update over all ranks).
    pub streams: u32,
}

/// The part of an epoch trained before a mid-epoch checkpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EpochSoFar {
    /// Sum over the ranks of the applied updates' losses.
    pub loss_sum: f64,
    /// Updates run (applied or skipped).
    pub updates: u64,
    /// Updates skipped for a non-finite gradient norm.
    pub skipped: u64,
}

impl TrainState {
    /// Whether the state is at an epoch's start.
    pub fn at_epoch_start(&self) -> bool {
        self.next_step == 0
    }
}

/// Folder name of the checkpoint written after epoch `epoch` (0-based).
pub fn folder_name(epoch: u64) -> String {
    format!("{FOLDER_PREFIX}{:04}", epoch + 1)
}

/// Folder name of a mid-epoch checkpoint of `epoch` (0-based), written after
/// `updates` updates over the run: it sorts after the end of the epoch
/// before and before the end of this one.
pub fn mid_epoch_folder_name(epoch: u64, updates: u64) -> String {
    format!("{FOLDER_PREFIX}{epoch:04}-update-{updates:09}")
}

/// The folder name of the checkpoint of `state`: an epoch end when its
/// position is an epoch's start, else mid-epoch.
pub fn folder_name_of(state: &TrainState) -> String {
    if state.at_epoch_start() {
        folder_name(state.next_epoch.saturating_sub(1))
    } else {
        mid_epoch_folder_name(state.next_epoch, state.updates)
    }
}

/// Writes and commits a checkpoint of `state` into
/// `run_dir/checkpoints/<folder_name_of(state)>` (see the module
/// documentation), then prunes the older ones. `sync_records` first makes
/// the records published before the checkpoint durable
/// ([`crate::report::Records::sync`]): a power loss that keeps the
/// checkpoint must keep them too, or a resume would continue after records
/// lost without a word. On failure (that sync's included) nothing of the
/// save is left behind and the error names the checkpoint still intact.
pub fn save(
    run_dir: &Path,
    model: &Model,
    optimizer: &Lamb,
    state: &TrainState,
    keep_last: usize,
    sync_records: impl FnOnce() -> Result<(), TrainError>,
) -> Result<PathBuf, TrainError> {
    let written = folder_name_of(state);
    // Once, before any try of the commit: after a failed fsync, another
    // may succeed on data that never reached the disk.
    if let Err(cause) = sync_records() {
        return Err(not_written(run_dir, &written, &run_dir.join(CHECKPOINTS), &cause));
    }
    let target = commit(run_dir, &written, |staging| {
        atomic_file::write_with(&staging.join(PARTS[0]), |staged| {
            Ok(model.save_safetensors(staged)?)
        })?;
        let moments = optimizer.state_tensors();
        atomic_file::write_with(&staging.join(PARTS[1]), |staged| {
            Ok(write_safetensors(&moments, staged)?)
        })?;
        let state_path = staging.join(STATE);
        let json = serde_json::to_string_pretty(state).map_err(|e| TrainError::Checkpoint {
            path: state_path.clone(),
            problem: format!("cannot serialise the training state: {e}"),
        })?;
        atomic_file::write_bytes(&state_path, json.as_bytes())
    })?;
    let best = state.best_epoch.map(folder_name);
    prune(run_dir, keep_last.max(1), &[Some(written.as_str()), best.as_deref()]);
    Ok(target)
}

/// The warning, `None` when there is room, that the file system of
/// `run_dir` cannot hold the checkpoints still to come: each as large as
/// `written` (the one just committed), until retention keeps `keep_last`
/// (those there now counted), and one more while a save is written, before
/// retention deletes the oldest; no more than the run's `saves_left`. A run
/// that would fail with "No space left on device" hours later says so at
/// once, with the figures. Unreadable sizes give no warning: the save
/// itself reports a full disk. The best checkpoint, kept besides the
/// newest `keep_last`, is counted once it is outside them (it is among
/// those there); one still among them that later falls out of them needs
/// one checkpoint's room more than this foresees, and is warned of then.
pub fn space_warning(
    run_dir: &Path,
    written: &Path,
    keep_last: usize,
    saves_left: u64,
) -> Option<String> {
    if saves_left == 0 {
        return None;
    }
    let size: u64 = std::fs::read_dir(written)
        .ok()?
        .flatten()
        .filter_map(|entry| entry.metadata().ok())
        .filter(std::fs::Metadata::is_file)
        .map(|metadata| metadata.len())
        .sum();
    let stat = nix::sys::statvfs::statvfs(written).ok()?;
    let free = (stat.blocks_available() as u64).saturating_mul(stat.fragment_size() as u64);
    space_shortfall(size, free, list(run_dir).len(), keep_last.max(1), saves_left)
}

/// The saves a run of `epochs` epochs of `steps` updates still makes after
/// the one it wrote at `updates` (training continues with `next_epoch`): the
/// ends of the epochs not ended, and the periodic ones, at the multiples of
/// `every` (0: none) after `updates` but an epoch's last update, whose save
/// is the epoch's end (the trainer writes no periodic one there).
pub fn saves_still_to_come(
    epochs: u64,
    next_epoch: u64,
    steps: u64,
    updates: u64,
    every: u64,
) -> u64 {
    let total = epochs.saturating_mul(steps);
    // Multiples of `m` in (updates, total].
    let multiples_after = |m: u64| (total / m).saturating_sub(updates / m);
    let periodic = match every {
        0 => 0,
        every => {
            let steps = steps.max(1);
            let both = every / gcd(every, steps) * steps;
            multiples_after(every) - multiples_after(both)
        }
    };
    epochs.saturating_sub(next_epoch) + periodic
}

/// Greatest common divisor.
fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// [`space_warning`]'s rule: `kept` checkpoints of `size` bytes are there,
/// up to `keep_last` are kept, a save needs room for one more, and the run
/// has `saves_left` saves to make.
fn space_shortfall(
    size: u64,
    free: u64,
    kept: usize,
    keep_last: usize,
    saves_left: u64,
) -> Option<String> {
    if size == 0 {
        return None;
    }
    let to_come = (keep_last.saturating_sub(kept) as u64 + 1).min(saves_left);
    if free >= size.saturating_mul(to_come) {
        return None;
    }
    let verdict = match free / size {
        0 => "the next save will fail".to_string(),
        fit => format!("{fit} more save(s) fit, then one will fail"),
    };
    Some(format!(
        "the run folder's file system has {} free, and a checkpoint of this run takes {}: \
         {verdict} with \"No space left on device\" (runtime.keep_last_checkpoints keeps \
         {keep_last}, {kept} there now, and a save needs room for one more before the oldest \
         is deleted); free some space, or lower runtime.keep_last_checkpoints",
        indicatif::HumanBytes(free),
        indicatif::HumanBytes(size),
    ))
}

/// Commits the checkpoint folder `checkpoints/<name>` of `run_dir`:
/// `write_parts` fills a staging folder, whose manifest is then written;
/// the folder is put in place ([`replace_folder`]); the folder it replaces
/// (the same epoch, trained again after a resume of an older checkpoint) and
/// those that sort after it are set aside ([`set_aside`]). On any error the
/// staging folder is removed and the error says which checkpoint is intact.
/// A save that fails where saves killed before they finished left their
/// incomplete folders (a full disk, most often) deletes those
/// ([`delete_leftovers`]) and is tried once more: otherwise retention,
/// which runs after a save that succeeded, would never delete them, and on
/// a nearly full disk every save after such a kill would fail.
fn commit(
    run_dir: &Path,
    name: &str,
    mut write_parts: impl FnMut(&Path) -> Result<(), TrainError>,
) -> Result<PathBuf, TrainError> {
    let root = run_dir.join(CHECKPOINTS);
    let target = root.join(name);
    let mut tried_again = false;
    // The set-aside folder of this save, made by a try that failed after it.
    let mut aside = None;
    let replaced = loop {
        let staging = temporary_sibling(&target)
            .map_err(|e| not_written(run_dir, name, &target, &TrainError::io(&target, e)))?;
        let mut made_staging = false;
        let tried = stage(run_dir, name, &staging, &mut made_staging, &mut aside, &mut write_parts);
        let cause = match tried {
            Ok(replaced) => break replaced,
            Err(cause) => cause,
        };
        // Best effort: the failure being reported matters more than a
        // leftover hidden folder, which retention deletes later.
        if made_staging && staging.exists() {
            let _ = std::fs::remove_dir_all(&staging);
        }
        if !tried_again {
            tried_again = true;
            let deleted = delete_leftovers(&root);
            if deleted > 0 {
                tracing::warn!(
                    checkpoint = name,
                    error = plain_cause(&cause, &staging),
                    "a checkpoint save failed; deleted the {deleted} incomplete folder(s) that \
                     interrupted saves had left in {}, and trying once more",
                    root.display()
                );
                continue;
            }
        }
        return Err(not_written(run_dir, name, &staging, &cause));
    };
    set_aside(run_dir, name, replaced, aside);
    // The rename into place, and the moves aside, survive a crash. The
    // checkpoint is in place already: a failure here is not "not written".
    sync_folder(&root).map_err(|e| TrainError::io(&root, e))?;
    Ok(target)
}

/// One try of [`commit`]: fills `staging` (a name of this try's own, which
/// `made_staging` says was created) and puts it in place as `name`. Returns
/// where the folder it replaced went; `aside` is the set-aside folder of the
/// save, made by this try or an earlier one.
fn stage(
    run_dir: &Path,
    name: &str,
    staging: &Path,
    made_staging: &mut bool,
    aside: &mut Option<PathBuf>,
    write_parts: &mut impl FnMut(&Path) -> Result<(), TrainError>,
) -> Result<Option<PathBuf>, TrainError> {
    let root = run_dir.join(CHECKPOINTS);
    let target = root.join(name);
    std::fs::create_dir_all(&root).map_err(|e| TrainError::io(&root, e))?;
    // The `checkpoints/` entry must survive a crash as the checkpoint
    // in it does: synced at every save, not only the one that made it,
    // which may have failed before its sync.
    sync_folder(run_dir).map_err(|e| TrainError::io(run_dir, e))?;
    // A name of this save's own: never another writer's save in
    // progress, which is not to be deleted (an existing folder fails).
    std::fs::create_dir(staging).map_err(|e| TrainError::io(staging, e))?;
    *made_staging = true;
    write_parts(staging)?;
    // The manifest describes the parts as they are on disk, and is written last.
    let manifest = Manifest::of_parts(staging, &PARTS)?;
    atomic_file::write_bytes(&staging.join(MANIFEST), manifest.to_json().as_bytes())?;
    // The checkpoints after this one (of a run order left by a resume of
    // an older checkpoint) go first: a crash after the new one is in
    // place must not leave them to count as the newest.
    *aside = set_aside(run_dir, name, None, aside.take());
    // Re-running an epoch (after a resume from an older checkpoint)
    // replaces its checkpoint in one step: a crash never leaves the
    // folder missing.
    replace_folder(staging, &target).map_err(|e| TrainError::io(&target, e))
}

/// The error of a save of the checkpoint `name` that failed with `cause`:
/// the cause with the part's name for the paths of the staging folder and
/// its temporary files (they are gone), and the newest checkpoint up to
/// `name` that is still intact.
fn not_written(run_dir: &Path, name: &str, staging: &Path, cause: &TrainError) -> TrainError {
    let cause = plain_cause(cause, staging);
    let position = RunOrder::of_name(name);
    let intact = list(run_dir)
        .into_iter()
        .rev()
        .filter(|p| position.is_some_and(|at| RunOrder::of_path(p).is_some_and(|o| o <= at)))
        .find(|p| verify(p).is_ok())
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    let previous = match intact {
        Some(same) if same == name => format!("the earlier {same} is intact"),
        Some(earlier) => format!("{earlier} is intact"),
        None => "no earlier checkpoint".to_string(),
    };
    TrainError::CheckpointNotWritten { folder: name.to_string(), cause, previous }
}

/// `cause` with its causes, the paths of the staging folder `staging` and
/// of its temporary files (gone once a save failed) written as the parts'
/// names.
fn plain_cause(cause: &TrainError, staging: &Path) -> String {
    let mut text = cause.to_string();
    let mut source = std::error::Error::source(cause);
    while let Some(inner) = source {
        text.push_str(&format!(": {inner}"));
        source = inner.source();
    }
    text = text.replace(&format!("{}/", staging.display()), "");
    for part in PARTS.into_iter().chain([MANIFEST]) {
        text = with_plain_name(&text, part);
    }
    text
}

/// `text` with each temporary name of the file `part`
/// (`.part.tmp-<pid>-<random>`, [`temporary_sibling`]) written as `part`,
/// the name a person knows.
fn with_plain_name(text: &str, part: &str) -> String {
    let temporary = format!(".{part}{}", atomic_file::TEMPORARY_MARK);
    let mut plain = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(&temporary) {
        plain.push_str(&rest[..at]);
        plain.push_str(part);
        rest = rest[at + temporary.len()..]
            .trim_start_matches(|c: char| c.is_ascii_hexdigit() || c == '-');
    }
    plain.push_str(rest);
    plain
}

/// Whether the checkpoint folder `path` is after the checkpoint `written`
/// in run order ([`RunOrder`]; a name of neither form is after nothing).
fn after(path: &Path, written: &str) -> bool {
    match (RunOrder::of_path(path), RunOrder::of_name(written)) {
        (Some(position), Some(written)) => position > written,
        _ => false,
    }
}

/// Moves the checkpoints of a run order this run left, when it resumed from
/// an older checkpoint (`--resume` of an earlier epoch, or a coordinator
/// that resumed from the newest checkpoint it had committed), out of the
/// run's order into `checkpoints/abandoned-<unix seconds>/`, with a warning
/// naming them: `replaced`, the folder that the checkpoint `written` (the
/// one just written) replaced (where [`replace_folder`] left it), and the
/// checkpoints that sort after `written`. Left in place, the later ones
/// would count as the newest, so that retention would delete the checkpoint
/// just written, and a resume of the run folder would continue the
/// abandoned run instead of this one. They are moved, never deleted: the
/// user decides. A later checkpoint that cannot be moved stays, with a
/// warning; a replaced one that cannot be moved is deleted, with a warning
/// (its hidden name would not be kept anyway). `into` is a set-aside
/// folder made by an earlier call for the same save, used again; returns
/// the folder used, if one was made.
fn set_aside(
    run_dir: &Path,
    written: &str,
    replaced: Option<PathBuf>,
    into: Option<PathBuf>,
) -> Option<PathBuf> {
    let later: Vec<PathBuf> = list(run_dir).into_iter().filter(|p| after(p, written)).collect();
    if later.is_empty() && replaced.is_none() {
        return into;
    }
    let root = run_dir.join(CHECKPOINTS);
    let (aside, made) = match into {
        Some(aside) => (aside, Ok(())),
        None => new_set_aside_folder(&root),
    };
    let moves = replaced.map(|old| (old, written.to_string())).into_iter().chain(
        later.into_iter().filter_map(|old| {
            let name = old.file_name()?.to_string_lossy().into_owned();
            Some((old, name))
        }),
    );
    for (old, name) in moves {
        let is_replaced = name == written;
        let moved = match &made {
            Ok(()) => std::fs::rename(&old, aside.join(&name)),
            Err(e) => Err(std::io::Error::new(e.kind(), format!("{}: {e}", aside.display()))),
        };
        match moved {
            Ok(()) => tracing::warn!(
                checkpoint = %root.join(&name).display(),
                moved_to = %aside.join(&name).display(),
                "{}, from a run order this run abandoned when it resumed from an older \
                 checkpoint: set aside (delete it when not needed)",
                if is_replaced {
                    format!("the checkpoint replaced by the one just written ({written})")
                } else {
                    format!("a checkpoint after the one just written ({written})")
                }
            ),
            Err(e) if is_replaced => {
                tracing::warn!(checkpoint = %root.join(&name).display(), error = %e, "cannot set aside the checkpoint replaced by the one just written; deleting it");
                if let Err(e) = std::fs::remove_dir_all(&old) {
                    tracing::warn!(folder = %old.display(), error = %e, "could not delete the replaced checkpoint");
                }
            }
            Err(e) => tracing::warn!(
                checkpoint = %old.display(),
                error = %e,
                "cannot set aside a checkpoint after the one just written ({written}); keeping it"
            ),
        }
    }
    if made.is_ok() {
        if let Err(e) = sync_folder(&aside) {
            tracing::warn!(folder = %aside.display(), error = %e, "could not fsync the set-aside checkpoints");
        }
    }
    made.is_ok().then_some(aside)
}

/// Deletes every checkpoint but the newest `keep_last` and those named in
/// `keep` (folder names: the one just written, the best), and the
/// incomplete staging folders of saves that never finished; a complete one
/// is set aside.
fn prune(run_dir: &Path, keep_last: usize, keep: &[Option<&str>]) {
    let all = list(run_dir);
    let kept =
        |p: &Path| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| keep.contains(&Some(n)));
    let mut delete: Vec<PathBuf> = all
        .iter()
        .take(all.len().saturating_sub(keep_last))
        .filter(|p| !kept(p))
        .cloned()
        .collect();
    let root = run_dir.join(CHECKPOINTS);
    let (leftovers, staged) = hidden_leftovers(&root);
    for folder in staged {
        // A complete checkpoint under a temporary name is one that a save
        // interrupted between its steps left there: the checkpoint it
        // replaced, or the new one before it was put in place. Set aside
        // whole, never deleted; an incomplete one is deleted, and one that
        // cannot be read is kept.
        match staged_folder(&folder) {
            StagedFolder::Complete => {}
            StagedFolder::Torn => {
                delete.push(folder);
                continue;
            }
            StagedFolder::Unreadable => continue,
        }
        let (aside, made) = new_set_aside_folder(&root);
        let name = folder
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix('.'))
            .and_then(|n| n.split(atomic_file::TEMPORARY_MARK).next())
            .unwrap_or("checkpoint")
            .to_string();
        match made.and_then(|()| std::fs::rename(&folder, aside.join(&name))) {
            Ok(()) => tracing::warn!(
                folder = %folder.display(),
                moved_to = %aside.join(&name).display(),
                "a complete checkpoint that an interrupted save left under a temporary name: set \
                 aside (delete it when not needed)"
            ),
            Err(e) => {
                tracing::warn!(folder = %folder.display(), error = %e, "cannot set aside a complete checkpoint left under a temporary name; keeping it")
            }
        }
    }
    for old in leftovers.into_iter().chain(delete) {
        delete_folder(&root, &old);
    }
}

/// The hidden entries of the checkpoints folder `root` that saves and
/// retention left, listed once: what a retention pass killed while it
/// deleted left (`.deleting-…`), and the staging folders of saves that
/// never finished (`.epoch-….tmp-…`), complete or not.
fn hidden_leftovers(root: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let hidden_name = |p: &PathBuf| {
        p.file_name().and_then(|n| n.to_str()).filter(|n| n.starts_with('.')).map(str::to_owned)
    };
    std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            hidden_name(p).is_some_and(|n| {
                n.starts_with(DELETING)
                    || (n.starts_with(&format!(".{FOLDER_PREFIX}"))
                        && n.contains(atomic_file::TEMPORARY_MARK))
            })
        })
        .partition(|p| hidden_name(p).is_some_and(|n| n.starts_with(DELETING)))
}

/// Deletes what interrupted saves and retention passes left in the
/// checkpoints folder `root` and no checkpoint needs: partial deletions
/// and incomplete staging folders (a complete one is left for [`prune`] to
/// set aside). Returns how many it deleted. The run folder has one
/// checkpoint writer at a time ([`rsb_job::RunFolderLock`]), so none of
/// them is a live save's.
fn delete_leftovers(root: &Path) -> usize {
    let (leftovers, staged) = hidden_leftovers(root);
    let torn = staged.into_iter().filter(|folder| staged_folder(folder) == StagedFolder::Torn);
    leftovers.into_iter().chain(torn).filter(|old| delete_folder(root, old)).count()
}

/// What the check of a save's staging folder found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StagedFolder {
    /// A whole checkpoint: its manifest verifies.
    Complete,
    /// A save's incomplete folder (a part or the manifest missing, short
    /// or wrong): nothing is lost by deleting it.
    Torn,
    /// Not read to the end (an I/O error, or a manifest of another
    /// format): it may be a whole checkpoint, the only copy of one a save
    /// was replacing. Kept, with a warning.
    Unreadable,
}

/// Checks the staging folder `folder` ([`StagedFolder`]), warning of one
/// that cannot be read.
fn staged_folder(folder: &Path) -> StagedFolder {
    match verify(folder) {
        Ok(_) => StagedFolder::Complete,
        Err(e) if e.shows_torn() => StagedFolder::Torn,
        Err(e) => {
            tracing::warn!(
                folder = %folder.display(),
                error = %e,
                "a folder an interrupted save left could not be checked; keeping it (it may be a \
                 whole checkpoint: delete it when it is not needed)"
            );
            StagedFolder::Unreadable
        }
    }
}

/// Deletes the folder `old` of the checkpoints folder `root`, saying why
/// when it cannot; returns whether it is gone.
fn delete_folder(root: &Path, old: &Path) -> bool {
    // Renamed out of the checkpoints' names first: a kill while the
    // folder is deleted leaves part of it under a name nothing reads as
    // a checkpoint, and the next pass deletes the rest.
    let name = old.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let doomed = if name.starts_with(DELETING) {
        old.to_path_buf()
    } else {
        // A name of its own: a leftover of the same checkpoint that
        // could not be deleted never blocks this one.
        let doomed = root.join(format!(
            "{DELETING}{}.{}-{}",
            name.trim_start_matches('.'),
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        if let Err(e) = std::fs::rename(old, &doomed) {
            tracing::warn!(checkpoint = %old.display(), error = %e, "could not delete an old checkpoint; keeping it");
            return false;
        }
        doomed
    };
    match std::fs::remove_dir_all(&doomed) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(checkpoint = %old.display(), folder = %doomed.display(), error = %e, "could not delete an old checkpoint");
            false
        }
    }
}

/// Prefix under which retention deletes a folder (see [`prune`]).
const DELETING: &str = ".deleting-";

/// Resolves `--resume PATH` to an intact checkpoint: a checkpoint folder
/// (refused, naming the file, when torn or corrupt), or a run folder (its
/// newest intact checkpoint; newer torn or corrupt ones are logged and
/// skipped). See [`rsb_job::checkpoint::resolve`].
pub fn resolve(path: &Path) -> Result<VerifiedCheckpoint, TrainError> {
    Ok(rsb_job::checkpoint::resolve(path)?)
}

/// Reads the state of a checkpoint (without verifying the checkpoint).
pub fn read_state(checkpoint: &Path) -> Result<TrainState, TrainError> {
    let state_path = checkpoint.join(STATE);
    let text = std::fs::read_to_string(&state_path).map_err(|e| TrainError::io(&state_path, e))?;
    serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint {
        path: checkpoint.to_path_buf(),
        problem: format!("{STATE}: {e}"),
    })
}

/// Restores model and optimizer from a checkpoint [`resolve`] verified
/// (manifest, sizes, checksums) and returns the position it saved.
pub fn load(
    verified: &VerifiedCheckpoint,
    model: &mut Model,
    optimizer: &mut Lamb,
) -> Result<TrainState, TrainError> {
    let checkpoint = verified.path();
    let bad = |problem: String| TrainError::Checkpoint { path: checkpoint.to_path_buf(), problem };
    let state = read_state(checkpoint)?;
    if state.model != model.spec().name {
        return Err(bad(format!(
            "saved for model `{}`, this run trains `{}`",
            state.model,
            model.spec().name
        )));
    }
    model.load_safetensors(&checkpoint.join(PARTS[0]))?;
    let moments = read_safetensors(&checkpoint.join(PARTS[1]))?;
    optimizer
        .load_state(moments, &state.optimizer)
        .map_err(|p| bad(format!("{}: {p}", PARTS[1])))?;
    Ok(state)
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;
    use crate::atomic_file::tests::names;
    use rsb_job::checkpoint::SET_ASIDE_PREFIX;

    fn state(best_epoch: Option<u64>) -> TrainState {
        TrainState {
            recipe: "r".into(),
            model: "m".into(),
            next_epoch: 0,
            next_step: 0,
            updates: 0,
            optimizer: LambSteps { group_steps: vec![] },
            replaced_samples: 0,
            best_top1: None,
            best_epoch,
            resolved_recipe: Some(serde_json::json!({"name": "r"})),
            batch: Some(BatchShape { global_size: 16, streams: 2 }),
            epoch_so_far: EpochSoFar::default(),
            nonfinite_streak: 0,
            scaler: None,
        }
    }

    #[test]
    fn the_saves_still_to_come_are_the_epoch_ends_and_the_periodic_ones_after_this_update() {
        // 2 epochs of 10 updates, a checkpoint every 6: saves at 6, 10
        // (epoch end), 12, 18 and 20 (epoch end).
        assert_eq!(saves_still_to_come(2, 0, 10, 6, 6), 4, "after 6: 10, 12, 18, 20");
        assert_eq!(saves_still_to_come(2, 1, 10, 10, 6), 3, "after the end at 10: 12, 18, 20");
        assert_eq!(saves_still_to_come(2, 1, 10, 18, 6), 1, "after 18: the end at 20");
        assert_eq!(saves_still_to_come(2, 2, 10, 20, 6), 0, "the last save");
        // None is periodic on an epoch's last update: that is its end's.
        assert_eq!(saves_still_to_come(2, 0, 10, 5, 5), 3, "10, 15, 20");
        assert_eq!(saves_still_to_come(3, 1, 10, 10, 10), 2, "the ends only");
        assert_eq!(saves_still_to_come(2, 0, 10, 4, 4), 5, "8, 10, 12, 16, 20");
        // No periodic saves: the epoch ends only. A mid-epoch save (a stop)
        // leaves its epoch's end to come.
        assert_eq!(saves_still_to_come(3, 1, 10, 13, 0), 2);
    }

    #[test]
    fn a_file_system_short_of_the_checkpoints_to_come_is_warned_of_with_its_figures() {
        const MIB: u64 = 1 << 20;
        // Room for every checkpoint retention keeps, and one more: no word.
        assert_eq!(space_shortfall(100 * MIB, 300 * MIB, 1, 2, 10), None);
        // Retention holds steady: a save needs room for one only.
        assert_eq!(space_shortfall(100 * MIB, 100 * MIB, 2, 2, 10), None);
        assert_eq!(space_shortfall(100 * MIB, 100 * MIB, 3, 2, 10), None, "the best one kept too");
        // Only the saves the run has left count: none, or fewer than
        // retention would keep.
        assert_eq!(space_shortfall(100 * MIB, 0, 1, 3, 0), None, "the run's last save");
        assert_eq!(space_shortfall(100 * MIB, 100 * MIB, 1, 1000, 1), None);
        assert!(space_shortfall(100 * MIB, 100 * MIB, 1, 1000, 2).is_some());
        // One more fits, then a save fails: said, with the figures.
        let warning = space_shortfall(100 * MIB, 150 * MIB, 1, 3, 10).unwrap();
        assert!(warning.contains("150.00 MiB free"), "{warning}");
        assert!(warning.contains("takes 100.00 MiB"), "{warning}");
        assert!(warning.contains("1 more save(s) fit, then one will fail"), "{warning}");
        assert!(warning.contains("keeps 3, 1 there now"), "{warning}");
        // None fits: the next save fails.
        let warning = space_shortfall(100 * MIB, 99 * MIB, 3, 3, 10).unwrap();
        assert!(warning.contains("the next save will fail"), "{warning}");
        // Single-line: the coordinator refuses control characters.
        assert!(!warning.chars().any(char::is_control), "{warning}");
        // An empty folder says nothing, rather than divide by zero.
        assert_eq!(space_shortfall(0, 0, 1, 3, 10), None);
        // A real folder: its size and its file system's free space are
        // read; no disk holds a checkpoint of 2 bytes kept, and saved,
        // 2^64 - 1 times.
        let run = tempfile::tempdir().unwrap();
        let written = run.path().join(CHECKPOINTS).join(folder_name(0));
        std::fs::create_dir_all(&written).unwrap();
        std::fs::write(written.join(STATE), b"{}").unwrap();
        assert_eq!(space_warning(run.path(), &written, 3, 10), None);
        let warning = space_warning(run.path(), &written, usize::MAX, u64::MAX).unwrap();
        assert!(warning.contains("takes 2 B:") && warning.contains(", 1 there now"), "{warning}");
    }

    #[test]
    fn the_state_stores_the_recipe_where_the_coordinator_reads_it() {
        let value = serde_json::to_value(state(Some(2))).unwrap();
        assert_eq!(value[rsb_job::run_folder::STATE_RECIPE_KEY]["name"], "r");
        assert_eq!(value["best_epoch"], 2);
        // A state from before the recipe and the best epoch were stored still reads.
        let mut old = value.as_object().unwrap().clone();
        old.remove("best_epoch");
        old.remove(rsb_job::run_folder::STATE_RECIPE_KEY);
        // ... and one from before mid-epoch checkpoints.
        for key in ["batch", "epoch_so_far", "nonfinite_streak"] {
            assert!(old.remove(key).is_some(), "{key}");
        }
        let back: TrainState = serde_json::from_value(serde_json::Value::Object(old)).unwrap();
        assert_eq!((back.best_epoch, back.resolved_recipe), (None, None));
        assert_eq!(
            (back.batch, back.epoch_so_far, back.nonfinite_streak),
            (None, EpochSoFar::default(), 0)
        );
    }

    #[test]
    fn mid_epoch_folders_sort_between_the_epoch_ends_around_them() {
        let at = |next_epoch, next_step, updates| TrainState {
            next_epoch,
            next_step,
            updates,
            ..state(None)
        };
        // 10 updates per epoch, a checkpoint every 4 updates and at epoch ends.
        let written = [
            at(0, 4, 4),
            at(0, 8, 8),
            at(1, 0, 10),
            at(1, 2, 12),
            at(1, 6, 16),
            at(2, 0, 20),
            at(2, 4, 24),
        ];
        let names: Vec<String> = written.iter().map(folder_name_of).collect();
        assert_eq!(
            names,
            [
                "epoch-0000-update-000000004",
                "epoch-0000-update-000000008",
                "epoch-0001",
                "epoch-0001-update-000000012",
                "epoch-0001-update-000000016",
                "epoch-0002",
                "epoch-0002-update-000000024",
            ]
        );
        let run = tempfile::tempdir().unwrap();
        let root = run.path().join(CHECKPOINTS);
        // Created out of order: `list` gives them in run order.
        for name in names.iter().rev() {
            std::fs::create_dir_all(root.join(name)).unwrap();
        }
        let listed: Vec<PathBuf> = names.iter().map(|n| root.join(n)).collect();
        assert_eq!(list(run.path()), listed);
        // Retention: the newest two, and the best epoch's end.
        prune(run.path(), 2, &[Some(&folder_name(0))]);
        assert_eq!(
            list(run.path()),
            [root.join("epoch-0001"), root.join(&names[5]), root.join(&names[6])]
        );
    }

    #[test]
    fn pruning_keeps_the_newest_and_the_best() {
        let run = tempfile::tempdir().unwrap();
        let root = run.path().join(CHECKPOINTS);
        for epoch in 0..5 {
            std::fs::create_dir_all(root.join(folder_name(epoch))).unwrap();
        }
        std::fs::create_dir_all(root.join(".epoch-0009.tmp-12345")).unwrap();
        // What passes killed while they deleted folders left, one of them
        // of a checkpoint deleted now.
        std::fs::create_dir_all(root.join(".deleting-epoch-0000/model.safetensors")).unwrap();
        std::fs::create_dir_all(root.join(".deleting-epoch-0001/sub/f")).unwrap();
        prune(run.path(), 2, &[Some(&folder_name(1))]);
        assert_eq!(names(&root), ["epoch-0002", "epoch-0004", "epoch-0005"]);
        prune(run.path(), 1, &[]);
        assert_eq!(list(run.path()), [root.join("epoch-0005")]);
    }

    #[test]
    fn a_save_after_resuming_an_older_checkpoint_keeps_it_and_sets_the_later_ones_aside() {
        // Epochs 1 to 6 were written; the run resumed from epoch 2 and has
        // just written epoch 3 again. Retention by name alone would keep 5
        // and 6 and delete the new 3.
        let run = tempfile::tempdir().unwrap();
        let root = run.path().join(CHECKPOINTS);
        for epoch in 0..6 {
            std::fs::create_dir_all(root.join(folder_name(epoch))).unwrap();
        }
        std::fs::write(root.join(folder_name(5)).join("marker"), b"abandoned run").unwrap();
        // Were they not set aside (a rename that fails), the one just
        // written would still be kept.
        let unmoved = tempfile::tempdir().unwrap();
        for epoch in 0..6 {
            std::fs::create_dir_all(unmoved.path().join(CHECKPOINTS).join(folder_name(epoch)))
                .unwrap();
        }
        prune(unmoved.path(), 2, &[Some(&folder_name(2))]);
        let left: Vec<String> = list(unmoved.path())
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, ["epoch-0003", "epoch-0005", "epoch-0006"]);

        set_aside(run.path(), &folder_name(2), None, None);
        prune(run.path(), 2, &[Some(&folder_name(2))]);
        assert_eq!(list(run.path()), [root.join("epoch-0002"), root.join("epoch-0003")]);
        let aside: Vec<PathBuf> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with(SET_ASIDE_PREFIX))
            .collect();
        assert_eq!(aside.len(), 1, "one folder of set-aside checkpoints");
        assert_eq!(names(&aside[0]), ["epoch-0004", "epoch-0005", "epoch-0006"]);
        assert_eq!(
            std::fs::read(aside[0].join("epoch-0006").join("marker")).unwrap(),
            b"abandoned run",
            "set aside whole, not deleted"
        );
        // The newest checkpoint written is the newest there is: nothing moves.
        set_aside(run.path(), &folder_name(2), None, None);
        assert_eq!(list(run.path()), [root.join("epoch-0002"), root.join("epoch-0003")]);
        // Mid-epoch names: an epoch end rewritten after a resume from before
        // it sets aside the mid-epoch checkpoints of the next epoch, and a
        // second set-aside in the same second gets a folder of its own.
        for name in ["epoch-0003-update-000000031", "epoch-0004", "epoch-0004-update-000000045"] {
            std::fs::create_dir_all(root.join(name)).unwrap();
        }
        set_aside(run.path(), "epoch-0003-update-000000031", None, None);
        set_aside(run.path(), &folder_name(2), None, None);
        assert_eq!(list(run.path()), [root.join("epoch-0002"), root.join("epoch-0003")]);
        let mut aside: Vec<Vec<String>> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with(SET_ASIDE_PREFIX))
            .map(|folder| names(&folder))
            .collect();
        aside.sort();
        assert_eq!(
            aside,
            [
                vec!["epoch-0003-update-000000031"],
                vec!["epoch-0004", "epoch-0004-update-000000045"],
                vec!["epoch-0004", "epoch-0005", "epoch-0006"],
            ]
        );
    }

    /// Writes the parts of a checkpoint into a staging folder, each saying `what`.
    fn fake_parts(what: &str) -> impl FnMut(&Path) -> Result<(), TrainError> + '_ {
        move |staging: &Path| {
            for part in PARTS {
                std::fs::write(staging.join(part), format!("{part} of {what}")).unwrap();
            }
            Ok(())
        }
    }

    /// A copy of the checkpoint folder `folder` under a staging name, as a
    /// save interrupted between its renames leaves one; checked complete.
    fn copy_under_temporary_name(folder: &Path) -> PathBuf {
        let copy = temporary_sibling(folder).unwrap();
        std::fs::create_dir(&copy).unwrap();
        for entry in std::fs::read_dir(folder).unwrap() {
            let file = entry.unwrap().path();
            std::fs::copy(&file, copy.join(file.file_name().unwrap())).unwrap();
        }
        verify(&copy).unwrap();
        copy
    }

    /// The folders under `checkpoints/abandoned-*/`, by set-aside folder, sorted.
    fn set_aside_folders(run: &Path) -> Vec<Vec<String>> {
        let root = run.join(CHECKPOINTS);
        let mut found: Vec<Vec<String>> = names(&root)
            .into_iter()
            .filter(|n| n.starts_with(SET_ASIDE_PREFIX))
            .map(|n| names(&root.join(n)))
            .collect();
        found.sort();
        found
    }

    #[test]
    fn a_save_that_replaces_a_checkpoint_sets_the_replaced_one_aside() {
        let run = tempfile::tempdir().unwrap();
        let root = run.path().join(CHECKPOINTS);
        for epoch in 0..3 {
            commit(run.path(), &folder_name(epoch), fake_parts("the first run order")).unwrap();
        }
        // Resumed from epoch-0001, the run has trained its second epoch again.
        let written = commit(run.path(), &folder_name(1), fake_parts("the resumed one")).unwrap();
        assert_eq!(written, root.join("epoch-0002"));
        assert_eq!(list(run.path()), [root.join("epoch-0001"), root.join("epoch-0002")]);
        verify(&written).unwrap();
        let model = std::fs::read_to_string(written.join(PARTS[0])).unwrap();
        assert_eq!(model, format!("{} of the resumed one", PARTS[0]));
        // The epoch-0002 it replaced is set aside whole with the epoch-0003
        // after it, never deleted.
        assert_eq!(set_aside_folders(run.path()), [vec!["epoch-0002", "epoch-0003"]]);
        let aside = names(&root).into_iter().find(|n| n.starts_with(SET_ASIDE_PREFIX)).unwrap();
        let old = root.join(aside).join("epoch-0002");
        verify(&old).unwrap();
        let text = std::fs::read_to_string(old.join(PARTS[0])).unwrap();
        assert_eq!(text, format!("{} of the first run order", PARTS[0]));
        // No staging folder or hidden copy is left.
        assert!(names(&root).iter().all(|n| !n.starts_with('.')), "{:?}", names(&root));
    }

    #[test]
    fn retention_sets_aside_a_complete_checkpoint_left_under_a_temporary_name() {
        let run = tempfile::tempdir().unwrap();
        let root = run.path().join(CHECKPOINTS);
        commit(run.path(), &folder_name(0), fake_parts("epoch 1")).unwrap();
        // What a save interrupted after its exchange leaves: the checkpoint
        // it replaced, complete, under the staging name; and a torn staging
        // folder of another interrupted save.
        let replaced = commit(run.path(), &folder_name(1), fake_parts("epoch 2")).unwrap();
        let hidden = root.join(".epoch-0002.tmp-4242");
        std::fs::rename(&replaced, &hidden).unwrap();
        let torn = root.join(".epoch-0003.tmp-4243");
        std::fs::create_dir(&torn).unwrap();
        std::fs::write(torn.join(PARTS[0]), "half").unwrap();
        prune(run.path(), 5, &[]);
        assert_eq!(
            names(&root).iter().filter(|n| n.starts_with('.')).count(),
            0,
            "{:?}",
            names(&root)
        );
        assert_eq!(set_aside_folders(run.path()), [vec!["epoch-0002"]]);
        let aside = names(&root).into_iter().find(|n| n.starts_with(SET_ASIDE_PREFIX)).unwrap();
        verify(&root.join(aside).join("epoch-0002")).unwrap();
    }

    /// A kill in the middle of a save leaves its staging folder, which only
    /// retention after a save that succeeds deletes: on a disk that the
    /// leftover fills, every later save failed. A failed save now deletes
    /// what interrupted saves left, incomplete folders and partial
    /// deletions, and is tried once more; a complete checkpoint left under
    /// a temporary name is kept, and without leftovers a failure is final.
    #[test]
    fn a_save_that_fails_deletes_what_interrupted_saves_left_and_tries_once_more() {
        let run = tempfile::tempdir().unwrap();
        let root = run.path().join(CHECKPOINTS);
        commit(run.path(), &folder_name(0), fake_parts("epoch 1")).unwrap();
        // A save killed while it wrote epoch-0002, and a retention pass
        // killed while it deleted.
        let torn = temporary_sibling(&root.join(folder_name(1))).unwrap();
        std::fs::create_dir(&torn).unwrap();
        std::fs::write(torn.join(PARTS[1]), vec![7u8; 1 << 16]).unwrap();
        let half_deleted = root.join(format!("{DELETING}epoch-0000.1-2"));
        std::fs::create_dir(&half_deleted).unwrap();
        std::fs::write(half_deleted.join(PARTS[0]), "what was left").unwrap();
        // A complete checkpoint under a temporary name: not deleted.
        let complete = copy_under_temporary_name(&root.join(folder_name(0)));
        // The disk is full while the torn folder is there.
        let mut tries = 0;
        let full_while_torn = |staging: &Path| -> Result<(), TrainError> {
            tries += 1;
            if torn.exists() {
                let part = staging.join(PARTS[1]);
                return Err(TrainError::io(part, std::io::Error::from_raw_os_error(28)));
            }
            fake_parts("epoch 2")(staging)
        };
        let written = commit(run.path(), &folder_name(1), full_while_torn).unwrap();
        assert_eq!(tries, 2);
        verify(&written).unwrap();
        assert!(!torn.exists() && !half_deleted.exists(), "{:?}", names(&root));
        assert!(complete.exists(), "a complete checkpoint was deleted: {:?}", names(&root));

        // No leftover to delete: one try, and the failure is said.
        let mut tries = 0;
        let full = |staging: &Path| -> Result<(), TrainError> {
            tries += 1;
            Err(TrainError::io(staging.join(PARTS[0]), std::io::Error::from_raw_os_error(28)))
        };
        let err = commit(run.path(), &folder_name(2), full).unwrap_err();
        assert_eq!(tries, 1);
        assert!(err.to_string().ends_with("; epoch-0002 is intact"), "{err}");
    }

    /// A checkpoint left under a temporary name whose part cannot be read
    /// (here: no read permission, checked by a thread that drops root's
    /// override of file permissions) may be whole: the only copy of one a
    /// save was replacing. Before, retention and a failed save deleted it
    /// like a torn one; now both keep it, and once it reads again it is set
    /// aside like any complete one.
    #[test]
    fn a_folder_an_interrupted_save_left_that_cannot_be_read_is_kept_not_deleted_as_torn() {
        use std::os::unix::fs::PermissionsExt;
        let run = tempfile::tempdir().unwrap();
        let root = run.path().join(CHECKPOINTS);
        let first = commit(run.path(), &folder_name(0), fake_parts("epoch 1")).unwrap();
        commit(run.path(), &folder_name(1), fake_parts("epoch 2")).unwrap();
        let unreadable = copy_under_temporary_name(&first);
        let model = unreadable.join(PARTS[0]);
        std::fs::set_permissions(&model, std::fs::Permissions::from_mode(0o000)).unwrap();

        let (deleted, cannot_read) = std::thread::spawn({
            let (run, root, model) = (run.path().to_path_buf(), root.clone(), model.clone());
            move || {
                drop_file_permission_override();
                let cannot_read = std::fs::read(&model).is_err();
                let deleted = delete_leftovers(&root);
                prune(&run, 5, &[]);
                (deleted, cannot_read)
            }
        })
        .join()
        .unwrap();
        assert!(cannot_read, "the thread could still read {}", model.display());
        assert_eq!(deleted, 0);
        assert!(unreadable.exists(), "deleted as torn: {:?}", names(&root));
        assert_eq!(set_aside_folders(run.path()), Vec::<Vec<String>>::new());

        // Readable again: a whole checkpoint, set aside under its name.
        std::fs::set_permissions(&model, std::fs::Permissions::from_mode(0o644)).unwrap();
        prune(run.path(), 5, &[]);
        assert!(!unreadable.exists(), "{:?}", names(&root));
        assert_eq!(set_aside_folders(run.path()), [vec!["epoch-0001"]]);
    }

    /// Drops, for the calling thread only, the capabilities that let root
    /// read and search files whatever their permissions
    /// (`CAP_DAC_OVERRIDE`, `CAP_DAC_READ_SEARCH`; Linux keeps capabilities
    /// per thread). Nothing to drop for a user without them.
    fn drop_file_permission_override() {
        use nix::libc;
        #[repr(C)]
        struct Header {
            version: u32,
            pid: libc::c_int,
        }
        #[repr(C)]
        #[derive(Clone, Copy, Default)]
        struct Sets {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        const VERSION_3: u32 = 0x2008_0522;
        const DAC_OVERRIDE_AND_READ_SEARCH: u32 = (1 << 1) | (1 << 2);
        let mut header = Header { version: VERSION_3, pid: 0 };
        let mut sets = [Sets::default(); 2];
        // SAFETY: capget and capset read and write the header and the two
        // sets of version 3, which these structs lay out.
        unsafe {
            assert_eq!(libc::syscall(libc::SYS_capget, &mut header, sets.as_mut_ptr()), 0);
            sets[0].effective &= !DAC_OVERRIDE_AND_READ_SEARCH;
            assert_eq!(libc::syscall(libc::SYS_capset, &mut header, sets.as_ptr()), 0);
        }
    }

    #[test]
    fn a_save_leaves_another_writers_staging_folder_alone_and_retention_still_finds_leftovers() {
        let run = tempfile::tempdir().unwrap();
        let root = run.path().join(CHECKPOINTS);
        commit(run.path(), &folder_name(0), fake_parts("epoch 1")).unwrap();
        // Another writer of the same PID (PID 1 in another container) is
        // saving epoch-0002 too.
        let target = root.join(folder_name(1));
        let theirs = temporary_sibling(&target).unwrap();
        std::fs::create_dir(&theirs).unwrap();
        std::fs::write(theirs.join(PARTS[0]), "their save in progress").unwrap();
        commit(run.path(), &folder_name(1), fake_parts("epoch 2")).unwrap();
        let text = std::fs::read_to_string(theirs.join(PARTS[0])).unwrap();
        assert_eq!(text, "their save in progress", "another writer's staging folder was replaced");
        let model = std::fs::read_to_string(target.join(PARTS[0])).unwrap();
        assert_eq!(model, format!("{} of epoch 2", PARTS[0]));

        // Left behind (that writer was killed), the unique names are still
        // a save's leftovers to retention: a torn one deleted, a complete
        // one set aside under its checkpoint's name.
        let complete = temporary_sibling(&root.join(folder_name(2))).unwrap();
        std::fs::rename(
            commit(run.path(), &folder_name(2), fake_parts("epoch 3")).unwrap(),
            &complete,
        )
        .unwrap();
        prune(run.path(), 5, &[]);
        assert_eq!(
            names(&root).iter().filter(|n| n.starts_with('.')).count(),
            0,
            "{:?}",
            names(&root)
        );
        assert_eq!(set_aside_folders(run.path()), [vec!["epoch-0003"]]);
    }

    #[test]
    fn a_save_sets_aside_by_run_order_also_past_four_digits_of_epochs() {
        let run = tempfile::tempdir().unwrap();
        let root = run.path().join(CHECKPOINTS);
        // epoch-9998, epoch-9999, epoch-10000: a run that goes on sets
        // nothing aside, though `epoch-10000` sorts first by name.
        for epoch in 9997..10_000 {
            commit(run.path(), &folder_name(epoch), fake_parts("the first run order")).unwrap();
        }
        assert_eq!(folder_name(9999), "epoch-10000");
        assert_eq!(set_aside_folders(run.path()), Vec::<Vec<String>>::new());
        let order: Vec<PathBuf> =
            ["epoch-9998", "epoch-9999", "epoch-10000"].iter().map(|n| root.join(n)).collect();
        assert_eq!(list(run.path()), order);
        // Resumed from epoch-9998, a mid-epoch save sets aside both later
        // epoch ends, the five-digit one included.
        let mid = mid_epoch_folder_name(9998, 123);
        commit(run.path(), &mid, fake_parts("the resumed one")).unwrap();
        assert_eq!(set_aside_folders(run.path()), [vec!["epoch-10000", "epoch-9999"]]);
        assert_eq!(list(run.path()), [root.join("epoch-9998"), root.join(&mid)]);
    }

    #[test]
    fn a_failed_save_leaves_nothing_behind_and_names_the_intact_checkpoint() {
        let run = tempfile::tempdir().unwrap();
        let root = run.path().join(CHECKPOINTS);
        let full_disk = |staging: &Path| -> Result<(), TrainError> {
            let part = staging.join(PARTS[1]);
            std::fs::write(&part, b"half of the mom").unwrap();
            Err(TrainError::io(part, std::io::Error::from_raw_os_error(28)))
        };
        let err = commit(run.path(), &folder_name(0), full_disk).unwrap_err();
        assert_eq!(
            err.to_string(),
            "checkpoint epoch-0001 not written (optimizer.safetensors: No space left on device \
             (os error 28)); no earlier checkpoint"
        );
        assert!(names(&root).is_empty(), "left behind: {:?}", names(&root));

        commit(run.path(), &folder_name(0), fake_parts("epoch 1")).unwrap();
        let err = commit(run.path(), &folder_name(1), full_disk).unwrap_err();
        assert!(matches!(err, TrainError::CheckpointNotWritten { .. }), "{err}");
        assert!(err.to_string().ends_with("; epoch-0001 is intact"), "{err}");
        assert_eq!(names(&root), ["epoch-0001"]);

        // Writing an epoch again: the checkpoint of that name is still the old one.
        commit(run.path(), &folder_name(1), fake_parts("epoch 2")).unwrap();
        let err = commit(run.path(), &folder_name(1), full_disk).unwrap_err();
        assert!(err.to_string().ends_with("; the earlier epoch-0002 is intact"), "{err}");
        assert_eq!(names(&root), ["epoch-0001", "epoch-0002"]);
        let model = std::fs::read_to_string(root.join("epoch-0002").join(PARTS[0])).unwrap();
        assert_eq!(model, format!("{} of epoch 2", PARTS[0]));
        // A corrupt one is not called intact: the one before is named.
        std::fs::write(root.join("epoch-0002").join(PARTS[0]), "flipped").unwrap();
        let err = commit(run.path(), &folder_name(2), full_disk).unwrap_err();
        assert!(err.to_string().ends_with("; epoch-0001 is intact"), "{err}");
        // A writer that names its temporary file: the part's name is said.
        let writer_fails = |staging: &Path| {
            atomic_file::write_with(&staging.join(PARTS[0]), |staged| {
                Err(TrainError::io(staged, std::io::Error::from_raw_os_error(28)))
            })
        };
        let err = commit(run.path(), &folder_name(2), writer_fails).unwrap_err();
        assert_eq!(
            err.to_string(),
            "checkpoint epoch-0003 not written (model.safetensors: No space left on device \
             (os error 28)); epoch-0001 is intact"
        );
    }

    /// The model and optimizer of the tiny CPU debug recipe (a ResNet-18).
    fn tiny_model() -> (Model, Lamb) {
        let yaml = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../recipes/debug/resnet18_tiny_cpu.yaml");
        let recipe = rsb_recipes::load(&yaml, &[]).unwrap();
        let model = crate::from_recipe::model(&recipe, tch::Device::Cpu).unwrap();
        let optimizer = crate::from_recipe::optimizer(&recipe, &model).unwrap();
        (model, optimizer)
    }

    #[test]
    fn the_records_before_a_checkpoint_are_synced_before_it_is_committed() {
        let (model, optimizer) = tiny_model();
        let run = tempfile::tempdir().unwrap();
        let root = run.path().join(CHECKPOINTS);
        let at = |next_epoch, next_step, updates| TrainState {
            next_epoch,
            next_step,
            updates,
            model: "resnet18".into(),
            ..state(None)
        };
        // What the checkpoints folder held at each sync of the records.
        let mut seen_at_sync: Vec<Vec<String>> = Vec::new();
        let committed: Vec<PathBuf> = [at(1, 0, 10), at(1, 4, 14)]
            .iter()
            .map(|state| {
                save(run.path(), &model, &optimizer, state, 5, || {
                    // The first sync comes before `checkpoints/` exists.
                    seen_at_sync.push(if root.exists() { names(&root) } else { Vec::new() });
                    Ok(())
                })
                .unwrap()
            })
            .collect();
        // One sync per save, the epoch end's and a mid-epoch one's, each
        // before its checkpoint was in place.
        assert_eq!(seen_at_sync.len(), 2, "{seen_at_sync:?}");
        assert!(seen_at_sync[0].iter().all(|n| !n.starts_with(FOLDER_PREFIX)), "{seen_at_sync:?}");
        assert!(!seen_at_sync[1].contains(&"epoch-0001-update-000000014".to_string()));
        assert_eq!(list(run.path()), committed);

        // A sync that fails stops the save: no checkpoint claims records
        // that may be lost; the error names the log and the intact one.
        // Leftovers of a killed save do not make it try (and sync) again:
        // after a failed fsync, another may succeed on data never written.
        let log = run.path().join("metrics.jsonl");
        let torn = temporary_sibling(&root.join("epoch-0002")).unwrap();
        std::fs::create_dir(&torn).unwrap();
        let mut syncs = 0;
        let err = save(run.path(), &model, &optimizer, &at(2, 0, 20), 5, || {
            syncs += 1;
            Err(TrainError::io(&log, std::io::Error::from_raw_os_error(5)))
        })
        .unwrap_err();
        assert_eq!(syncs, 1);
        std::fs::remove_dir(&torn).unwrap();
        assert!(matches!(err, TrainError::CheckpointNotWritten { .. }), "{err}");
        let message = err.to_string();
        assert!(message.contains(&log.display().to_string()), "{message}");
        assert!(message.ends_with("; epoch-0001-update-000000014 is intact"), "{message}");
        assert_eq!(list(run.path()), committed);
        assert!(names(&root).iter().all(|n| !n.starts_with('.')), "{:?}", names(&root));
    }

    #[test]
    fn a_mid_epoch_checkpoint_round_trips_and_is_resumed_before_the_epoch_end_before_it() {
        let build = tiny_model;
        let (model, mut optimizer) = build();
        tch::manual_seed(7);
        for (_, p) in model.named_parameters() {
            let _guard = tch::no_grad_guard();
            p.shallow_clone().f_copy_(&p.f_rand_like().unwrap()).unwrap();
        }
        let groups = optimizer.steps().unwrap().group_steps.len();
        let steps = LambSteps { group_steps: vec![13; groups] };
        optimizer.load_steps(&steps).unwrap();
        let run = tempfile::tempdir().unwrap();
        let end = TrainState {
            next_epoch: 1,
            next_step: 0,
            updates: 10,
            model: "resnet18".into(),
            ..state(None)
        };
        let end_path = save(run.path(), &model, &optimizer, &end, 5, || Ok(())).unwrap();
        let mid = TrainState {
            next_epoch: 1,
            next_step: 3,
            updates: 13,
            optimizer: steps.clone(),
            replaced_samples: 2,
            epoch_so_far: EpochSoFar { loss_sum: 1.25, updates: 3, skipped: 1 },
            nonfinite_streak: 1,
            scaler: Some(ScalerState {
                scale: 16384.0,
                growth_factor: 2.0,
                backoff_factor: 0.5,
                growth_interval: 2000,
                growth_tracker: 7,
            }),
            model: "resnet18".into(),
            ..state(Some(0))
        };
        let mid_path = save(run.path(), &model, &optimizer, &mid, 5, || Ok(())).unwrap();
        assert_eq!(end_path.file_name().unwrap(), "epoch-0001");
        assert_eq!(mid_path.file_name().unwrap(), "epoch-0001-update-000000013");
        assert_eq!(list(run.path()), [end_path, mid_path.clone()]);

        // A run folder resumes from its newest checkpoint: the mid-epoch one.
        let verified = resolve(run.path()).unwrap();
        assert_eq!(verified.path(), mid_path);
        let (mut fresh, mut fresh_optimizer) = build();
        let back = load(&verified, &mut fresh, &mut fresh_optimizer).unwrap();
        assert_eq!(back, mid);
        assert_eq!(fresh_optimizer.steps().unwrap(), steps);
        for ((name, a), (_, b)) in model.named_parameters().iter().zip(fresh.named_parameters()) {
            assert!(a.equal(b), "{name} differs after the round trip");
        }
    }
}
