//! Collective operations of data-parallel training behind one trait,
//! [`Collective`]: all-reduce (sum), broadcast and barrier over all ranks.
//!
//! * [`ring::TcpRing`]: CPU ranks joined in a ring of TCP connections; the
//!   all-reduce is the bandwidth-optimal ring algorithm (reduce-scatter then
//!   all-gather, `2 (N-1)/N * S` bytes sent per rank), each chunk pipelined in
//!   segments so that summing overlaps the transfer.
//! * [`nccl::NcclCollective`] (feature `nccl`): NCCL (`libnccl.so.2`,
//!   loaded at run time; the CUDA driver API through `cudarc`), on
//!   device memory (f32 or bf16), on a stream of its own that waits for the
//!   work libtorch's default stream had queued when the collective was
//!   issued; [`Collective::join`] makes the default stream wait for it in
//!   turn. So the reduction runs alongside the kernels queued after it (the
//!   rest of a backward pass) and is ordered before what reads its result.
//! * [`Single`]: world size 1, every operation a no-op.

pub mod ring;

#[cfg(feature = "nccl")]
pub mod nccl;

/// Errors of collective operations.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// A connection to a peer failed or timed out.
    #[error("rank {rank}: link to rank {peer} ({address}): {source}")]
    Link {
        /// This rank.
        rank: usize,
        /// The peer.
        peer: usize,
        /// Its address.
        address: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The peers disagree (wrong rank on a link, different buffer sizes).
    #[error("rank {rank}: {problem}")]
    Protocol {
        /// This rank.
        rank: usize,
        /// What went wrong.
        problem: String,
    },
    /// A message from a peer failed its integrity check (the TCP ring's
    /// links seal every message with AES-256-GCM; see [`ring`]): its bytes
    /// were altered, injected, dropped, repeated, reordered or replayed on
    /// the wire, or they come from a peer of another job. They were not used, and the
    /// ring is closed: every later collective on it fails.
    #[error(
        "rank {rank}: the data from rank {peer} ({address}) failed its integrity check \
         (message {message} on that link): it was altered, injected, dropped, repeated or \
         replayed on the wire, or comes from a peer of another job; it was not used, and the \
         ring is closed"
    )]
    Tampered {
        /// This rank.
        rank: usize,
        /// The peer the message came from, as far as the link says.
        peer: usize,
        /// Its address.
        address: String,
        /// The message's sequence number on the link (counted from 0 when
        /// the ring formed).
        message: u64,
    },
    /// The buffer lives where this backend cannot reach it.
    #[error("{backend} cannot reduce a buffer in {location}")]
    WrongMemory {
        /// The backend.
        backend: &'static str,
        /// Where the buffer is.
        location: &'static str,
    },
    /// A peer sent nothing (or took nothing) for the whole collective
    /// timeout: it is stopped, hung or cut off.
    #[error(
        "rank {rank}: rank {peer} ({address}) did not answer for {} s, the collective timeout \
         (distributed.collective_timeout_secs): it is stopped, hung or unreachable",
        waited.as_secs()
    )]
    Timeout {
        /// This rank.
        rank: usize,
        /// The silent peer.
        peer: usize,
        /// Its address.
        address: String,
        /// How long this rank waited.
        waited: std::time::Duration,
    },
    /// NCCL or CUDA reported an error of this rank's own (a refused call,
    /// a failed CUDA call, no library).
    #[error("nccl: {0}")]
    Nccl(String),
    /// An NCCL collective, or the joining of its clique, did not finish
    /// within the collective timeout, or NCCL reported a remote error
    /// (`ncclRemoteError`): a peer is stopped, hung, gone or unreachable,
    /// and NCCL does not say which. The coordinator blames the ranks that
    /// report nothing.
    #[error("nccl: {0}")]
    NcclCollectiveFailed(String),
    /// This rank could not start a thread it needs (a limit on processes or
    /// memory reached).
    #[error("rank {rank}: cannot start its {what} thread: {source}")]
    Thread {
        /// This rank.
        rank: usize,
        /// What the thread was for.
        what: &'static str,
        /// The operating system's error.
        source: std::io::Error,
    },
}

