//! torch's multi-tensor ops that tch does not generate, as timm's
//! multi-tensor LAMB calls them, each over a whole list in one call (on a
//! GPU a fixed number of kernels, whatever the list's length):
//!
//! * [`norms`] (`_foreach_norm`): the L2 norm of each tensor of a list.
//!   Each norm is taken over its own tensor alone, in a fixed order: the
//!   same on every run and every rank, and exactly 0 for a tensor of zeros.
//! * [`add_`] (`_foreach_add_`): each tensor of one list added in place into
//!   the tensor of another list at its place.

use std::ffi::{c_char, c_void};
use tch::Tensor;

/// A failed call, with libtorch's message.
#[derive(Debug, thiserror::Error)]
#[error("{call} of {tensors} tensor(s): {message}")]
pub struct ForeachError {
    /// What was asked: "norms" or "in-place sums".
    pub call: &'static str,
    /// How many tensors were passed (in each list).
    pub tensors: usize,
    /// libtorch's message, or what was wrong with the lists.
    pub message: String,
}

extern "C" {
    fn rsb_foreach_norms(
        tensors: *const *mut c_void,
        count: usize,
        out: *mut c_void,
        error: *mut c_char,
        error_len: usize,
    ) -> i32;
    fn rsb_foreach_add(
        targets: *const *mut c_void,
        sources: *const *mut c_void,
        count: usize,
        error: *mut c_char,
        error_len: usize,
    ) -> i32;
}

/// The L2 norm of each of `tensors` (all of one kind, on one device), as a
/// 1-D tensor of that kind with one element per tensor. Nothing is read
/// back to the host.
pub fn norms(tensors: &[Tensor]) -> Result<Tensor, ForeachError> {
    let error = |message: String| ForeachError { call: "norms", tensors: tensors.len(), message };
    let first = tensors.first().ok_or_else(|| error("no tensor given".into()))?;
    let pointers = crate::defined_tensor_pointers(tensors, "tensor").map_err(error)?;
    let mut out = Tensor::f_empty([tensors.len() as i64], (first.kind(), first.device()))
        .map_err(|e| error(e.to_string()))?;
    // SAFETY: every pointer is a live tch tensor (`at::Tensor*` behind
    // C_tensor) borrowed for the call, and so is `out`, which the shim
    // writes in place; the shim catches every C++ exception; the message
    // buffer is writable for its length.
    let (status, message) = crate::call_with_message(|message, message_len| unsafe {
        rsb_foreach_norms(
            pointers.as_ptr(),
            pointers.len(),
            out.as_mut_ptr() as *mut c_void,
            message,
            message_len,
        )
    });
    if status != 0 {
        return Err(error(message));
    }
    Ok(out)
}

