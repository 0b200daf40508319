//! The per-pod credential cache: one STS session per (pod UID, role), shared by all of that pod's
//! requests, refreshed in the background before it gets old, dropped when the pod or its role goes.
//!
//! Invariants:
//! - an exchange (TokenRequest + `AssumeRoleWithWebIdentity`) runs on a task of its own, never inside a
//!   request: a client that hangs up cancels nothing, and every request for that (pod, role), now or
//!   later, joins the one exchange in flight;
//! - sessions are served normally until `min_remaining` before expiry (when SDKs start refreshing);
//!   while refreshes fail they are still served until `expiry_margin` before expiry, never after;
//! - a failure is remembered per (pod, role) with jittered exponential backoff ([`schedule::backoff`]):
//!   requests inside it get the remembered answer, and only the background refresher retries, so no
//!   SDK's retry loop reaches STS;
//! - every exchange holds a slot of the node's [`limit::Limiter`] (first credentials first);
//! - the key includes the pod UID, so a new pod reusing an IP never sees an old pod's session, and an
//!   exchange that finishes after its pod or role went stores nothing.

pub mod limit;
mod metrics;
pub mod schedule;
mod session;

pub use metrics::Metrics;
pub use session::StsSession;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::pods::{Change, Event, Store};
use crate::roles::Resolver;
use crate::spire::IdentitySource;
use crate::workload::{RoleArn, Workload};
use crate::{audit, events, sa_token, sts};
use limit::{Limiter, Priority};

/// Cache settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// `--credential-min-remaining`: the least validity a credential served normally has left.
    pub min_remaining: Duration,
    /// `--credential-expiry-margin`: while refreshes fail, credentials are served until this long
    /// before they expire.
    pub expiry_margin: Duration,
    /// `--refresh-check-interval`: how often the background refresher looks for sessions due.
    pub refresh_check_interval: Duration,
    /// `--exchange-concurrency`: exchanges running at once on this node.
    pub concurrency: usize,
    /// `--exchange-rate`: exchanges started per second on this node.
    pub rate: f64,
}

/// Why a pod got no credentials.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// No service-account token.
    #[error(transparent)]
    SaToken(#[from] sa_token::Error),
    /// No JWT-SVID from the SPIRE agent (`--identity-source spire`).
    #[error(transparent)]
    Spire(#[from] crate::spire::Error),
    /// No STS session.
    #[error(transparent)]
    Sts(#[from] sts::Error),
    /// STS granted less validity than we must guarantee when serving.
    #[error("STS granted credentials for {role} valid for {granted:?}, less than the {required:?} we must leave")]
    ShortLived {
        /// The role ARN.
        role: String,
        /// What STS granted.
        granted: Duration,
        /// `--credential-min-remaining`.
        required: Duration,
    },
    /// The agent is shutting down; the exchange was abandoned.
    #[error("the agent is stopping")]
    Stopped,
    /// The pod went, or changed role, while its credentials were being obtained: they are nobody's now.
    #[error("the pod or its role changed while its credentials were being obtained")]
    Superseded,
}

impl Error {
    /// A closed label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::SaToken(e) => e.kind(),
            Error::Spire(e) => e.kind(),
            Error::Sts(e) => e.kind(),
            Error::ShortLived { .. } => "short_lived",
            Error::Stopped => "stopped",
            Error::Superseded => "superseded",
        }
    }

    /// True when trying again later may succeed without anything changing in IAM or Kubernetes.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::SaToken(e) => e.is_transient(),
            Error::Spire(e) => e.is_transient(),
            Error::Sts(e) => e.is_transient(),
            Error::ShortLived { .. } => false,
            Error::Stopped | Error::Superseded => true,
        }
    }
}

/// A session and its timetable (tokio time, so paused-time tests drive it).
struct Held {
    session: Arc<StsSession>,
    refresh_at: Instant,
    fresh_until: Instant,
    usable_until: Instant,
}

/// A failure remembered until `retry_at`.
struct Remembered {
    error: Error,
    failures: u32,
    retry_at: Instant,
}

type Outcome = Result<Arc<StsSession>, Error>;

/// Everything known about one (pod, role).
#[derive(Default)]
struct Slot {
    held: Option<Held>,
    fetch: Option<watch::Receiver<Option<Outcome>>>,
    failure: Option<Remembered>,
    /// Serving past the fresh window has been logged for this session (once per pod, not per request).
    stale_logged: bool,
}

