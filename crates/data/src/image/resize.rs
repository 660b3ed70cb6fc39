//! Pillow-exact resizing and cropping of [`RgbImage`]s.
//!
//! [`resize`] reproduces Pillow 13 `Image.resize((w, h), resample)` (no box,
//! `reducing_gap=None`) bit for bit: for bilinear and bicubic it is the
//! separable, antialiased convolution of `ImagingResample` (the kernel support
//! grows with the downscale factor), with coefficients normalised to 22-bit
//! fixed point, a rounding bias of one half, an 8-bit clip after each pass, and
//! Pillow 13's rules for which pass runs first and which pass is skipped. For
//! nearest it is the affine scaling that Pillow uses for `NEAREST` resizes.
//!
//! This is the hot path of the data loader: the coefficients are computed once
//! per call and the passes run without per-pixel allocation.

use super::{Filter, RgbImage};

/// Fixed-point precision of the resampling coefficients (`PRECISION_BITS` in
/// Pillow: 32 bits minus 8 for the result minus 2 for overflow of negative lobes).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Resizes `img` to `width` x `height` exactly as Pillow 13
/// `img.resize((width, height), filter)` does on an RGB image.
///
/// A zero target dimension gives an empty image; an empty source gives a black
/// image of the target size (Pillow refuses both).
pub fn resize(img: &RgbImage, width: u32, height: u32, filter: Filter) -> RgbImage {
    let full = Region { left: 0, top: 0, width: img.width, height: img.height };
    resize_region(img, full, width, height, filter)
}

/// An integer rectangle of an image: `width` x `height` pixels from (`left`, `top`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// First column.
    pub left: u32,
    /// First row.
    pub top: u32,
    /// Columns.
    pub width: u32,
    /// Rows.
    pub height: u32,
}

/// `resize(&crop(img, region), width, height, filter)` without building the
/// crop: the resampling reads the region straight from `img`, bit for bit the
/// same result (the RandomResizedCrop of the loader runs this fused form). The
/// region must lie inside `img` (parts outside are clamped away).
pub fn resize_region(
    img: &RgbImage,
    region: Region,
    width: u32,
    height: u32,
    filter: Filter,
) -> RgbImage {
    let region = clamp_region(img, region);
    let bx = [0.0, 0.0, region.width as f32, region.height as f32];
    resize_region_box(img, region, bx, width, height, filter)
}

/// Pillow's `crop(region).resize((width, height), filter, box=bx)`: `bx`
/// (`[x0, y0, x1, y1]`, relative to the region, fractional) is the part of the
/// region that is mapped onto the output; resampling windows are clamped to the
/// region. Used after DCT-scaled decoding, where the crop rectangle no longer
/// falls on whole pixels.
pub fn resize_region_box(
    img: &RgbImage,
    region: Region,
    bx: [f32; 4],
    width: u32,
    height: u32,
    filter: Filter,
) -> RgbImage {
    if width == 0 || height == 0 {
        return RgbImage { width, height, data: Vec::new() };
    }
    let region = clamp_region(img, region);
    if region.width == 0 || region.height == 0 {
        return RgbImage::filled(width, height, [0, 0, 0]);
    }
    let view = View { src: &img.data, stride: img.width as usize * 3, region };
    let full_box = bx == [0.0, 0.0, region.width as f32, region.height as f32];
    if full_box && region.width == width && region.height == height {
        return view.to_image();
    }
    match filter {
        Filter::Nearest if full_box => resize_nearest(&view.to_image(), width, height),
        Filter::Nearest => {
            // Not used by the pipeline (timm's crops are bilinear/bicubic);
            // crop to the covering pixels and scale the box affinely.
            let sub = view.to_image();
            let a = [
                f64::from(bx[2] - bx[0]) / f64::from(width),
                0.0,
                f64::from(bx[0]),
                0.0,
                f64::from(bx[3] - bx[1]) / f64::from(height),
                f64::from(bx[1]),
            ];
            let mut out = RgbImage::filled(width, height, [0, 0, 0]);
            super::geometry::scale_affine_nearest(&mut out, &sub, &a);
            out
        }
        Filter::Bilinear => resample(&view, bx, width, height, &BILINEAR),
        Filter::Bicubic => resample(&view, bx, width, height, &BICUBIC),
    }
}

