//! Limits and hostile clients, over raw sockets against the proxy in process.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use portunus_proxy::{Proxy, ProxySettings, SiteSettings, Timeouts, server_config};
use portunus_store::{CertResolver, LOCAL_LEAF_LIFETIME, LocalCa};
use portunus_test_utils::EchoServer;
use portunus_test_utils::tls::{connect, recording_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use common::Serving;

async fn serve(settings: ProxySettings) -> (SocketAddr, CancellationToken) {
    let serving = Serving::plain(settings).await;
    (serving.addr, serving.stop)
}

/// Sends raw bytes and returns what came back until the peer closed or 5 s passed.
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    portunus_test_utils::exchange(addr, bytes).await.unwrap()
}

fn status_of(reply: &str) -> u16 {
    reply
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn oversized_heads_and_bodies_are_refused_before_the_upstream() {
    let up = EchoServer::start("up").await.unwrap();
    let (addr, _stop) = serve(
        ProxySettings::new()
            .site(
                SiteSettings::new("s", ["a.test"])
                    .upstreams([up.url()])
                    .max_body(1000),
            )
            .max_header_bytes(8 * 1024)
            .max_headers(20),
    )
    .await;
    let big = format!(
        "GET / HTTP/1.1\r\nHost: a.test\r\nX-Big: {}\r\n\r\n",
        "x".repeat(20_000)
    );
    assert_eq!(status_of(&exchange(addr, big.as_bytes()).await), 431);
    let mut many = String::from("GET / HTTP/1.1\r\nHost: a.test\r\n");
    for i in 0..40 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    assert_eq!(status_of(&exchange(addr, many.as_bytes()).await), 431);

    let declared =
        "POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5000\r\nConnection: close\r\n\r\n";
    assert_eq!(status_of(&exchange(addr, declared.as_bytes()).await), 413);
    assert!(
        up.seen().is_empty(),
        "a declared oversize body never reaches the upstream"
    );

    // Chunked, no length announced: cut when it passes the limit.
    let mut chunked = String::from(
        "POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
    );
    for _ in 0..5 {
        chunked.push_str(&format!("1f4\r\n{}\r\n", "y".repeat(500)));
    }
    chunked.push_str("0\r\n\r\n");
    assert_eq!(status_of(&exchange(addr, chunked.as_bytes()).await), 413);

    let fine = "POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 10\r\nConnection: close\r\n\r\n0123456789";
    assert_eq!(status_of(&exchange(addr, fine.as_bytes()).await), 200);
}

#[tokio::test]
async fn a_stalled_request_body_times_out() {
    let up = EchoServer::start("up").await.unwrap();
    let (addr, _stop) = serve(
        ProxySettings::new()
            .site(SiteSettings::new("s", ["a.test"]).upstreams([up.url()]))
            .timeouts(Timeouts::default().body_read(Duration::from_millis(300))),
    )
    .await;
    // Ten of the hundred announced bytes, then nothing.
    let reply = exchange(
        addr,
        b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 100\r\n\r\n0123456789",
    )
    .await;
    assert_eq!(status_of(&reply), 408, "{reply}");
}

#[tokio::test]
async fn a_client_that_stops_reading_is_dropped() {
    let up = EchoServer::start("up").await.unwrap();
    let (addr, _stop) = serve(
        ProxySettings::new()
            .site(SiteSettings::new("s", ["a.test"]).upstreams([up.url()]))
            .timeouts(Timeouts::default().write(Duration::from_millis(300))),
    )
    .await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /bytes?n=200000000 HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    // Do not read: the socket buffers fill and the proxy's writes stall.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut total = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    let read_all = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read_all)
        .await
        .unwrap();
    assert!(
        total < 200_000_000,
        "the proxy gave up on the stalled client ({total} bytes)"
    );
}

/// With connection caps `(total, per_ip)` that two held connections fill, a third is closed
/// unanswered, and served again once one of the two is gone.
async fn two_connections_fill(total: usize, per_ip: usize, why: &str) {
    let up = EchoServer::start("up").await.unwrap();
    let (addr, _stop) = serve(
        ProxySettings::new()
            .site(SiteSettings::new("s", ["a.test"]).upstreams([up.url()]))
            .max_connections(total, per_ip),
    )
    .await;
    let request = b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n";
    let one = TcpStream::connect(addr).await.unwrap();
    let _two = TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        exchange(addr, request).await,
        "",
        "{why}: a third connection is closed unanswered"
    );
    drop(one);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        status_of(&exchange(addr, request).await),
        200,
        "{why}: a slot is free again"
    );
}

