//! The connections the coordinator's server takes, kept from being a way to
//! starve it: at most [`MAX_CONNECTIONS`] open at once and
//! [`MAX_CONNECTIONS_PER_PEER`] from one address (one more is closed as
//! soon as it is accepted), each closed unless it sends its first bytes
//! within [`FIRST_BYTES_DEADLINE`] (a stranger that opens connections and
//! says nothing holds none of them), and a failed accept (no file
//! descriptor left) pauses the accepting for [`ACCEPT_ERROR_PAUSE`] instead
//! of retrying at once in a busy loop. The job token is checked per call,
//! after all this: a stranger that starts a connection and then idles
//! holds it, but from one address at most
//! [`MAX_CONNECTIONS_PER_PEER`] of them, so it takes one address's share;
//! it takes them all only from [`MAX_CONNECTIONS`] / [`MAX_CONNECTIONS_PER_PEER`]
//! addresses. Hosts that reach the coordinator through one address (behind
//! one NAT) share one address's share too (`up --max-connections-per-address`
//! sets it).

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Connections open at once; past it, new ones are closed at once.
pub const MAX_CONNECTIONS: usize = 512;

/// Connections open at once from one address (a host's agent and ranks use
/// one each, a few more for `status`: 8 GPUs take about 10); past it, new
/// ones are closed at once.
pub const MAX_CONNECTIONS_PER_PEER: usize = 64;

/// The limits of an [`Incoming`].
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once.
    pub connections: usize,
    /// Connections open at once from one address.
    pub per_peer: usize,
    /// How long a new connection may stay silent.
    pub first_bytes: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            connections: MAX_CONNECTIONS,
            per_peer: MAX_CONNECTIONS_PER_PEER,
            first_bytes: FIRST_BYTES_DEADLINE,
        }
    }
}

/// Open connections, in all and per address.
#[derive(Debug, Default)]
struct OpenConnections {
    all: usize,
    per_peer: HashMap<IpAddr, usize>,
}

/// How long a new connection may stay silent before it is closed.
pub const FIRST_BYTES_DEADLINE: Duration = Duration::from_secs(10);

/// How long accepting pauses after an accept failed.
pub const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The stream of connections [`crate::service::serve`] serves.
pub struct Incoming {
    listener: TcpListener,
    open: Arc<Mutex<OpenConnections>>,
    limits: Limits,
    pause: Option<Pin<Box<Sleep>>>,
    refused: u64,
}

impl Incoming {
    /// Connections accepted on `listener` within `limits`.
    pub fn with_limits(listener: TcpListener, limits: Limits) -> Incoming {
        Incoming { listener, open: Arc::default(), limits, pause: None, refused: 0 }
    }

    /// Counts a new connection from `peer` (its [`peer_key`]) as open,
    /// unless a limit is reached: then says which.
    fn admit(&self, peer: IpAddr) -> Result<(), String> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.all >= self.limits.connections {
            return Err(format!("{} connections are open already", self.limits.connections));
        }
        let from_peer = open.per_peer.get(&peer).copied().unwrap_or(0);
        if from_peer >= self.limits.per_peer {
            return Err(format!(
                "{} connections from its address are open already",
                self.limits.per_peer
            ));
        }
        open.per_peer.insert(peer, from_peer + 1);
        open.all += 1;
        Ok(())
    }
}

/// The address a peer's connections are counted under: its own, with an
/// IPv4 address that reaches an IPv6 listener as `::ffff:a.b.c.d` counted
/// as itself. (Not an IPv6 peer's /64: a data centre's hosts share theirs.)
pub fn peer_key(peer: IpAddr) -> IpAddr {
    peer.to_canonical()
}

