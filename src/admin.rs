//! The admin API on `listen.admin`: `GET /status`, `GET /metrics`, `POST /reload`,
//! `POST /certs/<name>/renew`; and the metrics-only listener on `listen.metrics`.
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
use portunus_store::parse_info;

use crate::config::Tls;
use crate::instance::{Instance, lock};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

/// The admin API (or, with `metrics_only`, the metrics listener) of an instance.
#[derive(Debug, Clone)]
pub struct Admin {
    instance: Arc<Instance>,
    addr: SocketAddr,
    metrics_only: bool,
}

impl Admin {
    pub fn new(instance: Arc<Instance>, addr: SocketAddr, metrics_only: bool) -> Self {
        Self {
            instance,
            addr,
            metrics_only,
        }
    }

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

    /// Every certificate in service: ACME state where ACME manages it, else what the
    /// certificate itself says.
    fn certificates(&self) -> Vec<serde_json::Value> {
        let acme = lock(&self.instance.acme).clone();
        let managed = acme.as_ref().map(AcmeManager::status).unwrap_or_default();
        let mut out: Vec<serde_json::Value> = managed
            .iter()
            .map(|s| {
                json!({
                    "name": s.name,
                    "names": [s.name],
                    "source": "acme",
                    "issuer": s.issuer,
                    "not_after": s.not_after,
                    "next_renewal": s.next_renewal,
                    "last_error": s.last_error,
                    "failures": s.failures,
                })
            })
            .collect();
        for (name, key) in self.instance.resolver.entries() {
            if managed.iter().any(|s| s.name == name) {
                continue;
            }
            let Some(info) = key
                .cert
                .first()
                .and_then(|leaf| parse_info(leaf, &name).ok())
            else {
                continue;
            };
            out.push(json!({
                "name": name,
                "names": info.names,
                "source": "local",
                "issuer": info.issuer,
                "not_after": info.not_after,
                "next_renewal": null,
                "last_error": null,
                "failures": 0,
            }));
        }
        out
    }

    fn status(&self) -> serde_json::Value {
        let config = self.instance.serving();
        let upstreams = self.instance.proxy.upstreams();
        let sites: Vec<serde_json::Value> = config
            .sites
            .iter()
            .map(|s| {
                let label = s.settings.label();
                let health = |route: &str| -> Vec<serde_json::Value> {
                    upstreams
                        .iter()
                        .filter(|u| u.site == label && u.route == route)
                        .map(|u| json!({"url": u.url, "healthy": u.healthy, "in_flight": u.in_flight}))
                        .collect()
                };
                json!({
                    "origin": s.settings.origin,
                    "hosts": s.settings.hosts,
                    "tls": match &s.tls {
                        Tls::Acme => "acme",
                        Tls::Internal => "internal",
                        Tls::Off => "off",
                        Tls::Files { .. } => "files",
                    },
                    "upstreams": health(""),
                    "routes": s.settings.routes.iter().map(|r| json!({
                        "path": r.path,
                        "strip_prefix": r.strip_prefix,
                        "upstreams": health(r.path.trim_end_matches('/')),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let reload = lock(&self.instance.last_reload).clone();
        json!({
            "sites": sites,
            "certificates": self.certificates(),
            "reload": reload,
        })
    }

    /// The Prometheus text exposition of everything.
    fn metrics(&self) -> String {
        let mut out = self.instance.proxy.metrics_text();
        out.push_str("# HELP portunus_certificate_expiry_timestamp_seconds End of validity of each certificate in service.\n");
        out.push_str("# TYPE portunus_certificate_expiry_timestamp_seconds gauge\n");
        for cert in self.certificates() {
            if let (Some(name), Some(not_after)) =
                (cert["name"].as_str(), cert["not_after"].as_u64())
            {
                out.push_str(&format!(
                    "portunus_certificate_expiry_timestamp_seconds{{name=\"{}\"}} {not_after}\n",
                    portunus_proxy::escape_label(name)
                ));
            }
        }
        let (ok, failed) = lock(&self.instance.acme)
            .clone()
            .map(|a| a.orders_total())
            .unwrap_or((0, 0));
        out.push_str("# HELP portunus_acme_orders_total ACME orders finished, by result.\n");
        out.push_str("# TYPE portunus_acme_orders_total counter\n");
        out.push_str(&format!(
            "portunus_acme_orders_total{{result=\"success\"}} {ok}\n"
        ));
        out.push_str(&format!(
            "portunus_acme_orders_total{{result=\"failure\"}} {failed}\n"
        ));
        out
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_owned();
        let method = req.method().clone();
        if self.metrics_only {
            return match (method, path.as_str()) {
                (Method::GET, "/metrics") => metrics_reply(self.metrics()),
                _ => reply(
                    StatusCode::NOT_FOUND,
                    json!({"error": "only /metrics here"}),
                ),
            };
        }
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
        let token = self.instance.config().listen.admin_token;
        if let Some(token) = &token {
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
        // Bodies are not used; read (bounded) and drop what a client sent.
        let _ = http_body_util::Limited::new(req.into_body(), 64 * 1024)
            .collect()
            .await;
        match (method, path.as_str()) {
            (Method::GET, "/status") => reply(StatusCode::OK, self.status()),
            (Method::GET, "/metrics") => metrics_reply(self.metrics()),
            (Method::POST, "/reload") => match self.instance.reload().await {
                Ok(()) => reply(StatusCode::OK, json!({"reloaded": true})),
                Err(errors) => reply(
                    StatusCode::BAD_REQUEST,
                    json!({"reloaded": false, "errors": errors}),
                ),
            },
            (Method::POST, p) if p.starts_with("/certs/") && p.ends_with("/renew") => {
                let name = &p["/certs/".len()..p.len() - "/renew".len()];
                match lock(&self.instance.acme).clone().map(|a| a.renew(name)) {
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
            (_, "/status" | "/metrics") => {
                reply(StatusCode::METHOD_NOT_ALLOWED, json!({"error": "use GET"}))
            }
            (_, "/reload") => reply(StatusCode::METHOD_NOT_ALLOWED, json!({"error": "use POST"})),
            (_, p) if p.starts_with("/certs/") => {
                reply(StatusCode::METHOD_NOT_ALLOWED, json!({"error": "use POST"}))
            }
            _ => reply(StatusCode::NOT_FOUND, json!({"error": "no such endpoint"})),
        }
    }

    /// Serves until `shutdown` is cancelled.
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken) {
        let admin = Arc::new(self);
        let what = if admin.metrics_only {
            "metrics"
        } else {
            "admin"
        };
        info!(addr = %admin.addr, "listening for {what}");
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

fn metrics_reply(text: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(text)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
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
