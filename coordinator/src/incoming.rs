//! The connections the coordinator's server takes, kept from being a way to
//! starve it: at most [`Limits::connections`] open at once
//! ([`connections_for`] the job's hosts by default, at least
//! [`MAX_CONNECTIONS`]; the process's open-files limit is raised to hold
//! them, [`raise_open_files_limit`]) and
//! [`MAX_CONNECTIONS_PER_PEER`] from one address (one more is closed as
//! soon as it is accepted), each closed unless a call on it presents the
//! job token within [`TOKEN_CALL_DEADLINE`] of its opening (a stranger,
//! who has no token, holds no connection longer, whether it says nothing,
//! speaks HTTP/2 and pings, makes calls that are refused, or never reads
//! the answers), and a failed
//! accept (no file descriptor left) pauses the accepting for
//! [`ACCEPT_ERROR_PAUSE`] instead of retrying at once in a busy loop.
//! [`crate::service::TokenCheck`] marks a connection whose call presents
//! the token ([`ConnectionInfo::vouch`]); from then on it is held as long
//! as its peer keeps it. Within its deadline a stranger holds at most
//! [`MAX_CONNECTIONS_PER_PEER`] connections from one address. Hosts that
//! reach the coordinator through one address (behind one NAT) share one
//! address's share (`up --max-connections-per-address` sets it). With every
//! connection taken, a new one closes the oldest that has not presented the
//! token and is older than [`EVICT_UNPROVEN_AFTER`] (a member's first call
//! comes within milliseconds), rather than being closed itself: strangers
//! from many addresses, holding every connection for their deadline, do not
//! lock the members out.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{ready, Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Connections open at once for a job of few hosts (the least default);
/// past the limit, new ones are closed at once.
pub const MAX_CONNECTIONS: usize = 512;

/// Connections a host may hold: its agent's and one per rank (8 GPUs take
/// about 10 with `status` calls), with room for 14 GPUs.
pub const CONNECTIONS_PER_HOST: usize = 16;

/// The default connection limit of a job of up to `hosts` hosts: room for
/// [`CONNECTIONS_PER_HOST`] each, and never less than [`MAX_CONNECTIONS`]
/// (64 hosts of 8 GPUs hold about 640: a fixed 512 refused the ranks past
/// it, and the job could not start).
pub fn connections_for(hosts: usize) -> usize {
    MAX_CONNECTIONS.max(hosts.saturating_mul(CONNECTIONS_PER_HOST))
}

/// The descriptors `connections` connections may hold at once: the limit,
/// and an eighth more that are closing, evicted for new ones.
pub fn descriptors_for(connections: usize) -> usize {
    connections + connections.div_ceil(8)
}

/// File descriptors the coordinator keeps for other than connections (its
/// run or sweep folder's files, logs, the state file, libraries).
pub const FILES_BESIDES_CONNECTIONS: u64 = 256;

/// The process's open-files limit (`RLIMIT_NOFILE`), raised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFilesLimit {
    /// The soft limit now in force.
    pub soft: u64,
    /// The hard limit, which an unprivileged process cannot raise.
    pub hard: u64,
}

/// Raises this process's soft open-files limit to `wanted`, or to the hard
/// limit where that is lower (many systems start processes with a soft
/// limit of 1024, which connections past about 750 would exceed: each
/// accept would fail, "too many open files"). A soft limit already high
/// enough is left as it is.
pub fn raise_open_files_limit(wanted: u64) -> std::io::Result<OpenFilesLimit> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(std::io::Error::from)?;
    if soft >= wanted {
        return Ok(OpenFilesLimit { soft, hard });
    }
    let raised = wanted.min(hard);
    setrlimit(Resource::RLIMIT_NOFILE, raised, hard).map_err(std::io::Error::from)?;
    Ok(OpenFilesLimit { soft: raised, hard })
}

/// Connections open at once from one address (a host's agent and ranks use
/// one each, a few more for `status`: 8 GPUs take about 10); past it, new
/// ones are closed at once.
pub const MAX_CONNECTIONS_PER_PEER: usize = 64;

/// How old a connection that has not presented the job token must be for a
/// new one to close it when every connection is taken.
pub const EVICT_UNPROVEN_AFTER: Duration = Duration::from_secs(2);

