//! JPEG decoding with libjpeg-turbo 3 (the TurboJPEG 3 API of the
//! `turbojpeg` crate, whose `turbojpeg-sys` builds the bundled libjpeg-turbo
//! 3.1 from source and links it statically).
//!
//! The safe wrapper of the `turbojpeg` crate does not expose partial
//! decompression, so this module drives the raw API: read the header, set a
//! DCT scaling factor (1/1, 1/2, 1/4, 1/8) and a cropping region, decompress.
//! Decoding is the same libjpeg-turbo, with the same defaults (accurate
//! integer IDCT, fancy upsampling), that Pillow uses, so full-size decodes
//! equal Pillow's pixel for pixel.
//!
//! libjpeg warnings (e.g. "extraneous bytes before marker") do not fail a
//! decode, as Pillow ignores them. Truncated files, which Pillow refuses
//! ("image file is truncated"), are refused before any decoding by
//! [`check_complete`]: once per file, whatever part of it a training crop
//! needs and whatever warnings libjpeg emits (TurboJPEG keeps only the first
//! warning's text, so a harmless earlier warning would hide a later premature
//! end). A premature end that libjpeg still reports is refused as well.
//! A scan limit guards against progressive files crafted to take forever.

use std::cell::RefCell;
use std::ffi::CStr;
use turbojpeg::libc::c_int;
use turbojpeg::raw;

/// Most progressive scans accepted (a normal progressive JPEG has about 10).
const SCAN_LIMIT: c_int = 500;

/// [`JpegError::Truncated`]'s detail when the data ends before its end of image.
pub const NO_END_OF_IMAGE: &str = "its segments do not reach an end-of-image marker";

/// [`JpegError::Truncated`]'s detail when the data ends before its frame header.
const NO_FRAME_HEADER: &str = "it ends before its frame header";

/// [`JpegError::Truncated`]'s detail when libjpeg ran out of data.
const PREMATURE_END: &str = "premature end of JPEG data";

/// Refuses JPEG data that ends before its image does, from the bytes alone.
///
/// Data that ends with an end-of-image marker (`FF D9`, trailing zero
/// padding aside) is complete: almost every file, checked in its last bytes.
/// Other data (cut inside or before a scan, or with data appended after the
/// image, such as a Motion Photo's video) is complete when its segments,
/// walked from the start of image, reach an end of image
/// ([`walk_segments`]). Deliberately stricter than Pillow for one
/// kind of file: a sequential JPEG cut after its last row's data but before
/// its end marker, or cut and then zero-filled to its old size (an
/// interrupted preallocated download), which Pillow decodes (the zeros as
/// grey blocks) and this refuses.
pub fn check_complete(bytes: &[u8]) -> Result<(), JpegError> {
    let padded_to = bytes.iter().rposition(|&b| b != 0x00).map_or(0, |last| last + 1);
    if bytes[..padded_to].ends_with(&[0xFF, 0xD9])
        || walk_segments(bytes, |_| false) == Walk::At(0xD9)
    {
        return Ok(());
    }
    Err(JpegError::Truncated { detail: NO_END_OF_IMAGE })
}

/// Refuses JPEG data whose segments reach no frame header (the `SOFn`
/// segment that gives the image's size) before a scan or the end of image,
/// from the bytes alone: libjpeg-turbo's header reader, given such data,
/// reports success for a tables-only stream (or a warning once the data runs
/// out) and leaves the size of the image its handle read before, which a
/// crop would be computed from. Data cut inside a segment before its frame
/// header (right after an EXIF thumbnail's end marker, which
/// [`check_complete`] passes) is [`JpegError::Truncated`]. Walks only the
/// segments before the frame header: a few, skipped by their lengths.
pub fn check_frame_header(bytes: &[u8]) -> Result<(), JpegError> {
    let is_frame_header =
        |code: u8| matches!(code, 0xC0..=0xCF) && !matches!(code, 0xC4 | 0xC8 | 0xCC);
    match walk_segments(bytes, |code| is_frame_header(code) || code == 0xDA) {
        Walk::At(code) if is_frame_header(code) => Ok(()),
        Walk::At(_) => Err(JpegError::Refused {
            message: "no image: the JPEG has no frame header before its scan or end of image"
                .into(),
        }),
        Walk::RanOut => Err(JpegError::Truncated { detail: NO_FRAME_HEADER }),
        // Left to libjpeg-turbo, which names what is wrong.
        Walk::Malformed => Ok(()),
    }
}

