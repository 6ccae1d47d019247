//! The admin API on `listen.admin`: `GET /status`, `POST /certs/<name>/renew`.
//!
//! Refuses a `Host` that is not the admin address or `localhost`, any `POST` carrying an
//! `Origin` (no cross-site requests from a browser), and, when `listen.admin_token` is set,
//! requests without `Authorization: Bearer <token>`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use portunus_acme::AcmeManager;
use portunus_store::{CertStorage, FsStorage, INTERNAL_CA_KEY};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

/// What the admin API reports on and acts upon.
#[derive(Debug, Clone)]
pub struct Admin {
    pub addr: SocketAddr,
    pub token: Option<String>,
    pub acme: Option<AcmeManager>,
    pub storage: Option<FsStorage>,
    pub sites: Vec<serde_json::Value>,
}

impl Admin {
    fn host_allowed(&self, host: &str) -> bool {
        let name = portunus_router::split_host_port(host);
        let port_ok = match host.rsplit_once(':') {
            Some((_, port)) if !host.ends_with(']') => port.parse() == Ok(self.addr.port()),
            _ => true,
        };
        let name_ok = name.eq_ignore_ascii_case("localhost")
            || name.parse::<std::net::IpAddr>().is_ok_and(|ip| {
                ip == self.addr.ip() || ip.is_loopback() && self.addr.ip().is_loopback()
            });
        name_ok && port_ok
    }

    async fn status(&self) -> serde_json::Value {
        let acme: Vec<serde_json::Value> = self
            .acme
            .iter()
            .flat_map(|a| a.status())
            .map(|s| {
                json!({
                    "name": s.name,
                    "source": "acme",
                    "issuer": s.issuer,
                    "not_after": s.not_after,
                    "next_renewal": s.next_renewal,
                    "last_error": s.last_error,
                    "failures": s.failures,
                })
            })
            .collect();
        let mut certificates = acme;
        if let Some(storage) = &self.storage {
            for name in storage.list(INTERNAL_CA_KEY).await.unwrap_or_default() {
                if let Ok(Some(stored)) = storage.load(INTERNAL_CA_KEY, &name).await {
                    certificates.push(json!({
                        "name": name,
                        "source": "internal",
                        "issuer": stored.info.issuer,
                        "not_after": stored.info.not_after,
                        "next_renewal": null,
                        "last_error": null,
                        "failures": 0,
                    }));
                }
            }
        }
        json!({ "sites": self.sites, "certificates": certificates })
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        if !self.host_allowed(host) {
            return reply(
                StatusCode::FORBIDDEN,
                json!({"error": "foreign Host refused"}),
            );
        }
        if req.method() == Method::POST && req.headers().contains_key(header::ORIGIN) {
            return reply(
                StatusCode::FORBIDDEN,
                json!({"error": "cross-origin POST refused"}),
            );
        }
        if let Some(token) = &self.token {
            let given = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            if given != Some(token.as_str()) {
                let mut r = reply(
                    StatusCode::UNAUTHORIZED,
                    json!({"error": "bearer token required"}),
                );
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer"),
                );
                return r;
            }
        }
        let path = req.uri().path().to_owned();
        let method = req.method().clone();
        // Bodies are not used; read (bounded) and drop what a client sent.
        let _ = http_body_util::Limited::new(req.into_body(), 64 * 1024)
            .collect()
            .await;
        match (method, path.as_str()) {
            (Method::GET, "/status") => reply(StatusCode::OK, self.status().await),
            (Method::POST, p) if p.starts_with("/certs/") && p.ends_with("/renew") => {
                let name = &p["/certs/".len()..p.len() - "/renew".len()];
                match self.acme.as_ref().map(|a| a.renew(name)) {
                    Some(Ok(())) => {
                        info!(sni = %name, "renewal requested through the admin API");
                        reply(StatusCode::ACCEPTED, json!({"renewing": name}))
                    }
                    Some(Err(e)) => reply(StatusCode::NOT_FOUND, json!({"error": e.to_string()})),
                    None => reply(
                        StatusCode::NOT_FOUND,
                        json!({"error": format!("{name}: no ACME certificate is managed")}),
                    ),
                }
            }
            (_, "/status") => reply(StatusCode::METHOD_NOT_ALLOWED, json!({"error": "use GET"})),
            (_, p) if p.starts_with("/certs/") => {
                reply(StatusCode::METHOD_NOT_ALLOWED, json!({"error": "use POST"}))
            }
            _ => reply(StatusCode::NOT_FOUND, json!({"error": "no such endpoint"})),
        }
    }

    /// Serves the API until `shutdown` is cancelled.
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken) {
        let admin = Arc::new(self);
        info!(addr = %admin.addr, "listening for admin");
        loop {
            let (stream, peer) = tokio::select! {
                () = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(_) => continue,
                },
            };
            let admin = Arc::clone(&admin);
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let admin = Arc::clone(&admin);
                    async move { Ok::<_, Infallible>(admin.handle(req).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(std::time::Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), service);
                tokio::select! {
                    result = conn => if let Err(e) = result {
                        debug!(%peer, error = %e, "admin connection ended");
                    },
                    () = shutdown.cancelled() => {}
                }
            });
        }
    }
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

/// A request to a running instance's admin API: (status, body).
pub async fn call(
    addr: SocketAddr,
    method: Method,
    path: &str,
    token: Option<&str>,
) -> anyhow::Result<(StatusCode, String)> {
    use anyhow::Context as _;
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("no running instance answers on the admin address {addr}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, addr.to_string());
    if let Some(token) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let res = sender
        .send_request(req.body(Full::new(Bytes::new()))?)
        .await?;
    let status = res.status();
    let body = res.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
