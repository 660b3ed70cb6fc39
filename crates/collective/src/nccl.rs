//! NCCL for GPU ranks, through `cudarc`'s raw NCCL API; `libnccl.so.2` is
//! loaded at run time (the one from the `nvidia-nccl` package that the torch
//! wheel brings, found through `LD_LIBRARY_PATH`), so nothing NCCL or CUDA is
//! needed at build time.
//!
//! Stream: collectives are enqueued on the legacy default stream (the null
//! stream), which is libtorch's default stream. Work that libtorch enqueued
//! before (the backward pass writing the gradients) therefore completes before
//! the reduction starts, and kernels enqueued after (the optimizer step) wait
//! for it, without an explicit synchronisation. Code that reads the result on
//! the host must synchronise the device first, as for any CUDA result.

use crate::{Buffer, Collective, CollectiveError};
use cudarc::nccl::{result, sys};

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

/// One rank's NCCL communicator.
#[derive(Debug)]
pub struct NcclCollective {
    comm: sys::ncclComm_t,
    rank: usize,
    world: usize,
}

// SAFETY: an NCCL communicator may be used from any thread, one at a time;
// `&mut self` on every operation gives exactly that.
unsafe impl Send for NcclCollective {}

impl NcclCollective {
    /// Joins the clique `id` as `rank` of `world` (the current CUDA device
    /// must already be this rank's; libtorch selects it when tensors are
    /// placed on it).
    pub fn new(id: &[u8], rank: usize, world: usize) -> Result<NcclCollective, CollectiveError> {
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
        let mut comm = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out-pointer; NCCL initialises it.
        unsafe { result::comm_init_rank(&mut comm, world as i32, unique, rank as i32) }.map_err(
            |e| CollectiveError::Nccl(format!("ncclCommInitRank (rank {rank} of {world}): {e:?}")),
        )?;
        Ok(NcclCollective { comm, rank, world })
    }

    fn device_buffer(buffer: Buffer<'_>) -> Result<(u64, usize), CollectiveError> {
        match buffer {
            Buffer::Cuda(device_memory) => Ok((device_memory.ptr(), device_memory.len())),
            other => {
                Err(CollectiveError::WrongMemory { backend: "NCCL", location: other.location() })
            }
        }
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        // SAFETY: the communicator was initialised and is destroyed once.
        let _ = unsafe { result::comm_destroy(self.comm) };
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, buffer: Buffer<'_>) -> Result<(), CollectiveError> {
        let (ptr, len) = Self::device_buffer(buffer)?;
        let p = ptr as *mut std::ffi::c_void;
        // SAFETY: `ptr` is a live device allocation of `len` floats, used by
        // nothing else until this stream-ordered call completes (the contract
        // of `CudaBuffer::new`); in-place reduction is allowed by NCCL.
        unsafe {
            result::all_reduce(
                p,
                p,
                len,
                sys::ncclDataType_t::ncclFloat32,
                sys::ncclRedOp_t::ncclSum,
                self.comm,
                std::ptr::null_mut(),
            )
        }
        .map(|_| ())
        .map_err(|e| CollectiveError::Nccl(format!("ncclAllReduce of {len} floats: {e:?}")))
    }

    fn broadcast(&mut self, buffer: Buffer<'_>, root: usize) -> Result<(), CollectiveError> {
        let (ptr, len) = Self::device_buffer(buffer)?;
        let p = ptr as *mut std::ffi::c_void;
        // SAFETY: as for all_reduce.
        unsafe {
            result::broadcast(
                p,
                p,
                len,
                sys::ncclDataType_t::ncclFloat32,
                root as i32,
                self.comm,
                std::ptr::null_mut(),
            )
        }
        .map(|_| ())
        .map_err(|e| CollectiveError::Nccl(format!("ncclBroadcast of {len} floats: {e:?}")))
    }
}
