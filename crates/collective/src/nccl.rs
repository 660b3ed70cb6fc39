//! NCCL for GPU ranks, through `cudarc`'s raw NCCL API; `libnccl.so.2` is
//! loaded at run time (the one from the `nvidia-nccl` package that the torch
//! wheel brings, found through `LD_LIBRARY_PATH`), so nothing NCCL or CUDA is
//! needed at build time.
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
//! collective: the next call returns it. Since the results of an aborted
//! collective are garbage, and the host may be blocked on the stream where
//! no further call comes, the watchdog ends the process (exit status 1, the
//! error on stderr) if it is still alive [`EXIT_GRACE`] later, with
//! `_exit`: no atexit handler or static destructor runs, since those of
//! CUDA and NCCL can block for ever on the very stream that hangs.
//!
//! A communicator that failed or was aborted is never destroyed with
//! `ncclCommDestroy` (which flushes outstanding work and can wait for a
//! dead peer): the watchdog and every failing call abort it, and dropping
//! one with a recorded failure or unfinished collectives aborts it too.

use crate::{Buffer, Collective, CollectiveError, DeviceElement};
use cudarc::driver::sys as cuda;
use cudarc::nccl::{result, sys};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often the watchdog and the host-side polls look at NCCL.
const POLL: Duration = Duration::from_millis(50);

/// How long the watchdog leaves the process to report an aborted
/// collective itself before it ends it.
pub const EXIT_GRACE: Duration = Duration::from_secs(20);

/// The 128 bytes that identify an NCCL clique (made by rank 0, shared by the coordinator).
pub fn unique_id() -> Result<Vec<u8>, CollectiveError> {
    let id = result::get_uniqueid()
        .map_err(|e| CollectiveError::Nccl(format!("ncclGetUniqueId: {e:?}")))?;
    Ok(id.internal.iter().map(|&c| c as u8).collect())
}

/// The loaded NCCL's version, e.g. `2.28.9`.
pub fn version() -> Result<String, CollectiveError> {
    let v = result::get_nccl_version()
        .map_err(|e| CollectiveError::Nccl(format!("ncclGetVersion: {e:?}")))?;
    Ok(format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100))
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
    failed: Option<String>,
}

type Shared = Arc<(Mutex<State>, AtomicBool)>;

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, State> {
    shared.0.lock().unwrap_or_else(|p| p.into_inner())
}

/// The asynchronous state of `comm`: `Ok(true)` done, `Ok(false)` still in
/// progress, `Err` an NCCL error.
fn async_state(comm: Comm) -> Result<bool, String> {
    let mut state = sys::ncclResult_t::ncclSuccess;
    // SAFETY: `comm` is live (callers hold it from the shared state) and
    // `state` is a valid out-pointer.
    let call = unsafe { sys::ncclCommGetAsyncError(comm.0, &mut state) };
    if call != sys::ncclResult_t::ncclSuccess {
        return Err(format!("ncclCommGetAsyncError failed: {call:?}"));
    }
    match state {
        sys::ncclResult_t::ncclSuccess => Ok(true),
        sys::ncclResult_t::ncclInProgress => Ok(false),
        other => Err(format!("{other:?}")),
    }
}

