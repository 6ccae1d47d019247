//! Wiring: configuration to proxy, listeners, signals, reload.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use portunus_proxy::{Proxy, SiteSettings, Timeouts};
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
pub fn one_site(from: &str, to: &str) -> anyhow::Result<Config> {
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
        storage: PathBuf::new(),
        listen: Listen {
            http: Some(SocketAddr::from(([0u16; 8], port))),
            https: None,
            ..Listen::default()
        },
        trusted_proxies: Vec::new(),
        timeouts: Timeouts::default(),
        max_header_bytes: 64 * 1024,
        sites: vec![Site {
            settings: SiteSettings::new("--from", [host]).upstreams([upstream]),
            tls: Tls::Off,
        }],
        docker: false,
    })
}

/// Refuses what this build cannot serve yet, with the site's position.
fn unsupported(config: &Config) -> anyhow::Result<()> {
    for site in &config.sites {
        let mode = match &site.tls {
            Tls::Off => continue,
            Tls::Acme => "acme",
            Tls::Internal => "internal",
            Tls::Files { .. } => "{ cert, key }",
        };
        bail!(
            "{}: tls = {mode} needs HTTPS, which this build does not serve yet; set tls = \"off\"",
            config_origin(&site.settings)
        );
    }
    if config.docker {
        warn!("[docker] is configured but container discovery is not part of this build yet");
    }
    Ok(())
}

fn config_origin(site: &SiteSettings) -> &str {
    &site.origin
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

async fn serve(config: Config) -> anyhow::Result<()> {
    let proxy = Proxy::new(config.proxy_settings()).context("invalid sites")?;
    let Some(http_addr) = config.listen.http else {
        bail!("no listener to serve: add `http` to [listen]");
    };
    let listener = bind(http_addr).await?;

    let shutdown = CancellationToken::new();
    spawn_signal_handlers(shutdown.clone(), proxy.clone(), config.path.clone())?;
    info!(sites = config.sites.len(), "portunus started");
    proxy
        .serve(listener, shutdown.cancelled_owned())
        .await
        .context("serving HTTP")?;
    info!("portunus stopped");
    Ok(())
}

fn spawn_signal_handlers(
    shutdown: CancellationToken,
    proxy: Proxy,
    path: PathBuf,
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
                _ = hup.recv() => reload(&proxy, &path),
            }
        }
        shutdown.cancel();
    });
    Ok(())
}

/// Re-reads the configuration file and swaps in its sites; an invalid file changes nothing.
fn reload(proxy: &Proxy, path: &Path) {
    if path == Path::new("(command line)") {
        info!("SIGHUP: nothing to reload without a configuration file");
        return;
    }
    let result = config::load(path)
        .map_err(anyhow::Error::from)
        .and_then(|c| unsupported(&c).map(|()| c))
        .and_then(|c| {
            proxy
                .update(&c.proxy_settings())
                .map_err(anyhow::Error::from)
        });
    match result {
        Ok(()) => info!(path = %path.display(), "configuration reloaded"),
        Err(e) => {
            error!(path = %path.display(), error = %format!("{e:#}"), "reload refused; the running configuration keeps serving")
        }
    }
}
