//! Accepting the left neighbour's link: every incoming connection is
//! challenged on a thread of its own, in a pool per kind of address (the
//! neighbour's, or any other) whose oldest connection not yet proved is
//! evicted for a newer one, so strangers can neither queue the neighbour
//! behind them nor keep it out by stalling.

use super::handshake::{challenge_left, Handshake, RingKey, HANDSHAKE_TIMEOUT};
use super::sealing::LinkCipher;
use crate::CollectiveError;
use std::collections::VecDeque;
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Incoming connections from addresses other than the left neighbour's
/// challenged at once while a rank waits for its left neighbour; one more
/// takes the place of the oldest of them (see [`accept_left`]).
pub(super) const MAX_HANDSHAKES: usize = 16;
/// Incoming connections from the left neighbour's address challenged at
/// once (a stranger on the neighbour's own host could open many); one more
/// takes the place of the oldest of them (see [`accept_left`]).
pub(super) const MAX_NEIGHBOUR_HANDSHAKES: usize = 64;

/// Where a challenged connection stands. Its thread and the accept loop
/// race to settle it, the thread once the connecting side's proof holds,
/// the loop to evict it; only the first wins, so a connection that proved
/// itself is never evicted and an evicted one never accepted.
#[derive(Debug, Default)]
pub(super) struct Claim(AtomicU8);

const CHALLENGING: u8 = 0;
const SETTLED: u8 = 1;
const EVICTED: u8 = 2;

impl Claim {
    /// Neither settled nor evicted yet.
    pub(super) fn challenging(&self) -> bool {
        self.0.load(Ordering::SeqCst) == CHALLENGING
    }

    /// The thread's: whether it settled the connection first.
    pub(super) fn settle(&self) -> bool {
        self.0.compare_exchange(CHALLENGING, SETTLED, Ordering::SeqCst, Ordering::SeqCst).is_ok()
    }

    /// The accept loop's: whether it evicted the connection first.
    fn evict(&self) -> bool {
        self.0.compare_exchange(CHALLENGING, EVICTED, Ordering::SeqCst, Ordering::SeqCst).is_ok()
    }

    pub(super) fn evicted(&self) -> bool {
        self.0.load(Ordering::SeqCst) == EVICTED
    }
}

/// One of the handshake threads' places, with its connection's [`Claim`]:
/// given back when the thread ends, by a panic too (the guard's drop), so
/// none is lost, and its connection settled then (no longer counted as
/// being challenged) unless it was evicted.
pub(super) struct HandshakeSlot {
    threads: Arc<AtomicUsize>,
    pub(super) claim: Arc<Claim>,
}

