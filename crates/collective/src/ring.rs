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
//! failed peer would be). The hello names the wire version ("RSB4":
//! encrypted messages); a peer of an earlier one ("RSB3", links tagged but
//! readable; "RSB2", neither) is refused at the handshake, never
//! mis-framed. As after any failed collective, a buffer whose collective
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

use crate::{Buffer, Collective, CollectiveError, LinkRate};
use ::ring::aead::{
    Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_256_GCM, NONCE_LEN as AEAD_NONCE_LEN,
};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::collections::VecDeque;
use std::io::{IoSlice, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// "RSB4": the authenticated hello, and links whose every message is
/// encrypted and authenticated (see the module documentation).
const MAGIC: u32 = 0x5253_4234;
/// The hellos of earlier versions, refused with a word that says which:
/// "RSB3" (links whose messages were tagged, not encrypted) and "RSB2"
/// (links that carried untagged data).
const OLDER_MAGICS: [(u32, &str); 2] = [
    (0x5253_4233, "RSB3, whose links carry tagged but unencrypted data"),
    (0x5253_4232, "RSB2, whose links carry untagged data"),
];
/// Bytes of a nonce and of an HMAC-SHA256 tag.
const NONCE_LEN: usize = 32;
const TAG_LEN: usize = 32;
/// Bytes of the tag that follows every message on a link: AES-256-GCM's.
const LINK_TAG_LEN: usize = 16;
/// The label of a link key's derivation (see [`RingKey::link_cipher`]).
const LINK_KEY_LABEL: &[u8] = b"rsb ring link v2";
/// The label of the derivation of a link's key for each run of
/// [`MESSAGES_PER_KEY`] messages from the link key.
const MESSAGE_KEY_LABEL: &[u8] = b"rsb ring link messages";
/// Messages sealed under one key: a link moves on to a fresh key (derived
/// from its link key and the run's number, by both ends) after this many,
/// so that no key seals more than 2^16 segments (16 GiB at the default
/// 64 Ki floats), well within AES-GCM's bound for one key (about 2^38.5
/// bytes for the margin TLS 1.3 keeps), where a long run sends tens of
/// terabytes on a link.
const MESSAGES_PER_KEY: u64 = 1 << 16;
/// The direction of a link key: the data a connection carries flows from
/// its connecting side (the left rank) to its accepting side.
const CONNECTOR_TO_ACCEPTOR: &[u8] = b"connector to acceptor";
/// Magic, rank, world, nonce.
const HELLO_LEN: usize = 12 + NONCE_LEN;
/// The accepting side's answer to a proof it accepted.
const ACCEPTED: u8 = 1;
/// The accepting side's answer to a proof it refused.
const REFUSED: u8 = 0;
/// Longest a handshake may take, however its bytes trickle in; a silent
/// stranger's connection is dropped after it (and never holds up the real
/// neighbour's handshake, which runs beside it).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Incoming connections from addresses other than the left neighbour's
/// challenged at once while a rank waits for its left neighbour; one more
/// takes the place of the oldest of them (see [`accept_left`]).
const MAX_HANDSHAKES: usize = 16;
/// Incoming connections from the left neighbour's address challenged at
/// once (a stranger on the neighbour's own host could open many); one more
/// takes the place of the oldest of them (see [`accept_left`]).
const MAX_NEIGHBOUR_HANDSHAKES: usize = 64;

type HmacSha256 = Hmac<Sha256>;

/// The key ring links authenticate with: derived from the job's shared
/// secret, so only ranks of the same job can link up. Never printed.
#[derive(Clone)]
pub struct RingKey([u8; 32]);

impl std::fmt::Debug for RingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RingKey(<redacted>)")
    }
}

impl RingKey {
    /// The ring key of a job whose shared secret is `secret` (the job token):
    /// HMAC-SHA256(secret, "rsb ring key v1"), so the token itself is never
    /// used as the key of anything but this derivation.
    pub fn derive(secret: &[u8]) -> RingKey {
        let mut key = [0u8; 32];
        key.copy_from_slice(&tag(secret, &[b"rsb ring key v1"]));
        RingKey(key)
    }

    /// The proof of one side of the handshake over the hello and the
    /// accepting side's nonce; `role` keeps one side's proof from serving as
    /// the other's.
    fn proof(&self, role: &[u8], hello: &[u8], nonce: &[u8]) -> [u8; TAG_LEN] {
        tag(&self.0, &[role, hello, nonce])
    }

    /// Whether `candidate` is that proof (constant-time comparison).
    fn verify(&self, role: &[u8], hello: &[u8], nonce: &[u8], candidate: &[u8]) -> bool {
        let mut mac = hmac_of(&self.0);
        for part in [role, hello, nonce] {
            mac.update(part);
        }
        mac.verify_slice(candidate).is_ok()
    }

    /// The cipher of the data a link carries, once its handshake (`hello`,
    /// and the accepting side's `nonce`) succeeded: AES-256-GCM keyed by
    /// HMAC-SHA256(ring key, "rsb ring link v2" || "connector to acceptor"
    /// || hello || nonce), which both sides compute and neither sends. Both
    /// values are fresh for every connection, so is the key.
    fn link_cipher(&self, hello: &[u8], nonce: &[u8]) -> LinkCipher {
        let link_key = tag(&self.0, &[LINK_KEY_LABEL, CONNECTOR_TO_ACCEPTOR, hello, nonce]);
        LinkCipher {
            key: message_key(&link_key, 0),
            link_key,
            next: 0,
            data_sealed: true,
            sealed: Vec::new(),
        }
    }
}

/// The AES-256-GCM key of run `run` of [`MESSAGES_PER_KEY`] messages on a
/// link: HMAC-SHA256(link key, "rsb ring link messages" || run).
fn message_key(link_key: &[u8], run: u64) -> LessSafeKey {
    let key = tag(link_key, &[MESSAGE_KEY_LABEL, &run.to_be_bytes()]);
    // A 32-byte key is AES-256's length: this cannot fail.
    let key =
        UnboundKey::new(&AES_256_GCM, &key).unwrap_or_else(|_| unreachable!("AES-256 key length"));
    LessSafeKey::new(key)
}

/// The cipher of one link's data, at one of its ends: the sending side
/// seals each message, the receiving side opens each, both counting the
/// messages (see the module documentation).
struct LinkCipher {
    /// The link key, which the message keys are derived from (never sent).
    link_key: [u8; TAG_LEN],
    /// AES-256-GCM under the key of the current run of messages
    /// ([`message_key`] of `next / MESSAGES_PER_KEY`).
    key: LessSafeKey,
    /// The sequence number of the next message, its nonce (never sent: both
    /// sides count; keys of their own for every connection and every run of
    /// messages, so no nonce is used twice under a key).
    next: u64,
    /// Whether data messages (segments, probe blocks) are sealed: always in
    /// a product ring; only the benchmark's comparison turns it off (see
    /// `TcpRing::plaintext_links_for_benchmark_only`, with the `bench`
    /// feature). Headers always are.
    data_sealed: bool,
    /// The sending side's ciphertext of the message being sent (the data
    /// it seals is the caller's, and stays plaintext there).
    sealed: Vec<u8>,
}

/// What a message on a link is: its header tells the collective (and
/// whether its data is sealed), so it is always sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Message {
    /// A collective's header.
    Header,
    /// A segment of an all-reduce, or a block of a link probe.
    Data,
}

impl Message {
    /// Whether this message is sealed on a link of `cipher`.
    fn sealed(self, cipher: &LinkCipher) -> bool {
        self == Message::Header || cipher.data_sealed
    }
}

impl std::fmt::Debug for LinkCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkCipher")
            .field("next", &self.next)
            .field("data_sealed", &self.data_sealed)
            .finish_non_exhaustive()
    }
}

/// A message on a link failed its integrity check: carried by the
/// [`std::io::Error`] of the read that received it, and turned into
/// [`CollectiveError::Tampered`] with the peer's name.
#[derive(Debug, thiserror::Error)]
#[error("message {message} on the link failed its integrity check")]
struct IntegrityFailure {
    /// The message's sequence number on the link.
    message: u64,
}

impl LinkCipher {
    /// The nonce of the next message (its sequence number), and the count
    /// moved on; the key moved on first where a run of messages begins.
    fn next_nonce(&mut self) -> Nonce {
        if self.next > 0 && self.next.is_multiple_of(MESSAGES_PER_KEY) {
            self.key = message_key(&self.link_key, self.next / MESSAGES_PER_KEY);
        }
        let mut nonce = [0u8; AEAD_NONCE_LEN];
        nonce[AEAD_NONCE_LEN - 8..].copy_from_slice(&self.next.to_be_bytes());
        self.next += 1;
        Nonce::assume_unique_for_key(nonce)
    }

    /// The next message sent, `bytes`, sealed: its ciphertext (as long as
    /// `bytes`) and its tag.
    fn seal(&mut self, bytes: &[u8]) -> std::io::Result<(&[u8], [u8; LINK_TAG_LEN])> {
        let nonce = self.next_nonce();
        self.sealed.clear();
        self.sealed.extend_from_slice(bytes);
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce, Aad::empty(), &mut self.sealed)
            .map_err(|_| std::io::Error::other("a ring message too long to seal"))?;
        let mut tag_bytes = [0u8; LINK_TAG_LEN];
        tag_bytes.copy_from_slice(tag.as_ref());
        Ok((&self.sealed, tag_bytes))
    }

    /// Opens the next message received, `bytes` (its ciphertext, decrypted
    /// in place, then its tag checked in constant time): an error when the
    /// tag does not hold, and `bytes` is then zeroed, nothing of use.
    fn open(&mut self, bytes: &mut [u8], tag: &[u8; LINK_TAG_LEN]) -> Result<(), IntegrityFailure> {
        let message = self.next;
        let nonce = self.next_nonce();
        let tag = Tag::from(*tag);
        self.key
            .open_in_place_separate_tag(nonce, Aad::empty(), tag, bytes, 0..)
            .map(|_| ())
            .map_err(|_| IntegrityFailure { message })
    }
}

/// For the encryption benchmark only (`examples/ring_encryption_bench.rs`):
/// how fast one thread seals and opens `rounds` messages of `bytes` each
/// with a link's cipher, in bytes per second: sealing as a link's sending
/// thread does (the copy into the ciphertext buffer included), opening in
/// place as its receiving thread does. Across hosts, each direction of a
/// link is bounded by the slower of the two. Built with the `bench`
/// feature only.
#[cfg(any(test, feature = "bench"))]
pub fn cipher_rates_for_benchmark_only(bytes: usize, rounds: usize) -> (f64, f64) {
    let key = RingKey::derive(b"the benchmark's token");
    let link = || key.link_cipher(b"hello", b"nonce");
    let (mut seal, mut open) = (link(), link());
    let message = vec![1u8; bytes];
    let mut received = vec![0u8; bytes];
    let (mut sealing, mut opening) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..rounds {
        let started = Instant::now();
        let (ciphertext, tag) = seal.seal(&message).unwrap_or_else(|e| panic!("sealing: {e}"));
        sealing += started.elapsed();
        received.copy_from_slice(ciphertext);
        let started = Instant::now();
        let opened = open.open(&mut received, &tag);
        opening += started.elapsed();
        assert!(opened.is_ok() && received == message, "a sealed message did not open");
    }
    let total = (bytes * rounds) as f64;
    (total / sealing.as_secs_f64().max(1e-9), total / opening.as_secs_f64().max(1e-9))
}

