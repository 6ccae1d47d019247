//! Certificate + key pairs in PEM, and what is parsed out of them.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use x509_parser::extensions::GeneralName;

use crate::error::{Error, Result};

/// A certificate chain (leaf first) and its private key, both PEM. The key never appears in
/// `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct CertPair {
    /// `fullchain.pem`: the leaf, then its intermediates.
    pub chain_pem: String,
    /// `privkey.pem`: the leaf's private key.
    pub key_pem: String,
}

impl std::fmt::Debug for CertPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertPair")
            .field("chain_pem", &format_args!("{} bytes", self.chain_pem.len()))
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// What a stored certificate says about itself.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct CertInfo {
    /// DNS names and IP addresses of the subjectAltName extension, lower case.
    pub names: Vec<String>,
    /// Start of validity, seconds since the Unix epoch.
    pub not_before: u64,
    /// End of validity, seconds since the Unix epoch.
    pub not_after: u64,
    /// The issuer's distinguished name.
    pub issuer: String,
}

impl CertInfo {
    /// `not_after` as a time.
    pub fn not_after_time(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.not_after)
    }

    /// The total validity period.
    pub fn lifetime(&self) -> Duration {
        Duration::from_secs(self.not_after.saturating_sub(self.not_before))
    }

    /// Whether the certificate covers `host` (exactly, or by a one-label wildcard).
    pub fn covers(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.names.iter().any(|n| {
            *n == host
                || n.strip_prefix("*.").is_some_and(|suffix| {
                    host.split_once('.')
                        .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix)
                })
        })
    }

    /// Whether less than `fraction` of the lifetime remains at `now` (or it has expired).
    pub fn needs_renewal(&self, now: SystemTime, fraction: f64) -> bool {
        let now = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let left = self.not_after.saturating_sub(now) as f64;
        left < self.lifetime().as_secs() as f64 * fraction
    }
}

impl CertPair {
    /// The DER certificates of the chain.
    pub fn chain_der(&self, what: &str) -> Result<Vec<CertificateDer<'static>>> {
        let chain: Vec<_> = CertificateDer::pem_slice_iter(self.chain_pem.as_bytes())
            .filter_map(std::result::Result::ok)
            .collect();
        if chain.is_empty() {
            return Err(Error::Pem {
                what: what.to_owned(),
                missing: "certificate",
            });
        }
        Ok(chain)
    }

    /// The DER private key.
    pub fn key_der(&self, what: &str) -> Result<PrivateKeyDer<'static>> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(|_| Error::Pem {
            what: what.to_owned(),
            missing: "private key",
        })
    }

    /// Parses the leaf certificate's names, validity and issuer. `what` names the source in
    /// errors (a path or a host name).
    pub fn info(&self, what: &str) -> Result<CertInfo> {
        let chain = self.chain_der(what)?;
        let leaf = chain.first().ok_or_else(|| Error::Pem {
            what: what.to_owned(),
            missing: "certificate",
        })?;
        parse_info(leaf, what)
    }

    /// A rustls certified key, with the key checked against the certificate.
    pub fn certified_key(
        &self,
        provider: &CryptoProvider,
        what: &str,
    ) -> Result<Arc<CertifiedKey>> {
        let chain = self.chain_der(what)?;
        let key = self.key_der(what)?;
        CertifiedKey::from_der(chain, key, provider)
            .map(Arc::new)
            .map_err(|source| Error::KeyMismatch {
                what: what.to_owned(),
                source,
            })
    }
}

/// Parses a DER certificate's names, validity and issuer.
pub fn parse_info(der: &CertificateDer<'_>, what: &str) -> Result<CertInfo> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|source| Error::Certificate {
            what: what.to_owned(),
            source,
        })?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(dns) => names.push(dns.to_ascii_lowercase()),
                GeneralName::IPAddress(bytes) => {
                    if let Ok(v4) = <[u8; 4]>::try_from(*bytes) {
                        names.push(std::net::IpAddr::from(v4).to_string());
                    } else if let Ok(v6) = <[u8; 16]>::try_from(*bytes) {
                        names.push(std::net::IpAddr::from(v6).to_string());
                    }
                }
                _ => {}
            }
        }
    }
    let secs = |t: i64| u64::try_from(t).unwrap_or(0);
    Ok(CertInfo {
        names,
        not_before: secs(cert.validity().not_before.timestamp()),
        not_after: secs(cert.validity().not_after.timestamp()),
        issuer: cert.issuer().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covers_and_renewal() {
        let info = CertInfo {
            names: vec!["example.com".into(), "*.example.com".into()],
            not_before: 1000,
            not_after: 1900,
            issuer: "CN=test".into(),
        };
        assert!(info.covers("Example.com."));
        assert!(info.covers("www.example.com"));
        assert!(!info.covers("a.b.example.com"));
        assert!(!info.covers("example.org"));
        let at = |s| UNIX_EPOCH + Duration::from_secs(s);
        assert!(!info.needs_renewal(at(1500), 1.0 / 3.0));
        assert!(info.needs_renewal(at(1700), 1.0 / 3.0));
        assert!(info.needs_renewal(at(5000), 1.0 / 3.0));
        assert_eq!(info.lifetime(), Duration::from_secs(900));
    }

    #[test]
    fn debug_never_shows_the_key() {
        let pair = CertPair {
            chain_pem: "CERT".into(),
            key_pem: "-----BEGIN PRIVATE KEY-----SECRET".into(),
        };
        let shown = format!("{pair:?}");
        assert!(!shown.contains("SECRET"), "{shown}");
    }
}
