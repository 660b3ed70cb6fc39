//! Post-accumulate-grad hooks on libtorch parameters.
//!
//! tch 0.24 has no autograd hooks. The shim registers, on each parameter,
//! libtorch's `PostAccumulateGradHook`: it runs right after a
//! backward pass has accumulated the parameter's gradient into `.grad`
//! (PyTorch's `Tensor.register_post_accumulate_grad_hook`), on the thread that
//! runs the backward pass. [`GradReadyHooks::install`] (unsafe: no backward
//! pass may run while hooks are installed or removed) calls a Rust closure
//! with the parameter's index there, which is what a data-parallel reducer
//! needs to start reducing a bucket while the rest of the backward pass is
//! still running. Dropping the [`GradReadyHooks`] removes the hooks.

use std::ffi::{c_char, c_void};
use std::sync::Arc;
use tch::Tensor;

/// What the hook calls: the index of the parameter whose gradient is ready.
pub type OnGradReady = Arc<dyn Fn(usize) + Send + Sync>;

/// Errors of hook registration.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// libtorch refused the hook for parameter `index`.
    #[error("parameter {index}: cannot register a gradient hook: {message}")]
    Register {
        /// The parameter's index.
        index: usize,
        /// libtorch's message.
        message: String,
    },
}

extern "C" {
    fn rsb_set_grad_ready_hook(
        tensor: *mut c_void,
        callback: extern "C" fn(*mut c_void, usize),
        context: *mut c_void,
        index: usize,
        error: *mut c_char,
        error_len: usize,
    ) -> i32;
    fn rsb_clear_grad_ready_hook(tensor: *mut c_void, context: *mut c_void) -> i32;
}

/// The trampoline libtorch's hook calls: runs the closure, never unwinds
/// into C++ (a panic aborts the process instead, as it cannot be reported
/// from inside libtorch's backward pass).
extern "C" fn trampoline(context: *mut c_void, index: usize) {
    // SAFETY: `context` is the `OnGradReady` boxed by `install`, alive until
    // the hooks are removed in `drop` (which happens before it is freed).
    let on_ready = unsafe { &*(context as *const OnGradReady) };
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| on_ready(index))).is_err() {
        eprintln!("rsb-torch-shim: the gradient-ready callback panicked; aborting");
        std::process::abort();
    }
}

/// Hooks on a set of parameters, removed when dropped.
pub struct GradReadyHooks {
    params: Vec<Tensor>,
    context: *mut OnGradReady,
}

// SAFETY: the raw context points to a `Send + Sync` closure owned by this
// value; the tensors are shallow clones (tch's `Tensor` is `Send`).
unsafe impl Send for GradReadyHooks {}

impl std::fmt::Debug for GradReadyHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GradReadyHooks").field("params", &self.params.len()).finish()
    }
}

impl GradReadyHooks {
    /// Registers a hook on every parameter (leaf tensors that require grad):
    /// after each backward pass that accumulates `params[i]`'s gradient,
    /// `on_ready(i)` runs on the backward pass's thread. A parameter holds
    /// one such hook: installing again replaces the previous one.
    ///
    /// # Safety
    ///
    /// No backward pass that reaches `params` may be running while this
    /// call runs, nor while the returned hooks are dropped, nor while
    /// another install on the same parameters runs: replacing or removing a
    /// hook frees it, and the closure's memory, with no lock against the
    /// autograd engine calling it (a backward pass on another thread, on a
    /// shallow clone of a parameter, would call freed memory). A backward
    /// pass blocks its caller until it is done, so hooks installed, used and
    /// dropped by one thread meet this.
    pub unsafe fn install(
        params: &[Tensor],
        on_ready: OnGradReady,
    ) -> Result<GradReadyHooks, HookError> {
        let context = Box::into_raw(Box::new(on_ready));
        let mut hooks = GradReadyHooks { params: Vec::with_capacity(params.len()), context };
        for (index, param) in params.iter().enumerate() {
            let mut param = param.shallow_clone();
            // SAFETY: `param` is a live tch tensor (a `torch::Tensor*` behind
            // C_tensor); `context` outlives the hook (see `drop`); the
            // message buffer is writable for its length.
            let (status, message) = crate::call_with_message(|error, error_len| unsafe {
                rsb_set_grad_ready_hook(
                    param.as_mut_ptr() as *mut c_void,
                    trampoline,
                    context as *mut c_void,
                    index,
                    error,
                    error_len,
                )
            });
            if status != 0 {
                return Err(HookError::Register { index, message });
            }
            hooks.params.push(param);
        }
        Ok(hooks)
    }

