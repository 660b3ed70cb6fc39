//! Stopping a distributed run cleanly, and writing a checkpoint without
//! falling silent.
//!
//! [`StopRequest`]: a process that is asked to stop (`worker rank` on
//! `SIGTERM`/`SIGINT`, which its agent sends when the coordinator stays
//! unreachable past its deadline) sets the request; the trainer reads it at
//! every sync point (a log step, a checkpoint, an epoch's end: the host
//! waits for the device there anyway), and the ranks vote on it with one
//! small all-reduce ([`Trainer`](crate::trainer::Trainer)), so they all stop
//! after the same update, rank 0 having written a checkpoint of that
//! position.
//!
//! [`write_while_answering`]: while rank 0 writes a checkpoint, the other
//! ranks would wait for it in their next collective, against
//! `distributed.collective_timeout_secs`, and a write slower than that
//! timeout would get rank 0 blamed as silent. Instead every rank waits in a
//! loop of short votes that rank 0 answers from a helper thread while its
//! main thread writes: no call lasts longer than [`poll_period`], and the
//! wait as a whole is bounded by [`CHECKPOINT_WRITE_DEADLINE`].

use crate::ddp::{sum_scalars, Calls};
use crate::error::TrainError;
use rsb_collective::Collective;
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The longest a checkpoint write (and its report to the job) may take
/// while the other ranks wait for it. Past it the other ranks stop with an
/// error naming the write, and rank 0 fails once the write returns.
pub const CHECKPOINT_WRITE_DEADLINE: Duration = Duration::from_secs(30 * 60);

/// A request to stop at the next update boundary, shared between whoever
/// asks (a signal handler) and the trainer. Cloning shares the request.
#[derive(Debug, Clone, Default)]
pub struct StopRequest {
    reason: Arc<OnceLock<String>>,
    /// When the process exits whether or not the stop finished (a rank's
    /// own deadline for stopping), where whoever asked set one.
    deadline: Arc<OnceLock<Instant>>,
}

impl StopRequest {
    /// A request nobody has made yet.
    pub fn new() -> StopRequest {
        StopRequest::default()
    }

    /// Asks the run to stop, saying why (e.g. "SIGTERM"); only the first
    /// reason is kept.
    pub fn request(&self, reason: impl Into<String>) {
        let _ = self.reason.set(reason.into());
    }

    /// As [`Self::request`], from one that ends the process `within` from
    /// now, finished or not (a rank's stop deadline): the stop's waits
    /// (the run folder's lock before the stop checkpoint) give up in time
    /// to say why, rather than be cut off. The first deadline is kept.
    pub fn request_within(&self, reason: impl Into<String>, within: Duration) {
        let _ = self.deadline.set(Instant::now() + within);
        self.request(reason);
    }

    /// Why the run was asked to stop, if it was.
    pub fn reason(&self) -> Option<&str> {
        self.reason.get().map(String::as_str)
    }

    /// When the process ends, stopped or not, if a request set a deadline
    /// ([`Self::request_within`]).
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline.get().copied()
    }
}

