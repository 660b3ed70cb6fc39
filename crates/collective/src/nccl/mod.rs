//! NCCL for GPU ranks: `libnccl.so.2` is loaded at run time ([`library`]:
//! the one from the `nvidia-nccl` package that the torch wheel brings, which
//! libtorch_cuda has loaded already), CUDA's driver API through `cudarc`, so
//! nothing NCCL or CUDA is needed at build time.
//!
//! Streams, as PyTorch's `ProcessGroupNCCL`: collectives run on a stream of
//! the communicator's own (created non-blocking, so the legacy default
//! stream does not serialise with it). Each one first makes that stream
//! wait for an event recorded on libtorch's default stream (the legacy null
//! stream) when it is issued: the work queued before it (the backward pass
//! that wrote a bucket's gradients, the copy into the bucket) is done before
//! it starts. The kernels queued on the default stream after it (the rest of
//! the backward pass) run alongside. [`Collective::join`] makes the default
//! stream wait for the last collective's completion event: whatever is
//! queued there after the join (unpacking the buckets into the gradients,
//! the optimizer step, a read on the host) sees the results, without the
//! host waiting. bf16 buffers are reduced as `ncclBfloat16`: half the bytes.
//!
//! No hang: the communicator is created non-blocking (`ncclConfig_t`
//! `blocking = 0`), so no NCCL call blocks the host; every call that answers
//! `ncclInProgress` is polled with `ncclCommGetAsyncError` up to the
//! collective timeout. Each enqueued collective is followed by a CUDA event,
//! and a watchdog thread (as PyTorch's NCCL watchdog) polls the outstanding
//! events and the communicator's asynchronous error. A collective still
//! running after the timeout, or an asynchronous error, makes the watchdog
//! call `ncclCommAbort` (which ends the kernels, so the stream and whatever
//! waits on it go on) and record the error, naming the rank and the
//! collective: the next call returns it (a timeout or a remote error as
//! [`CollectiveError::NcclCollectiveFailed`], since NCCL does not say which
//! peer held it up; any other error, this rank's own, as
//! [`CollectiveError::Nccl`]). Since the results of an aborted
//! collective are garbage, and the host may be blocked on the stream where
//! no further call comes, the first failure arms an exit timer (a thread
//! started with the first communicator, so that a failure never finds the
//! process unable to start one), before
//! `ncclCommAbort` is called (which might itself not return), whichever
//! thread meets it: the process ends (exit status 1, or
//! [`PEER_UNKNOWN_EXIT_STATUS`] for a timeout or a remote error; the error
//! on stderr)
//! [`EXIT_GRACE`] later if it has not ended by itself, with `_exit`: no
//! atexit handler or static destructor runs, since those of CUDA and NCCL
//! can block for ever on the very stream that hangs (and a rank that
//! reported its failure and exits normally may hang in them too). The
//! watchdog logs to the log of the thread that made the communicator (a
//! rank's log file).
//!
//! A communicator that failed or was aborted is never destroyed with
//! `ncclCommDestroy` (which flushes outstanding work and can wait for a
//! dead peer): the watchdog and every failing call abort it. Dropping a
//! healthy one ends it in NCCL's recommended order: its collectives
//! complete (each by its deadline), `ncclCommFinalize` finishes within the
//! collective timeout (polled: NCCL's own thread does that work), then
//! `ncclCommDestroy` (which blocks, but has only local memory left to
//! free). Dropping one after a failure, or when a step of that order fails
//! or times out, aborts it.
//!
//! The watchdog's decisions (which collectives completed, which is overdue,
//! whose fault an NCCL error is, one abort and one exit timer per failure)
//! make their NCCL and CUDA calls through a trait (`WatchdogCalls`), so that this
//! module's tests drive them with a fake, without a GPU.

mod exit_timer;
pub mod library;

use crate::{Buffer, Collective, CollectiveError, DeviceElement};
use cudarc::driver::sys as cuda;
use cudarc::nccl::sys;
use library::Nccl;
use std::collections::VecDeque;
use std::ffi::c_int;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often the watchdog looks at the outstanding collectives.
const POLL: Duration = Duration::from_millis(50);

/// The host-side waits for a non-blocking communicator (joining, and NCCL
/// taking each collective, which it answers `ncclInProgress` to while its
/// own thread enqueues it: typically microseconds) look again after a pause
/// that starts at [`FIRST_PAUSE`] and doubles up to [`LONGEST_PAUSE`]: a
/// collective is not held up by a coarse poll, and a long wait (a peer
/// still joining) costs no CPU to speak of.
const FIRST_PAUSE: Duration = Duration::from_micros(2);
/// See [`FIRST_PAUSE`].
const LONGEST_PAUSE: Duration = Duration::from_millis(1);

/// The pauses between the looks of a host-side wait.
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff { next: FIRST_PAUSE }
    }

    /// The pause before the next look (and the one after it doubles).
    fn next_pause(&mut self) -> Duration {
        let pause = self.next;
        self.next = (self.next * 2).min(LONGEST_PAUSE);
        pause
    }

    fn pause(&mut self) {
        std::thread::sleep(self.next_pause());
    }
}

/// How long a rank whose communicator failed has to report the failure
/// itself and exit before the exit timer ends it.
pub const EXIT_GRACE: Duration = Duration::from_secs(20);

/// The exit status of a rank the exit timer ends for a collective that
/// timed out or failed remotely ([`CollectiveError::NcclCollectiveFailed`]):
/// it may not have reported that itself (its thread blocked on the aborted
/// stream), so its agent reports it, and the coordinator blames the ranks
/// that report nothing, not this one. Its own failures end it with 1.
pub const PEER_UNKNOWN_EXIT_STATUS: i32 = 86;