fn clamp_region(img: &RgbImage, r: Region) -> Region {
    let left = r.left.min(img.width);
    let top = r.top.min(img.height);
    Region {
        left,
        top,
        width: r.width.min(img.width - left),
        height: r.height.min(img.height - top),
    }
}

/// A rectangle of an interleaved RGB buffer.
struct View<'a> {
    src: &'a [u8],
    /// Bytes per source row.
    stride: usize,
    region: Region,
}

impl View<'_> {
    /// Row `y` of the region (`region.width * 3` bytes).
    #[inline]
    fn row(&self, y: usize) -> &[u8] {
        let start = (self.region.top as usize + y) * self.stride + self.region.left as usize * 3;
        &self.src[start..start + self.region.width as usize * 3]
    }

    fn to_image(&self) -> RgbImage {
        let (w, h) = (self.region.width, self.region.height);
        let mut data = Vec::with_capacity(w as usize * h as usize * 3);
        for y in 0..h as usize {
            data.extend_from_slice(self.row(y));
        }
        RgbImage { width: w, height: h, data }
    }
}

/// Cuts the `width` x `height` rectangle whose top-left corner is
/// (`left`, `top`) out of `img` (Pillow `img.crop((left, top, left + width,
/// top + height))`). Parts of the rectangle outside the source are black, as
/// in Pillow.
pub fn crop(img: &RgbImage, left: u32, top: u32, width: u32, height: u32) -> RgbImage {
    let (w, h) = (width as usize, height as usize);
    let mut data = vec![0u8; w * h * 3];
    let (sw, sh) = (img.width as usize, img.height as usize);
    let (l, t) = (left as usize, top as usize);
    if l < sw && t < sh {
        let copy_w = w.min(sw - l);
        let copy_h = h.min(sh - t);
        for y in 0..copy_h {
            let src = ((t + y) * sw + l) * 3;
            let dst = y * w * 3;
            data[dst..dst + copy_w * 3].copy_from_slice(&img.data[src..src + copy_w * 3]);
        }
    }
    RgbImage { width, height, data }
}

/// A separable resampling kernel (Pillow's `struct filter`).
struct Kernel {
    /// The kernel function.
    f: fn(f64) -> f64,
    /// Its support radius at scale 1.
    support: f64,
}

const BILINEAR: Kernel = Kernel { f: bilinear_kernel, support: 1.0 };
const BICUBIC: Kernel = Kernel { f: bicubic_kernel, support: 2.0 };

