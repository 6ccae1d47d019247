//! The ACME crate's error type.

/// Errors of account handling, ordering and renewal.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The CA refused a request with an ACME problem document.
    #[error("{name}: the CA answered {kind}: {detail}")]
    Problem {
        /// The host name (or `account`).
        name: String,
        /// The problem type, e.g. `urn:ietf:params:acme:error:rateLimited`.
        kind: String,
        /// The problem detail (and subproblems).
        detail: String,
    },
    /// Talking to the CA failed (network, TLS, unexpected answer).
    #[error("{name}: ACME request failed")]
    Acme {
        /// The host name (or `account`).
        name: String,
        /// The cause.
        #[source]
        source: instant_acme::Error,
    },
    /// The CA offered no challenge type that is enabled here.
    #[error("{name}: no enabled challenge type is offered (offered: {offered})")]
    NoChallenge {
        /// The host name.
        name: String,
        /// What the CA offered.
        offered: String,
    },
    /// Validation failed.
    #[error("{name}: validation failed: {detail}")]
    Invalid {
        /// The host name.
        name: String,
        /// The CA's explanation, when it gave one.
        detail: String,
    },
    /// A wildcard needs dns-01, which Portunus does not do.
    #[error("{name}: wildcard certificates need the dns-01 challenge, which is not supported")]
    Wildcard {
        /// The host name.
        name: String,
    },
    /// Making a key, CSR or challenge certificate failed.
    #[error("{name}: key or CSR generation failed")]
    Generate {
        /// The host name.
        name: String,
        /// rcgen's complaint.
        #[source]
        source: rcgen::Error,
    },
    /// Storage or certificate handling failed.
    #[error("certificate store")]
    Store(#[from] portunus_store::Error),
    /// The stored account could not be read.
    #[error("stored ACME account is unreadable")]
    Account(#[source] serde_json::Error),
    /// The configuration is unusable (EAB key not base64, unknown CA, ...).
    #[error("{0}")]
    Config(String),
    /// The name is not known to this manager.
    #[error("{0}: no certificate is managed for this name")]
    UnknownName(String),
}

/// A shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an instant-acme error for `name`, turning problem documents into
    /// [`Error::Problem`] so their type and detail are visible.
    pub(crate) fn acme(name: &str, source: instant_acme::Error) -> Self {
        match source {
            instant_acme::Error::Api(problem) => {
                let mut detail = problem.detail.clone().unwrap_or_default();
                for sub in &problem.subproblems {
                    if let Some(d) = &sub.detail {
                        detail.push_str("; ");
                        detail.push_str(d);
                    }
                }
                Self::Problem {
                    name: name.to_owned(),
                    kind: problem
                        .r#type
                        .clone()
                        .unwrap_or_else(|| "unknown".to_owned()),
                    detail,
                }
            }
            source => Self::Acme {
                name: name.to_owned(),
                source,
            },
        }
    }

    /// Whether the CA said we are rate limited.
    pub fn is_rate_limited(&self) -> bool {
        matches!(self, Self::Problem { kind, .. } if kind.ends_with(":rateLimited"))
    }
}
