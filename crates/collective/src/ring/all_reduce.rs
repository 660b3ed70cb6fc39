//! The pipelined ring all-reduce: which chunk and segments each of the
//! `2 (N-1)` steps sends and receives, the buffer the sending and the
//! receiving thread share, the progress counters that order their access
//! to it, and the two streams themselves.

use super::element::Element;
use super::sealing::{lock, receive_message, send_message, LinkCipher, Message};
use super::TcpRing;
use crate::CollectiveError;
use std::net::TcpStream;
use std::ops::Range;
use std::sync::atomic::Ordering;

/// The range of chunk `i` of `n` over `len` elements (balanced).
fn chunk(len: usize, n: usize, i: usize) -> Range<usize> {
    (i * len / n)..((i + 1) * len / n)
}

/// Which chunk each of the `2 (N-1)` steps sends and receives, and how a
/// chunk splits into segments (every rank splits a chunk the same way, so a
/// segment sent is the segment received).
struct Schedule {
    world: usize,
    rank: usize,
    len: usize,
    segment: usize,
    /// Flat index of the first segment of each step (steps send and receive
    /// chunks of the same segment counts: step s+1 sends what step s received).
    recv_offsets: Vec<usize>,
    send_offsets: Vec<usize>,
}

impl Schedule {
    fn new(world: usize, rank: usize, len: usize, segment: usize) -> Schedule {
        let mut schedule = Schedule {
            world,
            rank,
            len,
            segment,
            recv_offsets: Vec::new(),
            send_offsets: Vec::new(),
        };
        let (mut recv, mut send) = (0, 0);
        for step in 0..schedule.steps() {
            schedule.recv_offsets.push(recv);
            schedule.send_offsets.push(send);
            recv += schedule.segments(schedule.recv_chunk(step)).len();
            send += schedule.segments(schedule.send_chunk(step)).len();
        }
        schedule
    }

    fn steps(&self) -> usize {
        2 * (self.world - 1)
    }

    /// Reduce-scatter step s sends chunk r - s; all-gather step s sends
    /// chunk r + 1 - s, the one it finished (or received) just before.
    fn send_chunk(&self, step: usize) -> usize {
        let (n, r) = (self.world, self.rank);
        if step < n - 1 {
            (r + n - step) % n
        } else {
            (r + 1 + n - (step - (n - 1))) % n
        }
    }

    /// Every step receives the chunk that the next step sends.
    fn recv_chunk(&self, step: usize) -> usize {
        self.send_chunk(step + 1)
    }

    fn segments(&self, chunk_index: usize) -> impl ExactSizeIterator<Item = Range<usize>> {
        let range = chunk(self.len, self.world, chunk_index);
        let segment = self.segment;
        let count = range.len().div_ceil(segment);
        (0..count).map(move |k| {
            let start = range.start + k * segment;
            start..(start + segment).min(range.end)
        })
    }

    fn recv_index(&self, step: usize, k: usize) -> usize {
        self.recv_offsets[step] + k
    }

    fn send_index(&self, step: usize, k: usize) -> usize {
        self.send_offsets[step] + k
    }
}

/// The all-reduce buffer, shared by the sending and the receiving thread.
/// They touch the same range only in the order [`Progress`] enforces.
struct SharedSlice<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: the pointer comes from a `&mut [T]` (of `Send + Sync` elements)
// that outlives both threads (they are scoped); access is coordinated
// through `Progress`.
unsafe impl<T: Element> Sync for SharedSlice<T> {}

impl<T: Element> SharedSlice<T> {
    /// # Safety
    /// No other thread may write `range` while the slice lives.
    unsafe fn slice(&self, range: Range<usize>) -> &[T] {
        assert!(range.end <= self.len);
        // SAFETY: in bounds (checked); exclusivity is the caller's contract.
        unsafe { std::slice::from_raw_parts(self.ptr.add(range.start), range.len()) }
    }

    /// # Safety
    /// No other thread may read or write `range` while the slice lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice_mut(&self, range: Range<usize>) -> &mut [T] {
        assert!(range.end <= self.len);
        // SAFETY: in bounds (checked); exclusivity is the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.len()) }
    }
}

/// Segments sent and received so far in one all-reduce; a failed side wakes
/// the other so that nothing waits forever.
#[derive(Default)]
struct Progress {
    state: std::sync::Mutex<ProgressState>,
    changed: std::sync::Condvar,
}

#[derive(Default)]
struct ProgressState {
    sent: usize,
    received: usize,
    failed: Option<Direction>,
}

/// One half of a rank's part in the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Direction {
    Send,
    Receive,
}

impl Progress {
    fn update(&self, f: impl FnOnce(&mut ProgressState)) {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()));
        self.changed.notify_all();
    }

    fn mark_sent(&self) {
        self.update(|s| s.sent += 1);
    }

    fn mark_received(&self) {
        self.update(|s| s.received += 1);
    }

    fn fail(&self, direction: Direction) {
        self.update(|s| {
            s.failed.get_or_insert(direction);
        });
    }

    fn first_failure(&self) -> Option<Direction> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).failed
    }

    fn wait(&self, done: impl Fn(&ProgressState) -> bool) -> std::io::Result<()> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while !done(&state) {
            if state.failed.is_some() {
                return Err(std::io::Error::other("the other direction of the ring failed"));
            }
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        Ok(())
    }

    fn wait_received(&self, count: usize) -> std::io::Result<()> {
        self.wait(|s| s.received >= count)
    }

    fn wait_sent(&self, count: usize) -> std::io::Result<()> {
        self.wait(|s| s.sent >= count)
    }
}

