//! The store's error type.

use std::path::PathBuf;

/// Errors of certificate storage, parsing, resolving and the local CA.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A host name or CA key cannot become a storage path.
    #[error("invalid name `{name}` for storage")]
    InvalidName {
        /// The refused name.
        name: String,
    },
    /// Reading or writing a file or directory failed.
    #[error("{}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// PEM data holds no certificate or no private key.
    #[error("{what}: no {missing} found in PEM")]
    Pem {
        /// What was being read (a path or a name).
        what: String,
        /// `certificate` or `private key`.
        missing: &'static str,
    },
    /// A certificate could not be parsed.
    #[error("{what}: invalid certificate")]
    Certificate {
        /// What was being read.
        what: String,
        /// The parser's complaint.
        #[source]
        source: x509_parser::nom::Err<x509_parser::error::X509Error>,
    },
    /// The private key does not belong to the certificate, or is of an unsupported kind.
    #[error("{what}: private key does not match the certificate or is not supported")]
    KeyMismatch {
        /// What was being read.
        what: String,
        /// rustls' complaint.
        #[source]
        source: rustls::Error,
    },
    /// Generating a key or certificate failed.
    #[error("{what}: certificate generation failed")]
    Generate {
        /// What was being generated.
        what: String,
        /// rcgen's complaint.
        #[source]
        source: rcgen::Error,
    },
    /// Another holder kept a name's lock for too long.
    #[error("timed out waiting for the lock on `{name}`")]
    LockTimeout {
        /// The locked name.
        name: String,
    },
    /// A blocking storage task failed to complete.
    #[error("storage task failed")]
    Task(#[source] tokio::task::JoinError),
}

/// A shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Wraps an I/O error with its path.
pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}
