//! What libtorch's C++ API offers and tch 0.24 does not, through a small C++
//! shim (`src/shim.cpp`) compiled against the wheel's own headers:
//!
//! * [`hooks`]: post-accumulate-grad hooks on parameters, so that gradients
//!   can be reduced over ranks while the backward pass still runs;
//! * [`amp`]: torch's fused check-and-unscale of a list of gradients, as
//!   `GradScaler.unscale_` calls it;
//! * [`foreach`]: the L2 norm of each tensor of a list (`_foreach_norm`)
//!   and the in-place sum of two lists (`_foreach_add_`), each in one call,
//!   as timm's multi-tensor LAMB takes them;
//! * [`grads`]: setting parameters' gradients to none, as timm's
//!   `optimizer.zero_grad()` does (PyTorch's default since 2.0);
//! * [`memory`]: the caching allocator's statistics of a GPU (peak memory
//!   allocated and reserved, as `torch.cuda.max_memory_allocated` reports);
//! * [`sync_debug`]: libtorch's CUDA sync debug mode, to show that a span of
//!   work makes no synchronising CUDA call;
//! * [`op_count`]: how many times a span of work calls each ATen operator,
//!   called outside any other ATen operator;
//! * [`warnings`]: libtorch's own warnings handed to the process's logging
//!   instead of printed to stderr.
//!
//! The shim never lets a C++ exception reach Rust: failures come back as
//! messages.

#![warn(missing_docs)]
#![warn(clippy::unwrap_used)]

pub mod amp;
pub mod foreach;
pub mod grads;
pub mod hooks;
pub mod memory;
pub mod op_count;
pub mod sync_debug;
pub mod warnings;

pub use hooks::{GradReadyHooks, HookError, OnGradReady};

use std::ffi::{c_char, c_void, CStr};
use tch::Tensor;

/// The `at::Tensor*` behind each of `tensors` (tch's C_tensor), for the
/// shim; valid while `tensors` are.
pub(crate) fn tensor_pointers(tensors: &[Tensor]) -> Vec<*mut c_void> {
    tensors.iter().map(|t| t.as_ptr() as *mut c_void).collect()
}

/// As [`tensor_pointers`], for a call that takes only defined tensors: an
/// error `"{what} {index} is undefined"` names the first that is not.
pub(crate) fn defined_tensor_pointers(
    tensors: &[Tensor],
    what: &str,
) -> Result<Vec<*mut c_void>, String> {
    match tensors.iter().position(|t| !t.defined()) {
        Some(index) => Err(format!("{what} {index} is undefined")),
        None => Ok(tensor_pointers(tensors)),
    }
}

/// Makes a call into the shim with a message buffer (`call` gets its
/// pointer and length and returns the shim's status) and returns that
/// status with the message the shim wrote into the buffer (empty when it
/// wrote none).
pub(crate) fn call_with_message(call: impl FnOnce(*mut c_char, usize) -> i32) -> (i32, String) {
    let mut buffer = [0 as c_char; 512];
    let status = call(buffer.as_mut_ptr(), buffer.len());
    // SAFETY: the buffer starts zeroed and the shim writes at most its
    // length less one byte, then a NUL (`copy_message`): it always holds a
    // NUL-terminated string.
    let message = unsafe { CStr::from_ptr(buffer.as_ptr()) };
    (status, message.to_string_lossy().into_owned())
}
