"""Fixtures for the seed-study statistics of rsb-report, produced by scipy.stats.

`generate(out)` writes `out/cases.json`: samples of final top-1 values
(Gaussian like the paper's seeds, a skewed one, small and large n), each with
what scipy computes for it; `crates/report/tests/parity_scipy.rs` compares:

* per sample: mean, sample std (ddof=1), max, min, and the mean's 95%
  confidence interval `scipy.stats.t.interval(0.95, n-1, mean, sem)`;
* per sample with n >= 8: `scipy.stats.normaltest` (D'Agostino-Pearson K²)
  statistic and p-value, and the z-scores of `skewtest` / `kurtosistest`;
* samples of identical values: one whose mean numpy computes exactly
  (scipy: std 0, a NaN interval, NaN normality test), and 13 x 73.44, whose
  mean numpy puts 3e-14 above the max, giving a std of 3e-14, an interval
  that misses the data and a "normality" p of 1e-5, with scipy's warning
  "Precision loss occurred in moment calculation" (recorded as
  `precision_loss`). rsb-report answers both as identical values (mean the
  value, std 0, no interval, no test); the parity test checks that scipy's
  numbers differ from that only by such rounding. NaN is written as null;
* per pair (a, b): `scipy.stats.ttest_ind(b, a, equal_var=False)` statistic,
  p-value, df and 95% confidence interval of mean(b) - mean(a), and the seeds
  per sweep for 80% power at two-sided 5%,
  ceil(2 (norm.ppf(0.975) + norm.ppf(0.8))^2 (var_a + var_b) / 2 / diff^2).

Run alone: `.venv/bin/python tests/oracle/seed_stats.py --out DIR`.
"""
from __future__ import annotations

import argparse
import json
import math
import warnings
from pathlib import Path

import numpy as np
from scipy import stats


def _samples() -> dict[str, list[float]]:
    rng = np.random.default_rng(20211000)
    return {
        "paper_val_100": list(rng.normal(79.72, 0.10, 100)),
        "paper_v2_100": list(rng.normal(67.99, 0.23, 100)),
        "shifted_val_100": list(rng.normal(79.80, 0.10, 100)),
        "twenty": list(rng.normal(90.5, 0.3, 20)),
        "twenty_close": list(rng.normal(90.52, 0.3, 20)),
        "eight": list(rng.normal(85.0, 0.5, 8)),
        "skewed_30": list(85.0 + rng.exponential(0.4, 30)),
        "heavy_tails_40": list(80.0 + 0.2 * rng.standard_t(2, 40)),
        "three": [79.5, 79.9, 79.6],
        "two": [88.25, 88.75],
        "identical_exact": [73.5] * 13,
        "identical_73_44": [73.44] * 13,
    }


def _number(v) -> float | None:
    """A float for JSON, None (null) for NaN, which JSON cannot hold."""
    v = float(v)
    return None if math.isnan(v) else v


def _summary(x: np.ndarray) -> dict:
    n = len(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mean = float(np.mean(x))
        std = float(np.std(x, ddof=1))
        lo, hi = stats.t.interval(0.95, n - 1, loc=mean, scale=std / math.sqrt(n))
        out = {"n": n, "mean": mean, "std": std, "max": float(np.max(x)), "min": float(np.min(x)),
               "ci95": [_number(lo), _number(hi)], "identical": bool(np.all(x == x[0]))}
        if n >= 8:
            k2 = stats.normaltest(x)
            out["normaltest"] = {
                "statistic": _number(k2.statistic),
                "pvalue": _number(k2.pvalue),
                "z_skew": _number(stats.skewtest(x).statistic),
                "z_kurtosis": _number(stats.kurtosistest(x).statistic),
            }
    out["precision_loss"] = any("Precision loss" in str(w.message) for w in caught)
    return out


def _pair(a: np.ndarray, b: np.ndarray) -> dict:
    t = stats.ttest_ind(b, a, equal_var=False)
    ci = t.confidence_interval(0.95)
    diff = float(np.mean(b) - np.mean(a))
    sigma2 = (np.var(a, ddof=1) + np.var(b, ddof=1)) / 2
    z = stats.norm.ppf(0.975) + stats.norm.ppf(0.80)
    seeds = max(2, math.ceil(2 * z * z * sigma2 / diff**2))
    return {"statistic": float(t.statistic), "pvalue": float(t.pvalue), "df": float(t.df),
            "ci95": [float(ci.low), float(ci.high)], "difference": diff, "seeds_needed": seeds}


def generate(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    samples = _samples()
    pairs = [("paper_val_100", "shifted_val_100"), ("twenty", "twenty_close"),
             ("paper_val_100", "eight"), ("three", "two"), ("skewed_30", "heavy_tails_40")]
    cases = {
        "scipy": __import__("scipy").__version__,
        "samples": {name: {"values": [float(v) for v in x], **_summary(np.asarray(x))}
                    for name, x in samples.items()},
        "pairs": [{"a": a, "b": b, **_pair(np.asarray(samples[a]), np.asarray(samples[b]))}
                  for a, b in pairs],
    }
    (out / "cases.json").write_text(json.dumps(cases, indent=1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    generate(parser.parse_args().out)
