//! The link probe: after a header and a barrier, sealed blocks of zeros go
//! right while as many come from the left, timed from the first block's
//! arrival (see [`Collective::probe_incoming_link`]).

use super::all_reduce::Direction;
use super::sealing::{lock, receive_message, send_message, Message};
use super::TcpRing;
use crate::{Collective, CollectiveError, LinkRate};
use std::time::{Duration, Instant};

/// The header's element code of a link probe, whose elements are bytes.
const PROBE_CODE: u32 = 2;

/// The fewest bytes a link probe sends: enough to time past its first block.
const PROBE_MIN_BYTES: usize = 64 * 1024;

/// The largest block a link probe writes or reads at once.
const PROBE_BLOCK: usize = 1 << 20;

impl TcpRing {
    /// The link probe (see [`Collective::probe_incoming_link`]): after a
    /// header and a barrier, so that the ranks start within about one hop of
    /// each other, `bytes` of zeros go right while as many come from the
    /// left; the rate counts from the arrival of the first block, so a
    /// neighbour that started a little later is not charged to its link.
    pub(super) fn probe_links(
        &mut self,
        bytes: usize,
    ) -> Result<Option<LinkRate>, CollectiveError> {
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
