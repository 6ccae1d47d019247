//! Listeners, HTTP serving and forwarding for the Portunus reverse proxy.
//!
//! This crate does:
//! - serve HTTP/1.1 on plain listeners ([`Proxy::serve`]) and HTTPS with HTTP/2 or HTTP/1.1
//!   chosen by ALPN ([`Proxy::serve_tls`], certificates from a
//!   [`portunus_store::CertResolver`] through [`server_config`]), and route each request by
//!   host and path ([`portunus_router`]) to a pool of upstreams or a static answer;
//! - redirect plain-HTTP requests of TLS sites to HTTPS, add HSTS, answer ACME http-01 and
//!   tls-alpn-01 challenges published in the store;
//! - forward over pooled keep-alive HTTP/1.1 connections (one pool per worker thread, over
//!   hyper's client connections; a connection is given back when its response body has been
//!   read to the end), streaming bodies both ways, with round-robin or least-connections
//!   balancing, passive health and safe retries;
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
    /// from `data` (lines of `name: value`), for an untrusted and a trusted peer, and checks
    /// the invariants: no hop-by-hop header or client copy survives for an untrusted peer.
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
            if crate::headers::rewrite_request(&mut h, &conn, &nets, &host).is_none() {
                assert!(http::HeaderValue::from_str(&host).is_err());
                continue;
            }
            for hop in [
                "connection",
                "keep-alive",
                "te",
                "transfer-encoding",
                "upgrade",
                "proxy-authorization",
            ] {
                assert!(!h.contains_key(hop), "{hop} survived");
            }
            if !trusted {
                let xff = h.get("x-forwarded-for").and_then(|v| v.to_str().ok());
                assert_eq!(
                    xff,
                    Some("192.0.2.1"),
                    "untrusted X-Forwarded-For must be replaced"
                );
                assert_eq!(h.get_all("x-real-ip").iter().count(), 1);
            }
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

        /// Rewrites one request's headers for its upstream; false when `host` is invalid.
        pub fn rewrite(&self, headers: &mut HeaderMap, host: &str) -> bool {
            crate::headers::rewrite_request(headers, &self.conn, &self.trusted, host).is_some()
        }

        /// Removes the hop-by-hop headers of an upstream's response.
        pub fn response(&self, headers: &mut HeaderMap) {
            crate::headers::remove_hop_by_hop(headers);
        }
    }
}
