//! The filesystem store through its public API: layout, modes, crash safety and the
//! cross-process lock. Child processes are this test binary re-run with an environment
//! variable that turns one of the `child_*` tests into a writer.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use portunus_store::{
    CertPair, CertResolver, CertStorage, FsStorage, LOCAL_LEAF_LIFETIME, LocalCa, MemoryStorage,
};

const CRASH_ENV: &str = "PORTUNUS_TEST_CRASH_WRITER";
const RACE_ENV: &str = "PORTUNUS_TEST_LOCK_RACER";

fn pair_files(dir: &Path, tag: &str) -> CertPair {
    CertPair {
        chain_pem: std::fs::read_to_string(dir.join(format!("{tag}.crt"))).unwrap(),
        key_pem: std::fs::read_to_string(dir.join(format!("{tag}.key"))).unwrap(),
    }
}

fn make_pairs(dir: &Path, name: &str) -> (CertPair, CertPair) {
    let ca = LocalCa::generate().unwrap();
    let old = ca.issue(&[name.to_owned()], LOCAL_LEAF_LIFETIME).unwrap();
    let new = ca.issue(&[name.to_owned()], LOCAL_LEAF_LIFETIME).unwrap();
    for (tag, pair) in [("old", &old), ("new", &new)] {
        std::fs::write(dir.join(format!("{name}.{tag}.crt")), &pair.chain_pem).unwrap();
        std::fs::write(dir.join(format!("{name}.{tag}.key")), &pair.key_pem).unwrap();
    }
    (old, new)
}

