//! Turning loader output (NHWC `u8`) into model input: a normalised float NCHW
//! tensor on the training device, as timm's prefetcher does
//! (`(x - 255 * mean) / (255 * std)`). The NHWC bytes are viewed as NCHW, so
//! with `runtime.channels_last` the input is channels-last without a copy.

use tch::{Device, Kind, TchError, Tensor};

/// Per-channel normalisation on a device.
#[derive(Debug)]
pub struct Normalizer {
    mean: Tensor,
    std: Tensor,
    device: Device,
    channels_last: bool,
}

impl Normalizer {
    /// `mean`/`std` in [0, 1] units (timm's constants).
    pub fn new(mean: [f64; 3], std: [f64; 3], device: Device, channels_last: bool) -> Normalizer {
        let scaled = |v: [f64; 3]| {
            Tensor::from_slice(&v.map(|x| (x * 255.0) as f32)).view([1, 3, 1, 1]).to_device(device)
        };
        Normalizer { mean: scaled(mean), std: scaled(std), device, channels_last }
    }

    /// `n` NHWC RGB images of `h x w` as a float NCHW tensor on the device.
    ///
    /// The bytes are read in place, through a tensor that borrows them, and
    /// copied once: into pinned memory on a GPU (then a non-blocking copy to
    /// the device), or straight into the float tensor on a CPU, in the
    /// layout the model takes, then normalised in place. The borrow ends
    /// within this call: every path copies before it returns.
    pub fn images(&self, bytes: &[u8], n: usize, h: u32, w: u32) -> Result<Tensor, TchError> {
        let dims = [n as i64, i64::from(h), i64::from(w), 3];
        let expected =
            dims.iter().try_fold(1i64, |total, &d| if d < 0 { None } else { total.checked_mul(d) });
        if expected != i64::try_from(bytes.len()).ok() {
            let expected = expected.map_or("too many".to_owned(), |e| e.to_string());
            return Err(TchError::Shape(format!(
                "{} bytes of images for {n} RGB image(s) of {h}x{w} ({expected} bytes)",
                bytes.len()
            )));
        }
        let strides = [i64::from(h) * i64::from(w) * 3, i64::from(w) * 3, 3, 1];
        // SAFETY: `bytes` holds exactly the `n*h*w*3` bytes the view spans
        // (checked above), contiguous NHWC with these strides, and outlives
        // the view, which is dropped within this call: the result never
        // aliases it, because pinning copies (GPU), and on a CPU the u8 to
        // f32 conversion below writes new memory. No path writes through it.
        let host =
            unsafe { Tensor::from_blob(bytes.as_ptr(), &dims, &strides, Kind::Uint8, Device::Cpu) };
        let nchw = self.to_device(host)?.f_permute([0, 3, 1, 2])?;
        // One pass from bytes to floats, into the layout the model takes
        // (the view's own, NHWC, for channels-last; NCHW otherwise), then
        // timm's `sub_(mean).div_(std)` in place: no further copies.
        let mut float = if self.channels_last {
            nchw.f_internal_to_copy((Kind::Float, self.device), false)?
        } else {
            let mut contiguous = Tensor::f_empty(nchw.size(), (Kind::Float, self.device))?;
            contiguous.f_copy_(&nchw)?;
            contiguous
        };
        let _ = float.f_sub_(&self.mean)?;
        let _ = float.f_div_(&self.std)?;
        Ok(float)
    }

    /// `[n, classes]` float targets on the device.
    pub fn targets(&self, values: &[f32], n: usize) -> Result<Tensor, TchError> {
        let classes = (values.len() / n.max(1)) as i64;
        self.to_device(Tensor::f_from_slice(values)?.f_view([n as i64, classes])?)
    }

    /// Integer labels on the device.
    pub fn labels(&self, labels: &[u32]) -> Result<Tensor, TchError> {
        let as_i64: Vec<i64> = labels.iter().map(|&l| i64::from(l)).collect();
        self.to_device(Tensor::f_from_slice(&as_i64)?)
    }

    /// A host tensor on the device: on a GPU through pinned memory with a
    /// non-blocking copy (a copy from pageable memory would make the host
    /// wait for the device). Pinned by `_pin_memory`: `pin_memory(device)`
    /// prints two deprecation warnings per call in libtorch 2.11.
    fn to_device(&self, host: Tensor) -> Result<Tensor, TchError> {
        if self.device == Device::Cpu {
            return Ok(host);
        }
        let kind = host.kind();
        host.f_internal_pin_memory(self.device)?.f_to_device_(self.device, kind, true, false)
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    #[test]
    fn images_are_normalised_copies_that_outlive_the_borrowed_bytes() {
        // 2 NHWC images of 2x3, every byte different.
        let mut bytes: Vec<u8> = (0..2 * 2 * 3 * 3).map(|v| (v * 7) as u8).collect();
        let original = bytes.clone();
        for channels_last in [false, true] {
            let normalizer =
                Normalizer::new([0.1, 0.2, 0.3], [0.5, 0.25, 0.125], Device::Cpu, channels_last);
            let images = normalizer.images(&bytes, 2, 2, 3).unwrap();
            assert_eq!(images.size(), [2, 3, 2, 3]);
            // The model's layout: NHWC strides for channels-last, else NCHW.
            let strides = if channels_last { [18, 1, 9, 3] } else { [18, 6, 3, 1] };
            assert_eq!(images.stride(), strides, "channels_last {channels_last}");
            // Overwriting the source afterwards changes nothing: a copy.
            bytes.iter_mut().for_each(|b| *b = 255);
            for (n, c, y, x) in [(0, 0, 0, 0), (1, 2, 1, 2), (0, 1, 1, 0), (1, 0, 0, 1)] {
                let byte = f64::from(original[((n * 2 + y) * 3 + x) * 3 + c]);
                let (mean, std) = ([0.1, 0.2, 0.3][c] * 255.0, [0.5, 0.25, 0.125][c] * 255.0);
                let expected = (byte - mean as f32 as f64) / (std as f32 as f64);
                let got = images.double_value(&[n as i64, c as i64, y as i64, x as i64]);
                assert!((got - expected).abs() < 1e-5, "({n},{c},{y},{x}): {got} vs {expected}");
            }
            bytes.copy_from_slice(&original);
        }
    }

    #[test]
    fn images_of_the_wrong_byte_count_are_refused_before_they_are_read() {
        let normalizer = Normalizer::new([0.5; 3], [0.5; 3], Device::Cpu, true);
        let err = normalizer.images(&[0u8; 2 * 4 * 4 * 3 - 1], 2, 4, 4).unwrap_err();
        let expected = "95 bytes of images for 2 RGB image(s) of 4x4 (96 bytes)";
        assert!(err.to_string().contains(expected), "{err}");
        // A size whose byte count does not fit in i64 is refused, not wrapped.
        let err = normalizer.images(&[0u8; 12], 1 << 40, u32::MAX, u32::MAX).unwrap_err();
        assert!(err.to_string().contains("(too many bytes)"), "{err}");
    }
}
