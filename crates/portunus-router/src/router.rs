//! The immutable routing table and its builder.

// foldhash, not std's SipHash: these tables are built from configuration and only looked up
// with what clients send, which cannot make them collide; a `Host` is hashed several times
// faster.
use foldhash::HashMap;

use crate::host::{HostError, HostPattern, with_normalized};

/// Why a routing table could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// A host name or wildcard is not valid.
    #[error("{origin}: invalid host")]
    InvalidHost {
        /// Where the site was defined.
        origin: String,
        /// What is wrong with it.
        #[source]
        source: HostError,
    },
    /// The same host is served by two sites (or listed twice in one).
    #[error("host `{host}` is defined twice: at {first} and at {second}")]
    DuplicateHost {
        /// The normalised host.
        host: String,
        /// Where it was defined first.
        first: String,
        /// Where it was defined again.
        second: String,
    },
    /// A route path does not start with `/`.
    #[error("{origin}: route path `{path}` must start with `/`")]
    InvalidPath {
        /// Where the site was defined.
        origin: String,
        /// The offending path.
        path: String,
    },
    /// The same route path appears twice in one site.
    #[error("{origin}: route path `{path}` is defined twice")]
    DuplicatePath {
        /// Where the site was defined.
        origin: String,
        /// The normalised path.
        path: String,
    },
    /// A site lists no host at all.
    #[error("{origin}: site has no hosts")]
    NoHosts {
        /// Where the site was defined.
        origin: String,
    },
}

/// Every problem found while building a table (never empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildErrors(Vec<BuildError>);

impl BuildErrors {
    /// The individual problems, in the order sites were added.
    pub fn errors(&self) -> &[BuildError] {
        &self.0
    }

    /// Takes the individual problems.
    pub fn into_vec(self) -> Vec<BuildError> {
        self.0
    }
}

impl std::fmt::Display for BuildErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
            if let Some(source) = std::error::Error::source(error) {
                write!(f, ": {source}")?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for BuildErrors {}

/// One site to compile into a [`Router`]: its hosts, its default target and its path routes.
#[derive(Debug, Clone)]
pub struct Site<T> {
    origin: String,
    hosts: Vec<String>,
    default: Option<T>,
    routes: Vec<(String, T)>,
}

impl<T> Site<T> {
    /// A new, empty site. `origin` says where it was defined (`portunus.toml:12:1`,
    /// `container web-1`) and appears in build errors.
    pub fn new(origin: impl Into<String>) -> Self {
        Self {
            origin: origin.into(),
            hosts: Vec::new(),
            default: None,
            routes: Vec::new(),
        }
    }

    /// Adds a host name or `*.example.com` wildcard.
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.hosts.push(host.into());
        self
    }

    /// Adds several hosts.
    pub fn hosts<I: IntoIterator<Item = S>, S: Into<String>>(mut self, hosts: I) -> Self {
        self.hosts.extend(hosts.into_iter().map(Into::into));
        self
    }

    /// Sets the target for requests no route matches.
    pub fn default_target(mut self, target: T) -> Self {
        self.default = Some(target);
        self
    }

    /// Adds a path-prefix route. A trailing `/` in `path` is ignored; `/` alone matches every path.
    pub fn route(mut self, path: impl Into<String>, target: T) -> Self {
        self.routes.push((path.into(), target));
        self
    }
}

/// Collects sites, then compiles them with [`RouterBuilder::build`].
#[derive(Debug, Clone)]
pub struct RouterBuilder<T> {
    sites: Vec<Site<T>>,
}

impl<T> Default for RouterBuilder<T> {
    fn default() -> Self {
        Self { sites: Vec::new() }
    }
}

impl<T> RouterBuilder<T> {
    /// Adds a site.
    pub fn site(mut self, site: Site<T>) -> Self {
        self.sites.push(site);
        self
    }

    /// Adds a site through a mutable reference (handy in loops).
    pub fn push(&mut self, site: Site<T>) -> &mut Self {
        self.sites.push(site);
        self
    }

