//! Operations end to end through the built binary: reloads under load, refused and
//! half-written configurations, listeners opened and closed by reload, metrics, access log.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use portunus_test_utils::pebble::free_port;
use portunus_test_utils::{EchoServer, Portunus, get, request, wait_until};
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_portunus"))
}

fn write(path: &Path, text: &str) {
    // Write beside and rename, as editors do, so no reader sees a partial file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn config_text(
    dir: &Path,
    http: u16,
    admin: u16,
    version: &str,
    extra: &str,
    upstream: &str,
) -> String {
    format!(
        r#"storage = "{storage}"
[listen]
http = "127.0.0.1:{http}"
admin = "127.0.0.1:{admin}"
{extra}
[[site]]
hosts = ["a.test"]
upstreams = ["{upstream}"]
tls = "off"

[[site]]
hosts = ["r.test"]
respond = "{version}"
tls = "off"
"#,
        storage = dir.join("storage").display()
    )
}

async fn admin_post(admin: SocketAddr, path: &str) -> (u16, serde_json::Value) {
    let r = request(admin, "POST", &admin.to_string(), path, &[], Bytes::new())
        .await
        .unwrap();
    (r.status, r.json())
}

async fn admin_get(admin: SocketAddr, path: &str) -> (u16, String) {
    let r = get(admin, &admin.to_string(), path).await.unwrap();
    (r.status, r.text())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_reloads_under_load_fail_no_request_and_keep_websockets() {
    let up = EchoServer::start("up").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (http, admin_port) = (free_port(), free_port());
    let path = dir.path().join("portunus.toml");
    let text = |v: &str| config_text(dir.path(), http, admin_port, v, "", &up.url());
    write(&path, &text("v0"));
    let p = Portunus::start(&bin(), &path, 2).unwrap();
    let (addr, admin) = (p.addr("HTTP").unwrap(), p.addr("admin").unwrap());

    // A WebSocket opened before the first reload.
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut ws, _) =
        tokio_tungstenite::client_async("ws://a.test/ws".into_client_request().unwrap(), stream)
            .await
            .unwrap();
    ws.send(Message::text("before")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("before"));

    // Load: bounded workers, stopped when the reloads are done (or after 120 s).
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed) = (Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&failed));
        workers.push(tokio::spawn(async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(120);
            while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
                match get(addr, "a.test", "/load").await {
                    Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for i in 1..=200 {
        let version = format!("v{i}");
        write(&path, &text(&version));
        let (status, body) = admin_post(admin, "/reload").await;
        assert_eq!(status, 200, "reload {i}: {body}");
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "{} ok",
        ok.load(Ordering::Relaxed)
    );
    assert!(
        ok.load(Ordering::Relaxed) > 100,
        "the load ran during the reloads"
    );
    assert_eq!(get(addr, "r.test", "/").await.unwrap().text(), "v200");
    ws.send(Message::text("after")).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text("after"),
        "the WebSocket survived"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_or_half_written_configurations_never_take_effect() {
    let up = EchoServer::start("up").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (http, admin_port) = (free_port(), free_port());
    let path = dir.path().join("portunus.toml");
    let text = |v: &str| config_text(dir.path(), http, admin_port, v, "", &up.url());
    write(&path, &text("v1"));
    let p = Portunus::start(&bin(), &path, 2).unwrap();
    let (addr, admin) = (p.addr("HTTP").unwrap(), p.addr("admin").unwrap());

    // Invalid: refused with its errors, visible in /status; the old config keeps serving.
    write(&path, &format!("bogus_key = 1\n{}", text("v-invalid")));
    let (status, body) = admin_post(admin, "/reload").await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["errors"][0]
            .as_str()
            .unwrap()
            .contains("unknown key `bogus_key`"),
        "{body}"
    );
    let (_, status_doc) = admin_get(admin, "/status").await;
    let doc: serde_json::Value = serde_json::from_str(&status_doc).unwrap();
    assert_eq!(doc["reload"]["ok"], false, "{doc}");
    assert!(
        doc["reload"]["errors"][0]
            .as_str()
            .unwrap()
            .contains("portunus.toml:1:1"),
        "{doc}"
    );
    assert_eq!(get(addr, "r.test", "/").await.unwrap().text(), "v1");

    // Rewritten in place, slowly: half a file, a pause, then the rest. The watcher sees both;
    // the half never takes effect.
    write(&path, &text("v1"));
    let full = text("v2");
    let half = &full[..full.len() / 2];
    std::fs::write(&path, half).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(get(addr, "r.test", "/").await.unwrap().text(), "v1");
    assert_eq!(get(addr, "a.test", "/").await.unwrap().status, 200);
    std::fs::write(&path, &full).unwrap();
    let mut seen = String::new();
    for _ in 0..100 {
        seen = get(addr, "r.test", "/").await.unwrap().text();
        if seen == "v2" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        seen,
        "v2",
        "the completed file is applied by the watcher\n{}",
        p.log()
    );
    // SIGHUP reloads too.
    write(&path, &text("v3"));
    assert!(p.signal("HUP"));
    let mut seen = String::new();
    for _ in 0..100 {
        seen = get(addr, "r.test", "/").await.unwrap().text();
        if seen == "v3" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seen, "v3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_open_and_close_with_reload() {
    let up = EchoServer::start("up").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (http, admin_port, metrics, moved) = (free_port(), free_port(), free_port(), free_port());
    let path = dir.path().join("portunus.toml");
    write(
        &path,
        &config_text(dir.path(), http, admin_port, "x", "", &up.url()),
    );
    let p = Portunus::start(&bin(), &path, 2).unwrap();
    let admin = p.addr("admin").unwrap();
    let metrics_addr = SocketAddr::from(([127, 0, 0, 1], metrics));
    assert!(tokio::net::TcpStream::connect(metrics_addr).await.is_err());

    // Add a metrics listener and move the HTTP listener.
    let mut text = config_text(
        dir.path(),
        moved,
        admin_port,
        "x",
        &format!("metrics = \"127.0.0.1:{metrics}\""),
        &up.url(),
    );
    write(&path, &text);
    assert_eq!(admin_post(admin, "/reload").await.0, 200);
    let (status, body) = admin_get(metrics_addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(body.contains("portunus_requests_total"), "{body}");
    let moved_addr = SocketAddr::from(([127, 0, 0, 1], moved));
    assert_eq!(get(moved_addr, "r.test", "/").await.unwrap().text(), "x");
    let old = SocketAddr::from(([127, 0, 0, 1], http));
    assert!(
        wait_until(Duration::from_secs(5), || std::net::TcpStream::connect(old)
            .is_err())
        .await,
        "the old HTTP listener is closed"
    );

    // Remove the metrics listener.
    text = config_text(dir.path(), moved, admin_port, "x", "", &up.url());
    write(&path, &text);
    assert_eq!(admin_post(admin, "/reload").await.0, 200);
    assert!(
        wait_until(Duration::from_secs(5), || std::net::TcpStream::connect(
            metrics_addr
        )
        .is_err())
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_was_sent_and_parse() {
    let up = EchoServer::start("up").await.unwrap();
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let (http, admin_port, metrics) = (free_port(), free_port(), free_port());
    let access = dir.path().join("access.log");
    let path = dir.path().join("portunus.toml");
    let mut text = config_text(
        dir.path(),
        http,
        admin_port,
        "x",
        &format!("metrics = \"127.0.0.1:{metrics}\""),
        &up.url(),
    );
    text.push_str(&format!(
        "\n[[site]]\nhosts = [\"down.test\"]\nupstreams = [\"http://{dead}\"]\ntls = \"off\"\n\n[log]\naccess = \"{}\"\naccess_format = \"json\"\n",
        access.display()
    ));
    write(&path, &text);
    let p = Portunus::start(&bin(), &path, 3).unwrap();
    let (addr, admin) = (p.addr("HTTP").unwrap(), p.addr("admin").unwrap());
    for _ in 0..5 {
        assert_eq!(get(addr, "a.test", "/").await.unwrap().status, 200);
    }
    for _ in 0..3 {
        assert_eq!(get(addr, "unknown.test", "/").await.unwrap().status, 404);
    }
    for _ in 0..2 {
        assert_eq!(get(addr, "down.test", "/").await.unwrap().status, 502);
    }
    let (status, body) = admin_get(admin, "/metrics").await;
    assert_eq!(status, 200);
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).unwrap();
    let value = |name: &str, labels: &[(&str, &str)]| -> f64 {
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum()
    };
    assert_eq!(
        value(
            "portunus_requests_total",
            &[("site", "a.test"), ("code", "2xx")]
        ),
        5.0,
        "{body}"
    );
    assert_eq!(
        value("portunus_requests_total", &[("site", "-"), ("code", "4xx")]),
        3.0,
        "{body}"
    );
    assert_eq!(
        value(
            "portunus_requests_total",
            &[("site", "down.test"), ("code", "5xx")]
        ),
        2.0,
        "{body}"
    );
    assert_eq!(
        value("portunus_upstream_healthy", &[("site", "a.test")]),
        1.0,
        "{body}"
    );
    assert_eq!(
        value("portunus_upstream_healthy", &[("site", "down.test")]),
        0.0,
        "{body}"
    );
    assert!(
        body.contains("portunus_request_duration_seconds_bucket{site=\"a.test\",le=\"+Inf\"} 5")
    );
    assert!(body.contains("portunus_acme_orders_total"));
    assert!(
        !body.contains("/load") && !body.contains("127.0.0.1\","),
        "no per-path or per-client labels"
    );
    // The metrics listener serves the same, without Host checks, and nothing else.
    let metrics_addr = SocketAddr::from(([127, 0, 0, 1], metrics));
    let r = get(metrics_addr, "prometheus.monitoring.svc", "/metrics")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert!(
        r.text()
            .contains("portunus_requests_total{site=\"a.test\",code=\"2xx\"}")
    );
    assert_eq!(get(metrics_addr, "x", "/status").await.unwrap().status, 404);

    // A keep-alive connection left idle is open, and parked once quiet.
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut idle, b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    let reply = portunus_test_utils::read_until(&mut idle, "\"server\"").await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let gauges = [
        format!("portunus_connections_open{{listener=\"{addr}\"}} 1\n"),
        format!("portunus_connections_parked{{listener=\"{addr}\"}} 1\n"),
    ];
    let mut last = String::new();
    for _ in 0..50 {
        last = admin_get(admin, "/metrics").await.1;
        if gauges.iter().all(|g| last.contains(g.as_str())) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gauges.iter().all(|g| last.contains(g.as_str())), "{last}");
    drop(idle);

    // The access log has one JSON line per request.
    assert!(
        wait_until(Duration::from_secs(5), || std::fs::read_to_string(&access)
            .is_ok_and(|t| t.lines().count() >= 10))
        .await
    );
    let log = std::fs::read_to_string(&access).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines.iter().filter(|l| l["status"] == 502).count(),
        2,
        "{log}"
    );
    assert!(
        lines
            .iter()
            .all(|l| l["remote"] == "127.0.0.1" && l["method"] == "GET"),
        "{log}"
    );
}
