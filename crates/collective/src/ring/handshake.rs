//! The handshake that authenticates a link before it carries anything (the
//! connecting side's hello with a fresh nonce, the accepting side's nonce
//! and proof, the connecting side's proof and the verdict, each proof an
//! HMAC-SHA256 under the job's [`RingKey`]), and the derivation of the keys:
//! the ring key from the job's secret, and each link's from the ring key and
//! the handshake's fresh values. The protocol is described in the `ring`
//! module's documentation.

use super::sealing::{message_key, LinkCipher};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// "RSB5": the authenticated hello, under a ring key of the job's
/// generation stretched from its token, and links whose every message is
/// encrypted and authenticated (see the module documentation).
pub(super) const MAGIC: u32 = 0x5253_4235;
/// The hellos of earlier versions, refused with a word that says which:
/// "RSB4" (a ring key of one HMAC of the token, the same for every
/// generation), "RSB3" (links whose messages were tagged, not encrypted)
/// and "RSB2" (links that carried untagged data).
const OLDER_MAGICS: [(u32, &str); 3] = [
    (0x5253_4234, "RSB4, whose ring key is one HMAC of the token, shared by every generation"),
    (0x5253_4233, "RSB3, whose links carry tagged but unencrypted data"),
    (0x5253_4232, "RSB2, whose links carry untagged data"),
];
/// Bytes of a nonce and of an HMAC-SHA256 tag.
pub(super) const NONCE_LEN: usize = 32;
pub(super) const TAG_LEN: usize = 32;
/// The label of a link key's derivation (see [`RingKey::link_cipher`]).
const LINK_KEY_LABEL: &[u8] = b"rsb ring link v2";
/// PBKDF2 iterations of the ring key's derivation from the job token (see
/// [`RingKey::derive`]): about 75 ms of one core of an AMD EPYC (with
/// SHA extensions).
pub const RING_KEY_ITERATIONS: u32 = 300_000;
/// The salt of that derivation (its version: v1 was one HMAC).
const RING_KEY_SALT: &[u8] = b"rsb ring key v2";
/// The label of one ring's key (see [`RingKey::for_ring`]).
const RING_OF_LABEL: &[u8] = b"rsb ring of one generation v1";
/// The direction of a link key: the data a connection carries flows from
/// its connecting side (the left rank) to its accepting side.
const CONNECTOR_TO_ACCEPTOR: &[u8] = b"connector to acceptor";
/// Magic, rank, world, nonce.
pub(super) const HELLO_LEN: usize = 12 + NONCE_LEN;
/// The accepting side's answer to a proof it accepted.
pub(super) const ACCEPTED: u8 = 1;
/// The accepting side's answer to a proof it refused.
pub(super) const REFUSED: u8 = 0;
/// Longest a handshake may take, however its bytes trickle in; a silent
/// stranger's connection is dropped after it (and never holds up the real
/// neighbour's handshake, which runs beside it).
pub(super) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// The ring key of a job whose shared secret is `secret` (the job
    /// token): PBKDF2-HMAC-SHA256(secret, salt "rsb ring key v2",
    /// [`RING_KEY_ITERATIONS`]), so the token itself is never used as the key
    /// of anything but this derivation, and a stranger who records a
    /// listener's proof (any host that reaches a ring port while the ring
    /// forms gets one, for a hello of its choosing) pays that many HMACs per
    /// token it guesses offline, not one: a token a user chose (16
    /// characters at least) is not found by a dictionary at HMAC speed.
    /// About 75 ms, once per rank process.
    pub fn derive(secret: &[u8]) -> RingKey {
        let mut key = [0u8; 32];
        let iterations = std::num::NonZeroU32::new(RING_KEY_ITERATIONS)
            .unwrap_or_else(|| unreachable!("the iteration count is not zero"));
        ring::pbkdf2::derive(
            ring::pbkdf2::PBKDF2_HMAC_SHA256,
            iterations,
            RING_KEY_SALT,
            secret,
            &mut key,
        );
        RingKey(key)
    }

    /// The key of one ring: that of generation `generation` of the job
    /// `job_id`, HMAC-SHA256(ring key, "rsb ring of one generation v1" ||
    /// the id's length (8 bytes, little-endian) || the id || the generation
    /// (8 bytes, little-endian)). Every generation of an elastic job and
    /// every run of a sweep shares the job token, so the job's key alone
    /// let a rank of another generation or run (a replaced one, still
    /// dialling its old neighbour's address for up to its collective
    /// timeout, where a new ring's rank now listens) pass the handshake and
    /// take the real neighbour's place, mixing two rings' gradients; under
    /// the ring's own key it is refused as a stranger.
    pub fn for_ring(&self, job_id: &str, generation: u64) -> RingKey {
        let id_len = (job_id.len() as u64).to_le_bytes();
        let generation = generation.to_le_bytes();
        let parts: [&[u8]; 4] = [RING_OF_LABEL, &id_len, job_id.as_bytes(), &generation];
        RingKey(tag(&self.0, &parts))
    }

    /// The proof of one side of the handshake over the hello and the
    /// accepting side's nonce; `role` keeps one side's proof from serving as
    /// the other's.
    pub(super) fn proof(&self, role: &[u8], hello: &[u8], nonce: &[u8]) -> [u8; TAG_LEN] {
        tag(&self.0, &[role, hello, nonce])
    }

    /// Whether `candidate` is that proof (constant-time comparison).
    pub(super) fn verify(&self, role: &[u8], hello: &[u8], nonce: &[u8], candidate: &[u8]) -> bool {
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
    pub(super) fn link_cipher(&self, hello: &[u8], nonce: &[u8]) -> LinkCipher {
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

fn hmac_of(key: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length: this cannot fail.
    <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!("HMAC key length"))
}

pub(super) fn tag(key: &[u8], parts: &[&[u8]]) -> [u8; TAG_LEN] {
    let mut mac = hmac_of(key);
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

pub(super) const ACCEPTOR_ROLE: &[u8] = b"rsb ring acceptor";
pub(super) const CONNECTOR_ROLE: &[u8] = b"rsb ring connector";

/// The time from now to `until`, at least a millisecond (a socket's
/// timeout cannot be zero): a handshake's writes end by its deadline too.
pub(super) fn time_left(until: Instant) -> Duration {
    until.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))
}