impl tokio_stream::Stream for Incoming {
    type Item = std::io::Result<Connection>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(pause) = &mut this.pause {
                ready!(pause.as_mut().poll(cx));
                this.pause = None;
            }
            match ready!(this.listener.poll_accept(cx)) {
                Ok((stream, peer)) => {
                    let key = peer_key(peer.ip());
                    if let Err(full) = this.admit(key) {
                        this.refused += 1;
                        // Logged at the 1st, 2nd, 4th, 8th, ... refusal: a
                        // flood does not flood the log.
                        if this.refused.is_power_of_two() {
                            tracing::warn!(
                                %peer,
                                refused = this.refused,
                                "closed a connection at once: {full}"
                            );
                        }
                        drop(stream);
                        continue;
                    }
                    let first_bytes = Box::pin(tokio::time::sleep(this.limits.first_bytes));
                    return Poll::Ready(Some(Ok(Connection {
                        stream,
                        first_bytes: Some(first_bytes),
                        peer: key,
                        open: Arc::clone(&this.open),
                    })));
                }
                Err(e) => {
                    tracing::warn!("accepting a connection failed: {e}; pausing the accepting");
                    this.pause = Some(Box::pin(tokio::time::sleep(ACCEPT_ERROR_PAUSE)));
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }
}

/// One accepted connection: counted while open, closed with a read error if
/// its first bytes do not come in time.
pub struct Connection {
    stream: TcpStream,
    first_bytes: Option<Pin<Box<Sleep>>>,
    peer: IpAddr,
    open: Arc<Mutex<OpenConnections>>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.all = open.all.saturating_sub(1);
        if let std::collections::hash_map::Entry::Occupied(mut from_peer) =
            open.per_peer.entry(self.peer)
        {
            *from_peer.get_mut() -= 1;
            if *from_peer.get() == 0 {
                from_peer.remove();
            }
        }
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        let Some(deadline) = &mut this.first_bytes else { return read };
        match read {
            Poll::Ready(Ok(())) if buf.filled().len() > before => this.first_bytes = None,
            Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the connection sent nothing in time",
                )));
            }
            _ => {}
        }
        read
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl Connected for Connection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_stream::StreamExt;

    async fn listening() -> (TcpListener, std::net::SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        (listener, address)
    }

    /// Whether the server closed `client` (it reads the end, or a reset).
    async fn closed(client: &mut TcpStream) -> bool {
        let read = tokio::time::timeout(Duration::from_secs(5), client.read(&mut [0u8; 8])).await;
        matches!(read, Ok(Ok(0)) | Ok(Err(_)))
    }

    #[test]
    fn an_ipv4_peer_counts_as_itself_on_an_ipv6_listener_too() {
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(peer_key(v4), v4);
        assert_eq!(peer_key("::ffff:192.0.2.7".parse().unwrap()), v4, "mapped on a [::] listener");
        // Two hosts of one IPv6 subnet are two peers.
        let a = peer_key("2001:db8:1:2::a".parse().unwrap());
        assert_ne!(a, peer_key("2001:db8:1:2::b".parse().unwrap()));
    }

    #[tokio::test]
    async fn connections_past_the_limit_are_closed_until_one_closes() {
        let (listener, address) = listening().await;
        let limits = Limits { connections: 1, per_peer: 8, first_bytes: Duration::from_secs(60) };
        let mut incoming = Incoming::with_limits(listener, limits);
        let _first_client = TcpStream::connect(address).await.unwrap();
        let first = incoming.next().await.unwrap().unwrap();
        // While the first is open, the next connections are accepted and
        // closed, and none is handed over.
        let next = tokio::spawn(async move { incoming.next().await.map(|c| c.is_ok()) });
        for _ in 0..2 {
            let mut past_the_limit = TcpStream::connect(address).await.unwrap();
            assert!(closed(&mut past_the_limit).await, "a connection past the limit stayed open");
        }
        assert!(!next.is_finished(), "a connection past the limit was handed over");
        // With the first closed, a new connection is handed over.
        drop(first);
        let _last_client = TcpStream::connect(address).await.unwrap();
        let handed = tokio::time::timeout(Duration::from_secs(5), next).await;
        assert!(matches!(handed, Ok(Ok(Some(true)))), "{handed:?}");
    }

    #[tokio::test]
    async fn one_address_gets_at_most_its_share_of_the_connections() {
        let (listener, address) = listening().await;
        let limits = Limits { connections: 8, per_peer: 2, first_bytes: Duration::from_secs(60) };
        let mut incoming = Incoming::with_limits(listener, limits);
        let _clients = [
            TcpStream::connect(address).await.unwrap(),
            TcpStream::connect(address).await.unwrap(),
        ];
        let first = incoming.next().await.unwrap().unwrap();
        let _second = incoming.next().await.unwrap().unwrap();
        let next = tokio::spawn(async move { incoming.next().await.map(|c| c.is_ok()) });
        let mut third = TcpStream::connect(address).await.unwrap();
        assert!(closed(&mut third).await, "a third connection from one address stayed open");
        assert!(!next.is_finished());
        drop(first);
        let _fourth = TcpStream::connect(address).await.unwrap();
        let handed = tokio::time::timeout(Duration::from_secs(5), next).await;
        assert!(matches!(handed, Ok(Ok(Some(true)))), "{handed:?}");
    }

    #[tokio::test]
    async fn a_connection_that_sends_nothing_is_closed_at_its_deadline_one_that_talks_is_not() {
        let (listener, address) = listening().await;
        let limits =
            Limits { connections: 8, per_peer: 8, first_bytes: Duration::from_millis(300) };
        let mut incoming = Incoming::with_limits(listener, limits);
        let _silent_client = TcpStream::connect(address).await.unwrap();
        let mut silent = incoming.next().await.unwrap().unwrap();
        let started = std::time::Instant::now();
        let read = silent.read(&mut [0u8; 8]).await;
        assert_eq!(read.unwrap_err().kind(), std::io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(250), "{:?}", started.elapsed());

        let mut talking_client = TcpStream::connect(address).await.unwrap();
        let mut talking = incoming.next().await.unwrap().unwrap();
        talking_client.write_all(b"h").await.unwrap();
        let mut byte = [0u8; 1];
        talking.read_exact(&mut byte).await.unwrap();
        // Past the deadline, a connection that spoke in time waits on.
        tokio::time::sleep(Duration::from_millis(500)).await;
        talking_client.write_all(b"i").await.unwrap();
        talking.read_exact(&mut byte).await.unwrap();
        assert_eq!(&byte, b"i");
    }
}
