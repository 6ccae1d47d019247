//! The TOML configuration: schema, validation with file:line:col, conversion to typed settings.
//!
//! Every error is collected and reported at once. Parsing touches neither disk (beyond reading
//! the file itself) nor network.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::StatusCode;
use ipnet::IpNet;
use portunus_acme::{ChallengeKind, KeyType};
use portunus_proxy::{
    Handler, LoadBalancing, ProxySettings, RouteSettings, SiteSettings, Timeouts,
};
use portunus_router::HostPattern;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// One configuration problem, located in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.col, self.message
        )
    }
}

/// Every problem found in one file (never empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// A certificate source of a site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tls {
    Acme,
    Internal,
    Off,
    Files { cert: PathBuf, key: PathBuf },
}

/// The listeners to open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    pub http: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
    pub admin_token: Option<String>,
    pub default_sni: Option<String>,
}

impl Default for Listen {
    fn default() -> Self {
        Self {
            http: Some(SocketAddr::from(([0u16; 8], 80))),
            https: Some(SocketAddr::from(([0u16; 8], 443))),
            admin: None,
            metrics: None,
            admin_token: None,
            default_sni: None,
        }
    }
}

/// Where the access log goes and how it looks.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AccessLog {
    pub to: AccessTo,
    pub json: bool,
}

/// The access log's destination.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AccessTo {
    #[default]
    Off,
    Stdout,
    File(PathBuf),
}

/// The `[limits]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_body: u64,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub h2_max_streams: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_body: 0,
            max_connections: 10_000,
            max_connections_per_ip: 256,
            h2_max_streams: 128,
        }
    }
}

/// The `[docker]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerConfig {
    pub endpoint: Option<String>,
    pub network: Option<String>,
    pub exposed_by_default: bool,
    pub allowed_domains: Vec<String>,
}

/// The `[acme]` table (and the top-level `email`).
#[derive(Debug, Clone)]
pub struct Acme {
    /// `ca = "internal"`: ACME sites use the local CA instead.
    pub internal: bool,
    pub directory: String,
    pub ca_root: Option<PathBuf>,
    pub email: Option<String>,
    pub challenges: Vec<ChallengeKind>,
    pub key_type: KeyType,
    pub profile: Option<String>,
    pub eab: Option<(String, String)>,
    pub backoff_base: Duration,
}

impl Default for Acme {
    fn default() -> Self {
        Self {
            internal: false,
            directory: portunus_acme::LETSENCRYPT.to_owned(),
            ca_root: None,
            email: None,
            challenges: vec![ChallengeKind::TlsAlpn01, ChallengeKind::Http01],
            key_type: KeyType::default(),
            profile: None,
            eab: None,
            backoff_base: Duration::from_secs(60),
        }
    }
}

impl Acme {
    /// The ACME crate's configuration.
    pub fn config(&self) -> portunus_acme::AcmeConfig {
        let mut config = portunus_acme::AcmeConfig::new(self.directory.clone())
            .challenges(self.challenges.clone())
            .key_type(self.key_type);
        if let Some(root) = &self.ca_root {
            config = config.ca_root(root.clone());
        }
        if let Some(email) = &self.email {
            config = config.email(email.clone());
        }
        if let Some(profile) = &self.profile {
            config = config.profile(profile.clone());
        }
        if let Some((kid, key)) = &self.eab {
            config = config.eab(kid.clone(), key.clone());
        }
        let mut budget = portunus_acme::Budget::default();
        budget.backoff_base = self.backoff_base;
        config.budget(budget)
    }
}

/// A site after validation.
#[derive(Debug, Clone)]
pub struct Site {
    pub settings: SiteSettings,
    pub tls: Tls,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub storage: PathBuf,
    pub listen: Listen,
    pub trusted_proxies: Vec<IpNet>,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub acme: Acme,
    pub log: AccessLog,
    pub sites: Vec<Site>,
    pub docker: Option<DockerConfig>,
    /// Worker threads serving the HTTP and HTTPS listeners; 0 = one per CPU.
    pub workers: usize,
}