#[tokio::test]
async fn connections_per_address_are_limited() {
    two_connections_fill(100, 2, "per address").await;
}

#[tokio::test]
async fn hosts_outside_the_connections_certificate_get_421() {
    let up = EchoServer::start("up").await.unwrap();
    let site = |origin: &str, host: &str| {
        SiteSettings::new(origin, [host])
            .upstreams([up.url()])
            .tls(true)
    };
    let (addr, stop) = tls_serve(
        &["a.test", "b.test", "*.w.test"],
        ProxySettings::new()
            .site(site("a", "a.test"))
            .site(site("b", "b.test"))
            .site(site("w", "*.w.test")),
    )
    .await;

    let ask = |sni: &'static str, host: &'static str| async move {
        let (config, _) = recording_config(&[b"http/1.1"]);
        let mut tls = connect(addr, Some(sni), config).await.unwrap();
        tls.write_all(
            format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = Vec::new();
        let _ = tls.read_to_end(&mut out).await;
        status_of(&String::from_utf8_lossy(&out))
    };
    assert_eq!(ask("a.test", "a.test").await, 200);
    assert_eq!(
        ask("a.test", "b.test").await,
        421,
        "no domain fronting between sites"
    );
    assert_eq!(
        ask("x.w.test", "y.w.test").await,
        200,
        "one certificate covers both"
    );
    assert_eq!(ask("x.w.test", "a.test").await, 421);

    // One connection, requests pipelined: a host found covered once is remembered for the
    // connection, and only that host.
    let (config, _) = recording_config(&[b"http/1.1"]);
    let mut tls = connect(addr, Some("x.w.test"), config).await.unwrap();
    let mut requests = String::new();
    for host in ["y.w.test", "a.test", "Y.W.test", "b.test", "z.w.test"] {
        requests.push_str(&format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n"));
    }
    requests.push_str("GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n");
    tls.write_all(requests.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    let out = String::from_utf8_lossy(&out);
    // Bodies end without a line break: status lines are found by their version.
    let statuses: Vec<u16> = out
        .match_indices("HTTP/1.1 ")
        .map(|(at, _)| status_of(&out[at..]))
        .collect();
    assert_eq!(statuses, [200, 421, 200, 421, 200, 421], "{out}");
    stop.cancel();
}

/// An upstream that accepts and answers with `reply` (raw bytes), then closes.
async fn raw_upstream(reply: &'static [u8]) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(reply).await;
                // Dropped here: a reset or close mid-response.
            });
        }
    });
    url
}