fn bilinear_kernel(x: f64) -> f64 {
    let x = if x < 0.0 { -x } else { x };
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

fn bicubic_kernel(x: f64) -> f64 {
    // Keys' cubic convolution with a = -0.5, written as Pillow evaluates it.
    const A: f64 = -0.5;
    let x = if x < 0.0 { -x } else { x };
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per-output-position source windows and fixed-point weights of one pass.
struct Coeffs {
    /// Maximum number of taps per output position.
    ksize: usize,
    /// For each output position: first source index and number of taps.
    bounds: Vec<(usize, usize)>,
    /// `bounds.len() * ksize` fixed-point weights.
    weights: Vec<i32>,
}

/// Pillow's `precompute_coeffs` followed by `normalize_coeffs_8bpc`, for the
/// source interval [`in0`, `in1`) (single precision, as Pillow's box is).
fn precompute_coeffs(in_size: usize, in0: f32, in1: f32, out_size: usize, k: &Kernel) -> Coeffs {
    let scale = f64::from(in1 - in0) / out_size as f64;
    let filterscale = if scale < 1.0 { 1.0 } else { scale };
    let support = k.support * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let inv_filterscale = 1.0 / filterscale;

    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut tmp = vec![0f64; ksize];
    let one = f64::from(1u32 << PRECISION_BITS);
    for xx in 0..out_size {
        let center = f64::from(in0) + (xx as f64 + 0.5) * scale;
        // C `(int)` truncation, then the clamps.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
        let n = (xmax - xmin).clamp(0, ksize as i64) as usize;
        let xmin = xmin as usize;
        let mut ww = 0.0;
        for (x, t) in tmp.iter_mut().enumerate().take(n) {
            let w = (k.f)(((x + xmin) as f64 - center + 0.5) * inv_filterscale);
            *t = w;
            ww += w;
        }
        let row = &mut weights[xx * ksize..xx * ksize + ksize];
        for (dst, &t) in row.iter_mut().zip(tmp.iter()).take(n) {
            let v = if ww != 0.0 { t / ww } else { t };
            *dst = if v < 0.0 { (-0.5 + v * one) as i32 } else { (0.5 + v * one) as i32 };
        }
        bounds.push((xmin, n));
    }
    Coeffs { ksize, bounds, weights }
}

/// Pillow's `clip8`: drop the fixed-point fraction and clamp to 0..=255.
#[inline]
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Horizontal pass: `out_rows` rows starting at row `row_offset` of `rows`,
/// each resampled to `c.bounds.len()` pixels.
///
/// Computed as a vertical pass over the transposed rows (pixel columns become
/// lines), which accumulates whole lines at a time and vectorises; the sums
/// are the same integers as Pillow's per-pixel loop, so the result is too.
fn pass_horizontal<'a>(
    rows: impl Fn(usize) -> &'a [u8],
    row_offset: usize,
    out_rows: usize,
    c: &Coeffs,
) -> Vec<u8> {
    let out_w = c.bounds.len();
    if out_rows == 0 || out_w == 0 {
        return Vec::new();
    }
    // Only the source columns some output pixel reads.
    let in_w = c.bounds.iter().map(|&(xmin, n)| xmin + n).max().unwrap_or(0);
    let line = out_rows * 3;
    // Transpose: line x holds pixel x of every row.
    let mut t = vec![0u8; in_w * line];
    for y in 0..out_rows {
        let src = &rows(y + row_offset)[..in_w * 3];
        for (x, px) in src.chunks_exact(3).enumerate() {
            let o = x * line + y * 3;
            t[o..o + 3].copy_from_slice(px);
        }
    }
    let tt = pass_vertical(|x| &t[x * line..(x + 1) * line], line, c);
    // Transpose back: output row y, pixel xx is line xx, entry y.
    let mut out = vec![0u8; out_w * out_rows * 3];
    for (xx, col) in tt.chunks_exact(line).enumerate() {
        for (y, px) in col.chunks_exact(3).enumerate() {
            let o = (y * out_w + xx) * 3;
            out[o..o + 3].copy_from_slice(px);
        }
    }
    out
}

/// Vertical pass: every column of the rows given by `rows` (each
/// `row_bytes` long) resampled to `c.bounds.len()` rows.
fn pass_vertical<'a>(rows: impl Fn(usize) -> &'a [u8], row_bytes: usize, c: &Coeffs) -> Vec<u8> {
    let out_h = c.bounds.len();
    let stride = row_bytes;
    let mut out = vec![0u8; stride * out_h];
    let mut acc = vec![0i32; stride];
    for (yy, line_out) in out.chunks_exact_mut(stride).enumerate() {
        let (ymin, n) = c.bounds[yy];
        let k = &c.weights[yy * c.ksize..yy * c.ksize + n];
        acc.fill(HALF);
        // Row-major accumulation: the same per-channel sums as Pillow's
        // column loop (integer addition is exact), but cache friendly.
        for (y, &w) in k.iter().enumerate() {
            simd::accumulate(&mut acc, rows(ymin + y), w);
        }
        simd::clip_line(line_out, &acc);
    }
    out
}