/// Locks one end's [`LinkCipher`] (a panic elsewhere while it was held
/// leaves its count behind the peer's: the next message fails to open,
/// never a wrong sum).
fn lock(cipher: &Mutex<LinkCipher>) -> MutexGuard<'_, LinkCipher> {
    cipher.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sends one message, `bytes`, sealed: its ciphertext, then its tag (one
/// write call where it fits).
fn send_message(
    mut out: &TcpStream,
    cipher: &mut LinkCipher,
    kind: Message,
    bytes: &[u8],
) -> std::io::Result<()> {
    if !kind.sealed(cipher) {
        return out.write_all(bytes);
    }
    let (sealed, tag) = cipher.seal(bytes)?;
    let (mut first, mut second) = (sealed, &tag[..]);
    while !first.is_empty() || !second.is_empty() {
        let written = match out.write_vectored(&[IoSlice::new(first), IoSlice::new(second)]) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let from_first = written.min(first.len());
        first = &first[from_first..];
        second = &second[(written - from_first).min(second.len())..];
    }
    Ok(())
}

/// Receives one message into `buf` and opens it there: an error (carrying
/// an [`IntegrityFailure`] when its tag did not hold) before the caller may
/// use the bytes.
fn receive_message(
    mut input: &TcpStream,
    cipher: &mut LinkCipher,
    kind: Message,
    buf: &mut [u8],
) -> std::io::Result<()> {
    input.read_exact(buf)?;
    if kind.sealed(cipher) {
        let mut tag = [0u8; LINK_TAG_LEN];
        input.read_exact(&mut tag)?;
        cipher
            .open(buf, &tag)
            .map_err(|failure| std::io::Error::new(std::io::ErrorKind::InvalidData, failure))?;
    }
    Ok(())
}

fn hmac_of(key: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length: this cannot fail.
    <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!("HMAC key length"))
}

fn tag(key: &[u8], parts: &[&[u8]]) -> [u8; TAG_LEN] {
    let mut mac = hmac_of(key);
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

const ACCEPTOR_ROLE: &[u8] = b"rsb ring acceptor";
const CONNECTOR_ROLE: &[u8] = b"rsb ring connector";

fn nonce() -> std::io::Result<[u8; NONCE_LEN]> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n).map_err(|e| std::io::Error::other(format!("random nonce: {e}")))?;
    Ok(n)
}

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

/// A bound ring port whose address is published before the ring is formed.
#[derive(Debug)]
pub struct RingListener {
    listener: TcpListener,
}

impl RingListener {
    /// Binds `address` (port 0 picks a free port).
    pub fn bind(address: SocketAddr) -> std::io::Result<RingListener> {
        Ok(RingListener { listener: TcpListener::bind(address)? })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Forms the ring: connects to the right neighbour (`addresses[rank + 1]`)
    /// and accepts the left one, each link authenticated with `key` (see the
    /// module documentation). `addresses` holds every rank's `host:port`.
    pub fn connect(
        self,
        rank: usize,
        addresses: &[String],
        key: &RingKey,
        config: RingConfig,
    ) -> Result<TcpRing, CollectiveError> {
        let world = addresses.len();
        if rank >= world {
            return Err(CollectiveError::Protocol {
                rank,
                problem: format!("rank {rank} of a world of {world}"),
            });
        }
        if config.segment_floats == 0 {
            return Err(CollectiveError::Protocol {
                rank,
                problem: "segment_floats is 0: a ring sends segments of at least 1 float".into(),
            });
        }
        if world == 1 {
            return Ok(TcpRing {
                rank,
                world,
                links: None,
                config,
                op: 0,
                bytes_sent: AtomicU64::new(0),
                closed: None,
            });
        }
        let right = (rank + 1) % world;
        let left = (rank + world - 1) % world;
        let right_address = addresses[right].clone();
        let deadline = Instant::now() + config.timeout;
        let link_err = |peer: usize, address: &str, source: std::io::Error| CollectiveError::Link {
            rank,
            peer,
            address: address.to_string(),
            source,
        };
        // Set when the right link failed: the left one need not be waited for.
        let right_failed = AtomicBool::new(false);
        // Set when the left link failed (before the right one did, if it
        // did): the right one need not be waited for, and the left one's
        // error is the one to report.
        let left_failed = AtomicBool::new(false);
        let ((to_right, seal), (from_left, open)) = std::thread::scope(|scope| {
            let connecting = std::thread::Builder::new().name("ring-connect".into());
            let connecting = connecting.spawn_scoped(
                scope,
                || -> Result<(TcpStream, LinkCipher), CollectiveError> {
                    let failed = |e: CollectiveError| {
                        right_failed.store(true, Ordering::Relaxed);
                        e
                    };
                    let mut wait = Duration::from_millis(50);
                    loop {
                        let stream = connect_with_retry(&right_address, deadline, &left_failed)
                            .map_err(|e| failed(link_err(right, &right_address, e)))?;
                        match prove_to_right(&stream, rank, world, key, deadline) {
                            Ok(seal) => return Ok((stream, seal)),
                            Err(Handshake::Refused(problem)) => {
                                return Err(failed(CollectiveError::Protocol {
                                    rank,
                                    problem: format!(
                                        "right neighbour (rank {right} at {right_address}): \
                                         {problem}"
                                    ),
                                }))
                            }
                            // Broken off or timed out: the listener may have
                            // evicted this connection for a flood of newer
                            // ones, or closed it with every handshake thread
                            // taken. Again, until the deadline.
                            Err(Handshake::Io(e))
                                if Instant::now() + wait < deadline
                                    && !left_failed.load(Ordering::Relaxed) =>
                            {
                                tracing::debug!(
                                    rank,
                                    "the handshake with the right neighbour (rank {right} at \
                                     {right_address}) broke off: {e}; trying again"
                                );
                                std::thread::sleep(wait);
                                wait = (wait * 2).min(Duration::from_secs(1));
                            }
                            Err(Handshake::Io(e)) => {
                                return Err(failed(link_err(right, &right_address, e)))
                            }
                        }
                    }
                },
            );
            let connecting = connecting.map_err(|source| CollectiveError::Thread {
                rank,
                what: "connecting",
                source,
            })?;
            // Where the left neighbour's connection comes from, as it
            // advertised itself (none when its name does not resolve: every
            // connection is then a stranger's).
            let left_ips: Vec<IpAddr> = addresses[left]
                .to_socket_addrs()
                .map(|addrs| addrs.map(|a| a.ip().to_canonical()).collect())
                .unwrap_or_default();
            let accepted = accept_left(
                &self.listener,
                rank,
                (left, &left_ips),
                world,
                key,
                deadline,
                &right_failed,
            );
            // The right link's failure came first when it made the left
            // side give up; otherwise the left side's error is the cause.
            if accepted.is_err() && !right_failed.load(Ordering::Relaxed) {
                left_failed.store(true, Ordering::Relaxed);
            }
            let connected = connecting.join().unwrap_or_else(|_| {
                Err(CollectiveError::Protocol {
                    rank,
                    problem: "connecting thread panicked".into(),
                })
            });
            match (connected, accepted) {
                (Ok(connected), Ok(accepted)) => Ok((connected, accepted)),
                (_, Err(left)) if left_failed.load(Ordering::Relaxed) => Err(left),
                (Err(right), _) => Err(right),
                (Ok(_), Err(left)) => Err(left),
            }
        })?;
        for (stream, peer) in [(&to_right, right), (&from_left, left)] {
            let _ = stream.set_nodelay(true);
            let address = &addresses[peer];
            stream
                .set_read_timeout(Some(config.timeout))
                .map_err(|e| link_err(peer, address, e))?;
            stream
                .set_write_timeout(Some(config.timeout))
                .map_err(|e| link_err(peer, address, e))?;
        }
        Ok(TcpRing {
            rank,
            world,
            links: Some(Links {
                to_right,
                from_left,
                seal: Mutex::new(seal),
                open: Mutex::new(open),
                right_address,
                left_address: addresses[left].clone(),
            }),
            config,
            op: 0,
            bytes_sent: AtomicU64::new(0),
            closed: None,
        })
    }
}

/// Connects to `address`, trying again until `deadline`, or until `give_up`
/// is set (the other link failed first).
fn connect_with_retry(
    address: &str,
    deadline: Instant,
    give_up: &AtomicBool,
) -> std::io::Result<TcpStream> {
    let mut wait = Duration::from_millis(10);
    loop {
        let attempt = address
            .to_socket_addrs()
            .and_then(|mut addrs| {
                addrs.next().ok_or_else(|| std::io::Error::other("address resolves to nothing"))
            })
            .and_then(|a| TcpStream::connect_timeout(&a, Duration::from_secs(5)));
        match attempt {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline || give_up.load(Ordering::Relaxed) => {
                return Err(e)
            }
            Err(_) => {
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_millis(500));
            }
        }
    }
}

/// How a handshake failed.
#[derive(Debug)]
enum Handshake {
    /// The connection failed.
    Io(std::io::Error),
    /// The other side failed the challenge (or refused ours).
    Refused(String),
}

impl From<std::io::Error> for Handshake {
    fn from(e: std::io::Error) -> Handshake {
        Handshake::Io(e)
    }
}

/// The connecting side: hello with a nonce, check the listener's proof
/// (within [`HANDSHAKE_TIMEOUT`]: the listener may be busy with strangers),
/// send ours, and wait for the verdict (within a handshake timeout of its
/// own: the listener has answered, so it is challenging this connection
/// and decides at once), all by `deadline`. Only a verdict that refuses is
/// [`Handshake::Refused`]; no verdict (the connection broke off, the time
/// ran out) is [`Handshake::Io`], which the caller tries again. Accepted:
/// the cipher of the data this rank sends on the link.
fn prove_to_right(
    stream: &TcpStream,
    rank: usize,
    world: usize,
    key: &RingKey,
    deadline: Instant,
) -> Result<LinkCipher, Handshake> {
    let until = (Instant::now() + HANDSHAKE_TIMEOUT).min(deadline);
    stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let mut hello = Vec::with_capacity(HELLO_LEN);
    for v in [MAGIC, rank as u32, world as u32] {
        hello.extend_from_slice(&v.to_le_bytes());
    }
    hello.extend_from_slice(&nonce()?);
    let mut io = stream;
    io.write_all(&hello)?;
    let mut answer = [0u8; NONCE_LEN + TAG_LEN];
    read_exact_until(stream, &mut answer, until)?;
    let (their_nonce, their_proof) = answer.split_at(NONCE_LEN);
    if !key.verify(ACCEPTOR_ROLE, &hello, their_nonce, their_proof) {
        tracing::warn!(
            peer = ?stream.peer_addr().ok(),
            "refused a ring listener that failed the challenge (not a rank of this job?)"
        );
        return Err(Handshake::Refused(
            "the listener failed the ring challenge: it does not hold this job's key".into(),
        ));
    }
    io.write_all(&key.proof(CONNECTOR_ROLE, &hello, their_nonce))?;
    // Not the hello's time: an answer that came just before it ran out
    // would leave no time for the verdict, and the handshake would fail
    // while the listener takes this connection as its left link.
    let until = (Instant::now() + HANDSHAKE_TIMEOUT).min(deadline);
    let mut verdict = [0u8; 1];
    read_exact_until(stream, &mut verdict, until)?;
    if verdict[0] == ACCEPTED {
        Ok(key.link_cipher(&hello, their_nonce))
    } else {
        Err(Handshake::Refused("it refused this rank's proof (a different job key?)".into()))
    }
}

/// Reads exactly `buf.len()` bytes by `until` (one deadline for them all,
/// however slowly they trickle in).
fn read_exact_until(stream: &TcpStream, buf: &mut [u8], until: Instant) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the handshake did not finish within {HANDSHAKE_TIMEOUT:?}"),
            ));
        }
        stream.set_read_timeout(Some(left))?;
        match (&*stream).read(&mut buf[filled..]) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            // A read timeout: the next turn says so, with the deadline.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::Interrupted
                        | std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The accepting side: read the hello, answer with a nonce and our proof,
