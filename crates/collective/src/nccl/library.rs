//! NCCL's C API, loaded at run time by the name its packages give it,
//! `libnccl.so.2` (the `nvidia-nccl` wheel that torch brings, NVIDIA's
//! Debian packages). `cudarc`'s own loader tries `libnccl.so` and
//! `libnccl.so.<CUDA major>` but never `.so.2`, so it cannot find the NCCL
//! of a torch install, and it panics when it finds none; this loader is
//! tried once and answers an error naming every library it tried.
//!
//! A process that links libtorch_cuda already has `libnccl.so.2` loaded
//! (libtorch's RPATH finds it next to torch): the dynamic loader hands that
//! very copy back. The types are `cudarc`'s bindings of nccl.h 2.28 (the
//! communicator handle, the unique id and `ncclConfig_t`); statuses, element
//! types and operations cross the boundary as the C `int`s they are, so a
//! value this binding does not name is reported, never misread.

use crate::CollectiveError;
use cudarc::nccl::sys;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

/// The library names tried, in order.
pub const LIBRARY_NAMES: [&str; 2] = ["libnccl.so.2", "libnccl.so"];

/// `ncclSuccess`.
pub const SUCCESS: c_int = 0;
/// `ncclRemoteError`: a peer's process exited, or the network failed.
pub const REMOTE_ERROR: c_int = 6;
/// `ncclInProgress`: a non-blocking communicator is still working on the call.
pub const IN_PROGRESS: c_int = 7;

/// `ncclDataType_t` values (nccl.h 2.28).
pub mod element {
    use std::ffi::c_int;
    /// `ncclFloat32`.
    pub const F32: c_int = 7;
    /// `ncclBfloat16`.
    pub const BF16: c_int = 9;
}

/// `ncclSum`.
pub const SUM: c_int = 0;

/// The names of nccl.h's `ncclResult_t` values, by value.
const STATUS_NAMES: [&str; 8] = [
    "ncclSuccess",
    "ncclUnhandledCudaError",
    "ncclSystemError",
    "ncclInternalError",
    "ncclInvalidArgument",
    "ncclInvalidUsage",
    "ncclRemoteError",
    "ncclInProgress",
];

type GetVersion = unsafe extern "C" fn(*mut c_int) -> c_int;
type GetUniqueId = unsafe extern "C" fn(*mut sys::ncclUniqueId) -> c_int;
type CommInitRankConfig = unsafe extern "C" fn(
    *mut sys::ncclComm_t,
    c_int,
    sys::ncclUniqueId,
    c_int,
    *mut sys::ncclConfig_t,
) -> c_int;
type CommGetAsyncError = unsafe extern "C" fn(sys::ncclComm_t, *mut c_int) -> c_int;
type AllReduce = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    sys::ncclComm_t,
    *mut c_void,
) -> c_int;
type Broadcast = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    sys::ncclComm_t,
    *mut c_void,
) -> c_int;
type CommEnd = unsafe extern "C" fn(sys::ncclComm_t) -> c_int;
type GetErrorString = unsafe extern "C" fn(c_int) -> *const c_char;
type GetLastError = unsafe extern "C" fn(sys::ncclComm_t) -> *const c_char;

/// The loaded library and the entry points this crate calls.
#[derive(Debug)]
pub struct Nccl {
    /// The file the dynamic loader mapped (or the name it was opened by).
    path: String,
    version: c_int,
    get_unique_id: GetUniqueId,
    comm_init_rank_config: CommInitRankConfig,
    comm_get_async_error: CommGetAsyncError,
    all_reduce: AllReduce,
    broadcast: Broadcast,
    comm_abort: CommEnd,
    comm_finalize: CommEnd,
    comm_destroy: CommEnd,
    get_error_string: GetErrorString,
    get_last_error: GetLastError,
    /// Keeps the entry points above mapped for the life of the process.
    _library: libloading::Library,
}

