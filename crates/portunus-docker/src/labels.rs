//! Containers to routes: labels and nginx-proxy environment variables, validated.

use std::collections::HashMap;
use std::net::IpAddr;

use portunus_router::HostPattern;

/// How a discovered host gets its certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum TlsMode {
    /// ACME (the default for labels; for `VIRTUAL_HOST` only with `LETSENCRYPT_HOST`).
    Acme,
    /// The local CA.
    Internal,
    /// Plain HTTP.
    Off,
}

/// What Portunus needs to know about one running container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ContainerInfo {
    /// The container's name (without the leading `/`).
    pub name: String,
    /// Its labels.
    pub labels: HashMap<String, String>,
    /// Its environment, `KEY=value` split.
    pub env: HashMap<String, String>,
    /// Exposed TCP ports.
    pub exposed_ports: Vec<u16>,
    /// Its address on each network it is attached to.
    pub networks: Vec<(String, IpAddr)>,
    /// `false` while its health check fails (or has not passed yet).
    pub healthy: bool,
}

/// One route a container asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ContainerRoute {
    /// The container's name.
    pub container: String,
    /// Normalised host names.
    pub hosts: Vec<String>,
    /// Path prefix, if any.
    pub path: Option<String>,
    /// The upstream URL (`http://address:port`).
    pub upstream: String,
    /// Certificate source of these hosts.
    pub tls: TlsMode,
}

/// Why a container was ignored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LabelError {
    /// A port that is not a number.
    #[error("container {container}: `{key}` is not a port number: `{value}`")]
    Port {
        /// The container.
        container: String,
        /// The label or variable.
        key: String,
        /// What it said.
        value: String,
    },
    /// An invalid host name.
    #[error("container {container}: invalid host `{host}` in `{key}`")]
    Host {
        /// The container.
        container: String,
        /// The label or variable.
        key: String,
        /// The host.
        host: String,
    },
    /// A path that does not start with `/`.
    #[error("container {container}: `{key}` must start with `/`: `{value}`")]
    Path {
        /// The container.
        container: String,
        /// The label or variable.
        key: String,
        /// What it said.
        value: String,
    },
    /// An unknown `portunus.tls` value.
    #[error("container {container}: `portunus.tls` must be acme, internal or off, not `{value}`")]
    Tls {
        /// The container.
        container: String,
        /// What it said.
        value: String,
    },
    /// No usable network address.
    #[error("container {container}: no address on network {network}")]
    Network {
        /// The container.
        container: String,
        /// The network looked for (or `any`).
        network: String,
    },
}

/// The rules for turning containers into routes.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Rules {
    /// `docker.exposed_by_default` (true: every container with a host; false: only those
    /// with `portunus.enable=true`).
    pub exposed_by_default: bool,
    /// `docker.network`.
    pub network: Option<String>,
    /// Networks Portunus itself is attached to (when it runs in a container).
    pub own_networks: Vec<String>,
}