impl Config {
    /// The proxy's settings.
    pub fn proxy_settings(&self) -> ProxySettings {
        let mut settings = ProxySettings::new()
            .timeouts(self.timeouts)
            .trusted_proxies(self.trusted_proxies.clone())
            .max_header_bytes(self.limits.max_header_bytes)
            .h2_max_streams(self.limits.h2_max_streams)
            .max_headers(self.limits.max_headers)
            .max_body(self.limits.max_body)
            .max_connections(
                self.limits.max_connections,
                self.limits.max_connections_per_ip,
            );
        if let Some(https) = self.listen.https {
            settings = settings.https_port(https.port());
        }
        for site in &self.sites {
            settings = settings.site(site.settings.clone());
        }
        settings
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(ConfigErrors),
}

/// Reads and validates a configuration file.
pub fn load(path: &Path) -> Result<Config, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(path, &text).map_err(LoadError::Invalid)
}

// ---------------------------------------------------------------------------------------------
// Raw schema (serde, unknown keys refused)

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListen {
    http: Option<Spanned<String>>,
    https: Option<Spanned<String>>,
    admin: Option<Spanned<String>>,
    admin_token: Option<Spanned<String>>,
    metrics: Option<Spanned<String>>,
    default_sni: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAcme {
    ca: Option<Spanned<String>>,
    ca_root: Option<Spanned<String>>,
    challenges: Option<Vec<Spanned<String>>>,
    key_type: Option<Spanned<String>>,
    profile: Option<Spanned<String>>,
    eab: Option<RawEab>,
    backoff_base: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEab {
    kid: String,
    hmac_key: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    connect: Option<Spanned<String>>,
    response_header: Option<Spanned<String>>,
    tls_handshake: Option<Spanned<String>>,
    header_read: Option<Spanned<String>>,
    body_read: Option<Spanned<String>>,
    write: Option<Spanned<String>>,
    idle: Option<Spanned<String>>,
    shutdown: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeValue {
    Text(String),
    Number(u64),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_header_bytes: Option<Spanned<SizeValue>>,
    max_body: Option<Spanned<SizeValue>>,
    max_connections: Option<u32>,
    max_connections_per_ip: Option<u32>,
    h2_max_streams: Option<u32>,
    max_headers: Option<u32>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawTls {
    Mode(String),
    Files { cert: String, key: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSite {
    hosts: Spanned<Vec<Spanned<String>>>,
    upstreams: Option<Vec<Spanned<String>>>,
    respond: Option<String>,
    tls: Option<Spanned<RawTls>>,
    https_redirect: Option<bool>,
    lb: Option<Spanned<String>>,
    hsts: Option<Spanned<String>>,
    max_body: Option<Spanned<SizeValue>>,
    #[serde(default)]
    route: Vec<Spanned<RawRoute>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    path: Spanned<String>,
    upstreams: Option<Vec<Spanned<String>>>,
    respond: Option<String>,
    #[serde(default)]
    strip_prefix: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    access: Option<Spanned<String>>,
    access_format: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDocker {
    endpoint: Option<String>,
    network: Option<String>,
    exposed_by_default: Option<bool>,
    allowed_domains: Option<Vec<Spanned<String>>>,
}

// ---------------------------------------------------------------------------------------------
// Validation

struct Checker<'a> {
    file: String,
    /// The configuration's directory: relative paths are relative to it.
    base: PathBuf,
    text: &'a str,
    errors: Vec<ConfigError>,
}

impl<'a> Checker<'a> {
    fn position(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = self.text.get(..offset).unwrap_or("");
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let col = before
            .get(line_start..)
            .map_or(1, |l| l.chars().count() + 1);
        (line, col)
    }

    fn at(&self, offset: usize) -> String {
        let (line, col) = self.position(offset);
        format!("{}:{line}:{col}", self.file)
    }

    fn error(&mut self, offset: usize, message: impl Into<String>) {
        let (line, col) = self.position(offset);
        self.errors.push(ConfigError {
            file: self.file.clone(),
            line,
            col,
            message: message.into(),
        });
    }

    fn toml_error(&mut self, e: &toml::de::Error, fallback: usize) {
        let offset = e.span().map_or(fallback, |s| s.start);
        self.error(offset, e.message().trim().to_owned());
    }

    /// Deserializes one value, recording its error; `None` when invalid.
    fn value<T: DeserializeOwned>(&mut self, value: Spanned<DeValue<'_>>) -> Option<T> {
        let start = value.span().start;
        let mut owned = value;
        owned.get_mut().make_owned();
        match T::deserialize(serde::de::IntoDeserializer::into_deserializer(owned)) {
            Ok(v) => Some(v),
            Err(e) => {
                self.toml_error(&e, start);
                None
            }
        }
    }

    fn duration(&mut self, value: &Option<Spanned<String>>, default: Duration) -> Duration {
        let Some(v) = value else { return default };
        match humantime::parse_duration(v.get_ref()) {
            Ok(d) => d,
            Err(e) => {
                self.error(
                    v.span().start,
                    format!(
                        "invalid duration `{}`: {e} (write e.g. \"500ms\", \"10s\", \"5m\")",
                        v.get_ref()
                    ),
                );
                default
            }
        }
    }

    fn size(&mut self, value: &Option<Spanned<SizeValue>>, default: u64) -> u64 {
        let Some(v) = value else { return default };
        match v.get_ref() {
            SizeValue::Number(n) => *n,
            SizeValue::Text(s) => match s.trim().parse::<bytesize::ByteSize>() {
                Ok(b) => b.as_u64(),
                Err(_) => {
                    self.error(
                        v.span().start,
                        format!("invalid size `{s}` (write e.g. \"64KiB\", \"10MB\", \"0\")"),
                    );
                    default
                }
            },
        }
    }

    fn listen_addr(&mut self, value: &Option<Spanned<String>>) -> Option<SocketAddr> {
        let v = value.as_ref()?;
        match parse_listen_addr(v.get_ref()) {
            Some(addr) => Some(addr),
            None => {
                self.error(
                    v.span().start,
                    format!("invalid listen address `{}` (write e.g. \"[::]:80\" or \"127.0.0.1:8080\")", v.get_ref()),
                );
                None
            }
        }
    }

    fn upstreams(&mut self, urls: &[Spanned<String>]) -> Vec<String> {
        for url in urls {
            if let Err(e) = portunus_proxy::check_upstream_url(url.get_ref()) {
                self.error(
                    url.span().start,
                    format!("invalid upstream URL `{}`: {e}", url.get_ref()),
                );
            }
        }
        urls.iter().map(|u| u.get_ref().clone()).collect()
    }
}

/// `[::]:80`, `127.0.0.1:8080`, or `:8080` (all interfaces).
pub fn parse_listen_addr(s: &str) -> Option<SocketAddr> {
    if let Some(port) = s.strip_prefix(':') {
        return port.parse().ok().map(|p| SocketAddr::from(([0u16; 8], p)));
    }
    s.parse().ok()
}

/// The default storage directory: `$XDG_DATA_HOME/portunus`, else `~/.local/share/portunus`.
pub fn default_storage() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("portunus");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(home).join(".local/share/portunus");
    }
    PathBuf::from("portunus-data")
}

const KNOWN_TOP: &[&str] = &[
    "email",
    "storage",
    "workers",
    "trusted_proxies",
    "listen",
    "acme",
    "timeouts",
    "limits",
    "site",
    "docker",
    "log",
];

/// Validates a configuration's text; `path` is used for messages and relative paths.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigErrors> {
    let mut c = Checker {
        file: path.display().to_string(),
        base: path.parent().unwrap_or(Path::new(".")).to_owned(),
        text,
        errors: Vec::new(),
    };
    let (root, syntax) = DeTable::parse_recoverable(text);
    for e in &syntax {
        c.toml_error(e, 0);
    }
    if !syntax.is_empty() {
        return Err(ConfigErrors(c.errors));
    }
    let mut entries: HashMap<String, Spanned<DeValue<'_>>> = HashMap::new();
    let mut key_spans: HashMap<String, usize> = HashMap::new();
    for (key, value) in root.into_inner() {
        let name = key.get_ref().to_string();
        if !KNOWN_TOP.contains(&name.as_str()) {
            c.error(
                key.span().start,
                format!(
                    "unknown key `{name}`, expected one of: {}",
                    KNOWN_TOP.join(", ")
                ),
            );
            continue;
        }
        key_spans.insert(name.clone(), key.span().start);
        entries.insert(name, value);
    }
    let mut take = |name: &str| entries.remove(name);

    let email: Option<String> = take("email").and_then(|v| c.value(v));
    let storage: Option<String> = take("storage").and_then(|v| c.value(v));
    let workers: u16 = take("workers").and_then(|v| c.value(v)).unwrap_or(0);
    let trusted_raw: Vec<Spanned<String>> = take("trusted_proxies")
        .and_then(|v| c.value(v))
        .unwrap_or_default();
    let mut trusted_proxies = Vec::new();
    for t in &trusted_raw {
        let s = t.get_ref();
        let parsed = s
            .parse::<IpNet>()
            .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from));
        match parsed {
            Ok(net) => trusted_proxies.push(net),
            Err(_) => c.error(
                t.span().start,
                format!("invalid network `{s}` (write e.g. \"10.0.0.0/8\" or \"192.0.2.1\")"),
            ),
        }
    }

    let listen_value = take("listen");
    let listen_present = listen_value.is_some();
    let raw_listen: Option<RawListen> = listen_value.and_then(|v| c.value(v));
    let listen = match (&raw_listen, listen_present) {
        (_, false) => Listen::default(),
        (None, true) => Listen {
            http: None,
            https: None,
            ..Listen::default()
        },
        (Some(l), true) => {
            if let Some(token) = &l.admin_token
                && token.get_ref().trim().is_empty()
            {
                c.error(token.span().start, "admin_token must not be empty");
            }
            Listen {
                http: c.listen_addr(&l.http),
                https: c.listen_addr(&l.https),
                admin: c.listen_addr(&l.admin),
                metrics: c.listen_addr(&l.metrics),
                admin_token: l.admin_token.as_ref().map(|t| t.get_ref().clone()),
                default_sni: l.default_sni.as_ref().map(|s| s.get_ref().clone()),
            }
        }
    };
    if let Some(sni) = raw_listen.as_ref().and_then(|l| l.default_sni.as_ref())
        && let Err(e) = HostPattern::parse(sni.get_ref())
    {
        c.error(sni.span().start, format!("invalid default_sni: {e}"));
    }

    let acme = match take("acme").and_then(|v| c.value::<RawAcme>(v)) {
        Some(raw) => check_acme(&mut c, raw, email),
        None => Acme {
            email,
            ..Acme::default()
        },
    };

    let defaults = Timeouts::default();
    let timeouts = match take("timeouts").and_then(|v| c.value::<RawTimeouts>(v)) {
        None => defaults,
        Some(t) => Timeouts::default()
            .body_read(c.duration(&t.body_read, defaults.body_read))
            .write(c.duration(&t.write, defaults.write))
            .tls_handshake(c.duration(&t.tls_handshake, defaults.tls_handshake))
            .connect(c.duration(&t.connect, defaults.connect))
            .response_header(c.duration(&t.response_header, defaults.response_header))
            .header_read(c.duration(&t.header_read, defaults.header_read))
            .idle(c.duration(&t.idle, defaults.idle))
            .shutdown(c.duration(&t.shutdown, defaults.shutdown)),
    };

    let mut limits = Limits::default();
    if let Some(l) = take("limits").and_then(|v| c.value::<RawLimits>(v)) {
        limits.max_header_bytes =
            usize::try_from(c.size(&l.max_header_bytes, 64 * 1024)).unwrap_or(usize::MAX);
        limits.max_body = c.size(&l.max_body, 0);
        let count = |v: Option<u32>, d: usize| v.map_or(d, |n| usize::try_from(n).unwrap_or(d));
        limits.max_connections = count(l.max_connections, limits.max_connections);
        limits.max_connections_per_ip =
            count(l.max_connections_per_ip, limits.max_connections_per_ip);
        limits.max_headers = count(l.max_headers, limits.max_headers);
        limits.h2_max_streams = l.h2_max_streams.unwrap_or(limits.h2_max_streams);
    }

    let mut log = AccessLog::default();
    if let Some(raw) = take("log").and_then(|v| c.value::<RawLog>(v)) {
        if let Some(to) = &raw.access {
            log.to = match to.get_ref().as_str() {
                "off" | "" => AccessTo::Off,
                "stdout" => AccessTo::Stdout,
                path => AccessTo::File(c.base.join(path)),
            };
        }
        if let Some(format) = &raw.access_format {
            match format.get_ref().as_str() {
                "combined" => log.json = false,
                "json" => log.json = true,
                other => c.error(
                    format.span().start,
                    format!("unknown access_format `{other}`: use combined or json"),
                ),
            }
        }
    }

    let docker = take("docker")
        .and_then(|v| c.value::<RawDocker>(v))
        .map(|raw| {
            let mut allowed = Vec::new();
            for pattern in raw.allowed_domains.iter().flatten() {
                match HostPattern::parse(pattern.get_ref()) {
                    Ok(p) => allowed.push(p.to_string()),
                    Err(e) => c.error(pattern.span().start, format!("invalid allowed domain: {e}")),
                }
            }
            DockerConfig {
                endpoint: raw.endpoint,
                network: raw.network,
                exposed_by_default: raw.exposed_by_default.unwrap_or(true),
                allowed_domains: allowed,
            }
        });

    let mut sites = Vec::new();
    let mut seen_hosts: HashMap<HostPattern, usize> = HashMap::new();
    if let Some(site_value) = take("site") {
        let start = site_value.span().start;
        match site_value.into_inner() {
            DeValue::Array(items) => {
                for item in items {
                    let origin = c.at(item.span().start);
                    if let Some(raw) = c.value::<RawSite>(item)
                        && let Some(site) = check_site(&mut c, raw, origin, &mut seen_hosts)
                    {
                        sites.push(site);
                    }
                }
            }
            _ => c.error(start, "`site` must be an array of tables: write [[site]]"),
        }
    }

    let needs_https = sites.iter().any(|s| s.tls != Tls::Off);
    if needs_https && listen.https.is_none() && listen_present {
        let offset = key_spans.get("listen").copied().unwrap_or(0);
        c.error(
            offset,
            "a site uses TLS but [listen] has no `https` listener (add one, or set tls = \"off\" on the site)",
        );
    }
    if sites.is_empty() && docker.is_none() && c.errors.is_empty() {
        c.error(
            0,
            "no site is configured: add a [[site]] (or a [docker] section)",
        );
    }

    if !c.errors.is_empty() {
        c.errors.sort_by_key(|e| (e.line, e.col));
        return Err(ConfigErrors(c.errors));
    }
    let base = c.base.clone();
    Ok(Config {
        storage: storage.map_or_else(default_storage, |s| base.join(s)),
        listen,
        trusted_proxies,
        timeouts,
        limits,
        acme,
        log,
        sites,
        docker,
        workers: usize::from(workers),
    })
}

fn check_acme(c: &mut Checker<'_>, acme: RawAcme, email: Option<String>) -> Acme {
    let mut out = Acme {
        email,
        ..Acme::default()
    };
    if let Some(ca) = &acme.ca {
        let v = ca.get_ref();
        if v == "internal" {
            out.internal = true;
        } else {
            match portunus_acme::directory_url(v) {
                Ok(url) => out.directory = url,
                Err(e) => c.error(ca.span().start, format!("{e}, or internal")),
            }
        }
    }
    out.ca_root = acme.ca_root.map(|p| c.base.join(p.get_ref()));
    if let Some(list) = &acme.challenges {
        out.challenges.clear();
        for ch in list {
            match ChallengeKind::parse(ch.get_ref()) {
                Some(kind) if !out.challenges.contains(&kind) => out.challenges.push(kind),
                Some(_) => {}
                None => c.error(
                    ch.span().start,
                    format!(
                        "unknown challenge `{}`: use tls-alpn-01 or http-01",
                        ch.get_ref()
                    ),
                ),
            }
        }
        if list.is_empty() {
            c.error(
                c.text.find("challenges").unwrap_or(0),
                "challenges must not be empty",
            );
        }
    }
    if let Some(k) = &acme.key_type {
        match KeyType::parse(k.get_ref()) {
            Some(key_type) => out.key_type = key_type,
            None => c.error(
                k.span().start,
                format!(
                    "unknown key_type `{}`: use ecdsa-p256, ecdsa-p384, rsa2048 or rsa4096",
                    k.get_ref()
                ),
            ),
        }
    }
    out.profile = acme.profile.map(|p| p.into_inner());
    out.eab = acme.eab.map(|e| (e.kid, e.hmac_key));
    out.backoff_base = c.duration(&acme.backoff_base, out.backoff_base);
    out
}

fn check_site(
    c: &mut Checker<'_>,
    raw: RawSite,
    origin: String,
    seen_hosts: &mut HashMap<HostPattern, usize>,
) -> Option<Site> {
    let errors_before = c.errors.len();
    let hosts_span = raw.hosts.span().start;
    if raw.hosts.get_ref().is_empty() {
        c.error(hosts_span, "`hosts` must list at least one host name");
    }
    let mut hosts = Vec::new();
    for host in raw.hosts.get_ref() {
        match HostPattern::parse(host.get_ref()) {
            Ok(pattern) => {
                if let Some(&first) = seen_hosts.get(&pattern) {
                    let first_at = c.at(first);
                    c.error(
                        host.span().start,
                        format!("host `{pattern}` is defined twice: first at {first_at}"),
                    );
                } else {
                    seen_hosts.insert(pattern, host.span().start);
                }
                hosts.push(host.get_ref().clone());
            }
            Err(e) => c.error(host.span().start, format!("invalid host: {e}")),
        }
    }

    let handler = if raw.upstreams.is_none() && raw.respond.is_none() {
        None
    } else {
        handler_at(c, &raw.upstreams, &raw.respond, "site", hosts_span)
    };
    if handler.is_none() && raw.route.is_empty() {
        c.error(
            hosts_span,
            "site needs `upstreams`, `respond` or at least one [[site.route]]",
        );
    }

    let lb = match raw
        .lb
        .as_ref()
        .map(|l| (l.get_ref().as_str(), l.span().start))
    {
        None | Some(("round_robin", _)) => LoadBalancing::RoundRobin,
        Some(("least_conn", _)) => LoadBalancing::LeastConn,
        Some((other, at)) => {
            c.error(
                at,
                format!("unknown lb `{other}`: use round_robin or least_conn"),
            );
            LoadBalancing::RoundRobin
        }
    };

    let tls = match raw.tls.as_ref().map(|t| (t.get_ref(), t.span().start)) {
        None => Tls::Acme,
        Some((RawTls::Mode(m), at)) => match m.as_str() {
            "acme" => Tls::Acme,
            "internal" => Tls::Internal,
            "off" => Tls::Off,
            other => {
                c.error(
                    at,
                    format!("unknown tls `{other}`: use acme, internal, off or {{ cert = \"...\", key = \"...\" }}"),
                );
                Tls::Off
            }
        },
        Some((RawTls::Files { cert, key }, _)) => Tls::Files {
            cert: c.base.join(cert),
            key: c.base.join(key),
        },
    };
    if let Some(hsts) = &raw.hsts
        && (hsts.get_ref().trim().is_empty()
            || http::HeaderValue::from_str(hsts.get_ref()).is_err())
    {
        c.error(
            hsts.span().start,
            "hsts must be a valid header value, e.g. \"max-age=31536000\"",
        );
    }
    let site_max_body = raw.max_body.as_ref().map(|_| c.size(&raw.max_body, 0));
    let mut settings = SiteSettings::new(origin.clone(), hosts)
        .lb(lb)
        .tls(tls != Tls::Off)
        .https_redirect(raw.https_redirect.unwrap_or(true));
    if let Some(hsts) = &raw.hsts {
        settings = settings.hsts(hsts.get_ref().clone());
    }
    if let Some(max_body) = site_max_body {
        settings = settings.max_body(max_body);
    }
    if let Some(h) = handler {
        settings = settings.handler(h);
    }
    let mut paths: HashMap<String, usize> = HashMap::new();
    for route in &raw.route {
        let start = route.span().start;
        let route = route.get_ref();
        let path = route.path.get_ref();
        if !path.starts_with('/') {
            c.error(
                route.path.span().start,
                format!("route path `{path}` must start with `/`"),
            );
            continue;
        }
        let normalized = path.trim_end_matches('/').to_owned();
        if let Some(&first) = paths.get(&normalized) {
            let first_at = c.at(first);
            c.error(
                route.path.span().start,
                format!("route path `{path}` is defined twice in this site: first at {first_at}"),
            );
        }
        paths.insert(normalized, route.path.span().start);
        let what = format!("route {path}");
        let Some(h) = handler_at(c, &route.upstreams, &route.respond, &what, start) else {
            continue;
        };
        settings =
            settings.route(RouteSettings::new(path.clone(), h).strip_prefix(route.strip_prefix));
    }
    (c.errors.len() == errors_before).then_some(Site { settings, tls })
}

fn handler_at(
    c: &mut Checker<'_>,
    upstreams: &Option<Vec<Spanned<String>>>,
    respond: &Option<String>,
    what: &str,
    at: usize,
) -> Option<Handler> {
    match (upstreams, respond) {
        (Some(urls), None) => {
            if urls.is_empty() {
                c.error(at, format!("{what}: `upstreams` must not be empty"));
                return None;
            }
            Some(Handler::Upstreams(c.upstreams(urls)))
        }
        (None, Some(text)) => Some(Handler::Respond {
            status: StatusCode::OK,
            body: text.clone(),
        }),
        (Some(urls), Some(_)) => {
            let at = urls.first().map_or(at, |u| u.span().start);
            c.error(
                at,
                format!("{what}: give either `upstreams` or `respond`, not both"),
            );
            None
        }
        (None, None) => {
            c.error(at, format!("{what}: needs `upstreams` or `respond`"));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<String> {
        match parse(Path::new("t.toml"), text) {
            Ok(_) => Vec::new(),
            Err(e) => e.0.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn minimal_site_is_valid() {
        let config = parse(
            Path::new("/etc/portunus/portunus.toml"),
            r#"
[listen]
http = "127.0.0.1:8080"

[[site]]
hosts = ["example.com"]
upstreams = ["http://127.0.0.1:9000"]
tls = "off"
"#,
        )
        .unwrap();
        assert_eq!(config.listen.http, Some("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(config.listen.https, None);
        assert_eq!(config.sites.len(), 1);
        assert_eq!(
            config.sites[0].settings.origin,
            "/etc/portunus/portunus.toml:5:1"
        );
        assert_eq!(config.timeouts, Timeouts::default());
    }

    #[test]
    fn absent_listen_means_both_defaults() {
        let config = parse(
            Path::new("p.toml"),
            "[[site]]\nhosts=[\"a.test\"]\nrespond=\"hi\"\ntls=\"off\"\n",
        )
        .unwrap();
        assert_eq!(config.listen, Listen::default());
    }

    #[test]
    fn error_table() {
        let cases: &[(&str, &[&str])] = &[
            (
                "workers = -2\n[[site]]\nhosts=[\"a.test\"]\nrespond=\"x\"",
                &["t.toml:1:11: invalid value"],
            ),
            (
                "nonsense = 1\n[[site]]\nhosts=[\"a.test\"]\nrespond=\"x\"",
                &["t.toml:1:1: unknown key `nonsense`"],
            ),
            (
                "[[site]]\nhosts = \"a.test\"\nrespond=\"x\"",
                &["t.toml:2:9: invalid type"],
            ),
            (
                "[[site]]\nhosts=[\"a.test\"]\nupstreams=[\"ftp://x\"]",
                &["t.toml:3:12: invalid upstream URL `ftp://x`"],
            ),
            (
                "[[site]]\nhosts=[\"a.test\"]\nrespond=\"x\"\n[[site]]\nhosts=[\"A.test.\"]\nrespond=\"y\"",
                &["t.toml:5:8: host `a.test` is defined twice: first at t.toml:2:8"],
            ),
            (
                "[[site]]\nhosts=[\"a.test\"]\nrespond=\"x\"\nbogus=1",
                &["t.toml:4:1: unknown field `bogus`"],
            ),
            (
                "[timeouts]\nconnect=\"soon\"\n[[site]]\nhosts=[\"a.test\"]\nrespond=\"x\"",
                &["t.toml:2:9: invalid duration `soon`"],
            ),
            (
                "[listen]\nhttp=\"nowhere\"\n[[site]]\nhosts=[\"a.test\"]\nrespond=\"x\"\ntls=\"off\"",
                &["t.toml:2:6: invalid listen address"],
            ),
            (
                "[listen]\nhttp=\":8080\"\n[[site]]\nhosts=[\"a.test\"]\nrespond=\"x\"",
                &["t.toml:1:2: a site uses TLS but [listen] has no `https` listener"],
            ),
            (
                "[[site]]\nhosts=[\"bad host\"]\nrespond=\"x\"",
                &["t.toml:2:8: invalid host"],
            ),
            (
                "[[site]]\nhosts=[\"a.test\"]\nlb=\"random\"\nrespond=\"x\"",
                &["t.toml:3:4: unknown lb `random`"],
            ),
            (
                "[[site]]\nhosts=[\"a.test\"]\n[[site.route]]\npath=\"api\"\nupstreams=[\"http://x\"]",
                &["t.toml:4:6: route path `api` must start with `/`"],
            ),
            (
                "[[site]]\nhosts=[\"a.test\"]",
                &["t.toml:2:7: site needs `upstreams`, `respond`"],
            ),
            (
                "trusted_proxies=[\"10.0.0.0/33\"]\n[[site]]\nhosts=[\"a.test\"]\nrespond=\"x\"",
                &["t.toml:1:18: invalid network"],
            ),
            (
                "[limits]\nmax_header_bytes=\"lots\"\n[[site]]\nhosts=[\"a.test\"]\nrespond=\"x\"",
                &["t.toml:2:18: invalid size"],
            ),
            (
                "[[site]\nhosts=[",
                &[
                    "t.toml:1:8: unclosed array table",
                    "t.toml:2:8: unclosed array",
                ],
            ),
            ("", &["t.toml:1:1: no site is configured"]),
            (
                "[docker]\nallowed_domains = [\"bad domain\"]",
                &["t.toml:2:20: invalid allowed domain"],
            ),
            (
                "[docker]\nexposed_by_default = \"yes\"",
                &["t.toml:2:22: invalid type"],
            ),
        ];
        for (text, want) in cases {
            let got = errors(text);
            assert_eq!(got.len(), want.len(), "{text}\n{got:#?}");
            for (g, w) in got.iter().zip(want.iter()) {
                assert!(g.starts_with(w), "{text}\n got: {g}\nwant: {w}");
            }
        }
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let text = r#"
unknown_top = true

[[site]]
hosts = ["a.test"]
upstreams = ["not a url"]

[[site]]
hosts = 42
respond = "x"

[[site]]
hosts = ["a.test"]
respond = "dup"
"#;
        let got = errors(text);
        assert_eq!(got.len(), 4, "{got:#?}");
        assert!(got[0].starts_with("t.toml:2:1: unknown key"));
        assert!(got[1].starts_with("t.toml:6:14: invalid upstream URL"));
        assert!(got[2].starts_with("t.toml:9:9: invalid type"));
        assert!(
            got[3]
                .starts_with("t.toml:13:10: host `a.test` is defined twice: first at t.toml:5:10")
        );
    }

    #[test]
    fn durations_sizes_and_routes_convert() {
        let config = parse(
            Path::new("t.toml"),
            r#"
trusted_proxies = ["10.0.0.0/8", "192.0.2.1"]
[listen]
http = ":8080"
[timeouts]
connect = "500ms"
idle = "5m"
[limits]
max_header_bytes = "16KiB"
max_body = 0
[[site]]
hosts = ["a.test", "*.a.test"]
upstreams = ["http://127.0.0.1:1", "http://127.0.0.1:2/base"]
lb = "least_conn"
tls = "off"
[[site.route]]
path = "/api/"
upstreams = ["http://127.0.0.1:3"]
strip_prefix = true
"#,
        )
        .unwrap();
        assert_eq!(config.timeouts.connect, Duration::from_millis(500));
        assert_eq!(config.timeouts.idle, Duration::from_secs(300));
        assert_eq!(config.limits.max_header_bytes, 16 * 1024);
        assert_eq!(config.limits.max_body, 0);
        assert_eq!(config.trusted_proxies.len(), 2);
        assert_eq!(config.listen.http, Some("[::]:8080".parse().unwrap()));
        let site = &config.sites[0].settings;
        assert_eq!(site.lb, LoadBalancing::LeastConn);
        assert_eq!(site.routes.len(), 1);
        assert!(site.routes[0].strip_prefix);
        let proxy = config.proxy_settings();
        assert_eq!(proxy.sites.len(), 1);
    }

    #[test]
    fn embedded_default_is_valid() {
        let config = parse(
            Path::new("(embedded default)"),
            crate::run::EMBEDDED_DEFAULT,
        )
        .unwrap();
        assert_eq!(config.listen.http, Some("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(config.listen.https, Some("127.0.0.1:8443".parse().unwrap()));
        assert!(config.sites.iter().all(|s| s.tls == Tls::Internal));
    }

    #[test]
    fn full_design_example_is_accepted() {
        let text = include_str!("../config.example.toml");
        let config = parse(Path::new("config.example.toml"), text);
        assert!(
            config.is_ok(),
            "{}",
            config.err().map(|e| e.to_string()).unwrap_or_default()
        );
    }
}