/// The two inner loops of the resampling passes, compiled twice: for the
/// baseline x86-64 target and, picked at run time, with AVX2 (8 lanes of
/// 32-bit multiplies). Integer arithmetic: both give identical results.
mod simd {
    use super::clip8;

    #[inline(always)]
    fn accumulate_scalar(acc: &mut [i32], line: &[u8], w: i32) {
        for (a, &p) in acc.iter_mut().zip(line) {
            *a = a.wrapping_add(i32::from(p).wrapping_mul(w));
        }
    }

    #[inline(always)]
    fn clip_line_scalar(out: &mut [u8], acc: &[i32]) {
        for (o, &a) in out.iter_mut().zip(acc) {
            *o = clip8(a);
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn accumulate_avx2(acc: &mut [i32], line: &[u8], w: i32) {
        accumulate_scalar(acc, line, w)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn clip_line_avx2(out: &mut [u8], acc: &[i32]) {
        clip_line_scalar(out, acc)
    }

    /// `acc[i] += line[i] * w` (wrapping, as Pillow's C).
    pub(super) fn accumulate(acc: &mut [i32], line: &[u8], w: i32) {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { accumulate_avx2(acc, line, w) };
        }
        accumulate_scalar(acc, line, w)
    }

    /// `out[i] = clip8(acc[i])`.
    pub(super) fn clip_line(out: &mut [u8], acc: &[i32]) {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { clip_line_avx2(out, acc) };
        }
        clip_line_scalar(out, acc)
    }
}

/// Pillow 13 `ImagingResampleInner` for an RGB image (here a region of one)
/// and the box `bx` within it.
fn resample(view: &View<'_>, bx: [f32; 4], width: u32, height: u32, k: &Kernel) -> RgbImage {
    let (in_w, in_h) = (view.region.width as usize, view.region.height as usize);
    let (out_w, out_h) = (width as usize, height as usize);
    let need_horizontal = out_w != in_w || bx[0] != 0.0 || bx[2] != in_w as f32;
    let need_vertical = out_h != in_h || bx[1] != 0.0 || bx[3] != in_h as f32;
    // Pillow 13 runs the vertical pass first when the height shrinks by more
    // than twice as many pixels as the width does.
    let dy = in_h as i64 - i64::from(height);
    let dx = in_w as i64 - i64::from(width);
    let horizontal_first = !(dy > 0 && dy > dx * 2);
    let src_row = |y: usize| view.row(y);

    let data = if horizontal_first {
        let mut vert = precompute_coeffs(in_h, bx[1], bx[3], out_h, k);
        let mut tmp: Option<Vec<u8>> = None;
        if need_horizontal {
            let ybox_first = vert.bounds[0].0;
            let (last_min, last_n) = vert.bounds[out_h - 1];
            let ybox_last = last_min + last_n;
            for b in &mut vert.bounds {
                b.0 -= ybox_first;
            }
            let horiz = precompute_coeffs(in_w, bx[0], bx[2], out_w, k);
            let rows = ybox_last.saturating_sub(ybox_first);
            tmp = Some(pass_horizontal(src_row, ybox_first, rows, &horiz));
        }
        match (tmp, need_vertical) {
            (Some(t), true) => {
                let row = out_w * 3;
                pass_vertical(|y| &t[y * row..(y + 1) * row], row, &vert)
            }
            (Some(t), false) => t,
            (None, true) => pass_vertical(src_row, in_w * 3, &vert),
            (None, false) => view.to_image().data,
        }
    } else {
        // Here dy > 0, so the vertical pass is needed.
        let vert = precompute_coeffs(in_h, bx[1], bx[3], out_h, k);
        let t = pass_vertical(src_row, in_w * 3, &vert);
        if need_horizontal {
            let horiz = precompute_coeffs(in_w, bx[0], bx[2], out_w, k);
            let row = in_w * 3;
            pass_horizontal(|y| &t[y * row..(y + 1) * row], 0, out_h, &horiz)
        } else {
            t
        }
    };
    RgbImage { width, height, data }
}

/// Pillow's NEAREST resize: `ImagingScaleAffine` with the coefficients
/// `(in_w / out_w, 0, 0, 0, in_h / out_h, 0)`, filling with black.
fn resize_nearest(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let a = [
        f64::from(img.width as f32) / f64::from(width),
        0.0,
        0.0,
        0.0,
        f64::from(img.height as f32) / f64::from(height),
        0.0,
    ];
    let mut out = RgbImage::filled(width, height, [0, 0, 0]);
    super::geometry::scale_affine_nearest(&mut out, img, &a);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: u32, h: u32) -> RgbImage {
        let mut data = Vec::new();
        for y in 0..h {
            for x in 0..w {
                data.extend_from_slice(&[
                    (x * 7 % 256) as u8,
                    (y * 5 % 256) as u8,
                    ((x + y) % 256) as u8,
                ]);
            }
        }
        RgbImage::new(w, h, data)
    }

