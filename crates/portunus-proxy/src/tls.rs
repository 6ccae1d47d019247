//! The TLS server configuration of the HTTPS listener.

use std::sync::Arc;

use portunus_store::{ACME_TLS_ALPN, CertResolver};
use rustls::crypto::CryptoProvider;
use rustls::server::{ServerConfig, ServerSessionMemoryCache};

/// Errors building the TLS configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The crypto provider cannot do TLS 1.2 and 1.3 or session tickets.
    #[error("the crypto provider cannot build a TLS server configuration")]
    Provider(#[source] rustls::Error),
}

/// A server configuration for the HTTPS listener: TLS 1.3 and 1.2, certificates chosen by SNI
/// through `resolver` (which also answers tls-alpn-01), ALPN `h2`, `http/1.1` and
/// `acme-tls/1`, session resumption by cache and by tickets, 0-RTT off, and the cipher suite
/// chosen in the provider's order (AES-128-GCM first with rustls's providers), not the
/// client's.
///
/// The crypto provider is a parameter: this crate never installs a process-wide one.
pub fn server_config(
    resolver: Arc<CertResolver>,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(prefer_aes_128(&provider));
    // Stateless resumption tickets (rotating keys); the session cache serves TLS 1.2 IDs.
    let ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().map_err(TlsError::Provider)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Provider)?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), ACME_TLS_ALPN.to_vec()];
    config.session_storage = ServerSessionMemoryCache::new(16 * 1024);
    config.ticketer = ticketer;
    // One resumption ticket per full handshake (as Go's crypto/tls sends) rather than
    // rustls's two: a client resumes with one, and each costs an encryption and a record.
    config.send_tls13_tickets = 1;
    // The server's order, not the client's (as Go's crypto/tls does): OpenSSL clients put
    // AES-256-GCM-SHA384 first, and its SHA-384 key schedule has no hardware help on x86 (it
    // was a tenth of a full handshake's CPU); AES-128-GCM-SHA256 is as strong for TLS.
    config.ignore_client_order = true;
    config.max_early_data_size = 0;
    config.send_half_rtt_data = false;
    Ok(Arc::new(config))
}

/// `provider` with its AES-128-GCM suites first and AES-256-GCM next (TLS 1.3 and 1.2), the
/// others after them in the provider's order.
fn prefer_aes_128(provider: &CryptoProvider) -> CryptoProvider {
    use rustls::CipherSuite as S;
    let mut provider = provider.clone();
    provider
        .cipher_suites
        .sort_by_key(|suite| match suite.suite() {
            S::TLS13_AES_128_GCM_SHA256
            | S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            | S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 0,
            S::TLS13_AES_256_GCM_SHA384
            | S::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
            | S::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => 1,
            _ => 2,
        });
    provider
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aes_128_gcm_comes_first_and_nothing_is_lost() {
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let ordered = prefer_aes_128(&provider);
        let names = |p: &CryptoProvider| {
            p.cipher_suites
                .iter()
                .map(|s| format!("{:?}", s.suite()))
                .collect::<Vec<_>>()
        };
        let (before, after) = (names(&provider), names(&ordered));
        assert_eq!(after[0], "TLS13_AES_128_GCM_SHA256", "{after:?}");
        let position = |name: &str| after.iter().position(|n| n == name);
        assert!(position("TLS13_AES_256_GCM_SHA384") < position("TLS13_CHACHA20_POLY1305_SHA256"));
        let mut sorted = (before.clone(), after.clone());
        sorted.0.sort();
        sorted.1.sort();
        assert_eq!(sorted.0, sorted.1, "the same suites, reordered");
    }
}