fn list(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// The routes of one container: `Ok(empty)` when it asks for none (or is not enabled).
pub fn routes(info: &ContainerInfo, rules: &Rules) -> Result<Vec<ContainerRoute>, LabelError> {
    let name = info.name.clone();
    let label = |k: &str| info.labels.get(k).map(String::as_str);
    let enabled = match label("portunus.enable") {
        Some(v) => v.eq_ignore_ascii_case("true"),
        None => rules.exposed_by_default,
    };
    let (host_key, host_value) = match (label("portunus.host"), info.env.get("VIRTUAL_HOST")) {
        (Some(v), _) => ("portunus.host", v),
        (None, Some(v)) => ("VIRTUAL_HOST", v.as_str()),
        (None, None) => return Ok(Vec::new()),
    };
    if !enabled {
        return Ok(Vec::new());
    }
    let mut hosts = Vec::new();
    for host in list(host_value) {
        match HostPattern::parse(host) {
            Ok(pattern) => hosts.push(pattern.to_string()),
            Err(_) => {
                return Err(LabelError::Host {
                    container: name,
                    key: host_key.to_owned(),
                    host: host.to_owned(),
                });
            }
        }
    }
    if hosts.is_empty() {
        return Ok(Vec::new());
    }
    let port = match (label("portunus.port"), info.env.get("VIRTUAL_PORT")) {
        (Some(v), _) => Some(("portunus.port", v)),
        (None, Some(v)) => Some(("VIRTUAL_PORT", v.as_str())),
        (None, None) => None,
    };
    let port = match port {
        Some((key, value)) => value
            .trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| LabelError::Port {
                container: name.clone(),
                key: key.to_owned(),
                value: value.to_owned(),
            })?,
        None if info.exposed_ports.len() == 1 => info.exposed_ports[0],
        None => 80,
    };
    let path = match (label("portunus.path"), info.env.get("VIRTUAL_PATH")) {
        (Some(v), _) => Some(("portunus.path", v)),
        (None, Some(v)) => Some(("VIRTUAL_PATH", v.as_str())),
        (None, None) => None,
    };
    let path = match path {
        Some((key, value)) if !value.starts_with('/') => {
            return Err(LabelError::Path {
                container: name,
                key: key.to_owned(),
                value: value.to_owned(),
            });
        }
        Some((_, value)) => Some(value.trim_end_matches('/').to_owned()).filter(|p| !p.is_empty()),
        None => None,
    };
    let wanted = label("portunus.network").or(rules.network.as_deref());
    let address = match wanted {
        Some(net) => info
            .networks
            .iter()
            .find(|(n, _)| n == net)
            .map(|(_, a)| *a),
        None => info
            .networks
            .iter()
            .find(|(n, _)| rules.own_networks.contains(n))
            .or_else(|| info.networks.first())
            .map(|(_, a)| *a),
    }
    .ok_or_else(|| LabelError::Network {
        container: name.clone(),
        network: wanted.unwrap_or("any").to_owned(),
    })?;
    let upstream = match address {
        IpAddr::V4(v4) => format!("http://{v4}:{port}"),
        IpAddr::V6(v6) => format!("http://[{v6}]:{port}"),
    };

    // Certificates: a label decides for all hosts; with the nginx-proxy variables, hosts
    // listed in LETSENCRYPT_HOST get ACME and the others plain HTTP.
    let mut by_tls: Vec<(TlsMode, Vec<String>)> = Vec::new();
    let mut push = |tls: TlsMode, host: String| match by_tls.iter_mut().find(|(t, _)| *t == tls) {
        Some((_, hosts)) => hosts.push(host),
        None => by_tls.push((tls, vec![host])),
    };
    match label("portunus.tls") {
        Some(value) => {
            let tls = match value {
                "acme" => TlsMode::Acme,
                "internal" => TlsMode::Internal,
                "off" => TlsMode::Off,
                other => {
                    return Err(LabelError::Tls {
                        container: name,
                        value: other.to_owned(),
                    });
                }
            };
            hosts.into_iter().for_each(|h| push(tls, h));
        }
        None if host_key == "portunus.host" => {
            hosts.into_iter().for_each(|h| push(TlsMode::Acme, h))
        }
        None => {
            let le: Vec<String> = info
                .env
                .get("LETSENCRYPT_HOST")
                .map(|v| {
                    list(v)
                        .filter_map(|h| HostPattern::parse(h).ok())
                        .map(|p| p.to_string())
                        .collect()
                })
                .unwrap_or_default();
            for host in hosts {
                let tls = if le.contains(&host) {
                    TlsMode::Acme
                } else {
                    TlsMode::Off
                };
                push(tls, host);
            }
        }
    }
    Ok(by_tls
        .into_iter()
        .map(|(tls, hosts)| ContainerRoute {
            container: name.clone(),
            hosts,
            path: path.clone(),
            upstream: upstream.clone(),
            tls,
        })
        .collect())
}

