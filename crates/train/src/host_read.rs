//! Every read of a device value on the host, in one place: on a GPU each
//! one waits for the device to finish all the work queued before it, so an
//! update must make none. The trainer marks the span of its updates
//! ([`UpdateSpan`]); reads inside one are counted apart
//! ([`Counts::within_updates`]), so a test can show that an update reads
//! nothing and that the reads happen only at the log, checkpoint and epoch
//! steps. The crate's `clippy.toml` forbids the value-reading methods of
//! `tch::Tensor` everywhere else, so no read bypasses the count.
//!
//! The counts are per thread: a rank trains on one thread, and tests that
//! run side by side in one process do not see each other's reads.

#![allow(clippy::disallowed_methods)]

use std::cell::Cell;
use tch::{Device, Kind, TchError, Tensor};

thread_local! {
    static IN_UPDATE: Cell<bool> = const { Cell::new(false) };
    static READS: Cell<u64> = const { Cell::new(0) };
    static READS_WITHIN_UPDATES: Cell<u64> = const { Cell::new(0) };
}

/// The host reads of this thread so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    /// All reads.
    pub total: u64,
    /// Reads made while an [`UpdateSpan`] was open.
    pub within_updates: u64,
}

/// This thread's counts.
pub fn counts() -> Counts {
    Counts { total: READS.with(Cell::get), within_updates: READS_WITHIN_UPDATES.with(Cell::get) }
}

fn count() {
    READS.with(|r| r.set(r.get() + 1));
    if IN_UPDATE.with(Cell::get) {
        READS_WITHIN_UPDATES.with(|r| r.set(r.get() + 1));
    }
}

/// Marks the reads of this thread as made within an update until dropped.
#[derive(Debug)]
pub struct UpdateSpan {
    was: bool,
}

impl UpdateSpan {
    /// Opens a span (spans nest).
    pub fn open() -> UpdateSpan {
        UpdateSpan { was: IN_UPDATE.with(|f| f.replace(true)) }
    }
}

impl Drop for UpdateSpan {
    fn drop(&mut self) {
        IN_UPDATE.with(|f| f.set(self.was));
    }
}

/// The value of a one-element tensor, as f64.
pub fn f64_of(tensor: &Tensor) -> Result<f64, TchError> {
    count();
    tensor.f_double_value(&[])
}

/// The value of a one-element tensor, as i64.
pub fn i64_of(tensor: &Tensor) -> Result<i64, TchError> {
    count();
    tensor.f_int64_value(&[])
}

/// Every element of a tensor, in order, as f64: one read for all of them.
pub fn f64s_of(tensor: &Tensor) -> Result<Vec<f64>, TchError> {
    count();
    let host = tensor.f_to_device(Device::Cpu)?.f_to_kind(Kind::Double)?.f_contiguous()?;
    Vec::<f64>::try_from(host.f_view([-1])?)
}

/// Every element of an f32 tensor, in order: one read for all of them.
pub fn f32s_of(tensor: &Tensor) -> Result<Vec<f32>, TchError> {
    count();
    let host = tensor.f_to_device(Device::Cpu)?.f_to_kind(Kind::Float)?.f_contiguous()?;
    Vec::<f32>::try_from(host.f_view([-1])?)
}

/// Every element of an integer tensor, in order: one read for all of them.
pub fn i64s_of(tensor: &Tensor) -> Result<Vec<i64>, TchError> {
    count();
    let host = tensor.f_to_device(Device::Cpu)?.f_to_kind(Kind::Int64)?.f_contiguous()?;
    Vec::<i64>::try_from(host.f_view([-1])?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_within_an_update_span_are_counted_apart() {
        let before = counts();
        let t = Tensor::from_slice(&[1.5f32, 2.0]);
        assert_eq!(f64s_of(&t).unwrap(), [1.5, 2.0]);
        {
            let _span = UpdateSpan::open();
            assert_eq!(f64_of(&t.sum(Kind::Float)).unwrap(), 3.5);
            {
                let _inner = UpdateSpan::open();
                assert_eq!(i64s_of(&t.to_kind(Kind::Int64)).unwrap(), [1, 2]);
            }
            // Still inside the outer span.
            assert_eq!(f32s_of(&t).unwrap(), [1.5, 2.0]);
        }
        assert_eq!(i64_of(&t.sum(Kind::Int64)).unwrap(), 3);
        let after = counts();
        assert_eq!(after.total - before.total, 5);
        assert_eq!(after.within_updates - before.within_updates, 3);
    }
}
