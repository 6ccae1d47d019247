//! Following the Docker engine: list, inspect, watch events, reconnect.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::time::Duration;

use bollard::Docker;
use bollard::models::HealthStatusEnum;
use bollard::query_parameters::{EventsOptions, ListContainersOptions};
use futures_util::StreamExt;
use tracing::{debug, info, warn};

use crate::labels::{ContainerInfo, Rules, TlsMode, allowed, routes};

/// Errors talking to the engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The endpoint cannot be used.
    #[error("cannot connect to the Docker engine at {endpoint}")]
    Connect {
        /// The endpoint.
        endpoint: String,
        /// The cause.
        #[source]
        source: bollard::errors::Error,
    },
    /// A request failed.
    #[error("Docker engine request failed")]
    Request(#[source] bollard::errors::Error),
}

/// Discovery settings: the `[docker]` table plus the hosts the configuration file owns.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct DockerSettings {
    /// `docker.endpoint`; `None`: `DOCKER_HOST`, else `unix:///var/run/docker.sock`.
    pub endpoint: Option<String>,
    /// Label rules.
    pub rules: Rules,
    /// `docker.allowed_domains`: hosts a container may claim (empty: any).
    pub allowed_domains: Vec<String>,
    /// Hosts defined in the configuration file: never taken over or joined by a container.
    pub reserved_hosts: Vec<String>,
}

impl DockerSettings {
    /// Settings with `exposed_by_default` and the defaults otherwise.
    pub fn new(exposed_by_default: bool) -> Self {
        Self {
            rules: Rules {
                exposed_by_default,
                ..Rules::default()
            },
            ..Self::default()
        }
    }
}

/// One host served by containers.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DiscoveredSite {
    /// The host name.
    pub host: String,
    /// Its certificate source.
    pub tls: TlsMode,
    /// The pool for paths no route matches (empty: none).
    pub upstreams: Vec<String>,
    /// Path routes with their pools.
    pub routes: Vec<(String, Vec<String>)>,
    /// The containers serving it.
    pub containers: Vec<String>,
}

/// The engine endpoint to use.
fn endpoint(settings: &DockerSettings) -> String {
    settings
        .endpoint
        .clone()
        .or_else(|| std::env::var("DOCKER_HOST").ok().filter(|h| !h.is_empty()))
        .unwrap_or_else(|| "unix:///var/run/docker.sock".to_owned())
}

fn connect(endpoint: &str) -> Result<Docker, Error> {
    let result = if endpoint.starts_with("unix://") || endpoint.starts_with('/') {
        Docker::connect_with_unix(endpoint, 30, bollard::API_DEFAULT_VERSION)
    } else {
        Docker::connect_with_http(endpoint, 30, bollard::API_DEFAULT_VERSION)
    };
    result.map_err(|source| Error::Connect {
        endpoint: endpoint.to_owned(),
        source,
    })
}

/// Reads what Portunus needs from every running container.
async fn containers(docker: &Docker) -> Result<Vec<ContainerInfo>, Error> {
    let list = docker
        .list_containers(Some(ListContainersOptions::default()))
        .await
        .map_err(Error::Request)?;
    let mut out = Vec::new();
    for summary in list {
        let Some(id) = summary.id else { continue };
        // A container may vanish between the list and the inspect: skip it.
        let Ok(c) = docker.inspect_container(&id, None).await else {
            continue;
        };
        let config = c.config.unwrap_or_default();
        let env = config
            .env
            .unwrap_or_default()
            .into_iter()
            .filter_map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
            })
            .collect();
        let exposed_ports = config
            .exposed_ports
            .unwrap_or_default()
            .iter()
            .filter_map(|p| p.strip_suffix("/tcp").and_then(|n| n.parse().ok()))
            .collect();
        let mut networks: Vec<(String, std::net::IpAddr)> = c
            .network_settings
            .and_then(|n| n.networks)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(name, ep)| {
                let ip = ep.ip_address.filter(|a| !a.is_empty())?.parse().ok()?;
                Some((name, ip))
            })
            .collect();
        networks.sort();
        let healthy = !matches!(
            c.state.and_then(|s| s.health).and_then(|h| h.status),
            Some(HealthStatusEnum::UNHEALTHY | HealthStatusEnum::STARTING)
        );
        out.push(ContainerInfo {
            name: c.name.unwrap_or(id).trim_start_matches('/').to_owned(),
            labels: config.labels.unwrap_or_default(),
            env,
            exposed_ports,
            networks,
            healthy,
        });
    }
    Ok(out)
}