/// A buffer to reduce in place.
#[derive(Debug)]
pub enum Buffer<'a> {
    /// `f32` in host memory.
    Host(&'a mut [f32]),
    /// bf16 values in host memory, each as its 16 bits (the upper half of
    /// the f32 it rounds): half the bytes of [`Buffer::Host`] on the wire.
    /// Summed in f32 and rounded back to bf16 (nearest even) at each
    /// partial sum; only backends whose [`Collective::sums_bf16`] says so
    /// take it.
    HostBf16(&'a mut [u16]),
    /// Device memory, described by a [`CudaBuffer`] (only built by its
    /// `unsafe` constructor, whose caller vouches for the memory).
    Cuda(CudaBuffer),
}

impl Buffer<'_> {
    fn location(&self) -> &'static str {
        match self {
            Buffer::Host(_) => "host memory",
            Buffer::HostBf16(_) => "host memory (bf16)",
            Buffer::Cuda(_) => "CUDA device memory",
        }
    }
}

/// The element type of a [`CudaBuffer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceElement {
    /// `f32`, 4 bytes.
    F32,
    /// bf16, 2 bytes: summed by the backend in bf16 (as [`Buffer::HostBf16`]),
    /// only where [`Collective::sums_bf16`] says so.
    Bf16,
}

/// `len` elements (f32 or bf16) of CUDA device memory at `ptr` on device
/// `device`, to be reduced in place by a GPU backend.
///
/// A collective writes through the pointer, so safe code cannot build one:
/// the only constructor, [`CudaBuffer::new`], is `unsafe`. Its fields are
/// private:
///
/// ```compile_fail,E0451
/// let buffer = rsb_collective::CudaBuffer {
///     ptr: 0x1000,
///     len: 4,
///     device: 0,
///     element: rsb_collective::DeviceElement::F32,
/// };
/// ```
///
/// and the constructor needs an `unsafe` block:
///
/// ```compile_fail,E0133
/// let buffer =
///     rsb_collective::CudaBuffer::new(0x1000, 4, 0, rsb_collective::DeviceElement::F32);
/// ```
///
/// It is neither `Clone` nor `Copy`: its contract covers the one operation it
/// is passed to (by value), so safe code cannot pass it to a later one, when
/// its memory may have been freed:
///
/// ```compile_fail,E0382
/// # use rsb_collective::{Buffer, CudaBuffer, DeviceElement};
/// # fn reduce(_: Buffer<'_>) {}
/// let buffer = unsafe { CudaBuffer::new(0x1000, 4, 0, DeviceElement::F32) };
/// reduce(Buffer::Cuda(buffer));
/// reduce(Buffer::Cuda(buffer));
/// ```
#[derive(Debug, PartialEq, Eq)]
pub struct CudaBuffer {
    ptr: u64,
    len: usize,
    device: usize,
    element: DeviceElement,
}

impl CudaBuffer {
    /// Describes `len` elements of type `element` of device memory at `ptr`
    /// on CUDA device `device`.
    ///
    /// # Safety
    ///
    /// From the call until the one collective operation it is passed to has
    /// completed, which the caller learns by calling [`Collective::join`] on
    /// that backend after the operation (work queued on libtorch's default
    /// stream after the join runs after the operation):
    ///
    /// * `ptr` points to a live allocation of at least `len` contiguous
    ///   elements of type `element` (4 or 2 bytes each) in the memory of CUDA
    ///   device `device`, which is the device of the communicator the buffer
    ///   is passed to, and the values to reduce are written there by work
    ///   already queued on libtorch's default stream (or done);
    /// * nothing else reads or writes that memory meanwhile (no other mutable
    ///   alias, no kernel queued on any stream before the join), and it is
    ///   not freed: the caller keeps the allocation (the tensor) alive until
    ///   after the join, so that libtorch's caching allocator can only hand
    ///   it out again to work ordered after the operation.
    pub unsafe fn new(ptr: u64, len: usize, device: usize, element: DeviceElement) -> CudaBuffer {
        CudaBuffer { ptr, len, device, element }
    }

