//! Upstream pools: choosing an upstream, passive health, requests in flight.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::uri::{Authority, Scheme};

use crate::client::Address;
use crate::settings::LoadBalancing;

/// Why an upstream URL was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamUrlError {
    /// Not a URL at all.
    #[error("not a valid URL")]
    Syntax,
    /// No `http://`.
    #[error("missing scheme (write http://host:port)")]
    NoScheme,
    /// A scheme other than `http`.
    #[error("only http:// upstreams are supported")]
    Scheme,
    /// No host.
    #[error("missing host")]
    NoHost,
    /// `user:password@` in the URL.
    #[error("credentials in the URL are not supported")]
    Credentials,
    /// A `?query`.
    #[error("a query string is not allowed")]
    Query,
}

/// Checks an upstream URL (`http://host:port/optional/base/path`) the way [`Proxy::new`]
/// will, so configuration front ends can report it with their own positions.
///
/// [`Proxy::new`]: crate::Proxy::new
pub fn check_upstream_url(url: &str) -> Result<(), UpstreamUrlError> {
    parse_upstream(url).map(|_| ())
}

pub(crate) fn parse_upstream(url: &str) -> Result<(Authority, String), UpstreamUrlError> {
    let uri: http::Uri = url.parse().map_err(|_| UpstreamUrlError::Syntax)?;
    let scheme = uri.scheme().ok_or(UpstreamUrlError::NoScheme)?;
    if *scheme != Scheme::HTTP {
        return Err(UpstreamUrlError::Scheme);
    }
    let authority = uri.authority().cloned().ok_or(UpstreamUrlError::NoHost)?;
    if authority.as_str().contains('@') {
        return Err(UpstreamUrlError::Credentials);
    }
    if authority.host().is_empty() {
        return Err(UpstreamUrlError::NoHost);
    }
    if uri.query().is_some() {
        return Err(UpstreamUrlError::Query);
    }
    let base = uri.path().trim_end_matches('/').to_owned();
    Ok((authority, base))
}

/// One upstream server of a pool.
#[derive(Debug)]
pub(crate) struct Upstream {
    pub(crate) url: String,
    pub(crate) address: Address,
    /// Base path prepended to every request path, without trailing `/` (`""` for none).
    pub(crate) base_path: String,
    active: AtomicUsize,
    /// Milliseconds since the pool's epoch until which this upstream is left out; 0 = healthy.
    down_until: AtomicU64,
}

impl Upstream {
    pub(crate) fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }
}

/// A set of interchangeable upstreams with a load-balancing policy.
#[derive(Debug)]
pub(crate) struct Pool {
    upstreams: Vec<Arc<Upstream>>,
    lb: LoadBalancing,
    next: AtomicUsize,
    epoch: Instant,
    unhealthy_for: Duration,
}

