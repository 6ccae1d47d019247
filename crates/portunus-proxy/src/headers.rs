//! Header rewriting: hop-by-hop removal and the `X-Forwarded-*` / `Forwarded` family.

use std::net::IpAddr;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
const X_FORWARDED_SSL: HeaderName = HeaderName::from_static("x-forwarded-ssl");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1), plus
/// `Proxy-Authorization`, which is meant for us and never for an upstream.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
];

/// The lengths of the [`HOP_BY_HOP`] names, as a bit set: a name of another length is not
/// one of them, found without comparing it with each (checked by a test).
const HOP_BY_HOP_LENGTHS: u32 = 1 << 2 | 1 << 7 | 1 << 10 | 1 << 16 | 1 << 17 | 1 << 18 | 1 << 19;

/// The index in [`HOP_BY_HOP`] of a header name given as bytes, in any case.
pub(crate) fn hop_by_hop_index_of(name: &[u8]) -> Option<usize> {
    let len = name.len();
    if len >= 32 || HOP_BY_HOP_LENGTHS & (1 << len) == 0 {
        return None;
    }
    HOP_BY_HOP
        .iter()
        .position(|h| h.as_str().as_bytes().eq_ignore_ascii_case(name))
}

/// [`HOP_BY_HOP`]'s index of `Connection`.
pub(crate) const HOP_CONNECTION: usize = 0;
/// [`HOP_BY_HOP`]'s index of `Transfer-Encoding`.
pub(crate) const HOP_TRANSFER_ENCODING: usize = 5;