    /// Validates every site and compiles the table, reporting every problem at once.
    pub fn build(self) -> Result<Router<T>, BuildErrors> {
        let mut exact: HashMap<Box<str>, u32> = HashMap::default();
        let mut wildcard: HashMap<Box<str>, u32> = HashMap::default();
        let mut sites = Vec::with_capacity(self.sites.len());
        let mut errors = Vec::new();

        for (index, site) in self.sites.into_iter().enumerate() {
            let Ok(index) = u32::try_from(index) else {
                break;
            };
            if site.hosts.is_empty() {
                errors.push(BuildError::NoHosts {
                    origin: site.origin.clone(),
                });
            }
            let mut patterns = Vec::with_capacity(site.hosts.len());
            for host in &site.hosts {
                let pattern = match HostPattern::parse(host) {
                    Ok(pattern) => pattern,
                    Err(source) => {
                        errors.push(BuildError::InvalidHost {
                            origin: site.origin.clone(),
                            source,
                        });
                        continue;
                    }
                };
                let (map, key) = match &pattern {
                    HostPattern::Exact(name) => (&mut exact, name.as_str()),
                    HostPattern::Wildcard(suffix) => (&mut wildcard, suffix.as_str()),
                };
                if let Some(&first) = map.get(key) {
                    let first_origin = if first == index {
                        site.origin.clone()
                    } else {
                        sites
                            .get(first as usize)
                            .map_or_else(String::new, |s: &CompiledSite<T>| s.origin.clone())
                    };
                    errors.push(BuildError::DuplicateHost {
                        host: pattern.to_string(),
                        first: first_origin,
                        second: site.origin.clone(),
                    });
                    continue;
                }
                map.insert(key.into(), index);
                patterns.push(pattern);
            }

            let mut routes: Vec<(Box<str>, T)> = Vec::with_capacity(site.routes.len());
            for (path, target) in site.routes {
                if !path.starts_with('/') {
                    errors.push(BuildError::InvalidPath {
                        origin: site.origin.clone(),
                        path,
                    });
                    continue;
                }
                let normalized = path.trim_end_matches('/');
                if routes.iter().any(|(p, _)| &**p == normalized) {
                    errors.push(BuildError::DuplicatePath {
                        origin: site.origin.clone(),
                        path: if normalized.is_empty() {
                            "/"
                        } else {
                            normalized
                        }
                        .to_owned(),
                    });
                    continue;
                }
                routes.push((normalized.into(), target));
            }
            // Longest prefix first, so the first match is the best one.
            routes.sort_by_key(|r| std::cmp::Reverse(r.0.len()));

            sites.push(CompiledSite {
                origin: site.origin,
                hosts: patterns,
                default: site.default,
                routes,
            });
        }

        if errors.is_empty() {
            Ok(Router {
                exact,
                wildcard,
                sites,
            })
        } else {
            Err(BuildErrors(errors))
        }
    }
}

#[derive(Debug)]
struct CompiledSite<T> {
    origin: String,
    hosts: Vec<HostPattern>,
    default: Option<T>,
    /// Normalised prefixes (no trailing `/`; `""` matches everything), longest first.
    routes: Vec<(Box<str>, T)>,
}

/// An immutable routing table from hosts and paths to targets of type `T`.
#[derive(Debug)]
pub struct Router<T> {
    exact: HashMap<Box<str>, u32>,
    wildcard: HashMap<Box<str>, u32>,
    sites: Vec<CompiledSite<T>>,
}

/// The result of a successful lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Match<'a, T> {
    /// The matched target.
    pub target: &'a T,
    /// The matched route prefix without trailing `/` (`""` for a site's default target or `/`).
    pub prefix: &'a str,
    /// The index of the matched site, in the order sites were added.
    pub site: usize,
}

impl<T> Router<T> {
    /// Starts a new table.
    pub fn builder() -> RouterBuilder<T> {
        RouterBuilder::default()
    }

    /// A table that matches nothing.
    pub fn empty() -> Self {
        Self {
            exact: HashMap::default(),
            wildcard: HashMap::default(),
            sites: Vec::new(),
        }
    }