/// The 128 bytes that identify an NCCL clique (made by rank 0, shared by the coordinator).
pub fn unique_id() -> Result<Vec<u8>, CollectiveError> {
    let nccl = Nccl::get()?;
    let id = nccl.unique_id().map_err(|code| {
        CollectiveError::Nccl(format!("ncclGetUniqueId: {}", nccl.describe(code)))
    })?;
    Ok(id.internal.iter().map(|&c| c as u8).collect())
}

/// `NCCL_CONFIG_INITIALIZER` of nccl.h 2.28 (the layout of cudarc's
/// `nccl-02028` binding), with `blocking = 0`.
fn non_blocking_config() -> sys::ncclConfig_t {
    const UNDEF: i32 = i32::MIN;
    sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        version: 22800,
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
    }
}

/// The raw communicator handle, shared with the watchdog.
#[derive(Debug, Clone, Copy)]
struct Comm(sys::ncclComm_t);

// SAFETY: an NCCL communicator may be used from any thread; every use goes
// through the `Shared` mutex, except `ncclCommAbort`, which NCCL documents
// as callable from another thread while operations are outstanding.
unsafe impl Send for Comm {}

/// A CUDA event recorded after an enqueued collective.
#[derive(Debug)]
struct Pending {
    event: usize,
    what: String,
    deadline: Instant,
}

/// What the rank's thread and the watchdog share.
#[derive(Debug, Default)]
struct State {
    /// `None` once aborted or destroyed.
    comm: Option<Comm>,
    pending: VecDeque<Pending>,
    /// The first failure; every later call returns it.
    failed: Option<Failure>,
}

/// Why a communicator was aborted.
#[derive(Debug, Clone)]
enum Failure {
    /// A collective, or the joining, did not finish by its deadline, or
    /// NCCL reported a remote error (`ncclRemoteError`): a peer may be at
    /// fault, and NCCL does not say which.
    Collective(String),
    /// This rank's own call failed (refused by NCCL, a CUDA call).
    Local(String),
}

impl Failure {
    fn why(&self) -> &str {
        match self {
            Failure::Collective(why) | Failure::Local(why) => why,
        }
    }

    /// The exit status of a process the exit timer ends for it: its agent
    /// reports [`PEER_UNKNOWN_EXIT_STATUS`] as a collective failure whose
    /// peer NCCL does not name, 1 as the rank's own.
    fn exit_status(&self) -> i32 {
        match self {
            Failure::Collective(_) => PEER_UNKNOWN_EXIT_STATUS,
            Failure::Local(_) => 1,
        }
    }

    /// The error a call that meets this failure returns.
    fn error(&self) -> CollectiveError {
        match self {
            Failure::Collective(why) => CollectiveError::NcclCollectiveFailed(why.clone()),
            Failure::Local(why) => CollectiveError::Nccl(why.clone()),
        }
    }
}

/// What the rank's thread, the watchdog and the exit timer share.
#[derive(Debug, Default)]
struct Flags {
    state: Mutex<State>,
    /// Set when the collective is dropped: the watchdog stops.
    stop: AtomicBool,
    /// Set by the first failure, which arms the exit timer.
    exit_armed: AtomicBool,
}

type Shared = Arc<Flags>;

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, State> {
    shared.state.lock().unwrap_or_else(|p| p.into_inner())
}

/// The NCCL and CUDA calls the watchdog's decisions make ([`async_state`],
/// [`wait_until_done`], [`overdue_or_failed`], [`abort`]): the libraries'
/// own ([`Nccl`], CUDA's driver, the process's exit timer), or a test's
/// fake, so that those decisions are tested without a GPU.
trait WatchdogCalls {
    /// `ncclCommGetAsyncError`: `Ok(state)` or the call's own failure.
    ///
    /// # Safety
    ///
    /// `comm` is a live communicator.
    unsafe fn async_error(&self, comm: Comm) -> Result<c_int, c_int>;
    /// An NCCL status in words.
    fn describe(&self, status: c_int) -> String;
    /// NCCL's last error message for `comm` (empty when it has none).
    ///
    /// # Safety
    ///
    /// As [`WatchdogCalls::async_error`].
    unsafe fn last_error(&self, comm: Comm) -> String;
    /// `ncclCommAbort`.
    ///
    /// # Safety
    ///
    /// `comm` is live and never used again.
    unsafe fn comm_abort(&self, comm: Comm);
    /// `cuEventQuery` of a collective's completion event.
    ///
    /// # Safety
    ///
    /// `event` is a live event of the rank's context, current on this thread.
    unsafe fn event_query(&self, event: usize) -> EventState;
    /// `cuEventDestroy`.
    ///
    /// # Safety
    ///
    /// `event` is live and never used again.
    unsafe fn event_destroy(&self, event: usize);
    /// Arms the process's exit timer ([`exit_timer::arm`]).
    fn arm_exit(&self, why: &str, status: i32);
}

/// Where a collective's completion event stands.
#[derive(Debug, Clone, PartialEq)]
enum EventState {
    /// The collective completed.
    Done,
    /// Still running.
    Running,
    /// CUDA reported an error (in words).
    Failed(String),
}

impl WatchdogCalls for Nccl {
    unsafe fn async_error(&self, comm: Comm) -> Result<c_int, c_int> {
        // SAFETY: the caller vouches for `comm`.
        unsafe { Nccl::async_error(self, comm.0) }
    }

    fn describe(&self, status: c_int) -> String {
        Nccl::describe(self, status)
    }

    unsafe fn last_error(&self, comm: Comm) -> String {
        // SAFETY: the caller vouches for `comm`.
        unsafe { Nccl::last_error(self, comm.0) }
    }

