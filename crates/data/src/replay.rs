//! Replaying random draws recorded from timm.
//!
//! The augmentations draw from our [`crate::rng::Rng`], so only their
//! distributions can match timm's. To check their decisions draw for draw,
//! each one runs its decision code behind a small private trait with one
//! method per kind of draw timm makes, implemented for `Rng` and for a
//! `Replay` of a plan recorded from Python (`tests/oracle/*_draws.py`):
//! RandAugment ([`crate::rand_augment::RandAugment::apply_replayed`]) and the
//! random resized crop and flip
//! ([`crate::transforms::TrainTransform::crop_and_flip_replayed`]).
//!
//! A replay keeps the first problem it meets (a draw of the wrong kind, an
//! index or a `randint` value out of range) and afterwards hands out neutral
//! values, so that the decision code runs to its end without panicking; its
//! result is then discarded and `Replay::finish` reports the problem, or the
//! draws the decisions left unused.

use std::fmt::Debug;

use thiserror::Error;

/// Why a recorded plan of draws (of type `D`) could not be replayed.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum ReplayError<D: Debug> {
    /// The next planned draw is not the kind the decision needs, or the plan ended.
    #[error("draw {position}: the replay needs {needed}, the plan has {found:?}")]
    Mismatch {
        /// Index of the draw in the plan.
        position: usize,
        /// The kind of draw needed (`op choice`, `random`, ...).
        needed: &'static str,
        /// The planned draw (`None`: the plan ended).
        found: Option<D>,
    },
    /// A planned index is outside the set it picks from.
    #[error("draw {position}: index {index} out of range for {len} choices")]
    OutOfRange {
        /// Index of the draw in the plan.
        position: usize,
        /// The planned index.
        index: usize,
        /// The number of choices.
        len: usize,
    },
    /// A planned `random.randint(lo, hi)` value is outside `[lo, hi]`.
    #[error("draw {position}: randint value {value} outside [{lo}, {hi}]")]
    IntOutOfRange {
        /// Index of the draw in the plan.
        position: usize,
        /// The planned value.
        value: i64,
        /// The smallest value the draw may take.
        lo: i64,
        /// The largest value the draw may take.
        hi: i64,
    },
    /// The decisions used fewer draws than planned.
    #[error("{left} planned draws were not used")]
    Unused {
        /// Draws left.
        left: usize,
    },
}

/// A recorded plan being replayed; the first problem is kept and later
/// draws return neutral values (the result is discarded on error).
pub(crate) struct Replay<'a, D: Debug> {
    plan: &'a [D],
    next: usize,
    error: Option<ReplayError<D>>,
}

impl<'a, D: Debug + Copy> Replay<'a, D> {
    /// A replay of `plan` from its first draw.
    pub(crate) fn new(plan: &'a [D]) -> Self {
        Replay { plan, next: 0, error: None }
    }

    /// The next planned draw if `pick` accepts its kind; records a mismatch otherwise.
    pub(crate) fn take<T>(
        &mut self,
        needed: &'static str,
        pick: impl Fn(D) -> Option<T>,
    ) -> Option<T> {
        if self.error.is_some() {
            return None;
        }
        let position = self.next;
        let found = self.plan.get(position).copied();
        match found.and_then(&pick) {
            Some(v) => {
                self.next += 1;
                Some(v)
            }
            None => {
                self.error = Some(ReplayError::Mismatch { position, needed, found });
                None
            }
        }
    }

    /// Checks a drawn index against the number of choices (0 when it does
    /// not fit or was not drawn).
    pub(crate) fn index(&mut self, len: usize, draw: Option<usize>) -> usize {
        match draw {
            Some(index) if index < len => index,
            Some(index) => {
                if self.error.is_none() {
                    self.error =
                        Some(ReplayError::OutOfRange { position: self.next - 1, index, len });
                }
                0
            }
            None => 0,
        }
    }

    /// Checks a drawn `randint(lo, hi)` value against its range (`lo` when it
    /// does not fit or was not drawn).
    pub(crate) fn int_in(&mut self, lo: i64, hi: i64, draw: Option<i64>) -> i64 {
        match draw {
            Some(value) if (lo..=hi).contains(&value) => value,
            Some(value) => {
                if self.error.is_none() {
                    self.error =
                        Some(ReplayError::IntOutOfRange { position: self.next - 1, value, lo, hi });
                }
                lo
            }
            None => lo,
        }
    }

    /// The first problem met, else [`ReplayError::Unused`] if draws are left.
    pub(crate) fn finish(self) -> Result<(), ReplayError<D>> {
        if let Some(error) = self.error {
            return Err(error);
        }
        if self.next < self.plan.len() {
            return Err(ReplayError::Unused { left: self.plan.len() - self.next });
        }
        Ok(())
    }
}
