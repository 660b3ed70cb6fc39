//! The rules a run folder keeps, shared by `worker train` and `coordinator
//! up` (neither needs libtorch for them):
//!
//! * [`check_out_folder`]: an `--out` that already holds a run is only
//!   continued, never silently mixed with another: without `--resume` it is
//!   refused, and so is a `--resume` of a checkpoint from outside it (which
//!   would interleave two runs' recipes, metrics and checkpoints there).
//! * [`auto_resume`]: `--auto-resume`, for a job a scheduler may start
//!   again (a Slurm requeue, a re-applied Kubernetes Job): the run in `--out`
//!   continues from its newest intact checkpoint, or starts when there is
//!   none, its earlier records set aside.
//! * [`RunFolderLock`]: the one process that writes a run folder's
//!   checkpoints (`worker train`, or rank 0 of a job) holds an exclusive lock
//!   on its [`LOCK_FILE`] while it runs, so a second trainer started on the
//!   same folder fails at once instead of breaking the first one's saves.
//! * [`write_resolved_recipe`]: `OUT/recipe.yaml` is the run's resolved
//!   recipe; a different file found there (a recipe kept in the run
//!   folder, an earlier start's) is moved aside, never lost.
//! * [`compare_recipes`] / [`check_resumed_recipe`]: a resumed run uses the
//!   recipe its checkpoint was trained with. Every field that differs
//!   (compared field by field, as dotted paths like `optimizer.lamb.lr`) must
//!   be explained by a `--set` of that field; the explained ones are logged,
//!   any other refuses the resume with the list. Only [`HOST_FIELDS`] (what
//!   each host sets for itself, which changes no result) are not compared.

use crate::checkpoint::{self, CheckpointError, VerifiedCheckpoint, CHECKPOINTS};
use nix::fcntl::{Flock, FlockArg};
use rsb_recipes::Recipe;
use serde_json::Value;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Key of the resolved recipe (the whole [`Recipe`] as JSON) in a
/// checkpoint's `state.json`.
pub const STATE_RECIPE_KEY: &str = "resolved_recipe";

/// Fields each host may set for itself, which change no result: they are
/// not compared. `worker join` gives a recipe's `data.loader_threads: 0` the
/// host's share of cores, so rank 0 saves its own value.
pub const HOST_FIELDS: [&str; 1] = ["data.loader_threads"];

/// The run's resolved recipe in its run folder.
pub const RESOLVED_RECIPE: &str = "recipe.yaml";

/// Whether `folder` holds a run's records or checkpoints.
pub fn holds_run(folder: &Path) -> bool {
    run_marker(folder).is_some()
}

