//! Certificates at rest: the [`CertStorage`] trait, the filesystem store and the memory store.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use tracing::debug;

use crate::cert::{CertInfo, CertPair};
use crate::error::{Error, Result, io};
use crate::name::{check_ca_key, storage_name};

/// A certificate as loaded from storage, with what it says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoredCert {
    /// The PEM pair.
    pub pair: CertPair,
    /// Names, validity and issuer parsed from the leaf.
    pub info: CertInfo,
}

/// Holds a name's cross-process lock until dropped.
#[derive(Debug)]
pub struct NameLock {
    _held: Box<dyn std::fmt::Debug + Send + Sync>,
}

/// Where certificates live between runs. Object-safe: use `Arc<dyn CertStorage>`.
///
/// `ca` is a CA key ([`ca_key`](crate::ca_key)), `name` a host name such as `example.com` or
/// `*.example.com`; both are validated before they become paths.
#[async_trait]
pub trait CertStorage: Send + Sync + std::fmt::Debug {
    /// Loads the certificate stored for `name`, if any. A pair that cannot be parsed is an
    /// error naming its path.
    async fn load(&self, ca: &str, name: &str) -> Result<Option<StoredCert>>;

    /// Stores `pair` for `name`, replacing any previous pair as one unit: readers (and a
    /// crash at any moment) see the old pair or the new one, never a mix.
    async fn store(&self, ca: &str, name: &str, pair: &CertPair) -> Result<()>;

    /// The host names with a stored certificate under `ca`.
    async fn list(&self, ca: &str) -> Result<Vec<String>>;

    /// Takes the lock of `name`, waiting up to `timeout` for another holder (in this or
    /// another process) to release it.
    async fn lock(&self, ca: &str, name: &str, timeout: Duration) -> Result<NameLock>;

    /// Loads a small document kept beside the certificates (an ACME account, a name's
    /// renewal state).
    async fn load_blob(&self, kind: BlobKind, ca: &str, key: &str) -> Result<Option<Vec<u8>>>;

    /// Replaces a small document atomically (0600, fsync, rename).
    async fn store_blob(&self, kind: BlobKind, ca: &str, key: &str, data: &[u8]) -> Result<()>;
}

/// What kind of document a blob is, which decides where it lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BlobKind {
    /// `accounts/<ca-key>/<contact-key>/account.json`; the key is a contact key.
    Account,
    /// `state/<ca-key>/<name>.json`; the key is a host name.
    State,
}

/// The filesystem store, in DESIGN.md's layout:
/// `<root>/certs/<ca-key>/<name>/{fullchain.pem, privkey.pem, meta.json}`.
///
/// `<name>` is a relative symbolic link to a versioned directory under `.versions/`; a new
/// pair is written and synced into a fresh directory, then the link is replaced by an atomic
/// rename. Directories are 0700 and every file is created 0600.
#[derive(Debug, Clone)]
pub struct FsStorage {
    root: PathBuf,
}

