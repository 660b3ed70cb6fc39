//! torch's multi-tensor norm, `_foreach_norm`, which tch does not
//! generate: the L2 norm of each tensor of a list in one call (on a GPU a
//! fixed number of kernels, whatever the list's length), as timm's
//! multi-tensor LAMB takes its trust ratio's norms. Each norm is taken over
//! its own tensor alone, in a fixed order: the same on every run and every
//! rank, and exactly 0 for a tensor of zeros.

use std::ffi::{c_char, c_void};
use tch::Tensor;

/// A failed call, with libtorch's message.
#[derive(Debug, thiserror::Error)]
#[error("norms of {tensors} tensor(s): {message}")]
pub struct NormsError {
    /// How many tensors were passed.
    pub tensors: usize,
    /// libtorch's message.
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
}

/// The L2 norm of each of `tensors` (all of one kind, on one device), as a
/// 1-D tensor of that kind with one element per tensor. Nothing is read
/// back to the host.
pub fn norms(tensors: &[Tensor]) -> Result<Tensor, NormsError> {
    let error = |message: String| NormsError { tensors: tensors.len(), message };
    let first = tensors.first().ok_or_else(|| error("no tensor given".into()))?;
    if let Some(index) = tensors.iter().position(|t| !t.defined()) {
        return Err(error(format!("tensor {index} is undefined")));
    }
    let mut out = Tensor::f_empty([tensors.len() as i64], (first.kind(), first.device()))
        .map_err(|e| error(e.to_string()))?;
    let pointers: Vec<*mut c_void> = tensors.iter().map(|t| t.as_ptr() as *mut c_void).collect();
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
}
