//! libtorch's own warnings (`TORCH_WARN` in its C++ code: an output
//! resized, a deprecated call, a CUDA initialisation that failed) handed to
//! a Rust function instead of printed to stderr by libtorch's default
//! handler, which writes past the process's logging: in a JSON log it is a
//! line that is not JSON, it misses a rank's log file, and on an agent it is
//! a write that waits on whoever reads stderr. libtorch keeps its handler
//! per thread, so [`route_this_threads_warnings`] covers the thread that
//! calls it (the worker calls it on its main thread, which runs its
//! start-up and its training loop), and [`route_this_threads_warnings_too`]
//! a thread that thread starts for libtorch work (the gradient reducer, the
//! stop votes).
//! The warnings of the autograd engine's own device threads need neither:
//! the engine gathers them and issues them again on the thread that called
//! the backward pass (`DelayWarningHandler` in libtorch's
//! `torch/csrc/autograd/graph_task.h`). Other threads keep libtorch's
//! default.

use std::ffi::{c_char, CStr};
use std::sync::RwLock;

/// One warning of libtorch's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LibtorchWarning<'a> {
    /// Its text.
    pub message: &'a str,
    /// The C++ source file that issued it.
    pub file: &'a str,
    /// Its line there.
    pub line: u32,
    /// A deprecation warning (else a user warning).
    pub deprecation: bool,
}

/// What receives the warnings of the threads that route them.
pub type WarningSink = fn(&LibtorchWarning<'_>);

/// The sink of every routed thread: the last one given.
static SINK: RwLock<Option<WarningSink>> = RwLock::new(None);

type RawSink =
    unsafe extern "C" fn(message: *const c_char, file: *const c_char, line: u32, deprecation: i32);

extern "C" {
    fn rsb_route_thread_warnings(sink: RawSink);
}

#[cfg(test)]
extern "C" {
    fn rsb_warn(message: *const c_char);
}

/// From now on, the libtorch warnings issued on this thread go to `sink`
/// (the sink of every thread that routed its warnings before, too).
pub fn route_this_threads_warnings(sink: WarningSink) {
    *SINK.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(sink);
    // SAFETY: `hand_over` is a function that lives as long as the process.
    unsafe { rsb_route_thread_warnings(hand_over) };
}

/// From now on, the libtorch warnings issued on this thread go where those
/// of the threads routed by [`route_this_threads_warnings`] go; nothing
/// changes if no thread was routed. For a thread that a routed thread starts
/// to run libtorch work, so that its warnings are logged as that thread's.
pub fn route_this_threads_warnings_too() {
    let sink = *SINK.read().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(sink) = sink {
        route_this_threads_warnings(sink);
    }
}

/// Issues `message` as a libtorch warning on this thread, through
/// libtorch's own `TORCH_WARN` (to check where warnings go). A message
/// with a NUL byte is cut there.
#[cfg(test)]
fn warn(message: &str) {
    let message = message.split('\0').next().unwrap_or_default();
    let message = std::ffi::CString::new(message).unwrap_or_default();
    // SAFETY: a NUL-terminated string that outlives the call.
    unsafe { rsb_warn(message.as_ptr()) };
}

unsafe extern "C" fn hand_over(
    message: *const c_char,
    file: *const c_char,
    line: u32,
    deprecation: i32,
) {
    // SAFETY: the shim passes NUL-terminated strings alive for the call.
    let (message, file) = unsafe { (CStr::from_ptr(message), CStr::from_ptr(file)) };
    let (message, file) = (message.to_string_lossy(), file.to_string_lossy());
    let warning =
        LibtorchWarning { message: &message, file: &file, line, deprecation: deprecation != 0 };
    let sink = *SINK.read().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(sink) = sink {
        // A panic must not unwind into libtorch's C++ frames.
        let _ = std::panic::catch_unwind(|| sink(&warning));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tch::Tensor;

    static SEEN: Mutex<Vec<(String, String, bool)>> = Mutex::new(Vec::new());

    fn keep(warning: &LibtorchWarning<'_>) {
        SEEN.lock().unwrap().push((
            warning.message.to_string(),
            warning.file.to_string(),
            warning.deprecation,
        ));
    }

    fn seen_with(text: &str) -> Vec<(String, String, bool)> {
        SEEN.lock().unwrap().iter().filter(|(m, _, _)| m.contains(text)).cloned().collect()
    }

    #[test]
    fn a_routed_threads_warnings_reach_the_sink_as_do_a_joining_threads_and_another_threads_do_not()
    {
        std::thread::spawn(|| {
            route_this_threads_warnings(keep);
            warn("a warning issued by the test");
            // libtorch's own: an out= result of another shape is resized.
            let out = Tensor::from_slice(&[0.0f32; 3]);
            let a = Tensor::from_slice(&[1.0f32, 2.0]);
            let _ = a.f_add_out(&out, &a).unwrap();
        })
        .join()
        .unwrap();
        let ours = seen_with("a warning issued by the test");
        assert_eq!(ours.len(), 1, "{ours:?}");
        assert!(ours[0].1.ends_with("shim.cpp"), "{ours:?}");
        assert!(!ours[0].2, "a user warning");
        let resized = seen_with("was resized");
        assert_eq!(resized.len(), 1, "libtorch's own warning: {:?}", SEEN.lock().unwrap());
        // A thread that did not route its warnings keeps libtorch's handler.
        std::thread::spawn(|| warn("a warning of another thread")).join().unwrap();
        assert!(seen_with("a warning of another thread").is_empty());
        // One that joins the routed threads reaches their sink.
        std::thread::spawn(|| {
            route_this_threads_warnings_too();
            warn("a warning of a joining thread");
        })
        .join()
        .unwrap();
        assert_eq!(
            seen_with("a warning of a joining thread").len(),
            1,
            "{:?}",
            SEEN.lock().unwrap()
        );
    }
}
