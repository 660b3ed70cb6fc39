//! Pillow-exact affine transforms and rotations of [`RgbImage`]s.
//!
//! [`affine`] is Pillow 13 `img.transform(img.size, Image.AFFINE, coeffs,
//! resample, fillcolor=fill)` and [`rotate`] is `img.rotate(degrees, resample,
//! fillcolor=fill)` (no expand, default centre), both reproduced bit for bit
//! from `libImaging/Geometry.c`: the inverse map is applied to output pixel
//! centres `(x + 0.5, y + 0.5)`; bilinear and bicubic sample in double
//! precision with edge-clamped neighbours and truncate to 8 bits; sample points
//! outside the source keep the fill colour; nearest uses Pillow's scaling,
//! 16.16 fixed-point and floating-point fast paths.

use super::{Filter, RgbImage};

/// Applies the inverse affine map `coeffs = (a, b, c, d, e, f)`: output pixel
/// (x, y) samples the source at `(a x + b y + c, d x + e y + f)` (pixel-centre
/// coordinates). Output pixels whose sample point falls outside the source are
/// `fill`. Same size as the input, like Pillow's `img.transform(img.size, ...)`.
pub fn affine(img: &RgbImage, coeffs: [f64; 6], filter: Filter, fill: [u8; 3]) -> RgbImage {
    let mut out = RgbImage::filled(img.width, img.height, fill);
    if img.width == 0 || img.height == 0 {
        return out;
    }
    match filter {
        Filter::Bilinear => transform_bilinear(&mut out, img, &coeffs),
        Filter::Bicubic => transform_bicubic(&mut out, img, &coeffs),
        Filter::Nearest => {
            let a = &coeffs;
            if a[1] == 0.0 && a[3] == 0.0 {
                scale_affine_nearest(&mut out, img, a);
            } else {
                let (w, h) = (f64::from(img.width), f64::from(img.height));
                let fits = |x: f64, y: f64| {
                    (x * a[0] + y * a[1] + a[2]).abs() < 32768.0
                        && (x * a[3] + y * a[4] + a[5]).abs() < 32768.0
                };
                if fits(0.0, 0.0) && fits(w, h) && fits(0.0, h) && fits(w, 0.0) {
                    affine_nearest_fixed(&mut out, img, a);
                } else {
                    affine_nearest_float(&mut out, img, a);
                }
            }
        }
    }
    out
}

/// Rotates `img` by `degrees` counter-clockwise about its centre, keeping its
/// size, exactly as Pillow 13 `img.rotate(degrees, filter, fillcolor=fill)`:
/// multiples of 180 degrees (and of 90 degrees for square images) are exact
/// transposes, anything else is an [`affine`] transform with Pillow's matrix
/// (entries rounded to 15 decimals).
pub fn rotate(img: &RgbImage, degrees: f64, filter: Filter, fill: [u8; 3]) -> RgbImage {
    let angle = py_mod(degrees, 360.0);
    if angle == 0.0 {
        return img.clone();
    }
    if angle == 180.0 {
        return transpose(img, |x, y, w, h| (w - 1 - x, h - 1 - y));
    }
    if (angle == 90.0 || angle == 270.0) && img.width == img.height {
        return if angle == 90.0 {
            // ROTATE_90 (counter-clockwise): out(x, y) = in(w - 1 - y, x).
            transpose(img, |x, y, w, _| (w - 1 - y, x))
        } else {
            // ROTATE_270: out(x, y) = in(y, h - 1 - x).
            transpose(img, |x, y, _, h| (y, h - 1 - x))
        };
    }
    let (w, h) = (f64::from(img.width), f64::from(img.height));
    let (cx, cy) = (w / 2.0, h / 2.0);
    let rad = -angle.to_radians();
    let (cos, sin) = (round15(rad.cos()), round15(rad.sin()));
    let (a, b, d, e) = (cos, sin, -sin, cos);
    // matrix[2], matrix[5] = transform(-cx, -cy, matrix) (whose translation
    // entries are still 0.0), then += centre; in Python's evaluation order.
    let (x, y) = (-cx - 0.0, -cy - 0.0);
    let c = (a * x + b * y + 0.0) + cx;
    let f = (d * x + e * y + 0.0) + cy;
    affine(img, [a, b, c, d, e, f], filter, fill)
}

