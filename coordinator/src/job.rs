//! The job state machine: members join until the expected number of hosts is
//! there, ranks are assigned in join order (then local rank), the ranks
//! rendezvous, train, report and leave.
//!
//! A fixed job (`min_nodes == max_nodes`, the default) is fail-stop: a member
//! that stops heartbeating, or a rank that leaves with a failure, fails the
//! job, naming it. An elastic job (`min_nodes < max_nodes`) runs in
//! generations instead. A lost member (silent past the heartbeat timeout) is
//! dropped; a stopped member (its ranks asked every rank to stop: a
//! preempted host) leaves once rank 0's stop checkpoint is committed
//! ([`HostsStopping`]); a failed rank restarts every rank (its host stays,
//! since its agent is alive; at most `max_restarts` times without a
//! committed checkpoint in between); a host that joins the running job waits, pending,
//! for the first committed checkpoint after which a larger world can run
//! with it. Hosts whose ranks cannot all split the batch run on the largest
//! set of them that can; the others stand by, pending
//! ([`Job::fit_members_to_the_batch`]). Each of these opens a new generation:
//! the generation number is bumped, ranks are renumbered over the members in
//! join order, the batch plan is re-derived for the new world size, the
//! rendezvous starts over, and every assignment resumes from the newest
//! committed checkpoint. Calls of an older generation are refused. With
//! fewer than `min_nodes` members left (or none of `min_nodes` that can
//! split the batch) the job waits for joins up to
//! `rejoin_timeout`, then fails naming the lost hosts. Before its first
//! generation, a job waits for its hosts up to `join_timeout`, then fails
//! saying how many came and which. Each generation that
//! starts is written to `metrics.jsonl` as a [`MetricsRecord::Generation`].
//!
//! Records bound for `metrics.jsonl` (the generations', and rank 0's) are
//! only queued while the coordinator's state lock is held; they are written
//! once it is released ([`MetricsSink`]), so a slow or stalled disk holds up
//! no other call.
//!
//! Each member gets a session secret at join; [`Job::authenticate`] checks a
//! call's member credentials (in constant time), and every later operation
//! names the calling member, which may act only for its own ranks.

use crate::plan::{hosts_that_split, BatchPlan, PlanError};
use rsb_job::records::{input_wait_note, skipped_images_note, skipped_updates_note};
use rsb_job::{GenerationReason, MetricsLog, MetricsLogError, MetricsRecord, RankBalance};
use rsb_proto::agent_calls;
use rsb_proto::auth::Secret;
use rsb_recipes::Recipe;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, TryLockError};
use std::time::{Duration, Instant};

/// How long after a rank's first collective-timeout report the coordinator
/// waits for the other ranks' reports before it names the rank to blame.
const BLAME_GRACE: Duration = Duration::from_secs(5);

/// The same wait when the report names no peer (NCCL), where the ranks that
/// report nothing are blamed: every healthy rank must have reported by
/// then, also one whose thread is blocked on the aborted stream, which
/// NCCL's exit timer ends [`agent_calls::NCCL_EXIT_GRACE`] after its
/// failure and whose agent then reports it (30 s: the sum of the steps,
/// with 5 s to spare; see [`agent_calls::NCCL_PEER_UNKNOWN_REPORTED_WITHIN`]).
const BLAME_GRACE_PEER_UNKNOWN: Duration = agent_calls::NCCL_PEER_UNKNOWN_REPORTED_WITHIN;

/// What runs the ranks of a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// CPU ranks (TCP ring).
    Cpu,
    /// One rank per GPU (NCCL).
    Cuda,
}

/// A joined worker host.
#[derive(Debug, Clone)]
pub struct Member {
    /// Identifier handed out at join.
    pub id: String,
    /// Host name it reported.
    pub host: String,
    /// Device kind of its ranks.
    pub kind: DeviceKind,
    /// Ranks it runs.
    pub local_ranks: u32,
    /// First global rank of this member.
    pub first_rank: u32,
    /// Last heartbeat.
    pub last_seen: Instant,
    /// The address it said other hosts reach it at (its ranks' ring
    /// listeners must be there).
    pub advertise: Option<IpAddr>,
    /// Session secret handed out at join (never shown).
    pub secret: Secret,
    /// By local rank: the newest generation whose assignment that rank
    /// fetched (0: none yet).
    pub rank_generations: Vec<u64>,
}

impl Member {
    /// The global ranks this member runs.
    pub fn ranks(&self) -> std::ops::Range<u32> {
        self.first_rank..self.first_rank + self.local_ranks
    }
}

/// Where the job is.
#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    /// Waiting for hosts to join.
    Waiting,
    /// Ranks assigned; training.
    Running,
    /// Every rank left successfully.
    Finished,
    /// Something failed; the reason.
    Failed(String),
}

/// Rendezvous data a rank publishes.
#[derive(Debug, Clone, PartialEq)]
pub enum RendezvousPayload {
    /// 128-byte NCCL unique id (rank 0 of a CUDA job).
    NcclId(Vec<u8>),
    /// `host:port` of a CPU rank's ring listener.
    RingAddress(String),
}

/// What a rank that asks for its share of the job is told now.
#[derive(Debug, Clone, PartialEq)]
pub enum RankShare {
    /// Its share of the running generation.
    Assigned(RankAssignment),
    /// The job finished before the rank had a share (or after it trained
    /// its part): nothing is left for it to train, and it ends successfully.
    JobFinished,
    /// Not yet: the job waits for its members, or the rank's host waits to
    /// be admitted.
    Wait,
}

/// A rank's assignment.
#[derive(Debug, Clone, PartialEq)]
pub struct RankAssignment {
    /// Global rank.
    pub global_rank: u32,
    /// World size.
    pub world_size: u32,
    /// The batch plan.
    pub plan: BatchPlan,
}

/// Errors the service maps onto gRPC statuses.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum JobError {
    /// The caller named something that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// The job cannot do this now (full, failed, wrong generation).
    #[error("{0}")]
    Precondition(String),
    /// The caller's member credentials are missing or wrong.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller is a member, but acts for something that is not its own.
    #[error("{0}")]
    Denied(String),
    /// The job could not finish the call in time (its metrics log busy on a
    /// slow disk); the call may be made again.
    #[error("{0}")]
    Unavailable(String),
}

impl JobError {
    /// A call that presents no member credentials.
    pub fn no_credentials() -> JobError {
        JobError::Unauthenticated(
            "this call needs the member's credentials (x-rsb-member and x-rsb-member-secret \
             from Join)"
                .into(),
        )
    }

    /// Member credentials that match no member: an unknown id and a wrong
    /// secret get this same answer.
    pub fn credentials_refused() -> JobError {
        JobError::Unauthenticated(
            "member credentials not accepted: unknown member or wrong secret".into(),
        )
    }
}

/// A checkpoint rank 0 wrote and the job recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct CommittedCheckpoint {
    /// Epoch (0-based) it was written in.
    pub epoch: u64,
    /// Optimizer updates done over the run at it (its position, as the
    /// commit says).
    pub step: u64,
    /// Its folder on rank 0's host.
    pub path: String,
}

/// What a heartbeat tells the member.
#[derive(Debug, Clone, PartialEq)]
pub struct Beat {
    /// False once the job is over for this member.
    pub keep_going: bool,
    /// The member waits to be admitted at the next generation.
    pub pending: bool,
    /// By local rank: the generation whose assignment that rank last
    /// fetched (0: none yet); empty for a member waiting to be admitted.
    pub rank_fetches: Vec<u64>,
    /// Why the job (or this member's part in it) ended, when it failed.
    pub failure: Option<String>,
}

impl Beat {
    /// The newest generation every one of its ranks fetched the assignment
    /// of (the oldest of theirs): its ranks need no restart for it.
    pub fn ranks_generation(&self) -> u64 {
        self.rank_fetches.iter().copied().min().unwrap_or(0)
    }

    /// The newest generation any of its ranks fetched the assignment of.
    pub fn newest_ranks_generation(&self) -> u64 {
        self.rank_fetches.iter().copied().max().unwrap_or(0)
    }
}

/// The longest heartbeat interval members are told to use
/// ([`Job::heartbeat_interval`]): the longest the agents' loops sleep, which
/// the waits built on them count with.
pub const HEARTBEAT_INTERVAL: Duration = agent_calls::HEARTBEAT_INTERVAL_MAX;
/// Default of [`Job::join_timeout`], as torchrun's rendezvous `join_timeout`.
pub const DEFAULT_JOIN_TIMEOUT: Duration = Duration::from_secs(600);
/// Default of [`Job::rejoin_timeout`].
pub const DEFAULT_REJOIN_TIMEOUT: Duration = Duration::from_secs(300);
/// Default of [`Job::max_restarts`].
pub const DEFAULT_MAX_RESTARTS: u32 = 3;
/// Default of [`Job::rendezvous_timeout`]: a rank process starts, loads
/// libtorch, gets its assignment and publishes in seconds.
pub const DEFAULT_RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(300);

/// The whole coordinator state.
#[derive(Debug)]
pub struct Job {
    /// Job identifier.
    pub id: String,
    /// Generation (bumped when the membership of a running job changes).
    pub generation: u64,
    /// Hosts to wait for.
    pub nodes_expected: u32,
    /// Fewest hosts an elastic job runs with (see [`Job::set_node_bounds`]).
    pub min_nodes: u32,
    /// Most hosts an elastic job admits.
    pub max_nodes: u32,
    /// How long a job below `min_nodes` waits for joins before failing.
    pub rejoin_timeout: Duration,
    /// How long a job that never started waits for its hosts (from
    /// `waiting_since`) before failing; `None` for a sweep's run, which
    /// waits for hosts that other runs free (the sweep has its own).
    pub join_timeout: Option<Duration>,
    /// When this job (or this coordinator's restore of it) began to wait
    /// for its hosts.
    pub waiting_since: Instant,
    /// Generations opened for failed ranks, in a row without a committed
    /// checkpoint, before the job fails instead.
    pub max_restarts: u32,
    /// The resolved recipe.
    pub recipe: Recipe,
    /// The resolved recipe as YAML (sent to ranks).
    pub recipe_yaml: String,
    /// Run folder.
    pub out_dir: PathBuf,
    /// A member silent for this long fails the job.
    pub heartbeat_timeout: Duration,
    /// How long after a generation starts its ranks may take to publish
    /// their rendezvous data; past it, the ranks still missing are failed
    /// (a rank stuck before its collective while its agent heartbeats).
    pub rendezvous_timeout: Duration,
    /// When the current generation started running.
    running_since: Option<Instant>,
    /// Ranks of the current generation that came to the rendezvous without
    /// data to publish (NCCL ranks other than 0).
    at_rendezvous: BTreeSet<u32>,
    /// Current phase.
    pub phase: Phase,
    /// Members in join order.
    pub members: Vec<Member>,
    /// Hosts that joined the running job, admitted at the next generation.
    pub pending: Vec<Member>,
    /// Members dropped from the job, and why (their heartbeats are told so).
    pub dropped: Vec<(Member, String)>,
    /// Published rendezvous payloads by global rank.
    pub rendezvous: BTreeMap<u32, RendezvousPayload>,
    /// Ranks that left successfully.
    pub finished_ranks: u32,
    /// Global ranks that left (successfully or not).
    pub left_ranks: BTreeSet<u32>,
    /// Latest epoch / update / global images per second reported.
    pub progress: (u64, u64, f64),
    /// Checkpoints committed, newest last.
    pub checkpoints: Vec<CommittedCheckpoint>,
    /// Checkpoint (or run folder) rank 0 resumes from.
    pub resume_from: Option<String>,
    /// Updates done in `resume_from`, when the job committed it.
    pub resume_step: Option<u64>,
    /// Whether a generation ever ran (a later `Waiting` is a regroup).
    started: bool,
    /// Since when a started job waits below `min_nodes`.
    regroup_since: Option<Instant>,
    /// Until when the members of a job restored by `up --auto-resume` may
    /// come back (see [`Job::await_restored_members`]).
    reclaim_until: Option<Instant>,
    /// The longest an agent that outlived its coordinator takes to call a
    /// new one ([`agent_calls::CALLS_AGAIN_WITHIN`]; shorter in tests).
    pub agents_call_again_within: Duration,
    /// Before this, no member of a restored job counts as silent (see
    /// [`Job::await_restored_members`]).
    silent_not_before: Option<Instant>,
    /// Members whose heartbeat was answered that the job is finished (each
    /// of their agents then exits): those a coordinator that found its job
    /// finished need not wait for.
    told_finished: BTreeSet<String>,
    /// Hosts lost since the last generation started (host and why).
    lost: Vec<String>,
    /// Why the next generation opens.
    reasons: Vec<GenerationReason>,
    /// Generations opened for failed ranks since the last commit.
    restarts: u32,
    /// Ranks that failed in a collective because of a peer (silent, or its
    /// link closed): rank -> (that peer, `None` where the backend cannot
    /// name it; its failure), while the blame is being assigned.
    collective_failures: BTreeMap<u32, (Option<u32>, String)>,
    /// When to assign the blame (a short grace after the first report).
    blame_at: Option<Instant>,
    /// Hosts of an elastic job leaving at their ranks' stop request (see
    /// [`HostsStopping`]), until the next generation drops them.
    hosts_stopping: Option<HostsStopping>,
    /// The records bound for `metrics.jsonl` (made at the first record, in
    /// the run folder of then).
    metrics: Option<Arc<MetricsSink>>,
    /// The generation and number of the last numbered report (a metrics
    /// record or a checkpoint commit) taken from rank 0: a report sent
    /// again, its answer lost, is not taken twice.
    last_report: (u64, u64),
    next_member: u64,
    /// Prefix of the member ids this job hands out (a sweep's jobs share
    /// one service, so their ids must differ).
    pub member_prefix: String,
    /// The run this job is, in a sweep: its progress lines start with it.
    pub label: Option<String>,
    /// Where progress lines go.
    pub printer: crate::printer::Printer,
    /// Updates the run makes in all, once a step record said so.
    pub total_updates: Option<u64>,
    /// Where the job's state is saved for a restart of the coordinator
    /// ([`crate::saved`]); `None`: not saved (a sweep's runs).
    pub state_file: Option<PathBuf>,
    /// [`Secret::fingerprint`] of the job token, saved with the state so
    /// that a restore with another token is refused at once (its agents
    /// still present the old one).
    pub token_fingerprint: Option<String>,
    /// The state last handed out to be saved (saved again only when it
    /// changes), and how many states were handed out.
    last_saved: Option<crate::saved::SavedJob>,
    saved_version: u64,
}

/// A job's state to be written to its state file: taken under the
/// coordinator's lock ([`Job::state_to_save`]), written after the lock is
/// released ([`PendingSave::write`]), so a slow disk holds up no other call.
/// Versions order the states of one job: a state older than one already
/// written is not written.
#[derive(Debug)]
pub struct PendingSave {
    /// The job's state file.
    pub file: PathBuf,
    /// The state's place among this job's states (1, 2, ...).
    pub version: u64,
    saved: crate::saved::SavedJob,
}

impl PendingSave {
    /// Writes the state atomically ([`crate::saved::SavedJob::write`]).
    pub fn write(&self) -> Result<(), crate::saved::SavedError> {
        self.saved.write(&self.file)
    }
}

/// Why the records rank 0 made while no coordinator ran are not taken
/// ([`records_made_while_away`]); says so as the job's end does.
#[derive(Debug, thiserror::Error)]
pub enum RecordsNotTaken {
    /// The run folder holds no file of rank 0's records.
    #[error("there is no {} to take them from", .0.display())]
    NoRankZeroFile(PathBuf),
    /// They stay in rank 0's file alone, for the reason given.
    #[error(
        "the records rank 0 made while no coordinator ran stay in {} alone ({why})",
        rank_zero_file.display()
    )]
    Left {
        /// Rank 0's file.
        rank_zero_file: PathBuf,
        /// Why they are not taken.
        why: String,
    },
}

/// The records rank 0 of the run in `out_dir` reported that no coordinator
/// took (made while none ran, or queued by one that was killed), to append
/// to its `metrics.jsonl`: those its own file (`ranks/rank-0.jsonl`) holds
/// after the last record the run's file holds, of the last rank 0 process
/// ([`rsb_job::records::not_taken`]). Nothing is guessed: a rank 0 file
/// that does not hold the run's last record gives none. Call it only while
/// no record of the run is being written.
pub fn records_made_while_away(out_dir: &Path) -> Result<Vec<MetricsRecord>, RecordsNotTaken> {
    let rank_zero_file = rsb_job::run_folder::rank_records_file(out_dir, 0);
    let left = |why: String| RecordsNotTaken::Left { rank_zero_file: rank_zero_file.clone(), why };
    let not_found = |e: &rsb_report::ReportError| {
        matches!(e, rsb_report::ReportError::Io { error, .. }
            if error.kind() == std::io::ErrorKind::NotFound)
    };
    let taken = match rsb_report::runs::read_metrics(&out_dir.join("metrics.jsonl")) {
        Ok(records) => records,
        Err(e) if not_found(&e) => Vec::new(),
        Err(e) => return Err(left(e.to_string())),
    };
    let rank_zero = match rsb_report::runs::read_metrics(&rank_zero_file) {
        Ok(records) => records,
        Err(e) if not_found(&e) => return Err(RecordsNotTaken::NoRankZeroFile(rank_zero_file)),
        Err(e) => return Err(left(e.to_string())),
    };
    rsb_job::records::not_taken(&taken, &rank_zero)
        .ok_or_else(|| left("it does not hold the last record metrics.jsonl holds".into()))
}

/// What a run its ranks finished while no coordinator ran (`what`: "the
/// job", "the run") is said to end with: `checkpoint`, at `position`, ends
/// the last of `total_epochs`. One wording for a job's end and a sweep's run.
pub fn finished_while_away(
    what: &str,
    checkpoint: &Path,
    position: &rsb_job::checkpoint::RunPosition,
    total_epochs: u64,
) -> String {
    format!(
        "{what} finished while no coordinator ran: {} ends its last epoch ({} of {total_epochs}, \
         {} updates)",
        checkpoint.display(),
        position.next_epoch,
        position.updates,
    )
}

/// Hands `records`, those rank 0 made that no coordinator took
/// ([`records_made_while_away`]), to `append`, and says what was done,
/// naming the run's file as `into` and rank 0's as `rank_zero_file`; why
/// none were taken is logged and said. One wording for a job's end and a
/// sweep's run.
pub fn take_records<E>(
    records: Result<Vec<MetricsRecord>, RecordsNotTaken>,
    into: &str,
    rank_zero_file: &Path,
    append: impl FnOnce(Vec<MetricsRecord>) -> Result<(), E>,
) -> Result<String, E> {
    let records = match records {
        Ok(records) => records,
        Err(e) => {
            tracing::warn!("the records rank 0 made while no coordinator ran are not taken: {e}");
            return Ok(e.to_string());
        }
    };
    if records.is_empty() {
        return Ok("rank 0 made no record that no coordinator took".into());
    }
    let count = records.len();
    append(records)?;
    Ok(format!(
        "the {count} record(s) rank 0 made that no coordinator took are appended to {into} \
         from {}",
        rank_zero_file.display()
    ))
}

/// Appends to `metrics` the records rank 0 made in the run folder `run_dir`
/// that no coordinator took ([`take_records`]), outside any job and its
/// lock (a run over before this coordinator served it), and says what was
/// done.
pub fn append_records_made_while_away(
    run_dir: &Path,
    metrics: &Path,
) -> Result<String, MetricsLogError> {
    take_records(
        records_made_while_away(run_dir),
        &metrics.display().to_string(),
        &rsb_job::run_folder::rank_records_file(run_dir, 0),
        |records| {
            let mut log = MetricsLog::open(metrics)?;
            records.iter().try_for_each(|record| log.append(record))?;
            log.sync()
        },
    )
}

/// The records a job accepted for its `metrics.jsonl`, on their way to the
/// file. The coordinator's state lock is never held while the file is
/// written (a stalled network file system would hold up every call of every
/// member, heartbeats included): under that lock a record is only queued;
/// the sink is shared ([`Arc`]) so that it can be taken out from under the
/// lock ([`Job::metrics_to_write`]) and written once the lock is released.
///
/// It has two locks of its own: the queue's, held only to push or pop a
/// record, never during a write; and the log's, held while writing (it owns
/// the [`MetricsLog`], opened at the first write). A writer takes the log's
/// lock, then pops and appends records until the queue is empty. Records
/// are pushed in the order the job accepted them (under the state lock) and
/// popped in that order under the log's lock, so the file holds them in
/// that order, whichever calls write them. A record that cannot be written
/// is logged (naming the file and the record's kind), and its failure handed
/// to its [`MetricsReceipt`] if it has one; the records after it are still
/// written.
#[derive(Debug)]
pub struct MetricsSink {
    path: PathBuf,
    /// The records waiting for a writer, oldest first.
    queue: Mutex<VecDeque<Queued>>,
    /// The open log, once a write opened it.
    log: Mutex<Option<MetricsLog>>,
}

/// A record waiting in a [`MetricsSink`], with where its failure goes when
/// a [`MetricsReceipt`] waits for it.
#[derive(Debug)]
struct Queued {
    record: MetricsRecord,
    failure: Option<Arc<OnceLock<JobError>>>,
}

