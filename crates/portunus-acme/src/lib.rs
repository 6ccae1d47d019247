//! ACME issuance and renewal for the Portunus reverse proxy, on instant-acme.
//!
//! This crate does:
//! - create an ACME account once per CA and contact, store it (0600) and reuse it, with
//!   External Account Binding when the CA needs it;
//! - order one certificate per host name (a name that cannot be validated never holds back
//!   the others), answering tls-alpn-01 or http-01 through the store's
//!   [`Challenges`](portunus_store::Challenges), for DNS names and IP addresses, with the
//!   configured key type and ACME profile;
//! - renew inside the CA's ARI window (RFC 9773) when the directory offers `renewalInfo`,
//!   else when a third of the lifetime is left (with jitter), and on demand
//!   ([`AcmeManager::renew`]);
//! - keep within the CA's limits: a stored certificate that still covers its name is never
//!   re-ordered, failures back off exponentially (persisted, so restarts do not hammer the
//!   CA), a `rateLimited` problem waits at least as long as the CA says, and a budget
//!   mirrors the CA's published limits while orders for different names run concurrently;
//! - report every outcome: [`AcmeManager::status`], a typed event stream
//!   ([`AcmeManager::subscribe`]) and a tracing span per order.
//!
//! This crate does not serve HTTP or TLS (the proxy serves the challenge answers from the
//! store), does not do dns-01 (so no wildcards), and never logs keys, account credentials or
//! key authorizations. It depends on `portunus-store` only.
//!
//! Tested against Pebble 2.4, which has neither ARI nor profiles: those paths are covered by
//! unit tests over recorded `renewalInfo` and directory documents.
//!
//! ```no_run
//! use std::sync::Arc;
//! use portunus_acme::{AcmeConfig, AcmeManager, LETSENCRYPT_STAGING};
//! use portunus_store::{CertResolver, FsStorage};
//!
//! # async fn keep_fresh() -> Result<(), Box<dyn std::error::Error>> {
//! let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
//! let resolver = Arc::new(CertResolver::new()); // serve it with rustls, answers included
//! let storage = Arc::new(FsStorage::open("/var/lib/portunus")?);
//! let acme = AcmeManager::new(
//!     AcmeConfig::new(LETSENCRYPT_STAGING).email("ops@example.com"),
//!     storage,
//!     Arc::clone(&resolver),
//!     provider,
//! )?;
//! acme.set_names(["example.com", "www.example.com"]);
//! for problem in acme.load().await {
//!     eprintln!("{problem}");
//! }
//! acme.run(async { let _ = tokio::signal::ctrl_c().await; }).await;
//! # Ok(())
//! # }
//! ```

mod config;
mod error;
mod manager;
mod order;
mod schedule;

pub use config::{
    AcmeConfig, Budget, ChallengeKind, Eab, KeyType, LETSENCRYPT, LETSENCRYPT_STAGING, ZEROSSL,
    directory_url,
};
pub use error::{Error, Result};
pub use manager::{AcmeEvent, AcmeManager, CertStatus};
