//! Background loader threads with a bounded, ordered prefetch queue.
//!
//! Job `k` of a pass is built by worker `k % threads`, which pushes it into its
//! own bounded channel; the consumer takes the jobs back in order `0, 1, 2...`
//! from the matching channel (the PyTorch DataLoader scheme). At most
//! `prefetch` results wait in memory; a worker that finds its channel closed
//! (the consumer went away) stops; a worker that panics turns into an error
//! for the consumer, never a hang. A job that does not return (a read from a
//! hung file system) is warned about every [`Patience::warn_every`] and is an
//! error naming it after [`Patience::give_up`]; dropping the loader waits
//! [`Patience::on_drop`] at most for such a worker, then leaves it.

use crate::error::DataError;
use crossbeam_channel::{bounded, Receiver, RecvTimeoutError};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a [`Loader`] waits for a job, and for its workers when dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Patience {
    /// A warning, naming the job, every time this passes without its result.
    pub warn_every: Duration,
    /// A job whose result has not come after this is an error.
    pub give_up: Duration,
    /// Dropping the loader waits this long for its workers to end.
    pub on_drop: Duration,
}

impl Default for Patience {
    /// A minute between warnings, and 30 minutes before an error: a batch
    /// takes well under a second, so only a hung read takes that long.
    fn default() -> Patience {
        Patience {
            warn_every: Duration::from_secs(60),
            give_up: Duration::from_secs(30 * 60),
            on_drop: Duration::from_secs(10),
        }
    }
}

/// An ordered stream of job results produced by background threads.
pub struct Loader<T> {
    receivers: Vec<Receiver<Result<T, DataError>>>,
    next: usize,
    total: usize,
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
    patience: Patience,
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
            let job = Arc::clone(&job);
            let stop = Arc::clone(&stop);
            let handle = std::thread::Builder::new().name(format!("loader-{w}")).spawn(move || {
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
            });
            match handle {
                Ok(handle) => {
                    receivers.push(rx);
                    workers.push(handle);
                }
                Err(e) => {
                    // No thread (a process or memory limit): this worker's
                    // jobs are errors saying why, not a panic.
                    let (failed_tx, failed_rx) = bounded(1);
                    let _ = failed_tx.send(Err(DataError::Loader(format!(
                        "cannot start loader thread {w} of {threads}: {e}"
                    ))));
                    receivers.push(failed_rx);
                }
            }
        }
        Loader { receivers, next: 0, total, stop, workers, patience: Patience::default() }
    }

    /// The same loader, waiting as `patience` says.
    pub fn with_patience(mut self, patience: Patience) -> Loader<T> {
        self.patience = patience;
        self
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
        let started = Instant::now();
        loop {
            let waited = started.elapsed();
            if waited >= self.patience.give_up {
                if let Ok(result) = rx.try_recv() {
                    return Some(result);
                }
                // The job's result, were it to come, would be taken for a
                // later job's: this loader ends here.
                self.next = self.total;
                self.stop.store(true, Ordering::Relaxed);
                return Some(Err(DataError::Loader(format!(
                    "job {k} of {} gave no result within {:?} (a hung file system, or a \
                     job that never returns)",
                    self.total, self.patience.give_up
                ))));
            }
            let wait = self
                .patience
                .warn_every
                .max(Duration::from_millis(1))
                .min(self.patience.give_up - waited);
            match rx.recv_timeout(wait) {
                Ok(result) => return Some(result),
                Err(RecvTimeoutError::Disconnected) => {
                    return Some(Err(DataError::Loader(format!(
                        "worker for job {k} exited without a result"
                    ))))
                }
                Err(RecvTimeoutError::Timeout) => tracing::warn!(
                    job = k,
                    waited_s = started.elapsed().as_secs_f64(),
                    "a loader job is not ready yet (a slow or hung file system?); still waiting"
                ),
            }
        }
    }
}

impl<T> Drop for Loader<T> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping the receivers unblocks workers waiting on a full channel.
        self.receivers.clear();
        let started = Instant::now();
        while self.workers.iter().any(|w| !w.is_finished())
            && started.elapsed() < self.patience.on_drop
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut stuck = 0;
        for w in self.workers.drain(..) {
            if w.is_finished() {
                let _ = w.join();
            } else {
                stuck += 1;
            }
        }
        if stuck > 0 {
            tracing::warn!(
                threads = stuck,
                "loader threads still busy {:?} after the loader was dropped (a hung read?); \
                 left behind",
                self.patience.on_drop
            );
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
    fn a_job_that_never_returns_is_an_error_naming_it_and_does_not_hold_up_the_drop() {
        let patience = Patience {
            warn_every: Duration::from_millis(20),
            give_up: Duration::from_millis(200),
            on_drop: Duration::from_millis(100),
        };
        let mut loader = Loader::spawn(3, 1, 1, |k| {
            if k == 1 {
                // A read from a hung file system.
                loop {
                    std::thread::park();
                }
            }
            Ok(k)
        })
        .with_patience(patience);
        assert_eq!(loader.next().unwrap().unwrap(), 0);
        let started = Instant::now();
        let err = loader.next().unwrap().unwrap_err().to_string();
        assert!(err.contains("job 1 of 3") && err.contains("no result within"), "{err}");
        assert!(started.elapsed() >= patience.give_up, "gave up early");
        // Job 2's result would be taken from job 1's queue: the loader ends.
        assert!(loader.next().is_none(), "the loader went on after giving up");
        let started = Instant::now();
        drop(loader);
        assert!(started.elapsed() < Duration::from_secs(5), "the drop waited for the stuck job");
    }

    #[test]
    fn dropping_early_stops_the_workers() {
        let mut loader = Loader::spawn(1_000_000, 2, 2, Ok);
        assert_eq!(loader.next().unwrap().unwrap(), 0);
        drop(loader); // must return promptly
    }
}
