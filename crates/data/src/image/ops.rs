//! Pillow-exact colour operations on [`RgbImage`]s: the `ImageOps` and
//! `ImageEnhance` functions that timm's RandAugment applies.
//!
//! Each function reproduces Pillow 13 bit for bit: the look-up tables of
//! `ImageOps` (clipped to 0..=255 as `Image.point` does), the ITU-R 601 RGB->L
//! conversion in 16-bit fixed point, `Image.blend`'s single-precision
//! arithmetic (with clipping when extrapolating), the rounded `ImageStat` mean
//! of `ImageEnhance.Contrast`, and the 3x3 `ImageFilter.SMOOTH` convolution,
//! which leaves the one-pixel border untouched, used by
//! `ImageEnhance.Sharpness`.

use super::RgbImage;

/// Luma of each pixel, Pillow's `convert("L")`:
/// `(19595 R + 38470 G + 7471 B + 0x8000) >> 16`.
pub fn grayscale(img: &RgbImage) -> Vec<u8> {
    img.data.chunks_exact(3).map(luma).collect()
}

#[inline]
fn luma(p: &[u8]) -> u8 {
    let v = u32::from(p[0]) * 19595 + u32::from(p[1]) * 38470 + u32::from(p[2]) * 7471 + 0x8000;
    (v >> 16) as u8
}

/// Per-channel histograms (`Image.histogram()` of an RGB image).
fn histograms(img: &RgbImage) -> [[u64; 256]; 3] {
    let mut h = [[0u64; 256]; 3];
    for p in img.data.chunks_exact(3) {
        h[0][usize::from(p[0])] += 1;
        h[1][usize::from(p[1])] += 1;
        h[2][usize::from(p[2])] += 1;
    }
    h
}

/// Builds a table from integer values the way `Image.point` does (`CLIP8`).
fn clip_lut(f: impl Fn(i64) -> i64) -> [u8; 256] {
    let mut lut = [0u8; 256];
    for (i, v) in lut.iter_mut().enumerate() {
        *v = f(i as i64).clamp(0, 255) as u8;
    }
    lut
}

/// Maps every channel value through its channel's table.
fn apply_luts(img: &RgbImage, luts: &[[u8; 256]; 3]) -> RgbImage {
    let mut data = img.data.clone();
    for p in data.chunks_exact_mut(3) {
        for (v, lut) in p.iter_mut().zip(luts) {
            *v = lut[usize::from(*v)];
        }
    }
    RgbImage { width: img.width, height: img.height, data }
}

fn apply_lut(img: &RgbImage, lut: &[u8; 256]) -> RgbImage {
    apply_luts(img, &[*lut, *lut, *lut])
}

/// `ImageOps.autocontrast(img)` (no cutoff): per channel, stretches
/// [min, max] to [0, 255].
pub fn autocontrast(img: &RgbImage) -> RgbImage {
    let hist = histograms(img);
    let mut luts = [[0u8; 256]; 3];
    for (h, lut) in hist.iter().zip(luts.iter_mut()) {
        let lo = h.iter().position(|&c| c != 0).unwrap_or(255) as i64;
        let hi = h.iter().rposition(|&c| c != 0).unwrap_or(0) as i64;
        *lut = if hi <= lo {
            clip_lut(|i| i)
        } else {
            let scale = 255.0 / (hi - lo) as f64;
            let offset = (-lo) as f64 * scale;
            // Python `int()` truncates toward zero, then the clamp.
            clip_lut(|i| (i as f64 * scale + offset) as i64)
        };
    }
    apply_luts(img, &luts)
}

/// `ImageOps.equalize(img)`: per-channel histogram equalisation.
pub fn equalize(img: &RgbImage) -> RgbImage {
    let hist = histograms(img);
    let mut luts = [[0u8; 256]; 3];
    for (h, lut) in hist.iter().zip(luts.iter_mut()) {
        let nonzero: Vec<u64> = h.iter().copied().filter(|&c| c != 0).collect();
        let step = match nonzero.last() {
            Some(&last) if nonzero.len() > 1 => (nonzero.iter().sum::<u64>() - last) / 255,
            _ => 0,
        };
        *lut = if step == 0 {
            clip_lut(|i| i)
        } else {
            let mut table = [0i64; 256];
            let mut n = step / 2;
            for (t, &c) in table.iter_mut().zip(h.iter()) {
                *t = (n / step).min(255) as i64;
                n += c;
            }
            clip_lut(|i| table[i as usize])
        };
    }
    apply_luts(img, &luts)
}

/// `ImageOps.invert(img)`: `255 - v`.
pub fn invert(img: &RgbImage) -> RgbImage {
    apply_lut(img, &clip_lut(|i| 255 - i))
}

