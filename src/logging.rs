//! Logging: operational logs (pretty or JSON, `RUST_LOG` filters) to stderr, and the access
//! log (target `portunus::access`, combined or JSON) to stdout, a file, or nowhere.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, filter};

pub use crate::config::{AccessLog, AccessTo};

/// The access log's target.
pub const ACCESS_TARGET: &str = "portunus::access";

/// How operational logs look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Pretty,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber. Called once, by the binary only.
pub fn init(format: LogFormat, access: &AccessLog) -> anyhow::Result<()> {
    // One global filter: RUST_LOG for everything, plus the access target on or off as
    // configured. Being global, it gives tracing a maximum level, so disabled `debug!` and
    // `trace!` calls (in our crates and in hyper, h2, ...) cost nothing on the hot path.
    let access_directive = match access.to {
        AccessTo::Off => "portunus::access=off",
        _ => "portunus::access=info",
    };
    let filter = operational_filter(std::env::var("RUST_LOG").ok().as_deref())?.add_directive(
        access_directive
            .parse()
            .map_err(|e| anyhow::anyhow!("access log filter: {e}"))?,
    );
    let not_access = filter::filter_fn(|meta| meta.target() != ACCESS_TARGET);
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let ops = match format {
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .with_filter(not_access)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_filter(not_access)
            .boxed(),
    };
    let access_layer = match &access.to {
        AccessTo::Off => None,
        AccessTo::Stdout => Some(AccessLayer::new(Box::new(std::io::stdout()), access.json)),
        AccessTo::File(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| anyhow::anyhow!("cannot open access log {}: {e}", path.display()))?;
            Some(AccessLayer::new(Box::new(file), access.json))
        }
    };
    let access_layer = access_layer
        .map(|l| l.with_filter(filter::filter_fn(|meta| meta.target() == ACCESS_TARGET)));
    tracing_subscriber::registry()
        .with(filter)
        .with(ops)
        .with(access_layer)
        .try_init()
        .map_err(|e| anyhow::anyhow!("cannot install logging: {e}"))
}

/// What rustls reports at `warn` on a server is the peer's doing: a client that sends an IP
/// address as its SNI (wrk and other tools do), a warning alert, a message out of order. Left at
/// `warn`, any client could have a line written for every handshake it makes (a log flood, and
/// a write per connection on the hot path), so rustls logs only errors unless `RUST_LOG` names
/// it (`RUST_LOG=info,rustls=debug`): a later directive for the same target replaces this one.
const QUIET_BY_DEFAULT: &str = "rustls=error";

/// The operational logs' filter: `RUST_LOG` (`info` when unset or not valid) after
/// [`QUIET_BY_DEFAULT`].
fn operational_filter(rust_log: Option<&str>) -> anyhow::Result<EnvFilter> {
    let quiet = |spec: &str| EnvFilter::try_new(format!("{QUIET_BY_DEFAULT},{spec}"));
    match rust_log.map(quiet) {
        Some(Ok(filter)) => Ok(filter),
        _ => quiet("info").map_err(|e| anyhow::anyhow!("default log filter: {e}")),
    }
}

/// Writes each access event as one line.
struct AccessLayer {
    out: Mutex<Box<dyn Write + Send>>,
    json: bool,
}

impl AccessLayer {
    fn new(out: Box<dyn Write + Send>, json: bool) -> Self {
        Self {
            out: Mutex::new(out),
            json,
        }
    }
}

/// The fields of an access event.
#[derive(Debug, Default)]
struct Fields(serde_json::Map<String, serde_json::Value>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().to_owned(), format!("{value:?}").into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), value.into());
    }
}

impl Fields {
    fn text(&self, key: &str) -> String {
        match self.0.get(key) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => String::new(),
        }
    }
}

/// `[29/Nov/2026:04:00:00 +0000]` for the combined format.
fn clf_time(now: time::OffsetDateTime) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS
        .get(usize::from(u8::from(now.month())).saturating_sub(1))
        .unwrap_or(&"Jan");
    format!(
        "{:02}/{month}/{:04}:{:02}:{:02}:{:02} +0000",
        now.day(),
        now.year(),
        now.hour(),
        now.minute(),
        now.second()
    )
}