/// One path of one host: certificate source, healthy upstreams, containers.
type PathEntry = (TlsMode, BTreeSet<String>, BTreeSet<String>);

/// Turns containers into sites, applying the trust rules. Returns the sites and the
/// problems (malformed labels, refused hosts), each naming its container.
pub fn sites(
    infos: &[ContainerInfo],
    settings: &DockerSettings,
) -> (Vec<DiscoveredSite>, Vec<String>) {
    let mut problems = Vec::new();
    // host -> path ("" = default) -> (tls, upstreams, containers)
    let mut hosts: BTreeMap<String, BTreeMap<String, PathEntry>> = BTreeMap::new();
    for info in infos {
        let container_routes = match routes(info, &settings.rules) {
            Ok(r) => r,
            Err(e) => {
                problems.push(format!("{e}; container ignored"));
                continue;
            }
        };
        for route in container_routes {
            for host in &route.hosts {
                if settings
                    .reserved_hosts
                    .iter()
                    .any(|h| h.eq_ignore_ascii_case(host))
                {
                    problems.push(format!(
                        "container {}: host {host} is defined in the configuration file; ignored",
                        info.name
                    ));
                    continue;
                }
                if !allowed(host, &settings.allowed_domains) {
                    problems.push(format!(
                        "container {}: host {host} is outside docker.allowed_domains; ignored",
                        info.name
                    ));
                    continue;
                }
                let entry = hosts
                    .entry(host.clone())
                    .or_default()
                    .entry(route.path.clone().unwrap_or_default())
                    .or_insert_with(|| (route.tls, BTreeSet::new(), BTreeSet::new()));
                entry.2.insert(info.name.clone());
                // An unhealthy container leaves the pool until it is healthy again.
                if info.healthy {
                    entry.1.insert(route.upstream.clone());
                }
            }
        }
    }
    let sites = hosts
        .into_iter()
        .filter_map(|(host, paths)| {
            let tls = paths.values().next().map_or(TlsMode::Acme, |p| p.0);
            let containers: BTreeSet<String> =
                paths.values().flat_map(|p| p.2.iter().cloned()).collect();
            let mut upstreams = Vec::new();
            let mut routes = Vec::new();
            for (path, (_, pool, _)) in paths {
                if pool.is_empty() {
                    continue;
                }
                if path.is_empty() {
                    upstreams = pool.into_iter().collect();
                } else {
                    routes.push((path, pool.into_iter().collect()));
                }
            }
            (!upstreams.is_empty() || !routes.is_empty()).then(|| DiscoveredSite {
                host,
                tls,
                upstreams,
                routes,
                containers: containers.into_iter().collect(),
            })
        })
        .collect();
    (sites, problems)
}

/// Follows the Docker engine and reports the discovered sites whenever they change.
#[derive(Debug)]
pub struct Discovery {
    settings: DockerSettings,
}

impl Discovery {
    /// Discovery with `settings`; nothing connects until [`Discovery::run`].
    pub fn new(settings: DockerSettings) -> Self {
        Self { settings }
    }

    /// Lists and inspects the running containers once.
    pub async fn snapshot(&self) -> Result<Vec<DiscoveredSite>, Error> {
        let docker = connect(&endpoint(&self.settings))?;
        let infos = containers(&docker).await?;
        Ok(sites(&infos, &self.settings).0)
    }