    /// Number of hooked parameters.
    pub fn len(&self) -> usize {
        self.params.len()
    }

    /// Whether no parameter is hooked.
    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }
}

impl Drop for GradReadyHooks {
    fn drop(&mut self) {
        for param in &mut self.params {
            // Only our own hook is removed: a parameter holds one hook, and a
            // later install on it (another `GradReadyHooks`) replaced ours,
            // which the shim recognises by its context pointer and leaves be.
            // SAFETY: a live tensor; `context` is only compared, not read.
            unsafe {
                rsb_clear_grad_ready_hook(
                    param.as_mut_ptr() as *mut c_void,
                    self.context as *mut c_void,
                )
            };
        }
        // SAFETY: made by `Box::into_raw` in `install`; no hook refers to it
        // now (ours were removed above, or replaced before).
        drop(unsafe { Box::from_raw(self.context) });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tch::{Device, Kind};

    #[test]
    fn hooks_fire_after_accumulation_in_backward_order_and_are_removed_on_drop() {
        let a = Tensor::ones([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let b = Tensor::ones([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let grads_at_hook = Arc::new(Mutex::new(Vec::new()));
        let (s, g) = (seen.clone(), grads_at_hook.clone());
        let params = [a.shallow_clone(), b.shallow_clone()];
        let probe = Mutex::new([a.shallow_clone(), b.shallow_clone()]);
        // SAFETY: this thread alone runs backward passes, and drops the hooks.
        let hooks = unsafe {
            GradReadyHooks::install(
                &params,
                Arc::new(move |i| {
                    s.lock().unwrap().push(i);
                    // The gradient is already accumulated when the hook runs.
                    let grad = probe.lock().unwrap()[i].grad();
                    g.lock().unwrap().push(grad.sum(Kind::Float).double_value(&[]));
                }),
            )
        }
        .unwrap();
        assert_eq!(hooks.len(), 2);
        // loss = sum(2a) + sum(3 (b * b)): grads 2 and 6 per element.
        let loss = (&a * 2.0).sum(Kind::Float) + (&b * &b * 3.0).sum(Kind::Float);
        loss.backward();
        let mut order = seen.lock().unwrap().clone();
        order.sort();
        assert_eq!(order, [0, 1]);
        let mut sums = grads_at_hook.lock().unwrap().clone();
        sums.sort_by(f64::total_cmp);
        assert_eq!(sums, [6.0, 18.0]);
        // A second backward accumulates (grads 4 and 12) and fires again.
        let loss = (&a * 2.0).sum(Kind::Float) + (&b * &b * 3.0).sum(Kind::Float);
        loss.backward();
        assert_eq!(seen.lock().unwrap().len(), 4);
        drop(hooks);
        let loss = (&a * 2.0).sum(Kind::Float);
        loss.backward();
        assert_eq!(seen.lock().unwrap().len(), 4, "a hook fired after drop");
    }

    #[test]
    fn dropping_replaced_hooks_leaves_the_newer_ones_in_place() {
        let a = Tensor::ones([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let params = [a.shallow_clone()];
        let counter = |seen: &Arc<Mutex<usize>>| -> OnGradReady {
            let seen = seen.clone();
            Arc::new(move |_| *seen.lock().unwrap() += 1)
        };
        let (old_seen, new_seen) = (Arc::new(Mutex::new(0)), Arc::new(Mutex::new(0)));
        // SAFETY (both): this thread alone runs backward passes, and drops the hooks.
        let old = unsafe { GradReadyHooks::install(&params, counter(&old_seen)) }.unwrap();
        // The second install replaces the first hook on `a`...
        let new = unsafe { GradReadyHooks::install(&params, counter(&new_seen)) }.unwrap();
        // ...and dropping the first set must not remove the second's hook.
        drop(old);
        (&a * 2.0).sum(Kind::Float).backward();
        assert_eq!((*old_seen.lock().unwrap(), *new_seen.lock().unwrap()), (0, 1));
        drop(new);
        (&a * 2.0).sum(Kind::Float).backward();
        assert_eq!(*new_seen.lock().unwrap(), 1, "a hook fired after drop");
    }

    #[test]
    fn a_tensor_that_needs_no_grad_is_refused_with_its_index() {
        let a = Tensor::ones([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let frozen = Tensor::ones([2], (Kind::Float, Device::Cpu));
        // SAFETY: no backward pass runs.
        let err = unsafe { GradReadyHooks::install(&[a, frozen], Arc::new(|_| {})) }.unwrap_err();
        assert!(err.to_string().starts_with("parameter 1:"), "{err}");
    }
}
