//! Header work per forwarded request, as the proxy does it: a request's hop-by-hop removal,
//! `Host`, `X-Forwarded-*` and `Forwarded`, and the head encoded for its upstream; an upstream
//! response head parsed (hop-by-hop fields left out).
//!
//! Run with: `cargo bench --bench headers`

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderName, HeaderValue};
use portunus_proxy::bench::{HeaderRewriter, parse_response};

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    map
}

const BROWSER: &[(&str, &str)] = &[
    ("host", "app.example.com"),
    (
        "user-agent",
        "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
    ),
    (
        "accept",
        "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
    ),
    ("accept-language", "en-US,en;q=0.5"),
    ("accept-encoding", "gzip, deflate, br, zstd"),
    ("cookie", "session=0123456789abcdef; theme=dark"),
    ("connection", "keep-alive"),
];

const SPOOFED: &[(&str, &str)] = &[
    ("host", "app.example.com"),
    ("user-agent", "curl/8.0"),
    ("x-forwarded-for", "6.6.6.6"),
    ("x-real-ip", "6.6.6.6"),
    ("x-forwarded-host", "evil.test"),
    ("forwarded", "for=6.6.6.6"),
];

const FROM_PROXY: &[(&str, &str)] = &[
    ("host", "app.example.com"),
    ("user-agent", "curl/8.0"),
    ("x-forwarded-for", "203.0.113.9, 10.1.1.1"),
    ("x-forwarded-proto", "https"),
    ("forwarded", "for=203.0.113.9"),
];

/// nginx's answer in the peer benchmarks.
const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\n\
    Date: Sun, 29 Nov 2026 08:00:00 GMT\r\nContent-Type: text/plain\r\nContent-Length: 6\r\n\
    Last-Modified: Sun, 29 Nov 2026 07:00:00 GMT\r\nConnection: keep-alive\r\n\
    ETag: \"6760a1c0-6\"\r\nAccept-Ranges: bytes\r\n\r\n";

fn rewriting(c: &mut Criterion) {
    let nets = vec!["10.0.0.0/8".parse().unwrap()];
    let client = HeaderRewriter::new([192, 0, 2, 7].into(), 443, true, nets.clone());
    let proxy = HeaderRewriter::new([10, 0, 0, 2].into(), 443, true, nets);
    let mut group = c.benchmark_group("header_rewrite");
    for (name, rewriter, template) in [
        ("browser_request", &client, headers(BROWSER)),
        ("spoofed_request", &client, headers(SPOOFED)),
        ("trusted_proxy_chain", &proxy, headers(FROM_PROXY)),
    ] {
        group.bench_function(name, |b| {
            b.iter_batched_ref(
                || template.clone(),
                |h| {
                    assert!(
                        rewriter
                            .request_head(black_box(h), "app.example.com")
                            .is_some()
                    )
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.bench_function("upstream_response", |b| {
        b.iter(|| assert_eq!(parse_response(black_box(RESPONSE)), Some(7)))
    });
    group.finish();
}

criterion_group!(benches, rewriting);
criterion_main!(benches);
