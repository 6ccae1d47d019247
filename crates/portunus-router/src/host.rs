//! Host name normalisation and validation, shared by table building and lookups.

use std::borrow::Cow;
use std::net::IpAddr;

/// The longest host name DNS allows (without the trailing dot).
const MAX_HOST_LEN: usize = 253;
/// The longest label DNS allows.
const MAX_LABEL_LEN: usize = 63;

/// Why a host name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HostError {
    /// The name is empty (or only a port or a dot).
    #[error("host name is empty")]
    Empty,
    /// The name is longer than DNS allows.
    #[error("host name `{0}` is longer than 253 characters")]
    TooLong(String),
    /// A label is empty, too long, or holds a character DNS does not allow.
    #[error("host name `{0}` is not a valid DNS name")]
    Invalid(String),
    /// A `*` appears other than as the whole first label of a name with at least two more labels.
    #[error("wildcard `{0}` must have the form `*.example.com`")]
    BadWildcard(String),
    /// The name could not be converted to punycode.
    #[error("host name `{0}` is not a valid internationalised domain name")]
    Idna(String),
}

/// A validated host pattern from the configuration: one exact name or a one-label wildcard.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HostPattern {
    /// An exact, normalised host name or IP address.
    Exact(String),
    /// `*.suffix`: matches any single label in front of `suffix` (normalised, without `*.`).
    Wildcard(String),
}

impl HostPattern {
    /// Validates and normalises a host pattern such as `Example.COM.`, `*.example.com`,
    /// `bücher.example` or `127.0.0.1`.
    pub fn parse(input: &str) -> Result<Self, HostError> {
        if let Some(suffix) = input.strip_prefix("*.") {
            let suffix = normalize_name(suffix)?;
            if suffix.contains('*') || !suffix.contains('.') || suffix.parse::<IpAddr>().is_ok() {
                return Err(HostError::BadWildcard(input.to_owned()));
            }
            return Ok(Self::Wildcard(suffix));
        }
        if input.contains('*') {
            return Err(HostError::BadWildcard(input.to_owned()));
        }
        normalize_name(input).map(Self::Exact)
    }

    /// The pattern as written in normalised form (`*.example.com` for a wildcard).
    pub fn as_string(&self) -> String {
        match self {
            Self::Exact(name) => name.clone(),
            Self::Wildcard(suffix) => format!("*.{suffix}"),
        }
    }

    /// Whether `host` (already normalised) is matched by this pattern.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            Self::Exact(name) => name == host,
            Self::Wildcard(suffix) => host
                .split_once('.')
                .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
        }
    }
}

impl std::fmt::Display for HostPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exact(name) => f.write_str(name),
            Self::Wildcard(suffix) => write!(f, "*.{suffix}"),
        }
    }
}

/// Removes the port from a `Host` header value or URI authority: `example.com:8080` gives
/// `example.com`, `[::1]:443` gives `::1`.
pub fn split_host_port(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split_once(']').map_or(rest, |(host, _)| host);
    }
    match authority.rsplit_once(':') {
        // More than one colon without brackets: a bare IPv6 address, keep it whole.
        Some((host, _)) if !host.contains(':') => host,
        _ => authority,
    }
}

/// Normalises a host as a client sent it (port and trailing dot removed, lower case,
/// IDN to punycode) for comparison with the table. Borrowed when nothing changes.
///
/// This does not validate the name: a host that is not a valid DNS name simply matches
/// nothing. Use [`HostPattern::parse`] to validate names from configuration.
pub fn normalize_host(authority: &str) -> Result<Cow<'_, str>, HostError> {
    let host = split_host_port(authority);
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() {
        return Err(HostError::Empty);
    }
    fold_case(host)
}

/// Lower-cases an ASCII name, or converts an internationalised one to punycode.
fn fold_case(host: &str) -> Result<Cow<'_, str>, HostError> {
    if host.is_ascii() {
        if host.bytes().any(|b| b.is_ascii_uppercase()) {
            return Ok(Cow::Owned(host.to_ascii_lowercase()));
        }
        return Ok(Cow::Borrowed(host));
    }
    idna::domain_to_ascii(host)
        .map(Cow::Owned)
        .map_err(|_| HostError::Idna(host.to_owned()))
}