#[tokio::test]
async fn upstream_faults_give_clean_errors_and_nothing_hangs() {
    let truncated = raw_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\npartial").await;
    let garbage = raw_upstream(b"\x00\x01garbage that is not HTTP\r\n\r\n").await;
    let (addr, _stop) = serve(
        ProxySettings::new()
            .site(SiteSettings::new("t", ["trunc.test"]).upstreams([truncated]))
            .site(SiteSettings::new("g", ["garbage.test"]).upstreams([garbage]))
            .site(
                SiteSettings::new("n", ["nxdomain.test"])
                    .upstreams(["http://no-such-host.invalid:80"]),
            ),
    )
    .await;
    // Reset mid-response: the client sees the head, then the connection ends early.
    let reply = exchange(addr, b"GET / HTTP/1.1\r\nHost: trunc.test\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.len() < 1000, "the body was cut, not padded");
    let reply = exchange(
        addr,
        b"GET / HTTP/1.1\r\nHost: garbage.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&reply), 502, "{reply}");
    let reply = exchange(
        addr,
        b"GET / HTTP/1.1\r\nHost: nxdomain.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&reply), 502, "{reply}");
}

#[tokio::test]
async fn smuggling_vectors_and_ambiguous_paths_never_reach_the_upstream_as_sent() {
    let up = EchoServer::start("up").await.unwrap();
    let (addr, _stop) =
        serve(ProxySettings::new().site(SiteSettings::new("s", ["a.test"]).upstreams([up.url()])))
            .await;
    let refused: &[&[u8]] = &[
        b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5x\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : a.test\r\n\r\n",
        b"GET /a/../admin HTTP/1.1\r\nHost: a.test\r\n\r\n",
        b"GET /a/%2e%2e/admin HTTP/1.1\r\nHost: a.test\r\n\r\n",
        b"GET /a%00b HTTP/1.1\r\nHost: a.test\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"GET  / HTTP/1.1\r\nHost: a.test\r\n\r\n",
        b"GET / HTTP/1.1 extra\r\nHost: a.test\r\n\r\n",
        b"GET / HTTP/9.9\r\nHost: a.test\r\n\r\n",
        b"GET /\x00 HTTP/1.1\r\nHost: a.test\r\n\r\n",
    ];
    for vector in refused {
        let reply = exchange(addr, vector).await;
        let status = status_of(&reply);
        let text = String::from_utf8_lossy(vector);
        assert!(
            (400..506).contains(&status) || reply.is_empty(),
            "{text:?}: {reply}"
        );
        if text.contains("gzip") {
            assert_eq!(status, 501, "an unknown transfer coding: {reply}");
        }
    }
    assert!(up.seen().is_empty(), "{:?}", up.seen());

    // Both Transfer-Encoding and Content-Length: chunked wins, the hidden request is not
    // forwarded, and the client connection is closed after the response.
    let body = "0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a.test\r\n\r\n";
    let vector = format!(
        "POST /first HTTP/1.1\r\nHost: a.test\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{body}",
        body.len()
    );
    let reply = exchange(addr, vector.as_bytes()).await;
    assert_eq!(reply.matches("HTTP/1.1 ").count(), 1, "{reply}");
    let seen = up.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].uri, "/first");
    assert!(seen.iter().all(|s| !s.uri.contains("smuggled")));
    assert!(
        !seen[0].headers.contains_key("content-length") || seen[0].headers["content-length"] == "0"
    );
}

/// An HTTPS proxy with one local-CA certificate per name of `names` and every site of
/// `settings` (sites must be TLS sites).
async fn tls_serve(names: &[&str], settings: ProxySettings) -> (SocketAddr, CancellationToken) {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let ca = LocalCa::generate().unwrap();
    let resolver = Arc::new(CertResolver::new());
    for name in names {
        let key = ca
            .issue(&[(*name).to_owned()], LOCAL_LEAF_LIFETIME)
            .unwrap()
            .certified_key(&provider, name)
            .unwrap();
        resolver.insert(name, key);
    }
    let proxy = Proxy::new(settings).unwrap();
    proxy.set_resolver(Arc::clone(&resolver));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = server_config(resolver, provider).unwrap();
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move { proxy.serve_tls(listener, config, s.cancelled_owned()).await });
    (addr, stop)
}

/// An HTTPS proxy for `a.test` in front of `upstream`, with `timeouts`.
async fn tls_proxy_with(upstream: String, timeouts: Timeouts) -> (SocketAddr, CancellationToken) {
    let site = SiteSettings::new("a", ["a.test"])
        .upstreams([upstream])
        .tls(true);
    tls_serve(
        &["a.test"],
        ProxySettings::new().site(site).timeouts(timeouts),
    )
    .await
}

/// An HTTPS proxy for `a.test` in front of `upstream` (500 ms TLS handshake timeout).
async fn tls_proxy(upstream: String) -> (SocketAddr, CancellationToken) {
    tls_proxy_with(
        upstream,
        Timeouts::default().tls_handshake(Duration::from_millis(500)),
    )
    .await
}

async fn h2_client(
    addr: SocketAddr,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let (config, _) = recording_config(&[b"h2"]);
    let tls = connect(addr, Some("a.test"), config).await.unwrap();
    let (client, conn) = h2::client::handshake(tls).await.unwrap();
    (client, tokio::spawn(conn))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_gets_goaway_while_others_are_served() {
    let up = EchoServer::start("up").await.unwrap();
    let (addr, _stop) = tls_proxy(up.url()).await;
    let (mut client, conn) = h2_client(addr).await;
    let mut opened = 0;
    for _ in 0..5000 {
        let Ok(ready) = client.clone().ready().await else {
            break;
        };
        client = ready;
        let req = http::Request::get("https://a.test/slow?ms=2000")
            .body(())
            .unwrap();
        let Ok((_response, mut stream)) = client.send_request(req, false) else {
            break;
        };
        stream.send_reset(h2::Reason::CANCEL);
        opened += 1;
    }
    let ended = tokio::time::timeout(Duration::from_secs(10), conn).await;
    let error = ended
        .expect("the abusive connection is closed")
        .unwrap()
        .unwrap_err();
    // GOAWAY (ENHANCE_YOUR_CALM), or the write that found the connection already closed.
    assert!(
        error.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM)
            || error.is_go_away()
            || error.is_io(),
        "after {opened} resets: {error:?}"
    );
    assert!(
        opened < 5000,
        "the server must cut a client that only resets streams"
    );
    // Meanwhile another client is served.
    h2_get_ok(addr).await;
}