impl Queued {
    /// Appends the record to `log`, opening it first (at `path`) if it is
    /// not open; a log that could not be opened is tried again with the next
    /// record. A failure is logged and handed to the receipt.
    fn append(self, path: &Path, log: &mut Option<MetricsLog>) -> bool {
        let appended = match log {
            Some(log) => log.append(&self.record),
            None => {
                MetricsLog::open(path).and_then(|opened| log.insert(opened).append(&self.record))
            }
        };
        // Synced before the record's receipt is answered: the commit of a
        // checkpoint made after it is synced into the state file.
        let (e, what) = match appended {
            Err(e) => (e, "is lost"),
            Ok(()) => match log.as_mut().map(MetricsLog::sync) {
                None | Some(Ok(())) => return true,
                Some(Err(e)) => (e, "is written but not synced to disk"),
            },
        };
        tracing::error!("a {} record {what}: {e}", self.record.kind());
        if let Some(failure) = self.failure {
            let _ = failure.set(match e {
                MetricsLogError::Encode { .. } => JobError::Invalid(e.to_string()),
                MetricsLogError::Io { .. } => JobError::Precondition(e.to_string()),
            });
        }
        false
    }
}

impl MetricsSink {
    /// A sink for the log at `path`, opened at the first write.
    fn new(path: PathBuf) -> MetricsSink {
        MetricsSink { path, queue: Mutex::default(), log: Mutex::default() }
    }

    fn queue(&self) -> MutexGuard<'_, VecDeque<Queued>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_log(&self) -> MutexGuard<'_, Option<MetricsLog>> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The log's lock, unless another call holds it.
    fn try_lock_log(&self) -> Option<MutexGuard<'_, Option<MetricsLog>>> {
        match self.log.try_lock() {
            Ok(log) => Some(log),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// Queues `record` after those pushed before it; cheap, in memory (the
    /// coordinator's lock is held).
    fn push(&self, record: MetricsRecord, failure: Option<Arc<OnceLock<JobError>>>) {
        self.queue().push_back(Queued { record, failure });
    }

    /// The oldest record waiting (the queue's lock is held for the pop alone).
    fn pop(&self) -> Option<Queued> {
        self.queue().pop_front()
    }

    /// Whether records wait to be written.
    pub fn has_pending(&self) -> bool {
        !self.queue().is_empty()
    }

    /// Whether no record waits to be written, nor is being written.
    fn is_idle(&self) -> bool {
        !self.has_pending() && self.try_lock_log().is_some()
    }

    /// Appends the waiting records, oldest first, until none is left;
    /// returns how many could not be written. The caller holds the log's lock.
    fn drain(&self, log: &mut Option<MetricsLog>) -> usize {
        let mut failed = 0;
        while let Some(queued) = self.pop() {
            if !queued.append(&self.path, log) {
                failed += 1;
            }
        }
        failed
    }

    /// Writes the waiting records with the log's lock held (`log`), then
    /// lets go of it, and writes the records pushed meanwhile, unless
    /// another call holds the lock by then: a call that found the lock
    /// taken left its records to the holder ([`MetricsSink::write_pending`]).
    /// The queue is looked at after each release, so no record is left
    /// behind. Returns how many records could not be written.
    fn write_then_release<'a>(&'a self, mut log: MutexGuard<'a, Option<MetricsLog>>) -> usize {
        let mut failed = 0;
        loop {
            failed += self.drain(&mut log);
            drop(log);
            if !self.has_pending() {
                return failed;
            }
            match self.try_lock_log() {
                Some(next) => log = next,
                None => return failed,
            }
        }
    }

    /// Writes the waiting records, unless another call is writing this log:
    /// that call writes them (it writes until the queue is empty), so a call
    /// never waits for another's write on a slow disk. Returns how many
    /// records this call could not write (each is logged). Never call it
    /// with the coordinator's lock held.
    pub fn write_pending(&self) -> usize {
        self.try_lock_log().map_or(0, |log| self.write_then_release(log))
    }

    /// Writes the waiting records, waiting first for a write in progress:
    /// once this returns, every record pushed before it was called has been
    /// written or reported. Returns how many records this call could not
    /// write (each is logged). Never call it with the coordinator's lock held.
    pub fn flush(&self) -> usize {
        self.write_then_release(self.lock_log())
    }

    /// Holds the log's lock, as a write stalled on the disk would, until
    /// the stall is dropped; then lets go of it as a writer does.
    #[cfg(test)]
    pub(crate) fn stall(&self) -> Stall<'_> {
        Stall { sink: self, log: Some(self.lock_log()) }
    }
}

/// A write stalled on the disk ([`MetricsSink::stall`]).
#[cfg(test)]
pub(crate) struct Stall<'a> {
    sink: &'a MetricsSink,
    log: Option<MutexGuard<'a, Option<MetricsLog>>>,
}

#[cfg(test)]
impl Drop for Stall<'_> {
    fn drop(&mut self) {
        if let Some(log) = self.log.take() {
            self.sink.write_then_release(log);
        }
    }
}

impl Drop for MetricsSink {
    /// Writes the records still waiting (a job dropped before its records
    /// were written), so that none is lost unreported. No one else holds
    /// the sink any more: no lock is taken.
    fn drop(&mut self) {
        let queue = self.queue.get_mut().unwrap_or_else(|p| p.into_inner());
        let log = self.log.get_mut().unwrap_or_else(|p| p.into_inner());
        while let Some(queued) = queue.pop_front() {
            queued.append(&self.path, log);
        }
    }
}

/// How often [`MetricsReceipt::written`] looks whether the log is free.
const RECEIPT_POLL: Duration = Duration::from_millis(5);

/// What [`Job::record_metrics`] accepted.
#[derive(Debug)]
pub struct Recorded {
    /// The progress line to print, if the record has one.
    pub line: Option<String>,
    /// Whether the record reached `metrics.jsonl`, once it is written.
    pub receipt: MetricsReceipt,
}

/// A record queued in its job's [`MetricsSink`], to learn, once the
/// coordinator's lock is released, whether it was written.
#[derive(Debug)]
pub struct MetricsReceipt {
    sink: Arc<MetricsSink>,
    /// Set by the writer if the record could not be written.
    failure: Arc<OnceLock<JobError>>,
}

impl MetricsReceipt {
    /// Waits until the record is written (writing it, and the records
    /// before it, unless another call is at it), for at most `deadline`,
    /// and says whether it could be: the log's error, already logged, as
    /// [`JobError::Precondition`] (the file) or [`JobError::Invalid`] (the
    /// record's encoding). Past the deadline (another write in progress on
    /// a slow disk) it answers [`JobError::Unavailable`], and the record
    /// stays queued for whoever writes next. Never call it with the
    /// coordinator's lock held.
    pub fn written(self, deadline: Duration) -> Result<(), JobError> {
        let started = Instant::now();
        // Once this call holds the log's lock and the queue is empty, the
        // record was written (by this call, or by one that held the lock before).
        let log = loop {
            if let Some(log) = self.sink.try_lock_log() {
                break log;
            }
            if started.elapsed() >= deadline {
                return Err(JobError::Unavailable(format!(
                    "{} is being written by another call that has not finished within {:?} \
                     (a slow disk?): this record stays queued and is written after it",
                    self.sink.path.display(),
                    deadline
                )));
            }
            std::thread::sleep(RECEIPT_POLL);
        };
        self.sink.write_then_release(log);
        self.failure.get().cloned().map_or(Ok(()), Err)
    }
}