/// One access line: Apache/nginx combined (with the host and duration appended), or JSON.
fn format_line(fields: &Fields, json: bool, now: time::OffsetDateTime) -> String {
    if json {
        let mut map = fields.0.clone();
        map.insert("time".to_owned(), now.unix_timestamp().into());
        return serde_json::Value::Object(map).to_string();
    }
    let or_dash = |s: String| if s.is_empty() { "-".to_owned() } else { s };
    let version = match fields.text("version").as_str() {
        "HTTP/2.0" => "HTTP/2.0".to_owned(),
        "HTTP/1.0" => "HTTP/1.0".to_owned(),
        _ => "HTTP/1.1".to_owned(),
    };
    format!(
        "{} - - [{}] \"{} {} {}\" {} {} \"{}\" \"{}\" {} {:.3}",
        fields.text("remote"),
        clf_time(now),
        fields.text("method"),
        fields.text("uri"),
        version,
        fields.text("status"),
        or_dash(fields.text("bytes")),
        or_dash(fields.text("referer")),
        or_dash(fields.text("user_agent")),
        or_dash(fields.text("host")),
        fields
            .0
            .get("duration_ms")
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(0.0)
            / 1000.0,
    )
}

impl<S: Subscriber> Layer<S> for AccessLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let line = format_line(&fields, self.json, time::OffsetDateTime::now_utc());
        if let Ok(mut out) = self.out.lock() {
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields() -> Fields {
        let mut f = Fields::default();
        for (k, v) in [
            ("remote", "192.0.2.1"),
            ("method", "GET"),
            ("uri", "/a?b=c"),
            ("version", "HTTP/1.1"),
            ("host", "example.com"),
            ("bytes", "42"),
            ("referer", ""),
            ("user_agent", "curl/8"),
        ] {
            f.0.insert(k.to_owned(), v.into());
        }
        f.0.insert("status".to_owned(), 200u64.into());
        f.0.insert("duration_ms".to_owned(), 12.5f64.into());
        f
    }

    /// Which of four events (a rustls warning and error, a Portunus info and debug line), in
    /// the order sent, pass the operational filter made from `rust_log`.
    fn passed(rust_log: Option<&str>) -> Vec<&'static str> {
        #[derive(Clone, Default)]
        struct Seen(std::sync::Arc<Mutex<Vec<&'static str>>>);
        impl<S: Subscriber> Layer<S> for Seen {
            fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
                let meta = event.metadata();
                let name = match (meta.target(), *meta.level()) {
                    ("rustls::msgs::handshake", tracing::Level::WARN) => "rustls warn",
                    ("rustls::conn", tracing::Level::ERROR) => "rustls error",
                    ("portunus_proxy::proxy", tracing::Level::INFO) => "portunus info",
                    ("portunus_proxy::proxy", tracing::Level::DEBUG) => "portunus debug",
                    _ => "other",
                };
                self.0.lock().unwrap().push(name);
            }
        }
        let seen = Seen::default();
        let subscriber = tracing_subscriber::registry()
            .with(operational_filter(rust_log).unwrap())
            .with(seen.clone());
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(target: "rustls::msgs::handshake", "Illegal SNI extension");
            tracing::error!(target: "rustls::conn", "an error");
            tracing::info!(target: "portunus_proxy::proxy", "listening");
            tracing::debug!(target: "portunus_proxy::proxy", "detail");
        });
        seen.0.lock().unwrap().clone()
    }

    #[test]
    fn rustls_warnings_are_quiet_unless_rust_log_names_rustls() {
        assert_eq!(passed(None), ["rustls error", "portunus info"]);
        assert_eq!(passed(Some("warn")), ["rustls error"]);
        assert_eq!(
            passed(Some("info,rustls=warn")),
            ["rustls warn", "rustls error", "portunus info"]
        );
        assert_eq!(
            passed(Some("debug")),
            ["rustls error", "portunus info", "portunus debug"]
        );
        // Empty: as tracing reads an empty RUST_LOG (errors only).
        assert_eq!(passed(Some("")), ["rustls error"]);
        // Not a valid filter: the default.
        assert_eq!(passed(Some("=[")), ["rustls error", "portunus info"]);
    }

    #[test]
    fn combined_and_json_lines() {
        let now = time::macros::datetime!(2026-11-29 04:05:06 UTC);
        assert_eq!(
            format_line(&fields(), false, now),
            "192.0.2.1 - - [29/Nov/2026:04:05:06 +0000] \"GET /a?b=c HTTP/1.1\" 200 42 \"-\" \"curl/8\" example.com 0.013"
        );
        let json: serde_json::Value =
            serde_json::from_str(&format_line(&fields(), true, now)).unwrap();
        assert_eq!(json["status"], 200);
        assert_eq!(json["uri"], "/a?b=c");
        assert_eq!(json["time"], now.unix_timestamp());
    }
}
