//! Request handling: routing, static answers, forwarding with retries, WebSocket tunnels.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::FutureExt as _;
use futures_util::future;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use portunus_router::Router;
use portunus_store::Challenges;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::body::{BodyError, CUT_MALFORMED, CUT_STALLED, CUT_TOO_LARGE, LimitedBody, ProxyBody};
use crate::client::{ResponseBody, UpstreamClient, UpstreamError, is_idempotent};
use crate::conn::Activity;
use crate::error::RequestError;
use crate::headers::{ClientConn, has_token, rewrite_request};
use crate::metrics::SiteMetrics;
use crate::settings::Timeouts;
use crate::upstream::{ActiveGuard, Pool};
use crate::wire::{BoxError, Outgoing, SendBody, Target as WireTarget};

/// What a route does.
#[derive(Debug)]
pub(crate) enum Action {
    Forward(Pool),
    Respond { status: StatusCode, body: Bytes },
}

/// A compiled route target.
#[derive(Debug)]
pub(crate) struct Target {
    pub(crate) action: Action,
    pub(crate) strip_prefix: bool,
}

/// Site-wide behaviour, indexed like the router's sites.
#[derive(Debug)]
pub(crate) struct SiteInfo {
    /// The largest request body (0 = unlimited).
    pub(crate) max_body: u64,
    /// The metrics label: the site's first host.
    pub(crate) label: String,
    pub(crate) metrics: Arc<SiteMetrics>,
    pub(crate) tls: bool,
    pub(crate) https_redirect: bool,
    pub(crate) hsts: Option<HeaderValue>,
}

/// Everything that may change on reload.
#[derive(Debug)]
pub(crate) struct Table {
    pub(crate) router: Router<Arc<Target>>,
    pub(crate) sites: Vec<SiteInfo>,
    pub(crate) timeouts: Timeouts,
    pub(crate) trusted: Vec<ipnet::IpNet>,
    pub(crate) https_port: u16,
    pub(crate) challenges: Option<Arc<Challenges>>,
    /// Requests no site serves.
    pub(crate) unknown: Arc<SiteMetrics>,
}

const ACME_CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// One client connection, as the request handler sees it.
#[derive(Debug)]
pub(crate) struct ConnCtx {
    pub(crate) peer: SocketAddr,
    /// What upstreams are told about the client, including whether it came over TLS.
    pub(crate) client: ClientConn,
    pub(crate) activity: Arc<Activity>,
    pub(crate) tracker: TaskTracker,
    pub(crate) force: CancellationToken,
    /// The SNI of a TLS connection, once its handshake is done.
    pub(crate) sni: std::sync::OnceLock<Option<String>>,
    /// A host other than the SNI that this connection's certificate was found to cover: its
    /// next requests for it skip the two resolver lookups (clients by IP send the same host
    /// on every request). The certificate a connection was served does not change with it.
    pub(crate) covered: std::sync::OnceLock<Box<str>>,
    pub(crate) resolver: Option<Arc<portunus_store::CertResolver>>,
}

