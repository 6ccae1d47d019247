//! Test harnesses for Portunus: a real HTTP/1.1 + WebSocket echo upstream on loopback,
//! a running-binary harness, and polling helpers. Not published.
//!
//! The echo upstream answers:
//! - `GET /slow?ms=N`: waits N milliseconds, then answers like any other path;
//! - `GET /bytes?n=N`: streams N bytes (`x`), in 64 KiB chunks, never holding them all;
//! - a request with a body: reads it as a stream and reports its length;
//! - `Upgrade: websocket`: completes the handshake and echoes every message;
//! - anything else: a JSON document with the method, path, query, headers and server name.

// A test harness: a panic here is a test failure with its message, which is what tests want.
#![allow(clippy::panic)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

/// A request as the echo upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The method.
    pub method: String,
    /// The path and query as received.
    pub uri: String,
    /// Headers, lower-case names; repeated headers joined with `, `.
    pub headers: HashMap<String, String>,
    /// All header names in the order received (repeats included).
    pub header_names: Vec<String>,
}

/// A running echo upstream. Dropping it (or [`EchoServer::stop`]) closes the listener and
/// every connection, like a crashed server.
#[derive(Debug)]
pub struct EchoServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its name, echoed in every JSON answer as `server`.
    pub name: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
}

type EchoBody = BoxBody<Bytes, Infallible>;

impl EchoServer {
    /// Starts an echo upstream on `127.0.0.1:0`.
    pub async fn start(name: &str) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        Ok(Self::on(listener, name))
    }

    /// Starts an echo upstream on a given listener.
    pub fn on(listener: TcpListener, name: &str) -> Self {
        let addr = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let task = {
            let (seen, conns, name) = (Arc::clone(&seen), Arc::clone(&conns), name.to_owned());
            let accepted = Arc::clone(&accepted);
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let (seen, name) = (Arc::clone(&seen), name.clone());
                    let handle = tokio::spawn(async move {
                        let service = service_fn(move |req| {
                            let (seen, name) = (Arc::clone(&seen), name.clone());
                            async move { Ok::<_, Infallible>(echo(req, &seen, &name).await) }
                        });
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .with_upgrades()
                            .await;
                    });
                    if let Ok(mut c) = conns.lock() {
                        c.retain(|h| !h.is_finished());
                        c.push(handle);
                    }
                }
            })
        };
        Self {
            addr,
            name: name.to_owned(),
            seen,
            task,
            conns,
            accepted,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Connections accepted so far.
    pub fn accepted_connections(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops listening and closes every connection.
    pub fn stop(&self) {
        self.task.abort();
        if let Ok(conns) = self.conns.lock() {
            for c in conns.iter() {
                c.abort();
            }
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn query_param(query: Option<&str>, key: &str) -> Option<u64> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
}

async fn echo(req: Request<Incoming>, seen: &Mutex<Vec<Seen>>, name: &str) -> Response<EchoBody> {
    let mut headers: HashMap<String, String> = HashMap::new();
    let mut header_names = Vec::new();
    for (k, v) in req.headers() {
        let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
        header_names.push(k.as_str().to_owned());
        headers
            .entry(k.as_str().to_owned())
            .and_modify(|e| {
                e.push_str(", ");
                e.push_str(&v);
            })
            .or_insert(v);
    }
    let record = Seen {
        method: req.method().to_string(),
        uri: req.uri().to_string(),
        headers: headers.clone(),
        header_names,
    };
    if let Ok(mut s) = seen.lock() {
        s.push(record);
    }
    let query = req.uri().query().map(str::to_owned);
    if let Some(ms) = query_param(query.as_deref(), "ms").filter(|_| req.uri().path() == "/slow") {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if headers
        .get("upgrade")
        .is_some_and(|u| u.eq_ignore_ascii_case("websocket"))
    {
        return websocket(req);
    }
    if req.uri().path() == "/bytes" {
        let total = query_param(query.as_deref(), "n").unwrap_or(0);
        return stream_bytes(total);
    }
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let mut body_len: u64 = 0;
    let mut body = req.into_body();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => body_len += frame.data_ref().map_or(0, |d| d.len() as u64),
            Err(_) => break,
        }
    }
    let doc = serde_json::json!({
        "server": name,
        "method": method,
        "path": path,
        "query": query,
        "headers": headers,
        "body_len": body_len,
    });
    let mut response = Response::new(Full::new(Bytes::from(doc.to_string())).boxed());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response.headers_mut().insert(
        "x-upstream",
        header::HeaderValue::from_str(name).unwrap_or(header::HeaderValue::from_static("?")),
    );
    // A hop-by-hop header the proxy must not pass on.
    response
        .headers_mut()
        .insert("keep-alive", header::HeaderValue::from_static("timeout=30"));
    response
}

fn stream_bytes(total: u64) -> Response<EchoBody> {
    const CHUNK: u64 = 64 * 1024;
    let chunk = Bytes::from(vec![b'x'; CHUNK as usize]);
    let frames = futures_util::stream::unfold(0u64, move |sent| {
        let chunk = chunk.clone();
        async move {
            if sent >= total {
                return None;
            }
            let n = CHUNK.min(total - sent);
            Some((
                Ok::<_, Infallible>(Frame::data(chunk.slice(..n as usize))),
                sent + n,
            ))
        }
    });
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(frames)));
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, header::HeaderValue::from(total));
    response
}