/// Writes `yaml`, the run's resolved recipe, to `OUT/recipe.yaml`. Where
/// the folder held no run before this start (`held_run`, [`holds_run`]
/// asked before the start wrote there), a different file already there (a
/// recipe its user keeps in the run folder and trains with, or the recipe
/// of a start whose records `--auto-resume` set aside) is not lost: it is
/// moved to `OUT/recipe-replaced-<unix seconds>.yaml`, with a warning
/// naming it, and its path returned. A run's own, replaced as it is
/// resumed with other settings, is in each of its checkpoints.
pub fn write_resolved_recipe(
    out: &Path,
    yaml: &str,
    held_run: bool,
) -> std::io::Result<Option<PathBuf>> {
    let path = out.join(RESOLVED_RECIPE);
    let kept = match std::fs::read(&path) {
        Ok(before) if before == yaml.as_bytes() => return Ok(None),
        Ok(_) if held_run => None,
        Ok(_) => {
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let mut aside = out.join(format!("recipe-replaced-{secs}.yaml"));
            let mut n = 1;
            while aside.exists() {
                aside = out.join(format!("recipe-replaced-{secs}-{n}.yaml"));
                n += 1;
            }
            std::fs::rename(&path, &aside)?;
            tracing::warn!(
                "{} held another recipe; it is kept as {}, and the run's resolved recipe is \
                 written in its place",
                path.display(),
                aside.display()
            );
            Some(aside)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    rsb_files::write_atomically(&path, yaml.as_bytes(), rsb_files::Readers::Everyone)?;
    Ok(kept)
}

/// What a folder holds that shows a run was there (in the order checked).
const RUN_MARKERS: [&str; 3] = ["metrics.jsonl", CHECKPOINTS, "ranks"];

/// The records a rank writes into its own file in a job's run folder
/// (every record it makes; rank 0 also reports them to the coordinator,
/// which writes the job's `metrics.jsonl`).
pub fn rank_records_file(run_dir: &Path, rank: usize) -> PathBuf {
    run_dir.join(rank_records_name(rank))
}

/// [`rank_records_file`] within its run folder: `ranks/rank-N.jsonl`.
pub fn rank_records_name(rank: usize) -> String {
    format!("ranks/rank-{rank}.jsonl")
}

/// The file of a run folder that its checkpoint writer holds locked
/// ([`RunFolderLock`]); it names the holder (process id and host).
pub const LOCK_FILE: &str = "writer.lock";

/// The file of a run or sweep folder that its coordinator holds locked
/// while it runs (beside [`LOCK_FILE`], which a `--local` job's rank 0
/// holds in the same folder): a second `coordinator up` on the folder is
/// refused before it writes there.
pub const COORDINATOR_LOCK_FILE: &str = "coordinator.lock";

/// How long `--auto-resume` waits for the run folder's writer lock before
/// it chooses where the run continues: a rank 0 of the run's earlier start
/// that is still stopping (a re-applied Kubernetes Job whose old pods are
/// terminating) writes its stop checkpoint within its 90 s stop deadline,
/// and is killed 100 s after its stop at the latest.
pub const AUTO_RESUME_LOCK_WAIT: Duration = Duration::from_secs(120);

/// How long [`RunFolderLock::acquire`] waits for a lock held by another
/// process by default: long enough for a killed process of the generation
/// before (a restarted job's old rank 0) to finish exiting, which releases
/// its lock, short enough that a second trainer is refused at once.
pub const LOCK_WAIT: Duration = Duration::from_secs(10);

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

impl FieldChange {
    /// `field (SAVED_IN value, now value)`: `saved_in` names what the saved
    /// value belongs to (`checkpoint`, `run`).
    pub fn describe(&self, saved_in: &str) -> String {
        let show = |v: &Option<Value>| v.as_ref().map_or_else(|| "absent".into(), Value::to_string);
        format!("{} ({saved_in} {}, now {})", self.field, show(&self.saved), show(&self.now))
    }
}

impl std::fmt::Display for FieldChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe("checkpoint"))
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
    /// `--out` holds a run and `--resume` names a checkpoint from outside it.
    #[error(
        "{out} already holds a run ({marker} is there), and --resume {resume} is not one of its \
         checkpoints: continuing another run there would mix the two runs' recipes, metrics and \
         checkpoints. Choose a fresh --out to continue {resume}, or resume {out} from its own \
         checkpoint (`--resume {out}`)"
    )]
    ResumeOfAnotherRun {
        /// The run folder (`--out`).
        out: PathBuf,
        /// The checkpoint or run folder to resume (`--resume`).
        resume: PathBuf,
        /// What shows the run in `out` (`metrics.jsonl`, `checkpoints`, `ranks`).
        marker: &'static str,
    },
    /// Another process holds the run folder's lock: it writes there.
    #[error(
        "{run} is in use: another process ({holder}) holds {lock} and writes there; two \
         processes writing one run folder break each other's files (checkpoints, metrics, the \
         job's state). Let it finish (or stop it), or choose another --out"
    )]
    InUse {
        /// The run folder.
        run: PathBuf,
        /// Its lock file.
        lock: PathBuf,
        /// Who holds the lock, as it wrote itself into the lock file
        /// (`pid 123 on host-a`), or `unknown`.
        holder: String,
    },
    /// The lock file cannot be created or locked.
    // `error` is shown in the message, not chained as a source, so `{:#}`
    // does not print it twice.
    #[error("{lock}: cannot lock the run folder: {error}")]
    Lock {
        /// The lock file.
        lock: PathBuf,
        /// The cause.
        error: std::io::Error,
    },
    /// `--auto-resume` found a run without a checkpoint and could not set
    /// its records aside to start it again.
    // `error` is shown in the message, not chained as a source, so `{:#}`
    // does not print it twice.
    #[error(
        "{run} holds a run without a checkpoint, and its records cannot be set aside into \
         {folder} to start it again: {error}"
    )]
    SetAside {
        /// The run folder.
        run: PathBuf,
        /// The set-aside folder.
        folder: PathBuf,
        /// The cause.
        error: std::io::Error,
    },
    /// `--auto-resume` found no checkpoint, but could not read the run's
    /// checkpoints folder or an entry of it: the run is not started again
    /// while its checkpoints may be there.
    // `error` is shown in the message, not chained as a source, so `{:#}`
    // does not print it twice.
    #[error(
        "{path} {problem}: --auto-resume does not start the run in {run} again while its \
         checkpoints may be there (a network file system's error, a volume not mounted); mend \
         or move it and start again"
    )]
    CheckpointsUnreadable {
        /// The run folder.
        run: PathBuf,
        /// The folder or entry.
        path: PathBuf,
        /// What is wrong with it: `cannot be read (<the cause>)`, or that it
        /// is named as a checkpoint but is not a folder.
        problem: String,
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

/// Refuses an `--out` folder that already holds a run unless that run is
/// being resumed: `resume` given, and inside `out` (its run folder, one of
/// its checkpoints). An absent or empty folder, or one with only unrelated
/// files (or only a `recipe.yaml`, from a run that stopped before its first
/// record), is a new run folder, which may continue any checkpoint.
pub fn check_out_folder(out: &Path, resume: Option<&Path>) -> Result<(), RunFolderError> {
    let Some(marker) = run_marker(out) else { return Ok(()) };
    match resume {
        None => Err(RunFolderError::HoldsAnotherRun { path: out.to_path_buf(), marker }),
        Some(resume) if is_within(resume, out) => Ok(()),
        Some(resume) => Err(RunFolderError::ResumeOfAnotherRun {
            out: out.to_path_buf(),
            resume: resume.to_path_buf(),
            marker,
        }),
    }
}

/// The records of a run that [`auto_resume`] sets aside when it starts a
/// run again, so that the new start's are not mixed with them: the sample
/// traces, the ranks' own records and logs (`ranks/rank-N.jsonl`, `.log`)
/// and the metrics log, moved in this order: the metrics log, which marks
/// the folder as holding a run, goes last, so that a move that fails
/// part-way is finished by the next start.
const RECORDS: [&str; 3] = ["samples", "ranks", "metrics.jsonl"];

/// What [`auto_resume`] made of a run folder.
#[derive(Debug)]
pub enum AutoResume {
    /// The folder holds no run: the run starts.
    Start,
    /// The run continues from its newest intact checkpoint.
    Resume(VerifiedCheckpoint),
    /// The folder held a run that wrote no checkpoint (stopped within its
    /// first checkpoint interval): it starts again from the beginning, and
    /// the records of the earlier start were moved into `set_aside`.
    StartAgain {
        /// The `abandoned-<unix seconds>` folder under the run folder (none
        /// when there were no records to move).
        set_aside: Option<PathBuf>,
        /// The names moved there.
        moved: Vec<&'static str>,
    },
}

impl AutoResume {
    /// The checkpoint the run continues from, if it continues.
    pub fn checkpoint(&self) -> Option<&Path> {
        match self {
            AutoResume::Resume(verified) => Some(verified.path()),
            AutoResume::Start | AutoResume::StartAgain { .. } => None,
        }
    }
}

impl std::fmt::Display for AutoResume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AutoResume::Start => write!(f, "--auto-resume: no run there yet; starting it"),
            AutoResume::Resume(verified) => {
                write!(f, "--auto-resume: continuing from {}", verified.path().display())
            }
            AutoResume::StartAgain { set_aside, moved } => {
                write!(f, "--auto-resume: the run there wrote no checkpoint; starting it again")?;
                match set_aside {
                    Some(folder) => write!(
                        f,
                        " (its earlier {} moved to {})",
                        moved.join(", "),
                        folder.display()
                    ),
                    None => Ok(()),
                }
            }
        }
    }
}