/// check the connecting side's proof, all by `until`. Returns the
/// connecting rank and world, and the cipher of the data it sends
/// on the link. `settle` is asked once the proof holds,
/// before the verdict is sent: false (the connection was evicted while it
/// was being challenged) fails the handshake, so a connection is never
/// told it was accepted and then shut down.
fn challenge_left(
    stream: &TcpStream,
    key: &RingKey,
    until: Instant,
    settle: impl FnOnce() -> bool,
) -> Result<(u32, u32, LinkCipher), Handshake> {
    stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let mut io = stream;
    let mut hello = [0u8; HELLO_LEN];
    read_exact_until(stream, &mut hello, until)?;
    let word = |i: usize| u32::from_le_bytes([hello[i], hello[i + 1], hello[i + 2], hello[i + 3]]);
    if let Some((_, older)) = OLDER_MAGICS.iter().find(|(magic, _)| word(0) == *magic) {
        return Err(Handshake::Refused(format!(
            "it is a ring peer of an older version (hello {older}; this rank's is RSB4, \
             encrypted): every rank of a job must run the same version"
        )));
    }
    if word(0) != MAGIC {
        return Err(Handshake::Refused("it is not a ring peer (wrong hello)".into()));
    }
    let our_nonce = nonce()?;
    let mut answer = Vec::with_capacity(NONCE_LEN + TAG_LEN);
    answer.extend_from_slice(&our_nonce);
    answer.extend_from_slice(&key.proof(ACCEPTOR_ROLE, &hello, &our_nonce));
    io.write_all(&answer)?;
    let mut proof = [0u8; TAG_LEN];
    read_exact_until(stream, &mut proof, until)?;
    if !key.verify(CONNECTOR_ROLE, &hello, &our_nonce, &proof) {
        // Said, so that a rank with another key stops instead of trying again.
        let _ = io.write_all(&[REFUSED]);
        return Err(Handshake::Refused("it failed the ring challenge".into()));
    }
    if !settle() {
        return Err(Handshake::Io(std::io::Error::other("evicted during the handshake")));
    }
    io.write_all(&[ACCEPTED])?;
    Ok((word(4), word(8), key.link_cipher(&hello, &our_nonce)))
}

/// Where a challenged connection stands. Its thread and the accept loop
/// race to settle it, the thread once the connecting side's proof holds,
/// the loop to evict it; only the first wins, so a connection that proved
/// itself is never evicted and an evicted one never accepted.
#[derive(Debug, Default)]
struct Claim(AtomicU8);

const CHALLENGING: u8 = 0;
const SETTLED: u8 = 1;
const EVICTED: u8 = 2;

impl Claim {
    /// Neither settled nor evicted yet.
    fn challenging(&self) -> bool {
        self.0.load(Ordering::SeqCst) == CHALLENGING
    }

    /// The thread's: whether it settled the connection first.
    fn settle(&self) -> bool {
        self.0.compare_exchange(CHALLENGING, SETTLED, Ordering::SeqCst, Ordering::SeqCst).is_ok()
    }

    /// The accept loop's: whether it evicted the connection first.
    fn evict(&self) -> bool {
        self.0.compare_exchange(CHALLENGING, EVICTED, Ordering::SeqCst, Ordering::SeqCst).is_ok()
    }

    fn evicted(&self) -> bool {
        self.0.load(Ordering::SeqCst) == EVICTED
    }
}

/// One of the handshake threads' places, with its connection's [`Claim`]:
/// given back when the thread ends, by a panic too (the guard's drop), so
/// none is lost, and its connection settled then (no longer counted as
/// being challenged) unless it was evicted.
struct HandshakeSlot {
    threads: Arc<AtomicUsize>,
    claim: Arc<Claim>,
}

impl HandshakeSlot {
    fn take(in_flight: &Arc<AtomicUsize>) -> HandshakeSlot {
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
struct Challenging {
    peer_addr: SocketAddr,
    handle: TcpStream,
    claim: Arc<Claim>,
}

/// The handshakes of one kind of peer address (the left neighbour's, or
/// any other), their connections oldest first.
struct Pool {
    limit: usize,
    /// Its handshake threads now running, evicted ones still ending
    /// included.
    threads: Arc<AtomicUsize>,
    /// Its connections being challenged, in the order they were accepted.
    challenging: VecDeque<Challenging>,
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
enum Room {
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
    fn new(limit: usize) -> Pool {
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
    fn make_room(&mut self) -> Room {
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
fn accept_left(
    listener: &TcpListener,
    rank: usize,
    (left, left_ips): (usize, &[IpAddr]),
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
                address: "(incoming)".into(),
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
                    address: "(incoming)".into(),
                    source: e,
                })
            }
        }
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

/// An element type the ring sums: f32, or bf16 carried as its 16 bits.
trait Element: bytemuck::Pod + Send + Sync {
    /// `self + other` in this type's arithmetic.
    fn add(self, other: Self) -> Self;
}

impl Element for f32 {
    fn add(self, other: f32) -> f32 {
        self + other
    }
}

/// A bf16 value: the upper 16 bits of an f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(transparent)]
struct Bf16(u16);

// SAFETY: a `repr(transparent)` wrapper of `u16`: any bit pattern is valid,
// no padding.
unsafe impl bytemuck::Zeroable for Bf16 {}
// SAFETY: as above.
unsafe impl bytemuck::Pod for Bf16 {}

impl Bf16 {
    fn to_f32(self) -> f32 {
        f32::from_bits(u32::from(self.0) << 16)
    }

    /// Round to nearest even, NaN to the canonical quiet NaN: libtorch's
    /// `c10::BFloat16` conversion, bit for bit.
    fn from_f32(value: f32) -> Bf16 {
        if value.is_nan() {
            return Bf16(0x7fc0);
        }
        let bits = value.to_bits();
        let bias = ((bits >> 16) & 1) + 0x7fff;
        Bf16((bits.wrapping_add(bias) >> 16) as u16)
    }
}

impl Element for Bf16 {
    fn add(self, other: Bf16) -> Bf16 {
        Bf16::from_f32(self.to_f32() + other.to_f32())
    }
}

/// The header's element code of a link probe, whose elements are bytes.
const PROBE_CODE: u32 = 2;

/// The fewest bytes a link probe sends: enough to time past its first block.
const PROBE_MIN_BYTES: usize = 64 * 1024;

/// The largest block a link probe writes or reads at once.
const PROBE_BLOCK: usize = 1 << 20;

/// What the header says about the elements: 0 for f32, 1 for bf16.
fn element_code<T: Element>() -> u32 {
    if std::mem::size_of::<T>() == 2 {
        1
    } else {
        0
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
enum Direction {
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

impl TcpRing {
    /// Payload bytes this rank has sent to its right neighbour in
    /// reductions so far (headers, tags and handshakes aside): 4 per f32 and
    /// 2 per bf16 element, times `2 (N-1)/N` of the buffer.
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent.load(Ordering::Relaxed)
    }

    /// For the encryption benchmark only (`examples/ring_encryption_bench.rs`),
    /// which compares sealed links with plaintext ones in one run: `true`
    /// sends and expects the links' data (segments, probe blocks) in the
    /// clear, without tags, unchecked, as before the links were protected;
    /// `false` seals it again. Headers stay sealed and say which it is, so
    /// ranks that disagree fail the next collective's header check instead
    /// of mis-framing data (with two ranks, both of them, before any data
    /// moves). Built with the `bench` feature only, which no product
    /// binary enables: a product ring always seals.
    #[cfg(any(test, feature = "bench"))]
    pub fn plaintext_links_for_benchmark_only(&mut self, plaintext: bool) {
        if let Some(links) = &self.links {
            lock(&links.seal).data_sealed = !plaintext;
            lock(&links.open).data_sealed = !plaintext;
        }
    }

    /// One all-reduce of `data`, header first.
    fn reduce<T: Element>(&mut self, data: &mut [T]) -> Result<(), CollectiveError> {
        if self.world == 1 {
            return Ok(());
        }
        self.unless_closed(|ring| {
            ring.check_header(data.len(), element_code::<T>())?;
            ring.pipelined_all_reduce(data)
        })
    }

    /// Runs one collective on the links, unless the ring is closed (an
    /// error that says why), and closes it when the collective fails in a
    /// way that leaves the links unusable: an integrity check failed (the
    /// links are shut down, so the neighbours fail at once too), or a link
    /// failed or timed out mid-stream (its bytes, and both ends' message
    /// counts, are out of step). A disagreement caught by the header leaves
    /// the ring open, as before: with two ranks both fail the check before
    /// any data moves, and the links stay in step; with more, a rank whose
    /// left neighbour agreed sends its data all the same, so the next
    /// collective on the ring fails (a product's rank fails its job at the
    /// first error, and never reuses the ring).
    fn unless_closed<R>(
        &mut self,
        collective: impl FnOnce(&mut TcpRing) -> Result<R, CollectiveError>,
    ) -> Result<R, CollectiveError> {
        if let Some(why) = &self.closed {
            return Err(CollectiveError::Protocol {
                rank: self.rank,
                problem: format!(
                    "the ring was closed when an earlier collective failed, and cannot be used \
                     again: {why}"
                ),
            });
        }
        let outcome = collective(self);
        if let Err(error) = &outcome {
            match error {
                CollectiveError::Tampered { .. } => {
                    if let Some(links) = &self.links {
                        let _ = links.to_right.shutdown(Shutdown::Both);
                        let _ = links.from_left.shutdown(Shutdown::Both);
                    }
                    self.closed = Some(error.to_string());
                }
                CollectiveError::Link { .. }
                | CollectiveError::Timeout { .. }
                | CollectiveError::Thread { .. } => self.closed = Some(error.to_string()),
                _ => {}
            }
        }
        outcome
    }

    /// The error of the link to `peer` (the left or the right neighbour): a
    /// read or write that waited the whole timeout is a [`CollectiveError::Timeout`].
    fn link_err(&self, peer: usize, source: std::io::Error) -> CollectiveError {
        let left = (self.rank + self.world - 1) % self.world;
        let address = self
            .links
            .as_ref()
            .map(|l| if peer == left { &l.left_address } else { &l.right_address })
            .cloned()
            .unwrap_or_default();
        if let Some(failure) =
            source.get_ref().and_then(|inner| inner.downcast_ref::<IntegrityFailure>())
        {
            return CollectiveError::Tampered {
                rank: self.rank,
                peer,
                address,
                message: failure.message,
            };
        }
        match source.kind() {
            // A socket timeout reads as WouldBlock on Unix, TimedOut elsewhere.
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                CollectiveError::Timeout {
                    rank: self.rank,
                    peer,
                    address,
                    waited: self.config.timeout,
                }
            }
            _ => CollectiveError::Link { rank: self.rank, peer, address, source },
        }
    }

    /// Sends `send` right as one header message while receiving one of as
    /// many bytes from the left into `recv`, checked.
    fn exchange(&self, send: &[u8], recv: &mut [u8]) -> Result<(), CollectiveError> {
        let links = self.links.as_ref().expect("exchange needs links");
        let right = (self.rank + 1) % self.world;
        let left = (self.rank + self.world - 1) % self.world;
        std::thread::scope(|scope| {
            let writer = std::thread::Builder::new()
                .name("ring-exchange".into())
                .spawn_scoped(scope, || {
                    send_message(&links.to_right, &mut lock(&links.seal), Message::Header, send)
                })
                .map_err(|source| links.fail(self.rank, "sending", source))?;
            let read_result =
                receive_message(&links.from_left, &mut lock(&links.open), Message::Header, recv)
                    .map_err(|e| self.link_err(left, e));
            let write_result = writer
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("sender thread panicked")))
                .map_err(|e| self.link_err(right, e));
            read_result.and(write_result)
        })
    }

    /// The ring all-reduce as one continuous stream per link (see the module
    /// documentation): a sending thread forwards each segment as soon as the
    /// receiving side has finished it, so no step waits for the previous one
    /// to drain.
    fn pipelined_all_reduce<T: Element>(&self, data: &mut [T]) -> Result<(), CollectiveError> {
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
            let received = self.receive_stream(
                &links.from_left,
                &mut lock(&links.open),
                &schedule,
                &shared,
                &progress,
                &mut scratch,
            );
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

    /// Passes `(op, len, element type, whether data is sealed)` around the
    /// ring and checks the left neighbour agrees.
    fn check_header(&mut self, len: usize, element: u32) -> Result<(), CollectiveError> {
        let data_sealed = self.links.as_ref().is_none_or(|l| lock(&l.seal).data_sealed);
        let (op, len64) = (self.op, len as u64);
        let header = [
            op as u32,
            (op >> 32) as u32,
            len64 as u32,
            (len64 >> 32) as u32,
            element,
            u32::from(data_sealed),
        ];
        let mut t = [0u32; 6];
        self.exchange(bytemuck::cast_slice(&header), bytemuck::cast_slice_mut(&mut t))?;
        if t != header {
            let kind = |code: u32| match code {
                0 => "f32 floats",
                1 => "bf16 floats",
                _ => "link-probe bytes",
            };
            let sealing = |flag: u32| if flag == 1 { "sealed" } else { "in the clear" };
            let sealed = match t[5] == header[5] {
                true => String::new(),
                false => format!(
                    " (its data {} here, {} there: the benchmark's switch)",
                    sealing(header[5]),
                    sealing(t[5])
                ),
            };
            return Err(CollectiveError::Protocol {
                rank: self.rank,
                problem: format!(
                    "collective #{} of {len} {} here, but the left neighbour runs #{} of {} {}\
                     {sealed}",
                    self.op,
                    kind(element),
                    u64::from(t[0]) | (u64::from(t[1]) << 32),
                    u64::from(t[2]) | (u64::from(t[3]) << 32),
                    kind(t[4])
                ),
            });
        }
        self.op += 1;
        Ok(())
    }
}

impl TcpRing {
    /// The link probe (see [`Collective::probe_incoming_link`]): after a
    /// header and a barrier, so that the ranks start within about one hop of
    /// each other, `bytes` of zeros go right while as many come from the
    /// left; the rate counts from the arrival of the first block, so a
    /// neighbour that started a little later is not charged to its link.
    fn probe_links(&mut self, bytes: usize) -> Result<Option<LinkRate>, CollectiveError> {
        if self.world == 1 {
            return Ok(None);
        }
        self.unless_closed(|ring| ring.probe_linked(bytes).map(Some))
    }

    /// The link probe of a ring of two or more ranks (see
    /// [`TcpRing::probe_links`]): each block is a message, sealed and
    /// opened like an all-reduce's segments.
    fn probe_linked(&mut self, bytes: usize) -> Result<LinkRate, CollectiveError> {
        let len = bytes.max(PROBE_MIN_BYTES);
        let block = (len / 8).min(PROBE_BLOCK);
        self.check_header(len, PROBE_CODE)?;
        self.barrier()?;
        let links = self.links.as_ref().expect("a ring of two or more has links");
        let right = (self.rank + 1) % self.world;
        let left = (self.rank + self.world - 1) % self.world;
        let zeros = vec![0u8; block];
        let first_failure = std::sync::OnceLock::new();
        let (received, sent) = std::thread::scope(|scope| {
            let sender = std::thread::Builder::new().name("ring-probe".into());
            let sender = sender.spawn_scoped(scope, || {
                let mut seal = lock(&links.seal);
                let mut remaining = len;
                let outcome = (|| {
                    while remaining > 0 {
                        let n = remaining.min(block);
                        send_message(&links.to_right, &mut seal, Message::Data, &zeros[..n])?;
                        remaining -= n;
                    }
                    Ok(())
                })();
                if outcome.is_err() {
                    let _ = first_failure.set(Direction::Send);
                    let _ = links.from_left.shutdown(std::net::Shutdown::Both);
                }
                outcome
            });
            let sender = sender.map_err(|source| links.fail(self.rank, "probe-sending", source))?;
            let input = &links.from_left;
            let mut open = lock(&links.open);
            let mut incoming = vec![0u8; block];
            let received = (|| -> std::io::Result<Duration> {
                receive_message(input, &mut open, Message::Data, &mut incoming)?;
                let start = Instant::now();
                let mut remaining = len - block;
                while remaining > 0 {
                    let n = remaining.min(block);
                    receive_message(input, &mut open, Message::Data, &mut incoming[..n])?;
                    remaining -= n;
                }
                Ok(start.elapsed())
            })();
            if received.is_err() {
                let _ = first_failure.set(Direction::Receive);
                let _ = links.to_right.shutdown(std::net::Shutdown::Both);
            }
            let sent = sender
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("sender thread panicked")));
            Ok::<_, CollectiveError>((received, sent))
        })?;
        // Report the direction that failed first; the other one only
        // stopped because of it.
        let elapsed = match (received, sent, first_failure.get()) {
            (Err(e), Ok(()), _) | (Err(e), Err(_), Some(Direction::Receive)) => {
                return Err(self.link_err(left, e))
            }
            (_, Err(e), _) => return Err(self.link_err(right, e)),
            (Ok(elapsed), Ok(()), _) => elapsed,
        };
        let bytes_per_sec = (len - block) as f64 / elapsed.as_secs_f64().max(1e-9);
        Ok(LinkRate { from_rank: left, bytes_per_sec })
    }
}

impl Collective for TcpRing {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, buffer: Buffer<'_>) -> Result<(), CollectiveError> {
        match buffer {
            Buffer::Host(data) => self.reduce(data),
            Buffer::HostBf16(data) => self.reduce(bytemuck::cast_slice_mut::<u16, Bf16>(data)),
            other => Err(CollectiveError::WrongMemory {
                backend: "TCP ring",
                location: other.location(),
            }),
        }
    }