/// Python's float `%` (the result takes the sign of the divisor).
fn py_mod(x: f64, m: f64) -> f64 {
    let r = x % m;
    if r != 0.0 {
        if (m < 0.0) != (r < 0.0) {
            r + m
        } else {
            r
        }
    } else {
        0.0f64.copysign(m)
    }
}

/// Python's `round(v, 15)`: the double nearest to `v` correctly rounded to 15
/// decimals.
fn round15(v: f64) -> f64 {
    if !v.is_finite() {
        return v;
    }
    format!("{v:.15}").parse().unwrap_or(v)
}

/// Rebuilds `img` with `out(x, y) = in(map(x, y, w, h))` (the caller keeps the
/// map inside the image).
fn transpose(img: &RgbImage, map: impl Fn(u32, u32, u32, u32) -> (u32, u32)) -> RgbImage {
    let (w, h) = (img.width, img.height);
    let mut data = Vec::with_capacity(img.data.len());
    for y in 0..h {
        for x in 0..w {
            let (sx, sy) = map(x, y, w, h);
            data.extend_from_slice(&img.pixel(sx, sy));
        }
    }
    RgbImage { width: w, height: h, data }
}

/// Pillow's `COORD`: -1 for negative values, C truncation otherwise.
#[inline]
fn coord(v: f64) -> i64 {
    if v < 0.0 {
        -1
    } else {
        v as i64
    }
}

/// Pillow's `FLOOR` for doubles.
#[inline]
fn floor_i(v: f64) -> i64 {
    if v < 0.0 {
        v.floor() as i64
    } else {
        v as i64
    }
}

/// `ImagingGenericTransform` with the affine map. `sample` writes the three
/// channels for source point (x, y) or returns `false` when the point lies
/// outside the source; such pixels keep their value (the fill colour).
#[inline(always)]
fn generic_transform<S: Sampler>(out: &mut RgbImage, src: &RgbImage, a: &[f64; 6]) {
    let w = out.width as usize;
    for (y, row) in out.data.chunks_exact_mut(w * 3).enumerate() {
        let yin = y as f64 + 0.5;
        for (x, px) in row.chunks_exact_mut(3).enumerate() {
            let xin = x as f64 + 0.5;
            let xx = a[0] * xin + a[1] * yin + a[2];
            let yy = a[3] * xin + a[4] * yin + a[5];
            S::sample(px, src, xx, yy);
        }
    }
}

/// A sampling filter of [`generic_transform`] (a trait rather than a closure,
/// so that the sampler is inlined into the AVX2 copies as well).
trait Sampler {
    /// Writes the three channels for source point (x, y); `false` outside.
    fn sample(out: &mut [u8], im: &RgbImage, xin: f64, yin: f64) -> bool;
}

struct BilinearSampler;
impl Sampler for BilinearSampler {
    #[inline(always)]
    fn sample(out: &mut [u8], im: &RgbImage, xin: f64, yin: f64) -> bool {
        bilinear_sample(out, im, xin, yin)
    }
}

struct BicubicSampler;
impl Sampler for BicubicSampler {
    #[inline(always)]
    fn sample(out: &mut [u8], im: &RgbImage, xin: f64, yin: f64) -> bool {
        bicubic_sample(out, im, xin, yin)
    }
}

/// `generic_transform` with bilinear sampling, compiled for AVX2 too (picked
/// at run time; no FMA, so the floating-point results are the same).
fn transform_bilinear(out: &mut RgbImage, src: &RgbImage, a: &[f64; 6]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { transform_bilinear_avx2(out, src, a) };
    }
    generic_transform::<BilinearSampler>(out, src, a)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn transform_bilinear_avx2(out: &mut RgbImage, src: &RgbImage, a: &[f64; 6]) {
    avx2::transform(out, src, a, false)
}

/// `generic_transform` with bicubic sampling, compiled for AVX2 too.
fn transform_bicubic(out: &mut RgbImage, src: &RgbImage, a: &[f64; 6]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { transform_bicubic_avx2(out, src, a) };
    }
    generic_transform::<BicubicSampler>(out, src, a)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn transform_bicubic_avx2(out: &mut RgbImage, src: &RgbImage, a: &[f64; 6]) {
    avx2::transform(out, src, a, true)
}

#[inline]
fn clip(v: i64, size: i64) -> usize {
    if v < 0 {
        0
    } else if v < size {
        v as usize
    } else {
        (size - 1) as usize
    }
}