/// Removes hop-by-hop headers, including every header named in `Connection`.
pub(crate) fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names first, then remove only what is there: a miss costs a hash
    // lookup per name, and most messages carry at most `Connection`.
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(i) = hop_by_hop_index_of(name.as_str().as_bytes()) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    // Bit 0: `Connection`, the first of HOP_BY_HOP.
    if present & 1 != 0 {
        // Usually `keep-alive` or `upgrade`, removed below anyway: nothing is parsed for them.
        let listed: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|name| hop_by_hop_index_of(name.as_bytes()).is_none())
            .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
            .collect();
        for name in listed {
            headers.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

/// Rewrites a request's headers for its upstream: hop-by-hop headers removed, `Host` set to
/// `host`, and the forwarding headers set (see [`set_forwarded`]). Returns header lines to
/// send after the map's (this hop's forwarding fields, when they are this hop's alone);
/// `None` when `host` is not a valid header value.
pub(crate) fn rewrite_request(
    headers: &mut HeaderMap,
    conn: &ClientConn,
    trusted_nets: &[IpNet],
    host: &str,
) -> Option<Bytes> {
    remove_hop_by_hop(headers);
    // HTTP/1 requests carry their host in `Host` already (a cheap clone); HTTP/2 ones in the
    // URI's authority.
    let host_value = match headers.get(header::HOST) {
        Some(value) if value.as_bytes() == host.as_bytes() => value.clone(),
        _ => {
            let value = HeaderValue::from_str(host).ok()?;
            headers.insert(header::HOST, value.clone());
            value
        }
    };
    Some(set_forwarded(
        headers,
        conn,
        trusted_nets,
        host,
        &host_value,
    ))
}

/// Whether `headers` has the token `token` (case-insensitive) in a comma-separated header.
pub(crate) fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Whether a peer's address lies in one of the trusted networks.
pub(crate) fn is_trusted(trusted: &[IpNet], peer: IpAddr) -> bool {
    trusted.iter().any(|net| net.contains(&peer))
}

/// What a connection tells upstreams about its client, worked out once per connection.
#[derive(Debug, Clone)]
pub(crate) struct ClientConn {
    pub(crate) peer: IpAddr,
    pub(crate) tls: bool,
    /// The peer's address as a header value (`X-Forwarded-For`, `X-Real-IP`).
    ip: HeaderValue,
    /// `for=<node>;proto=<proto>`: how this hop's `Forwarded` element starts.
    forwarded: String,
    /// The local port (`X-Forwarded-Port`).
    port: HeaderValue,
    /// This hop's forwarding header lines for the first host asked for: a connection's
    /// requests are nearly always for one host, so they are built once, not per request.
    lines_for_host: std::sync::OnceLock<(Box<str>, Bytes)>,
}

impl ClientConn {
    pub(crate) fn new(peer: IpAddr, local_port: u16, tls: bool) -> Self {
        let peer = peer.to_canonical();
        let proto = if tls { "https" } else { "http" };
        let forwarded = match peer {
            IpAddr::V4(v4) => format!("for={v4};proto={proto}"),
            IpAddr::V6(v6) => format!("for=\"[{v6}]\";proto={proto}"),
        };
        Self {
            peer,
            tls,
            ip: value(peer.to_string()),
            forwarded,
            port: value(local_port.to_string()),
            lines_for_host: std::sync::OnceLock::new(),
        }
    }

    /// This hop's forwarding header lines (`name: value\r\n` each) for a request to `host`
    /// (`host_value` is the same as a header value), with no earlier hops.
    fn lines_for(&self, host: &str, host_value: &HeaderValue) -> Bytes {
        if let Some((cached, lines)) = self.lines_for_host.get()
            && **cached == *host
        {
            return lines.clone();
        }
        let forwarded = forwarded_value(self, host, None);
        let fields = [
            (&X_REAL_IP, Some(&self.ip)),
            (&X_FORWARDED_FOR, Some(&self.ip)),
            (&header::FORWARDED, forwarded.as_ref()),
            (&X_FORWARDED_PROTO, Some(&proto_value(self.tls))),
            (&X_FORWARDED_HOST, Some(host_value)),
            (&X_FORWARDED_PORT, Some(&self.port)),
            (&X_FORWARDED_SSL, Some(&ssl_value(self.tls))),
        ];
        let mut out = Vec::with_capacity(256);
        for (name, value) in fields {
            if let Some(value) = value {
                out.extend_from_slice(name.as_str().as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(value.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
        }
        let lines = Bytes::from(out);
        // The first host asked for stays; another is built each time.
        let _ = self.lines_for_host.set((host.into(), lines.clone()));
        lines
    }
}

/// A header value from text known to be valid (an address, a number).
fn value(text: String) -> HeaderValue {
    HeaderValue::from_maybe_shared(Bytes::from(text))
        .unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The headers that carry client information from proxy to proxy.
static FORWARDED_NAMES: [HeaderName; 7] = [
    X_FORWARDED_FOR,
    X_FORWARDED_PROTO,
    X_FORWARDED_HOST,
    X_FORWARDED_PORT,
    X_FORWARDED_SSL,
    X_REAL_IP,
    header::FORWARDED,
];

/// Sets `X-Forwarded-For`, `-Proto`, `-Host`, `-Port`, `-Ssl`, `X-Real-IP` and `Forwarded`
/// for a request to `host` (`host_value` is the same as a header value).
///
/// From an untrusted peer every client-sent copy is dropped first. From a trusted peer the
/// `X-Forwarded-For` and `Forwarded` chains are appended to and the other values it sent kept,
/// in `headers`. Otherwise the values are this hop's alone: they are returned as header lines
/// to send after the map's, built once per connection and host.
pub(crate) fn set_forwarded(
    headers: &mut HeaderMap,
    conn: &ClientConn,
    trusted_nets: &[IpNet],
    host: &str,
    host_value: &HeaderValue,
) -> Bytes {
    let trusted = is_trusted(trusted_nets, conn.peer);
    let sent = headers.keys().any(|name| FORWARDED_NAMES.contains(name));
    if sent && !trusted {
        for name in &FORWARDED_NAMES {
            headers.remove(name);
        }
    }
    if sent && trusted {
        append_forwarded(headers, conn, trusted_nets, host, host_value);
        return Bytes::new();
    }
    conn.lines_for(host, host_value)
}

fn proto_value(tls: bool) -> HeaderValue {
    HeaderValue::from_static(if tls { "https" } else { "http" })
}

fn ssl_value(tls: bool) -> HeaderValue {
    HeaderValue::from_static(if tls { "on" } else { "off" })
}

/// This hop's `Forwarded` element after `chain` (the elements of earlier hops), if any.
fn forwarded_value(conn: &ClientConn, host: &str, chain: Option<&str>) -> Option<HeaderValue> {
    let chain = chain.filter(|c| !c.trim().is_empty());
    let mut out = String::with_capacity(
        chain.map_or(0, |c| c.len() + 2) + conn.forwarded.len() + host.len() + 8,
    );
    if let Some(chain) = chain {
        out.push_str(chain);
        out.push_str(", ");
    }
    out.push_str(&conn.forwarded);
    if is_token(host) {
        out.push_str(";host=");
        out.push_str(host);
    } else if !host.contains(['"', '\\']) {
        out.push_str(";host=\"");
        out.push_str(host);
        out.push('"');
    }
    HeaderValue::from_maybe_shared(Bytes::from(out)).ok()
}

/// A trusted peer sent forwarding headers: append to its chains, keep its other values.
fn append_forwarded(
    headers: &mut HeaderMap,
    conn: &ClientConn,
    trusted_nets: &[IpNet],
    host: &str,
    host_value: &HeaderValue,
) {
    let peer = conn.ip.to_str().unwrap_or_default();
    let xff = match joined(headers, &X_FORWARDED_FOR) {
        Some(chain) if !chain.trim().is_empty() => format!("{chain}, {peer}"),
        _ => peer.to_owned(),
    };
    if !headers.contains_key(&X_REAL_IP) {
        let real = real_ip(&xff, trusted_nets).unwrap_or(peer).to_owned();
        insert(headers, X_REAL_IP, &real);
    }
    insert(headers, X_FORWARDED_FOR, &xff);
    let chain = joined(headers, &header::FORWARDED);
    if let Some(forwarded) = forwarded_value(conn, host, chain.as_deref()) {
        headers.insert(header::FORWARDED, forwarded);
    }
    if !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO, proto_value(conn.tls));
    }
    if !headers.contains_key(&X_FORWARDED_HOST) {
        headers.insert(X_FORWARDED_HOST, host_value.clone());
    }
    if !headers.contains_key(&X_FORWARDED_PORT) {
        headers.insert(X_FORWARDED_PORT, conn.port.clone());
    }
    if !headers.contains_key(&X_FORWARDED_SSL) {
        headers.insert(X_FORWARDED_SSL, ssl_value(conn.tls));
    }
}

/// The client address of an `X-Forwarded-For` chain: the right-most entry that is not a
/// trusted proxy, or the left-most entry when all are trusted.
fn real_ip<'a>(chain: &'a str, trusted: &[IpNet]) -> Option<&'a str> {
    let entries: Vec<&str> = chain.split(',').map(str::trim).collect();
    entries
        .iter()
        .rev()
        .find(|e| {
            e.parse::<IpAddr>()
                .map_or(true, |ip| !is_trusted(trusted, ip))
        })
        .or_else(|| entries.first())
        .copied()
        .filter(|e| !e.is_empty())
}

/// All values of a header joined by `, ` (several header lines form one list).
fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut values = headers.get_all(name).iter().filter_map(|v| v.to_str().ok());
    let first = values.next()?.to_owned();
    Some(values.fold(first, |acc, v| acc + ", " + v))
}

