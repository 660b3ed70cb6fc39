//! timm 1.0.31's RandAugment config strings (`rand-m7-mstd0.5-inc1`, ...),
//! parsed as `timm/data/auto_augment.py`'s `rand_augment_transform` reads
//! them. They live with the recipe so that a recipe whose
//! `augment.rand_augment` timm would refuse is refused when it is loaded, by
//! the coordinator too, not at every rank's start; the input pipeline
//! (`rsb_data::rand_augment`) applies the parsed config.

use std::str::FromStr;

use thiserror::Error;

/// timm's `_LEVEL_DENOM`: magnitudes are on a 0..=10 scale.
pub const LEVEL_DENOM: f64 = 10.0;

/// A parsed timm RandAugment config string.
#[derive(Debug, Clone, PartialEq)]
pub struct RandAugmentConfig {
    /// `m`: magnitude (timm default 10).
    pub magnitude: u32,
    /// `n`: ops per image (default 2).
    pub num_layers: usize,
    /// `p`: probability of applying each chosen op (default 0.5).
    pub prob: f64,
    /// `mstd`: standard deviation of the per-call magnitude noise (default 0);
    /// infinite (from `mstd` > 100) means uniform in [0, m].
    pub magnitude_std: f64,
    /// `mmax`: upper clip of the magnitude (default: [`LEVEL_DENOM`]; like
    /// timm, `mmax0` also means the default).
    pub magnitude_max: Option<u32>,
    /// `inc`: use the 'increasing' op set (default false).
    pub increasing: bool,
}

impl Default for RandAugmentConfig {
    fn default() -> Self {
        RandAugmentConfig {
            magnitude: 10,
            num_layers: 2,
            prob: 0.5,
            magnitude_std: 0.0,
            magnitude_max: None,
            increasing: false,
        }
    }
}

/// Why a RandAugment config string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RandAugmentError {
    /// The string does not start with the `rand` section.
    #[error("RandAugment config {config:?} must start with 'rand'")]
    NotRand {
        /// The whole config string.
        config: String,
    },
    /// A section whose key timm does not know (timm asserts), e.g. the removed `w`.
    #[error("unknown RandAugment config section {token:?}")]
    UnknownSection {
        /// The offending section.
        token: String,
    },
    /// A known key whose value does not parse (timm raises `ValueError`).
    #[error("invalid value in RandAugment config section {token:?}")]
    InvalidValue {
        /// The offending section.
        token: String,
    },
    /// A `t<name>` transform set other than the default ones (weighted or 3-Augment sets).
    #[error("RandAugment transform set in section {token:?} is not supported")]
    UnsupportedTransforms {
        /// The offending section.
        token: String,
    },
}

impl RandAugmentConfig {
    /// Parses a timm RandAugment string as timm 1.0.31
    /// `rand_augment_transform` does: sections separated by `-`, the first
    /// being `rand`; each other section is a key followed by a value starting
    /// at its first digit: `m` (int), `n` (int), `p` (float), `mstd` (float;
    /// above 100 means uniform), `mmax` (int), `inc` (int; `inc0` is false in
    /// 1.0.31). For `mstd` and `mmax` the first occurrence wins, for the others
    /// the last. Sections without a digit are ignored, as in timm. A section
    /// starting with `t` names the transform set (the first one wins): the
    /// weighted and 3-Augment sets (`tweights`, `t3aw`, `t3a`) are not
    /// supported; any other name selects the default set, as in timm.
    pub fn parse(s: &str) -> Result<RandAugmentConfig, RandAugmentError> {
        let mut sections = s.split('-');
        if sections.next() != Some("rand") {
            return Err(RandAugmentError::NotRand { config: s.to_string() });
        }
        let mut cfg = RandAugmentConfig::default();
        let mut mstd: Option<f64> = None;
        let mut mmax: Option<u32> = None;
        let mut transforms: Option<&str> = None;
        for c in sections {
            if let Some(name) = c.strip_prefix('t') {
                if transforms.is_none() {
                    transforms = Some(name);
                    if matches!(name, "weights" | "3aw" | "3a") {
                        return Err(RandAugmentError::UnsupportedTransforms {
                            token: c.to_string(),
                        });
                    }
                }
                continue;
            }
            let Some(split) = c.find(|ch: char| ch.is_ascii_digit()) else {
                continue;
            };
            let (key, val) = c.split_at(split);
            let bad = || RandAugmentError::InvalidValue { token: c.to_string() };
            let int = || val.parse::<u32>().map_err(|_| bad());
            let float = || val.parse::<f64>().map_err(|_| bad());
            match key {
                "mstd" => {
                    let v = float()?;
                    let v = if v > 100.0 { f64::INFINITY } else { v };
                    mstd.get_or_insert(v);
                }
                "mmax" => {
                    let v = int()?;
                    mmax.get_or_insert(v);
                }
                "inc" => {
                    // Python `bool(int(val))`, for any number of digits.
                    if !val.bytes().all(|b| b.is_ascii_digit()) {
                        return Err(bad());
                    }
                    cfg.increasing = val.bytes().any(|b| b != b'0');
                }
                "m" => cfg.magnitude = int()?,
                "n" => cfg.num_layers = val.parse::<usize>().map_err(|_| bad())?,
                "p" => cfg.prob = float()?,
                _ => return Err(RandAugmentError::UnknownSection { token: c.to_string() }),
            }
        }
        cfg.magnitude_std = mstd.unwrap_or(0.0);
        cfg.magnitude_max = mmax;
        Ok(cfg)
    }

