//! Decoding image files into 8-bit RGB, as timm's `img.convert('RGB')`:
//! grayscale is replicated, alpha is dropped, CMYK and 16-bit are converted.
//! EXIF orientation is not applied (timm does not apply it either).
//!
//! JPEGs go through libjpeg-turbo ([`crate::jpeg`]), the decoder Pillow uses,
//! so full decodes equal Pillow's. For training crops, [`decode_for_crop`]
//! decodes only the part of the file a crop needs (libjpeg-turbo's partial
//! decompression: whole iMCU columns, skipped rows), and optionally at a DCT
//! scale of 1/2, 1/4 or 1/8 when the crop is much larger than the output.
//! Partial decoding alone does not change a single pixel of the crop (tested);
//! DCT scaling does (see [`decode_for_crop`]). Truncated JPEGs are refused
//! before any decoding ([`jpeg::check_complete`]), so a partial decode that
//! stops above the cut fails as a full one does. PNGs are decoded with the
//! `image` crate.

use crate::error::{DataError, DecodeError};
use crate::image::resize::Region;
use crate::image::RgbImage;
use crate::jpeg::{self, JpegHeader, Partial};
use crate::transforms::CropBox;
use std::path::Path;

/// Refuse images above this many pixels instead of allocating gigabytes
/// (Pillow's `DecompressionBombError` threshold, `2 * MAX_IMAGE_PIXELS`).
pub const MAX_PIXELS: u64 = 178_956_970;

/// The container format of an encoded image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// JPEG (decoded by libjpeg-turbo).
    Jpeg,
    /// PNG (decoded by the `image` crate).
    Png,
}

/// What the header of an encoded image says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageInfo {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Container format.
    pub format: Format,
    jpeg: Option<JpegHeader>,
}

/// Reads the dimensions and format of an encoded image without decoding it.
/// Fails on empty, unrecognised or oversized ([`MAX_PIXELS`]) data, and on
/// truncated JPEG data ([`jpeg::check_complete`]): every decode of a file
/// starts here, so a truncated JPEG is refused whole, whatever crop is drawn.
pub fn probe(bytes: &[u8]) -> Result<ImageInfo, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    let info = if bytes.starts_with(&[0xFF, 0xD8]) {
        let h = jpeg::header(bytes)?;
        ImageInfo { width: h.width, height: h.height, format: Format::Jpeg, jpeg: Some(h) }
    } else {
        let format = ::image::guess_format(bytes)?;
        if format != ::image::ImageFormat::Png {
            return Err(DecodeError::UnsupportedFormat(format));
        }
        let reader = ::image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
        let (width, height) = reader.into_dimensions()?;
        ImageInfo { width, height, format: Format::Png, jpeg: None }
    };
    check_size(info.width, info.height)?;
    Ok(info)
}

/// Refuses an image without pixels or above [`MAX_PIXELS`].
fn check_size(width: u32, height: u32) -> Result<(), DecodeError> {
    if width == 0 || height == 0 {
        return Err(DecodeError::NoPixels { width, height });
    }
    if u64::from(width) * u64::from(height) > MAX_PIXELS {
        return Err(DecodeError::TooManyPixels { width, height, limit: MAX_PIXELS });
    }
    Ok(())
}

/// Decodes the file at `path` (JPEG or PNG, detected from its content).
pub fn decode_file(path: &Path) -> Result<RgbImage, DataError> {
    let bytes = crate::dataset::read_image_file(path)?;
    decode_bytes(&bytes).map_err(|error| DataError::Decode { path: path.to_path_buf(), error })
}

/// Decodes an in-memory JPEG or PNG, whole.
pub fn decode_bytes(bytes: &[u8]) -> Result<RgbImage, DecodeError> {
    let info = probe(bytes)?;
    match info.format {
        Format::Jpeg => {
            // `probe` read its header, checks included.
            let (data, w, h) = jpeg::decode_checked(bytes, None)?;
            Ok(RgbImage::new(w, h, data))
        }
        Format::Png => decode_with_image_crate(bytes),
    }
}

fn decode_with_image_crate(bytes: &[u8]) -> Result<RgbImage, DecodeError> {
    let format = ::image::guess_format(bytes)?;
    let mut reader = ::image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
    let mut limits = ::image::Limits::default();
    limits.max_alloc = Some(MAX_PIXELS * 8);
    reader.limits(limits);
    let decoded = reader.decode()?;
    let (w, h) = (decoded.width(), decoded.height());
    check_size(w, h)?;
    let rgb = decoded.into_rgb8();
    Ok(RgbImage::new(w, h, rgb.into_raw()))
}

