//! Sweeps on the cluster: the runs of `coordinator up --seeds/--grid` (one
//! per [`SweepCell`]) queued over the hosts that join.
//!
//! Each run is a fixed [`Job`] of `--ranks-per-run` ranks with its own run
//! folder `DIR/runs/<id>/`. A host that joins is placed in a run still
//! waiting for hosts, else in the next queued run (while fewer than
//! `--max-parallel-runs` go at once), else told to join again later; once
//! no run is left it is told the sweep is over. When a run's job ends, its
//! hosts join again for the next run. A failed attempt is queued again, in
//! front, resuming from the newest checkpoint it (or an earlier attempt)
//! committed, at most `--max-retries` times. A run that ends for good gets
//! its [`RunOutcome`] file; one without (interrupted) or failed runs again
//! under `coordinator up --resume DIR`, while a finished one is kept.

use crate::job::{DeviceKind, Job, JobError, Phase};
use crate::printer::Printer;
use rsb_job::{RunEnd, RunOutcome, SweepCell, SweepLayout};
use rsb_proto::auth::Secret;
use rsb_recipes::Recipe;
use std::collections::VecDeque;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// How the failure of a run that could not start begins (its folder could
/// not be made), as logged and shown; [`SweepRun::could_not_start`] says
/// which runs these are.
const CANNOT_START: &str = "cannot start: ";

/// The failed runs of `views` for the sweep's last line: their ids, with
/// the reason for a run that could not start (it has no `outcome.json`,
/// which the line points the others to).
pub fn failed_runs(views: &[RunView]) -> Vec<String> {
    views
        .iter()
        .filter(|v| v.state == RunState::Failed)
        .map(|v| match (v.could_not_start, v.failure.as_deref()) {
            (true, Some(why)) => format!("{} ({why})", v.id),
            _ => v.id.clone(),
        })
        .collect()
}

/// How long a host that no run can take waits before joining again.
pub const JOIN_AGAIN_AFTER: Duration = Duration::from_secs(2);

/// Where a run of the sweep is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Waiting for hosts and a free slot.
    Queued,
    /// Its current attempt's job waits for hosts or trains.
    Running,
    /// Done: every rank finished.
    Finished,
    /// Its last attempt failed, with no retry left.
    Failed,
}

/// One run of the sweep.
#[derive(Debug, Clone)]
pub struct SweepRun {
    /// The cell (id, seed, grid values).
    pub cell: SweepCell,
    /// Its resolved recipe.
    pub recipe: Recipe,
    /// Where it is.
    pub state: RunState,
    /// Attempts started, over every invocation of the sweep.
    pub attempts: u32,
    /// Attempts started by this invocation (a resumed sweep gives a failed
    /// run its `--max-retries` again).
    pub attempts_here: u32,
    /// Why the last attempt failed.
    pub failure: Option<String>,
    /// Whether the run failed without a job, its folder not made: it has
    /// no `outcome.json`, and `failure` alone says why.
    pub could_not_start: bool,
    /// Index (in the service's job list) of the current or last attempt's job.
    pub job: Option<usize>,
    /// Checkpoint the next attempt resumes from (the run's own newest).
    pub resume_from: Option<String>,
    /// Updates done in that checkpoint, when known.
    pub resume_step: Option<u64>,
}

impl SweepRun {
    /// A run not started yet.
    pub fn queued(cell: SweepCell, recipe: Recipe) -> SweepRun {
        SweepRun {
            cell,
            recipe,
            state: RunState::Queued,
            attempts: 0,
            attempts_here: 0,
            failure: None,
            could_not_start: false,
            job: None,
            resume_from: None,
            resume_step: None,
        }
    }
}

/// How the sweep's runs are placed and retried.
#[derive(Debug, Clone)]
pub struct SweepSettings {
    /// Ranks of each run (hosts of equal rank counts that divide it).
    pub ranks_per_run: u32,
    /// Most runs at once (`None`: as many as the hosts allow).
    pub max_parallel: Option<u32>,
    /// Retries of a failed run (attempts are at most one more).
    pub max_retries: u32,
    /// Heartbeat timeout of each run's job.
    pub heartbeat_timeout: Duration,
    /// Rendezvous timeout of each run's job.
    pub rendezvous_timeout: Duration,
}

/// Where a joining host goes.
#[derive(Debug)]
pub enum Placement {
    /// A member of the job at this index of the service's job list.
    Member {
        /// The job's index.
        job: usize,
        /// Member id.
        id: String,
        /// Its session secret.
        secret: Secret,
        /// Whether it waits to be admitted (an elastic single job).
        pending: bool,
    },
    /// No run can take the host now; it joins again after this long.
    JoinAgain(Duration),
    /// The sweep has no run left.
    SweepOver,
    /// The job (of `up`, not a sweep) is finished: nothing is left to
    /// train.
    JobFinished,
}

/// How many runs are where (for the progress bar and the end).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Runs in the sweep.
    pub total: usize,
    /// Finished ones.
    pub finished: usize,
    /// Running ones.
    pub running: usize,
    /// Queued ones.
    pub queued: usize,
    /// Failed for good.
    pub failed: usize,
}

/// What is known of one run, for `coordinator status` and the progress bars.
#[derive(Debug, Clone, PartialEq)]
pub struct RunView {
    /// Cell id.
    pub id: String,
    /// Where it is.
    pub state: RunState,
    /// Attempts started.
    pub attempts: u32,
    /// Epoch and update of its current (or last) attempt.
    pub epoch: u64,
    /// Updates done.
    pub step: u64,
    /// Updates in all, once known.
    pub total_updates: Option<u64>,
    /// Hosts of the current attempt.
    pub hosts: Vec<String>,
    /// Why the last attempt failed.
    pub failure: Option<String>,
    /// Whether it failed without a job, its folder not made
    /// ([`SweepRun::could_not_start`]).
    pub could_not_start: bool,
}

/// The queue of a sweep's runs.
#[derive(Debug)]
pub struct Scheduler {
    layout: SweepLayout,
    settings: SweepSettings,
    /// Every run, in manifest order.
    pub runs: Vec<SweepRun>,
    queue: VecDeque<usize>,
    /// Device kind and ranks of the first host placed: every host must match.
    host_shape: Option<(DeviceKind, u32)>,
    printer: Printer,
    /// Files of the runs to write once the coordinator's lock is released
    /// ([`Scheduler::files_to_write`]): a slow disk holds up no call.
    files: Vec<RunFile>,
    /// When a host was last with the sweep: one it can use asking for a
    /// place, or one in a run's job that trains (see
    /// [`Scheduler::without_hosts_for`]). Its creation before any: the
    /// first deadline counts from the start.
    last_host_seen: Instant,
}