/// Where walking a JPEG's segments ([`walk_segments`]) stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Walk {
    /// At an end-of-image marker, or at a marker the walk was asked to stop
    /// at (its code).
    At(u8),
    /// At the end of the data, inside a segment or a scan.
    RanOut,
    /// At something that is not a JPEG's structure (no start of image, a
    /// segment length below 2).
    Malformed,
}

/// Walks the segments of `bytes` from its start of image to an end of image,
/// a marker for which `stop_at` holds, or the end of the data: each marker
/// segment is skipped by its length (so the `FF D9` of an EXIF thumbnail
/// inside one is passed over), and a scan's entropy-coded data up to the
/// next marker that is not a restart marker. Bytes before a marker that are
/// not one are passed over, as libjpeg does (with a warning Pillow ignores).
fn walk_segments(bytes: &[u8], stop_at: impl Fn(u8) -> bool) -> Walk {
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return Walk::Malformed;
    }
    let mut at = 2;
    loop {
        // The next marker: an `FF` (and any fill `FF`s) then a code that is
        // neither a stuffed zero nor a restart marker.
        let code = loop {
            let Some(ff) = bytes[at..].iter().position(|&b| b == 0xFF) else {
                return Walk::RanOut;
            };
            at += ff;
            while bytes.get(at) == Some(&0xFF) {
                at += 1;
            }
            let Some(&code) = bytes.get(at) else {
                return Walk::RanOut;
            };
            at += 1;
            if code != 0x00 && !(0xD0..=0xD7).contains(&code) {
                break code;
            }
        };
        if code == 0xD9 || stop_at(code) {
            return Walk::At(code);
        }
        match code {
            // Markers without a length: a start of image, `TEM`.
            0xD8 | 0x01 => {}
            _ => {
                let Some(&[high, low]) = bytes.get(at..at + 2) else {
                    return Walk::RanOut;
                };
                let length = usize::from(u16::from_be_bytes([high, low]));
                if length < 2 {
                    return Walk::Malformed;
                }
                if at + length > bytes.len() {
                    return Walk::RanOut;
                }
                at += length;
            }
        }
    }
}

/// Why libjpeg-turbo could not read, decode or encode a JPEG.
#[derive(Debug, thiserror::Error)]
pub enum JpegError {
    /// libjpeg-turbo could not allocate a decompressor.
    #[error("libjpeg-turbo could not create a decompressor")]
    NoDecompressor,
    /// libjpeg-turbo refused the data (corrupt header, unsupported feature,
    /// too many progressive scans).
    #[error("{message}")]
    Refused {
        /// libjpeg-turbo's message.
        message: String,
    },
    /// The header gives a width or height below 1.
    #[error("invalid JPEG dimensions {width}x{height}")]
    InvalidDimensions {
        /// Width from the header.
        width: i32,
        /// Height from the header.
        height: i32,
    },
    /// The data ends before the image does (Pillow refuses such files too).
    #[error("image file is truncated ({detail})")]
    Truncated {
        /// How the truncation showed.
        detail: &'static str,
    },
    /// A partial decode asked for pixels outside the (scaled) image.
    #[error("cropping region {width}x{height}+{x}+{y} outside the {scaled_width}x{scaled_height} scaled image")]
    CropOutside {
        /// Left column of the region.
        x: u32,
        /// Top row of the region.
        y: u32,
        /// Columns of the region.
        width: u32,
        /// Rows of the region.
        height: u32,
        /// Width of the image at the DCT scale.
        scaled_width: u32,
        /// Height of the image at the DCT scale.
        scaled_height: u32,
    },
    /// Encoding an RGB image failed.
    #[error("JPEG encoding failed: {0}")]
    Encode(#[source] turbojpeg::Error),
}

/// What the JPEG header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JpegHeader {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Four components (CMYK or YCCK), which need Pillow's CMYK conversion.
    pub cmyk: bool,
    /// iMCU width and height in pixels at full scale (`None`: unusual
    /// subsampling, partial decoding impossible).
    pub mcu: Option<(u32, u32)>,
}

