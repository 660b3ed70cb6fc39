//! The gRPC service over the coordinator's jobs ([`Coordination`]: the job
//! of `up`, or a sweep's): wire types are converted to domain
//! values at the edge (a malformed request is answered `INVALID_ARGUMENT`
//! naming the field), job errors map onto statuses in one place, and the
//! calls that wait (assignment, rendezvous) long-poll on the job's change
//! notifications.
//!
//! Nothing is written to disk while the state's lock is held: the states
//! to save and the metrics records to append are taken under it and written
//! once it is released ([`Shared::update`]). The metrics records, which
//! come with every logged update, are appended on the runtime's blocking
//! pool, and a `ReportMetrics` call waits for its own with a deadline, so a
//! slow disk under `metrics.jsonl` holds up no other call. (A state save,
//! rarer, is written by the call that made it.)
//!
//! Every call passes [`TokenCheck`] first: without the job token it is
//! answered `UNAUTHENTICATED` before its message is decoded. Calls after
//! `Join` also authenticate the calling member ([`Job::authenticate`]),
//! are routed to that member's job, and may act only for that member's own
//! ranks. [`serve`] runs the service with
//! bounded message sizes and concurrency.

use crate::job::{
    DeviceKind, FailureCause, Job, JobError, MetricsSink, PendingSave, Phase, RankShare,
    RendezvousPayload,
};
use crate::state::Coordination;
use crate::sweep::{Placement, RunState};
use rsb_job::MetricsRecord;
use rsb_proto::auth::{presented_member, presents_token, Secret};
use rsb_proto::v1 as pb;
use rsb_proto::v1::coordinator_server::{Coordinator, CoordinatorServer};
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use tokio::runtime::RuntimeFlavor;
use tokio::sync::Notify;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::{Request, Response, Status};
use tower::layer::util::{Identity, Stack};
use tower::limit::GlobalConcurrencyLimitLayer;

/// Longest host name, member id, job id, ring address or evaluation-set name.
pub const MAX_NAME_LEN: usize = 255;
/// Longest checkpoint path.
pub const MAX_PATH_LEN: usize = 4096;
/// Longest `Leave` message (workers cut longer ones).
pub const MAX_MESSAGE_LEN: usize = 16 * 1024;
/// Most evaluation sets in one epoch record: the most a recipe may list.
pub const MAX_EVAL_SETS: usize = rsb_recipes::MAX_EVAL_SETS;
/// Most ranks one host may bring.
pub const MAX_LOCAL_RANKS: u32 = 1024;
/// Largest request message accepted (the default of tonic is 4 MiB).
pub const MAX_REQUEST_BYTES: usize = 256 * 1024;
/// Calls served at once over one connection.
pub const MAX_CALLS_PER_CONNECTION: usize = 64;
/// Calls served at once in all (the waiting calls of every rank included).
pub const MAX_CALLS: usize = 4096;

/// The shared state plus its change notification.
#[derive(Debug, Clone)]
pub struct Shared {
    /// The jobs.
    pub state: Arc<Mutex<Coordination>>,
    /// Woken on every state change.
    pub changed: Arc<Notify>,
    /// The newest state version written, per state file. Held while a state
    /// is written (never together with `state`), so writes are in order.
    written: Arc<Mutex<HashMap<PathBuf, u64>>>,
    /// Held while a sweep's run files are written (never together with
    /// `state`).
    run_files_written: Arc<Mutex<()>>,
    /// Passes that took run files under `state` and have not yet written
    /// them or queued the failed ones again (see
    /// [`Shared::write_remaining_run_files`]).
    run_file_passes: Arc<(Mutex<usize>, Condvar)>,
}

/// A sweep's run files taken from the queue by one pass: counted in flight
/// (see [`Shared::write_remaining_run_files`]) until dropped.
struct RunFilePass {
    files: Vec<crate::sweep::RunFile>,
    /// The in-flight count it is counted in, when it took any file.
    passes: Option<Arc<(Mutex<usize>, Condvar)>>,
}

impl Drop for RunFilePass {
    fn drop(&mut self) {
        if let Some(passes) = &self.passes {
            let mut count = passes.0.lock().unwrap_or_else(|p| p.into_inner());
            *count = count.saturating_sub(1);
            passes.1.notify_all();
        }
    }
}

/// How long a coordinator about to exit waits for a sweep's last run files.
pub const RUN_FILES_EXIT_DEADLINE: Duration = Duration::from_secs(10);

impl Shared {
    /// Wraps the state.
    pub fn new(state: Coordination) -> Shared {
        Shared {
            state: Arc::new(Mutex::new(state)),
            changed: Arc::new(Notify::new()),
            written: Arc::default(),
            run_files_written: Arc::default(),
            run_file_passes: Arc::default(),
        }
    }

    /// Runs `f` on the state, writes what a restart needs, wakes waiters,
    /// and appends the metrics records `f` queued. The writes happen after
    /// the state's lock is released. The state is on disk before this
    /// returns, so a call is answered only once what it changed is; the
    /// metrics records are written on the runtime's blocking pool (see
    /// `write_metrics`; `ReportMetrics` waits for its own record).
    pub fn update<T>(&self, f: impl FnOnce(&mut Coordination) -> T) -> T {
        let out = self.with_state(f);
        self.changed.notify_waiters();
        out
    }

    /// [`Shared::update`] on the runtime's blocking pool, for a task that
    /// must go on hearing `stop` (the coordinator's main task and its stop
    /// signals): a state write that hangs (a hung file system) holds up the
    /// update, not the task. `Err` with what `stop` gave when it came
    /// first; the update then goes on in the background, and its write is
    /// bounded only by the disk. A panic in `f` is the caller's.
    pub async fn update_unless<T, S>(
        &self,
        stop: impl std::future::Future<Output = S>,
        f: impl FnOnce(&mut Coordination) -> T + Send + 'static,
    ) -> Result<T, S>
    where
        T: Send + 'static,
    {
        let shared = self.clone();
        let update = tokio::task::spawn_blocking(move || shared.update(f));
        tokio::select! {
            done = update => match done {
                Ok(out) => Ok(out),
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            },
            stopped = stop => Err(stopped),
        }
    }

    /// [`Shared::update`] on the runtime's blocking pool, waited for at most
    /// `limit`: `None` when its write of the state had not returned by then
    /// (the change itself is made in memory first, under the lock).
    pub async fn update_within<T>(
        &self,
        limit: Duration,
        f: impl FnOnce(&mut Coordination) -> T + Send + 'static,
    ) -> Option<T>
    where
        T: Send + 'static,
    {
        self.update_unless(tokio::time::sleep(limit), f).await.ok()
    }