impl Nccl {
    /// The process's NCCL, loaded on first use; the error names every
    /// library tried and the loader's answer for each.
    pub fn get() -> Result<&'static Nccl, CollectiveError> {
        static LOADED: OnceLock<Result<Nccl, String>> = OnceLock::new();
        LOADED.get_or_init(load).as_ref().map_err(|why| CollectiveError::Nccl(why.clone()))
    }

    /// The library file in use, e.g. `…/nvidia/nccl/lib/libnccl.so.2`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Its version, e.g. `2.28.9`.
    pub fn version(&self) -> String {
        let v = self.version;
        format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100)
    }

    /// `status` as NCCL's name and its own explanation, for messages.
    pub fn describe(&self, status: c_int) -> String {
        let name = usize::try_from(status)
            .ok()
            .and_then(|i| STATUS_NAMES.get(i))
            .map_or_else(|| format!("ncclResult_t {status}"), |n| (*n).to_string());
        // SAFETY: ncclGetErrorString accepts any value and returns a static
        // C string (or null, handled).
        let text = unsafe { c_text((self.get_error_string)(status)) };
        match text {
            Some(text) => format!("{name} ({text})"),
            None => name,
        }
    }

    /// The last error NCCL recorded for `comm` (empty when none).
    ///
    /// # Safety
    ///
    /// `comm` is a live communicator.
    pub unsafe fn last_error(&self, comm: sys::ncclComm_t) -> String {
        // SAFETY: the caller vouches for `comm`; the answer is NCCL's own string.
        unsafe { c_text((self.get_last_error)(comm)) }.unwrap_or_default()
    }

    /// `ncclGetUniqueId`.
    pub fn unique_id(&self) -> Result<sys::ncclUniqueId, c_int> {
        let mut id = sys::ncclUniqueId { internal: [0; 128] };
        // SAFETY: a valid out-pointer to a 128-byte id.
        status(unsafe { (self.get_unique_id)(&mut id) }).map(|()| id)
    }

    /// `ncclCommInitRankConfig`.
    ///
    /// # Safety
    ///
    /// The rank's CUDA device is current; `config` is a valid 2.28 config.
    pub unsafe fn comm_init_rank_config(
        &self,
        comm: &mut sys::ncclComm_t,
        world: c_int,
        id: sys::ncclUniqueId,
        rank: c_int,
        config: &mut sys::ncclConfig_t,
    ) -> c_int {
        // SAFETY: valid pointers; the caller vouches for the rest.
        unsafe { (self.comm_init_rank_config)(comm, world, id, rank, config) }
    }

    /// `ncclCommGetAsyncError`: `Ok(state)` or the call's own failure.
    ///
    /// # Safety
    ///
    /// `comm` is a live communicator.
    pub unsafe fn async_error(&self, comm: sys::ncclComm_t) -> Result<c_int, c_int> {
        let mut state = SUCCESS;
        // SAFETY: the caller vouches for `comm`; `state` is a valid out-pointer.
        status(unsafe { (self.comm_get_async_error)(comm, &mut state) }).map(|()| state)
    }

    /// In-place `ncclAllReduce` (sum) of `count` elements of `element` at `data`.
    ///
    /// # Safety
    ///
    /// `data` is device memory of `count` elements of `element` on the
    /// communicator's device, untouched until the collective completes;
    /// `comm` is live and `stream` a stream of that device.
    pub unsafe fn all_reduce_sum(
        &self,
        data: *mut c_void,
        count: usize,
        element: c_int,
        comm: sys::ncclComm_t,
        stream: *mut c_void,
    ) -> c_int {
        // SAFETY: the caller vouches for every argument; in place is allowed.
        unsafe { (self.all_reduce)(data, data, count, element, SUM, comm, stream) }
    }

    /// In-place `ncclBroadcast` from `root`.
    ///
    /// # Safety
    ///
    /// As [`Nccl::all_reduce_sum`].
    pub unsafe fn broadcast(
        &self,
        data: *mut c_void,
        count: usize,
        element: c_int,
        root: c_int,
        comm: sys::ncclComm_t,
        stream: *mut c_void,
    ) -> c_int {
        // SAFETY: the caller vouches for every argument; in place is allowed.
        unsafe { (self.broadcast)(data, data, count, element, root, comm, stream) }
    }

    /// `ncclCommAbort`.
    ///
    /// # Safety
    ///
    /// `comm` is live and never used again.
    pub unsafe fn comm_abort(&self, comm: sys::ncclComm_t) -> c_int {
        // SAFETY: the caller vouches for `comm`.
        unsafe { (self.comm_abort)(comm) }
    }

    /// `ncclCommFinalize`: flushes the communicator's work and ends its
    /// part in the clique; on a non-blocking communicator it answers
    /// `ncclInProgress`, and `ncclCommGetAsyncError` says when it is done.
    ///
    /// # Safety
    ///
    /// `comm` is live; afterwards it is only polled, then destroyed.
    pub unsafe fn comm_finalize(&self, comm: sys::ncclComm_t) -> c_int {
        // SAFETY: the caller vouches for `comm`.
        unsafe { (self.comm_finalize)(comm) }
    }

    /// `ncclCommDestroy`: frees what is left of a finalized communicator
    /// (blocking, even on a non-blocking communicator).
    ///
    /// # Safety
    ///
    /// `comm` is live, finalized, and never used again.
    pub unsafe fn comm_destroy(&self, comm: sys::ncclComm_t) -> c_int {
        // SAFETY: the caller vouches for `comm`.
        unsafe { (self.comm_destroy)(comm) }
    }
}