/// Aborts the communicator (once) and records `why`.
fn abort(state: &mut State, why: String) {
    if let Some(comm) = state.comm.take() {
        // SAFETY: the communicator is live and is never used again (taken).
        let _ = unsafe { result::comm_abort(comm.0) };
    }
    for pending in state.pending.drain(..) {
        // SAFETY: the event was created by `cuEventCreate` and is destroyed once.
        let _ = unsafe { cuda::cuEventDestroy_v2(pending.event as cuda::CUevent) };
    }
    state.failed.get_or_insert(why);
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
        if id.len() != 128 {
            return Err(CollectiveError::Nccl(format!(
                "unique id has {} bytes, expected 128",
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
        let mut comm = std::ptr::null_mut();
        let mut config = non_blocking_config();
        // SAFETY: `comm` and `config` are valid pointers; NCCL initialises `comm`.
        unsafe {
            result::comm_init_rank_config(&mut comm, world as i32, unique, rank as i32, &mut config)
        }
        .map_err(|e| {
            CollectiveError::Nccl(format!(
                "rank {rank}: ncclCommInitRankConfig (rank {rank} of {world}): {e:?}"
            ))
        })?;
        let shared: Shared = Arc::new((
            Mutex::new(State { comm: Some(Comm(comm)), ..State::default() }),
            AtomicBool::new(false),
        ));
        // Joining is asynchronous: wait for it, up to the timeout.
        let deadline = Instant::now() + timeout;
        loop {
            match async_state(Comm(comm)) {
                Ok(true) => break,
                Ok(false) if Instant::now() < deadline => std::thread::sleep(POLL),
                outcome => {
                    let why = match outcome {
                        Err(e) => format!("rank {rank}: joining the NCCL clique failed: {e}"),
                        _ => format!(
                            "rank {rank}: joining the NCCL clique of {world} ranks did not finish \
                             within {} s (distributed.collective_timeout_secs): a rank is missing",
                            timeout.as_secs()
                        ),
                    };
                    abort(&mut lock(&shared), why.clone());
                    return Err(CollectiveError::Nccl(why));
                }
            }
        }
        let mut stream: cuda::CUstream = std::ptr::null_mut();
        // SAFETY: valid out-pointer; the context is current on this thread.
        let created = unsafe {
            cuda::cuStreamCreate(&mut stream, cuda::CUstream_flags::CU_STREAM_NON_BLOCKING as u32)
        };
        if created != cuda::CUresult::CUDA_SUCCESS {
            let why = format!("rank {rank}: creating the NCCL stream: {created:?}");
            abort(&mut lock(&shared), why.clone());
            return Err(CollectiveError::Nccl(why));
        }
        let context = context as usize;
        let dog = Arc::clone(&shared);
        let watchdog = std::thread::Builder::new()
            .name(format!("nccl-watchdog-{rank}"))
            .spawn(move || watch(dog, context as cuda::CUcontext, rank))
            .map_err(|e| {
                CollectiveError::Nccl(format!("rank {rank}: starting the watchdog: {e}"))
            })?;
        Ok(NcclCollective {
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
    ) -> Result<(u64, usize, sys::ncclDataType_t, &'static str), CollectiveError> {
        match buffer {
            Buffer::Cuda(memory) => {
                let (kind, name) = match memory.element() {
                    DeviceElement::F32 => (sys::ncclDataType_t::ncclFloat32, "f32"),
                    DeviceElement::Bf16 => (sys::ncclDataType_t::ncclBfloat16, "bf16"),
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
        enqueue: impl FnOnce(sys::ncclComm_t, cuda::CUstream) -> sys::ncclResult_t,
    ) -> Result<(), CollectiveError> {
        let rank = self.rank;
        let mut state = lock(&self.shared);
        if let Some(failed) = &state.failed {
            return Err(CollectiveError::Nccl(failed.clone()));
        }
        let Some(comm) = state.comm else {
            return Err(CollectiveError::Nccl(format!("rank {rank}: the communicator is gone")));
        };
        if let Err(e) = self.wait_for_default_stream() {
            let why = format!("rank {rank}: {what}: {e}");
            abort(&mut state, why.clone());
            return Err(CollectiveError::Nccl(why));
        }
        let started = Instant::now();
        let deadline = started + self.timeout;
        let code = enqueue(comm.0, self.stream.0);
        if !matches!(code, sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress) {
            let why = format!("rank {rank}: {what}: NCCL refused it: {code:?}");
            abort(&mut state, why.clone());
            return Err(CollectiveError::Nccl(why));
        }
        loop {
            match async_state(comm) {
                Ok(true) => break,
                Ok(false) if Instant::now() < deadline => std::thread::sleep(POLL),
                outcome => {
                    let why = match outcome {
                        Err(e) => format!("rank {rank}: {what}: NCCL error {e}"),
                        _ => format!(
                            "rank {rank}: {what}: NCCL did not take it within {} s \
                             (distributed.collective_timeout_secs); communicator aborted",
                            self.timeout.as_secs()
                        ),
                    };
                    abort(&mut state, why.clone());
                    return Err(CollectiveError::Nccl(why));
                }
            }
        }
        // SAFETY: our stream is the one the collective was enqueued on.
        let event = match unsafe { record_event(self.stream.0) } {
            Ok(event) => event,
            Err(code) => {
                let why = format!("rank {rank}: {what}: recording its CUDA event failed: {code:?}");
                abort(&mut state, why.clone());
                return Err(CollectiveError::Nccl(why));
            }
        };
        state.pending.push_back(Pending { event: event as usize, what, deadline });
        Ok(())
    }
}

/// The watchdog: retires completed collectives, aborts on an asynchronous
/// error or a collective past its deadline, and ends the process if it is
/// still alive [`EXIT_GRACE`] after an abort.
fn watch(shared: Shared, context: cuda::CUcontext, rank: usize) {
    // SAFETY: `context` is the rank thread's current context, kept alive by
    // libtorch for the life of the process.
    if unsafe { cuda::cuCtxSetCurrent(context) } != cuda::CUresult::CUDA_SUCCESS {
        let mut state = lock(&shared);
        abort(&mut state, format!("rank {rank}: the NCCL watchdog cannot use the CUDA context"));
    }
    let mut aborted_at: Option<Instant> = None;
    while !shared.1.load(Ordering::Relaxed) {
        std::thread::sleep(POLL);
        let mut state = lock(&shared);
        if let Some(comm) = state.comm {
            while let Some(first) = state.pending.front() {
                // SAFETY: the event is live until destroyed here or in `abort`.
                match unsafe { cuda::cuEventQuery(first.event as cuda::CUevent) } {
                    cuda::CUresult::CUDA_SUCCESS => {
                        if let Some(done) = state.pending.pop_front() {
                            // SAFETY: destroyed once, after completion.
                            let _ = unsafe { cuda::cuEventDestroy_v2(done.event as cuda::CUevent) };
                        }
                    }
                    cuda::CUresult::CUDA_ERROR_NOT_READY => break,
                    other => {
                        let why = format!("rank {rank}: {}: CUDA error {other:?}", first.what);
                        abort(&mut state, why);
                        break;
                    }
                }
            }
            let overdue = state.pending.front().filter(|p| Instant::now() > p.deadline);
            if let Some(p) = overdue {
                let why = format!(
                    "rank {rank}: {} did not complete within the collective timeout \
                     (distributed.collective_timeout_secs): a peer is stopped, hung or \
                     unreachable; NCCL communicator aborted",
                    p.what
                );
                abort(&mut state, why);
            } else if let Err(e) = async_state(comm) {
                let what = state.pending.front().map_or("the communicator", |p| p.what.as_str());
                let why = format!("rank {rank}: {what}: NCCL asynchronous error {e}");
                abort(&mut state, why);
            }
        }
        if let Some(failed) = &state.failed {
            let since = *aborted_at.get_or_insert_with(|| {
                tracing::error!("{failed}");
                Instant::now()
            });
            if since.elapsed() > EXIT_GRACE {
                eprintln!("error: {failed}");
                // `_exit`, not `std::process::exit`: the latter runs the
                // atexit handlers (CUDA's and NCCL's among them), which can
                // block for ever on the stream the aborted collective hangs
                // on. stderr is unbuffered, so the message above is out.
                // SAFETY: `_exit` has no preconditions; it ends the process.
                unsafe { libc::_exit(1) };
            }
        }
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        self.shared.1.store(true, Ordering::Relaxed);
        if let Some(watchdog) = self.watchdog.take() {
            let _ = watchdog.join();
        }
        let mut state = lock(&self.shared);
        // A collective not yet complete (the watchdog retires finished ones
        // only every POLL) means a peer may never take part: destroying would
        // flush it and wait. The same holds after a failure and while
        // unwinding from a panic, when this rank's peers are in an unknown
        // state. Those cases abort the communicator; only a healthy, idle
        // one is destroyed (the orderly end NCCL documents).
        let mut unfinished = false;
        for pending in state.pending.drain(..) {
            // SAFETY: the event is live until destroyed here.
            let query = unsafe { cuda::cuEventQuery(pending.event as cuda::CUevent) };
            unfinished |= query != cuda::CUresult::CUDA_SUCCESS;
            // SAFETY: created by `cuEventCreate`, destroyed once.
            let _ = unsafe { cuda::cuEventDestroy_v2(pending.event as cuda::CUevent) };
        }
        let healthy = state.failed.is_none() && !unfinished && !std::thread::panicking();
        if let Some(comm) = state.comm.take() {
            if healthy {
                // SAFETY: the communicator was initialised, is idle, and is
                // destroyed once (taken).
                let _ = unsafe { result::comm_destroy(comm.0) };
            } else {
                // SAFETY: the communicator is live and never used again (taken).
                let _ = unsafe { result::comm_abort(comm.0) };
            }
        }
        // SAFETY: created in `new`, destroyed once; CUDA releases it once
        // the work queued on it (if any) is done.
        let _ = unsafe { cuda::cuStreamDestroy_v2(self.stream.0) };
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
        self.run(format!("ncclAllReduce of {len} {name}"), |comm, stream| {
            // SAFETY: `ptr` is a live device allocation of `len` elements of
            // `kind`, used by nothing else until the caller's join (the
            // contract of `CudaBuffer::new`); in-place reduction is allowed
            // by NCCL.
            unsafe {
                sys::ncclAllReduce(p, p, len, kind, sys::ncclRedOp_t::ncclSum, comm, stream as _)
            }
        })
    }

    fn broadcast(&mut self, buffer: Buffer<'_>, root: usize) -> Result<(), CollectiveError> {
        let (ptr, len, kind, name) = Self::device_buffer(buffer)?;
        let p = ptr as *mut std::ffi::c_void;
        self.run(format!("ncclBroadcast of {len} {name} from rank {root}"), |comm, stream| {
            // SAFETY: as for all_reduce_sum.
            unsafe { sys::ncclBroadcast(p, p, len, kind, root as i32, comm, stream as _) }
        })
    }

    fn join(&mut self) -> Result<(), CollectiveError> {
        let rank = self.rank;
        let mut state = lock(&self.shared);
        if let Some(failed) = &state.failed {
            return Err(CollectiveError::Nccl(failed.clone()));
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
            abort(&mut state, why.clone());
            return Err(CollectiveError::Nccl(why));
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