/// Partial decompression request: DCT scale `1 / denom` and a rectangle of
/// the scaled image (`x` a multiple of the scaled iMCU width).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partial {
    /// 1, 2, 4 or 8.
    pub denom: u32,
    /// Left column in the scaled image.
    pub x: u32,
    /// Top row in the scaled image.
    pub y: u32,
    /// Columns.
    pub w: u32,
    /// Rows.
    pub h: u32,
}

/// The scaled size of a dimension: `ceil(d / denom)` (libjpeg's `TJSCALED`).
pub fn scaled(d: u32, denom: u32) -> u32 {
    d.div_ceil(denom.max(1))
}

/// A TurboJPEG decompression handle.
struct Handle(raw::tjhandle);

// SAFETY: a TurboJPEG handle is a plain heap object with no thread affinity;
// it is only used from one thread at a time (it lives in a thread-local).
unsafe impl Send for Handle {}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: the handle came from tj3Init and is destroyed once.
        unsafe { raw::tj3Destroy(self.0) }
    }
}

impl Handle {
    fn new() -> Result<Handle, JpegError> {
        // SAFETY: plain constructor; a null result is checked.
        let ptr = unsafe { raw::tj3Init(raw::TJINIT_TJINIT_DECOMPRESS as c_int) };
        if ptr.is_null() {
            return Err(JpegError::NoDecompressor);
        }
        let mut h = Handle(ptr);
        h.set(raw::TJPARAM_TJPARAM_SCANLIMIT, SCAN_LIMIT)?;
        Ok(h)
    }

    /// The last error: whether it is only a warning, and libjpeg's message.
    fn error(&mut self) -> (bool, String) {
        // SAFETY: the handle is valid; the returned string is owned by it and
        // copied before the next call.
        let (code, msg) = unsafe {
            let code = raw::tj3GetErrorCode(self.0);
            let msg = CStr::from_ptr(raw::tj3GetErrorStr(self.0)).to_string_lossy().into_owned();
            (code, msg)
        };
        (code == raw::TJERR_TJERR_WARNING as c_int, msg)
    }

    /// The last error as a [`JpegError`].
    fn refusal(&mut self) -> JpegError {
        JpegError::Refused { message: self.error().1 }
    }

    fn set(&mut self, param: raw::TJPARAM, value: c_int) -> Result<(), JpegError> {
        // SAFETY: valid handle, plain integer parameter.
        if unsafe { raw::tj3Set(self.0, param as c_int, value) } != 0 {
            return Err(self.refusal());
        }
        Ok(())
    }

    fn get(&mut self, param: raw::TJPARAM) -> c_int {
        // SAFETY: valid handle, plain integer parameter.
        unsafe { raw::tj3Get(self.0, param as c_int) }
    }

    fn header(&mut self, bytes: &[u8]) -> Result<JpegHeader, JpegError> {
        // SAFETY: the buffer outlives the call; libjpeg-turbo only reads it.
        let rc = unsafe { raw::tj3DecompressHeader(self.0, bytes.as_ptr(), bytes.len() as _) };
        if rc != 0 {
            let (warning, message) = self.error();
            if !warning {
                return Err(JpegError::Refused { message });
            }
        }
        let width = self.get(raw::TJPARAM_TJPARAM_JPEGWIDTH);
        let height = self.get(raw::TJPARAM_TJPARAM_JPEGHEIGHT);
        if width < 1 || height < 1 {
            return Err(JpegError::InvalidDimensions { width, height });
        }
        let colorspace = self.get(raw::TJPARAM_TJPARAM_COLORSPACE);
        let cmyk = colorspace == raw::TJCS_TJCS_CMYK as c_int
            || colorspace == raw::TJCS_TJCS_YCCK as c_int;
        let subsamp = self.get(raw::TJPARAM_TJPARAM_SUBSAMP);
        let mcu = match subsamp {
            s if s == raw::TJSAMP_TJSAMP_444 || s == raw::TJSAMP_TJSAMP_GRAY => Some((8, 8)),
            s if s == raw::TJSAMP_TJSAMP_422 => Some((16, 8)),
            s if s == raw::TJSAMP_TJSAMP_420 => Some((16, 16)),
            s if s == raw::TJSAMP_TJSAMP_440 => Some((8, 16)),
            s if s == raw::TJSAMP_TJSAMP_411 => Some((32, 8)),
            s if s == raw::TJSAMP_TJSAMP_441 => Some((8, 32)),
            _ => None,
        };
        Ok(JpegHeader { width: width as u32, height: height as u32, cmyk, mcu })
    }