fn status(code: c_int) -> Result<(), c_int> {
    if code == SUCCESS {
        Ok(())
    } else {
        Err(code)
    }
}

/// A C string NCCL owns, copied (`None` when null or empty).
///
/// # Safety
///
/// `text` is null or a NUL-terminated string alive for the call.
unsafe fn c_text(text: *const c_char) -> Option<String> {
    if text.is_null() {
        return None;
    }
    // SAFETY: non-null and NUL-terminated (the caller's contract).
    let text = unsafe { CStr::from_ptr(text) }.to_string_lossy().trim().to_string();
    (!text.is_empty()).then_some(text)
}

fn load() -> Result<Nccl, String> {
    let mut tried = Vec::new();
    for name in LIBRARY_NAMES {
        // SAFETY: loading NCCL runs its initialisers only, which touch
        // neither CUDA nor the network.
        match unsafe { libloading::Library::new(name) } {
            Ok(library) => return entry_points(library, name),
            Err(e) => tried.push(format!("{name}: {e}")),
        }
    }
    Err(format!(
        "no NCCL library could be loaded (put the directory holding libnccl.so.2, e.g. \
         site-packages/nvidia/nccl/lib of the torch install, on LD_LIBRARY_PATH): {}",
        tried.join("; ")
    ))
}

fn entry_points(library: libloading::Library, name: &str) -> Result<Nccl, String> {
    /// One entry point, copied out of the library (valid while it is loaded).
    ///
    /// # Safety
    ///
    /// `T` is the C signature of `symbol`.
    unsafe fn entry<T: Copy>(
        library: &libloading::Library,
        name: &str,
        symbol: &str,
    ) -> Result<T, String> {
        let mut c_name = symbol.as_bytes().to_vec();
        c_name.push(0);
        // SAFETY: the caller vouches for `T`.
        unsafe { library.get::<T>(&c_name) }
            .map(|f| *f)
            .map_err(|e| format!("{name} has no {symbol}: {e}"))
    }
    // SAFETY: each type above is the nccl.h 2.28 signature of its symbol.
    let nccl = unsafe {
        let get_version: GetVersion = entry(&library, name, "ncclGetVersion")?;
        let mut version = 0;
        let status = get_version(&mut version);
        if status != SUCCESS {
            return Err(format!("{name}: ncclGetVersion answered status {status}"));
        }
        Nccl {
            path: mapped_file(get_version as *const c_void).unwrap_or_else(|| name.to_string()),
            version,
            get_unique_id: entry(&library, name, "ncclGetUniqueId")?,
            comm_init_rank_config: entry(&library, name, "ncclCommInitRankConfig")?,
            comm_get_async_error: entry(&library, name, "ncclCommGetAsyncError")?,
            all_reduce: entry(&library, name, "ncclAllReduce")?,
            broadcast: entry(&library, name, "ncclBroadcast")?,
            comm_abort: entry(&library, name, "ncclCommAbort")?,
            comm_finalize: entry(&library, name, "ncclCommFinalize")?,
            comm_destroy: entry(&library, name, "ncclCommDestroy")?,
            get_error_string: entry(&library, name, "ncclGetErrorString")?,
            get_last_error: entry(&library, name, "ncclGetLastError")?,
            _library: library,
        }
    };
    // The binding's structures are nccl.h 2.28's; an older NCCL would
    // misread the config (a newer one accepts it: the config carries its
    // version).
    if nccl.version < 22800 {
        return Err(format!(
            "{} is NCCL {}, older than 2.28, whose ncclConfig_t this build uses",
            nccl.path,
            nccl.version()
        ));
    }
    Ok(nccl)
}

/// The file mapped at `address`, from the dynamic loader.
fn mapped_file(address: *const c_void) -> Option<String> {
    let mut info = std::mem::MaybeUninit::<libc::Dl_info>::zeroed();
    // SAFETY: `info` is a valid out-pointer; dladdr reads no memory at `address`.
    let found = unsafe { libc::dladdr(address, info.as_mut_ptr()) } != 0;
    // SAFETY: zero-initialised, and filled in when `found`.
    let info = unsafe { info.assume_init() };
    // SAFETY: dli_fname is null or the loader's NUL-terminated path.
    found.then(|| unsafe { c_text(info.dli_fname) }).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_constants_are_nccls_by_name() {
        let name =
            |status: c_int| usize::try_from(status).ok().and_then(|i| STATUS_NAMES.get(i)).copied();
        assert_eq!(name(SUCCESS), Some("ncclSuccess"));
        assert_eq!(name(REMOTE_ERROR), Some("ncclRemoteError"));
        assert_eq!(name(IN_PROGRESS), Some("ncclInProgress"));
    }
}