/// `ImageOps.posterize(img, bits)`: keeps the `bits` most significant bits.
///
/// Pillow 13 only accepts 1..=8 bits. Here `bits >= 8` is the identity (as in
/// timm, which skips the call) and `bits <= 0` gives black, which is what
/// Pillow computed before it started rejecting 0 (timm's `PosterizeIncreasing`
/// asks for 0 bits at magnitude 10).
pub fn posterize(img: &RgbImage, bits: i64) -> RgbImage {
    if bits >= 8 {
        return img.clone();
    }
    let mask: i64 = if bits <= 0 { 0 } else { !((1i64 << (8 - bits)) - 1) };
    apply_lut(img, &clip_lut(|i| i & mask))
}

/// `ImageOps.solarize(img, threshold)`: inverts values `>= threshold`.
pub fn solarize(img: &RgbImage, threshold: i64) -> RgbImage {
    apply_lut(img, &clip_lut(|i| if i < threshold { i } else { 255 - i }))
}

/// timm's `solarize_add(img, add, thresh)`: adds `add` (capped at 255) to
/// values below `threshold`.
pub fn solarize_add(img: &RgbImage, add: i64, threshold: i64) -> RgbImage {
    apply_lut(img, &clip_lut(|i| if i < threshold { (i + add).min(255) } else { i }))
}

/// `Image.blend(im1, im2, alpha)`: `im1 + alpha (im2 - im1)` in single
/// precision, truncated to 8 bits; clipped to 0..=255 when `alpha` is outside
/// [0, 1]. Both images must have the same size.
pub fn blend(im1: &RgbImage, im2: &RgbImage, alpha: f64) -> RgbImage {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { blend_avx2(im1, im2, alpha) };
    }
    blend_body(im1, im2, alpha)
}

/// [`blend`] compiled with AVX2 (the same operations: no FMA, so the same bits).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn blend_avx2(im1: &RgbImage, im2: &RgbImage, alpha: f64) -> RgbImage {
    blend_body(im1, im2, alpha)
}

#[inline(always)]
fn blend_body(im1: &RgbImage, im2: &RgbImage, alpha: f64) -> RgbImage {
    debug_assert_eq!(im1.data.len(), im2.data.len(), "blend of different sizes");
    let alpha = alpha as f32;
    if alpha == 0.0 {
        return im1.clone();
    }
    if alpha == 1.0 {
        return im2.clone();
    }
    let interpolate = (0.0..=1.0).contains(&alpha);
    let data = im1
        .data
        .iter()
        .zip(&im2.data)
        .map(|(&a, &b)| {
            let v = f32::from(a) + alpha * (i32::from(b) - i32::from(a)) as f32;
            if interpolate {
                v as u8
            } else if v <= 0.0 {
                0
            } else if v >= 255.0 {
                255
            } else {
                v as u8
            }
        })
        .collect();
    RgbImage { width: im1.width, height: im1.height, data }
}

/// `ImageEnhance.Color(img).enhance(factor)`: blend with the greyscale image.
pub fn enhance_color(img: &RgbImage, factor: f64) -> RgbImage {
    let mut data = vec![0u8; img.data.len()];
    for (g, p) in data.chunks_exact_mut(3).zip(img.data.chunks_exact(3)) {
        g.fill(luma(p));
    }
    let grey = RgbImage { width: img.width, height: img.height, data };
    blend(&grey, img, factor)
}

/// `ImageEnhance.Contrast(img).enhance(factor)`: blend with a flat image at
/// the rounded mean luma.
pub fn enhance_contrast(img: &RgbImage, factor: f64) -> RgbImage {
    let mut hist = [0u64; 256];
    for p in img.data.chunks_exact(3) {
        hist[usize::from(luma(p))] += 1;
    }
    let count: u64 = hist.iter().sum();
    let sum: u64 = hist.iter().enumerate().map(|(i, &c)| i as u64 * c).sum();
    // ImageStat: sum / count (a correctly rounded true division), then
    // `int(mean + 0.5)`.
    let mean = if count == 0 { 0.0 } else { sum as f64 / count as f64 };
    let m = (mean + 0.5) as u8;
    blend(&RgbImage::filled(img.width, img.height, [m; 3]), img, factor)
}

/// `ImageEnhance.Brightness(img).enhance(factor)`: blend with black.
pub fn enhance_brightness(img: &RgbImage, factor: f64) -> RgbImage {
    blend(&RgbImage::filled(img.width, img.height, [0; 3]), img, factor)
}

/// `ImageEnhance.Sharpness(img).enhance(factor)`: blend with [`smooth`].
pub fn enhance_sharpness(img: &RgbImage, factor: f64) -> RgbImage {
    blend(&smooth(img), img, factor)
}

/// `img.filter(ImageFilter.SMOOTH)`: the 3x3 kernel (1 1 1 / 1 5 1 / 1 1 1) / 13
/// in single precision with a +0.5 rounding bias; the outermost rows and
/// columns are copied unchanged, and images narrower or shorter than 3 pixels
/// are returned as they are.
pub fn smooth(img: &RgbImage) -> RgbImage {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { smooth_avx2(img) };
    }
    smooth_body(img)
}