impl Job {
    /// A job waiting for `nodes_expected` hosts.
    pub fn new(recipe: Recipe, out_dir: PathBuf, nodes_expected: u32) -> Job {
        let recipe_yaml = rsb_recipes::to_yaml(&recipe);
        // Unique across coordinators (one in a container is always pid 1):
        // the ring's key is the job id's and the generation's, and a rank
        // left over from another coordinator's job must not share it.
        let nonce = getrandom::u32().unwrap_or_else(|_| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos())
        });
        let id = format!("{}-{}-{nonce:08x}", recipe.name, std::process::id());
        Job {
            id,
            generation: 1,
            nodes_expected,
            min_nodes: nodes_expected,
            max_nodes: nodes_expected,
            rejoin_timeout: DEFAULT_REJOIN_TIMEOUT,
            join_timeout: Some(DEFAULT_JOIN_TIMEOUT),
            waiting_since: Instant::now(),
            max_restarts: DEFAULT_MAX_RESTARTS,
            recipe,
            recipe_yaml,
            out_dir,
            heartbeat_timeout: Duration::from_secs(30),
            rendezvous_timeout: DEFAULT_RENDEZVOUS_TIMEOUT,
            running_since: None,
            at_rendezvous: BTreeSet::new(),
            phase: Phase::Waiting,
            members: Vec::new(),
            pending: Vec::new(),
            dropped: Vec::new(),
            rendezvous: BTreeMap::new(),
            finished_ranks: 0,
            left_ranks: BTreeSet::new(),
            progress: (0, 0, 0.0),
            checkpoints: Vec::new(),
            resume_from: None,
            resume_step: None,
            started: false,
            regroup_since: None,
            reclaim_until: None,
            told_finished: BTreeSet::new(),
            agents_call_again_within: agent_calls::CALLS_AGAIN_WITHIN,
            silent_not_before: None,
            lost: Vec::new(),
            reasons: vec![GenerationReason::Start],
            restarts: 0,
            collective_failures: BTreeMap::new(),
            blame_at: None,
            hosts_stopping: None,
            metrics: None,
            last_report: (0, 0),
            next_member: 0,
            member_prefix: String::new(),
            label: None,
            printer: crate::printer::Printer::default(),
            total_updates: None,
            state_file: None,
            token_fingerprint: None,
            last_saved: None,
            saved_version: 0,
        }
    }

    /// Whether a generation ever ran.
    pub fn started(&self) -> bool {
        self.started
    }

    /// Member ids handed out so far.
    pub fn next_member(&self) -> u64 {
        self.next_member
    }

    /// Restarts of every rank in a row without a committed checkpoint.
    pub fn restarts(&self) -> u32 {
        self.restarts
    }

    /// A restored job's counters: ids go on from `next_member`; `started`
    /// and `restarts` as saved; no generation reason pending but the start,
    /// for a job that never started.
    pub(crate) fn restore_counters(&mut self, next_member: u64, started: bool, restarts: u32) {
        self.next_member = next_member;
        self.started = started;
        self.restarts = restarts;
        self.reasons.clear();
        if !started {
            self.reasons.push(GenerationReason::Start);
        }
    }

    /// Opens the next generation for `reason` (a restored job). A restored
    /// job is not yet under the coordinator's lock: its generation record is
    /// written at once.
    pub(crate) fn restart_generation(&mut self, reason: GenerationReason) {
        self.next_generation(Some(reason));
        self.flush_metrics();
    }

    /// A restored job's members: agents that outlived the old coordinator
    /// call again at their own pace (while it was away they backed off, up
    /// to [`agent_calls::HEARTBEAT_BACKOFF_MAX`] between tries), so none is
    /// found silent before [`Job::restored_members_wait`] has passed.
    ///
    /// `members_may_be_gone`: the job was restored by `coordinator up
    /// --auto-resume`, which cannot tell whether the agents outlived the old
    /// coordinator (its pod restarted) or were stopped with it (the whole
    /// job started again: a Kubernetes Job applied again, a Slurm requeue).
    /// The first heartbeat of a member then continues the restored job;
    /// until then a host that joins is told to join again, and if none comes
    /// back in that time, they are dropped and the job takes the hosts that
    /// join (see [`Job::join_later`]).
    pub fn await_restored_members(&mut self, members_may_be_gone: bool) {
        let wait = self.restored_members_wait();
        let now = Instant::now();
        for m in self.members.iter_mut().chain(&mut self.pending) {
            m.last_seen = now;
        }
        // None is silent before `now + wait`, when members not back are
        // dropped (`members_may_be_gone`) before any is found silent.
        self.silent_not_before = Some(now + wait);
        if members_may_be_gone && !(self.members.is_empty() && self.pending.is_empty()) {
            self.reclaim_until = Some(now + wait);
        }
    }

    /// How long the members of a restored job have to call again: the
    /// heartbeat timeout, or [`Job::agents_call_again_within`] if longer.
    pub fn restored_members_wait(&self) -> Duration {
        self.heartbeat_timeout.max(self.agents_call_again_within)
    }

    /// While restored members may still come back ([`Job::await_restored_members`]):
    /// how soon a host that joins should join again. `None` once the job
    /// takes joins (the members came back, or their time ran out: then
    /// they are dropped here first), or has ended.
    pub fn join_later(&mut self) -> Option<Duration> {
        self.drop_members_not_back();
        self.reclaim_until.filter(|_| !self.is_over()).map(|_| self.heartbeat_interval())
    }

    /// Past [`Job::reclaim_until`] with no saved member back: their agents
    /// are gone. They are dropped, and the job waits, as a new one does,
    /// for `nodes_expected` hosts within the join timeout, to continue in
    /// a new generation from the newest checkpoint in its run folder (rank
    /// 0 chooses the newest intact one, which may be newer than the last
    /// one committed: ranks stopped by their agents write one as they stop).
    fn drop_members_not_back(&mut self) {
        if self.reclaim_until.is_none_or(|until| Instant::now() < until) || self.is_over() {
            return;
        }
        self.reclaim_until = None;
        let wait = self.restored_members_wait();
        let why = format!("did not come back within {wait:?} of the coordinator's restart");
        let gone: Vec<Member> = self.members.drain(..).chain(self.pending.drain(..)).collect();
        let hosts: Vec<String> = gone.iter().map(|m| m.host.clone()).collect();
        for m in &gone {
            tracing::warn!(member = %m.id, host = %m.host, "{why}; dropped from the job");
        }
        let ended = self.ended_while_away(&format!(
            "once its host(s) ({}) did not come back within {wait:?}",
            hosts.join(", ")
        ));
        if self.started && !ended {
            self.reasons.extend(
                gone.iter().map(|m| GenerationReason::LostHost {
                    host: m.host.clone(),
                    detail: why.clone(),
                }),
            );
        }
        self.dropped.extend(gone.into_iter().map(|m| (m, why.clone())));
        if ended {
            return;
        }
        self.say(&format!(
            "none of the job's host(s) ({}) came back within {wait:?} of this coordinator's \
             start: their agents are gone; waiting for {} host(s) to join",
            hosts.join(", "),
            self.nodes_expected
        ));
        if self.started {
            self.open_generation();
        }
        if !rsb_job::checkpoint::list(&self.out_dir).is_empty() {
            self.resume_from = Some(self.out_dir.display().to_string());
            self.resume_step = None;
        }
        self.phase = Phase::Waiting;
        self.running_since = None;
        self.started = false;
        self.regroup_since = None;
        self.lost.clear();
        self.waiting_since = Instant::now();
    }

    /// A job restored by `up --auto-resume` or `up --restore` whose ranks
    /// ended it before this coordinator started: its end is in the run
    /// folder already (see [`Job::ended_while_away`]), so it is finished at
    /// once, before it is served, waiting neither for its agents (their
    /// ranks are done) nor for hosts to train it anew. Its members stay
    /// members of a finished job: an agent still there is told, as at any
    /// job's end, to stop with no failure (a late report of its rank is
    /// refused, the job being over). Not under the coordinator's lock: the
    /// end is hashed, and the records taken are written, here. Whether it
    /// ended.
    pub fn end_if_finished_before_restart(&mut self) -> bool {
        let hosts: Vec<&str> =
            self.members.iter().chain(&self.pending).map(|m| m.host.as_str()).collect();
        let found = match hosts.as_slice() {
            [] => "as this coordinator started".to_string(),
            hosts => format!(
                "as this coordinator started (its host(s) ({}) not waited for)",
                hosts.join(", ")
            ),
        };
        if !self.ended_while_away(&found) {
            return false;
        }
        self.reclaim_until = None;
        self.flush_metrics();
        true
    }

    /// Whether the job's ranks ended it while no coordinator ran (found
    /// `when`, as the coordinator said it): the newest committed checkpoint
    /// in the run folder ends the last epoch of this job's recipe, was
    /// trained with it, and is intact
    /// ([`rsb_job::run_folder::finished_run`]; that one checkpoint is
    /// hashed). Their agents, their ranks done, left or will, so waiting for
    /// hosts to train it anew would fail a finished job. The job is then
    /// finished, saying so. Called under the lock once the restored
    /// members' wait is over, and when a member of a running job is found
    /// silent (its ranks may have finished while their agents were cut off
    /// from this coordinator); [`Job::end_if_finished_before_restart`]
    /// finds the end that was there before the restart without the lock.
    fn ended_while_away(&mut self, when: &str) -> bool {
        let Some((checkpoint, position)) =
            rsb_job::run_folder::finished_run(&self.out_dir, &self.recipe)
        else {
            return false;
        };
        self.phase = Phase::Finished;
        self.running_since = None;
        self.progress = (position.next_epoch.saturating_sub(1), position.updates, 0.0);
        self.total_updates = Some(position.updates);
        let records = self.take_records_made_while_away();
        let finished = finished_while_away(
            "the job",
            checkpoint.path(),
            &position,
            self.recipe.total_epochs(),
        );
        self.say(&format!("{finished}, found {when}; {records}"));
        true
    }

    /// Queues for the job's `metrics.jsonl` the records rank 0 reported
    /// that no coordinator took (made while none ran, or queued by one that
    /// was killed), read from rank 0's own file
    /// ([`records_made_while_away`]); says what it did. Read under the
    /// lock, once, as the job ends: the job's file is as the last
    /// coordinator left it, none of the job's records being queued or
    /// written since (nothing is taken when one is). Where the job ends
    /// once its members' wait is over, they are written as the lock is
    /// released, after the state that says the job finished: a coordinator
    /// killed in between leaves them in rank 0's file alone. Where it ends
    /// as it is restored, they are written before that state.
    fn take_records_made_while_away(&mut self) -> String {
        let rank_zero_file = rsb_job::run_folder::rank_records_file(&self.out_dir, 0);
        let records = if self.metrics.as_ref().is_some_and(|sink| !sink.is_idle()) {
            Err(RecordsNotTaken::Left {
                rank_zero_file: rank_zero_file.clone(),
                why: "records of this job are being written to metrics.jsonl".into(),
            })
        } else {
            records_made_while_away(&self.out_dir)
        };
        let taken = take_records(records, "metrics.jsonl", &rank_zero_file, |records| {
            if let Some(MetricsRecord::Epoch { images_per_sec, .. }) =
                records.iter().rev().find(|r| matches!(r, MetricsRecord::Epoch { .. }))
            {
                self.progress.2 = *images_per_sec;
            }
            let sink = self.sink();
            for record in records {
                sink.push(record, None);
            }
            Ok::<(), std::convert::Infallible>(())
        });
        match taken {
            Ok(said) => said,
            Err(never) => match never {},
        }
    }

    /// The job's state to save to [`Job::state_file`], when it changed
    /// since the last one handed out (see [`PendingSave`]).
    pub fn state_to_save(&mut self) -> Option<PendingSave> {
        let file = self.state_file.clone()?;
        let saved = crate::saved::SavedJob::of(self);
        if self.last_saved.as_ref() == Some(&saved) {
            return None;
        }
        self.last_saved = Some(saved.clone());
        self.saved_version += 1;
        Some(PendingSave { file, version: self.saved_version, saved })
    }

    /// How many states [`Job::state_to_save`] has handed out.
    #[cfg(test)]
    pub(crate) fn saves_handed_out(&self) -> u64 {
        self.saved_version
    }

    /// The state of `version` could not be written: the next call of
    /// [`Job::state_to_save`] hands it out again, unless a newer one was
    /// handed out meanwhile (its writer has it).
    pub fn save_failed(&mut self, version: u64) {
        if version == self.saved_version {
            self.last_saved = None;
        }
    }

    /// Prints a progress line of this job (prefixed by its run id in a sweep).
    pub fn say(&self, line: &str) {
        match &self.label {
            Some(label) => self.printer.line(&format!("[{label}] {line}")),
            None => self.printer.line(line),
        }
    }

    /// Whether `id` is (or was) one of this job's members.
    pub fn knows_member(&self, id: &str) -> bool {
        self.known_members().any(|m| m.id == id)
    }

    /// Whether the job has ended (finished or failed).
    pub fn is_over(&self) -> bool {
        matches!(self.phase, Phase::Finished | Phase::Failed(_))
    }

    /// Makes the job elastic when `min < max`: it runs with `min..=max`
    /// hosts (it still starts with `nodes_expected`). Needs
    /// `1 <= min <= nodes_expected <= max`.
    pub fn set_node_bounds(&mut self, min: u32, max: u32) -> Result<(), JobError> {
        if min == 0 || min > self.nodes_expected || max < self.nodes_expected {
            return Err(JobError::Invalid(format!(
                "node bounds {min}..={max} must hold the {} host(s) the job starts with, \
                 with at least 1 (--min-nodes <= --nodes <= --max-nodes)",
                self.nodes_expected
            )));
        }
        self.min_nodes = min;
        self.max_nodes = max;
        Ok(())
    }

    /// Sizes a fixed job that no host has joined yet for `nodes` hosts: a
    /// sweep's run whose job was made for the hosts of a first one it then
    /// refused, of another shape than the next. Refused once a host joined.
    pub fn expect_hosts_before_any_joined(&mut self, nodes: u32) -> Result<(), JobError> {
        if nodes == 0 || self.elastic() || !self.members.is_empty() || !self.pending.is_empty() {
            return Err(JobError::Precondition(format!(
                "the job cannot be sized again for {nodes} host(s): it is elastic, or hosts \
                 joined it"
            )));
        }
        (self.nodes_expected, self.min_nodes, self.max_nodes) = (nodes, nodes, nodes);
        Ok(())
    }

    /// Whether membership may change while running (else: fail-stop).
    pub fn elastic(&self) -> bool {
        self.min_nodes < self.max_nodes
    }

    /// Total ranks of the joined members.
    pub fn world_size(&self) -> u32 {
        self.members.iter().map(|m| m.local_ranks).sum()
    }

    /// A host joins; when the last expected host has joined, ranks are
    /// assigned and the job starts (or fails if the world cannot run the
    /// recipe). An elastic job also takes hosts while it runs, up to
    /// `max_nodes`: they are pending until the next generation. Returns the
    /// member id, its session secret, and whether it is pending.
    pub fn join(
        &mut self,
        host: &str,
        kind: DeviceKind,
        local_ranks: u32,
        advertise: Option<IpAddr>,
    ) -> Result<(String, Secret, bool), JobError> {
        if local_ranks == 0 {
            return Err(JobError::Invalid("local_ranks must be at least 1".into()));
        }
        let pending = match &self.phase {
            // A regroup (an elastic job below its fewest hosts, or with
            // hosts that cannot split the batch) starts as soon as enough
            // hosts are back. It takes a host whose ranks some generation
            // can run: a set of hosts that cannot split the batch runs on
            // the largest of them that can, the others standing by
            // (`fit_members_to_the_batch`).
            Phase::Waiting if self.started && self.elastic() => {
                self.check_max_nodes()?;
                self.check_ranks_fit(host, local_ranks)?;
                false
            }
            // A fixed job's hosts back after a restore: one whose ranks
            // would make a world the batch cannot split over is refused
            // now, not the job later.
            Phase::Waiting if self.started => {
                let world = self.world_size() + local_ranks;
                BatchPlan::new(&self.recipe, world).map_err(|e| {
                    JobError::Precondition(format!(
                        "host {host} with {local_ranks} rank(s) would make a world of {world}: {e}"
                    ))
                })?;
                false
            }
            Phase::Waiting => false,
            Phase::Running if self.elastic() => {
                self.check_max_nodes()?;
                self.check_ranks_fit(host, local_ranks)?;
                true
            }
            Phase::Running => {
                return Err(JobError::Precondition(
                    "the job is running and takes no new members (an elastic job, \
                     `coordinator up --max-nodes` above --nodes, does)"
                        .into(),
                ))
            }
            other => {
                return Err(JobError::Precondition(format!(
                    "the job is {other:?}; it takes no new members"
                )))
            }
        };
        if let Some(first) = self.members.first().or(self.pending.first()) {
            if first.kind != kind {
                return Err(JobError::Invalid(format!(
                    "host {host} brings {kind:?} ranks but the job already has {:?} ranks",
                    first.kind
                )));
            }
        }
        if self.meets_over_ring(kind) && advertise.is_none() {
            return Err(JobError::Invalid(format!(
                "advertise_address is required: host {host} brings ranks that meet over the \
                 TCP ring, whose listeners other hosts must reach"
            )));
        }
        let id = format!("{}m{}-{}", self.member_prefix, self.next_member + 1, host);
        if id.len() > crate::service::MAX_NAME_LEN {
            return Err(JobError::Invalid(format!(
                "host name {host} is too long: its member id {id} is {} bytes, and calls carry \
                 at most {} (give a shorter --host-name)",
                id.len(),
                crate::service::MAX_NAME_LEN
            )));
        }
        let secret = Secret::generate()
            .map_err(|e| JobError::Precondition(format!("cannot make a member secret: {e}")))?;
        self.next_member += 1;
        let member = Member {
            id: id.clone(),
            host: host.to_string(),
            kind,
            local_ranks,
            first_rank: self.world_size(),
            last_seen: Instant::now(),
            advertise,
            secret: secret.clone(),
            rank_generations: vec![0; local_ranks as usize],
        };
        if pending {
            self.pending.push(member);
            tracing::info!(
                member = %id,
                host,
                local_ranks,
                "joined the running job; admitted at its next committed checkpoint"
            );
            return Ok((id, secret, true));
        }
        self.members.push(member);
        if self.started {
            self.reasons.push(GenerationReason::Admitted { host: host.to_string() });
            tracing::info!(member = %id, host, local_ranks, "joined ({}/{} hosts needed)", self.members.len(), self.min_nodes);
            if self.members.len() as u32 >= self.min_nodes {
                self.start_or_wait();
            }
        } else {
            tracing::info!(member = %id, host, local_ranks, "joined ({}/{} hosts)", self.members.len(), self.nodes_expected);
            if self.members.len() as u32 == self.nodes_expected {
                self.start_generation();
            }
        }
        // A host the members' fit set aside at once stands by: pending.
        let standing_by = self.pending.iter().any(|m| m.id == id);
        Ok((id, secret, standing_by))
    }

    /// Numbers the ranks over the members in join order.
    fn assign_ranks(&mut self) {
        let mut next = 0;
        for m in &mut self.members {
            m.first_rank = next;
            next += m.local_ranks;
        }
    }

    /// Starts the current generation with the current members (or fails
    /// the job if their world cannot run the recipe), and queues its record
    /// for `metrics.jsonl` (a record that cannot be written is logged).
    fn start_generation(&mut self) {
        self.assign_ranks();
        let plan = match BatchPlan::new(&self.recipe, self.world_size()) {
            Ok(plan) => plan,
            Err(e) if !self.started => return self.fail(format!("cannot start: {e}")),
            Err(e) => {
                let hosts: Vec<&str> = self.members.iter().map(|m| m.host.as_str()).collect();
                return self.fail(format!(
                    "cannot start generation {} on {} ({}): {e}",
                    self.generation,
                    hosts.join(", "),
                    self.reasons.iter().map(|r| r.to_string()).collect::<Vec<_>>().join("; ")
                ));
            }
        };
        self.phase = Phase::Running;
        self.running_since = Some(Instant::now());
        self.started = true;
        self.regroup_since = None;
        self.lost.clear();
        let record = MetricsRecord::Generation {
            generation: self.generation,
            hosts: self.members.iter().map(|m| m.host.clone()).collect(),
            world_size: plan.world_size,
            accumulation: plan.accumulation,
            resume_from: self.resume_from.clone(),
            resume_step: self.resume_step,
            reasons: std::mem::take(&mut self.reasons),
        };
        tracing::info!(
            generation = self.generation,
            world = plan.world_size,
            "global batch {} = {} x {} x {} ranks",
            plan.global_size,
            plan.micro_size,
            plan.accumulation,
            plan.world_size
        );
        if let Some(line) = self.progress_line(&record) {
            self.say(&line);
        }
        self.sink().push(record, None);
    }

    /// Ends the running generation: the next one starts with the members
    /// left (and the pending ones), from the newest committed checkpoint,
    /// or waits for joins when fewer than `min_nodes` are left.
    fn next_generation(&mut self, reason: Option<GenerationReason>) {
        self.drop_stopping_hosts();
        self.reasons.extend(reason);
        self.open_generation();
        for m in std::mem::take(&mut self.pending) {
            self.reasons.push(GenerationReason::Admitted { host: m.host.clone() });
            self.members.push(m);
        }
        if let Some(c) = self.checkpoints.last() {
            self.resume_from = Some(c.path.clone());
            self.resume_step = Some(c.step);
        }
        self.start_or_wait();
    }

    /// Starts the current generation when its members can run it: at least
    /// `min_nodes` hosts and, in an elastic job, a set of them whose ranks
    /// split the global batch (the others stand by,
    /// [`Job::fit_members_to_the_batch`]). Otherwise the job waits for
    /// joins, up to `rejoin_timeout`.
    fn start_or_wait(&mut self) {
        let enough = self.members.len() as u32 >= self.min_nodes;
        if enough && (!self.elastic() || self.fit_members_to_the_batch()) {
            return self.start_generation();
        }
        self.assign_ranks();
        self.phase = Phase::Waiting;
        self.regroup_since.get_or_insert_with(Instant::now);
        tracing::warn!(
            generation = self.generation,
            "{}; waiting up to {:?} for joins",
            self.why_waiting(),
            self.rejoin_timeout
        );
    }

    /// Why a generation waits for joins: too few hosts, or hosts whose
    /// ranks cannot split the global batch on `min_nodes` of them.
    fn why_waiting(&self) -> String {
        if (self.members.len() as u32) < self.min_nodes {
            return format!(
                "{} of the {} host(s) needed (--min-nodes) are left",
                self.members.len(),
                self.min_nodes
            );
        }
        let ranks: Vec<String> = self.members.iter().map(|m| m.local_ranks.to_string()).collect();
        format!(
            "the ranks of the {} host(s) left ({}) cannot split the global batch's {} \
             micro-batches on {} or more of them (--min-nodes)",
            self.members.len(),
            ranks.join(" + "),
            self.streams().map_or_else(|| "?".to_string(), |s| s.to_string()),
            self.min_nodes
        )
    }

    /// The micro-batches (sampler streams) of the recipe's global batch.
    fn streams(&self) -> Option<u32> {
        let batch = &self.recipe.batch;
        BatchPlan::from_sizes(batch.global_size, batch.micro_size, 1).ok().map(|p| p.streams)
    }

    /// Refuses a host past `max_nodes` hosts, running, waiting and pending.
    fn check_max_nodes(&self) -> Result<(), JobError> {
        let hosts = self.members.len() + self.pending.len();
        if hosts as u32 >= self.max_nodes {
            return Err(JobError::Precondition(format!(
                "the job has {hosts} host(s) (running and pending), the most it takes \
                 (--max-nodes {})",
                self.max_nodes
            )));
        }
        Ok(())
    }

    /// Refuses a host whose ranks no generation could run, being more than
    /// the global batch's micro-batches.
    fn check_ranks_fit(&self, host: &str, local_ranks: u32) -> Result<(), JobError> {
        match self.streams() {
            Some(streams) if local_ranks > streams => Err(JobError::Precondition(format!(
                "host {host} brings {local_ranks} rank(s), more than the {streams} \
                 micro-batches of the global batch: no generation could run them"
            ))),
            _ => Ok(()),
        }
    }

    /// An elastic job whose members' ranks cannot all split the global
    /// batch (3 hosts of one rank left of a 4-micro-batch recipe) runs the
    /// next generation on the largest set of them that can, at least
    /// `min_nodes` hosts, earliest joined first ([`hosts_that_split`]). The
    /// others stand by among the pending hosts, first in line, and are
    /// admitted when a later generation can take them: at the first
    /// checkpoint after a join that lets the world grow. Returns whether
    /// the members can start (false: no such set; nothing is moved).
    fn fit_members_to_the_batch(&mut self) -> bool {
        let Some(streams) = self.streams() else {
            // A batch no world splits: `start_generation` says so.
            return true;
        };
        let ranks: Vec<u32> = self.members.iter().map(|m| m.local_ranks).collect();
        let Some(chosen) = hosts_that_split(&ranks, streams, self.min_nodes as usize) else {
            return false;
        };
        if chosen.len() == self.members.len() {
            return true;
        }
        let world: u32 = chosen.iter().map(|&i| ranks[i]).sum();
        let all: u32 = ranks.iter().sum();
        let detail = format!(
            "the {all} ranks of the {} hosts left cannot split the global batch's {streams} \
             micro-batches; {world} ranks on {} of them do",
            ranks.len(),
            chosen.len()
        );
        let mut standing_by = Vec::new();
        for (i, m) in std::mem::take(&mut self.members).into_iter().enumerate() {
            match chosen.binary_search(&i).is_ok() {
                true => self.members.push(m),
                false => standing_by.push(m),
            }
        }
        // As a host that joins pending: no ranks of this generation, no
        // fetches of an earlier one (the agent, which restarts its ranks to
        // wait, would take their old count for ranks behind when admitted,
        // and kill ranks that had fetched the new generation's share).
        for m in &mut standing_by {
            m.first_rank = world;
            m.rank_generations.fill(0);
        }
        // Not admitted after all: the hosts standing by are named once.
        self.reasons.retain(|r| {
            !matches!(r, GenerationReason::Admitted { host }
                if standing_by.iter().any(|m| &m.host == host))
        });
        for m in &standing_by {
            tracing::warn!(
                member = %m.id,
                host = %m.host,
                "{detail}: standing by, pending, until a generation can take its ranks"
            );
            self.reasons.push(GenerationReason::StandingBy {
                host: m.host.clone(),
                detail: detail.clone(),
            });
        }
        standing_by.append(&mut self.pending);
        self.pending = standing_by;
        true
    }

    /// Whether the pending hosts would join the next generation: in an
    /// elastic job, only when with them a larger world splits the batch
    /// than runs now (a host standing by alone would regroup every rank at
    /// each checkpoint, to stand by again).
    fn pending_would_grow_the_world(&self) -> bool {
        let Some(streams) = self.streams() else { return true };
        let ranks: Vec<u32> =
            self.members.iter().chain(&self.pending).map(|m| m.local_ranks).collect();
        hosts_that_split(&ranks, streams, self.min_nodes as usize)
            .is_some_and(|chosen| chosen.iter().map(|&i| ranks[i]).sum::<u32>() > self.world_size())
    }

    /// Numbers the next generation, forgetting the ranks of the last one.
    fn open_generation(&mut self) {
        self.generation += 1;
        // Hosts stopping in the last generation were dropped as it closed
        // (`next_generation`); where it closes otherwise (the members of a
        // restored job not all back), they stay until found silent.
        self.hosts_stopping = None;
        self.rendezvous.clear();
        self.at_rendezvous.clear();
        self.left_ranks.clear();
        self.finished_ranks = 0;
        // Reports of the last generation's collectives blame none of this one.
        self.collective_failures.clear();
        self.blame_at = None;
    }

    /// The member whose credentials a call presents: its id and session
    /// secret (compared in constant time). Unknown ids and wrong secrets get
    /// the same answer.
    pub fn authenticate(&self, presented: Option<(&str, &[u8])>) -> Result<&Member, JobError> {
        let Some((id, secret)) = presented else { return Err(JobError::no_credentials()) };
        match self.known_members().find(|m| m.id == id) {
            Some(m) if m.secret.matches(secret) => Ok(m),
            _ => Err(JobError::credentials_refused()),
        }
    }

    /// Every member the job has (or had): current, pending and dropped.
    fn known_members(&self) -> impl Iterator<Item = &Member> {
        self.members.iter().chain(&self.pending).chain(self.dropped.iter().map(|d| &d.0))
    }

    /// Checks that `member_id` runs global rank `rank`.
    pub fn check_runs_rank(&self, member_id: &str, rank: u32) -> Result<&Member, JobError> {
        let member = self.member(member_id)?;
        if !member.ranks().contains(&rank) {
            return Err(JobError::Denied(format!(
                "member {member_id} runs global ranks {:?}, not rank {rank}",
                member.ranks()
            )));
        }
        Ok(member)
    }

    /// A member of the current membership (not a pending or dropped one).
    fn member(&self, id: &str) -> Result<&Member, JobError> {
        if let Some(m) = self.members.iter().find(|m| m.id == id) {
            return Ok(m);
        }
        if self.pending.iter().any(|m| m.id == id) {
            return Err(JobError::Precondition(format!(
                "member {id} is pending: it is admitted at the job's next generation"
            )));
        }
        if let Some((m, why)) = self.dropped.iter().find(|d| d.0.id == id) {
            return Err(JobError::Precondition(format!(
                "member {id} ({}) was dropped from the job: {why}",
                m.host
            )));
        }
        Err(JobError::NotFound(format!("unknown member `{id}`")))
    }

    /// Notes that local rank `local_rank` of `member_id` fetched the current
    /// generation's assignment.
    pub fn note_assigned(&mut self, member_id: &str, local_rank: u32) {
        let generation = self.generation;
        if let Some(m) = self.members.iter_mut().find(|m| m.id == member_id) {
            if let Some(g) = m.rank_generations.get_mut(local_rank as usize) {
                *g = (*g).max(generation);
            }
        }
    }

    /// Records a heartbeat and says whether the member goes on.
    pub fn heartbeat(&mut self, id: &str) -> Result<Beat, JobError> {
        let on = matches!(self.phase, Phase::Waiting | Phase::Running);
        let failure = self.failure().map(str::to_string);
        let known = self.members.iter().chain(&self.pending).any(|m| m.id == id);
        if known && self.phase == Phase::Finished && self.told_finished.insert(id.to_string()) {
            tracing::info!(member = %id, "told the job is finished");
        }
        if let Some(m) = self.members.iter_mut().find(|m| m.id == id) {
            m.last_seen = Instant::now();
            if self.reclaim_until.take().is_some() {
                tracing::info!(member = %id, host = %m.host, "back after the coordinator's restart");
            }
            return Ok(Beat {
                keep_going: on,
                pending: false,
                failure,
                rank_fetches: m.rank_generations.clone(),
            });
        }
        if let Some(m) = self.pending.iter_mut().find(|m| m.id == id) {
            m.last_seen = Instant::now();
            self.reclaim_until = None;
            return Ok(Beat { keep_going: on, pending: true, failure, rank_fetches: Vec::new() });
        }
        if let Some((m, why)) = self.dropped.iter().find(|d| d.0.id == id) {
            let failure = format!("member {id} ({}) was dropped from the job: {why}", m.host);
            return Ok(Beat {
                keep_going: false,
                pending: false,
                failure: Some(failure),
                rank_fetches: m.rank_generations.clone(),
            });
        }
        Err(JobError::NotFound(format!("unknown member `{id}`")))
    }

    /// How many members' heartbeats were answered that the job is finished.
    pub fn members_told_finished(&self) -> usize {
        self.told_finished.len()
    }

    /// Why the job failed, if it did.
    pub fn failure(&self) -> Option<&str> {
        match &self.phase {
            Phase::Failed(reason) => Some(reason),
            _ => None,
        }
    }

    /// The heartbeat interval members are told to use: [`HEARTBEAT_INTERVAL`],
    /// or a quarter of the heartbeat timeout where that is shorter (at least
    /// 100 ms, the shortest an agent takes), so that a member is silent past
    /// the timeout only after about four beats missed, whatever timeout
    /// `--heartbeat-timeout-secs` gives.
    pub fn heartbeat_interval(&self) -> Duration {
        HEARTBEAT_INTERVAL.min(self.heartbeat_timeout / 4).max(Duration::from_millis(100))
    }

    /// Deals with members silent too long: a fixed job fails; an elastic
    /// one drops them (a new generation when it was running). Fails an
    /// elastic job that waited below `min_nodes` past `rejoin_timeout`, and
    /// a job whose hosts did not all come within `join_timeout`.
    pub fn check_liveness(&mut self) {
        if !matches!(self.phase, Phase::Waiting | Phase::Running) {
            return;
        }
        self.drop_members_not_back();
        let join_deadline_passed =
            self.join_timeout.is_some_and(|limit| self.waiting_since.elapsed() > limit);
        if !self.started && self.phase == Phase::Waiting && join_deadline_passed {
            let hosts: Vec<&str> = self.members.iter().map(|m| m.host.as_str()).collect();
            let reason = format!(
                "{} of the {} host(s) joined within {:?} (--join-timeout-secs){}",
                hosts.len(),
                self.nodes_expected,
                self.join_timeout.unwrap_or_default(),
                if hosts.is_empty() { String::new() } else { format!(": {}", hosts.join(", ")) }
            );
            self.fail(reason);
            return;
        }
        if self.blame_at.is_some_and(|at| Instant::now() >= at) {
            self.blame_silent_rank();
            return;
        }
        let timeout = self.heartbeat_timeout;
        let may_be_silent = self.silent_not_before.is_none_or(|at| Instant::now() > at);
        // A member whose ranks have all left is done with this generation:
        // its agent, its ranks gone, exits and stops heartbeating, and the
        // job waits only for the other ranks' Leaves (rank 0's comes last,
        // after its reports are flushed, and may come later than the
        // heartbeat timeout). A failure among them is handled at its Leave.
        // As of now: the run folder read below may take a while, during
        // which no heartbeat can be taken.
        let now = Instant::now();
        let silent_in = |m: &Member, left_ranks: &BTreeSet<u32>| {
            may_be_silent
                && now.saturating_duration_since(m.last_seen) > timeout
                && !m.ranks().all(|rank| left_ranks.contains(&rank))
        };
        let first_silent =
            self.members.iter().find(|m| silent_in(m, &self.left_ranks)).map(|m| {
                format!("member {} ({}) missed heartbeats for {:?}", m.id, m.host, timeout)
            });
        // Its ranks may have ended the job all the same (their agents cut
        // off from this coordinator, then gone): its end in the run folder
        // finishes it, where the silence failed it or restarted it.
        if let Some(silence) = &first_silent {
            if self.phase == Phase::Running && self.ended_while_away(&format!("once {silence}")) {
                return;
            }
            // A slow read held every heartbeat up behind the lock: none is
            // silent until they have had a heartbeat timeout to come in.
            if now.elapsed() > Duration::from_secs(1) {
                let after_the_read = Instant::now() + timeout;
                self.silent_not_before = Some(
                    self.silent_not_before.map_or(after_the_read, |at| at.max(after_the_read)),
                );
            }
        }
        if !self.elastic() {
            if let Some(silence) = first_silent {
                self.fail(silence);
            }
            self.check_rendezvous_deadline();
            return;
        }
        if self.phase == Phase::Running
            && self.hosts_stopping.as_ref().is_some_and(|s| Instant::now() >= s.wait_until)
        {
            tracing::warn!(
                "rank 0 has not left {STOP_CHECKPOINT_WAIT:?} after the stop request: opening the \
                 next generation from the newest committed checkpoint"
            );
            self.next_generation(None);
        }
        let left_ranks = &self.left_ranks;
        let silent = |m: &Member| silent_in(m, left_ranks);
        let why = format!("missed heartbeats for {timeout:?}");
        let (gone, kept): (Vec<Member>, Vec<Member>) =
            std::mem::take(&mut self.pending).into_iter().partition(|m| silent(m));
        self.pending = kept;
        for m in gone {
            tracing::warn!(member = %m.id, host = %m.host, "pending member {why}; dropped");
            self.dropped.push((m, why.clone()));
        }
        let (gone, kept): (Vec<Member>, Vec<Member>) =
            std::mem::take(&mut self.members).into_iter().partition(|m| silent(m));
        self.members = kept;
        if !gone.is_empty() {
            for m in &gone {
                tracing::error!(member = %m.id, host = %m.host, "lost: {why}; dropped from the job");
            }
            self.record_dropped(gone, &why);
            match self.phase {
                Phase::Running => self.next_generation(None),
                _ => self.assign_ranks(),
            }
        }
        if let Some(since) = self.regroup_since {
            if self.phase == Phase::Waiting && since.elapsed() > self.rejoin_timeout {
                let reason = format!(
                    "{} after waiting {:?} for joins; lost: {}",
                    self.why_waiting(),
                    self.rejoin_timeout,
                    self.lost.join(", ")
                );
                self.fail(reason);
            }
        }
        self.check_rendezvous_deadline();
    }

    /// Past `rendezvous_timeout` after its start, fails (or restarts) a
    /// running generation whose ranks have not all come to the rendezvous;
    /// hosts found silent were dealt with first.
    fn check_rendezvous_deadline(&mut self) {
        // While restored members may still come back, their ranks cannot
        // be late: whether they come is the question being waited on.
        if self.phase == Phase::Running
            && self.reclaim_until.is_none()
            && self.running_since.is_some_and(|at| at.elapsed() > self.rendezvous_timeout)
        {
            self.fail_missing_from_rendezvous(self.missing_from_rendezvous());
        }
    }

    /// Fails a fixed job, or restarts every rank of an elastic one (at most
    /// `max_restarts` times in a row without a committed checkpoint), for
    /// the failure of `rank` on `host`: `message` as the rank (or the
    /// coordinator) put it, `failure` the whole line naming the rank.
    fn rank_failed(&mut self, rank: u32, host: &str, message: &str, failure: String) {
        let reason = GenerationReason::RankFailed {
            rank,
            host: host.to_string(),
            detail: message.to_string(),
        };
        self.fail_or_restart(reason, failure);
    }

    /// Fails a fixed job with `failure`, or restarts every rank of an
    /// elastic one for `reason` (at most `max_restarts` times in a row
    /// without a committed checkpoint).
    fn fail_or_restart(&mut self, reason: GenerationReason, failure: String) {
        if !self.elastic() || self.phase != Phase::Running {
            self.fail(failure);
        } else if self.restarts >= self.max_restarts {
            self.fail(format!(
                "{failure} (after {} restart(s) without a committed checkpoint; \
                 --max-restarts {})",
                self.restarts, self.max_restarts
            ));
        } else {
            self.restarts += 1;
            tracing::warn!("{failure}; restarting every rank (restart {})", self.restarts);
            self.next_generation(Some(reason));
        }
    }

    /// The ranks the current generation's rendezvous still waits for:
    /// every rank without its ring address, or, over NCCL, rank 0 without
    /// the unique id and every other rank that has not come for it.
    fn missing_from_rendezvous(&self) -> Vec<u32> {
        (0..self.world_size())
            .filter(|rank| {
                !self.rendezvous.contains_key(rank) && !self.at_rendezvous.contains(rank)
            })
            .collect()
    }

    /// The generation's ranks did not all publish within
    /// `rendezvous_timeout`: the first of the `missing` ranks is failed (a
    /// fixed job fails, an elastic one restarts), the message naming every
    /// one; none missing, nothing happens.
    fn fail_missing_from_rendezvous(&mut self, missing: Vec<u32>) {
        let Some(&first) = missing.first() else {
            return;
        };
        let named: Vec<String> = missing
            .iter()
            .map(|&r| format!("rank {r} on {}", self.host_of_rank(u64::from(r)).unwrap_or("?")))
            .collect();
        let message = format!(
            "did not reach the rendezvous of generation {} within {:?} of its start ({} of {} \
             rank(s) missing: {}); its process is alive (its host heartbeats) but stuck before \
             its collective: stopped, frozen, or hung on its device or file system",
            self.generation,
            self.rendezvous_timeout,
            missing.len(),
            self.world_size(),
            named.join(", ")
        );
        let host = self.host_of_rank(u64::from(first)).unwrap_or("?").to_string();
        let failure = format!("rank {first} on {host} failed: {message}");
        tracing::error!("{failure}");
        self.rank_failed(first, &host, &message, failure);
    }

    /// Fails a job whose ranks failed in a collective, naming the rank their
    /// reports lead to: follow each reporter's peer until a rank that
    /// reported nothing (a stopped or cut-off rank cannot report). The
    /// failure quotes the report of the rank that waited for it directly
    /// (its neighbour's timeout), not that of a rank further along, whose
    /// link only closed when its own neighbour gave up. A report that names
    /// no peer (NCCL's timeout) leads to the ranks that sent no Leave at all.
    fn blame_silent_rank(&mut self) {
        self.blame_at = None;
        let Some((&first, (_, first_failure))) = self.collective_failures.iter().next() else {
            return;
        };
        let first_failure = first_failure.clone();
        let reports = self.collective_failures.len();
        let mut rank = first;
        let mut hops = 0;
        loop {
            match self.collective_failures.get(&rank) {
                Some((Some(peer), _)) if hops < reports => {
                    rank = *peer;
                    hops += 1;
                }
                // Every rank on the way reported: no single rank to blame.
                Some((Some(_), _)) => break,
                Some((None, report)) => {
                    let report = report.clone();
                    if self.blame_ranks_without_a_leave(reports, &report) {
                        return;
                    }
                    break;
                }
                None => {
                    // The rank before it in the chain waited for it itself.
                    let report = self
                        .collective_failures
                        .values()
                        .find(|(peer, _)| *peer == Some(rank))
                        .map_or(first_failure, |f| f.1.clone());
                    let host = self.host_name_of_rank(rank);
                    let what = format!(
                        "stopped answering in a collective: {reports} rank(s) failed waiting for \
                         it or for a rank waiting for it; the report of the rank that waited for \
                         it: {report}"
                    );
                    // A fixed job fails; an elastic one restarts every rank,
                    // naming it.
                    self.rank_failed(rank, &host, &what, format!("rank {rank} on {host} {what}"));
                    return;
                }
            }
        }
        let host = self.host_name_of_rank(first);
        self.rank_failed(first, &host, &first_failure.clone(), first_failure);
    }

    /// Blames the ranks that sent no Leave when a rank's collective failed
    /// without naming its peer (NCCL): every healthy rank times out and
    /// reports (itself, or its agent once NCCL's exit timer ended it), the
    /// stopped or hung ones cannot. Names the first, the others with their
    /// hosts; false when every rank has left (nobody to single out).
    fn blame_ranks_without_a_leave(&mut self, reports: usize, report: &str) -> bool {
        let silent: Vec<u32> =
            (0..self.world_size()).filter(|r| !self.left_ranks.contains(r)).collect();
        let Some((&rank, others)) = silent.split_first() else {
            return false;
        };
        let host = self.host_name_of_rank(rank);
        let others = match others {
            [] => String::new(),
            more => format!(" (as did {})", self.ranks_with_hosts(more)),
        };
        let what = format!(
            "stopped answering in a collective{others}: {reports} rank(s) reported a collective \
             that did not finish, on a backend that names no peer, and it sent no report; one \
             of theirs: {report}"
        );
        self.rank_failed(rank, &host, &what, format!("rank {rank} on {host} {what}"));
        true
    }

    /// Says in the first generation's record that this job is attempt
    /// `attempt` of a sweep's run, whose last attempt failed with `failure`.
    pub fn note_retry(&mut self, attempt: u32, failure: &str) {
        self.reasons.push(GenerationReason::Retry { attempt, failure: failure.to_string() });
    }

    /// Moves to `Failed` (once) and says why.
    pub fn fail(&mut self, reason: String) {
        if matches!(self.phase, Phase::Waiting | Phase::Running) {
            tracing::error!("job failed: {reason}");
            self.phase = Phase::Failed(reason);
        }
    }

    /// What local rank `local_rank` of `member_id`, a member or a host
    /// waiting to be admitted, is told when it asks for its share: see
    /// [`RankShare`]. A failed job, a member that is neither, and a rank
    /// the member does not run are errors.
    pub fn assignment(&self, member_id: &str, local_rank: u32) -> Result<RankShare, JobError> {
        let (local_ranks, admitted) = match self.pending.iter().find(|m| m.id == member_id) {
            Some(waiting) => (waiting.local_ranks, None),
            None => {
                let member = self.member(member_id)?;
                (member.local_ranks, Some(member))
            }
        };
        if local_rank >= local_ranks {
            return Err(JobError::Invalid(format!(
                "local_rank {local_rank}: member {member_id} runs {local_ranks} rank(s)"
            )));
        }
        match (&self.phase, admitted) {
            (Phase::Failed(reason), _) => {
                Err(JobError::Precondition(format!("job failed: {reason}")))
            }
            (Phase::Finished, _) => Ok(RankShare::JobFinished),
            (Phase::Waiting, _) | (Phase::Running, None) => Ok(RankShare::Wait),
            (Phase::Running, Some(member)) => {
                let plan = BatchPlan::new(&self.recipe, self.world_size())
                    .map_err(|e: PlanError| JobError::Precondition(e.to_string()))?;
                Ok(RankShare::Assigned(RankAssignment {
                    global_rank: member.first_rank + local_rank,
                    world_size: self.world_size(),
                    plan,
                }))
            }
        }
    }

    /// Whether ranks of `kind` meet over the TCP ring (each publishes its
    /// ring address) rather than NCCL (rank 0 publishes the unique id): the
    /// recipe's backend decides, and `auto` goes by the device kind, as the
    /// ranks resolve it. CUDA ranks on the ring are what the ring's pinned
    /// staging is for (two ranks on one GPU, which NCCL refuses).
    fn meets_over_ring(&self, kind: DeviceKind) -> bool {
        match self.recipe.distributed.backend {
            rsb_recipes::CollectiveBackend::Ring => true,
            rsb_recipes::CollectiveBackend::Nccl => false,
            rsb_recipes::CollectiveBackend::Auto => kind == DeviceKind::Cpu,
        }
    }

    /// Records the rendezvous payload of `rank`, published by `member_id`
    /// (which must run that rank); see [`Job::rendezvous_result`] for everybody's.
    /// A rank publishes once per generation (the same payload again is a no-op).
    pub fn publish(
        &mut self,
        member_id: &str,
        generation: u64,
        rank: u32,
        payload: Option<RendezvousPayload>,
    ) -> Result<(), JobError> {
        self.check_generation(generation)?;
        if rank >= self.world_size() {
            return Err(JobError::Invalid(format!(
                "global_rank {rank} is not in a world of {}",
                self.world_size()
            )));
        }
        let member = self.check_runs_rank(member_id, rank)?;
        let kind = member.kind;
        let Some(p) = payload else {
            // An NCCL rank other than 0 comes for rank 0's id: it has
            // reached the rendezvous too.
            if !self.meets_over_ring(kind) {
                self.at_rendezvous.insert(rank);
            }
            return Ok(());
        };
        match (&p, self.meets_over_ring(member.kind)) {
            (RendezvousPayload::NcclId(id), false) => {
                if rank != 0 {
                    return Err(JobError::Invalid(format!(
                        "nccl_unique_id comes from rank 0, not rank {rank}"
                    )));
                }
                if id.len() != 128 {
                    return Err(JobError::Invalid(format!(
                        "nccl_unique_id has {} bytes, expected 128",
                        id.len()
                    )));
                }
            }
            (RendezvousPayload::RingAddress(a), true) => {
                let address: SocketAddr = a.parse().map_err(|_| {
                    JobError::Invalid(format!("ring_address `{a}` is not an ip:port address"))
                })?;
                if Some(address.ip()) != member.advertise || address.port() == 0 {
                    return Err(JobError::Denied(format!(
                        "ring_address {address} is not on the address member {member_id} \
                         advertised ({})",
                        member.advertise.map_or_else(|| "none".into(), |a| a.to_string())
                    )));
                }
            }
            (RendezvousPayload::NcclId(_), true) => {
                return Err(JobError::Invalid(
                    "nccl_unique_id in a job whose ranks meet over the TCP ring (they publish \
                     ring_address)"
                        .into(),
                ))
            }
            (RendezvousPayload::RingAddress(_), false) => {
                return Err(JobError::Invalid(
                    "ring_address in a job whose ranks meet over NCCL (rank 0 publishes \
                     nccl_unique_id)"
                        .into(),
                ))
            }
        }
        match self.rendezvous.get(&rank) {
            Some(existing) if *existing != p => Err(JobError::Precondition(format!(
                "rank {rank} already published its rendezvous data in generation {generation}"
            ))),
            _ => {
                self.rendezvous.insert(rank, p);
                Ok(())
            }
        }
    }

    /// The rendezvous result, once every rank (the ring) or rank 0 (NCCL) published.
    pub fn rendezvous_result(&self) -> Option<(Vec<u8>, Vec<String>)> {
        let kind = self.members.first()?.kind;
        match self.meets_over_ring(kind) {
            false => match self.rendezvous.get(&0) {
                Some(RendezvousPayload::NcclId(id)) => Some((id.clone(), Vec::new())),
                _ => None,
            },
            true => {
                let world = self.world_size();
                let addresses: Option<Vec<String>> = (0..world)
                    .map(|r| match self.rendezvous.get(&r) {
                        Some(RendezvousPayload::RingAddress(a)) => Some(a.clone()),
                        _ => None,
                    })
                    .collect();
                addresses.map(|a| (Vec::new(), a))
            }
        }
    }

    fn check_generation(&self, generation: u64) -> Result<(), JobError> {
        if generation != self.generation {
            return Err(JobError::Precondition(format!(
                "stale generation {generation}, the job is at {}",
                self.generation
            )));
        }
        match &self.phase {
            Phase::Running => Ok(()),
            other => Err(JobError::Precondition(format!("the job is {other:?}"))),
        }
    }

    /// Accepts a metrics record (from rank 0) of the running generation:
    /// queues it for `metrics.jsonl` (cheap, in memory: the coordinator's
    /// lock may be held; it is written once that lock is released, see
    /// [`MetricsSink`]) and returns the progress line to print, if the record
    /// has one, with the receipt that tells whether the record was written.
    pub fn record_metrics(
        &mut self,
        generation: u64,
        record: &MetricsRecord,
    ) -> Result<Recorded, JobError> {
        self.check_generation(generation)?;
        let failure = Arc::new(OnceLock::new());
        let sink = self.sink();
        sink.push(record.clone(), Some(Arc::clone(&failure)));
        let receipt = MetricsReceipt { sink: Arc::clone(sink), failure };
        Ok(Recorded { line: self.progress_line(record), receipt })
    }

    /// [`Job::record_metrics`] for a report numbered `sequence` by its rank
    /// (0: not numbered). A report whose number was already taken (sent
    /// again because its answer was lost) is not recorded again: its
    /// receipt tells when the records queued before it, the first copy
    /// among them, are written.
    pub fn record_metrics_report(
        &mut self,
        generation: u64,
        sequence: u64,
        record: &MetricsRecord,
    ) -> Result<Recorded, JobError> {
        if self.repeated_report(generation, sequence) {
            let sink = Arc::clone(self.sink());
            let receipt = MetricsReceipt { sink, failure: Arc::new(OnceLock::new()) };
            return Ok(Recorded { line: None, receipt });
        }
        let recorded = self.record_metrics(generation, record)?;
        self.take_report(generation, sequence);
        Ok(recorded)
    }

    /// [`Job::commit_checkpoint`] for a report numbered `sequence` by its
    /// rank (0: not numbered); returns whether it was taken (false: its
    /// number was, already).
    pub fn commit_checkpoint_report(
        &mut self,
        generation: u64,
        sequence: u64,
        epoch: u64,
        updates: u64,
        path: String,
    ) -> Result<bool, JobError> {
        if self.repeated_report(generation, sequence) {
            return Ok(false);
        }
        self.commit_checkpoint(generation, epoch, updates, path)?;
        self.take_report(generation, sequence);
        Ok(true)
    }

    /// Whether a numbered report was already taken (its rank numbers its
    /// reports in the order it sends them, one at a time), even when it
    /// opened the next generation since (a commit that admitted a host).
    fn repeated_report(&self, generation: u64, sequence: u64) -> bool {
        let (taken_generation, last) = self.last_report;
        sequence != 0 && taken_generation == generation && sequence <= last
    }

    /// Marks a numbered report as taken.
    fn take_report(&mut self, generation: u64, sequence: u64) {
        if sequence != 0 {
            self.last_report = (generation, sequence);
        }
    }

    /// The sink of the records bound for `metrics.jsonl`, made at the first
    /// record.
    fn sink(&mut self) -> &Arc<MetricsSink> {
        let out_dir = &self.out_dir;
        self.metrics
            .get_or_insert_with(|| Arc::new(MetricsSink::new(out_dir.join("metrics.jsonl"))))
    }

    /// The sink of this job's metrics records, once it has one.
    pub fn metrics_sink(&self) -> Option<&Arc<MetricsSink>> {
        self.metrics.as_ref()
    }

    /// The sink of this job's metrics records when records wait in it: taken
    /// under the coordinator's lock, written ([`MetricsSink::write_pending`])
    /// once the lock is released.
    pub fn metrics_to_write(&self) -> Option<Arc<MetricsSink>> {
        self.metrics.as_ref().filter(|sink| sink.has_pending()).cloned()
    }

    /// Writes the metrics records this job queued ([`MetricsSink::flush`]),
    /// waiting for a write in progress; returns how many this call could not
    /// write (each is logged). Only for a job that is not under the
    /// coordinator's lock (a restored job before it is served, tests): the
    /// service writes the sinks it takes out of the lock instead.
    pub fn flush_metrics(&self) -> usize {
        self.metrics.as_ref().map_or(0, |sink| sink.flush())
    }

    /// `; straggler: rank 1 on host-b took 2.0x ...` when a step's slowest
    /// rank took at least `distributed.straggler_warn_ratio` times the
    /// others' median; nothing otherwise.
    fn straggler_note(&self, balance: Option<&RankBalance>) -> String {
        let warn_ratio = self.recipe.distributed.straggler_warn_ratio;
        let Some(balance) = balance.filter(|b| b.straggles(warn_ratio)) else {
            return String::new();
        };
        format!("; straggler: {}", balance.describe(self.host_of_rank(balance.slowest_rank)))
    }

    /// The host of global rank `rank` for a message: "an unknown host" when
    /// no member holds it.
    fn host_name_of_rank(&self, rank: u32) -> String {
        self.host_of_rank(u64::from(rank)).unwrap_or("an unknown host").to_string()
    }

    /// `ranks` for a message, each with its host: "rank 1 on a, rank 3 on b".
    fn ranks_with_hosts(&self, ranks: &[u32]) -> String {
        let named: Vec<String> =
            ranks.iter().map(|&r| format!("rank {r} on {}", self.host_name_of_rank(r))).collect();
        named.join(", ")
    }

    /// The host of the member that holds global rank `rank`, if any.
    fn host_of_rank(&self, rank: u64) -> Option<&str> {
        let rank = u32::try_from(rank).ok()?;
        self.members.iter().find(|m| m.ranks().contains(&rank)).map(|m| m.host.as_str())
    }

    /// Updates the job's progress from a record and says it in one line.
    fn progress_line(&mut self, record: &MetricsRecord) -> Option<String> {
        match record {
            MetricsRecord::Loading { epoch, step, .. } => {
                self.progress = (*epoch, *step, self.progress.2);
                Some(format!("epoch {epoch}: loading"))
            }
            MetricsRecord::FirstUpdate { epoch, step, elapsed_s } => {
                self.progress = (*epoch, *step, self.progress.2);
                Some(format!("first update done in {elapsed_s:.1} s"))
            }
            MetricsRecord::Step {
                epoch,
                step,
                lr,
                loss,
                images_per_sec,
                total_updates,
                skipped_updates,
                peak_gpu_memory_mib,
                rank_balance,
                input_wait_share,
            } => {
                self.progress = (*epoch, *step, *images_per_sec);
                self.total_updates = Some(*total_updates);
                let eta = if *images_per_sec > 0.0 {
                    let secs = total_updates.saturating_sub(*step) as f64
                        * f64::from(self.recipe.batch.global_size)
                        / images_per_sec;
                    format!(" ETA {}", format_duration(secs))
                } else {
                    String::new()
                };
                let memory = peak_gpu_memory_mib
                    .map_or_else(String::new, |mib| format!(" peak GPU memory {mib:.0} MiB"));
                Some(format!(
                    "epoch {epoch} step {step} loss {loss:.4} lr {lr:.3e} {images_per_sec:.0} img/s (all ranks){memory}{eta}{}{}{}",
                    skipped_updates_note(*skipped_updates),
                    input_wait_note(*input_wait_share),
                    self.straggler_note(rank_balance.as_ref()),
                ))
            }
            MetricsRecord::Epoch {
                epoch,
                step,
                loss,
                images_per_sec,
                top1,
                top5,
                eval_sets,
                skipped_updates,
                val_skipped_images,
                ..
            } => {
                self.progress = (*epoch, *step, *images_per_sec);
                let percent = |v: &Option<f64>| v.map_or_else(|| "-".into(), |v| format!("{v:.2}"));
                let mut sets = String::new();
                for (name, a) in eval_sets {
                    sets.push_str(&format!(" | {name} top1 {:.2} top5 {:.2}", a.top1, a.top5));
                }
                Some(format!(
                    "epoch {epoch} done: loss {loss:.4} top1 {} top5 {}{sets} ({images_per_sec:.0} img/s){}{}",
                    percent(top1),
                    percent(top5),
                    skipped_updates_note(*skipped_updates),
                    skipped_images_note(
                        *val_skipped_images,
                        eval_sets.iter().map(|(name, a)| (name.as_str(), a.skipped))
                    ),
                ))
            }
            MetricsRecord::Checksum { .. } => None,
            MetricsRecord::Fabric(probe) => {
                let section = &self.recipe.distributed;
                let warnings = probe.warnings(
                    section.slow_link_warn_ratio,
                    section.expected_bus_gb_per_s,
                    |rank| self.host_of_rank(rank),
                );
                let mut line = format!("fabric: {}", probe.summary());
                for warning in warnings {
                    line += &format!("; {warning}");
                }
                Some(line)
            }
            MetricsRecord::Generation {
                generation,
                hosts,
                world_size,
                accumulation,
                resume_from,
                reasons,
                ..
            } => {
                let from = resume_from
                    .as_deref()
                    .map_or_else(|| "a fresh start".to_string(), |p| format!("checkpoint {p}"));
                let why: Vec<String> = reasons.iter().map(|r| r.to_string()).collect();
                Some(format!(
                    "generation {generation}: {} host(s) ({}), {world_size} rank(s) x {accumulation} \
                     micro-batch(es), from {from} ({})",
                    hosts.len(),
                    hosts.join(", "),
                    why.join("; ")
                ))
            }
        }
    }

    /// Records a committed checkpoint at `updates` optimizer updates.
    /// Pending members are admitted now: the next generation resumes from
    /// this checkpoint, so a grow loses no update.
    pub fn commit_checkpoint(
        &mut self,
        generation: u64,
        epoch: u64,
        updates: u64,
        path: String,
    ) -> Result<(), JobError> {
        self.check_generation(generation)?;
        self.checkpoints.push(CommittedCheckpoint { epoch, step: updates, path });
        self.restarts = 0;
        // While hosts stop, the stop's generation admits the pending ones:
        // a commit of rank 0's delayed report of an earlier checkpoint must
        // not open it before the stop checkpoint.
        if !self.pending.is_empty()
            && self.hosts_stopping.is_none()
            && self.pending_would_grow_the_world()
        {
            self.next_generation(None);
        }
        Ok(())
    }

    /// A rank of `generation` (0: a rank that never got an assignment, taken
    /// as the current one) leaves; the job finishes when every rank left
    /// successfully. A rank leaves once; it cannot succeed before the job
    /// runs. A failure fails a fixed job; an elastic one restarts every rank
    /// in a new generation (at most `max_restarts` times in a row without a
    /// committed checkpoint). A pending member whose rank fails is dropped.
    /// A failure's `cause` says whom to blame: the peer a collective failed
    /// on (the chain of such reports is followed; a backend that names no
    /// peer leads to the ranks that send no Leave), or the ranks that asked
    /// every rank to stop (named whichever rank's Leave comes first).
    pub fn leave(
        &mut self,
        member_id: &str,
        generation: u64,
        local_rank: u32,
        success: bool,
        message: &str,
        cause: FailureCause,
    ) -> Result<(), JobError> {
        if generation != 0 && generation != self.generation {
            return Err(JobError::Precondition(format!(
                "stale generation {generation}, the job is at {}: the rank was replaced",
                self.generation
            )));
        }
        if let Some(i) = self.pending.iter().position(|m| m.id == member_id) {
            if local_rank >= self.pending[i].local_ranks {
                return Err(JobError::Invalid(format!(
                    "local_rank {local_rank}: member {member_id} runs {} rank(s)",
                    self.pending[i].local_ranks
                )));
            }
            if success {
                return Err(JobError::Precondition(format!(
                    "member {member_id} is pending: its ranks have not started"
                )));
            }
            let m = self.pending.remove(i);
            let why = format!("local rank {local_rank} failed before admission: {message}");
            tracing::warn!(member = %m.id, host = %m.host, "{why}; dropped");
            self.dropped.push((m, why));
            return Ok(());
        }
        let member = self.member(member_id)?.clone();
        if local_rank >= member.local_ranks {
            return Err(JobError::Invalid(format!(
                "local_rank {local_rank}: member {member_id} runs {} rank(s)",
                member.local_ranks
            )));
        }
        let rank = member.first_rank + local_rank;
        // A report naming a rank the job does not have is taken without its
        // cause: the rank's own failure still counts.
        let cause = match cause {
            // In rank order, each once: at most the world's ranks.
            FailureCause::StopRequestedBy(mut askers) => {
                askers.sort_unstable();
                askers.dedup();
                match askers.last() {
                    Some(&last) if last < self.world_size() => {
                        FailureCause::StopRequestedBy(askers)
                    }
                    _ => {
                        tracing::warn!(
                            member = %member_id,
                            "`stop_requested_by` {askers:?} names no rank of the job's {}; \
                             ignored",
                            self.world_size()
                        );
                        FailureCause::Unknown
                    }
                }
            }
            // A link ends at another rank of the job.
            FailureCause::TamperedLinkFrom(from) if from >= self.world_size() || from == rank => {
                tracing::warn!(
                    member = %member_id,
                    "`tampered_link_from` {from} is no other rank of the job's {}; ignored",
                    self.world_size()
                );
                FailureCause::Unknown
            }
            cause => cause,
        };
        if success && self.phase == Phase::Waiting {
            return Err(JobError::Precondition(format!(
                "rank {rank} cannot finish successfully: the job has not started"
            )));
        }
        if !self.left_ranks.insert(rank) {
            return Err(JobError::Precondition(format!("rank {rank} has already left")));
        }
        if !success {
            let failure = format!("rank {rank} on {} failed: {message}", member.host);
            if self.elastic() && self.phase == Phase::Running {
                match &cause {
                    FailureCause::StopRequestedBy(askers) => {
                        self.hosts_stop(askers, false);
                        return Ok(());
                    }
                    FailureCause::StoppedBeforeTraining => {
                        self.hosts_stop(&[rank], true);
                        return Ok(());
                    }
                    _ => {}
                }
            }
            match cause {
                FailureCause::CollectivePeer(_) | FailureCause::CollectivePeerUnknown
                    if self.phase == Phase::Running =>
                {
                    // Wait a moment for the other ranks' reports: the rank
                    // to blame is the one the chain of silent peers ends at,
                    // or the ranks that report nothing.
                    let (peer, grace) = match cause {
                        FailureCause::CollectivePeer(peer) => (Some(peer), BLAME_GRACE),
                        _ => (None, BLAME_GRACE_PEER_UNKNOWN),
                    };
                    self.collective_failures.insert(rank, (peer, failure));
                    self.blame_at.get_or_insert(Instant::now() + grace);
                }
                FailureCause::StopRequestedBy(askers)
                    if askers.first().is_some_and(|&first| first != rank) =>
                {
                    // Every rank stopped because these asked (a preempted
                    // host's signal): they are the cause, not the healthy
                    // rank whose Leave came first.
                    let first = askers[0];
                    let host = self.host_name_of_rank(first);
                    let others = match &askers[1..] {
                        [] => String::new(),
                        more => format!(", as did {}", self.ranks_with_hosts(more)),
                    };
                    let failure = format!(
                        "rank {first} on {host} {ASKED_TO_STOP}{others}; rank {rank} on {}: \
                         {message}",
                        member.host
                    );
                    self.rank_failed(first, &host, ASKED_TO_STOP, failure);
                }
                FailureCause::TamperedLinkFrom(from) => {
                    let from_host = self.host_name_of_rank(from);
                    let failure = format!(
                        "the link from rank {from} on {from_host} to rank {rank} on {} carried \
                         data that failed its integrity check (altered, injected or replayed on \
                         the network, or sent by a peer of another job; neither rank failed): \
                         {message}",
                        member.host
                    );
                    // An elastic job's new generation names the link too.
                    let reason = GenerationReason::TamperedLink {
                        from_rank: from,
                        from_host,
                        to_rank: rank,
                        to_host: member.host.clone(),
                        detail: message.to_string(),
                    };
                    self.fail_or_restart(reason, failure);
                }
                _ => self.rank_failed(rank, &member.host, message, failure),
            }
            return Ok(());
        }
        self.finished_ranks += 1;
        if self.finished_ranks == self.world_size() && self.phase == Phase::Running {
            self.phase = Phase::Finished;
            tracing::info!("every rank finished");
        }
        Ok(())
    }
}