/// The limits of an [`Incoming`].
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once.
    pub connections: usize,
    /// Connections open at once from one address.
    pub per_peer: usize,
    /// How long a new connection may go without a call that presents the
    /// job token.
    pub token_call: Duration,
    /// How old a connection without such a call must be to be closed for a
    /// new one when every connection is taken.
    pub evict_unproven_after: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            connections: MAX_CONNECTIONS,
            per_peer: MAX_CONNECTIONS_PER_PEER,
            token_call: TOKEN_CALL_DEADLINE,
            evict_unproven_after: EVICT_UNPROVEN_AFTER,
        }
    }
}

/// Open connections, in all and per address, and those that have not yet
/// presented the token, oldest first.
#[derive(Debug, Default)]
struct OpenConnections {
    all: usize,
    per_peer: HashMap<IpAddr, usize>,
    unproven: VecDeque<Unproven>,
}

/// A connection that had not presented the token when it was accepted
/// (dropped from the queue once it has, or is gone).
#[derive(Debug)]
struct Unproven {
    opened: Instant,
    vouched: Weak<AtomicBool>,
    eviction: Weak<Eviction>,
}

/// The mark that a connection is to be closed to make room, and the waker
/// of its last read, woken to close it.
#[derive(Debug, Default)]
struct Eviction {
    evicted: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Eviction {
    /// Marks the connection, and takes the waker of its last read, for the
    /// caller to wake once it holds no lock.
    fn mark(&self) -> Option<Waker> {
        self.evicted.store(true, Ordering::Release);
        self.waker.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl Unproven {
    /// Whether its connection is open, has not presented the token, and is
    /// not being closed.
    fn pending(&self) -> bool {
        let live = self.vouched.upgrade().zip(self.eviction.upgrade());
        live.is_some_and(|(vouched, eviction)| {
            !vouched.load(Ordering::Acquire) && !eviction.evicted.load(Ordering::Acquire)
        })
    }
}

impl OpenConnections {
    /// Forgets, from the front, the connections that are gone, presented
    /// the token, or are being closed.
    fn prune(&mut self) {
        while self.unproven.front().is_some_and(|front| !front.pending()) {
            self.unproven.pop_front();
        }
    }

    /// Marks the oldest connection that has not presented the token to be
    /// closed, if it is older than `after`: `Some` with the waker of its
    /// read (to wake once the lock is released), `None` when there is none.
    fn evict_oldest_unproven(&mut self, after: Duration) -> Option<Option<Waker>> {
        self.prune();
        let front = self.unproven.front()?;
        if front.opened.elapsed() < after {
            return None;
        }
        let waker = front.eviction.upgrade().and_then(|eviction| eviction.mark());
        self.unproven.pop_front();
        Some(waker)
    }
}

/// How long a new connection may go without a call that presents the job
/// token before it is closed. A member calls at once: an agent joins, a
/// rank asks for its assignment, `status` asks.
pub const TOKEN_CALL_DEADLINE: Duration = Duration::from_secs(10);

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
    /// unless a limit is reached: then says which. With every connection
    /// taken, the oldest that has not presented the token (older than
    /// [`Limits::evict_unproven_after`]) is marked to be closed to make
    /// room; those marked count until they are closed (their next read), and
    /// past an eighth more than the limit nothing is admitted. Returns the
    /// new connection's marks (vouched, evicted) and the evicted one's waker,
    /// to wake once the lock is released.
    #[allow(clippy::type_complexity)]
    fn admit(
        &self,
        peer: IpAddr,
    ) -> Result<(Arc<AtomicBool>, Arc<Eviction>, Option<Waker>), String> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let from_peer = open.per_peer.get(&peer).copied().unwrap_or(0);
        if from_peer >= self.limits.per_peer {
            return Err(format!(
                "{} connections from its address are open already",
                self.limits.per_peer
            ));
        }
        let full = || format!("{} connections are open already", self.limits.connections);
        let mut evicted = None;
        if open.all >= self.limits.connections {
            // Connections marked but not yet closed still hold descriptors.
            let ceiling = descriptors_for(self.limits.connections);
            if open.all >= ceiling {
                return Err(full());
            }
            evicted = Some(
                open.evict_oldest_unproven(self.limits.evict_unproven_after).ok_or_else(full)?,
            );
        }
        open.per_peer.insert(peer, from_peer + 1);
        open.all += 1;
        let (vouched, eviction) = (Arc::<AtomicBool>::default(), Arc::<Eviction>::default());
        open.unproven.push_back(Unproven {
            opened: Instant::now(),
            vouched: Arc::downgrade(&vouched),
            eviction: Arc::downgrade(&eviction),
        });
        open.prune();
        // Entries behind a long-lived one are not pruned from the front:
        // the queue is swept whole once it outgrows the connections.
        if open.unproven.len() > 2 * self.limits.connections + 16 {
            open.unproven.retain(Unproven::pending);
        }
        Ok((vouched, eviction, evicted.flatten()))
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
                    let admitted = this.admit(key);
                    if let Err(full) = &admitted {
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
                    let Ok((vouched, eviction, evicted)) = admitted else { continue };
                    if let Some(waker) = evicted {
                        waker.wake();
                    }
                    let token_call = Box::pin(tokio::time::sleep(this.limits.token_call));
                    return Poll::Ready(Some(Ok(Connection {
                        stream,
                        token_call: Some(token_call),
                        vouched,
                        eviction,
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
/// no call on it presents the job token in time.
pub struct Connection {
    stream: TcpStream,
    /// Until a call presents the token ([`ConnectionInfo::vouch`]).
    token_call: Option<Pin<Box<Sleep>>>,
    vouched: Arc<AtomicBool>,
    /// Set when a new connection needed its room before it presented the token.
    eviction: Arc<Eviction>,
    peer: IpAddr,
    open: Arc<Mutex<OpenConnections>>,
}

/// What the server's calls know of their [`Connection`] (tonic puts it in
/// each request's extensions): its addresses, and the mark that a call on
/// it presented the job token.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    tcp: TcpConnectInfo,
    vouched: Arc<AtomicBool>,
}

impl ConnectionInfo {
    /// The peer's address.
    pub fn remote_addr(&self) -> Option<SocketAddr> {
        self.tcp.remote_addr()
    }

    /// Marks the connection as one whose call presented the job token: it
    /// is no longer closed at [`TOKEN_CALL_DEADLINE`].
    pub fn vouch(&self) {
        self.vouched.store(true, Ordering::Release);
    }

    /// The connection of `request`, served over TLS or not (tonic puts
    /// the connection's own info in a TLS request's extensions too, beside
    /// its TLS info).
    pub fn of<T>(request: &tonic::Request<T>) -> Option<&ConnectionInfo> {
        request.extensions().get::<ConnectionInfo>()
    }
}

/// The peer's address of `request` (tonic's `Request::remote_addr` knows
/// only its own connection types).
pub fn remote_addr<T>(request: &tonic::Request<T>) -> Option<SocketAddr> {
    ConnectionInfo::of(request).and_then(ConnectionInfo::remote_addr)
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

impl Connection {
    /// Why the connection is to be closed now, if it is: no call on it has
    /// presented the job token, and its deadline passed or a new connection
    /// needed its room. Checked on reads and on writes alike, and registers
    /// the task to be woken at the deadline or when evicted: a stranger that
    /// never reads its socket stops the server's reads of it (HTTP/2 reads no
    /// more while its replies cannot be written), so the check on reads alone
    /// would never close it.
    fn unproven_closing(&mut self, cx: &mut Context<'_>) -> Option<std::io::Error> {
        let deadline = self.token_call.as_mut()?;
        if self.vouched.load(Ordering::Acquire) {
            self.token_call = None;
            return None;
        }
        if self.eviction.evicted.load(Ordering::Acquire) {
            return Some(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "closed to make room: every connection was taken, and no call on this one \
                 presented the job token",
            ));
        }
        if deadline.as_mut().poll(cx).is_ready() {
            // Whatever it sent, nothing of it was a call with the token.
            return Some(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no call on the connection presented the job token in time",
            ));
        }
        // Woken to be closed, should a new connection need its room.
        let mut waker = self.eviction.waker.lock().unwrap_or_else(|p| p.into_inner());
        *waker = Some(cx.waker().clone());
        drop(waker);
        // Evicted between the check above and the waker's registration.
        if self.eviction.evicted.load(Ordering::Acquire) {
            cx.waker().wake_by_ref();
        }
        None
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        match this.unproven_closing(cx) {
            Some(closing) => Poll::Ready(Err(closing)),
            None => read,
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if let Some(closing) = this.unproven_closing(cx) {
            return Poll::Ready(Err(closing));
        }
        Pin::new(&mut this.stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Some(closing) = this.unproven_closing(cx) {
            return Poll::Ready(Err(closing));
        }
        Pin::new(&mut this.stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if let Some(closing) = this.unproven_closing(cx) {
            return Poll::Ready(Err(closing));
        }
        Pin::new(&mut this.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl Connected for Connection {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        ConnectionInfo { tcp: self.stream.connect_info(), vouched: Arc::clone(&self.vouched) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_stream::StreamExt;

    /// No connection is old enough to be closed for a new one.
    const NEVER: Duration = Duration::from_secs(3600);

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
        let limits = Limits {
            connections: 1,
            per_peer: 8,
            token_call: Duration::from_secs(60),
            evict_unproven_after: NEVER,
        };
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
        let limits = Limits {
            connections: 8,
            per_peer: 2,
            token_call: Duration::from_secs(60),
            evict_unproven_after: NEVER,
        };
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
    async fn a_connection_without_a_call_with_the_token_is_closed_at_its_deadline_whatever_it_sends(
    ) {
        let (listener, address) = listening().await;
        let limits = Limits {
            connections: 8,
            per_peer: 8,
            token_call: Duration::from_millis(300),
            evict_unproven_after: NEVER,
        };
        let mut incoming = Incoming::with_limits(listener, limits);
        let _silent_client = TcpStream::connect(address).await.unwrap();
        let mut silent = incoming.next().await.unwrap().unwrap();
        let started = std::time::Instant::now();
        let read = silent.read(&mut [0u8; 8]).await;
        assert_eq!(read.unwrap_err().kind(), std::io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(250), "{:?}", started.elapsed());

        // One that talks, but never with the token (a stranger's HTTP/2
        // pings, or its refused calls), is closed at the deadline too.
        let mut talking_client = TcpStream::connect(address).await.unwrap();
        let mut talking = incoming.next().await.unwrap().unwrap();
        let started = std::time::Instant::now();
        let mut byte = [0u8; 1];
        let closed = loop {
            if talking_client.write_all(b"h").await.is_err() {
                break None;
            }
            match talking.read_exact(&mut byte).await {
                Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(e) => break Some(e.kind()),
            }
            assert!(started.elapsed() < Duration::from_secs(5), "a talking stranger was kept");
        };
        assert_eq!(closed, Some(std::io::ErrorKind::TimedOut));
        assert!(started.elapsed() >= Duration::from_millis(250), "{:?}", started.elapsed());

        // One whose call presented the token waits on past the deadline.
        let mut member_client = TcpStream::connect(address).await.unwrap();
        let mut member = incoming.next().await.unwrap().unwrap();
        member_client.write_all(b"h").await.unwrap();
        member.read_exact(&mut byte).await.unwrap();
        member.connect_info().vouch();
        tokio::time::sleep(Duration::from_millis(500)).await;
        member_client.write_all(b"i").await.unwrap();
        member.read_exact(&mut byte).await.unwrap();
        assert_eq!(&byte, b"i");
    }

    /// A stranger that never reads its socket: the server's writes to it
    /// stall, as HTTP/2's do when a peer floods pings and never reads the
    /// answers, and the server then reads no more of it. Its connection is
    /// closed at the deadline all the same, by the stalled write.
    #[tokio::test]
    async fn a_stranger_that_never_reads_is_closed_at_its_deadline_by_a_stalled_write() {
        let (listener, address) = listening().await;
        let limits = Limits {
            connections: 8,
            per_peer: 8,
            token_call: Duration::from_millis(300),
            evict_unproven_after: NEVER,
        };
        let mut incoming = Incoming::with_limits(listener, limits);
        let _deaf_client = TcpStream::connect(address).await.unwrap();
        let mut deaf = incoming.next().await.unwrap().unwrap();
        let started = Instant::now();
        // Far more than the two sockets' buffers hold.
        let replies = vec![0u8; 64 << 20];
        let write = tokio::time::timeout(Duration::from_secs(5), deaf.write_all(&replies)).await;
        let error = write.expect("a stranger that never reads was kept").unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut, "{error}");
        assert!(started.elapsed() >= Duration::from_millis(250), "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn a_refused_address_is_not_counted_and_a_closed_ones_count_is_gone() {
        let (listener, address) = listening().await;
        let limits = Limits {
            connections: 1,
            per_peer: 8,
            token_call: Duration::from_secs(60),
            evict_unproven_after: NEVER,
        };
        let mut incoming = Incoming::with_limits(listener, limits);
        let open = Arc::clone(&incoming.open);
        let _first_client = TcpStream::connect(address).await.unwrap();
        let first = incoming.next().await.unwrap().unwrap();
        let next = tokio::spawn(async move { incoming.next().await.map(|c| c.is_ok()) });
        // Another loopback address (all of 127.0.0.0/8 is loopback on
        // Linux), refused while the one connection allowed is open.
        let other = tokio::net::TcpSocket::new_v4().unwrap();
        other.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut refused = other.connect(address).await.unwrap();
        assert!(closed(&mut refused).await, "a connection past the limit stayed open");
        {
            let open = open.lock().unwrap();
            assert_eq!(open.all, 1);
            let counted: Vec<_> = open.per_peer.iter().collect();
            assert_eq!(counted, [(&"127.0.0.1".parse::<IpAddr>().unwrap(), &1)], "{open:?}");
        }
        drop(first);
        let open = open.lock().unwrap();
        assert_eq!((open.all, open.per_peer.len()), (0, 0), "{open:?}");
        drop(open);
        next.abort();
    }
    /// Every connection taken, by a member and a stranger's silent one: a
    /// new connection is closed while the stranger's is young, and once it
    /// is older than `evict_unproven_after`, a new one closes it and is
    /// handed over; the member's stays.
    #[tokio::test]
    async fn with_every_connection_taken_the_oldest_without_the_token_makes_room() {
        let (listener, address) = listening().await;
        let evict_unproven_after = Duration::from_secs(3);
        let limits = Limits {
            connections: 2,
            per_peer: 8,
            token_call: Duration::from_secs(60),
            evict_unproven_after,
        };
        let mut incoming = Incoming::with_limits(listener, limits);
        let mut member_client = TcpStream::connect(address).await.unwrap();
        let mut member = incoming.next().await.unwrap().unwrap();
        member.connect_info().vouch();
        let _stranger_client = TcpStream::connect(address).await.unwrap();
        let mut stranger = incoming.next().await.unwrap().unwrap();
        let stranger_accepted = Instant::now();
        // Read, as the server reads every connection.
        let stranger_read = tokio::spawn(async move {
            let read = stranger.read(&mut [0u8; 1]).await;
            read.map_err(|e| e.to_string())
        });
        // Young, the stranger's connection keeps its room.
        let mut young = TcpStream::connect(address).await.unwrap();
        let handed = tokio::time::timeout(Duration::from_millis(300), incoming.next()).await;
        assert!(handed.is_err(), "a connection past the limit was handed over");
        assert!(closed(&mut young).await, "a connection past the limit stayed open");
        assert!(stranger_accepted.elapsed() < evict_unproven_after, "too slow to test");
        // Older, it is closed for the next one, which is handed over.
        tokio::time::sleep(evict_unproven_after.saturating_sub(stranger_accepted.elapsed())).await;
        let _next_client = TcpStream::connect(address).await.unwrap();
        let next = tokio::time::timeout(Duration::from_secs(5), incoming.next()).await;
        assert!(matches!(next, Ok(Some(Ok(_)))), "the new connection was not handed over");
        let read = tokio::time::timeout(Duration::from_secs(5), stranger_read).await;
        let error = read.expect("the stranger's connection stayed open").unwrap().unwrap_err();
        assert!(error.contains("closed to make room"), "{error}");
        // The member's connection goes on.
        member_client.write_all(b"m").await.unwrap();
        let mut byte = [0u8; 1];
        member.read_exact(&mut byte).await.unwrap();
        assert_eq!(&byte, b"m");
    }
}
