//! An in-process proxy round trip: a keep-alive HTTP/1.1 client, the proxy, an upstream, all
//! on loopback in one process. Measures what one request costs end to end.
//!
//! Run with: `cargo bench --bench roundtrip`

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use portunus_proxy::{Proxy, ProxySettings, SiteSettings};
use portunus_test_utils::EchoServer;
use tokio::net::{TcpListener, TcpStream};

fn roundtrip(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (mut sender, _up) = rt.block_on(async {
        let up = EchoServer::start("bench").await.unwrap();
        let proxy = Proxy::new(
            ProxySettings::new()
                .site(SiteSettings::new("bench", ["bench.test"]).upstreams([up.url()])),
        )
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { proxy.serve(listener, std::future::pending()).await });
        let stream = TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        (sender, up)
    });
    c.bench_function("proxy_roundtrip_get", |b| {
        b.iter(|| {
            rt.block_on(async {
                sender.ready().await.unwrap();
                let req = http::Request::get("/")
                    .header("host", "bench.test")
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                let res = sender.send_request(req).await.unwrap();
                black_box(res.into_body().collect().await.unwrap().to_bytes())
            })
        })
    });
}

criterion_group!(benches, roundtrip);
criterion_main!(benches);