    unsafe fn comm_abort(&self, comm: Comm) {
        // SAFETY: the caller vouches for `comm`.
        let _ = unsafe { Nccl::comm_abort(self, comm.0) };
    }

    unsafe fn event_query(&self, event: usize) -> EventState {
        // SAFETY: the caller vouches for the event and the context.
        match unsafe { cuda::cuEventQuery(event as cuda::CUevent) } {
            cuda::CUresult::CUDA_SUCCESS => EventState::Done,
            cuda::CUresult::CUDA_ERROR_NOT_READY => EventState::Running,
            other => EventState::Failed(format!("CUDA error {other:?}")),
        }
    }

    unsafe fn event_destroy(&self, event: usize) {
        // SAFETY: the caller vouches for the event.
        let _ = unsafe { cuda::cuEventDestroy_v2(event as cuda::CUevent) };
    }

    fn arm_exit(&self, why: &str, status: i32) {
        exit_timer::arm(why, status);
    }
}

/// An error NCCL reported for a communicator.
struct AsyncError {
    /// Its status and NCCL's last message.
    text: String,
    /// `ncclRemoteError`: a peer's process exited or the network failed, a
    /// peer NCCL does not name. Any other status (an unhandled CUDA error,
    /// a system or internal error, invalid usage) is this rank's own.
    remote: bool,
}

impl std::fmt::Display for AsyncError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl AsyncError {
    /// The failure `why` (which quotes this error) records: a peer's when
    /// NCCL says the fault is remote, this rank's own otherwise.
    fn failure(&self, why: String) -> Failure {
        if self.remote {
            Failure::Collective(why)
        } else {
            Failure::Local(why)
        }
    }
}

/// The asynchronous state of `comm`: `Ok(true)` done, `Ok(false)` still in
/// progress, `Err` an NCCL error.
fn async_state(nccl: &impl WatchdogCalls, comm: Comm) -> Result<bool, AsyncError> {
    // SAFETY: `comm` is live (callers hold it from the shared state).
    match unsafe { nccl.async_error(comm) } {
        Err(call) => Err(AsyncError {
            text: format!("ncclCommGetAsyncError failed: {}", nccl.describe(call)),
            remote: false,
        }),
        Ok(library::SUCCESS) => Ok(true),
        Ok(library::IN_PROGRESS) => Ok(false),
        Ok(other) => Err(AsyncError {
            // SAFETY: as above.
            text: with_detail(nccl.describe(other), unsafe { nccl.last_error(comm) }),
            remote: other == library::REMOTE_ERROR,
        }),
    }
}

/// Why a wait for a non-blocking communicator ended unfinished.
enum Unfinished {
    /// NCCL reported an error.
    Failed(AsyncError),
    /// Still in progress at the deadline.
    TimedOut,
}

/// Waits until `comm` has finished what it was asked (joining the clique,
/// taking a collective), looking again after each of [`Backoff`]'s pauses,
/// up to `deadline`.
fn wait_until_done(
    nccl: &impl WatchdogCalls,
    comm: Comm,
    deadline: Instant,
) -> Result<(), Unfinished> {
    let mut backoff = Backoff::new();
    loop {
        match async_state(nccl, comm) {
            Ok(true) => return Ok(()),
            Ok(false) if Instant::now() < deadline => backoff.pause(),
            Ok(false) => return Err(Unfinished::TimedOut),
            Err(e) => return Err(Unfinished::Failed(e)),
        }
    }
}

/// An NCCL status, and NCCL's last error message when it has one.
fn with_detail(status: String, detail: String) -> String {
    if detail.is_empty() {
        status
    } else {
        format!("{status}: {detail}")
    }
}

/// [`abort`]s, and answers the error the failing call returns: `failure`'s.
fn fail(
    nccl: &impl WatchdogCalls,
    flags: &Flags,
    state: &mut State,
    failure: Failure,
) -> CollectiveError {
    let error = failure.error();
    abort(nccl, flags, state, failure);
    error
}

/// Records `failure` (the first one arms the exit timer) and aborts the
/// communicator (once).
fn abort(nccl: &impl WatchdogCalls, flags: &Flags, state: &mut State, failure: Failure) {
    if !flags.exit_armed.swap(true, Ordering::SeqCst) {
        nccl.arm_exit(failure.why(), failure.exit_status());
    }
    if let Some(comm) = state.comm.take() {
        // SAFETY: the communicator is live and is never used again (taken).
        unsafe { nccl.comm_abort(comm) };
    }
    for pending in state.pending.drain(..) {
        // SAFETY: the event was created by `cuEventCreate` and is destroyed once.
        unsafe { nccl.event_destroy(pending.event) };
    }
    state.failed.get_or_insert(failure);
}

/// A new CUDA event recorded on `stream` (the null stream: libtorch's
/// default one); the caller destroys it. Nothing is left behind on failure.
///
/// # Safety
///
/// The rank's CUDA context is current on this thread and `stream` is null or
/// a live stream of it.
unsafe fn record_event(stream: cuda::CUstream) -> Result<cuda::CUevent, cuda::CUresult> {
    let mut event: cuda::CUevent = std::ptr::null_mut();
    // SAFETY: a valid out-pointer; the caller vouches for the context and stream.
    unsafe {
        let created = cuda::cuEventCreate(
            &mut event,
            cuda::CUevent_flags_enum::CU_EVENT_DISABLE_TIMING as u32,
        );
        if created != cuda::CUresult::CUDA_SUCCESS {
            return Err(created);
        }
        match cuda::cuEventRecord(event, stream) {
            cuda::CUresult::CUDA_SUCCESS => Ok(event),
            failed => {
                let _ = cuda::cuEventDestroy_v2(event);
                Err(failed)
            }
        }
    }
}

