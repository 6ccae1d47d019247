//! Router lookups at 100, 10,000 and 100,000 hosts: the cost must stay flat as the table grows.
//!
//! Run with: `cargo bench --bench router`

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use portunus_router::{Router, Site};
use std::hint::black_box;

fn table(hosts: usize) -> Router<usize> {
    let mut builder = Router::builder();
    for i in 0..hosts {
        builder.push(
            Site::new(format!("site {i}"))
                .host(format!("app{i}.example.com"))
                .default_target(i)
                .route("/api", i + 1)
                .route("/static", i + 2),
        );
    }
    builder.push(Site::new("wildcard").host("*.wild.test").default_target(0));
    builder
        .build()
        .unwrap_or_else(|e| panic!("bench table: {e}"))
}

fn lookups(c: &mut Criterion) {
    let mut group = c.benchmark_group("router_lookup");
    for size in [100usize, 10_000, 100_000] {
        let router = table(size);
        let hosts: Vec<String> = (0..64)
            .map(|i| format!("App{}.Example.com:443", (i * 7919) % size))
            .collect();
        group.bench_with_input(BenchmarkId::new("exact_route", size), &router, |b, r| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % hosts.len();
                black_box(r.lookup(black_box(&hosts[i]), black_box("/api/users/42")))
            })
        });
        group.bench_with_input(BenchmarkId::new("wildcard", size), &router, |b, r| {
            b.iter(|| black_box(r.lookup(black_box("www.wild.test"), black_box("/"))))
        });
        group.bench_with_input(BenchmarkId::new("miss", size), &router, |b, r| {
            b.iter(|| black_box(r.lookup(black_box("nobody.example.org"), black_box("/"))))
        });
    }
    group.finish();
}

criterion_group!(benches, lookups);
criterion_main!(benches);