/// Handles one request end to end; never fails: errors become their HTTP answer.
///
/// Everything that needs no waiting (checks, routing, header rewriting) is done before the
/// future is returned, and the future holds only what the wait needs: it is moved into
/// hyper's request slot (and, over HTTP/2, into a task) for every request, so its size is
/// paid per request.
pub(crate) fn handle(
    table: Arc<Table>,
    client: Arc<UpstreamClient>,
    req: Request<Incoming>,
    ctx: Arc<ConnCtx>,
) -> impl Future<Output = Response<ProxyBody>> + Send + 'static {
    let upgrade = req.headers().contains_key(header::UPGRADE);
    let guard = ctx
        .activity
        .begin_request(!req.body().is_end_stream(), upgrade);
    if !upgrade && closes_after_answer(&req) {
        ctx.activity.closes_after_answer();
    }
    let started = std::time::Instant::now();
    let method = req.method().clone();
    // Cheap: a `Uri` shares its bytes. Kept for error logs only.
    let uri = req.uri().clone();
    // The access log's fields are gathered only when something listens to them.
    let access = tracing::enabled!(target: "portunus::access", tracing::Level::INFO)
        .then(|| Box::new(AccessFields::of(&req)));
    let mut site = None;
    let pending = match route(&table, req, &ctx, &mut site) {
        Ok(Routed::Forward(forward)) => {
            future::Either::Right(send(Arc::clone(&table), client, Arc::clone(&ctx), forward))
        }
        Ok(Routed::Answer(response)) => future::Either::Left(future::ready(Ok(response))),
        Err(error) => future::Either::Left(future::ready(Err(error))),
    };
    pending.map(move |result| {
        let response = match result {
            Ok(response) => response,
            Err(error) => {
                match error.side() {
                    crate::error::Side::Upstream => {
                        warn!(peer = %ctx.peer, %method, path = %uri.path(), error = %error, cause = ?std::error::Error::source(&error), "upstream error")
                    }
                    crate::error::Side::Downstream => {
                        debug!(peer = %ctx.peer, %method, path = %uri.path(), error = %error, "request refused")
                    }
                }
                error_response(&error)
            }
        };
        let elapsed = started.elapsed();
        let site = site.and_then(|i| table.sites.get(i));
        site.map_or(&table.unknown, |s| &s.metrics)
            .record(response.status().as_u16(), elapsed);
        if let Some(access) = access {
            access.log(
                &ctx,
                &response,
                site.map_or("-", |s| s.label.as_str()),
                elapsed,
            );
        }
        response.map(|body| body.with_request_guard(guard))
    })
}

/// Whether hyper closes an HTTP/1 connection once it has answered `req`: the client said
/// `Connection: close`, or spoke HTTP/1.0 without asking to keep the connection alive.
fn closes_after_answer<B>(req: &Request<B>) -> bool {
    match req.version() {
        Version::HTTP_11 => has_token(req.headers(), &header::CONNECTION, "close"),
        Version::HTTP_10 => !has_token(req.headers(), &header::CONNECTION, "keep-alive"),
        _ => false,
    }
}

/// What the access log needs of a request, taken before it is consumed.
struct AccessFields {
    method: Method,
    uri: String,
    version: Version,
    host: String,
    referer: String,
    user_agent: String,
}

impl AccessFields {
    fn of(req: &Request<Incoming>) -> Self {
        let header = |name: header::HeaderName| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        };
        Self {
            method: req.method().clone(),
            uri: req
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_owned(),
            version: req.version(),
            host: RequestHost::of(req)
                .as_ref()
                .and_then(RequestHost::as_str)
                .unwrap_or("")
                .to_owned(),
            referer: header(header::REFERER),
            user_agent: header(header::USER_AGENT),
        }
    }

    /// One event on target `portunus::access` per request (when that target is enabled).
    fn log(
        &self,
        ctx: &ConnCtx,
        response: &Response<ProxyBody>,
        site: &str,
        elapsed: std::time::Duration,
    ) {
        let bytes = response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        tracing::info!(
            target: "portunus::access",
            remote = %ctx.peer.ip(),
            method = %self.method,
            uri = %self.uri,
            version = ?self.version,
            host = %self.host,
            site,
            status = response.status().as_u16(),
            bytes,
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            referer = %self.referer,
            user_agent = %self.user_agent,
            tls = ctx.client.tls,
        );
    }
}

/// The answer for a request that could not be proxied.
pub(crate) fn error_response(error: &RequestError) -> Response<ProxyBody> {
    let mut response = text_response(error.status(), Bytes::from(error.body()));
    if matches!(
        error.status(),
        StatusCode::BAD_REQUEST | StatusCode::NOT_IMPLEMENTED
    ) {
        // A malformed request may hide more bytes than it seems to: do not read on.
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if matches!(error, RequestError::Connect) {
        response.headers_mut().insert(
            header::ALLOW,
            HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH"),
        );
    }
    response
}

/// The host a request is for: the URI's authority (HTTP/2, absolute form), else `Host`.
/// A request with several `Host` headers has none (RFC 9112 §3.2: 400). It shares the
/// request's bytes (a reference count, not a copy), and outlives the request taken apart.
enum RequestHost {
    Authority(http::uri::Authority),
    Header(HeaderValue),
}

impl RequestHost {
    fn of(req: &Request<Incoming>) -> Option<Self> {
        if let Some(authority) = req.uri().authority() {
            return Some(Self::Authority(authority.clone()));
        }
        let mut hosts = req.headers().get_all(header::HOST).iter();
        let host = hosts.next()?;
        if hosts.next().is_some() {
            return None;
        }
        Some(Self::Header(host.clone()))
    }

    /// The host as text; `None` if it is empty or not visible ASCII.
    fn as_str(&self) -> Option<&str> {
        match self {
            Self::Authority(authority) => Some(authority.as_str()),
            Self::Header(value) => value.to_str().ok(),
        }
        .filter(|h| !h.is_empty())
    }
}

/// What routing decided.
#[allow(
    clippy::large_enum_variant,
    reason = "lives only between routing and sending; boxing would allocate per request"
)]
enum Routed {
    /// Answered here: a challenge, a redirect.
    Answer(Response<ProxyBody>),
    /// To be answered by the site's route target.
    Forward(Forward),
}