/// The pixels a crop needs: `image` holds at least the crop, which is the
/// rectangle `bx` (`[x0, y0, x1, y1]`, relative to `region`, fractional
/// after DCT scaling) of the integer `region` of `image`.
#[derive(Debug, Clone)]
pub struct CropSource {
    /// Decoded pixels (the whole image, or an iMCU-aligned part of it).
    pub image: RgbImage,
    /// The pixels covering the crop.
    pub region: Region,
    /// The crop within `region`; `[0, 0, region.width, region.height]` unless scaled.
    pub bx: [f32; 4],
    /// The DCT scale denominator used (1 = full resolution).
    pub denom: u32,
}

/// The coarsest DCT scale `1 / d` (`d` in 8, 4, 2, else 1) at which a
/// `crop_w` x `crop_h` crop still has at least `out_w` x `out_h` pixels.
pub fn dct_denominator(crop_w: u32, crop_h: u32, out_w: u32, out_h: u32) -> u32 {
    [8u32, 4, 2]
        .into_iter()
        .find(|&d| {
            f64::from(crop_w) / f64::from(d) >= f64::from(out_w)
                && f64::from(crop_h) / f64::from(d) >= f64::from(out_h)
        })
        .unwrap_or(1)
}

/// Decodes what the crop `crop` (in pixels of the full image described by
/// `info`, [`probe`]'s of `bytes`, whose checks are not run again) needs
/// before it is resized to `out_w` x `out_h`.
///
/// JPEGs are decoded partially: only the iMCU columns and the rows around the
/// crop (with one iMCU of margin, so chroma upsampling sees the same
/// neighbours as in a full decode: the crop's pixels equal a full decode's).
/// With `scaled`, a JPEG is also decoded at the coarsest DCT scale (1/2, 1/4,
/// 1/8) at which the crop keeps at least the output size: faster, but the
/// pixels differ from timm's (which decodes at full size and then resizes):
/// libjpeg's scaled IDCT averages blocks where Pillow's antialiased resize
/// would filter, so results are close but not equal. PNGs are decoded whole.
pub fn decode_for_crop(
    bytes: &[u8],
    info: &ImageInfo,
    crop: CropBox,
    out_w: u32,
    out_h: u32,
    scaled: bool,
) -> Result<CropSource, DecodeError> {
    let whole_crop = |image: RgbImage| {
        let region =
            Region { left: crop.left, top: crop.top, width: crop.width, height: crop.height };
        let bx = [0.0, 0.0, crop.width as f32, crop.height as f32];
        CropSource { image, region, bx, denom: 1 }
    };
    let Some(hdr) = info.jpeg else {
        return decode_with_image_crate(bytes).map(whole_crop);
    };
    let d = if scaled { dct_denominator(crop.width, crop.height, out_w, out_h) } else { 1 };
    let (sw, sh) = (jpeg::scaled(hdr.width, d), jpeg::scaled(hdr.height, d));
    let df = f64::from(d);
    let fx0 = f64::from(crop.left) / df;
    let fy0 = f64::from(crop.top) / df;
    let fx1 = f64::from(crop.left + crop.width) / df;
    let fy1 = f64::from(crop.top + crop.height) / df;
    let ix0 = (fx0.floor() as u32).min(sw - 1);
    let iy0 = (fy0.floor() as u32).min(sh - 1);
    let ix1 = (fx1.ceil() as u32).clamp(ix0 + 1, sw);
    let iy1 = (fy1.ceil() as u32).clamp(iy0 + 1, sh);
    let partial = match hdr.mcu {
        Some((mw, mh)) => {
            let (mw, mh) = (jpeg::scaled(mw, d).max(1), jpeg::scaled(mh, d).max(1));
            let x = ix0.saturating_sub(mw) / mw * mw;
            let right = (ix1 + mw).min(sw);
            let y = iy0.saturating_sub(2 * mh);
            let bottom = (iy1 + mh).min(sh);
            Partial { denom: d, x, y, w: right - x, h: bottom - y }
        }
        None => Partial { denom: d, x: 0, y: 0, w: sw, h: sh },
    };
    // `info` is `probe`'s, which read the header, checks included.
    let (data, w, h) = match jpeg::decode_checked(bytes, Some(partial)) {
        Ok(decoded) => decoded,
        // libjpeg-turbo refuses some partial or scaled decodes of files it
        // decodes whole: a lossless JPEG, or sampling factors written in a
        // form it takes for another subsampling (its iMCU is then wider than
        // the header's, and the region's left edge is "unexplained"). The
        // crop comes from the whole image then, as a PNG's does, with the
        // same pixels; a file that does not decode whole is still an error.
        Err(jpeg::JpegError::Refused { message }) => {
            tracing::debug!(%message, "a partial decode refused; decoding the whole image");
            let (data, w, h) = jpeg::decode_checked(bytes, None)?;
            return Ok(whole_crop(RgbImage::new(w, h, data)));
        }
        Err(e) => return Err(e.into()),
    };
    let region =
        Region { left: ix0 - partial.x, top: iy0 - partial.y, width: ix1 - ix0, height: iy1 - iy0 };
    let bx = if d == 1 {
        [0.0, 0.0, region.width as f32, region.height as f32]
    } else {
        [
            (fx0 - f64::from(ix0)) as f32,
            (fy0 - f64::from(iy0)) as f32,
            (fx1 - f64::from(ix0)) as f32,
            (fy1 - f64::from(iy0)) as f32,
        ]
    };
    Ok(CropSource { image: RgbImage::new(w, h, data), region, bx, denom: d })
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
    fn the_recipes_largest_eval_resize_is_the_largest_within_the_pixel_limit_at_its_aspect() {
        let side = u64::from(rsb_recipes::MAX_EVAL_RESIZE_SIDE);
        let aspect = u64::from(rsb_recipes::MAX_EVAL_ASPECT);
        let pixels = |short: u64| short * (short * aspect);
        assert!(pixels(side) <= MAX_PIXELS && pixels(side + 1) > MAX_PIXELS, "{side}");
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
        let empty = decode_bytes(b"").unwrap_err();
        assert!(matches!(empty, DecodeError::Empty), "{empty:?}");
        assert_eq!(empty.to_string(), "empty file");
        let garbage = decode_bytes(b"this is not an image at all").unwrap_err();
        assert!(matches!(garbage, DecodeError::Image(_)), "{garbage:?}");
        let png = encode_png(::image::DynamicImage::ImageRgb8(::image::RgbImage::new(64, 64)));
        let truncated = decode_bytes(&png[..png.len() / 2]).unwrap_err();
        assert!(matches!(truncated, DecodeError::Image(_)), "{truncated:?}");
    }

    #[test]
    fn unsupported_formats_and_truncated_jpegs_are_typed() {
        let err = probe(b"GIF89a\x02\x00\x02\x00\x00\x00\x00;").unwrap_err();
        assert!(
            matches!(err, DecodeError::UnsupportedFormat(::image::ImageFormat::Gif)),
            "{err:?}"
        );
        let img = RgbImage::new(64, 48, (0..64 * 48 * 3).map(|i| (i * 7 % 251) as u8).collect());
        let jpeg = jpeg::encode_rgb(&img, 90).unwrap();
        let err = decode_bytes(&jpeg[..jpeg.len() / 2]).unwrap_err();
        assert!(matches!(err, DecodeError::Jpeg(jpeg::JpegError::Truncated { .. })), "{err:?}");
        assert!(err.to_string().contains("truncated"), "{err}");
    }

    /// The pixels of `region` of `image`, row by row.
    fn pixels_of(image: &RgbImage, region: &Region) -> Vec<u8> {
        let mut pixels = Vec::new();
        for y in region.top..region.top + region.height {
            for x in region.left..region.left + region.width {
                pixels.extend(image.pixel(x, y));
            }
        }
        pixels
    }

    /// A lossless JPEG (which libjpeg-turbo decodes whole, never in part
    /// nor scaled) gives a training crop the pixels of a full decode, where
    /// the refused partial decode marked the file bad for the whole run.
    #[test]
    fn a_crop_of_a_jpeg_that_cannot_be_decoded_in_part_comes_from_the_whole_image() {
        let (width, height) = (96u32, 64u32);
        let data: Vec<u8> =
            (0..width * height * 3).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let mut compressor = turbojpeg::Compressor::new().unwrap();
        compressor.set_lossless(true).unwrap();
        let image = turbojpeg::Image {
            pixels: data.as_slice(),
            width: width as usize,
            pitch: width as usize * 3,
            height: height as usize,
            format: turbojpeg::PixelFormat::RGB,
        };
        let lossless = compressor.compress_to_vec(image).unwrap();
        let info = probe(&lossless).unwrap();
        let whole = decode_bytes(&lossless).unwrap();
        assert_eq!(whole.data, data, "a lossless JPEG decodes to its pixels");
        let crop = CropBox { top: 20, left: 40, height: 30, width: 33 };
        for scaled in [false, true] {
            let source = decode_for_crop(&lossless, &info, crop, 8, 8, scaled)
                .unwrap_or_else(|e| panic!("scaled {scaled}: {e}"));
            assert_eq!(source.denom, 1);
            let expected =
                Region { left: crop.left, top: crop.top, width: crop.width, height: crop.height };
            assert_eq!(
                pixels_of(&source.image, &source.region),
                pixels_of(&whole, &expected),
                "scaled {scaled}"
            );
        }
    }

    /// A `width` x `height` JPEG of noise (large entropy-coded data).
    fn noise_jpeg(width: u32, height: u32) -> Vec<u8> {
        let n = (width * height * 3) as u64;
        let data = (0..n).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        jpeg::encode_rgb(&RgbImage::new(width, height, data), 90).unwrap()
    }

    fn is_truncated(err: &DecodeError) -> bool {
        matches!(err, DecodeError::Jpeg(jpeg::JpegError::Truncated { .. }))
    }

    #[test]
    fn a_jpeg_cut_near_its_end_is_refused_whatever_the_training_crop() {
        let whole = noise_jpeg(320, 240);
        let cut = &whole[..whole.len() * 97 / 100];
        let transform = crate::transforms::TrainTransform {
            size: 32,
            scale: [0.08, 1.0],
            ratio: [0.75, 4.0 / 3.0],
            interpolation: crate::transforms::CropInterpolation::Random,
            hflip: 0.5,
            rand_augment: None,
        };
        for seed in 0..64 {
            let mut rng = crate::rng::Rng::from_key(&[seed]);
            let result = transform.apply_encoded(cut, &mut rng, seed % 2 == 0);
            let err = result.err().unwrap_or_else(|| panic!("crop {seed} of a cut file decoded"));
            assert!(is_truncated(&err), "crop {seed}: {err:?}");
            assert!(err.to_string().contains(jpeg::NO_END_OF_IMAGE), "{err}");
            let mut rng = crate::rng::Rng::from_key(&[seed]);
            transform.apply_encoded(&whole, &mut rng, seed % 2 == 0).unwrap();
        }
        // The top rows alone, far above the cut, are refused as well.
        let top = Partial { denom: 1, x: 0, y: 0, w: 320, h: 16 };
        let err = jpeg::decode(cut, Some(top)).unwrap_err();
        assert!(matches!(err, jpeg::JpegError::Truncated { .. }), "{err:?}");
        let err = probe(cut).unwrap_err();
        assert!(is_truncated(&err), "{err:?}");
    }

    #[test]
    fn a_jpeg_truncated_after_a_harmless_warning_is_refused() {
        let whole = noise_jpeg(160, 120);
        // Junk bytes before the start of scan: libjpeg warns "extraneous
        // bytes before marker", a warning Pillow ignores, and TurboJPEG then
        // keeps that warning's text rather than a later premature end's.
        let sos = whole.windows(2).position(|p| p == [0xFF, 0xDA]).unwrap();
        let junk = [&whole[..sos], &[0, 0, 0], &whole[sos..]].concat();
        let decoded = decode_bytes(&junk).unwrap();
        assert_eq!(decoded.data, decode_bytes(&whole).unwrap().data);
        let err = decode_bytes(&junk[..junk.len() / 2]).unwrap_err();
        assert!(is_truncated(&err), "{err:?}");
    }

    #[test]
    fn a_jpeg_is_complete_when_its_segments_reach_an_end_of_image() {
        let whole = noise_jpeg(64, 48);
        let refused = |bytes: &[u8]| {
            let err = jpeg::check_complete(bytes).unwrap_err();
            assert!(matches!(err, jpeg::JpegError::Truncated { .. }), "{err:?}");
            assert!(is_truncated(&decode_bytes(bytes).unwrap_err()));
        };
        // An EXIF-like segment holding a thumbnail (its own SOI .. EOI) before the image.
        let thumbnail = noise_jpeg(16, 16);
        let mut app1 = b"Exif\0\0".to_vec();
        app1.extend_from_slice(&thumbnail);
        app1.extend_from_slice(b"more EXIF data");
        let length = u16::try_from(app1.len() + 2).unwrap().to_be_bytes();
        let with_thumbnail = [&whole[..2], &[0xFF, 0xE1], &length[..], &app1, &whole[2..]].concat();
        jpeg::check_complete(&with_thumbnail).unwrap();
        assert_eq!(decode_bytes(&with_thumbnail).unwrap().data, decode_bytes(&whole).unwrap().data);
        // Cut inside the image's scan: the thumbnail's end marker does not
        // count; nor does it cut inside the segment holding it, after it.
        refused(&with_thumbnail[..with_thumbnail.len() - 40]);
        let after_thumbnail = 6 + 6 + thumbnail.len() + 4;
        refused(&with_thumbnail[..after_thumbnail]);
        // Cut right at the thumbnail's end marker: it ends with one, so
        // check_complete passes it, but it ends before its frame header:
        // truncated, by its header and by every decode, where libjpeg gave
        // the size of the image this thread read before.
        let at_thumbnail_end = &with_thumbnail[..6 + 6 + thumbnail.len()];
        assert!(at_thumbnail_end.ends_with(&[0xFF, 0xD9]));
        jpeg::check_complete(at_thumbnail_end).unwrap();
        decode_bytes(&whole).unwrap();
        let err = jpeg::header(at_thumbnail_end).map(|h| format!("{h:?}")).unwrap_err();
        assert!(matches!(err, jpeg::JpegError::Truncated { .. }), "{err:?}");
        assert!(is_truncated(&decode_bytes(at_thumbnail_end).unwrap_err()));
        // Tables and an end of image but no frame (an abbreviated table
        // specification): no image, and not the last image's size.
        let dqt = whole.windows(2).position(|p| p == [0xFF, 0xDB]).unwrap();
        let dqt_length = usize::from(u16::from_be_bytes([whole[dqt + 2], whole[dqt + 3]]));
        let tables_only = [&whole[..2], &whole[dqt..dqt + 2 + dqt_length], &[0xFF, 0xD9]].concat();
        jpeg::check_complete(&tables_only).unwrap();
        let err = jpeg::header(&tables_only).map(|h| format!("{h:?}")).unwrap_err();
        assert!(err.to_string().contains("no frame header"), "{err:?}");
        assert!(!is_truncated(&decode_bytes(&tables_only).unwrap_err()));
        // A segment length that is no length is left to libjpeg (which
        // reads on past it), not called truncated.
        let bad_length = [&whole[..2], &[0xFF, 0xE1, 0x00, 0x01], &whole[2..]].concat();
        let read = jpeg::header(&bad_length);
        assert!(!matches!(read, Err(jpeg::JpegError::Truncated { .. })), "{read:?}");
        // Cut just before the end marker, or right after a scan header.
        refused(&whole[..whole.len() - 2]);
        let sos = whole.windows(2).rposition(|p| p == [0xFF, 0xDA]).unwrap();
        refused(&whole[..sos + 2]);
        // Cut, then zero-filled to its old size (Pillow decodes the zeros as
        // grey blocks): refused. Zero padding after the end marker is not.
        let cut = whole.len() * 9 / 10;
        refused(&[&whole[..cut], &vec![0; whole.len() - cut][..]].concat());
        jpeg::check_complete(&[&whole[..], &[0; 16][..]].concat()).unwrap();
        // The end marker removed, and a comment segment cut short holding
        // `FF D9` after the scan: refused, whatever crop would be decoded.
        let comment =
            [&whole[..whole.len() - 2], &[0xFF, 0xFE, 0x00, 0x20], b"ab\xFF\xD9cd"].concat();
        refused(&comment);
        // No marker at all; data appended after the end marker.
        assert!(jpeg::check_complete(&[0xFF, 0xD8, 0x12]).is_err());
        jpeg::check_complete(&[&whole[..], b"trailing bytes"].concat()).unwrap();
        // Appended data (a Motion Photo's video) holding a start-of-scan
        // pair after its last end-of-image pair: the image itself ends, and
        // Pillow decodes it.
        let video = [&b"ftypmp42"[..], &[0x12, 0xFF, 0xD9, 0x00, 0xFF, 0xDA, 0x40, 0x7F]].concat();
        let motion_photo = [&with_thumbnail[..], &video].concat();
        jpeg::check_complete(&motion_photo).unwrap();
        assert_eq!(decode_bytes(&motion_photo).unwrap().data, decode_bytes(&whole).unwrap().data);
    }
}
