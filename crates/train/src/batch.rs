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
    pub fn images(&self, bytes: &[u8], n: usize, h: u32, w: u32) -> Result<Tensor, TchError> {
        let dims = [n as i64, i64::from(h), i64::from(w), 3];
        let host = Tensor::f_from_slice(bytes)?.f_view(dims)?;
        let nchw = self.to_device(host)?.f_permute([0, 3, 1, 2])?;
        let nchw = if self.channels_last { nchw } else { nchw.f_contiguous()? };
        nchw.f_to_kind(Kind::Float)?.f_sub(&self.mean)?.f_div(&self.std)
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
