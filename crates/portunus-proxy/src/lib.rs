//! Listeners, HTTP serving and forwarding for the Portunus reverse proxy.
//!
//! This crate does:
//! - serve HTTP/1.1 on plain listeners ([`Proxy::serve`]) and HTTPS with HTTP/2 or HTTP/1.1
//!   chosen by ALPN ([`Proxy::serve_tls`], certificates from a
//!   [`portunus_store::CertResolver`] through [`server_config`]), and route each request by
//!   host and path ([`portunus_router`]) to a pool of upstreams or a static answer; an
//!   HTTP/2 connection's streams run concurrently within the connection's own task;
//! - redirect plain-HTTP requests of TLS sites to HTTPS, add HSTS, answer ACME http-01 and
//!   tls-alpn-01 challenges published in the store;
//! - forward over pooled keep-alive HTTP/1.1 connections (one pool per worker thread; a
//!   connection is given back when its response body has been read to the end), with an own
//!   HTTP/1.1 client codec driven by the request's task (responses parsed by httparse and
//!   framed as RFC 9112 §6.3 says; heads of at most [`MAX_RESPONSE_HEAD`] bytes), streaming
//!   bodies both ways at once, with round-robin or least-connections balancing, passive health
//!   and safe retries;
//! - rewrite headers as a proxy must: hop-by-hop headers removed, `Host` preserved,
//!   `X-Forwarded-*`, `X-Real-IP` and `Forwarded` set (client copies believed only from
//!   trusted proxies), `Proxy-Authorization` never forwarded;
//! - tunnel `Upgrade: websocket` and refuse every other upgrade and `CONNECT`;
//! - enforce connect, response-head, request-head, body-read, write, TLS-handshake and idle
//!   timeouts; limits on head size and header count (431), body size (413) and connections
//!   (in all and per client address); HTTP/2 stream and reset limits; refuse ambiguous
//!   requests (several `Host`s, dot segments, unknown transfer codings) and, over TLS, hosts
//!   the connection's certificate does not cover (421);
//! - park idle HTTP/1 keep-alive connections: after 1 s without traffic between requests
//!   (10 ms while the listener has more than 256 connections open), hyper's connection state
//!   and buffers are freed and only the socket is watched until the client sends again, so an
//!   idle connection costs a few KiB;
//! - send the end of the last answer of a connection that closes after it (`Connection:
//!   close`, HTTP/1.0), TLS's `close_notify` and the FIN in one TCP segment (Linux);
//! - count requests per site and status class, latency, upstream health and open and parked
//!   connections ([`Proxy::metrics_text`]), and emit one event per request on target
//!   `portunus::access`;
//! - drain gracefully.
//!
//! This crate does not read configuration files, obtain certificates, install a crypto
//! provider or a tracing subscriber, spawn tasks on construction, or know anything about ACME:
//! the caller owns the runtime and drives [`Proxy::serve`] with its own shutdown signal.
//!
//! ```no_run
//! use portunus_proxy::{Proxy, ProxySettings, SiteSettings};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let settings = ProxySettings::new()
//!     .site(SiteSettings::new("example", ["app.example.com"]).upstreams(["http://127.0.0.1:8080"]));
//! let proxy = Proxy::new(settings)?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8000").await?;
//! proxy.serve(listener, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(())
//! # }
//! ```

mod body;
mod client;
mod conn;
mod error;
mod forward;
mod headers;
mod metrics;
mod proxy;
mod settings;
mod streams;
mod tls;
mod upstream;
mod wire;

pub use body::ProxyBody;
pub use client::UpstreamError;
pub use error::{Error, RequestError, Result, Side};
pub use metrics::escape as escape_label;
pub use proxy::{Proxy, UpstreamStatus};
pub use settings::{Handler, LoadBalancing, ProxySettings, RouteSettings, SiteSettings, Timeouts};
pub use tls::{TlsError, server_config};
pub use upstream::{UpstreamUrlError, check_upstream_url};
pub use wire::{MAX_HEAD as MAX_RESPONSE_HEAD, MalformedResponse};

