//! Certificates at rest and in memory for the Portunus reverse proxy.
//!
//! This crate does:
//! - keep certificate + key pairs on disk ([`FsStorage`], DESIGN.md's layout, atomic pair
//!   replacement, 0700 directories and 0600 files, a cross-process lock per name) or in
//!   memory ([`MemoryStorage`]), behind the object-safe [`CertStorage`] trait;
//! - parse each certificate's names and validity ([`CertInfo`]);
//! - serve certificates to rustls by SNI through the live [`CertResolver`] (exact name, then
//!   wildcard; swapped without touching open connections; unknown names get no certificate);
//! - hold ACME challenge answers ([`Challenges`]): http-01 tokens and tls-alpn-01 certificates;
//! - run the built-in local CA ([`LocalCa`]) and keep certificates fresh from it or from PEM
//!   files on disk ([`CertKeeper`]).
//!
//! This crate does not speak ACME, open sockets, install a rustls crypto provider (callers
//! pass one) or spawn tasks on construction: [`CertKeeper::run`] is a future the caller drives.
//!
//! ```
//! use std::sync::Arc;
//! use portunus_store::{CertResolver, LocalCa, LOCAL_LEAF_LIFETIME};
//!
//! let provider = rustls::crypto::aws_lc_rs::default_provider();
//! let ca = LocalCa::generate()?;
//! let pair = ca.issue(&["app.localhost".to_owned()], LOCAL_LEAF_LIFETIME)?;
//! let resolver = CertResolver::new();
//! resolver.insert("app.localhost", pair.certified_key(&provider, "app.localhost")?);
//! assert!(resolver.lookup(Some("APP.localhost")).is_some());
//! assert!(resolver.lookup(Some("other.localhost")).is_none());
//! # Ok::<(), portunus_store::Error>(())
//! ```

mod cert;
mod error;
mod keeper;
mod local_ca;
mod name;
mod resolver;
mod storage;

pub use cert::{CertInfo, CertPair, parse_info};
pub use error::{Error, Result};
pub use keeper::{CertKeeper, CertSource};
pub use local_ca::{INTERNAL_CA_KEY, LOCAL_LEAF_LIFETIME, LocalCa};
pub use name::{ca_key, contact_key, storage_name};
pub use resolver::{ACME_TLS_ALPN, CertResolver, Challenges};
pub use storage::{BlobKind, CertStorage, FsStorage, MemoryStorage, NameLock, StoredCert};