/// A CUDA stream, shared with nothing: the communicator's.
#[derive(Debug)]
struct CommStream(cuda::CUstream);

// SAFETY: a CUDA stream handle may be used from any thread of the process
// (with the context current); it is only used by the rank's calls.
unsafe impl Send for CommStream {}

/// One rank's NCCL communicator, with its stream and its watchdog.
#[derive(Debug)]
pub struct NcclCollective {
    nccl: &'static Nccl,
    shared: Shared,
    /// The stream the collectives run on.
    stream: CommStream,
    /// The CUDA context of the rank's device (made current by each call:
    /// the overlapped reduction calls from a thread of its own).
    context: usize,
    rank: usize,
    world: usize,
    timeout: Duration,
    watchdog: Option<std::thread::JoinHandle<()>>,
}

impl NcclCollective {
    /// Joins the clique `id` as `rank` of `world` (the current CUDA device
    /// must already be this rank's; libtorch selects it when tensors are
    /// placed on it), non-blocking, with a watchdog that aborts a collective
    /// running longer than `timeout` (and the joining itself).
    pub fn new(
        id: &[u8],
        rank: usize,
        world: usize,
        timeout: Duration,
    ) -> Result<NcclCollective, CollectiveError> {
        let nccl = Nccl::get().map_err(|e| match e {
            CollectiveError::Nccl(why) => CollectiveError::Nccl(format!("rank {rank}: {why}")),
            other => other,
        })?;
        if id.len() != 128 {
            return Err(CollectiveError::Nccl(format!(
                "rank {rank}: unique id has {} bytes, expected 128",
                id.len()
            )));
        }
        let mut unique = sys::ncclUniqueId { internal: [0; 128] };
        for (dst, src) in unique.internal.iter_mut().zip(id) {
            *dst = *src as _;
        }
        // The watchdog queries events from its own thread: it needs this
        // thread's CUDA context (the device's primary one, libtorch's).
        let mut context: cuda::CUcontext = std::ptr::null_mut();
        // SAFETY: plain driver calls with a valid out-pointer.
        let ctx_ok = unsafe {
            cuda::cuInit(0) == cuda::CUresult::CUDA_SUCCESS
                && cuda::cuCtxGetCurrent(&mut context) == cuda::CUresult::CUDA_SUCCESS
        };
        if !ctx_ok || context.is_null() {
            return Err(CollectiveError::Nccl(format!(
                "rank {rank}: no current CUDA context on this thread (select the device first)"
            )));
        }
        // Started now, so that a failure always finds it (see exit_timer).
        exit_timer::start().map_err(|e| {
            CollectiveError::Nccl(format!("rank {rank}: starting the NCCL exit timer: {e}"))
        })?;
        let mut comm = std::ptr::null_mut();
        let mut config = non_blocking_config();
        // SAFETY: the device is current (checked above); `comm` and `config`
        // are valid pointers, and NCCL initialises `comm`.
        let code = unsafe {
            nccl.comm_init_rank_config(
                &mut comm,
                world as c_int,
                unique,
                rank as c_int,
                &mut config,
            )
        };
        if !matches!(code, library::SUCCESS | library::IN_PROGRESS) {
            return Err(CollectiveError::Nccl(format!(
                "rank {rank}: ncclCommInitRankConfig (rank {rank} of {world}): {}",
                nccl.describe(code)
            )));
        }
        let shared: Shared = Arc::new(Flags {
            state: Mutex::new(State { comm: Some(Comm(comm)), ..State::default() }),
            ..Flags::default()
        });
        // Joining is asynchronous: wait for it, up to the timeout.
        let deadline = Instant::now() + timeout;
        if let Err(unfinished) = wait_until_done(nccl, Comm(comm), deadline) {
            let failure = match unfinished {
                Unfinished::Failed(e) => {
                    e.failure(format!("rank {rank}: joining the NCCL clique failed: {e}"))
                }
                Unfinished::TimedOut => Failure::Collective(format!(
                    "rank {rank}: joining the NCCL clique of {world} ranks did not finish \
                     within {} s (distributed.collective_timeout_secs): a rank is missing",
                    timeout.as_secs()
                )),
            };
            return Err(fail(nccl, &shared, &mut lock(&shared), failure));
        }
        let mut stream: cuda::CUstream = std::ptr::null_mut();
        // SAFETY: valid out-pointer; the context is current on this thread.
        let created = unsafe {
            cuda::cuStreamCreate(&mut stream, cuda::CUstream_flags::CU_STREAM_NON_BLOCKING as u32)
        };
        if created != cuda::CUresult::CUDA_SUCCESS {
            let why = format!("rank {rank}: creating the NCCL stream: {created:?}");
            return Err(fail(nccl, &shared, &mut lock(&shared), Failure::Local(why)));
        }
        let context = context as usize;
        let dog = Arc::clone(&shared);
        // The watchdog logs where this thread logs (a rank's log file is
        // this thread's default subscriber, not the process's).
        let log = tracing::dispatcher::get_default(|log| log.clone());
        let watchdog =
            std::thread::Builder::new().name(format!("nccl-watchdog-{rank}")).spawn(move || {
                let _log = tracing::dispatcher::set_default(&log);
                watch(nccl, dog, context as cuda::CUcontext, rank)
            });
        let watchdog = match watchdog {
            Ok(watchdog) => watchdog,
            Err(e) => {
                let why = format!("rank {rank}: starting the NCCL watchdog: {e}");
                let error = fail(nccl, &shared, &mut lock(&shared), Failure::Local(why));
                // SAFETY: created above, used by nothing (the communicator is aborted).
                let _ = unsafe { cuda::cuStreamDestroy_v2(stream) };
                return Err(error);
            }
        };
        Ok(NcclCollective {
            nccl,
            shared,
            stream: CommStream(stream),
            context,
            rank,
            world,
            timeout,
            watchdog: Some(watchdog),
        })
    }

