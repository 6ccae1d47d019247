//! The proxy: compiled sites, the upstream client, listeners and graceful shutdown.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use portunus_router::{Router, Site};
use portunus_store::ACME_TLS_ALPN;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, debug_span, info, warn};

use crate::client::UpstreamClient;
use crate::conn::{Activity, Expired, ParkPolicy, ParkableIo, TrackedIo, WhenWoken};
use crate::error::{Error, Result};
use crate::forward::{Action, ConnCtx, SiteInfo, Table, Target, handle};
use crate::headers::ClientConn;
use crate::metrics::{Registry, escape};
use crate::settings::{Handler, ProxySettings};
use crate::streams::{Streams, WithStreams};
use crate::upstream::Pool;

/// A reverse proxy: routes requests by host and path to upstream pools.
///
/// Cheap to clone; clones share the routing table, health state and metrics.
/// [`Proxy::update`] swaps in new sites without touching open connections.
///
/// To serve one address from several threads, bind it once per thread with `SO_REUSEPORT`
/// and call [`Proxy::serve`] (or [`Proxy::serve_tls`]) on each thread's runtime: the
/// connection caps count over all sockets of one address, and each thread keeps its own
/// upstream connection pool, so a pooled connection is driven by the thread that uses it.
#[derive(Debug, Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    table: ArcSwap<Table>,
    /// One upstream client (and connection pool) per thread that serves a listener, so a
    /// pooled connection is driven by the thread that uses it.
    clients:
        std::sync::Mutex<std::collections::HashMap<std::thread::ThreadId, Arc<UpstreamClient>>>,
    connect_timeout: Duration,
    max_header_bytes: usize,
    max_headers: usize,
    h2_max_streams: u32,
    metrics: Registry,
    max_connections: usize,
    max_connections_per_ip: usize,
    /// The connection counts of each listening address, shared by every socket serving it
    /// (one per worker thread), so the caps hold per listener.
    open: std::sync::Mutex<
        std::collections::HashMap<std::net::SocketAddr, std::sync::Weak<ConnLimits>>,
    >,
    /// The certificates of the HTTPS listener, to refuse requests for hosts the
    /// connection's certificate does not cover (421).
    resolver: arc_swap::ArcSwapOption<portunus_store::CertResolver>,
}

impl Proxy {
    /// Compiles `settings` into a proxy. Reports every invalid site, host or upstream at once.
    pub fn new(settings: ProxySettings) -> Result<Self> {
        let metrics = Registry::default();
        let table = compile(&settings, &metrics)?;
        Ok(Self {
            shared: Arc::new(Shared {
                table: ArcSwap::from_pointee(table),
                clients: std::sync::Mutex::default(),
                connect_timeout: settings.timeouts.connect,
                max_header_bytes: settings.max_header_bytes,
                h2_max_streams: settings.h2_max_streams,
                max_headers: settings.max_headers,
                metrics,
                max_connections: settings.max_connections,
                max_connections_per_ip: settings.max_connections_per_ip,
                open: std::sync::Mutex::default(),
                resolver: arc_swap::ArcSwapOption::empty(),
            }),
        })
    }

    /// Replaces the sites, routes and timeouts. Requests already routed finish where they
    /// were going; connections stay open. The upstream connect timeout and the request head
    /// size limit keep the values given to [`Proxy::new`].
    pub fn update(&self, settings: &ProxySettings) -> Result<()> {
        let table = compile(settings, &self.shared.metrics)?;
        self.shared.table.store(Arc::new(table));
        Ok(())
    }

    /// Tells the proxy which resolver its HTTPS listeners use, so a request whose `Host` the
    /// connection's certificate does not cover is refused with 421 (no domain fronting).
    /// Without it, HTTPS requests must name the host of their SNI.
    pub fn set_resolver(&self, resolver: Arc<portunus_store::CertResolver>) {
        self.shared.resolver.store(Some(resolver));
    }

