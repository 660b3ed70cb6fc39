//! Decoding image files into 8-bit RGB, as timm's `img.convert('RGB')`:
//! grayscale is replicated, alpha is dropped, CMYK and 16-bit are converted.
//! EXIF orientation is not applied (timm does not apply it either).

use crate::error::DataError;
use crate::image::RgbImage;
use std::path::Path;

/// Refuse images above this many pixels instead of allocating gigabytes.
pub const MAX_PIXELS: u64 = 178_956_970;

/// Decodes the file at `path` (JPEG or PNG, detected from its content).
pub fn decode_file(path: &Path) -> Result<RgbImage, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    decode_bytes(&bytes).map_err(|reason| DataError::Decode { path: path.to_path_buf(), reason })
}

/// Decodes an in-memory JPEG or PNG.
pub fn decode_bytes(bytes: &[u8]) -> Result<RgbImage, String> {
    if bytes.is_empty() {
        return Err("empty file".into());
    }
    let format = ::image::guess_format(bytes).map_err(|e| e.to_string())?;
    let mut reader = ::image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
    let mut limits = ::image::Limits::default();
    limits.max_alloc = Some(MAX_PIXELS * 8);
    reader.limits(limits);
    let decoded = reader.decode().map_err(|e| e.to_string())?;
    let (w, h) = (decoded.width(), decoded.height());
    if w == 0 || h == 0 {
        return Err(format!("image has no pixels ({w}x{h})"));
    }
    if u64::from(w) * u64::from(h) > MAX_PIXELS {
        return Err(format!("{w}x{h} exceeds the {MAX_PIXELS}-pixel limit"));
    }
    let rgb = decoded.into_rgb8();
    Ok(RgbImage::new(w, h, rgb.into_raw()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode_png(img: ::image::DynamicImage) -> Vec<u8> {
        let mut out = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut out), ::image::ImageFormat::Png).unwrap();
        out
    }

    #[test]
    fn grayscale_png_becomes_rgb() {
        let gray = ::image::GrayImage::from_fn(3, 2, |x, y| ::image::Luma([(x * 10 + y) as u8]));
        let img = decode_bytes(&encode_png(::image::DynamicImage::ImageLuma8(gray))).unwrap();
        assert_eq!((img.width, img.height), (3, 2));
        assert_eq!(img.pixel(2, 1), [21, 21, 21]);
    }

    #[test]
    fn rgba_drops_alpha_without_compositing() {
        let rgba = ::image::RgbaImage::from_pixel(2, 2, ::image::Rgba([10, 20, 30, 0]));
        let img = decode_bytes(&encode_png(::image::DynamicImage::ImageRgba8(rgba))).unwrap();
        assert_eq!(img.pixel(1, 1), [10, 20, 30]);
    }

    #[test]
    fn garbage_and_empty_and_truncated_are_errors() {
        assert!(decode_bytes(b"").unwrap_err().contains("empty"));
        assert!(decode_bytes(b"this is not an image at all").is_err());
        let png = encode_png(::image::DynamicImage::ImageRgb8(::image::RgbImage::new(64, 64)));
        assert!(decode_bytes(&png[..png.len() / 2]).is_err());
    }
}
