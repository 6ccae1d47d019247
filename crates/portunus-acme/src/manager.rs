//! The manager: which names need certificates, when each is due, what happened last.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use instant_acme::{Account, CertificateIdentifier};
use portunus_store::{BlobKind, CertInfo, CertPair, CertResolver, CertStorage};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, Semaphore, broadcast};
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::config::AcmeConfig;
use crate::error::{Error, Result};
use crate::order::{load_or_create_account, order};
use crate::schedule::{
    backoff, renew_at_third, renew_at_window, retry_after_in_detail, system_time, unix,
};

/// An issuance or renewal outcome, for embedders (see [`AcmeManager::subscribe`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AcmeEvent {
    /// A certificate was obtained and put in service.
    Issued {
        /// The host name.
        name: String,
        /// Its end of validity, seconds since the Unix epoch.
        not_after: u64,
        /// Whether it replaced a previous certificate.
        renewal: bool,
    },
    /// An order failed; the current certificate (if any) stays in service.
    Failed {
        /// The host name.
        name: String,
        /// What went wrong (ACME problem type and detail when the CA gave one).
        error: String,
        /// When the next attempt is due, seconds since the Unix epoch.
        retry_at: u64,
    },
}

/// One managed certificate as `/status` and `portunus certs list` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct CertStatus {
    /// The host name.
    pub name: String,
    /// The issuer of the certificate in service, if any.
    pub issuer: Option<String>,
    /// Its end of validity (seconds since the Unix epoch).
    pub not_after: Option<u64>,
    /// When it will be renewed (or, without a certificate, next attempted).
    pub next_renewal: Option<u64>,
    /// The last failure, if the last attempt failed.
    pub last_error: Option<String>,
    /// Failures in a row.
    pub failures: u32,
}

/// What survives restarts for each name: the backoff.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Persisted {
    failures: u32,
    retry_at: u64,
    last_error: Option<String>,
}

#[derive(Debug, Default)]
struct NameState {
    cert: Option<CertInfo>,
    leaf: Option<CertificateDer<'static>>,
    next_renewal: u64,
    ari_checked: bool,
    forced: bool,
    running: bool,
    persisted: Persisted,
}

#[derive(Debug, Default)]
struct Pacing {
    orders: VecDeque<SystemTime>,
    failures: HashMap<String, VecDeque<SystemTime>>,
    issued: HashMap<String, VecDeque<SystemTime>>,
}

/// The registered domain a name counts against: its last two labels (a public-suffix list
/// would be exact; two labels is never looser for the common suffixes).
fn registered_domain(name: &str) -> String {
    let labels: Vec<&str> = name.rsplit('.').take(2).collect();
    labels.into_iter().rev().collect::<Vec<_>>().join(".")
}

struct Inner {
    config: AcmeConfig,
    ca_key: String,
    storage: Arc<dyn CertStorage>,
    resolver: Arc<CertResolver>,
    provider: Arc<CryptoProvider>,
    account: tokio::sync::Mutex<Option<Account>>,
    names: Mutex<BTreeMap<String, NameState>>,
    pacing: Mutex<Pacing>,
    slots: Semaphore,
    /// Whether the CA answered a renewalInfo (ARI) request.
    ari: AtomicBool,
    orders_ok: AtomicU64,
    orders_failed: AtomicU64,
    wake: Notify,
    events: broadcast::Sender<AcmeEvent>,
}

