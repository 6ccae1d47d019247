//! Keeps certificates that need no ACME fresh in the resolver: leaves of the local CA
//! (issued, stored, renewed) and PEM files on disk (reloaded when they change).

use std::collections::HashMap;
use std::future::Future;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use tracing::{info, warn};

use crate::cert::{CertInfo, CertPair};
use crate::error::{Error, Result, io};
use crate::local_ca::{INTERNAL_CA_KEY, LOCAL_LEAF_LIFETIME, LocalCa};
use crate::resolver::CertResolver;
use crate::storage::CertStorage;

/// Renew when less than this fraction of a certificate's lifetime is left.
const RENEW_FRACTION: f64 = 1.0 / 3.0;

/// Where a site's certificate comes from, when not from ACME.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CertSource {
    /// One leaf per name from the local CA, stored under [`INTERNAL_CA_KEY`].
    Internal {
        /// Host names (or `*.wildcards`, IP addresses).
        names: Vec<String>,
    },
    /// A PEM certificate chain and key on disk, reloaded when either file changes.
    Files {
        /// The chain, leaf first.
        cert: PathBuf,
        /// The private key.
        key: PathBuf,
    },
}

/// The change stamp of a file: modification time, size, inode.
type Stamp = (i64, i64, u64, u64);

fn stamp(path: &std::path::Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.mtime(), m.mtime_nsec(), m.size(), m.ino()))
}

#[derive(Debug)]
struct FileSource {
    cert: PathBuf,
    key: PathBuf,
    stamps: Option<(Stamp, Stamp)>,
    names: Vec<String>,
}

/// Loads, issues and refreshes local-CA and file certificates into a [`CertResolver`].
///
/// Call [`CertKeeper::load`] before the listeners accept connections, then drive
/// [`CertKeeper::run`] until shutdown.
pub struct CertKeeper {
    resolver: Arc<CertResolver>,
    storage: Arc<dyn CertStorage>,
    provider: Arc<CryptoProvider>,
    local_ca: Option<Arc<LocalCa>>,
    internal: HashMap<String, Option<CertInfo>>,
    files: Vec<FileSource>,
    poll: Duration,
    /// Certificates ready for the resolver, installed in one swap at the end of a load: one
    /// swap per certificate would copy the whole index each time (quadratic at start-up).
    ready: Vec<(String, Arc<rustls::sign::CertifiedKey>)>,
}

impl std::fmt::Debug for CertKeeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertKeeper")
            .field("internal", &self.internal.keys().collect::<Vec<_>>())
            .field("files", &self.files)
            .field("poll", &self.poll)
            .finish_non_exhaustive()
    }
}

impl CertKeeper {
    /// A keeper installing into `resolver`, storing local-CA leaves in `storage`.
    pub fn new(
        resolver: Arc<CertResolver>,
        storage: Arc<dyn CertStorage>,
        provider: Arc<CryptoProvider>,
    ) -> Self {
        Self {
            resolver,
            storage,
            provider,
            local_ca: None,
            internal: HashMap::new(),
            files: Vec::new(),
            poll: Duration::from_secs(2),
            ready: Vec::new(),
        }
    }

    /// The local CA used for [`CertSource::Internal`].
    pub fn local_ca(mut self, ca: Arc<LocalCa>) -> Self {
        self.local_ca = Some(ca);
        self
    }

    /// How often files are checked for changes and leaves for renewal (default 2 s).
    pub fn poll_interval(mut self, every: Duration) -> Self {
        self.poll = every;
        self
    }

    /// Adds a source.
    pub fn source(mut self, source: CertSource) -> Self {
        match source {
            CertSource::Internal { names } => {
                for name in names {
                    self.internal.entry(name).or_insert(None);
                }
            }
            CertSource::Files { cert, key } => self.files.push(FileSource {
                cert,
                key,
                stamps: None,
                names: Vec::new(),
            }),
        }
        self
    }

    /// Puts every certificate in service: stored local-CA leaves that are still fresh are
    /// reused (never re-issued because of a restart), others issued; files loaded. Returns
    /// the problems met, each naming its path or host; the other certificates still load.
    pub async fn load(&mut self) -> Vec<Error> {
        let mut errors = Vec::new();
        for i in 0..self.files.len() {
            if let Err(e) = self.refresh_file(i) {
                errors.push(e);
            }
        }
        let names: Vec<String> = self.internal.keys().cloned().collect();
        for name in names {
            if let Err(e) = self.refresh_internal(&name).await {
                errors.push(e);
            }
        }
        let ready = std::mem::take(&mut self.ready);
        if !ready.is_empty() {
            self.resolver
                .insert_many(ready.iter().map(|(n, k)| (n.as_str(), Arc::clone(k))));
        }
        errors
    }

