//! End to end through the built `portunus` binary: real upstreams on loopback, real clients.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use portunus_test_utils::{EchoServer, Portunus, exchange, get, request, wait_until};
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_portunus"))
}

/// Writes `portunus.toml` into a fresh directory; listeners on port 0.
fn write_config(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("portunus.toml");
    let text = format!(
        "storage = \"{}\"\n[listen]\nhttp = \"127.0.0.1:0\"\n\n{body}",
        dir.join("storage").display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn start(dir: &Path, body: &str) -> Portunus {
    let config = write_config(dir, body);
    Portunus::start(&bin(), &config, 1).unwrap()
}

#[tokio::test]
async fn routes_by_host_and_path_and_404s_unknown_hosts() {
    let a = EchoServer::start("a").await.unwrap();
    let b = EchoServer::start("b").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = start(
        dir.path(),
        &format!(
            r#"
[[site]]
hosts = ["a.test"]
upstreams = ["{a}"]
tls = "off"

[[site.route]]
path = "/api"
upstreams = ["{b}"]

[[site.route]]
path = "/strip/"
upstreams = ["{b}/base"]
strip_prefix = true

[[site]]
hosts = ["b.test", "*.wild.test"]
upstreams = ["{b}"]
tls = "off"
"#,
            a = a.url(),
            b = b.url()
        ),
    );
    let addr = p.addr("HTTP").unwrap();

    let r = get(addr, "a.test", "/hello?x=1").await.unwrap();
    assert_eq!(r.status, 200);
    let j = r.json();
    assert_eq!(j["server"], "a");
    assert_eq!(j["path"], "/hello");
    assert_eq!(j["query"], "x=1");
    assert_eq!(j["headers"]["host"], "a.test", "Host is preserved");

    let r = get(addr, "A.TEST:8080", "/api/users").await.unwrap();
    assert_eq!(r.json()["server"], "b");
    assert_eq!(
        r.json()["path"],
        "/api/users",
        "no strip_prefix: original path"
    );

    let r = get(addr, "a.test", "/apix").await.unwrap();
    assert_eq!(r.json()["server"], "a", "/apix is not under /api");

    let r = get(addr, "a.test", "/strip/x/y?q=2").await.unwrap();
    assert_eq!(r.json()["server"], "b");
    assert_eq!(
        r.json()["path"],
        "/base/x/y",
        "prefix stripped, base path prepended"
    );
    assert_eq!(r.json()["query"], "q=2");

    let r = get(addr, "a.test", "/strip").await.unwrap();
    assert_eq!(r.json()["path"], "/base/");

    let r = get(addr, "b.test", "/").await.unwrap();
    assert_eq!(r.json()["server"], "b");
    let r = get(addr, "x.wild.test", "/").await.unwrap();
    assert_eq!(r.json()["server"], "b");

    let (seen_a, seen_b) = (a.seen().len(), b.seen().len());
    let r = get(addr, "unknown.test", "/").await.unwrap();
    assert_eq!(r.status, 404);
    assert!(r.text().contains("no site"), "{}", r.text());
    assert_eq!(
        (a.seen().len(), b.seen().len()),
        (seen_a, seen_b),
        "upstreams saw nothing"
    );
}

#[tokio::test]
async fn bad_gateway_when_down_and_gateway_timeout_when_slow() {
    let slow = EchoServer::start("slow").await.unwrap();
    // A port with nothing listening: bind, note, close.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let p = start(
        dir.path(),
        &format!(
            r#"
[timeouts]
response_header = "300ms"

[[site]]
hosts = ["down.test"]
upstreams = ["http://{dead}", "http://{dead}"]
tls = "off"

[[site]]
hosts = ["slow.test"]
upstreams = ["{slow}"]
tls = "off"
"#,
            slow = slow.url()
        ),
    );
    let addr = p.addr("HTTP").unwrap();
    let r = get(addr, "down.test", "/").await.unwrap();
    assert_eq!(r.status, 502);
    assert!(r.text().contains("no upstream answered"), "{}", r.text());

    let r = get(addr, "slow.test", "/slow?ms=2000").await.unwrap();
    assert_eq!(r.status, 504);
    assert!(r.text().contains("did not answer in time"), "{}", r.text());

    let r = get(addr, "slow.test", "/slow?ms=10").await.unwrap();
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn forwarding_headers_and_hop_by_hop() {
    let up = EchoServer::start("up").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let site = format!(
        "[[site]]\nhosts = [\"h.test\"]\nupstreams = [\"{}\"]\ntls = \"off\"\n",
        up.url()
    );
    let spoof: &[(&str, &str)] = &[
        ("x-forwarded-for", "6.6.6.6"),
        ("x-real-ip", "6.6.6.6"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "evil.test"),
        ("forwarded", "for=6.6.6.6"),
        ("connection", "keep-alive, x-secret"),
        ("x-secret", "hop"),
        ("keep-alive", "timeout=5"),
        ("proxy-authorization", "Basic c2VjcmV0"),
        ("te", "trailers"),
        ("x-end-to-end", "kept"),
    ];

    // Untrusted peer: every client copy replaced.
    {
        let p = start(dir.path(), &site);
        let addr = p.addr("HTTP").unwrap();
        let r = request(addr, "GET", "h.test", "/", spoof, Bytes::new())
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        let h = &r.json()["headers"];
        assert_eq!(h["x-forwarded-for"], "127.0.0.1");
        assert_eq!(h["x-real-ip"], "127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "h.test");
        assert_eq!(h["x-forwarded-port"], addr.port().to_string());
        assert_eq!(h["x-forwarded-ssl"], "off");
        assert_eq!(h["forwarded"], "for=127.0.0.1;proto=http;host=h.test");
        assert_eq!(h["x-end-to-end"], "kept");
        for gone in [
            "x-secret",
            "keep-alive",
            "proxy-authorization",
            "te",
            "proxy-connection",
        ] {
            assert!(h.get(gone).is_none(), "{gone} must not be forwarded: {h}");
        }
        assert!(
            r.headers.get("keep-alive").is_none(),
            "hop-by-hop response header from the upstream must be dropped"
        );
        assert_eq!(r.headers["x-upstream"], "up");
    }

    // Trusted peer: chains appended, other values kept.
    let config = dir.path().join("trusted.toml");
    let text = format!(
        "storage = \"{}\"\ntrusted_proxies = [\"127.0.0.0/8\"]\n[listen]\nhttp = \"127.0.0.1:0\"\n{site}",
        dir.path().join("storage").display()
    );
    std::fs::write(&config, text).unwrap();
    let p = Portunus::start(&bin(), &config, 1).unwrap();
    let addr = p.addr("HTTP").unwrap();
    let r = request(addr, "GET", "h.test", "/", spoof, Bytes::new())
        .await
        .unwrap();
    let h = &r.json()["headers"];
    assert_eq!(h["x-forwarded-for"], "6.6.6.6, 127.0.0.1");
    assert_eq!(h["x-real-ip"], "6.6.6.6");
    assert_eq!(h["x-forwarded-proto"], "https");
    assert_eq!(
        h["forwarded"],
        "for=6.6.6.6, for=127.0.0.1;proto=http;host=h.test"
    );
    assert!(h.get("proxy-authorization").is_none());
}

#[tokio::test]
async fn large_bodies_stream_with_bounded_memory() {
    use http_body_util::BodyExt;
    const SIZE: u64 = 100 * 1024 * 1024;
    let up = EchoServer::start("big").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = start(
        dir.path(),
        &format!(
            "[[site]]\nhosts = [\"big.test\"]\nupstreams = [\"{}\"]\ntls = \"off\"\n",
            up.url()
        ),
    );
    let addr = p.addr("HTTP").unwrap();

    // Download: 100 MB streamed from the upstream.
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(format!("/bytes?n={SIZE}"))
        .header("host", "big.test")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let res = sender.send_request(req).await.unwrap();
    assert_eq!(res.status(), 200);
    let mut body = res.into_body();
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        received += frame.unwrap().data_ref().map_or(0, |d| d.len() as u64);
    }
    assert_eq!(received, SIZE);

    // Upload: 100 MB streamed to the upstream, which reports what it read.
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let chunk = Bytes::from(vec![b'u'; 256 * 1024]);
    let chunks = (SIZE / chunk.len() as u64) as usize;
    let frames =
        futures_util::stream::iter((0..chunks).map(move |_| {
            Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(chunk.clone()))
        }));
    let req = http::Request::post("/upload")
        .header("host", "big.test")
        .header("content-length", SIZE.to_string())
        .body(http_body_util::StreamBody::new(frames))
        .unwrap();
    let res = sender.send_request(req).await.unwrap();
    assert_eq!(res.status(), 200);
    let doc: serde_json::Value =
        serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(doc["body_len"], SIZE);

    let peak = portunus_test_utils::peak_rss_bytes(p.pid()).unwrap();
    assert!(
        peak < 50 * 1024 * 1024,
        "peak RSS {} MiB",
        peak / (1024 * 1024)
    );
}

#[tokio::test]
async fn websocket_tunnelled_and_h2c_refused() {
    let up = EchoServer::start("ws").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = start(
        dir.path(),
        &format!(
            "[[site]]\nhosts = [\"ws.test\"]\nupstreams = [\"{}\"]\ntls = \"off\"\n",
            up.url()
        ),
    );
    let addr = p.addr("HTTP").unwrap();

    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let ws_request = "ws://ws.test/chat".into_client_request().unwrap();
    let (mut ws, response) = tokio_tungstenite::client_async(ws_request, stream)
        .await
        .unwrap();
    assert_eq!(response.status(), 101);
    for i in 0..5 {
        ws.send(Message::text(format!("ping {i}"))).await.unwrap();
        let echoed = ws.next().await.unwrap().unwrap();
        assert_eq!(echoed, Message::text(format!("ping {i}")));
    }
    ws.send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::binary(vec![0u8, 1, 2, 255])
    );
    ws.close(None).await.unwrap();

    let before = up.seen().len();
    let r = request_raw_h2c(addr).await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    assert!(!r.contains("101"), "{r}");
    assert_eq!(
        up.seen().len(),
        before,
        "an h2c upgrade never reaches the upstream"
    );

    let r = request(
        addr,
        "CONNECT",
        "ws.test:443",
        "ws.test:443",
        &[],
        Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 405);
    assert_eq!(up.seen().len(), before);
}

