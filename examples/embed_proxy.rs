//! Embed `portunus-proxy` in your own program: one site, one upstream, your own runtime and
//! shutdown signal. The upstream here is a tiny hyper server started by the example itself.
//!
//! Run with: `cargo run --example embed_proxy`, then
//! `curl -H 'Host: app.localhost' http://127.0.0.1:8000/hello` (Ctrl-C stops it).

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use portunus_proxy::{Proxy, ProxySettings, SiteSettings};
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // An upstream on a port chosen by the OS.
    let upstream = TcpListener::bind("127.0.0.1:0").await?;
    let upstream_url = format!("http://{}", upstream.local_addr()?);
    tokio::spawn(async move {
        while let Ok((stream, _)) = upstream.accept().await {
            tokio::spawn(async move {
                let service = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    let text = format!("upstream saw {} {}\n", req.method(), req.uri());
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(text))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });

    let settings = ProxySettings::new()
        .site(SiteSettings::new("example", ["app.localhost"]).upstreams([upstream_url]));
    let proxy = Proxy::new(settings)?;
    let listener = TcpListener::bind("127.0.0.1:8000").await?;
    println!("proxying app.localhost on http://127.0.0.1:8000 (Ctrl-C to stop)");
    proxy
        .serve(listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