    /// Keeps certificates fresh until `shutdown` completes.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(self.poll) => {}
            }
            for e in self.load().await {
                warn!(error = %e, cause = ?std::error::Error::source(&e), "certificate not refreshed; the previous one stays in service");
            }
        }
    }

    /// Readies a certificate for the resolver (installed when the current load ends).
    fn install(&mut self, name: &str, pair: &CertPair, info: &CertInfo, what: &str) -> Result<()> {
        let key = pair.certified_key(&self.provider, what)?;
        self.ready.push((name.to_owned(), key));
        info!(sni = %name, not_after = info.not_after, "certificate in service");
        Ok(())
    }

    async fn refresh_internal(&mut self, name: &str) -> Result<()> {
        let now = SystemTime::now();
        if let Some(Some(info)) = self.internal.get(name)
            && !info.needs_renewal(now, RENEW_FRACTION)
        {
            return Ok(());
        }
        let Some(ca) = self.local_ca.clone() else {
            return Err(Error::InvalidName {
                name: format!("{name} (tls = internal needs the local CA)"),
            });
        };
        let _lock = self
            .storage
            .lock(INTERNAL_CA_KEY, name, Duration::from_secs(30))
            .await?;
        // Stored by an earlier run or another process: reuse it while it is fresh.
        match self.storage.load(INTERNAL_CA_KEY, name).await {
            Ok(Some(stored))
                if stored.info.covers(name) && !stored.info.needs_renewal(now, RENEW_FRACTION) =>
            {
                if self.install(name, &stored.pair, &stored.info, name).is_ok() {
                    self.internal.insert(name.to_owned(), Some(stored.info));
                    return Ok(());
                }
            }
            Ok(_) => {}
            Err(e) => {
                warn!(sni = %name, error = %e, "stored certificate unusable; issuing a new one")
            }
        }
        let pair = ca.issue(&[name.to_owned()], LOCAL_LEAF_LIFETIME)?;
        let info = pair.info(name)?;
        self.storage.store(INTERNAL_CA_KEY, name, &pair).await?;
        self.install(name, &pair, &info, name)?;
        self.internal.insert(name.to_owned(), Some(info));
        Ok(())
    }

    /// Reloads file source `i` if either file changed since the last attempt. A failed
    /// attempt is reported once and retried only when the files change again.
    fn refresh_file(&mut self, i: usize) -> Result<()> {
        let Some(source) = self.files.get(i) else {
            return Ok(());
        };
        let (cert_path, key_path) = (source.cert.clone(), source.key.clone());
        let stamps = stamp(&cert_path).zip(stamp(&key_path));
        if stamps.is_some() && stamps == source.stamps {
            return Ok(());
        }
        let result = self.load_file(i, &cert_path, &key_path);
        self.files[i].stamps = stamps;
        result
    }

    fn load_file(&mut self, i: usize, cert_path: &Path, key_path: &Path) -> Result<()> {
        let what = cert_path.display().to_string();
        let pair = CertPair {
            chain_pem: std::fs::read_to_string(cert_path).map_err(io(cert_path))?,
            key_pem: std::fs::read_to_string(key_path).map_err(io(key_path))?,
        };
        let info = pair.info(&what)?;
        let key = pair.certified_key(
            &self.provider,
            &format!("{what} with {}", key_path.display()),
        )?;
        if let Ok(meta) = std::fs::metadata(key_path)
            && meta.permissions().mode() & 0o077 != 0
        {
            warn!(path = %key_path.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777), "private key file is readable by group or others");
        }
        let old_names = std::mem::take(&mut self.files[i].names);
        for stale in old_names.iter().filter(|n| !info.names.contains(n)) {
            self.resolver.remove(stale);
        }
        self.ready
            .extend(info.names.iter().map(|n| (n.clone(), Arc::clone(&key))));
        info!(path = %what, names = ?info.names, not_after = info.not_after, "certificate file in service");
        self.files[i].names = info.names;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStorage;

    #[tokio::test]
    async fn one_load_puts_every_certificate_in_service() {
        let resolver = Arc::new(CertResolver::new());
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let names: Vec<String> = (0..40).map(|i| format!("s{i}.test")).collect();
        let mut keeper = CertKeeper::new(
            Arc::clone(&resolver),
            Arc::new(MemoryStorage::new()),
            provider,
        )
        .local_ca(Arc::new(LocalCa::generate().unwrap()))
        .source(CertSource::Internal {
            names: names.clone(),
        });
        assert!(keeper.load().await.is_empty());
        for name in &names {
            assert!(
                resolver.lookup(Some(name)).is_some(),
                "{name} not in service"
            );
        }
        assert!(keeper.ready.is_empty(), "nothing is left waiting");
        // A second load (the poll) reinstalls nothing and keeps them all.
        assert!(keeper.load().await.is_empty());
        assert!(resolver.lookup(Some("s39.test")).is_some());
    }
}
