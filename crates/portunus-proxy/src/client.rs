//! The upstream client: keep-alive HTTP/1.1 connections to upstreams, pooled per worker.
//!
//! Each worker thread has its own [`UpstreamClient`], so a pooled connection is driven by the
//! thread that uses it. A connection goes back to the pool the moment its response body has
//! been read to the end (a response without a body: at once), and is taken out again newest
//! first, so a steady load keeps reusing the same few warm connections. Compared with
//! hyper-util's pooled client this saves, per request, a task spawned to watch the connection
//! become idle again, the boxing of the request and connect futures, and a key of scheme and
//! authority cloned and hashed twice.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::uri::Authority;
use http::{Request, Response};
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::debug;

use crate::forward::UpstreamBody;
use crate::proxy::lock;

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
    /// The exchange on an open connection failed.
    #[error("the upstream connection failed")]
    Http(#[source] hyper::Error),
}

impl UpstreamError {
    /// Whether no connection was made: the upstream never saw the request.
    pub fn is_connect(&self) -> bool {
        !matches!(self, Self::Http(_))
    }
}

/// Idle connections of one upstream, oldest first.
type IdleList = Vec<Idle>;

/// How long a pooled connection must have been idle before a request sent on it keeps a
/// copy of its head, to be sent again should the upstream have closed the connection at that
/// moment (keep-alive timeouts run from 2 s in gunicorn to 75 s in nginx; under load a
/// connection is reused within milliseconds).
const STALE_AFTER: Duration = Duration::from_secs(1);

/// A copy of `req` if sending it twice is safe (RFC 9110 §9.2.2: an idempotent method and
/// no body).
fn replayable(req: &Request<UpstreamBody>) -> Option<Request<UpstreamBody>> {
    if !matches!(req.body(), Either::Right(_)) || !is_idempotent(req.method()) {
        return None;
    }
    let mut copy = Request::new(Either::Right(Empty::new()));
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    Some(copy)
}

/// RFC 9110 §9.2.2.
pub(crate) fn is_idempotent(method: &http::Method) -> bool {
    use http::Method;
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Whether the exchange failed before any part of a response arrived, because the
/// connection was closed or reset under it (or the request was never sent).
pub(crate) fn closed_before_response(error: &hyper::Error) -> bool {
    error.is_incomplete_message()
        || error.is_canceled()
        || error.is_closed()
        || std::error::Error::source(error)
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .is_some_and(|io| {
                matches!(
                    io.kind(),
                    std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::BrokenPipe
                )
            })
}

/// An upstream's address, the key of its idle connections: compared and hashed as one
/// lowercased string (an [`Authority`] hashes byte by byte, case-folding each).
#[derive(Debug, Clone)]
pub(crate) struct Address {
    key: Arc<str>,
    authority: Authority,
}

impl Address {
    pub(crate) fn new(authority: Authority) -> Self {
        Self {
            key: authority.as_str().to_ascii_lowercase().into(),
            authority,
        }
    }
}

impl PartialEq for Address {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

impl Eq for Address {}

impl std::hash::Hash for Address {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.key.hash(state);
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.authority.as_str())
    }
}

#[derive(Debug)]
struct Idle {
    sender: SendRequest<UpstreamBody>,
    since: Instant,
}

/// Keep-alive HTTP/1.1 connections to upstreams, for the worker thread that owns it.
#[derive(Debug)]
pub(crate) struct UpstreamClient {
    idle: Mutex<HashMap<Address, IdleList>>,
    /// Whether a task is closing connections that stayed idle too long.
    sweeping: std::sync::atomic::AtomicBool,
    max_idle: usize,
    idle_timeout: Duration,
    connect_timeout: Duration,
}

/// A connection lent to one request; it returns to its pool through [`Pooled::release`].
#[derive(Debug)]
pub(crate) struct Pooled {
    sender: SendRequest<UpstreamBody>,
    key: Address,
    client: Arc<UpstreamClient>,
}

impl Pooled {
    /// The exchange is complete (the response body read to its end): the connection may
    /// carry the next request. Dropping a `Pooled` instead closes the connection.
    pub(crate) fn release(self) {
        self.client.put(self.key, self.sender);
    }
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