impl FsStorage {
    /// A store rooted at `root` (the `storage` directory). Creates it 0700 if missing and
    /// checks that it is writable, so a bad directory is a clear error at start.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        create_private_dir(&root)?;
        let probe = root.join(format!(".probe-{}", std::process::id()));
        write_private(&probe, b"")?;
        fs::remove_file(&probe).map_err(io(&probe))?;
        Ok(Self { root })
    }

    /// The storage root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory holding a name's current pair (through its link).
    pub fn cert_dir(&self, ca: &str, name: &str) -> Result<PathBuf> {
        check_ca_key(ca)?;
        Ok(self.root.join("certs").join(ca).join(storage_name(name)?))
    }

    fn load_blocking(&self, ca: &str, name: &str) -> Result<Option<StoredCert>> {
        let dir = self.cert_dir(ca, name)?;
        if fs::symlink_metadata(&dir).is_err() {
            return Ok(None);
        }
        // Resolve the link once so both files come from the same version.
        let resolved = fs::canonicalize(&dir).map_err(io(&dir))?;
        let chain_path = resolved.join("fullchain.pem");
        let key_path = resolved.join("privkey.pem");
        let pair = CertPair {
            chain_pem: fs::read_to_string(&chain_path).map_err(io(&chain_path))?,
            key_pem: fs::read_to_string(&key_path).map_err(io(&key_path))?,
        };
        let info = pair.info(&chain_path.display().to_string())?;
        Ok(Some(StoredCert { pair, info }))
    }

    fn store_blocking(&self, ca: &str, name: &str, pair: &CertPair) -> Result<()> {
        let what = format!("certificate for {name}");
        let info = pair.info(&what)?;
        let link = self.cert_dir(ca, name)?;
        let stored = storage_name(name)?;
        let ca_dir = self.root.join("certs").join(ca);
        let versions = ca_dir.join(".versions");
        create_private_dir(&versions)?;

        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let version_name = format!("{stored}.{stamp}.{}", std::process::id());
        let version = versions.join(&version_name);
        create_private_dir(&version)?;
        write_private(&version.join("fullchain.pem"), pair.chain_pem.as_bytes())?;
        write_private(&version.join("privkey.pem"), pair.key_pem.as_bytes())?;
        let meta = serde_json::to_vec_pretty(&info).unwrap_or_default();
        write_private(&version.join("meta.json"), &meta)?;
        sync_dir(&version)?;
        sync_dir(&versions)?;

        let tmp = ca_dir.join(format!(".{stored}.link-{stamp}-{}", std::process::id()));
        std::os::unix::fs::symlink(Path::new(".versions").join(&version_name), &tmp)
            .map_err(io(&tmp))?;
        sync_dir(&ca_dir)?;
        fs::rename(&tmp, &link).map_err(io(&link))?;
        sync_dir(&ca_dir)?;
        debug!(name, path = %link.display(), "certificate stored");

        // Old versions of this name are garbage now (also those of writers that crashed).
        let prefix = format!("{stored}.");
        if let Ok(entries) = fs::read_dir(&versions) {
            for entry in entries.flatten() {
                let file_name = entry.file_name();
                let file_name = file_name.to_string_lossy();
                if file_name.starts_with(&prefix)
                    && file_name != version_name
                    && file_name[prefix.len()..].starts_with(|c: char| c.is_ascii_digit())
                {
                    let _ = fs::remove_dir_all(entry.path());
                }
            }
        }
        Ok(())
    }

    fn list_blocking(&self, ca: &str) -> Result<Vec<String>> {
        check_ca_key(ca)?;
        let dir = self.root.join("certs").join(ca);
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&dir)(e)),
        };
        let mut names: Vec<String> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .map(|n| match n.strip_prefix("wildcard_.") {
                Some(rest) => format!("*.{rest}"),
                None => n,
            })
            .collect();
        names.sort();
        Ok(names)
    }

    fn blob_path(&self, kind: BlobKind, ca: &str, key: &str) -> Result<PathBuf> {
        check_ca_key(ca)?;
        Ok(match kind {
            BlobKind::Account => {
                check_ca_key(key)?;
                self.root
                    .join("accounts")
                    .join(ca)
                    .join(key)
                    .join("account.json")
            }
            BlobKind::State => self
                .root
                .join("state")
                .join(ca)
                .join(format!("{}.json", storage_name(key)?)),
        })
    }

    fn load_blob_blocking(&self, kind: BlobKind, ca: &str, key: &str) -> Result<Option<Vec<u8>>> {
        let path = self.blob_path(kind, ca, key)?;
        match fs::read(&path) {
            Ok(data) => Ok(Some(data)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }

    fn store_blob_blocking(&self, kind: BlobKind, ca: &str, key: &str, data: &[u8]) -> Result<()> {
        let path = self.blob_path(kind, ca, key)?;
        let dir = path.parent().unwrap_or(&self.root).to_owned();
        create_private_dir(&dir)?;
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let tmp = dir.join(format!(".tmp-{stamp}-{}", std::process::id()));
        write_private(&tmp, data)?;
        fs::rename(&tmp, &path).map_err(io(&path))?;
        sync_dir(&dir)
    }

    fn lock_blocking(&self, ca: &str, name: &str, timeout: Duration) -> Result<NameLock> {
        check_ca_key(ca)?;
        let dir = self.root.join("locks").join(ca);
        create_private_dir(&dir)?;
        let path = dir.join(format!("{}.lock", storage_name(name)?));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io(&path))?;
        let deadline = Instant::now() + timeout;
        loop {
            match file.try_lock() {
                Ok(()) => {
                    return Ok(NameLock {
                        _held: Box::new(file),
                    });
                }
                Err(fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(fs::TryLockError::WouldBlock) => {
                    return Err(Error::LockTimeout {
                        name: name.to_owned(),
                    });
                }
                Err(fs::TryLockError::Error(e)) => return Err(io(&path)(e)),
            }
        }
    }
}

/// Runs blocking filesystem work off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(Error::Task)?
}

#[async_trait]
impl CertStorage for FsStorage {
    async fn load(&self, ca: &str, name: &str) -> Result<Option<StoredCert>> {
        let (this, ca, name) = (self.clone(), ca.to_owned(), name.to_owned());
        blocking(move || this.load_blocking(&ca, &name)).await
    }

