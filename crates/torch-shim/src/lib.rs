//! What libtorch's C++ API offers and tch 0.24 does not, through a small C++
//! shim (`src/shim.cpp`) compiled against the wheel's own headers:
//!
//! * [`hooks`]: post-accumulate-grad hooks on parameters, so that gradients
//!   can be reduced over ranks while the backward pass still runs;
//! * [`amp`]: torch's fused check-and-unscale of a list of gradients, as
//!   `GradScaler.unscale_` calls it;
//! * [`grads`]: setting parameters' gradients to none, as timm's
//!   `optimizer.zero_grad()` does (PyTorch's default since 2.0);
//! * [`memory`]: the caching allocator's statistics of a GPU (peak memory
//!   allocated and reserved, as `torch.cuda.max_memory_allocated` reports);
//! * [`sync_debug`]: libtorch's CUDA sync debug mode, to show that a span of
//!   work makes no synchronising CUDA call.
//!
//! The shim never lets a C++ exception reach Rust: failures come back as
//! messages.

#![warn(missing_docs)]
#![warn(clippy::unwrap_used)]

pub mod amp;
pub mod grads;
pub mod hooks;
pub mod memory;
pub mod sync_debug;

pub use hooks::{GradReadyHooks, HookError, OnGradReady};