/// `bilinear_filter32RGB`.
#[inline(always)]
fn bilinear_sample(out: &mut [u8], im: &RgbImage, xin: f64, yin: f64) -> bool {
    let (xs, ys) = (i64::from(im.width), i64::from(im.height));
    if xin < 0.0 || xin >= xs as f64 || yin < 0.0 || yin >= ys as f64 {
        return false;
    }
    let (xin, yin) = (xin - 0.5, yin - 0.5);
    let (x, y) = (floor_i(xin), floor_i(yin));
    let (dx, dy) = (xin - x as f64, yin - y as f64);
    let stride = im.width as usize * 3;
    let row0 = clip(y, ys) * stride;
    let row1 = (y + 1 >= 0 && y + 1 < ys).then(|| (y + 1) as usize * stride);
    let (x0, x1) = (clip(x, xs) * 3, clip(x + 1, xs) * 3);
    let lerp_px = |row: usize, b: usize| {
        let (p, q) = (i32::from(im.data[row + x0 + b]), i32::from(im.data[row + x1 + b]));
        f64::from(p) + f64::from(q - p) * dx
    };
    for (b, o) in out.iter_mut().enumerate() {
        let v1 = lerp_px(row0, b);
        let v2 = match row1 {
            Some(r) => lerp_px(r, b),
            None => v1,
        };
        let v = v1 + (v2 - v1) * dy;
        *o = v as u8;
    }
    true
}

/// Pillow's `BICUBIC` interpolation of four values at offset `d`.
#[inline]
fn cubic(v1: f64, v2: f64, v3: f64, v4: f64, d: f64) -> f64 {
    let p1 = v2;
    let p2 = -v1 + v3;
    let p3 = 2.0 * (v1 - v2) + v3 - v4;
    let p4 = -v1 + v2 - v3 + v4;
    p1 + d * (p2 + d * (p3 + d * p4))
}

/// `bicubic_filter32RGB`.
#[inline(always)]
fn bicubic_sample(out: &mut [u8], im: &RgbImage, xin: f64, yin: f64) -> bool {
    let (xs, ys) = (i64::from(im.width), i64::from(im.height));
    if xin < 0.0 || xin >= xs as f64 || yin < 0.0 || yin >= ys as f64 {
        return false;
    }
    let (xin, yin) = (xin - 0.5, yin - 0.5);
    let (x, y) = (floor_i(xin), floor_i(yin));
    let (dx, dy) = (xin - x as f64, yin - y as f64);
    let (x, y) = (x - 1, y - 1);
    let stride = im.width as usize * 3;
    let cols = [clip(x, xs) * 3, clip(x + 1, xs) * 3, clip(x + 2, xs) * 3, clip(x + 3, xs) * 3];
    // Rows y..y+3: the first is clamped, a later one outside the image
    // repeats the previous row's value (Pillow's BICUBIC_BODY).
    let mut v = [[0f64; 3]; 4];
    for i in 0..4 {
        let yi = y + i as i64;
        let row = if i == 0 {
            clip(yi, ys) * stride
        } else if yi >= 0 && yi < ys {
            yi as usize * stride
        } else {
            v[i] = v[i - 1];
            continue;
        };
        for (b, vb) in v[i].iter_mut().enumerate() {
            // The first-pass inputs are integers: Pillow forms p2..p4 in int
            // arithmetic, which these doubles reproduce exactly.
            let p = |c: usize| f64::from(im.data[row + cols[c] + b]);
            *vb = cubic(p(0), p(1), p(2), p(3), dx);
        }
    }
    for (b, o) in out.iter_mut().enumerate() {
        let r = cubic(v[0][b], v[1][b], v[2][b], v[3][b], dy);
        *o = if r <= 0.0 {
            0
        } else if r >= 255.0 {
            255
        } else {
            r as u8
        };
    }
    true
}