    /// The device buffer's pointer, length, NCCL type and the type's name.
    fn device_buffer(
        buffer: Buffer<'_>,
    ) -> Result<(u64, usize, c_int, &'static str), CollectiveError> {
        match buffer {
            Buffer::Cuda(memory) => {
                let (kind, name) = match memory.element() {
                    DeviceElement::F32 => (library::element::F32, "f32"),
                    DeviceElement::Bf16 => (library::element::BF16, "bf16"),
                };
                Ok((memory.ptr(), memory.len(), kind, name))
            }
            other => {
                Err(CollectiveError::WrongMemory { backend: "NCCL", location: other.location() })
            }
        }
    }

    /// Makes the communicator's stream wait for the work queued so far on
    /// libtorch's default stream (the legacy null stream).
    fn wait_for_default_stream(&self) -> Result<(), String> {
        // SAFETY: the context is the rank's device's; the event is recorded
        // on the null stream, waited on by our stream, and destroyed (CUDA
        // releases it once the wait no longer needs it).
        let code = unsafe {
            match cuda::cuCtxSetCurrent(self.context as cuda::CUcontext) {
                cuda::CUresult::CUDA_SUCCESS => match record_event(std::ptr::null_mut()) {
                    Ok(event) => {
                        let code = cuda::cuStreamWaitEvent(self.stream.0, event, 0);
                        let _ = cuda::cuEventDestroy_v2(event);
                        code
                    }
                    Err(code) => code,
                },
                failed => failed,
            }
        };
        if code == cuda::CUresult::CUDA_SUCCESS {
            Ok(())
        } else {
            Err(format!("ordering the NCCL stream after the default stream: {code:?}"))
        }
    }

    /// Enqueues one collective with `enqueue`, waits (up to the timeout)
    /// until NCCL has taken it, and hands its completion to the watchdog.
    fn run(
        &mut self,
        what: String,
        enqueue: impl FnOnce(&Nccl, sys::ncclComm_t, cuda::CUstream) -> c_int,
    ) -> Result<(), CollectiveError> {
        let (rank, nccl) = (self.rank, self.nccl);
        let mut state = lock(&self.shared);
        if let Some(failed) = &state.failed {
            return Err(failed.error());
        }
        let Some(comm) = state.comm else {
            return Err(CollectiveError::Nccl(format!("rank {rank}: the communicator is gone")));
        };
        if let Err(e) = self.wait_for_default_stream() {
            let why = format!("rank {rank}: {what}: {e}");
            return Err(fail(nccl, &self.shared, &mut state, Failure::Local(why)));
        }
        let started = Instant::now();
        let deadline = started + self.timeout;
        let code = enqueue(nccl, comm.0, self.stream.0);
        if !matches!(code, library::SUCCESS | library::IN_PROGRESS) {
            // SAFETY: the communicator is live until the abort below.
            let detail = unsafe { nccl.last_error(comm.0) };
            let why = format!(
                "rank {rank}: {what}: NCCL refused it: {}",
                with_detail(nccl.describe(code), detail)
            );
            return Err(fail(nccl, &self.shared, &mut state, Failure::Local(why)));
        }
        if let Err(unfinished) = wait_until_done(nccl, comm, deadline) {
            let failure = match unfinished {
                Unfinished::Failed(e) => e.failure(format!("rank {rank}: {what}: NCCL error {e}")),
                Unfinished::TimedOut => Failure::Collective(format!(
                    "rank {rank}: {what}: NCCL did not take it within {} s \
                     (distributed.collective_timeout_secs); communicator aborted",
                    self.timeout.as_secs()
                )),
            };
            return Err(fail(nccl, &self.shared, &mut state, failure));
        }
        // SAFETY: our stream is the one the collective was enqueued on.
        let event = match unsafe { record_event(self.stream.0) } {
            Ok(event) => event,
            Err(code) => {
                let why = format!("rank {rank}: {what}: recording its CUDA event failed: {code:?}");
                return Err(fail(nccl, &self.shared, &mut state, Failure::Local(why)));
            }
        };
        state.pending.push_back(Pending { event: event as usize, what, deadline });
        Ok(())
    }
}

/// The watchdog: retires completed collectives, and aborts on an
/// asynchronous error or a collective past its deadline.
fn watch(nccl: &Nccl, shared: Shared, context: cuda::CUcontext, rank: usize) {
    // SAFETY: `context` is the rank thread's current context, kept alive by
    // libtorch for the life of the process.
    if unsafe { cuda::cuCtxSetCurrent(context) } != cuda::CUresult::CUDA_SUCCESS {
        let why = format!("rank {rank}: the NCCL watchdog cannot use the CUDA context");
        abort(nccl, &shared, &mut lock(&shared), Failure::Local(why));
    }
    while !shared.stop.load(Ordering::SeqCst) {
        std::thread::sleep(POLL);
        let mut state = lock(&shared);
        if let Some(failure) = overdue_or_failed(nccl, &mut state, rank) {
            abort(nccl, &shared, &mut state, failure);
        }
    }
}