/// Calls `f` with the normalised form of `authority` without allocating for ASCII names.
pub(crate) fn with_normalized<R>(authority: &str, f: impl FnOnce(&str) -> R) -> Option<R> {
    let host = split_host_port(authority);
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() || host.len() > MAX_HOST_LEN {
        return None;
    }
    if !host.is_ascii() {
        return idna::domain_to_ascii(host).ok().map(|h| f(&h));
    }
    let mut buf = [0u8; MAX_HOST_LEN];
    let lower = &mut buf[..host.len()];
    lower.copy_from_slice(host.as_bytes());
    lower.make_ascii_lowercase();
    std::str::from_utf8(lower).ok().map(f)
}

/// Normalises and validates an exact name (no wildcard).
fn normalize_name(input: &str) -> Result<String, HostError> {
    let trimmed = input.strip_suffix('.').unwrap_or(input);
    if trimmed.is_empty() {
        return Err(HostError::Empty);
    }
    let bare = trimmed
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or(trimmed);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(ip.to_string());
    }
    let name = fold_case(trimmed)?.into_owned();
    if name.len() > MAX_HOST_LEN {
        return Err(HostError::TooLong(input.to_owned()));
    }
    let valid_label = |label: &str| {
        !label.is_empty()
            && label.len() <= MAX_LABEL_LEN
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if name.split('.').all(valid_label) {
        Ok(name)
    } else {
        Err(HostError::Invalid(input.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_host_port_table() {
        let cases = [
            ("example.com", "example.com"),
            ("example.com:8080", "example.com"),
            ("[::1]:443", "::1"),
            ("[::1]", "::1"),
            ("::1", "::1"),
            ("127.0.0.1:80", "127.0.0.1"),
            ("", ""),
        ];
        for (input, want) in cases {
            assert_eq!(split_host_port(input), want, "{input}");
        }
    }

    #[test]
    fn normalize_host_table() {
        let cases = [
            ("Example.COM", "example.com"),
            ("example.com.", "example.com"),
            ("EXAMPLE.com.:8443", "example.com"),
            ("bücher.example", "xn--bcher-kva.example"),
            ("BÜCHER.example", "xn--bcher-kva.example"),
            ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ];
        for (input, want) in cases {
            assert_eq!(normalize_host(input).as_deref(), Ok(want), "{input}");
            assert_eq!(
                with_normalized(input, str::to_owned).as_deref(),
                Some(want),
                "{input}"
            );
        }
        assert_eq!(normalize_host(":80"), Err(HostError::Empty));
        assert_eq!(normalize_host("."), Err(HostError::Empty));
        assert!(with_normalized(&"a".repeat(300), |_| ()).is_none());
    }

    #[test]
    fn pattern_parse_table() {
        let ok = [
            ("example.com", HostPattern::Exact("example.com".into())),
            ("Example.com.", HostPattern::Exact("example.com".into())),
            ("*.Example.com", HostPattern::Wildcard("example.com".into())),
            ("localhost", HostPattern::Exact("localhost".into())),
            ("127.0.0.1", HostPattern::Exact("127.0.0.1".into())),
            ("[::1]", HostPattern::Exact("::1".into())),
            ("münchen.de", HostPattern::Exact("xn--mnchen-3ya.de".into())),
            ("a_b.internal", HostPattern::Exact("a_b.internal".into())),
        ];
        for (input, want) in ok {
            assert_eq!(HostPattern::parse(input), Ok(want), "{input}");
        }
        let bad = [
            "",
            ".",
            "exa mple.com",
            "-a.com",
            "a-.com",
            "a..com",
            "*.com",
            "*",
            "a.*.com",
            "*example.com",
            "**.example.com",
            "example.com/path",
            "http://example.com",
        ];
        for input in bad {
            assert!(HostPattern::parse(input).is_err(), "{input} should fail");
        }
        assert!(matches!(
            HostPattern::parse(&format!("{}.com", "a".repeat(64))),
            Err(HostError::Invalid(_))
        ));
        let long = vec!["a".repeat(60); 5].join(".");
        assert!(matches!(
            HostPattern::parse(&long),
            Err(HostError::TooLong(_))
        ));
    }

    #[test]
    fn wildcard_matches_one_label() {
        let pattern = HostPattern::parse("*.example.com").unwrap();
        assert!(pattern.matches("www.example.com"));
        assert!(!pattern.matches("example.com"));
        assert!(!pattern.matches("a.b.example.com"));
        assert!(!pattern.matches(".example.com"));
        assert_eq!(pattern.to_string(), "*.example.com");
    }
}
