//! Client connections over their life: a keep-alive connection that has been quiet for a
//! second (few connections open, as here) gives its buffers back (it is parked) and is taken
//! up again when its client sends, over plain TCP and TLS, with bodies, pipelined heads and
//! WebSocket upgrades; a connection whose request asks to close it gets its whole answer and
//! a clean end.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::Serving;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use portunus_proxy::{ProxySettings, SiteSettings};
use portunus_test_utils::{EchoServer, read_until, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

/// A proxy for `a.test` in front of `upstream`, over TLS (a local-CA certificate) or not.
async fn serve(upstream: &EchoServer, tls: bool) -> Serving {
    let site = SiteSettings::new("a", ["a.test"])
        .upstreams([upstream.url()])
        .tls(tls);
    let settings = ProxySettings::new().site(site);
    if tls {
        Serving::tls(settings, "a.test").await
    } else {
        Serving::plain(settings).await
    }
}

fn request(method: &str, host: &str, path: &str, body: &'static str) -> http::Request<Full<Bytes>> {
    http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", host)
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

async fn json(res: http::Response<hyper::body::Incoming>) -> serde_json::Value {
    assert_eq!(res.status(), 200);
    serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap()
}

/// One keep-alive connection through quiet spells: a GET, parked; a POST with a body,
/// parked again; a WebSocket upgrade, never parked while it tunnels.
async fn quiet_session(served: &Serving, upstream: &EchoServer) {
    let parked_soon = || wait_until(Duration::from_secs(5), || served.parked() == 1);
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(
        served.connect().await,
    ))
    .await
    .unwrap();
    tokio::spawn(conn.with_upgrades());
    let request = |method, path, body| request(method, "a.test", path, body);

    let doc = json(
        sender
            .send_request(request("GET", "/first", ""))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(doc["path"], "/first");
    assert!(parked_soon().await, "a quiet connection is parked");

    let doc = json(
        sender
            .send_request(request("POST", "/second", "a body after parking"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(doc["body_len"], 20);
    assert_eq!(served.parked(), 0, "taken up again by its request");
    assert!(parked_soon().await, "parked again after a body");

    let mut upgrade = request("GET", "/ws", "");
    for (name, value) in [
        ("connection", "upgrade"),
        ("upgrade", "websocket"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ] {
        upgrade
            .headers_mut()
            .insert(name, http::HeaderValue::from_static(value));
    }
    let res = sender.send_request(upgrade).await.unwrap();
    assert_eq!(res.status(), 101);
    let upgraded = hyper::upgrade::on(res).await.unwrap();
    let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await;
    for round in 0..2 {
        let text = format!("round {round}");
        ws.send(Message::text(text.clone())).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text(text));
        // Quiet for longer than the park delay (1 s with few connections), but a tunnel:
        // not parked.
        tokio::time::sleep(Duration::from_millis(1300)).await;
        assert_eq!(served.parked(), 0, "a tunnel is never parked");
    }
    assert_eq!(upstream.seen().len(), 3);
}

#[tokio::test]
async fn quiet_connections_are_parked_and_taken_up_again() {
    let up = EchoServer::start("up").await.unwrap();
    let served = serve(&up, false).await;
    quiet_session(&served, &up).await;
}

#[tokio::test]
async fn quiet_tls_connections_are_parked_and_taken_up_again() {
    let up = EchoServer::start("up").await.unwrap();
    let served = serve(&up, true).await;
    quiet_session(&served, &up).await;
}

/// Writes `bytes` on `s` and reads until `until` has come back.
async fn send(s: &mut TcpStream, bytes: &[u8], until: &str) -> String {
    s.write_all(bytes).await.unwrap();
    read_until(s, until).await
}

#[tokio::test]
async fn a_pipelined_head_cut_by_a_quiet_spell_is_kept() {
    let up = EchoServer::start("up").await.unwrap();
    let served = serve(&up, false).await;
    let mut s = TcpStream::connect(served.addr).await.unwrap();
    let pipelined = b"GET /one HTTP/1.1\r\nHost: a.test\r\n\r\nGET /two HTTP/1.1\r\nHost: a.t";
    let first = send(&mut s, pipelined, "\"/one\"").await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    // Longer than the park delay (1 s with few connections): hyper hands back the half head
    // with the socket.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let second = send(&mut s, b"est\r\n\r\n", "\"/two\"").await;
    assert!(second.starts_with("HTTP/1.1 200"), "{second}");
    assert_eq!(up.seen().len(), 2);
}

#[tokio::test]
async fn parked_connections_close_at_once_on_shutdown() {
    let up = EchoServer::start("up").await.unwrap();
    let served = serve(&up, false).await;
    let mut s = TcpStream::connect(served.addr).await.unwrap();
    let reply = send(
        &mut s,
        b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n",
        "\"server\"",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(wait_until(Duration::from_secs(5), || served.parked() == 1).await);
    served.stop.cancel();
    // The default drain time is far longer: a parked connection does not wait for it.
    tokio::time::timeout(Duration::from_secs(3), served.done)
        .await
        .expect("serving ends without waiting out the drain time")
        .unwrap()
        .unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(1), s.read_to_end(&mut rest)).await;
    assert!(matches!(closed, Ok(Ok(0))), "closed cleanly: {closed:?}");
}

#[tokio::test]
async fn a_connection_is_parked_after_a_slow_request_too() {
    let up = EchoServer::start("up").await.unwrap();
    let served = serve(&up, false).await;
    let mut s = TcpStream::connect(served.addr).await.unwrap();
    // Silent for longer than the park delay while the upstream thinks.
    let slow = b"GET /slow?ms=1500 HTTP/1.1\r\nHost: a.test\r\n\r\n";
    let reply = send(&mut s, slow, "\"/slow\"").await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(wait_until(Duration::from_secs(5), || served.parked() == 1).await);
}

#[tokio::test]
async fn a_body_answered_unread_does_not_keep_the_connection_from_parking() {
    let up = EchoServer::start("up").await.unwrap();
    let served = serve(&up, false).await;
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(
        served.connect().await,
    ))
    .await
    .unwrap();
    tokio::spawn(conn);
    let request = |method, host, body| request(method, host, "/", body);
    // No site for this host: answered without reading the body (hyper drains it).
    let res = sender
        .send_request(request("POST", "nobody.test", "an unread body"))
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    res.into_body().collect().await.unwrap();
    // The next request on the connection shows the body is behind it.
    let doc = json(
        sender
            .send_request(request("GET", "a.test", ""))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(doc["path"], "/");
    assert!(wait_until(Duration::from_secs(5), || served.parked() == 1).await);
}

/// Sends `request` (which asks to close the connection) and reads to the end of the stream:
/// the whole answer, then, over TLS, a `close_notify` (without it the TLS client reports an
/// error), then the FIN.
async fn answered_then_closed(served: &Serving, request: &str) -> String {
    let mut s = served.connect().await;
    s.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got))
        .await
        .expect("the connection ends after the answer")
        .expect("and ends cleanly");
    String::from_utf8(got).unwrap()
}

#[tokio::test]
async fn a_last_answer_arrives_whole_and_the_connection_ends_cleanly() {
    let up = EchoServer::start("up").await.unwrap();
    for tls in [false, true] {
        let served = serve(&up, tls).await;
        for (request, path) in [
            (
                "GET /close HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
                "/close",
            ),
            ("GET /old HTTP/1.0\r\nHost: a.test\r\n\r\n", "/old"),
        ] {
            let got = answered_then_closed(&served, request).await;
            assert!(got.contains(" 200 OK\r\n"), "tls {tls}: {got}");
            let body = &got[got.find("\r\n\r\n").unwrap() + 4..];
            let doc: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(doc["path"], path, "tls {tls}");
        }
    }
}

#[tokio::test]
async fn an_http_1_0_client_that_asks_for_keep_alive_keeps_its_connection() {
    let up = EchoServer::start("up").await.unwrap();
    for tls in [false, true] {
        let served = serve(&up, tls).await;
        let mut s = served.connect().await;
        for path in ["/one", "/two"] {
            let request =
                format!("GET {path} HTTP/1.0\r\nHost: a.test\r\nConnection: keep-alive\r\n\r\n");
            s.write_all(request.as_bytes()).await.unwrap();
            let got = read_until(&mut s, &format!("\"path\":\"{path}\"")).await;
            assert!(
                got.contains(path),
                "tls {tls}: the answer to {path} in {got:?}"
            );
        }
    }
}