/// [`smooth`] compiled with AVX2 (the same operations: no FMA, so the same bits).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn smooth_avx2(img: &RgbImage) -> RgbImage {
    smooth_body(img)
}

#[inline(always)]
fn smooth_body(img: &RgbImage) -> RgbImage {
    let (w, h) = (img.width as usize, img.height as usize);
    if w < 3 || h < 3 {
        return img.clone();
    }
    // Pillow divides each (float) kernel entry by the (float) scale.
    let k1 = 1.0f32 / 13.0f32;
    let k5 = 5.0f32 / 13.0f32;
    let rows = [[k1, k1, k1], [k1, k5, k1], [k1, k1, k1]];
    let stride = w * 3;
    let mut out = img.data.clone();
    let src = &img.data;
    for y in 1..h - 1 {
        // Pillow applies kernel row 0 to image row y + 1 (the kernel is flipped).
        let lines = [
            &src[(y + 1) * stride..(y + 2) * stride],
            &src[y * stride..(y + 1) * stride],
            &src[(y - 1) * stride..y * stride],
        ];
        let line_out = &mut out[y * stride..(y + 1) * stride];
        for x in 1..w - 1 {
            for b in 0..3 {
                let mut ss = 0.5f32;
                for (line, k) in lines.iter().zip(&rows) {
                    let i = x * 3 + b;
                    ss += f32::from(line[i - 3]) * k[0]
                        + f32::from(line[i]) * k[1]
                        + f32::from(line[i + 3]) * k[2];
                }
                line_out[x * 3 + b] = ss.clamp(0.0, 255.0) as u8;
            }
        }
    }
    RgbImage { width: img.width, height: img.height, data: out }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(px: &[[u8; 3]]) -> RgbImage {
        RgbImage::new(px.len() as u32, 1, px.iter().flatten().copied().collect())
    }

    #[test]
    fn luma_matches_pillow_examples() {
        // Pillow: Image.new("RGB", (1, 1), c).convert("L").getpixel((0, 0)).
        assert_eq!(grayscale(&img(&[[255, 0, 0], [0, 255, 0], [0, 0, 255]])), vec![76, 150, 29]);
        assert_eq!(grayscale(&img(&[[255, 255, 255], [10, 20, 30]])), vec![255, 18]);
    }

    #[test]
    fn lut_ops() {
        let i = img(&[[0, 100, 200], [255, 128, 127]]);
        assert_eq!(invert(&i).data, vec![255, 155, 55, 0, 127, 128]);
        assert_eq!(posterize(&i, 2).data, vec![0, 64, 192, 192, 128, 64]);
        assert_eq!(posterize(&i, 0).data, vec![0; 6]);
        assert_eq!(posterize(&i, 8), i);
        assert_eq!(solarize(&i, 128).data, vec![0, 100, 55, 0, 127, 127]);
        assert_eq!(solarize(&i, 256), i);
        assert_eq!(solarize_add(&i, 110, 128).data, vec![110, 210, 200, 255, 128, 237]);
    }

    #[test]
    fn autocontrast_and_equalize_edge_cases() {
        let flat = RgbImage::filled(4, 3, [7, 7, 7]);
        assert_eq!(autocontrast(&flat), flat);
        assert_eq!(equalize(&flat), flat);
        let two = img(&[[10, 0, 0], [20, 255, 0]]);
        assert_eq!(autocontrast(&two).data, vec![0, 0, 0, 255, 255, 0]);
    }

    #[test]
    fn blend_shortcuts_and_clipping() {
        let a = img(&[[0, 100, 255]]);
        let b = img(&[[255, 50, 0]]);
        assert_eq!(blend(&a, &b, 0.0), a);
        assert_eq!(blend(&a, &b, 1.0), b);
        assert_eq!(blend(&a, &b, 0.5).data, vec![127, 75, 127]);
        assert_eq!(blend(&a, &b, 1.9).data, vec![255, 5, 0]);
        assert_eq!(blend(&a, &b, -0.5).data, vec![0, 125, 255]);
    }

    #[test]
    fn tiny_images_are_fine() {
        let one = img(&[[1, 2, 3]]);
        for f in [0.1, 0.5, 1.0, 1.9] {
            assert_eq!(enhance_sharpness(&one, f), one);
            let _ = enhance_color(&one, f);
            let _ = enhance_contrast(&one, f);
            let _ = enhance_brightness(&one, f);
        }
        let empty = RgbImage::filled(0, 0, [0; 3]);
        assert_eq!(enhance_contrast(&empty, 0.3), empty);
        assert_eq!(autocontrast(&empty), empty);
        assert_eq!(equalize(&empty), empty);
    }
}
