//! What the ACME manager needs to know: the CA, the account, challenges, keys, pacing.

use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result};

/// Let's Encrypt's production directory.
pub const LETSENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// Let's Encrypt's staging directory.
pub const LETSENCRYPT_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";
/// ZeroSSL's directory (needs External Account Binding).
pub const ZEROSSL: &str = "https://acme.zerossl.com/v2/DV90";

/// Resolves `letsencrypt`, `letsencrypt-staging`, `zerossl` or a directory URL.
pub fn directory_url(ca: &str) -> Result<String> {
    match ca {
        "letsencrypt" => Ok(LETSENCRYPT.to_owned()),
        "letsencrypt-staging" => Ok(LETSENCRYPT_STAGING.to_owned()),
        "zerossl" => Ok(ZEROSSL.to_owned()),
        url if url.starts_with("https://") || url.starts_with("http://") => Ok(url.to_owned()),
        other => Err(Error::Config(format!(
            "unknown CA `{other}`: use letsencrypt, letsencrypt-staging, zerossl or a directory URL"
        ))),
    }
}

/// An ACME challenge type Portunus can answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ChallengeKind {
    /// tls-alpn-01 on the HTTPS listener (port 443 for public CAs).
    TlsAlpn01,
    /// http-01 on the plain listener (port 80 for public CAs).
    Http01,
}

impl ChallengeKind {
    /// Parses `tls-alpn-01` or `http-01`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "tls-alpn-01" => Some(Self::TlsAlpn01),
            "http-01" => Some(Self::Http01),
            _ => None,
        }
    }

    pub(crate) fn acme(self) -> instant_acme::ChallengeType {
        match self {
            Self::TlsAlpn01 => instant_acme::ChallengeType::TlsAlpn01,
            Self::Http01 => instant_acme::ChallengeType::Http01,
        }
    }
}

/// The key type of certificates ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum KeyType {
    /// ECDSA with P-256 (default).
    #[default]
    EcdsaP256,
    /// ECDSA with P-384.
    EcdsaP384,
    /// RSA 2048.
    Rsa2048,
    /// RSA 4096.
    Rsa4096,
}

impl KeyType {
    /// Parses `ecdsa-p256`, `ecdsa-p384`, `rsa2048` or `rsa4096`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ecdsa-p256" => Some(Self::EcdsaP256),
            "ecdsa-p384" => Some(Self::EcdsaP384),
            "rsa2048" => Some(Self::Rsa2048),
            "rsa4096" => Some(Self::Rsa4096),
            _ => None,
        }
    }

    pub(crate) fn generate(self) -> std::result::Result<rcgen::KeyPair, rcgen::Error> {
        match self {
            Self::EcdsaP256 => rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
            Self::EcdsaP384 => rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384),
            Self::Rsa2048 => {
                rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
            }
            Self::Rsa4096 => {
                rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_4096)
            }
        }
    }
}

/// External Account Binding credentials (ZeroSSL, some private CAs).
#[derive(Clone, PartialEq, Eq)]
pub struct Eab {
    /// The key identifier.
    pub kid: String,
    /// The HMAC key, base64url as CAs hand it out.
    pub hmac_key: String,
}

impl std::fmt::Debug for Eab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Eab")
            .field("kid", &self.kid)
            .field("hmac_key", &"<redacted>")
            .finish()
    }
}

/// The pacing of orders: limits that mirror the CA's published ones, and backoff.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Budget {
    /// Orders running at once.
    pub concurrent_orders: usize,
    /// New orders per account per window (Let's Encrypt: 300 per 3 hours).
    pub orders_per_window: usize,
    /// The window of `orders_per_window`.
    pub orders_window: Duration,
    /// Failed validations per host name per window (Let's Encrypt: 5 per hour).
    pub failures_per_window: usize,
    /// The window of `failures_per_window`.
    pub failures_window: Duration,
    /// Certificates per registered domain per window (Let's Encrypt: 50 per 7 days).
    pub certs_per_domain: usize,
    /// The window of `certs_per_domain`.
    pub certs_window: Duration,
    /// The first retry delay after a failure; doubled after each further failure.
    pub backoff_base: Duration,
    /// The longest retry delay.
    pub backoff_cap: Duration,
    /// How long a rate-limited order waits at least, when the CA does not say.
    pub rate_limited_wait: Duration,
}