    /// Runs `f` on the state under its lock; once the lock is released,
    /// writes the states a restart needs (before this returns) and starts
    /// the appends of the metrics records queued (`write_metrics`).
    fn with_state<T>(&self, f: impl FnOnce(&mut Coordination) -> T) -> T {
        let (out, pending, run_files, metrics) = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let out = f(&mut state);
            let run_files = self.take_run_files(&mut state);
            (out, state.states_to_save(), run_files, state.metrics_to_write())
        };
        self.write_states(pending);
        self.write_run_files(run_files);
        write_metrics(metrics);
        out
    }

    /// The sweep's queued run files, taken under the state's lock: a pass
    /// that takes any counts as in flight until its [`RunFilePass`] is
    /// dropped, once [`Shared::write_run_files`] has written them or queued
    /// the failed ones again (or, should anything between panic, at once).
    fn take_run_files(&self, state: &mut Coordination) -> RunFilePass {
        let files = state.run_files_to_write();
        let passes = (!files.is_empty()).then(|| {
            *self.run_file_passes.0.lock().unwrap_or_else(|p| p.into_inner()) += 1;
            Arc::clone(&self.run_file_passes)
        });
        RunFilePass { files, passes }
    }

    /// The paths of the run files still queued (left queued).
    fn queued_run_file_paths(&self) -> Vec<String> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.queued_run_file_paths().iter().map(|p| p.display().to_string()).collect()
    }

    /// Writes the sweep's run files still queued, after the passes in
    /// flight (whose failed files are queued again first): at the end of a
    /// sweep, so that none is lost when the coordinator exits. Waits about
    /// [`RUN_FILES_EXIT_DEADLINE`] at most (a file system that hangs must
    /// not keep the coordinator from exiting); what is not written by then,
    /// or cannot be, is logged with its path.
    pub async fn write_remaining_run_files(&self) {
        if let Err(unwritten) = self.write_remaining_run_files_within(RUN_FILES_EXIT_DEADLINE).await
        {
            tracing::error!(
                "run file(s) not written when the coordinator exits: {}",
                unwritten.join(", ")
            );
        }
    }

    /// [`Shared::write_remaining_run_files`] waiting `wait` for the passes
    /// in flight, and 2 s more for its own writes: the paths not written,
    /// if any.
    async fn write_remaining_run_files_within(&self, wait: Duration) -> Result<(), Vec<String>> {
        const OWN_WRITES: Duration = Duration::from_secs(2);
        let shared = self.clone();
        let deadline = std::time::Instant::now() + wait;
        let flush =
            tokio::task::spawn_blocking(move || shared.write_remaining_run_files_by(deadline));
        match tokio::time::timeout(wait + OWN_WRITES, flush).await {
            Ok(Ok(written)) => written,
            // Still writing (a write that hangs), or the writer panicked:
            // what is known to be left, and the rest.
            Ok(Err(_)) | Err(_) => {
                let mut paths = self.queued_run_file_paths();
                paths.push(format!(
                    "and any file still being written after {} s",
                    (wait + OWN_WRITES).as_secs_f64()
                ));
                Err(paths)
            }
        }
    }

    /// [`Shared::write_remaining_run_files`] on this thread, waiting for
    /// the passes in flight until `deadline`: the paths not written, if any.
    fn write_remaining_run_files_by(
        &self,
        deadline: std::time::Instant,
    ) -> Result<(), Vec<String>> {
        let (passes, done) = &*self.run_file_passes;
        let mut in_flight = passes.lock().unwrap_or_else(|p| p.into_inner());
        while *in_flight > 0 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            in_flight = done.wait_timeout(in_flight, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        let still_writing = *in_flight > 0;
        drop(in_flight);
        let files = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            self.take_run_files(&mut state)
        };
        self.write_run_files(files);
        let mut unwritten = self.queued_run_file_paths();
        if still_writing {
            unwritten.push("and those another call was still writing".into());
        }
        if unwritten.is_empty() {
            Ok(())
        } else {
            Err(unwritten)
        }
    }

    /// Writes a sweep's run files taken under the lock, as
    /// [`Shared::write_states`] writes states: before the call returns, off
    /// the runtime's worker, one writer at a time. A file that cannot be
    /// written is logged once and tried again at the next pass.
    fn write_run_files(&self, mut pass: RunFilePass) {
        let files = std::mem::take(&mut pass.files);
        if files.is_empty() {
            return;
        }
        let write = || {
            let _one_writer = self.run_files_written.lock().unwrap_or_else(|p| p.into_inner());
            let mut failed = Vec::new();
            for mut file in files {
                if let Err(e) = file.write() {
                    if file.failures == 0 {
                        tracing::error!(
                            "cannot write {} (tried again at each pass): {e}",
                            file.path.display()
                        );
                    }
                    file.failures += 1;
                    failed.push(file);
                }
            }
            failed
        };
        let failed = match tokio::runtime::Handle::try_current() {
            Ok(runtime) if runtime.runtime_flavor() == RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(write)
            }
            _ => write(),
        };
        if !failed.is_empty() {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(sweep) = &mut state.sweep {
                sweep.write_again(failed);
            }
        }
    }

    /// Writes states taken under the lock, skipping any older than one
    /// already written; a state that cannot be written is logged (the job
    /// goes on; only a restart of the coordinator would miss it) and handed
    /// out again to the next [`Shared::update`] or [`Shared::wait_for`] pass.
    fn write_states(&self, pending: Vec<(usize, PendingSave)>) {
        if pending.is_empty() {
            return;
        }
        // Each save writes and syncs a file, which a slow disk holds up: the
        // call that made the change waits for it (its answer must not come
        // before its state is on disk), but on a worker of the runtime it
        // first hands that worker's other tasks to another thread, so that
        // no other call waits behind the disk.
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) if runtime.runtime_flavor() == RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| self.write_states_now(pending))
            }
            _ => self.write_states_now(pending),
        }
    }

    /// [`Shared::write_states`] on this thread.
    fn write_states_now(&self, pending: Vec<(usize, PendingSave)>) {
        let mut failed = Vec::new();
        {
            let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
            for (job, save) in pending {
                if written.get(&save.file).is_some_and(|&newest| newest >= save.version) {
                    continue;
                }
                match save.write() {
                    Ok(()) => {
                        written.insert(save.file, save.version);
                    }
                    Err(e) => {
                        tracing::error!("cannot save the job's state for a restart: {e}");
                        failed.push((job, save.version));
                    }
                }
            }
        }
        if !failed.is_empty() {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            for (job, version) in failed {
                state.jobs[job].save_failed(version);
            }
        }
    }

    /// Runs `f` on job `index` and wakes waiters.
    fn update_job<T>(&self, index: usize, f: impl FnOnce(&mut Job) -> T) -> T {
        self.update(|state| f(&mut state.jobs[index]))
    }

    /// The job and id of the member whose credentials `request` presents,
    /// for the call `rpc` (a refusal is logged, without the credentials).
    fn caller<T>(&self, rpc: &str, request: &Request<T>) -> Result<(usize, String), Status> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match state.authenticate(presented_member(request.metadata())) {
            Ok((job, member)) => Ok((job, member.id.clone())),
            Err(e) => {
                tracing::warn!(rpc, peer = ?crate::incoming::remote_addr(request), "refused: {e}");
                Err(status(e))
            }
        }
    }

    /// Waits until `ready` returns `Some` for job `index`, re-checking on
    /// every change (and at least every second, so liveness failures are seen).
    async fn wait_for<T>(
        &self,
        index: usize,
        mut ready: impl FnMut(&mut Job) -> Result<Option<T>, JobError>,
    ) -> Result<T, Status> {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let outcome = self.with_state(|state| {
                state.check_liveness();
                ready(&mut state.jobs[index])
            });
            match outcome {
                Ok(Some(v)) => return Ok(v),
                Ok(None) => {
                    let _ = tokio::time::timeout(Duration::from_secs(1), notified).await;
                }
                Err(e) => return Err(status(e)),
            }
        }
    }
}

/// Appends the metrics records of the sinks taken under the state's lock
/// (see [`Coordination::metrics_to_write`]), once it is released; a record
/// that cannot be written is logged by its sink. A sink another call is
/// writing is left to that call: no call waits for another's write. Within
/// a runtime the writes run on its blocking pool, so that a stalled disk
/// never holds one of the threads that answer calls (a record's own call
/// waits for it through its receipt, with a deadline).
fn write_metrics(sinks: Vec<Arc<MetricsSink>>) {
    if sinks.is_empty() {
        return;
    }
    let write = move || {
        for sink in sinks {
            sink.write_pending();
        }
    };
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => drop(runtime.spawn_blocking(write)),
        Err(_) => write(),
    }
}

/// The longest a `ReportMetrics` call waits for its record to be written
/// behind another write (a slow disk): within the rank's own deadline for
/// the call.
const METRICS_WRITE_DEADLINE: Duration = Duration::from_secs(4);

/// The job-token check in front of every RPC (a tonic interceptor): the
/// `x-rsb-job-token` metadata must hold the token, compared in constant
/// time. A call that presents it vouches for its connection
/// ([`crate::incoming::ConnectionInfo::vouch`]). Refusals are logged (the
/// first ten, then every thousandth), never with what was presented.
#[derive(Debug, Clone)]
pub struct TokenCheck {
    token: Arc<Secret>,
    refused: Arc<AtomicU64>,
}

impl TokenCheck {
    /// Checks calls against `token`.
    pub fn new(token: Secret) -> TokenCheck {
        TokenCheck { token: Arc::new(token), refused: Arc::new(AtomicU64::new(0)) }
    }
}

impl Interceptor for TokenCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        if presents_token(request.metadata(), &self.token) {
            // The connection is a member's (or `status`'s): it is held
            // past the deadline strangers' connections are closed at.
            if let Some(connection) = crate::incoming::ConnectionInfo::of(&request) {
                connection.vouch();
            }
            return Ok(request);
        }
        let refused = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        if refused <= 10 || refused.is_multiple_of(1000) {
            tracing::warn!(
                peer = ?crate::incoming::remote_addr(&request),
                refused,
                "refused a call without the job token"
            );
        }
        Err(Status::unauthenticated(
            "this coordinator requires the job token in the x-rsb-job-token metadata \
             (workers read it from --token-file or RSB_JOB_TOKEN)",
        ))
    }
}

/// The service as served: [`TokenCheck`] in front, requests of at most
/// [`MAX_REQUEST_BYTES`].
pub fn service(
    shared: Shared,
    token: Secret,
) -> InterceptedService<CoordinatorServer<Shared>, TokenCheck> {
    let server = CoordinatorServer::new(shared).max_decoding_message_size(MAX_REQUEST_BYTES);
    InterceptedService::new(server, TokenCheck::new(token))
}

/// How long a peer may take over its TLS handshake before its connection
/// is closed: one that opens a connection and says nothing holds nothing.
pub const TLS_HANDSHAKE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a connection may be idle before the coordinator pings its peer
/// (an HTTP/2 PING), and how long it then waits for the answer before it
/// closes the connection: one whose host died (power lost, a spot node
/// reclaimed, a reboot) sends no FIN, and a connection that had presented
/// the token is never closed for its silence nor evicted, so, without the
/// ping, each such death kept its connections' slots for good, until the
/// host's address (or the coordinator) had none left.
pub const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
/// See [`KEEPALIVE_INTERVAL`].
pub const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A tonic server with the limits of [`server`].
pub type LimitedServer = tonic::transport::Server<Stack<GlobalConcurrencyLimitLayer, Identity>>;