async fn request_raw_h2c(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"GET / HTTP/1.1\r\nHost: ws.test\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn killed_upstream_fails_no_idempotent_request() {
    let a = EchoServer::start("a").await.unwrap();
    let b = EchoServer::start("b").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = start(
        dir.path(),
        &format!(
            "[[site]]\nhosts = [\"pool.test\"]\nupstreams = [\"{}\", \"{}\"]\ntls = \"off\"\n",
            a.url(),
            b.url()
        ),
    );
    let addr = p.addr("HTTP").unwrap();
    let a = Arc::new(a);
    let done = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let done = Arc::clone(&done);
        workers.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            for _ in 0..50 {
                match get(addr, "pool.test", "/").await {
                    Ok(r) if r.status == 200 => {}
                    Ok(r) => failures.push(format!("{} {}", r.status, r.text())),
                    Err(e) => failures.push(e),
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            failures
        }));
    }
    assert!(
        wait_until(Duration::from_secs(10), || done.load(Ordering::Relaxed)
            >= 100)
        .await
    );
    a.stop();
    let mut failures = Vec::new();
    for w in workers {
        failures.extend(w.await.unwrap());
    }
    assert!(
        failures.is_empty(),
        "{} failures: {:?}\n{}",
        failures.len(),
        &failures[..failures.len().min(5)],
        p.log()
            .lines()
            .filter(|l| l.contains("upstream"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(b.seen().len() > 200, "the surviving upstream took over");
}

#[tokio::test]
async fn sigterm_drains_in_flight_and_refuses_new_connections() {
    let up = EchoServer::start("slow").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut p = start(
        dir.path(),
        &format!(
            "[[site]]\nhosts = [\"s.test\"]\nupstreams = [\"{}\"]\ntls = \"off\"\n",
            up.url()
        ),
    );
    let addr = p.addr("HTTP").unwrap();
    let in_flight = tokio::spawn(async move { get(addr, "s.test", "/slow?ms=1500").await });
    assert!(wait_until(Duration::from_secs(5), || !up.seen().is_empty()).await);
    assert!(p.signal("TERM"));
    let mut refused = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "new connections must be refused after SIGTERM");
    let r = in_flight.await.unwrap().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(p.wait_exit(Duration::from_secs(10)), Some(0), "{}", p.log());
}

#[test]
fn check_reports_every_error_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.toml");
    std::fs::write(
        &path,
        r#"listne = "typo"

[[site]]
hosts = ["a.test"]
upstreams = ["htp:/nowhere"]

[[site]]
hosts = "b.test"
respond = "hi"

[[site]]
hosts = ["A.test"]
respond = "dup"
"#,
    )
    .unwrap();
    let out = std::process::Command::new(bin())
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    let p = path.display().to_string();
    assert_eq!(lines.len(), 4, "{stderr}");
    assert!(
        lines[0].starts_with(&format!("{p}:1:1: unknown key `listne`")),
        "{stderr}"
    );
    assert!(
        lines[1].starts_with(&format!("{p}:5:14: invalid upstream URL")),
        "{stderr}"
    );
    assert!(
        lines[2].starts_with(&format!("{p}:8:9: invalid type")),
        "{stderr}"
    );
    assert!(
        lines[3].starts_with(&format!("{p}:12:10: host `a.test` is defined twice")),
        "{stderr}"
    );

    let ok = dir.path().join("ok.toml");
    std::fs::write(
        &ok,
        "[listen]\nhttp=\":8080\"\n[[site]]\nhosts=[\"a.test\"]\nrespond=\"hi\"\ntls=\"off\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin())
        .args(["check", "-c"])
        .arg(&ok)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !dir.path().join("storage").exists(),
        "check touches no disk"
    );

    let out = std::process::Command::new(bin())
        .args(["check", "-c"])
        .arg(dir.path().join("missing.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let out = std::process::Command::new(bin())
        .arg("frobnicate")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2");
}

#[test]
fn version_prints_the_version() {
    let out = std::process::Command::new(bin())
        .arg("version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("portunus {}", env!("CARGO_PKG_VERSION"))
    );
}

#[tokio::test]
async fn storage_is_created_private_and_respond_sites_answer() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let p = start(
        dir.path(),
        "[[site]]\nhosts = [\"hi.test\"]\nrespond = \"hello from portunus\\n\"\ntls = \"off\"\n",
    );
    let r = get(p.addr("HTTP").unwrap(), "hi.test", "/").await.unwrap();
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "hello from portunus\n")
    );
    let mode = std::fs::metadata(dir.path().join("storage"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
}

// curl blocks its thread: the echo upstream needs another one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_through_the_proxy() {
    let up = EchoServer::start("curl").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = start(
        dir.path(),
        &format!(
            "[[site]]\nhosts = [\"curl.test\"]\nupstreams = [\"{}\"]\ntls = \"off\"\n",
            up.url()
        ),
    );
    let addr = p.addr("HTTP").unwrap();
    let curl = |host: &str| {
        let out = std::process::Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "10",
                "-w",
                "\n%{http_code}",
                "--resolve",
            ])
            .arg(format!("{host}:{}:127.0.0.1", addr.port()))
            .arg(format!("http://{host}:{}/via/curl?a=b", addr.port()))
            .output()
            .expect("curl is needed: apt-get install curl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let out = curl("curl.test");
    let (body, code) = out.rsplit_once('\n').unwrap();
    assert_eq!(code, "200");
    let doc: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(doc["path"], "/via/curl");
    assert_eq!(doc["headers"]["host"], format!("curl.test:{}", addr.port()));
    assert!(
        doc["headers"]["user-agent"]
            .as_str()
            .unwrap()
            .starts_with("curl/")
    );
    let out = curl("nobody.test");
    assert!(out.ends_with("\n404"), "{out}");
}

