//! libtorch's CUDA sync debug mode (`torch.cuda.set_sync_debug_mode`): while
//! it is on, every synchronising CUDA call libtorch makes (reading a value,
//! a blocking copy, a stream synchronisation) warns, or fails with
//! "called a synchronizing CUDA operation". The trainer turns it on within
//! its updates when asked (`RSB_CUDA_SYNC_DEBUG`), which shows on a GPU that
//! an update makes none. The mode lives in libc10_cuda and is found at run
//! time; without it (a CPU-only libtorch) it is [`SyncDebugError::Unavailable`].

use std::ffi::c_char;

/// The modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncDebugMode {
    /// No check (libtorch's default).
    Off = 0,
    /// A warning on stderr for every synchronising call.
    Warn = 1,
    /// The synchronising call fails.
    Error = 2,
}

impl SyncDebugMode {
    fn from_raw(raw: i32) -> Option<SyncDebugMode> {
        match raw {
            0 => Some(SyncDebugMode::Off),
            1 => Some(SyncDebugMode::Warn),
            2 => Some(SyncDebugMode::Error),
            _ => None,
        }
    }
}

/// Errors of the mode's calls.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SyncDebugError {
    /// This libtorch has no CUDA part (libc10_cuda is not loaded).
    #[error("libtorch's CUDA sync debug mode is unavailable: this libtorch has no CUDA")]
    Unavailable,
    /// The mode held a value libtorch does not define.
    #[error("libtorch's CUDA sync debug mode holds {0}, not 0, 1 or 2")]
    Unknown(i32),
}

extern "C" {
    fn rsb_cuda_sync_debug_mode(mode: i32) -> i32;
    fn rsb_cuda_sync_debug_probe(error: *mut c_char, error_len: usize) -> i32;
}

/// Sets the mode; returns the previous one.
pub fn set_mode(mode: SyncDebugMode) -> Result<SyncDebugMode, SyncDebugError> {
    // SAFETY: no pointers; the shim checks the symbol it writes through.
    let previous = unsafe { rsb_cuda_sync_debug_mode(mode as i32) };
    decode(previous)
}

/// The current mode.
pub fn mode() -> Result<SyncDebugMode, SyncDebugError> {
    // SAFETY: as in `set_mode`; -1 only reads.
    decode(unsafe { rsb_cuda_sync_debug_mode(-1) })
}

fn decode(raw: i32) -> Result<SyncDebugMode, SyncDebugError> {
    match raw {
        -1 => Err(SyncDebugError::Unavailable),
        other => SyncDebugMode::from_raw(other).ok_or(SyncDebugError::Unknown(other)),
    }
}

/// What libtorch does at a synchronising CUDA call in the current mode,
/// without a GPU: `Ok(())` when it lets the call go on, `Err(message)` when
/// the call would fail. For tests of the mode itself.
pub fn probe() -> Result<Result<(), String>, SyncDebugError> {
    // SAFETY: a writable buffer and its length.
    let (status, message) = crate::call_with_message(|error, error_len| unsafe {
        rsb_cuda_sync_debug_probe(error, error_len)
    });
    match status {
        -1 => Err(SyncDebugError::Unavailable),
        0 => Ok(Ok(())),
        _ => Ok(Err(message)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mode_makes_libtorch_fail_a_synchronising_call_and_turns_off_again() {
        // The project's libtorch (the PyPI wheel) has its CUDA part, with or
        // without a GPU: the mode is there.
        let before = mode().unwrap();
        assert_eq!(before, SyncDebugMode::Off);
        assert_eq!(set_mode(SyncDebugMode::Error).unwrap(), SyncDebugMode::Off);
        let failed = probe().unwrap().unwrap_err();
        assert!(failed.contains("called a synchronizing CUDA operation"), "{failed}");
        assert_eq!(set_mode(SyncDebugMode::Off).unwrap(), SyncDebugMode::Error);
        assert_eq!(probe().unwrap(), Ok(()));
        assert_eq!(mode().unwrap(), SyncDebugMode::Off);
    }
}