    /// Every upstream of the current table with its passive health.
    pub fn upstreams(&self) -> Vec<UpstreamStatus> {
        let table = self.shared.table.load();
        let mut out = Vec::new();
        for (index, site) in table.sites.iter().enumerate() {
            for (route, target) in table.router.site_targets(index) {
                if let Action::Forward(pool) = &target.action {
                    for upstream in pool.upstreams() {
                        out.push(UpstreamStatus {
                            site: site.label.clone(),
                            route: route.to_owned(),
                            url: upstream.url.clone(),
                            healthy: pool.is_healthy(upstream),
                            in_flight: upstream.active(),
                        });
                    }
                }
            }
        }
        out
    }

    /// The proxy's metrics in the Prometheus text format: `portunus_requests_total`,
    /// `portunus_request_duration_seconds`, `portunus_upstream_healthy`, and per listening
    /// address `portunus_connections_open` and `portunus_connections_parked` (HTTP/1
    /// connections waiting for their next request with their buffers freed).
    pub fn metrics_text(&self) -> String {
        let mut out = String::new();
        self.shared.metrics.render(&mut out);
        let mut listeners: Vec<_> = lock(&self.shared.open)
            .iter()
            .filter_map(|(addr, limits)| Some((*addr, limits.upgrade()?)))
            .collect();
        listeners.sort_by_key(|(addr, _)| *addr);
        for (name, help, count) in [
            (
                "portunus_connections_open",
                "Client connections open, by listening address.",
                (|l: &ConnLimits| l.park.open()) as fn(&ConnLimits) -> usize,
            ),
            (
                "portunus_connections_parked",
                "HTTP/1 connections waiting for a request with their buffers freed.",
                |l: &ConnLimits| l.parked.load(std::sync::atomic::Ordering::Relaxed),
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for (addr, limits) in &listeners {
                let _ = writeln!(out, "{name}{{listener=\"{addr}\"}} {}", count(limits));
            }
        }
        out.push_str("# HELP portunus_upstream_healthy Whether an upstream is in service (passive health).\n");
        out.push_str("# TYPE portunus_upstream_healthy gauge\n");
        let mut seen = std::collections::HashSet::new();
        for u in self.upstreams() {
            if seen.insert((u.site.clone(), u.url.clone())) {
                let _ = std::fmt::Write::write_fmt(
                    &mut out,
                    format_args!(
                        "portunus_upstream_healthy{{site=\"{}\",upstream=\"{}\"}} {}\n",
                        escape(&u.site),
                        escape(&u.url),
                        u8::from(u.healthy)
                    ),
                );
            }
        }
        out
    }

    /// Serves plain HTTP/1.1 on `listener` until `shutdown` completes, then stops accepting,
    /// lets requests in flight finish within `timeouts.shutdown` and returns.
    pub async fn serve<F>(&self, listener: TcpListener, shutdown: F) -> Result<()>
    where
        F: Future<Output = ()> + Send,
    {
        self.serve_with(listener, None, shutdown).await
    }

    /// Serves HTTPS on `listener` (HTTP/2 or HTTP/1.1 as ALPN decides) with `config`
    /// (see [`server_config`](crate::server_config)), until `shutdown` completes, then
    /// drains like [`Proxy::serve`].
    pub async fn serve_tls<F>(
        &self,
        listener: TcpListener,
        config: Arc<rustls::ServerConfig>,
        shutdown: F,
    ) -> Result<()>
    where
        F: Future<Output = ()> + Send,
    {
        self.serve_with(listener, Some(TlsAcceptor::from(config)), shutdown)
            .await
    }

    async fn serve_with<F>(
        &self,
        listener: TcpListener,
        tls: Option<TlsAcceptor>,
        shutdown: F,
    ) -> Result<()>
    where
        F: Future<Output = ()> + Send,
    {
        let local = listener.local_addr().map_err(|source| Error::Listener {
            addr: "?".into(),
            source,
        })?;
        let kind = if tls.is_some() { "HTTPS" } else { "HTTP" };
        debug!(addr = %local, "serving {kind}");
        let tracker = TaskTracker::new();
        let limits = self.shared.limits(local);
        let drain = CancellationToken::new();
        let force = CancellationToken::new();
        let client = self.shared.client();
        let inherits_nodelay = nodelay_inherited(&listener);
        tokio::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let Some(slot) = limits.admit(peer.ip()) else {
                        debug!(%peer, "connection limit reached: closed");
                        drop(stream);
                        continue;
                    };
                    let conn = Connection {
                        slot,
                        shared: Arc::clone(&self.shared),
                        client: Arc::clone(&client),
                        ctx: Arc::new(ConnCtx {
                            peer,
                            client: ClientConn::new(peer.ip(), local.port(), tls.is_some()),
                            activity: Activity::new(true),
                            tracker: tracker.clone(),
                            force: force.clone(),
                            sni: std::sync::OnceLock::new(),
                            covered: std::sync::OnceLock::new(),
                            resolver: self.shared.resolver.load_full(),
                        }),
                        drain: drain.clone(),
                        inherits_nodelay,
                    };
                    let span = debug_span!("conn", %peer);
                    let tls = tls.clone();
                    tracker.spawn(async move { conn.serve(stream, tls).await }.instrument(span));
                }
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(addr = %local, %error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        drop(listener);
        let grace = self.shared.table.load().timeouts.shutdown;
        info!(addr = %local, in_flight = tracker.len(), "draining connections");
        drain.cancel();
        tracker.close();
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            warn!(addr = %local, left = tracker.len(), "shutdown timeout: closing connections");
            force.cancel();
            tracker.wait().await;
        }
        Ok(())
    }
}