/// Raw HTTP/1.1 exchange returning the status code.
async fn raw_status(addr: std::net::SocketAddr, request: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    text.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn admin_api_refuses_foreign_hosts_cross_origin_posts_and_missing_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("portunus.toml");
    std::fs::write(
        &config,
        format!(
            "storage = \"{}\"\n[listen]\nhttp = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n[[site]]\nhosts = [\"a.test\"]\nrespond = \"hi\"\ntls = \"off\"\n",
            dir.path().join("storage").display()
        ),
    )
    .unwrap();
    let p = Portunus::start(&bin(), &config, 2).unwrap();
    let admin = p.addr("admin").unwrap();
    let port = admin.port();
    let get =
        |host: String| format!("GET /status HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    assert_eq!(
        raw_status(admin, &get(format!("127.0.0.1:{port}"))).await,
        200
    );
    assert_eq!(
        raw_status(admin, &get(format!("localhost:{port}"))).await,
        200
    );
    assert_eq!(
        raw_status(admin, &get("evil.example".to_owned())).await,
        403
    );
    assert_eq!(
        raw_status(admin, &get(format!("evil.example:{port}"))).await,
        403
    );
    let post = format!(
        "POST /certs/a.test/renew HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: http://evil.example\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(raw_status(admin, &post).await, 403);
    let post = format!(
        "POST /certs/a.test/renew HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(
        raw_status(admin, &post).await,
        404,
        "no ACME certificate covers a.test"
    );
    let r = get_status_json(admin).await;
    assert_eq!(r["sites"][0]["hosts"][0], "a.test");
    drop(p);

    // With a token.
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "admin = \"127.0.0.1:0\"",
        "admin = \"127.0.0.1:0\"\nadmin_token = \"s3cret\"",
    );
    std::fs::write(&config, text).unwrap();
    let p = Portunus::start(&bin(), &config, 2).unwrap();
    let admin = p.addr("admin").unwrap();
    let host = format!("127.0.0.1:{}", admin.port());
    assert_eq!(raw_status(admin, &get(host.clone())).await, 401);
    let authed = format!(
        "GET /status HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer s3cret\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(raw_status(admin, &authed).await, 200);
    let wrong = format!(
        "GET /status HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer nope\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(raw_status(admin, &wrong).await, 401);
}

async fn get_status_json(admin: std::net::SocketAddr) -> serde_json::Value {
    let r = request(
        admin,
        "GET",
        &admin.to_string(),
        "/status",
        &[],
        Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    r.json()
}

/// The worker threads of `pid` (named `portunus-worker-N`, cut to 15 bytes by Linux) with
/// their on-CPU nanoseconds, by thread id.
fn worker_cpu_ns(pid: u32) -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if !name.starts_with("portunus-worke") {
            continue;
        }
        let ns = std::fs::read_to_string(dir.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        out.insert(dir.file_name().unwrap().to_string_lossy().into_owned(), ns);
    }
    out
}

/// Portunus with three workers, `extra` tables and one site `w.test` on `up`.
fn start_workers(dir: &Path, extra: &str, up: &EchoServer) -> Portunus {
    // `workers` is a top-level key: it goes before [listen].
    let path = dir.join("portunus.toml");
    let text = format!(
        "workers = 3\nstorage = \"{}\"\n[listen]\nhttp = \"127.0.0.1:0\"\n{extra}[[site]]\nhosts = [\"w.test\"]\nupstreams = [\"{}\"]\ntls = \"off\"\n",
        dir.join("storage").display(),
        up.url()
    );
    std::fs::write(&path, text).unwrap();
    Portunus::start(&bin(), &path, 1).unwrap()
}

#[tokio::test]
async fn workers_share_the_listeners_and_each_serves_connections() {
    let up = EchoServer::start("up").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = start_workers(dir.path(), "", &up);
    assert!(p.log().contains("workers=3"), "{}", p.log());
    let addr = p.addr("HTTP").unwrap();
    // A thread names itself once it runs: give them a moment.
    let mut before = worker_cpu_ns(p.pid());
    for _ in 0..100 {
        if before.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        before = worker_cpu_ns(p.pid());
    }
    assert_eq!(before.len(), 2, "worker 0 is the main thread: {before:?}");

    // Many connections (each from its own source port): the kernel spreads them over the
    // three sockets, and every request is served.
    let mut clients = Vec::new();
    for _ in 0..60 {
        clients.push(tokio::spawn(async move {
            for _ in 0..20 {
                let r = get(addr, "w.test", "/x").await.unwrap();
                assert_eq!(r.status, 200);
            }
        }));
    }
    for c in clients {
        c.await.unwrap();
    }
    let after = worker_cpu_ns(p.pid());
    for (tid, ns) in &after {
        let was = before.get(tid).copied().unwrap_or(0);
        assert!(
            *ns > was + 1_000_000,
            "worker thread {tid} served nothing ({was} -> {ns} ns on CPU)"
        );
    }
}

#[tokio::test]
async fn connection_caps_hold_per_listener_across_workers() {
    let up = EchoServer::start("up").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = start_workers(dir.path(), "[limits]\nmax_connections = 2\n", &up);
    let addr = p.addr("HTTP").unwrap();
    let ask = || async move {
        let req = b"GET / HTTP/1.1\r\nHost: w.test\r\nConnection: close\r\n\r\n";
        exchange(addr, req).await.unwrap()
    };
    let _one = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _two = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Whichever worker's socket the kernel hands them to, the listener is full.
    for i in 0..6 {
        assert_eq!(ask().await, "", "connection {i} beyond the cap was served");
    }
    drop(_one);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        ask().await.starts_with("HTTP/1.1 200"),
        "a slot is free again"
    );
}