/// A file of a run (its recipe, its outcome), to write atomically outside
/// the coordinator's lock.
#[derive(Debug, Clone)]
pub struct RunFile {
    /// Where.
    pub path: std::path::PathBuf,
    /// What.
    pub contents: Vec<u8>,
    /// Failed tries so far (the first failure is logged, the next are not).
    pub failures: u32,
}

impl RunFile {
    /// Writes it atomically (temporary file, fsync, rename), readable by all.
    pub fn write(&self) -> std::io::Result<()> {
        rsb_files::write_atomically(&self.path, &self.contents, rsb_files::Readers::Everyone)
    }
}

/// Why a run that finished while no coordinator ran could not be kept as
/// finished ([`keep_run_finished_while_away`]).
#[derive(Debug, thiserror::Error)]
pub enum KeepFinishedError {
    /// Rank 0's records could not be appended to the run's metrics.jsonl.
    #[error(transparent)]
    Metrics(#[from] rsb_job::MetricsLogError),
    /// The run's outcome could not be written.
    #[error(transparent)]
    Outcome(#[from] rsb_job::SweepError),
}

/// A run of an interrupted sweep that its ranks ended while no coordinator
/// ran (they train on without it, and their final records reached only rank
/// 0's own file): its run folder's newest committed checkpoint ends it
/// ([`rsb_job::run_folder::finished_run`]: the recipe's last epoch, trained
/// with `recipe`, intact). `up --resume` then keeps it as finished, where it
/// queued it to resume from its end, which trained no epoch and recorded
/// none, and the report left the run out as unfinished. Rank 0's records
/// that no coordinator took are appended to the run's metrics.jsonl
/// ([`crate::job::records_made_while_away`]), then its outcome is written
/// (finished, with the attempts and failure of `before`, at least one
/// attempt; a retry the killed coordinator made wrote no outcome, but its
/// job's generation record in metrics.jsonl says its attempt and the
/// failure before it: the highest counts where it is higher). Returns the
/// outcome and what to say; `None` when the run is not over. Call it
/// before the sweep's jobs start.
pub fn keep_run_finished_while_away(
    layout: &SweepLayout,
    id: &str,
    recipe: &Recipe,
    before: Option<&RunOutcome>,
) -> Result<Option<(RunOutcome, String)>, KeepFinishedError> {
    let run_dir = layout.run_dir(id);
    let Some((checkpoint, position)) = rsb_job::run_folder::finished_run(&run_dir, recipe) else {
        return Ok(None);
    };
    let metrics = layout.run_metrics(id);
    let records = crate::job::append_records_made_while_away(&run_dir, &metrics)?;
    let (attempts, failure) = attempts_so_far(layout, id, before);
    let outcome = RunOutcome { end: RunEnd::Finished, attempts: attempts.max(1), failure };
    outcome.write(layout, id)?;
    let finished = crate::job::finished_while_away(
        "the run",
        checkpoint.path(),
        &position,
        recipe.total_epochs(),
    );
    let said = format!("{finished}; {records}; kept as finished");
    Ok(Some((outcome, said)))
}

/// A run of an interrupted sweep that is not over, about to be queued by
/// `up --resume`: the records its rank 0 made that no coordinator took (its
/// ranks trained on while none ran, and committed checkpoints the run now
/// resumes from) are appended to its metrics.jsonl, where they were lost
/// once the run's next rank 0 process started (only the last process's
/// records are taken), leaving its curves a gap. Says what was done; `None`
/// for a run whose rank 0 never reported. Call it before the sweep's jobs
/// start.
pub fn take_records_of_unfinished_run(
    layout: &SweepLayout,
    id: &str,
) -> Result<Option<String>, rsb_job::MetricsLogError> {
    let run_dir = layout.run_dir(id);
    if !rsb_job::run_folder::rank_records_file(&run_dir, 0).exists() {
        return Ok(None);
    }
    crate::job::append_records_made_while_away(&run_dir, &layout.run_metrics(id)).map(Some)
}

/// The attempts a run has made over every invocation of its sweep, and the
/// failure before the last: its outcome's (`before`, written when an
/// invocation ended it), or, where higher, those the generation record of a
/// retry says ([`highest_retry`]): an invocation stopped or killed while a
/// retry ran wrote no outcome, and the next one numbered its next attempt
/// from the last outcome again, without the failure before it.
pub fn attempts_so_far(
    layout: &SweepLayout,
    id: &str,
    before: Option<&RunOutcome>,
) -> (u32, Option<String>) {
    let mut counted = (before.map_or(0, |o| o.attempts), before.and_then(|o| o.failure.clone()));
    let metrics = layout.run_metrics(id);
    if metrics.exists() {
        if let Some((attempt, failure)) = highest_retry(&metrics) {
            if attempt > counted.0 {
                counted = (attempt, Some(failure));
            }
        }
    }
    counted
}

/// The highest attempt a retry's generation record in the run's `metrics`
/// says ([`GenerationReason::Retry`]), and the failure before it (an
/// invocation killed before it wrote an outcome leaves the next one to
/// count its attempts again from the last outcome, so the newest record
/// need not be the highest); `None` when the run was not retried, or its
/// file cannot be read (logged).
fn highest_retry(metrics: &std::path::Path) -> Option<(u32, String)> {
    use rsb_job::records::GenerationReason;
    let records = match rsb_report::runs::read_metrics(metrics) {
        Ok(records) => records,
        Err(e) => {
            tracing::warn!("the run's retries are not counted from its records: {e}");
            return None;
        }
    };
    let retries = records.iter().filter_map(|record| match record {
        rsb_job::MetricsRecord::Generation { reasons, .. } => {
            reasons.iter().find_map(|reason| match reason {
                GenerationReason::Retry { attempt, failure } => Some((*attempt, failure)),
                _ => None,
            })
        }
        _ => None,
    });
    // The last of the highest.
    retries.max_by_key(|(attempt, _)| *attempt).map(|(attempt, failure)| (attempt, failure.clone()))
}

impl Scheduler {
    /// A sweep over `runs` (in manifest order); those not `Queued` are kept
    /// as they are (finished or failed in an earlier invocation).
    pub fn new(
        layout: SweepLayout,
        settings: SweepSettings,
        runs: Vec<SweepRun>,
        printer: Printer,
    ) -> Result<Scheduler, JobError> {
        if settings.ranks_per_run == 0 {
            return Err(JobError::Invalid("--ranks-per-run must be at least 1".into()));
        }
        if settings.max_parallel == Some(0) {
            return Err(JobError::Invalid("--max-parallel-runs must be at least 1".into()));
        }
        let queue = runs
            .iter()
            .enumerate()
            .filter(|(_, r)| r.state == RunState::Queued)
            .map(|(i, _)| i)
            .collect();
        Ok(Scheduler {
            layout,
            settings,
            runs,
            queue,
            host_shape: None,
            printer,
            files: Vec::new(),
            last_host_seen: Instant::now(),
        })
    }

    /// How many runs are where.
    pub fn counts(&self) -> Counts {
        let mut c = Counts { total: self.runs.len(), ..Counts::default() };
        for run in &self.runs {
            match run.state {
                RunState::Queued => c.queued += 1,
                RunState::Running => c.running += 1,
                RunState::Finished => c.finished += 1,
                RunState::Failed => c.failed += 1,
            }
        }
        c
    }

    /// Whether every run ended (finished or failed for good).
    pub fn is_over(&self) -> bool {
        self.runs.iter().all(|r| matches!(r.state, RunState::Finished | RunState::Failed))
    }

    /// Places a joining host: in a run waiting for hosts, else in the next
    /// queued run (a new job pushed onto `jobs`), else nowhere for now. A
    /// host the sweep refuses (its ranks do not divide `--ranks-per-run`,
    /// or it is unlike the sweep's first host) is not with the sweep: it
    /// leaves the time without hosts ([`Scheduler::without_hosts_for`]) to
    /// run on; a host a run's job takes, or one told to join again, restarts
    /// it.
    pub fn place(
        &mut self,
        jobs: &mut Vec<Job>,
        host: &str,
        kind: DeviceKind,
        local_ranks: u32,
        advertise: Option<IpAddr>,
    ) -> Result<Placement, JobError> {
        let placement = self.choose_placement(jobs, host, kind, local_ranks, advertise)?;
        if matches!(placement, Placement::Member { .. } | Placement::JoinAgain(_)) {
            self.last_host_seen = Instant::now();
        }
        Ok(placement)
    }

    /// Where [`Scheduler::place`] puts a host, its clock of the time without
    /// hosts aside.
    fn choose_placement(
        &mut self,
        jobs: &mut Vec<Job>,
        host: &str,
        kind: DeviceKind,
        local_ranks: u32,
        advertise: Option<IpAddr>,
    ) -> Result<Placement, JobError> {
        // Over: any host is told so, whatever its shape (no time without
        // hosts counts any more).
        if self.is_over() {
            return Ok(Placement::SweepOver);
        }
        let per_run = self.settings.ranks_per_run;
        if local_ranks == 0 || !per_run.is_multiple_of(local_ranks) {
            return Err(JobError::Invalid(format!(
                "host {host} brings {local_ranks} rank(s); each run of this sweep has \
                 --ranks-per-run {per_run}, which a host's ranks must divide"
            )));
        }
        match self.host_shape {
            // Set by the first host a run's job takes (below).
            None => {}
            Some(shape) if shape != (kind, local_ranks) => {
                return Err(JobError::Invalid(format!(
                    "host {host} brings {local_ranks} {kind:?} rank(s); the sweep's hosts bring \
                     {} {:?} rank(s) each, and every host of a sweep must be alike",
                    shape.1, shape.0
                )))
            }
            Some(_) => {}
        }
        let waiting = self.running_jobs().find(|&j| jobs[j].phase == Phase::Waiting);
        let index = match waiting {
            // Made for the hosts of a first one it refused (no shape is the
            // sweep's yet, so no host joined it): sized for this one's, where
            // it would have run at another world size than --ranks-per-run.
            Some(j) if jobs[j].nodes_expected != per_run / local_ranks => {
                jobs[j].expect_hosts_before_any_joined(per_run / local_ranks)?;
                j
            }
            Some(j) => j,
            None => loop {
                let running = self.counts().running as u32;
                if self.settings.max_parallel.is_some_and(|cap| running >= cap) {
                    // A host of the sweep's shape, told to join again.
                    return Ok(Placement::JoinAgain(JOIN_AGAIN_AFTER));
                }
                let Some(run) = self.queue.pop_front() else {
                    return Ok(if self.is_over() {
                        Placement::SweepOver
                    } else {
                        Placement::JoinAgain(JOIN_AGAIN_AFTER)
                    });
                };
                match self.start(jobs, run, per_run / local_ranks) {
                    Ok(j) => break j,
                    // Its folder cannot be written: the run fails, the
                    // sweep goes on with the next one.
                    Err(e) => {
                        let run = &mut self.runs[run];
                        tracing::error!(run = %run.cell.id, "{CANNOT_START}{e}");
                        run.state = RunState::Failed;
                        run.failure = Some(format!("{CANNOT_START}{e}"));
                        run.could_not_start = true;
                    }
                }
            },
        };
        // The run's job may refuse it still (no address its ranks can be
        // reached at, a name too long): only a host it takes is with the
        // sweep.
        let (id, secret, pending) = jobs[index].join(host, kind, local_ranks, advertise)?;
        // The sweep's hosts are alike: this one's shape is theirs, once a
        // run's job took it (a refused first host sets nothing).
        self.host_shape.get_or_insert((kind, local_ranks));
        Ok(Placement::Member { job: index, id, secret, pending })
    }

    /// Starts the next attempt of run `i`: a fixed job of `hosts` hosts in
    /// the run's folder, pushed onto `jobs`. Returns its index.
    fn start(&mut self, jobs: &mut Vec<Job>, i: usize, hosts: u32) -> Result<usize, JobError> {
        let run = &mut self.runs[i];
        let id = run.cell.id.clone();
        let dir = self.layout.run_dir(&id);
        // The folder now: a run that cannot have one fails at its start
        // (the sweep goes on). Its recipe file atomically (the report
        // trusts it, and a crash must not leave it torn), once the lock is
        // released: the ranks get the recipe from the job, not this file.
        std::fs::create_dir_all(&dir)
            .map_err(|e| JobError::Precondition(format!("{}: {e}", dir.display())))?;
        self.files.push(RunFile {
            path: self.layout.run_recipe(&id),
            contents: rsb_recipes::to_yaml(&run.recipe).into_bytes(),
            failures: 0,
        });
        // Saturating: a count read back from a damaged outcome file.
        run.attempts = run.attempts.saturating_add(1);
        run.attempts_here = run.attempts_here.saturating_add(1);
        run.state = RunState::Running;
        let mut job = Job::new(run.recipe.clone(), dir, hosts);
        job.id = format!("sweep{}-run{}-attempt{}", std::process::id(), i, run.attempts);
        job.member_prefix = format!("r{i}a{}-", run.attempts);
        job.label = Some(id.clone());
        job.printer = self.printer.clone();
        job.heartbeat_timeout = self.settings.heartbeat_timeout;
        job.rendezvous_timeout = self.settings.rendezvous_timeout;
        // It waits for hosts that the runs before it free, for as long as
        // they run; the sweep as a whole has `--join-timeout-secs`.
        job.join_timeout = None;
        job.resume_from = run.resume_from.clone();
        job.resume_step = run.resume_step.filter(|_| run.resume_from.is_some());
        if let (Some(failure), true) = (&run.failure, run.attempts > 1) {
            // Its generation record says why the run is tried again.
            job.note_retry(run.attempts, failure);
        }
        let from = run
            .resume_from
            .as_deref()
            .map_or_else(|| "scratch".to_string(), |p| format!("checkpoint {p}"));
        job.say(&format!("attempt {} starts from {from}", run.attempts));
        jobs.push(job);
        run.job = Some(jobs.len() - 1);
        Ok(jobs.len() - 1)
    }

    /// Moves runs whose current job ended: finished ones are recorded;
    /// failed ones are queued again in front (from their newest committed
    /// checkpoint) while retries are left, else recorded as failed.
    pub fn tick(&mut self, jobs: &[Job]) {
        // A run's job that trains has its hosts; one that waits for more
        // (the hosts of a run of several) does not count: its hosts may be
        // all that is left.
        if self.running_jobs().any(|j| jobs[j].phase == Phase::Running) {
            self.last_host_seen = Instant::now();
        }
        for i in 0..self.runs.len() {
            let run = &mut self.runs[i];
            let Some(j) = run.job.filter(|_| run.state == RunState::Running) else { continue };
            let job = &jobs[j];
            if let Some(c) = job.checkpoints.last() {
                run.resume_from = Some(c.path.clone());
                run.resume_step = Some(c.step);
            }
            match &job.phase {
                Phase::Finished => {
                    run.state = RunState::Finished;
                    job.say(&format!("finished (attempt {})", run.attempts));
                    self.record(i, RunEnd::Finished);
                }
                Phase::Failed(reason) => {
                    run.failure = Some(reason.clone());
                    let retries = run.attempts_here;
                    if retries <= self.settings.max_retries {
                        run.state = RunState::Queued;
                        let from = run
                            .resume_from
                            .as_deref()
                            .map_or_else(|| "scratch".to_string(), |p| format!("checkpoint {p}"));
                        job.say(&format!(
                            "attempt {} failed: {reason}; queued again from {from} (retry {} of \
                             --max-retries {})",
                            run.attempts, retries, self.settings.max_retries
                        ));
                        self.queue.push_front(i);
                    } else {
                        run.state = RunState::Failed;
                        let before = match run.attempts.saturating_sub(run.attempts_here) {
                            0 => String::new(),
                            n => format!(", {n} of them in earlier invocations of the sweep"),
                        };
                        job.say(&format!(
                            "failed after {} attempt(s){before} (--max-retries {}): {reason}",
                            run.attempts, self.settings.max_retries
                        ));
                        self.record(i, RunEnd::Failed);
                    }
                }
                Phase::Waiting | Phase::Running => {}
            }
        }
    }

    /// Queues run `i`'s outcome file, written once the lock is released.
    fn record(&mut self, i: usize, end: RunEnd) {
        let run = &self.runs[i];
        let outcome = RunOutcome { end, attempts: run.attempts, failure: run.failure.clone() };
        self.files.push(RunFile {
            path: self.layout.run_outcome(&run.cell.id),
            contents: outcome.to_json().into_bytes(),
            failures: 0,
        });
    }

    /// The files of the runs to write now, taken out of the queue (what
    /// cannot be written is handed back with [`Scheduler::write_again`]).
    pub fn files_to_write(&mut self) -> Vec<RunFile> {
        std::mem::take(&mut self.files)
    }

    /// Where the files queued to be written go (the queue is left as it is).
    pub fn queued_file_paths(&self) -> Vec<std::path::PathBuf> {
        self.files.iter().map(|f| f.path.clone()).collect()
    }

    /// Files whose write failed, tried again with the next ones, unless a
    /// newer version of the same file is queued already. (Two passes write
    /// one path only across attempts of a run, minutes apart: its recipe,
    /// the same each time, and its outcome, written once.)
    pub fn write_again(&mut self, failed: Vec<RunFile>) {
        for file in failed {
            if !self.files.iter().any(|f| f.path == file.path) {
                self.files.push(file);
            }
        }
    }

    /// Every run as `coordinator status` and the progress bars show it.
    pub fn views(&self, jobs: &[Job]) -> Vec<RunView> {
        self.runs
            .iter()
            .map(|run| {
                let job = run.job.map(|j| &jobs[j]);
                RunView {
                    id: run.cell.id.clone(),
                    state: run.state,
                    attempts: run.attempts,
                    epoch: job.map_or(0, |j| j.progress.0),
                    step: job.map_or(0, |j| j.progress.1),
                    total_updates: job.and_then(|j| j.total_updates),
                    hosts: job
                        .filter(|_| run.state == RunState::Running)
                        .map(|j| j.members.iter().map(|m| m.host.clone()).collect())
                        .unwrap_or_default(),
                    failure: run.failure.clone(),
                    could_not_start: run.could_not_start,
                }
            })
            .collect()
    }

    /// How long the sweep has had no host to train with while runs are
    /// left: none it can use asked for a place (a refused host does not
    /// count), and no run's job trained, as of the last
    /// [`Scheduler::tick`] (the hosts of a run's job that waits for more do
    /// not count). `None` once the sweep is over. A run whose hosts
    /// all died fails at their heartbeat timeout and is queued again; with
    /// no host left to take it, or too few for a run of several hosts, the
    /// coordinator gives up past `--join-timeout-secs` of this, where it
    /// waited for ever.
    pub fn without_hosts_for(&self) -> Option<Duration> {
        (!self.is_over()).then(|| self.last_host_seen.elapsed())
    }

    /// The jobs of the running runs' current attempts.
    pub fn running_jobs(&self) -> impl Iterator<Item = usize> + '_ {
        self.runs.iter().filter(|r| r.state == RunState::Running).filter_map(|r| r.job)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::job::FailureCause;
    use rsb_job::records::GenerationReason;
    use rsb_job::GridAxis;

    const LOOPBACK: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));