impl HandshakeSlot {
    pub(super) fn take(in_flight: &Arc<AtomicUsize>) -> HandshakeSlot {
        in_flight.fetch_add(1, Ordering::SeqCst);
        HandshakeSlot { threads: in_flight.clone(), claim: Arc::default() }
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.claim.settle();
        self.threads.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A connection being challenged, as its pool keeps it: a second handle
/// of its socket, to shut it down should it be evicted.
pub(super) struct Challenging {
    pub(super) peer_addr: SocketAddr,
    pub(super) handle: TcpStream,
    pub(super) claim: Arc<Claim>,
}

/// The handshakes of one kind of peer address (the left neighbour's, or
/// any other), their connections oldest first.
pub(super) struct Pool {
    limit: usize,
    /// Its handshake threads now running, evicted ones still ending
    /// included.
    pub(super) threads: Arc<AtomicUsize>,
    /// Its connections being challenged, in the order they were accepted.
    pub(super) challenging: VecDeque<Challenging>,
}

impl Drop for Pool {
    /// The left link chosen or given up: the connections still being
    /// challenged are closed, so their threads end now, not at their
    /// handshake timeout holding their sockets.
    fn drop(&mut self) {
        for leftover in self.challenging.drain(..) {
            if leftover.claim.evict() {
                let _ = leftover.handle.shutdown(Shutdown::Both);
            }
        }
    }
}

/// Whether a pool has room for one more connection.
pub(super) enum Room {
    /// Fewer than its limit are being challenged.
    Free,
    /// The oldest being challenged was evicted (its socket shut down, so
    /// its thread ends at once); this is its address.
    Evicted(SocketAddr),
    /// Its threads, evicted ones that have not ended yet included, number
    /// twice its limit: the new connection is to be closed at once.
    Full,
}

impl Pool {
    pub(super) fn new(limit: usize) -> Pool {
        Pool { limit, threads: Arc::default(), challenging: VecDeque::new() }
    }

    /// Forgets the connections no longer being challenged, closing this
    /// side's second handle of each (a refused connection then closes
    /// once its thread has dropped it).
    fn prune(&mut self) {
        self.challenging.retain(|c| c.claim.challenging());
    }

    /// Makes room for a new connection, evicting the oldest being
    /// challenged if `limit` are.
    pub(super) fn make_room(&mut self) -> Room {
        self.prune();
        if self.threads.load(Ordering::SeqCst) >= 2 * self.limit {
            return Room::Full;
        }
        while self.challenging.len() >= self.limit {
            let Some(oldest) = self.challenging.pop_front() else { break };
            // Settled since the pruning: its place is free already.
            if oldest.claim.evict() {
                let _ = oldest.handle.shutdown(Shutdown::Both);
                return Room::Evicted(oldest.peer_addr);
            }
        }
        Room::Free
    }
}

/// Accepts the left neighbour's link by `deadline`. Every incoming
/// connection is taken from the listener at once and challenged on a thread
/// of its own, each bounded by [`HANDSHAKE_TIMEOUT`], so a stranger that
/// connects and stalls cannot hold the neighbour's handshake up; strangers
/// are refused and logged. Connections from the left neighbour's addresses
/// (`left_ips`) are challenged up to [`MAX_NEIGHBOUR_HANDSHAKES`] at once,
/// others up to [`MAX_HANDSHAKES`], each kind in a pool of its own, never
/// left in the backlog ahead of the neighbour's.
///
/// A connection that finds its pool's slots all taken evicts the oldest
/// connection of that pool that has not proved itself yet: its socket is
/// shut down, so its thread's blocked read returns at once and the thread
/// ends, and the new connection is challenged in its place (evictions are
/// counted in a warning that names the evicted address and the new one).
/// Stalled connections (silent, or a hello claiming rank `left` and no
/// answer to the challenge) hold their slots only until newer ones come.
/// The neighbour proves itself within a round trip and two HMACs, so a
/// stranger must open a pool's worth of new connections within that
/// window, and keep doing it, to keep the neighbour out: a flood of
/// thousands a second, not the trickle of one per slot per handshake
/// timeout (6.4 a second) that held every slot when the new connection was
/// the one closed. A connection whose proof holds is never evicted (see
/// [`Claim`]), and it is the one returned, with the cipher of the data
/// it will carry. A pool's threads, evicted ones
/// not yet ended included, number at most twice its limit (an evicted
/// thread ends within moments of its eviction, so the excess is a handful
/// at most); a connection past that bound is closed at once (counted in a
/// warning) and, were it the neighbour's, tried again.
///
/// A neighbour that connects from another address (a host with several
/// interfaces) is handled as a stranger, with the strangers' pool; a
/// handshake of its that breaks off (evicted by a flood) or times out is
/// tried again by its connecting side until the ring's deadline.
pub(super) fn accept_left(
    listener: &TcpListener,
    rank: usize,
    (left, left_address, left_ips): (usize, &str, &[IpAddr]),
    world: usize,
    key: &RingKey,
    deadline: Instant,
    give_up: &AtomicBool,
) -> Result<(TcpStream, LinkCipher), CollectiveError> {
    listener.set_nonblocking(true).map_err(|e| CollectiveError::Link {
        rank,
        peer: left,
        address: "listener".into(),
        source: e,
    })?;
    type Challenged = (std::net::SocketAddr, TcpStream, Result<(u32, u32, LinkCipher), Handshake>);
    let (challenged, outcomes) = std::sync::mpsc::channel::<Challenged>();
    // The handshakes of connections from the left neighbour's addresses,
    // and of others.
    let (mut neighbours, mut strangers) =
        (Pool::new(MAX_NEIGHBOUR_HANDSHAKES), Pool::new(MAX_HANDSHAKES));
    // Connections closed at once (their pool's threads at their bound),
    // and connections evicted for newer ones.
    let (mut closed_at_once, mut evicted) = (0u64, 0u64);
    // The last connection refused, and why: said if the deadline passes.
    let mut last_refused: Option<String> = None;
    loop {
        while let Ok((peer_addr, stream, outcome)) = outcomes.try_recv() {
            let (their_rank, their_world, open) = match outcome {
                Ok(hello) => hello,
                Err(Handshake::Refused(why)) => {
                    tracing::warn!(rank, %peer_addr, "refused a ring connection: {why}");
                    last_refused = Some(format!("{peer_addr}: {why}"));
                    continue;
                }
                Err(Handshake::Io(e)) => {
                    tracing::warn!(
                        rank,
                        %peer_addr,
                        "refused a ring connection that broke off the handshake: {e}"
                    );
                    continue;
                }
            };
            if their_rank as usize != left || their_world as usize != world {
                return Err(CollectiveError::Protocol {
                    rank,
                    problem: format!(
                        "expected rank {left} of {world} on the left link, got rank \
                         {their_rank} of {their_world}"
                    ),
                });
            }
            return Ok((stream, open));
        }
        // Checked every turn, after the finished handshakes (one that finished
        // just in time counts): a steady stream of strangers' connections
        // must not keep this loop past its deadline.
        if give_up.load(Ordering::Relaxed) {
            return Err(CollectiveError::Protocol {
                rank,
                problem: "stopped waiting for the left neighbour: the right link failed".into(),
            });
        }
        if Instant::now() >= deadline {
            // A refusal is no reason to stop waiting (a hello proves
            // nothing: any stranger could send one), but the last one may
            // say why the neighbour never got in (another version).
            let why = match &last_refused {
                Some(refused) => format!(
                    "left neighbour never connected; the last connection refused was {refused}"
                ),
                None => "left neighbour never connected".to_string(),
            };
            return Err(CollectiveError::Link {
                rank,
                peer: left,
                address: left_address.to_string(),
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, why),
            });
        }
        // The finished handshakes' connections, refused ones among them,
        // are closed once their threads have dropped them too.
        neighbours.prune();
        strangers.prune();
        match listener.accept() {
            Ok((stream, peer_addr)) => {
                // A dual-stack listener sees an IPv4 peer as `::ffff:a.b.c.d`.
                let pool = if left_ips.contains(&peer_addr.ip().to_canonical()) {
                    &mut neighbours
                } else {
                    &mut strangers
                };
                let limit = pool.limit;
                // The handle that evicts it, taken before anything is
                // evicted for it.
                let handle = match stream.try_clone() {
                    Ok(handle) => handle,
                    Err(e) => {
                        tracing::warn!(
                            rank,
                            %peer_addr,
                            "closed a ring connection at once: no second handle of it: {e}"
                        );
                        continue;
                    }
                };
                match pool.make_room() {
                    Room::Free => {}
                    Room::Evicted(oldest) => {
                        evicted += 1;
                        if evicted.is_power_of_two() {
                            tracing::warn!(
                                rank,
                                %peer_addr,
                                evicted = %oldest,
                                "closed {evicted} ring connection(s) that had not proved \
                                 themselves while waiting for the left neighbour, each the \
                                 oldest of the {limit} from such addresses being challenged, \
                                 to challenge a newer one"
                            );
                        }
                    }
                    Room::Full => {
                        closed_at_once += 1;
                        if closed_at_once.is_power_of_two() {
                            tracing::warn!(
                                rank,
                                %peer_addr,
                                "closed {closed_at_once} ring connection(s) at once while \
                                 waiting for the left neighbour: the handshake threads of such \
                                 addresses, evicted ones still ending included, number twice \
                                 the {limit} challenged at once"
                            );
                        }
                        continue;
                    }
                }
                stream.set_nonblocking(false).ok();
                let slot = HandshakeSlot::take(&pool.threads);
                let claim = Arc::clone(&slot.claim);
                let key = key.clone();
                let challenged = challenged.clone();
                let until = (Instant::now() + HANDSHAKE_TIMEOUT).min(deadline);
                let spawned =
                    std::thread::Builder::new().name("ring-handshake".into()).spawn(move || {
                        let slot = slot;
                        let outcome = challenge_left(&stream, &key, until, || slot.claim.settle());
                        // Evicted: counted in the eviction's warning, and
                        // not the neighbour's (a proof that held settled it).
                        if slot.claim.evicted() {
                            return;
                        }
                        // Before the outcome is taken: no longer challenged.
                        slot.claim.settle();
                        // The receiver is gone once the left link is chosen.
                        let _ = challenged.send((peer_addr, stream, outcome));
                    });
                match spawned {
                    Ok(_) => pool.challenging.push_back(Challenging { peer_addr, handle, claim }),
                    // The closure, its slot and the connection are dropped
                    // with the error (and the second handle here); were it
                    // the neighbour's, its handshake fails with a link error
                    // that names this rank.
                    Err(e) => tracing::warn!(
                        rank,
                        %peer_addr,
                        "dropped a ring connection: no thread to challenge it: {e}"
                    ),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            // A connection that went away before it was accepted, or a
            // signal: not the neighbour's failure.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                tracing::debug!(rank, "an incoming ring connection went away: {e}");
            }
            Err(e) => {
                return Err(CollectiveError::Link {
                    rank,
                    peer: left,
                    address: left_address.to_string(),
                    source: e,
                })
            }
        }
    }
}
