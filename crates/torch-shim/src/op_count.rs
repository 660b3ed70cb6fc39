//! How many times a span of work calls each ATen operator, seen through
//! libtorch's RecordFunction callbacks (what torch.profiler records): an
//! operator is counted when it is called outside any other `aten::`
//! operator, so the copy inside `aten::to` or the kernels inside
//! `aten::conv2d` are not counted again (scopes that are not operators,
//! such as the autograd engine's, do not count as outside). On a GPU each
//! counted operator that computes is at least one kernel launch, so two
//! implementations of one training step can be compared for wasted work on
//! a CPU (`bench/compare_step_ops.py`).
//!
//! The count sees the calling thread, and the threads libtorch hands that
//! thread's state to (the autograd engine's device threads), as the
//! profiler does; work on other threads is not counted. One count runs at a
//! time in the process: a count on another thread waits for it, and a
//! count started inside a running one on the same thread is an error.

use std::collections::BTreeMap;
use std::ffi::{c_char, c_void, CStr};
use std::sync::{Mutex, MutexGuard};

/// Calls of each operator, by name (`aten::conv2d`, ...).
pub type OpCounts = BTreeMap<String, u64>;

/// A failed start or stop, with the shim's message.
#[derive(Debug, thiserror::Error)]
#[error("counting ATen operators: {0}")]
pub struct OpCountError(pub String);

type CountVisitor = unsafe extern "C" fn(context: *mut c_void, name: *const c_char, count: u64);

extern "C" {
    fn rsb_op_count_start(error: *mut c_char, error_len: usize) -> i32;
    fn rsb_op_count_stop(
        visit: CountVisitor,
        context: *mut c_void,
        error: *mut c_char,
        error_len: usize,
    ) -> i32;
}

/// Held while a count runs: the shim keeps one count at a time.
static COUNTING: Mutex<()> = Mutex::new(());

thread_local! {
    /// Whether this thread holds [`COUNTING`] (a count inside a count would
    /// wait for itself).
    static COUNTING_HERE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `work` on this thread while counting the operators it calls.
pub fn count<T>(work: impl FnOnce() -> T) -> Result<(T, OpCounts), OpCountError> {
    let running = Running::start()?;
    let output = work();
    let counts = running.stop()?;
    Ok((output, counts))
}

/// A started count; stopped on the thread that started it (a `MutexGuard`
/// is not `Send`), also when `work` panics.
struct Running {
    stopped: bool,
    _one_at_a_time: MutexGuard<'static, ()>,
}

impl Running {
    fn start() -> Result<Running, OpCountError> {
        if COUNTING_HERE.get() {
            return Err(OpCountError("a count is already running on this thread".into()));
        }
        // A count that panicked stopped itself on the way out (Drop): the
        // shim's state is sound, whatever the poison says.
        let lock = COUNTING.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // SAFETY: a writable buffer and its length; the shim catches every
        // C++ exception.
        let (status, message) = crate::call_with_message(|error, error_len| unsafe {
            rsb_op_count_start(error, error_len)
        });
        if status != 0 {
            return Err(OpCountError(message));
        }
        COUNTING_HERE.set(true);
        Ok(Running { stopped: false, _one_at_a_time: lock })
    }

    fn stop(mut self) -> Result<OpCounts, OpCountError> {
        self.stopped = true;
        stop_counting()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = stop_counting();
        }
        // Not `set`, which panics once the thread's locals are torn down.
        let _ = COUNTING_HERE.try_with(|here| here.set(false));
    }
}

unsafe extern "C" fn add_count(context: *mut c_void, name: *const c_char, count: u64) {
    // SAFETY: `context` is the `OpCounts` that `stop_counting` lent for the
    // call, and `name` a NUL-terminated string the shim keeps alive for it.
    let (counts, name) = unsafe { (&mut *(context as *mut OpCounts), CStr::from_ptr(name)) };
    counts.insert(name.to_string_lossy().into_owned(), count);
}

