//! What a parked HTTP/1 connection keeps on the heap. Its own test binary: the allocator that
//! counts (dhat's) is this binary's, and its one test is the only thing allocating.
//!
//! A connection parks once quiet: its serving task ends and a small one waits on the socket.
//! The socket's reader waker slot still held the ended task's waker until something else
//! took the slot, so each parked connection kept its finished serving task's memory (about
//! 1.1 KiB) alive; what a parked connection costs is what 10,000 idle keep-alive connections
//! cost (`scripts/idle-conns`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use portunus_proxy::{ProxySettings, SiteSettings};
use portunus_test_utils::{EchoServer, read_until, wait_until};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use common::Serving;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

/// Enough connections that quiet ones park after 10 ms, not after a second.
const BATCH: usize = 300;

/// The most heap one parked connection may hold, with its client's socket in this process
/// and dhat's count of requested bytes: 3.3 KiB measured (debug and release alike), 4.9 KiB
/// when every parked connection kept its finished serving task alive.
const MOST_PER_CONNECTION: usize = 4096;

/// Opens `n` connections with one answered GET each and keeps them.
async fn open(addr: std::net::SocketAddr, n: usize, held: &mut Vec<TcpStream>) {
    for _ in 0..n {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
            .await
            .unwrap();
        let reply = read_until(&mut s, "\"server\"").await;
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        held.push(s);
    }
}

#[tokio::test]
async fn a_parked_connection_keeps_little_memory() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let up = EchoServer::start("up").await.unwrap();
    let site = SiteSettings::new("a", ["a.test"])
        .upstreams([up.url()])
        .tls(false);
    // Every connection comes from 127.0.0.1: above the default cap of 256 per address.
    let settings = ProxySettings::new()
        .site(site)
        .max_connections(4 * BATCH, 4 * BATCH);
    let Serving {
        addr,
        proxy,
        stop,
        done,
        ..
    } = Serving::plain(settings).await;

    // A first batch warms up what does not grow with connections (the upstream pool, the
    // metrics, tokio's slabs); the second one's cost is all per connection.
    let mut held = Vec::new();
    open(addr, BATCH, &mut held).await;
    let proxy = &proxy;
    let parked_all = |n| {
        wait_until(Duration::from_secs(10), move || {
            common::parked(proxy, addr) == n
        })
    };
    assert!(parked_all(BATCH).await, "the first batch parks");
    let before = dhat::HeapStats::get().curr_bytes;
    open(addr, BATCH, &mut held).await;
    assert!(parked_all(2 * BATCH).await, "the second batch parks");
    let after = dhat::HeapStats::get().curr_bytes;
    let per_connection = after.saturating_sub(before) / BATCH;
    assert!(
        per_connection <= MOST_PER_CONNECTION,
        "{per_connection} bytes of heap per parked connection (at most {MOST_PER_CONNECTION})"
    );

    drop(held);
    stop.cancel();
    done.await.unwrap().unwrap();
}