/// Obtains and renews certificates over ACME for a set of host names, one certificate per
/// name, into a [`CertStorage`] and a [`CertResolver`].
///
/// Call [`AcmeManager::load`] before the listeners accept (stored certificates go in service
/// and are never re-ordered while they are fresh), then drive [`AcmeManager::run`].
#[derive(Clone)]
pub struct AcmeManager {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AcmeManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcmeManager")
            .field("directory", &self.inner.config.directory)
            .field("names", &self.lock_names().keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl AcmeManager {
    /// A manager for the CA of `config`, storing in `storage` and serving through `resolver`
    /// (whose [`Challenges`](portunus_store::Challenges) answer the validations).
    pub fn new(
        config: AcmeConfig,
        storage: Arc<dyn CertStorage>,
        resolver: Arc<CertResolver>,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self> {
        let ca_key = config.ca_key()?;
        let (events, _) = broadcast::channel(256);
        let slots = Semaphore::new(config.budget.concurrent_orders.max(1));
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                ca_key,
                storage,
                resolver,
                provider,
                account: tokio::sync::Mutex::new(None),
                names: Mutex::new(BTreeMap::new()),
                pacing: Mutex::new(Pacing::default()),
                slots,
                ari: AtomicBool::new(false),
                orders_ok: AtomicU64::new(0),
                orders_failed: AtomicU64::new(0),
                wake: Notify::new(),
                events,
            }),
        })
    }

    /// The storage key of the CA.
    pub fn ca_key(&self) -> &str {
        &self.inner.ca_key
    }

    fn lock_names(&self) -> MutexGuard<'_, BTreeMap<String, NameState>> {
        self.inner
            .names
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sets the names to keep certificates for. Names no longer listed stop being renewed
    /// and leave the resolver; their stored certificates are kept for when they return.
    /// New names are loaded from storage by the next [`AcmeManager::load`] or ordered by
    /// [`AcmeManager::run`].
    pub fn set_names<I, S>(&self, names: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let wanted: Vec<String> = names
            .into_iter()
            .map(|n| n.into().trim_end_matches('.').to_ascii_lowercase())
            .collect();
        let mut map = self.lock_names();
        let gone: Vec<String> = map
            .keys()
            .filter(|k| !wanted.contains(k))
            .cloned()
            .collect();
        for name in gone {
            map.remove(&name);
            self.inner.resolver.remove(&name);
        }
        for name in wanted {
            map.entry(name).or_default();
        }
        drop(map);
        self.inner.wake.notify_one();
    }

    /// Puts every stored certificate that still covers its name in service and restores each
    /// name's backoff. Returns the problems met; the other names still load.
    pub async fn load(&self) -> Vec<Error> {
        let names: Vec<String> = self.lock_names().keys().cloned().collect();
        let mut errors = Vec::new();
        for name in names {
            let (ca, storage) = (&self.inner.ca_key, &self.inner.storage);
            match storage.load_blob(BlobKind::State, ca, &name).await {
                Ok(Some(blob)) => {
                    if let Ok(persisted) = serde_json::from_slice::<Persisted>(&blob)
                        && let Some(state) = self.lock_names().get_mut(&name)
                    {
                        state.persisted = persisted;
                    }
                }
                Ok(None) => {}
                Err(e) => errors.push(e.into()),
            }
            match storage.load(ca, &name).await {
                Ok(Some(stored)) if stored.info.covers(&name) => {
                    if let Err(e) = self.install(&name, &stored.pair, stored.info, false) {
                        errors.push(e);
                    }
                }
                Ok(_) => {}
                Err(e) => errors.push(e.into()),
            }
        }
        self.inner.wake.notify_one();
        errors
    }

    /// Every managed name with its certificate and renewal state.
    pub fn status(&self) -> Vec<CertStatus> {
        self.lock_names()
            .iter()
            .map(|(name, state)| CertStatus {
                name: name.clone(),
                issuer: state.cert.as_ref().map(|c| c.issuer.clone()),
                not_after: state.cert.as_ref().map(|c| c.not_after),
                next_renewal: Some(if state.cert.is_some() {
                    state.next_renewal.max(state.persisted.retry_at)
                } else {
                    state.persisted.retry_at
                }),
                last_error: state.persisted.last_error.clone(),
                failures: state.persisted.failures,
            })
            .collect()
    }

    /// Renews `name` now (also while backing off). `name` is any host a managed certificate
    /// covers.
    pub fn renew(&self, name: &str) -> Result<()> {
        let wanted = name.trim_end_matches('.').to_ascii_lowercase();
        let mut map = self.lock_names();
        let key = if map.contains_key(&wanted) {
            Some(wanted.clone())
        } else {
            map.iter()
                .find(|(_, s)| s.cert.as_ref().is_some_and(|c| c.covers(&wanted)))
                .map(|(k, _)| k.clone())
        };
        let state = key
            .and_then(|k| map.get_mut(&k))
            .ok_or(Error::UnknownName(wanted))?;
        // Asked for explicitly: now, whatever the backoff says; kept until it succeeds.
        state.forced = true;
        state.persisted.retry_at = 0;
        drop(map);
        self.inner.wake.notify_one();
        Ok(())
    }

    /// Orders finished since start: (succeeded, failed).
    pub fn orders_total(&self) -> (u64, u64) {
        (
            self.inner.orders_ok.load(Ordering::Relaxed),
            self.inner.orders_failed.load(Ordering::Relaxed),
        )
    }

    /// A stream of issuance and renewal outcomes.
    pub fn subscribe(&self) -> broadcast::Receiver<AcmeEvent> {
        self.inner.events.subscribe()
    }

    fn install(&self, name: &str, pair: &CertPair, info: CertInfo, renewal: bool) -> Result<()> {
        let key = pair.certified_key(&self.inner.provider, name)?;
        let leaf = key.cert.first().cloned();
        self.inner.resolver.insert(name, key);
        let next = unix(renew_at_third(&info, fastrand::f64()));
        info!(sni = %name, not_after = info.not_after, next_renewal = next, renewal, "certificate in service");
        if let Some(state) = self.lock_names().get_mut(name) {
            state.next_renewal = next;
            state.cert = Some(info);
            state.leaf = leaf;
            state.ari_checked = false;
        }
        Ok(())
    }

    /// Names due now, marked running; and the earliest future due time.
    fn due(&self, now: u64) -> (Vec<String>, Option<u64>) {
        let mut due = Vec::new();
        let mut next: Option<u64> = None;
        for (name, state) in self.lock_names().iter_mut() {
            if state.running {
                continue;
            }
            let at = if state.forced || state.cert.is_none() {
                state.persisted.retry_at
            } else if !state.ari_checked {
                // A certificate just put in service: ask the CA for its window (ARI) now.
                now
            } else {
                state.next_renewal.max(state.persisted.retry_at)
            };
            if at <= now {
                state.running = true;
                due.push(name.clone());
            } else {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        }
        (due, next)
    }

    /// Keeps every name's certificate fresh until `shutdown` completes. Orders for different
    /// names run concurrently within the budget; one name has at most one order in flight.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut tasks = JoinSet::new();
        loop {
            let now = unix(SystemTime::now());
            let (due, next) = self.due(now);
            for name in due {
                let this = self.clone();
                let span = info_span!("acme_order", sni = %name);
                tasks.spawn(async move { this.attempt(&name).await }.instrument(span));
            }
            let sleep = next.map_or(Duration::from_secs(3600), |at| {
                Duration::from_secs(at.saturating_sub(now).clamp(1, 3600))
            });
            tokio::select! {
                () = &mut shutdown => return,
                () = self.inner.wake.notified() => {}
                () = tokio::time::sleep(sleep) => {}
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
    }

    async fn account(&self) -> Result<Account> {
        self.account_inner(false).await
    }

    async fn new_account(&self) -> Result<Account> {
        self.account_inner(true).await
    }

    async fn account_inner(&self, fresh: bool) -> Result<Account> {
        let mut guard = self.inner.account.lock().await;
        if let Some(account) = guard.as_ref().filter(|_| !fresh) {
            return Ok(account.clone());
        }
        let account = load_or_create_account(
            &self.inner.config,
            &self.inner.ca_key,
            self.inner.storage.as_ref(),
            fresh,
        )
        .await?;
        if let Err(e) = crate::schedule::check_profile(
            &account.profiles().map(|p| p.name).collect::<Vec<_>>(),
            self.inner.config.profile.as_deref(),
        ) {
            return Err(Error::Config(e));
        }
        *guard = Some(account.clone());
        Ok(account)
    }

    /// One attempt for `name`: an ARI check for a certificate just put in service, then an
    /// order if (and only if) the certificate is missing, due, or a renewal was requested.
    async fn attempt(&self, name: &str) {
        let snapshot = self
            .lock_names()
            .get(name)
            .map(|s| (s.forced, s.cert.is_some(), s.ari_checked));
        let Some((forced, has_cert, ari_checked)) = snapshot else {
            return;
        };
        if has_cert && !forced && !ari_checked {
            self.check_ari(name).await;
        }
        let due = self.lock_names().get(name).is_some_and(|s| {
            s.forced || s.cert.is_none() || s.next_renewal <= unix(SystemTime::now())
        });
        if !due {
            self.finish(name, forced);
            return;
        }
        let result = self.obtain(name).await;
        let now = SystemTime::now();
        match result {
            Ok(()) => {}
            Err(error) => {
                self.inner.orders_failed.fetch_add(1, Ordering::Relaxed);
                let mut retry = {
                    let failures = self
                        .lock_names()
                        .get(name)
                        .map_or(0, |s| s.persisted.failures)
                        + 1;
                    let budget = &self.inner.config.budget;
                    now + backoff(failures, budget.backoff_base, budget.backoff_cap)
                };
                if error.is_rate_limited() {
                    let said = match &error {
                        Error::Problem { detail, .. } => retry_after_in_detail(detail),
                        _ => None,
                    };
                    let floor = said.unwrap_or(now + self.inner.config.budget.rate_limited_wait);
                    retry = retry.max(floor);
                }
                if matches!(error, Error::Invalid { .. }) {
                    let mut pacing = self.pacing();
                    pacing
                        .failures
                        .entry(name.to_owned())
                        .or_default()
                        .push_back(now);
                }
                let message = error_chain(&error);
                warn!(sni = %name, error = %message, retry_at = unix(retry), "certificate order failed; the current certificate stays in service");
                let persisted = {
                    let mut map = self.lock_names();
                    map.get_mut(name).map(|state| {
                        state.persisted.failures += 1;
                        state.persisted.retry_at = unix(retry);
                        state.persisted.last_error = Some(message.clone());
                        state.persisted.clone()
                    })
                };
                if let Some(p) = persisted {
                    self.persist(name, &p).await;
                }
                let _ = self.inner.events.send(AcmeEvent::Failed {
                    name: name.to_owned(),
                    error: message,
                    retry_at: unix(retry),
                });
            }
        }
        self.finish(name, forced);
    }

    /// Ends an attempt. A forced renewal stays requested until an attempt that was forced
    /// succeeds; one requested while an unforced attempt ran is kept for the next attempt.
    fn finish(&self, name: &str, was_forced: bool) {
        if let Some(state) = self.lock_names().get_mut(name) {
            state.running = false;
            if was_forced && state.persisted.failures == 0 {
                state.forced = false;
            }
        }
        self.inner.wake.notify_one();
    }

    fn pacing(&self) -> MutexGuard<'_, Pacing> {
        self.inner
            .pacing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn persist(&self, name: &str, persisted: &Persisted) {
        let Ok(blob) = serde_json::to_vec(persisted) else {
            return;
        };
        if let Err(e) = self
            .inner
            .storage
            .store_blob(BlobKind::State, &self.inner.ca_key, name, &blob)
            .await
        {
            warn!(sni = %name, error = %e, "could not persist renewal state");
        }
    }

    /// Asks the CA for its renewal window (ARI) and schedules the renewal inside it. Without
    /// ARI (or without an answer) the one-third rule already set stays.
    async fn check_ari(&self, name: &str) {
        let leaf = self.lock_names().get(name).and_then(|s| s.leaf.clone());
        let id = leaf
            .as_ref()
            .and_then(|l| CertificateIdentifier::try_from(l).ok());
        let result = match (id, self.account().await) {
            (Some(id), Ok(account)) => Some(account.renewal_info(&id).await),
            _ => None,
        };
        let mut map = self.lock_names();
        let Some(state) = map.get_mut(name) else {
            return;
        };
        state.ari_checked = true;
        match result {
            Some(Ok((info, _))) => {
                self.inner.ari.store(true, Ordering::Relaxed);
                let at = renew_at_window(
                    system_time(info.suggested_window.start),
                    system_time(info.suggested_window.end),
                    SystemTime::now(),
                    fastrand::f64(),
                );
                state.next_renewal = unix(at);
                debug!(sni = %name, next_renewal = state.next_renewal, "renewal inside the CA's ARI window");
            }
            Some(Err(e)) => {
                debug!(sni = %name, error = %e, "no ARI: renewing when a third of the lifetime is left");
            }
            None => {}
        }
    }

    /// Waits for the budget, then orders (unless another process renewed meanwhile).
    async fn obtain(&self, name: &str) -> Result<()> {
        let _slot = self
            .inner
            .slots
            .acquire()
            .await
            .map_err(|_| Error::Config("order slots closed".to_owned()))?;
        self.take_budget(name)?;
        let (ca, storage) = (&self.inner.ca_key, &self.inner.storage);
        let _lock = storage.lock(ca, name, Duration::from_secs(120)).await?;
        let current = self.lock_names().get(name).and_then(|s| s.cert.clone());
        let forced = self.lock_names().get(name).is_some_and(|s| s.forced);
        // Put in service meanwhile (by `load`, or by another attempt) and not due: done.
        let not_due = self
            .lock_names()
            .get(name)
            .is_some_and(|s| s.cert.is_some() && s.next_renewal > unix(SystemTime::now()));
        if !forced && not_due {
            return Ok(());
        }
        if !forced
            && let Ok(Some(stored)) = storage.load(ca, name).await
            && stored.info.covers(name)
            && current
                .as_ref()
                .is_none_or(|c| stored.info.not_after > c.not_after)
            && unix(renew_at_third(&stored.info, 0.0)) > unix(SystemTime::now())
        {
            debug!(sni = %name, "a fresh certificate was stored meanwhile (another process?)");
            return self.install(name, &stored.pair, stored.info, current.is_some());
        }
        let account = self.account().await?;
        let replaces = self
            .lock_names()
            .get(name)
            .filter(|s| s.ari_checked)
            .and_then(|s| s.leaf.as_ref())
            .and_then(|leaf| CertificateIdentifier::try_from(leaf).ok())
            .map(|id| id.into_owned());
        // instant-acme refuses `replaces` unless the directory has a renewalInfo endpoint.
        let replaces = replaces.filter(|_| self.inner.ari.load(Ordering::Relaxed));
        info!(sni = %name, "ordering certificate");
        let challenges = self.inner.resolver.challenges();
        let (config, provider) = (&self.inner.config, &self.inner.provider);
        let pair = match order(
            config,
            &account,
            name,
            replaces.clone(),
            challenges,
            provider,
        )
        .await
        {
            // The CA forgot the account (a test CA restarted, an account deactivated
            // elsewhere): register anew once and retry.
            Err(Error::Problem { kind, .. }) if kind.ends_with(":accountDoesNotExist") => {
                warn!("the CA does not know the stored account: registering a new one");
                let account = self.new_account().await?;
                order(config, &account, name, replaces, challenges, provider).await?
            }
            other => other?,
        };
        self.inner.orders_ok.fetch_add(1, Ordering::Relaxed);
        let info = pair.info(name)?;
        self.pacing()
            .issued
            .entry(registered_domain(name))
            .or_default()
            .push_back(SystemTime::now());
        storage.store(ca, name, &pair).await?;
        let not_after = info.not_after;
        self.install(name, &pair, info, current.is_some())?;
        let persisted = Persisted::default();
        if let Some(state) = self.lock_names().get_mut(name) {
            state.persisted = persisted.clone();
        }
        self.persist(name, &persisted).await;
        let _ = self.inner.events.send(AcmeEvent::Issued {
            name: name.to_owned(),
            not_after,
            renewal: current.is_some(),
        });
        Ok(())
    }

    /// Counts an order against the account's window and the name's failed validations;
    /// refuses when either is exhausted.
    fn take_budget(&self, name: &str) -> Result<()> {
        let budget = &self.inner.config.budget;
        let now = SystemTime::now();
        let mut pacing = self.pacing();
        let expired =
            |t: &SystemTime, window: Duration| now.duration_since(*t).is_ok_and(|age| age > window);
        while pacing
            .orders
            .front()
            .is_some_and(|t| expired(t, budget.orders_window))
        {
            pacing.orders.pop_front();
        }
        let domain = registered_domain(name);
        if let Some(issued) = pacing.issued.get_mut(&domain) {
            while issued
                .front()
                .is_some_and(|t| expired(t, budget.certs_window))
            {
                issued.pop_front();
            }
            if issued.len() >= budget.certs_per_domain {
                return Err(Error::Problem {
                    name: name.to_owned(),
                    kind: "portunus:budget:certificatesPerDomain".to_owned(),
                    detail: format!(
                        "{} certificates for {domain} in the last {:?}: waiting so the CA's limit is never reached",
                        issued.len(),
                        budget.certs_window
                    ),
                });
            }
        }
        if let Some(failures) = pacing.failures.get_mut(name) {
            while failures
                .front()
                .is_some_and(|t| expired(t, budget.failures_window))
            {
                failures.pop_front();
            }
            if failures.len() >= budget.failures_per_window {
                return Err(Error::Problem {
                    name: name.to_owned(),
                    kind: "portunus:budget:failedValidations".to_owned(),
                    detail: format!(
                        "{} failed validations in the last {:?}: waiting so the CA's limit is never reached",
                        failures.len(),
                        budget.failures_window
                    ),
                });
            }
        }
        if pacing.orders.len() >= budget.orders_per_window {
            return Err(Error::Problem {
                name: name.to_owned(),
                kind: "portunus:budget:newOrders".to_owned(),
                detail: format!(
                    "{} orders in the last {:?}: waiting so the CA's limit is never reached",
                    pacing.orders.len(),
                    budget.orders_window
                ),
            });
        }
        pacing.orders.push_back(now);
        Ok(())
    }
}

/// An error with its causes, one line.
fn error_chain(error: &Error) -> String {
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;
    use portunus_store::MemoryStorage;

    fn manager(budget: crate::Budget) -> AcmeManager {
        AcmeManager::new(
            AcmeConfig::new("https://127.0.0.1:14000/dir").budget(budget),
            Arc::new(MemoryStorage::new()),
            Arc::new(CertResolver::new()),
            Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
        )
        .unwrap()
    }

    #[test]
    fn budget_mirrors_the_ca_limits() {
        let mut budget = crate::Budget {
            orders_per_window: 3,
            ..Default::default()
        };
        let m = manager(budget.clone());
        for name in ["a.test", "b.test", "c.test"] {
            m.take_budget(name).unwrap();
        }
        let err = m.take_budget("d.test").unwrap_err();
        assert!(err.to_string().contains("newOrders"), "{err}");

        budget.orders_per_window = 100;
        budget.failures_per_window = 2;
        budget.certs_per_domain = 2;
        let m = manager(budget);
        let now = SystemTime::now();
        m.pacing()
            .failures
            .insert("bad.test".into(), VecDeque::from([now, now]));
        assert!(
            m.take_budget("bad.test")
                .unwrap_err()
                .to_string()
                .contains("failedValidations")
        );
        assert!(
            m.take_budget("good.test").is_ok(),
            "failures count per host name"
        );
        m.pacing()
            .issued
            .insert("example.com".into(), VecDeque::from([now, now]));
        let err = m.take_budget("www.example.com").unwrap_err();
        assert!(err.to_string().contains("certificatesPerDomain"), "{err}");
        // Old entries leave the window.
        let old = now - Duration::from_secs(8 * 24 * 3600);
        m.pacing()
            .issued
            .insert("example.com".into(), VecDeque::from([old, old]));
        assert!(m.take_budget("www.example.com").is_ok());
    }

    #[test]
    fn registered_domains() {
        assert_eq!(registered_domain("a.b.example.com"), "example.com");
        assert_eq!(registered_domain("example.com"), "example.com");
        assert_eq!(registered_domain("localhost"), "localhost");
    }

    #[test]
    fn renew_needs_a_managed_name_and_status_lists_names() {
        let m = manager(crate::Budget::default());
        m.set_names(["a.test", "B.test."]);
        let names: Vec<String> = m.status().into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["a.test", "b.test"]);
        assert!(m.renew("b.test").is_ok());
        assert!(m.renew("c.test").is_err());
        m.set_names(["a.test"]);
        assert!(
            m.renew("b.test").is_err(),
            "removed names are no longer managed"
        );
    }
}
