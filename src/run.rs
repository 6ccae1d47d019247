//! Wiring: configuration to proxy, listeners, signals, reload.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use std::sync::Arc;

use portunus_proxy::{SiteSettings, Timeouts};
use tracing::info;

use crate::instance::Instance;
use crate::logging::LogFormat;
use crate::workers::Workers;

use crate::config::{self, Config, Listen, Site, Tls};

/// `portunus run -c FILE`.
pub fn run_file(path: PathBuf, format: LogFormat) -> anyhow::Result<()> {
    let config = config::load(&path)?;
    crate::logging::init(format, &config.log)?;
    run_config(config, Some(path))
}

/// The configuration served when there is no configuration file.
pub const EMBEDDED_DEFAULT: &str = include_str!("default.toml");

/// `portunus run` without a configuration file.
pub fn run_embedded_default(format: LogFormat) -> anyhow::Result<()> {
    let config = config::parse(Path::new("(embedded default)"), EMBEDDED_DEFAULT)
        .context("the embedded default configuration is invalid")?;
    crate::logging::init(format, &config.log)?;
    info!("no portunus.toml here: serving the embedded default (see config.example.toml)");
    run_config(config, None)
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
        storage: crate::config::default_storage(),
        listen: Listen {
            http: (!internal).then(|| SocketAddr::from(([0u16; 8], port))),
            https: internal.then(|| SocketAddr::from(([0u16; 8], port))),
            ..Listen::default()
        },
        trusted_proxies: Vec::new(),
        timeouts: Timeouts::default(),
        limits: crate::config::Limits::default(),
        acme: crate::config::Acme::default(),
        log: crate::logging::AccessLog::default(),
        sites: vec![Site {
            settings: SiteSettings::new("--from", [host])
                .upstreams([upstream])
                .tls(internal),
            tls: if internal { Tls::Internal } else { Tls::Off },
        }],
        docker: None,
        workers: 0,
    })
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

/// Serves `config` until SIGTERM or SIGINT; reloads on SIGHUP and when `path` changes.
pub fn run_config(config: Config, path: Option<PathBuf>) -> anyhow::Result<()> {
    ensure_storage(&config.storage)?;
    let runtime = crate::workers::runtime()?;
    let workers = Arc::new(Workers::start(
        runtime.handle().clone(),
        crate::workers::count(config.workers),
    )?);
    let served = runtime.block_on(serve(config, path, Arc::clone(&workers)));
    workers.stop();
    served
}

async fn serve(config: Config, path: Option<PathBuf>, workers: Arc<Workers>) -> anyhow::Result<()> {
    info!(workers = workers.handles().len(), "starting");
    let instance = Instance::new(config, path.clone(), workers).await?;
    instance.start().await?;
    instance.start_discovery();
    spawn_signal_handlers(Arc::clone(&instance))?;
    if let Some(path) = path {
        crate::watch::spawn(Arc::clone(&instance), path);
    }
    instance.wait().await;
    info!("portunus stopped");
    Ok(())
}

fn spawn_signal_handlers(instance: Arc<Instance>) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => { info!("SIGTERM: shutting down"); break; }
                _ = int.recv() => { info!("SIGINT: shutting down"); break; }
                _ = hup.recv() => {
                    info!("SIGHUP: reloading");
                    let instance = Arc::clone(&instance);
                    tokio::spawn(async move { let _ = instance.reload().await; });
                }
            }
        }
        instance.shutdown.cancel();
    });
    Ok(())
}