/// Whether `host` is allowed by `allowed` (`example.com` exactly, `*.example.com` any name
/// below it). An empty list allows everything.
pub fn allowed(host: &str, allowed: &[String]) -> bool {
    allowed.is_empty()
        || allowed
            .iter()
            .any(|pattern| match pattern.strip_prefix("*.") {
                Some(suffix) => host
                    .strip_suffix(suffix)
                    .is_some_and(|rest| rest.ends_with('.') && rest.len() > 1),
                None => pattern.eq_ignore_ascii_case(host),
            })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(labels: &[(&str, &str)], env: &[(&str, &str)]) -> ContainerInfo {
        ContainerInfo {
            name: "web-1".into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            exposed_ports: vec![8080],
            networks: vec![
                ("bridge".into(), "172.17.0.5".parse().unwrap()),
                ("web".into(), "10.9.0.7".parse().unwrap()),
            ],
            healthy: true,
        }
    }

    fn rules() -> Rules {
        Rules {
            exposed_by_default: true,
            ..Rules::default()
        }
    }

    #[test]
    fn labels_make_acme_routes() {
        let r = routes(
            &info(
                &[
                    ("portunus.host", "App.example.com, www.app.example.com"),
                    ("portunus.path", "/api/"),
                ],
                &[],
            ),
            &rules(),
        )
        .unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].hosts, ["app.example.com", "www.app.example.com"]);
        assert_eq!(r[0].path.as_deref(), Some("/api"));
        assert_eq!(
            r[0].upstream, "http://172.17.0.5:8080",
            "the only exposed port, the first network"
        );
        assert_eq!(r[0].tls, TlsMode::Acme);
    }

    #[test]
    fn network_choice() {
        let mut rules = rules();
        let c = info(&[("portunus.host", "a.test")], &[]);
        rules.network = Some("web".into());
        assert_eq!(
            routes(&c, &rules).unwrap()[0].upstream,
            "http://10.9.0.7:8080"
        );
        let c = info(
            &[("portunus.host", "a.test"), ("portunus.network", "bridge")],
            &[],
        );
        assert_eq!(
            routes(&c, &rules).unwrap()[0].upstream,
            "http://172.17.0.5:8080",
            "the label wins"
        );
        let rules = Rules {
            own_networks: vec!["web".into()],
            ..super::tests::rules()
        };
        let c = info(&[("portunus.host", "a.test")], &[]);
        assert_eq!(
            routes(&c, &rules).unwrap()[0].upstream,
            "http://10.9.0.7:8080",
            "a shared network"
        );
        let c = info(
            &[("portunus.host", "a.test"), ("portunus.network", "nope")],
            &[],
        );
        assert!(matches!(
            routes(&c, &rules),
            Err(LabelError::Network { .. })
        ));
    }

    #[test]
    fn nginx_proxy_variables() {
        let c = info(
            &[],
            &[
                ("VIRTUAL_HOST", "a.test,b.test"),
                ("VIRTUAL_PORT", "3000"),
                ("LETSENCRYPT_HOST", "b.test"),
            ],
        );
        let r = routes(&c, &rules()).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(
            (r[0].hosts.clone(), r[0].tls),
            (vec!["a.test".to_owned()], TlsMode::Off)
        );
        assert_eq!(
            (r[1].hosts.clone(), r[1].tls),
            (vec!["b.test".to_owned()], TlsMode::Acme)
        );
        assert!(r.iter().all(|r| r.upstream == "http://172.17.0.5:3000"));
        // Labels win over the variables.
        let c = info(
            &[("portunus.host", "l.test"), ("portunus.port", "81")],
            &[("VIRTUAL_HOST", "v.test"), ("VIRTUAL_PORT", "82")],
        );
        let r = routes(&c, &rules()).unwrap();
        assert_eq!(r[0].hosts, ["l.test"]);
        assert!(r[0].upstream.ends_with(":81"));
    }

    #[test]
    fn enable_rules_and_defaults() {
        let off = Rules::default();
        assert!(
            routes(&info(&[("portunus.host", "a.test")], &[]), &off)
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            routes(
                &info(
                    &[("portunus.host", "a.test"), ("portunus.enable", "true")],
                    &[]
                ),
                &off
            )
            .unwrap()
            .len(),
            1
        );
        assert!(
            routes(
                &info(
                    &[("portunus.host", "a.test"), ("portunus.enable", "false")],
                    &[]
                ),
                &rules()
            )
            .unwrap()
            .is_empty()
        );
        assert!(
            routes(&info(&[], &[]), &rules()).unwrap().is_empty(),
            "no host: nothing"
        );
        let mut two_ports = info(&[("portunus.host", "a.test")], &[]);
        two_ports.exposed_ports = vec![80, 443];
        assert!(
            routes(&two_ports, &rules()).unwrap()[0]
                .upstream
                .ends_with(":80")
        );
        let internal = routes(
            &info(
                &[("portunus.host", "a.test"), ("portunus.tls", "internal")],
                &[],
            ),
            &rules(),
        )
        .unwrap();
        assert_eq!(internal[0].tls, TlsMode::Internal);
    }

    #[test]
    fn malformed_labels_are_errors_naming_the_container() {
        let cases: &[&[(&str, &str)]] = &[
            &[("portunus.host", "a.test"), ("portunus.port", "eighty")],
            &[("portunus.host", "a.test"), ("portunus.port", "70000")],
            &[("portunus.host", "bad host")],
            &[("portunus.host", "a.test"), ("portunus.path", "api")],
            &[("portunus.host", "a.test"), ("portunus.tls", "maybe")],
        ];
        for labels in cases {
            let err = routes(&info(labels, &[]), &rules()).unwrap_err();
            assert!(err.to_string().contains("web-1"), "{err}");
        }
    }

    #[test]
    fn allowed_domains() {
        let list = vec!["*.example.com".to_owned(), "exact.org".to_owned()];
        assert!(allowed("a.example.com", &list));
        assert!(allowed("a.b.example.com", &list));
        assert!(!allowed("example.com", &list));
        assert!(!allowed("evilexample.com", &list));
        assert!(allowed("exact.org", &list));
        assert!(!allowed("a.exact.org", &list));
        assert!(allowed("anything", &[]));
    }
}