/// The server [`serve`] runs: at most [`MAX_CALLS_PER_CONNECTION`] calls
/// per connection and [`MAX_CALLS`] in all, each connection's silent peer
/// pinged ([`KEEPALIVE_INTERVAL`]); over TLS (rustls) when `tls`
/// gives the certificate and key, with a handshake of at most
/// [`TLS_HANDSHAKE_DEADLINE`]. The certificate and key are checked here,
/// so that ones that do not parse are an error before the coordinator says
/// it listens, not a server that never does.
pub fn server(
    tls: Option<tonic::transport::Identity>,
) -> Result<LimitedServer, tonic::transport::Error> {
    let mut builder = tonic::transport::Server::builder();
    if let Some(identity) = tls {
        builder = builder.tls_config(
            tonic::transport::ServerTlsConfig::new()
                .identity(identity)
                .timeout(TLS_HANDSHAKE_DEADLINE),
        )?;
    }
    Ok(builder
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        // What a peer may send ahead of the coordinator's reading: a
        // request's worth per call, two per connection (hyper's default, a
        // mebibyte each, let strangers park hundreds of them).
        .initial_stream_window_size(MAX_REQUEST_BYTES as u32)
        .initial_connection_window_size(2 * MAX_REQUEST_BYTES as u32)
        .concurrency_limit_per_connection(MAX_CALLS_PER_CONNECTION)
        .max_concurrent_streams(MAX_CALLS_PER_CONNECTION as u32)
        .layer(GlobalConcurrencyLimitLayer::new(MAX_CALLS)))
}

/// What a `GetAssignment` of local rank `local_rank` of `member` is
/// answered now: its share of the running generation (noted as fetched),
/// that the job finished before the rank had one (told so, not refused:
/// the rank exits successfully), or `None` to wait on.
fn assignment_answer(
    job: &mut Job,
    member: &str,
    local_rank: u32,
) -> Result<Option<pb::Assignment>, JobError> {
    let assigned = match job.assignment(member, local_rank)? {
        RankShare::Wait => return Ok(None),
        RankShare::JobFinished => {
            return Ok(Some(pb::Assignment {
                job_id: job.id.clone(),
                generation: job.generation,
                local_rank,
                job_finished: true,
                ..pb::Assignment::default()
            }))
        }
        RankShare::Assigned(assigned) => assigned,
    };
    job.note_assigned(member, local_rank);
    Ok(Some(pb::Assignment {
        job_id: job.id.clone(),
        generation: job.generation,
        global_rank: assigned.global_rank,
        world_size: assigned.world_size,
        local_rank,
        micro_batch: assigned.plan.micro_size,
        accumulation_steps: assigned.plan.accumulation,
        recipe_yaml: job.recipe_yaml.clone(),
        run_dir: job.out_dir.display().to_string(),
        resume_from: job.resume_from.clone().unwrap_or_default(),
        job_finished: false,
    }))
}

