//! The proxy in process, through its public API: real upstreams on loopback, real clients.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use portunus_proxy::{
    Handler, LoadBalancing, Proxy, ProxySettings, RouteSettings, SiteSettings, Timeouts,
};
use portunus_test_utils::{EchoServer, get, read_until, request, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

struct Running {
    addr: SocketAddr,
    proxy: Proxy,
    stop: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn serve(settings: ProxySettings) -> Running {
    let proxy = Proxy::new(settings).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let (p, s) = (proxy.clone(), stop.clone());
    tokio::spawn(async move { p.serve(listener, s.cancelled_owned()).await });
    Running { addr, proxy, stop }
}

fn site(host: &str, upstreams: &[String]) -> SiteSettings {
    SiteSettings::new(format!("test {host}"), [host]).upstreams(upstreams.iter().cloned())
}

/// Reads until EOF or `limit`; returns whether the peer closed the connection in time.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test]
async fn slow_request_head_is_cut_off() {
    let up = EchoServer::start("up").await.unwrap();
    let r = serve(
        ProxySettings::new()
            .site(site("a.test", &[up.url()]))
            .timeouts(Timeouts::default().header_read(Duration::from_millis(300))),
    )
    .await;
    let mut s = TcpStream::connect(r.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a.te").await.unwrap();
    assert!(
        closed_within(&mut s, Duration::from_secs(3)).await,
        "slowloris must be cut"
    );
    assert!(up.seen().is_empty());
}

#[tokio::test]
async fn idle_keep_alive_is_closed_but_header_timeout_does_not_cap_it() {
    let up = EchoServer::start("up").await.unwrap();
    // idle longer than header_read: a keep-alive connection outlives header_read.
    let r = serve(
        ProxySettings::new()
            .site(site("a.test", &[up.url()]))
            .timeouts(
                Timeouts::default()
                    .header_read(Duration::from_millis(200))
                    .idle(Duration::from_millis(1500)),
            ),
    )
    .await;
    let stream = TcpStream::connect(r.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let send = |sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>| {
        let req = http::Request::get("/")
            .header("host", "a.test")
            .body(Empty::new())
            .unwrap();
        sender.send_request(req)
    };
    let res = send(&mut sender).await.unwrap();
    assert_eq!(res.status(), 200);
    res.into_body().collect().await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let res = send(&mut sender).await.unwrap();
    assert_eq!(res.status(), 200, "still open after 3x header_read");
    res.into_body().collect().await.unwrap();
    // Now idle: the proxy closes it within about `idle`.
    let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(ended.is_ok(), "idle connection must be closed");
}

#[tokio::test]
async fn least_conn_avoids_the_busy_upstream() {
    let a = EchoServer::start("a").await.unwrap();
    let b = EchoServer::start("b").await.unwrap();
    let r = serve(
        ProxySettings::new()
            .site(site("lc.test", &[a.url(), b.url()]).lb(LoadBalancing::LeastConn)),
    )
    .await;
    let addr = r.addr;
    let slow = tokio::spawn(async move { get(addr, "lc.test", "/slow?ms=1500").await });
    assert!(
        wait_until(Duration::from_secs(5), || a.seen().len() + b.seen().len()
            == 1)
        .await
    );
    let busy = if a.seen().is_empty() { "b" } else { "a" };
    for _ in 0..6 {
        let reply = get(addr, "lc.test", "/").await.unwrap();
        assert_ne!(
            reply.json()["server"],
            busy,
            "least_conn must skip the busy upstream"
        );
    }
    assert_eq!(slow.await.unwrap().unwrap().status, 200);
}

#[tokio::test]
async fn timed_out_upstream_is_left_out_of_the_pool() {
    // An upstream that accepts connections and never answers.
    let blackhole = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hole_url = format!("http://{}", blackhole.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    {
        let accepted = Arc::clone(&accepted);
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = blackhole.accept().await {
                accepted.fetch_add(1, Ordering::Relaxed);
                held.push(s);
            }
        });
    }
    let good = EchoServer::start("good").await.unwrap();
    let r = serve(
        ProxySettings::new()
            .site(site("h.test", &[hole_url, good.url()]))
            .timeouts(Timeouts::default().response_header(Duration::from_millis(300)))
            .unhealthy_for(Duration::from_secs(60)),
    )
    .await;
    let mut statuses = Vec::new();
    for _ in 0..8 {
        statuses.push(get(r.addr, "h.test", "/").await.unwrap().status);
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 504).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        7,
        "{statuses:?}"
    );
    assert_eq!(
        accepted.load(Ordering::Relaxed),
        1,
        "the failed upstream was not tried again"
    );
}

#[tokio::test]
async fn update_swaps_sites_without_closing_connections() {
    let a = EchoServer::start("a").await.unwrap();
    let b = EchoServer::start("b").await.unwrap();
    let r = serve(ProxySettings::new().site(site("a.test", &[a.url()]))).await;
    let stream = TcpStream::connect(r.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut ask = async |host: &str| {
        let req = http::Request::get("/")
            .header("host", host)
            .body(Empty::<Bytes>::new())
            .unwrap();
        let res = sender.send_request(req).await.unwrap();
        let status = res.status().as_u16();
        res.into_body().collect().await.unwrap();
        status
    };
    assert_eq!(ask("a.test").await, 200);
    assert_eq!(ask("b.test").await, 404);
    r.proxy
        .update(
            &ProxySettings::new()
                .site(site("a.test", &[a.url()]))
                .site(site("b.test", &[b.url()])),
        )
        .unwrap();
    assert_eq!(ask("b.test").await, 200, "same connection, new table");
    assert_eq!(b.seen().len(), 1);
}

#[tokio::test]
async fn respond_routes_and_errors() {
    let up = EchoServer::start("up").await.unwrap();
    let r = serve(
        ProxySettings::new()
            .site(
                SiteSettings::new("s", ["r.test"])
                    .handler(Handler::Respond {
                        status: http::StatusCode::SERVICE_UNAVAILABLE,
                        body: "maintenance\n".into(),
                    })
                    .route(RouteSettings::new(
                        "/api",
                        Handler::Upstreams(vec![up.url()]),
                    )),
            )
            .site(SiteSettings::new("t", ["only.test"]).route(
                RouteSettings::new("/x", Handler::Upstreams(vec![up.url()])).strip_prefix(true),
            )),
    )
    .await;
    let reply = get(r.addr, "r.test", "/").await.unwrap();
    assert_eq!(
        (reply.status, reply.text().as_str()),
        (503, "maintenance\n")
    );
    assert_eq!(
        get(r.addr, "r.test", "/api/v").await.unwrap().json()["path"],
        "/api/v"
    );
    assert_eq!(
        get(r.addr, "only.test", "/x/y").await.unwrap().json()["path"],
        "/y"
    );
    let miss = get(r.addr, "only.test", "/y").await.unwrap();
    assert_eq!(miss.status, 404);
    assert!(miss.text().contains("no route"), "{}", miss.text());
}

#[tokio::test]
async fn invalid_settings_are_refused() {
    let err = Proxy::new(
        ProxySettings::new()
            .site(site("a.test", &["ftp://x".to_owned()]))
            .site(SiteSettings::new("empty", ["b.test"]).upstreams(Vec::<String>::new())),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("invalid upstream `ftp://x`"),
        "{err}"
    );
    let err = Proxy::new(
        ProxySettings::new()
            .site(site("a.test", &["http://x".to_owned()]))
            .site(site("A.test", &["http://y".to_owned()])),
    )
    .unwrap_err();
    let text = format!("{err}: {}", std::error::Error::source(&err).unwrap());
    assert!(
        text.contains("test a.test") && text.contains("test A.test"),
        "{text}"
    );
}

#[tokio::test]
async fn one_upstream_connection_carries_every_kind_of_exchange_in_turn() {
    let up = EchoServer::start("up").await.unwrap();
    let r = serve(ProxySettings::new().site(site("a.test", &[up.url()]))).await;
    // A sized body, no body at all (HEAD), a chunked body of many frames, a request body.
    let plain = get(r.addr, "a.test", "/").await.unwrap();
    assert_eq!(plain.status, 200);
    let head = request(r.addr, "HEAD", "a.test", "/", &[], Bytes::new())
        .await
        .unwrap();
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    let chunked = get(r.addr, "a.test", "/bytes?n=300000").await.unwrap();
    assert_eq!(chunked.body.len(), 300_000);
    let posted = request(
        r.addr,
        "POST",
        "a.test",
        "/p",
        &[],
        Bytes::from(vec![b'x'; 70_000]),
    )
    .await
    .unwrap();
    assert_eq!(posted.json()["body_len"], 70_000);
    let again = get(r.addr, "a.test", "/last").await.unwrap();
    assert_eq!(again.json()["path"], "/last");
    assert_eq!(up.seen().len(), 5);
    // Each went back to the pool as soon as its response was complete.
    assert_eq!(up.accepted_connections(), 1);
}

/// Reads one request (its head, then as many body bytes as it declares); false at EOF.
async fn read_request(s: &mut TcpStream) -> bool {
    let got = read_until(s, "\r\n\r\n").await;
    let Some(body_start) = got.find("\r\n\r\n").map(|i| i + 4) else {
        return false;
    };
    let length: usize = got[..body_start]
        .to_ascii_lowercase()
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    let mut rest = vec![0u8; (body_start + length).saturating_sub(got.len())];
    s.read_exact(&mut rest).await.is_ok()
}

/// An upstream that answers one request per connection and then closes it without saying
/// so (no `Connection: close`): at once, or (`on_next_request`) only when the next request
/// has arrived, which it never answers, as when a keep-alive timeout strikes just as the
/// connection is reused. Counts the requests it saw.
async fn one_shot_upstream(on_next_request: bool) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&requests);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let count = Arc::clone(&count);
            tokio::spawn(async move {
                if !read_request(&mut s).await {
                    return;
                }
                count.fetch_add(1, Ordering::Relaxed);
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await;
                if on_next_request && read_request(&mut s).await {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    (addr, requests)
}

#[tokio::test]
async fn an_upstream_that_closes_after_each_answer_still_serves_every_request() {
    let (up, requests) = one_shot_upstream(false).await;
    let r = serve(ProxySettings::new().site(site("a.test", &[format!("http://{up}")]))).await;
    for i in 0..20 {
        let reply = if i % 2 == 0 {
            get(r.addr, "a.test", "/").await.unwrap()
        } else {
            request(
                r.addr,
                "POST",
                "a.test",
                "/p",
                &[],
                Bytes::from_static(b"data"),
            )
            .await
            .unwrap()
        };
        assert_eq!(
            (reply.status, &reply.body[..]),
            (200, &b"ok"[..]),
            "request {i}"
        );
    }
    assert_eq!(requests.load(Ordering::Relaxed), 20);
}

#[tokio::test]
async fn a_request_lost_on_a_long_idle_connection_is_sent_again_only_if_safe() {
    let (up, requests) = one_shot_upstream(true).await;
    let r = serve(ProxySettings::new().site(site("a.test", &[format!("http://{up}")]))).await;
    let first = get(r.addr, "a.test", "/1").await.unwrap();
    assert_eq!(first.status, 200);
    // The connection has been idle a while when the next request takes it; the upstream
    // reads that request and closes without an answer. A GET is safe to send again.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let again = get(r.addr, "a.test", "/2").await.unwrap();
    assert_eq!((again.status, &again.body[..]), (200, &b"ok"[..]));
    assert_eq!(requests.load(Ordering::Relaxed), 3, "/1, /2 lost, /2 again");
    // A POST may have been acted on: it is not sent twice.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let post = request(
        r.addr,
        "POST",
        "a.test",
        "/3",
        &[],
        Bytes::from_static(b"x"),
    )
    .await
    .unwrap();
    assert_eq!(post.status, 502);
    assert_eq!(requests.load(Ordering::Relaxed), 4);
}

#[tokio::test]
async fn an_upstream_connection_left_mid_body_is_not_reused() {
    let up = EchoServer::start("up").await.unwrap();
    let r = serve(ProxySettings::new().site(site("a.test", &[up.url()]))).await;
    // The client reads the head of a large response and goes away.
    let mut s = TcpStream::connect(r.addr).await.unwrap();
    s.write_all(b"GET /bytes?n=50000000 HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    drop(s);
    // The next request gets a whole, correct answer on a fresh connection, never the rest
    // of the abandoned body.
    for i in 0..3 {
        let reply = get(r.addr, "a.test", &format!("/after{i}")).await.unwrap();
        assert_eq!(reply.status, 200);
        assert_eq!(reply.json()["path"], format!("/after{i}"));
    }
    assert_eq!(up.accepted_connections(), 2);
}

#[tokio::test]
async fn upstream_connections_of_a_burst_are_kept_for_the_next_one() {
    let up = EchoServer::start("up").await.unwrap();
    let r = serve(ProxySettings::new().site(site("a.test", &[up.url()]))).await;
    // 100 requests at once, each holding its upstream connection for a while, twice.
    for round in 1..=2 {
        let burst: Vec<_> = (0..100)
            .map(|_| tokio::spawn(get(r.addr, "a.test", "/slow?ms=300")))
            .collect();
        for request in burst {
            assert_eq!(request.await.unwrap().unwrap().status, 200);
        }
        assert_eq!(up.seen().len(), 100 * round);
    }
    // The second burst reused the first one's connections instead of opening new ones.
    assert_eq!(up.accepted_connections(), 100);
}
