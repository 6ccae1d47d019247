//! The upstream side of the proxy on the wire, against upstreams that answer with exactly the
//! bytes each test gives them: response framing (RFC 9112 §6.3), informational responses,
//! request body framing, full-duplex streaming, connection reuse.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::Serving;
use portunus_proxy::{ProxySettings, SiteSettings};
use portunus_test_utils::{exchange, read_until, request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What a scripted upstream saw.
#[derive(Default)]
struct Log {
    connections: AtomicUsize,
    /// Every request, raw: head and body bytes as they came.
    requests: Mutex<Vec<String>>,
}

/// An upstream that answers every request on a connection with `reply`, keeping the
/// connection open unless `close` (then it closes after the first answer). A request's end is
/// found from its framing: `Content-Length`, or chunked up to the last chunk.
async fn scripted(reply: &'static [u8], close: bool) -> (String, Arc<Log>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let log = Arc::new(Log::default());
    let seen = Arc::clone(&log);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            seen.connections.fetch_add(1, Ordering::Relaxed);
            let seen = Arc::clone(&seen);
            tokio::spawn(async move {
                while let Some(request) = read_request(&mut s).await {
                    seen.requests.lock().unwrap().push(request);
                    if s.write_all(reply).await.is_err() || close {
                        return;
                    }
                }
            });
        }
    });
    (url, log)
}