/// Counts a request in flight on an upstream until dropped.
#[derive(Debug)]
pub(crate) struct ActiveGuard(Arc<Upstream>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ActiveGuard {
    pub(crate) fn new(upstream: Arc<Upstream>) -> Self {
        upstream.active.fetch_add(1, Ordering::Relaxed);
        Self(upstream)
    }
}

impl Pool {
    pub(crate) fn new(
        urls: &[String],
        lb: LoadBalancing,
        unhealthy_for: Duration,
    ) -> Result<Self, (String, UpstreamUrlError)> {
        let mut upstreams = Vec::with_capacity(urls.len());
        for url in urls {
            let (authority, base_path) =
                parse_upstream(url).map_err(|reason| (url.clone(), reason))?;
            upstreams.push(Arc::new(Upstream {
                url: url.clone(),
                address: Address::new(authority),
                base_path,
                active: AtomicUsize::new(0),
                down_until: AtomicU64::new(0),
            }));
        }
        Ok(Self {
            upstreams,
            lb,
            next: AtomicUsize::new(0),
            epoch: Instant::now(),
            unhealthy_for,
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The pool's upstreams.
    pub(crate) fn upstreams(&self) -> &[Arc<Upstream>] {
        &self.upstreams
    }

    /// Whether `upstream` is currently in service.
    pub(crate) fn is_healthy(&self, upstream: &Upstream) -> bool {
        upstream.down_until.load(Ordering::Relaxed) <= self.now_ms()
    }

    /// Takes `upstream` out of service for a while (it refused a connection or timed out).
    pub(crate) fn mark_failed(&self, upstream: &Upstream) {
        let until = self
            .now_ms()
            .saturating_add(u64::try_from(self.unhealthy_for.as_millis()).unwrap_or(u64::MAX))
            .max(1);
        upstream.down_until.store(until, Ordering::Relaxed);
    }

    /// Puts `upstream` back in service (it answered).
    pub(crate) fn mark_ok(&self, upstream: &Upstream) {
        if upstream.down_until.load(Ordering::Relaxed) != 0 {
            upstream.down_until.store(0, Ordering::Relaxed);
        }
    }

    /// Picks an upstream not in `tried` (a bit set of indexes): a healthy one by the pool's
    /// policy if any, else any untried one, so a pool whose members all failed recently
    /// still tries them rather than refusing outright.
    pub(crate) fn pick(&self, tried: u64) -> Option<(usize, &Arc<Upstream>)> {
        let n = self.upstreams.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let untried = |i: &usize| *i >= 64 || tried & (1 << i) == 0;
        let order = (0..n).map(|k| (start + k) % n).filter(untried);
        let now = self.now_ms();
        let healthy = |i: &usize| self.upstreams[*i].down_until.load(Ordering::Relaxed) <= now;
        let chosen = match self.lb {
            LoadBalancing::RoundRobin => order.clone().find(healthy),
            LoadBalancing::LeastConn => order
                .clone()
                .filter(healthy)
                .min_by_key(|i| self.upstreams[*i].active()),
        };
        let index = chosen.or_else(|| {
            // All untried upstreams are marked down: try the one whose penalty ends first.
            order.min_by_key(|i| self.upstreams[*i].down_until.load(Ordering::Relaxed))
        })?;
        Some((index, &self.upstreams[index]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: usize, lb: LoadBalancing) -> Pool {
        let urls: Vec<String> = (0..n)
            .map(|i| format!("http://127.0.0.1:{}", 1000 + i))
            .collect();
        Pool::new(&urls, lb, Duration::from_secs(60)).unwrap()
    }

    #[test]
    fn parse_upstream_table() {
        let ok = [
            ("http://127.0.0.1:8080", "127.0.0.1:8080", ""),
            ("http://app:80/", "app:80", ""),
            ("http://app/base/", "app", "/base"),
            ("http://[::1]:9000/a/b", "[::1]:9000", "/a/b"),
        ];
        for (url, authority, base) in ok {
            let (a, b) = parse_upstream(url).unwrap();
            assert_eq!((a.as_str(), b.as_str()), (authority, base), "{url}");
        }
        for bad in [
            "127.0.0.1:8080",
            "ftp://x",
            "https://x",
            "http://",
            "http://u:p@x",
            "http://x/?q=1",
            "not a url",
            "",
        ] {
            assert!(parse_upstream(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn round_robin_cycles_and_skips_failed() {
        let p = pool(3, LoadBalancing::RoundRobin);
        let picks: Vec<usize> = (0..6).map(|_| p.pick(0).unwrap().0).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        p.mark_failed(&p.upstreams[1]);
        assert!(!p.is_healthy(&p.upstreams[1]));
        let picks: Vec<usize> = (0..4).map(|_| p.pick(0).unwrap().0).collect();
        assert!(!picks.contains(&1), "{picks:?}");
        p.mark_ok(&p.upstreams[1]);
        assert!(p.is_healthy(&p.upstreams[1]));
    }

    #[test]
    fn tried_upstreams_are_excluded() {
        let p = pool(2, LoadBalancing::RoundRobin);
        let (first, _) = p.pick(0).unwrap();
        let (second, _) = p.pick(1 << first).unwrap();
        assert_ne!(first, second);
        assert!(p.pick(0b11).is_none());
    }

    #[test]
    fn all_down_still_picks_one() {
        let p = pool(2, LoadBalancing::LeastConn);
        p.mark_failed(&p.upstreams[0]);
        p.mark_failed(&p.upstreams[1]);
        assert!(p.pick(0).is_some());
    }

    #[test]
    fn least_conn_prefers_idle() {
        let p = pool(3, LoadBalancing::LeastConn);
        let _a = ActiveGuard::new(p.upstreams[0].clone());
        let _b = ActiveGuard::new(p.upstreams[2].clone());
        let _c = ActiveGuard::new(p.upstreams[2].clone());
        for _ in 0..5 {
            assert_eq!(p.pick(0).unwrap().0, 1);
        }
        drop(_a);
        assert_eq!(p.upstreams[0].active(), 0);
        let picks: Vec<usize> = (0..4).map(|_| p.pick(0).unwrap().0).collect();
        assert!(!picks.contains(&2));
    }
}
