//! Typed settings: what the binary's configuration file turns into.

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use ipnet::IpNet;
use portunus_store::Challenges;

/// The `[timeouts]` of the configuration. Defaults are those of DESIGN.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Timeouts {
    /// Connecting to an upstream.
    pub connect: Duration,
    /// Waiting for an upstream's response head.
    pub response_header: Duration,
    /// Reading a client's request head, from its first byte (slowloris).
    pub header_read: Duration,
    /// Completing a TLS handshake.
    pub tls_handshake: Duration,
    /// The longest gap between two reads of a request body (slow POST).
    pub body_read: Duration,
    /// The longest a response write may wait for a client that stopped reading.
    pub write: Duration,
    /// A keep-alive connection with no request in flight and no traffic is closed after this.
    pub idle: Duration,
    /// How long in-flight requests may run after shutdown begins.
    pub shutdown: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            response_header: Duration::from_secs(60),
            header_read: Duration::from_secs(10),
            tls_handshake: Duration::from_secs(10),
            body_read: Duration::from_secs(60),
            write: Duration::from_secs(60),
            idle: Duration::from_secs(60),
            shutdown: Duration::from_secs(30),
        }
    }
}

impl Timeouts {
    /// Sets the upstream connect timeout.
    pub fn connect(mut self, d: Duration) -> Self {
        self.connect = d;
        self
    }
    /// Sets the upstream response-head timeout.
    pub fn response_header(mut self, d: Duration) -> Self {
        self.response_header = d;
        self
    }
    /// Sets the client request-head timeout.
    pub fn header_read(mut self, d: Duration) -> Self {
        self.header_read = d;
        self
    }
    /// Sets the TLS handshake timeout.
    pub fn tls_handshake(mut self, d: Duration) -> Self {
        self.tls_handshake = d;
        self
    }
    /// Sets the request body read timeout (gap between two reads).
    pub fn body_read(mut self, d: Duration) -> Self {
        self.body_read = d;
        self
    }
    /// Sets the response write timeout.
    pub fn write(mut self, d: Duration) -> Self {
        self.write = d;
        self
    }
    /// Sets the keep-alive idle timeout.
    pub fn idle(mut self, d: Duration) -> Self {
        self.idle = d;
        self
    }
    /// Sets the drain time on shutdown.
    pub fn shutdown(mut self, d: Duration) -> Self {
        self.shutdown = d;
        self
    }
}

/// How a pool picks among its upstreams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum LoadBalancing {
    /// Each healthy upstream in turn.
    #[default]
    RoundRobin,
    /// The healthy upstream with the fewest requests in flight.
    LeastConn,
}

/// What a site or route does with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Handler {
    /// Forward to one of these upstream URLs (`http://host:port/optional/base/path`).
    Upstreams(Vec<String>),
    /// Answer directly with this status and body.
    Respond {
        /// The status sent.
        status: StatusCode,
        /// The body sent, as `text/plain; charset=utf-8`.
        body: String,
    },
}

/// A path-prefix route inside a site.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RouteSettings {
    /// The path prefix (`/api` matches `/api` and `/api/...`).
    pub path: String,
    /// Where matching requests go.
    pub handler: Handler,
    /// Whether the prefix is removed before forwarding.
    pub strip_prefix: bool,
}

impl RouteSettings {
    /// A route forwarding `path` to `handler`, without stripping the prefix.
    pub fn new(path: impl Into<String>, handler: Handler) -> Self {
        Self {
            path: path.into(),
            handler,
            strip_prefix: false,
        }
    }

    /// Removes the matched prefix before forwarding.
    pub fn strip_prefix(mut self, strip: bool) -> Self {
        self.strip_prefix = strip;
        self
    }
}

/// One site: its hosts, its default handler and its routes.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SiteSettings {
    /// Where the site was defined, for error messages (`portunus.toml:12:1`).
    pub origin: String,
    /// Host names and `*.example.com` wildcards.
    pub hosts: Vec<String>,
    /// What requests no route matches get; `None` answers them 404.
    pub handler: Option<Handler>,
    /// Path-prefix routes.
    pub routes: Vec<RouteSettings>,
    /// How each pool of this site picks an upstream.
    pub lb: LoadBalancing,
    /// Whether the site is served over HTTPS (its certificate comes from the resolver).
    pub tls: bool,
    /// For a TLS site: whether plain-HTTP requests get a 308 to HTTPS (default true).
    pub https_redirect: bool,
    /// A `Strict-Transport-Security` value added to HTTPS responses.
    pub hsts: Option<String>,
    /// The largest request body, overriding [`ProxySettings::max_body`] (0 = unlimited).
    pub max_body: Option<u64>,
}

