//! The statistics of a seed study, each the one `scipy.stats` computes (the
//! parity test `tests/parity_scipy.rs` checks them against scipy):
//!
//! * [`Summary`]: mean, sample standard deviation (n − 1), max, min, and the
//!   mean's 95% confidence interval `mean ± t(0.975, n − 1) · s / √n`
//!   (Student t; `scipy.stats.t.interval`). When every value is the same,
//!   the mean is that value exactly, the std 0 and the interval absent
//!   (scipy gives NaN: a t distribution of scale 0 is undefined). numpy's
//!   plain sum can put the mean of identical values a few ulps off (13 ×
//!   73.44 gives 73.44000000000003, above the max, and a std of 3e-14), so
//!   the mean here is summed around the first value and kept within
//!   [min, max].
//! * [`normality`]: D'Agostino–Pearson's K² omnibus test
//!   (`scipy.stats.normaltest`): the squared z-scores of the skewness test and
//!   the kurtosis test, added, against χ² with 2 degrees of freedom. It needs
//!   at least [`NORMALITY_MIN_N`] = 8 values (scipy's skew test refuses fewer),
//!   and is rough below 20. Identical values have no skewness or kurtosis
//!   (scipy: NaN), so no test.
//! * [`welch`]: the difference of two means with Welch–Satterthwaite's
//!   degrees of freedom, its 95% confidence interval and Welch's t-test
//!   p-value (`scipy.stats.ttest_ind(b, a, equal_var=False)`).
//! * [`seeds_needed`]: seeds per sweep to resolve a difference `δ` at 80%
//!   power with a two-sided 5% test, by the normal approximation
//!   `n = ⌈2 (z₀.₉₇₅ + z₀.₈₀)² σ² / δ²⌉` with `σ² = (s_a² + s_b²) / 2`
//!   (about `15.7 σ² / δ²`), at least 2.

use statrs::distribution::{ContinuousCDF, Normal, StudentsT};

/// The fewest values [`normality`] tests.
pub const NORMALITY_MIN_N: usize = 8;

/// Confidence level of every interval.
pub const CONFIDENCE: f64 = 0.95;

/// Power of [`seeds_needed`].
pub const POWER: f64 = 0.80;

/// Summary of one set of final top-1 values.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Values.
    pub n: usize,
    /// Mean.
    pub mean: f64,
    /// Sample standard deviation (n − 1); `None` for one value, 0 when
    /// every value is the same.
    pub std: Option<f64>,
    /// Largest value.
    pub max: f64,
    /// Smallest value.
    pub min: f64,
    /// The mean's 95% confidence interval (Student t); `None` for one
    /// value, and when every value is the same (no spread to scale it by).
    pub ci95: Option<(f64, f64)>,
}

impl Summary {
    /// The summary of `values`; `None` when there are none.
    pub fn of(values: &[f64]) -> Option<Summary> {
        let n = values.len();
        if n == 0 {
            return None;
        }
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let mean = mean_within(values, min, max);
        let (std, ci95) = if n < 2 {
            (None, None)
        } else if max == min {
            (Some(0.0), None)
        } else {
            let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
            let std = var.sqrt();
            let half = t_quantile(0.5 + CONFIDENCE / 2.0, (n - 1) as f64) * std / (n as f64).sqrt();
            (Some(std), Some((mean - half, mean + half)))
        };
        Some(Summary { n, mean, std, max, min, ci95 })
    }

    /// The sample variance (0 for one value).
    pub fn variance(&self) -> f64 {
        self.std.map_or(0.0, |s| s * s)
    }

    /// Whether every value is the same (and there are two or more).
    pub fn is_constant(&self) -> bool {
        self.n >= 2 && self.max == self.min
    }
}

/// The mean of `values` (not empty, smallest `min`, largest `max`), summed
/// as differences from the first value so that identical values give that
/// value exactly, and clamped to [min, max], which rounding can otherwise
/// leave by an ulp or two.
fn mean_within(values: &[f64], min: f64, max: f64) -> f64 {
    let Some(&first) = values.first() else { return f64::NAN };
    let offset = values.iter().map(|v| v - first).sum::<f64>() / values.len() as f64;
    (first + offset).clamp(min, max)
}

