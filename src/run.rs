//! Wiring: configuration to proxy, listeners, signals, reload.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use std::sync::Arc;

use portunus_acme::AcmeManager;
use portunus_proxy::{Proxy, SiteSettings, Timeouts};
use portunus_store::{CertKeeper, CertResolver, CertSource, Challenges, FsStorage, LocalCa};

use crate::admin::Admin;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{self, Config, Listen, Site, Tls};

/// `portunus run -c FILE`.
pub fn run_file(path: PathBuf) -> anyhow::Result<()> {
    let config = config::load(&path)?;
    run_config(config)
}

/// The configuration served when there is no configuration file.
pub const EMBEDDED_DEFAULT: &str = include_str!("default.toml");

/// `portunus run` without a configuration file.
pub fn run_embedded_default() -> anyhow::Result<()> {
    info!("no portunus.toml here: serving the embedded default (see config.example.toml)");
    let config = config::parse(Path::new("(embedded default)"), EMBEDDED_DEFAULT)
        .context("the embedded default configuration is invalid")?;
    run_config(config)
}

/// `portunus proxy --from HOST --to UPSTREAM`: one plain-HTTP site, no configuration file.
pub fn one_site(from: &str, to: &str, internal: bool) -> anyhow::Result<Config> {
    let from_authority = from
        .strip_prefix("http://")
        .unwrap_or(from)
        .trim_end_matches('/');
    if from_authority.contains('/') || from.contains("://") && !from.starts_with("http://") {
        bail!("--from must be HOST, HOST:PORT or http://HOST:PORT, got `{from}`");
    }
    let host = portunus_router::split_host_port(from_authority);
    let port = match from_authority
        .strip_prefix(host)
        .and_then(|r| r.strip_prefix(':'))
    {
        Some(p) => p
            .parse::<u16>()
            .with_context(|| format!("--from has an invalid port: `{from}`"))?,
        None if internal => 443,
        None => 80,
    };
    portunus_router::HostPattern::parse(host)
        .with_context(|| format!("--from has an invalid host: `{from}`"))?;
    let upstream = if to.contains("://") {
        to.to_owned()
    } else {
        format!("http://{to}")
    };
    portunus_proxy::check_upstream_url(&upstream)
        .with_context(|| format!("--to is not a usable upstream: `{to}`"))?;
    Ok(Config {
        path: PathBuf::from("(command line)"),
        storage: crate::config::default_storage(),
        listen: Listen {
            http: (!internal).then(|| SocketAddr::from(([0u16; 8], port))),
            https: internal.then(|| SocketAddr::from(([0u16; 8], port))),
            ..Listen::default()
        },
        trusted_proxies: Vec::new(),
        timeouts: Timeouts::default(),
        max_header_bytes: 64 * 1024,
        h2_max_streams: 128,
        acme: crate::config::Acme::default(),
        sites: vec![Site {
            settings: SiteSettings::new("--from", [host])
                .upstreams([upstream])
                .tls(internal),
            tls: if internal { Tls::Internal } else { Tls::Off },
        }],
        docker: false,
    })
}

/// Warns about what this build does not do yet.
fn unsupported(config: &Config) -> anyhow::Result<()> {
    if config.docker {
        warn!("[docker] is configured but container discovery is not part of this build yet");
    }
    Ok(())
}

/// Creates the storage directory with mode 0700 if it is missing.
fn ensure_storage(dir: &Path) -> anyhow::Result<()> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(dir)
        .with_context(|| format!("cannot create storage directory {}", dir.display()))
}

/// Binds a listener; `[::]` falls back to `0.0.0.0` on hosts without IPv6.
async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    match TcpListener::bind(addr).await {
        Ok(l) => Ok(l),
        Err(e) if addr.ip().is_unspecified() && addr.is_ipv6() => {
            let v4 = SocketAddr::from(([0, 0, 0, 0], addr.port()));
            TcpListener::bind(v4)
                .await
                .with_context(|| format!("cannot listen on {addr} ({e}) nor on {v4}"))
        }
        Err(e) => Err(e).with_context(|| format!("cannot listen on {addr}")),
    }
}

