//! The upstream client: keep-alive HTTP/1.1 connections to upstreams, pooled per worker.
//!
//! Each worker thread has its own [`UpstreamClient`], so a pooled connection is driven by the
//! thread that uses it, by the task of the request using it (the codec is [`crate::wire`]). A
//! connection goes back to the pool the moment its response body has been read to the end (a
//! response without a body: at once), and is taken out again newest first, so a steady load
//! keeps reusing the same few warm connections.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Response;
use http::uri::Authority;
use http_body::{Body, Frame, SizeHint};
use tokio::net::TcpStream;
use tracing::debug;

use crate::proxy::lock;
use crate::wire::{self, BoxError, Conn, Decoder, Exchange, MalformedResponse, Outgoing, Reading};

/// Why an upstream request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamError {
    /// The upstream's name did not resolve.
    #[error("resolving the upstream's address")]
    Resolve(#[source] std::io::Error),
    /// No connection could be made.
    #[error("connecting to the upstream")]
    Connect(#[source] std::io::Error),
    /// No connection was made within the connect timeout.
    #[error("connecting to the upstream timed out")]
    ConnectTimeout,
    /// The upstream closed or reset the connection before its response head was complete.
    #[error("the upstream closed the connection before answering")]
    Closed(#[source] Option<std::io::Error>),
    /// Reading the response body failed.
    #[error("reading from the upstream failed")]
    Io(#[source] std::io::Error),
    /// The upstream closed the connection before the end of the response body.
    #[error("the upstream closed the connection before the response's end")]
    Truncated,
    /// The upstream's response is not valid HTTP/1.1.
    #[error("the upstream's response is malformed")]
    Malformed(#[source] MalformedResponse),
    /// The client's request body failed while it was being sent (too large, stalled, or
    /// malformed).
    #[error("the request body could not be sent")]
    RequestBody(#[source] BoxError),
}

impl UpstreamError {
    /// Whether no connection was made: the upstream never saw the request.
    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            Self::Resolve(_) | Self::Connect(_) | Self::ConnectTimeout
        )
    }

    /// Whether the exchange failed before any complete response head arrived, because the
    /// upstream closed or reset the connection under it.
    pub fn closed_before_response(&self) -> bool {
        matches!(self, Self::Closed(_))
    }
}

/// Idle connections of one upstream, oldest first.
type IdleList = Vec<Idle>;

/// How long a pooled connection must have been idle before a request lost on it (written,
/// then the connection closed without an answer) is sent again: an upstream's keep-alive
/// timeout may have struck just as it was reused (they run from 2 s in gunicorn to 75 s in
/// nginx; under load a connection is reused within milliseconds).
const STALE_AFTER: Duration = Duration::from_secs(1);

/// RFC 9110 §9.2.2.
pub(crate) fn is_idempotent(method: &http::Method) -> bool {
    use http::Method;
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// An upstream's address, the key of its idle connections: compared and hashed as one
/// lowercased string (an [`Authority`] hashes byte by byte, case-folding each). Cloned with
/// one reference count: each lent connection keeps one, to find its way back.
#[derive(Debug, Clone)]
pub(crate) struct Address(Arc<AddressInner>);

#[derive(Debug)]
struct AddressInner {
    key: Box<str>,
    /// `key` hashed once: the idle map hashes nothing per request (see [`KeyHasher`]).
    hash: u64,
    authority: Authority,
}

impl Address {
    pub(crate) fn new(authority: Authority) -> Self {
        let key: Box<str> = authority.as_str().to_ascii_lowercase().into();
        let hash = std::hash::BuildHasher::hash_one(
            &std::hash::BuildHasherDefault::<std::hash::DefaultHasher>::default(),
            &key,
        );
        Self(Arc::new(AddressInner {
            key,
            hash,
            authority,
        }))
    }
}

/// Hashes an [`Address`] by the hash it carries (computed once from its key; upstream
/// addresses come from the configuration, not from clients).
#[derive(Debug, Default)]
struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Idle connections by upstream address.
type IdleMap = HashMap<Address, IdleList, std::hash::BuildHasherDefault<KeyHasher>>;

impl PartialEq for Address {
    fn eq(&self, other: &Self) -> bool {
        self.0.key == other.0.key
    }
}

impl Eq for Address {}

impl std::hash::Hash for Address {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.0.hash);
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.authority.as_str())
    }
}

#[derive(Debug)]
struct Idle {
    conn: Conn,
    since: Instant,
}

/// Keep-alive HTTP/1.1 connections to upstreams, for the worker thread that owns it.
#[derive(Debug)]
pub(crate) struct UpstreamClient {
    idle: Mutex<IdleMap>,
    /// Whether a task is closing connections that stayed idle too long.
    sweeping: std::sync::atomic::AtomicBool,
    max_idle: usize,
    idle_timeout: Duration,
    connect_timeout: Duration,
}

/// Where a lent connection goes back to.
#[derive(Debug)]
struct Home {
    key: Address,
    client: Arc<UpstreamClient>,
}

impl UpstreamClient {
    /// A client keeping at most `max_idle` idle connections per upstream, each for at most
    /// `idle_timeout`.
    pub(crate) fn new(max_idle: usize, idle_timeout: Duration, connect_timeout: Duration) -> Self {
        Self {
            idle: Mutex::default(),
            sweeping: std::sync::atomic::AtomicBool::new(false),
            max_idle,
            idle_timeout,
            connect_timeout,
        }
    }

    /// Sends `req` to the upstream at `address`, on an idle connection if one is ready, else
    /// on a new one, and returns the response once its head has arrived; its body streams
    /// from the connection, which goes back to the pool at the body's end.
    ///
    /// An upstream may close an idle connection just as it is reused. A request of which
    /// nothing could be written goes out again on another connection, whatever its method.
    /// One that was written but got no response at all goes out again on a new connection if
    /// it is safe to (idempotent, no body) and the connection had been idle for
    /// [`STALE_AFTER`] or more.
    ///
    /// The response's fields go into `spare`'s allocation (the request's own map, which a
    /// response takes, emptied; see [`wire::parse_head`]): it is left as it was when no
    /// response came.
    pub(crate) async fn send(
        self: &Arc<Self>,
        address: &Address,
        mut req: Outgoing,
        spare: &mut http::HeaderMap,
    ) -> Result<Response<ResponseBody>, UpstreamError> {
        let mut fresh = false;
        loop {
            let pooled = if fresh { None } else { self.checkout(address) };
            let (mut conn, idle_since) = match pooled {
                Some((conn, since)) => (conn, Some(since)),
                None => (self.connect(&address.0.authority).await?, None),
            };
            let mut state = Exchange::default();
            let result = std::future::poll_fn(|cx| {
                wire::poll_exchange(&mut conn, &mut req, &mut state, spare, cx)
            })
            .await;
            let error = match result {
                Ok(head) => {
                    let reading = Reading::new(&head, req, &state);
                    let home = Home {
                        key: address.clone(),
                        client: Arc::clone(self),
                    };
                    let upgraded = head.response.status() == http::StatusCode::SWITCHING_PROTOCOLS;
                    return Ok(head
                        .response
                        .map(|()| ResponseBody::new(conn, reading, home, upgraded)));
                }
                Err(error) => error,
            };
            match error {
                UpstreamError::Closed(_) if idle_since.is_some() && !req.wrote() => {
                    debug!(upstream = %address, %error, "pooled connection closed; sending on another");
                }
                UpstreamError::Closed(_)
                    if req.is_replayable()
                        && idle_since.is_some_and(|since| since.elapsed() >= STALE_AFTER) =>
                {
                    debug!(upstream = %address, %error, "long-idle pooled connection closed before answering; sending again on a new one");
                    fresh = true;
                }
                error => return Err(error),
            }
            req.rewind();
        }
    }

    /// The most recently used idle connection that is ready for a request, and since when it
    /// has been idle.
    fn checkout(&self, key: &Address) -> Option<(Conn, Instant)> {
        let mut idle = lock(&self.idle);
        let list = idle.get_mut(key)?;
        while let Some(mut entry) = list.pop() {
            if entry.conn.is_reusable() {
                return Some((entry.conn, entry.since));
            }
            // Closed by the upstream: let it go.
        }
        None
    }

    /// Keeps a connection whose exchange is complete for the next request.
    fn put(self: &Arc<Self>, key: Address, conn: Conn) {
        let mut idle = lock(&self.idle);
        let list = idle.entry(key).or_default();
        if list.len() >= self.max_idle {
            return;
        }
        list.push(Idle {
            conn: conn.idle(),
            since: Instant::now(),
        });
        drop(idle);
        if !self
            .sweeping
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            Arc::clone(self).start_sweeper();
        }
    }

    /// Closes idle connections once they have waited `idle_timeout`, while any are left.
    fn start_sweeper(self: Arc<Self>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.sweeping
                .store(false, std::sync::atomic::Ordering::Relaxed);
            return;
        };
        let period = (self.idle_timeout / 2).max(Duration::from_millis(10));
        let client = Arc::downgrade(&self);
        drop(self);
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let Some(client) = client.upgrade() else {
                    return;
                };
                if client.sweep(Instant::now()) == 0 {
                    client
                        .sweeping
                        .store(false, std::sync::atomic::Ordering::Relaxed);
                    return;
                }
            }
        });
    }

    /// Drops idle connections that are closed or older than the idle timeout; returns how
    /// many stay.
    fn sweep(&self, now: Instant) -> usize {
        let mut idle = lock(&self.idle);
        idle.retain(|_, list| {
            list.retain_mut(|entry| {
                now.duration_since(entry.since) < self.idle_timeout && entry.conn.is_reusable()
            });
            !list.is_empty()
        });
        idle.values().map(Vec::len).sum()
    }

    /// Idle connections kept, over all upstreams.
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        lock(&self.idle).values().map(Vec::len).sum()
    }

    /// Opens a connection: resolves the name and tries each address in turn within the
    /// connect timeout.
    async fn connect(&self, authority: &Authority) -> Result<Conn, UpstreamError> {
        let stream = tokio::time::timeout(self.connect_timeout, open(authority))
            .await
            .map_err(|_| UpstreamError::ConnectTimeout)??;
        Ok(Conn::new(stream))
    }
}

