//! The live SNI resolver and the ACME challenge answers it serves.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// The ALPN protocol of tls-alpn-01 validation (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Hashed with foldhash rather than std's SipHash: built from our certificates, looked up
/// with what clients send (SNI, `Host`), which cannot make it collide.
#[derive(Debug, Default, Clone)]
struct Index {
    exact: foldhash::HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by the suffix after `*.`.
    wildcard: foldhash::HashMap<String, Arc<CertifiedKey>>,
}

fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl Index {
    fn insert(&mut self, name: &str, key: Arc<CertifiedKey>) {
        let name = normalize(name);
        match name.strip_prefix("*.") {
            Some(suffix) => self.wildcard.insert(suffix.to_owned(), key),
            None => self.exact.insert(name, key),
        };
    }

    fn remove(&mut self, name: &str) {
        let name = normalize(name);
        match name.strip_prefix("*.") {
            Some(suffix) => self.wildcard.remove(suffix),
            None => self.exact.remove(&name),
        };
    }

    fn get(&self, name: &str) -> Option<&Arc<CertifiedKey>> {
        if let Some(key) = self.exact.get(name) {
            return Some(key);
        }
        let (label, suffix) = name.split_once('.')?;
        if label.is_empty() {
            return None;
        }
        self.wildcard.get(suffix)
    }
}

/// Answers ACME challenges: http-01 tokens and tls-alpn-01 certificates, present only while
/// a challenge is pending.
#[derive(Debug, Default)]
pub struct Challenges {
    http01: RwLock<HashMap<String, String>>,
    tls_alpn01: RwLock<HashMap<String, Arc<CertifiedKey>>>,
}

impl Challenges {
    /// Publishes an http-01 answer: `GET /.well-known/acme-challenge/<token>` returns
    /// `key_authorization`.
    pub fn set_http01(&self, token: &str, key_authorization: &str) {
        self.http01
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(token.to_owned(), key_authorization.to_owned());
    }

    /// Withdraws an http-01 answer.
    pub fn remove_http01(&self, token: &str) {
        self.http01
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(token);
    }

    /// The http-01 answer for `token`, if pending.
    pub fn http01(&self, token: &str) -> Option<String> {
        self.http01
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(token)
            .cloned()
    }

    /// Publishes a tls-alpn-01 certificate for `name`, served only to `acme-tls/1` clients.
    pub fn set_tls_alpn01(&self, name: &str, key: Arc<CertifiedKey>) {
        self.tls_alpn01
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(normalize(name), key);
    }

    /// Withdraws a tls-alpn-01 certificate.
    pub fn remove_tls_alpn01(&self, name: &str) {
        self.tls_alpn01
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&normalize(name));
    }

    /// The tls-alpn-01 certificate for `name`, if a challenge is pending.
    pub fn tls_alpn01(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        self.tls_alpn01
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&normalize(name))
            .cloned()
    }
}

/// A rustls certificate resolver over a lock-free, swappable index: exact name first, then a
/// one-label wildcard. Certificates are swapped in without touching open connections.
///
/// An unknown name (or a handshake without SNI when no default is set) resolves to nothing,
/// so rustls aborts the handshake with a fatal alert and no certificate is sent.
#[derive(Debug, Default)]
pub struct CertResolver {
    index: ArcSwap<Index>,
    default_sni: ArcSwap<Option<String>>,
    challenges: Arc<Challenges>,
}

impl CertResolver {
    /// An empty resolver.
    pub fn new() -> Self {
        Self::default()
    }

    /// Names the certificate used for handshakes without SNI (clients connecting by IP).
    pub fn set_default_sni(&self, name: Option<&str>) {
        self.default_sni.store(Arc::new(name.map(normalize)));
    }

    /// Installs (or replaces) the certificate for `name` (`example.com` or `*.example.com`).
    pub fn insert(&self, name: &str, key: Arc<CertifiedKey>) {
        self.index.rcu(|index| {
            let mut index = Index::clone(index);
            index.insert(name, Arc::clone(&key));
            index
        });
    }

    /// Installs many certificates in one swap (start-up loading).
    pub fn insert_many<'a, I>(&self, entries: I)
    where
        I: IntoIterator<Item = (&'a str, Arc<CertifiedKey>)>,
    {
        let entries: Vec<_> = entries.into_iter().collect();
        self.index.rcu(|index| {
            let mut index = Index::clone(index);
            for (name, key) in &entries {
                index.insert(name, Arc::clone(key));
            }
            index
        });
    }

    /// Removes the certificate for `name`.
    pub fn remove(&self, name: &str) {
        self.index.rcu(|index| {
            let mut index = Index::clone(index);
            index.remove(name);
            index
        });
    }

    /// The certificate a handshake with this SNI gets (`None`: the default, if any).
    pub fn lookup(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let index = self.index.load();
        match sni {
            Some(name) => {
                let name = name.trim_end_matches('.');
                if name.bytes().any(|b| b.is_ascii_uppercase()) {
                    index.get(&name.to_ascii_lowercase()).cloned()
                } else {
                    index.get(name).cloned()
                }
            }
            None => {
                let default = self.default_sni.load();
                default.as_deref().and_then(|d| index.get(d).cloned())
            }
        }
    }

    /// Whether a certificate is installed for exactly `name`.
    pub fn contains(&self, name: &str) -> bool {
        let index = self.index.load();
        let name = normalize(name);
        match name.strip_prefix("*.") {
            Some(suffix) => index.wildcard.contains_key(suffix),
            None => index.exact.contains_key(&name),
        }
    }

    /// Every installed certificate with its name (`*.example.com` for wildcards), sorted.
    pub fn entries(&self) -> Vec<(String, Arc<CertifiedKey>)> {
        let index = self.index.load();
        let mut out: Vec<(String, Arc<CertifiedKey>)> = index
            .exact
            .iter()
            .map(|(n, k)| (n.clone(), Arc::clone(k)))
            .chain(
                index
                    .wildcard
                    .iter()
                    .map(|(n, k)| (format!("*.{n}"), Arc::clone(k))),
            )
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The number of installed certificates.
    pub fn len(&self) -> usize {
        let index = self.index.load();
        index.exact.len() + index.wildcard.len()
    }

    /// Whether no certificate is installed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The challenge answers served alongside the certificates.
    pub fn challenges(&self) -> &Arc<Challenges> {
        &self.challenges
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let acme = hello
            .alpn()
            .is_some_and(|mut protocols| protocols.any(|p| p == ACME_TLS_ALPN));
        if acme {
            // A validator: only a pending challenge certificate, never a site's certificate.
            return self.challenges.tls_alpn01(hello.server_name()?);
        }
        self.lookup(hello.server_name())
    }
}