fn route(
    table: &Table,
    req: Request<Incoming>,
    ctx: &ConnCtx,
    site_out: &mut Option<usize>,
) -> Result<Routed, RequestError> {
    if req.method() == Method::CONNECT {
        return Err(RequestError::Connect);
    }
    let websocket = match req.headers().get(header::UPGRADE) {
        None => false,
        Some(value) => {
            let is_ws = has_token(req.headers(), &header::UPGRADE, "websocket")
                && has_token(req.headers(), &header::CONNECTION, "upgrade")
                && req.method() == Method::GET
                && req.version() == Version::HTTP_11;
            if !is_ws {
                return Err(RequestError::Upgrade(
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                ));
            }
            true
        }
    };
    if unsafe_path(req.uri().path()) {
        return Err(RequestError::UnsafePath);
    }
    if let Some(coding) = req
        .headers()
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find(|c| !c.eq_ignore_ascii_case("chunked"))
    {
        return Err(RequestError::UnknownCoding(coding.to_owned()));
    }
    let challenge_token = req.uri().path().strip_prefix(ACME_CHALLENGE_PREFIX);
    if let (false, Some(token), Some(challenges)) =
        (ctx.client.tls, challenge_token, &table.challenges)
        && let Some(answer) = challenges.http01(token)
    {
        return Ok(Routed::Answer(text_response(
            StatusCode::OK,
            Bytes::from(answer),
        )));
    }
    let host = RequestHost::of(&req).ok_or(RequestError::MissingHost)?;
    let host = host.as_str().ok_or(RequestError::MissingHost)?;
    let site_index = table
        .router
        .site_for(host)
        .ok_or(RequestError::UnknownHost)?;
    *site_out = Some(site_index);
    let site = table.sites.get(site_index);
    if !ctx.client.tls
        && challenge_token.is_none()
        && site.is_some_and(|s| s.tls && s.https_redirect)
    {
        return Ok(Routed::Answer(redirect_to_https(
            host,
            req.uri(),
            table.https_port,
        )));
    }
    if ctx.client.tls && !connection_covers(ctx, host) {
        return Err(RequestError::Misdirected);
    }
    let hsts = site.filter(|_| ctx.client.tls).and_then(|s| s.hsts.clone());
    prepare(table, req, ctx, host, site_index, websocket, hsts)
}

/// Whether the certificate of this TLS connection covers `host`: the host is the SNI, or
/// resolves to the very certificate the SNI (or, without SNI, the default) resolved to.
fn connection_covers(ctx: &ConnCtx, host: &str) -> bool {
    let name = portunus_router::split_host_port(host).trim_end_matches('.');
    let sni = ctx.sni.get().and_then(Option::as_deref);
    if sni.is_some_and(|s| s.eq_ignore_ascii_case(name))
        || ctx
            .covered
            .get()
            .is_some_and(|c| c.eq_ignore_ascii_case(name))
    {
        return true;
    }
    let Some(resolver) = &ctx.resolver else {
        return false;
    };
    let covers = match (resolver.lookup(sni), resolver.lookup(Some(name))) {
        (Some(served), Some(wanted)) => Arc::ptr_eq(&served, &wanted),
        _ => false,
    };
    if covers {
        let _ = ctx.covered.set(name.into());
    }
    covers
}

