//! A running instance: proxy, certificates, listeners, and reloading all of them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use portunus_acme::AcmeManager;
use portunus_docker::{DiscoveredSite, Discovery, DockerSettings, TlsMode};
use portunus_proxy::{Handler, Proxy, RouteSettings, SiteSettings};
use portunus_store::{CertKeeper, CertResolver, CertSource, FsStorage, LocalCa};
use rustls::crypto::CryptoProvider;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::admin::Admin;
use crate::config::{self, Config, Tls};
use crate::workers::{Workers, bind_each};

/// The listeners an instance may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Http,
    Https,
    Admin,
    Metrics,
}

#[derive(Debug)]
struct Running {
    configured: SocketAddr,
    local: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// The outcome of the last reload, for `/status`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ReloadStatus {
    pub ok: bool,
    pub at: u64,
    pub errors: Vec<String>,
}

/// Everything a running Portunus holds; shared by listeners, signals, the watcher and the
/// admin API.
pub struct Instance {
    pub path: Option<PathBuf>,
    pub proxy: Proxy,
    pub resolver: Arc<CertResolver>,
    provider: Arc<CryptoProvider>,
    pub shutdown: CancellationToken,
    config: Mutex<Config>,
    pub storage: Mutex<Option<FsStorage>>,
    pub acme: Mutex<Option<AcmeManager>>,
    keeper: Mutex<Option<(CancellationToken, JoinHandle<()>)>>,
    listeners: Mutex<HashMap<Kind, Running>>,
    reload_lock: tokio::sync::Mutex<()>,
    pub last_reload: Mutex<Option<ReloadStatus>>,
    discovered: Mutex<Vec<DiscoveredSite>>,
    workers: Arc<Workers>,
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Locks `m`, ignoring poisoning (the data stays usable).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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

fn needs_tls(config: &Config) -> bool {
    config.sites.iter().any(|s| s.tls != Tls::Off)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Instance {
    /// Builds the instance for `config`: certificates loaded, nothing listening yet.
    pub async fn new(
        config: Config,
        path: Option<PathBuf>,
        workers: Arc<Workers>,
    ) -> anyhow::Result<Arc<Self>> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let resolver = Arc::new(CertResolver::new());
        let proxy = Proxy::new(config.proxy_settings()).context("invalid sites")?;
        proxy.set_resolver(Arc::clone(&resolver));
        let instance = Arc::new(Self {
            path,
            proxy,
            resolver,
            provider,
            shutdown: CancellationToken::new(),
            config: Mutex::new(config.clone()),
            storage: Mutex::new(None),
            acme: Mutex::new(None),
            keeper: Mutex::new(None),
            listeners: Mutex::new(HashMap::new()),
            reload_lock: tokio::sync::Mutex::new(()),
            last_reload: Mutex::new(None),
            discovered: Mutex::new(Vec::new()),
            workers,
        });
        instance.apply_certificates(&config).await?;
        Ok(instance)
    }

    /// The configuration file in service.
    pub fn config(&self) -> Config {
        lock(&self.config).clone()
    }

    /// What is served: the configuration file's sites plus the discovered ones.
    pub fn serving(&self) -> Config {
        self.effective(&self.config())
    }

    /// The addresses listeners actually bound (port 0 resolved).
    pub fn local_addr(&self, kind: Kind) -> Option<SocketAddr> {
        lock(&self.listeners).get(&kind).map(|r| r.local)
    }

    fn proxy_settings(&self, config: &Config) -> portunus_proxy::ProxySettings {
        let mut settings = config
            .proxy_settings()
            .challenges(Arc::clone(self.resolver.challenges()));
        if let Some(https) = self.local_addr(Kind::Https) {
            settings = settings.https_port(https.port());
        }
        settings
    }

    /// Storage, certificates from files and the local CA, and ACME names, for `config`.
    async fn apply_certificates(self: &Arc<Self>, config: &Config) -> anyhow::Result<()> {
        self.resolver
            .set_default_sni(config.listen.default_sni.as_deref());
        let wants_storage = needs_tls(config) || config.listen.admin.is_some();
        if wants_storage && lock(&self.storage).is_none() {
            let storage = FsStorage::open(&config.storage).context("storage directory")?;
            *lock(&self.storage) = Some(storage);
        }
        let storage = lock(&self.storage).clone();
        let Some(storage) = storage else {
            return Ok(());
        };

        // Local CA and file certificates: a fresh keeper for the new set of sources.
        let mut keeper = CertKeeper::new(
            Arc::clone(&self.resolver),
            Arc::new(storage.clone()),
            Arc::clone(&self.provider),
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
        let stop = self.shutdown.child_token();
        let task = tokio::spawn(keeper.run(stop.clone().cancelled_owned()));
        if let Some((old, _)) = lock(&self.keeper).replace((stop, task)) {
            old.cancel();
        }

        // ACME.
        let names = acme_names(config);
        let existing = lock(&self.acme).clone();
        let existing_is_none = existing.is_none();
        let acme = match existing {
            Some(acme) => Some(acme),
            None if names.is_empty() => None,
            None => {
                let acme = AcmeManager::new(
                    config.acme.config(),
                    Arc::new(storage.clone()),
                    Arc::clone(&self.resolver),
                    Arc::clone(&self.provider),
                )
                .context("ACME")?;
                *lock(&self.acme) = Some(acme.clone());
                Some(acme)
            }
        };
        if let Some(acme) = acme {
            acme.set_names(names);
            for error in acme.load().await {
                error!(error = %error, cause = ?std::error::Error::source(&error), "stored certificate skipped");
            }
            // Started after the first load, so stored certificates are in service first.
            if existing_is_none {
                tokio::spawn(acme.run(self.shutdown.clone().cancelled_owned()));
            }
        }
        Ok(())
    }

    /// Opens, moves or closes listeners so they match `config`.
    async fn apply_listeners(self: &Arc<Self>, config: &Config) -> anyhow::Result<()> {
        let mut wanted: Vec<(Kind, SocketAddr)> = Vec::new();
        if let Some(a) = config.listen.http {
            wanted.push((Kind::Http, a));
        }
        if let Some(a) = config.listen.https.filter(|_| needs_tls(config)) {
            wanted.push((Kind::Https, a));
        }
        if needs_tls(config) && config.listen.https.is_none() {
            bail!("TLS sites need an https listener in [listen]");
        }
        if let Some(a) = config.listen.admin {
            wanted.push((Kind::Admin, a));
        }
        if let Some(a) = config.listen.metrics {
            wanted.push((Kind::Metrics, a));
        }
        if wanted
            .iter()
            .all(|(k, _)| matches!(k, Kind::Admin | Kind::Metrics))
        {
            bail!("no listener to serve: add `http` or `https` to [listen]");
        }
        // Close what is gone or moved.
        let stale: Vec<Running> = {
            let mut listeners = lock(&self.listeners);
            let gone: Vec<Kind> = listeners
                .iter()
                .filter(|(k, r)| !wanted.contains(&(**k, r.configured)))
                .map(|(k, _)| *k)
                .collect();
            gone.iter().filter_map(|k| listeners.remove(k)).collect()
        };
        for running in stale {
            info!(addr = %running.local, "closing listener");
            running.stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(1), running.task).await;
        }
        // Open what is new.
        for (kind, addr) in wanted {
            if lock(&self.listeners).contains_key(&kind) {
                continue;
            }
            // The proxy listeners get one socket per worker; admin and metrics one in all.
            let per_worker = matches!(kind, Kind::Http | Kind::Https);
            let n = if per_worker {
                self.workers.handles().len()
            } else {
                1
            };
            let sockets = bind_each(addr, n)?;
            let local = sockets
                .first()
                .and_then(|s| s.local_addr().ok())
                .unwrap_or(addr);
            let stop = self.shutdown.child_token();
            let tls = match kind {
                Kind::Https => Some(
                    portunus_proxy::server_config(
                        Arc::clone(&self.resolver),
                        Arc::clone(&self.provider),
                    )
                    .context("TLS configuration")?,
                ),
                _ => None,
            };
            if per_worker {
                let what = if kind == Kind::Https { "HTTPS" } else { "HTTP" };
                info!(addr = %local, workers = n, "listening for {what}");
            }
            let mut tasks = Vec::new();
            for (socket, worker) in sockets.into_iter().zip(self.workers.handles()) {
                let this = Arc::clone(self);
                let token = stop.clone();
                let tls = tls.clone();
                tasks.push(worker.spawn(async move {
                    let listener = match tokio::net::TcpListener::from_std(socket) {
                        Ok(l) => l,
                        Err(e) => return error!(error = %e, "listener failed"),
                    };
                    let result = match (kind, tls) {
                        (Kind::Https, Some(tls)) => {
                            this.proxy
                                .serve_tls(listener, tls, token.cancelled_owned())
                                .await
                        }
                        (Kind::Http | Kind::Https, _) => {
                            this.proxy.serve(listener, token.cancelled_owned()).await
                        }
                        (Kind::Admin | Kind::Metrics, _) => {
                            Admin::new(Arc::clone(&this), local, kind == Kind::Metrics)
                                .serve(listener, token)
                                .await;
                            Ok(())
                        }
                    };
                    if let Err(e) = result {
                        error!(error = %e, "listener failed");
                    }
                }));
            }
            let task = tokio::spawn(async move {
                for task in tasks {
                    let _ = task.await;
                }
            });
            lock(&self.listeners).insert(
                kind,
                Running {
                    configured: addr,
                    local,
                    stop,
                    task,
                },
            );
        }
        Ok(())
    }

    /// Starts serving `config` (certificates are already loaded).
    pub async fn start(self: &Arc<Self>) -> anyhow::Result<()> {
        let config = self.config();
        self.apply_listeners(&config).await?;
        // The real HTTPS port (port 0 in tests) goes into redirects.
        self.proxy
            .update(&self.proxy_settings(&config))
            .context("invalid sites")?;
        info!(sites = config.sites.len(), "portunus started");
        Ok(())
    }

    /// Re-reads the configuration file and applies it: certificates, sites, listeners. An
    /// invalid file changes nothing; the outcome is kept for `/status`.
    ///
    /// Boxed: the admin API that calls it is itself started by a reload.
    pub fn reload(
        self: &Arc<Self>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), Vec<String>>> + Send>> {
        let this = Arc::clone(self);
        Box::pin(async move { this.reload_serialized().await })
    }

    async fn reload_serialized(self: &Arc<Self>) -> Result<(), Vec<String>> {
        let _serial = self.reload_lock.lock().await;
        let Some(path) = self.path.clone() else {
            return Err(vec!["no configuration file to reload".to_owned()]);
        };
        let result = self.reload_from(&path).await;
        let status = ReloadStatus {
            ok: result.is_ok(),
            at: now(),
            errors: result.clone().err().unwrap_or_default(),
        };
        match &result {
            Ok(()) => info!(path = %path.display(), "configuration reloaded"),
            Err(errors) => {
                error!(path = %path.display(), errors = %errors.join("; "), "reload refused; the running configuration keeps serving")
            }
        }
        *lock(&self.last_reload) = Some(status);
        result
    }

    async fn reload_from(self: &Arc<Self>, path: &std::path::Path) -> Result<(), Vec<String>> {
        let config = match config::load(path) {
            Ok(c) => c,
            Err(config::LoadError::Invalid(errors)) => {
                return Err(errors.0.iter().map(ToString::to_string).collect());
            }
            Err(e) => return Err(vec![e.to_string()]),
        };
        // Check the sites compile before touching anything.
        let effective = self.effective(&config);
        Proxy::new(effective.proxy_settings()).map_err(|e| vec![format!("{e:#}")])?;
        self.apply_certificates(&effective)
            .await
            .map_err(|e| vec![format!("{e:#}")])?;
        self.apply_listeners(&effective)
            .await
            .map_err(|e| vec![format!("{e:#}")])?;
        self.proxy
            .update(&self.proxy_settings(&effective))
            .map_err(|e| vec![format!("{e:#}")])?;
        *lock(&self.config) = config;
        Ok(())
    }

    /// Waits until shutdown, then until every listener has drained.
    pub async fn wait(self: &Arc<Self>) {
        self.shutdown.cancelled().await;
        let tasks: Vec<JoinHandle<()>> =
            lock(&self.listeners).drain().map(|(_, r)| r.task).collect();
        for task in tasks {
            let _ = task.await;
        }
        if let Some((_, keeper)) = lock(&self.keeper).take() {
            keeper.abort();
        }
    }

    /// The configuration file's sites plus the sites discovered from containers.
    fn effective(&self, config: &Config) -> Config {
        let discovered = lock(&self.discovered).clone();
        let mut config = config.clone();
        for d in discovered {
            let origin = format!("container {}", d.containers.join(","));
            let mut settings = SiteSettings::new(origin, [d.host.clone()]);
            if !d.upstreams.is_empty() {
                settings = settings.upstreams(d.upstreams.clone());
            }
            for (path, pool) in &d.routes {
                settings = settings.route(RouteSettings::new(
                    path.clone(),
                    Handler::Upstreams(pool.clone()),
                ));
            }
            let tls = match d.tls {
                TlsMode::Acme => Tls::Acme,
                TlsMode::Internal => Tls::Internal,
                _ => Tls::Off,
            };
            let settings = settings.tls(tls != Tls::Off);
            config.sites.push(config::Site { settings, tls });
        }
        config
    }

    /// Puts the sites discovered from containers in service (certificates, then routes).
    pub async fn apply_discovered(self: &Arc<Self>, sites: Vec<DiscoveredSite>) {
        let _serial = self.reload_lock.lock().await;
        *lock(&self.discovered) = sites;
        let effective = self.effective(&self.config());
        if let Err(e) = self.apply_certificates(&effective).await {
            error!(error = %format!("{e:#}"), "discovered sites: certificates");
        }
        if let Err(e) = self.apply_listeners(&effective).await {
            error!(error = %format!("{e:#}"), "discovered sites: listeners");
        }
        if let Err(e) = self.proxy.update(&self.proxy_settings(&effective)) {
            error!(error = %format!("{e:#}"), "discovered sites refused");
        }
    }

    /// Follows the Docker engine when `[docker]` is configured.
    pub fn start_discovery(self: &Arc<Self>) {
        let config = self.config();
        let Some(docker) = config.docker.clone() else {
            return;
        };
        let mut settings = DockerSettings::new(docker.exposed_by_default);
        settings.endpoint = docker.endpoint.clone();
        settings.rules.network = docker.network.clone();
        settings.allowed_domains = docker.allowed_domains.clone();
        settings.reserved_hosts = config
            .sites
            .iter()
            .flat_map(|s| {
                s.settings
                    .hosts
                    .iter()
                    .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
            })
            .collect();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let shutdown = self.shutdown.clone();
        tokio::spawn(Discovery::new(settings).run(
            move |sites| {
                let _ = tx.send(sites);
            },
            shutdown.cancelled_owned(),
        ));
        let this = Arc::clone(self);
        tokio::spawn(async move {
            while let Some(mut sites) = rx.recv().await {
                while let Ok(newer) = rx.try_recv() {
                    sites = newer;
                }
                this.apply_discovered(sites).await;
            }
        });
    }
}
