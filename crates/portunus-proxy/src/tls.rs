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
/// `acme-tls/1`, session resumption by cache and by tickets, 0-RTT off.
///
/// The crypto provider is a parameter: this crate never installs a process-wide one.
pub fn server_config(
    resolver: Arc<CertResolver>,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<ServerConfig>, TlsError> {
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
    config.max_early_data_size = 0;
    config.send_half_rtt_data = false;
    Ok(Arc::new(config))
}