    /// Finds the site serving `host` (a `Host` header value or URI authority, port allowed).
    pub fn site_for(&self, host: &str) -> Option<usize> {
        with_normalized(host, |host| {
            if let Some(&index) = self.exact.get(host) {
                return Some(index as usize);
            }
            let (label, suffix) = host.split_once('.')?;
            if label.is_empty() {
                return None;
            }
            self.wildcard.get(suffix).map(|&index| index as usize)
        })
        .flatten()
    }

    /// Finds the target for a request to `host` and `path` (the path without its query).
    pub fn lookup(&self, host: &str, path: &str) -> Option<Match<'_, T>> {
        self.route(self.site_for(host)?, path)
    }

    /// Finds the target for `path` within site `site_index` (from [`Router::site_for`]).
    pub fn route(&self, site_index: usize, path: &str) -> Option<Match<'_, T>> {
        let site = self.sites.get(site_index)?;
        for (prefix, target) in &site.routes {
            if path_matches(prefix, path) {
                return Some(Match {
                    target,
                    prefix,
                    site: site_index,
                });
            }
        }
        site.default.as_ref().map(|target| Match {
            target,
            prefix: "",
            site: site_index,
        })
    }

    /// The number of sites.
    pub fn len(&self) -> usize {
        self.sites.len()
    }

    /// Whether the table has no site.
    pub fn is_empty(&self) -> bool {
        self.sites.is_empty()
    }

    /// The normalised host patterns of site `index`.
    pub fn site_hosts(&self, index: usize) -> &[HostPattern] {
        self.sites.get(index).map_or(&[], |s| &s.hosts)
    }

    /// The targets of site `index` with their route prefixes (`""` for the default).
    pub fn site_targets(&self, index: usize) -> impl Iterator<Item = (&str, &T)> {
        self.sites.get(index).into_iter().flat_map(|site| {
            site.default
                .iter()
                .map(|t| ("", t))
                .chain(site.routes.iter().map(|(p, t)| (&**p, t)))
        })
    }

    /// Every target in the table, defaults and routes, with its site index.
    pub fn targets(&self) -> impl Iterator<Item = (usize, &T)> {
        self.sites.iter().enumerate().flat_map(|(index, site)| {
            site.default
                .iter()
                .chain(site.routes.iter().map(|(_, t)| t))
                .map(move |t| (index, t))
        })
    }
}