/// `--auto-resume`: what a job that a scheduler may start again (a Slurm
/// requeue after a time limit, a preemption or a failed node; a Kubernetes
/// Job applied again) does with its `--out` folder, with the same command
/// line each time. The run there continues from its newest intact
/// checkpoint (as `--resume OUT`, the recipe checked against the
/// checkpoint's); an absent or empty folder starts the run; a run that
/// wrote no checkpoint yet starts again, its records ([`RECORDS`]) moved
/// into `OUT/abandoned-<unix seconds>/` so that the new records are not
/// mixed with them. A run whose every checkpoint is torn or corrupt is
/// refused, as a recipe that differs from the checkpoint's, and one whose
/// checkpoints folder cannot be read: starting such a run over would hide
/// its failure, or lose its checkpoints. Call it with the run folder's
/// [`RunFolderLock`] held, so that no writer of the run's earlier start (a
/// rank 0 still stopping) adds a checkpoint or a record meanwhile.
pub fn auto_resume(
    out: &Path,
    now: &Recipe,
    overrides: &[String],
) -> Result<AutoResume, RunFolderError> {
    if run_marker(out).is_none() {
        return Ok(AutoResume::Start);
    }
    match check_resume(out, now, overrides) {
        Ok(verified) => Ok(AutoResume::Resume(verified)),
        Err(RunFolderError::Checkpoint(CheckpointError::NotFound { .. })) => {
            confirm_no_checkpoint_folders(out)?;
            start_again(out)
        }
        Err(refused) => Err(refused),
    }
}

/// Checks that the run in `out` has no checkpoint folder that
/// [`checkpoint::list`] (which skips what it cannot read) missed: its
/// checkpoints folder is absent, or reads without error and holds nothing
/// named like a checkpoint. An error names what could not be read, or the
/// entry that is not a readable folder.
pub fn confirm_no_checkpoint_folders(out: &Path) -> Result<(), RunFolderError> {
    let folder = out.join(CHECKPOINTS);
    let unreadable = |path: &Path, problem: String| RunFolderError::CheckpointsUnreadable {
        run: out.to_path_buf(),
        path: path.to_path_buf(),
        problem,
    };
    let cannot_read = |error: std::io::Error| format!("cannot be read ({error})");
    // The folder itself, not where a symbolic link points: a link to a
    // volume that is not mounted is not an absent folder.
    match std::fs::symlink_metadata(&folder) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(unreadable(&folder, cannot_read(e))),
        Ok(_) => {}
    }
    let entries = std::fs::read_dir(&folder).map_err(|e| unreadable(&folder, cannot_read(e)))?;
    for entry in entries {
        let entry = entry.map_err(|e| unreadable(&folder, cannot_read(e)))?;
        let path = entry.path();
        // Named as `checkpoint::list` reads checkpoints (`epoch-0003-copy`
        // is none, there as here).
        let named_as_checkpoint = entry
            .file_name()
            .to_str()
            .is_some_and(|name| checkpoint::RunOrder::of_name(name).is_some());
        if named_as_checkpoint {
            let problem = match std::fs::metadata(&path) {
                Err(e) => cannot_read(e),
                Ok(m) if !m.is_dir() => "is named as a checkpoint but is not a folder".to_string(),
                Ok(_) => "is a checkpoint folder that could not be listed".to_string(),
            };
            return Err(unreadable(&path, problem));
        }
    }
    Ok(())
}

/// Moves the [`RECORDS`] of a run without a checkpoint into a new
/// set-aside folder of `out`.
fn start_again(out: &Path) -> Result<AutoResume, RunFolderError> {
    let moved: Vec<&'static str> =
        RECORDS.into_iter().filter(|name| out.join(name).exists()).collect();
    if moved.is_empty() {
        return Ok(AutoResume::StartAgain { set_aside: None, moved });
    }
    let (set_aside, made) = checkpoint::new_set_aside_folder(out);
    let failed = |error| RunFolderError::SetAside {
        run: out.to_path_buf(),
        folder: set_aside.clone(),
        error,
    };
    made.map_err(failed)?;
    for name in &moved {
        std::fs::rename(out.join(name), set_aside.join(name)).map_err(failed)?;
    }
    for folder in [&set_aside, out] {
        std::fs::File::open(folder).and_then(|f| f.sync_all()).map_err(failed)?;
    }
    Ok(AutoResume::StartAgain { set_aside: Some(set_aside), moved })
}

/// The first of [`RUN_MARKERS`] that `folder` holds (a folder counts when
/// it is not empty), if any.
fn run_marker(folder: &Path) -> Option<&'static str> {
    RUN_MARKERS.into_iter().find(|marker| {
        let path = folder.join(marker);
        if path.is_dir() {
            std::fs::read_dir(&path).map(|mut d| d.next().is_some()).unwrap_or(true)
        } else {
            // A symbolic link counts where it points nowhere (a volume not
            // mounted): a run's checkpoints may be there.
            path.symlink_metadata().is_ok()
        }
    })
}