/// Serves [`service`] with `server` (from [`server`]) on `listener` until
/// `shutdown` completes, taking connections as [`crate::incoming`] says.
pub async fn serve(
    mut server: LimitedServer,
    shared: Shared,
    token: Secret,
    listener: tokio::net::TcpListener,
    limits: crate::incoming::Limits,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let incoming = crate::incoming::Incoming::with_limits(listener, limits);
    server
        .add_service(service(shared, token))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// The one mapping of job errors onto gRPC statuses.
fn status(e: JobError) -> Status {
    match e {
        JobError::NotFound(m) => Status::not_found(m),
        JobError::Invalid(m) => Status::invalid_argument(m),
        JobError::Precondition(m) => Status::failed_precondition(m),
        JobError::Unauthenticated(m) => Status::unauthenticated(m),
        JobError::Denied(m) => Status::permission_denied(m),
        JobError::Unavailable(m) => Status::unavailable(m),
    }
}

/// `value` of the field `field`: at most `max` bytes, no control characters.
fn bounded(field: &str, value: &str, max: usize) -> Result<(), Status> {
    if value.len() > max {
        return Err(Status::invalid_argument(format!(
            "`{field}` is {} bytes long; at most {max} are accepted",
            value.len()
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(Status::invalid_argument(format!("`{field}` holds a control character")));
    }
    Ok(())
}

/// `text` as one printable line of at most `max` bytes: control
/// characters and Unicode's line and paragraph separators become spaces,
/// and the rest is cut at a character boundary.
fn one_line(text: &str, max: usize) -> String {
    let mut line = String::with_capacity(text.len().min(max));
    for c in text.chars() {
        if line.len() + c.len_utf8() > max {
            break;
        }
        let breaks_a_line = c.is_control() || matches!(c, '\u{2028}' | '\u{2029}');
        line.push(if breaks_a_line { ' ' } else { c });
    }
    line
}

/// Like [`bounded`], and not empty.
fn required(field: &str, value: &str, max: usize) -> Result<(), Status> {
    if value.trim().is_empty() {
        return Err(Status::invalid_argument(format!("`{field}` is required")));
    }
    bounded(field, value, max)
}

/// A `member_id` field names the calling member (or is left empty).
fn own_member(field: &str, value: &str, caller: &str) -> Result<(), Status> {
    bounded(field, value, MAX_NAME_LEN)?;
    if !value.is_empty() && value != caller {
        return Err(Status::permission_denied(format!(
            "`{field}` {value} is not the calling member ({caller})"
        )));
    }
    Ok(())
}

/// A `job_id` field names this job.
fn this_job(job: &Job, job_id: &str) -> Result<(), JobError> {
    if job.id != job_id {
        return Err(JobError::NotFound(format!("`job_id`: unknown job `{job_id}`")));
    }
    Ok(())
}

/// A validated join request.
struct Join {
    host: String,
    kind: DeviceKind,
    local_ranks: u32,
    advertise: Option<IpAddr>,
}

impl TryFrom<pb::JoinRequest> for Join {
    type Error = Status;

    fn try_from(r: pb::JoinRequest) -> Result<Join, Status> {
        required("host_name", &r.host_name, MAX_NAME_LEN)?;
        if r.host_name.chars().any(char::is_whitespace) {
            return Err(Status::invalid_argument("`host_name` holds white space"));
        }
        // It names the member in the metadata of every call the member
        // makes, which carries visible ASCII only.
        if !r.host_name.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Status::invalid_argument(format!(
                "`host_name` {:?} is not visible ASCII (a DNS name or an address)",
                r.host_name
            )));
        }
        let kind = match pb::DeviceKind::try_from(r.device_kind) {
            Ok(pb::DeviceKind::Cpu) => DeviceKind::Cpu,
            Ok(pb::DeviceKind::Cuda) => DeviceKind::Cuda,
            _ => {
                return Err(Status::invalid_argument(format!(
                    "`device_kind` {} is not CPU or CUDA",
                    r.device_kind
                )))
            }
        };
        if r.local_ranks == 0 || r.local_ranks > MAX_LOCAL_RANKS {
            return Err(Status::invalid_argument(format!(
                "`local_ranks` {} is not in 1..={MAX_LOCAL_RANKS}",
                r.local_ranks
            )));
        }
        bounded("advertise_address", &r.advertise_address, MAX_NAME_LEN)?;
        let advertise = if r.advertise_address.is_empty() {
            None
        } else {
            Some(r.advertise_address.parse::<IpAddr>().map_err(|_| {
                Status::invalid_argument(format!(
                    "`advertise_address` `{}` is not an IP address",
                    r.advertise_address
                ))
            })?)
        };
        Ok(Join { host: r.host_name, kind, local_ranks: r.local_ranks, advertise })
    }
}

fn payload(r: &pb::RendezvousRequest) -> Result<Option<RendezvousPayload>, Status> {
    Ok(match &r.payload {
        None => None,
        Some(pb::rendezvous_request::Payload::NcclUniqueId(id)) => {
            if id.len() != 128 {
                return Err(Status::invalid_argument(format!(
                    "`nccl_unique_id` has {} bytes, expected 128",
                    id.len()
                )));
            }
            Some(RendezvousPayload::NcclId(id.clone()))
        }
        Some(pb::rendezvous_request::Payload::RingAddress(a)) => {
            required("ring_address", a, MAX_NAME_LEN)?;
            if a.parse::<std::net::SocketAddr>().is_err() {
                return Err(Status::invalid_argument(format!(
                    "`ring_address` `{a}` is not an ip:port address"
                )));
            }
            Some(RendezvousPayload::RingAddress(a.clone()))
        }
    })
}

/// A metrics record, with its strings bounded.
fn record(r: Option<pb::metrics_report::Record>) -> Result<MetricsRecord, Status> {
    let mut r = r.ok_or_else(|| Status::invalid_argument("`record` is required"))?;
    if let pb::metrics_report::Record::GenerationStart(_) = &r {
        return Err(Status::invalid_argument(
            "`record.generation_start`: generation records are written by the coordinator",
        ));
    }
    if let pb::metrics_report::Record::Epoch(e) = &r {
        if e.eval_sets.len() > MAX_EVAL_SETS {
            return Err(Status::invalid_argument(format!(
                "`record.epoch.eval_sets` has {} entries; at most {MAX_EVAL_SETS} are accepted",
                e.eval_sets.len()
            )));
        }
        for set in &e.eval_sets {
            required("record.epoch.eval_sets.name", &set.name, rsb_recipes::MAX_EVAL_SET_NAME_LEN)?;
        }
    }
    // An optional number that is not finite is recorded as absent, as the
    // report reads the `null` JSON would make of it: a validation loss that
    // overflowed (fp16) while the accuracies it came with are sound.
    if let pb::metrics_report::Record::Epoch(e) = &mut r {
        if let Some(v) = e.val_loss.filter(|v| !v.is_finite()) {
            tracing::warn!(epoch = e.epoch, "a validation loss of {v} is recorded as absent");
            e.val_loss = None;
        }
    }
    if let pb::metrics_report::Record::Step(s) = &mut r {
        s.peak_gpu_memory_mib = s.peak_gpu_memory_mib.filter(|v| v.is_finite());
        s.input_wait_share = s.input_wait_share.filter(|v| v.is_finite());
    }
    if let Some((field, value)) = numbers(&r).into_iter().find(|(_, v)| !v.is_finite()) {
        return Err(Status::invalid_argument(format!(
            "`record.{field}` is {value}: metrics.jsonl holds finite numbers only"
        )));
    }
    let record = MetricsRecord::from(r);
    rsb_report::runs::check_epoch_record(&record).map_err(|(field, value, allowed)| {
        Status::invalid_argument(format!("`record.epoch.{field}` is {value}; {allowed}"))
    })?;
    Ok(record)
}

/// The real numbers of a metrics record, each with its field's path.
fn numbers(r: &pb::metrics_report::Record) -> Vec<(String, f64)> {
    use pb::metrics_report::Record;
    let named = |pairs: &[(&str, f64)]| -> Vec<(String, f64)> {
        pairs.iter().map(|(name, value)| (name.to_string(), *value)).collect()
    };
    match r {
        Record::Loading(l) => named(&[("loading.elapsed_s", l.elapsed_s)]),
        Record::FirstUpdate(f) => named(&[("first_update.elapsed_s", f.elapsed_s)]),
        Record::Step(s) => {
            let mut out = named(&[
                ("step.lr", s.lr),
                ("step.loss", s.loss),
                ("step.images_per_sec", s.images_per_sec),
            ]);
            if let Some(b) = &s.rank_balance {
                out.extend(named(&[
                    ("step.rank_balance.slowest_s", b.slowest_s),
                    ("step.rank_balance.slowest_input_wait_s", b.slowest_input_wait_s),
                    ("step.rank_balance.others_median_s", b.others_median_s),
                ]));
            }
            out
        }
        Record::Epoch(e) => {
            let mut out = named(&[
                ("epoch.lr", e.lr),
                ("epoch.loss", e.loss),
                ("epoch.images_per_sec", e.images_per_sec),
                ("epoch.elapsed_s", e.elapsed_s),
            ]);
            out.extend(e.top1.map(|v| ("epoch.top1".into(), v)));
            out.extend(e.top5.map(|v| ("epoch.top5".into(), v)));
            for set in &e.eval_sets {
                out.push((format!("epoch.eval_sets.{}.top1", set.name), set.top1));
                out.push((format!("epoch.eval_sets.{}.top5", set.name), set.top5));
            }
            out
        }
        Record::Checksum(c) => {
            named(&[("checksum.sum", c.sum), ("checksum.sum_of_squares", c.sum_of_squares)])
        }
        Record::Fabric(f) => {
            let mut out = named(&[
                ("fabric.all_reduce_s", f.all_reduce_s),
                ("fabric.bus_gb_per_s", f.bus_gb_per_s),
            ]);
            out.extend(f.links.iter().map(|l| ("fabric.links.gb_per_s".to_string(), l.gb_per_s)));
            out
        }
        Record::GenerationStart(_) => Vec::new(),
    }
}

/// What a join to a finished job says to join again after, for an older
/// worker that does not read `JoinResponse.job_finished`.
const FINISHED_JOB_RETRY_AFTER: Duration = Duration::from_secs(600);

#[tonic::async_trait]
impl Coordinator for Shared {
    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let join = Join::try_from(request.into_inner())?;
        let (placement, sweep) = self
            .update(|state| {
                let placement = state.join(&join.host, join.kind, join.local_ranks, join.advertise);
                placement.map(|p| (p, state.sweep.is_some()))
            })
            .map_err(status)?;
        let response = match placement {
            Placement::Member { job, id, secret, pending } => {
                let interval = self.update_job(job, |job| job.heartbeat_interval());
                pb::JoinResponse {
                    member_id: id,
                    heartbeat_interval_ms: interval.as_millis() as u32,
                    member_secret: secret.expose().to_string(),
                    pending,
                    sweep,
                    ..pb::JoinResponse::default()
                }
            }
            Placement::JoinAgain(after) => pb::JoinResponse {
                sweep,
                retry_after_ms: after.as_millis() as u32,
                ..pb::JoinResponse::default()
            },
            Placement::SweepOver => {
                pb::JoinResponse { sweep, sweep_over: true, ..pb::JoinResponse::default() }
            }
            // An older worker, which does not read `job_finished`, takes the
            // empty member id for "join again later": not soon, so that it
            // neither spins nor counts again while the coordinator tells.
            Placement::JobFinished => pb::JoinResponse {
                job_finished: true,
                retry_after_ms: FINISHED_JOB_RETRY_AFTER.as_millis() as u32,
                ..pb::JoinResponse::default()
            },
        };
        Ok(Response::new(response))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let (index, caller) = self.caller("Heartbeat", &request)?;
        let r = request.into_inner();
        own_member("member_id", &r.member_id, &caller)?;
        let (beat, generation) = self
            .update_job(index, |job| {
                job.check_liveness();
                Ok((job.heartbeat(&caller)?, job.generation))
            })
            .map_err(status)?;
        Ok(Response::new(pb::HeartbeatResponse {
            keep_going: beat.keep_going,
            generation,
            pending: beat.pending,
            ranks_generation: beat.ranks_generation(),
            newest_ranks_generation: beat.newest_ranks_generation(),
            failure: beat.failure.unwrap_or_default(),
            rank_fetches: beat.rank_fetches,
        }))
    }

    async fn get_assignment(
        &self,
        request: Request<pb::AssignmentRequest>,
    ) -> Result<Response<pb::Assignment>, Status> {
        let (index, caller) = self.caller("GetAssignment", &request)?;
        let r = request.into_inner();
        own_member("member_id", &r.member_id, &caller)?;
        let assignment =
            self.wait_for(index, |job| assignment_answer(job, &caller, r.local_rank)).await?;
        Ok(Response::new(assignment))
    }

    async fn rendezvous(
        &self,
        request: Request<pb::RendezvousRequest>,
    ) -> Result<Response<pb::RendezvousResponse>, Status> {
        let (index, caller) = self.caller("Rendezvous", &request)?;
        let r = request.into_inner();
        required("job_id", &r.job_id, MAX_NAME_LEN)?;
        let published = payload(&r)?;
        self.update_job(index, |job| {
            this_job(job, &r.job_id)?;
            job.publish(&caller, r.generation, r.global_rank, published)
        })
        .map_err(status)?;
        let (nccl_unique_id, ring_addresses) = self
            .wait_for(index, |job| match &job.phase {
                Phase::Failed(reason) => {
                    Err(JobError::Precondition(format!("job failed: {reason}")))
                }
                // The membership changed while this rank waited.
                _ if job.generation != r.generation => Err(JobError::Precondition(format!(
                    "stale generation {}, the job is at {}",
                    r.generation, job.generation
                ))),
                _ => Ok(job.rendezvous_result()),
            })
            .await?;
        Ok(Response::new(pb::RendezvousResponse { nccl_unique_id, ring_addresses }))
    }

    async fn report_metrics(
        &self,
        request: Request<pb::MetricsReport>,
    ) -> Result<Response<pb::Ack>, Status> {
        let (index, caller) = self.caller("ReportMetrics", &request)?;
        let r = request.into_inner();
        required("job_id", &r.job_id, MAX_NAME_LEN)?;
        if r.global_rank != 0 {
            return Err(Status::invalid_argument(format!(
                "`global_rank` {}: rank 0 reports the job's metrics",
                r.global_rank
            )));
        }
        let record = record(r.record)?;
        let receipt = self
            .update_job(index, |job| {
                this_job(job, &r.job_id)?;
                job.check_runs_rank(&caller, r.global_rank)?;
                let recorded = job.record_metrics_report(r.generation, r.sequence, &record)?;
                if let Some(line) = &recorded.line {
                    job.say(line);
                }
                Ok(recorded.receipt)
            })
            .map_err(status)?;
        // Answered once the record is in `metrics.jsonl`, or with the reason
        // it could not be written. Waiting for a write in progress (a slow
        // disk) holds neither the state's lock nor a thread of the runtime.
        tokio::task::spawn_blocking(move || receipt.written(METRICS_WRITE_DEADLINE))
            .await
            .map_err(|e| Status::internal(format!("writing the metrics record: {e}")))?
            .map_err(status)?;
        Ok(Response::new(pb::Ack {}))
    }

    async fn commit_checkpoint(
        &self,
        request: Request<pb::CheckpointCommit>,
    ) -> Result<Response<pb::Ack>, Status> {
        let (index, caller) = self.caller("CommitCheckpoint", &request)?;
        let r = request.into_inner();
        required("job_id", &r.job_id, MAX_NAME_LEN)?;
        required("path", &r.path, MAX_PATH_LEN)?;
        // Advice, not a contract: a warning of any text is printed as one
        // line, cut to MAX_MESSAGE_LEN, and never costs the commit.
        let disk_warning = one_line(&r.disk_warning, MAX_MESSAGE_LEN);
        self.update_job(index, |job| {
            this_job(job, &r.job_id)?;
            // Rank 0 writes the checkpoints.
            job.check_runs_rank(&caller, 0)?;
            let path = r.path.clone();
            if job.commit_checkpoint_report(r.generation, r.sequence, r.epoch, r.updates, path)? {
                job.say(&format!("checkpoint committed: epoch {} at {}", r.epoch, r.path));
                if !disk_warning.trim().is_empty() {
                    job.say(&format!("warning: {disk_warning}"));
                }
            }
            Ok(())
        })
        .map_err(status)?;
        Ok(Response::new(pb::Ack {}))
    }

    async fn leave(&self, request: Request<pb::LeaveRequest>) -> Result<Response<pb::Ack>, Status> {
        let (index, caller) = self.caller("Leave", &request)?;
        let r = request.into_inner();
        own_member("member_id", &r.member_id, &caller)?;
        if r.message.len() > MAX_MESSAGE_LEN {
            return Err(Status::invalid_argument(format!(
                "`message` is {} bytes long; at most {MAX_MESSAGE_LEN} are accepted",
                r.message.len()
            )));
        }
        let cause = failure_cause(&r);
        // Printed, logged and sent to every member's agent: one line, its
        // control characters (a terminal's escapes, line breaks) spaces.
        let message = one_line(&r.message, MAX_MESSAGE_LEN);
        self.update_job(index, |job| {
            job.leave(&caller, r.generation, r.local_rank, r.success, &message, cause)
        })
        .map_err(status)?;
        Ok(Response::new(pb::Ack {}))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        // Callers hold the job token (checked in front); member secrets are never shown.
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let shown = |m: &crate::job::Member| pb::Member {
            member_id: m.id.clone(),
            host_name: m.host.clone(),
            local_ranks: m.local_ranks,
            last_heartbeat_ms_ago: m.last_seen.elapsed().as_millis() as u64,
        };
        let mut response = match state.primary() {
            Some(job) => pb::StatusResponse {
                job_id: job.id.clone(),
                generation: job.generation,
                state: match &job.phase {
                    Phase::Waiting => "waiting".to_string(),
                    Phase::Running => "running".to_string(),
                    Phase::Finished => "finished".to_string(),
                    Phase::Failed(r) => format!("failed: {r}"),
                },
                members: job.members.iter().map(shown).collect(),
                pending: job.pending.iter().map(shown).collect(),
                min_nodes: job.min_nodes,
                max_nodes: job.max_nodes,
                nodes_expected: job.nodes_expected,
                epoch: job.progress.0,
                step: job.progress.1,
                images_per_sec: job.progress.2,
                sweep_runs: Vec::new(),
            },
            None => pb::StatusResponse { state: "waiting".into(), ..pb::StatusResponse::default() },
        };
        if let Some(sweep) = &state.sweep {
            let counts = sweep.counts();
            response.state = format!(
                "sweep: {} finished, {} running, {} queued, {} failed of {}",
                counts.finished, counts.running, counts.queued, counts.failed, counts.total
            );
            response.sweep_runs = sweep
                .views(&state.jobs)
                .into_iter()
                .map(|v| pb::SweepRun {
                    id: v.id,
                    state: match v.state {
                        RunState::Queued => pb::SweepRunState::Queued,
                        RunState::Running => pb::SweepRunState::Running,
                        RunState::Finished => pb::SweepRunState::Finished,
                        RunState::Failed => pb::SweepRunState::Failed,
                    } as i32,
                    attempts: v.attempts,
                    epoch: v.epoch,
                    step: v.step,
                    total_updates: v.total_updates.unwrap_or(0),
                    hosts: v.hosts,
                    failure: v.failure.unwrap_or_default(),
                })
                .collect();
        }
        Ok(Response::new(response))
    }
}

/// Whom a Leave's typed fields blame, the stop request first: a rank that
/// stopped because ranks asked it to (or was stopped itself before it
/// trained) failed for that, whatever its last collective did; then a link
/// whose data was tampered with.
fn failure_cause(leave: &pb::LeaveRequest) -> FailureCause {
    if !leave.stop_requested_by.is_empty() {
        return FailureCause::StopRequestedBy(leave.stop_requested_by.clone());
    }
    if leave.stopped_before_training {
        return FailureCause::StoppedBeforeTraining;
    }
    match (leave.tampered_link_from, leave.collective_peer) {
        (Some(from), _) => FailureCause::TamperedLinkFrom(from),
        (None, Some(peer)) => FailureCause::CollectivePeer(peer),
        (None, None) if leave.collective_peer_unknown => FailureCause::CollectivePeerUnknown,
        (None, None) => FailureCause::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::saved::{SavedJob, STATE_FILE};
    use rsb_proto::auth::{Credentials, TOKEN_HEADER};
    use rsb_proto::v1::coordinator_client::CoordinatorClient;
    use std::path::Path;
    use std::time::Instant;

    const LOOPBACK: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));

    #[test]
    fn a_leaves_typed_fields_say_whom_to_blame_the_stop_request_first() {
        use FailureCause::*;
        let cause = |collective_peer, stop_requested_by, peer_unknown, tampered_link_from| {
            failure_cause(&pb::LeaveRequest {
                collective_peer,
                stop_requested_by,
                collective_peer_unknown: peer_unknown,
                tampered_link_from,
                ..pb::LeaveRequest::default()
            })
        };
        assert_eq!(cause(None, vec![], false, None), Unknown);
        assert_eq!(cause(Some(2), vec![], false, None), CollectivePeer(2));
        assert_eq!(cause(None, vec![], true, None), CollectivePeerUnknown);
        assert_eq!(cause(Some(2), vec![], true, None), CollectivePeer(2));
        assert_eq!(cause(Some(2), vec![1], true, None), StopRequestedBy(vec![1]));
        assert_eq!(cause(None, vec![], false, Some(0)), TamperedLinkFrom(0));
        assert_eq!(cause(Some(2), vec![], false, Some(0)), TamperedLinkFrom(0));
        assert_eq!(cause(None, vec![1], false, Some(0)), StopRequestedBy(vec![1]));
        let before_training = |collective_peer, stop_requested_by| {
            failure_cause(&pb::LeaveRequest {
                collective_peer,
                stop_requested_by,
                stopped_before_training: true,
                ..pb::LeaveRequest::default()
            })
        };
        assert_eq!(before_training(Some(2), vec![]), StoppedBeforeTraining);
        assert_eq!(before_training(None, vec![1]), StopRequestedBy(vec![1]));
    }

    /// A job of three hosts whose state is saved to `state_file`.
    fn saved_job(out: &Path, state_file: PathBuf) -> Shared {
        let recipe =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes/debug/resnet18_tiny_cpu.yaml");
        let mut job = Job::new(rsb_recipes::load(&recipe, &[]).unwrap(), out.to_path_buf(), 3);
        job.state_file = Some(state_file);
        Shared::new(Coordination::one(job))
    }

    fn join(state: &mut Coordination, host: &str) {
        state.jobs[0].join(host, DeviceKind::Cpu, 1, LOOPBACK).unwrap();
    }

    /// A rank that asks for its share after the job finished (its host
    /// admitted too late) is told so, and exits successfully, where it was
    /// refused and failed its agent after a successful job.
    #[test]
    fn a_rank_that_asks_for_its_share_of_a_finished_job_is_told_it_is_finished() {
        let tmp = tempfile::tempdir().unwrap();
        let shared = saved_job(tmp.path(), tmp.path().join(STATE_FILE));
        let Ok(Placement::Member { id, .. }) =
            shared.update(|state| state.join("a", DeviceKind::Cpu, 1, LOOPBACK))
        else {
            panic!("not taken")
        };
        let answer =
            |rank: u32| shared.update(|state| assignment_answer(&mut state.jobs[0], &id, rank));
        // Waiting for its other hosts: nothing yet.
        assert_eq!(answer(0).unwrap(), None);
        shared.update(|state| state.jobs[0].phase = Phase::Finished);
        let told = answer(0).unwrap().expect("an answer");
        assert!(told.job_finished && told.recipe_yaml.is_empty(), "{told:?}");
        // A rank the member does not run, or a member the job does not
        // know, is refused as before.
        assert!(answer(1).is_err());
        let stranger = shared.update(|state| assignment_answer(&mut state.jobs[0], "x-9", 0));
        assert!(stranger.is_err(), "{stranger:?}");
        // A failed job still refuses it, saying why.
        shared.update(|state| state.jobs[0].phase = Phase::Failed("rank 0 failed".into()));
        let refused = answer(0).unwrap_err().to_string();
        assert!(refused.contains("rank 0 failed"), "{refused}");
    }

    /// A host that joins a finished job is told so (its worker exits
    /// successfully), not refused as by a running job that takes no one.
    #[test]
    fn a_host_that_joins_a_finished_job_is_told_it_is_finished() {
        let tmp = tempfile::tempdir().unwrap();
        let shared = saved_job(tmp.path(), tmp.path().join(STATE_FILE));
        let joined = |shared: &Shared| {
            shared.update(|state| state.join("late", DeviceKind::Cpu, 1, LOOPBACK))
        };
        // Waiting for hosts: taken.
        let Ok(Placement::Member { id, .. }) = joined(&shared) else { panic!("not taken") };
        shared.update(|state| state.jobs[0].phase = Phase::Finished);
        assert!(matches!(joined(&shared), Ok(Placement::JobFinished)));
        assert_eq!(shared.update(|state| state.hosts_told_finished()), 1);
        // A member's agent that heartbeats (it outlived the last
        // coordinator) is told to stop and counts once, however often it calls.
        for _ in 0..2 {
            let beat = shared.update(|state| state.jobs[0].heartbeat(&id)).unwrap();
            assert!(!beat.keep_going && beat.failure.is_none(), "{beat:?}");
        }
        assert_eq!(shared.update(|state| state.hosts_told_finished()), 2);
        // An unknown member counts for nothing.
        assert!(shared.update(|state| state.jobs[0].heartbeat("stranger")).is_err());
        assert_eq!(shared.update(|state| state.hosts_told_finished()), 2);
        // A failed job still refuses it, saying why.
        shared.update(|state| state.jobs[0].phase = Phase::Failed("rank 0 failed".into()));
        let refused = joined(&shared).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(refused.contains("rank 0 failed"), "{refused}");
    }

    #[test]
    fn a_change_is_on_disk_when_update_returns_and_an_older_state_never_replaces_a_newer() {
        let tmp = tempfile::tempdir().unwrap();
        let shared = saved_job(tmp.path(), tmp.path().join(STATE_FILE));
        let current = || SavedJob::of(&shared.state.lock().unwrap().jobs[0]);
        shared.update(|state| join(state, "a"));
        assert_eq!(SavedJob::read(tmp.path()).unwrap(), current());
        // Two states taken in order under the lock, written in the other
        // order (two calls racing once the lock is released).
        let (older, newer) = {
            let mut state = shared.state.lock().unwrap();
            join(&mut state, "b");
            let older = state.states_to_save();
            join(&mut state, "c");
            (older, state.states_to_save())
        };
        assert_eq!((older.len(), newer.len()), (1, 1));
        shared.write_states(newer);
        shared.write_states(older);
        let on_disk = SavedJob::read(tmp.path()).unwrap();
        assert_eq!(on_disk, current(), "the older state was written over the newer one");
        // Nothing changed: nothing to write.
        assert!(shared.state.lock().unwrap().states_to_save().is_empty());
    }

    #[test]
    fn a_state_that_could_not_be_written_is_written_again_with_the_next_call() {
        let tmp = tempfile::tempdir().unwrap();
        // A file where the state file's folder should be: every write fails.
        let blocked = tmp.path().join("blocked");
        std::fs::write(&blocked, b"").unwrap();
        let shared = saved_job(tmp.path(), blocked.join(STATE_FILE));
        shared.update(|state| join(state, "a"));
        // Handed out again although nothing changed since.
        let again = shared.state.lock().unwrap().states_to_save();
        assert_eq!(again.len(), 1, "the failed state was dropped");
        // Once the folder is there, it is written.
        std::fs::remove_file(&blocked).unwrap();
        shared.write_states(again);
        assert_eq!(
            SavedJob::read(&blocked).unwrap(),
            SavedJob::of(&shared.state.lock().unwrap().jobs[0])
        );
    }

    #[test]
    fn a_state_save_stalled_on_the_disk_holds_up_no_other_task_of_the_runtime() {
        let tmp = tempfile::tempdir().unwrap();
        let shared = saved_job(tmp.path(), tmp.path().join(STATE_FILE));
        // One worker: a task that kept it while it waited for the disk
        // would hold up every other task.
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).build().unwrap();
        // A save in progress elsewhere: the next one waits for it.
        let stalled_disk = shared.written.lock().unwrap();
        let joining = {
            let shared = shared.clone();
            runtime.spawn(async move { shared.update(|state| join(state, "a")) })
        };
        // Its state is taken, so it is at, or on its way to, the save.
        let deadline = Instant::now() + Duration::from_secs(30);
        while shared.state.lock().unwrap().jobs[0].saves_handed_out() == 0 {
            assert!(Instant::now() < deadline, "the join never took its state to save");
            std::thread::sleep(Duration::from_millis(1));
        }
        let (ran, another_task) = std::sync::mpsc::channel();
        runtime.spawn(async move { ran.send(()) });
        assert!(
            // Handing the worker over may start a thread: time for a loaded
            // machine (without the hand-over it never runs at all).
            another_task.recv_timeout(Duration::from_secs(30)).is_ok(),
            "another task of the runtime waited for the stalled save"
        );
        assert!(!joining.is_finished(), "the join returned before its state was on disk");
        // The disk is back: the state is written, then the join returns.
        drop(stalled_disk);
        runtime.block_on(joining).unwrap();
        assert_eq!(
            SavedJob::read(tmp.path()).unwrap(),
            SavedJob::of(&shared.state.lock().unwrap().jobs[0])
        );
    }

    #[test]
    fn a_run_file_stalled_on_the_disk_holds_up_no_call_and_is_written_before_its_call_returns() {
        use crate::sweep::tests::{scheduler, settings};
        let tmp = tempfile::tempdir().unwrap();
        let sweep = scheduler(tmp.path(), &[0], settings(1, None, 0));
        let recipe_file =
            rsb_job::sweep::SweepLayout::new(tmp.path()).run_recipe(&sweep.runs[0].cell.id);
        let shared = Shared::new(Coordination::sweep(sweep));
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).build().unwrap();
        // The disk stalls: the first run's recipe, written when a host
        // starts it, waits.
        let stalled_disk = shared.run_files_written.lock().unwrap();
        let joining = {
            let shared = shared.clone();
            runtime.spawn(async move {
                shared.update(|state| state.join("a", DeviceKind::Cpu, 1, LOOPBACK).map(|_| ()))
            })
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while shared.state.lock().unwrap().jobs.is_empty() {
            assert!(Instant::now() < deadline, "the host never started the run");
            std::thread::sleep(Duration::from_millis(1));
        }
        // Other calls go on while the write waits (the state's lock is free).
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(shared.update(|state| state.jobs.len()), 1);
        assert!(!joining.is_finished(), "the join returned before the run's recipe was written");
        assert!(!recipe_file.exists());
        drop(stalled_disk);
        runtime.block_on(joining).unwrap().unwrap();
        assert!(recipe_file.is_file(), "{} was not written", recipe_file.display());
    }

    /// A sweep of one run in `dir`, and where that run's recipe is written.
    fn one_run_sweep(dir: &std::path::Path) -> (Shared, PathBuf) {
        use crate::sweep::tests::{scheduler, settings};
        let sweep = scheduler(dir, &[0], settings(1, None, 0));
        let recipe_file = rsb_job::sweep::SweepLayout::new(dir).run_recipe(&sweep.runs[0].cell.id);
        (Shared::new(Coordination::sweep(sweep)), recipe_file)
    }

    #[test]
    fn run_files_left_queued_are_written_before_the_coordinator_exits() {
        let tmp = tempfile::tempdir().unwrap();
        let (shared, recipe_file) = one_run_sweep(tmp.path());
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
        // Queued under the lock by a pass whose writes have not run.
        shared.state.lock().unwrap().join("a", DeviceKind::Cpu, 1, LOOPBACK).unwrap();
        assert!(!recipe_file.exists());
        runtime.block_on(shared.write_remaining_run_files_within(Duration::from_secs(30))).unwrap();
        assert!(recipe_file.is_file(), "{} was not written", recipe_file.display());
    }

    #[test]
    fn a_state_write_that_hangs_holds_up_the_update_not_its_caller() {
        let tmp = tempfile::tempdir().unwrap();
        let shared = saved_job(tmp.path(), tmp.path().join(STATE_FILE));
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
        // A disk that hangs: the write of any state waits for this lock.
        let stalled_disk = shared.written.lock().unwrap();
        let started = Instant::now();
        let (stop, stopped) = tokio::sync::oneshot::channel::<&str>();
        let signal = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            stop.send("SIGINT").unwrap();
        });
        let update =
            shared.update_unless(async { stopped.await.unwrap() }, |state| join(state, "a"));
        assert_eq!(runtime.block_on(update), Err("SIGINT"), "the stop was not heard");
        assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
        signal.join().unwrap();
        // The change is made in memory (once the blocking pool runs it);
        // only its write waits.
        let deadline = Instant::now() + Duration::from_secs(30);
        while shared.state.lock().unwrap().jobs[0].members.len() != 1 {
            assert!(Instant::now() < deadline, "the change was never made");
            std::thread::sleep(Duration::from_millis(10));
        }
        let started = Instant::now();
        let limit = Duration::from_millis(300);
        let within = shared.update_within(limit, |state| join(state, "b"));
        assert_eq!(runtime.block_on(within), None);
        assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
        // The disk comes back: both changes reach the state file.
        drop(stalled_disk);
        let deadline = Instant::now() + Duration::from_secs(30);
        while SavedJob::read(tmp.path()).map_or(0, |saved| saved.members.len()) != 2 {
            assert!(Instant::now() < deadline, "the state was never written");
            std::thread::sleep(Duration::from_millis(20));
        }
        // A disk that answers: the update's own value.
        let quick = shared.update_within(Duration::from_secs(30), |state| state.jobs.len());
        assert_eq!(runtime.block_on(quick), Some(1));
        runtime.shutdown_timeout(Duration::from_secs(5));
    }

    #[test]
    fn the_last_run_files_wait_for_a_pass_in_flight_but_not_past_their_deadline() {
        let tmp = tempfile::tempdir().unwrap();
        let (shared, recipe_file) = one_run_sweep(tmp.path());
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
        // A pass took the run's recipe under the lock and has not written it
        // yet: the queue is empty, but the file is not on disk.
        let taken = {
            let mut state = shared.state.lock().unwrap();
            state.join("a", DeviceKind::Cpu, 1, LOOPBACK).unwrap();
            shared.take_run_files(&mut state)
        };
        assert_eq!(taken.files.len(), 1);
        assert!(shared.state.lock().unwrap().run_files_to_write().is_empty());
        let pass = {
            let shared = shared.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                shared.write_run_files(taken);
            })
        };
        runtime.block_on(shared.write_remaining_run_files_within(Duration::from_secs(30))).unwrap();
        assert!(recipe_file.is_file(), "returned before the pass in flight wrote its file");
        pass.join().unwrap();
        assert_eq!(*shared.run_file_passes.0.lock().unwrap(), 0, "every pass is over");
        // A pass dropped before its write (a panic between) is over too.
        let file = |contents: &[u8]| crate::sweep::RunFile {
            path: recipe_file.clone(),
            contents: contents.to_vec(),
            failures: 0,
        };
        shared.state.lock().unwrap().sweep.as_mut().unwrap().write_again(vec![file(b"y")]);
        let dropped = shared.take_run_files(&mut shared.state.lock().unwrap());
        assert_eq!(*shared.run_file_passes.0.lock().unwrap(), 1, "a pass that took a file");
        drop(dropped);
        assert_eq!(*shared.run_file_passes.0.lock().unwrap(), 0);
        // A disk that hangs: the flush gives up at its deadline and names
        // what is left.
        std::fs::remove_file(&recipe_file).unwrap();
        shared.state.lock().unwrap().sweep.as_mut().unwrap().write_again(vec![file(b"x")]);
        let stalled_disk = shared.run_files_written.lock().unwrap();
        let started = Instant::now();
        let left = runtime
            .block_on(shared.write_remaining_run_files_within(Duration::from_millis(300)))
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(20), "waited {:?}", started.elapsed());
        assert!(left.iter().any(|p| p.contains("being written")), "{left:?}");
        drop(stalled_disk);
        runtime.shutdown_timeout(Duration::from_secs(5));
    }

    #[test]
    fn the_token_check_refuses_calls_without_the_token() {
        let token = Secret::generate().unwrap();
        let mut check = TokenCheck::new(token.clone());
        let refused = check.call(Request::new(())).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        let mut wrong = Request::new(());
        wrong.metadata_mut().insert(TOKEN_HEADER, "0123456789abcdef0123".parse().unwrap());
        assert_eq!(check.call(wrong).unwrap_err().code(), tonic::Code::Unauthenticated);
        let mut with = Credentials::token(token);
        let request = with.call(Request::new(())).unwrap();
        assert!(check.call(request).is_ok());
    }

    /// A client of a server on `address` that counts the connections it opens.
    async fn counting_client(
        address: std::net::SocketAddr,
        credentials: Credentials,
    ) -> (
        CoordinatorClient<
            tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Credentials>,
        >,
        Arc<AtomicU64>,
    ) {
        let opened = Arc::new(AtomicU64::new(0));
        let count = Arc::clone(&opened);
        let connector = tower::service_fn(move |_: tonic::transport::Uri| {
            count.fetch_add(1, Ordering::SeqCst);
            async move {
                let stream = tokio::net::TcpStream::connect(address).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        });
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .unwrap()
            .connect_with_connector(connector)
            .await
            .unwrap();
        (CoordinatorClient::with_interceptor(channel, credentials), opened)
    }

    #[tokio::test]
    async fn a_members_connection_is_held_past_the_token_deadline_a_strangers_is_closed_at_it() {
        let tmp = tempfile::tempdir().unwrap();
        let shared = saved_job(tmp.path(), tmp.path().join(STATE_FILE));
        let token = Secret::generate().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        // Long enough that a loaded machine's first call still falls in it.
        let deadline = Duration::from_secs(1);
        let limits = crate::incoming::Limits { token_call: deadline, ..Default::default() };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            server(None).unwrap(),
            shared,
            token.clone(),
            listener,
            limits,
            async {
                let _ = stopped.await;
            },
        ));
        // A member calls every 50 ms for three deadlines: over its one
        // connection, every call answered.
        let (mut member, member_connections) =
            counting_client(address, Credentials::token(token)).await;
        let started = Instant::now();
        while started.elapsed() < 3 * deadline {
            member.status(pb::StatusRequest {}).await.expect("a member's call");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            member_connections.load(Ordering::SeqCst),
            1,
            "the member's connection was closed"
        );
        // A stranger calling as often (refused each time) has its
        // connection closed at the deadline: its client opens another.
        let wrong = Secret::generate().unwrap();
        let (mut stranger, stranger_connections) =
            counting_client(address, Credentials::token(wrong)).await;
        let started = Instant::now();
        while stranger_connections.load(Ordering::SeqCst) < 2 {
            assert!(started.elapsed() < 10 * deadline, "a stranger's connection was held");
            let refused = stranger.status(pb::StatusRequest {}).await.unwrap_err();
            assert!(
                matches!(refused.code(), tonic::Code::Unauthenticated | tonic::Code::Unavailable),
                "{refused:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Its connection may have been accepted a little before `started`.
        assert!(started.elapsed() >= deadline / 2, "{:?}", started.elapsed());
        let _ = stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    }

    #[test]
    fn metrics_records_with_numbers_the_report_cannot_read_are_refused_naming_the_field() {
        use pb::metrics_report::Record;
        let step = |loss: f64| pb::StepRecord {
            epoch: 0,
            step: 3,
            lr: 1e-3,
            loss,
            images_per_sec: 10.0,
            total_updates: 10,
            ..Default::default()
        };
        let epoch = |top1: f64| pb::EpochRecord {
            epoch: 0,
            step: 5,
            lr: 1e-3,
            loss: 2.0,
            images_per_sec: 10.0,
            top1: Some(top1),
            top5: Some(90.0),
            eval_sets: vec![pb::EvalSetAccuracy {
                name: "real".into(),
                top1: 50.0,
                top5: f64::NAN,
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(record(Some(Record::Step(step(2.0)))).is_ok());
        for (bad, field) in [
            (Record::Step(step(f64::NAN)), "`record.step.loss` is NaN"),
            (Record::Step(step(f64::INFINITY)), "`record.step.loss` is inf"),
            (Record::Epoch(epoch(50.0)), "`record.epoch.eval_sets.real.top5` is NaN"),
        ] {
            let e = record(Some(bad)).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().contains(field), "{e:?}");
        }
        let mut fine = epoch(50.0);
        fine.eval_sets[0].top5 = 80.0;
        assert!(record(Some(Record::Epoch(fine.clone()))).is_ok());
        // A validation loss that overflowed is recorded as absent, with the
        // accuracies it came with.
        fine.val_loss = Some(f64::NAN);
        match record(Some(Record::Epoch(fine.clone()))).unwrap() {
            MetricsRecord::Epoch { val_loss, top1, .. } => {
                assert_eq!((val_loss, top1), (None, Some(50.0)));
            }
            other => panic!("{other:?}"),
        }
        fine.top1 = Some(150.0);
        let e = record(Some(Record::Epoch(fine))).unwrap_err();
        assert!(e.message().contains("`record.epoch.top1` is 150; 0..=100"), "{e:?}");
    }

    #[test]
    fn fields_are_bounded_and_named() {
        let e = bounded("path", &"x".repeat(MAX_PATH_LEN + 1), MAX_PATH_LEN).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("`path`"), "{}", e.message());
        assert!(required("job_id", "", MAX_NAME_LEN).is_err());
        assert!(bounded("host_name", "a\nb", MAX_NAME_LEN).is_err());
        assert!(own_member("member_id", "", "m1-a").is_ok());
        assert_eq!(
            own_member("member_id", "m2-b", "m1-a").unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        let join = |advertise: &str| {
            Join::try_from(pb::JoinRequest {
                host_name: "a".into(),
                advertise_address: advertise.into(),
                device_kind: pb::DeviceKind::Cpu as i32,
                local_ranks: 1,
            })
        };
        assert!(join("10.0.0.1").is_ok());
        let named = |host_name: &str| {
            Join::try_from(pb::JoinRequest {
                host_name: host_name.into(),
                advertise_address: "10.0.0.1".into(),
                device_kind: pb::DeviceKind::Cpu as i32,
                local_ranks: 1,
            })
        };
        assert!(named("gpu-07.cluster").is_ok());
        let e = named("gpu-α").err().unwrap();
        assert!(e.message().contains("not visible ASCII"), "{}", e.message());
        let e = join("10.0.0.1:80").err().unwrap();
        assert!(e.message().contains("advertise_address"), "{}", e.message());
        let ring = pb::RendezvousRequest {
            job_id: "j".into(),
            generation: 1,
            global_rank: 0,
            payload: Some(pb::rendezvous_request::Payload::RingAddress("host:1".into())),
        };
        assert!(payload(&ring).unwrap_err().message().contains("ring_address"));
    }

    /// A job of one host, joined, running: its shared state, the member's
    /// credentials and the job's id.
    fn running_job(out: &Path) -> (Shared, Credentials, String) {
        let recipe =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes/debug/resnet18_tiny_cpu.yaml");
        let job = Job::new(rsb_recipes::load(&recipe, &[]).unwrap(), out.to_path_buf(), 1);
        let shared = Shared::new(Coordination::one(job));
        let (id, secret, _) =
            shared.update(|state| state.jobs[0].join("a", DeviceKind::Cpu, 1, LOOPBACK).unwrap());
        let credentials = Credentials::member(Secret::generate().unwrap(), &id, secret).unwrap();
        let job_id = shared.state.lock().unwrap().jobs[0].id.clone();
        (shared, credentials, job_id)
    }

    /// Calls `ReportMetrics` with a step record, as the member of
    /// [`running_job`], on a runtime of its own, numbered as the step.
    fn report_step(
        shared: &Shared,
        credentials: &Credentials,
        job_id: &str,
        step: u64,
    ) -> Result<(), Status> {
        report_numbered_step(shared, credentials, job_id, step, step)
    }

    /// [`report_step`] with the report's number (0: none).
    fn report_numbered_step(
        shared: &Shared,
        credentials: &Credentials,
        job_id: &str,
        step: u64,
        sequence: u64,
    ) -> Result<(), Status> {
        let record = crate::job::tests::step(step);
        let report = pb::MetricsReport {
            job_id: job_id.to_string(),
            generation: 1,
            global_rank: 0,
            record: Some((&record).into()),
            sequence,
        };
        let mut request = Request::new(report);
        let with = credentials.clone().call(Request::new(()))?;
        *request.metadata_mut() = with.metadata().clone();
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(shared.report_metrics(request)).map(drop)
    }

    /// The `step` of every step record in `metrics.jsonl`, in file order.
    fn steps_on_disk(out: &Path) -> Vec<u64> {
        let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["kind"] == "step")
            .map(|v| v["step"].as_u64().unwrap())
            .collect()
    }

    #[test]
    fn a_report_sent_again_with_its_number_is_recorded_once() {
        let tmp = tempfile::tempdir().unwrap();
        let (shared, credentials, job_id) = running_job(tmp.path());
        let report = |step, sequence| {
            report_numbered_step(&shared, &credentials, &job_id, step, sequence).unwrap()
        };
        report(1, 1);
        // Its answer was lost: sent again, acknowledged, not written twice.
        report(1, 1);
        report(2, 2);
        // A late first copy of an earlier report, behind a later one.
        report(1, 1);
        report(3, 3);
        // Reports without a number are always taken.
        report(3, 0);
        assert_eq!(steps_on_disk(tmp.path()), [1, 2, 3, 3]);
        assert_eq!(shared.state.lock().unwrap().jobs[0].progress.1, 3);
        // Checkpoint commits share the numbering.
        let commit = |sequence| {
            shared.update_job(0, |job| {
                job.commit_checkpoint_report(1, sequence, 0, 3, "ckpt/update-3".into())
            })
        };
        assert!(commit(4).unwrap(), "a new number is taken");
        assert!(!commit(4).unwrap(), "its repeat is not");
        assert_eq!(shared.state.lock().unwrap().jobs[0].checkpoints.len(), 1);
        // A report of another generation is refused, number or not.
        let stale = pb::CheckpointCommit {
            job_id: job_id.clone(),
            generation: 2,
            epoch: 0,
            path: "ckpt/update-4".into(),
            updates: 4,
            sequence: 4,
            disk_warning: String::new(),
        };
        let mut request = Request::new(stale);
        *request.metadata_mut() =
            credentials.clone().call(Request::new(())).unwrap().metadata().clone();
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let e = runtime.block_on(shared.commit_checkpoint(request)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("stale generation 2"), "{}", e.message());
        // A disk warning of any text never costs the commit: it is taken,
        // and the warning printed as one line of at most MAX_MESSAGE_LEN.
        let warned = pb::CheckpointCommit {
            job_id: job_id.clone(),
            generation: 1,
            epoch: 0,
            path: "ckpt/update-5".into(),
            updates: 5,
            sequence: 5,
            disk_warning: format!("short\nof disk\u{7}{}", "é".repeat(MAX_MESSAGE_LEN)),
        };
        let mut request = Request::new(warned);
        *request.metadata_mut() =
            credentials.clone().call(Request::new(())).unwrap().metadata().clone();
        runtime.block_on(shared.commit_checkpoint(request)).unwrap();
        assert_eq!(shared.state.lock().unwrap().jobs[0].checkpoints.len(), 2);
        let line = one_line(&format!("short\nof\u{7}disk\u{2028}{}", "é".repeat(9)), 20);
        // 20 bytes: a fourth é would make 22.
        assert_eq!(line, "short of disk ééé");
    }

    #[test]
    fn a_leaves_message_reaches_the_job_as_one_line() {
        let tmp = tempfile::tempdir().unwrap();
        let (shared, credentials, _) = running_job(tmp.path());
        let member_id = shared.state.lock().unwrap().jobs[0].members[0].id.clone();
        let leave = pb::LeaveRequest {
            member_id,
            generation: 1,
            message: "out of memory\n\u{1b}[2J\u{1b}[31mjob finished\r".into(),
            ..pb::LeaveRequest::default()
        };
        let mut request = Request::new(leave);
        *request.metadata_mut() =
            credentials.clone().call(Request::new(())).unwrap().metadata().clone();
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(shared.leave(request)).unwrap();
        let failure = shared.state.lock().unwrap().jobs[0].failure().unwrap().to_string();
        assert_eq!(failure, "rank 0 on a failed: out of memory  [2J [31mjob finished ");
    }

    fn kinds_on_disk(out: &Path) -> Vec<String> {
        let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .map(|r| r["kind"].as_str().unwrap().to_string())
            .collect()
    }

    /// Runs `f` on a thread; `None` if it has not returned within `limit`
    /// (the thread is left behind, never waited for).
    fn within<T: Send + 'static>(
        limit: Duration,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(f()));
        rx.recv_timeout(limit).ok()
    }

    #[test]
    fn a_metrics_write_stalled_on_the_disk_holds_up_no_other_call() {
        let tmp = tempfile::tempdir().unwrap();
        let (shared, credentials, job_id) = running_job(tmp.path());
        // The generation record was written when the join's update returned.
        assert_eq!(kinds_on_disk(tmp.path()), ["generation"]);
        let sink = Arc::clone(shared.state.lock().unwrap().jobs[0].metrics_sink().unwrap());
        let stall = sink.stall();
        let reporter = {
            let (shared, credentials, job_id) = (shared.clone(), credentials.clone(), job_id);
            std::thread::spawn(move || report_step(&shared, &credentials, &job_id, 7))
        };
        // Once the report is accepted (queued under the state's lock), it
        // waits for the log while the state's lock is free for every call.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !sink.has_pending() {
            assert!(Instant::now() < deadline, "the report was never accepted");
            std::thread::sleep(Duration::from_millis(1));
        }
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            match shared.state.try_lock() {
                Ok(state) => {
                    assert_eq!(state.jobs[0].progress.1, 7, "the report's progress is shown");
                    break;
                }
                Err(_) => assert!(
                    Instant::now() < deadline,
                    "the state's lock is held while the metrics log is written"
                ),
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let heartbeat = {
            let shared = shared.clone();
            move || shared.update_job(0, |job| job.heartbeat(&job.members[0].id.clone()))
        };
        let beat =
            within(Duration::from_secs(1), heartbeat).expect("a heartbeat waited for the log");
        assert!(beat.unwrap().keep_going);
        assert!(!reporter.is_finished(), "answered before its record was written");
        assert_eq!(kinds_on_disk(tmp.path()), ["generation"], "written while the log was held");
        // The disk is back: the record is written, then the call answered.
        drop(stall);
        reporter.join().unwrap().unwrap();
        assert_eq!(kinds_on_disk(tmp.path()), ["generation", "step"]);
        assert!(!sink.has_pending());
    }

    #[test]
    fn a_metrics_record_that_cannot_be_written_fails_its_report() {
        let tmp = tempfile::tempdir().unwrap();
        // A folder where the file should be: every write fails.
        std::fs::create_dir(tmp.path().join("metrics.jsonl")).unwrap();
        let (shared, credentials, job_id) = running_job(tmp.path());
        let e = report_step(&shared, &credentials, &job_id, 1).unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(e.message().contains("metrics.jsonl"), "{}", e.message());
        // Once the file can be written, the next report is, and succeeds.
        std::fs::remove_dir(tmp.path().join("metrics.jsonl")).unwrap();
        report_step(&shared, &credentials, &job_id, 2).unwrap();
        assert_eq!(kinds_on_disk(tmp.path()), ["step"]);
    }
}