impl Shared {
    /// The connection counts of the listeners on `addr`.
    fn limits(&self, addr: std::net::SocketAddr) -> Arc<ConnLimits> {
        let mut open = lock(&self.open);
        open.retain(|_, limits| limits.strong_count() > 0);
        if let Some(limits) = open.get(&addr).and_then(std::sync::Weak::upgrade) {
            return limits;
        }
        let limits = Arc::new(ConnLimits::new(
            self.max_connections,
            self.max_connections_per_ip,
        ));
        open.insert(addr, Arc::downgrade(&limits));
        limits
    }

    /// The upstream client of the calling thread.
    fn client(&self) -> Arc<UpstreamClient> {
        let mut clients = lock(&self.clients);
        clients
            .entry(std::thread::current().id())
            .or_insert_with(|| {
                // As many idle connections as nginx's and Caddy's `keepalive 1024` in the
                // peer benchmarks: 64 made HTTP/2 load with 500 streams in flight open a new
                // upstream connection every six requests.
                Arc::new(UpstreamClient::new(
                    UPSTREAM_IDLE_PER_HOST,
                    UPSTREAM_IDLE_TIMEOUT,
                    self.connect_timeout,
                ))
            })
            .clone()
    }
}

/// Idle keep-alive connections kept per upstream and worker.
const UPSTREAM_IDLE_PER_HOST: usize = 1024;
/// How long an idle upstream connection is kept (Traefik's default too).
const UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Locks `m`, ignoring poisoning: the counts, maps and idle lists it guards stay usable.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One upstream as `/status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct UpstreamStatus {
    /// The site's label (its first host).
    pub site: String,
    /// The route prefix (`""` for the site's default upstreams).
    pub route: String,
    /// The upstream URL.
    pub url: String,
    /// Whether it is in service.
    pub healthy: bool,
    /// Requests in flight on it.
    pub in_flight: usize,
}

/// Builds the routing table from settings.
fn compile(settings: &ProxySettings, metrics: &Registry) -> Result<Table> {
    let mut builder = Router::builder();
    for site in &settings.sites {
        let target = |handler: &Handler, strip_prefix: bool| -> Result<Arc<Target>> {
            let action = match handler {
                Handler::Upstreams(urls) if urls.is_empty() => {
                    return Err(Error::NoHandler {
                        origin: site.origin.clone(),
                        what: "site".into(),
                    });
                }
                Handler::Upstreams(urls) => {
                    Action::Forward(Pool::new(urls, site.lb, settings.unhealthy_for).map_err(
                        |(url, source)| Error::Upstream {
                            origin: site.origin.clone(),
                            url,
                            source,
                        },
                    )?)
                }
                Handler::Respond { status, body } => Action::Respond {
                    status: *status,
                    body: Bytes::from(body.clone()),
                },
            };
            Ok(Arc::new(Target {
                action,
                strip_prefix,
            }))
        };
        let mut compiled = Site::new(site.origin.clone()).hosts(site.hosts.iter().cloned());
        if let Some(handler) = &site.handler {
            compiled = compiled.default_target(target(handler, false)?);
        }
        for route in &site.routes {
            compiled = compiled.route(
                route.path.clone(),
                target(&route.handler, route.strip_prefix)?,
            );
        }
        builder.push(compiled);
    }
    let router = builder.build().map_err(Error::Routes)?;
    let sites = settings
        .sites
        .iter()
        .map(|site| SiteInfo {
            max_body: site.max_body.unwrap_or(settings.max_body),
            metrics: metrics.site(&site.label()),
            label: site.label(),
            tls: site.tls,
            https_redirect: site.https_redirect,
            hsts: site
                .hsts
                .as_deref()
                .and_then(|v| http::HeaderValue::from_str(v).ok()),
        })
        .collect();
    Ok(Table {
        router,
        sites,
        timeouts: settings.timeouts,
        trusted: settings.trusted_proxies.clone(),
        https_port: settings.https_port,
        challenges: settings.challenges.clone(),
        unknown: metrics.site("-"),
    })
}

/// Open connections of one listener, in all and per client address.
#[derive(Debug)]
struct ConnLimits {
    total: usize,
    per_ip: usize,
    /// Open connections per client address; changed together with `park`'s count of all.
    per_ip_open: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
    /// How many connections are open, and so how soon quiet ones are parked.
    park: Arc<ParkPolicy>,
    /// Of the open connections, parked HTTP/1 ones.
    parked: std::sync::atomic::AtomicUsize,
}

/// One admitted connection; released when dropped.
#[derive(Debug)]
struct Slot {
    limits: Arc<ConnLimits>,
    ip: std::net::IpAddr,
}

impl ConnLimits {
    fn new(total: usize, per_ip: usize) -> Self {
        Self {
            total: total.max(1),
            per_ip: per_ip.max(1),
            per_ip_open: std::sync::Mutex::new(std::collections::HashMap::new()),
            park: Arc::default(),
            parked: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    fn admit(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<Slot> {
        let ip = ip.to_canonical();
        let mut per_ip = lock(&self.per_ip_open);
        let from_ip = per_ip.get(&ip).copied().unwrap_or(0);
        if self.park.open() >= self.total || from_ip >= self.per_ip {
            return None;
        }
        self.park.opened();
        per_ip.insert(ip, from_ip + 1);
        Some(Slot {
            limits: Arc::clone(self),
            ip,
        })
    }
}

impl Slot {
    /// Counts the connection as parked until the guard is dropped.
    fn park(&self) -> impl Drop + '_ {
        /// Decrements on drop.
        struct Parked<'a>(&'a std::sync::atomic::AtomicUsize);
        impl Drop for Parked<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        self.limits
            .parked
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Parked(&self.limits.parked)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut per_ip = lock(&self.limits.per_ip_open);
        self.limits.park.closed();
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

/// A connection that can be asked to finish its requests and close.
trait Drain: Future {
    fn drain(self: Pin<&mut Self>);
}

impl<I, S> Drain for http1::UpgradeableConnection<I, S>
where
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S::ResBody: 'static,
    <S::ResBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn drain(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S, E> Drain for http2::Connection<I, S, E>
where
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    S::ResBody: 'static,
    <S::ResBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, S::ResBody>,
{
    fn drain(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<C: Drain> Drain for WithStreams<C> {
    fn drain(self: Pin<&mut Self>) {
        self.conn().drain();
    }
}

/// One accepted client connection.
struct Connection {
    /// Its place under the listener's connection caps.
    slot: Slot,
    shared: Arc<Shared>,
    client: Arc<UpstreamClient>,
    ctx: Arc<ConnCtx>,
    drain: CancellationToken,
    /// Whether the socket has Nagle's algorithm off from its listener already.
    inherits_nodelay: bool,
}

/// Turns Nagle's algorithm off on `listener`, and says whether the connections it accepts
/// inherit that: they do on Linux, which saves each connection a system call (one of the 15
/// a new TLS connection makes); elsewhere each is set on its own ([`nodelay`]).
fn nodelay_inherited(listener: &TcpListener) -> bool {
    cfg!(target_os = "linux")
        && socket2::SockRef::from(listener)
            .set_tcp_nodelay(true)
            .is_ok()
}

/// Nagle's algorithm off for an accepted connection, unless it is already.
fn nodelay(stream: &TcpStream, inherited: bool) {
    if !inherited {
        let _ = stream.set_nodelay(true);
    }
}

impl Connection {
    async fn serve(self, stream: TcpStream, tls: Option<TlsAcceptor>) {
        nodelay(&stream, self.inherits_nodelay);
        let write_timeout = self.shared.table.load().timeouts.write;
        let io = TrackedIo::new(stream, Arc::clone(&self.ctx.activity), write_timeout);
        match tls {
            None => {
                let io = self.parkable(io);
                self.serve_http1(io).await
            }
            // In its own allocation: inline, TLS state would make every plain connection's
            // task as large (a parked connection is mostly its task).
            Some(acceptor) => Box::pin(self.serve_tls(io, acceptor)).await,
        }
    }

    async fn serve_tls(self, io: TrackedIo, acceptor: TlsAcceptor) {
        let timeout = self.shared.table.load().timeouts.tls_handshake;
        let handshake = tokio::select! {
            result = tokio::time::timeout(timeout, acceptor.accept(io)) => result,
            () = self.ctx.force.cancelled() => return,
        };
        let stream = match handshake {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => {
                debug!(%error, "TLS handshake failed");
                return;
            }
            Err(_) => {
                debug!("TLS handshake timed out");
                return;
            }
        };
        let _ = self.ctx.sni.set(
            stream
                .get_ref()
                .1
                .server_name()
                .map(str::to_ascii_lowercase),
        );
        match stream.get_ref().1.alpn_protocol() {
            Some(ACME_TLS_ALPN) => {
                // tls-alpn-01 validation: the handshake was the answer.
                let mut stream = stream;
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut stream).await;
            }
            Some(b"h2") => {
                self.ctx.activity.set_track_heads(false);
                self.serve_http2(stream).await;
            }
            _ => {
                let io = self.parkable(stream);
                self.serve_http1(io).await;
            }
        }
    }

    /// The connection's request handler: `handler` is [`handle`], or a wrapper of it.
    fn service<H, F>(
        &self,
        handler: H,
    ) -> impl hyper::service::Service<
        http::Request<hyper::body::Incoming>,
        Response = http::Response<crate::body::ProxyBody>,
        Error = Infallible,
        Future = impl Future<
            Output = std::result::Result<http::Response<crate::body::ProxyBody>, Infallible>,
        > + Send
                 + 'static,
    > + Clone
    + Send
    + 'static
    where
        H: Fn(
                Arc<Table>,
                Arc<UpstreamClient>,
                http::Request<hyper::body::Incoming>,
                Arc<ConnCtx>,
            ) -> F
            + Copy
            + Send
            + 'static,
        F: Future<Output = http::Response<crate::body::ProxyBody>> + Send + 'static,
    {
        let (shared, ctx) = (Arc::clone(&self.shared), Arc::clone(&self.ctx));
        let client = Arc::clone(&self.client);
        service_fn(move |req| {
            let (table, ctx, client) = (
                shared.table.load_full(),
                Arc::clone(&ctx),
                Arc::clone(&client),
            );
            futures_util::FutureExt::map(handler(table, client, req, ctx), Ok::<_, Infallible>)
        })
    }

    /// The stream of an HTTP/1 connection, ready to be parked by its listener's policy.
    fn parkable<I>(&self, io: I) -> ParkableIo<I> {
        ParkableIo::new(
            io,
            Arc::clone(&self.ctx.activity),
            Arc::clone(&self.slot.limits.park),
        )
    }

    /// Serves HTTP/1 requests until the connection closes or is parked: when it has been
    /// quiet between requests for its listener's [`ParkPolicy`] delay, hyper's connection
    /// (its state and buffers) is taken apart and freed, this task ends, and a small one
    /// watches the socket until the client sends again (see [`Connection::park`]). Most of a
    /// server's connections are idle keep-alive connections; parked, each costs little more
    /// than its socket.
    async fn serve_http1<I: ClientStream>(self, mut io: ParkableIo<I>) {
        // Unboxed: hyper moves an HTTP/1 request's future once, into its slot.
        let service = self.service(handle);
        loop {
            // In its own allocation, freed when the connection is parked.
            let mut conn = Box::new(
                self.http1()
                    .serve_connection(TokioIo::new(io), service.clone())
                    .with_upgrades(),
            );
            let ended = drive(
                Pin::new(&mut *conn),
                true,
                &self.shared,
                &self.ctx,
                &self.drain,
            )
            .await;
            if ended == Ended::Closed {
                return;
            }
            let Some(parts) = (*conn).into_parts() else {
                return;
            };
            io = parts.io.into_inner();
            // Bytes hyper read but did not use (a request head cut short) go to the next run.
            if io.parked(parts.read_buf) {
                return self.park(io);
            }
        }
    }

    /// Waits in a task of its own, holding no buffer, until the client of a parked connection
    /// sends again, then serves it in a new one; or closes the connection when it has been
    /// idle too long or the server drains (which comes before the end of the drain time).
    fn park<I: ClientStream>(self, mut io: ParkableIo<I>) {
        let tracker = self.ctx.tracker.clone();
        let waiting = async move {
            // Only what is needed: this is most of a parked connection's memory. Nothing is
            // read while parked, so only the idle timeout can expire, at a fixed time.
            let idle = self
                .ctx
                .activity
                .idle_deadline(self.shared.table.load().timeouts.idle);
            let parked = self.slot.park();
            let tcp = io.get_ref().tcp();
            let resume = tokio::select! {
                // `poll_read_ready`, not `readable()`: it takes the socket's reader waker slot,
                // which still holds the finished serving task's waker (its last read found
                // nothing), and so frees that task's memory, about 1.1 KiB a connection.
                ready = std::future::poll_fn(|cx| tcp.poll_read_ready(cx)) => ready.is_ok(),
                () = self.drain.cancelled() => false,
                () = tokio::time::sleep_until(idle) => false,
            };
            drop(parked);
            if resume {
                self.resume(io);
            } else if !self.ctx.force.is_cancelled() {
                let timeout = self.shared.table.load().timeouts.write;
                let _ = tokio::time::timeout(timeout, tokio::io::AsyncWriteExt::shutdown(&mut io))
                    .await;
            }
        };
        tracker.spawn(waiting.instrument(tracing::Span::current()));
    }

    /// Serves a parked connection again, in a task of its own.
    fn resume<I: ClientStream>(self, io: ParkableIo<I>) {
        let tracker = self.ctx.tracker.clone();
        // Boxed as a trait object: the task types of `park` and `resume` would contain each
        // other.
        let serving: Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(self.serve_http1(io));
        tracker.spawn(serving.instrument(tracing::Span::current()));
    }

    /// hyper's HTTP/1 settings (built for each run of a connection: a parked connection keeps
    /// nothing it does not need).
    fn http1(&self) -> http1::Builder {
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(None)
            .keep_alive(true)
            // As the upstream side: a response's head and body go out as one buffer, copied
            // together (h1, both sides: 42.4k -> 41.5k instructions per request).
            .writev(false)
            .max_headers(self.shared.max_headers)
            .max_buf_size(self.shared.max_header_bytes.max(8192));
        builder
    }

    async fn serve_http2<I>(self, io: I)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let streams = Streams::new();
        let conn = http2::Builder::new(streams.clone())
            .timer(TokioTimer::new())
            .max_concurrent_streams(self.shared.h2_max_streams)
            .max_header_list_size(u32::try_from(self.shared.max_header_bytes).unwrap_or(u32::MAX))
            // Rapid reset (CVE-2023-44487) and MadeYouReset (CVE-2025-8671): a client whose
            // streams are reset faster than they complete gets GOAWAY.
            .max_pending_accept_reset_streams(Some(20))
            .max_local_error_reset_streams(Some(256))
            // Each request's future boxed: hyper moves an HTTP/2 stream's future several
            // times (into its stream future, into a task), each a copy of its whole size
            // (h2tls: 66.8k -> 64.5k instructions per request).
            .serve_connection(
                TokioIo::new(io),
                self.service(|table, client, req, ctx| Box::pin(handle(table, client, req, ctx))),
            );
        // In its own allocation, sized for HTTP/2: inline, every connection task would be
        // this large. Its streams run in this task (see `streams`).
        let mut conn = Box::pin(WithStreams::new(conn, streams));
        drive(conn.as_mut(), false, &self.shared, &self.ctx, &self.drain).await;
    }
}

/// Why [`drive`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// The connection is over.
    Closed,
    /// The HTTP/1 connection asked to be parked (see [`ParkableIo`]).
    Parked,
}

/// Runs a connection until it ends (or, with `parks`, until it asks to be parked), closing
/// it when idle, when a request head is too slow, when the server drains (gracefully) or
/// when the drain time is over (at once).
async fn drive<C, E>(
    mut conn: Pin<&mut C>,
    parks: bool,
    shared: &Shared,
    ctx: &ConnCtx,
    drain: &CancellationToken,
) -> Ended
where
    C: Drain<Output = std::result::Result<(), E>>,
    E: std::fmt::Display,
{
    let timeouts = shared.table.load().timeouts;
    // What the connection waits on beside itself, polled only when one of them woke it.
    let serving = WhenWoken::new(async {
        tokio::select! {
            biased;
            () = ctx.force.cancelled() => Event::Force,
            () = drain.cancelled() => Event::Drain,
            expired = ctx.activity.expired(timeouts.idle, timeouts.header_read) => {
                Event::Expired(expired)
            }
        }
    });
    let forced = WhenWoken::new(ctx.force.cancelled());
    tokio::pin!(serving, forced);
    let mut draining = false;
    loop {
        let step = std::future::poll_fn(|cx| {
            match conn.as_mut().poll(cx) {
                Poll::Ready(result) => return Poll::Ready(Step::Ended(result)),
                Poll::Pending if parks && ctx.activity.take_park() => {
                    return Poll::Ready(Step::Park);
                }
                Poll::Pending => {}
            }
            if draining {
                forced.as_mut().poll(cx).map(|()| Step::Event(Event::Force))
            } else {
                serving.as_mut().poll(cx).map(Step::Event)
            }
        })
        .await;
        match step {
            Step::Ended(result) => {
                if let Err(error) = result {
                    debug!(%error, "connection ended with an error");
                }
                return Ended::Closed;
            }
            Step::Park => return Ended::Parked,
            Step::Event(Event::Force) => return Ended::Closed,
            Step::Event(Event::Drain) => {
                draining = true;
                conn.as_mut().drain();
            }
            Step::Event(Event::Expired(Expired::Idle)) => {
                debug!("idle timeout");
                draining = true;
                conn.as_mut().drain();
            }
            Step::Event(Event::Expired(Expired::HeaderRead)) => {
                debug!("request head timeout");
                return Ended::Closed;
            }
        }
    }
}

/// What [`drive`] waits on beside the connection.
enum Event {
    /// The server drains: finish what is in flight, take nothing new.
    Drain,
    /// The drain time is over: close at once.
    Force,
    Expired(Expired),
}

/// One step of [`drive`].
enum Step<E> {
    Ended(std::result::Result<(), E>),
    Park,
    Event(Event),
}

/// A client's stream, over TCP: its socket can be watched for bytes without reading them.
trait ClientStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {
    fn tcp(&self) -> &TcpStream;
}

impl ClientStream for TrackedIo {
    fn tcp(&self) -> &TcpStream {
        self.get_ref()
    }
}

impl ClientStream for tokio_rustls::server::TlsStream<TrackedIo> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0.get_ref()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[tokio::test]
    async fn accepted_connections_have_nagle_off() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let inherited = nodelay_inherited(&listener);
        assert_eq!(inherited, cfg!(target_os = "linux"));
        let addr = listener.local_addr().unwrap();
        for _ in 0..2 {
            let _client = TcpStream::connect(addr).await.unwrap();
            let (stream, _) = listener.accept().await.unwrap();
            nodelay(&stream, inherited);
            assert!(stream.nodelay().unwrap());
        }
    }
}