/// The sessions of one pod, by role (almost always one).
#[derive(Default)]
struct PodSessions {
    slots: Mutex<HashMap<RoleArn, Slot>>,
    /// The pod's first session has been counted in the first-credentials histogram.
    first_counted: AtomicBool,
}

impl PodSessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<RoleArn, Slot>> {
        self.slots.lock().expect("session lock poisoned: a holder panicked")
    }
}

/// What a lookup does, decided under the slot's lock.
enum Decision {
    Serve { session: Arc<StsSession>, stale: bool },
    Join(watch::Receiver<Option<Outcome>>),
    Remembered(Error),
    Fetch,
}

/// Shared handle to the cache.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    pods: moka::future::Cache<String, Arc<PodSessions>>,
    minter: IdentitySource,
    exchanger: sts::Exchanger,
    resolver: Resolver,
    store: Store,
    metrics: Metrics,
    events: events::Sink,
    /// When the cache was built: pods running before it are not counted as waiting for it.
    started: OffsetDateTime,
    limiter: Limiter,
    tasks: TaskTracker,
    stop: CancellationToken,
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

    fn priority(self) -> Priority {
        match self {
            Cause::Request => Priority::Request,
            Cause::Refresh => Priority::Refresh,
            Cause::Prefetch => Priority::Prefetch,
        }
    }
}

/// The soonest expiry among the sessions held in `pods` (for the headroom gauge, at each scrape).
fn soonest_expiry(pods: &moka::future::Cache<String, Arc<PodSessions>>) -> Option<OffsetDateTime> {
    pods.iter()
        .filter_map(|(_, pod)| {
            let slots = pod.lock();
            slots
                .values()
                .filter_map(|slot| slot.held.as_ref().map(|h| h.session.credentials.expiration))
                .min()
        })
        .min()
}

impl Cache {
    /// A cache minting with `minter`, exchanging with `exchanger`, resolving roles with `resolver`,
    /// reporting failures a pod's owner can fix to `events`.
    pub fn new(
        config: Config,
        minter: impl Into<IdentitySource>,
        exchanger: sts::Exchanger,
        resolver: Resolver,
        store: Store,
        metrics: Metrics,
        events: events::Sink,
    ) -> Self {
        let pods = moka::future::Cache::builder()
            // A safety net for memory only (a pod whose deletion was never seen); pods are evicted by
            // their watch events and sessions expire by their own timetable.
            .time_to_live(Duration::from_secs(12 * 3600 + 60))
            .build();
        let limiter = Limiter::new(config.concurrency, config.rate);
        let sessions = pods.clone();
        metrics.headroom.read_from(move || soonest_expiry(&sessions));
        Self {
            inner: Arc::new(Inner {
                config,
                pods,
                minter: minter.into(),
                exchanger,
                resolver,
                store,
                metrics,
                events,
                started: OffsetDateTime::now_utc(),
                limiter,
                tasks: TaskTracker::new(),
                stop: CancellationToken::new(),
            }),
        }
    }

    /// The role resolver this cache uses.
    pub fn resolver(&self) -> &Resolver {
        &self.inner.resolver
    }

    /// Credentials for `workload` in `role`: cached, joined from the exchange in flight, the failure
    /// remembered for it, or freshly obtained.
    pub async fn get(&self, workload: &Workload, role: &RoleArn) -> Result<Arc<StsSession>, Error> {
        let Some(pod) = self.sessions_of(&workload.uid).await else {
            // The pod left the index between the request's lookup and here: nobody's credentials.
            return Err(Error::Superseded);
        };
        let receiver = {
            let mut slots = pod.lock();
            let slot = slots.entry(role.clone()).or_default();
            match self.decide(slot, workload, role, &pod) {
                Decision::Serve { session, stale } => {
                    let result = if stale { "stale" } else { "hit" };
                    self.inner.metrics.lookups.with_label_values(&[result]).inc();
                    if stale && !slot.stale_logged {
                        slot.stale_logged = true;
                        tracing::warn!(
                            pod = %workload.key(), role = %role,
                            expiration = %session.credentials.expiration,
                            "refreshes are failing; serving the current credentials until shortly before they expire"
                        );
                    }
                    return Ok(session);
                }
                Decision::Remembered(error) => {
                    self.inner.metrics.lookups.with_label_values(&["remembered"]).inc();
                    return Err(error);
                }
                Decision::Join(receiver) => receiver,
                Decision::Fetch => self.start(&pod, slot, workload.clone(), role.clone(), Cause::Request),
            }
        };
        self.inner.metrics.lookups.with_label_values(&["miss"]).inc();
        join(receiver).await
    }

