//! Request counters and latency histograms per site and status class, rendered in the
//! Prometheus text format. Label values are bounded: one per configured site (its first host,
//! `-` for requests no site serves) and per status class, never per path or client.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Upper bounds (seconds) of the latency histogram buckets.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// The counters of one site.
#[derive(Debug, Default)]
pub(crate) struct SiteMetrics {
    /// Requests by status class: index 0 = 1xx ... 4 = 5xx.
    by_class: [AtomicU64; 5],
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl SiteMetrics {
    pub(crate) fn record(&self, status: u16, elapsed: Duration) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.by_class[class].fetch_add(1, Ordering::Relaxed);
        let secs = elapsed.as_secs_f64();
        for (bucket, bound) in self.buckets.iter().zip(BUCKETS) {
            if secs <= bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(
            u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }
}

/// All sites' counters; survives configuration reloads (a site keeps its counters while its
/// first host stays the same).
#[derive(Debug, Default)]
pub(crate) struct Registry {
    sites: RwLock<HashMap<String, Arc<SiteMetrics>>>,
}

impl Registry {
    /// The counters of the site labelled `label`, created on first use.
    pub(crate) fn site(&self, label: &str) -> Arc<SiteMetrics> {
        if let Some(m) = self
            .sites
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(label)
        {
            return Arc::clone(m);
        }
        let mut sites = self
            .sites
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(sites.entry(label.to_owned()).or_default())
    }

    /// Renders `portunus_requests_total` and `portunus_request_duration_seconds`.
    pub(crate) fn render(&self, out: &mut String) {
        let sites = self
            .sites
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut labels: Vec<&String> = sites.keys().collect();
        labels.sort();
        out.push_str(
            "# HELP portunus_requests_total Requests answered, by site and status class.\n",
        );
        out.push_str("# TYPE portunus_requests_total counter\n");
        for label in &labels {
            let m = &sites[*label];
            for (i, class) in ["1xx", "2xx", "3xx", "4xx", "5xx"].iter().enumerate() {
                let n = m.by_class[i].load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "portunus_requests_total{{site=\"{}\",code=\"{class}\"}} {n}",
                    escape(label)
                );
            }
        }
        out.push_str("# HELP portunus_request_duration_seconds Time from request to response head, by site.\n");
        out.push_str("# TYPE portunus_request_duration_seconds histogram\n");
        for label in &labels {
            let m = &sites[*label];
            let site = escape(label);
            for (bucket, bound) in m.buckets.iter().zip(BUCKETS) {
                let _ = writeln!(
                    out,
                    "portunus_request_duration_seconds_bucket{{site=\"{site}\",le=\"{bound}\"}} {}",
                    bucket.load(Ordering::Relaxed)
                );
            }
            let count = m.count.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "portunus_request_duration_seconds_bucket{{site=\"{site}\",le=\"+Inf\"}} {count}"
            );
            let sum = m.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
            let _ = writeln!(
                out,
                "portunus_request_duration_seconds_sum{{site=\"{site}\"}} {sum}"
            );
            let _ = writeln!(
                out,
                "portunus_request_duration_seconds_count{{site=\"{site}\"}} {count}"
            );
        }
    }
}

/// Escapes a label value for the Prometheus text format.
pub fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_class_and_renders() {
        let r = Registry::default();
        let a = r.site("a.test");
        a.record(200, Duration::from_millis(3));
        a.record(204, Duration::from_millis(30));
        a.record(502, Duration::from_secs(20));
        r.site("-").record(404, Duration::from_micros(10));
        assert!(Arc::ptr_eq(&a, &r.site("a.test")));
        let mut out = String::new();
        r.render(&mut out);
        assert!(
            out.contains("portunus_requests_total{site=\"a.test\",code=\"2xx\"} 2\n"),
            "{out}"
        );
        assert!(out.contains("portunus_requests_total{site=\"a.test\",code=\"5xx\"} 1\n"));
        assert!(out.contains("portunus_requests_total{site=\"-\",code=\"4xx\"} 1\n"));
        assert!(out.contains(
            "portunus_request_duration_seconds_bucket{site=\"a.test\",le=\"0.005\"} 1\n"
        ));
        assert!(
            out.contains(
                "portunus_request_duration_seconds_bucket{site=\"a.test\",le=\"+Inf\"} 3\n"
            )
        );
        assert!(out.contains("portunus_request_duration_seconds_count{site=\"a.test\"} 3\n"));
        assert_eq!(escape("a\"b\\c"), "a\\\"b\\\\c");
    }
}