fn stop_counting() -> Result<OpCounts, OpCountError> {
    let mut counts = OpCounts::new();
    let context = &mut counts as *mut OpCounts as *mut c_void;
    // SAFETY: `add_count` only writes into `counts`, which outlives the call;
    // the shim calls it on this thread before returning and catches every
    // C++ exception.
    let (status, message) = crate::call_with_message(|error, error_len| unsafe {
        rsb_op_count_stop(add_count, context, error, error_len)
    });
    if status != 0 {
        return Err(OpCountError(message));
    }
    Ok(counts)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

    #[test]
    fn operators_called_inside_other_operators_are_not_counted_again() {
        let a = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
        let (loss, forward) = count(|| {
            let b = &a * 3.0;
            (&b + &b).to_kind(Kind::Double).sum(Kind::Double)
        })
        .unwrap();
        // `to_kind` is aten::to, which calls _to_copy, empty_strided and
        // copy_ inside itself: only aten::to is counted.
        assert_eq!(forward.get("aten::to"), Some(&1), "{forward:?}");
        assert_eq!(forward.get("aten::_to_copy"), None, "{forward:?}");
        assert_eq!(forward.get("aten::empty_strided"), None, "{forward:?}");
        assert_eq!(forward.get("aten::copy_"), None, "{forward:?}");
        for op in ["aten::mul", "aten::add", "aten::sum"] {
            assert_eq!(forward.get(op), Some(&1), "{op}: {forward:?}");
        }
        // The backward pass runs on this thread for CPU tensors: its nodes'
        // operators are counted (the gradient of `3 * a` is a mul, the cast
        // back to f32 an aten::to).
        let ((), backward) = count(|| loss.backward()).unwrap();
        assert!(backward.get("aten::mul").is_some_and(|&n| n >= 1), "{backward:?}");
        assert_eq!(backward.get("aten::to"), Some(&1), "{backward:?}");
    }

    #[test]
    fn a_count_sees_its_own_thread_alone_and_ends_with_its_work() {
        let x = Tensor::from_slice(&[1.0f32, 2.0]);
        let other = std::thread::spawn(|| {
            let y = Tensor::from_slice(&[1.0f32]);
            for _ in 0..2_000 {
                let _ = &y.exp();
            }
        });
        let (_, counts) = count(|| x.exp()).unwrap();
        other.join().unwrap();
        assert_eq!(counts.get("aten::exp"), Some(&1), "{counts:?}");
        // Counting stopped with the work: a second count starts from nothing.
        let (_, again) = count(|| (x.sin(), x.sin())).unwrap();
        assert_eq!(again.get("aten::sin"), Some(&2), "{again:?}");
        assert_eq!(again.get("aten::exp"), None, "{again:?}");
    }

    #[test]
    fn a_count_whose_work_panics_stops_and_lets_the_next_one_start() {
        let result = std::panic::catch_unwind(|| {
            count(|| {
                let _ = Tensor::from_slice(&[1.0f32]).exp();
                panic!("the work failed");
            })
        });
        assert!(result.is_err());
        let x = Tensor::from_slice(&[1.0f32]);
        let (_, counts) = count(|| x.cos()).unwrap();
        assert_eq!(counts.get("aten::cos"), Some(&1), "{counts:?}");
        assert_eq!(counts.get("aten::exp"), None, "{counts:?}");
    }

    #[test]
    fn a_count_inside_a_count_on_one_thread_is_refused() {
        let x = Tensor::from_slice(&[1.0f32]);
        let (inner, outer) = count(|| count(|| x.tan()).map(|_| ())).unwrap();
        let refused = inner.unwrap_err();
        assert!(refused.to_string().contains("already running on this thread"), "{refused}");
        assert_eq!(outer.get("aten::tan"), None, "{outer:?}");
        assert!(count(|| x.tan()).is_ok(), "the outer count did not end");
    }
}