    /// The sessions of pod `uid`, created on first use; `None` if the pod left the index meanwhile (so
    /// a request racing the pod's deletion leaves nothing behind).
    async fn sessions_of(&self, uid: &str) -> Option<Arc<PodSessions>> {
        let entry = self
            .inner
            .pods
            .entry_by_ref(uid)
            .or_insert_with(async { Arc::new(PodSessions::default()) })
            .await;
        // Only a new entry can race the pod's eviction (an existing one is evicted after the index
        // forgot the pod, and the index is what the caller was found in).
        if entry.is_fresh() && self.inner.store.read(|i| i.get(uid).is_none()) {
            self.inner.pods.invalidate(uid).await;
            return None;
        }
        Some(entry.into_value())
    }

    /// Decides a lookup, starting a refresh when one is due and none is running or backing off.
    fn decide(&self, slot: &mut Slot, workload: &Workload, role: &RoleArn, pod: &Arc<PodSessions>) -> Decision {
        let now = Instant::now();
        if let Some(held) = &slot.held {
            if now < held.usable_until {
                let session = held.session.clone();
                let stale = now >= held.fresh_until;
                if (stale || now >= held.refresh_at) && slot.fetch.is_none() && slot.failure.is_none() {
                    self.start(pod, slot, workload.clone(), role.clone(), Cause::Refresh);
                }
                return Decision::Serve { session, stale };
            }
            slot.held = None;
            slot.stale_logged = false;
        }
        if let Some(receiver) = &slot.fetch {
            return Decision::Join(receiver.clone());
        }
        match &slot.failure {
            Some(failure) if now < failure.retry_at => Decision::Remembered(failure.error.clone()),
            _ => Decision::Fetch,
        }
    }

    /// Starts the one exchange for (pod, role) on a task of its own, tracked for shutdown.
    fn start(
        &self,
        pod: &Arc<PodSessions>,
        slot: &mut Slot,
        workload: Workload,
        role: RoleArn,
        cause: Cause,
    ) -> watch::Receiver<Option<Outcome>> {
        let (sender, receiver) = watch::channel(None);
        slot.fetch = Some(receiver.clone());
        let (this, pod) = (self.clone(), pod.clone());
        self.inner.metrics.in_flight.inc();
        self.inner.tasks.spawn(async move {
            let started = Instant::now();
            let result = tokio::select! {
                () = this.inner.stop.cancelled() => Err(Error::Stopped),
                result = async {
                    let _permit = this.inner.limiter.acquire(cause.priority()).await;
                    this.exchange(&workload, &role).await
                } => result,
            };
            this.record(&workload, &role, cause, started, &result);
            let outcome = this.settle(&pod, &workload, &role, result);
            this.inner.metrics.in_flight.dec();
            sender.send_replace(Some(outcome));
        });
        receiver
    }

    /// TokenRequest, then STS, then the session's timetable.
    async fn exchange(&self, workload: &Workload, role: &RoleArn) -> Result<Held, Error> {
        let inner = &self.inner;
        let called = Instant::now();
        let sa_token = inner.minter.mint(workload).await;
        let outcome = sa_token.as_ref().map_or_else(Error::kind, |_| "ok");
        inner.metrics.sa_token_call(outcome, called.elapsed().as_secs_f64());
        let called = Instant::now();
        let credentials = inner.exchanger.exchange(role, workload, &sa_token?).await;
        let outcome = credentials.as_ref().map_or_else(sts::Error::kind, |_| "ok");
        inner.metrics.sts_call(outcome, called.elapsed().as_secs_f64());
        let credentials = credentials?;
        let lifetime = (credentials.expiration - OffsetDateTime::now_utc())
            .try_into()
            .unwrap_or(Duration::ZERO);
        let config = &inner.config;
        let plan = schedule::schedule(lifetime, config.min_remaining, config.expiry_margin, rand::random())
            .ok_or_else(|| Error::ShortLived {
                role: role.to_string(),
                granted: lifetime,
                required: config.min_remaining,
            })?;
        let now = Instant::now();
        Ok(Held {
            session: Arc::new(StsSession::new(credentials)),
            refresh_at: now + plan.refresh_after,
            fresh_until: now + plan.fresh_for,
            usable_until: now + plan.usable_for,
        })
    }