/// Whether `inner` is `outer` or lies under it, symbolic links resolved
/// (compared as given, made absolute, where a path does not exist).
fn is_within(inner: &Path, outer: &Path) -> bool {
    let resolved = |path: &Path| {
        path.canonicalize().or_else(|_| std::path::absolute(path)).unwrap_or(path.to_path_buf())
    };
    resolved(inner).starts_with(resolved(outer))
}

/// The exclusive lock of a run folder's checkpoint writer, held while the
/// value lives (the kernel also releases it when the process dies). Only
/// the process that writes checkpoints and metrics takes it: `worker
/// train`, or rank 0 of a job (its other ranks share the folder for their
/// own logs). A `flock` on a network file system may outlive a crashed
/// host by the server's lease, after which a new holder gets it.
#[derive(Debug)]
pub struct RunFolderLock {
    /// The locked file (`None` while dropping, or where the file system
    /// cannot lock files).
    file: Option<Flock<std::fs::File>>,
    /// Its path.
    path: PathBuf,
}

impl RunFolderLock {
    /// Creates `run_dir` (if need be) and locks its [`LOCK_FILE`], trying
    /// again for up to `wait` while another process holds it (a killed one
    /// that is still exiting), then fails naming the holder.
    pub fn acquire(run_dir: &Path, wait: Duration) -> Result<RunFolderLock, RunFolderError> {
        Self::acquire_file(run_dir, LOCK_FILE, wait)
    }

    /// As [`Self::acquire`], of the lock file `file` of `run_dir` (the
    /// coordinator's: [`COORDINATOR_LOCK_FILE`]).
    pub fn acquire_file(
        run_dir: &Path,
        file: &str,
        wait: Duration,
    ) -> Result<RunFolderLock, RunFolderError> {
        Self::acquire_file_until(run_dir, file, wait, &|| None, "")
    }

    /// As [`Self::acquire`], giving up before `wait` is over where
    /// `give_up_at` says so. It is asked at every try, so that a limit that
    /// comes during the wait (a stop requested meanwhile, whose process
    /// ends at a deadline of its own) cuts the wait short; the first time
    /// it does, the wait left is logged, saying `why`. It never lengthens
    /// the wait.
    pub fn acquire_until(
        run_dir: &Path,
        wait: Duration,
        give_up_at: &dyn Fn() -> Option<Instant>,
        why: &str,
    ) -> Result<RunFolderLock, RunFolderError> {
        Self::acquire_file_until(run_dir, LOCK_FILE, wait, give_up_at, why)
    }

