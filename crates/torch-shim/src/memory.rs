//! GPU memory statistics of libtorch's caching allocator: the peak bytes
//! allocated to tensors and reserved from the driver since the last reset
//! (`torch.cuda.max_memory_allocated` / `max_memory_reserved`), through the
//! device-generic `c10::getDeviceAllocator`, so the shim needs no CUDA headers.

use std::ffi::c_char;

/// Peak memory of one GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeakMemory {
    /// Peak bytes held by tensors.
    pub allocated_bytes: u64,
    /// Peak bytes the caching allocator reserved from the driver.
    pub reserved_bytes: u64,
}

/// Errors of the statistics calls.
#[derive(Debug, thiserror::Error)]
#[error("GPU {device}: memory statistics: {message}")]
pub struct MemoryError {
    /// The device index.
    pub device: usize,
    /// libtorch's message.
    pub message: String,
}

extern "C" {
    fn rsb_cuda_peak_memory(
        device: i32,
        reset: i32,
        allocated: *mut u64,
        reserved: *mut u64,
        error: *mut c_char,
        error_len: usize,
    ) -> i32;
}

/// The peak memory of CUDA device `device` since the last reset (or the
/// start), resetting the peaks afterwards when `reset` is set (so the next
/// call measures a new window).
pub fn cuda_peak_memory(device: usize, reset: bool) -> Result<PeakMemory, MemoryError> {
    let mut allocated = 0u64;
    let mut reserved = 0u64;
    let index = i32::try_from(device)
        .map_err(|_| MemoryError { device, message: "no such device index".into() })?;
    // SAFETY: plain out-pointers to locals and a writable message buffer.
    let (status, message) = crate::call_with_message(|error, error_len| unsafe {
        rsb_cuda_peak_memory(
            index,
            i32::from(reset),
            &mut allocated,
            &mut reserved,
            error,
            error_len,
        )
    });
    if status != 0 {
        return Err(MemoryError { device, message });
    }
    Ok(PeakMemory { allocated_bytes: allocated, reserved_bytes: reserved })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_cuda_the_call_fails_with_a_message_instead_of_crashing() {
        if tch::Cuda::is_available() {
            // The allocator initialises with the first CUDA tensor.
            let _t = tch::Tensor::zeros([1024], (tch::Kind::Float, tch::Device::Cuda(0)));
            let peak = cuda_peak_memory(0, false).unwrap();
            assert!(peak.allocated_bytes >= 4096, "{peak:?}");
            assert!(peak.reserved_bytes >= peak.allocated_bytes);
        } else {
            let err = cuda_peak_memory(0, false).unwrap_err();
            assert!(err.to_string().starts_with("GPU 0: memory statistics:"), "{err}");
            assert!(err.message.len() > 3, "{err}");
        }
    }
}