/// Entry points for the fuzz targets in `fuzz/`: not a stable API.
#[doc(hidden)]
pub mod fuzzing {
    /// Runs hop-by-hop removal and `X-Forwarded-*` / `Forwarded` rewriting over headers made
    /// from `data` (lines of `name: value`), for an untrusted and a trusted peer, encodes the
    /// request head an upstream would get, and checks the invariants on it: it parses, and no
    /// hop-by-hop header or client copy survives for an untrusted peer.
    pub fn forwarded(data: &[u8]) {
        use http::header::{HeaderMap, HeaderName, HeaderValue};
        let text = String::from_utf8_lossy(data);
        let mut lines = text.lines();
        let host = lines.next().unwrap_or("example.com").to_owned();
        let mut headers = HeaderMap::new();
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.trim().as_bytes()),
                HeaderValue::from_str(value.trim()),
            ) {
                headers.append(name, value);
            }
        }
        let nets: Vec<ipnet::IpNet> =
            vec![ipnet::IpNet::from(std::net::IpAddr::from([10, 0, 0, 1]))];
        for trusted in [false, true] {
            let mut h = headers.clone();
            let peer = if trusted {
                [10, 0, 0, 1]
            } else {
                [192, 0, 2, 1]
            };
            let conn = crate::headers::ClientConn::new(std::net::IpAddr::from(peer), 443, trusted);
            let Some(extra) = crate::headers::rewrite_request(&mut h, &conn, &nets, &host) else {
                assert!(http::HeaderValue::from_str(&host).is_err());
                continue;
            };
            // What the upstream receives: the head as written, parsed back.
            let target = crate::wire::Target {
                base: "",
                path: "/",
                query: None,
            };
            let req =
                crate::wire::Outgoing::new(&http::Method::GET, target, &h, &extra, None, false);
            let mut fields = vec![httparse::EMPTY_HEADER; h.len() + 16];
            let mut parsed = httparse::Request::new(&mut fields);
            assert!(
                matches!(parsed.parse(req.head()), Ok(httparse::Status::Complete(_))),
                "the head written upstream must parse"
            );
            let values = |name: &str| -> Vec<&[u8]> {
                parsed
                    .headers
                    .iter()
                    .filter(|f| f.name.eq_ignore_ascii_case(name))
                    .map(|f| f.value)
                    .collect()
            };
            for hop in [
                "connection",
                "keep-alive",
                "te",
                "transfer-encoding",
                "upgrade",
                "proxy-authorization",
            ] {
                assert!(values(hop).is_empty(), "{hop} survived");
            }
            if !trusted {
                assert_eq!(
                    values("x-forwarded-for"),
                    [b"192.0.2.1"],
                    "untrusted X-Forwarded-For must be replaced"
                );
                assert_eq!(values("x-real-ip"), [b"192.0.2.1"]);
            }
        }
    }

    /// Reads `data` as an upstream's answer to a `GET` (or, if its first byte is odd, a
    /// `HEAD`): the head, then the body fed in pieces whose sizes come from the data, and
    /// checks that nothing panics, that the body never yields more than was sent, and that a
    /// body with a length yields exactly that length when it completes.
    pub fn upstream_response(data: &[u8]) {
        let Some((&first, rest)) = data.split_first() else {
            return;
        };
        let step = usize::from(first >> 1).max(1);
        let mut buf = bytes::BytesMut::from(rest);
        let Ok(Some(head)) =
            crate::wire::parse_head(&mut buf, first & 1 == 1, &mut http::HeaderMap::new())
        else {
            return;
        };
        let mut decoder = head.body;
        let body = buf.split();
        let mut pieces = body.chunks(step);
        let mut yielded = 0usize;
        let ended = loop {
            match decoder.decode(&mut buf) {
                Err(_) => return,
                Ok(crate::wire::Decoded::Frame(frame)) => {
                    yielded += frame.data_ref().map_or(0, |d| d.len());
                }
                Ok(crate::wire::Decoded::End) => break true,
                Ok(crate::wire::Decoded::More) => match pieces.next() {
                    Some(piece) => buf.extend_from_slice(piece),
                    None => break false,
                },
            }
        };
        assert!(yielded <= body.len(), "more body than was sent");
        if let (true, crate::wire::Decoder::Length(n)) = (ended, head.body) {
            assert_eq!(yielded as u64, n, "a length-framed body yields its length");
        }
    }
}

/// Entry points for the benchmarks in `benches/`; not a stable API.
#[doc(hidden)]
pub mod bench {
    use http::HeaderMap;

    /// The request-header rewriting of one connection, as the proxy does it per request.
    #[derive(Debug)]
    pub struct HeaderRewriter {
        conn: crate::headers::ClientConn,
        trusted: Vec<ipnet::IpNet>,
    }

    impl HeaderRewriter {
        /// A connection from `peer` to local port `local_port`.
        pub fn new(
            peer: std::net::IpAddr,
            local_port: u16,
            tls: bool,
            trusted: Vec<ipnet::IpNet>,
        ) -> Self {
            Self {
                conn: crate::headers::ClientConn::new(peer, local_port, tls),
                trusted,
            }
        }

        /// Rewrites one request's headers for its upstream and encodes the head sent there
        /// (`GET /` with them); its length, or `None` when `host` is invalid.
        pub fn request_head(&self, headers: &mut HeaderMap, host: &str) -> Option<usize> {
            let extra = crate::headers::rewrite_request(headers, &self.conn, &self.trusted, host)?;
            let target = crate::wire::Target {
                base: "",
                path: "/",
                query: None,
            };
            let req = crate::wire::Outgoing::new(
                &http::Method::GET,
                target,
                headers,
                &extra,
                None,
                false,
            );
            Some(req.head().len())
        }
    }

    /// Parses an upstream's response head as the proxy does (hop-by-hop fields left out);
    /// how many fields it kept, or `None` when `head` is not a whole, valid head.
    pub fn parse_response(head: &[u8]) -> Option<usize> {
        let mut buf = bytes::BytesMut::from(head);
        let parsed =
            crate::wire::parse_head(&mut buf, false, &mut http::HeaderMap::new()).ok()??;
        Some(parsed.response.headers().len())
    }
}