    #[test]
    fn coefficients_sum_to_one_in_fixed_point() {
        for (i, o) in [(10usize, 3usize), (3, 10), (224, 160), (1, 5), (5, 1)] {
            for k in [&BILINEAR, &BICUBIC] {
                let c = precompute_coeffs(i, 0.0, i as f32, o, k);
                for (j, &(_, n)) in c.bounds.iter().enumerate() {
                    let s: i32 = c.weights[j * c.ksize..j * c.ksize + n].iter().sum();
                    assert!((s - (1 << PRECISION_BITS)).abs() <= n as i32, "{i}->{o}: {s}");
                }
            }
        }
    }

    #[test]
    fn constant_images_stay_constant() {
        let img = RgbImage::filled(37, 23, [10, 200, 255]);
        for f in [Filter::Nearest, Filter::Bilinear, Filter::Bicubic] {
            for (w, h) in [(5, 4), (80, 51), (37, 9), (1, 1), (100, 23)] {
                let out = resize(&img, w, h, f);
                assert_eq!(out, RgbImage::filled(w, h, [10, 200, 255]), "{f:?} {w}x{h}");
            }
        }
    }

    #[test]
    fn tiny_and_degenerate_sizes_do_not_panic() {
        let img = gradient(1, 1);
        for f in [Filter::Nearest, Filter::Bilinear, Filter::Bicubic] {
            assert_eq!(resize(&img, 3, 2, f).data.len(), 18);
            assert_eq!(resize(&gradient(9, 1), 1, 4, f).data.len(), 12);
            assert_eq!(resize(&img, 0, 2, f).data.len(), 0);
            assert_eq!(resize(&RgbImage::filled(0, 0, [0; 3]), 2, 2, f).data, vec![0; 12]);
        }
    }

    #[test]
    fn crop_matches_pixels_and_pads_with_black() {
        let img = gradient(10, 8);
        let c = crop(&img, 3, 2, 4, 5);
        assert_eq!((c.width, c.height), (4, 5));
        assert_eq!(c.pixel(0, 0), img.pixel(3, 2));
        assert_eq!(c.pixel(3, 4), img.pixel(6, 6));
        let c = crop(&img, 8, 7, 4, 3);
        assert_eq!(c.pixel(1, 0), img.pixel(9, 7));
        assert_eq!(c.pixel(2, 0), [0, 0, 0]);
        assert_eq!(c.pixel(0, 1), [0, 0, 0]);
        assert_eq!(crop(&img, 20, 20, 2, 2).data, vec![0; 12]);
    }
}
