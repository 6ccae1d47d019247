//! Header rewriting: hop-by-hop removal and the `X-Forwarded-*` / `Forwarded` family.

use std::net::IpAddr;

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
const HOP_BY_HOP: [HeaderName; 9] = [
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

/// Removes hop-by-hop headers, including every header named in `Connection`.
pub(crate) fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
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

/// What the proxy knows about the client side of one request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientInfo<'a> {
    pub(crate) peer: IpAddr,
    pub(crate) trusted: bool,
    pub(crate) tls: bool,
    pub(crate) host: &'a str,
    pub(crate) local_port: u16,
    pub(crate) trusted_nets: &'a [IpNet],
}

/// Sets `X-Forwarded-For`, `-Proto`, `-Host`, `-Port`, `-Ssl`, `X-Real-IP` and `Forwarded`.
///
/// From an untrusted peer every client-sent copy is dropped first. From a trusted peer the
/// `X-Forwarded-For` and `Forwarded` chains are appended to and the other values it sent kept.
pub(crate) fn set_forwarded(headers: &mut HeaderMap, client: &ClientInfo<'_>) {
    let proto = if client.tls { "https" } else { "http" };
    let names = [
        &X_FORWARDED_FOR,
        &X_FORWARDED_PROTO,
        &X_FORWARDED_HOST,
        &X_FORWARDED_PORT,
        &X_FORWARDED_SSL,
        &X_REAL_IP,
        &header::FORWARDED,
    ];
    if !client.trusted {
        for name in names {
            headers.remove(name);
        }
    }
    let peer = client.peer.to_string();

    let previous_xff = joined(headers, &X_FORWARDED_FOR);
    let xff = match &previous_xff {
        Some(chain) if !chain.trim().is_empty() => format!("{chain}, {peer}"),
        _ => peer.clone(),
    };
    if !headers.contains_key(&X_REAL_IP) {
        let real = real_ip(&xff, client.trusted_nets)
            .unwrap_or(&peer)
            .to_owned();
        insert(headers, X_REAL_IP, &real);
    }
    insert(headers, X_FORWARDED_FOR, &xff);

    let node = match client.peer {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("\"[{v6}]\""),
    };
    let mut element = format!("for={node};proto={proto}");
    if is_token(client.host) {
        element.push_str(";host=");
        element.push_str(client.host);
    } else if !client.host.contains(['"', '\\']) {
        element.push_str(&format!(";host=\"{}\"", client.host));
    }
    let forwarded = match joined(headers, &header::FORWARDED) {
        Some(chain) if !chain.trim().is_empty() => format!("{chain}, {element}"),
        _ => element,
    };
    insert(headers, header::FORWARDED, &forwarded);

    if !headers.contains_key(&X_FORWARDED_PROTO) {
        insert(headers, X_FORWARDED_PROTO, proto);
    }
    if !headers.contains_key(&X_FORWARDED_HOST) {
        insert(headers, X_FORWARDED_HOST, client.host);
    }
    if !headers.contains_key(&X_FORWARDED_PORT) {
        insert(headers, X_FORWARDED_PORT, &client.local_port.to_string());
    }
    if !headers.contains_key(&X_FORWARDED_SSL) {
        insert(
            headers,
            X_FORWARDED_SSL,
            if client.tls { "on" } else { "off" },
        );
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

    fn client<'a>(peer: &str, trusted: bool, nets: &'a [IpNet]) -> ClientInfo<'a> {
        ClientInfo {
            peer: peer.parse().unwrap(),
            trusted,
            tls: false,
            host: "example.com",
            local_port: 8080,
            trusted_nets: nets,
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
        set_forwarded(&mut h, &client("192.0.2.7", false, &[]));
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
        set_forwarded(&mut h, &client("10.0.0.2", true, &nets));
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
        set_forwarded(&mut h, &client("::1", false, &[]));
        assert_eq!(h["forwarded"], "for=\"[::1]\";proto=http;host=example.com");
        assert_eq!(h["x-forwarded-for"], "::1");
    }

    #[test]
    fn host_with_port_is_quoted_in_forwarded() {
        let mut h = HeaderMap::new();
        let mut c = client("192.0.2.1", false, &[]);
        c.host = "example.com:8080";
        set_forwarded(&mut h, &c);
        assert_eq!(
            h["forwarded"],
            "for=192.0.2.1;proto=http;host=\"example.com:8080\""
        );
    }
}
