//! Setting parameters' gradients to none, as PyTorch's
//! `optimizer.zero_grad()` does by default (`set_to_none=True`) and timm's
//! `train.py` with it: tch can only zero a gradient in place, one kernel per
//! parameter, after which the backward pass adds its gradient into the zeros
//! (another kernel each) instead of handing it over.

use std::ffi::{c_char, c_void};
use tch::Tensor;

/// A failed call, with libtorch's message.
#[derive(Debug, thiserror::Error)]
#[error("setting {tensors} gradient(s) to none: {message}")]
pub struct SetToNoneError {
    /// How many tensors were passed.
    pub tensors: usize,
    /// libtorch's message.
    pub message: String,
}

extern "C" {
    fn rsb_set_grads_to_none(
        tensors: *const *mut c_void,
        count: usize,
        error: *mut c_char,
        error_len: usize,
    ) -> i32;
}

/// Leaves each of `params` without a gradient (`.grad` is `None`), so that
/// the next backward pass defines it afresh.
pub fn set_to_none(params: &[Tensor]) -> Result<(), SetToNoneError> {
    let pointers = crate::tensor_pointers(params);
    // SAFETY: every pointer is a live tch tensor (`at::Tensor*` behind
    // C_tensor) borrowed for the call; the shim only resets each one's
    // gradient handle and catches every C++ exception; the message buffer
    // is writable for its length.
    let (status, message) = crate::call_with_message(|error, error_len| unsafe {
        rsb_set_grads_to_none(pointers.as_ptr(), pointers.len(), error, error_len)
    });
    if status != 0 {
        return Err(SetToNoneError { tensors: params.len(), message });
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn gradients_become_undefined_and_the_next_backward_defines_them_afresh() {
        let a = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
        let b = Tensor::from_slice(&[3.0f32]).set_requires_grad(true);
        let no_grad_yet = Tensor::from_slice(&[4.0f32]).set_requires_grad(true);
        let loss = || (&a * 3.0).sum(Kind::Float) + (&b * 5.0).sum(Kind::Float);
        loss().backward();
        assert!(a.grad().defined() && b.grad().defined());
        let params = [a.shallow_clone(), b.shallow_clone(), no_grad_yet.shallow_clone()];
        set_to_none(&params).unwrap();
        assert!(!a.grad().defined() && !b.grad().defined() && !no_grad_yet.grad().defined());
        loss().backward();
        // Not 6 and 10: nothing was left to add into.
        assert_eq!(Vec::<f32>::try_from(a.grad()).unwrap(), [3.0, 3.0]);
        assert_eq!(Vec::<f32>::try_from(b.grad()).unwrap(), [5.0]);
        set_to_none(&[Tensor::new()]).unwrap();
    }
}
