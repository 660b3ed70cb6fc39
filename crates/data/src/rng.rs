//! Deterministic random streams.
//!
//! Every random decision of the pipeline draws from an [`Rng`] keyed by what
//! it is for (seed, epoch, sample position, purpose), never from a shared
//! mutable generator. Results therefore do not depend on the number of
//! loader threads or on the order in which they finish, and a run resumed
//! mid-epoch draws exactly what the uninterrupted run drew.

/// xoshiro256++ seeded through SplitMix64.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rng {
    state: [u64; 4],
}

/// Purposes of random streams, mixed into their keys so that streams with the
/// same seed/epoch/position never coincide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum Stream {
    /// Per-sample augmentation (crop, flip, RandAugment).
    Augment = 1,
    /// Per-micro-batch Mixup/CutMix decisions.
    Mixup = 2,
    /// Replacement picks for samples that failed to decode.
    Replacement = 3,
    /// Seeds handed to libtorch (init, drop-path).
    Torch = 4,
}

fn splitmix64(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    /// A generator determined by `key` (e.g. `[seed, Stream::Augment as u64, epoch, index]`).
    pub fn from_key(key: &[u64]) -> Rng {
        let mut acc = 0x6A09_E667_F3BC_C908u64;
        for &k in key {
            acc ^= k;
            acc = splitmix64(&mut acc);
        }
        let mut sm = acc;
        let state =
            [splitmix64(&mut sm), splitmix64(&mut sm), splitmix64(&mut sm), splitmix64(&mut sm)];
        Rng { state }
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.state;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `[lo, hi)`.
    pub fn uniform_range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// Uniform integer in `[0, n)` (unbiased); `n` must be positive.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng::below(0)");
        let zone = u64::MAX - (u64::MAX - n + 1) % n;
        loop {
            let v = self.next_u64();
            if v <= zone {
                return v % n;
            }
        }
    }

    /// Uniform integer in `[lo, hi]` (inclusive, like Python's `random.randint`).
    pub fn int_inclusive(&mut self, lo: i64, hi: i64) -> i64 {
        assert!(hi >= lo, "empty range {lo}..={hi}");
        lo + self.below((hi - lo) as u64 + 1) as i64
    }

    /// `true` with probability `p`.
    pub fn bernoulli(&mut self, p: f64) -> bool {
        self.uniform() < p
    }

    /// Normal(`mean`, `std`) by Box-Muller.
    pub fn gauss(&mut self, mean: f64, std: f64) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]
        let u2 = self.uniform();
        mean + std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Gamma(`shape`, 1) by Marsaglia-Tsang (boosted for shape < 1).
    pub fn gamma(&mut self, shape: f64) -> f64 {
        assert!(shape > 0.0, "gamma shape must be positive");
        if shape < 1.0 {
            let u = 1.0 - self.uniform();
            return self.gamma(shape + 1.0) * u.powf(1.0 / shape);
        }
        let d = shape - 1.0 / 3.0;
        let c = 1.0 / (9.0 * d).sqrt();
        loop {
            let x = self.gauss(0.0, 1.0);
            let v = (1.0 + c * x).powi(3);
            if v <= 0.0 {
                continue;
            }
            let u = 1.0 - self.uniform();
            if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
                return d * v;
            }
        }
    }

    /// Beta(`a`, `b`).
    pub fn beta(&mut self, a: f64, b: f64) -> f64 {
        let x = self.gamma(a);
        let y = self.gamma(b);
        if x + y == 0.0 {
            // Both underflowed (tiny alphas): the distribution's mass sits at 0 and 1.
            return if self.bernoulli(a / (a + b)) { 1.0 } else { 0.0 };
        }
        x / (x + y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_streams_are_reproducible_and_distinct() {
        let a: Vec<u64> =
            (0..4).map(|_| 0).scan(Rng::from_key(&[1, 2, 3]), |r, _| Some(r.next_u64())).collect();
        let b: Vec<u64> =
            (0..4).map(|_| 0).scan(Rng::from_key(&[1, 2, 3]), |r, _| Some(r.next_u64())).collect();
        let c: Vec<u64> =
            (0..4).map(|_| 0).scan(Rng::from_key(&[1, 2, 4]), |r, _| Some(r.next_u64())).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn moments_are_right() {
        let mut r = Rng::from_key(&[7]);
        let n = 200_000;
        let mean_u: f64 = (0..n).map(|_| r.uniform()).sum::<f64>() / n as f64;
        assert!((mean_u - 0.5).abs() < 0.005);
        let g: Vec<f64> = (0..n).map(|_| r.gauss(7.0, 0.5)).collect();
        let mean_g = g.iter().sum::<f64>() / n as f64;
        let var_g = g.iter().map(|v| (v - mean_g).powi(2)).sum::<f64>() / n as f64;
        assert!((mean_g - 7.0).abs() < 0.01 && (var_g - 0.25).abs() < 0.01);
        // Beta(a, b) has mean a / (a + b) and variance ab / ((a+b)^2 (a+b+1)).
        for (a, b) in [(0.1, 0.1), (1.0, 1.0), (0.2, 0.2)] {
            let s: Vec<f64> = (0..n).map(|_| r.beta(a, b)).collect();
            assert!(s.iter().all(|v| (0.0..=1.0).contains(v)));
            let m = s.iter().sum::<f64>() / n as f64;
            let v = s.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n as f64;
            let want_v = a * b / ((a + b).powi(2) * (a + b + 1.0));
            assert!((m - a / (a + b)).abs() < 0.01, "beta({a},{b}) mean {m}");
            assert!((v - want_v).abs() < 0.01, "beta({a},{b}) var {v} want {want_v}");
        }
        let hits = (0..n).filter(|_| r.below(3) == 2).count() as f64 / n as f64;
        assert!((hits - 1.0 / 3.0).abs() < 0.005);
    }
}