    fn record(
        &self,
        workload: &Workload,
        role: &RoleArn,
        cause: Cause,
        started: Instant,
        result: &Result<Held, Error>,
    ) {
        let metrics = &self.inner.metrics;
        metrics
            .fetch_seconds
            .with_label_values(&[cause.label()])
            .observe(started.elapsed().as_secs_f64());
        let outcome = result.as_ref().map_or_else(Error::kind, |_| "ok");
        metrics.fetches.with_label_values(&[cause.label(), outcome]).inc();
        match result {
            Ok(held) => audit::issued(workload, role, cause.label(), &held.session.credentials),
            Err(Error::Stopped) => {}
            Err(error) => {
                tracing::warn!(
                    pod = %workload.key(), role = %role, cause = cause.label(), error_kind = error.kind(),
                    error = %error_chain(error), "could not obtain credentials"
                );
                // Once per exchange, and exchanges back off: a looping SDK is not a flood of Events.
                self.inner.events.exchange_failed(workload, error);
            }
        }
    }

    /// Stores the result of an exchange in its slot — unless the pod or its role went meanwhile: then
    /// nothing is stored and waiters get [`Error::Superseded`] — and returns what waiters get.
    fn settle(&self, pod: &PodSessions, workload: &Workload, role: &RoleArn, result: Result<Held, Error>) -> Outcome {
        let key = (workload.uid.as_str(), role);
        let wanted = self.wanting(key.0, key.1).is_some();
        let mut slots = pod.lock();
        let slot = slots.get_mut(role).filter(|_| wanted);
        match result {
            Ok(held) => {
                let session = held.session.clone();
                let Some(slot) = slot else {
                    // Nobody may be handed these: the pod that asked is gone or wants another role.
                    slots.remove(role);
                    return Err(Error::Superseded);
                };
                slot.fetch = None;
                slot.failure = None;
                slot.stale_logged = false;
                slot.held = Some(held);
                if !pod.first_counted.swap(true, Ordering::Relaxed) {
                    let now = OffsetDateTime::now_utc();
                    self.inner
                        .metrics
                        .first_session(workload.running_since, self.inner.started, now);
                }
                Ok(session)
            }
            Err(error) => {
                if let Some(slot) = slot {
                    slot.fetch = None;
                    let failures = slot.failure.as_ref().map_or(0, |f| f.failures) + 1;
                    slot.failure = Some(Remembered {
                        error: error.clone(),
                        failures,
                        retry_at: Instant::now() + schedule::backoff(failures, rand::random()),
                    });
                } else {
                    slots.remove(role);
                }
                Err(error)
            }
        }
    }

    /// The pod `uid`, if it is still indexed and still resolves to `role`.
    fn wanting(&self, uid: &str, role: &RoleArn) -> Option<Workload> {
        let workload = self.inner.store.read(|i| i.get(uid).cloned())?;
        let resolved = self.inner.resolver.resolve(&workload).ok().flatten()?;
        (&resolved == role).then_some(workload)
    }

    /// Drops every session of pod `uid`, except the one for `keep`.
    async fn evict(&self, uid: &str, keep: Option<&RoleArn>) {
        match keep {
            None => self.inner.pods.invalidate(uid).await,
            Some(keep) => {
                if let Some(pod) = self.inner.pods.get(uid).await {
                    pod.lock().retain(|role, _| role == keep);
                }
            }
        }
    }

    /// Pods with sessions or remembered failures, exactly (pending evictions applied first).
    pub async fn pods(&self) -> u64 {
        self.inner.pods.run_pending_tasks().await;
        self.inner.pods.entry_count()
    }