    /// Decompresses into `out` (`w * h * channels` bytes) with the scaling and
    /// cropping already set.
    fn decompress(
        &mut self,
        bytes: &[u8],
        out: &mut [u8],
        w: u32,
        format: c_int,
    ) -> Result<(), JpegError> {
        let channels = if format == raw::TJPF_TJPF_CMYK { 4 } else { 3 };
        let pitch = (w * channels) as c_int;
        // SAFETY: `out` holds `h` rows of `pitch` bytes for the (scaled,
        // cropped) output size the caller computed from the same header,
        // scaling factor and cropping region; libjpeg-turbo writes within it.
        let rc = unsafe {
            raw::tj3Decompress8(
                self.0,
                bytes.as_ptr(),
                bytes.len() as _,
                out.as_mut_ptr(),
                pitch,
                format,
            )
        };
        if rc != 0 {
            let (warning, message) = self.error();
            // Pillow ignores libjpeg's warnings, but not running out of data.
            if message.contains("Premature end") {
                return Err(JpegError::Truncated { detail: PREMATURE_END });
            }
            if !warning {
                return Err(JpegError::Refused { message });
            }
        }
        Ok(())
    }

    fn set_scaling(&mut self, denom: u32) -> Result<(), JpegError> {
        let sf = raw::tjscalingfactor { num: 1, denom: denom as c_int };
        // SAFETY: valid handle; the factor is one libjpeg-turbo supports.
        if unsafe { raw::tj3SetScalingFactor(self.0, sf) } != 0 {
            return Err(self.refusal());
        }
        Ok(())
    }

    fn set_cropping(&mut self, x: u32, y: u32, w: u32, h: u32) -> Result<(), JpegError> {
        let region = raw::tjregion { x: x as c_int, y: y as c_int, w: w as c_int, h: h as c_int };
        // SAFETY: valid handle; the region is validated by libjpeg-turbo.
        if unsafe { raw::tj3SetCroppingRegion(self.0, region) } != 0 {
            return Err(self.refusal());
        }
        Ok(())
    }
}

thread_local! {
    static HANDLE: RefCell<Option<Handle>> = const { RefCell::new(None) };
}

fn with_handle<T>(f: impl FnOnce(&mut Handle) -> Result<T, JpegError>) -> Result<T, JpegError> {
    HANDLE.with(|cell| {
        let mut slot = cell.borrow_mut();
        let handle = match slot.as_mut() {
            Some(handle) => handle,
            None => slot.insert(Handle::new()?),
        };
        let result = f(handle);
        if result.is_err() {
            // A failed decode may leave state behind: start afresh next time.
            *slot = None;
        }
        result
    })
}

/// Reads the header of a JPEG, refusing truncated data ([`check_complete`])
/// and data with no frame header ([`check_frame_header`]).
pub fn header(bytes: &[u8]) -> Result<JpegHeader, JpegError> {
    check_complete(bytes)?;
    check_frame_header(bytes)?;
    with_handle(|h| h.header(bytes))
}

/// Decodes a JPEG (or the [`Partial`] part of it) to 8-bit RGB: grayscale is
/// replicated by libjpeg, CMYK/YCCK files are decoded as CMYK and converted
/// as Pillow's `convert('RGB')` does ([`cmyk_to_rgb`]). Returns the pixels and
/// their width and height. Truncated data is refused before decoding
/// ([`check_complete`], [`check_frame_header`]), whatever part of the image
/// is asked for.
pub fn decode(bytes: &[u8], partial: Option<Partial>) -> Result<(Vec<u8>, u32, u32), JpegError> {
    check_complete(bytes)?;
    check_frame_header(bytes)?;
    decode_checked(bytes, partial)
}