/// An upstream's response body, read from its connection by the task that polls it. The
/// connection goes back to its pool once the body has been read to its end (a response
/// without a body: at once); dropped before that, or after an error, it is closed.
#[derive(Debug)]
pub(crate) struct ResponseBody {
    conn: Option<Conn>,
    reading: Reading,
    home: Option<Home>,
    /// An error, given out at the next poll (see `poll_frame`).
    failed: Option<Box<UpstreamError>>,
}

impl ResponseBody {
    /// The body of a response whose head has arrived on `conn`; after a `101` (`upgraded`)
    /// the connection is kept for [`ResponseBody::into_tunnel`].
    fn new(conn: Conn, reading: Reading, home: Home, upgraded: bool) -> Self {
        let mut body = Self {
            conn: Some(conn),
            reading,
            home: (!upgraded).then_some(home),
            failed: None,
        };
        if body.reading.decoder == Decoder::Done {
            body.finish();
        }
        body
    }

    /// The connection as a byte stream after `101 Switching Protocols` (never pooled again).
    pub(crate) fn into_tunnel(mut self) -> Option<wire::Tunnel> {
        self.home = None;
        self.conn.take().map(Conn::into_tunnel)
    }

    /// The body has ended: the connection goes back to its pool if it can carry another
    /// request, else it is closed; after a `101` it stays for its tunnel.
    fn finish(&mut self) {
        let Some(home) = self.home.take() else {
            return;
        };
        if let Some(conn) = self.conn.take()
            && self.reading.reusable(&conn)
        {
            home.client.put(home.key, conn);
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = UpstreamError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        let this = self.get_mut();
        if let Some(error) = this.failed.take() {
            return Poll::Ready(Some(Err(*error)));
        }
        let Some(conn) = this.conn.as_mut() else {
            return Poll::Ready(None);
        };
        match this.reading.poll_body(conn, cx) {
            Poll::Ready(Some(Err(error))) => {
                // Closed at once, but reported one poll later: hyper drops what it has not
                // yet written when a body fails, and the client should get what came before
                // the failure (the head, the data up to a truncation), as from nginx.
                this.conn = None;
                this.home = None;
                this.failed = Some(Box::new(error));
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            polled => {
                // The last frame, or the end (which only comes once the body is done).
                if polled.is_ready() && this.reading.decoder == Decoder::Done {
                    this.finish();
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.reading.decoder == Decoder::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.reading.decoder {
            Decoder::Length(n) => SizeHint::with_exact(n),
            Decoder::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// A TCP connection to `authority` (port 80 unless it names one), Nagle off, keep-alive
/// probes after a minute of silence.
async fn open(authority: &Authority) -> Result<TcpStream, UpstreamError> {
    let port = authority.port_u16().unwrap_or(80);
    let host = authority.host();
    let literal = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
        .parse::<IpAddr>();
    let addrs: Vec<SocketAddr> = match literal {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => tokio::net::lookup_host((host, port))
            .await
            .map_err(UpstreamError::Resolve)?
            .collect(),
    };
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                stream.set_nodelay(true).map_err(UpstreamError::Connect)?;
                let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
                socket2::SockRef::from(&stream)
                    .set_tcp_keepalive(&keepalive)
                    .map_err(UpstreamError::Connect)?;
                return Ok(stream);
            }
            Err(error) => last = Some(error),
        }
    }
    Err(UpstreamError::Connect(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "the name resolved to no address",
        )
    })))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use http_body_util::BodyExt as _;
    use portunus_test_utils::{EchoServer, wait_until};

    /// A `GET path` for `host`, as the proxy encodes it.
    fn get(host: &str, path: &str) -> Outgoing {
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::HOST, host.parse().unwrap());
        let target = wire::Target {
            base: "",
            path,
            query: None,
        };
        Outgoing::new(&http::Method::GET, target, &headers, b"", None, false)
    }

    /// One exchange read to its end, its connection given back.
    async fn exchange(client: &Arc<UpstreamClient>, up: &EchoServer, path: &str) {
        let address = Address::new(up.addr.to_string().parse().unwrap());
        let host = up.addr.to_string();
        let response = client
            .send(&address, get(&host, path), &mut http::HeaderMap::new())
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.into_body().collect().await.unwrap();
    }

    #[tokio::test]
    async fn idle_connections_are_capped_and_closed_after_the_idle_timeout() {
        let up = EchoServer::start("up").await.unwrap();
        let client = Arc::new(UpstreamClient::new(
            2,
            Duration::from_millis(300),
            Duration::from_secs(5),
        ));
        // Four exchanges at once need four connections; two stay idle afterwards.
        let paths = ["/slow?ms=200"; 4];
        futures_util::future::join_all(paths.iter().map(|p| exchange(&client, &up, p))).await;
        assert_eq!(up.accepted_connections(), 4);
        assert_eq!(client.idle_count(), 2);
        // The next one reuses an idle connection.
        exchange(&client, &up, "/").await;
        assert_eq!(up.accepted_connections(), 4);
        // Left alone, they are closed once the idle timeout has passed.
        assert!(wait_until(Duration::from_secs(5), || client.idle_count() == 0).await);
        exchange(&client, &up, "/").await;
        assert_eq!(up.accepted_connections(), 5);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = Address::new(listener.local_addr().unwrap().to_string().parse().unwrap());
        drop(listener);
        let client = Arc::new(UpstreamClient::new(
            2,
            Duration::from_secs(1),
            Duration::from_secs(5),
        ));
        let error = client
            .send(&address, get("a.test", "/"), &mut http::HeaderMap::new())
            .await
            .unwrap_err();
        assert!(matches!(error, UpstreamError::Connect(_)), "{error:?}");
        assert!(error.is_connect());
    }
}