/// What a rank whose stop request every rank stopped at did.
const ASKED_TO_STOP: &str =
    "asked every rank to stop (a stop signal to it or to its agent, or its agent's death)";

/// The longest an elastic job whose hosts are leaving at their ranks' stop
/// request waits for rank 0's Leave (after its stop checkpoint's commit)
/// before it opens the next generation without it: as long as an agent
/// gives its ranks to stop on their own.
const STOP_CHECKPOINT_WAIT: Duration = agent_calls::AGENT_STOP_GRACE;

/// Why a host whose ranks asked to stop left an elastic job.
const STOPPED_HOST: &str = "stopped: its rank(s) asked every rank to stop (a stop signal to them \
                            or to its agent: a preempted or drained host, or its agent's death)";

/// Hosts of an elastic job whose ranks asked every rank to stop (a stop
/// signal to them or to their agent, or their agent's death: a preempted
/// or drained host): leaving the job, not failing in it. Every rank stops
/// after the same update, rank 0 writing a stop checkpoint, whose commit
/// reaches the coordinator before rank 0's own Leave. The next generation
/// opens without these hosts, and spends no restart, once rank 0 has left
/// (it resumes from the stop checkpoint, not the one before), at once when
/// a rank was stopped before training (nothing was trained to save), or
/// [`STOP_CHECKPOINT_WAIT`] after the first such Leave.
#[derive(Debug)]
struct HostsStopping {
    /// The members leaving, by id.
    members: BTreeSet<String>,
    /// When the next generation opens without waiting for rank 0 longer.
    wait_until: Instant,
}

