//! The proxy's errors: setup errors, and per-request errors that know their side and status.

use http::StatusCode;

/// Errors building or running a proxy.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The sites do not form a valid routing table.
    #[error("invalid routing table")]
    Routes(#[source] portunus_router::BuildErrors),
    /// An upstream URL is not usable.
    #[error("{origin}: invalid upstream `{url}`")]
    Upstream {
        /// Where the site was defined.
        origin: String,
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        #[source]
        source: crate::upstream::UpstreamUrlError,
    },
    /// A site or route has neither upstreams nor a static answer.
    #[error("{origin}: {what} has neither upstreams nor `respond`")]
    NoHandler {
        /// Where the site was defined.
        origin: String,
        /// `site` or `route /path`.
        what: String,
    },
    /// Accepting on a listener failed.
    #[error("listener {addr}")]
    Listener {
        /// The listener's address.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Which side of the proxy a request error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Side {
    /// The client (downstream) sent something unacceptable.
    Downstream,
    /// The upstream failed or was too slow.
    Upstream,
}

/// Why one request could not be proxied. Mapped to an HTTP status in one place,
/// [`RequestError::status`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// No site serves the requested host.
    #[error("no site is configured for this host")]
    UnknownHost,
    /// The site serves the host but no route matches the path.
    #[error("no route matches this path")]
    NoRoute,
    /// The request carries no usable host.
    #[error("the request has no valid Host header")]
    MissingHost,
    /// The request body is larger than the site allows.
    #[error("the request body is larger than {0} bytes")]
    TooLarge(u64),
    /// The path holds dot segments, NUL or backslashes.
    #[error("paths with dot segments, NUL or backslashes are refused")]
    UnsafePath,
    /// The request body could not be decoded (an invalid chunk, say).
    #[error("the request body is malformed")]
    BadBody,
    /// A transfer coding other than `chunked`.
    #[error("transfer coding `{0}` is not supported")]
    UnknownCoding(String),
    /// The client stopped sending its request body.
    #[error("the request body stalled")]
    BodyTimeout,
    /// Over TLS, the `Host` is not covered by the connection's certificate.
    #[error("this connection's certificate does not cover the requested host")]
    Misdirected,
    /// `CONNECT` is never proxied.
    #[error("CONNECT is not supported")]
    Connect,
    /// An upgrade other than WebSocket (`h2c` above all).
    #[error("upgrade to `{0}` is not supported")]
    Upgrade(String),
    /// No upstream could be reached.
    #[error("no upstream answered")]
    NoUpstream(#[source] Option<crate::UpstreamError>),
    /// The upstream did not send its response head in time.
    #[error("the upstream did not answer in time")]
    Timeout,
    /// The upstream broke the exchange.
    #[error("the upstream failed")]
    UpstreamFailed(#[source] crate::UpstreamError),
}

impl RequestError {
    /// The side responsible for this error.
    pub fn side(&self) -> Side {
        match self {
            Self::UnknownHost
            | Self::NoRoute
            | Self::MissingHost
            | Self::TooLarge(_)
            | Self::BodyTimeout
            | Self::UnsafePath
            | Self::BadBody
            | Self::UnknownCoding(_)
            | Self::Misdirected
            | Self::Connect
            | Self::Upgrade(_) => Side::Downstream,
            Self::NoUpstream(_) | Self::Timeout | Self::UpstreamFailed(_) => Side::Upstream,
        }
    }

    /// The status the client receives.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::UnknownHost | Self::NoRoute => StatusCode::NOT_FOUND,
            Self::MissingHost | Self::Upgrade(_) | Self::UnsafePath | Self::BadBody => {
                StatusCode::BAD_REQUEST
            }
            Self::UnknownCoding(_) => StatusCode::NOT_IMPLEMENTED,
            Self::Connect => StatusCode::METHOD_NOT_ALLOWED,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::Misdirected => StatusCode::MISDIRECTED_REQUEST,
            Self::NoUpstream(_) | Self::UpstreamFailed(_) => StatusCode::BAD_GATEWAY,
            Self::Timeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// Whether sending the same request to another upstream is safe, assuming the request
    /// itself is idempotent and has no body (RFC 9110 §9.2.2): the connection failed, or the
    /// upstream closed or reset it before sending any part of a response.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::NoUpstream(Some(e)) => e.is_connect(),
            Self::UpstreamFailed(e) => e.is_connect() || e.closed_before_response(),
            _ => false,
        }
    }

    /// The short plain-text body sent with the status.
    pub fn body(&self) -> String {
        let status = self.status();
        format!(
            "{} {}: {self}\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or("Error")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_and_side_table() {
        let cases = [
            (RequestError::UnknownHost, 404, Side::Downstream),
            (RequestError::NoRoute, 404, Side::Downstream),
            (RequestError::MissingHost, 400, Side::Downstream),
            (RequestError::Connect, 405, Side::Downstream),
            (RequestError::Upgrade("h2c".into()), 400, Side::Downstream),
            (RequestError::NoUpstream(None), 502, Side::Upstream),
            (RequestError::Timeout, 504, Side::Upstream),
        ];
        for (error, status, side) in cases {
            assert_eq!(error.status().as_u16(), status, "{error}");
            assert_eq!(error.side(), side, "{error}");
            assert!(error.body().starts_with(&status.to_string()));
            assert!(!error.is_retryable());
        }
        assert_eq!(
            RequestError::Timeout.body(),
            "504 Gateway Timeout: the upstream did not answer in time\n"
        );
        assert_eq!(
            RequestError::NoUpstream(None).body(),
            "502 Bad Gateway: no upstream answered\n"
        );
    }
}