fn insert(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name, value);
    }
}

/// Whether `s` is an RFC 9110 token (may appear unquoted in `Forwarded`).
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_lengths_cover_every_name() {
        let mask = HOP_BY_HOP
            .iter()
            .fold(0u32, |mask, name| mask | 1 << name.as_str().len());
        assert_eq!(mask, HOP_BY_HOP_LENGTHS);
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            let upper = name.as_str().to_ascii_uppercase();
            assert_eq!(hop_by_hop_index_of(upper.as_bytes()), Some(i));
        }
        assert_eq!(HOP_BY_HOP[HOP_CONNECTION], header::CONNECTION);
        assert_eq!(HOP_BY_HOP[HOP_TRANSFER_ENCODING], header::TRANSFER_ENCODING);
        assert_eq!(hop_by_hop_index_of(b"x-upgrade"), None);
    }

    #[test]
    fn a_connections_lines_follow_its_host() {
        let conn = ClientConn::new("192.0.2.7".parse().unwrap(), 443, true);
        let host = HeaderValue::from_static("a.test");
        assert_eq!(
            conn.lines_for("a.test", &host),
            "x-real-ip: 192.0.2.7\r\nx-forwarded-for: 192.0.2.7\r\n\
             forwarded: for=192.0.2.7;proto=https;host=a.test\r\nx-forwarded-proto: https\r\n\
             x-forwarded-host: a.test\r\nx-forwarded-port: 443\r\nx-forwarded-ssl: on\r\n"
        );
        let other = HeaderValue::from_static("b.test");
        assert!(
            std::str::from_utf8(&conn.lines_for("b.test", &other))
                .unwrap()
                .contains("host=b.test")
        );
        assert!(
            std::str::from_utf8(&conn.lines_for("a.test", &host))
                .unwrap()
                .contains("host=a.test")
        );
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_removed_including_connection_listed() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret, x-other"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("x-other", "2"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("proxy-authorization", "Basic abc"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("trailer", "x-t"),
            ("x-keep", "yes"),
            ("host", "example.com"),
        ]);
        remove_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["x-keep", "host"]);
    }

    #[test]
    fn tokens() {
        let h = map(&[("connection", "Keep-Alive"), ("connection", "Upgrade ")]);
        assert!(has_token(&h, &header::CONNECTION, "upgrade"));
        assert!(!has_token(&h, &header::CONNECTION, "close"));
    }

    /// Adds header lines (`name: value\r\n` each) to `h`.
    fn add_lines(h: &mut HeaderMap, lines: &[u8]) {
        for line in std::str::from_utf8(lines).unwrap().split_terminator("\r\n") {
            let (name, value) = line.split_once(": ").unwrap();
            h.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
    }

    /// Rewrites `h` as for a plain-HTTP request to `host` from `peer` on local port 8080, the
    /// lines sent after the map added to it.
    fn forward(h: &mut HeaderMap, peer: &str, nets: &[IpNet], host: &str) {
        let conn = ClientConn::new(peer.parse().unwrap(), 8080, false);
        let lines = set_forwarded(h, &conn, nets, host, &HeaderValue::from_str(host).unwrap());
        add_lines(h, &lines);
    }

    #[test]
    fn forwarded_follows_each_request_host_on_one_connection() {
        let conn = ClientConn::new("192.0.2.7".parse().unwrap(), 8080, false);
        for host in ["a.test", "b.test", "a.test", "[::1]:8080", "b.test"] {
            let mut h = HeaderMap::new();
            let lines = set_forwarded(
                &mut h,
                &conn,
                &[],
                host,
                &HeaderValue::from_str(host).unwrap(),
            );
            add_lines(&mut h, &lines);
            let expected = if host.starts_with('[') {
                format!("for=192.0.2.7;proto=http;host=\"{host}\"")
            } else {
                format!("for=192.0.2.7;proto=http;host={host}")
            };
            assert_eq!(h["forwarded"], expected.as_str(), "{host}");
        }
    }

    #[test]
    fn untrusted_peer_spoofs_are_replaced() {
        let mut h = map(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-real-ip", "6.6.6.6"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil.test"),
            ("x-forwarded-port", "1"),
            ("x-forwarded-ssl", "on"),
            ("forwarded", "for=6.6.6.6"),
        ]);
        forward(&mut h, "192.0.2.7", &[], "example.com");
        assert_eq!(h["x-forwarded-for"], "192.0.2.7");
        assert_eq!(h["x-real-ip"], "192.0.2.7");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "example.com");
        assert_eq!(h["x-forwarded-port"], "8080");
        assert_eq!(h["x-forwarded-ssl"], "off");
        assert_eq!(h["forwarded"], "for=192.0.2.7;proto=http;host=example.com");
    }

    #[test]
    fn trusted_peer_chain_is_appended() {
        let nets: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let mut h = map(&[
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-for", "10.1.1.1"),
            ("x-forwarded-proto", "https"),
            ("forwarded", "for=203.0.113.9"),
        ]);
        forward(&mut h, "10.0.0.2", &nets, "example.com");
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 10.1.1.1, 10.0.0.2");
        assert_eq!(h["x-real-ip"], "203.0.113.9");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(
            h["forwarded"],
            "for=203.0.113.9, for=10.0.0.2;proto=http;host=example.com"
        );
    }

    #[test]
    fn ipv6_forwarded_is_quoted() {
        let mut h = HeaderMap::new();
        forward(&mut h, "::1", &[], "example.com");
        assert_eq!(h["forwarded"], "for=\"[::1]\";proto=http;host=example.com");
        assert_eq!(h["x-forwarded-for"], "::1");
    }

    #[test]
    fn host_with_port_is_quoted_in_forwarded() {
        let mut h = HeaderMap::new();
        forward(&mut h, "192.0.2.1", &[], "example.com:8080");
        assert_eq!(
            h["forwarded"],
            "for=192.0.2.1;proto=http;host=\"example.com:8080\""
        );
    }

    #[test]
    fn trusted_peer_without_forwarding_headers_is_the_client() {
        let nets: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let mut h = map(&[("host", "example.com")]);
        forward(&mut h, "10.0.0.2", &nets, "example.com");
        assert_eq!(h["x-forwarded-for"], "10.0.0.2");
        assert_eq!(h["x-real-ip"], "10.0.0.2");
        assert_eq!(h["x-forwarded-host"], "example.com");
        assert_eq!(h["forwarded"], "for=10.0.0.2;proto=http;host=example.com");
    }

    #[test]
    fn mapped_ipv4_peer_is_written_as_ipv4() {
        let mut h = HeaderMap::new();
        forward(&mut h, "::ffff:192.0.2.9", &[], "example.com");
        assert_eq!(h["x-forwarded-for"], "192.0.2.9");
        assert_eq!(h["forwarded"], "for=192.0.2.9;proto=http;host=example.com");
    }

    #[test]
    fn connection_keep_alive_alone_is_removed() {
        let mut h = map(&[("connection", "keep-alive"), ("content-length", "6")]);
        remove_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["content-length"]);
    }

    #[test]
    fn host_is_set_from_the_authority_when_it_differs() {
        let conn = ClientConn::new("192.0.2.1".parse().unwrap(), 443, true);
        let mut h = map(&[("host", "other.test"), ("te", "trailers")]);
        let lines = rewrite_request(&mut h, &conn, &[], "example.com").unwrap();
        add_lines(&mut h, &lines);
        assert_eq!(h["host"], "example.com");
        assert_eq!(h["x-forwarded-host"], "example.com");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-ssl"], "on");
        assert_eq!(h["x-forwarded-port"], "443");
        assert!(!h.contains_key("te"));
        let mut h = HeaderMap::new();
        assert!(rewrite_request(&mut h, &conn, &[], "bad\nhost").is_none());
    }
}
