//! The per-pod credential cache: one STS session per (pod UID, role), shared by all of that pod's
//! requests, refreshed in the background before it gets old, dropped when the pod or its role goes.
//!
//! Invariants:
//! - concurrent misses for one key make one TokenRequest and one STS call (moka's `try_get_with`);
//! - nothing is served with less than `min_remaining` (15 minutes by default) of validity left, which is
//!   when SDKs start refreshing; expired credentials are never served;
//! - when to refresh is decided by [`schedule`], a pure function;
//! - the key includes the pod UID, so a new pod reusing an IP never sees an old pod's session.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use time::OffsetDateTime;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::pods::{Change, Event, Store};
use crate::roles::Resolver;
use crate::workload::{Credentials, RoleArn, Workload};
use crate::{sts, token};

/// Cache settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// `--credential-min-remaining`: the least validity a served credential has left.
    pub min_remaining: Duration,
    /// `--refresh-check-interval`: how often the background refresher looks for sessions due.
    pub refresh_check_interval: Duration,
    /// How many background fetches (prefetch, refresh) run at once, to spare STS and the API server.
    pub background_concurrency: usize,
}

/// Why a pod got no credentials.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Token(#[from] token::Error),
    #[error(transparent)]
    Sts(#[from] sts::Error),
    /// STS granted less validity than we must guarantee when serving.
    #[error("STS granted credentials for {role} valid for {granted:?}, less than the {required:?} we must leave")]
    ShortLived {
        role: String,
        granted: Duration,
        required: Duration,
    },
}

impl Error {
    /// A closed label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Token(e) => match e.kind() {
                "refused" => "token_refused",
                "unavailable" => "token_unavailable",
                _ => "token_empty",
            },
            Error::Sts(e) => match e.kind() {
                "refused" => "sts_refused",
                "unavailable" => "sts_unavailable",
                _ => "sts_malformed",
            },
            Error::ShortLived { .. } => "short_lived",
        }
    }

    /// True when trying again later may succeed without anything changing in IAM or Kubernetes.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Token(token::Error::Unavailable { .. }) | Error::Sts(sts::Error::Unavailable { .. })
        )
    }
}

/// When a session is refreshed and until when it may be served, both counted from when it was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    pub refresh_after: Duration,
    pub serve_for: Duration,
}

/// Decides the life of a session that is valid for `lifetime` from now. `None` when it cannot be served
/// at all (less than `min_remaining` left). The refresh happens halfway through the servable window,
/// but at most 10 minutes before the window closes, so a failed refresh has time to be retried by the
/// background refresher before any request must wait for STS.
pub fn schedule(lifetime: Duration, min_remaining: Duration) -> Option<Schedule> {
    let serve_for = lifetime.checked_sub(min_remaining).filter(|d| !d.is_zero())?;
    let margin = (serve_for / 2).min(Duration::from_secs(600));
    Some(Schedule {
        refresh_after: serve_for - margin,
        serve_for,
    })
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    uid: String,
    role: RoleArn,
}

struct Entry {
    credentials: Arc<Credentials>,
    refresh_at: Instant,
    serve_until: Instant,
}

/// Cache metrics.
#[derive(Clone)]
pub struct Metrics {
    lookups: IntCounterVec,
    fetches: IntCounterVec,
    fetch_seconds: HistogramVec,
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let lookups = IntCounterVec::new(
            Opts::new(
                "imds_broker_credentials_lookups_total",
                "Credential lookups by result (hit, miss)",
            ),
            &["result"],
        )?;
        let fetches = IntCounterVec::new(
            Opts::new(
                "imds_broker_credentials_fetches_total",
                "TokenRequest + AssumeRoleWithWebIdentity exchanges, by cause and outcome",
            ),
            &["cause", "outcome"],
        )?;
        let fetch_seconds = HistogramVec::new(
            HistogramOpts::new(
                "imds_broker_credentials_fetch_duration_seconds",
                "Time to mint a token and exchange it at STS",
            )
            .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            &["cause"],
        )?;
        registry.register(Box::new(lookups.clone()))?;
        registry.register(Box::new(fetches.clone()))?;
        registry.register(Box::new(fetch_seconds.clone()))?;
        Ok(Self {
            lookups,
            fetches,
            fetch_seconds,
        })
    }
}