/// One look of the watchdog: retires the completed collectives and answers
/// why the communicator must be aborted, if it must.
fn overdue_or_failed(nccl: &impl WatchdogCalls, state: &mut State, rank: usize) -> Option<Failure> {
    let comm = state.comm?;
    while let Some(first) = state.pending.front() {
        // SAFETY: the event is live until destroyed here or in `abort`.
        match unsafe { nccl.event_query(first.event) } {
            EventState::Done => {
                if let Some(done) = state.pending.pop_front() {
                    // SAFETY: destroyed once, after completion.
                    unsafe { nccl.event_destroy(done.event) };
                }
            }
            EventState::Running => break,
            EventState::Failed(error) => {
                let why = format!("rank {rank}: {}: {error}", first.what);
                return Some(Failure::Local(why));
            }
        }
    }
    if let Some(p) = state.pending.front().filter(|p| Instant::now() > p.deadline) {
        return Some(Failure::Collective(format!(
            "rank {rank}: {} did not complete within the collective timeout \
             (distributed.collective_timeout_secs): a peer is stopped, hung or \
             unreachable; NCCL communicator aborted",
            p.what
        )));
    }
    match async_state(nccl, comm) {
        Err(e) => {
            let what = state.pending.front().map_or("the communicator", |p| p.what.as_str());
            Some(e.failure(format!("rank {rank}: {what}: NCCL asynchronous error {e}")))
        }
        Ok(_) => None,
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(watchdog) = self.watchdog.take() {
            let _ = watchdog.join();
        }
        let mut state = lock(&self.shared);
        // After a failure, and while unwinding from a panic, this rank's
        // peers are in an unknown state: the communicator is aborted. A
        // healthy one ends in NCCL's documented order, and is aborted if
        // that fails or outlasts the collective timeout.
        let ending = if state.failed.is_some() || std::thread::panicking() {
            Err(format!(
                "rank {}: the NCCL communicator was dropped after a failure or while \
                 unwinding; aborted",
                self.rank
            ))
        } else {
            self.end_in_order(&mut state)
        };
        if let Err(why) = ending {
            abort(self.nccl, &self.shared, &mut state, Failure::Local(why));
        }
        // SAFETY: created in `new`, destroyed once; CUDA releases it once
        // the work queued on it (if any) is done.
        let _ = unsafe { cuda::cuStreamDestroy_v2(self.stream.0) };
    }
}

