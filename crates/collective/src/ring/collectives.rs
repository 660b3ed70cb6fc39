//! [`TcpRing`]'s collectives: the header each one starts with, the closing
//! of the ring when one fails, the links' errors, and the [`Collective`]
//! implementation (all-reduce, broadcast as an all-reduce, link probe).

use super::element::{element_code, Bf16, Element};
use super::sealing::{lock, receive_message, send_message, IntegrityFailure, Message};
use super::TcpRing;
use crate::{Buffer, Collective, CollectiveError, LinkRate};
use std::net::Shutdown;
use std::sync::atomic::Ordering;

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
    pub(super) fn unless_closed<R>(
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
    pub(super) fn link_err(&self, peer: usize, source: std::io::Error) -> CollectiveError {
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

    /// Passes `(op, len, element type, whether data is sealed)` around the
    /// ring and checks the left neighbour agrees.
    pub(super) fn check_header(&mut self, len: usize, element: u32) -> Result<(), CollectiveError> {
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