    fn recipe() -> Recipe {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../recipes/debug/resnet18_tiny_cpu.yaml");
        rsb_recipes::load(&path, &[]).unwrap()
    }

    pub(crate) fn scheduler(
        dir: &std::path::Path,
        seeds: &[u64],
        settings: SweepSettings,
    ) -> Scheduler {
        let cells = rsb_job::sweep::expand(seeds, &[] as &[GridAxis]).unwrap();
        let runs = cells.into_iter().map(|cell| SweepRun::queued(cell, recipe())).collect();
        Scheduler::new(SweepLayout::new(dir), settings, runs, Printer::default()).unwrap()
    }

    pub(crate) fn settings(
        ranks_per_run: u32,
        max_parallel: Option<u32>,
        max_retries: u32,
    ) -> SweepSettings {
        SweepSettings {
            ranks_per_run,
            max_parallel,
            max_retries,
            heartbeat_timeout: Duration::from_secs(30),
            rendezvous_timeout: crate::job::DEFAULT_RENDEZVOUS_TIMEOUT,
        }
    }

    fn member(p: Placement) -> (usize, String) {
        match p {
            Placement::Member { job, id, .. } => (job, id),
            other => panic!("expected a member, got {other:?}"),
        }
    }

    /// Writes the run files the scheduler queued, as the service does once
    /// its lock is released.
    fn write_files(s: &mut Scheduler) {
        for file in s.files_to_write() {
            file.write().unwrap();
        }
    }