/// Whether a path holds what routing and an upstream could read differently: dot segments
/// (`/a/../b`, also percent-encoded), NUL, or backslashes. Such requests are refused rather
/// than routed by one reading and served by another.
fn unsafe_path(path: &str) -> bool {
    let bytes = path.as_bytes();
    let escape = |i: usize, hex: &[u8; 2]| {
        bytes
            .get(i + 1..i + 3)
            .is_some_and(|h| h.eq_ignore_ascii_case(hex))
    };
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'\\' || b == 0 || b == b'%' && (escape(i, b"00") || escape(i, b"5c")) {
            return true;
        }
    }
    path.split('/').any(is_dot_segment)
}

/// `.` or `..`, each dot possibly written `%2e` (any case). No allocation: this runs for
/// every request.
fn is_dot_segment(segment: &str) -> bool {
    let mut rest = segment.as_bytes();
    let mut dots = 0;
    while !rest.is_empty() {
        if rest[0] == b'.' {
            rest = &rest[1..];
        } else if rest.len() >= 3 && rest[0] == b'%' && rest[1..3].eq_ignore_ascii_case(b"2e") {
            rest = &rest[3..];
        } else {
            return false;
        }
        dots += 1;
    }
    dots == 1 || dots == 2
}

/// A small `text/plain` answer.
fn text_response(status: StatusCode, body: Bytes) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// `308` to the same host, path and query over HTTPS.
fn redirect_to_https(host: &str, uri: &Uri, https_port: u16) -> Response<ProxyBody> {
    let name = portunus_router::split_host_port(host);
    let name = if name.contains(':') {
        format!("[{name}]")
    } else {
        name.to_owned()
    };
    let port = if https_port == 443 {
        String::new()
    } else {
        format!(":{https_port}")
    };
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let location = format!("https://{name}{port}{path}");
    let mut response = text_response(
        StatusCode::PERMANENT_REDIRECT,
        Bytes::from(format!("308 Permanent Redirect: {location}\n")),
    );
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// A request for an upstream pool, checked and rewritten, waiting to be sent.
struct Forward {
    target: Arc<Target>,
    method: Method,
    /// The client's URI, for its path (less `strip`) and query.
    uri: Uri,
    strip: usize,
    headers: http::HeaderMap,
    /// Header lines sent after `headers`: this hop's forwarding fields.
    forwarding: Bytes,
    /// Taken by the first attempt (a retry is only allowed without a body).
    body: Option<LimitedBody>,
    /// Set by `body` when it cuts the request body off (none without a body).
    exceeded: Option<Arc<std::sync::atomic::AtomicU8>>,
    max_body: u64,
    retry_allowed: bool,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    hsts: Option<HeaderValue>,
}

/// Routes within a site: a static answer, or the request rewritten for the route's pool.
fn prepare(
    table: &Table,
    mut req: Request<Incoming>,
    ctx: &ConnCtx,
    host: &str,
    site_index: usize,
    websocket: bool,
    hsts: Option<HeaderValue>,
) -> Result<Routed, RequestError> {
    let matched = table
        .router
        .route(site_index, req.uri().path())
        .ok_or(RequestError::NoRoute)?;
    let target = Arc::clone(matched.target);
    let strip = if target.strip_prefix {
        matched.prefix.len()
    } else {
        0
    };
    let pool = match &target.action {
        Action::Respond { status, body } => {
            return Ok(Routed::Answer(with_hsts(
                text_response(*status, body.clone()),
                hsts,
            )));
        }
        Action::Forward(pool) => pool,
    };

    let max_body = table.sites.get(site_index).map_or(0, |s| s.max_body);
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if max_body > 0 && declared.is_some_and(|n| n > max_body) {
        return Err(RequestError::TooLarge(max_body));
    }
    let client_upgrade = websocket.then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();

    let mut headers = parts.headers;
    let upgrade_value = headers.get(header::UPGRADE).cloned();
    let forwarding = rewrite_request(&mut headers, &ctx.client, &table.trusted, host)
        .ok_or(RequestError::MissingHost)?;
    if let Some(upgrade) = upgrade_value.filter(|_| websocket) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, upgrade);
    }

    // Another upstream may take the request if the first fails and sending it twice is safe.
    let retry_allowed = is_idempotent(&parts.method)
        && body.is_end_stream()
        && !websocket
        && pool.upstreams().len() > 1;
    let pending = !body.is_end_stream();
    // A body that has already ended cannot be cut: no flag for it (an allocation saved).
    let exceeded = pending.then(|| Arc::new(std::sync::atomic::AtomicU8::new(0)));
    // Pairs with `begin_request`, which saw the same body pending.
    let body_end = pending.then(|| ctx.activity.body_end());
    let body = LimitedBody::new(
        body,
        body_end,
        max_body,
        table.timeouts.body_read,
        exceeded.clone(),
    );
    Ok(Routed::Forward(Forward {
        target,
        method: parts.method,
        uri: parts.uri,
        strip,
        headers,
        forwarding,
        body: Some(body),
        exceeded,
        max_body,
        retry_allowed,
        client_upgrade,
        hsts,
    }))
}