/// `ImagingScaleAffine` (nearest neighbour, `a[1] == a[3] == 0`): writes only
/// the pixels that sample inside the source; the caller pre-fills `out`.
pub(crate) fn scale_affine_nearest(out: &mut RgbImage, src: &RgbImage, a: &[f64; 6]) {
    let (out_w, out_h) = (out.width as usize, out.height as usize);
    let (in_w, in_h) = (i64::from(src.width), i64::from(src.height));
    let mut xintab = vec![0usize; out_w];
    let mut xmin = out_w;
    let mut xmax = 0;
    let mut xo = a[2] + a[0] * 0.5;
    for (x, slot) in xintab.iter_mut().enumerate() {
        let xin = coord(xo);
        if xin >= 0 && xin < in_w {
            xmax = x + 1;
            xmin = xmin.min(x);
            *slot = xin as usize;
        }
        xo += a[0];
    }
    let mut yo = a[5] + a[4] * 0.5;
    let stride_in = src.width as usize * 3;
    for y in 0..out_h {
        let yi = coord(yo);
        if yi >= 0 && yi < in_h && xmin < xmax {
            let line_in = &src.data[yi as usize * stride_in..(yi as usize + 1) * stride_in];
            let line_out = &mut out.data[y * out_w * 3..(y + 1) * out_w * 3];
            for x in xmin..xmax {
                let s = xintab[x] * 3;
                line_out[x * 3..x * 3 + 3].copy_from_slice(&line_in[s..s + 3]);
            }
        }
        yo += a[4];
    }
}

/// `affine_fixed`: nearest neighbour in 16.16 fixed point.
fn affine_nearest_fixed(out: &mut RgbImage, src: &RgbImage, a: &[f64; 6]) {
    let fix = |v: f64| {
        let f = v * 65536.0 + 0.5;
        let f = if f < 0.0 { f.floor() } else { f.trunc() };
        // x86 `cvttsd2si` turns out-of-range values into INT_MIN.
        if (-2_147_483_648.0..2_147_483_648.0).contains(&f) {
            f as i32
        } else {
            i32::MIN
        }
    };
    let (a0, a1, a3, a4) = (fix(a[0]), fix(a[1]), fix(a[3]), fix(a[4]));
    let mut a2 = fix(a[2] + a[0] * 0.5 + a[1] * 0.5);
    let mut a5 = fix(a[5] + a[3] * 0.5 + a[4] * 0.5);
    let (in_w, in_h) = (src.width as i32, src.height as i32);
    let w = out.width as usize;
    for row in out.data.chunks_exact_mut(w * 3) {
        let (mut xx, mut yy) = (a2, a5);
        for px in row.chunks_exact_mut(3) {
            let xin = xx >> 16;
            if xin >= 0 && xin < in_w {
                let yin = yy >> 16;
                if yin >= 0 && yin < in_h {
                    px.copy_from_slice(&src.pixel(xin as u32, yin as u32));
                }
            }
            xx = xx.wrapping_add(a0);
            yy = yy.wrapping_add(a3);
        }
        a2 = a2.wrapping_add(a1);
        a5 = a5.wrapping_add(a4);
    }
}

/// The floating-point nearest-neighbour affine loop of `ImagingTransformAffine`
/// (used when coordinates exceed the fixed-point range).
fn affine_nearest_float(out: &mut RgbImage, src: &RgbImage, a: &[f64; 6]) {
    let mut xo = a[2] + a[1] * 0.5 + a[0] * 0.5;
    let mut yo = a[5] + a[4] * 0.5 + a[3] * 0.5;
    let (in_w, in_h) = (i64::from(src.width), i64::from(src.height));
    let w = out.width as usize;
    for row in out.data.chunks_exact_mut(w * 3) {
        let (mut xx, mut yy) = (xo, yo);
        for px in row.chunks_exact_mut(3) {
            let xin = coord(xx);
            if xin >= 0 && xin < in_w {
                let yin = coord(yy);
                if yin >= 0 && yin < in_h {
                    px.copy_from_slice(&src.pixel(xin as u32, yin as u32));
                }
            }
            xx += a[0];
            yy += a[3];
        }
        xo += a[1];
        yo += a[4];
    }
}

