//! 8-bit RGB images and the PIL-exact operations the augmentations use.
//!
//! timm augments PIL images, so every operation here reproduces Pillow's
//! arithmetic (fixed-point resampling, LUT rounding, enhance blends), checked
//! against Pillow by the parity tests in `crates/data/tests/`.

pub mod geometry;
pub mod ops;
pub mod resize;

pub use geometry::{affine, rotate};
pub use resize::{crop, resize, resize_region, resize_region_box, Region};

/// An 8-bit RGB image, rows top to bottom, pixels interleaved `RGBRGB...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `width * height * 3` bytes.
    pub data: Vec<u8>,
}

impl RgbImage {
    /// Wraps `data`; its length must be `width * height * 3`.
    pub fn new(width: u32, height: u32, data: Vec<u8>) -> RgbImage {
        assert_eq!(data.len(), width as usize * height as usize * 3, "RGB buffer size");
        RgbImage { width, height, data }
    }

    /// An image filled with one colour.
    pub fn filled(width: u32, height: u32, rgb: [u8; 3]) -> RgbImage {
        let data = rgb.iter().copied().cycle().take(width as usize * height as usize * 3).collect();
        RgbImage { width, height, data }
    }

    /// The pixel at (x, y).
    pub fn pixel(&self, x: u32, y: u32) -> [u8; 3] {
        let i = (y as usize * self.width as usize + x as usize) * 3;
        [self.data[i], self.data[i + 1], self.data[i + 2]]
    }
}

/// Resampling filter (PIL's `Image.Resampling`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// PIL `NEAREST`.
    Nearest,
    /// PIL `BILINEAR`.
    Bilinear,
    /// PIL `BICUBIC` (a = -0.5).
    Bicubic,
}
