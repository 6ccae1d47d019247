//! SNI resolution with 10, 10,000 and 100,000 certificates: the cost must stay flat.
//!
//! Run with: `cargo bench --bench sni`

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use portunus_store::{CertResolver, LOCAL_LEAF_LIFETIME, LocalCa};

fn resolvers(c: &mut Criterion) {
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let ca = LocalCa::generate().unwrap();
    // The index cost does not depend on the certificate's content: one key, many names.
    let key = ca
        .issue(&["bench.test".to_owned()], LOCAL_LEAF_LIFETIME)
        .unwrap()
        .certified_key(&provider, "bench.test")
        .unwrap();
    let mut group = c.benchmark_group("sni_resolve");
    for size in [10usize, 10_000, 100_000] {
        let resolver = CertResolver::new();
        let names: Vec<String> = (0..size).map(|i| format!("site{i}.example.com")).collect();
        resolver.insert_many(names.iter().map(|n| (n.as_str(), Arc::clone(&key))));
        resolver.insert("*.wild.test", Arc::clone(&key));
        let asked: Vec<String> = (0..64)
            .map(|i| format!("site{}.example.com", (i * 7919) % size))
            .collect();
        group.bench_with_input(BenchmarkId::new("exact", size), &resolver, |b, r| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % asked.len();
                black_box(r.lookup(black_box(Some(asked[i].as_str()))))
            })
        });
        group.bench_with_input(BenchmarkId::new("wildcard", size), &resolver, |b, r| {
            b.iter(|| black_box(r.lookup(black_box(Some("www.wild.test")))))
        });
        group.bench_with_input(BenchmarkId::new("unknown", size), &resolver, |b, r| {
            b.iter(|| black_box(r.lookup(black_box(Some("nobody.example.org")))))
        });
    }
    group.finish();
}

criterion_group!(benches, resolvers);
criterion_main!(benches);