fn websocket(mut req: Request<Incoming>) -> Response<EchoBody> {
    let Some(key) = req
        .headers()
        .get("sec-websocket-key")
        .map(|k| derive_accept_key(k.as_bytes()))
    else {
        let mut r = Response::new(Full::new(Bytes::from_static(b"missing key")).boxed());
        *r.status_mut() = StatusCode::BAD_REQUEST;
        return r;
    };
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(msg)) = ws.next().await {
            if msg.is_close() {
                break;
            }
            if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                break;
            }
        }
    });
    let mut r = Response::new(Full::new(Bytes::new()).boxed());
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("upgrade"),
    );
    h.insert(
        header::UPGRADE,
        header::HeaderValue::from_static("websocket"),
    );
    if let Ok(v) = header::HeaderValue::from_str(&key) {
        h.insert("sec-websocket-accept", v);
    }
    r
}

/// Polls `condition` every 20 ms until it holds or `timeout` passes; returns whether it held.
pub async fn wait_until<F: FnMut() -> bool>(timeout: Duration, mut condition: F) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A running `portunus` binary, killed (by its PID) when dropped.
#[derive(Debug)]
pub struct Portunus {
    child: Child,
    /// Addresses it reported listening on, in order (`kind`, address), e.g. `("HTTP", ...)`.
    pub listeners: Vec<(String, SocketAddr)>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Portunus {
    /// Starts `bin run -c config` and waits (up to 20 s) until it has reported `expected`
    /// listeners. Listener addresses may use port 0: the real ports are read from its log.
    pub fn start(bin: &Path, config: &Path, expected: usize) -> Result<Self, String> {
        let mut child = Command::new(bin)
            .args(["run", "-c"])
            .arg(config)
            .env("RUST_LOG", "info,portunus=debug")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", bin.display()))?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if let Some(found) = parse_listening(&line) {
                        let _ = tx.send(found);
                    }
                    if let Ok(mut l) = log.lock() {
                        l.push(line);
                    }
                }
            });
        }
        let mut listeners = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while listeners.len() < expected {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(found) => listeners.push(found),
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let log = log.lock().map(|l| l.join("\n")).unwrap_or_default();
                    return Err(format!("portunus did not start listening; log:\n{log}"));
                }
            }
        }
        Ok(Self {
            child,
            listeners,
            log,
        })
    }

    /// The first listener of `kind` (`HTTP`, `HTTPS`, ...).
    pub fn addr(&self, kind: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(k, _)| k == kind)
            .map(|(_, a)| *a)
    }

    /// Its PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    /// Sends a signal to it (`"TERM"`, `"HUP"`, ...).
    pub fn signal(&self, name: &str) -> bool {
        Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Waits up to `timeout` for it to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Portunus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Parses `... listening for HTTP addr=127.0.0.1:1234` log lines.
fn parse_listening(line: &str) -> Option<(String, SocketAddr)> {
    let rest = &line[line.find("listening for ")? + "listening for ".len()..];
    let (kind, rest) = rest.split_once(' ')?;
    let addr = rest.split("addr=").nth(1)?.split_whitespace().next()?;
    Some((kind.to_owned(), addr.parse().ok()?))
}

/// A `kB` field of `/proc/<pid>/status`, in bytes.
fn proc_status_kb(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Reads the resident set size of a process in bytes (Linux `/proc`).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    proc_status_kb(pid, "VmRSS:")
}

/// The high-water mark of a process's resident set size in bytes (Linux `/proc`).
pub fn peak_rss_bytes(pid: u32) -> Option<u64> {
    proc_status_kb(pid, "VmHWM:")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listening_lines() {
        let line = "2026-01-01T00:00:00Z  INFO portunus_proxy::proxy: listening for HTTP addr=127.0.0.1:4321";
        assert_eq!(
            parse_listening(line),
            Some(("HTTP".to_owned(), "127.0.0.1:4321".parse().unwrap()))
        );
        assert_eq!(parse_listening("something else"), None);
    }

    #[test]
    fn query_params() {
        assert_eq!(query_param(Some("a=1&ms=250"), "ms"), Some(250));
        assert_eq!(query_param(Some("ms=x"), "ms"), None);
        assert_eq!(query_param(None, "ms"), None);
    }
}

/// A response as a test sees it.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// The headers.
    pub headers: http::HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

impl Reply {
    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON (`Null` if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// Sends one HTTP/1.1 request over a new connection to `addr`, with `Host: host`.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<Reply, String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, host);
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let req = builder
        .body(Full::new(body))
        .map_err(|e| format!("request: {e}"))?;
    let res = sender
        .send_request(req)
        .await
        .map_err(|e| format!("send: {e}"))?;
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let body = res
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok(Reply {
        status,
        headers,
        body,
    })
}

/// Sends raw bytes over a new connection to `addr` and returns what came back until the peer
/// closed or 5 s passed (for requests no HTTP client would send, and for connections the
/// server closes unanswered).
pub async fn exchange(addr: SocketAddr, bytes: &[u8]) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(bytes).await?;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Reads from `stream` until what was read contains `needle`, the peer closes, or 5 s pass;
/// returns what was read.
pub async fn read_until(stream: &mut (impl tokio::io::AsyncRead + Unpin), needle: &str) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !String::from_utf8_lossy(&got).contains(needle) {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// `GET path` with `Host: host` over a new connection.
pub async fn get(addr: SocketAddr, host: &str, path: &str) -> Result<Reply, String> {
    request(addr, "GET", host, path, &[], Bytes::new()).await
}

/// TLS clients for tests: handshakes that record the certificate the server presented.
pub mod tls {
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
    use tokio::net::TcpStream;
    use tokio_rustls::TlsConnector;
    use tokio_rustls::client::TlsStream;

    use super::Reply;

    /// Accepts any certificate and remembers the leaf the server presented.
    #[derive(Debug, Default)]
    pub struct Recorder {
        leaf: Mutex<Option<CertificateDer<'static>>>,
    }

    impl Recorder {
        /// The leaf presented in the last handshake, if any.
        pub fn leaf(&self) -> Option<CertificateDer<'static>> {
            self.leaf.lock().ok().and_then(|l| l.clone())
        }

        /// The names of the presented leaf (empty when none was presented).
        pub fn names(&self) -> Vec<String> {
            self.leaf()
                .and_then(|der| portunus_store::parse_info(&der, "test").ok())
                .map(|info| info.names)
                .unwrap_or_default()
        }
    }

    impl ServerCertVerifier for Recorder {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp: &[u8],
            _now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            if let Ok(mut leaf) = self.leaf.lock() {
                *leaf = Some(end_entity.clone().into_owned());
            }
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            _message: &[u8],
            _cert: &CertificateDer<'_>,
            _dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }

        fn verify_tls13_signature(
            &self,
            _message: &[u8],
            _cert: &CertificateDer<'_>,
            _dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            rustls::crypto::aws_lc_rs::default_provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }

    /// A client configuration that records the server's certificate; `alpn` as given.
    pub fn recording_config(alpn: &[&[u8]]) -> (Arc<ClientConfig>, Arc<Recorder>) {
        let recorder = Arc::new(Recorder::default());
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap_or_else(|e| panic!("client config: {e}"))
            .dangerous()
            .with_custom_certificate_verifier(Arc::clone(&recorder) as _)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        (Arc::new(config), recorder)
    }

    /// A client configuration trusting only `root_pem`.
    pub fn trusting(root_pem: &str, alpn: &[&[u8]]) -> Arc<ClientConfig> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(root_pem.as_bytes()).flatten() {
            let _ = roots.add(cert);
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap_or_else(|e| panic!("client config: {e}"))
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    /// Connects to `addr` and completes a TLS handshake; `sni` `None` sends no SNI.
    pub async fn connect(
        addr: SocketAddr,
        sni: Option<&str>,
        config: Arc<ClientConfig>,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let stream = TcpStream::connect(addr).await?;
        let (name, config) = match sni {
            Some(name) => (
                ServerName::try_from(name.to_owned())
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?,
                config,
            ),
            None => {
                let mut no_sni = ClientConfig::clone(&config);
                no_sni.enable_sni = false;
                (ServerName::IpAddress(addr.ip().into()), Arc::new(no_sni))
            }
        };
        TlsConnector::from(config).connect(name, stream).await
    }

    /// One request over an established TLS stream, HTTP/2 if ALPN chose it; returns the
    /// reply and the HTTP version used.
    pub async fn request_over(
        stream: TlsStream<TcpStream>,
        host: &str,
        path: &str,
    ) -> Result<(Reply, http::Version), String> {
        let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
        let io = TokioIo::new(stream);
        let uri = format!("https://{host}{path}");
        let req = http::Request::get(uri)
            .header(http::header::HOST, host)
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let res = if h2 {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            let mut req = req;
            req.headers_mut().remove(http::header::HOST);
            sender.send_request(req).await.map_err(|e| e.to_string())?
        } else {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            let (mut parts, body) = req.into_parts();
            parts.uri = path
                .parse()
                .map_err(|e: http::uri::InvalidUri| e.to_string())?;
            sender
                .send_request(http::Request::from_parts(parts, body))
                .await
                .map_err(|e| e.to_string())?
        };
        let version = res.version();
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let body = res
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((
            Reply {
                status,
                headers,
                body,
            },
            version,
        ))
    }
}

/// A real ACME CA for tests: Pebble and pebble-challtestsrv (Debian package `pebble`) on
/// free loopback ports, every DNS name resolving to 127.0.0.1 unless told otherwise.
pub mod pebble {
    use std::net::{SocketAddr, TcpListener, UdpSocket};
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use portunus_store::{LOCAL_LEAF_LIFETIME, LocalCa};

    /// Where the binaries are expected.
    pub const PEBBLE: &str = "/usr/bin/pebble";
    /// The mock DNS server.
    pub const CHALLTESTSRV: &str = "/usr/bin/pebble-challtestsrv";

    /// Options for [`Pebble::start`].
    #[derive(Debug, Clone, Default)]
    pub struct Options {
        /// Where Pebble validates http-01 (the proxy's plain port).
        pub http01_port: u16,
        /// Where Pebble validates tls-alpn-01 (the proxy's HTTPS port).
        pub tlsalpn01_port: u16,
        /// External Account Binding required, with these (kid, base64url HMAC key) pairs.
        pub eab: Vec<(String, String)>,
    }

    /// A running Pebble + challtestsrv, stopped (by PID) when dropped.
    #[derive(Debug)]
    pub struct Pebble {
        /// The ACME directory URL.
        pub directory: String,
        /// The CA of the directory's own HTTPS (`acme.ca_root`).
        pub tls_ca: PathBuf,
        /// The management API (`/roots/0`).
        pub mgmt: SocketAddr,
        /// challtestsrv's management API (`/add-a`).
        pub challtest: SocketAddr,
        dir: PathBuf,
        dns: SocketAddr,
        pebble: Option<Child>,
        challtestsrv: Child,
    }

    /// A port free right now on 127.0.0.1 (TCP and UDP).
    ///
    /// For servers that must be told their port in advance (Pebble validates on fixed ports).
    /// Chosen below Linux's ephemeral range (32768 and up), so the source port of some
    /// outgoing connection in a parallel test cannot take it before it is bound.
    pub fn free_port() -> u16 {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let seed = std::process::id().wrapping_mul(2_654_435_761).wrapping_add(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos()),
        );
        for _ in 0..200 {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let port = 20_000 + (seed.wrapping_add(n.wrapping_mul(7_919)) % 12_000) as u16;
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            if TcpListener::bind(addr).is_ok() && UdpSocket::bind(addr).is_ok() {
                return port;
            }
        }
        panic!("no free port on 127.0.0.1")
    }

    /// Whether Pebble is installed; with `CI=true` its absence is a test failure.
    pub fn available() -> bool {
        let present = Path::new(PEBBLE).exists() && Path::new(CHALLTESTSRV).exists();
        if !present {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "Pebble is missing: apt-get install pebble (scripts/test does it as root)"
            );
            eprintln!("SKIP: Pebble is missing: apt-get install pebble");
        }
        present
    }

    fn curl(args: &[&str]) -> Option<String> {
        let out = Command::new("curl")
            .args(["-fsS", "--max-time", "3"])
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    impl Pebble {
        /// Starts both servers in `dir` and waits until the directory answers.
        pub fn start(dir: &Path, options: &Options) -> Result<Self, String> {
            std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
            let ca = LocalCa::generate().map_err(|e| e.to_string())?;
            let pair = ca
                .issue(
                    &["127.0.0.1".into(), "localhost".into()],
                    LOCAL_LEAF_LIFETIME,
                )
                .map_err(|e| e.to_string())?;
            let tls_ca = dir.join("tls-ca.pem");
            std::fs::write(&tls_ca, ca.root_pem()).map_err(|e| e.to_string())?;
            std::fs::write(dir.join("tls-cert.pem"), &pair.chain_pem).map_err(|e| e.to_string())?;
            std::fs::write(dir.join("tls-key.pem"), &pair.key_pem).map_err(|e| e.to_string())?;
            let (port, mgmt_port, dns_port, ct_port) =
                (free_port(), free_port(), free_port(), free_port());
            let keys: serde_json::Map<String, serde_json::Value> = options
                .eab
                .iter()
                .map(|(kid, key)| (kid.clone(), serde_json::Value::String(key.clone())))
                .collect();
            let config = serde_json::json!({
                "pebble": {
                    "listenAddress": format!("127.0.0.1:{port}"),
                    "managementListenAddress": format!("127.0.0.1:{mgmt_port}"),
                    "certificate": dir.join("tls-cert.pem"),
                    "privateKey": dir.join("tls-key.pem"),
                    "httpPort": options.http01_port,
                    "tlsPort": options.tlsalpn01_port,
                    "ocspResponderURL": "",
                    "externalAccountBindingRequired": !options.eab.is_empty(),
                    "externalAccountMACKeys": keys,
                }
            });
            std::fs::write(dir.join("pebble-config.json"), config.to_string())
                .map_err(|e| e.to_string())?;
            let log = |name: &str| {
                std::fs::File::create(dir.join(name))
                    .map(Stdio::from)
                    .unwrap_or_else(|_| Stdio::null())
            };
            let challtestsrv = Command::new(CHALLTESTSRV)
                .args(["-dns01", &format!("127.0.0.1:{dns_port}")])
                .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
                .args(["-management", &format!("127.0.0.1:{ct_port}")])
                .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
                .stdin(Stdio::null())
                .stdout(log("challtestsrv.log"))
                .stderr(log("challtestsrv.err"))
                .spawn()
                .map_err(|e| format!("{CHALLTESTSRV}: {e}"))?;
            let mut pebble = Self {
                directory: format!("https://127.0.0.1:{port}/dir"),
                tls_ca,
                mgmt: SocketAddr::from(([127, 0, 0, 1], mgmt_port)),
                challtest: SocketAddr::from(([127, 0, 0, 1], ct_port)),
                dir: dir.to_owned(),
                dns: SocketAddr::from(([127, 0, 0, 1], dns_port)),
                pebble: None,
                challtestsrv,
            };
            pebble.start_pebble()?;
            Ok(pebble)
        }

        /// (Re)starts the Pebble process itself with the same configuration and ports.
        /// Pebble keeps no state: accounts and roots are new after a restart.
        pub fn start_pebble(&mut self) -> Result<(), String> {
            let child = Command::new(PEBBLE)
                .arg("-config")
                .arg(self.dir.join("pebble-config.json"))
                .args(["-dnsserver", &self.dns.to_string()])
                .env("PEBBLE_VA_NOSLEEP", "1")
                .env("PEBBLE_WFE_NONCEREJECT", "0")
                .stdin(Stdio::null())
                .stdout(
                    std::fs::File::create(self.dir.join("pebble.log"))
                        .map(Stdio::from)
                        .unwrap_or_else(|_| Stdio::null()),
                )
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("{PEBBLE}: {e}"))?;
            self.pebble = Some(child);
            let ca = self.tls_ca.display().to_string();
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                let ct = std::net::TcpStream::connect(self.challtest).is_ok();
                if ct && curl(&["--cacert", &ca, &self.directory]).is_some() {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(format!("Pebble did not answer; log:\n{}", self.log()))
        }

        /// Stops the Pebble process (challtestsrv keeps running).
        pub fn stop_pebble(&mut self) {
            if let Some(mut child) = self.pebble.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }

        /// Pebble's issuing root (changes at every Pebble start).
        pub fn root_pem(&self) -> Result<String, String> {
            let ca = self.tls_ca.display().to_string();
            curl(&["--cacert", &ca, &format!("https://{}/roots/0", self.mgmt)])
                .ok_or_else(|| "cannot fetch /roots/0".to_owned())
        }

        /// Makes `host` resolve to `ip` (e.g. an address nothing listens on).
        pub fn set_address(&self, host: &str, ip: &str) -> Result<(), String> {
            let body =
                serde_json::json!({"host": format!("{host}."), "addresses": [ip]}).to_string();
            curl(&[
                "-X",
                "POST",
                "-d",
                &body,
                &format!("http://{}/add-a", self.challtest),
            ])
            .map(|_| ())
            .ok_or_else(|| format!("challtestsrv refused add-a for {host}"))
        }

        /// Pebble's log so far.
        pub fn log(&self) -> String {
            std::fs::read_to_string(self.dir.join("pebble.log")).unwrap_or_default()
        }
    }

    impl Drop for Pebble {
        fn drop(&mut self) {
            self.stop_pebble();
            let _ = self.challtestsrv.kill();
            let _ = self.challtestsrv.wait();
        }
    }
}

/// The real Docker engine for tests: a tiny image made with `docker import` from Debian's
/// static busybox (no image is pulled), containers serving `busybox httpd`. Everything a test
/// creates is removed when dropped.
pub mod docker {
    use std::path::Path;
    use std::process::Command;

    /// Debian's `busybox-static`.
    pub const BUSYBOX: &str = "/bin/busybox";

    fn docker(args: &[&str]) -> Result<String, String> {
        let out = Command::new("docker")
            .args(args)
            .output()
            .map_err(|e| format!("docker: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(format!(
                "docker {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Whether an engine answers and busybox is there; with `CI=true` their absence is a
    /// test failure.
    pub fn available() -> bool {
        let engine = docker(&["info", "--format", "{{.ServerVersion}}"]);
        let ok = engine.is_ok() && Path::new(BUSYBOX).exists();
        if !ok {
            let why = format!(
                "Docker tests need a running engine and {BUSYBOX} (apt-get install busybox-static): {:?}",
                engine.err()
            );
            assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
            eprintln!("SKIPPED (loudly): {why}");
        }
        ok
    }

    /// A throwaway image, removed when dropped.
    #[derive(Debug)]
    pub struct Image {
        /// Its tag.
        pub tag: String,
    }

    impl Image {
        /// Builds the image from busybox-static.
        pub fn build(tag_hint: &str) -> Result<Self, String> {
            let dir = std::env::temp_dir()
                .join(format!("portunus-img-{}-{tag_hint}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let bin = dir.join("bin");
            std::fs::create_dir_all(&bin).map_err(|e| e.to_string())?;
            std::fs::create_dir_all(dir.join("www")).map_err(|e| e.to_string())?;
            std::fs::copy(BUSYBOX, bin.join("busybox")).map_err(|e| e.to_string())?;
            for applet in ["sh", "mkdir", "echo", "httpd", "sleep", "cat"] {
                std::os::unix::fs::symlink("busybox", bin.join(applet))
                    .map_err(|e| e.to_string())?;
            }
            let tar = dir.with_extension("tar");
            let status = Command::new("tar")
                .arg("-C")
                .arg(&dir)
                .args(["-cf"])
                .arg(&tar)
                .arg(".")
                .status()
                .map_err(|e| e.to_string())?;
            if !status.success() {
                return Err("tar failed".to_owned());
            }
            let tag = format!("portunus-test-{tag_hint}:{}", std::process::id());
            let tar_path = tar.display().to_string();
            let result = docker(&[
                "import",
                "--change",
                "CMD [\"/bin/busybox\", \"httpd\", \"-f\", \"-p\", \"80\", \"-h\", \"/www\"]",
                &tar_path,
                &tag,
            ]);
            let _ = std::fs::remove_dir_all(&dir);
            let _ = std::fs::remove_file(&tar);
            result.map(|_| Self { tag })
        }

        /// Runs a container answering `body` on port 80 (exposed), with labels and env.
        pub fn run(
            &self,
            name: &str,
            labels: &[(&str, &str)],
            env: &[(&str, &str)],
            body: &str,
        ) -> Result<Container, String> {
            let mut args: Vec<String> = vec![
                "run".into(),
                "-d".into(),
                "--name".into(),
                name.into(),
                "--expose".into(),
                "80".into(),
            ];
            for (k, v) in labels {
                args.push("--label".into());
                args.push(format!("{k}={v}"));
            }
            for (k, v) in env {
                args.push("-e".into());
                args.push(format!("{k}={v}"));
            }
            args.push(self.tag.clone());
            args.extend(["/bin/sh".into(), "-c".into()]);
            args.push(format!(
                "echo '{body}' > /www/index.html && exec /bin/httpd -f -p 80 -h /www"
            ));
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let _ = docker(&["rm", "-f", name]);
            let id = docker(&refs)?;
            Ok(Container {
                id,
                name: name.to_owned(),
            })
        }
    }

    impl Drop for Image {
        fn drop(&mut self) {
            let _ = docker(&["rmi", "-f", &self.tag]);
        }
    }

    /// A running test container, removed when dropped.
    #[derive(Debug)]
    pub struct Container {
        /// Its id.
        pub id: String,
        /// Its name.
        pub name: String,
    }

    impl Container {
        /// Stops it (it stays until dropped).
        pub fn stop(&self) -> Result<(), String> {
            docker(&["stop", "-t", "1", &self.id]).map(|_| ())
        }
    }

    impl Drop for Container {
        fn drop(&mut self) {
            let _ = docker(&["rm", "-f", &self.id]);
        }
    }
}