#[tokio::test]
async fn a_silent_tls_client_is_cut_at_the_handshake_timeout() {
    let up = EchoServer::start("up").await.unwrap();
    let (addr, _stop) = tls_proxy(up.url()).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    // Say nothing: the 500 ms handshake timeout closes the connection.
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
}

#[tokio::test]
async fn absolute_form_targets_cannot_reach_unknown_hosts() {
    let up = EchoServer::start("up").await.unwrap();
    let (addr, _stop) =
        serve(ProxySettings::new().site(SiteSettings::new("s", ["a.test"]).upstreams([up.url()])))
            .await;
    let reply = exchange(
        addr,
        b"GET http://169.254.169.254/latest HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&reply), 404, "{reply}");
    let reply = exchange(
        addr,
        b"GET http://a.test/x HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&reply), 200, "{reply}");
    assert_eq!(up.seen().len(), 1);
    assert_eq!(up.seen()[0].uri, "/x");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuation_flood_is_cut_off() {
    let up = EchoServer::start("up").await.unwrap();
    let (addr, _stop) = tls_proxy(up.url()).await;
    let (config, _) = recording_config(&[b"h2"]);
    let tls = connect(addr, Some("a.test"), config).await.unwrap();
    let (reader, mut writer) = tokio::io::split(tls);
    let mut start = h2_preface();
    // HEADERS without END_HEADERS: :method GET, :scheme https, :path /, :authority a.test.
    let mut head = vec![0x82, 0x87, 0x84, 0x41, 6];
    head.extend_from_slice(b"a.test");
    start.extend(h2_frame(0x1, 0x1, 1, &head));
    writer.write_all(&start).await.unwrap();
    // Then CONTINUATION frames of literal headers, never ending.
    let mut block = Vec::new();
    for _ in 0..14 {
        block.extend([0x00, 3]);
        block.extend_from_slice(b"x-a");
        block.extend([0x7f, 0xe9, 0x06]); // value length 1000: 127 + 873 as a varint
        block.extend(std::iter::repeat_n(b'v', 1000));
    }
    let continuation = h2_frame(0x9, 0x0, 1, &block);
    let writing = tokio::spawn(async move {
        let mut sent = 0usize;
        while sent < 32 * 1024 * 1024 {
            if writer.write_all(&continuation).await.is_err() {
                return (sent, true);
            }
            sent += continuation.len();
        }
        (sent, false)
    });
    // The server ends the connection (GOAWAY, then close) long before the flood ends.
    let (received, closed) = read_until_closed(reader).await;
    assert!(closed, "the connection must be closed");
    // ENHANCE_YOUR_CALM (11): the frames are well-formed; their size is what is refused.
    assert_eq!(goaway_and_resets(&received).0, Some(11), "GOAWAY code");
    let (sent, cut) = writing.await.unwrap();
    assert!(
        cut || sent < 32 * 1024 * 1024,
        "sent {sent} bytes of headers"
    );
}

/// Floods a connection with `frame` without reading; returns whether the server bounded it:
/// it closed the connection or stopped taking bytes before `budget` were written.
async fn flood_is_bounded(addr: SocketAddr, frame: Vec<u8>, budget: usize) -> bool {
    let (config, _) = recording_config(&[b"h2"]);
    let tls = connect(addr, Some("a.test"), config).await.unwrap();
    let (_reader, mut writer) = tokio::io::split(tls);
    writer.write_all(&h2_preface()).await.unwrap();
    let batch: Vec<u8> = frame
        .iter()
        .copied()
        .cycle()
        .take(frame.len() * 1000)
        .collect();
    let flood = async {
        let mut sent = 0;
        while sent < budget {
            if writer.write_all(&batch).await.is_err() {
                return true;
            }
            sent += batch.len();
        }
        false
    };
    // Not finishing in time means the server stopped reading: bounded too.
    tokio::time::timeout(Duration::from_secs(10), flood)
        .await
        .unwrap_or(true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_and_settings_floods_are_bounded_and_others_are_served() {
    let up = EchoServer::start("up").await.unwrap();
    let (addr, _stop) = tls_proxy(up.url()).await;
    let ping = vec![0, 0, 8, 0x6, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
    let settings = vec![0, 0, 6, 0x4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100];
    let budget = 200 * 1024 * 1024;
    let (pings, settings) = tokio::join!(
        flood_is_bounded(addr, ping, budget),
        flood_is_bounded(addr, settings, budget)
    );
    assert!(pings, "a PING flood must be bounded");
    assert!(settings, "a SETTINGS flood must be bounded");
    h2_get_ok(addr).await;
}

#[tokio::test]
async fn total_connections_are_limited() {
    two_connections_fill(2, 100, "in all").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http2_connections_are_closed() {
    let up = EchoServer::start("up").await.unwrap();
    let (addr, stop) = tls_proxy_with(
        up.url(),
        Timeouts::default().idle(Duration::from_millis(500)),
    )
    .await;
    let (client, conn) = h2_client(addr).await;
    let mut client = client.ready().await.unwrap();
    let (response, _) = client
        .send_request(
            http::Request::get("https://a.test/").body(()).unwrap(),
            true,
        )
        .unwrap();
    assert_eq!(response.await.unwrap().status(), 200);
    let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(
        ended.is_ok(),
        "an idle HTTP/2 connection is closed (GOAWAY)"
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_of_one_connection_are_answered_independently() {
    // The streams run in their connection's task: a slow one must not hold up the others,
    // and its answer still comes once the upstream gives it.
    let up = EchoServer::start("up").await.unwrap();
    let (addr, _stop) = tls_proxy(up.url()).await;
    let (client, _conn) = h2_client(addr).await;
    let mut client = client.ready().await.unwrap();
    let get = |path: &str| {
        http::Request::get(format!("https://a.test{path}"))
            .body(())
            .unwrap()
    };
    let (slow, _) = client.send_request(get("/slow?ms=1500"), true).unwrap();
    let mut slow = tokio::spawn(slow);
    for _ in 0..3 {
        let mut ready = client.clone().ready().await.unwrap();
        let (fast, _) = ready.send_request(get("/"), true).unwrap();
        assert_eq!(fast.await.unwrap().status(), 200);
        assert!(!slow.is_finished(), "a fast stream waited for the slow one");
    }
    let slow = tokio::time::timeout(Duration::from_secs(10), &mut slow).await;
    assert_eq!(slow.unwrap().unwrap().unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_concurrent_streams_are_capped() {
    let up = EchoServer::start("up").await.unwrap();
    let (addr, _stop) = tls_proxy(up.url()).await;
    let (client, _conn) = h2_client(addr).await;
    let client = client.ready().await.unwrap();
    // The server's SETTINGS arrive with the first exchange; the default cap is 128.
    let mut client = client;
    let (response, _) = client
        .send_request(
            http::Request::get("https://a.test/").body(()).unwrap(),
            true,
        )
        .unwrap();
    assert_eq!(response.await.unwrap().status(), 200);
    assert_eq!(client.current_max_send_streams(), 128);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_you_reset_gets_goaway() {
    // CVE-2025-8671: the client makes the *server* reset streams (here with a WINDOW_UPDATE
    // of zero on each open stream) faster than they complete.
    let up = EchoServer::start("up").await.unwrap();
    let (addr, _stop) = tls_proxy(up.url()).await;
    let (config, _) = recording_config(&[b"h2"]);
    let tls = connect(addr, Some("a.test"), config).await.unwrap();
    let (reader, mut writer) = tokio::io::split(tls);
    let mut out = h2_preface();
    // HEADERS (END_HEADERS, stream stays open): POST /slow, :authority a.test.
    let mut head = vec![0x83, 0x87, 0x04, 5];
    head.extend_from_slice(b"/slow");
    head.extend([0x41, 6]);
    head.extend_from_slice(b"a.test");
    for i in 0..2000u32 {
        let stream = 1 + 2 * i;
        out.extend(h2_frame(0x1, 0x4, stream, &head));
        out.extend(h2_frame(0x8, 0, stream, &[0, 0, 0, 0])); // WINDOW_UPDATE 0: a stream error
    }
    let writing = tokio::spawn(async move {
        let _ = writer.write_all(&out).await;
        writer
    });
    let (received, _) = read_until_closed(reader).await;
    let _ = writing.await;
    let (goaway, resets) = goaway_and_resets(&received);
    // h2 ends the connection: PROTOCOL_ERROR for the first such frame, or ENHANCE_YOUR_CALM
    // once the stream resets it caused pass the limit. Either way the client cannot make
    // the server reset streams without end.
    assert!(matches!(goaway, Some(1 | 11)), "GOAWAY code {goaway:?}");
    assert!(
        resets < 2000,
        "{resets} server-side resets before the connection ended"
    );
}

#[tokio::test]
async fn a_body_that_breaks_midway_aborts_the_upstream_request() {
    let up = EchoServer::start("up").await.unwrap();
    let (addr, _stop) =
        serve(ProxySettings::new().site(SiteSettings::new("s", ["a.test"]).upstreams([up.url()])))
            .await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.write_all(b"zz\r\nbroken\r\n0\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    let reply = String::from_utf8_lossy(&out);
    assert_eq!(status_of(&reply), 400, "{reply}");
    assert!(
        !reply.contains("body_len"),
        "the upstream's answer to a broken body is not relayed"
    );
    // The upstream keeps working for the next client.
    let ok = exchange(
        addr,
        b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&ok), 200);
}

/// One HTTP/2 frame.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend(stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The client preface and an empty SETTINGS frame.
fn h2_preface() -> Vec<u8> {
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(h2_frame(0x4, 0, 0, &[]));
    out
}

/// Walks the frames a server sent: (last GOAWAY error code, RST_STREAM frames).
fn goaway_and_resets(received: &[u8]) -> (Option<u32>, usize) {
    let (mut at, mut goaway, mut resets) = (0, None, 0);
    while at + 9 <= received.len() {
        let len = usize::from(received[at]) << 16
            | usize::from(received[at + 1]) << 8
            | usize::from(received[at + 2]);
        match received[at + 3] {
            0x3 => resets += 1,
            0x7 if at + 9 + 8 <= received.len() => {
                let code = &received[at + 9 + 4..at + 9 + 8];
                goaway = Some(u32::from_be_bytes([code[0], code[1], code[2], code[3]]));
            }
            _ => {}
        }
        at += 9 + len;
    }
    (goaway, resets)
}

/// Everything a server sends until it closes (or 20 s pass).
async fn read_until_closed(mut reader: impl tokio::io::AsyncRead + Unpin) -> (Vec<u8>, bool) {
    let mut received = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        let mut buf = vec![0u8; 16384];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (received, closed)
}

/// A new HTTP/2 client gets 200 for `GET /`.
async fn h2_get_ok(addr: SocketAddr) {
    let (client, _conn) = h2_client(addr).await;
    let mut client = client.ready().await.unwrap();
    let (response, _) = client
        .send_request(
            http::Request::get("https://a.test/").body(()).unwrap(),
            true,
        )
        .unwrap();
    assert_eq!(response.await.unwrap().status(), 200);
}

/// Once the drain time is over, a request still in flight is cut: its connection is closed
/// without an answer and serving ends, long before the upstream would have answered.
#[tokio::test]
async fn in_flight_requests_are_cut_when_the_drain_time_is_over() {
    let up = EchoServer::start("up").await.unwrap();
    let site = SiteSettings::new("a", ["a.test"])
        .upstreams([up.url()])
        .tls(false);
    let settings = ProxySettings::new()
        .site(site)
        .timeouts(Timeouts::default().shutdown(Duration::from_millis(300)));
    let Serving {
        addr, stop, done, ..
    } = Serving::plain(settings).await;

    let mut client = TcpStream::connect(addr).await.unwrap();
    client
        .write_all(b"GET /slow?ms=20000 HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    assert!(
        portunus_test_utils::wait_until(Duration::from_secs(5), || !up.seen().is_empty()).await,
        "the request reaches the upstream"
    );
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), done)
        .await
        .expect("serving ends once the drain time is over, not when the upstream answers")
        .unwrap()
        .unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the client's connection is closed");
    assert!(
        rest.is_empty(),
        "no answer: {}",
        String::from_utf8_lossy(&rest)
    );
}