    /// Every rank of job `j` leaves, successfully or not.
    fn end(jobs: &mut [Job], j: usize, success: bool) {
        let job = &mut jobs[j];
        let members: Vec<(String, u32)> =
            job.members.iter().map(|m| (m.id.clone(), m.local_ranks)).collect();
        let generation = job.generation;
        for (id, ranks) in members {
            for r in 0..ranks {
                let _ = job.leave(&id, generation, r, success, "boom", FailureCause::Unknown);
            }
        }
    }

    #[test]
    fn hosts_fill_runs_in_order_and_the_cap_holds() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = scheduler(tmp.path(), &[0, 1, 2], settings(2, Some(1), 0));
        let mut jobs = Vec::new();
        let (j0, a) = member(s.place(&mut jobs, "a", DeviceKind::Cpu, 1, LOOPBACK).unwrap());
        assert_eq!(jobs[j0].phase, Phase::Waiting);
        // The second host completes run 0 instead of opening run 1.
        let (j1, _) = member(s.place(&mut jobs, "b", DeviceKind::Cpu, 1, LOOPBACK).unwrap());
        assert_eq!((j0, j1, jobs[j0].phase.clone()), (0, 0, Phase::Running));
        assert!(a.starts_with("r0a1-"), "{a}");
        write_files(&mut s);
        assert!(tmp.path().join("runs/seed-000/recipe.yaml").is_file());
        // At most one run at once: a third host waits.
        assert!(matches!(
            s.place(&mut jobs, "c", DeviceKind::Cpu, 1, LOOPBACK).unwrap(),
            Placement::JoinAgain(_)
        ));
        assert_eq!(s.counts(), Counts { total: 3, running: 1, queued: 2, ..Counts::default() });
        // Hosts that do not divide the run's ranks, or differ, are refused.
        let e = s.place(&mut jobs, "d", DeviceKind::Cpu, 3, LOOPBACK).unwrap_err();
        assert!(e.to_string().contains("--ranks-per-run 2"), "{e}");
        let e = s.place(&mut jobs, "d", DeviceKind::Cuda, 1, None).unwrap_err();
        assert!(e.to_string().contains("alike"), "{e}");
        end(&mut jobs, j0, true);
        s.tick(&jobs);
        assert_eq!(s.counts().finished, 1);
        write_files(&mut s);
        let outcome = RunOutcome::read(&SweepLayout::new(tmp.path()), "seed-000").unwrap();
        assert_eq!(outcome.map(|o| o.end), Some(RunEnd::Finished));
        let (j, _) = member(s.place(&mut jobs, "c", DeviceKind::Cpu, 1, LOOPBACK).unwrap());
        assert_eq!((j, s.runs[1].state), (1, RunState::Running));
    }

    /// A run's job made for a first host of 2 ranks that it then refused
    /// (no address to reach its ranks at) runs with --ranks-per-run ranks
    /// of the hosts of 1 rank that come next, where it ran with 1.
    #[test]
    fn a_run_whose_first_host_was_refused_runs_with_its_ranks_per_run() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = scheduler(tmp.path(), &[0], settings(2, None, 0));
        let mut jobs = Vec::new();
        let refused = s.place(&mut jobs, "a", DeviceKind::Cpu, 2, None).unwrap_err();
        assert!(refused.to_string().contains("address"), "{refused}");
        member(s.place(&mut jobs, "b", DeviceKind::Cpu, 1, LOOPBACK).unwrap());
        assert_eq!(jobs[0].phase, Phase::Waiting, "started without its second rank");
        member(s.place(&mut jobs, "c", DeviceKind::Cpu, 1, LOOPBACK).unwrap());
        assert_eq!((jobs[0].phase.clone(), jobs[0].world_size()), (Phase::Running, 2));
    }

    #[test]
    fn the_sweep_counts_the_time_without_hosts_once_its_hosts_are_all_gone() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = scheduler(tmp.path(), &[0, 1], settings(1, None, 3));
        let mut jobs = Vec::new();
        let long_ago = |s: &mut Scheduler| {
            s.last_host_seen = Instant::now() - Duration::from_secs(3600);
        };
        // No host yet: the wait counts from the start.
        long_ago(&mut s);
        assert!(s.without_hosts_for().unwrap() >= Duration::from_secs(3600));
        let (j, _) = member(s.place(&mut jobs, "a", DeviceKind::Cpu, 1, LOOPBACK).unwrap());
        assert!(s.without_hosts_for().unwrap() < Duration::from_secs(60));
        // A run that trains for an hour has its host with it all along.
        long_ago(&mut s);
        s.tick(&jobs);
        assert!(s.without_hosts_for().unwrap() < Duration::from_secs(60));
        // Its host dies: the run fails (heartbeats missed) and is queued
        // again; no host is in a run, and none asks for one since.
        jobs[j].fail("member r0a1-1 (a) missed heartbeats for 30s".into());
        s.tick(&jobs);
        assert_eq!((s.counts().queued, s.counts().running), (2, 0));
        long_ago(&mut s);
        s.tick(&jobs);
        assert!(s.without_hosts_for().unwrap() >= Duration::from_secs(3600));
        // A host that asks for a place, even one told to come back later,
        // is with the sweep.
        s.settings.max_parallel = Some(0);
        assert!(matches!(
            s.place(&mut jobs, "b", DeviceKind::Cpu, 1, LOOPBACK).unwrap(),
            Placement::JoinAgain(_)
        ));
        assert!(s.without_hosts_for().unwrap() < Duration::from_secs(60));
        // A run of two hosts that has one waits for the other: that host
        // alone does not count (it may be all that is left).
        s.settings.max_parallel = None;
        s.settings.ranks_per_run = 2;
        let (j, _) = member(s.place(&mut jobs, "c", DeviceKind::Cpu, 1, LOOPBACK).unwrap());
        assert_eq!(jobs[j].phase, Phase::Waiting);
        long_ago(&mut s);
        s.tick(&jobs);
        assert!(s.without_hosts_for().unwrap() >= Duration::from_secs(3600));
        // Its second host comes: it trains.
        member(s.place(&mut jobs, "d", DeviceKind::Cpu, 1, LOOPBACK).unwrap());
        assert_eq!(jobs[j].phase, Phase::Running);
        long_ago(&mut s);
        s.tick(&jobs);
        assert!(s.without_hosts_for().unwrap() < Duration::from_secs(60));
        // Over: nothing is waited for.
        for run in &mut s.runs {
            run.state = RunState::Finished;
        }
        assert_eq!(s.without_hosts_for(), None);
    }

    /// A host the sweep refuses (ranks that do not divide `--ranks-per-run`,
    /// or unlike its first host) is not a host with the sweep: the time
    /// without hosts runs on, and the sweep gives up at its deadline where
    /// such hosts asking again and again kept it waiting for ever.
    #[test]
    fn a_host_the_sweep_refuses_does_not_count_as_a_host_with_it() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = scheduler(tmp.path(), &[0, 1], settings(2, None, 0));
        let mut jobs = Vec::new();
        s.last_host_seen = Instant::now() - Duration::from_secs(3600);
        // Three ranks do not divide a run's two.
        assert!(s.place(&mut jobs, "a", DeviceKind::Cpu, 3, LOOPBACK).is_err());
        assert!(s.without_hosts_for().unwrap() >= Duration::from_secs(3600));
        // A host of one CPU rank is with the sweep, and sets its hosts' shape.
        member(s.place(&mut jobs, "b", DeviceKind::Cpu, 1, LOOPBACK).unwrap());
        assert!(s.without_hosts_for().unwrap() < Duration::from_secs(60));
        // A CUDA host is unlike it: refused, and not with the sweep.
        s.last_host_seen = Instant::now() - Duration::from_secs(3600);
        assert!(s.place(&mut jobs, "c", DeviceKind::Cuda, 1, None).is_err());
        assert!(s.without_hosts_for().unwrap() >= Duration::from_secs(3600));
        // A CPU host with no address its ranks can be reached at is of the
        // sweep's shape, but the run's job refuses it: not with the sweep.
        s.last_host_seen = Instant::now() - Duration::from_secs(3600);
        assert!(s.place(&mut jobs, "e", DeviceKind::Cpu, 1, None).is_err());
        assert!(s.without_hosts_for().unwrap() >= Duration::from_secs(3600));
        // A second CPU host of one rank is.
        member(s.place(&mut jobs, "d", DeviceKind::Cpu, 1, LOOPBACK).unwrap());
        assert!(s.without_hosts_for().unwrap() < Duration::from_secs(60));
        // A first host that the run's job refuses sets no shape for the
        // sweep's hosts: a CUDA host after a refused CPU one is taken.
        let tmp = tempfile::tempdir().unwrap();
        let mut s = scheduler(tmp.path(), &[0], settings(1, None, 0));
        let mut jobs = Vec::new();
        assert!(s.place(&mut jobs, "x", DeviceKind::Cpu, 1, None).is_err());
        member(s.place(&mut jobs, "y", DeviceKind::Cuda, 1, None).unwrap());
    }

    #[test]
    fn a_stopping_coordinator_records_no_outcome_queues_no_retry_and_places_no_host() {
        let tmp = tempfile::tempdir().unwrap();
        let s = scheduler(tmp.path(), &[0, 1], settings(1, None, 0));
        let mut state = crate::state::Coordination::sweep(s);
        let Placement::Member { .. } = state.join("a", DeviceKind::Cpu, 1, LOOPBACK).unwrap()
        else {
            panic!("not placed")
        };
        let _ = state.run_files_to_write();
        // A second run whose ranks all finished just before the stop (a
        // Leave, between two passes) is recorded as finished.
        let Placement::Member { job, .. } = state.join("b", DeviceKind::Cpu, 1, LOOPBACK).unwrap()
        else {
            panic!("not placed")
        };
        end(&mut state.jobs, job, true);
        let _ = state.run_files_to_write();
        // Stopped by a signal: the run's job fails, but the run (on its last
        // attempt, --max-retries 0) is not failed for it, and no retry is
        // queued in its place; --resume runs it again.
        state.fail_all("coordinator stopped by SIGINT");
        state.check_liveness();
        let sweep = state.sweep.as_ref().unwrap();
        assert_eq!(
            (sweep.runs[0].state, sweep.runs[1].state),
            (RunState::Running, RunState::Finished)
        );
        assert_eq!(sweep.counts().queued, 0);
        let files = state.run_files_to_write();
        let outcomes: Vec<_> = files.iter().filter(|f| f.path.ends_with("outcome.json")).collect();
        assert_eq!(outcomes.len(), 1, "the finished run's outcome alone");
        assert!(outcomes[0].path.to_string_lossy().contains("seed-001"), "{:?}", outcomes[0].path);
        assert!(matches!(
            state.join("b", DeviceKind::Cpu, 1, LOOPBACK).unwrap(),
            Placement::JoinAgain(_)
        ));
        assert_eq!(state.jobs.len(), 2, "a host was placed in a new run");
    }

    #[test]
    fn a_run_whose_folder_cannot_be_written_fails_and_the_sweep_goes_on() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = scheduler(tmp.path(), &[0, 1], settings(1, None, 2));
        // A file where run 0's folder must go.
        std::fs::create_dir_all(tmp.path().join("runs")).unwrap();
        std::fs::write(tmp.path().join("runs/seed-000"), "in the way").unwrap();
        let mut jobs = Vec::new();
        let (j, _) = member(s.place(&mut jobs, "a", DeviceKind::Cpu, 1, LOOPBACK).unwrap());
        assert_eq!(jobs[j].label.as_deref(), Some("seed-001"));
        assert_eq!(s.runs[0].state, RunState::Failed);
        assert!(s.runs[0].failure.as_deref().is_some_and(|f| f.contains("cannot start")));
        assert!(s.runs[0].could_not_start && !s.runs[1].could_not_start);
        end(&mut jobs, j, false);
        s.tick(&jobs);
        // The sweep's last line says why it could not start (it has no
        // outcome.json); a run failed otherwise is named alone (its
        // outcome.json says why).
        let failed = failed_runs(&s.views(&jobs));
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert!(failed[0].starts_with("seed-000 (cannot start: "), "{failed:?}");
        assert!(failed[0].contains("runs/seed-000"), "{failed:?}");
        for _ in 0..2 {
            let (j, _) = member(s.place(&mut jobs, "a", DeviceKind::Cpu, 1, LOOPBACK).unwrap());
            end(&mut jobs, j, false);
            s.tick(&jobs);
        }
        assert!(s.is_over());
        assert_eq!(failed_runs(&s.views(&jobs))[1], "seed-001");
    }

    /// Only a run that could not start is named with its reason on the
    /// sweep's last line: a run whose job failed, whatever its reason's
    /// words (here a worker's, that begin as a run that could not start
    /// is told), has an outcome.json that says why, and is named alone.
    #[test]
    fn a_run_whose_job_failed_is_named_alone_whatever_its_reason_says() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = scheduler(tmp.path(), &[0], settings(1, None, 0));
        let mut jobs = Vec::new();
        let (j, _) = member(s.place(&mut jobs, "a", DeviceKind::Cpu, 1, LOOPBACK).unwrap());
        jobs[j].fail("cannot start: the data loader found no image".into());
        s.tick(&jobs);
        assert!(s.is_over());
        assert_eq!(failed_runs(&s.views(&jobs)), ["seed-000"]);
    }

    #[test]
    fn a_failed_run_is_retried_first_from_its_checkpoint_then_recorded_failed() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = scheduler(tmp.path(), &[0, 1], settings(1, None, 1));
        let mut jobs = Vec::new();
        let (j0, _) = member(s.place(&mut jobs, "a", DeviceKind::Cpu, 1, LOOPBACK).unwrap());
        jobs[j0].commit_checkpoint(1, 0, 4, "/runs/seed-000/checkpoints/x".into()).unwrap();
        end(&mut jobs, j0, false);
        s.tick(&jobs);
        assert_eq!(s.runs[0].state, RunState::Queued);
        assert_eq!(s.runs[0].resume_from.as_deref(), Some("/runs/seed-000/checkpoints/x"));
        // The retry goes before run 1, resuming from the checkpoint.
        let (j, _) = member(s.place(&mut jobs, "a", DeviceKind::Cpu, 1, LOOPBACK).unwrap());
        assert_eq!(jobs[j].resume_from.as_deref(), Some("/runs/seed-000/checkpoints/x"));
        assert_eq!(s.runs[0].attempts, 2);
        // Its generation record says from which update, and why it runs again.
        jobs[j].leave("r0a2-1", 0, 0, false, "x", FailureCause::Unknown).ok();
        let records = crate::job::tests::records(&jobs[j]);
        let generation = records.iter().find(|r| r["kind"] == "generation").unwrap();
        assert_eq!(generation["resume_step"], 4, "{generation}");
        let reasons = &generation["reasons"];
        assert_eq!(
            (reasons[0]["kind"].as_str(), reasons[1]["kind"].as_str()),
            (Some("start"), Some("retry"))
        );
        assert_eq!(reasons[1]["attempt"], 2);
        assert!(reasons[1]["failure"].as_str().unwrap().contains("boom"), "{reasons}");
        end(&mut jobs, j, false);
        s.tick(&jobs);
        assert_eq!(s.runs[0].state, RunState::Failed);
        write_files(&mut s);
        let outcome = RunOutcome::read(&SweepLayout::new(tmp.path()), "seed-000").unwrap().unwrap();
        assert_eq!((outcome.end, outcome.attempts), (RunEnd::Failed, 2));
        assert!(outcome.failure.unwrap().contains("boom"));
        let (j, _) = member(s.place(&mut jobs, "a", DeviceKind::Cpu, 1, LOOPBACK).unwrap());
        end(&mut jobs, j, true);
        s.tick(&jobs);
        assert!(s.is_over());
        assert!(matches!(
            s.place(&mut jobs, "a", DeviceKind::Cpu, 1, LOOPBACK).unwrap(),
            Placement::SweepOver
        ));
        assert_eq!(s.counts(), Counts { total: 2, finished: 1, failed: 1, ..Counts::default() });
    }

    #[test]
    fn a_resumed_sweep_gives_a_run_that_failed_before_its_retries_again() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = scheduler(tmp.path(), &[0], settings(1, None, 1));
        // Failed twice in an earlier invocation with --max-retries 1.
        s.runs[0].attempts = 2;
        let mut jobs = Vec::new();
        let (j, _) = member(s.place(&mut jobs, "a", DeviceKind::Cpu, 1, LOOPBACK).unwrap());
        end(&mut jobs, j, false);
        s.tick(&jobs);
        assert_eq!(s.runs[0].state, RunState::Queued, "its one retry of this invocation");
        let (j, _) = member(s.place(&mut jobs, "a", DeviceKind::Cpu, 1, LOOPBACK).unwrap());
        end(&mut jobs, j, false);
        s.tick(&jobs);
        assert_eq!(s.runs[0].state, RunState::Failed);
        write_files(&mut s);
        let outcome = RunOutcome::read(&SweepLayout::new(tmp.path()), "seed-000").unwrap().unwrap();
        assert_eq!((outcome.end, outcome.attempts), (RunEnd::Failed, 4));

        // An outcome that says as many attempts as can be counted (edited,
        // or a sweep resumed for ever): the count saturates, and the run
        // still gets only its retries.
        let tmp = tempfile::tempdir().unwrap();
        let mut s = scheduler(tmp.path(), &[0], settings(1, None, 1));
        s.runs[0].attempts = u32::MAX;
        let mut jobs = Vec::new();
        for _ in 0..2 {
            let (j, _) = member(s.place(&mut jobs, "a", DeviceKind::Cpu, 1, LOOPBACK).unwrap());
            end(&mut jobs, j, false);
            s.tick(&jobs);
        }
        assert_eq!(s.runs[0].state, RunState::Failed);
        assert_eq!((s.runs[0].attempts, s.runs[0].attempts_here), (u32::MAX, 2));
    }

    /// A run its ranks ended while no coordinator ran (its end committed in
    /// its folder, its last records in rank 0's file alone) is kept as
    /// finished by `up --resume`, rank 0's records taken once and its
    /// outcome written; one epoch short, it is left to run again.
    #[test]
    fn a_run_its_ranks_finished_while_no_coordinator_ran_is_kept_as_finished() {
        use crate::saved::tests::{
            committed_at_epoch_end, recipe, recorded_steps, reported_records,
        };
        let recipe = recipe();
        let epochs = recipe.total_epochs();
        for (next_epoch, finished) in [(epochs, true), (epochs - 1, false)] {
            let tmp = tempfile::tempdir().unwrap();
            let layout = SweepLayout::new(tmp.path());
            let run = layout.run_dir("seed-000");
            let name = format!("{}{next_epoch:04}", rsb_job::checkpoint::FOLDER_PREFIX);
            let end = committed_at_epoch_end(&run, &name, next_epoch);
            // The coordinator took update 1; rank 0 made 2 and 3 once it was gone.
            let steps = recorded_steps(3);
            let lines = |records: &[rsb_job::MetricsRecord]| -> String {
                records.iter().map(|r| serde_json::to_string(r).unwrap() + "\n").collect()
            };
            std::fs::write(layout.run_metrics("seed-000"), lines(&steps[..1])).unwrap();
            let rank_zero = rsb_job::run_folder::rank_records_file(&run, 0);
            std::fs::create_dir_all(rank_zero.parent().unwrap()).unwrap();
            std::fs::write(&rank_zero, lines(&steps)).unwrap();
            let kept = keep_run_finished_while_away(&layout, "seed-000", &recipe, None).unwrap();
            if !finished {
                assert!(kept.is_none(), "{end:?}");
                assert_eq!(RunOutcome::read(&layout, "seed-000").unwrap(), None);
                assert_eq!(reported_records(&run), steps[..1]);
                // Queued to go on from its newest checkpoint: the records
                // of the stretch trained while away are taken, once.
                let said = take_records_of_unfinished_run(&layout, "seed-000").unwrap();
                assert!(said.is_some_and(|s| s.contains("the 2 record(s)")));
                assert_eq!(reported_records(&run), steps, "updates 2 and 3 taken");
                take_records_of_unfinished_run(&layout, "seed-000").unwrap();
                assert_eq!(reported_records(&run), steps, "taken twice");
                let never_ran = take_records_of_unfinished_run(&layout, "seed-001").unwrap();
                assert_eq!(never_ran, None);
                continue;
            }
            let (outcome, said) = kept.expect("kept as finished");
            assert_eq!((outcome.end, outcome.attempts), (RunEnd::Finished, 1), "{outcome:?}");
            assert_eq!(RunOutcome::read(&layout, "seed-000").unwrap().as_ref(), Some(&outcome));
            assert!(said.contains(&end.display().to_string()), "{said}");
            assert!(said.contains("the 2 record(s) rank 0 made"), "{said}");
            assert_eq!(reported_records(&run), steps, "updates 2 and 3 taken, once");
            // Kept again (killed before the outcome was written): nothing is
            // taken twice, and a failed attempt's count and failure stay.
            let failed = RunOutcome {
                end: RunEnd::Failed,
                attempts: 2,
                failure: Some("rank 0 died".into()),
            };
            let (outcome, said) =
                keep_run_finished_while_away(&layout, "seed-000", &recipe, Some(&failed))
                    .unwrap()
                    .unwrap();
            assert_eq!(outcome, RunOutcome { end: RunEnd::Finished, ..failed.clone() }, "{said}");
            assert!(said.contains("rank 0 made no record that no coordinator took"), "{said}");
            assert_eq!(reported_records(&run), steps);
            // Retries the killed coordinator made after that outcome wrote
            // none, but their jobs' generation records: the highest counts,
            // also when an invocation killed before it wrote an outcome
            // left a later one to count from the last outcome again (4,
            // then 3).
            let retried = |attempt: u32| rsb_job::MetricsRecord::Generation {
                generation: 1,
                hosts: vec!["a".into()],
                world_size: 1,
                accumulation: 1,
                resume_from: None,
                resume_step: None,
                reasons: vec![
                    GenerationReason::Start,
                    GenerationReason::Retry { attempt, failure: format!("boom {}", attempt - 1) },
                ],
            };
            let mut metrics = std::fs::OpenOptions::new()
                .append(true)
                .open(layout.run_metrics("seed-000"))
                .unwrap();
            let retries = [retried(3), retried(4), retried(3)];
            std::io::Write::write_all(&mut metrics, lines(&retries).as_bytes()).unwrap();
            let (outcome, _) =
                keep_run_finished_while_away(&layout, "seed-000", &recipe, Some(&failed))
                    .unwrap()
                    .unwrap();
            assert_eq!((outcome.attempts, outcome.failure.as_deref()), (4, Some("boom 3")));
            // Not over yet: resumed, its next attempt is the fifth, after
            // "boom 3", where it was numbered from the outcome's 2 again.
            let (attempts, failure) = attempts_so_far(&layout, "seed-000", Some(&failed));
            assert_eq!((attempts, failure.as_deref()), (4, Some("boom 3")));
            assert_eq!(attempts_so_far(&layout, "seed-001", Some(&failed)), (2, failed.failure));
        }
    }
}
