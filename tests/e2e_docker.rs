//! Docker discovery end to end: the built binary against the real Docker engine, with
//! containers of a tiny busybox image the tests build themselves (nothing is pulled), all
//! removed afterwards.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portunus_test_utils::docker::{Image, available};
use portunus_test_utils::{Portunus, get, wait_until};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_portunus"))
}

fn start(dir: &Path, docker: &str, sites: &str) -> Portunus {
    let path = dir.join("portunus.toml");
    std::fs::write(
        &path,
        format!(
            "storage = \"{}\"\n[listen]\nhttp = \"127.0.0.1:0\"\n[docker]\n{docker}\n{sites}",
            dir.join("storage").display()
        ),
    )
    .unwrap();
    Portunus::start(&bin(), &path, 1).unwrap()
}

/// Polls `host` until its body is `want` (trimmed); returns how long it took.
async fn until_body(addr: SocketAddr, host: &str, want: &str, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if let Ok(r) = get(addr, host, "/").await
            && r.status == 200
            && r.text().trim() == want
        {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

async fn until_status(
    addr: SocketAddr,
    host: &str,
    want: u16,
    limit: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        // A probe sent just before a route is removed may be connecting to the container's
        // vanished address (up to the connect timeout): give up on it and probe again.
        let probe = tokio::time::timeout(Duration::from_millis(500), get(addr, host, "/")).await;
        if probe.is_ok_and(|r| r.is_ok_and(|r| r.status == want)) {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_and_nginx_proxy_variables_route_live() {
    if !available() {
        return;
    }
    let image = Image::build("labels").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), "", "");
    let addr = p.addr("HTTP").unwrap();
    let tag = std::process::id();

    let a = image
        .run(
            &format!("pt-a-{tag}"),
            &[("portunus.host", "a.docker.test"), ("portunus.tls", "off")],
            &[],
            "A",
        )
        .unwrap();
    let took = until_body(addr, "a.docker.test", "A", Duration::from_secs(5)).await;
    assert!(took.is_some(), "label container never routed\n{}", p.log());
    eprintln!(
        "label container routed {:?} after `docker run` returned",
        took.unwrap()
    );

    // nginx-proxy's variables: plain HTTP without LETSENCRYPT_HOST.
    let _e = image
        .run(
            &format!("pt-e-{tag}"),
            &[],
            &[("VIRTUAL_HOST", "env.docker.test"), ("VIRTUAL_PORT", "80")],
            "E",
        )
        .unwrap();
    assert!(
        until_body(addr, "env.docker.test", "E", Duration::from_secs(5))
            .await
            .is_some(),
        "{}",
        p.log()
    );

    // Stopped: 404 soon after.
    a.stop().unwrap();
    let took = until_status(addr, "a.docker.test", 404, Duration::from_secs(5)).await;
    assert!(
        took.is_some(),
        "a stopped container's host must answer 404\n{}",
        p.log()
    );
    eprintln!(
        "stopped container unrouted {:?} after `docker stop` returned",
        took.unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_sharing_a_host_form_a_pool() {
    if !available() {
        return;
    }
    let image = Image::build("pool").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), "", "");
    let addr = p.addr("HTTP").unwrap();
    let tag = std::process::id();
    let labels = [
        ("portunus.host", "pool.docker.test"),
        ("portunus.tls", "off"),
    ];
    let one = image
        .run(&format!("pt-p1-{tag}"), &labels, &[], "one")
        .unwrap();
    let _two = image
        .run(&format!("pt-p2-{tag}"), &labels, &[], "two")
        .unwrap();
    let mut seen = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.len() < 2 && Instant::now() < deadline {
        if let Ok(r) = get(addr, "pool.docker.test", "/").await
            && r.status == 200
        {
            seen.insert(r.text().trim().to_owned());
        }
    }
    assert_eq!(
        seen.len(),
        2,
        "both containers share the load: {seen:?}\n{}",
        p.log()
    );
    one.stop().unwrap();
    // After the stop settles, every request reaches the other one.
    assert!(
        until_body(addr, "pool.docker.test", "two", Duration::from_secs(5))
            .await
            .is_some()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..10 {
        let r = get(addr, "pool.docker.test", "/").await.unwrap();
        assert_eq!((r.status, r.text().trim()), (200, "two"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_domains_config_hosts_and_malformed_labels_are_refused() {
    if !available() {
        return;
    }
    let image = Image::build("trust").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = start(
        dir.path(),
        "allowed_domains = [\"*.docker.test\"]",
        "[[site]]\nhosts = [\"owned.docker.test\"]\nrespond = \"file\"\ntls = \"off\"\n",
    );
    let addr = p.addr("HTTP").unwrap();
    let tag = std::process::id();
    let _rogue = image
        .run(
            &format!("pt-rogue-{tag}"),
            &[("portunus.host", "bank.example"), ("portunus.tls", "off")],
            &[],
            "rogue",
        )
        .unwrap();
    let _thief = image
        .run(
            &format!("pt-thief-{tag}"),
            &[
                ("portunus.host", "owned.docker.test"),
                ("portunus.tls", "off"),
            ],
            &[],
            "thief",
        )
        .unwrap();
    let _broken = image
        .run(
            &format!("pt-broken-{tag}"),
            &[
                ("portunus.host", "broken.docker.test"),
                ("portunus.port", "eighty"),
            ],
            &[],
            "broken",
        )
        .unwrap();
    let _good = image
        .run(
            &format!("pt-good-{tag}"),
            &[
                ("portunus.host", "good.docker.test"),
                ("portunus.tls", "off"),
            ],
            &[],
            "good",
        )
        .unwrap();
    assert!(
        until_body(addr, "good.docker.test", "good", Duration::from_secs(5))
            .await
            .is_some(),
        "{}",
        p.log()
    );
    assert_eq!(get(addr, "bank.example", "/").await.unwrap().status, 404);
    assert_eq!(
        get(addr, "owned.docker.test", "/").await.unwrap().text(),
        "file",
        "the file wins"
    );
    assert_eq!(
        get(addr, "broken.docker.test", "/").await.unwrap().status,
        404
    );
    let log = p.log();
    assert!(
        log.contains(&format!("pt-rogue-{tag}")) && log.contains("allowed_domains"),
        "{log}"
    );
    assert!(
        log.contains(&format!("pt-thief-{tag}")) && log.contains("configuration file"),
        "{log}"
    );
    assert!(
        log.contains(&format!("pt-broken-{tag}")) && log.contains("not a port number"),
        "{log}"
    );
}

/// A Unix-socket forwarder to the real engine that can be cut and restored.
struct SocketProxy {
    path: PathBuf,
    stop: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl SocketProxy {
    fn start(path: &Path) -> Self {
        let proxy = Self {
            path: path.to_owned(),
            stop: Arc::new(Mutex::new(None)),
        };
        proxy.up();
        proxy
    }

    fn up(&self) {
        let _ = std::fs::remove_file(&self.path);
        let listener = tokio::net::UnixListener::bind(&self.path).unwrap();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut client, _)) = listener.accept().await {
                conns.spawn(async move {
                    if let Ok(mut engine) =
                        tokio::net::UnixStream::connect("/var/run/docker.sock").await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut engine).await;
                    }
                });
            }
        });
        *self.stop.lock().unwrap() = Some(task);
    }

    fn down(&self) {
        // Aborting drops the listener and every forwarded connection.
        if let Some(task) = self.stop.lock().unwrap().take() {
            task.abort();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_engine_keeps_the_last_routes_then_resyncs() {
    if !available() {
        return;
    }
    let image = Image::build("resync").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("docker.sock");
    let proxy = SocketProxy::start(&socket);
    let p = start(
        dir.path(),
        &format!("endpoint = \"unix://{}\"", socket.display()),
        "",
    );
    let addr = p.addr("HTTP").unwrap();
    let tag = std::process::id();
    let _first = image
        .run(
            &format!("pt-first-{tag}"),
            &[
                ("portunus.host", "first.docker.test"),
                ("portunus.tls", "off"),
            ],
            &[],
            "first",
        )
        .unwrap();
    assert!(
        until_body(addr, "first.docker.test", "first", Duration::from_secs(5))
            .await
            .is_some(),
        "{}",
        p.log()
    );

    proxy.down();
    assert!(
        wait_until(Duration::from_secs(5), || p
            .log()
            .contains("Docker engine unreachable")
            || p.log().contains("event stream ended"))
        .await,
        "{}",
        p.log()
    );
    let _second = image
        .run(
            &format!("pt-second-{tag}"),
            &[
                ("portunus.host", "second.docker.test"),
                ("portunus.tls", "off"),
            ],
            &[],
            "second",
        )
        .unwrap();
    // The last known routes keep serving meanwhile.
    for _ in 0..5 {
        assert_eq!(
            get(addr, "first.docker.test", "/")
                .await
                .unwrap()
                .text()
                .trim(),
            "first"
        );
    }
    proxy.up();
    assert!(
        until_body(
            addr,
            "second.docker.test",
            "second",
            Duration::from_secs(20)
        )
        .await
        .is_some(),
        "resynced after the engine came back\n{}",
        p.log()
    );
}