/// `bilinear_filter32RGB` and `bicubic_filter32RGB` with the three channels
/// in the lanes of one AVX register, reading a copy of the source converted
/// to doubles once (instead of 12 or 48 byte conversions per pixel). Every
/// lane does Pillow's double-precision operations in Pillow's order (adds,
/// subtracts, multiplies; no FMA), so the results are the scalar ones bit
/// for bit (the Pillow parity tests run this path on AVX2 machines).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{clip, floor_i, RgbImage};
    use std::arch::x86_64::*;

    /// [`super::cubic`] on four lanes.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn cubic(v1: __m256d, v2: __m256d, v3: __m256d, v4: __m256d, d: __m256d) -> __m256d {
        let neg = |v: __m256d| _mm256_xor_pd(v, _mm256_set1_pd(-0.0));
        let p1 = v2;
        let p2 = _mm256_add_pd(neg(v1), v3);
        let two = _mm256_set1_pd(2.0);
        let p3 = _mm256_sub_pd(_mm256_add_pd(_mm256_mul_pd(two, _mm256_sub_pd(v1, v2)), v3), v4);
        let p4 = _mm256_add_pd(_mm256_sub_pd(_mm256_add_pd(neg(v1), v2), v3), v4);
        // p1 + d * (p2 + d * (p3 + d * p4))
        let t = _mm256_add_pd(p3, _mm256_mul_pd(d, p4));
        let t = _mm256_add_pd(p2, _mm256_mul_pd(d, t));
        _mm256_add_pd(p1, _mm256_mul_pd(d, t))
    }

    /// Pixel `at` (its three channels and the next value) as four lanes.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn load(plane: &[f64], at: usize) -> __m256d {
        let four = &plane[at..at + 4];
        // SAFETY: `four` holds four doubles; unaligned load.
        unsafe { _mm256_loadu_pd(four.as_ptr()) }
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn store(v: __m256d) -> [f64; 4] {
        let mut lanes = [0f64; 4];
        // SAFETY: `lanes` holds four doubles; unaligned store.
        unsafe { _mm256_storeu_pd(lanes.as_mut_ptr(), v) };
        lanes
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn bilinear(out: &mut [u8], plane: &[f64], xs: i64, ys: i64, xin: f64, yin: f64) {
        let (xin, yin) = (xin - 0.5, yin - 0.5);
        let (x, y) = (floor_i(xin), floor_i(yin));
        let (dx, dy) = (_mm256_set1_pd(xin - x as f64), _mm256_set1_pd(yin - y as f64));
        let stride = xs as usize * 3;
        let (x0, x1) = (clip(x, xs) * 3, clip(x + 1, xs) * 3);
        let lerp = |row: usize| {
            let (p, q) = (load(plane, row + x0), load(plane, row + x1));
            _mm256_add_pd(p, _mm256_mul_pd(_mm256_sub_pd(q, p), dx))
        };
        let v1 = lerp(clip(y, ys) * stride);
        let v2 = if y + 1 >= 0 && y + 1 < ys { lerp((y + 1) as usize * stride) } else { v1 };
        let v = store(_mm256_add_pd(v1, _mm256_mul_pd(_mm256_sub_pd(v2, v1), dy)));
        for (o, &v) in out.iter_mut().zip(&v) {
            *o = v as u8;
        }
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn bicubic(out: &mut [u8], plane: &[f64], xs: i64, ys: i64, xin: f64, yin: f64) {
        let (xin, yin) = (xin - 0.5, yin - 0.5);
        let (x, y) = (floor_i(xin), floor_i(yin));
        let (dx, dy) = (xin - x as f64, yin - y as f64);
        let (x, y) = (x - 1, y - 1);
        let stride = xs as usize * 3;
        let cols = [clip(x, xs) * 3, clip(x + 1, xs) * 3, clip(x + 2, xs) * 3, clip(x + 3, xs) * 3];
        // A row below the image repeats the previous one (Pillow repeats the
        // previous row's interpolated value, the same thing).
        let mut rows = [clip(y, ys) * stride; 4];
        for i in 1..4 {
            let yi = y + i as i64;
            rows[i] = if yi >= 0 && yi < ys { yi as usize * stride } else { rows[i - 1] };
        }
        let dxv = _mm256_set1_pd(dx);
        let mut v = [_mm256_setzero_pd(); 4];
        for (vi, &row) in v.iter_mut().zip(&rows) {
            *vi = cubic(
                load(plane, row + cols[0]),
                load(plane, row + cols[1]),
                load(plane, row + cols[2]),
                load(plane, row + cols[3]),
                dxv,
            );
        }
        let r = store(cubic(v[0], v[1], v[2], v[3], _mm256_set1_pd(dy)));
        for (o, &r) in out.iter_mut().zip(&r) {
            *o = if r <= 0.0 {
                0
            } else if r >= 255.0 {
                255
            } else {
                r as u8
            };
        }
    }

    /// `ImagingGenericTransform` with the affine map `a`, bicubic or bilinear.
    #[target_feature(enable = "avx2")]
    pub(super) fn transform(
        out: &mut RgbImage,
        src: &RgbImage,
        a: &[f64; 6],
        bicubic_filter: bool,
    ) {
        let mut plane: Vec<f64> = Vec::with_capacity(src.data.len() + 1);
        plane.extend(src.data.iter().map(|&v| f64::from(v)));
        plane.push(0.0); // the fourth lane of the last pixel
        let (xs, ys) = (i64::from(src.width), i64::from(src.height));
        let w = out.width as usize;
        for (y, row) in out.data.chunks_exact_mut(w * 3).enumerate() {
            let yin = y as f64 + 0.5;
            for (x, px) in row.chunks_exact_mut(3).enumerate() {
                let xin = x as f64 + 0.5;
                let xx = a[0] * xin + a[1] * yin + a[2];
                let yy = a[3] * xin + a[4] * yin + a[5];
                if xx < 0.0 || xx >= xs as f64 || yy < 0.0 || yy >= ys as f64 {
                    continue; // keeps the fill colour
                }
                if bicubic_filter {
                    bicubic(px, &plane, xs, ys, xx, yy);
                } else {
                    bilinear(px, &plane, xs, ys, xx, yy);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(w: u32, h: u32) -> RgbImage {
        let mut data = Vec::new();
        for y in 0..h {
            for x in 0..w {
                data.extend_from_slice(&[
                    (x * 31 % 256) as u8,
                    (y * 17 % 256) as u8,
                    (x ^ y) as u8,
                ]);
            }
        }
        RgbImage::new(w, h, data)
    }

    #[test]
    fn identity_affine_is_identity() {
        let img = pattern(13, 7);
        for f in [Filter::Nearest, Filter::Bilinear, Filter::Bicubic] {
            assert_eq!(affine(&img, [1.0, 0.0, 0.0, 0.0, 1.0, 0.0], f, [1, 2, 3]), img, "{f:?}");
        }
    }

    #[test]
    fn integer_translation_shifts_and_fills() {
        let img = pattern(9, 6);
        for f in [Filter::Nearest, Filter::Bilinear, Filter::Bicubic] {
            let out = affine(&img, [1.0, 0.0, 2.0, 0.0, 1.0, -1.0], f, [9, 8, 7]);
            assert_eq!(out.pixel(0, 1), img.pixel(2, 0), "{f:?}");
            assert_eq!(out.pixel(6, 5), img.pixel(8, 4), "{f:?}");
            assert_eq!(out.pixel(7, 3), [9, 8, 7], "{f:?}");
            assert_eq!(out.pixel(3, 0), [9, 8, 7], "{f:?}");
        }
    }

    #[test]
    fn right_angle_rotations_are_transposes() {
        let sq = pattern(5, 5);
        let r90 = rotate(&sq, 90.0, Filter::Bilinear, [0; 3]);
        // Counter-clockwise: the top-right corner moves to the top-left.
        assert_eq!(r90.pixel(0, 0), sq.pixel(4, 0));
        let back =
            rotate(&rotate(&r90, 180.0, Filter::Nearest, [0; 3]), 90.0, Filter::Bicubic, [0; 3]);
        assert_eq!(back, sq);
        assert_eq!(rotate(&sq, -360.0, Filter::Bicubic, [7; 3]), sq);
        let r270 = rotate(&sq, -90.0, Filter::Nearest, [0; 3]);
        assert_eq!(r270.pixel(0, 0), sq.pixel(0, 4));
    }

    #[test]
    fn python_semantics_of_helpers() {
        assert_eq!(py_mod(-30.0, 360.0), 330.0);
        assert_eq!(py_mod(-0.0, 360.0).to_bits(), 0.0f64.to_bits());
        assert_eq!(py_mod(-1e-20, 360.0), 360.0);
        assert_eq!(round15(0.1 + 0.2), 0.3);
        assert_eq!(round15(-0.866_025_403_784_438_6), -0.866_025_403_784_439);
    }

    #[test]
    fn degenerate_inputs_do_not_panic() {
        let one = pattern(1, 1);
        for f in [Filter::Nearest, Filter::Bilinear, Filter::Bicubic] {
            assert_eq!(rotate(&one, 17.0, f, [5; 3]).data.len(), 3);
            let _ = affine(&one, [f64::NAN, 0.3, 1e300, -2.0, f64::INFINITY, 0.0], f, [5; 3]);
            let _ = affine(&pattern(4, 3), [1.0, 0.5, -1e9, 0.0, 1.0, 1e9], f, [5; 3]);
            let empty = RgbImage::filled(0, 3, [0; 3]);
            assert_eq!(rotate(&empty, 10.0, f, [5; 3]), empty);
        }
    }
}