impl NcclCollective {
    /// The orderly end of a healthy communicator: the outstanding
    /// collectives complete, each by its own deadline as the watchdog
    /// would have it (which retires finished ones only every [`POLL`]),
    /// `ncclCommFinalize` is polled until done, up to the collective
    /// timeout, then `ncclCommDestroy` frees it. `ncclCommDestroy` alone
    /// would do the finalizing work (syncing NCCL's streams, stopping its
    /// proxy) blocking, even on a non-blocking communicator, with no
    /// deadline; finalized first, that work runs on NCCL's thread under the
    /// timeout, and only local memory is left for the destroy. The error
    /// says what did not finish; the caller aborts.
    fn end_in_order(&self, state: &mut State) -> Result<(), String> {
        let ending = format!("rank {}: ending the NCCL communicator", self.rank);
        // The thread that drops may not be the one that made the
        // communicator (the overlapped reduction has its own).
        // SAFETY: the rank's device's context, alive for the process.
        let current = unsafe { cuda::cuCtxSetCurrent(self.context as cuda::CUcontext) };
        if current != cuda::CUresult::CUDA_SUCCESS {
            return Err(format!("{ending}: cannot use the CUDA context: {current:?}"));
        }
        let Some(comm) = state.comm else {
            return Ok(());
        };
        // The watchdog's part, now that it has stopped: each outstanding
        // collective by its own deadline, an NCCL error (a peer lost)
        // noticed meanwhile.
        let mut backoff = Backoff::new();
        loop {
            if let Some(failure) = overdue_or_failed(self.nccl, state, self.rank) {
                return Err(failure.why().to_string());
            }
            if state.pending.is_empty() {
                break;
            }
            backoff.pause();
        }
        // SAFETY: live and idle (every collective completed above); after
        // this it is only polled, then destroyed.
        let code = unsafe { self.nccl.comm_finalize(comm.0) };
        if !matches!(code, library::SUCCESS | library::IN_PROGRESS) {
            return Err(format!("{ending}: ncclCommFinalize: {}", self.nccl.describe(code)));
        }
        let deadline = Instant::now() + self.timeout;
        wait_until_done(self.nccl, comm, deadline).map_err(|unfinished| match unfinished {
            Unfinished::Failed(e) => format!("{ending}: ncclCommFinalize: {e}"),
            Unfinished::TimedOut => format!(
                "{ending}: ncclCommFinalize did not finish within {} s \
                 (distributed.collective_timeout_secs)",
                self.timeout.as_secs()
            ),
        })?;
        state.comm = None;
        // SAFETY: finalized above, and never used again (taken).
        let code = unsafe { self.nccl.comm_destroy(comm.0) };
        if !matches!(code, library::SUCCESS | library::IN_PROGRESS) {
            // Finalized: its peers are done with it. Only local memory is
            // left, which the process's exit returns.
            tracing::warn!(
                "rank {}: ncclCommDestroy after ncclCommFinalize: {}",
                self.rank,
                self.nccl.describe(code)
            );
        }
        Ok(())
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn reduces_device_memory(&self) -> bool {
        true
    }

    fn sums_bf16(&self) -> bool {
        true
    }

    fn all_reduce_sum(&mut self, buffer: Buffer<'_>) -> Result<(), CollectiveError> {
        let (ptr, len, kind, name) = Self::device_buffer(buffer)?;
        let p = ptr as *mut std::ffi::c_void;
        self.run(format!("ncclAllReduce of {len} {name}"), |nccl, comm, stream| {
            // SAFETY: `ptr` is a live device allocation of `len` elements of
            // `kind`, used by nothing else until the caller's join (the
            // contract of `CudaBuffer::new`); `comm` is live and `stream` is
            // the communicator's.
            unsafe { nccl.all_reduce_sum(p, len, kind, comm, stream as _) }
        })
    }

    fn broadcast(&mut self, buffer: Buffer<'_>, root: usize) -> Result<(), CollectiveError> {
        crate::check_root(self.rank, self.world, root)?;
        let (ptr, len, kind, name) = Self::device_buffer(buffer)?;
        let p = ptr as *mut std::ffi::c_void;
        self.run(format!("ncclBroadcast of {len} {name} from rank {root}"), |nccl, comm, stream| {
            // SAFETY: as for all_reduce_sum.
            unsafe { nccl.broadcast(p, len, kind, root as c_int, comm, stream as _) }
        })
    }

    fn join(&mut self) -> Result<(), CollectiveError> {
        let (rank, nccl) = (self.rank, self.nccl);
        let mut state = lock(&self.shared);
        if let Some(failed) = &state.failed {
            return Err(failed.error());
        }
        // Our stream runs its collectives in order: waiting for the last
        // one's event waits for all. An empty queue: the watchdog retired
        // them all, complete.
        let Some(last) = state.pending.back() else { return Ok(()) };
        // SAFETY: the context is the rank's device's; the event is live
        // while it is in the queue (we hold the lock the watchdog takes to
        // destroy it), and the null stream is libtorch's default stream.
        let code = unsafe {
            match cuda::cuCtxSetCurrent(self.context as cuda::CUcontext) {
                cuda::CUresult::CUDA_SUCCESS => {
                    cuda::cuStreamWaitEvent(std::ptr::null_mut(), last.event as cuda::CUevent, 0)
                }
                failed => failed,
            }
        };
        if code != cuda::CUresult::CUDA_SUCCESS {
            let why = format!("rank {rank}: ordering the default stream after NCCL: {code:?}");
            return Err(fail(nccl, &self.shared, &mut state, Failure::Local(why)));
        }
        Ok(())
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        Err(CollectiveError::WrongMemory { backend: "NCCL", location: "host memory (barrier)" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::HashMap;

    /// The watchdog's calls, played: events by number, the communicator's
    /// asynchronous state, and what was aborted, destroyed and armed.
    struct Fake {
        events: RefCell<HashMap<usize, EventState>>,
        async_answer: RefCell<Result<c_int, c_int>>,
        aborted: RefCell<usize>,
        destroyed: RefCell<Vec<usize>>,
        armed: RefCell<Vec<(String, i32)>>,
    }

    impl Fake {
        fn new(events: &[(usize, EventState)], async_answer: Result<c_int, c_int>) -> Fake {
            Fake {
                events: RefCell::new(events.iter().cloned().collect()),
                async_answer: RefCell::new(async_answer),
                aborted: RefCell::new(0),
                destroyed: RefCell::new(Vec::new()),
                armed: RefCell::new(Vec::new()),
            }
        }
    }

    impl WatchdogCalls for Fake {
        unsafe fn async_error(&self, _comm: Comm) -> Result<c_int, c_int> {
            *self.async_answer.borrow()
        }
        fn describe(&self, status: c_int) -> String {
            format!("status {status}")
        }
        unsafe fn last_error(&self, _comm: Comm) -> String {
            "the peer's socket closed".into()
        }
        unsafe fn comm_abort(&self, _comm: Comm) {
            *self.aborted.borrow_mut() += 1;
        }
        unsafe fn event_query(&self, event: usize) -> EventState {
            self.events.borrow()[&event].clone()
        }
        unsafe fn event_destroy(&self, event: usize) {
            self.destroyed.borrow_mut().push(event);
        }
        fn arm_exit(&self, why: &str, status: i32) {
            self.armed.borrow_mut().push((why.to_string(), status));
        }
    }

    /// A live (played) communicator with collectives `pending`: (event,
    /// what, seconds to its deadline, negative when past).
    fn state(pending: &[(usize, &str, f64)]) -> State {
        let now = Instant::now();
        let at = |secs: f64| match secs >= 0.0 {
            true => now + Duration::from_secs_f64(secs),
            false => now - Duration::from_secs_f64(-secs),
        };
        State {
            comm: Some(Comm(std::ptr::null_mut())),
            pending: pending
                .iter()
                .map(|&(event, what, secs)| Pending {
                    event,
                    what: what.into(),
                    deadline: at(secs),
                })
                .collect(),
            failed: None,
        }
    }

    #[test]
    fn completed_collectives_are_retired_in_order_and_a_healthy_one_is_left_alone() {
        use EventState::{Done, Running};
        let fake =
            Fake::new(&[(1, Done), (2, Done), (3, Running), (4, Done)], Ok(library::IN_PROGRESS));
        let mut state = state(&[(1, "a", 60.0), (2, "b", 60.0), (3, "c", 60.0), (4, "d", 60.0)]);
        assert!(overdue_or_failed(&fake, &mut state, 0).is_none());
        // Up to the first still running: 4 completes after 3 on one stream.
        assert_eq!(*fake.destroyed.borrow(), [1, 2]);
        let left: Vec<usize> = state.pending.iter().map(|p| p.event).collect();
        assert_eq!(left, [3, 4]);
        assert_eq!((*fake.aborted.borrow(), fake.armed.borrow().len()), (0, 0));
    }

    #[test]
    fn a_collective_past_its_deadline_aborts_once_as_a_peers_failure_naming_it() {
        use EventState::{Done, Running};
        let fake = Fake::new(&[(1, Done), (2, Running)], Ok(library::SUCCESS));
        let mut state =
            state(&[(1, "ncclAllReduce of 8 f32", -5.0), (2, "ncclAllReduce of 10 f32", -1.0)]);
        let failure = overdue_or_failed(&fake, &mut state, 3).expect("an overdue collective");
        let why = failure.why().to_string();
        assert!(
            matches!(&failure, Failure::Collective(_))
                && why.starts_with(
                    "rank 3: ncclAllReduce of 10 f32 did not complete within the \
                                    collective timeout"
                ),
            "{failure:?}"
        );
        let flags = Flags::default();
        abort(&fake, &flags, &mut state, failure.clone());
        assert_eq!(*fake.aborted.borrow(), 1);
        assert_eq!(*fake.destroyed.borrow(), [1, 2], "the retired event, then the outstanding one");
        assert_eq!(*fake.armed.borrow(), [(why.clone(), PEER_UNKNOWN_EXIT_STATUS)]);
        assert!(state.comm.is_none() && state.pending.is_empty());
        assert!(matches!(failure.error(), CollectiveError::NcclCollectiveFailed(_)));
        // A later failure (a call meeting the aborted communicator) aborts
        // nothing more, arms nothing more, and the first failure stays.
        abort(&fake, &flags, &mut state, Failure::Local("rank 3: later".into()));
        assert_eq!((*fake.aborted.borrow(), fake.armed.borrow().len()), (1, 1));
        assert_eq!(state.failed.as_ref().map(Failure::why), Some(why.as_str()));
        // With no communicator left, the watchdog has nothing to look at.
        assert!(overdue_or_failed(&fake, &mut state, 3).is_none());
    }

    #[test]
    fn a_remote_error_blames_a_peer_and_any_other_error_is_the_ranks_own() {
        let pending = [(1, "ncclBroadcast of 4 f32 from rank 0", 60.0)];
        let running = [(1, EventState::Running)];
        let remote = Fake::new(&running, Ok(library::REMOTE_ERROR));
        let failure = overdue_or_failed(&remote, &mut state(&pending), 1).expect("remote error");
        assert!(matches!(failure, Failure::Collective(_)), "{failure:?}");
        assert_eq!(
            failure.why(),
            "rank 1: ncclBroadcast of 4 f32 from rank 0: NCCL asynchronous error status 6: the \
             peer's socket closed"
        );
        assert_eq!(failure.exit_status(), PEER_UNKNOWN_EXIT_STATUS);
        // A system error (2) is this rank's own: exit status 1.
        let own = Fake::new(&running, Ok(2));
        let failure = overdue_or_failed(&own, &mut state(&pending), 1).expect("own error");
        assert!(matches!(failure, Failure::Local(_)) && failure.exit_status() == 1, "{failure:?}");
        // So is the query's own failure.
        let call = Fake::new(&running, Err(5));
        let failure = overdue_or_failed(&call, &mut state(&pending), 1).expect("call failure");
        assert!(failure.why().contains("ncclCommGetAsyncError failed: status 5"), "{failure:?}");
        assert!(matches!(failure, Failure::Local(_)));
        // A CUDA error on a collective's event is this rank's, naming it.
        let cuda = Fake::new(&[(1, EventState::Failed("CUDA error 700".into()))], Ok(0));
        let failure = overdue_or_failed(&cuda, &mut state(&pending), 1).expect("CUDA error");
        assert_eq!(failure.why(), "rank 1: ncclBroadcast of 4 f32 from rank 0: CUDA error 700");
        assert!(matches!(failure, Failure::Local(_)));
    }

    #[test]
    fn a_wait_for_nccl_ends_at_its_deadline_or_at_an_error() {
        let comm = Comm(std::ptr::null_mut());
        let busy = Fake::new(&[], Ok(library::IN_PROGRESS));
        let started = Instant::now();
        let waited = wait_until_done(&busy, comm, started + Duration::from_millis(30));
        assert!(matches!(waited, Err(Unfinished::TimedOut)));
        assert!(started.elapsed() >= Duration::from_millis(30));
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
        let done = Fake::new(&[], Ok(library::SUCCESS));
        assert!(wait_until_done(&done, comm, Instant::now()).is_ok());
        let failed = Fake::new(&[], Ok(library::REMOTE_ERROR));
        match wait_until_done(&failed, comm, Instant::now() + Duration::from_secs(60)) {
            Err(Unfinished::Failed(e)) => assert!(e.remote, "{e}"),
            _ => panic!("a remote error was not reported"),
        }
    }

    #[test]
    fn host_waits_look_again_within_microseconds_then_back_off_to_a_millisecond() {
        let mut backoff = Backoff::new();
        let pauses: Vec<Duration> = (0..16).map(|_| backoff.next_pause()).collect();
        // NCCL takes a collective within microseconds: the first looks come
        // that soon (a fixed 50 ms poll cost 50 ms per collective).
        assert!(pauses[0] <= Duration::from_micros(10), "{pauses:?}");
        assert!(pauses[..4].iter().sum::<Duration>() < Duration::from_micros(100), "{pauses:?}");
        assert!(pauses.windows(2).all(|w| w[1] >= w[0]), "{pauses:?}");
        assert_eq!(pauses[15], LONGEST_PAUSE, "{pauses:?}");
        assert!(pauses.iter().all(|p| *p <= LONGEST_PAUSE), "{pauses:?}");
    }

    #[test]
    fn the_config_is_nccl_2_28s_initializer_made_non_blocking() {
        let config = non_blocking_config();
        assert_eq!(config.size, std::mem::size_of::<sys::ncclConfig_t>());
        assert_eq!(config.magic, 0xcafe_beef);
        assert_eq!(config.version / 100, 228);
        assert_eq!(config.blocking, 0);
        assert_eq!((config.minCTAs, config.nvlinkCentricSched), (i32::MIN, i32::MIN));
        assert!(config.netName.is_null() && config.commName.is_null());
    }
}