fn child(test: &str, env: (&str, &Path)) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(env.0, env.1)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Child: rewrites two certificates forever, alternating old and new pairs.
#[tokio::test]
async fn child_crash_writer() {
    let Some(dir) = std::env::var_os(CRASH_ENV) else {
        return;
    };
    let dir = Path::new(&dir);
    let store = FsStorage::open(dir.join("storage")).unwrap();
    let names = ["a.test", "*.b.test"];
    let pairs: Vec<(CertPair, CertPair)> = names
        .iter()
        .map(|n| {
            (
                pair_files(dir, &format!("{n}.old")),
                pair_files(dir, &format!("{n}.new")),
            )
        })
        .collect();
    for round in 0.. {
        for (name, (old, new)) in names.iter().zip(&pairs) {
            let pair = if round % 2 == 0 { new } else { old };
            store.store("internal", name, pair).await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_writer_leaves_old_or_new_pair_never_a_mix() {
    let dir = tempfile::tempdir().unwrap();
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let names = ["a.test", "*.b.test"];
    let expected: Vec<(CertPair, CertPair)> =
        names.iter().map(|n| make_pairs(dir.path(), n)).collect();
    let store = FsStorage::open(dir.path().join("storage")).unwrap();
    // Start from the old pairs, so there is always something to find.
    for (name, (old, _)) in names.iter().zip(&expected) {
        store.store("internal", name, old).await.unwrap();
    }
    let mut saw_new = false;
    for i in 0..100u64 {
        let mut writer = child("child_crash_writer", (CRASH_ENV, dir.path()));
        // Pseudo-random moments: 3 to 40 ms after start.
        let wait = 3 + (i * 7919 + 13) % 38;
        tokio::time::sleep(Duration::from_millis(wait)).await;
        writer.kill().unwrap(); // SIGKILL
        writer.wait().unwrap();
        let reopened = FsStorage::open(dir.path().join("storage")).unwrap();
        for (name, (old, new)) in names.iter().zip(&expected) {
            let stored = reopened
                .load("internal", name)
                .await
                .unwrap()
                .expect("a pair is always there");
            assert!(
                stored.pair == *old || stored.pair == *new,
                "kill {i}: {name} is neither the old nor the new pair"
            );
            saw_new |= stored.pair == *new;
            stored
                .pair
                .certified_key(&provider, name)
                .expect("certificate and key match");
        }
    }
    assert!(
        saw_new,
        "the writer never got to write: the test proved nothing"
    );
    // Crashed writers leave no more than a few stray versions behind, and the next write
    // cleans them.
    store
        .store("internal", "a.test", &expected[0].0)
        .await
        .unwrap();
    let versions = std::fs::read_dir(dir.path().join("storage/certs/internal/.versions"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("a.test.")
        })
        .count();
    assert_eq!(versions, 1);
}

/// Child: takes the lock of one name, logs start and end around a slow write.
#[tokio::test]
async fn child_lock_racer() {
    let Some(dir) = std::env::var_os(RACE_ENV) else {
        return;
    };
    let dir = Path::new(&dir);
    let store = FsStorage::open(dir.join("storage")).unwrap();
    let pair = pair_files(dir, "race.test.new");
    let log = dir.join("race.log");
    let me = std::process::id();
    let append = |line: String| {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&log)
            .unwrap();
        writeln!(f, "{line}").unwrap();
    };
    let _lock = store
        .lock("internal", "race.test", Duration::from_secs(20))
        .await
        .unwrap();
    append(format!("start {me}"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    store.store("internal", "race.test", &pair).await.unwrap();
    append(format!("end {me}"));
}

#[tokio::test]
async fn two_processes_never_write_one_name_at_once() {
    let dir = tempfile::tempdir().unwrap();
    make_pairs(dir.path(), "race.test");
    let mut a = child("child_lock_racer", (RACE_ENV, dir.path()));
    let mut b = child("child_lock_racer", (RACE_ENV, dir.path()));
    assert!(a.wait().unwrap().success());
    assert!(b.wait().unwrap().success());
    let log = std::fs::read_to_string(dir.path().join("race.log")).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 4, "{log}");
    // start X, end X, start Y, end Y: never interleaved.
    let pid = |l: &str| l.split_whitespace().nth(1).unwrap().to_owned();
    assert!(
        lines[0].starts_with("start") && lines[1].starts_with("end"),
        "{log}"
    );
    assert_eq!(pid(lines[0]), pid(lines[1]), "{log}");
    assert!(
        lines[2].starts_with("start") && lines[3].starts_with("end"),
        "{log}"
    );
    assert_ne!(pid(lines[0]), pid(lines[2]), "{log}");
}

#[tokio::test]
async fn lock_times_out_while_held() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsStorage::open(dir.path()).unwrap();
    let held = store
        .lock("internal", "x.test", Duration::from_secs(1))
        .await
        .unwrap();
    let err = store
        .lock("internal", "x.test", Duration::from_millis(100))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("x.test"), "{err}");
    drop(held);
    store
        .lock("internal", "x.test", Duration::from_millis(100))
        .await
        .unwrap();

    let memory = MemoryStorage::new();
    let held = memory
        .lock("internal", "x.test", Duration::from_secs(1))
        .await
        .unwrap();
    assert!(
        memory
            .lock("internal", "x.test", Duration::from_millis(50))
            .await
            .is_err()
    );
    drop(held);
    memory
        .lock("internal", "x.test", Duration::from_millis(50))
        .await
        .unwrap();
}

#[tokio::test]
async fn layout_names_and_modes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("storage");
    let store = FsStorage::open(&root).unwrap();
    let ca = LocalCa::generate().unwrap();
    let wild = ca
        .issue(&["*.example.com".to_owned()], LOCAL_LEAF_LIFETIME)
        .unwrap();
    let plain = ca
        .issue(&["example.com".to_owned()], LOCAL_LEAF_LIFETIME)
        .unwrap();
    let ca_key = portunus_store::ca_key("https://127.0.0.1:14000/dir").unwrap();
    store.store(&ca_key, "*.example.com", &wild).await.unwrap();
    store.store(&ca_key, "Example.com", &plain).await.unwrap();

    let base = root.join("certs/127.0.0.1-14000-dir");
    for name in ["wildcard_.example.com", "example.com"] {
        for file in ["fullchain.pem", "privkey.pem", "meta.json"] {
            let path = base.join(name).join(file);
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", path.display());
        }
    }
    for d in [&root, &root.join("certs"), &base, &base.join(".versions")] {
        let mode = std::fs::metadata(d).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{}", d.display());
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(base.join("example.com/meta.json")).unwrap())
            .unwrap();
    assert_eq!(meta["names"][0], "example.com");
    assert_eq!(
        store.list(&ca_key).await.unwrap(),
        ["*.example.com", "example.com"]
    );
    let loaded = store.load(&ca_key, "*.example.com").await.unwrap().unwrap();
    assert_eq!(loaded.pair, wild);
    assert!(loaded.info.covers("www.example.com"));
    assert!(
        store
            .load(&ca_key, "missing.example.com")
            .await
            .unwrap()
            .is_none()
    );
    for bad in ["../evil", "a/b", ""] {
        assert!(store.store(&ca_key, bad, &plain).await.is_err(), "{bad}");
    }
    assert!(store.load("../x", "example.com").await.is_err());
}