/// Shared handle to the cache.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    entries: moka::future::Cache<Key, Arc<Entry>>,
    minter: token::Minter,
    exchanger: sts::Exchanger,
    resolver: Resolver,
    store: Store,
    metrics: Metrics,
    refreshing: Mutex<HashSet<Key>>,
    /// Which roles each pod has sessions for, so eviction touches exactly those keys (moka's predicate
    /// invalidation would scan every entry for every pod event).
    roles_by_pod: Mutex<HashMap<String, Vec<RoleArn>>>,
    background: Semaphore,
}

#[derive(Clone, Copy)]
enum Cause {
    Request,
    Prefetch,
    Refresh,
}

impl Cause {
    fn label(self) -> &'static str {
        match self {
            Cause::Request => "request",
            Cause::Prefetch => "prefetch",
            Cause::Refresh => "refresh",
        }
    }
}

impl Cache {
    /// A cache minting with `minter`, exchanging with `exchanger`, resolving roles with `resolver`.
    pub fn new(
        config: Config,
        minter: token::Minter,
        exchanger: sts::Exchanger,
        resolver: Resolver,
        store: Store,
        metrics: Metrics,
    ) -> Self {
        let entries = moka::future::Cache::builder()
            // A safety net for memory only; expiry by `serve_until` is checked on every read.
            .time_to_live(Duration::from_secs(12 * 3600 + 60))
            .build();
        let background = Semaphore::new(config.background_concurrency.max(1));
        Self {
            inner: Arc::new(Inner {
                config,
                entries,
                minter,
                exchanger,
                resolver,
                store,
                metrics,
                refreshing: Mutex::default(),
                roles_by_pod: Mutex::default(),
                background,
            }),
        }
    }

    /// The role resolver this cache uses.
    pub fn resolver(&self) -> &Resolver {
        &self.inner.resolver
    }

    /// Credentials for `workload` in `role`, from the cache or freshly obtained.
    pub async fn get(&self, workload: &Workload, role: &RoleArn) -> Result<Arc<Credentials>, Error> {
        self.get_for(workload, role, Cause::Request).await
    }

    async fn get_for(&self, workload: &Workload, role: &RoleArn, cause: Cause) -> Result<Arc<Credentials>, Error> {
        let key = Key {
            uid: workload.uid.clone(),
            role: role.clone(),
        };
        let inner = &self.inner;
        if let Some(entry) = inner.entries.get(&key).await {
            let now = Instant::now();
            if now < entry.serve_until {
                if now >= entry.refresh_at {
                    self.spawn_refresh(key, workload.clone());
                }
                inner.metrics.lookups.with_label_values(&["hit"]).inc();
                return Ok(entry.credentials.clone());
            }
            inner.entries.invalidate(&key).await;
        }
        inner.metrics.lookups.with_label_values(&["miss"]).inc();
        let entry = inner
            .entries
            .try_get_with(key, self.fetch(workload, role, cause))
            .await
            .map_err(|e| (*e).clone())?;
        Ok(entry.credentials.clone())
    }