impl Job {
    /// Ranks of an elastic running job left at the stop request of
    /// `askers` (global ranks; `before_training`: one rank stopped before
    /// it trained): their hosts leave the job ([`HostsStopping`]).
    fn hosts_stop(&mut self, askers: &[u32], before_training: bool) {
        let stopping = self.hosts_stopping.get_or_insert_with(|| HostsStopping {
            members: BTreeSet::new(),
            wait_until: Instant::now() + STOP_CHECKPOINT_WAIT,
        });
        for &rank in askers {
            if let Some(m) = self.members.iter().find(|m| m.ranks().contains(&rank)) {
                if stopping.members.insert(m.id.clone()) {
                    tracing::warn!(
                        member = %m.id,
                        host = %m.host,
                        "rank {rank} {ASKED_TO_STOP}: its host leaves the job at the next \
                         generation, which opens once rank 0 has left (its stop checkpoint \
                         committed)"
                    );
                }
            }
        }
        let rank_0_left = self.left_ranks.contains(&0);
        if rank_0_left || before_training {
            self.next_generation(None);
        }
    }

    /// Whether member `id` is leaving the job at its ranks' stop request
    /// ([`HostsStopping`]): dropped as the next generation opens.
    pub fn is_leaving(&self, id: &str) -> bool {
        self.hosts_stopping.as_ref().is_some_and(|s| s.members.contains(id))
    }

    /// Drops the hosts leaving at their ranks' stop request from the job,
    /// each named in the next generation's reasons.
    fn drop_stopping_hosts(&mut self) {
        let Some(stopping) = self.hosts_stopping.take() else {
            return;
        };
        let (gone, kept): (Vec<Member>, Vec<Member>) = std::mem::take(&mut self.members)
            .into_iter()
            .partition(|m| stopping.members.contains(&m.id));
        self.members = kept;
        for m in &gone {
            tracing::warn!(member = %m.id, host = %m.host, "{STOPPED_HOST}; dropped from the job");
        }
        self.record_dropped(gone, STOPPED_HOST);
    }

    /// Records members just taken out of the job for `why`: among the hosts
    /// lost (named if the job fails waiting for joins), in the next
    /// generation's reasons when the job runs, and as dropped (their
    /// heartbeats are told so).
    fn record_dropped(&mut self, gone: Vec<Member>, why: &str) {
        for m in &gone {
            self.lost.push(format!("{} ({why})", m.host));
            if self.phase == Phase::Running {
                self.reasons.push(GenerationReason::LostHost {
                    host: m.host.clone(),
                    detail: why.to_string(),
                });
            }
        }
        self.dropped.extend(gone.into_iter().map(|m| (m, why.to_string())));
    }
}

/// Why a rank failed, as far as it knows: the typed part of its Leave,
/// which says whom to blame.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum FailureCause {
    /// Nothing beyond its message: the rank itself.
    #[default]
    Unknown,
    /// A collective failed on this peer (global rank): it stayed silent past
    /// the collective timeout, or its link closed.
    CollectivePeer(u32),
    /// A collective did not finish within the collective timeout, or failed
    /// with a remote error, on a backend that cannot say which peer held it up
    /// (NCCL): the ranks that report nothing are blamed.
    CollectivePeerUnknown,
    /// Data from this peer (global rank) failed its integrity check on its
    /// link to the rank: the network altered, injected or replayed it, or a
    /// peer of another job sent it. The link is named, not a rank.
    TamperedLinkFrom(u32),
    /// The ranks agreed to stop at the request of these ranks (in rank
    /// order), each asked by a signal to it or to its agent.
    StopRequestedBy(Vec<u32>),
    /// The rank itself was stopped (a signal to it or to its agent, or its
    /// agent's death) before its training began: it asked to stop, and no
    /// rank of its generation can have trained an update since.
    StoppedBeforeTraining,
}

