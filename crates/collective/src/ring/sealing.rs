//! The cipher of a link's data once its handshake succeeded: AES-256-GCM
//! under the link's key, each message's nonce its sequence number (counted
//! at both ends, never sent), a fresh key every [`MESSAGES_PER_KEY`]
//! messages, and the sending and receiving of one sealed message on a
//! stream. The protocol is described in the `ring` module's documentation.

use super::handshake::{tag, TAG_LEN};
#[cfg(any(test, feature = "bench"))]
use super::RingKey;
#[cfg(doc)]
use crate::CollectiveError;
use ::ring::aead::{
    Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_256_GCM, NONCE_LEN as AEAD_NONCE_LEN,
};
use std::io::{IoSlice, Read, Write};
use std::net::TcpStream;
use std::sync::{Mutex, MutexGuard};
#[cfg(any(test, feature = "bench"))]
use std::time::{Duration, Instant};

/// Bytes of the tag that follows every message on a link: AES-256-GCM's.
pub(super) const LINK_TAG_LEN: usize = 16;
/// The label of the derivation of a link's key for each run of
/// [`MESSAGES_PER_KEY`] messages from the link key.
const MESSAGE_KEY_LABEL: &[u8] = b"rsb ring link messages";
/// Messages sealed under one key: a link moves on to a fresh key (derived
/// from its link key and the run's number, by both ends) after this many,
/// so that no key seals more than 2^16 segments (16 GiB at the default
/// 64 Ki floats), well within AES-GCM's bound for one key (about 2^38.5
/// bytes for the margin TLS 1.3 keeps), where a long run sends tens of
/// terabytes on a link.
pub(super) const MESSAGES_PER_KEY: u64 = 1 << 16;

/// The AES-256-GCM key of run `run` of [`MESSAGES_PER_KEY`] messages on a
/// link: HMAC-SHA256(link key, "rsb ring link messages" || run).
pub(super) fn message_key(link_key: &[u8], run: u64) -> LessSafeKey {
    let key = tag(link_key, &[MESSAGE_KEY_LABEL, &run.to_be_bytes()]);
    // A 32-byte key is AES-256's length: this cannot fail.
    let key =
        UnboundKey::new(&AES_256_GCM, &key).unwrap_or_else(|_| unreachable!("AES-256 key length"));
    LessSafeKey::new(key)
}

/// The cipher of one link's data, at one of its ends: the sending side
/// seals each message, the receiving side opens each, both counting the
/// messages (see the module documentation).
pub(super) struct LinkCipher {
    /// The link key, which the message keys are derived from (never sent).
    pub(super) link_key: [u8; TAG_LEN],
    /// AES-256-GCM under the key of the current run of messages
    /// ([`message_key`] of `next / MESSAGES_PER_KEY`).
    pub(super) key: LessSafeKey,
    /// The sequence number of the next message, its nonce (never sent: both
    /// sides count; keys of their own for every connection and every run of
    /// messages, so no nonce is used twice under a key).
    pub(super) next: u64,
    /// Whether data messages (segments, probe blocks) are sealed: always in
    /// a product ring; only the benchmark's comparison turns it off (see
    /// `TcpRing::plaintext_links_for_benchmark_only`, with the `bench`
    /// feature). Headers always are.
    pub(super) data_sealed: bool,
    /// The sending side's ciphertext of the message being sent (the data
    /// it seals is the caller's, and stays plaintext there).
    pub(super) sealed: Vec<u8>,
}

/// What a message on a link is: its header tells the collective (and
/// whether its data is sealed), so it is always sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Message {
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
pub(super) struct IntegrityFailure {
    /// The message's sequence number on the link.
    pub(super) message: u64,
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
    pub(super) fn seal(&mut self, bytes: &[u8]) -> std::io::Result<(&[u8], [u8; LINK_TAG_LEN])> {
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
    pub(super) fn open(
        &mut self,
        bytes: &mut [u8],
        tag: &[u8; LINK_TAG_LEN],
    ) -> Result<(), IntegrityFailure> {
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
pub(super) fn lock(cipher: &Mutex<LinkCipher>) -> MutexGuard<'_, LinkCipher> {
    cipher.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sends one message, `bytes`, sealed: its ciphertext, then its tag (one
/// write call where it fits).
pub(super) fn send_message(
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
pub(super) fn receive_message(
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