    /// Lists the running containers, then follows the event stream; every change calls
    /// `on_change` with the full set of sites. When the engine goes away, the last known
    /// sites stay (no call), and discovery reconnects with backoff and resyncs.
    pub async fn run<F>(self, mut on_change: F, shutdown: impl Future<Output = ()>)
    where
        F: FnMut(Vec<DiscoveredSite>) + Send,
    {
        tokio::pin!(shutdown);
        let endpoint = endpoint(&self.settings);
        let mut last: Option<Vec<DiscoveredSite>> = None;
        let mut reported: BTreeSet<String> = BTreeSet::new();
        let mut delay = Duration::from_millis(250);
        loop {
            let session = async {
                let docker = connect(&endpoint)?;
                let mut rules = self.settings.clone();
                rules.rules.own_networks = own_networks(&docker).await;
                // Subscribe first, so no event between the list and the stream is lost.
                let options = EventsOptions {
                    filters: Some(HashMap::from([(
                        "type".to_owned(),
                        vec!["container".to_owned(), "network".to_owned()],
                    )])),
                    ..EventsOptions::default()
                };
                let mut events = docker.events(Some(options));
                loop {
                    let infos = containers(&docker).await?;
                    let (current, problems) = sites(&infos, &rules);
                    for p in &problems {
                        if reported.insert(p.clone()) {
                            warn!("{p}");
                        }
                    }
                    reported.retain(|p| problems.contains(p));
                    if last.as_ref() != Some(&current) {
                        info!(sites = current.len(), "containers changed routes");
                        on_change(current.clone());
                        last = Some(current);
                    }
                    delay = Duration::from_millis(250);
                    // Wait for an event, then let a burst of them settle.
                    match events.next().await {
                        Some(Ok(event)) => debug!(action = ?event.action, "docker event"),
                        Some(Err(e)) => return Err(Error::Request(e)),
                        None => return Ok::<(), Error>(()),
                    }
                    while let Ok(Some(Ok(_))) =
                        tokio::time::timeout(Duration::from_millis(30), events.next()).await
                    {
                    }
                }
            };
            tokio::select! {
                () = &mut shutdown => return,
                result = session => match result {
                    Ok(()) => warn!(%endpoint, "Docker event stream ended; reconnecting"),
                    Err(e) => warn!(%endpoint, error = %e, cause = ?std::error::Error::source(&e), "Docker engine unreachable; serving the last known routes"),
                },
            }
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(10));
        }
    }
}

/// The networks of the container Portunus runs in, if it runs in one.
async fn own_networks(docker: &Docker) -> Vec<String> {
    let Ok(hostname) = std::fs::read_to_string("/etc/hostname") else {
        return Vec::new();
    };
    match docker.inspect_container(hostname.trim(), None).await {
        Ok(c) => c
            .network_settings
            .and_then(|n| n.networks)
            .map(|n| n.into_keys().collect())
            .unwrap_or_default(),
        Err(_) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(name: &str, host: &str, ip: &str, healthy: bool) -> ContainerInfo {
        ContainerInfo {
            name: name.into(),
            labels: HashMap::from([("portunus.host".to_owned(), host.to_owned())]),
            env: HashMap::new(),
            exposed_ports: vec![80],
            networks: vec![("bridge".into(), ip.parse().unwrap())],
            healthy,
        }
    }

    #[test]
    fn pools_trust_and_health() {
        let mut settings = DockerSettings::new(true);
        settings.allowed_domains = vec!["*.apps.test".into()];
        settings.reserved_hosts = vec!["owned.apps.test".into()];
        let infos = vec![
            container("a1", "web.apps.test", "172.17.0.2", true),
            container("a2", "web.apps.test", "172.17.0.3", true),
            container("sick", "web.apps.test", "172.17.0.4", false),
            container("rogue", "bank.example", "172.17.0.5", true),
            container("thief", "owned.apps.test", "172.17.0.6", true),
            container("bad", "not a host", "172.17.0.7", true),
        ];
        let (sites, problems) = sites(&infos, &settings);
        assert_eq!(sites.len(), 1, "{sites:?}");
        assert_eq!(sites[0].host, "web.apps.test");
        assert_eq!(
            sites[0].upstreams,
            ["http://172.17.0.2:80", "http://172.17.0.3:80"]
        );
        assert_eq!(sites[0].containers, ["a1", "a2", "sick"]);
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(
            problems
                .iter()
                .any(|p| p.contains("rogue") && p.contains("allowed_domains"))
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("thief") && p.contains("configuration file"))
        );
        assert!(problems.iter().any(|p| p.contains("container bad")));
    }

    #[test]
    fn endpoint_precedence() {
        let s = DockerSettings {
            endpoint: Some("unix:///tmp/x.sock".into()),
            ..DockerSettings::default()
        };
        assert_eq!(endpoint(&s), "unix:///tmp/x.sock");
    }
}