/// Adds the site's HSTS header unless the answer has its own.
fn with_hsts(mut response: Response<ProxyBody>, hsts: Option<HeaderValue>) -> Response<ProxyBody> {
    if let Some(hsts) = hsts {
        response
            .headers_mut()
            .entry(header::STRICT_TRANSPORT_SECURITY)
            .or_insert(hsts);
    }
    response
}

/// Sends a prepared request to its pool, retrying where that is safe.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn's state holds its arguments twice"
)]
fn send(
    table: Arc<Table>,
    client: Arc<UpstreamClient>,
    ctx: Arc<ConnCtx>,
    mut forward: Forward,
) -> impl Future<Output = Result<Response<ProxyBody>, RequestError>> + Send + 'static {
    // An async block rather than an `async fn`, which keeps its arguments twice in its state
    // (as passed, and as moved into its body): the request's future is 1,448 bytes instead of
    // 1,776, which each move of it copies and each request in flight holds.
    async move {
        let Action::Forward(pool) = &forward.target.action else {
            return Err(RequestError::NoRoute);
        };
        if let Some(body) = &mut forward.body
            && let Err(error) = body.read_ahead().await
        {
            return Err(match error {
                BodyError::TooLarge(n) => RequestError::TooLarge(n),
                BodyError::Stalled(_) => RequestError::BodyTimeout,
                BodyError::Client(_) => RequestError::BadBody,
            });
        }
        let path = forward.uri.path();
        let rest = path.get(forward.strip..).unwrap_or("");
        let rest = if rest.is_empty() { "/" } else { rest };
        let query = forward.uri.query();
        let websocket = forward.client_upgrade.is_some();
        let mut tried = 0u64;
        let mut last_error = None;
        loop {
            let Some((index, upstream)) = pool.pick(tried) else {
                return Err(RequestError::NoUpstream(last_error));
            };
            tried |= 1u64
                .checked_shl(u32::try_from(index).unwrap_or(u32::MAX))
                .unwrap_or(0);
            let body = match forward.body.take() {
                Some(b) if !b.is_end_stream() => {
                    Some(Box::pin(b.map_err(BoxError::from)) as SendBody)
                }
                _ => None,
            };
            let target = WireTarget {
                base: &upstream.base_path,
                path: rest,
                query,
            };
            let upstream_req = Outgoing::new(
                &forward.method,
                target,
                &forward.headers,
                &forward.forwarding,
                body,
                websocket,
            );

            let guard = ActiveGuard::new(Arc::clone(upstream));
            let sent = tokio::time::timeout(
                table.timeouts.response_header,
                // A response takes the request's map for its own fields; a failed attempt
                // leaves it for the next.
                client.send(&upstream.address, upstream_req, &mut forward.headers),
            )
            .await;
            let error = match sent {
                Err(_elapsed) => {
                    pool.mark_failed(upstream);
                    return Err(RequestError::Timeout);
                }
                Ok(Ok(response)) => {
                    pool.mark_ok(upstream);
                    let response = finish_response(response, guard, forward.client_upgrade, &ctx);
                    return Ok(with_hsts(response, forward.hsts));
                }
                Ok(Err(e)) if e.is_connect() => RequestError::NoUpstream(Some(e)),
                Ok(Err(e)) => RequestError::UpstreamFailed(e),
            };
            if matches!(error, RequestError::NoUpstream(_)) {
                pool.mark_failed(upstream);
            }
            match forward
                .exceeded
                .as_ref()
                .map_or(0, |e| e.load(std::sync::atomic::Ordering::Relaxed))
            {
                CUT_TOO_LARGE => return Err(RequestError::TooLarge(forward.max_body)),
                CUT_STALLED => return Err(RequestError::BodyTimeout),
                CUT_MALFORMED => return Err(RequestError::BadBody),
                _ => {}
            }
            debug!(upstream = %upstream.url, error = %error, cause = ?std::error::Error::source(&error), "upstream attempt failed");
            if !(forward.retry_allowed && error.is_retryable()) {
                return Err(error);
            }
            last_error = match error {
                RequestError::NoUpstream(e) => e,
                RequestError::UpstreamFailed(e) => Some(e),
                _ => None,
            };
        }
    }
}