/// Serves `config` until SIGTERM or SIGINT; reloads on SIGHUP.
pub fn run_config(config: Config) -> anyhow::Result<()> {
    unsupported(&config)?;
    ensure_storage(&config.storage)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(config))
}

/// What the running instance adds to every configuration's proxy settings.
#[derive(Debug, Clone)]
struct Wiring {
    https_port: Option<u16>,
    challenges: Arc<Challenges>,
}

impl Wiring {
    fn settings(&self, config: &Config) -> portunus_proxy::ProxySettings {
        let settings = config
            .proxy_settings()
            .challenges(Arc::clone(&self.challenges));
        match self.https_port {
            Some(port) => settings.https_port(port),
            None => settings,
        }
    }
}

/// Whether a site's certificate comes from the local CA (`tls = "internal"`, or `"acme"`
/// with `acme.ca = "internal"`).
fn internal(config: &Config, tls: &Tls) -> bool {
    *tls == Tls::Internal || *tls == Tls::Acme && config.acme.internal
}

/// The host names whose certificates come from ACME.
fn acme_names(config: &Config) -> Vec<String> {
    config
        .sites
        .iter()
        .filter(|s| s.tls == Tls::Acme && !config.acme.internal)
        .flat_map(|s| s.settings.hosts.iter().cloned())
        .collect()
}

/// The sites as `/status` shows them.
fn sites_json(config: &Config) -> Vec<serde_json::Value> {
    config
        .sites
        .iter()
        .map(|s| {
            serde_json::json!({
                "origin": s.settings.origin,
                "hosts": s.settings.hosts,
                "tls": match &s.tls {
                    Tls::Acme => "acme",
                    Tls::Internal => "internal",
                    Tls::Off => "off",
                    Tls::Files { .. } => "files",
                },
                "routes": s.settings.routes.iter().map(|r| r.path.clone()).collect::<Vec<_>>(),
            })
        })
        .collect()
}