    /// The upper clip of the per-call magnitude (`magnitude_max or 10`).
    pub fn upper_bound(&self) -> f64 {
        match self.magnitude_max {
            Some(m) if m != 0 => f64::from(m),
            _ => LEVEL_DENOM,
        }
    }

    /// timm's clip of a (noisy) magnitude: `max(0, min(m, upper_bound))`.
    pub fn clip_magnitude(&self, m: f64) -> f64 {
        let upper = self.upper_bound();
        let m = if upper < m { upper } else { m };
        if m > 0.0 {
            m
        } else {
            0.0
        }
    }
}

impl FromStr for RandAugmentConfig {
    type Err = RandAugmentError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RandAugmentConfig::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> RandAugmentConfig {
        RandAugmentConfig::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn parses_rsb_strings() {
        let c = parse("rand-m7-mstd0.5-inc1");
        assert_eq!(
            c,
            RandAugmentConfig {
                magnitude: 7,
                num_layers: 2,
                prob: 0.5,
                magnitude_std: 0.5,
                magnitude_max: None,
                increasing: true
            }
        );
        let c = parse("rand-m9-n3-mstd0.5");
        assert_eq!((c.magnitude, c.num_layers, c.increasing), (9, 3, false));
        assert_eq!(parse("rand-m6-mstd101").magnitude_std, f64::INFINITY);
        assert_eq!(parse("rand-m6-mstd100").magnitude_std, 100.0);
        assert_eq!(parse("rand"), RandAugmentConfig::default());
    }

    #[test]
    fn parse_follows_timm_quirks() {
        // timm 1.0.31 uses bool(int(val)): inc0 is false.
        assert!(!parse("rand-inc0").increasing);
        assert!(parse("rand-inc01").increasing);
        // mstd/mmax go through hparams.setdefault: the first one wins.
        let c = parse("rand-mstd0.5-mstd1-mmax15-mmax20");
        assert_eq!((c.magnitude_std, c.magnitude_max), (0.5, Some(15)));
        // The others: the last one wins.
        assert_eq!(parse("rand-m3-m5-n1-n4").magnitude, 5);
        assert_eq!(parse("rand-p0.25").prob, 0.25);
        // mmax0 is falsy in timm: the default bound 10 applies.
        assert_eq!(parse("rand-mmax0").upper_bound(), 10.0);
        assert_eq!(parse("rand-mmax15").upper_bound(), 15.0);
        // Sections without a digit are skipped; unknown set names mean the default set.
        assert_eq!(parse("rand-foo--m7").magnitude, 7);
        assert!(!parse("rand-tdefault-tweights").increasing);
    }

    #[test]
    fn parse_errors_name_the_token() {
        let err = |s: &str| RandAugmentConfig::parse(s).unwrap_err();
        assert_eq!(err("rnd-m7"), RandAugmentError::NotRand { config: "rnd-m7".into() });
        assert_eq!(err(""), RandAugmentError::NotRand { config: String::new() });
        assert_eq!(err("rand-m7-w0"), RandAugmentError::UnknownSection { token: "w0".into() });
        assert_eq!(err("rand-x3"), RandAugmentError::UnknownSection { token: "x3".into() });
        assert_eq!(err("rand-m7.5"), RandAugmentError::InvalidValue { token: "m7.5".into() });
        assert_eq!(
            err("rand-mstd0.5x"),
            RandAugmentError::InvalidValue { token: "mstd0.5x".into() }
        );
        assert_eq!(
            err("rand-n99999999999999999999999"),
            RandAugmentError::InvalidValue { token: "n99999999999999999999999".into() }
        );
        assert_eq!(
            err("rand-m9-tweights"),
            RandAugmentError::UnsupportedTransforms { token: "tweights".into() }
        );
        assert!(err("rand-t3a").to_string().contains("t3a"));
        assert!(err("rand-m7-w0").to_string().contains("w0"));
    }
}