fn nonce() -> std::io::Result<[u8; NONCE_LEN]> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n).map_err(|e| std::io::Error::other(format!("random nonce: {e}")))?;
    Ok(n)
}

/// How a handshake failed.
#[derive(Debug)]
pub(super) enum Handshake {
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
pub(super) fn prove_to_right(
    stream: &TcpStream,
    rank: usize,
    world: usize,
    key: &RingKey,
    deadline: Instant,
) -> Result<LinkCipher, Handshake> {
    let until = (Instant::now() + HANDSHAKE_TIMEOUT).min(deadline);
    stream.set_write_timeout(Some(time_left(until)))?;
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
                // The ring's deadline, when sooner, cuts the handshake's.
                format!(
                    "the handshake did not finish by its deadline ({HANDSHAKE_TIMEOUT:?}, or the \
                     ring's if sooner)"
                ),
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
pub(super) fn challenge_left(
    stream: &TcpStream,
    key: &RingKey,
    until: Instant,
    settle: impl FnOnce() -> bool,
) -> Result<(u32, u32, LinkCipher), Handshake> {
    stream.set_write_timeout(Some(time_left(until)))?;
    let mut io = stream;
    let mut hello = [0u8; HELLO_LEN];
    read_exact_until(stream, &mut hello, until)?;
    let word = |i: usize| u32::from_le_bytes([hello[i], hello[i + 1], hello[i + 2], hello[i + 3]]);
    if let Some((_, older)) = OLDER_MAGICS.iter().find(|(magic, _)| word(0) == *magic) {
        return Err(Handshake::Refused(format!(
            "it is a ring peer of an older version (hello {older}; this rank's is RSB5, \
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