    /// Follows pod changes (prefetch, eviction) and refreshes sessions that are due, until `shutdown`;
    /// then abandons the exchanges in flight and waits for their tasks. Sets `ready` once the first full
    /// pod list has been seen and its prefetches have been attempted.
    pub async fn run(self, mut events: mpsc::Receiver<Event>, ready: watch::Sender<bool>, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(self.inner.config.refresh_check_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut prefetches = JoinSet::new();
        let mut waiting_for_prefetch = false;
        let mut synced_once = false;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = ticker.tick() => self.refresh_due().await,
                Some(_) = prefetches.join_next(), if !prefetches.is_empty() => {
                    if waiting_for_prefetch && prefetches.is_empty() {
                        waiting_for_prefetch = false;
                        ready.send_replace(true);
                        let pods = self.pods().await;
                        tracing::info!(pods, "initial prefetch attempted; ready");
                    }
                }
                event = events.recv() => match event {
                    None => break,
                    Some(Event::Synced) => {
                        self.prefetch_all(&mut prefetches).await;
                        if std::mem::replace(&mut synced_once, true) {
                            continue;
                        }
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
        prefetches.shutdown().await;
        self.inner.stop.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
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
                    // A role resolved from a partial view (a pod listed before its service account) may
                    // be the wrong one: prefetch only from a whole view (see `Event::Synced`), and only
                    // what the index still holds: the view may have become whole after this change was
                    // queued (the service accounts listed right behind the pods), and the change
                    // that corrects it is queued behind this one.
                    let current = self.inner.store.read(|i| i.get(&workload.uid) == Some(&workload));
                    if self.inner.store.view().is_whole() && current {
                        self.prefetch(&workload, &role, prefetches).await;
                    }
                }
                Ok(None) => self.evict(&workload.uid, None).await,
                Err(error) => {
                    tracing::warn!(pod = %workload.key(), %error, "refusing credentials");
                    // An annotation is the pod owner's to fix; an object the agent cannot decode is not.
                    if error.is_annotation() {
                        self.inner.events.invalid_role(&workload, &error);
                    }
                    self.evict(&workload.uid, None).await;
                }
            },
        }
    }

    /// Prefetches every running pod of a view that just became whole.
    async fn prefetch_all(&self, prefetches: &mut JoinSet<()>) {
        let workloads: Vec<Arc<Workload>> = self.inner.store.read(|i| i.workloads().cloned().collect());
        for workload in workloads {
            if let Ok(Some(role)) = self.inner.resolver.resolve(&workload) {
                self.prefetch(&workload, &role, prefetches).await;
            }
        }
    }

    /// Starts an exchange for a running pod nobody asked for yet, unless it has a session, one is in
    /// flight, or it is backing off after a failure. Most pod events are status updates of a pod already
    /// served: no work.
    async fn prefetch(&self, workload: &Workload, role: &RoleArn, prefetches: &mut JoinSet<()>) {
        if !workload.running || workload.terminating || workload.ips.is_empty() {
            return;
        }
        let Some(pod) = self.sessions_of(&workload.uid).await else {
            return;
        };
        let receiver = {
            let mut slots = pod.lock();
            let slot = slots.entry(role.clone()).or_default();
            let backing_off = slot.failure.as_ref().is_some_and(|f| Instant::now() < f.retry_at);
            if slot.held.is_some() || slot.fetch.is_some() || backing_off {
                return;
            }
            self.start(&pod, slot, workload.clone(), role.clone(), Cause::Prefetch)
        };
        prefetches.spawn(async move {
            let _ = join(receiver).await;
        });
    }

    /// Starts a refresh for every session past its refresh time (or a retry once its backoff ran out)
    /// whose pod still wants that role; forgets what is no longer wanted or no longer usable.
    async fn refresh_due(&self) {
        let now = Instant::now();
        let pods: Vec<(Arc<String>, Arc<PodSessions>)> = self.inner.pods.iter().collect();
        for (uid, pod) in pods {
            let mut slots = pod.lock();
            let mut wanted = Vec::new();
            for (role, slot) in slots.iter_mut() {
                let Some(workload) = self.wanting(&uid, role) else {
                    continue;
                };
                wanted.push(role.clone());
                if slot.held.as_ref().is_some_and(|h| now >= h.usable_until) {
                    slot.held = None;
                    slot.stale_logged = false;
                }
                let due = slot.held.as_ref().is_some_and(|h| now >= h.refresh_at)
                    && slot.fetch.is_none()
                    && slot.failure.as_ref().is_none_or(|f| now >= f.retry_at);
                if due {
                    self.start(&pod, slot, workload, role.clone(), Cause::Refresh);
                }
            }
            slots.retain(|role, _| wanted.contains(role));
        }
        self.inner
            .metrics
            .pods
            .set(i64::try_from(self.pods().await).unwrap_or(i64::MAX));
    }
}

/// Waits for an exchange's outcome.
async fn join(mut receiver: watch::Receiver<Option<Outcome>>) -> Outcome {
    match receiver.wait_for(Option::is_some).await {
        Ok(outcome) => outcome.clone().unwrap_or(Err(Error::Stopped)),
        // The task was dropped without an answer: the runtime is shutting down.
        Err(_) => Err(Error::Stopped),
    }
}

/// An error and its sources, `: `-separated, for one log line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}
