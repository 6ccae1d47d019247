//! What several of this crate's test binaries share: a proxy served in process.

#![allow(dead_code, reason = "each test binary uses a part of it")]

use std::net::SocketAddr;

use portunus_proxy::{Proxy, ProxySettings};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A proxy serving plain HTTP on a loopback port chosen at run time, until `stop`.
#[derive(Debug)]
pub struct Serving {
    pub addr: SocketAddr,
    pub proxy: Proxy,
    pub stop: CancellationToken,
    pub done: tokio::task::JoinHandle<portunus_proxy::Result<()>>,
}

impl Serving {
    pub async fn plain(settings: ProxySettings) -> Self {
        let proxy = Proxy::new(settings).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let (p, s) = (proxy.clone(), stop.clone());
        let done = tokio::spawn(async move { p.serve(listener, s.cancelled_owned()).await });
        Self {
            addr,
            proxy,
            stop,
            done,
        }
    }
}

/// `portunus_connections_parked` of the listener on `addr`.
pub fn parked(proxy: &Proxy, addr: SocketAddr) -> usize {
    let text = proxy.metrics_text();
    let line = format!("portunus_connections_parked{{listener=\"{addr}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&line))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no parked gauge in\n{text}"))
}