/// [`decode`] of data whose [`header`] was read, which ran its checks: the
/// decoder's own callers probe each file first, and check it once.
pub(crate) fn decode_checked(
    bytes: &[u8],
    partial: Option<Partial>,
) -> Result<(Vec<u8>, u32, u32), JpegError> {
    with_handle(|h| {
        let hdr = h.header(bytes)?;
        let (denom, x, y, w, hgt) = match partial {
            Some(p) => (p.denom, p.x, p.y, p.w, p.h),
            None => (1, 0, 0, hdr.width, hdr.height),
        };
        h.set_scaling(denom)?;
        let (sw, sh) = (scaled(hdr.width, denom), scaled(hdr.height, denom));
        if w == 0 || hgt == 0 || x + w > sw || y + hgt > sh {
            return Err(JpegError::CropOutside {
                x,
                y,
                width: w,
                height: hgt,
                scaled_width: sw,
                scaled_height: sh,
            });
        }
        if (x, y, w, hgt) == (0, 0, sw, sh) {
            h.set_cropping(0, 0, 0, 0)?;
        } else {
            h.set_cropping(x, y, w, hgt)?;
        }
        let n = w as usize * hgt as usize;
        let result = if hdr.cmyk {
            let mut cmyk = vec![0u8; n * 4];
            h.decompress(bytes, &mut cmyk, w, raw::TJPF_TJPF_CMYK)?;
            let mut rgb = vec![0u8; n * 3];
            cmyk_to_rgb(&cmyk, &mut rgb);
            rgb
        } else {
            let mut rgb = vec![0u8; n * 3];
            h.decompress(bytes, &mut rgb, w, raw::TJPF_TJPF_RGB)?;
            rgb
        };
        // The handle keeps these settings: reset them for the next caller.
        h.set_cropping(0, 0, 0, 0)?;
        h.set_scaling(1)?;
        Ok((result, w, hgt))
    })
}

/// Encodes an RGB image as a baseline JPEG of `quality` (1..=100) with 4:2:0
/// chroma subsampling (Pillow's default for `img.save(f, quality=q)`).
pub fn encode_rgb(img: &crate::image::RgbImage, quality: i32) -> Result<Vec<u8>, JpegError> {
    let image = turbojpeg::Image {
        pixels: img.data.as_slice(),
        width: img.width as usize,
        pitch: img.width as usize * 3,
        height: img.height as usize,
        format: turbojpeg::PixelFormat::RGB,
    };
    let out = turbojpeg::compress(image, quality.clamp(1, 100), turbojpeg::Subsamp::Sub2x2)
        .map_err(JpegError::Encode)?;
    Ok(out.to_vec())
}

/// Pillow's `MULDIV255`: `a * b / 255` rounded, in integers.
#[inline]
fn muldiv255(a: i32, b: i32) -> i32 {
    let tmp = a * b + 128;
    ((tmp >> 8) + tmp) >> 8
}

/// Pillow's CMYK JPEG path: the decoded values are inverted (Pillow reads
/// every CMYK JPEG with raw mode `CMYK;I`, "assume adobe conventions"), then
/// `convert('RGB')` computes `255 - k' - c'(255 - k')/255` per channel.
pub fn cmyk_to_rgb(cmyk: &[u8], rgb: &mut [u8]) {
    for (px, out) in cmyk.chunks_exact(4).zip(rgb.chunks_exact_mut(3)) {
        // Inverted: c' = 255 - c, and nk = 255 - k' = k.
        let nk = i32::from(px[3]);
        for (o, &v) in out.iter_mut().zip(&px[..3]) {
            let c = 255 - i32::from(v);
            *o = (nk - muldiv255(c, nk)).clamp(0, 255) as u8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmyk_conversion_follows_pillow() {
        // Stored (Adobe-inverted) values: 255 = no ink. No ink at all is white.
        let mut rgb = [0u8; 6];
        cmyk_to_rgb(&[255, 255, 255, 255, 0, 0, 0, 0], &mut rgb);
        assert_eq!(rgb, [255, 255, 255, 0, 0, 0]);
        // Pillow: Image.frombytes('CMYK', (1, 1), bytes([10, 200, 0, 50]))
        //   .convert('RGB') -> (197, 44, 205); stored inverted in the file.
        cmyk_to_rgb(&[245, 55, 255, 205], &mut rgb[..3]);
        assert_eq!(&rgb[..3], &[197, 44, 205]);
    }

    #[test]
    fn scaled_sizes_round_up() {
        assert_eq!(scaled(500, 1), 500);
        assert_eq!(scaled(375, 2), 188);
        assert_eq!(scaled(375, 8), 47);
    }
}
