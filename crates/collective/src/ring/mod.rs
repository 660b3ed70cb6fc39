//! Ring all-reduce over TCP for CPU ranks.
//!
//! The ranks form a ring: each holds one connection to its right neighbour
//! (sending) and one from its left (receiving). An all-reduce of `S` bytes
//! splits the buffer into `N` chunks and runs `N-1` reduce-scatter steps (send
//! one chunk right, receive another from the left and add it in) and `N-1`
//! all-gather steps (pass the reduced chunks around), so every rank sends
//! `2 (N-1)/N * S` bytes: the bandwidth-optimal amount. The steps are not run
//! one after the other: a sending thread streams the chunks segment by
//! segment, forwarding each segment as soon as the receiving side has summed
//! (or copied) it, while the receiving side reads the left link without pause.
//! So both directions of every link stay busy for the whole collective and
//! the summing overlaps the transfer; progress counters order every access
//! to a segment shared by the two threads.
//!
//! Every link is authenticated before it carries anything: the connecting
//! rank sends a hello with a fresh nonce, the accepting rank answers with its
//! own nonce and an HMAC-SHA256 (keyed by the job's [`RingKey`]) over both,
//! and the connecting rank answers with its own HMAC; each side checks the
//! other's in constant time. A connection that fails the challenge (an
//! impostor, or a rank of another job) is refused and logged, and the ring
//! keeps waiting for its real neighbour; a listener that fails it is an
//! error. The key never crosses the wire. Strangers cannot queue the
//! neighbour behind them, nor keep it out by stalling: the listener takes
//! every connection at once and challenges each on a thread of its own, up
//! to `MAX_NEIGHBOUR_HANDSHAKES` (64) at a time from the left neighbour's
//! address and `MAX_HANDSHAKES` (16) from others. A connection that finds
//! every slot of its kind taken evicts (shuts down) the oldest connection
//! of that kind that has not proved itself yet, and is challenged in its
//! place; one that has proved itself is never evicted. So stalled
//! connections (silent, or a hello that claims to be the neighbour and no
//! answer to the challenge) hold their slots only until newer ones come,
//! and as the neighbour proves itself within a round trip and two HMACs,
//! keeping it out takes a pool's worth of new connections (64 from its
//! address) within every such window, again and again: a flood, where one
//! connection per slot per handshake timeout (6.4 a second) did when the
//! newest connection was the one closed. Each kind's handshake threads,
//! evicted ones still ending included, number at most twice its limit, and
//! those still challenging when the left link is chosen are closed then. A
//! handshake that breaks off (evicted by such a flood) or times out (a
//! neighbour connecting from an address other than the one it advertised
//! is handled as a stranger) is tried again until the ring's deadline, the
//! collective timeout: a right neighbour that froze before the ring formed
//! is reported then, not at the first handshake's 10 s.
//!
//! After the handshake every byte a link carries is encrypted and
//! authenticated, with AES-256-GCM. Both ends derive the link's key from
//! the ring key and the handshake's two fresh values, HMAC-SHA256(ring key,
//! "rsb ring link v2" || "connector to acceptor" || hello || the accepting
//! side's nonce): a key of its own for every connection, which never crosses
//! the wire. Every message the link carries (a collective's header, each
//! segment of an all-reduce, each block of a link probe; broadcasts and
//! barriers are all-reduces) is sealed under that key with a 96-bit nonce
//! made of its sequence number, which counts the link's messages from 0 at
//! both ends and is never sent; every 65,536 messages both ends move on to
//! a fresh key, derived from the link's (so no nonce is used twice under
//! one key, and no key seals more than AES-GCM's bound allows),
//! and travels as its ciphertext (as long as the message) followed by
//! GCM's 16-byte tag. The receiving side checks the tag (in constant time)
//! and decrypts in place before it adds the bytes into the sum, forwards
//! them or returns them (an all-gather segment is read into its place in
//! the buffer and opened there before anything reads it), so a bit
//! altered, or bytes injected, dropped, repeated, reordered or replayed on
//! the wire (from another link, or from an earlier collective) fail the
//! collective with [`CollectiveError::Tampered`], which names the peer,
//! never with wrong sums; and nobody on the path reads the gradients. The
//! ring is then closed: its links are shut down, and every later collective
//! on it fails at once. Messages are sealed and opened on the threads that
//! send and receive, so the two directions' ciphers run in parallel (AES
//! and carry-less multiplication in hardware, through the `ring` crate:
//! several GB/s a thread where HMAC-SHA256, the links' check before, made
//! under 2). A connection carries data one way only (from its connecting
//! side to its accepting side); nothing reads the other way after the
//! handshake.
//!
//! What this does not protect: the lengths and timing of the messages are
//! visible on the path, and such an attacker can always cut or stall a link
//! (a [`CollectiveError::Link`] or [`CollectiveError::Timeout`], as a
//! failed peer would be). The hello names the wire version ("RSB5":
//! encrypted messages, under a key of the job's generation stretched from
//! its token); a peer of an earlier one ("RSB4", one key of one HMAC for
//! every generation; "RSB3", links tagged but readable; "RSB2", neither)
//! is refused at the handshake, never mis-framed. As after any failed collective, a buffer whose collective
//! failed holds partial results and is not to be used.
//!
//! Every collective starts with a small header passed around the ring (an
//! operation counter and the buffer length), so ranks that disagree fail with
//! an error instead of corrupting each other's data. Reads and writes time
//! out, so a dead peer is an error, never a hang. Floats travel in the hosts'
//! native byte order; every rank of a job is assumed to share it.
//!
//! Two element types travel: f32 ([`Buffer::Host`]) and bf16
//! ([`Buffer::HostBf16`], 2 bytes per element on the wire, for compressed
//! gradients). A bf16 reduction adds in f32 and rounds each partial sum back
//! to bf16 (round to nearest even, as libtorch and NCCL's bf16 sums do).