/// Loads (or issues) every certificate of the TLS sites into `resolver`, before any
/// listener accepts. Unusable certificates are reported with their path and skipped.
async fn load_certificates(
    config: &Config,
    storage: &FsStorage,
    resolver: &Arc<CertResolver>,
    provider: &Arc<rustls::crypto::CryptoProvider>,
) -> anyhow::Result<CertKeeper> {
    let mut keeper = CertKeeper::new(
        Arc::clone(resolver),
        Arc::new(storage.clone()),
        Arc::clone(provider),
    );
    if config.sites.iter().any(|s| internal(config, &s.tls)) {
        let ca_dir = config.storage.join("ca");
        let ca = LocalCa::load_or_create(&ca_dir).context("local CA")?;
        info!(root = %ca_dir.join("root.pem").display(), "local CA ready");
        keeper = keeper.local_ca(Arc::new(ca));
    }
    for site in &config.sites {
        keeper = match &site.tls {
            tls if internal(config, tls) => keeper.source(CertSource::Internal {
                names: site.settings.hosts.clone(),
            }),
            Tls::Files { cert, key } => keeper.source(CertSource::Files {
                cert: cert.clone(),
                key: key.clone(),
            }),
            Tls::Off | Tls::Acme | Tls::Internal => keeper,
        };
    }
    for error in keeper.load().await {
        error!(error = %error, cause = ?std::error::Error::source(&error), "certificate skipped; the other sites keep serving");
    }
    Ok(keeper)
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let resolver = Arc::new(CertResolver::new());
    resolver.set_default_sni(config.listen.default_sni.as_deref());
    let needs_tls = config.sites.iter().any(|s| s.tls != Tls::Off);

    let storage = if needs_tls || config.listen.admin.is_some() {
        Some(FsStorage::open(&config.storage).context("storage directory")?)
    } else {
        None
    };
    let keeper = match (&storage, needs_tls) {
        (Some(storage), true) => {
            Some(load_certificates(&config, storage, &resolver, &provider).await?)
        }
        _ => None,
    };
    let names = acme_names(&config);
    let acme = match &storage {
        Some(storage) if !names.is_empty() => {
            let acme = AcmeManager::new(
                config.acme.config(),
                Arc::new(storage.clone()),
                Arc::clone(&resolver),
                Arc::clone(&provider),
            )
            .context("ACME")?;
            acme.set_names(names);
            for error in acme.load().await {
                error!(error = %error, cause = ?std::error::Error::source(&error), "stored certificate skipped");
            }
            Some(acme)
        }
        _ => None,
    };
    let http = match config.listen.http {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let https = match (needs_tls, config.listen.https) {
        (true, Some(addr)) => Some(bind(addr).await?),
        (true, None) => bail!("TLS sites need an https listener in [listen]"),
        (false, _) => None,
    };
    if http.is_none() && https.is_none() {
        bail!("no listener to serve: add `http` or `https` to [listen]");
    }
    let wiring = Wiring {
        https_port: https
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| a.port()),
        challenges: Arc::clone(resolver.challenges()),
    };
    let proxy = Proxy::new(wiring.settings(&config)).context("invalid sites")?;

    let shutdown = CancellationToken::new();
    if let Some(addr) = config.listen.admin {
        let listener = bind(addr).await.context("admin listener")?;
        let admin = Admin {
            addr: listener.local_addr().unwrap_or(addr),
            token: config.listen.admin_token.clone(),
            acme: acme.clone(),
            storage: storage.clone(),
            sites: sites_json(&config),
        };
        tokio::spawn(admin.serve(listener, shutdown.clone()));
    }
    spawn_signal_handlers(shutdown.clone(), proxy.clone(), config.path.clone(), wiring)?;
    info!(sites = config.sites.len(), "portunus started");
    let plain = async {
        match http {
            Some(listener) => proxy
                .serve(listener, shutdown.clone().cancelled_owned())
                .await
                .context("serving HTTP"),
            None => Ok(()),
        }
    };
    let secure = async {
        match https {
            Some(listener) => {
                let tls =
                    portunus_proxy::server_config(Arc::clone(&resolver), Arc::clone(&provider))
                        .context("TLS configuration")?;
                proxy
                    .serve_tls(listener, tls, shutdown.clone().cancelled_owned())
                    .await
                    .context("serving HTTPS")
            }
            None => Ok(()),
        }
    };
    let refresh = async {
        if let Some(keeper) = keeper {
            keeper.run(shutdown.clone().cancelled_owned()).await;
        }
    };
    let renew = async {
        if let Some(acme) = acme {
            acme.run(shutdown.clone().cancelled_owned()).await;
        }
    };
    let (plain, secure, (), ()) = tokio::join!(plain, secure, refresh, renew);
    plain?;
    secure?;
    info!("portunus stopped");
    Ok(())
}

fn spawn_signal_handlers(
    shutdown: CancellationToken,
    proxy: Proxy,
    path: PathBuf,
    wiring: Wiring,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => { info!("SIGTERM: shutting down"); break; }
                _ = int.recv() => { info!("SIGINT: shutting down"); break; }
                _ = hup.recv() => reload(&proxy, &path, &wiring),
            }
        }
        shutdown.cancel();
    });
    Ok(())
}

/// Re-reads the configuration file and swaps in its sites; an invalid file changes nothing.
fn reload(proxy: &Proxy, path: &Path, wiring: &Wiring) {
    if path == Path::new("(command line)") {
        info!("SIGHUP: nothing to reload without a configuration file");
        return;
    }
    let result = config::load(path)
        .map_err(anyhow::Error::from)
        .and_then(|c| unsupported(&c).map(|()| c))
        .and_then(|c| {
            proxy
                .update(&wiring.settings(&c))
                .map_err(anyhow::Error::from)
        });
    match result {
        Ok(()) => info!(path = %path.display(), "configuration reloaded"),
        Err(e) => {
            error!(path = %path.display(), error = %format!("{e:#}"), "reload refused; the running configuration keeps serving")
        }
    }
}