    fn broadcast(&mut self, buffer: Buffer<'_>, root: usize) -> Result<(), CollectiveError> {
        crate::check_root(self.rank, self.world, root)?;
        // Everyone but the root contributes zeros: the sum is the root's
        // buffer (x + 0 is x exactly, in bf16 too). Twice the traffic of a
        // pipelined broadcast, paid once per job.
        let buffer = match buffer {
            Buffer::Host(data) => {
                if self.rank != root {
                    data.fill(0.0);
                }
                Buffer::Host(data)
            }
            Buffer::HostBf16(data) => {
                if self.rank != root {
                    data.fill(0);
                }
                Buffer::HostBf16(data)
            }
            other => other,
        };
        self.all_reduce_sum(buffer)
    }

    fn sums_bf16(&self) -> bool {
        true
    }

    fn probe_incoming_link(&mut self, bytes: usize) -> Result<Option<LinkRate>, CollectiveError> {
        self.probe_links(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> RingKey {
        RingKey::derive(b"the job token of these tests")
    }

    #[test]
    fn a_handshake_thread_that_panics_gives_its_slot_back() {
        let in_flight = Arc::new(AtomicUsize::new(0));
        let kept = HandshakeSlot::take(&in_flight);
        let slot = HandshakeSlot::take(&in_flight);
        let claim = Arc::clone(&slot.claim);
        assert_eq!(in_flight.load(Ordering::SeqCst), 2);
        let crashed = std::thread::spawn(move || {
            let _slot = slot;
            panic!("a bug in the challenge");
        })
        .join();
        assert!(crashed.is_err(), "the thread should have panicked");
        assert_eq!(in_flight.load(Ordering::SeqCst), 1, "the panicked thread kept its slot");
        // Its connection no longer counts as being challenged.
        assert!(!claim.challenging() && !claim.evicted());
        assert!(kept.claim.challenging());
        drop(kept);
        assert_eq!(in_flight.load(Ordering::SeqCst), 0);
    }

    /// A pool of 2 slots: a third connection evicts the oldest one being
    /// challenged (its socket shut down: its peer reads the end), never one
    /// whose proof held, and its threads, evicted ones not yet ended
    /// included, stay below twice its limit.
    #[test]
    fn a_full_pool_evicts_its_oldest_unproven_connection_and_bounds_its_threads() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut pool = Pool::new(2);
        // A connection being challenged: its peer's end, its address and
        // its thread's slot and stream (the pool holds a second handle).
        let connect = |pool: &mut Pool| {
            let peer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (stream, peer_addr) = listener.accept().unwrap();
            let slot = HandshakeSlot::take(&pool.threads);
            let (handle, claim) = (stream.try_clone().unwrap(), Arc::clone(&slot.claim));
            pool.challenging.push_back(Challenging { peer_addr, handle, claim });
            (peer, peer_addr, (slot, stream))
        };
        let (oldest, oldest_addr, first) = connect(&mut pool);
        let (_second, second_addr, second) = connect(&mut pool);
        let mut slots = vec![first, second];
        assert!(matches!(pool.make_room(), Room::Evicted(a) if a == oldest_addr));
        // Shut down while its thread still holds the stream.
        oldest.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let read = (&oldest).read(&mut [0u8; 1]);
        assert!(matches!(read, Ok(0)), "the evicted one was not shut down: {read:?}");
        assert!(matches!(slots[0].1.read(&mut [0u8; 1]), Ok(0)));
        assert!(slots[0].0.claim.evicted() && !slots[0].0.claim.settle(), "an evicted one settled");
        let (_third, _, third) = connect(&mut pool);
        slots.push(third);
        // The second proves itself: never evicted, and its place is free.
        assert!(slots[1].0.claim.settle());
        assert!(matches!(pool.make_room(), Room::Free));
        assert!(!slots[1].0.claim.evicted());
        assert_eq!(pool.challenging.len(), 1);
        let (_fourth, fourth_addr, fourth) = connect(&mut pool);
        slots.push(fourth);
        // Four threads (the evicted one and the settled one still ending):
        // twice the limit, so a fifth connection is closed at once.
        assert_eq!(pool.threads.load(Ordering::SeqCst), 4);
        assert!(matches!(pool.make_room(), Room::Full));
        // The evicted thread ends: the oldest being challenged (the third)
        // is evicted for the next one.
        drop(slots.remove(0));
        let third_addr = pool.challenging[0].peer_addr;
        assert_ne!(third_addr, second_addr);
        assert_ne!(third_addr, fourth_addr);
        assert!(matches!(pool.make_room(), Room::Evicted(a) if a == third_addr));
    }

    /// Forms a ring of `n` ranks on loopback, one thread each, and runs `f` on every rank.
    pub(crate) fn with_ring<T: Send>(n: usize, f: impl Fn(&mut TcpRing) -> T + Sync) -> Vec<T> {
        let listeners: Vec<RingListener> =
            (0..n).map(|_| RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap()).collect();
        let addresses: Vec<String> =
            listeners.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
        std::thread::scope(|scope| {
            let handles: Vec<_> = listeners
                .into_iter()
                .enumerate()
                .map(|(rank, l)| {
                    let addresses = addresses.clone();
                    let f = &f;
                    scope.spawn(move || {
                        let config =
                            RingConfig { timeout: Duration::from_secs(20), segment_floats: 7 };
                        let mut ring = l.connect(rank, &addresses, &key(), config).unwrap();
                        f(&mut ring)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn a_broadcast_from_a_rank_outside_the_world_is_an_error_that_names_it() {
        for n in [1, 2] {
            let outcomes = with_ring(n, |ring| {
                let mut data = [5.0f32, 6.0];
                let outcome = ring.broadcast(Buffer::Host(&mut data), n);
                (ring.rank(), outcome.map_err(|e| e.to_string()), data)
            });
            for (rank, outcome, data) in outcomes {
                let error = outcome.expect_err("root outside the world");
                assert!(error.contains(&format!("broadcast from rank {n}")), "{error}");
                assert_eq!(data, [5.0, 6.0], "rank {rank}'s buffer was changed");
            }
        }
        let error = crate::Single.broadcast(Buffer::Host(&mut [1.0]), 1).unwrap_err();
        assert!(error.to_string().contains("broadcast from rank 1"), "{error}");
    }

    #[test]
    fn a_ring_of_segments_of_0_floats_is_refused_not_a_panic() {
        let listener = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addresses = vec![listener.local_addr().unwrap().to_string(); 2];
        let config = RingConfig { timeout: Duration::from_secs(1), segment_floats: 0 };
        let Err(error) = listener.connect(0, &addresses, &key(), config) else {
            panic!("a ring of 0-float segments was formed");
        };
        assert!(error.to_string().contains("segment_floats is 0"), "{error}");
    }

    fn bits(v: f32) -> u16 {
        Bf16::from_f32(v).0
    }

    #[test]
    fn bf16_rounds_to_nearest_even_as_libtorch() {
        assert_eq!(bits(1.0), 0x3f80);
        // Ties go to the even neighbour: 1 + 2^-8 to 1, 1 + 3 * 2^-8 to 1 + 2^-6.
        assert_eq!(bits(1.0 + 2f32.powi(-8)), 0x3f80);
        assert_eq!(bits(1.0 + 3.0 * 2f32.powi(-8)), 0x3f82);
        // Above a tie rounds up, below rounds down.
        assert_eq!(bits(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert_eq!(bits(f32::from_bits(0x3f80_7fff)), 0x3f80);
        assert_eq!(bits(-2.5), 0xc020);
        assert_eq!(bits(f32::INFINITY), 0x7f80);
        assert_eq!(bits(f32::MAX), 0x7f80, "rounds past bf16's largest value to inf");
        assert_eq!(bits(f32::NAN), 0x7fc0);
        assert_eq!(Bf16(0x3f80).add(Bf16(bits(2f32.powi(-8)))), Bf16(0x3f80));
    }

    #[test]
    fn bf16_all_reduce_sums_with_half_the_bytes_on_the_wire() {
        for n in [2, 3, 4] {
            for len in [1, 3, 17, 1000] {
                // Small integers: exact in bf16, and so are their sums.
                let value = |r: usize, i: usize| ((r * 31 + i) % 17) as f32;
                let results = with_ring(n, |ring| {
                    let r = ring.rank();
                    let mut wide: Vec<f32> = (0..len).map(|i| value(r, i)).collect();
                    ring.all_reduce_sum(Buffer::Host(&mut wide)).unwrap();
                    let f32_bytes = ring.bytes_sent();
                    let mut half: Vec<u16> = (0..len).map(|i| bits(value(r, i))).collect();
                    ring.all_reduce_sum(Buffer::HostBf16(&mut half)).unwrap();
                    let bf16_bytes = ring.bytes_sent() - f32_bytes;
                    (wide, half, f32_bytes, bf16_bytes)
                });
                for (rank, (wide, half, f32_bytes, bf16_bytes)) in results.iter().enumerate() {
                    let want: Vec<u16> = wide.iter().map(|v| bits(*v)).collect();
                    assert_eq!(half, &want, "world {n}, len {len}, rank {rank}");
                    assert_eq!(*f32_bytes, 2 * bf16_bytes, "world {n}, len {len}, rank {rank}");
                }
                // 2 (N-1)/N of the buffer per rank, in total over the ranks.
                let total: u64 = results.iter().map(|r| r.3).sum();
                assert_eq!(total, 2 * (n as u64 - 1) * len as u64 * 2, "world {n}, len {len}");
            }
        }
        // Rounding at each partial sum: 1 + 2^-8 is a tie that goes to 1.
        let results = with_ring(2, |ring| {
            let mut data =
                [bits(if ring.rank() == 0 { 1.0 } else { 2f32.powi(-8) }), bits(1.5), bits(-0.25)];
            ring.all_reduce_sum(Buffer::HostBf16(&mut data)).unwrap();
            data
        });
        for data in results {
            assert_eq!(data, [bits(1.0), bits(3.0), bits(-0.5)]);
        }
        // A broadcast of bf16 values is exact.
        let results = with_ring(3, |ring| {
            let mut data = vec![bits(ring.rank() as f32 + 0.1); 10];
            ring.broadcast(Buffer::HostBf16(&mut data), 1).unwrap();
            data
        });
        assert!(results.iter().all(|d| d == &vec![bits(1.1); 10]));
    }

    #[test]
    fn ranks_that_disagree_on_the_element_type_fail_instead_of_corrupting() {
        let results = with_ring(2, |ring| {
            if ring.rank() == 0 {
                ring.all_reduce_sum(Buffer::Host(&mut [1.0f32; 6])).map_err(|e| e.to_string())
            } else {
                ring.all_reduce_sum(Buffer::HostBf16(&mut [0u16; 6])).map_err(|e| e.to_string())
            }
        });
        for r in results {
            let e = r.unwrap_err();
            assert!(e.contains("bf16") && e.contains("f32"), "{e}");
        }
    }

    #[test]
    fn all_reduce_sums_exactly_for_many_sizes_and_worlds() {
        for n in [1, 2, 3, 4, 5] {
            for len in [0, 1, 3, 4, 17, 1000] {
                let results = with_ring(n, |ring| {
                    let r = ring.rank() as f32;
                    let mut data: Vec<f32> = (0..len).map(|i| r * 1000.0 + i as f32).collect();
                    ring.all_reduce_sum(Buffer::Host(&mut data)).unwrap();
                    data
                });
                let want: Vec<f32> =
                    (0..len).map(|i| (0..n).map(|r| r as f32 * 1000.0 + i as f32).sum()).collect();
                for (rank, got) in results.iter().enumerate() {
                    assert_eq!(got, &want, "world {n}, len {len}, rank {rank}");
                }
            }
        }
    }

    #[test]
    fn broadcast_and_barrier() {
        let results = with_ring(3, |ring| {
            let mut data = vec![ring.rank() as f32 + 1.0; 10];
            ring.broadcast(Buffer::Host(&mut data), 2).unwrap();
            ring.barrier().unwrap();
            data
        });
        assert!(results.iter().all(|d| d.iter().all(|&v| v == 3.0)));
    }

    #[test]
    fn mismatched_sizes_are_an_error_not_corruption() {
        let results = with_ring(2, |ring| {
            let mut data = vec![1.0f32; 10 + ring.rank()];
            ring.all_reduce_sum(Buffer::Host(&mut data)).map(|_| ()).map_err(|e| e.to_string())
        });
        assert!(
            results.iter().all(|r| r.as_ref().is_err_and(|e| e.contains("floats"))),
            "{results:?}"
        );
    }

    #[test]
    fn a_peer_that_leaves_mid_collective_is_an_error_not_a_hang() {
        let start = Instant::now();
        let results = with_ring(3, |ring| {
            let mut data = vec![1.0f32; 1 << 20];
            if ring.rank() == 1 {
                // Agrees to the collective, then leaves: its links close when
                // the ring drops, while the others are streaming.
                ring.check_header(data.len(), 0).map_err(|e| e.to_string())?;
                return Ok(());
            }
            ring.all_reduce_sum(Buffer::Host(&mut data)).map_err(|e| e.to_string())
        });
        assert!(start.elapsed() < Duration::from_secs(15), "took {:?}", start.elapsed());
        for rank in [0, 2] {
            let err =
                results[rank].as_ref().expect_err("rank 1 left, the all-reduce cannot succeed");
            assert!(err.contains("rank"), "{err}");
        }
    }

    #[test]
    fn a_link_probe_measures_each_incoming_link_and_leaves_the_ring_in_step() {
        let results = with_ring(3, |ring| {
            let rate = ring.probe_incoming_link(1 << 20).unwrap();
            let mut data = vec![ring.rank() as f32; 100];
            ring.all_reduce_sum(Buffer::Host(&mut data)).unwrap();
            (rate, data)
        });
        for (rank, (rate, data)) in results.iter().enumerate() {
            let rate = rate.expect("a ring of three has links");
            assert_eq!(rate.from_rank, (rank + 2) % 3);
            assert!(rate.bytes_per_sec.is_finite() && rate.bytes_per_sec > 0.0, "{rate:?}");
            assert_eq!(data, &vec![3.0; 100], "the all-reduce after the probe");
        }
        let alone = with_ring(1, |ring| ring.probe_incoming_link(1 << 20).unwrap());
        assert_eq!(alone, [None]);
    }

    #[test]
    fn ranks_that_disagree_on_a_link_probe_fail_instead_of_hanging() {
        let start = Instant::now();
        let results = with_ring(2, |ring| {
            let bytes = if ring.rank() == 0 { 1 << 20 } else { 2 << 20 };
            ring.probe_incoming_link(bytes).map_err(|e| e.to_string())
        });
        assert!(start.elapsed() < Duration::from_secs(15), "took {:?}", start.elapsed());
        for result in results {
            let err = result.expect_err("the probes differ");
            assert!(err.contains("link-probe bytes"), "{err}");
        }
    }

    #[test]
    fn a_dead_peer_is_a_timely_error() {
        let a = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let b = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addresses =
            vec![a.local_addr().unwrap().to_string(), b.local_addr().unwrap().to_string()];
        drop(b); // rank 1 never shows up
        let start = Instant::now();
        let config = RingConfig { timeout: Duration::from_millis(500), segment_floats: 16 };
        let err = a.connect(0, &addresses, &key(), config).unwrap_err().to_string();
        assert!(start.elapsed() < Duration::from_secs(10), "took {:?}", start.elapsed());
        assert!(err.contains("rank 1") || err.contains("never connected"), "{err}");
    }

    /// Links `a` (rank 0) and `b` (rank 1) into a ring of two, at once.
    fn link_pair(
        a: RingListener,
        b: RingListener,
        addresses: &[String],
        config: &RingConfig,
    ) -> [Result<TcpRing, CollectiveError>; 2] {
        std::thread::scope(|scope| {
            let ha = scope.spawn(move || a.connect(0, addresses, &key(), config.clone()));
            let hb = scope.spawn(move || b.connect(1, addresses, &key(), config.clone()));
            [ha.join().unwrap(), hb.join().unwrap()]
        })
    }

    /// An impostor that knows the protocol but not the key.
    fn impostor_hello(rank: u32, world: u32) -> Vec<u8> {
        let mut hello = Vec::new();
        for v in [MAGIC, rank, world] {
            hello.extend_from_slice(&v.to_le_bytes());
        }
        hello.extend_from_slice(&[7u8; NONCE_LEN]);
        hello
    }

    #[test]
    fn an_impostor_left_neighbour_is_refused_and_the_real_one_still_links() {
        let a = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let b = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addresses =
            vec![a.local_addr().unwrap().to_string(), b.local_addr().unwrap().to_string()];
        let target = addresses[1].clone();
        // Connects to rank 1 before rank 0 does, claims to be rank 0, and
        // answers the challenge with a proof made from a guessed key.
        let (queued_tx, queued) = std::sync::mpsc::channel();
        let impostor = std::thread::spawn(move || {
            let stream = TcpStream::connect(&target).unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let hello = impostor_hello(0, 2);
            (&stream).write_all(&hello).unwrap();
            queued_tx.send(()).unwrap();
            let mut answer = [0u8; NONCE_LEN + TAG_LEN];
            (&stream).read_exact(&mut answer).unwrap();
            let guess = RingKey::derive(b"a guessed token");
            let proof = guess.proof(CONNECTOR_ROLE, &hello, &answer[..NONCE_LEN]);
            (&stream).write_all(&proof).unwrap();
            // Refused: the verdict says so (or the connection closes).
            let mut verdict = [9u8; 1];
            let read = (&stream).read(&mut verdict);
            assert!(
                matches!(read, Ok(0) | Err(_)) || verdict[0] == REFUSED,
                "the impostor was accepted: {read:?} {verdict:?}"
            );
        });
        queued.recv().unwrap();
        let config = RingConfig { timeout: Duration::from_secs(20), segment_floats: 16 };
        let rings = link_pair(a, b, &addresses, &config);
        impostor.join().unwrap();
        let mut rings: Vec<TcpRing> = rings.into_iter().map(|r| r.unwrap()).collect();
        std::thread::scope(|scope| {
            for ring in rings.iter_mut() {
                scope.spawn(move || {
                    let mut data = vec![1.0f32; 5];
                    ring.all_reduce_sum(Buffer::Host(&mut data)).unwrap();
                    assert_eq!(data, vec![2.0; 5]);
                });
            }
        });
    }

    /// The left link fails (a peer holding the key presents the wrong rank)
    /// while the right neighbour is not there: the ring gives up at once and
    /// says what the left link did, where it waited for the right neighbour
    /// until its deadline and then named it.
    #[test]
    fn a_failed_left_link_is_reported_at_once_while_the_right_neighbour_is_away() {
        let me = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let away = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let addresses =
            vec!["127.0.0.1:9".to_string(), me.local_addr().unwrap().to_string(), away.to_string()];
        let target = addresses[1].clone();
        let wrong_rank = std::thread::spawn(move || {
            let stream = TcpStream::connect(&target).unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            // Rank 2 of 3 on rank 1's left link, where rank 0 belongs.
            let _ = prove_to_right(&stream, 2, 3, &key(), deadline);
            std::thread::sleep(Duration::from_millis(500));
        });
        let config = RingConfig { timeout: Duration::from_secs(20), segment_floats: 16 };
        let started = Instant::now();
        let err = me.connect(1, &addresses, &key(), config).unwrap_err().to_string();
        let took = started.elapsed();
        wrong_rank.join().unwrap();
        assert!(err.contains("expected rank 0 of 3 on the left link, got rank 2 of 3"), "{err}");
        assert!(took < Duration::from_secs(5), "took {took:?}: {err}");
    }

    #[test]
    fn strangers_that_connect_and_stall_do_not_hold_up_the_left_neighbour() {
        let a = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let b = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addresses =
            vec![a.local_addr().unwrap().to_string(), b.local_addr().unwrap().to_string()];
        // Connected to rank 1 before rank 0 is: one sends nothing, one sends
        // its hello a byte at a time, slower than any handshake may take.
        let silent = TcpStream::connect(&addresses[1]).unwrap();
        let trickling = TcpStream::connect(&addresses[1]).unwrap();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let trickler = {
            let stop = std::sync::Arc::clone(&stop);
            std::thread::spawn(move || {
                for byte in impostor_hello(0, 2) {
                    if stop.load(Ordering::Relaxed) || (&trickling).write_all(&[byte]).is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
            })
        };
        let start = Instant::now();
        let config = RingConfig { timeout: Duration::from_secs(30), segment_floats: 16 };
        let rings = link_pair(a, b, &addresses, &config);
        let linked_after = start.elapsed();
        stop.store(true, Ordering::Relaxed);
        trickler.join().unwrap();
        drop(silent);
        for ring in rings {
            ring.unwrap();
        }
        assert!(linked_after < HANDSHAKE_TIMEOUT / 2, "linked after {linked_after:?}");
    }

    /// Silent strangers, one more than the strangers' handshake slots, hold
    /// them all before a left neighbour that connects from an address it did
    /// not advertise (127.0.0.1, having advertised 127.0.0.3), so it is
    /// challenged as a stranger: it takes the oldest stranger's slot and
    /// links at once, where it was closed at once and tried again until the
    /// strangers' handshakes timed out (10 s).
    #[test]
    fn more_stalling_strangers_than_handshake_slots_do_not_keep_out_a_neighbour_on_another_address()
    {
        let a = RingListener::bind("0.0.0.0:0".parse().unwrap()).unwrap();
        let b = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = a.local_addr().unwrap().port();
        let addresses = vec![format!("127.0.0.3:{port}"), b.local_addr().unwrap().to_string()];
        let silent: Vec<TcpStream> =
            (0..=MAX_HANDSHAKES).map(|_| TcpStream::connect(&addresses[1]).unwrap()).collect();
        let config = RingConfig { timeout: Duration::from_secs(20), segment_floats: 16 };
        let started = Instant::now();
        let rings = link_pair(a, b, &addresses, &config);
        let linked_after = started.elapsed();
        drop(silent);
        for ring in rings {
            ring.unwrap();
        }
        assert!(linked_after < HANDSHAKE_TIMEOUT / 2, "linked after {linked_after:?}");
    }

    /// An attacker on the left neighbour's own address (127.0.0.1, rank 0's
    /// in these tests) holding every neighbour handshake slot of `target`:
    /// [`MAX_NEIGHBOUR_HANDSHAKES`] connections opened before this returns,
    /// then one more every 100 ms (more than the 6.4 a second that kept
    /// every slot taken when each stalled one held its slot for the 10 s
    /// handshake timeout), each sending `hello` (if any) and then nothing. Set the flag to stop it; joining it closes its connections
    /// and says how many it opened.
    fn stalling_neighbour(
        target: &str,
        hello: Option<Vec<u8>>,
    ) -> (Arc<AtomicBool>, std::thread::JoinHandle<usize>) {
        let open = {
            let target = target.to_string();
            move || {
                let stream = TcpStream::connect(&target).ok()?;
                if let Some(hello) = &hello {
                    (&stream).write_all(hello).ok()?;
                }
                Some(stream)
            }
        };
        let mut held: Vec<TcpStream> =
            (0..MAX_NEIGHBOUR_HANDSHAKES).map(|_| open().unwrap()).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let attacker = std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                held.extend(open());
            }
            held.len()
        });
        (stop, attacker)
    }

    /// Links a ring of two while [`stalling_neighbour`] holds rank 1's
    /// neighbour handshake slots: rank 1 waits for its left neighbour while
    /// the attacker opens more for half a second, then rank 0 comes. How
    /// long that took from rank 0's start.
    fn link_past_a_stalling_neighbour(hello: Option<Vec<u8>>) -> Duration {
        let a = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let b = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addresses =
            vec![a.local_addr().unwrap().to_string(), b.local_addr().unwrap().to_string()];
        let (stop, attacker) = stalling_neighbour(&addresses[1], hello);
        let config = RingConfig { timeout: Duration::from_secs(20), segment_floats: 16 };
        let (rings, linked_after) = std::thread::scope(|scope| {
            let (addresses, config) = (&addresses, &config);
            let hb = scope.spawn(move || b.connect(1, addresses, &key(), config.clone()));
            std::thread::sleep(Duration::from_millis(500));
            let started = Instant::now();
            let ha = scope.spawn(move || a.connect(0, addresses, &key(), config.clone()));
            let rings = [ha.join().unwrap(), hb.join().unwrap()];
            (rings, started.elapsed())
        });
        stop.store(true, Ordering::Relaxed);
        let opened = attacker.join().unwrap();
        for ring in rings {
            ring.unwrap();
        }
        eprintln!("linked after {linked_after:?}, {opened} stalled connections opened");
        linked_after
    }

    /// Silent connections from the neighbour's own address, every neighbour
    /// slot's worth and more as they free up: the neighbour takes the
    /// oldest one's slot and links at once, where it was closed at once and
    /// tried again until they timed out (10 s), or, with more of them, until
    /// the ring's deadline.
    #[test]
    fn silent_connections_from_the_neighbours_address_do_not_keep_it_out() {
        let linked_after = link_past_a_stalling_neighbour(None);
        assert!(linked_after < HANDSHAKE_TIMEOUT / 2, "linked after {linked_after:?}");
    }

    /// The same with a well-formed hello claiming to be rank 0, the left
    /// neighbour, and no answer to the challenge.
    #[test]
    fn connections_that_claim_to_be_the_neighbour_and_stall_at_the_challenge_do_not_keep_it_out() {
        let linked_after = link_past_a_stalling_neighbour(Some(impostor_hello(0, 2)));
        assert!(linked_after < HANDSHAKE_TIMEOUT / 2, "linked after {linked_after:?}");
    }

    /// Connections still being challenged when the left link is chosen
    /// are closed then: a stranger's silent connection sees its end at
    /// once, where its handshake thread held it to its own timeout (10 s).
    #[test]
    fn connections_still_challenged_are_closed_once_the_left_link_is_chosen() {
        let a = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let b = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addresses =
            vec![a.local_addr().unwrap().to_string(), b.local_addr().unwrap().to_string()];
        let strangers: Vec<TcpStream> =
            (0..8).map(|_| TcpStream::connect(&addresses[1]).unwrap()).collect();
        let config = RingConfig { timeout: Duration::from_secs(20), segment_floats: 16 };
        for ring in link_pair(a, b, &addresses, &config) {
            ring.unwrap();
        }
        let linked = Instant::now();
        for mut stranger in strangers {
            stranger.set_read_timeout(Some(HANDSHAKE_TIMEOUT / 2)).unwrap();
            let mut byte = [0u8; 1];
            match stranger.read(&mut byte) {
                Ok(0) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                other => panic!("a stranger's connection stayed open: {other:?}"),
            }
        }
        let closed_after = linked.elapsed();
        assert!(closed_after < HANDSHAKE_TIMEOUT / 4, "closed {closed_after:?} after linking");
    }

    /// Strangers' silent connections from another address than the left
    /// neighbour's, three times as many as their slots, opened before the
    /// neighbour's: the neighbour links at once, where it waited behind
    /// them in the listener's backlog, a handshake timeout (10 s) for each
    /// round of slots.
    #[test]
    fn strangers_from_other_addresses_do_not_queue_the_left_neighbour() {
        let a = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        // Rank 1 listens on every address: the strangers reach it on
        // 127.0.0.2, rank 0 on 127.0.0.1. (Linux gives connections to
        // 127.0.0.2 the source address 127.0.0.1 all the same, so the
        // strangers are challenged with the neighbour's own pool here; the
        // strangers' pool is filled by `more_stalling_strangers_…`.)
        let b = RingListener::bind("0.0.0.0:0".parse().unwrap()).unwrap();
        let port = b.local_addr().unwrap().port();
        let addresses = vec![a.local_addr().unwrap().to_string(), format!("127.0.0.1:{port}")];
        let strangers: Vec<TcpStream> = (0..3 * MAX_HANDSHAKES)
            .map(|_| TcpStream::connect(("127.0.0.2", port)).unwrap())
            .collect();
        let config = RingConfig { timeout: Duration::from_secs(60), segment_floats: 16 };
        let started = Instant::now();
        let rings = link_pair(a, b, &addresses, &config);
        let linked_after = started.elapsed();
        drop(strangers);
        for ring in rings {
            ring.unwrap();
        }
        assert!(linked_after < HANDSHAKE_TIMEOUT / 2, "linked after {linked_after:?}");
    }

    /// A listener of this job's key, on a thread: it answers the first
    /// hello after `answer_after`, checks the proof, and gives `verdict`
    /// (none: it closes the connection) `verdict_after` later.
    fn slow_listener(
        answer_after: Duration,
        verdict: Option<u8>,
        verdict_after: Duration,
    ) -> (String, std::thread::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let handle = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut hello = [0u8; HELLO_LEN];
            (&stream).read_exact(&mut hello).unwrap();
            std::thread::sleep(answer_after);
            let nonce = [5u8; NONCE_LEN];
            let mut answer = nonce.to_vec();
            answer.extend_from_slice(&key().proof(ACCEPTOR_ROLE, &hello, &nonce));
            (&stream).write_all(&answer).unwrap();
            let mut proof = [0u8; TAG_LEN];
            (&stream).read_exact(&mut proof).unwrap();
            assert!(key().verify(CONNECTOR_ROLE, &hello, &nonce, &proof));
            std::thread::sleep(verdict_after);
            if let Some(verdict) = verdict {
                (&stream).write_all(&[verdict]).unwrap();
            }
        });
        (address, handle)
    }

    #[test]
    fn a_late_verdict_is_waited_for_and_only_a_refusal_refuses() {
        let prove = |address: &str| {
            let stream = TcpStream::connect(address).unwrap();
            prove_to_right(&stream, 0, 2, &key(), Instant::now() + Duration::from_secs(60))
        };
        // The answer before the hello's handshake time runs out, the verdict
        // after it (a listener that challenged this connection once
        // strangers' stalled handshakes gave their slots back): linked.
        let answer_after = HANDSHAKE_TIMEOUT - Duration::from_secs(3);
        let (address, listener) =
            slow_listener(answer_after, Some(ACCEPTED), Duration::from_secs(4));
        prove(&address).unwrap();
        listener.join().unwrap();
        // No verdict (the connection closed): broken off, to be tried again.
        let (address, listener) = slow_listener(Duration::ZERO, None, Duration::ZERO);
        let outcome = prove(&address);
        assert!(matches!(outcome, Err(Handshake::Io(_))), "{outcome:?}");
        listener.join().unwrap();
        // A verdict that refuses: refused.
        let (address, listener) = slow_listener(Duration::ZERO, Some(REFUSED), Duration::ZERO);
        let outcome = prove(&address);
        assert!(matches!(outcome, Err(Handshake::Refused(_))), "{outcome:?}");
        listener.join().unwrap();
    }

    #[test]
    fn a_listener_without_the_key_is_refused_by_the_connecting_rank() {
        // "Rank 1" is an impostor listener: it answers the hello with a proof
        // made from another key.
        let fake = TcpListener::bind("127.0.0.1:0").unwrap();
        let fake_address = fake.local_addr().unwrap().to_string();
        let impostor = std::thread::spawn(move || {
            let (stream, _) = fake.accept().unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut hello = [0u8; HELLO_LEN];
            (&stream).read_exact(&mut hello).unwrap();
            let other = RingKey::derive(b"another job's token");
            let mut answer = vec![9u8; NONCE_LEN];
            answer.extend_from_slice(&other.proof(ACCEPTOR_ROLE, &hello, &[9u8; NONCE_LEN]));
            (&stream).write_all(&answer).unwrap();
            // Nothing must follow: the real rank does not send its proof.
            let mut rest = [0u8; TAG_LEN];
            assert!(
                (&stream).read_exact(&mut rest).is_err(),
                "rank 0 proved itself to an impostor"
            );
        });
        let a = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addresses = vec![a.local_addr().unwrap().to_string(), fake_address];
        let config = RingConfig { timeout: Duration::from_secs(2), segment_floats: 16 };
        let err = a.connect(0, &addresses, &key(), config).unwrap_err().to_string();
        assert!(err.contains("failed the ring challenge"), "{err}");
        impostor.join().unwrap();
    }

    #[test]
    fn ranks_with_different_keys_do_not_link() {
        let a = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let b = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addresses =
            vec![a.local_addr().unwrap().to_string(), b.local_addr().unwrap().to_string()];
        let config = RingConfig { timeout: Duration::from_secs(2), segment_floats: 16 };
        let results = std::thread::scope(|scope| {
            let addrs = &addresses;
            let config = &config;
            let ha = scope.spawn(move || a.connect(0, addrs, &key(), config.clone()).map(|_| ()));
            let other = RingKey::derive(b"another job's token");
            let hb = scope.spawn(move || b.connect(1, addrs, &other, config.clone()).map(|_| ()));
            [ha.join().unwrap(), hb.join().unwrap()]
        });
        for r in &results {
            assert!(r.is_err(), "a ring formed across two keys: {results:?}");
        }
        assert!(!format!("{:?}", key()).contains("the job token"));
    }

    /// The next message `cipher` seals, b"segment": its ciphertext and tag.
    fn sealed_segment(cipher: &mut LinkCipher) -> (Vec<u8>, [u8; LINK_TAG_LEN]) {
        let (ciphertext, tag) = cipher.seal(b"segment").unwrap();
        (ciphertext.to_vec(), tag)
    }

    /// A sealed message is bound to its place on its link: the receiving
    /// end opens the messages in the order they were sealed, and refuses
    /// one altered, out of order, or sealed for another link; the same
    /// bytes never look alike on the wire.
    #[test]
    fn a_sealed_message_is_bound_to_its_place_and_its_link() {
        let hello = impostor_hello(0, 2);
        let cipher = || key().link_cipher(&hello, &[3u8; NONCE_LEN]);
        let (mut seal, mut open) = (cipher(), cipher());
        let (first, second) = (sealed_segment(&mut seal), sealed_segment(&mut seal));
        assert_ne!(first.0, b"segment", "the message travelled in the clear");
        assert_ne!(first, second, "the same bytes at another place were sealed alike");
        for (mut ciphertext, tag) in [first, second.clone()] {
            open.open(&mut ciphertext, &tag).unwrap();
            assert_eq!(ciphertext, b"segment");
        }
        // Replayed: its place has passed.
        let (mut replayed, tag) = second;
        assert_eq!(open.open(&mut replayed, &tag).unwrap_err().message, 2);
        // Altered: one bit of the ciphertext, or of the tag.
        let (mut seal, mut open) = (cipher(), cipher());
        let (mut ciphertext, tag) = sealed_segment(&mut seal);
        ciphertext[6] ^= 1;
        assert!(open.open(&mut ciphertext, &tag).is_err());
        let (mut seal, mut open) = (cipher(), cipher());
        let (mut ciphertext, mut tag) = sealed_segment(&mut seal);
        tag[15] ^= 0x80;
        assert!(open.open(&mut ciphertext, &tag).is_err());
        // Another connection's link (another nonce), or another job's key.
        let (ciphertext, tag) = sealed_segment(&mut cipher());
        let mut other_link = key().link_cipher(&hello, &[4u8; NONCE_LEN]);
        assert!(other_link.open(&mut ciphertext.clone(), &tag).is_err());
        let mut other_job =
            RingKey::derive(b"another job's token").link_cipher(&hello, &[3u8; NONCE_LEN]);
        assert!(other_job.open(&mut ciphertext.clone(), &tag).is_err());
    }

    /// A link moves on to a fresh key every [`MESSAGES_PER_KEY`] messages:
    /// both ends open across the change, and an end that kept the key of
    /// the run before cannot open what follows it.
    #[test]
    fn a_link_moves_on_to_a_fresh_key_every_run_of_messages() {
        let hello = impostor_hello(0, 2);
        // A link's end as it stands before message `next`.
        let at = |next: u64, run: u64| {
            let mut cipher = key().link_cipher(&hello, &[3u8; NONCE_LEN]);
            cipher.next = next;
            cipher.key = message_key(&cipher.link_key, run);
            cipher
        };
        let last_of_the_first_run = MESSAGES_PER_KEY - 1;
        let (mut seal, mut open) = (at(last_of_the_first_run, 0), at(last_of_the_first_run, 0));
        for _ in 0..3 {
            let (mut ciphertext, tag) = sealed_segment(&mut seal);
            open.open(&mut ciphertext, &tag).unwrap();
            assert_eq!(ciphertext, b"segment");
        }
        // Both moved on at message MESSAGES_PER_KEY: the first run's key
        // does not open the next message, the second run's does.
        let next = MESSAGES_PER_KEY + 2;
        assert_eq!(seal.next, next);
        let (ciphertext, tag) = sealed_segment(&mut seal);
        assert!(at(next, 0).open(&mut ciphertext.clone(), &tag).is_err());
        at(next, 1).open(&mut ciphertext.clone(), &tag).unwrap();
    }

    /// Peers of the earlier wire versions (tagged but readable data; untagged
    /// data) are refused at the handshake, with a word that says why, never
    /// linked and mis-framed.
    #[test]
    fn peers_of_earlier_versions_are_refused_at_the_handshake() {
        // A listener, and a peer of an old version that sends it its hello
        // and returns what it was answered (nothing: no challenge, no
        // verdict) once the connection closes.
        let old_peer = |magic: u32| {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let address = listener.local_addr().unwrap();
            let peer = std::thread::spawn(move || {
                let stream = TcpStream::connect(address).unwrap();
                let mut hello = impostor_hello(0, 2);
                hello[..4].copy_from_slice(&magic.to_le_bytes());
                (&stream).write_all(&hello).unwrap();
                stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut rest = Vec::new();
                let _ = (&stream).read_to_end(&mut rest);
                rest
            });
            (listener, peer)
        };
        for (magic, version) in [(0x5253_4233, "RSB3"), (0x5253_4232, "RSB2")] {
            let (listener, peer) = old_peer(magic);
            let (stream, _) = listener.accept().unwrap();
            let outcome =
                challenge_left(&stream, &key(), Instant::now() + Duration::from_secs(10), || true);
            drop(stream);
            match outcome {
                Err(Handshake::Refused(why)) => {
                    assert!(why.contains("older version") && why.contains(version), "{why}")
                }
                other => panic!("a peer of {version} was not refused: {other:?}"),
            }
            assert!(peer.join().unwrap().is_empty(), "the old peer was answered");
        }
        // Waiting for the left neighbour, a rank goes on past the refusal
        // (a hello proves nothing), and its deadline's error says it.
        let (listener, peer) = old_peer(0x5253_4233);
        let loopback = [IpAddr::from([127, 0, 0, 1])];
        let deadline = Instant::now() + Duration::from_secs(2);
        let waited =
            accept_left(&listener, 1, (0, &loopback), 2, &key(), deadline, &AtomicBool::new(false));
        match waited {
            Err(CollectiveError::Link { source, .. }) => assert!(
                source.to_string().contains("the last connection refused was")
                    && source.to_string().contains("older version"),
                "{source}"
            ),
            other => panic!("{other:?}"),
        }
        assert!(peer.join().unwrap().is_empty(), "the old peer was answered");
    }

    /// What a man in the middle does to the bytes rank 0 sends rank 1 after
    /// the handshake, at offsets counted from the handshake's end.
    #[derive(Debug, Clone)]
    enum Tamper {
        /// Flips the lowest bit of the byte at this offset.
        Flip(usize),
        /// Drops these bytes.
        Drop(Range<usize>),
        /// Sends these bytes twice.
        Repeat(Range<usize>),
        /// Sends the second range (which follows the first) before the first.
        Swap(Range<usize>, Range<usize>),
        /// Sends the bytes of `from` again in place of those of `over`, a
        /// later range as long.
        Replay {
            /// The bytes replayed.
            from: Range<usize>,
            /// The bytes they replace.
            over: Range<usize>,
        },
        /// Passes every byte on untouched, and records it.
        Record(Arc<Mutex<Vec<u8>>>),
    }

    /// A [`Tamper`] at work on a byte stream.
    struct Editor {
        /// What it does.
        tamper: Tamper,
        /// The offset of the next byte (0 at the handshake's end).
        offset: usize,
        /// Bytes kept back to repeat, swap or replay.
        held: Vec<u8>,
    }

    impl Editor {
        /// Takes the stream's next byte and appends what to pass on to `out`.
        fn edit(&mut self, byte: u8, out: &mut Vec<u8>) {
            let at = self.offset;
            self.offset += 1;
            match &self.tamper {
                Tamper::Flip(flipped) => out.push(if at == *flipped { byte ^ 1 } else { byte }),
                Tamper::Drop(dropped) => {
                    if !dropped.contains(&at) {
                        out.push(byte);
                    }
                }
                Tamper::Repeat(repeated) => {
                    out.push(byte);
                    if repeated.contains(&at) {
                        self.held.push(byte);
                        if at + 1 == repeated.end {
                            out.extend_from_slice(&self.held);
                        }
                    }
                }
                Tamper::Swap(first, second) => {
                    if first.contains(&at) {
                        self.held.push(byte);
                    } else {
                        out.push(byte);
                        if at + 1 == second.end {
                            out.extend_from_slice(&self.held);
                        }
                    }
                }
                Tamper::Replay { from, over } => {
                    if from.contains(&at) {
                        self.held.push(byte);
                    }
                    out.push(if over.contains(&at) { self.held[at - over.start] } else { byte });
                }
                Tamper::Record(recorded) => {
                    recorded.lock().unwrap().push(byte);
                    out.push(byte);
                }
            }
        }
    }

    /// A man in the middle of the link from rank 0 to rank 1 (listening at
    /// `rank_1`): it passes the handshake on untouched both ways, then does
    /// `tamper` to what rank 0 sends. Its address, for rank 0 to dial.
    fn man_in_the_middle(rank_1: String, tamper: Tamper) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            let (from_0, _) = listener.accept().unwrap();
            let to_1 = TcpStream::connect(&rank_1).unwrap();
            // Rank 1's side of the handshake (and nothing after it), untouched.
            let (mut back_from, mut back_to) =
                (to_1.try_clone().unwrap(), from_0.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut back_from, &mut back_to);
                let _ = back_to.shutdown(Shutdown::Write);
            });
            // Rank 0's hello, then its proof once rank 1 answered: untouched.
            for len in [HELLO_LEN, TAG_LEN] {
                let mut handshake = vec![0u8; len];
                if (&from_0).read_exact(&mut handshake).is_err()
                    || (&to_1).write_all(&handshake).is_err()
                {
                    return;
                }
            }
            let mut editor = Editor { tamper, offset: 0, held: Vec::new() };
            let mut incoming = [0u8; 4096];
            loop {
                let n = match (&from_0).read(&mut incoming) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let mut out = Vec::new();
                for &byte in &incoming[..n] {
                    editor.edit(byte, &mut out);
                }
                if (&to_1).write_all(&out).is_err() {
                    break;
                }
            }
            let _ = to_1.shutdown(Shutdown::Write);
        });
        address
    }

    /// Forms a ring of two whose link from rank 0 to rank 1 runs through a
    /// [`man_in_the_middle`] that does `tamper`, and runs `f` on both
    /// ranks. Returns rank 0's address (the one rank 1 knows its left
    /// neighbour by) and what `f` returned on each rank.
    fn with_tampered_pair<T: Send>(
        tamper: Tamper,
        f: impl Fn(&mut TcpRing) -> T + Sync,
    ) -> (String, [T; 2]) {
        let a = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let b = RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addresses =
            vec![a.local_addr().unwrap().to_string(), b.local_addr().unwrap().to_string()];
        let through_the_middle =
            vec![addresses[0].clone(), man_in_the_middle(addresses[1].clone(), tamper)];
        let config = RingConfig { timeout: Duration::from_secs(20), segment_floats: 7 };
        let results = std::thread::scope(|scope| {
            let (f, config) = (&f, &config);
            let (addresses, through_the_middle) = (&addresses, &through_the_middle);
            let h0 = scope.spawn(move || {
                f(&mut a.connect(0, through_the_middle, &key(), config.clone()).unwrap())
            });
            let h1 = scope
                .spawn(move || f(&mut b.connect(1, addresses, &key(), config.clone()).unwrap()));
            [h0.join().unwrap(), h1.join().unwrap()]
        });
        (addresses[0].clone(), results)
    }

    /// The layout of what rank 0 sends rank 1 in an all-reduce of
    /// [`TAMPERED_LEN`] floats in segments of 7 in a ring of two: the
    /// header (24 bytes and a tag), then 5 segments of its own chunk (28
    /// bytes and a tag each), then 5 of the chunk rank 1 summed.
    const TAMPERED_LEN: usize = 70;
    /// A header on the wire: 6 words and a tag.
    const HEADER_BYTES: usize = 24 + LINK_TAG_LEN;
    /// A segment of 7 floats on the wire, and its tag.
    const SEGMENT_BYTES: usize = 28 + LINK_TAG_LEN;
    /// All that rank 0 sends rank 1 in one such all-reduce.
    const COLLECTIVE_BYTES: usize = HEADER_BYTES + 10 * SEGMENT_BYTES;

    /// Segment `i` of rank 0's stream in its `op`th all-reduce.
    fn segment(op: usize, i: usize) -> Range<usize> {
        let start = op * COLLECTIVE_BYTES + HEADER_BYTES + i * SEGMENT_BYTES;
        start..start + SEGMENT_BYTES
    }

    /// This rank's values in its `op`th all-reduce (exact in f32, and so
    /// are their sums); different for every op.
    fn tampered_values(rank: usize, op: usize) -> Vec<f32> {
        (0..TAMPERED_LEN).map(|i| (rank * 1000 + op * 100 + i) as f32).collect()
    }

    /// The right sums of the `op`th all-reduce of [`tampered_values`].
    fn tampered_sums(op: usize) -> Vec<f32> {
        let (a, b) = (tampered_values(0, op), tampered_values(1, op));
        a.iter().zip(&b).map(|(a, b)| a + b).collect()
    }

    /// One rank's part in [`reduce_through`]: each all-reduce's outcome
    /// (the sums, or the error), and the outcome of one more collective.
    type Reduced = (Vec<Result<Vec<f32>, CollectiveError>>, Result<(), CollectiveError>);

    /// Runs `ops` all-reduces of [`tampered_values`] through a
    /// [`man_in_the_middle`] that does `tamper`, then one more collective.
    fn reduce_through(tamper: Tamper, ops: usize) -> (String, [Reduced; 2]) {
        with_tampered_pair(tamper, |ring| {
            let outcomes = (0..ops)
                .map(|op| {
                    let mut data = tampered_values(ring.rank(), op);
                    ring.all_reduce_sum(Buffer::Host(&mut data)).map(|()| data)
                })
                .collect();
            let later = ring.all_reduce_sum(Buffer::Host(&mut [1.0f32; 3]));
            (outcomes, later)
        })
    }

    /// Checks that a tampered collective failed on both ranks, on rank 1
    /// with an integrity error naming rank 0 (at `rank_0`) and message
    /// `message` of the link, and that the ring was closed on both.
    fn assert_detected(what: &str, rank_0: &str, message: u64, results: &[Reduced; 2]) {
        for (rank, (outcomes, later)) in results.iter().enumerate() {
            let last = outcomes.last().unwrap();
            assert!(last.is_err(), "{what}: rank {rank} returned sums: {last:?}");
            let later = later.as_ref().expect_err("a closed ring took a later collective");
            assert!(later.to_string().contains("closed"), "{what}: rank {rank}: {later}");
        }
        let error = results[1].0.last().unwrap().as_ref().unwrap_err();
        match error {
            CollectiveError::Tampered { rank: 1, peer: 0, address, message: m }
                if address == rank_0 && *m == message => {}
            other => panic!("{what}: rank 1 failed otherwise: {other:?}"),
        }
        let said = error.to_string();
        assert!(
            said.contains(&format!(
                "rank 1: the data from rank 0 ({rank_0}) failed its integrity check"
            )),
            "{what}: {said}"
        );
        // The ring was closed on this error: a later collective says it.
        let later = results[1].1.as_ref().unwrap_err().to_string();
        assert!(later.contains("failed its integrity check"), "{what}: {later}");
    }

    /// A bit flipped on the wire between two ranks, in a collective's header,
    /// a segment's values or a segment's tag: the all-reduce fails on the
    /// receiving rank with an integrity error that names the sending rank
    /// and its address (and on the other, whose link was closed), never
    /// with wrong sums, and the ring is closed. (Where the values' tags went
    /// unchecked, the flipped value came out in both ranks' sums.)
    #[test]
    fn a_bit_flipped_on_the_wire_fails_the_all_reduce_with_an_integrity_error_naming_the_peer() {
        for (what, at, message) in [
            ("the header", 5, 0),
            // The top byte of the third float of the first segment.
            ("a segment's values", segment(0, 0).start + 2 * 4 + 3, 1),
            ("a segment's tag", segment(0, 1).start + 28 + 3, 2),
        ] {
            let (rank_0, results) = reduce_through(Tamper::Flip(at), 1);
            assert_detected(what, &rank_0, message, &results);
        }
        // Untouched, the same man in the middle changes nothing.
        let (_, results) = reduce_through(Tamper::Flip(usize::MAX), 2);
        for (outcomes, later) in results {
            for (op, outcome) in outcomes.into_iter().enumerate() {
                assert_eq!(outcome.unwrap(), tampered_sums(op));
            }
            later.unwrap();
        }
    }

    /// Whole segments dropped, repeated, swapped, or replayed from an earlier
    /// collective on the wire, each with its valid tag: the message count
    /// catches every one. (Unchecked, a repeated, swapped or replayed
    /// segment came out as wrong sums, and a dropped one as a timeout.)
    #[test]
    fn segments_dropped_repeated_reordered_or_replayed_on_the_wire_are_detected() {
        for (what, tamper, ops, message) in [
            ("dropped", Tamper::Drop(segment(0, 1)), 1, 2),
            ("repeated", Tamper::Repeat(segment(0, 1)), 1, 3),
            ("swapped", Tamper::Swap(segment(0, 1), segment(0, 2)), 1, 2),
            // Op 0 is 11 messages (0 to 10); op 1's header is 11, its
            // segment 1 is 13.
            ("replayed", Tamper::Replay { from: segment(0, 1), over: segment(1, 1) }, 2, 13),
        ] {
            let (rank_0, results) = reduce_through(tamper, ops);
            assert_detected(what, &rank_0, message, &results);
            if ops == 2 {
                // Before the replay: right sums on both ranks.
                for (outcomes, _) in &results {
                    assert_eq!(outcomes[0].as_ref().unwrap(), &tampered_sums(0), "{what}");
                }
            }
        }
    }

    /// A bit flipped in a link probe's zeros: the probe fails on the rank
    /// that receives them, with the integrity error.
    #[test]
    fn a_bit_flipped_in_a_link_probe_is_detected() {
        // The probe's header and its barrier (a header, and one segment of
        // 1 float from rank 0), then blocks of 8 KiB (64 KiB in all).
        let probe_start = 2 * HEADER_BYTES + 4 + LINK_TAG_LEN;
        let at = probe_start + 3 * (8192 + LINK_TAG_LEN) + 100;
        let (rank_0, results) = with_tampered_pair(Tamper::Flip(at), |ring| {
            let probe = ring.probe_incoming_link(1 << 16).map(|_| ());
            (probe, ring.barrier())
        });
        // Rank 0's own probe may have finished (its incoming link was not
        // touched); the barrier after it fails on the links rank 1 closed.
        let [(_, later_0), (probe_1, later_1)] = results;
        assert!(later_0.is_err() && later_1.is_err(), "{later_0:?} {later_1:?}");
        match probe_1 {
            // Header 0, the barrier's 1 and 2, blocks from 3: block 3 is 6.
            Err(CollectiveError::Tampered { rank: 1, peer: 0, address, message: 6 })
                if address == rank_0 => {}
            other => panic!("rank 1's probe: {other:?}"),
        }
    }

    /// The benchmark's switch: plaintext links still sum (every rank
    /// switched), and sealed ones again after switching back; two ranks that
    /// disagree both fail the header check, before any data moves, and stay
    /// in step.
    #[test]
    fn plaintext_links_for_the_benchmark_still_sum_and_switch_back() {
        let results = with_ring(3, |ring| {
            let mut sums = Vec::new();
            for plaintext in [true, false] {
                ring.plaintext_links_for_benchmark_only(plaintext);
                let mut data = vec![ring.rank() as f32; 100];
                ring.all_reduce_sum(Buffer::Host(&mut data)).unwrap();
                sums.push(data);
            }
            sums
        });
        for sums in results {
            assert_eq!(sums, vec![vec![3.0; 100]; 2]);
        }
        let results = with_ring(2, |ring| {
            ring.plaintext_links_for_benchmark_only(ring.rank() == 1);
            let mut data = vec![1.0f32; 100];
            let disagreed = ring.all_reduce_sum(Buffer::Host(&mut data)).map_err(|e| e.to_string());
            ring.plaintext_links_for_benchmark_only(false);
            ring.all_reduce_sum(Buffer::Host(&mut data)).unwrap();
            (disagreed, data)
        });
        for (disagreed, data) in results {
            let error = disagreed.expect_err("ranks that disagree on sealing summed");
            assert!(error.contains("the benchmark's switch"), "{error}");
            assert_eq!(data, vec![2.0; 100]);
        }
    }

    /// Nothing a rank sends after the handshake is readable on the wire: a
    /// man in the middle that records rank 0's stream over two all-reduces
    /// finds none of its values' bytes, not even a run of 8 of them (two
    /// floats), where the benchmark's plaintext links show every segment.
    #[test]
    fn the_values_a_rank_sends_are_not_readable_on_the_wire() {
        let sent_in_the_clear = |plaintext: bool| {
            let recorded = Arc::new(Mutex::new(Vec::new()));
            let (_, results) = with_tampered_pair(Tamper::Record(recorded.clone()), |ring| {
                ring.plaintext_links_for_benchmark_only(plaintext);
                (0..2)
                    .map(|op| {
                        let mut data = tampered_values(ring.rank(), op);
                        ring.all_reduce_sum(Buffer::Host(&mut data)).unwrap();
                        data
                    })
                    .collect::<Vec<_>>()
            });
            for sums in results {
                assert_eq!(sums, vec![tampered_sums(0), tampered_sums(1)]);
            }
            let wire = recorded.lock().unwrap().clone();
            assert!(wire.len() >= 2 * 10 * 28, "recorded {} bytes", wire.len());
            // Rank 0's values, and the sums it forwards, in runs of 8 bytes.
            let mut runs = Vec::new();
            for op in 0..2 {
                for values in [tampered_values(0, op), tampered_sums(op)] {
                    let bytes: &[u8] = bytemuck::cast_slice(&values);
                    runs.extend(bytes.chunks_exact(8).map(<[u8]>::to_vec));
                }
            }
            let found = runs.iter().filter(|run| wire.windows(8).any(|w| w == &run[..])).count();
            (found, runs.len())
        };
        let (found, runs) = sent_in_the_clear(false);
        assert_eq!(found, 0, "{found} of {runs} runs of values were readable on the wire");
        // The same check finds them on links that do not seal.
        let (found, runs) = sent_in_the_clear(true);
        assert!(found >= runs / 3, "only {found} of {runs} runs found in plaintext");
    }
}