/// The `p` quantile of Student's t with `df` degrees of freedom.
fn t_quantile(p: f64, df: f64) -> f64 {
    match StudentsT::new(0.0, 1.0, df) {
        Ok(t) => t.inverse_cdf(p),
        Err(_) => f64::NAN,
    }
}

/// The `p` quantile of the standard normal.
fn z_quantile(p: f64) -> f64 {
    match Normal::new(0.0, 1.0) {
        Ok(z) => z.inverse_cdf(p),
        Err(_) => f64::NAN,
    }
}

/// D'Agostino–Pearson's normality test of a sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normality {
    /// z-score of the skewness test (`scipy.stats.skewtest`).
    pub z_skew: f64,
    /// z-score of the kurtosis test (`scipy.stats.kurtosistest`).
    pub z_kurtosis: f64,
    /// K² = z_skew² + z_kurtosis².
    pub k2: f64,
    /// P(χ²₂ ≥ K²) = exp(−K²/2).
    pub p_value: f64,
}

/// Why [`normality`] gives no result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NormalityError {
    /// Fewer than [`NORMALITY_MIN_N`] values.
    #[error("needs at least {NORMALITY_MIN_N} runs, has {0}")]
    TooFew(usize),
    /// Every value is the same: no skewness or kurtosis is defined.
    #[error("every run has the same value")]
    Constant,
}

/// D'Agostino–Pearson's K² test of `values` (`scipy.stats.normaltest`).
pub fn normality(values: &[f64]) -> Result<Normality, NormalityError> {
    let n = values.len();
    if n < NORMALITY_MIN_N {
        return Err(NormalityError::TooFew(n));
    }
    let nf = n as f64;
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    // Identical values have no skewness or kurtosis. Said outright rather
    // than left to the variance test below: rounding in the mean can leave
    // a variance of identical values just above it.
    if max == min {
        return Err(NormalityError::Constant);
    }
    let mean = mean_within(values, min, max);
    let moment = |k: i32| values.iter().map(|v| (v - mean).powi(k)).sum::<f64>() / nf;
    let (m2, m3, m4) = (moment(2), moment(3), moment(4));
    // scipy.stats.skew and kurtosis (1.17) treat a variance this small next
    // to the mean as zero: `m2 <= (finfo(float).eps * mean)**2`.
    if m2 <= (f64::EPSILON * mean).powi(2) {
        return Err(NormalityError::Constant);
    }
    // Skewness test (D'Agostino 1970).
    let b2 = m3 / m2.powf(1.5);
    let mut y = b2 * ((nf + 1.0) * (nf + 3.0) / (6.0 * (nf - 2.0))).sqrt();
    let beta2 = 3.0 * (nf * nf + 27.0 * nf - 70.0) * (nf + 1.0) * (nf + 3.0)
        / ((nf - 2.0) * (nf + 5.0) * (nf + 7.0) * (nf + 9.0));
    let w2 = -1.0 + (2.0 * (beta2 - 1.0)).sqrt();
    let delta = 1.0 / (0.5 * w2.ln()).sqrt();
    let alpha = (2.0 / (w2 - 1.0)).sqrt();
    if y == 0.0 {
        y = 1.0;
    }
    let z_skew = delta * (y / alpha + ((y / alpha).powi(2) + 1.0).sqrt()).ln();
    // Kurtosis test (Anscombe & Glynn 1983).
    let b2 = m4 / (m2 * m2);
    let e = 3.0 * (nf - 1.0) / (nf + 1.0);
    let varb2 =
        24.0 * nf * (nf - 2.0) * (nf - 3.0) / ((nf + 1.0).powi(2) * (nf + 3.0) * (nf + 5.0));
    let x = (b2 - e) / varb2.sqrt();
    let sqrtbeta1 = 6.0 * (nf * nf - 5.0 * nf + 2.0) / ((nf + 7.0) * (nf + 9.0))
        * (6.0 * (nf + 3.0) * (nf + 5.0) / (nf * (nf - 2.0) * (nf - 3.0))).sqrt();
    let a =
        6.0 + 8.0 / sqrtbeta1 * (2.0 / sqrtbeta1 + (1.0 + 4.0 / (sqrtbeta1 * sqrtbeta1)).sqrt());
    let term1 = 1.0 - 2.0 / (9.0 * a);
    let denom = 1.0 + x * (2.0 / (a - 4.0)).sqrt();
    let term2 = if denom == 0.0 {
        f64::NAN
    } else {
        denom.signum() * ((1.0 - 2.0 / a) / denom.abs()).powf(1.0 / 3.0)
    };
    let z_kurtosis = (term1 - term2) / (2.0 / (9.0 * a)).sqrt();
    let k2 = z_skew * z_skew + z_kurtosis * z_kurtosis;
    Ok(Normality { z_skew, z_kurtosis, k2, p_value: (-k2 / 2.0).exp() })
}

