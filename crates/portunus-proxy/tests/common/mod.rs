//! What several of this crate's test binaries share: a proxy served in process, over plain
//! HTTP or TLS, and clients for it.

#![allow(dead_code, reason = "each test binary uses a part of it")]

use std::net::SocketAddr;
use std::sync::Arc;

use portunus_proxy::{Proxy, ProxySettings, server_config};
use portunus_store::{CertResolver, LOCAL_LEAF_LIFETIME, LocalCa};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// A proxy serving plain HTTP or HTTPS on a loopback port chosen at run time, until `stop`.
#[derive(Debug)]
pub struct Serving {
    pub addr: SocketAddr,
    pub proxy: Proxy,
    pub stop: CancellationToken,
    pub done: tokio::task::JoinHandle<portunus_proxy::Result<()>>,
    /// The root certificate TLS clients trust, and the name its certificate is for; none
    /// over plain HTTP.
    pub tls: Option<(String, String)>,
}

/// A client's connection to a [`Serving`]: TCP or TLS.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

impl Serving {
    pub async fn plain(settings: ProxySettings) -> Self {
        Self::start(Proxy::new(settings).unwrap(), None).await
    }

    /// HTTPS, with a certificate for `host` from a local CA made for the test.
    pub async fn tls(settings: ProxySettings, host: &str) -> Self {
        let proxy = Proxy::new(settings).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let ca = LocalCa::generate().unwrap();
        let resolver = Arc::new(CertResolver::new());
        let key = ca
            .issue(&[host.to_owned()], LOCAL_LEAF_LIFETIME)
            .unwrap()
            .certified_key(&provider, host)
            .unwrap();
        resolver.insert(host, key);
        proxy.set_resolver(Arc::clone(&resolver));
        let config = server_config(resolver, provider).unwrap();
        let client = (ca.root_pem().to_owned(), host.to_owned());
        Self::start(proxy, Some((config, client))).await
    }

    /// Serves `proxy`: over TLS with `tls`'s server configuration, its clients trusting the
    /// root and name that come with it.
    async fn start(
        proxy: Proxy,
        tls: Option<(Arc<rustls::ServerConfig>, (String, String))>,
    ) -> Self {
        let (config, client) = tls.unzip();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let (p, s) = (proxy.clone(), stop.clone());
        let done = tokio::spawn(async move {
            let stopped = s.cancelled_owned();
            match config {
                Some(config) => p.serve_tls(listener, config, stopped).await,
                None => p.serve(listener, stopped).await,
            }
        });
        Self {
            addr,
            proxy,
            stop,
            done,
            tls: client,
        }
    }

    /// A new client connection: over TLS (HTTP/1.1, trusting the test's CA) if it serves TLS.
    pub async fn connect(&self) -> Box<dyn Stream> {
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        match &self.tls {
            None => Box::new(tcp),
            Some((root, host)) => {
                let config = portunus_test_utils::tls::trusting(root, &[b"http/1.1"]);
                let name = rustls::pki_types::ServerName::try_from(host.clone()).unwrap();
                let tls = tokio_rustls::TlsConnector::from(config)
                    .connect(name, tcp)
                    .await
                    .unwrap();
                Box::new(tls)
            }
        }
    }

    /// `portunus_connections_parked` of its listener.
    pub fn parked(&self) -> usize {
        parked(&self.proxy, self.addr)
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