impl SiteSettings {
    /// A site serving `hosts`, defined at `origin`, with no handler yet.
    pub fn new<I, S>(origin: impl Into<String>, hosts: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            origin: origin.into(),
            hosts: hosts.into_iter().map(Into::into).collect(),
            handler: None,
            routes: Vec::new(),
            lb: LoadBalancing::default(),
            tls: false,
            https_redirect: true,
            hsts: None,
            max_body: None,
        }
    }

    /// Limits request bodies of this site (0 = unlimited).
    pub fn max_body(mut self, bytes: u64) -> Self {
        self.max_body = Some(bytes);
        self
    }

    /// The site's label in metrics and [`UpstreamStatus`](crate::UpstreamStatus): its first
    /// host, lower case, without a trailing dot (the origin for a site without hosts).
    pub fn label(&self) -> String {
        self.hosts.first().map_or_else(
            || self.origin.clone(),
            |h| h.trim_end_matches('.').to_ascii_lowercase(),
        )
    }

    /// Serves the site over HTTPS (plain-HTTP requests are redirected unless turned off).
    pub fn tls(mut self, tls: bool) -> Self {
        self.tls = tls;
        self
    }

    /// Turns the plain-HTTP to HTTPS redirect of a TLS site on or off.
    pub fn https_redirect(mut self, redirect: bool) -> Self {
        self.https_redirect = redirect;
        self
    }

    /// Adds `Strict-Transport-Security: value` to HTTPS responses.
    pub fn hsts(mut self, value: impl Into<String>) -> Self {
        self.hsts = Some(value.into());
        self
    }

    /// Sets the default handler.
    pub fn handler(mut self, handler: Handler) -> Self {
        self.handler = Some(handler);
        self
    }

    /// Forwards requests no route matches to `urls`.
    pub fn upstreams<I, S>(self, urls: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.handler(Handler::Upstreams(
            urls.into_iter().map(Into::into).collect(),
        ))
    }

    /// Adds a route.
    pub fn route(mut self, route: RouteSettings) -> Self {
        self.routes.push(route);
        self
    }

    /// Sets the load-balancing policy.
    pub fn lb(mut self, lb: LoadBalancing) -> Self {
        self.lb = lb;
        self
    }
}

/// Everything a [`Proxy`](crate::Proxy) needs: sites plus global settings.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ProxySettings {
    /// The sites served.
    pub sites: Vec<SiteSettings>,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Peers whose `X-Forwarded-*` and `Forwarded` headers are believed.
    pub trusted_proxies: Vec<IpNet>,
    /// How long an upstream that refused a connection or timed out is left out of its pool.
    pub unhealthy_for: Duration,
    /// The largest request head accepted on HTTP/1.1.
    pub max_header_bytes: usize,
    /// The public HTTPS port, used in redirects (omitted from the URL when 443).
    pub https_port: u16,
    /// Pending ACME challenges: http-01 answers are served on plain HTTP.
    pub challenges: Option<Arc<Challenges>>,
    /// The most concurrent streams one HTTP/2 connection may open.
    pub h2_max_streams: u32,
    /// The most header fields in one request head (more: 431).
    pub max_headers: usize,
    /// The largest request body (0 = unlimited; more: 413).
    pub max_body: u64,
    /// The most open client connections per listener.
    pub max_connections: usize,
    /// The most open client connections from one IP address per listener.
    pub max_connections_per_ip: usize,
}

impl Default for ProxySettings {
    fn default() -> Self {
        Self {
            sites: Vec::new(),
            timeouts: Timeouts::default(),
            trusted_proxies: Vec::new(),
            unhealthy_for: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            https_port: 443,
            challenges: None,
            h2_max_streams: 128,
            max_headers: 100,
            max_body: 0,
            max_connections: 10_000,
            max_connections_per_ip: 256,
        }
    }
}

impl ProxySettings {
    /// Empty settings with the defaults of DESIGN.md.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a site.
    pub fn site(mut self, site: SiteSettings) -> Self {
        self.sites.push(site);
        self
    }

    /// Sets the timeouts.
    pub fn timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// Sets the trusted proxies.
    pub fn trusted_proxies(mut self, nets: Vec<IpNet>) -> Self {
        self.trusted_proxies = nets;
        self
    }

    /// Sets how long a failed upstream stays out of its pool.
    pub fn unhealthy_for(mut self, d: Duration) -> Self {
        self.unhealthy_for = d;
        self
    }

    /// Sets the public HTTPS port used in redirects.
    pub fn https_port(mut self, port: u16) -> Self {
        self.https_port = port;
        self
    }

    /// Serves the http-01 answers of `challenges` on plain HTTP.
    pub fn challenges(mut self, challenges: Arc<Challenges>) -> Self {
        self.challenges = Some(challenges);
        self
    }

    /// Sets the HTTP/2 concurrent stream limit.
    pub fn h2_max_streams(mut self, n: u32) -> Self {
        self.h2_max_streams = n;
        self
    }

    /// Sets the request header count limit.
    pub fn max_headers(mut self, n: usize) -> Self {
        self.max_headers = n;
        self
    }

    /// Sets the request body limit (0 = unlimited).
    pub fn max_body(mut self, bytes: u64) -> Self {
        self.max_body = bytes;
        self
    }

    /// Sets the connection limits per listener: in all, and from one IP address.
    pub fn max_connections(mut self, total: usize, per_ip: usize) -> Self {
        self.max_connections = total;
        self.max_connections_per_ip = per_ip;
        self
    }

    /// Sets the largest accepted request head.
    pub fn max_header_bytes(mut self, n: usize) -> Self {
        self.max_header_bytes = n;
        self
    }
}
