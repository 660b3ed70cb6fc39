//! torch's fused gradient check-and-unscale,
//! `_amp_foreach_non_finite_check_and_unscale_`: what `GradScaler.unscale_`
//! calls on every gradient of a device at once. tch generates only the
//! one-tensor form, one kernel per gradient; this is one call for the list
//! (on a GPU, a few multi-tensor kernels for all of ResNet-50's gradients).

use std::ffi::{c_char, c_void};
use tch::Tensor;

/// A failed fused unscale, with libtorch's message.
#[derive(Debug, thiserror::Error)]
#[error("unscaling {tensors} gradient(s): {message}")]
pub struct UnscaleError {
    /// How many gradients were passed.
    pub tensors: usize,
    /// libtorch's message.
    pub message: String,
}

extern "C" {
    fn rsb_amp_foreach_unscale(
        tensors: *const *mut c_void,
        count: usize,
        found_inf: *mut c_void,
        inv_scale: *const c_void,
        error: *mut c_char,
        error_len: usize,
    ) -> i32;
}

/// Multiplies every tensor of `grads` in place by `inv_scale` (a
/// one-element f32 tensor on their device) after checking them: `found_inf`
/// (a one-element f32 tensor on that device) is set to 1 when any element
/// was NaN or infinite, and left as it is otherwise. All on the device,
/// without reading anything back. Undefined tensors must be left out.
pub fn non_finite_check_and_unscale(
    grads: &[Tensor],
    found_inf: &mut Tensor,
    inv_scale: &Tensor,
) -> Result<(), UnscaleError> {
    let pointers = crate::defined_tensor_pointers(grads, "gradient")
        .map_err(|message| UnscaleError { tensors: grads.len(), message })?;
    // SAFETY: every pointer is a live tch tensor (`at::Tensor*` behind
    // C_tensor) borrowed for the call; the shim copies each handle (the
    // storage is shared, so the in-place update reaches `grads`) and
    // catches every C++ exception; the message buffer is writable for its
    // length.
    let (status, message) = crate::call_with_message(|error, error_len| unsafe {
        rsb_amp_foreach_unscale(
            pointers.as_ptr(),
            pointers.len(),
            found_inf.as_mut_ptr() as *mut c_void,
            inv_scale.as_ptr() as *const c_void,
            error,
            error_len,
        )
    });
    if status != 0 {
        return Err(UnscaleError { tensors: grads.len(), message });
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn scalar(value: f32) -> Tensor {
        Tensor::from_slice(&[value]).view([])
    }

    #[test]
    fn every_gradient_is_unscaled_in_place_and_found_inf_stays_zero_when_all_are_finite() {
        let grads = [Tensor::from_slice(&[2.0f32, -4.0]), Tensor::from_slice(&[8.0f32])];
        let mut found = Tensor::zeros([], (Kind::Float, Device::Cpu));
        non_finite_check_and_unscale(&grads, &mut found, &scalar(0.5)).unwrap();
        assert_eq!(Vec::<f32>::try_from(&grads[0]).unwrap(), [1.0, -2.0]);
        assert_eq!(Vec::<f32>::try_from(&grads[1]).unwrap(), [4.0]);
        assert_eq!(f32::try_from(&found).unwrap(), 0.0);
    }

    #[test]
    fn a_nan_or_an_infinity_in_any_gradient_sets_found_inf() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let grads = [Tensor::from_slice(&[1.0f32]), Tensor::from_slice(&[3.0f32, bad])];
            let mut found = Tensor::zeros([], (Kind::Float, Device::Cpu));
            non_finite_check_and_unscale(&grads, &mut found, &scalar(0.25)).unwrap();
            assert_eq!(f32::try_from(&found).unwrap(), 1.0, "{bad}");
        }
    }

    #[test]
    fn libtorch_errors_and_undefined_gradients_come_back_as_errors() {
        let grads = [Tensor::from_slice(&[1.0f32])];
        // found_inf must be an f32 tensor: libtorch's check throws.
        let mut found = Tensor::zeros([], (Kind::Int64, Device::Cpu));
        let err = non_finite_check_and_unscale(&grads, &mut found, &scalar(1.0)).unwrap_err();
        assert!(err.to_string().starts_with("unscaling 1 gradient(s): "), "{err}");
        let mut found = Tensor::zeros([], (Kind::Float, Device::Cpu));
        let grads = [Tensor::from_slice(&[1.0f32]), Tensor::new()];
        let err = non_finite_check_and_unscale(&grads, &mut found, &scalar(1.0)).unwrap_err();
        assert!(err.to_string().contains("gradient 1 is undefined"), "{err}");
    }
}