mod accept;
mod all_reduce;
mod collectives;
mod element;
mod handshake;
mod listener;
mod probe;
mod sealing;
#[cfg(test)]
mod tests;

pub use handshake::RingKey;
pub use listener::RingListener;
#[cfg(any(test, feature = "bench"))]
pub use sealing::cipher_rates_for_benchmark_only;

#[cfg(doc)]
use crate::Buffer;
use crate::CollectiveError;
use sealing::LinkCipher;
use std::net::TcpStream;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::Duration;

/// Tuning of the ring.
#[derive(Debug, Clone)]
pub struct RingConfig {
    /// Longest wait for a peer's data (or for a connection) before failing.
    pub timeout: Duration,
    /// Floats received per segment (the unit of overlap between receive and sum).
    pub segment_floats: usize,
}

impl Default for RingConfig {
    fn default() -> Self {
        RingConfig { timeout: Duration::from_secs(600), segment_floats: 64 * 1024 }
    }
}

/// A rank's two links, each with the cipher of its data at this end (one sending thread and one receiving thread lock them, one each).
#[derive(Debug)]
struct Links {
    to_right: TcpStream,
    from_left: TcpStream,
    right_address: String,
    left_address: String,
    /// Seals the messages sent on `to_right`.
    seal: Mutex<LinkCipher>,
    /// Opens the messages received on `from_left`.
    open: Mutex<LinkCipher>,
}

impl Links {
    /// This rank cannot start its `what` thread: both links are shut down,
    /// so that the neighbours fail at once instead of at their timeout.
    fn fail(&self, rank: usize, what: &'static str, source: std::io::Error) -> CollectiveError {
        let _ = self.to_right.shutdown(std::net::Shutdown::Both);
        let _ = self.from_left.shutdown(std::net::Shutdown::Both);
        CollectiveError::Thread { rank, what, source }
    }
}

/// A formed ring of CPU ranks.
#[derive(Debug)]
pub struct TcpRing {
    rank: usize,
    world: usize,
    links: Option<Links>,
    config: RingConfig,
    /// Collectives run so far (checked against the neighbours').
    op: u64,
    /// Payload bytes this rank sent to its right neighbour in reductions.
    bytes_sent: AtomicU64,
    /// Why the ring can no longer be used: a collective failed on a link
    /// (which leaves the links' streams out of step), or a message failed its
    /// integrity check. Every later collective fails with it.
    closed: Option<String>,
}