    /// Sends `req` (origin-form URI, `Host` set) to the upstream at `address`, on an idle
    /// connection if one is ready, else on a new one.
    ///
    /// An upstream may close an idle connection just as it is reused. A request that the
    /// connection could not take goes out again on another, whatever its method (it was never
    /// written). One that was written but got no response at all goes out again on a new
    /// connection if it is safe to (idempotent, no body) and the connection had been idle for
    /// [`STALE_AFTER`] or more: only then is a copy of its head kept, so busy connections,
    /// reused within moments, cost no copy.
    pub(crate) async fn send(
        self: &Arc<Self>,
        address: &Address,
        mut req: Request<UpstreamBody>,
    ) -> Result<(Response<Incoming>, Pooled), UpstreamError> {
        let mut fresh = false;
        loop {
            let pooled = if fresh { None } else { self.checkout(address) };
            let (mut sender, idle_since) = match pooled {
                Some((sender, since)) => (sender, Some(since)),
                None => (self.connect(&address.authority).await?, None),
            };
            let replay = idle_since
                .filter(|since| since.elapsed() >= STALE_AFTER)
                .and_then(|_| replayable(&req));
            match sender.try_send_request(req).await {
                Ok(response) => {
                    let pooled = Pooled {
                        sender,
                        key: address.clone(),
                        client: Arc::clone(self),
                    };
                    return Ok((response, pooled));
                }
                Err(mut error) => match (error.take_message(), replay) {
                    (Some(unsent), _) if idle_since.is_some() => {
                        debug!(upstream = %address, error = %error.error(), "pooled connection closed; sending on another");
                        req = unsent;
                    }
                    (None, Some(copy)) if closed_before_response(error.error()) => {
                        debug!(upstream = %address, error = %error.error(), "long-idle pooled connection closed before answering; sending again on a new one");
                        req = copy;
                        fresh = true;
                    }
                    _ => return Err(UpstreamError::Http(error.into_error())),
                },
            }
        }
    }

    /// The most recently used idle connection that is ready for a request, and since when it
    /// has been idle.
    fn checkout(&self, key: &Address) -> Option<(SendRequest<UpstreamBody>, Instant)> {
        let mut idle = lock(&self.idle);
        let list = idle.get_mut(key)?;
        while let Some(i) = list.len().checked_sub(1) {
            let entry = list.swap_remove(i);
            if entry.sender.is_ready() {
                return Some((entry.sender, entry.since));
            }
            // Closed by the upstream, or still finishing its last exchange (rare: the
            // connection's task runs before the body's end is seen): let it go.
        }
        None
    }

    /// Keeps a connection whose exchange is complete for the next request.
    fn put(self: &Arc<Self>, key: Address, sender: SendRequest<UpstreamBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = lock(&self.idle);
        let list = idle.entry(key).or_default();
        if list.len() >= self.max_idle {
            return;
        }
        list.push(Idle {
            sender,
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
            list.retain(|entry| {
                !entry.sender.is_closed() && now.duration_since(entry.since) < self.idle_timeout
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

    /// Opens a connection: resolves the name, tries each address in turn within the connect
    /// timeout, and starts the connection's task.
    async fn connect(
        &self,
        authority: &Authority,
    ) -> Result<SendRequest<UpstreamBody>, UpstreamError> {
        let stream = tokio::time::timeout(self.connect_timeout, open(authority))
            .await
            .map_err(|_| UpstreamError::ConnectTimeout)??;
        let (sender, connection) = http1::Builder::new()
            // One buffer per write (head and body copied together) instead of `writev`:
            // proxied messages are mostly small.
            .writev(false)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(UpstreamError::Http)?;
        tokio::spawn(async move {
            if let Err(error) = connection.with_upgrades().await {
                debug!(error = %error, "upstream connection ended");
            }
        });
        Ok(sender)
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
    use http_body_util::{BodyExt as _, Either, Empty};
    use portunus_test_utils::{EchoServer, wait_until};

    fn get(up: &EchoServer, path: &str) -> Request<UpstreamBody> {
        Request::builder()
            .uri(path)
            .header(http::header::HOST, up.addr.to_string())
            .body(Either::Right(Empty::new()))
            .unwrap()
    }

    /// One exchange read to its end, its connection given back.
    async fn exchange(client: &Arc<UpstreamClient>, up: &EchoServer, path: &str) {
        let address = Address::new(up.addr.to_string().parse().unwrap());
        let (response, pooled) = client.send(&address, get(up, path)).await.unwrap();
        assert_eq!(response.status(), 200);
        response.into_body().collect().await.unwrap();
        pooled.release();
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
        let request = Request::builder()
            .uri("/")
            .body(Either::Right(Empty::new()))
            .unwrap();
        let error = client.send(&address, request).await.unwrap_err();
        assert!(matches!(error, UpstreamError::Connect(_)), "{error:?}");
        assert!(error.is_connect());
    }
}
