//! The ACME manager through its public API against a real Pebble, with its own tiny http-01
//! responder (no Portunus proxy involved).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use portunus_acme::{AcmeConfig, AcmeEvent, AcmeManager, ChallengeKind};
use portunus_store::{CertResolver, CertStorage, Challenges, FsStorage};
use portunus_test_utils::pebble::{Options, Pebble, available, free_port};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

async fn responder(listener: TcpListener, challenges: Arc<Challenges>) {
    while let Ok((mut stream, _)) = listener.accept().await {
        let challenges = Arc::clone(&challenges);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let n = stream.read(&mut buf).await.unwrap_or(0);
            let head = String::from_utf8_lossy(&buf[..n]).into_owned();
            let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
            let body = path
                .strip_prefix("/.well-known/acme-challenge/")
                .and_then(|t| challenges.http01(t))
                .unwrap_or_default();
            let status = if body.is_empty() {
                "404 Not Found"
            } else {
                "200 OK"
            };
            let reply = format!(
                "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(reply.as_bytes()).await;
        });
    }
}

/// A Pebble, and a manager on `storage` (made from the storage directory) whose http-01
/// answers a responder on Pebble's http-01 port.
async fn setup<S, F>(
    dir: &std::path::Path,
    storage: F,
) -> (Pebble, Arc<S>, Arc<CertResolver>, AcmeManager)
where
    S: CertStorage + 'static,
    F: FnOnce(FsStorage) -> S,
{
    let http01 = free_port();
    let pebble = Pebble::start(
        &dir.join("pebble"),
        &Options {
            http01_port: http01,
            tlsalpn01_port: free_port(),
            eab: Vec::new(),
        },
    )
    .unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let resolver = Arc::new(CertResolver::new());
    let storage = Arc::new(storage(FsStorage::open(dir.join("storage")).unwrap()));
    let config = AcmeConfig::new(pebble.directory.clone())
        .ca_root(pebble.tls_ca.clone())
        .email("lib@example.test")
        .challenges(vec![ChallengeKind::Http01]);
    let acme = AcmeManager::new(config, storage.clone(), Arc::clone(&resolver), provider).unwrap();
    tokio::spawn(responder(
        TcpListener::bind(("127.0.0.1", http01)).await.unwrap(),
        Arc::clone(resolver.challenges()),
    ));
    (pebble, storage, resolver, acme)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issues_for_dns_names_and_ip_addresses_with_events_and_status() {
    if !available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (pebble, storage, resolver, acme) = setup(dir.path(), |s| s).await;
    acme.set_names(["lib.test", "127.0.0.1"]);
    assert!(acme.load().await.is_empty());
    let mut events = acme.subscribe();
    let stop = tokio_util_free_token();
    let runner = tokio::spawn(acme.clone().run(stop.1));

    let mut issued = Vec::new();
    while issued.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(30), events.recv())
            .await
            .unwrap()
            .unwrap()
        {
            AcmeEvent::Issued {
                name,
                not_after,
                renewal,
            } => {
                assert!(!renewal && not_after > 0);
                issued.push(name);
            }
            AcmeEvent::Failed { name, error, .. } => panic!("{name}: {error}\n{}", pebble.log()),
            other => panic!("unexpected {other:?}"),
        }
    }
    issued.sort();
    assert_eq!(issued, ["127.0.0.1", "lib.test"]);
    assert!(resolver.lookup(Some("lib.test")).is_some());
    let ca_key = acme.ca_key().to_owned();
    let stored = storage.load(&ca_key, "127.0.0.1").await.unwrap().unwrap();
    assert_eq!(stored.info.names, ["127.0.0.1"]);
    let status = acme.status();
    assert!(
        status
            .iter()
            .all(|s| s.not_after.is_some() && s.next_renewal.is_some() && s.last_error.is_none())
    );
    assert!(
        resolver.challenges().http01("anything").is_none(),
        "answers are withdrawn"
    );
    assert!(acme.renew("unknown.test").is_err());
    let _ = stop.0.send(());
    runner.await.unwrap();
}

/// A shutdown signal without extra dependencies: (sender, future).
fn tokio_util_free_token() -> (
    tokio::sync::oneshot::Sender<()>,
    impl std::future::Future<Output = ()>,
) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    (tx, async move {
        let _ = rx.await;
    })
}

/// A store whose writes can be made to fail, as a read-only or full disk would.
#[derive(Debug)]
struct FlakyStorage {
    inner: FsStorage,
    fail: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl CertStorage for FlakyStorage {
    async fn load(
        &self,
        ca: &str,
        name: &str,
    ) -> portunus_store::Result<Option<portunus_store::StoredCert>> {
        self.inner.load(ca, name).await
    }
    async fn store(
        &self,
        ca: &str,
        name: &str,
        pair: &portunus_store::CertPair,
    ) -> portunus_store::Result<()> {
        if self.fail.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(portunus_store::Error::Io {
                path: std::path::PathBuf::from("/read-only"),
                source: std::io::Error::new(
                    std::io::ErrorKind::ReadOnlyFilesystem,
                    "read-only file system",
                ),
            });
        }
        self.inner.store(ca, name, pair).await
    }
    async fn list(&self, ca: &str) -> portunus_store::Result<Vec<String>> {
        self.inner.list(ca).await
    }
    async fn lock(
        &self,
        ca: &str,
        name: &str,
        timeout: Duration,
    ) -> portunus_store::Result<portunus_store::NameLock> {
        self.inner.lock(ca, name, timeout).await
    }
    async fn load_blob(
        &self,
        kind: portunus_store::BlobKind,
        ca: &str,
        key: &str,
    ) -> portunus_store::Result<Option<Vec<u8>>> {
        self.inner.load_blob(kind, ca, key).await
    }
    async fn store_blob(
        &self,
        kind: portunus_store::BlobKind,
        ca: &str,
        key: &str,
        data: &[u8],
    ) -> portunus_store::Result<()> {
        self.inner.store_blob(kind, ca, key, data).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_certificate_write_keeps_the_old_certificate_and_shows_the_error() {
    if !available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_pebble, storage, resolver, acme) = setup(dir.path(), |inner| FlakyStorage {
        inner,
        fail: std::sync::atomic::AtomicBool::new(false),
    })
    .await;
    acme.set_names(["ro.test"]);
    let mut events = acme.subscribe();
    let stop = tokio_util_free_token();
    tokio::spawn(acme.clone().run(stop.1));
    let first = match tokio::time::timeout(Duration::from_secs(30), events.recv())
        .await
        .unwrap()
        .unwrap()
    {
        AcmeEvent::Issued { .. } => resolver.lookup(Some("ro.test")).unwrap(),
        other => panic!("{other:?}"),
    };

    // The storage turns read-only: a renewal is ordered but cannot be written.
    storage
        .fail
        .store(true, std::sync::atomic::Ordering::Relaxed);
    acme.renew("ro.test").unwrap();
    match tokio::time::timeout(Duration::from_secs(30), events.recv())
        .await
        .unwrap()
        .unwrap()
    {
        AcmeEvent::Failed { error, .. } => assert!(error.contains("read-only"), "{error}"),
        other => panic!("{other:?}"),
    }
    let still = resolver.lookup(Some("ro.test")).unwrap();
    assert!(
        Arc::ptr_eq(&first, &still),
        "the old certificate stays in service"
    );
    let status = acme.status();
    assert!(
        status[0]
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("read-only")),
        "{status:?}"
    );
    let _ = stop.0.send(());
}