    async fn fetch(&self, workload: &Workload, role: &RoleArn, cause: Cause) -> Result<Arc<Entry>, Error> {
        let inner = &self.inner;
        let started = Instant::now();
        let result = async {
            let token = inner.minter.mint(workload).await?;
            let credentials = inner.exchanger.exchange(role, workload, &token).await?;
            let lifetime = (credentials.expiration - OffsetDateTime::now_utc())
                .try_into()
                .unwrap_or(Duration::ZERO);
            let plan = schedule(lifetime, inner.config.min_remaining).ok_or_else(|| Error::ShortLived {
                role: role.to_string(),
                granted: lifetime,
                required: inner.config.min_remaining,
            })?;
            let now = Instant::now();
            Ok::<_, Error>(Arc::new(Entry {
                credentials: Arc::new(credentials),
                refresh_at: now + plan.refresh_after,
                serve_until: now + plan.serve_for,
            }))
        }
        .await;
        inner
            .metrics
            .fetch_seconds
            .with_label_values(&[cause.label()])
            .observe(started.elapsed().as_secs_f64());
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) => e.kind(),
        };
        inner.metrics.fetches.with_label_values(&[cause.label(), outcome]).inc();
        if result.is_ok() {
            let mut roles = inner.roles_by_pod.lock().expect("role map poisoned");
            let roles = roles.entry(workload.uid.clone()).or_default();
            if !roles.contains(role) {
                roles.push(role.clone());
            }
        }
        match &result {
            Ok(entry) => tracing::info!(
                pod = %workload.key(), role = %role, cause = cause.label(),
                access_key_id = %entry.credentials.access_key_id,
                expiration = %entry.credentials.expiration,
                "obtained credentials"
            ),
            Err(error) => tracing::warn!(
                pod = %workload.key(), role = %role, cause = cause.label(), error_kind = error.kind(),
                %error, "could not obtain credentials"
            ),
        }
        result
    }

    /// Refreshes one session in the background unless a refresh of it is already running.
    fn spawn_refresh(&self, key: Key, workload: Workload) {
        if !self
            .inner
            .refreshing
            .lock()
            .expect("refresh set poisoned")
            .insert(key.clone())
        {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let _permit = this.inner.background.acquire().await;
            if let Ok(entry) = this.fetch(&workload, &key.role, Cause::Refresh).await {
                // Only replace what is still wanted: the pod may have gone or changed role meanwhile.
                if this.wanting(&key).is_some() {
                    this.inner.entries.insert(key.clone(), entry).await;
                }
            }
            this.inner.refreshing.lock().expect("refresh set poisoned").remove(&key);
        });
    }

    /// The pod of `key`, if it still exists and still resolves to `key`'s role.
    fn wanting(&self, key: &Key) -> Option<Workload> {
        let workload = self.inner.store.read(|i| i.get(&key.uid).cloned())?;
        let role = self.inner.resolver.resolve(&workload).ok().flatten()?;
        (role == key.role).then_some(workload)
    }

    /// Drops every session of pod `uid`, except the one for `keep`.
    async fn evict(&self, uid: &str, keep: Option<&RoleArn>) {
        let stale: Vec<RoleArn> = {
            let mut by_pod = self.inner.roles_by_pod.lock().expect("role map poisoned");
            let Some(roles) = by_pod.get_mut(uid) else { return };
            let (kept, stale) = roles.drain(..).partition(|r| Some(r) == keep);
            *roles = kept;
            if roles.is_empty() {
                by_pod.remove(uid);
            }
            stale
        };
        for role in stale {
            self.inner
                .entries
                .invalidate(&Key {
                    uid: uid.to_owned(),
                    role,
                })
                .await;
        }
    }

    /// Number of cached sessions (approximate: moka counts lazily).
    pub fn len(&self) -> u64 {
        self.inner.entries.entry_count()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Follows pod changes (prefetch, eviction) and refreshes sessions that are due, until `shutdown`.
    /// Sets `ready` once the first full pod list has been seen and its prefetches have been attempted.
    pub async fn run(self, mut events: mpsc::Receiver<Event>, ready: watch::Sender<bool>, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(self.inner.config.refresh_check_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut prefetches = JoinSet::new();
        let mut waiting_for_prefetch = false;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticker.tick() => self.refresh_due().await,
                Some(_) = prefetches.join_next(), if !prefetches.is_empty() => {
                    if waiting_for_prefetch && prefetches.is_empty() {
                        waiting_for_prefetch = false;
                        ready.send_replace(true);
                        tracing::info!(sessions = self.len(), "initial prefetch attempted; ready");
                    }
                }
                event = events.recv() => match event {
                    None => return,
                    Some(Event::Synced) => {
                        if prefetches.is_empty() {
                            ready.send_replace(true);
                            tracing::info!("no prefetch pending; ready");
                        } else {
                            waiting_for_prefetch = true;
                        }
                    }
                    Some(Event::Changed(change)) => self.apply(change, &mut prefetches).await,
                },
            }
        }
    }

    async fn apply(&self, change: Change, prefetches: &mut JoinSet<()>) {
        match change {
            Change::Removed { uid, key } => {
                tracing::debug!(pod = %key, "pod gone; evicting its sessions");
                self.evict(&uid, None).await;
            }
            Change::Upserted(workload) => match self.inner.resolver.resolve(&workload) {
                Ok(Some(role)) => {
                    self.evict(&workload.uid, Some(&role)).await;
                    // Most pod events are status updates of a pod already served: nothing to fetch then.
                    let cached = self.inner.entries.contains_key(&Key {
                        uid: workload.uid.clone(),
                        role: role.clone(),
                    });
                    if workload.running && !workload.terminating && !workload.ips.is_empty() && !cached {
                        let this = self.clone();
                        prefetches.spawn(async move {
                            let _permit = this.inner.background.acquire().await;
                            let _ = this.get_for(&workload, &role, Cause::Prefetch).await;
                        });
                    }
                }
                Ok(None) => self.evict(&workload.uid, None).await,
                Err(error) => {
                    tracing::warn!(pod = %workload.key(), %error, "refusing credentials: invalid role annotation");
                    self.evict(&workload.uid, None).await;
                }
            },
        }
    }

    /// Starts a refresh for every session past its refresh time whose pod still wants that role.
    async fn refresh_due(&self) {
        let now = Instant::now();
        let due: Vec<Key> = self
            .inner
            .entries
            .iter()
            .filter(|(_, entry)| now >= entry.refresh_at)
            .map(|(key, _)| (*key).clone())
            .collect();
        for key in due {
            match self.wanting(&key) {
                Some(workload) => self.spawn_refresh(key, workload),
                None => self.inner.entries.invalidate(&key).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(15 * 60);

    #[test]
    fn an_hour_long_session_is_served_45_minutes_and_refreshed_at_35() {
        let plan = schedule(Duration::from_secs(3600), MIN).unwrap();
        assert_eq!(plan.serve_for, Duration::from_secs(45 * 60));
        assert_eq!(plan.refresh_after, Duration::from_secs(35 * 60));
    }

    #[test]
    fn a_short_session_is_refreshed_halfway_through_its_window() {
        let plan = schedule(Duration::from_secs(20 * 60), MIN).unwrap();
        assert_eq!(plan.serve_for, Duration::from_secs(5 * 60));
        assert_eq!(plan.refresh_after, Duration::from_secs(150));
    }

    #[test]
    fn a_session_without_the_minimum_left_is_never_served() {
        assert_eq!(schedule(MIN, MIN), None);
        assert_eq!(schedule(Duration::from_secs(60), MIN), None);
        assert_eq!(schedule(Duration::ZERO, MIN), None);
    }

    #[test]
    fn every_schedule_leaves_the_minimum_and_refreshes_before_the_window_closes() {
        for secs in (MIN.as_secs() + 1..=43_200).step_by(97) {
            let lifetime = Duration::from_secs(secs);
            let plan = schedule(lifetime, MIN).unwrap();
            assert_eq!(lifetime - plan.serve_for, MIN);
            assert!(plan.refresh_after < plan.serve_for);
            assert!(plan.serve_for - plan.refresh_after <= Duration::from_secs(600));
        }
    }
}