/// Turns the upstream's response into the client's, starting the tunnel after a `101`.
fn finish_response(
    response: Response<ResponseBody>,
    guard: ActiveGuard,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    ctx: &ConnCtx,
) -> Response<ProxyBody> {
    let (parts, body) = response.into_parts();
    if let (Some(client_upgrade), StatusCode::SWITCHING_PROTOCOLS) = (client_upgrade, parts.status)
    {
        // A `101` keeps its connection for the tunnel.
        let Some(mut upstream) = body.into_tunnel() else {
            return error_response(&RequestError::UpstreamFailed(UpstreamError::Truncated));
        };
        let force = ctx.force.clone();
        ctx.tracker.spawn(async move {
            // Counts as in flight on its upstream until the tunnel ends.
            let _guard = guard;
            let tunnel = async {
                let mut client = TokioIo::new(client_upgrade.await?);
                tokio::io::copy_bidirectional(&mut client, &mut upstream)
                    .await
                    .map_err(hyper_io_error)?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            };
            tokio::select! {
                result = tunnel => if let Err(error) = result {
                    debug!(error = %error, "websocket tunnel ended");
                },
                () = force.cancelled() => {}
            }
        });
        return Response::from_parts(parts, ProxyBody::empty());
    }
    // Hop-by-hop fields were left out as the head was parsed.
    Response::from_parts(parts, ProxyBody::upstream(body, guard))
}

fn hyper_io_error(e: std::io::Error) -> Box<dyn std::error::Error + Send + Sync> {
    Box::new(e)
}

#[cfg(test)]
mod tests {
    use super::{closes_after_answer, unsafe_path};
    use http::{Request, Version};

    #[test]
    fn which_requests_close_their_connection() {
        for (version, connection, closes) in [
            (Version::HTTP_11, None, false),
            (Version::HTTP_11, Some("close"), true),
            (Version::HTTP_11, Some("Keep-Alive, Close"), true),
            (Version::HTTP_11, Some("keep-alive"), false),
            (Version::HTTP_10, None, true),
            (Version::HTTP_10, Some("keep-alive"), false),
            (Version::HTTP_10, Some("close"), true),
            (Version::HTTP_2, None, false),
        ] {
            let mut req = Request::builder().version(version);
            if let Some(value) = connection {
                req = req.header(http::header::CONNECTION, value);
            }
            let req = req.body(()).unwrap();
            assert_eq!(
                closes_after_answer(&req),
                closes,
                "{version:?} {connection:?}"
            );
        }
    }

    #[test]
    fn unsafe_paths() {
        for bad in [
            "/a/../b",
            "/..",
            "/a/./b",
            "/a/%2e%2e/b",
            "/a/.%2E/b",
            "/%2e/x",
            "/a%00b",
            "/a\\..\\b",
            "/a%5c..%5cb",
        ] {
            assert!(unsafe_path(bad), "{bad}");
        }
        for ok in [
            "/",
            "/a/b",
            "/a..b/c",
            "/.well-known/acme-challenge/x",
            "/a/b.txt",
            "/a%2Fb",
            "/..a",
        ] {
            assert!(!unsafe_path(ok), "{ok}");
        }
    }
}
