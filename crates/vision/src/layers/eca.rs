//! Efficient channel attention (Wang et al., "ECA-Net", arXiv 1910.03151):
//! timm's `EcaModule`, a 1-D convolution across the pooled channels.

use super::ForwardCtx;
use tch::{nn, Kind, Tensor};

/// `x * sigmoid(conv1d(mean_hw(x)))`, one `[1, 1, k]` weight named `conv.weight`.
#[derive(Debug)]
pub struct Eca {
    weight: Tensor,
    kernel_size: i64,
}

impl Eca {
    /// Creates `path.conv.weight` with timm's adaptive kernel size for `channels`.
    pub fn new(path: &nn::Path, channels: i64) -> Eca {
        let k = eca_kernel_size(channels);
        // nn.Conv1d's default init (the ResNet init only touches Conv2d).
        let bound = 1.0 / (k as f64).sqrt();
        let weight =
            (path / "conv").var("weight", &[1, 1, k], nn::Init::Uniform { lo: -bound, up: bound });
        Eca { weight, kernel_size: k }
    }

    /// Rescales the channels of `xs`.
    pub fn forward(&self, xs: &Tensor, ctx: &ForwardCtx) -> Result<Tensor, tch::TchError> {
        let (n, _, _, _) = xs.size4()?;
        let pooled =
            xs.f_mean_dim([2i64, 3].as_slice(), false, None::<Kind>)?.f_view([n, 1, -1])?;
        let weight = ctx.cast(&self.weight)?;
        let pad = (self.kernel_size - 1) / 2;
        let gate = pooled
            .f_conv1d(&weight, None::<&Tensor>, [1], [pad], [1], 1)?
            .f_sigmoid()?
            .f_view([n, -1, 1, 1])?;
        xs.f_mul(&gate)
    }
}

/// timm's ECA kernel size: `t = int(|log2(C) + 1| / 2)`, made odd (`t + 1`
/// when even), at least 3.
pub fn eca_kernel_size(channels: i64) -> i64 {
    let log2 = (channels as f64).ln() / 2f64.ln();
    let t = ((log2 + 1.0).abs() / 2.0) as i64;
    let k = if t % 2 == 1 { t } else { t + 1 };
    k.max(3)
}

#[cfg(test)]
mod tests {
    use super::eca_kernel_size;

    #[test]
    fn kernel_sizes_of_a_bottleneck_resnet() {
        assert_eq!(eca_kernel_size(64), 3);
        assert_eq!(eca_kernel_size(256), 5);
        assert_eq!(eca_kernel_size(512), 5);
        assert_eq!(eca_kernel_size(1024), 5);
        assert_eq!(eca_kernel_size(2048), 7);
    }
}
