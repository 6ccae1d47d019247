//! Property test: the compiled router agrees with a naive reference matcher.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use portunus_router::{HostPattern, Router, Site};
use proptest::prelude::*;

/// A site as the reference matcher sees it: plain lists, scanned linearly.
#[derive(Debug, Clone)]
struct RefSite {
    hosts: Vec<String>,
    default: Option<u32>,
    routes: Vec<(String, u32)>,
}

fn reference(sites: &[RefSite], host: &str, path: &str) -> Option<(u32, String)> {
    let host = host.to_ascii_lowercase();
    let host = host.trim_end_matches('.');
    let exact = sites
        .iter()
        .find(|s| s.hosts.iter().any(|h| h.to_ascii_lowercase() == host));
    let site = exact.or_else(|| {
        sites.iter().find(|s| {
            s.hosts.iter().any(|h| {
                let Some(suffix) = h.strip_prefix("*.") else {
                    return false;
                };
                let suffix = suffix.to_ascii_lowercase();
                host.split_once('.')
                    .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix)
            })
        })
    })?;
    let mut best: Option<(usize, u32, String)> = None;
    for (pattern, target) in &site.routes {
        let p = pattern.trim_end_matches('/');
        let segment_match = path == p || path.starts_with(&format!("{p}/"));
        if segment_match && best.as_ref().is_none_or(|(len, _, _)| p.len() > *len) {
            best = Some((p.len(), *target, p.to_owned()));
        }
    }
    match best {
        Some((_, target, prefix)) => Some((target, prefix)),
        None => site.default.map(|t| (t, String::new())),
    }
}

fn label() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["a", "b", "api", "www", "x"]).prop_map(str::to_owned)
}

fn host() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(label(), 1..3),
        prop::sample::select(vec!["test", "example"]),
    )
        .prop_map(|(labels, tld)| format!("{}.{tld}", labels.join(".")))
}

fn path() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop::sample::select(vec!["a", "b", "ab", "api", "v1"]),
        0..4,
    )
    .prop_map(|segments| format!("/{}", segments.join("/")))
}

fn sites() -> impl Strategy<Value = Vec<RefSite>> {
    prop::collection::vec(
        (
            prop::collection::vec((host(), any::<bool>()), 1..3),
            prop::option::of(0u32..100),
            prop::collection::vec((path(), any::<bool>(), 100u32..200), 0..4),
        ),
        1..6,
    )
    .prop_map(|raw| {
        let mut seen_hosts = std::collections::HashSet::new();
        raw.into_iter()
            .map(|(hosts, default, routes)| {
                let hosts = hosts
                    .into_iter()
                    .map(|(h, wild)| if wild { format!("*.{h}") } else { h })
                    .filter(|h| seen_hosts.insert(h.clone()))
                    .collect::<Vec<_>>();
                let mut seen_paths = std::collections::HashSet::new();
                let routes = routes
                    .into_iter()
                    .map(|(p, slash, t)| {
                        if slash && p != "/" {
                            (format!("{p}/"), t)
                        } else {
                            (p, t)
                        }
                    })
                    .filter(|(p, _)| seen_paths.insert(p.trim_end_matches('/').to_owned()))
                    .collect();
                RefSite {
                    hosts,
                    default,
                    routes,
                }
            })
            .filter(|s| !s.hosts.is_empty())
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn router_agrees_with_reference(
        sites in sites(),
        lookups in prop::collection::vec((host(), any::<bool>(), path()), 1..20),
    ) {
        let mut builder = Router::builder();
        for (i, s) in sites.iter().enumerate() {
            let mut site = Site::new(format!("site {i}")).hosts(s.hosts.clone());
            if let Some(d) = s.default {
                site = site.default_target(d);
            }
            for (p, t) in &s.routes {
                site = site.route(p.clone(), *t);
            }
            builder.push(site);
        }
        let router = builder.build().map_err(|e| TestCaseError::fail(e.to_string()))?;
        for (host, upper, path) in lookups {
            let asked = if upper { host.to_ascii_uppercase() } else { host.clone() };
            let got = router.lookup(&asked, &path).map(|m| (*m.target, m.prefix.to_owned()));
            prop_assert_eq!(got, reference(&sites, &host, &path), "{} {}", asked, path);
        }
    }

    #[test]
    fn parse_never_panics(input in "\\PC{0,80}") {
        let _ = HostPattern::parse(&input);
        let _ = portunus_router::normalize_host(&input);
        let router = Router::builder().site(Site::new("s").host("a.test").default_target(1)).build();
        prop_assert!(router.is_ok());
        if let Ok(router) = router {
            let _ = router.lookup(&input, &input);
        }
    }
}