/// How often the writing rank answers the others' votes: well within the
/// collective timeout, at most every second.
pub fn poll_period(collective_timeout: Duration) -> Duration {
    (collective_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

/// Runs `write` on rank `writer` (on this thread) while every rank of
/// `collective` waits for it in votes of at most `poll` each, answered by
/// the writer from a helper thread; `what` names the write in errors.
/// Returns `write`'s result on the writer and `None` elsewhere. A failed
/// write fails every rank (the others with an error naming it); a write
/// past `deadline` releases the other ranks with an error at once, and
/// fails the writer when it returns.
pub fn write_while_answering<T>(
    collective: &mut dyn Collective,
    calls: Calls,
    writer: usize,
    poll: Duration,
    deadline: Duration,
    what: &str,
    write: impl FnOnce() -> Result<T, TrainError>,
) -> Result<Option<T>, TrainError> {
    let vote_name = format!("wait for rank {writer}'s {what}");
    if collective.rank() != writer {
        // Votes: [finished, failed], summed; only the writer adds to them.
        loop {
            let mut vote = [0.0, 0.0];
            sum_scalars(collective, calls, &mut vote, &vote_name)?;
            if vote[1] > 0.0 {
                return Err(TrainError::PeerWrite {
                    rank: writer,
                    what: what.to_string(),
                    deadline,
                });
            }
            if vote[0] > 0.0 {
                return Ok(None);
            }
        }
    }
    let (done_tx, done_rx) = channel::<bool>();
    let started = Instant::now();
    let (rank, operation) = (collective.rank(), vote_name.clone());
    // The answering thread votes; this thread votes only when it cannot start one.
    let collective = Mutex::new(collective);
    let vote = |vote: &mut [f64; 2]| {
        let mut collective = collective.lock().unwrap_or_else(|p| p.into_inner());
        sum_scalars(&mut **collective, calls, vote, &vote_name)
    };
    let (written, answered) = std::thread::scope(|scope| {
        let answering = std::thread::Builder::new().name("write-votes".into());
        let answering = spawn_answering(answering, scope, move || -> Result<bool, TrainError> {
            // Its votes are libtorch work (device buffers): warnings as the trainer's.
            rsb_torch_shim::warnings::route_this_threads_warnings_too();
            loop {
                let (finished, failed) = match done_rx.recv_timeout(poll) {
                    Ok(ok) => (true, !ok),
                    // The writer's thread is gone without a word: failed.
                    Err(RecvTimeoutError::Disconnected) => (true, true),
                    Err(RecvTimeoutError::Timeout) if started.elapsed() > deadline => (true, true),
                    Err(RecvTimeoutError::Timeout) => (false, false),
                };
                vote(&mut [f64::from(u8::from(finished)), f64::from(u8::from(failed))])?;
                if finished {
                    return Ok(!failed);
                }
            }
        });
        let answering = match answering {
            Ok(answering) => answering,
            Err(source) => {
                // Nothing is written: say so in one vote, so that the other
                // ranks stop at once with an error naming the write, rather
                // than when their link to this rank closes.
                let _ = vote(&mut [1.0, 1.0]);
                return Err(TrainError::Collective {
                    operation,
                    error: rsb_collective::CollectiveError::Thread {
                        rank,
                        what: "vote-answering",
                        source,
                    },
                });
            }
        };
        let written = write();
        let _ = done_tx.send(written.is_ok());
        let answered = answering.join().unwrap_or_else(|_| {
            Err(TrainError::Recipe(format!(
                "the thread answering the ranks during the {what} panicked"
            )))
        });
        Ok::<_, TrainError>((written, answered))
    })?;
    let value = written?;
    if !answered? {
        return Err(TrainError::PeerWrite { rank: writer, what: what.to_string(), deadline });
    }
    Ok(Some(value))
}

/// Starts the thread that answers the votes (in tests, fails instead when
/// the calling thread asked it to with `tests::FAIL_TO_SPAWN`).
fn spawn_answering<'scope, 'env, F>(
    builder: std::thread::Builder,
    scope: &'scope std::thread::Scope<'scope, 'env>,
    answer: F,
) -> std::io::Result<std::thread::ScopedJoinHandle<'scope, Result<bool, TrainError>>>
where
    F: FnOnce() -> Result<bool, TrainError> + Send + 'scope,
{
    #[cfg(test)]
    if tests::FAIL_TO_SPAWN.with(std::cell::Cell::get) {
        return Err(std::io::Error::other("no thread for you (a test)"));
    }
    builder.spawn_scoped(scope, answer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ddp::tests::on_ring_with_timeout as on_ring;

    thread_local! {
        /// Makes this thread's next vote-answering thread fail to start.
        pub(super) static FAIL_TO_SPAWN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    fn calls() -> Calls {
        Calls { device: tch::Device::Cpu, at_world_size_one: false }
    }

    /// A write on rank 0 of 3 ranks taking `takes` (failing when `fails`),
    /// with calls that time out after `timeout` and a write deadline of
    /// `deadline`: each rank's result and when it returned.
    fn write_on_ring(
        takes: Duration,
        timeout: Duration,
        deadline: Duration,
        fails: bool,
    ) -> Vec<(Result<Option<u32>, String>, Duration)> {
        let started = Instant::now();
        on_ring(3, timeout, |ring| {
            let result = write_while_answering(
                ring,
                calls(),
                0,
                poll_period(timeout),
                deadline,
                "checkpoint write",
                || {
                    std::thread::sleep(takes);
                    if fails {
                        return Err(TrainError::Recipe("disk full".into()));
                    }
                    Ok(7)
                },
            );
            (result.map_err(|e| e.to_string()), started.elapsed())
        })
    }

    #[test]
    fn a_write_slower_than_the_collective_timeout_silences_nobody() {
        let timeout = Duration::from_millis(300);
        // The write takes 5 timeouts; a plain wait in one call would fail.
        let results = write_on_ring(timeout * 5, timeout, Duration::from_secs(60), false);
        let outcomes: Vec<_> = results.iter().map(|(r, _)| r.clone()).collect();
        assert_eq!(outcomes, vec![Ok(Some(7)), Ok(None), Ok(None)]);
        // And the control: the same ring times out a rank that waits once.
        let timed_out = on_ring(2, timeout, |ring| {
            if ring.rank() == 0 {
                std::thread::sleep(timeout * 5);
            }
            let mut v = [1.0];
            sum_scalars(ring, calls(), &mut v, "one long wait").map_err(|e| e.to_string())
        });
        let e = timed_out[1].as_ref().unwrap_err();
        assert!(e.contains("did not answer"), "{e}");
    }

    #[test]
    fn a_failed_write_fails_every_rank_naming_it() {
        let results = write_on_ring(
            Duration::from_millis(50),
            Duration::from_secs(5),
            Duration::from_secs(60),
            true,
        );
        assert_eq!(results[0].0, Err("recipe: disk full".to_string()));
        for (r, _) in &results[1..] {
            let e = r.as_ref().unwrap_err();
            assert!(e.contains("rank 0") && e.contains("checkpoint write"), "{e}");
        }
    }

    #[test]
    fn a_write_past_its_deadline_releases_the_others_at_once() {
        let results = write_on_ring(
            Duration::from_millis(2000),
            Duration::from_secs(5),
            Duration::from_millis(300),
            false,
        );
        for (rank, (result, at)) in results.iter().enumerate() {
            let e = result.as_ref().unwrap_err();
            assert!(e.contains("did not finish within"), "rank {rank}: {e}");
            if rank == 0 {
                assert!(*at >= Duration::from_millis(2000), "the writer returned early");
            } else {
                assert!(*at < Duration::from_millis(1500), "rank {rank} released after {at:?}");
            }
        }
    }

    #[test]
    fn a_writer_that_cannot_start_its_answering_thread_releases_the_others_at_once() {
        let timeout = Duration::from_secs(20);
        let results = on_ring(3, timeout, |ring| {
            // From the ring's start: setting it up is not the wait measured.
            let started = Instant::now();
            if ring.rank() == 0 {
                FAIL_TO_SPAWN.with(|fail| fail.set(true));
            }
            let result = write_while_answering(
                ring,
                calls(),
                0,
                poll_period(timeout),
                Duration::from_secs(60),
                "checkpoint write",
                || -> Result<u32, TrainError> { panic!("written without an answering thread") },
            );
            let returned = started.elapsed();
            if ring.rank() == 0 {
                // The writer's links stay open a while (a process slow to
                // exit; NCCL has no link to close): the others must be told.
                std::thread::sleep(Duration::from_secs(3));
            }
            (result.map_err(|e| e.to_string()), returned)
        });
        let writer = results[0].0.as_ref().unwrap_err();
        assert!(writer.contains("vote-answering"), "{writer}");
        for (rank, (result, at)) in results.iter().enumerate().skip(1) {
            let e = result.as_ref().unwrap_err();
            assert!(e.contains("rank 0's checkpoint write failed"), "rank {rank}: {e}");
            // Told at once, not when the writer's links close.
            assert!(*at < Duration::from_millis(1500), "rank {rank} released after {at:?}");
        }
    }

    #[test]
    fn a_stop_request_keeps_its_first_reason() {
        let stop = StopRequest::new();
        assert_eq!(stop.reason(), None);
        let shared = stop.clone();
        shared.request("SIGTERM");
        stop.request("SIGINT");
        assert_eq!(stop.reason(), Some("SIGTERM"));
        assert_eq!(stop.deadline(), None, "a request without a deadline has none");
    }

    #[test]
    fn a_stop_requested_within_a_deadline_keeps_the_first_deadline() {
        let stop = StopRequest::new();
        let before = Instant::now();
        stop.clone().request_within("SIGTERM", Duration::from_secs(90));
        let deadline = stop.deadline().expect("a deadline");
        assert!(deadline >= before + Duration::from_secs(90), "{:?}", deadline - before);
        assert!(deadline <= Instant::now() + Duration::from_secs(90));
        stop.request_within("SIGINT", Duration::from_secs(1));
        assert_eq!((stop.reason(), stop.deadline()), (Some("SIGTERM"), Some(deadline)));
    }
}
