//! [`RingListener`], the bound ring port, and the forming of the ring from
//! it: dialling the right neighbour (again until the deadline) and proving
//! this rank to it while accepting the left neighbour, then setting the
//! links' timeouts.

use super::accept::accept_left;
use super::handshake::{prove_to_right, time_left, Handshake, RingKey};
use super::sealing::LinkCipher;
use super::{Links, RingConfig, TcpRing};
use crate::CollectiveError;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

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
                (left, &addresses[left], &left_ips),
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

/// A connection to the first of `addresses` that takes one (each within
/// 5 s, and by `deadline`), or the last one's error.
fn connect_to_first(
    addresses: impl Iterator<Item = SocketAddr>,
    deadline: Instant,
) -> std::io::Result<TcpStream> {
    let mut last = std::io::Error::other("address resolves to nothing");
    for address in addresses {
        let within = time_left(deadline).min(Duration::from_secs(5));
        match TcpStream::connect_timeout(&address, within) {
            Ok(stream) => return Ok(stream),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Connects to `address`, trying again until `deadline`, or until `give_up`
/// is set (the other link failed first). A name that resolves to several
/// addresses (IPv6 and IPv4) is tried at each in turn, as a TCP client
/// does: the first may be one the peer does not listen on.
fn connect_with_retry(
    address: &str,
    deadline: Instant,
    give_up: &AtomicBool,
) -> std::io::Result<TcpStream> {
    let mut wait = Duration::from_millis(10);
    loop {
        let attempt = address.to_socket_addrs().and_then(|all| connect_to_first(all, deadline));
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A name that resolves to an address nobody listens on first (an IPv6
    /// one, say) and the peer's next: the ring connects to the second.
    #[test]
    fn the_ring_connects_to_the_first_resolved_address_that_answers() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let refused = closed.local_addr().unwrap();
        drop(closed);
        let open = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = open.local_addr().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let stream = connect_to_first([refused, peer].into_iter(), deadline).unwrap();
        assert_eq!(stream.peer_addr().unwrap(), peer);
        assert!(connect_to_first([refused].into_iter(), deadline).is_err());
        assert!(connect_to_first(std::iter::empty(), deadline).is_err());
    }
}