/// Adds each of `sources` into the tensor of `targets` at its place, in
/// place: `targets[i] += sources[i]`. The lists have one length, and each
/// pair one kind and device; a GPU takes its few-kernel path when each pair
/// also has one shape and strides, and is dense. Nothing is read back to
/// the host.
pub fn add_(targets: &[Tensor], sources: &[Tensor]) -> Result<(), ForeachError> {
    let error =
        |message: String| ForeachError { call: "in-place sums", tensors: targets.len(), message };
    if targets.is_empty() {
        return Err(error("no tensor given".into()));
    }
    if sources.len() != targets.len() {
        return Err(error(format!("{} target(s) but {} source(s)", targets.len(), sources.len())));
    }
    let target_pointers =
        crate::defined_tensor_pointers(targets, "target tensor").map_err(error)?;
    let source_pointers =
        crate::defined_tensor_pointers(sources, "source tensor").map_err(error)?;
    // SAFETY: every pointer is a live tch tensor (`at::Tensor*` behind
    // C_tensor) borrowed for the call (the targets are written in place,
    // as a tch in-place op writes through a shared reference); both arrays
    // hold `count` pointers; the shim catches every C++ exception; the
    // message buffer is writable for its length.
    let (status, message) = crate::call_with_message(|message, message_len| unsafe {
        rsb_foreach_add(
            target_pointers.as_ptr(),
            source_pointers.as_ptr(),
            target_pointers.len(),
            message,
            message_len,
        )
    });
    if status != 0 {
        return Err(error(message));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn each_tensor_gets_its_own_norm_and_zeros_get_exactly_zero() {
        let tensors = [
            Tensor::from_slice(&[3.0f32, 4.0]),
            Tensor::zeros([1000], (Kind::Float, Device::Cpu)),
            Tensor::from_slice(&[1.0f32, 2.0, 2.0, 4.0]).view([2, 2]),
            Tensor::from_slice(&[-5.0f32]),
        ];
        let norms = norms(&tensors).unwrap();
        assert_eq!(Vec::<f32>::try_from(&norms).unwrap(), [5.0, 0.0, 5.0, 5.0]);
        for (t, n) in tensors.iter().zip(Vec::<f32>::try_from(&norms).unwrap()) {
            assert_eq!(f32::try_from(t.norm()).unwrap(), n, "as the one-tensor norm");
        }
    }

    #[test]
    fn an_empty_list_undefined_tensors_and_libtorch_errors_come_back_as_errors() {
        let err = norms(&[]).unwrap_err();
        assert_eq!(err.to_string(), "norms of 0 tensor(s): no tensor given");
        let err = norms(&[Tensor::from_slice(&[1.0f32]), Tensor::new()]).unwrap_err();
        assert!(err.to_string().contains("tensor 1 is undefined"), "{err}");
        // Two kinds in one list: libtorch refuses.
        let mixed = [Tensor::from_slice(&[1.0f32]), Tensor::from_slice(&[1i64])];
        let err = norms(&mixed).unwrap_err();
        assert!(err.to_string().starts_with("norms of 2 tensor(s): "), "{err}");
    }

    #[test]
    fn each_source_is_added_into_its_own_target_in_place() {
        let targets = [
            Tensor::from_slice(&[1.0f32, 2.0, 3.0]),
            Tensor::zeros([4], (Kind::Float, Device::Cpu)),
            // A flat view of a 2-D tensor: the sum lands in the tensor it views.
            Tensor::from_slice(&[1.0f32, 1.0, 1.0, 1.0]).view([2, 2]),
        ];
        let flat_view = targets[2].view([-1]);
        let sources = [
            Tensor::from_slice(&[10.0f32, 20.0, 30.0]),
            Tensor::from_slice(&[-1.0f32, 0.5, 0.0, 2.0]),
            Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]),
        ];
        let (first, second) = (targets[0].shallow_clone(), targets[1].shallow_clone());
        add_(&[first, second, flat_view], &sources).unwrap();
        assert_eq!(Vec::<f32>::try_from(&targets[0]).unwrap(), [11.0, 22.0, 33.0]);
        assert_eq!(Vec::<f32>::try_from(&targets[1]).unwrap(), [-1.0, 0.5, 0.0, 2.0]);
        assert_eq!(Vec::<f32>::try_from(targets[2].view([-1])).unwrap(), [2.0, 3.0, 4.0, 5.0]);
        // The sources are left as they were.
        assert_eq!(Vec::<f32>::try_from(&sources[0]).unwrap(), [10.0, 20.0, 30.0]);
    }

    #[test]
    fn mismatched_lists_undefined_tensors_and_libtorch_errors_name_the_call() {
        let one = || Tensor::from_slice(&[1.0f32]);
        let err = add_(&[], &[]).unwrap_err();
        assert_eq!(err.to_string(), "in-place sums of 0 tensor(s): no tensor given");
        let err = add_(&[one(), one()], &[one()]).unwrap_err();
        assert_eq!(err.to_string(), "in-place sums of 2 tensor(s): 2 target(s) but 1 source(s)");
        let err = add_(&[one()], &[Tensor::new()]).unwrap_err();
        assert_eq!(err.to_string(), "in-place sums of 1 tensor(s): source tensor 0 is undefined");
        // Shapes that do not broadcast into the target: libtorch refuses.
        let err = add_(&[one()], &[Tensor::from_slice(&[1.0f32, 2.0])]).unwrap_err();
        assert!(err.to_string().starts_with("in-place sums of 1 tensor(s): "), "{err}");
        assert!(!err.message.is_empty());
    }
}