/// Reads one request, head and body, as raw text; `None` once the peer has closed.
async fn read_request(s: &mut TcpStream) -> Option<String> {
    let mut got = read_until(s, "\r\n\r\n").await;
    let head_end = got.find("\r\n\r\n")? + 4;
    let head = got[..head_end].to_ascii_lowercase();
    let done = |got: &str| {
        let body = &got[head_end..];
        if head.contains("transfer-encoding: chunked") {
            body.ends_with("0\r\n\r\n")
        } else {
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            body.len() >= length
        }
    };
    let mut buf = [0u8; 4096];
    while !done(&got) {
        let n = s.read(&mut buf).await.ok().filter(|&n| n > 0)?;
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    Some(got)
}

fn site(host: &str, url: &str) -> SiteSettings {
    SiteSettings::new(host, [host]).upstreams([url])
}

#[tokio::test]
async fn responses_are_framed_as_rfc_9112_says() {
    let (informational, _) = scripted(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n\
          HTTP/1.1 200 Fine Thanks\r\nTransfer-Encoding: chunked\r\n\r\n\
          5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
        false,
    )
    .await;
    let (until_close, until_close_log) =
        scripted(b"HTTP/1.1 200 OK\r\n\r\nuntil the upstream closes", true).await;
    let (bad_length, _) = scripted(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello",
        false,
    )
    .await;
    let (both, both_log) = scripted(
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        false,
    )
    .await;
    let (unasked_upgrade, _) = scripted(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
        false,
    )
    .await;
    let (head, head_log) = scripted(
        b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nConnection: keep-alive\r\n\r\n",
        false,
    )
    .await;
    let r = Serving::plain(
        ProxySettings::new()
            .site(site("informational.test", &informational))
            .site(site("close.test", &until_close))
            .site(site("length.test", &bad_length))
            .site(site("both.test", &both))
            .site(site("upgrade.test", &unasked_upgrade))
            .site(site("head.test", &head)),
    )
    .await;

    // 1xx answers are skipped; the reason phrase and the chunked body come through, the
    // trailers are dropped, and the answer ends (hyper would not end it after trailers it may
    // not send).
    let asked = std::time::Instant::now();
    let raw = exchange(
        r.addr,
        b"GET / HTTP/1.1\r\nHost: informational.test\r\nTE: trailers\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    // `exchange` waits 5 s for a connection that is never closed.
    assert!(
        asked.elapsed() < Duration::from_secs(4),
        "the answer never ended"
    );
    assert!(raw.starts_with("HTTP/1.1 200 Fine Thanks\r\n"), "{raw}");
    assert!(
        !raw.contains("100 Continue") && !raw.contains("103"),
        "{raw}"
    );
    assert!(raw.contains("hello") && raw.contains(" world"), "{raw}");
    assert!(
        raw.ends_with("\r\n0\r\n\r\n") && !raw.contains("X-Trailer"),
        "{raw}"
    );

    // A body that runs until the upstream closes: whole, and that connection not reused.
    for _ in 0..2 {
        let reply = request(r.addr, "GET", "close.test", "/", &[], Bytes::new())
            .await
            .unwrap();
        assert_eq!(&reply.body[..], b"until the upstream closes");
    }
    assert_eq!(until_close_log.connections.load(Ordering::Relaxed), 2);

    // Conflicting lengths, an upgrade nobody asked for: 502.
    for host in ["length.test", "upgrade.test"] {
        let reply = request(r.addr, "GET", host, "/", &[], Bytes::new())
            .await
            .unwrap();
        assert_eq!(reply.status, 502, "{host}");
    }

    // Transfer-Encoding wins over Content-Length, and that connection is not trusted again.
    for _ in 0..2 {
        let reply = request(r.addr, "GET", "both.test", "/", &[], Bytes::new())
            .await
            .unwrap();
        assert_eq!((reply.status, &reply.body[..]), (200, &b"ok"[..]));
        assert!(!reply.headers.contains_key("content-length"));
    }
    assert_eq!(both_log.connections.load(Ordering::Relaxed), 2);

    // A HEAD answer has no body whatever its length says; its connection carries the next.
    for _ in 0..3 {
        let reply = request(r.addr, "HEAD", "head.test", "/", &[], Bytes::new())
            .await
            .unwrap();
        assert_eq!(reply.status, 200);
        assert_eq!(reply.headers["content-length"], "1000");
    }
    assert_eq!(head_log.connections.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn request_bodies_are_framed_for_the_upstream() {
    let (url, log) = scripted(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", false).await;
    let r = Serving::plain(ProxySettings::new().site(site("a.test", &url))).await;
    // Chunked from the client: chunked upstream, the same bytes.
    let raw = exchange(
        r.addr,
        b"POST /c HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
          3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    // With a length: that length, the same bytes.
    let reply = request(
        r.addr,
        "PUT",
        "a.test",
        "/l",
        &[],
        Bytes::from_static(b"12345"),
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 200);
    // Cookies sent in several fields arrive in one.
    let reply = request(
        r.addr,
        "GET",
        "a.test",
        "/k",
        &[("cookie", "a=1"), ("cookie", "b=2")],
        Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 200);

    let requests = log.requests.lock().unwrap().clone();
    let [chunked, length, cookies] = &requests[..] else {
        panic!("{requests:?}");
    };
    let chunked = chunked.to_ascii_lowercase();
    assert!(chunked.starts_with("post /c http/1.1\r\n"), "{chunked}");
    assert!(
        chunked.contains("\r\ntransfer-encoding: chunked\r\n"),
        "{chunked}"
    );
    let body = &chunked[chunked.find("\r\n\r\n").unwrap() + 4..];
    assert_eq!(decode_chunked(body), "abcdefg");
    let length = length.to_ascii_lowercase();
    assert!(length.contains("\r\ncontent-length: 5\r\n"), "{length}");
    assert!(!length.contains("transfer-encoding"), "{length}");
    assert!(length.ends_with("\r\n\r\n12345"), "{length}");
    assert!(
        cookies
            .to_ascii_lowercase()
            .contains("\r\ncookie: a=1; b=2\r\n"),
        "{cookies}"
    );
}

/// The data of a chunked body (test input only: well formed).
fn decode_chunked(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").unwrap();
        let size = usize::from_str_radix(size.split(';').next().unwrap(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
}

/// An upstream that starts its answer at once and echoes each chunk of the request body as
/// it arrives, ending its answer when the request body ends: it needs both directions at once.
async fn echo_as_it_reads() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let head = read_until(&mut s, "\r\n\r\n").await;
                let Some(end) = head.find("\r\n\r\n") else {
                    return;
                };
                let mut pending = head.as_bytes()[end + 4..].to_vec();
                if !head
                    .to_ascii_lowercase()
                    .contains("transfer-encoding: chunked")
                {
                    // No body (the proxy sends an empty one with a length of 0).
                    pending = b"0\r\n\r\n".to_vec();
                }
                s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                    .await
                    .unwrap();
                let mut buf = [0u8; 4096];
                loop {
                    // Echo whole chunks as they come (the framing is passed through).
                    while let Some(line) = pending.windows(2).position(|w| w == b"\r\n") {
                        let size = std::str::from_utf8(&pending[..line]).unwrap();
                        let size = usize::from_str_radix(size, 16).unwrap();
                        let whole = line + 2 + size + 2;
                        if pending.len() < whole {
                            break;
                        }
                        let chunk: Vec<u8> = pending.drain(..whole).collect();
                        s.write_all(&chunk).await.unwrap();
                        if size == 0 {
                            return;
                        }
                    }
                    match s.read(&mut buf).await {
                        Ok(n) if n > 0 => pending.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
            });
        }
    });
    url
}

/// Sends a request with a chunked body through the proxy at `addr` to [`echo_as_it_reads`],
/// its head carrying `headers`, in three pieces: the first two each come back before the
/// next is sent. Returns the connection once the last piece (the body's end) is sent.
async fn streamed_exchange(addr: SocketAddr, headers: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST / HTTP/1.1\r\nHost: a.test\r\n{headers}Transfer-Encoding: chunked\r\n\r\n\
         5\r\nfirst\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    // The first chunk comes back before the client has sent the rest.
    let got = read_until(&mut s, "first").await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(got.contains("first"), "{got}");
    s.write_all(b"6\r\nsecond\r\n").await.unwrap();
    assert!(read_until(&mut s, "second").await.contains("second"));
    s.write_all(b"0\r\n\r\n").await.unwrap();
    s
}

#[tokio::test]
async fn an_answer_streams_while_the_request_body_is_still_being_sent() {
    let url = echo_as_it_reads().await;
    let r = Serving::plain(ProxySettings::new().site(site("a.test", &url))).await;
    let mut s = streamed_exchange(r.addr, "").await;
    let rest = read_until(&mut s, "0\r\n\r\n").await;
    assert!(
        rest.ends_with("0\r\n\r\n"),
        "the answer ends with the request: {rest:?}"
    );
    // And the client connection carries the next request (with an empty body, which goes
    // upstream as `Content-Length: 0`).
    s.write_all(b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        .await
        .unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), read_until(&mut s, "0\r\n\r\n"))
        .await
        .unwrap();
    assert!(
        next.starts_with("HTTP/1.1 200") && next.ends_with("0\r\n\r\n"),
        "{next}"
    );
}

#[tokio::test]
async fn an_answer_to_a_request_that_closes_the_connection_streams_too() {
    // Its end (and only its end) waits for the FIN: what comes before goes out at once.
    let url = echo_as_it_reads().await;
    let r = Serving::plain(ProxySettings::new().site(site("a.test", &url))).await;
    let mut s = streamed_exchange(r.addr, "Connection: close\r\n").await;
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("the connection ends with the answer")
        .unwrap();
    assert!(rest.ends_with(b"0\r\n\r\n"), "{rest:?}");
}

#[tokio::test]
async fn an_upstream_that_answers_before_reading_the_body_is_heard() {
    // Answers 413 right after the head, then reads and drops the rest until the client stops
    // sending (as nginx's lingering close does), and closes.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = read_until(&mut s, "\r\n\r\n").await;
                let _ = s
                    .write_all(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\n\r\nbig!")
                    .await;
                let mut sink = [0u8; 65536];
                while let Ok(Ok(n)) =
                    tokio::time::timeout(Duration::from_secs(2), s.read(&mut sink)).await
                {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
    let r = Serving::plain(ProxySettings::new().site(site("a.test", &url))).await;
    // 4 MiB: far more than the socket buffers hold, so the answer comes mid-body.
    let body = Bytes::from(vec![b'x'; 4 << 20]);
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        request(r.addr, "POST", "a.test", "/", &[], body),
    )
    .await
    .expect("no hang")
    .unwrap();
    assert_eq!((reply.status, &reply.body[..]), (413, &b"big!"[..]));
}