/// Marks its direction failed when dropped by a panic in it (a bug), so
/// that the other direction, which may be waiting on its progress, ends
/// with an error instead of waiting for ever, and the panic surfaces.
struct FailedIfPanicking<'a> {
    progress: &'a Progress,
    direction: Direction,
}

impl Drop for FailedIfPanicking<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.progress.fail(self.direction);
        }
    }
}

impl TcpRing {
    /// The ring all-reduce as one continuous stream per link (see the module
    /// documentation): a sending thread forwards each segment as soon as the
    /// receiving side has finished it, so no step waits for the previous one
    /// to drain.
    pub(super) fn pipelined_all_reduce<T: Element>(
        &self,
        data: &mut [T],
    ) -> Result<(), CollectiveError> {
        let links = self.links.as_ref().expect("a ring of two or more has links");
        let (n, r, len) = (self.world, self.rank, data.len());
        let schedule = Schedule::new(n, r, len, self.config.segment_floats.max(1));
        let shared = SharedSlice { ptr: data.as_mut_ptr(), len };
        let progress = Progress::default();
        let right = (r + 1) % n;
        let left = (r + n - 1) % n;
        let mut scratch = vec![T::zeroed(); self.config.segment_floats.max(1).min(len.max(1))];
        std::thread::scope(|scope| {
            let sender = std::thread::Builder::new()
                .name("ring-send".into())
                .spawn_scoped(scope, || {
                    let _panicking =
                        FailedIfPanicking { progress: &progress, direction: Direction::Send };
                    let mut seal = lock(&links.seal);
                    let outcome =
                        self.send_stream(&links.to_right, &mut seal, &schedule, &shared, &progress);
                    if outcome.is_err() {
                        progress.fail(Direction::Send);
                        let _ = links.from_left.shutdown(std::net::Shutdown::Both);
                    }
                    outcome
                })
                .map_err(|source| links.fail(r, "sending", source))?;
            let panicking =
                FailedIfPanicking { progress: &progress, direction: Direction::Receive };
            let received = self.receive_stream(
                &links.from_left,
                &mut lock(&links.open),
                &schedule,
                &shared,
                &progress,
                &mut scratch,
            );
            drop(panicking);
            if received.is_err() {
                progress.fail(Direction::Receive);
                let _ = links.to_right.shutdown(std::net::Shutdown::Both);
            }
            let sent = sender
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("sender thread panicked")));
            // Report the direction that failed first; the other one only
            // stopped because of it.
            match (received, sent, progress.first_failure()) {
                (Err(e), Ok(()), _) | (Err(e), Err(_), Some(Direction::Receive)) => {
                    Err(self.link_err(left, e))
                }
                (_, Err(e), _) => Err(self.link_err(right, e)),
                (Ok(()), Ok(()), _) => Ok(()),
            }
        })
    }

    /// Sends every step's chunk, segment by segment, each once it is final,
    /// each a message sealed by `seal`.
    fn send_stream<T: Element>(
        &self,
        out: &TcpStream,
        seal: &mut LinkCipher,
        schedule: &Schedule,
        shared: &SharedSlice<T>,
        progress: &Progress,
    ) -> std::io::Result<()> {
        for step in 0..schedule.steps() {
            for (k, range) in schedule.segments(schedule.send_chunk(step)).enumerate() {
                if step > 0 {
                    // The segment is what the receiver got (and summed) one step ago.
                    progress.wait_received(schedule.recv_index(step - 1, k) + 1)?;
                }
                // SAFETY: `range` is in bounds, and nothing writes it now: the
                // receiver finished it (waited for above, or it is this rank's
                // own chunk at step 0), and it writes it again only after
                // `wait_sent` says this send is complete.
                let segment = unsafe { shared.slice(range) };
                let bytes: &[u8] = bytemuck::cast_slice(segment);
                send_message(out, seal, Message::Data, bytes)?;
                self.bytes_sent.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                progress.mark_sent();
            }
        }
        Ok(())
    }

    /// Receives every step's chunk, summing during the reduce-scatter and
    /// copying during the all-gather, each segment a message checked by
    /// `open` before it is summed or marked received (and so forwarded).
    fn receive_stream<T: Element>(
        &self,
        input: &TcpStream,
        open: &mut LinkCipher,
        schedule: &Schedule,
        shared: &SharedSlice<T>,
        progress: &Progress,
        scratch: &mut [T],
    ) -> std::io::Result<()> {
        let reduce_steps = schedule.world - 1;
        for step in 0..schedule.steps() {
            for (k, range) in schedule.segments(schedule.recv_chunk(step)).enumerate() {
                let add = step < reduce_steps;
                if !add {
                    // The all-gather overwrites a chunk this rank sent during the
                    // reduce-scatter (same chunk, same segment): wait until it left.
                    progress.wait_sent(schedule.send_index(step - reduce_steps, k) + 1)?;
                }
                // SAFETY: `range` is in bounds and the sender does not read it
                // now: it reads a received segment only after `mark_received`
                // below, and the wait above covers its earlier send of it.
                let target = unsafe { shared.slice_mut(range) };
                if add {
                    let incoming = &mut scratch[..target.len()];
                    receive_message(
                        input,
                        open,
                        Message::Data,
                        bytemuck::cast_slice_mut(incoming),
                    )?;
                    for (t, s) in target.iter_mut().zip(incoming.iter()) {
                        *t = t.add(*s);
                    }
                } else {
                    // Read into place, and checked there before anything
                    // reads it (the sender waits for `mark_received`).
                    receive_message(input, open, Message::Data, bytemuck::cast_slice_mut(target))?;
                }
                progress.mark_received();
            }
        }
        Ok(())
    }
}