    /// The device pointer.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The element type.
    pub fn element(&self) -> DeviceElement {
        self.element
    }

    /// Whether the buffer holds no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The CUDA device index.
    pub fn device(&self) -> usize {
        self.device
    }
}

/// The collective operations a data-parallel trainer needs.
pub trait Collective: Send {
    /// This rank.
    fn rank(&self) -> usize;

    /// Number of ranks.
    fn world_size(&self) -> usize;

    /// Replaces `buffer` on every rank by the element-wise sum over all ranks.
    fn all_reduce_sum(&mut self, buffer: Buffer<'_>) -> Result<(), CollectiveError>;

    /// Replaces `buffer` on every rank by rank `root`'s.
    fn broadcast(&mut self, buffer: Buffer<'_>, root: usize) -> Result<(), CollectiveError>;

    /// Whether [`Buffer::Cuda`] can be handed to this backend directly (NCCL);
    /// callers stage CUDA memory through host memory for the others.
    fn reduces_device_memory(&self) -> bool {
        false
    }

    /// Whether this backend sums bf16 buffers: [`Buffer::HostBf16`] (the TCP
    /// ring) or [`DeviceElement::Bf16`] device buffers (NCCL); callers that
    /// want bf16 sums otherwise round f32 buffers themselves.
    fn sums_bf16(&self) -> bool {
        false
    }

    /// Orders libtorch's default stream after every collective issued so
    /// far: work queued there after this call (reading a result, freeing a
    /// buffer) runs after them. Only a backend that runs its collectives on
    /// a stream of its own (NCCL) has anything to do; the others complete a
    /// collective before returning from it. Does not wait on the host.
    fn join(&mut self) -> Result<(), CollectiveError> {
        Ok(())
    }

    /// Returns once every rank has called it (host memory: backends that
    /// reduce device memory only override it).
    fn barrier(&mut self) -> Result<(), CollectiveError> {
        let mut token = [1.0f32];
        self.all_reduce_sum(Buffer::Host(&mut token))
    }

    /// Measures the backend's own links, where it has fixed ones: every
    /// rank sends `bytes` to the peer it sends to in an all-reduce while it
    /// receives as many from the peer it receives from, all ranks at once
    /// (each link carries one stream, as in a ring all-reduce), and learns
    /// the rate at which they arrived. `None` where the backend has no links
    /// of its own to measure: a world of one, or NCCL, which picks its own
    /// paths. Every rank calls it together.
    fn probe_incoming_link(&mut self, bytes: usize) -> Result<Option<LinkRate>, CollectiveError> {
        let _ = bytes;
        Ok(None)
    }
}

/// The measured rate of one rank's incoming link
/// ([`Collective::probe_incoming_link`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkRate {
    /// The rank at the sending end.
    pub from_rank: usize,
    /// Bytes per second that arrived, once the first ones had.
    pub bytes_per_sec: f64,
}

/// The collective of a world of one rank.
#[derive(Debug, Default)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&mut self, _buffer: Buffer<'_>) -> Result<(), CollectiveError> {
        Ok(())
    }

    fn broadcast(&mut self, _buffer: Buffer<'_>, root: usize) -> Result<(), CollectiveError> {
        check_root(0, 1, root)
    }
}

/// A broadcast's `root` must be a rank of the world: an error naming it,
/// not a buffer silently zeroed (the ring) or a communicator aborted (NCCL).
pub(crate) fn check_root(rank: usize, world: usize, root: usize) -> Result<(), CollectiveError> {
    match root < world {
        true => Ok(()),
        false => Err(CollectiveError::Protocol {
            rank,
            problem: format!("broadcast from rank {root}, which a world of {world} does not have"),
        }),
    }
}