#[tokio::test]
async fn corrupt_pair_is_an_error_naming_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsStorage::open(dir.path()).unwrap();
    let ca = LocalCa::generate().unwrap();
    store
        .store(
            "internal",
            "c.test",
            &ca.issue(&["c.test".to_owned()], LOCAL_LEAF_LIFETIME)
                .unwrap(),
        )
        .await
        .unwrap();
    let chain = dir.path().join("certs/internal/c.test/fullchain.pem");
    let real = std::fs::canonicalize(&chain).unwrap();
    std::fs::write(&real, "garbage").unwrap();
    let err = store.load("internal", "c.test").await.unwrap_err();
    assert!(err.to_string().contains("fullchain.pem"), "{err}");
    // A pair whose key belongs to another certificate is refused when put in service.
    let a = ca
        .issue(&["m.test".to_owned()], LOCAL_LEAF_LIFETIME)
        .unwrap();
    let b = ca
        .issue(&["m.test".to_owned()], LOCAL_LEAF_LIFETIME)
        .unwrap();
    let mixed = CertPair {
        chain_pem: a.chain_pem,
        key_pem: b.key_pem,
    };
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    assert!(mixed.certified_key(&provider, "m.test").is_err());
}

#[test]
fn unwritable_storage_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    let err = FsStorage::open(file.join("storage")).unwrap_err();
    assert!(err.to_string().contains("not-a-dir"), "{err}");
}

#[test]
fn resolver_prefers_exact_then_wildcard_and_honours_default_sni() {
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let ca = LocalCa::generate().unwrap();
    let key = |n: &str| {
        ca.issue(&[n.to_owned()], LOCAL_LEAF_LIFETIME)
            .unwrap()
            .certified_key(&provider, n)
            .unwrap()
    };
    let resolver = CertResolver::new();
    let (exact, wild) = (key("api.example.com"), key("*.example.com"));
    resolver.insert_many([
        ("api.example.com", Arc::clone(&exact)),
        ("*.example.com", Arc::clone(&wild)),
    ]);
    assert!(Arc::ptr_eq(
        &resolver.lookup(Some("API.example.com.")).unwrap(),
        &exact
    ));
    assert!(Arc::ptr_eq(
        &resolver.lookup(Some("www.example.com")).unwrap(),
        &wild
    ));
    assert!(resolver.lookup(Some("example.com")).is_none());
    assert!(resolver.lookup(Some("a.b.example.com")).is_none());
    assert!(
        resolver.lookup(None).is_none(),
        "no SNI and no default: nothing"
    );
    resolver.set_default_sni(Some("api.example.com"));
    assert!(Arc::ptr_eq(&resolver.lookup(None).unwrap(), &exact));
    resolver.remove("api.example.com");
    assert!(Arc::ptr_eq(
        &resolver.lookup(Some("api.example.com")).unwrap(),
        &wild
    ));
    assert_eq!(resolver.len(), 1);
    resolver.challenges().set_http01("tok", "tok.thumb");
    assert_eq!(
        resolver.challenges().http01("tok").as_deref(),
        Some("tok.thumb")
    );
    resolver.challenges().remove_http01("tok");
    assert!(resolver.challenges().http01("tok").is_none());
}