    async fn store(&self, ca: &str, name: &str, pair: &CertPair) -> Result<()> {
        let (this, ca, name, pair) = (self.clone(), ca.to_owned(), name.to_owned(), pair.clone());
        blocking(move || this.store_blocking(&ca, &name, &pair)).await
    }

    async fn list(&self, ca: &str) -> Result<Vec<String>> {
        let (this, ca) = (self.clone(), ca.to_owned());
        blocking(move || this.list_blocking(&ca)).await
    }

    async fn lock(&self, ca: &str, name: &str, timeout: Duration) -> Result<NameLock> {
        let (this, ca, name) = (self.clone(), ca.to_owned(), name.to_owned());
        blocking(move || this.lock_blocking(&ca, &name, timeout)).await
    }

    async fn load_blob(&self, kind: BlobKind, ca: &str, key: &str) -> Result<Option<Vec<u8>>> {
        let (this, ca, key) = (self.clone(), ca.to_owned(), key.to_owned());
        blocking(move || this.load_blob_blocking(kind, &ca, &key)).await
    }

    async fn store_blob(&self, kind: BlobKind, ca: &str, key: &str, data: &[u8]) -> Result<()> {
        let (this, ca, key, data) = (self.clone(), ca.to_owned(), key.to_owned(), data.to_vec());
        blocking(move || this.store_blob_blocking(kind, &ca, &key, &data)).await
    }
}

/// Creates a directory (and its parents) with mode 0700.
pub(crate) fn create_private_dir(dir: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))
}

/// Creates (or truncates) a file with mode 0600 from the start, writes it and syncs it.
pub(crate) fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    file.write_all(data).map_err(io(path))?;
    file.sync_all().map_err(io(path))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// (CA key, storage name).
type MemoryKey = (String, String);
/// (kind, CA key, key).
type BlobKey = (BlobKind, String, String);

/// An in-memory store for embedders and tests: nothing survives the process.
#[derive(Debug, Default, Clone)]
pub struct MemoryStorage {
    certs: Arc<Mutex<HashMap<MemoryKey, CertPair>>>,
    blobs: Arc<Mutex<HashMap<BlobKey, Vec<u8>>>>,
    locks: Arc<Mutex<HashMap<MemoryKey, Arc<tokio::sync::Mutex<()>>>>>,
}

impl MemoryStorage {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

fn memory_key(ca: &str, name: &str) -> Result<MemoryKey> {
    check_ca_key(ca)?;
    Ok((ca.to_owned(), storage_name(name)?))
}

#[async_trait]
impl CertStorage for MemoryStorage {
    async fn load(&self, ca: &str, name: &str) -> Result<Option<StoredCert>> {
        let key = memory_key(ca, name)?;
        let pair = self
            .certs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&key)
            .cloned();
        match pair {
            None => Ok(None),
            Some(pair) => {
                let info = pair.info(name)?;
                Ok(Some(StoredCert { pair, info }))
            }
        }
    }

    async fn store(&self, ca: &str, name: &str, pair: &CertPair) -> Result<()> {
        pair.info(name)?;
        let key = memory_key(ca, name)?;
        self.certs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key, pair.clone());
        Ok(())
    }

    async fn list(&self, ca: &str) -> Result<Vec<String>> {
        check_ca_key(ca)?;
        let mut names: Vec<String> = self
            .certs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .keys()
            .filter(|(c, _)| c == ca)
            .map(|(_, n)| match n.strip_prefix("wildcard_.") {
                Some(rest) => format!("*.{rest}"),
                None => n.clone(),
            })
            .collect();
        names.sort();
        Ok(names)
    }

    async fn lock(&self, ca: &str, name: &str, timeout: Duration) -> Result<NameLock> {
        let key = memory_key(ca, name)?;
        let mutex = Arc::clone(
            self.locks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .entry(key)
                .or_default(),
        );
        match tokio::time::timeout(timeout, mutex.lock_owned()).await {
            Ok(guard) => Ok(NameLock {
                _held: Box::new(guard),
            }),
            Err(_) => Err(Error::LockTimeout {
                name: name.to_owned(),
            }),
        }
    }

    async fn load_blob(&self, kind: BlobKind, ca: &str, key: &str) -> Result<Option<Vec<u8>>> {
        check_ca_key(ca)?;
        Ok(self
            .blobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&(kind, ca.to_owned(), key.to_owned()))
            .cloned())
    }

    async fn store_blob(&self, kind: BlobKind, ca: &str, key: &str, data: &[u8]) -> Result<()> {
        check_ca_key(ca)?;
        self.blobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert((kind, ca.to_owned(), key.to_owned()), data.to_vec());
        Ok(())
    }
}