/// Whether normalised `prefix` matches `path` on a segment boundary.
fn path_matches(prefix: &str, path: &str) -> bool {
    path.starts_with(prefix)
        && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/' | b'?'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Router<&'static str> {
        Router::builder()
            .site(
                Site::new("a")
                    .host("example.com")
                    .host("www.example.com")
                    .default_target("web")
                    .route("/api", "api")
                    .route("/api/v2/", "api2")
                    .route("/static/", "static"),
            )
            .site(Site::new("b").host("*.example.com").default_target("wild"))
            .site(Site::new("c").host("only-routes.test").route("/x", "x"))
            .site(Site::new("d").host("root.test").route("/", "root"))
            .site(Site::new("e").host("bücher.example").default_target("idn"))
            .build()
            .unwrap()
    }

    #[test]
    fn lookup_table() {
        let router = table();
        type Case = (
            &'static str,
            &'static str,
            Option<(&'static str, &'static str)>,
        );
        let cases: &[Case] = &[
            ("example.com", "/", Some(("web", ""))),
            ("EXAMPLE.com", "/", Some(("web", ""))),
            ("example.com.", "/", Some(("web", ""))),
            ("example.com:8080", "/", Some(("web", ""))),
            ("example.com", "/api", Some(("api", "/api"))),
            ("example.com", "/api/", Some(("api", "/api"))),
            ("example.com", "/api/users", Some(("api", "/api"))),
            ("example.com", "/apix", Some(("web", ""))),
            ("example.com", "/api/v2", Some(("api2", "/api/v2"))),
            ("example.com", "/api/v2/x", Some(("api2", "/api/v2"))),
            ("example.com", "/api/v20", Some(("api", "/api"))),
            ("example.com", "/static", Some(("static", "/static"))),
            ("www.example.com", "/api", Some(("api", "/api"))),
            ("foo.example.com", "/api", Some(("wild", ""))),
            ("FOO.example.com:1", "/", Some(("wild", ""))),
            ("a.b.example.com", "/", None),
            ("example.org", "/", None),
            ("only-routes.test", "/x/y", Some(("x", "/x"))),
            ("only-routes.test", "/y", None),
            ("root.test", "/anything", Some(("root", ""))),
            ("bücher.example", "/", Some(("idn", ""))),
            ("xn--bcher-kva.example", "/", Some(("idn", ""))),
            ("", "/", None),
            (":80", "/", None),
        ];
        for &(host, path, want) in cases {
            let got = router.lookup(host, path).map(|m| (*m.target, m.prefix));
            assert_eq!(got, want, "{host} {path}");
        }
    }

    #[test]
    fn duplicate_host_names_both_places() {
        let err = Router::builder()
            .site(
                Site::new("portunus.toml:3:1")
                    .host("Example.com")
                    .default_target(1),
            )
            .site(
                Site::new("portunus.toml:9:1")
                    .host("example.com.")
                    .default_target(2),
            )
            .build()
            .unwrap_err();
        let err = &err.errors()[0];
        assert_eq!(
            *err,
            BuildError::DuplicateHost {
                host: "example.com".into(),
                first: "portunus.toml:3:1".into(),
                second: "portunus.toml:9:1".into(),
            }
        );
        let msg = err.to_string();
        assert!(msg.contains("portunus.toml:3:1") && msg.contains("portunus.toml:9:1"));
    }

    #[test]
    fn build_collects_every_error() {
        let errors = Router::builder()
            .site(
                Site::new("s1")
                    .host("a.test")
                    .host("a.test")
                    .default_target(1),
            )
            .site(Site::new("s2").host("bad host").route("api", 2))
            .site(Site::new("s3").route("/x", 3).route("/x/", 4))
            .site(Site::new("s4").host("*.a.test").default_target(5))
            .site(Site::new("s5").host("*.A.test").default_target(6))
            .build()
            .unwrap_err()
            .into_vec();
        assert_eq!(errors.len(), 6, "{errors:?}");
        assert!(
            matches!(&errors[0], BuildError::DuplicateHost { first, second, .. } if first == "s1" && second == "s1")
        );
        assert!(matches!(&errors[1], BuildError::InvalidHost { origin, .. } if origin == "s2"));
        assert!(matches!(&errors[2], BuildError::InvalidPath { path, .. } if path == "api"));
        assert!(matches!(&errors[3], BuildError::NoHosts { .. }));
        assert!(matches!(&errors[4], BuildError::DuplicatePath { path, .. } if path == "/x"));
        assert!(matches!(&errors[5], BuildError::DuplicateHost { host, .. } if host == "*.a.test"));
    }

    #[test]
    fn exact_wins_over_wildcard_regardless_of_order() {
        let router = Router::builder()
            .site(Site::new("w").host("*.example.com").default_target("wild"))
            .site(
                Site::new("e")
                    .host("api.example.com")
                    .default_target("exact"),
            )
            .build()
            .unwrap();
        assert_eq!(
            *router.lookup("api.example.com", "/").unwrap().target,
            "exact"
        );
        assert_eq!(
            *router.lookup("web.example.com", "/").unwrap().target,
            "wild"
        );
    }

    #[test]
    fn accessors() {
        let router = table();
        assert_eq!(router.len(), 5);
        assert!(!router.is_empty());
        assert!(Router::<()>::empty().is_empty());
        assert_eq!(
            router.site_hosts(1),
            &[HostPattern::Wildcard("example.com".into())]
        );
        assert!(router.site_hosts(99).is_empty());
        assert_eq!(router.targets().count(), 8);
        let site_a: Vec<(&str, &str)> = router.site_targets(0).map(|(p, t)| (p, *t)).collect();
        assert_eq!(
            site_a,
            [
                ("", "web"),
                ("/api/v2", "api2"),
                ("/static", "static"),
                ("/api", "api")
            ]
        );
        assert_eq!(router.site_targets(99).count(), 0);
        assert_eq!(router.site_for("foo.example.com"), Some(1));
    }
}
