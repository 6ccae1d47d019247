//! ACME challenge answers served by the proxy: tls-alpn-01 only to `acme-tls/1` clients and
//! only while pending, http-01 on plain HTTP.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use portunus_proxy::{Proxy, ProxySettings, SiteSettings, server_config};
use portunus_store::{CertResolver, LOCAL_LEAF_LIFETIME, LocalCa};
use portunus_test_utils::tls::{connect, recording_config};
use portunus_test_utils::{EchoServer, get};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn tls_alpn_01_and_http_01() {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let ca = LocalCa::generate().unwrap();
    let key = |n: &str| {
        ca.issue(&[n.to_owned()], LOCAL_LEAF_LIFETIME)
            .unwrap()
            .certified_key(&provider, n)
            .unwrap()
    };
    let resolver = Arc::new(CertResolver::new());
    resolver.insert("site.test", key("site.test"));
    let up = EchoServer::start("up").await.unwrap();
    let proxy = Proxy::new(
        ProxySettings::new()
            .site(
                SiteSettings::new("s", ["site.test"])
                    .upstreams([up.url()])
                    .tls(true),
            )
            .challenges(Arc::clone(resolver.challenges())),
    )
    .unwrap();
    let stop = CancellationToken::new();
    let tls_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let https = tls_listener.local_addr().unwrap();
    let plain_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = plain_listener.local_addr().unwrap();
    let config = server_config(Arc::clone(&resolver), Arc::clone(&provider)).unwrap();
    {
        let (p, s) = (proxy.clone(), stop.clone());
        tokio::spawn(async move { p.serve_tls(tls_listener, config, s.cancelled_owned()).await });
        let (p, s) = (proxy.clone(), stop.clone());
        tokio::spawn(async move { p.serve(plain_listener, s.cancelled_owned()).await });
    }

    // No challenge pending: an acme-tls/1 client gets nothing, not even the site certificate.
    let (config, recorder) = recording_config(&[b"acme-tls/1"]);
    assert!(connect(https, Some("site.test"), config).await.is_err());
    assert!(recorder.leaf().is_none());

    // Pending: the challenge certificate, then the connection is closed.
    let challenge = key("site.test");
    let challenge_der = challenge.cert[0].clone();
    resolver.challenges().set_tls_alpn01("site.test", challenge);
    let (config, recorder) = recording_config(&[b"acme-tls/1"]);
    let mut stream = connect(https, Some("site.test"), config).await.unwrap();
    assert_eq!(recorder.leaf().unwrap(), challenge_der);
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"acme-tls/1"[..]));
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "closed right after the handshake");
    // Ordinary clients still get the site certificate meanwhile.
    let (config, recorder) = recording_config(&[b"h2", b"http/1.1"]);
    connect(https, Some("site.test"), config).await.unwrap();
    assert_ne!(recorder.leaf().unwrap(), challenge_der);
    resolver.challenges().remove_tls_alpn01("site.test");
    let (config, _) = recording_config(&[b"acme-tls/1"]);
    assert!(connect(https, Some("site.test"), config).await.is_err());

    // http-01 on plain HTTP, not redirected, only while pending.
    resolver
        .challenges()
        .set_http01("tok123", "tok123.thumbprint");
    let r = get(http, "site.test", "/.well-known/acme-challenge/tok123")
        .await
        .unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "tok123.thumbprint"));
    resolver.challenges().remove_http01("tok123");
    let r = get(http, "site.test", "/.well-known/acme-challenge/tok123")
        .await
        .unwrap();
    assert_ne!(r.text(), "tok123.thumbprint");
    assert_eq!(get(http, "site.test", "/").await.unwrap().status, 308);
    stop.cancel();
}