/// Welch's comparison of two samples: `b − a`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Welch {
    /// mean(b) − mean(a).
    pub difference: f64,
    /// Its standard error √(s_a²/n_a + s_b²/n_b).
    pub standard_error: f64,
    /// Welch–Satterthwaite degrees of freedom.
    pub df: f64,
    /// t statistic (difference / standard error).
    pub t: f64,
    /// Two-sided p-value of Welch's t-test.
    pub p_value: f64,
    /// 95% confidence interval of the difference.
    pub ci95: (f64, f64),
}

impl Welch {
    /// Whether the 95% interval holds 0 (equivalently p ≥ 0.05): the
    /// difference is within seed noise.
    pub fn within_noise(&self) -> bool {
        self.p_value >= 1.0 - CONFIDENCE
    }
}

/// Welch's t-test of `b` against `a`; `None` when either has fewer than two
/// values (no variance), or both have none (no spread at all).
pub fn welch(a: &Summary, b: &Summary) -> Option<Welch> {
    if a.n < 2 || b.n < 2 {
        return None;
    }
    let (va, vb) = (a.variance() / a.n as f64, b.variance() / b.n as f64);
    let se2 = va + vb;
    if se2 <= 0.0 {
        return None;
    }
    let standard_error = se2.sqrt();
    let df = se2 * se2 / (va * va / (a.n - 1) as f64 + vb * vb / (b.n - 1) as f64);
    let difference = b.mean - a.mean;
    let t = difference / standard_error;
    let dist = StudentsT::new(0.0, 1.0, df).ok()?;
    let p_value = (2.0 * dist.sf(t.abs())).min(1.0);
    let half = dist.inverse_cdf(0.5 + CONFIDENCE / 2.0) * standard_error;
    Some(Welch {
        difference,
        standard_error,
        df,
        t,
        p_value,
        ci95: (difference - half, difference + half),
    })
}

