//! When to renew and when to retry: ARI windows, the one-third rule, backoff.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use portunus_store::CertInfo;

/// Renewal without ARI: when one third of the lifetime remains, made earlier by up to a
/// fifteenth of the lifetime (`jitter` in `0.0..1.0`) so a farm does not renew all at once.
/// A 90-day certificate renews 30 to 36 days before expiry, a 6-day one 2 to 2.4 days before.
pub(crate) fn renew_at_third(info: &CertInfo, jitter: f64) -> SystemTime {
    let lifetime = info.lifetime().as_secs_f64();
    let before_expiry = lifetime / 3.0 + lifetime / 15.0 * jitter.clamp(0.0, 1.0);
    let at = info.not_after as f64 - before_expiry;
    UNIX_EPOCH + Duration::from_secs_f64(at.max(0.0))
}

/// Renewal with ARI (RFC 9773 §4.2): a uniformly random moment inside the suggested window
/// (`random` in `0.0..1.0`); a window already open or past means now.
pub(crate) fn renew_at_window(
    start: SystemTime,
    end: SystemTime,
    now: SystemTime,
    random: f64,
) -> SystemTime {
    if end <= now {
        return now;
    }
    let span = end.duration_since(start).unwrap_or(Duration::ZERO);
    let at = start + span.mul_f64(random.clamp(0.0, 1.0));
    at.max(now)
}

/// The delay before retry number `failures` (1 for the first failure): `base`, doubled for
/// each further failure, at most `cap`.
pub(crate) fn backoff(failures: u32, base: Duration, cap: Duration) -> Duration {
    let doublings = failures.saturating_sub(1).min(30);
    base.saturating_mul(1u32 << doublings).min(cap)
}

/// The time a `rateLimited` problem's detail names (Let's Encrypt writes
/// `retry after 2026-01-02 03:04:05 UTC`), if any.
pub(crate) fn retry_after_in_detail(detail: &str) -> Option<SystemTime> {
    let lower = detail.to_ascii_lowercase();
    let at = lower.find("retry after ")? + "retry after ".len();
    let rest = detail.get(at..)?;
    let stamp: String = rest.chars().take(19).collect();
    let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    let parsed = time::PrimitiveDateTime::parse(&stamp, &format)
        .ok()
        .or_else(|| {
            let iso =
                time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]");
            time::PrimitiveDateTime::parse(&stamp, &iso).ok()
        })?;
    let secs = parsed.assume_utc().unix_timestamp();
    Some(UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?))
}

/// Converts an ARI timestamp.
pub(crate) fn system_time(t: time::OffsetDateTime) -> SystemTime {
    let secs = t.unix_timestamp();
    if secs <= 0 {
        return UNIX_EPOCH;
    }
    UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
}

/// Seconds since the Unix epoch.
pub(crate) fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Checks a wanted profile against those a directory offers (none offered: not checked).
pub(crate) fn check_profile(offered: &[&str], wanted: Option<&str>) -> Result<(), String> {
    match wanted {
        Some(p) if !offered.is_empty() && !offered.contains(&p) => Err(format!(
            "the CA does not offer profile `{p}` (it offers: {})",
            offered.join(", ")
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(days: u64, not_after: u64) -> CertInfo {
        let mut info: CertInfo = serde_json::from_value(serde_json::json!({
            "names": ["a.test"], "not_before": 0, "not_after": 0, "issuer": "CN=x"
        }))
        .unwrap();
        info.not_before = not_after - days * 86400;
        info.not_after = not_after;
        info
    }

    #[test]
    fn one_third_rule_for_short_and_long_lifetimes() {
        let end = 1_000_000_000;
        for days in [6u64, 45, 90] {
            let cert = info(days, end);
            let earliest = unix(renew_at_third(&cert, 1.0));
            let latest = unix(renew_at_third(&cert, 0.0));
            assert_eq!(end - latest, days * 86400 / 3, "{days} days");
            assert!(earliest < latest);
            assert!(end - earliest <= days * 86400 * 2 / 5, "{days} days");
        }
    }

    #[test]
    fn ari_window_from_recorded_renewal_info() {
        // As served by a CA's renewalInfo endpoint (RFC 9773 §4.2).
        let recorded = r#"{
            "suggestedWindow": {"start": "2026-12-01T00:00:00Z", "end": "2026-12-03T00:00:00Z"},
            "explanationURL": "https://ca.example/why"
        }"#;
        let ri: instant_acme::RenewalInfo = serde_json::from_str(recorded).unwrap();
        let (start, end) = (
            system_time(ri.suggested_window.start),
            system_time(ri.suggested_window.end),
        );
        let before = start - Duration::from_secs(86400 * 10);
        assert_eq!(renew_at_window(start, end, before, 0.0), start);
        assert_eq!(renew_at_window(start, end, before, 1.0), end);
        let mid = renew_at_window(start, end, before, 0.5);
        assert_eq!(unix(mid), unix(start) + 86400);
        // Window past: now.
        let after = end + Duration::from_secs(60);
        assert_eq!(renew_at_window(start, end, after, 0.3), after);
        // Window open: never before now.
        let inside = start + Duration::from_secs(3600);
        assert!(renew_at_window(start, end, inside, 0.0) >= inside);
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let (base, cap) = (Duration::from_secs(60), Duration::from_secs(3600));
        let got: Vec<u64> = (1..=9).map(|n| backoff(n, base, cap).as_secs()).collect();
        assert_eq!(got, [60, 120, 240, 480, 960, 1920, 3600, 3600, 3600]);
        assert_eq!(backoff(1000, base, cap), cap);
    }

    #[test]
    fn rate_limit_detail() {
        let d = "too many certificates (5) already issued for this exact set of domains in the last 168h0m0s, retry after 2026-12-01 10:20:30 UTC: see https://letsencrypt.org/docs/rate-limits/";
        let at = retry_after_in_detail(d).unwrap();
        assert_eq!(unix(at), 1_796_120_430);
        assert!(retry_after_in_detail("no time here").is_none());
    }

    #[test]
    fn profiles_from_recorded_directory() {
        // The `meta.profiles` of a directory that offers profiles.
        let recorded = r#"{"meta": {"profiles": {"classic": "...", "tlsserver": "...", "shortlived": "..."}}}"#;
        let doc: serde_json::Value = serde_json::from_str(recorded).unwrap();
        let offered: Vec<&str> = doc["meta"]["profiles"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert!(check_profile(&offered, Some("shortlived")).is_ok());
        assert!(
            check_profile(&offered, Some("bogus"))
                .unwrap_err()
                .contains("bogus")
        );
        assert!(
            check_profile(&[], Some("anything")).is_ok(),
            "Pebble 2.4 offers none"
        );
        assert!(check_profile(&offered, None).is_ok());
    }
}
