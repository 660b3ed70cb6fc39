//! Background loader threads with a bounded, ordered prefetch queue.
//!
//! Job `k` of a pass is built by worker `k % threads`, which pushes it into its
//! own bounded channel; the consumer takes the jobs back in order `0, 1, 2...`
//! from the matching channel (the PyTorch DataLoader scheme). At most
//! `prefetch` results wait in memory; a worker that finds its channel closed
//! (the consumer went away) stops; a worker that panics turns into an error
//! for the consumer, never a hang.

use crate::error::DataError;
use crossbeam_channel::{bounded, Receiver};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// An ordered stream of job results produced by background threads.
pub struct Loader<T> {
    receivers: Vec<Receiver<Result<T, DataError>>>,
    next: usize,
    total: usize,
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
}

impl<T> std::fmt::Debug for Loader<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader").field("next", &self.next).field("total", &self.total).finish()
    }
}

/// Threads to use when a recipe says 0: the cores this process may use
/// (its CPU affinity and cgroup quota), shared evenly by the ranks of this
/// host when `LOCAL_WORLD_SIZE` (torchrun's variable) says how many there are.
pub fn default_threads() -> usize {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let local = std::env::var("LOCAL_WORLD_SIZE").ok();
    threads_per_rank(cores, local.as_deref())
}

/// `cores / local_world_size` (at least 1); an absent or malformed size counts as 1.
pub fn threads_per_rank(cores: usize, local_world_size: Option<&str>) -> usize {
    let ranks = local_world_size.and_then(|s| s.trim().parse::<usize>().ok()).unwrap_or(1).max(1);
    (cores / ranks).max(1)
}

impl<T: Send + 'static> Loader<T> {
    /// Starts `threads` workers running `job(k)` for `k` in `0..total`, keeping
    /// at most about `prefetch` finished results queued.
    pub fn spawn<F>(total: usize, threads: usize, prefetch: usize, job: F) -> Loader<T>
    where
        F: Fn(usize) -> Result<T, DataError> + Send + Sync + 'static,
    {
        let threads = threads.clamp(1, total.max(1));
        let capacity = prefetch.div_ceil(threads).max(1);
        let job = Arc::new(job);
        let stop = Arc::new(AtomicBool::new(false));
        let mut receivers = Vec::with_capacity(threads);
        let mut workers = Vec::with_capacity(threads);
        for w in 0..threads {
            let (tx, rx) = bounded(capacity);
            receivers.push(rx);
            let job = Arc::clone(&job);
            let stop = Arc::clone(&stop);
            let handle = std::thread::Builder::new()
                .name(format!("loader-{w}"))
                .spawn(move || {
                    for k in (w..total).step_by(threads) {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let result = std::panic::catch_unwind(AssertUnwindSafe(|| job(k)))
                            .unwrap_or_else(|panic| {
                                let what = panic
                                    .downcast_ref::<&str>()
                                    .map(|s| s.to_string())
                                    .or_else(|| panic.downcast_ref::<String>().cloned())
                                    .unwrap_or_else(|| "unknown panic".into());
                                Err(DataError::Loader(format!("job {k} panicked: {what}")))
                            });
                        if tx.send(result).is_err() {
                            break;
                        }
                    }
                })
                .expect("spawning a loader thread");
            workers.push(handle);
        }
        Loader { receivers, next: 0, total, stop, workers }
    }

    /// Jobs not yet taken.
    pub fn remaining(&self) -> usize {
        self.total - self.next
    }
}

impl<T> Iterator for Loader<T> {
    type Item = Result<T, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.total {
            return None;
        }
        let k = self.next;
        self.next += 1;
        let rx = &self.receivers[k % self.receivers.len()];
        Some(rx.recv().unwrap_or_else(|_| {
            Err(DataError::Loader(format!("worker for job {k} exited without a result")))
        }))
    }
}

impl<T> Drop for Loader<T> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping the receivers unblocks workers waiting on a full channel.
        self.receivers.clear();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn default_threads_are_shared_by_local_ranks() {
        assert_eq!(threads_per_rank(16, None), 16);
        assert_eq!(threads_per_rank(16, Some("8")), 2);
        assert_eq!(threads_per_rank(16, Some("32")), 1);
        assert_eq!(threads_per_rank(16, Some("x")), 16);
        assert_eq!(threads_per_rank(16, Some("0")), 16);
        assert!(default_threads() >= 1);
    }

    #[test]
    fn results_arrive_in_job_order_whatever_the_timing() {
        let loader = Loader::spawn(50, 3, 4, |k| {
            std::thread::sleep(Duration::from_micros(((k * 7919) % 13) as u64 * 100));
            Ok(k * 2)
        });
        let got: Vec<usize> = loader.map(|r| r.unwrap()).collect();
        assert_eq!(got, (0..50).map(|k| k * 2).collect::<Vec<_>>());
    }

    #[test]
    fn a_panicking_job_becomes_an_error_not_a_hang() {
        let mut loader = Loader::spawn(5, 2, 2, |k| if k == 2 { panic!("boom") } else { Ok(k) });
        assert_eq!(loader.next().unwrap().unwrap(), 0);
        assert_eq!(loader.next().unwrap().unwrap(), 1);
        let err = loader.next().unwrap().unwrap_err().to_string();
        assert!(err.contains("boom"), "{err}");
    }

    #[test]
    fn dropping_early_stops_the_workers() {
        let mut loader = Loader::spawn(1_000_000, 2, 2, Ok);
        assert_eq!(loader.next().unwrap().unwrap(), 0);
        drop(loader); // must return promptly
    }
}