fn format_duration(secs: f64) -> String {
    let s = secs.round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rsb_job::{EvalSetAccuracy, FabricProbe, LinkSpeed};

    thread_local! {
        /// The run folders of this test's jobs, deleted when its thread ends.
        static SCRATCH: std::cell::RefCell<Vec<tempfile::TempDir>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }

    fn scratch() -> PathBuf {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        SCRATCH.with(|s| s.borrow_mut().push(dir));
        path
    }

    fn job(nodes: u32) -> Job {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../recipes/debug/resnet18_tiny_cpu.yaml");
        let recipe = rsb_recipes::load(&path, &[]).unwrap();
        Job::new(recipe, scratch(), nodes)
    }

    /// An elastic job of `nodes` hosts within `min..=max`, with 6 sampler
    /// streams (worlds of 1, 2, 3 and 6 ranks).
    fn elastic(nodes: u32, min: u32, max: u32) -> Job {
        elastic_with_streams(nodes, min, max, 6)
    }

    /// An elastic job of `nodes` hosts within `min..=max`, with `streams`
    /// sampler streams (micro-batches of 8).
    fn elastic_with_streams(nodes: u32, min: u32, max: u32, streams: u32) -> Job {
        let mut j = job(nodes);
        j.recipe.batch.global_size = streams * 8;
        j.recipe.batch.micro_size = 8;
        j.set_node_bounds(min, max).unwrap();
        j
    }

    /// Lets the rejoin timeout of a waiting job pass, and looks.
    fn past_the_rejoin_timeout(j: &mut Job) {
        j.rejoin_timeout = Duration::from_millis(1);
        std::thread::sleep(Duration::from_millis(5));
        j.check_liveness();
    }

    /// Makes member `id` look silent past the heartbeat timeout.
    fn silence(j: &mut Job, id: &str) {
        let long_ago = Instant::now().checked_sub(j.heartbeat_timeout * 2).unwrap();
        let m = j.members.iter_mut().chain(&mut j.pending).find(|m| m.id == id).unwrap();
        m.last_seen = long_ago;
    }

    /// The records in the job's `metrics.jsonl`, once those queued are written.
    pub(crate) fn records(j: &Job) -> Vec<serde_json::Value> {
        assert_eq!(j.flush_metrics(), 0, "a record could not be written");
        let text = std::fs::read_to_string(j.out_dir.join("metrics.jsonl")).unwrap();
        text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()).collect()
    }

    fn generations(j: &Job) -> Vec<serde_json::Value> {
        records(j).into_iter().filter(|r| r["kind"] == "generation").collect()
    }

    /// A step record of update `step` (of 100).
    pub(crate) fn step(step: u64) -> MetricsRecord {
        MetricsRecord::Step {
            epoch: 0,
            step,
            lr: 1e-3,
            loss: 1.0,
            images_per_sec: 1.0,
            total_updates: 100,
            skipped_updates: 0,
            peak_gpu_memory_mib: None,
            rank_balance: None,
            input_wait_share: None,
        }
    }

    #[test]
    fn a_host_name_too_long_for_its_member_id_is_refused_naming_it() {
        let mut j = job(2);
        let long = "h".repeat(crate::service::MAX_NAME_LEN);
        let e = join(&mut j, &long, 1).unwrap_err();
        assert!(matches!(&e, JobError::Invalid(m) if m.contains("too long")), "{e:?}");
        assert!(j.members.is_empty(), "the refused host was counted");
        let id = join(&mut j, "a", 1).unwrap();
        assert_eq!(id, "m1-a", "the refused host used up a member number");
    }

    #[test]
    fn members_beat_about_four_times_within_any_heartbeat_timeout() {
        let mut j = job(1);
        for (timeout_secs, interval_ms) in [(30, 2000), (8, 2000), (5, 1250), (2, 500), (1, 250)] {
            j.heartbeat_timeout = Duration::from_secs(timeout_secs);
            assert_eq!(
                j.heartbeat_interval(),
                Duration::from_millis(interval_ms),
                "--heartbeat-timeout-secs {timeout_secs}"
            );
        }
    }

    #[test]
    fn node_bounds_must_hold_the_starting_hosts() {
        let mut j = job(2);
        for (min, max) in [(0, 2), (3, 3), (1, 1)] {
            assert!(j.set_node_bounds(min, max).is_err(), "{min}..={max} accepted for 2 hosts");
        }
        j.set_node_bounds(2, 2).unwrap();
        assert!(!j.elastic(), "fixed bounds made the job elastic");
        j.set_node_bounds(1, 2).unwrap();
        assert!(j.elastic());
    }

    #[test]
    fn a_lost_member_opens_a_generation_over_the_others_from_the_newest_checkpoint() {
        let mut j = elastic(3, 2, 3);
        let a = join(&mut j, "a", 1).unwrap();
        let b = join(&mut j, "b", 1).unwrap();
        let c = join(&mut j, "c", 1).unwrap();
        assert_eq!((j.phase.clone(), j.generation), (Phase::Running, 1));
        assert_eq!(assigned(&j, &c, 0).plan.accumulation, 2);
        j.publish(&a, 1, 0, ring("127.0.0.1:1")).unwrap();
        j.record_metrics(1, &step(4)).unwrap();
        j.commit_checkpoint(1, 0, 4, "/run/checkpoints/epoch-0001".into()).unwrap();
        j.record_metrics(1, &step(6)).unwrap();
        j.commit_checkpoint(1, 1, 6, "/run/checkpoints/epoch-0002".into()).unwrap();
        j.record_metrics(1, &step(7)).unwrap();
        j.note_assigned(&a, 0);
        assert_eq!(j.heartbeat(&a).unwrap().ranks_generation(), 1);
        silence(&mut j, &b);
        j.check_liveness();
        // Its agent learns that its ranks run in an older generation.
        let beat = j.heartbeat(&a).unwrap();
        assert_eq!((beat.keep_going, beat.ranks_generation()), (true, 1));
        j.note_assigned(&a, 0);
        assert_eq!(j.heartbeat(&a).unwrap().ranks_generation(), 2);
        assert_eq!((j.phase.clone(), j.generation), (Phase::Running, 2));
        let hosts: Vec<&str> = j.members.iter().map(|m| m.host.as_str()).collect();
        assert_eq!(hosts, ["a", "c"]);
        // Ranks renumbered contiguously in join order, the plan re-derived.
        let ca = assigned(&j, &c, 0);
        assert_eq!((ca.global_rank, ca.world_size, ca.plan.accumulation), (1, 2, 3));
        assert_eq!(assigned(&j, &a, 0).global_rank, 0);
        assert_eq!(j.resume_from.as_deref(), Some("/run/checkpoints/epoch-0002"));
        assert!(j.rendezvous.is_empty(), "the rendezvous of generation 1 was kept");
        let records = generations(&j);
        assert_eq!(records.len(), 2, "{records:?}");
        assert_eq!(records[0]["reasons"][0]["kind"], "start");
        assert_eq!(records[0]["world_size"], 3);
        let g = &records[1];
        assert_eq!((g["generation"].as_u64(), g["world_size"].as_u64()), (Some(2), Some(2)));
        assert_eq!(g["accumulation"], 3);
        assert_eq!(g["hosts"], serde_json::json!(["a", "c"]));
        assert_eq!(g["resume_from"], "/run/checkpoints/epoch-0002");
        assert_eq!(g["resume_step"], 6, "the updates of the resumed checkpoint");
        assert_eq!(g["reasons"][0]["kind"], "lost_host");
        assert_eq!(g["reasons"][0]["host"], "b");
        // The dropped member is told so, and can do nothing else.
        let beat = j.heartbeat(&b).unwrap();
        assert!(!beat.keep_going);
        assert!(beat.failure.unwrap().contains("dropped"));
        assert!(matches!(j.assignment(&b, 0), Err(JobError::Precondition(_))));
    }

    #[test]
    fn calls_of_an_older_generation_are_refused_naming_both() {
        let mut j = elastic(3, 2, 3);
        let a = join(&mut j, "a", 1).unwrap();
        let b = join(&mut j, "b", 1).unwrap();
        join(&mut j, "c", 1).unwrap();
        silence(&mut j, &b);
        j.check_liveness();
        assert_eq!(j.generation, 2);
        let stale = [
            j.publish(&a, 1, 0, ring("127.0.0.1:1")).unwrap_err(),
            j.record_metrics(1, &step(1)).unwrap_err(),
            j.commit_checkpoint(1, 0, 1, "/x".into()).unwrap_err(),
            j.leave(&a, 1, 0, false, "ring broken", FailureCause::Unknown).unwrap_err(),
        ];
        for e in stale {
            assert!(
                matches!(&e, JobError::Precondition(m) if m.contains("generation 1") && m.contains('2')),
                "{e:?}"
            );
        }
        assert_eq!(j.generation, 2, "a stale failure opened a generation");
        j.publish(&a, 2, 0, ring("127.0.0.1:1")).unwrap();
    }

    #[test]
    fn a_failed_rank_restarts_every_rank_and_keeps_its_host_a_bounded_number_of_times() {
        let mut j = elastic(2, 1, 2);
        j.max_restarts = 2;
        let a = join(&mut j, "a", 1).unwrap();
        let b = join(&mut j, "b", 1).unwrap();
        j.leave(&b, 1, 0, false, "ring: connection reset", FailureCause::Unknown).unwrap();
        assert_eq!((j.phase.clone(), j.generation, j.members.len()), (Phase::Running, 2, 2));
        let g = generations(&j).pop().unwrap();
        assert_eq!(g["reasons"][0]["kind"], "rank_failed");
        assert_eq!(g["reasons"][0]["rank"], 1);
        // The rank that already left in generation 1 runs again.
        assert_eq!(assigned(&j, &b, 0).global_rank, 1);
        j.leave(&a, 2, 0, false, "boom", FailureCause::Unknown).unwrap();
        assert_eq!(j.generation, 3);
        // A commit resets the count; without one, the next failure fails the job.
        j.record_metrics(3, &step(2)).unwrap();
        j.commit_checkpoint(3, 0, 1, "/ck".into()).unwrap();
        j.leave(&a, 3, 0, false, "boom", FailureCause::Unknown).unwrap();
        j.leave(&a, 4, 0, false, "boom", FailureCause::Unknown).unwrap();
        assert_eq!(j.generation, 5);
        j.leave(&a, 5, 0, false, "boom again", FailureCause::Unknown).unwrap();
        assert!(
            matches!(&j.phase, Phase::Failed(r) if r.contains("boom again") && r.contains("--max-restarts 2")),
            "{:?}",
            j.phase
        );
    }

    #[test]
    fn below_min_nodes_the_job_waits_for_joins_then_fails_naming_the_lost_hosts() {
        let mut j = elastic(2, 2, 3);
        let a = join(&mut j, "a", 1).unwrap();
        let b = join(&mut j, "b", 1).unwrap();
        silence(&mut j, &b);
        j.check_liveness();
        assert_eq!((j.phase.clone(), j.generation), (Phase::Waiting, 2));
        assert_eq!(j.assignment(&a, 0).unwrap(), RankShare::Wait, "a rank ran below min_nodes");
        assert!(j.heartbeat(&a).unwrap().keep_going);
        // A host that joins now is admitted at once.
        let c = join(&mut j, "c", 1).unwrap();
        assert_eq!((j.phase.clone(), j.generation), (Phase::Running, 2));
        assert_eq!(assigned(&j, &c, 0).global_rank, 1);
        let reasons = &generations(&j)[1]["reasons"];
        assert_eq!(reasons[0]["host"], "b");
        assert_eq!((&reasons[1]["kind"], &reasons[1]["host"]), (&"admitted".into(), &"c".into()));
        // Without a join, the rejoin timeout ends the job, naming the lost host.
        silence(&mut j, &c);
        j.check_liveness();
        assert_eq!((j.phase.clone(), j.generation), (Phase::Waiting, 3));
        past_the_rejoin_timeout(&mut j);
        assert!(
            matches!(&j.phase, Phase::Failed(r) if r.contains("c (missed heartbeats") && r.contains("--min-nodes")),
            "{:?}",
            j.phase
        );
    }

    #[test]
    fn hosts_that_do_not_all_join_within_the_join_timeout_fail_the_job_naming_who_came() {
        let mut j = job(3);
        j.join_timeout = Some(Duration::from_secs(60));
        join(&mut j, "a", 1).unwrap();
        join(&mut j, "b", 1).unwrap();
        j.check_liveness();
        assert_eq!(j.phase, Phase::Waiting, "failed before its join timeout");
        j.waiting_since = Instant::now().checked_sub(Duration::from_secs(61)).unwrap();
        j.check_liveness();
        assert!(
            matches!(&j.phase, Phase::Failed(r) if r.contains("2 of the 3 host(s) joined") && r.contains(": a, b") && r.contains("--join-timeout-secs")),
            "{:?}",
            j.phase
        );
        // A job whose hosts all came runs on past it, and a sweep's run,
        // which waits for hosts other runs free, has none of its own.
        let mut j = job(2);
        join(&mut j, "a", 1).unwrap();
        join(&mut j, "b", 1).unwrap();
        j.waiting_since = Instant::now().checked_sub(DEFAULT_JOIN_TIMEOUT * 2).unwrap();
        j.check_liveness();
        assert_eq!(j.phase, Phase::Running);
        let mut j = job(2);
        j.join_timeout = None;
        join(&mut j, "a", 1).unwrap();
        j.waiting_since = Instant::now().checked_sub(DEFAULT_JOIN_TIMEOUT * 2).unwrap();
        j.check_liveness();
        assert_eq!(j.phase, Phase::Waiting);
    }

    #[test]
    fn a_host_joining_a_running_job_is_pending_until_the_next_commit() {
        let mut j = elastic(2, 2, 3);
        let a = join(&mut j, "a", 1).unwrap();
        join(&mut j, "b", 1).unwrap();
        let (c, _, pending) = j.join("c", DeviceKind::Cpu, 1, LOOPBACK).unwrap();
        assert!(pending);
        assert_eq!(j.generation, 1, "a join stopped the running generation");
        assert_eq!(j.assignment(&c, 0).unwrap(), RankShare::Wait);
        assert!(j.heartbeat(&c).unwrap().pending);
        let full = j.join("d", DeviceKind::Cpu, 1, LOOPBACK).unwrap_err();
        assert!(full.to_string().contains("--max-nodes 3"), "{full}");
        j.record_metrics(1, &step(5)).unwrap();
        let commit = |j: &mut Job| {
            j.commit_checkpoint_report(1, 7, 0, 5, "/run/checkpoints/epoch-0001".into())
        };
        assert!(commit(&mut j).unwrap());
        assert_eq!((j.phase.clone(), j.generation), (Phase::Running, 2));
        assert!(j.pending.is_empty());
        // The commit sent again (its answer lost) is taken as the one that
        // opened this generation, not refused as stale; a new report of the
        // last generation is.
        assert!(!commit(&mut j).unwrap());
        let stale = j.commit_checkpoint_report(1, 8, 0, 6, "/run/checkpoints/x".into());
        assert!(stale.unwrap_err().to_string().contains("stale generation 1"));
        let ca = assigned(&j, &c, 0);
        assert_eq!((ca.global_rank, ca.world_size, ca.plan.accumulation), (2, 3, 2));
        assert!(!j.heartbeat(&c).unwrap().pending);
        assert_eq!(assigned(&j, &a, 0).world_size, 3);
        let g = generations(&j).pop().unwrap();
        assert_eq!(g["resume_from"], "/run/checkpoints/epoch-0001");
        assert_eq!(g["resume_step"], 5);
        assert_eq!(g["reasons"][0]["kind"], "admitted");
    }

    #[test]
    fn a_host_the_batch_cannot_take_now_stands_by_and_replaces_a_lost_one() {
        let mut j = job(2); // 2 sampler streams
        j.set_node_bounds(1, 3).unwrap();
        let a = join(&mut j, "a", 1).unwrap();
        let b = join(&mut j, "b", 1).unwrap();
        // Ranks no generation could run are refused.
        let e = j.join("c", DeviceKind::Cpu, 3, LOOPBACK).unwrap_err();
        assert!(e.to_string().contains("more than the 2 micro-batches"), "{e}");
        // One more rank cannot split 2 streams: taken, pending, and left
        // pending by a commit (no regroup into the same world).
        let (c, _, pending) = j.join("c", DeviceKind::Cpu, 1, LOOPBACK).unwrap();
        assert!(pending);
        j.record_metrics(1, &step(5)).unwrap();
        assert!(j
            .commit_checkpoint_report(1, 7, 0, 5, "/run/checkpoints/epoch-0001".into())
            .unwrap());
        assert_eq!((j.phase.clone(), j.generation), (Phase::Running, 1), "a commit regrouped");
        assert_eq!(j.assignment(&c, 0).unwrap(), RankShare::Wait);
        // b is lost: c takes its place, from the checkpoint.
        silence(&mut j, &b);
        j.check_liveness();
        assert_eq!((j.phase.clone(), j.generation), (Phase::Running, 2));
        assert_eq!((assigned(&j, &a, 0).global_rank, assigned(&j, &c, 0).global_rank), (0, 1));
        let g = generations(&j).pop().unwrap();
        assert_eq!(g["resume_from"], "/run/checkpoints/epoch-0001");
        assert_eq!(g["hosts"], serde_json::json!(["a", "c"]));
    }

    #[test]
    fn hosts_left_that_cannot_split_the_batch_run_on_the_largest_set_that_can() {
        // 4 sampler streams: worlds of 1, 2 and 4 ranks.
        let mut j = elastic_with_streams(4, 2, 4, 4);
        let ids: Vec<String> =
            ["a", "b", "c", "d"].iter().map(|h| join(&mut j, h, 1).unwrap()).collect();
        assert_eq!((j.phase.clone(), j.world_size()), (Phase::Running, 4));
        // c's rank fetched its share of generation 1.
        j.note_assigned(&ids[2], 0);
        assert_eq!(j.members[2].rank_generations, [1]);
        // d is lost: 3 ranks cannot split 4 streams; a and b run, c stands by.
        silence(&mut j, &ids[3]);
        j.check_liveness();
        // As a host that joined pending: no ranks, no fetches (its agent
        // would take generation 1's for ranks behind once admitted).
        assert_eq!((j.pending[0].id.as_str(), j.pending[0].first_rank), (ids[2].as_str(), 2));
        assert_eq!(j.pending[0].rank_generations, [0]);
        assert_eq!((j.phase.clone(), j.generation, j.world_size()), (Phase::Running, 2, 2));
        assert_eq!(
            (assigned(&j, &ids[0], 0).global_rank, assigned(&j, &ids[1], 0).global_rank),
            (0, 1)
        );
        assert_eq!(assigned(&j, &ids[0], 0).plan.accumulation, 2);
        assert_eq!(j.assignment(&ids[2], 0).unwrap(), RankShare::Wait);
        let beat = j.heartbeat(&ids[2]).unwrap();
        assert!(beat.pending && beat.keep_going);
        let g = generations(&j).pop().unwrap();
        assert_eq!(g["hosts"], serde_json::json!(["a", "b"]));
        let reasons = g["reasons"].as_array().unwrap();
        let kinds: Vec<&str> = reasons.iter().map(|r| r["kind"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["lost_host", "standing_by"], "{reasons:?}");
        assert_eq!(reasons[1]["host"], "c");
        let detail = reasons[1]["detail"].as_str().unwrap();
        assert!(detail.contains("the 3 ranks of the 3 hosts left cannot split the global batch's 4 micro-batches; 2 ranks on 2 of them do"), "{detail}");
        // A commit leaves the standing-by host pending: no regroup.
        j.record_metrics(2, &step(5)).unwrap();
        assert!(j
            .commit_checkpoint_report(2, 7, 0, 5, "/run/checkpoints/epoch-0001".into())
            .unwrap());
        assert_eq!(j.generation, 2, "a commit regrouped into the same world");
        // A new host joins: at the next commit a, b, c and e run (4 ranks).
        let (e, _, pending) = j.join("e", DeviceKind::Cpu, 1, LOOPBACK).unwrap();
        assert!(pending);
        j.record_metrics(2, &step(6)).unwrap();
        assert!(j.commit_checkpoint_report(2, 8, 0, 6, "/run/checkpoints/step-6".into()).unwrap());
        assert_eq!((j.phase.clone(), j.generation, j.world_size()), (Phase::Running, 3, 4));
        assert_eq!((assigned(&j, &ids[2], 0).global_rank, assigned(&j, &e, 0).global_rank), (2, 3));
        assert!(j.pending.is_empty());
        let g = generations(&j).pop().unwrap();
        assert_eq!(g["hosts"], serde_json::json!(["a", "b", "c", "e"]));
        assert_eq!(g["resume_step"], 6);
    }

    #[test]
    fn hosts_whose_ranks_cannot_split_the_batch_on_min_nodes_wait_then_fail_saying_so() {
        // 32 streams over hosts of 8 ranks, at least 3 hosts: 3 hosts (24
        // ranks) cannot, and 2 are too few.
        let mut j = elastic_with_streams(4, 3, 4, 32);
        let ids: Vec<String> =
            ["a", "b", "c", "d"].iter().map(|h| join(&mut j, h, 8).unwrap()).collect();
        assert_eq!((j.phase.clone(), j.world_size()), (Phase::Running, 32));
        silence(&mut j, &ids[3]);
        j.check_liveness();
        assert_eq!((j.phase.clone(), j.generation), (Phase::Waiting, 2));
        assert_eq!(j.assignment(&ids[0], 0).unwrap(), RankShare::Wait);
        past_the_rejoin_timeout(&mut j);
        assert!(
            matches!(&j.phase, Phase::Failed(r) if r.contains("the ranks of the 3 host(s) left (8 + 8 + 8) cannot split the global batch's 32 micro-batches on 3 or more of them (--min-nodes)") && r.contains("d (missed heartbeats")),
            "{:?}",
            j.phase
        );
    }

    #[test]
    fn a_fixed_job_refuses_joins_while_running_and_fails_on_a_loss() {
        let mut j = job(2);
        join(&mut j, "a", 1).unwrap();
        let b = join(&mut j, "b", 1).unwrap();
        let e = join(&mut j, "c", 1).unwrap_err();
        assert!(e.to_string().contains("--max-nodes"), "{e}");
        silence(&mut j, &b);
        j.check_liveness();
        assert!(
            matches!(&j.phase, Phase::Failed(r) if r.contains("(b) missed heartbeats")),
            "{:?}",
            j.phase
        );
        assert_eq!(j.generation, 1);
    }

    const LOOPBACK: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));

    /// Joins a CPU host advertising 127.0.0.1; returns its member id.
    fn join(j: &mut Job, host: &str, ranks: u32) -> Result<String, JobError> {
        j.join(host, DeviceKind::Cpu, ranks, LOOPBACK).map(|(id, _, _)| id)
    }

    /// The share `local_rank` of `member` is told, which must be one.
    fn assigned(j: &Job, member: &str, local_rank: u32) -> RankAssignment {
        match j.assignment(member, local_rank) {
            Ok(RankShare::Assigned(share)) => share,
            other => panic!("rank {local_rank} of {member} was told {other:?}, not its share"),
        }
    }

    #[test]
    fn ranks_of_a_finished_job_are_told_so_whether_they_trained_or_waited_to_be_admitted() {
        let mut j = elastic(2, 2, 3);
        let a = join(&mut j, "a", 1).unwrap();
        let b = join(&mut j, "b", 1).unwrap();
        let (c, _, pending) = j.join("c", DeviceKind::Cpu, 1, LOOPBACK).unwrap();
        assert!(pending);
        j.leave(&a, 1, 0, true, "", FailureCause::Unknown).unwrap();
        j.leave(&b, 1, 0, true, "", FailureCause::Unknown).unwrap();
        assert_eq!(j.phase, Phase::Finished);
        for member in [&a, &c] {
            assert_eq!(j.assignment(member, 0).unwrap(), RankShare::JobFinished, "{member}");
        }
        let extra = j.assignment(&c, 1).unwrap_err();
        assert!(extra.to_string().contains("runs 1 rank(s)"), "{extra}");
        assert!(matches!(j.assignment("stranger", 0), Err(JobError::NotFound(_))));
        // A failed job's ranks are refused: their agents fail too.
        let mut f = elastic(2, 2, 3);
        let a = join(&mut f, "a", 1).unwrap();
        let (c, _, _) = f.join("c", DeviceKind::Cpu, 1, LOOPBACK).unwrap();
        f.fail("a test's failure".into());
        for member in [&a, &c] {
            let refused = f.assignment(member, 0).unwrap_err();
            assert!(refused.to_string().contains("a test's failure"), "{refused}");
        }
    }

    fn ring(a: &str) -> Option<RendezvousPayload> {
        Some(RendezvousPayload::RingAddress(a.into()))
    }

    #[test]
    fn a_regroup_waits_until_its_hosts_can_split_the_batch() {
        // 6 sampler streams: worlds of 1, 2, 3 and 6 ranks.
        let mut j = elastic(2, 2, 3);
        let _a = join(&mut j, "a", 1).unwrap();
        let b = join(&mut j, "b", 1).unwrap();
        assert_eq!(j.phase, Phase::Running);
        silence(&mut j, &b);
        j.check_liveness();
        assert_eq!(j.phase, Phase::Waiting, "one host left, two needed");
        // 1 + 3 = 4 ranks cannot share 6 streams: the job waits on.
        join(&mut j, "c", 3).unwrap();
        assert_eq!(j.phase, Phase::Waiting);
        assert!(j.why_waiting().contains("(1 + 3) cannot split"), "{}", j.why_waiting());
        // With 2 more, all 6 ranks run.
        join(&mut j, "d", 2).unwrap();
        assert_eq!((j.phase.clone(), j.world_size()), (Phase::Running, 6));
        // --max-nodes holds while a regroup waits with enough hosts too.
        let mut w = elastic(2, 2, 3);
        join(&mut w, "a", 1).unwrap();
        let b = join(&mut w, "b", 1).unwrap();
        silence(&mut w, &b);
        w.check_liveness();
        join(&mut w, "c", 3).unwrap();
        join(&mut w, "x", 4).unwrap();
        assert_eq!(w.phase, Phase::Waiting, "1 + 3 + 4 ranks cannot split 6 streams");
        let full = join(&mut w, "y", 2).unwrap_err();
        assert!(full.to_string().contains("--max-nodes 3"), "{full}");
    }

    #[test]
    fn a_member_ranks_generation_waits_for_its_slowest_rank() {
        let mut j = elastic(2, 1, 2);
        let a = join(&mut j, "a", 2).unwrap();
        let _b = join(&mut j, "b", 1).unwrap();
        assert_eq!(j.generation, 1);
        j.note_assigned(&a, 1);
        // Rank 0 of `a` has not fetched generation 1 yet: a restart is
        // still needed if the generation moves on. Rank 1 has: the newest.
        let beat = j.heartbeat(&a).unwrap();
        assert_eq!((beat.ranks_generation(), beat.newest_ranks_generation()), (0, 1));
        j.note_assigned(&a, 0);
        assert_eq!(j.heartbeat(&a).unwrap().ranks_generation(), 1);
        // A local rank the member does not run changes nothing.
        j.note_assigned(&a, 7);
        assert_eq!(j.heartbeat(&a).unwrap().ranks_generation(), 1);
    }

    #[test]
    fn ranks_follow_join_order_and_the_job_starts_when_all_joined() {
        let mut j = job(2);
        let a = join(&mut j, "a", 1).unwrap();
        assert_eq!(j.assignment(&a, 0).unwrap(), RankShare::Wait);
        let b = join(&mut j, "b", 1).unwrap();
        assert_eq!(j.phase, Phase::Running);
        assert_eq!(assigned(&j, &a, 0).global_rank, 0);
        assert_eq!(assigned(&j, &b, 0).global_rank, 1);
        assert!(join(&mut j, "c", 1).is_err());
        assert!(j.assignment(&b, 1).is_err());
    }

    #[test]
    fn rendezvous_completes_when_every_cpu_rank_published() {
        let mut j = job(2);
        let a = join(&mut j, "a", 1).unwrap();
        let b = join(&mut j, "b", 1).unwrap();
        j.publish(&b, 1, 1, ring("127.0.0.1:2")).unwrap();
        assert_eq!(j.rendezvous_result(), None);
        j.publish(&a, 1, 0, ring("127.0.0.1:1")).unwrap();
        assert_eq!(
            j.rendezvous_result(),
            Some((vec![], vec!["127.0.0.1:1".to_string(), "127.0.0.1:2".to_string()]))
        );
        assert!(j.publish(&a, 7, 0, None).is_err(), "stale generation accepted");
        // The same address again is a retry; another one is refused.
        j.publish(&a, 1, 0, ring("127.0.0.1:1")).unwrap();
        let again = j.publish(&a, 1, 0, ring("127.0.0.1:9")).unwrap_err();
        assert!(matches!(again, JobError::Precondition(_)), "{again:?}");
    }

    /// Makes the current generation look started `rendezvous_timeout` ago and more.
    fn overdue(j: &mut Job) {
        j.running_since = Instant::now().checked_sub(j.rendezvous_timeout * 2);
    }

    #[test]
    fn ranks_missing_from_the_rendezvous_past_its_deadline_fail_a_fixed_job_naming_them() {
        let mut j = job(3);
        j.recipe.batch.global_size = 48;
        j.recipe.batch.micro_size = 8;
        let a = join(&mut j, "a", 1).unwrap();
        let _b = join(&mut j, "b", 1).unwrap();
        let _c = join(&mut j, "c", 1).unwrap();
        j.publish(&a, 1, 0, ring("127.0.0.1:1")).unwrap();
        // Within the deadline nothing happens, however long the others take.
        j.check_liveness();
        assert_eq!(j.phase, Phase::Running);
        overdue(&mut j);
        j.check_liveness();
        let Phase::Failed(reason) = &j.phase else { panic!("{:?}", j.phase) };
        assert!(reason.starts_with("rank 1 on b failed: did not reach the rendezvous"), "{reason}");
        assert!(reason.contains("2 of 3 rank(s) missing: rank 1 on b, rank 2 on c"), "{reason}");
    }

    #[test]
    fn a_complete_rendezvous_has_no_deadline_and_over_nccl_every_rank_must_come() {
        let mut j = job(2);
        let a = join(&mut j, "a", 1).unwrap();
        let b = join(&mut j, "b", 1).unwrap();
        j.publish(&a, 1, 0, ring("127.0.0.1:1")).unwrap();
        j.publish(&b, 1, 1, ring("127.0.0.1:2")).unwrap();
        overdue(&mut j);
        j.check_liveness();
        assert_eq!(j.phase, Phase::Running);
        assert_eq!(j.missing_from_rendezvous(), Vec::<u32>::new());
        // Over NCCL rank 0 publishes the id and the others come for it.
        let mut j = job(2);
        j.recipe.distributed.backend = rsb_recipes::CollectiveBackend::Nccl;
        let a = join(&mut j, "a", 1).unwrap();
        let b = join(&mut j, "b", 1).unwrap();
        assert_eq!(j.missing_from_rendezvous(), vec![0, 1]);
        j.publish(&b, 1, 1, None).unwrap();
        assert_eq!(j.missing_from_rendezvous(), vec![0]);
        j.publish(&a, 1, 0, Some(RendezvousPayload::NcclId(vec![7; 128]))).unwrap();
        assert_eq!(j.missing_from_rendezvous(), Vec::<u32>::new());
        overdue(&mut j);
        j.check_liveness();
        assert_eq!(j.phase, Phase::Running);
        // Rank 1 never came: named, though rank 0's id is there.
        let mut j = job(2);
        j.recipe.distributed.backend = rsb_recipes::CollectiveBackend::Nccl;
        let a = join(&mut j, "a", 1).unwrap();
        join(&mut j, "b", 1).unwrap();
        j.publish(&a, 1, 0, Some(RendezvousPayload::NcclId(vec![7; 128]))).unwrap();
        overdue(&mut j);
        j.check_liveness();
        let Phase::Failed(reason) = &j.phase else { panic!("{:?}", j.phase) };
        assert!(reason.starts_with("rank 1 on b failed: did not reach the rendezvous"), "{reason}");
    }

    #[test]
    fn a_rank_missing_from_the_rendezvous_restarts_an_elastic_job() {
        let mut j = elastic(2, 1, 2);
        let a = join(&mut j, "a", 1).unwrap();
        let _b = join(&mut j, "b", 1).unwrap();
        j.publish(&a, 1, 0, ring("127.0.0.1:1")).unwrap();
        overdue(&mut j);
        j.check_liveness();
        assert_eq!((j.phase.clone(), j.generation, j.members.len()), (Phase::Running, 2, 2));
        let g = generations(&j).pop().unwrap();
        assert_eq!(g["reasons"][0]["kind"], "rank_failed");
        assert_eq!(g["reasons"][0]["rank"], 1);
        assert_eq!(g["reasons"][0]["host"], "b");
        // The new generation has a deadline of its own.
        j.check_liveness();
        assert_eq!((j.phase.clone(), j.generation), (Phase::Running, 2));
    }

    #[test]
    fn cuda_ranks_meet_over_the_ring_when_the_recipe_says_so_and_over_nccl_by_default() {
        // `coordinator up --local --devices 0,0` with `distributed.backend:
        // ring`: one host, two CUDA ranks on one GPU, staged through the ring.
        let mut j = job(1);
        j.recipe.distributed.backend = rsb_recipes::CollectiveBackend::Ring;
        let (a, _, _) = j.join("gpu-host", DeviceKind::Cuda, 2, LOOPBACK).unwrap();
        assert_eq!(j.phase, Phase::Running);
        let nccl = j.publish(&a, 1, 0, Some(RendezvousPayload::NcclId(vec![0; 128])));
        assert!(matches!(nccl, Err(JobError::Invalid(_))), "{nccl:?}");
        j.publish(&a, 1, 0, ring("127.0.0.1:4000")).unwrap();
        assert_eq!(j.rendezvous_result(), None);
        j.publish(&a, 1, 1, ring("127.0.0.1:4001")).unwrap();
        assert_eq!(
            j.rendezvous_result(),
            Some((vec![], vec!["127.0.0.1:4000".to_string(), "127.0.0.1:4001".to_string()]))
        );
        // `auto` (the RSB recipes): CUDA ranks meet over NCCL, rank 0's id.
        let mut j = job(1);
        assert_eq!(j.recipe.distributed.backend, rsb_recipes::CollectiveBackend::Auto);
        let (a, _, _) = j.join("gpu-host", DeviceKind::Cuda, 2, LOOPBACK).unwrap();
        let address = j.publish(&a, 1, 1, ring("127.0.0.1:4001"));
        assert!(matches!(address, Err(JobError::Invalid(_))), "{address:?}");
        j.publish(&a, 1, 0, Some(RendezvousPayload::NcclId(vec![7; 128]))).unwrap();
        assert_eq!(j.rendezvous_result(), Some((vec![7; 128], vec![])));
    }

    #[test]
    fn a_member_publishes_only_for_its_own_ranks_on_its_own_address() {
        let mut j = job(2);
        let a = join(&mut j, "a", 1).unwrap();
        let b = join(&mut j, "b", 1).unwrap();
        let theirs = j.publish(&a, 1, 1, ring("127.0.0.1:2")).unwrap_err();
        assert!(matches!(&theirs, JobError::Denied(m) if m.contains("not rank 1")), "{theirs:?}");
        let elsewhere = j.publish(&b, 1, 1, ring("10.9.9.9:2")).unwrap_err();
        assert!(matches!(elsewhere, JobError::Denied(_)), "{elsewhere:?}");
        let garbage = j.publish(&b, 1, 1, ring("somewhere")).unwrap_err();
        assert!(matches!(garbage, JobError::Invalid(_)), "{garbage:?}");
        let nccl = j.publish(&b, 1, 1, Some(RendezvousPayload::NcclId(vec![0; 128])));
        assert!(matches!(nccl, Err(JobError::Invalid(_))), "{nccl:?}");
        assert!(matches!(j.publish(&b, 1, 5, None), Err(JobError::Invalid(_))));
        assert!(j.rendezvous.is_empty());
    }

    #[test]
    fn member_credentials_are_checked() {
        let mut j = job(2);
        let (a, secret, _) = j.join("a", DeviceKind::Cpu, 1, LOOPBACK).unwrap();
        let m = j.authenticate(Some((&a, secret.expose().as_bytes()))).unwrap();
        assert_eq!(m.id, a);
        for presented in [None, Some((a.as_str(), &b"wrong"[..])), Some(("m9-x", &b"wrong"[..]))] {
            let e = j.authenticate(presented).unwrap_err();
            assert!(matches!(e, JobError::Unauthenticated(_)), "{e:?}");
        }
        let (b, other, _) = j.join("b", DeviceKind::Cpu, 1, LOOPBACK).unwrap();
        assert!(!secret.matches(other.expose().as_bytes()), "two members share a secret");
        let crossed = j.authenticate(Some((&b, secret.expose().as_bytes())));
        assert!(crossed.is_err(), "member b accepted with member a's secret");
        assert!(j.join("c", DeviceKind::Cpu, 1, None).is_err(), "full job accepted a member");
    }

    #[test]
    fn a_cpu_member_must_advertise_an_address() {
        let mut j = job(1);
        let e = j.join("a", DeviceKind::Cpu, 1, None).unwrap_err();
        assert!(e.to_string().contains("advertise_address"), "{e}");
    }

    #[test]
    fn a_rank_leaves_once_and_only_its_own_ranks() {
        let mut j = job(1);
        let a = join(&mut j, "a", 2).unwrap();
        assert!(matches!(
            j.leave(&a, 0, 2, true, "", FailureCause::Unknown),
            Err(JobError::Invalid(_))
        ));
        j.leave(&a, 0, 0, true, "", FailureCause::Unknown).unwrap();
        assert!(matches!(
            j.leave(&a, 0, 0, true, "", FailureCause::Unknown),
            Err(JobError::Precondition(_))
        ));
        assert_eq!(j.phase, Phase::Running, "one rank leaving twice finished the job");
        let mut w = job(2);
        let a = join(&mut w, "a", 1).unwrap();
        assert!(matches!(
            w.leave(&a, 0, 0, true, "", FailureCause::Unknown),
            Err(JobError::Precondition(_))
        ));
    }

    #[test]
    fn a_world_that_cannot_hold_the_batch_fails_with_the_reason() {
        let mut j = job(1);
        join(&mut j, "a", 3).unwrap(); // 2 streams over 3 ranks
        assert!(matches!(&j.phase, Phase::Failed(r) if r.contains("3 ranks")), "{:?}", j.phase);
    }

    /// A host whose ranks all finished stops heartbeating (its agent exits)
    /// while rank 0 on another host still flushes its reports: the job
    /// waits for rank 0's Leave, past the heartbeat timeout, and finishes.
    #[test]
    fn a_member_whose_ranks_all_left_is_not_silent() {
        let mut j = job(2);
        let a = join(&mut j, "a", 1).unwrap();
        let b = join(&mut j, "b", 1).unwrap();
        assert_eq!(j.phase, Phase::Running);
        j.leave(&b, 1, 0, true, "", FailureCause::Unknown).unwrap();
        silence(&mut j, &b);
        j.check_liveness();
        assert_eq!(j.phase, Phase::Running, "a host whose ranks finished was called silent");
        j.leave(&a, 1, 0, true, "", FailureCause::Unknown).unwrap();
        assert_eq!(j.phase, Phase::Finished);
        // A silent member whose rank has not left still fails the job.
        let mut j = job(2);
        let a = join(&mut j, "a", 1).unwrap();
        let b = join(&mut j, "b", 1).unwrap();
        j.leave(&a, 1, 0, true, "", FailureCause::Unknown).unwrap();
        silence(&mut j, &b);
        j.check_liveness();
        assert!(matches!(&j.phase, Phase::Failed(r) if r.contains("(b) missed heartbeats")));
    }

    #[test]
    fn failures_and_silence_fail_the_job() {
        let mut j = job(1);
        let a = join(&mut j, "a", 2).unwrap();
        j.leave(&a, 0, 1, false, "boom", FailureCause::Unknown).unwrap();
        assert!(matches!(&j.phase, Phase::Failed(r) if r.contains("boom")));
        let mut j = job(1);
        j.heartbeat_timeout = Duration::from_millis(0);
        join(&mut j, "a", 2).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        j.check_liveness();
        assert!(matches!(&j.phase, Phase::Failed(r) if r.contains("missed heartbeats")));
    }

    #[test]
    fn data_that_failed_its_integrity_check_names_the_link_not_a_rank() {
        // Hosts a, b run ranks 0, 1; what rank 0 sent rank 1 was altered on
        // the network: rank 1 reports the link, and the job names it.
        let tampered = "rank 1: the data from rank 0 (10.0.0.1:29500) failed its integrity check";
        let mut j = job(2);
        join(&mut j, "a", 1).unwrap();
        let b = join(&mut j, "b", 1).unwrap();
        j.leave(&b, 0, 0, false, tampered, FailureCause::TamperedLinkFrom(0)).unwrap();
        let Phase::Failed(reason) = &j.phase else { panic!("{:?}", j.phase) };
        assert!(
            reason.starts_with(
                "the link from rank 0 on a to rank 1 on b carried data that failed its integrity \
                 check"
            ) && reason.contains("neither rank failed")
                && reason.ends_with(tampered),
            "{reason}"
        );
        // A link from no other rank of the job: the rank's own failure.
        for from in [1, 7] {
            let mut j = job(2);
            join(&mut j, "a", 1).unwrap();
            let b = join(&mut j, "b", 1).unwrap();
            j.leave(&b, 0, 0, false, tampered, FailureCause::TamperedLinkFrom(from)).unwrap();
            let Phase::Failed(reason) = &j.phase else { panic!("{:?}", j.phase) };
            assert!(reason.starts_with("rank 1 on b failed:"), "{from}: {reason}");
        }
        // An elastic job restarts every rank, and its new generation names
        // the link too, where it said rank 1 had failed.
        let mut j = elastic(2, 1, 2);
        join(&mut j, "a", 1).unwrap();
        let b = join(&mut j, "b", 1).unwrap();
        j.leave(&b, 1, 0, false, tampered, FailureCause::TamperedLinkFrom(0)).unwrap();
        assert_eq!((j.phase.clone(), j.generation, j.members.len()), (Phase::Running, 2, 2));
        let reason = &generations(&j).pop().unwrap()["reasons"][0];
        assert_eq!(reason["kind"], "tampered_link", "{reason}");
        let named = (&reason["from_rank"], &reason["from_host"], &reason["to_rank"]);
        assert_eq!(named, (&0.into(), &"a".into(), &1.into()), "{reason}");
        assert_eq!((&reason["to_host"], &reason["detail"]), (&"b".into(), &tampered.into()));
        let read: rsb_job::GenerationReason = serde_json::from_value(reason.clone()).unwrap();
        assert!(
            read.to_string().starts_with(
                "the link from rank 0 on a to rank 1 on b carried data that failed its \
                 integrity check: rank 1: the data from rank 0"
            ),
            "{read}"
        );
        // Without the typed field, the rank that reported it was named.
        let mut j = job(2);
        join(&mut j, "a", 1).unwrap();
        let b = join(&mut j, "b", 1).unwrap();
        j.leave(&b, 0, 0, false, tampered, FailureCause::Unknown).unwrap();
        let Phase::Failed(reason) = &j.phase else { panic!("{:?}", j.phase) };
        assert!(reason.starts_with("rank 1 on b failed:"), "{reason}");
    }

    #[test]
    fn ranks_stopped_at_another_ranks_request_blame_the_rank_that_asked() {
        // Hosts a, b run ranks 0, 1; b is preempted (its rank asked to
        // stop), and every rank stops after the same update. The Leave of
        // the healthy rank may come first: b is named.
        let asked = FailureCause::StopRequestedBy(vec![1]);
        let mut j = job(2);
        let a = join(&mut j, "a", 1).unwrap();
        join(&mut j, "b", 1).unwrap();
        let stopped = "stopped by rank 1's stop request after update 12: rank 0 wrote it";
        j.leave(&a, 0, 0, false, stopped, asked.clone()).unwrap();
        let Phase::Failed(reason) = &j.phase else { panic!("{:?}", j.phase) };
        assert!(
            reason.starts_with("rank 1 on b asked every rank to stop (a stop signal to it or to")
                && reason.contains(&format!("; rank 0 on a: {stopped}")),
            "{reason}"
        );
        // The rank that asked says so itself: named as the rank that failed.
        let mut j = job(2);
        join(&mut j, "a", 1).unwrap();
        let b2 = join(&mut j, "b", 1).unwrap();
        j.leave(&b2, 0, 0, false, "stopped by SIGTERM after update 12", asked).unwrap();
        let Phase::Failed(reason) = &j.phase else { panic!("{:?}", j.phase) };
        assert_eq!(reason, "rank 1 on b failed: stopped by SIGTERM after update 12");
        // A rank the job does not have: the Leave counts, without the cause.
        let mut j = job(2);
        let a4 = join(&mut j, "a", 1).unwrap();
        join(&mut j, "b", 1).unwrap();
        let wrong = FailureCause::StopRequestedBy(vec![7]);
        j.leave(&a4, 0, 0, false, "out of memory", wrong).unwrap();
        let Phase::Failed(reason) = &j.phase else { panic!("{:?}", j.phase) };
        assert_eq!(reason, "rank 0 on a failed: out of memory");
        // Both asked, and the second's Leave came first: the first named,
        // the others listed.
        let mut j = job(2);
        join(&mut j, "a", 1).unwrap();
        let b3 = join(&mut j, "b", 1).unwrap();
        let twice = FailureCause::StopRequestedBy(vec![1, 0, 1, 0]);
        j.leave(&b3, 0, 0, false, "stopped", twice).unwrap();
        let Phase::Failed(reason) = &j.phase else { panic!("{:?}", j.phase) };
        assert!(
            reason.starts_with("rank 0 on a asked every rank to stop")
                && reason.contains(", as did rank 1 on b;"),
            "{reason}"
        );
    }

    #[test]
    fn hosts_stopped_in_an_elastic_job_leave_it_from_the_stop_checkpoint_spending_no_restart() {
        // Hosts a, b, c run ranks 0, 1, 2 (--min-nodes 2); c is preempted:
        // its rank asked to stop, every rank stops after update 7, and rank
        // 0 commits the stop checkpoint just before its own Leave.
        let mut j = elastic(3, 2, 3);
        j.max_restarts = 0;
        let a = join(&mut j, "a", 1).unwrap();
        let b = join(&mut j, "b", 1).unwrap();
        let c = join(&mut j, "c", 1).unwrap();
        j.commit_checkpoint(1, 0, 4, "/ck/4".into()).unwrap();
        let asked = FailureCause::StopRequestedBy(vec![2]);
        j.leave(&c, 1, 0, false, "stopped by SIGTERM after update 7", asked.clone()).unwrap();
        j.leave(&b, 1, 0, false, "stopped by rank 2's stop request", asked.clone()).unwrap();
        // Not yet: the new generation would resume from update 4.
        assert_eq!((j.phase.clone(), j.generation), (Phase::Running, 1));
        j.commit_checkpoint(1, 0, 7, "/ck/7".into()).unwrap();
        j.leave(&a, 1, 0, false, "stopped by rank 2's stop request", asked.clone()).unwrap();
        assert_eq!((j.phase.clone(), j.generation, j.restarts()), (Phase::Running, 2, 0));
        let hosts: Vec<&str> = j.members.iter().map(|m| m.host.as_str()).collect();
        assert_eq!(hosts, ["a", "b"]);
        let g = generations(&j).pop().unwrap();
        assert_eq!((&g["resume_from"], &g["resume_step"]), (&"/ck/7".into(), &7.into()));
        assert_eq!(g["reasons"].as_array().unwrap().len(), 1, "{g}");
        assert_eq!(
            (&g["reasons"][0]["kind"], &g["reasons"][0]["host"]),
            (&"lost_host".into(), &"c".into())
        );
        assert!(g["reasons"][0]["detail"]
            .as_str()
            .unwrap()
            .contains("a preempted or drained host"));
        // Its agent, if still there, is told it was dropped.
        let beat = j.heartbeat(&c).unwrap();
        assert!(
            !beat.keep_going && beat.failure.unwrap().contains("was dropped from the job: stopped")
        );
        assert_eq!(assigned(&j, &b, 0).global_rank, 1);

        // A host waits for admission: rank 0's delayed report of an earlier
        // checkpoint does not open the generation before the stop one.
        let mut j = elastic(2, 1, 3);
        let a = join(&mut j, "a", 1).unwrap();
        let c = join(&mut j, "c", 1).unwrap();
        join(&mut j, "d", 1).unwrap();
        assert_eq!(j.pending.len(), 1);
        let asked = FailureCause::StopRequestedBy(vec![1]);
        j.leave(&c, 1, 0, false, "stopped by SIGTERM", asked.clone()).unwrap();
        j.commit_checkpoint(1, 0, 6, "/ck/6".into()).unwrap();
        assert_eq!(j.generation, 1, "opened before the stop checkpoint");
        j.commit_checkpoint(1, 0, 7, "/ck/7".into()).unwrap();
        j.leave(&a, 1, 0, false, "stopped by rank 1's stop request", asked).unwrap();
        let hosts: Vec<&str> = j.members.iter().map(|m| m.host.as_str()).collect();
        assert_eq!((j.generation, hosts), (2, vec!["a", "d"]));
        assert_eq!(j.resume_step, Some(7));

        // Below --min-nodes, the job waits for joins.
        let mut j = elastic(2, 2, 3);
        let a = join(&mut j, "a", 1).unwrap();
        let b = join(&mut j, "b", 1).unwrap();
        j.leave(&a, 1, 0, false, "stopped by SIGTERM", FailureCause::StopRequestedBy(vec![0]))
            .unwrap();
        assert_eq!((j.phase.clone(), j.generation, j.members.len()), (Phase::Waiting, 2, 1));
        assert_eq!(j.assignment(&b, 0).unwrap(), RankShare::Wait);
    }

    #[test]
    fn a_host_stopped_before_training_leaves_an_elastic_job_at_once() {
        // Nothing was trained, so nothing waits for rank 0.
        let mut j = elastic(3, 2, 3);
        join(&mut j, "a", 1).unwrap();
        join(&mut j, "b", 1).unwrap();
        let c = join(&mut j, "c", 1).unwrap();
        let stopped = "stopped by SIGTERM before training began";
        j.leave(&c, 1, 0, false, stopped, FailureCause::StoppedBeforeTraining).unwrap();
        assert_eq!((j.phase.clone(), j.generation, j.restarts()), (Phase::Running, 2, 0));
        assert!(j.members.iter().all(|m| m.host != "c"));
        // A fixed job fails, naming the rank.
        let mut j = job(2);
        join(&mut j, "a", 1).unwrap();
        let b = join(&mut j, "b", 1).unwrap();
        j.leave(&b, 1, 0, false, stopped, FailureCause::StoppedBeforeTraining).unwrap();
        let Phase::Failed(reason) = &j.phase else { panic!("{:?}", j.phase) };
        assert_eq!(reason, &format!("rank 1 on b failed: {stopped}"));
    }

    #[test]
    fn hosts_stopped_leave_at_the_deadline_when_rank_0_never_leaves() {
        let mut j = elastic(3, 2, 3);
        join(&mut j, "a", 1).unwrap();
        let b = join(&mut j, "b", 1).unwrap();
        join(&mut j, "c", 1).unwrap();
        let asked = FailureCause::StopRequestedBy(vec![1]);
        j.leave(&b, 1, 0, false, "stopped by SIGTERM", asked).unwrap();
        j.check_liveness();
        assert_eq!(j.generation, 1, "opened before rank 0 could leave");
        j.hosts_stopping.as_mut().unwrap().wait_until = Instant::now();
        j.check_liveness();
        assert_eq!((j.phase.clone(), j.generation, j.restarts()), (Phase::Running, 2, 0));
        let hosts: Vec<&str> = j.members.iter().map(|m| m.host.as_str()).collect();
        assert_eq!(hosts, ["a", "c"]);
        // A failure meanwhile restarts the job without the stopped hosts too.
        let mut j = elastic(3, 2, 3);
        let a = join(&mut j, "a", 1).unwrap();
        let b = join(&mut j, "b", 1).unwrap();
        join(&mut j, "c", 1).unwrap();
        j.leave(&b, 1, 0, false, "stopped", FailureCause::StopRequestedBy(vec![1])).unwrap();
        j.leave(&a, 1, 0, false, "disk full", FailureCause::Unknown).unwrap();
        assert_eq!((j.generation, j.restarts()), (2, 1));
        let hosts: Vec<&str> = j.members.iter().map(|m| m.host.as_str()).collect();
        assert_eq!(hosts, ["a", "c"]);
    }

    #[test]
    fn ranks_whose_nccl_collective_timed_out_blame_the_ranks_that_sent_no_leave() {
        // Ranks 0..3 on hosts a, b (two each); rank 2 stops: NCCL names no
        // peer, so ranks 0, 1 and 3 each report a collective that did not
        // finish, and rank 2 reports nothing. A fixed job of 2 hosts.
        // The blame waits long enough for a rank that NCCL's exit timer
        // ends (20 s after its failure) to be reported by its agent.
        let fixed = || {
            let mut j = elastic(2, 2, 2);
            j.recipe.batch.global_size = 64;
            j
        };
        let mut j = fixed();
        let a = join(&mut j, "a", 2).unwrap();
        let b = join(&mut j, "b", 2).unwrap();
        assert_eq!(j.phase, Phase::Running);
        let timed_out =
            |rank: u32| format!("rank {rank}: ncclAllReduce did not complete within the timeout");
        j.leave(&a, 0, 0, false, &timed_out(0), FailureCause::CollectivePeerUnknown).unwrap();
        j.check_liveness();
        assert_eq!(j.phase, Phase::Running, "blamed before the other reports could come");
        assert!(j.blame_at.is_some_and(|at| at > Instant::now() + Duration::from_secs(25)));
        j.leave(&a, 0, 1, false, &timed_out(1), FailureCause::CollectivePeerUnknown).unwrap();
        j.leave(&b, 0, 1, false, &timed_out(3), FailureCause::CollectivePeerUnknown).unwrap();
        j.blame_at = Some(Instant::now());
        j.check_liveness();
        let Phase::Failed(reason) = &j.phase else { panic!("{:?}", j.phase) };
        assert!(reason.starts_with("rank 2 on b stopped answering in a collective:"), "{reason}");
        assert!(reason.contains("3 rank(s) reported a collective that did not finish"), "{reason}");
        assert!(reason.contains("rank 0 on a failed: rank 0: ncclAllReduce"), "{reason}");
        // A whole host stopped (b): its ranks are named with their host,
        // the first blamed.
        let mut j = fixed();
        let a = join(&mut j, "a", 2).unwrap();
        let _b = join(&mut j, "b", 2).unwrap();
        j.leave(&a, 0, 0, false, &timed_out(0), FailureCause::CollectivePeerUnknown).unwrap();
        j.leave(&a, 0, 1, false, &timed_out(1), FailureCause::CollectivePeerUnknown).unwrap();
        j.blame_at = Some(Instant::now());
        j.check_liveness();
        let Phase::Failed(reason) = &j.phase else { panic!("{:?}", j.phase) };
        assert!(
            reason.starts_with(
                "rank 2 on b stopped answering in a collective (as did rank 3 on b): 2 rank(s)"
            ),
            "{reason}"
        );
        // Every rank reported: nobody to single out, the first report fails
        // the job as it is.
        let mut j = fixed();
        let a = join(&mut j, "a", 1).unwrap();
        let b = join(&mut j, "b", 1).unwrap();
        j.leave(&b, 0, 0, false, &timed_out(1), FailureCause::CollectivePeerUnknown).unwrap();
        j.leave(&a, 0, 0, false, &timed_out(0), FailureCause::CollectivePeerUnknown).unwrap();
        j.blame_at = Some(Instant::now());
        j.check_liveness();
        let Phase::Failed(reason) = &j.phase else { panic!("{:?}", j.phase) };
        assert!(reason.starts_with("rank 0 on a failed: rank 0: ncclAllReduce"), "{reason}");
    }

    #[test]
    fn ranks_timing_out_in_a_ring_blame_the_rank_their_reports_lead_to() {
        // Ranks 0, 1, 2 on hosts a, b, c; rank 1 stops: rank 2 waits on it,
        // rank 0 waits on rank 2, and each names its own neighbour. A fixed
        // job (min = max = 3 hosts) of 6 sampler streams.
        let mut j = elastic(3, 3, 3);
        let a = join(&mut j, "a", 1).unwrap();
        let _b = join(&mut j, "b", 1).unwrap();
        let c = join(&mut j, "c", 1).unwrap();
        assert_eq!(j.phase, Phase::Running);
        j.leave(
            &a,
            0,
            0,
            false,
            "rank 0: rank 2 did not answer for 15 s",
            FailureCause::CollectivePeer(2),
        )
        .unwrap();
        j.check_liveness();
        assert_eq!(j.phase, Phase::Running, "blamed before the other reports could come");
        j.leave(
            &c,
            0,
            0,
            false,
            "rank 2: rank 1 did not answer for 15 s",
            FailureCause::CollectivePeer(1),
        )
        .unwrap();
        j.blame_at = Some(Instant::now());
        j.check_liveness();
        let Phase::Failed(reason) = &j.phase else { panic!("{:?}", j.phase) };
        assert!(reason.starts_with("rank 1 on b stopped answering in a collective"), "{reason}");
        assert!(reason.contains("2 rank(s) failed waiting"), "{reason}");
        // It quotes the report of the rank that waited for rank 1 itself.
        assert!(
            reason.ends_with(
                "the report of the rank that waited for it: rank 2 on c failed: rank 2: rank 1 \
                 did not answer for 15 s"
            ),
            "{reason}"
        );
        // An elastic job (2 to 3 hosts) follows the reports too, and
        // restarts every rank naming the rank they lead to, not the first
        // to report.
        let mut j = elastic(3, 2, 3);
        let a = join(&mut j, "a", 1).unwrap();
        let _b = join(&mut j, "b", 1).unwrap();
        let c = join(&mut j, "c", 1).unwrap();
        let (silent_0, silent_2) =
            (FailureCause::CollectivePeer(2), FailureCause::CollectivePeer(1));
        j.leave(&a, 1, 0, false, "rank 0: rank 2 did not answer", silent_0.clone()).unwrap();
        j.check_liveness();
        assert_eq!(j.generation, 1, "restarted before the other reports could come");
        j.leave(&c, 1, 0, false, "rank 2: rank 1 did not answer", silent_2).unwrap();
        j.blame_at = Some(Instant::now());
        j.check_liveness();
        assert_eq!((j.phase.clone(), j.generation), (Phase::Running, 2));
        let reasons = &generations(&j).pop().unwrap()["reasons"];
        assert_eq!(reasons[0]["kind"], "rank_failed", "{reasons}");
        assert_eq!(
            (reasons[0]["rank"].as_u64(), reasons[0]["host"].as_str()),
            (Some(1), Some("b"))
        );
        assert!(
            reasons[0]["detail"].as_str().unwrap().starts_with("stopped answering in a collective"),
            "{reasons}"
        );
        // The new generation starts with no report pending: one that came
        // late for the last one blames nobody in this one.
        assert!(j.collective_failures.is_empty() && j.blame_at.is_none());
        j.leave(&a, 2, 0, false, "rank 0: rank 2 did not answer", silent_0).unwrap();
        assert_eq!((j.generation, j.collective_failures.len()), (2, 1));
        // A failure of another kind fails the job at once, as before.
        let mut j = job(1);
        let a = join(&mut j, "a", 2).unwrap();
        j.leave(&a, 0, 0, false, "out of memory", FailureCause::Unknown).unwrap();
        assert!(matches!(&j.phase, Phase::Failed(r) if r.contains("out of memory")));
    }

    #[test]
    fn a_finished_job_stops_heartbeats_without_a_failure() {
        // Members must tell "finished" from "failed": a member whose ranks
        // are still exiting when the last rank leaves must not report an error.
        let mut j = job(1);
        let a = join(&mut j, "a", 2).unwrap();
        j.leave(&a, 0, 0, true, "", FailureCause::Unknown).unwrap();
        assert!(j.heartbeat(&a).unwrap().keep_going);
        j.leave(&a, 0, 1, true, "", FailureCause::Unknown).unwrap();
        assert_eq!(j.phase, Phase::Finished);
        assert!(!j.heartbeat(&a).unwrap().keep_going);
        assert_eq!(j.failure(), None);
        let mut j = job(1);
        let a = join(&mut j, "a", 2).unwrap();
        j.leave(&a, 0, 0, false, "boom", FailureCause::Unknown).unwrap();
        assert!(!j.heartbeat(&a).unwrap().keep_going);
        assert!(j.failure().unwrap().contains("boom"));
    }

    #[test]
    fn typed_records_are_written_with_their_field_names_and_reported() {
        let dir = std::env::temp_dir().join(format!("rsb-job-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let _ = std::fs::remove_file(dir.join("metrics.jsonl"));
        let mut j = job(1);
        j.out_dir = dir.clone();
        join(&mut j, "a", 2).unwrap();
        let loading = MetricsRecord::Loading { epoch: 0, step: 0, elapsed_s: 1.0 };
        let line = j.record_metrics(1, &loading).unwrap().line.unwrap();
        assert_eq!(line, "epoch 0: loading");
        let first = MetricsRecord::FirstUpdate { epoch: 0, step: 1, elapsed_s: 12.34 };
        let line = j.record_metrics(1, &first).unwrap().line.unwrap();
        assert_eq!(line, "first update done in 12.3 s");
        let step = MetricsRecord::Step {
            epoch: 0,
            step: 2,
            lr: 1e-3,
            loss: 0.75,
            images_per_sec: 16.0,
            total_updates: 4,
            skipped_updates: 0,
            peak_gpu_memory_mib: None,
            rank_balance: None,
            input_wait_share: Some(0.01),
        };
        let line = j.record_metrics(1, &step).unwrap().line.unwrap();
        assert!(line.starts_with("epoch 0 step 2 loss 0.7500"), "{line}");
        assert!(line.ends_with("ETA 0:00:02"), "2 updates of 16 images at 16 img/s: {line}");
        let mut skipping = step.clone();
        if let MetricsRecord::Step { skipped_updates, .. } = &mut skipping {
            *skipped_updates = 1;
        }
        let line = j.record_metrics(1, &skipping).unwrap().line.unwrap();
        assert!(
            line.ends_with("ETA 0:00:02, 1 update(s) skipped (non-finite gradients)"),
            "{line}"
        );
        let mut waiting = step.clone();
        if let MetricsRecord::Step { input_wait_share, .. } = &mut waiting {
            *input_wait_share = Some(0.4);
        }
        let line = j.record_metrics(1, &waiting).unwrap().line.unwrap();
        assert!(line.ends_with("ETA 0:00:02, waiting for input 40% of the time"), "{line}");
        assert_eq!(j.progress, (0, 2, 16.0));
        // A straggler is named with its host once it passes the recipe's
        // ratio (1.5 by default); a balanced window says nothing more.
        for (slowest_s, named) in [(0.4, true), (0.29, false)] {
            let mut balanced = step.clone();
            if let MetricsRecord::Step { rank_balance, .. } = &mut balanced {
                *rank_balance = Some(RankBalance {
                    slowest_rank: 1,
                    slowest_s,
                    slowest_input_wait_s: 0.05,
                    others_median_s: 0.2,
                });
            }
            let line = j.record_metrics(1, &balanced).unwrap().line.unwrap();
            assert_eq!(
                line.ends_with(
                    "ETA 0:00:02; straggler: rank 1 on a took 2.0x the other ranks' median time \
                     per update (0.400 s against 0.200 s, 0.050 s of it waiting for its input)"
                ),
                named,
                "{line}"
            );
            assert!(line.ends_with("ETA 0:00:02") != named, "{line}");
        }
        let checksum = MetricsRecord::Checksum { rank: 0, step: 2, sum: 1.0, sum_of_squares: 2.0 };
        assert_eq!(j.record_metrics(1, &checksum).unwrap().line, None);
        // An epoch whose evaluation left unreadable images out says so.
        let mut sets = BTreeMap::new();
        let real = EvalSetAccuracy { top1: 90.0, top5: 99.0, count: 7, excluded: 1, skipped: 2 };
        sets.insert("real".to_string(), real);
        let epoch = MetricsRecord::Epoch {
            epoch: 0,
            step: 2,
            lr: 1e-3,
            loss: 0.5,
            images_per_sec: 16.0,
            top1: Some(75.0),
            top5: Some(100.0),
            val_loss: Some(0.7),
            replaced_samples: 0,
            elapsed_s: 3.0,
            eval_sets: sets,
            skipped_updates: 0,
            val_skipped_images: Some(1),
        };
        let line = j.record_metrics(1, &epoch).unwrap().line.unwrap();
        assert!(
            line.ends_with("evaluation images unreadable and left out: 1 in val, 2 in real"),
            "{line}"
        );
        // A fabric probe: its summary, and a link 3x (the default) below the
        // others' median named with the hosts at both ends.
        let link = |from_rank, to_rank, gb_per_s| LinkSpeed { from_rank, to_rank, gb_per_s };
        let probe = FabricProbe {
            epoch: 0,
            step: 0,
            world_size: 2,
            probe_bytes: 1 << 20,
            all_reduce_s: 0.01,
            bus_gb_per_s: 0.105,
            links: vec![link(1, 0, 1.0), link(0, 1, 0.1)],
        };
        let line =
            j.record_metrics(1, &MetricsRecord::Fabric(probe.clone())).unwrap().line.unwrap();
        assert_eq!(
            line,
            format!(
                "fabric: {}; slow link: the link from rank 0 on a to rank 1 on a carried 0.100 \
                 GB/s, 1/10.0 of the other links' median 1.00 GB/s; every all-reduce runs at its \
                 pace (distributed.slow_link_warn_ratio 3)",
                probe.summary()
            )
        );
        let even = FabricProbe { links: vec![link(1, 0, 1.0), link(0, 1, 0.5)], ..probe };
        let line = j.record_metrics(1, &MetricsRecord::Fabric(even.clone())).unwrap().line.unwrap();
        assert_eq!(line, format!("fabric: {}", even.summary()));
        assert!(j.record_metrics(9, &step).is_err(), "stale generation accepted");
        let lines = records(&j);
        let kinds: Vec<&str> = lines.iter().map(|l| l["kind"].as_str().unwrap()).collect();
        // The coordinator's own record of the job's start comes first.
        assert_eq!(
            kinds,
            [
                "generation",
                "loading",
                "first_update",
                "step",
                "step",
                "step",
                "step",
                "step",
                "checksum",
                "epoch",
                "fabric",
                "fabric"
            ]
        );
        assert_eq!(lines[9]["val_skipped_images"], 1);
        assert_eq!(lines[10]["links"][1]["gb_per_s"], 0.1);
        assert_eq!(lines[0]["world_size"], 2);
        assert_eq!(lines[3]["loss"], 0.75);
        assert_eq!(lines[3]["total_updates"], 4);
        assert_eq!(lines[3]["input_wait_share"], 0.01);
        assert!(lines[3].get("rank_balance").is_none(), "no balance, no key");
        assert_eq!(lines[5]["input_wait_share"], 0.4);
        assert_eq!(lines[6]["rank_balance"]["slowest_rank"], 1);
        assert_eq!(lines[2]["elapsed_s"], 12.34);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The steps of the step records in the job's `metrics.jsonl`, as they
    /// are on disk now (nothing flushed first).
    fn steps_on_disk(j: &Job) -> Vec<u64> {
        let text = std::fs::read_to_string(j.out_dir.join("metrics.jsonl")).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|r| r["kind"] == "step")
            .map(|r| r["step"].as_u64().unwrap())
            .collect()
    }

    /// Runs `f` on a thread; fails the test if it has not returned within
    /// `limit` (the thread is left behind, never waited for).
    fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(f()));
        rx.recv_timeout(limit).expect("still blocked past the deadline")
    }

    #[test]
    fn metrics_reach_the_file_only_when_flushed_and_in_the_order_they_were_accepted() {
        let mut j = job(1);
        join(&mut j, "a", 1).unwrap();
        j.record_metrics(1, &step(1)).unwrap();
        j.record_metrics(1, &step(2)).unwrap();
        // Accepted (as under the coordinator's lock): queued, not written.
        assert!(!j.out_dir.join("metrics.jsonl").exists(), "written before a flush");
        assert!(j.metrics_to_write().is_some());
        assert_eq!(j.flush_metrics(), 0);
        assert!(j.metrics_to_write().is_none(), "records left after a flush");
        let kinds: Vec<serde_json::Value> = records(&j).iter().map(|r| r["kind"].clone()).collect();
        assert_eq!(kinds, ["generation", "step", "step"]);
        assert_eq!(steps_on_disk(&j), [1, 2]);

        // A write stalled on the disk holds the log's lock: records accepted
        // meanwhile wait, a call that finds the log busy does not wait for
        // it, and two calls that do wait write in the order of acceptance.
        let sink = Arc::clone(j.metrics_sink().unwrap());
        let stall = sink.stall();
        j.record_metrics(1, &step(3)).unwrap();
        let busy = Arc::clone(&sink);
        assert_eq!(within(Duration::from_secs(1), move || busy.write_pending()), 0);
        let first = std::thread::spawn({
            let sink = Arc::clone(&sink);
            move || sink.flush()
        });
        j.record_metrics(1, &step(4)).unwrap();
        j.record_metrics(1, &step(5)).unwrap();
        let second = std::thread::spawn({
            let sink = Arc::clone(&sink);
            move || sink.flush()
        });
        j.record_metrics(1, &step(6)).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(steps_on_disk(&j), [1, 2], "written while the log was held");
        drop(stall);
        assert_eq!(first.join().unwrap() + second.join().unwrap(), 0);
        assert_eq!(steps_on_disk(&j), [1, 2, 3, 4, 5, 6]);
        // A call that found the log busy left its record to the writer at
        // work, which writes it as it lets go of the log.
        let stall = sink.stall();
        j.record_metrics(1, &step(7)).unwrap();
        let busy = Arc::clone(&sink);
        assert_eq!(within(Duration::from_secs(1), move || busy.write_pending()), 0);
        assert_eq!(steps_on_disk(&j), [1, 2, 3, 4, 5, 6]);
        drop(stall);
        assert_eq!(steps_on_disk(&j), [1, 2, 3, 4, 5, 6, 7], "a record was left behind");

        // Many callers: each accepts a record under one lock (as the
        // coordinator's), then writes outside it, some waiting for the
        // write in progress, some not, some through their receipt.
        const CALLERS: u64 = 4;
        const EACH: u64 = 150;
        let shared = Arc::new(Mutex::new((j, 7)));
        let callers: Vec<_> = (0..CALLERS)
            .map(|caller| {
                let shared = Arc::clone(&shared);
                std::thread::spawn(move || {
                    for i in 0..EACH {
                        let receipt = {
                            let mut guard = shared.lock().unwrap();
                            let (j, last) = &mut *guard;
                            *last += 1;
                            j.record_metrics(1, &step(*last)).unwrap().receipt
                        };
                        match (caller + i) % 3 {
                            0 => drop(sink_of(&receipt).write_pending()),
                            1 => drop(sink_of(&receipt).flush()),
                            _ => receipt.written(Duration::from_secs(30)).unwrap(),
                        }
                    }
                })
            })
            .collect();
        for caller in callers {
            caller.join().unwrap();
        }
        let (j, last) = &*shared.lock().unwrap();
        assert_eq!(*last, 7 + CALLERS * EACH);
        assert!(j.metrics_to_write().is_none(), "a record was left behind");
        let expected: Vec<u64> = (1..=*last).collect();
        assert_eq!(steps_on_disk(j), expected, "records out of the order of acceptance");
    }

    fn sink_of(receipt: &MetricsReceipt) -> &MetricsSink {
        &receipt.sink
    }

    #[test]
    fn a_record_that_cannot_be_written_is_reported_to_its_receipt_alone() {
        let mut j = job(1);
        // A folder where the file should be: every write fails.
        std::fs::create_dir(j.out_dir.join("metrics.jsonl")).unwrap();
        join(&mut j, "a", 1).unwrap();
        let lost = j.record_metrics(1, &step(1)).unwrap().receipt;
        let e = lost.written(Duration::from_secs(30)).unwrap_err();
        assert!(matches!(&e, JobError::Precondition(m) if m.contains("metrics.jsonl")), "{e:?}");
        // Once the file can be written, the next record is, and is not
        // blamed for the earlier failures (the generation record's, too).
        std::fs::remove_dir(j.out_dir.join("metrics.jsonl")).unwrap();
        j.record_metrics(1, &step(2)).unwrap().receipt.written(Duration::from_secs(30)).unwrap();
        assert_eq!(steps_on_disk(&j), [2]);
    }

    #[test]
    fn a_receipt_stops_waiting_for_a_stalled_write_at_its_deadline() {
        let mut j = job(1);
        join(&mut j, "a", 1).unwrap();
        j.flush_metrics();
        let sink = Arc::clone(j.metrics_sink().unwrap());
        let stall = sink.stall();
        let receipt = j.record_metrics(1, &step(1)).unwrap().receipt;
        let started = Instant::now();
        let e = receipt.written(Duration::from_millis(200)).unwrap_err();
        let waited = started.elapsed();
        assert!(matches!(&e, JobError::Unavailable(m) if m.contains("metrics.jsonl")), "{e:?}");
        assert!(waited >= Duration::from_millis(200), "gave up early: {waited:?}");
        assert!(waited < Duration::from_secs(2), "waited {waited:?}");
        // The record stays queued, and the stalled writer writes it once free.
        assert!(sink.has_pending());
        drop(stall);
        assert!(!sink.has_pending());
        assert_eq!(steps_on_disk(&j), [1]);
    }
}