/// Seeds per sweep that resolve a difference of `difference` (80% power,
/// two-sided 5%; see the module doc); `None` when the difference is 0, the
/// variances are unknown, or both are 0 (no seed noise to measure it
/// against: the formula's answer, its floor of 2, would mean nothing).
pub fn seeds_needed(a: &Summary, b: &Summary, difference: f64) -> Option<u64> {
    if a.n < 2 || b.n < 2 || difference == 0.0 || !difference.is_finite() {
        return None;
    }
    let sigma2 = (a.variance() + b.variance()) / 2.0;
    if sigma2 <= 0.0 {
        return None;
    }
    let z = z_quantile(0.5 + CONFIDENCE / 2.0) + z_quantile(POWER);
    let n = (2.0 * z * z * sigma2 / (difference * difference)).ceil();
    if !n.is_finite() || n > u64::MAX as f64 {
        return None;
    }
    Some((n as u64).max(2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_a_small_sample() {
        let s = Summary::of(&[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert_eq!((s.n, s.mean, s.max, s.min), (4, 2.5, 4.0, 1.0));
        let std = s.std.unwrap();
        assert!((std - (5.0f64 / 3.0).sqrt()).abs() < 1e-12, "{std}");
        // t(0.975, 3) = 3.182446305284263
        let (lo, hi) = s.ci95.unwrap();
        assert!((hi - 2.5 - 3.182446305284263 * std / 2.0).abs() < 1e-9, "{hi}");
        assert!((2.5 - lo - (hi - 2.5)).abs() < 1e-12);
        let one = Summary::of(&[7.0]).unwrap();
        assert_eq!((one.std, one.ci95), (None, None));
        assert!(Summary::of(&[]).is_none());
    }

    #[test]
    fn normality_needs_eight_distinct_values() {
        assert_eq!(normality(&[1.0; 7]), Err(NormalityError::TooFew(7)));
        assert_eq!(normality(&[1.0; 9]), Err(NormalityError::Constant));
        let p = normality(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]).unwrap();
        assert!(p.p_value > 0.05 && p.p_value <= 1.0, "{p:?}");
        let mut skewed = vec![0.0; 30];
        skewed[0] = 100.0;
        assert!(normality(&skewed).unwrap().p_value < 1e-6);
    }

    #[test]
    fn welch_separates_noise_from_a_real_difference() {
        let a = Summary::of(&[79.7, 79.8, 79.6, 79.9, 79.75]).unwrap();
        let near = Summary::of(&[79.72, 79.85, 79.65, 79.8, 79.7]).unwrap();
        let far = Summary::of(&[80.7, 80.8, 80.6, 80.9, 80.75]).unwrap();
        let w = welch(&a, &near).unwrap();
        assert!(w.within_noise() && w.ci95.0 < 0.0 && w.ci95.1 > 0.0, "{w:?}");
        let w = welch(&a, &far).unwrap();
        assert!(!w.within_noise() && w.ci95.0 > 0.0, "{w:?}");
        assert!((w.difference - 1.0).abs() < 1e-9);
        assert!(welch(&a, &Summary::of(&[1.0]).unwrap()).is_none());
    }

    #[test]
    fn identical_values_have_their_own_mean_no_spread_and_no_test() {
        // 13 × 73.44 summed plainly gives 73.44000000000003 (numpy too).
        for (value, n) in [(73.44, 13), (79.72, 100), (0.1, 10), (88.25, 2)] {
            let values = vec![value; n];
            let s = Summary::of(&values).unwrap();
            assert_eq!((s.mean, s.max, s.min), (value, value, value), "{value} x {n}");
            assert_eq!((s.std, s.ci95), (Some(0.0), None), "{value} x {n}");
            assert!(s.is_constant());
            if n >= NORMALITY_MIN_N {
                assert_eq!(normality(&values), Err(NormalityError::Constant), "{value} x {n}");
            }
        }
        // The mean of nearly identical values stays within them.
        let mut close = vec![73.44; 12];
        close.push(73.44 + 1e-13);
        let s = Summary::of(&close).unwrap();
        assert!(s.min <= s.mean && s.mean <= s.max, "{s:?}");
        assert!(!s.is_constant() && s.ci95.is_some());
    }

    #[test]
    fn no_seeds_are_needed_without_seed_noise() {
        let a = Summary::of(&[80.0, 80.0, 80.0]).unwrap();
        let b = Summary::of(&[81.0, 81.0, 81.0]).unwrap();
        assert_eq!(seeds_needed(&a, &b, 1.0), None);
        assert!(welch(&a, &b).is_none());
    }

    #[test]
    fn seeds_needed_shrinks_with_the_difference() {
        let a = Summary::of(&[0.0, 1.0, 2.0]).unwrap();
        let b = Summary::of(&[0.5, 1.5, 2.5]).unwrap();
        // σ² = 1, δ = 1: ⌈2 (1.959964 + 0.841621)² ⌉ = ⌈15.697⌉ = 16.
        assert_eq!(seeds_needed(&a, &b, 1.0), Some(16));
        assert_eq!(seeds_needed(&a, &b, 2.0), Some(4));
        assert_eq!(seeds_needed(&a, &b, 100.0), Some(2));
        assert_eq!(seeds_needed(&a, &b, 0.0), None);
    }
}