impl Default for Budget {
    fn default() -> Self {
        Self {
            concurrent_orders: 32,
            orders_per_window: 300,
            orders_window: Duration::from_secs(3 * 3600),
            failures_per_window: 5,
            failures_window: Duration::from_secs(3600),
            certs_per_domain: 50,
            certs_window: Duration::from_secs(7 * 24 * 3600),
            backoff_base: Duration::from_secs(60),
            backoff_cap: Duration::from_secs(24 * 3600),
            rate_limited_wait: Duration::from_secs(3600),
        }
    }
}

/// Everything about the CA and how to order from it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AcmeConfig {
    /// The directory URL.
    pub directory: String,
    /// A PEM root trusted for the directory's own HTTPS (Pebble, private CAs).
    pub ca_root: Option<PathBuf>,
    /// The account contact e-mail.
    pub email: Option<String>,
    /// External Account Binding.
    pub eab: Option<Eab>,
    /// Enabled challenge types, most preferred first.
    pub challenges: Vec<ChallengeKind>,
    /// The key type of ordered certificates.
    pub key_type: KeyType,
    /// An ACME profile to request (`tlsserver`, `shortlived`, ...).
    pub profile: Option<String>,
    /// Pacing.
    pub budget: Budget,
    /// How long to wait for the CA to validate and issue one order.
    pub order_timeout: Duration,
}

impl AcmeConfig {
    /// A configuration for the CA at `directory` with the defaults: tls-alpn-01 then
    /// http-01, ECDSA P-256, no profile.
    pub fn new(directory: impl Into<String>) -> Self {
        Self {
            directory: directory.into(),
            ca_root: None,
            email: None,
            eab: None,
            challenges: vec![ChallengeKind::TlsAlpn01, ChallengeKind::Http01],
            key_type: KeyType::default(),
            profile: None,
            budget: Budget::default(),
            order_timeout: Duration::from_secs(90),
        }
    }

    /// Trusts `pem` for the directory's HTTPS.
    pub fn ca_root(mut self, pem: impl Into<PathBuf>) -> Self {
        self.ca_root = Some(pem.into());
        self
    }

    /// Sets the account contact.
    pub fn email(mut self, email: impl Into<String>) -> Self {
        self.email = Some(email.into());
        self
    }

    /// Sets External Account Binding credentials.
    pub fn eab(mut self, kid: impl Into<String>, hmac_key: impl Into<String>) -> Self {
        self.eab = Some(Eab {
            kid: kid.into(),
            hmac_key: hmac_key.into(),
        });
        self
    }

    /// Sets the enabled challenge types, most preferred first.
    pub fn challenges(mut self, kinds: Vec<ChallengeKind>) -> Self {
        self.challenges = kinds;
        self
    }

    /// Sets the key type.
    pub fn key_type(mut self, key_type: KeyType) -> Self {
        self.key_type = key_type;
        self
    }

    /// Requests an ACME profile.
    pub fn profile(mut self, profile: impl Into<String>) -> Self {
        self.profile = Some(profile.into());
        self
    }

    /// Sets the pacing.
    pub fn budget(mut self, budget: Budget) -> Self {
        self.budget = budget;
        self
    }

    /// The storage key of this CA (`<ca-key>` in the storage layout).
    pub fn ca_key(&self) -> Result<String> {
        Ok(portunus_store::ca_key(&self.directory)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_names() {
        assert_eq!(directory_url("letsencrypt").unwrap(), LETSENCRYPT);
        assert_eq!(
            directory_url("letsencrypt-staging").unwrap(),
            LETSENCRYPT_STAGING
        );
        assert_eq!(directory_url("zerossl").unwrap(), ZEROSSL);
        assert_eq!(
            directory_url("https://127.0.0.1:14000/dir").unwrap(),
            "https://127.0.0.1:14000/dir"
        );
        assert!(directory_url("letsencrypt-prod").is_err());
        assert_eq!(
            AcmeConfig::new(LETSENCRYPT).ca_key().unwrap(),
            "acme-v02.api.letsencrypt.org-directory"
        );
    }

    #[test]
    fn parsing_and_redaction() {
        assert_eq!(ChallengeKind::parse("http-01"), Some(ChallengeKind::Http01));
        assert_eq!(ChallengeKind::parse("dns-01"), None);
        assert_eq!(KeyType::parse("rsa4096"), Some(KeyType::Rsa4096));
        assert_eq!(KeyType::parse("ed25519"), None);
        let config = AcmeConfig::new(LETSENCRYPT).eab("kid-1", "c2VjcmV0");
        assert!(!format!("{config:?}").contains("c2VjcmV0"));
    }
}