    /// The lock file `file` of `run_dir`, waited for up to `wait`, or
    /// until `give_up_at`, whichever comes first.
    fn acquire_file_until(
        run_dir: &Path,
        file: &str,
        wait: Duration,
        give_up_at: &dyn Fn() -> Option<Instant>,
        why: &str,
    ) -> Result<RunFolderLock, RunFolderError> {
        let path = run_dir.join(file);
        let lock_error = |error| RunFolderError::Lock { lock: path.clone(), error };
        std::fs::create_dir_all(run_dir).map_err(lock_error)?;
        // A FIFO or a device is no lock file: its holder's name could not be
        // read back (a FIFO waits for a writer) nor written. Nor is a
        // symbolic link, which is never followed: the holder's name would
        // overwrite the file it points to, outside the run folder (one
        // planted in a shared folder), or create it.
        match std::fs::symlink_metadata(&path) {
            Ok(metadata) if metadata.file_type().is_symlink() => {
                return Err(lock_error(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "a symbolic link, not a lock file: it is never followed (remove it)",
                )));
            }
            Ok(metadata) if !metadata.is_file() => {
                return Err(lock_error(rsb_files::not_a_regular_file()));
            }
            _ => {}
        }
        // A link made after the check above is not followed either.
        let mut file = open_lock_file(&path).map_err(lock_error)?;
        let deadline = Instant::now() + wait;
        let mut waiting_logged = false;
        let mut cut_logged = false;
        let mut locked = loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(locked) => break locked,
                Err((unlocked, nix::errno::Errno::EWOULDBLOCK)) => {
                    let cut = give_up_at().filter(|at| *at < deadline);
                    if let (Some(at), false) = (cut, cut_logged) {
                        tracing::warn!(
                            lock = %path.display(),
                            "{why}: waiting for the run folder's lock {}s more at most",
                            at.saturating_duration_since(Instant::now()).as_secs()
                        );
                        cut_logged = true;
                    }
                    if Instant::now() >= cut.unwrap_or(deadline) {
                        return Err(RunFolderError::InUse {
                            run: run_dir.to_path_buf(),
                            lock: path.clone(),
                            holder: lock_holder(&path),
                        });
                    }
                    if !waiting_logged {
                        tracing::info!(
                            lock = %path.display(),
                            "another process holds the run folder's lock; waiting up to {wait:?}"
                        );
                        waiting_logged = true;
                    }
                    file = unlocked;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err((_, errno @ (nix::errno::Errno::ENOLCK | nix::errno::Errno::EOPNOTSUPP))) => {
                    // A file system without locks (an NFS mount whose lock
                    // service is down): training must not fail for it.
                    tracing::warn!(
                        lock = %path.display(),
                        %errno,
                        "the run folder's file system cannot lock files; a second trainer \
                         started on this folder would not be refused"
                    );
                    return Ok(RunFolderLock { file: None, path });
                }
                Err((_, errno)) => return Err(lock_error(errno.into())),
            }
        };
        // Who holds it, for the message of the next one that tries.
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "this host".to_string());
        let holder = format!("pid {} on {host}\n", std::process::id());
        locked.set_len(0).and_then(|()| locked.write_all(holder.as_bytes())).map_err(lock_error)?;
        Ok(RunFolderLock { file: Some(locked), path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Opens (or creates) the lock file `path` to read and write, never
/// following a symbolic link (`O_NOFOLLOW`: a link there fails to open).
fn open_lock_file(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(path)
}

/// Who holds the lock file `path`, as the holder wrote itself into it
/// (`pid 123 on host-a`), or `unknown`: also when it is no regular file,
/// which is never opened (a FIFO would wait for a writer for ever).
fn lock_holder(path: &Path) -> String {
    rsb_files::read_regular_file(path)
        .ok()
        .map(|text| text.trim().to_string())
        .filter(|text| !text.is_empty())
        .unwrap_or_else(|| "unknown".to_string())
}

impl Drop for RunFolderLock {
    fn drop(&mut self) {
        // Unlocked explicitly: nix's own drop panics when unlocking fails.
        if let Some(Err((still_locked, errno))) = self.file.take().map(Flock::unlock) {
            tracing::warn!(lock = %self.path.display(), %errno, "could not unlock the run folder; it is unlocked when this process exits");
            std::mem::forget(still_locked);
        }
    }
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

/// The checkpoint that ends the run of `recipe` in `run_dir`, when its
/// newest committed checkpoint is that one: the run is over. It must end
/// the recipe's last epoch, have been trained with `recipe` (every field
/// but the [`HOST_FIELDS`] the same: not another run's end left in the
/// folder), and be intact as a resume checks it ([`checkpoint::verify`]:
/// the one checkpoint hashed, only when it is the end). `None` otherwise;
/// torn ones, and a state that cannot be read, are logged. The candidate is
/// found with [`checkpoint::verify_committed`], which hashes no weights.
pub fn finished_run(
    run_dir: &Path,
    recipe: &Recipe,
) -> Option<(VerifiedCheckpoint, checkpoint::RunPosition)> {
    let newest = checkpoint::list(run_dir).into_iter().rev().find(|candidate| {
        checkpoint::verify_committed(candidate)
            .inspect_err(|reason| {
                tracing::warn!(checkpoint = %candidate.display(), %reason, "a torn checkpoint")
            })
            .is_ok()
    })?;
    let why_not = |reason: String| {
        tracing::warn!(checkpoint = %newest.display(), "not taken for the run's end: {reason}");
    };
    let position = match checkpoint::read_position(&newest) {
        Ok(position) if position.ends_run_of(recipe.total_epochs()) => position,
        Ok(_) => return None,
        Err(e) => {
            why_not(e.to_string());
            return None;
        }
    };
    let Some(saved) = &position.resolved_recipe else {
        why_not("its state does not record its recipe".into());
        return None;
    };
    if let Err(e) = check_resumed_recipe(&newest, saved, recipe, &[]) {
        why_not(e.to_string());
        return None;
    }
    match checkpoint::verify(&newest) {
        Ok(_) => Some((VerifiedCheckpoint(newest), position)),
        Err(e) => {
            why_not(e.to_string());
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recipe_kept_in_the_run_folder_is_moved_aside_not_overwritten() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path();
        // An empty folder, then the same resolved recipe again: no copy.
        assert_eq!(write_resolved_recipe(out, "name: resolved\n", holds_run(out)).unwrap(), None);
        assert_eq!(write_resolved_recipe(out, "name: resolved\n", holds_run(out)).unwrap(), None);
        assert_eq!(std::fs::read_dir(out).unwrap().count(), 1);
        // The user's own recipe, with their notes, trained with --out here.
        std::fs::write(out.join(RESOLVED_RECIPE), "# my notes\nname: mine\n").unwrap();
        let kept = write_resolved_recipe(out, "name: resolved\n", holds_run(out)).unwrap().unwrap();
        assert_eq!(std::fs::read_to_string(&kept).unwrap(), "# my notes\nname: mine\n");
        assert_eq!(std::fs::read_to_string(out.join(RESOLVED_RECIPE)).unwrap(), "name: resolved\n");
        // Another start resolved with other settings, in the same second.
        let again = write_resolved_recipe(out, "name: other\n", holds_run(out)).unwrap().unwrap();
        assert_ne!(again, kept);
        assert_eq!(std::fs::read_to_string(&again).unwrap(), "name: resolved\n");
        assert_eq!(std::fs::read_to_string(&kept).unwrap(), "# my notes\nname: mine\n");
        // A run resumed with other settings: its recipe is in its
        // checkpoints, and is replaced.
        std::fs::write(out.join("metrics.jsonl"), "").unwrap();
        assert_eq!(write_resolved_recipe(out, "name: resumed\n", holds_run(out)).unwrap(), None);
        assert_eq!(std::fs::read_to_string(out.join(RESOLVED_RECIPE)).unwrap(), "name: resumed\n");
        assert_eq!(std::fs::read_dir(out).unwrap().count(), 4);
    }

    fn tiny_recipe(overrides: &[String]) -> Recipe {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../recipes/debug/resnet18_tiny_cpu.yaml");
        rsb_recipes::load(&root, overrides).unwrap()
    }

    /// A run is over when its newest committed checkpoint ends the last
    /// epoch of the recipe it was trained with, and is intact.
    #[test]
    fn a_run_is_over_when_its_newest_committed_checkpoint_ends_its_recipes_last_epoch() {
        use crate::checkpoint::tests::committed_with_state;
        let recipe = tiny_recipe(&["schedule.cosine.epochs=3".into()]);
        let state = |next_epoch: u64, so_far: u64, recipe: &Recipe| {
            serde_json::json!({
                "next_epoch": next_epoch, "next_step": so_far, "updates": next_epoch * 5 + so_far,
                "epoch_so_far": {"updates": so_far, "loss_sum": 1.5},
                STATE_RECIPE_KEY: recipe_value(recipe),
            })
            .to_string()
        };
        let run = tempfile::tempdir().unwrap();
        assert!(finished_run(run.path(), &recipe).is_none(), "no checkpoint");
        committed_with_state(run.path(), "epoch-0002", &state(2, 0, &recipe));
        assert!(finished_run(run.path(), &recipe).is_none(), "two epochs of three");
        committed_with_state(run.path(), "epoch-0002-update-000000012", &state(2, 2, &recipe));
        assert!(finished_run(run.path(), &recipe).is_none(), "mid-epoch in the last one");
        let end = committed_with_state(run.path(), "epoch-0003", &state(3, 0, &recipe));
        let (found, position) = finished_run(run.path(), &recipe).expect("the run's end");
        assert_eq!((found.path(), position.updates), (end.as_path(), 15));
        // The host's own loader threads are no other recipe.
        let mut host = recipe.clone();
        host.data.loader_threads += 3;
        committed_with_state(run.path(), "epoch-0003", &state(3, 0, &host));
        assert!(finished_run(run.path(), &recipe).is_some(), "another host's loader threads");
        // A job of more epochs is not over.
        let longer = tiny_recipe(&["schedule.cosine.epochs=4".into()]);
        assert!(finished_run(run.path(), &longer).is_none());
        // Another run's end, left in the folder (another learning rate, or
        // no recipe recorded), is not this job's.
        for other in [
            state(
                3,
                0,
                &tiny_recipe(&["schedule.cosine.epochs=3".into(), "optimizer.lamb.lr=0.5".into()]),
            ),
            r#"{"next_epoch":3,"next_step":0,"updates":15}"#.to_string(),
        ] {
            committed_with_state(run.path(), "epoch-0003", &other);
            assert!(finished_run(run.path(), &recipe).is_none());
        }
        committed_with_state(run.path(), "epoch-0003", &state(3, 0, &recipe));
        assert!(finished_run(run.path(), &recipe).is_some(), "mended");
        // Weights of the right size with a flipped byte: a resume would
        // pass over this end, so it is not taken for one.
        std::fs::write(end.join(checkpoint::MODEL), b"weightz").unwrap();
        assert!(finished_run(run.path(), &recipe).is_none(), "corrupt weights");
        // Cut: the one before it is the newest committed, and no end.
        std::fs::write(end.join(checkpoint::MODEL), b"weights, cut").unwrap();
        assert!(finished_run(run.path(), &recipe).is_none(), "torn weights");
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
    fn a_resume_from_outside_a_folder_that_holds_a_run_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("run1");
        let other = tmp.path().join("run6");
        for run in [&out, &other] {
            std::fs::create_dir_all(run.join(CHECKPOINTS).join("epoch-0001")).unwrap();
        }
        let foreign = other.join(CHECKPOINTS).join("epoch-0001");
        for resume in [foreign.clone(), other.clone()] {
            let err = check_out_folder(&out, Some(&resume)).unwrap_err();
            assert!(
                matches!(&err, RunFolderError::ResumeOfAnotherRun { marker: "checkpoints", .. }),
                "{err}"
            );
            let message = err.to_string();
            for said in [out.to_str().unwrap(), resume.to_str().unwrap(), "fresh --out"] {
                assert!(message.contains(said), "{said} missing: {message}");
            }
        }
        // The folder's own run: itself, one of its checkpoints, also by
        // another name (a symbolic link) or relative to where it runs.
        check_out_folder(&out, Some(&out)).unwrap();
        check_out_folder(&out, Some(&out.join(CHECKPOINTS).join("epoch-0001"))).unwrap();
        let alias = tmp.path().join("alias");
        std::os::unix::fs::symlink(&out, &alias).unwrap();
        check_out_folder(&out, Some(&alias.join(CHECKPOINTS).join("epoch-0001"))).unwrap();
        check_out_folder(&alias, Some(&out)).unwrap();
        // A folder that holds no run may continue any checkpoint.
        check_out_folder(&tmp.path().join("fresh"), Some(&foreign)).unwrap();
        // A metrics log alone is a run too.
        let logged = tmp.path().join("logged");
        std::fs::create_dir_all(&logged).unwrap();
        std::fs::write(logged.join("metrics.jsonl"), "").unwrap();
        assert!(matches!(
            check_out_folder(&logged, Some(&foreign)),
            Err(RunFolderError::ResumeOfAnotherRun { marker: "metrics.jsonl", .. })
        ));
    }

    /// `call` on another thread, failing the test when it does not return
    /// within a few seconds (a FIFO waiting for a writer) instead of hanging.
    fn within_seconds<T: Send + 'static>(
        what: &str,
        call: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = sender.send(call());
        });
        receiver
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("{what} did not return"))
    }

    #[test]
    fn a_fifo_as_the_lock_file_is_refused_naming_it_and_its_holder_is_never_waited_for() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("run");
        std::fs::create_dir_all(&run).unwrap();
        let lock = run.join(LOCK_FILE);
        nix::unistd::mkfifo(&lock, nix::sys::stat::Mode::S_IRWXU).unwrap();
        // Held by another open file of it, as a second trainer finds it.
        let held = std::fs::OpenOptions::new().read(true).write(true).open(&lock).unwrap();
        let _held = Flock::lock(held, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| e).unwrap();
        let run_dir = run.clone();
        let err = within_seconds("locking a run folder whose lock file is a FIFO", move || {
            RunFolderLock::acquire(&run_dir, Duration::from_millis(100)).map(|_| ())
        })
        .unwrap_err();
        assert!(
            matches!(&err, RunFolderError::Lock { lock: named, .. } if named == &lock),
            "{err}"
        );
        let message = err.to_string();
        assert!(message.contains(lock.to_str().unwrap()), "{message}");
        assert!(message.contains("not a regular file"), "{message}");
        // The holder's name is not read from a FIFO (which would wait for
        // data its holder never writes).
        let fifo = lock.clone();
        assert_eq!(
            within_seconds("reading a FIFO's holder", move || lock_holder(&fifo)),
            "unknown"
        );
        std::fs::write(run.join("holder"), "pid 7 on host-a\n").unwrap();
        assert_eq!(lock_holder(&run.join("holder")), "pid 7 on host-a");
    }

    #[test]
    fn a_lock_file_that_is_a_symbolic_link_is_refused_and_never_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("run");
        std::fs::create_dir_all(&run).unwrap();
        // A file outside the run folder, and a link to it planted as the lock.
        let outside = tmp.path().join("someone-elses-file");
        std::fs::write(&outside, "not yours\n").unwrap();
        let lock = run.join(LOCK_FILE);
        std::os::unix::fs::symlink(&outside, &lock).unwrap();
        let err = RunFolderLock::acquire(&run, Duration::from_millis(100)).map(|_| ()).unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains(lock.to_str().unwrap()) && message.contains("symbolic link"),
            "{message}"
        );
        assert_eq!(std::fs::read_to_string(&outside).unwrap(), "not yours\n");
        // A dangling one creates nothing.
        std::fs::remove_file(&lock).unwrap();
        let nowhere = tmp.path().join("created-by-nobody");
        std::os::unix::fs::symlink(&nowhere, &lock).unwrap();
        RunFolderLock::acquire(&run, Duration::from_millis(100)).map(|_| ()).unwrap_err();
        assert!(!nowhere.exists(), "the lock followed a dangling link and created its target");
        // A link made after that check (a race) is not followed by the open.
        assert!(open_lock_file(&lock).is_err(), "the lock file's open followed a link");
        assert!(!nowhere.exists());
        std::fs::remove_file(&lock).unwrap();
        std::os::unix::fs::symlink(&outside, &lock).unwrap();
        assert!(open_lock_file(&lock).is_err(), "the lock file's open followed a link");
        std::fs::remove_file(&lock).unwrap();
        assert!(open_lock_file(&lock).is_ok(), "a lock file is created where nothing is");
    }

    #[test]
    fn a_wait_for_the_lock_gives_up_at_a_limit_that_comes_during_it() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("run");
        let _held = RunFolderLock::acquire(&run, LOCK_WAIT).unwrap();
        let long = Duration::from_secs(60);
        // A limit set 300 ms into a wait of a minute (a stop requested
        // meanwhile, 200 ms before its deadline) ends it there.
        let limit = std::sync::Arc::new(std::sync::OnceLock::new());
        let started = Instant::now();
        let setter = {
            let limit = limit.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                limit.set(Instant::now() + Duration::from_millis(200)).unwrap();
            })
        };
        let err = RunFolderLock::acquire_until(&run, long, &|| limit.get().copied(), "stopping")
            .map(|_| ())
            .unwrap_err();
        let waited = started.elapsed();
        setter.join().unwrap();
        assert!(matches!(err, RunFolderError::InUse { .. }), "{err}");
        assert!(waited >= Duration::from_millis(500), "gave up before the limit: {waited:?}");
        assert!(waited < Duration::from_secs(10), "waited {waited:?} past the limit");
        // A limit already past: no wait at all.
        let started = Instant::now();
        let past = Instant::now();
        RunFolderLock::acquire_until(&run, long, &|| Some(past), "stopping")
            .map(|_| ())
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
        // A limit after the wait's end does not lengthen it.
        let started = Instant::now();
        let later = Instant::now() + long;
        let short = Duration::from_millis(300);
        RunFolderLock::acquire_until(&run, short, &|| Some(later), "stopping")
            .map(|_| ())
            .unwrap_err();
        let waited = started.elapsed();
        assert!(waited >= short && waited < Duration::from_secs(10), "{waited:?}");
    }

    #[test]
    fn a_second_writer_of_a_run_folder_is_refused_naming_the_holder() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("run");
        let held = RunFolderLock::acquire(&run, LOCK_WAIT).unwrap();
        assert_eq!(held.path(), run.join(LOCK_FILE));
        // A lock is per open file: a second one in this process conflicts
        // as another process's would.
        let started = Instant::now();
        let err = RunFolderLock::acquire(&run, Duration::from_millis(300)).unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(300), "it did not wait");
        let RunFolderError::InUse { holder, .. } = &err else { panic!("{err}") };
        assert!(holder.starts_with(&format!("pid {} on ", std::process::id())), "{holder}");
        let message = err.to_string();
        assert!(message.contains(run.to_str().unwrap()) && message.contains("another process"));
        // Released when dropped (or when its process dies): the next one gets it.
        drop(held);
        let again = RunFolderLock::acquire(&run, Duration::ZERO).unwrap();
        // A holder that lets go while the next one waits (a killed rank 0
        // still exiting) hands it over within the wait.
        let handover = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(again);
        });
        RunFolderLock::acquire(&run, LOCK_WAIT).unwrap();
        handover.join().unwrap();
        // The lock file is no sign of a run.
        check_out_folder(&run, None).unwrap();
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

    /// A committed checkpoint `name` of `run`, trained with `recipe`.
    fn committed_checkpoint(run: &Path, name: &str, recipe: &Recipe) -> PathBuf {
        let dir = run.join(CHECKPOINTS).join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(checkpoint::MODEL), b"weights").unwrap();
        std::fs::write(dir.join(checkpoint::PARTS[1]), b"moments").unwrap();
        let state = serde_json::json!({ STATE_RECIPE_KEY: recipe_value(recipe) });
        std::fs::write(dir.join(checkpoint::STATE), state.to_string()).unwrap();
        let manifest = checkpoint::Manifest::of_parts(&dir, &checkpoint::PARTS).unwrap();
        std::fs::write(dir.join(checkpoint::MANIFEST), manifest.to_json()).unwrap();
        dir
    }

    #[test]
    fn auto_resume_starts_continues_or_starts_again_and_refuses_what_it_cannot_continue() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("run");
        let recipe = tiny_recipe(&[]);
        assert!(matches!(auto_resume(&out, &recipe, &[]).unwrap(), AutoResume::Start));
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(out.join("recipe.yaml"), "name: x").unwrap();
        assert!(matches!(auto_resume(&out, &recipe, &[]).unwrap(), AutoResume::Start));

        // A run stopped before its first checkpoint starts again; its
        // records are moved aside whole.
        std::fs::create_dir_all(out.join("checkpoints/.epoch-0001.tmp-1")).unwrap();
        let AutoResume::StartAgain { set_aside: None, moved } =
            auto_resume(&out, &recipe, &[]).unwrap()
        else {
            panic!("a run with a staging folder only starts again, with nothing to move")
        };
        assert!(moved.is_empty());
        std::fs::create_dir_all(out.join("ranks")).unwrap();
        std::fs::write(out.join("ranks/rank-0.jsonl"), "{}\n").unwrap();
        let records = "{\"kind\":\"step\",\"step\":3}\n";
        std::fs::write(out.join("metrics.jsonl"), records).unwrap();
        std::fs::create_dir_all(out.join("samples")).unwrap();
        std::fs::write(out.join("samples/rank-0.jsonl"), "[1,2]\n").unwrap();
        let AutoResume::StartAgain { set_aside, moved } = auto_resume(&out, &recipe, &[]).unwrap()
        else {
            panic!("a run without a checkpoint is started again")
        };
        assert_eq!(moved, ["samples", "ranks", "metrics.jsonl"]);
        let set_aside = set_aside.expect("records moved");
        assert_eq!(set_aside.parent(), Some(out.as_path()));
        let name = set_aside.file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with(checkpoint::SET_ASIDE_PREFIX), "{name}");
        assert_eq!(std::fs::read_to_string(set_aside.join("metrics.jsonl")).unwrap(), records);
        assert!(set_aside.join("samples/rank-0.jsonl").is_file());
        assert!(set_aside.join("ranks/rank-0.jsonl").is_file());
        for name in RECORDS {
            assert!(!out.join(name).exists(), "{name} left");
        }

        // Checkpoints that cannot be listed are not taken for none: a
        // checkpoints folder that links to a volume not mounted, or an
        // entry named as a checkpoint that is not a folder, is refused,
        // with the run's records left where they are.
        std::fs::write(out.join("metrics.jsonl"), records).unwrap();
        std::fs::rename(out.join("checkpoints"), tmp.path().join("staging-only")).unwrap();
        let unmounted = tmp.path().join("volume-not-mounted");
        std::os::unix::fs::symlink(&unmounted, out.join("checkpoints")).unwrap();
        let err = auto_resume(&out, &recipe, &[]).unwrap_err();
        assert!(
            matches!(&err, RunFolderError::CheckpointsUnreadable { path, .. }
                if *path == out.join("checkpoints")),
            "{err}"
        );
        assert!(err.to_string().contains("does not start the run"), "{err}");
        std::fs::remove_file(out.join("checkpoints")).unwrap();
        std::fs::create_dir(out.join("checkpoints")).unwrap();
        std::fs::write(out.join("checkpoints/epoch-0001"), "").unwrap();
        let err = auto_resume(&out, &recipe, &[]).unwrap_err();
        assert!(
            matches!(&err, RunFolderError::CheckpointsUnreadable { path, .. }
                if *path == out.join("checkpoints/epoch-0001")),
            "{err}"
        );
        assert!(err.to_string().contains("is named as a checkpoint but is not a folder"), "{err}");
        assert_eq!(std::fs::read_to_string(out.join("metrics.jsonl")).unwrap(), records);
        std::fs::remove_file(out.join("checkpoints/epoch-0001")).unwrap();
        // A folder whose name is no checkpoint's (a copy) is none, as
        // `checkpoint::list` reads the folder: the run starts again.
        std::fs::create_dir(out.join("checkpoints/epoch-0001-copy")).unwrap();
        confirm_no_checkpoint_folders(&out).unwrap();
        std::fs::remove_dir(out.join("checkpoints/epoch-0001-copy")).unwrap();

        // A run folder that holds nothing but a checkpoints link to a
        // volume not mounted is not a fresh start either.
        let only_link = tmp.path().join("only-link");
        std::fs::create_dir(&only_link).unwrap();
        std::os::unix::fs::symlink(&unmounted, only_link.join("checkpoints")).unwrap();
        let err = auto_resume(&only_link, &recipe, &[]).unwrap_err();
        assert!(matches!(err, RunFolderError::CheckpointsUnreadable { .. }), "{err}");

        // A run with checkpoints continues from its newest intact one.
        let first = committed_checkpoint(&out, "epoch-0001", &recipe);
        let second = committed_checkpoint(&out, "epoch-0002", &recipe);
        let AutoResume::Resume(newest) = auto_resume(&out, &recipe, &[]).unwrap() else {
            panic!("a run with a checkpoint continues")
        };
        assert_eq!(newest.path(), second);
        std::fs::write(second.join(checkpoint::MODEL), b"torn!!!").unwrap();
        let AutoResume::Resume(intact) = auto_resume(&out, &recipe, &[]).unwrap() else {
            panic!("a run with an intact checkpoint continues")
        };
        assert_eq!(intact.path(), first);

        // Refused, with nothing moved: another recipe, or no intact checkpoint.
        let other = tiny_recipe(&["optimizer.lamb.lr=0.01".to_string()]);
        let err = auto_resume(&out, &other, &[]).unwrap_err();
        assert!(matches!(err, RunFolderError::RecipeChanged { .. }), "{err}");
        std::fs::write(first.join(checkpoint::MODEL), b"torn!!!").unwrap();
        let err = auto_resume(&out, &recipe, &[]).unwrap_err();
        assert!(
            matches!(err, RunFolderError::Checkpoint(CheckpointError::NoIntactCheckpoint { .. })),
            "{err}"
        );
        assert_eq!(std::fs::read_to_string(out.join("metrics.jsonl")).unwrap(), records);
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
