//! One list-then-watch loop per resource, shared by every watcher of the agent: it lists (paginated),
//! watches from the list's resourceVersion with bookmarks, and tells its consumer exactly what the
//! consumer's view is worth at each moment.
//!
//! - A watch that ends normally (server timeout, load balancer) resumes from the last resourceVersion
//!   at once: nothing was missed, the view stays whole.
//! - `410 Gone` means events were lost while the API server was up: [`Update::Stale`] at once, then a
//!   relist without backoff.
//! - A watch that delivers nothing — no event, no bookmark — for `idle` is presumed dead and relisted
//!   (bookmarks are asked for, so a quiet but healthy watch is not mistaken for a dead one).
//! - Errors (API server down, 5xx, transport) are retried with [`retry_delay`], a short capped backoff,
//!   and reported as [`Update::Unreachable`]: what the view holds is still true as far as anyone knows,
//!   but objects created meanwhile are missing from it; [`Update::Reachable`] when a watch stands again.
//!
//! It decides nothing about pods or roles; it never spawns.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kube::api::{ListParams, WatchEvent, WatchParams};
use kube::{Api, Resource, ResourceExt};
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{GaugeVec, IntCounterVec, Opts, Registry};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Watch settings shared by every resource.
#[derive(Debug, Clone)]
pub struct Config {
    /// `--watch-idle-timeout`: a watch silent this long (no event, no bookmark) is relisted.
    pub idle: Duration,
    /// Objects per list page.
    pub page_size: u32,
}

/// What a consumer learns.
#[derive(Debug)]
pub enum Update<K> {
    /// Events were missed (410 Gone): the view is stale in unknown ways until the next [`Update::Listed`].
    Stale,
    /// A complete list; it replaces the view.
    Listed(Vec<K>),
    /// An object was added or changed.
    Applied(K),
    /// An object was deleted.
    Deleted(K),
    /// The API server cannot be reached: the view misses whatever happened since.
    Unreachable,
    /// A watch is established again after [`Update::Unreachable`]; nothing was missed.
    Reachable,
}

/// Why a list was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relist {
    /// The first list.
    Initial,
    /// The watch's resourceVersion was compacted away (410 Gone).
    Gone,
    /// The watch delivered nothing for the idle bound.
    Idle,
}

impl Relist {
    fn label(self) -> &'static str {
        match self {
            Relist::Initial => "initial",
            Relist::Gone => "gone",
            Relist::Idle => "idle",
        }
    }
}

/// How long a watch may take to start before the API server counts as unreachable.
pub const START_GRACE: Duration = Duration::from_secs(2);

/// The first retry delay after a watch or list error.
pub const RETRY_INITIAL: Duration = Duration::from_millis(250);
/// The longest delay between two attempts: short, so pods created right after an outage are seen
/// within seconds of the API server's return.
pub const RETRY_CAP: Duration = Duration::from_secs(5);

/// The delay before attempt `failures + 1` after `failures` (≥ 1) errors in a row: 250 ms doubling to
/// [`RETRY_CAP`], jittered down by up to a half by `fraction` (uniform in `[0, 1)`) so the nodes of a
/// cluster do not reconnect in lockstep.
pub fn retry_delay(failures: u32, fraction: f64) -> Duration {
    let full = RETRY_INITIAL
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(RETRY_CAP);
    full - (full / 2).mul_f64(fraction.clamp(0.0, 1.0))
}

/// Every `resource` label the agent's watches use; their series exist from start-up.
pub const RESOURCES: &[&str] = &["pods", "serviceaccounts", "namespaces"];

/// Watch metrics, labelled by resource.
#[derive(Clone)]
pub struct Metrics {
    events: IntCounterVec,
    errors: IntCounterVec,
    relists: IntCounterVec,
    silence: Silence,
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let events = IntCounterVec::new(
            Opts::new(
                "imds_broker_watch_events_total",
                "Watch events received, by resource and type (listed counts each object of a list)",
            ),
            &["resource", "event"],
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "imds_broker_watch_errors_total",
                "List and watch failures, by resource (each is retried after a capped backoff)",
            ),
            &["resource"],
        )?;
        let relists = IntCounterVec::new(
            Opts::new(
                "imds_broker_watch_relists_total",
                "Full lists by resource and cause: initial, gone (410, events missed), idle (a silent watch)",
            ),
            &["resource", "cause"],
        )?;
        let silence = Silence::new()?;
        for resource in RESOURCES {
            errors.with_label_values(&[resource]);
            for cause in [Relist::Initial, Relist::Gone, Relist::Idle] {
                relists.with_label_values(&[resource, cause.label()]);
            }
            for event in ["listed", "apply", "delete", "bookmark"] {
                events.with_label_values(&[resource, event]);
            }
            // Not heard from yet: silent since start-up.
            silence.touch(resource);
        }
        registry.register(Box::new(events.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(relists.clone()))?;
        registry.register(Box::new(silence.clone()))?;
        Ok(Self {
            events,
            errors,
            relists,
            silence,
        })
    }
}

/// `imds_broker_watch_silence_seconds`: seconds since each watch last heard from the API server (an
/// event, a bookmark or a list), computed when scraped.
#[derive(Clone)]
struct Silence {
    last: Arc<Mutex<HashMap<&'static str, Instant>>>,
    gauge: GaugeVec,
}

impl Silence {
    fn new() -> prometheus::Result<Self> {
        let gauge = GaugeVec::new(
            Opts::new(
                "imds_broker_watch_silence_seconds",
                "Seconds since the watch of a resource last received an event, a bookmark or a list",
            ),
            &["resource"],
        )?;
        Ok(Self {
            last: Arc::default(),
            gauge,
        })
    }

    fn touch(&self, resource: &'static str) {
        self.last
            .lock()
            .expect("silence lock poisoned")
            .insert(resource, Instant::now());
    }
}

impl Collector for Silence {
    fn desc(&self) -> Vec<&Desc> {
        self.gauge.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let now = Instant::now();
        for (resource, at) in self.last.lock().expect("silence lock poisoned").iter() {
            self.gauge
                .with_label_values(&[resource])
                .set(now.duration_since(*at).as_secs_f64());
        }
        self.gauge.collect()
    }
}

/// One resource's list-then-watch loop.
pub struct Watch<K> {
    /// The collection to watch.
    pub api: Api<K>,
    /// The metric label and log name (`pods`, `serviceaccounts`, `namespaces`).
    pub resource: &'static str,
    /// A field selector (`spec.nodeName=<node>`), if any.
    pub fields: Option<String>,
    /// Shared settings.
    pub config: Config,
    /// Shared metrics.
    pub metrics: Metrics,
}

/// How a watch ended.
enum End {
    /// Relist for this cause.
    Relist(Relist),
    /// Retry the watch from the same resourceVersion (after a backoff when `failed`).
    Resume { failed: bool },
    /// Shutdown, or the consumer went away.
    Stop,
}

impl<K> Watch<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    /// Lists and watches into `out` until `shutdown` or until `out` is closed.
    pub async fn run(self, out: mpsc::Sender<Update<K>>, shutdown: CancellationToken) {
        let mut cause = Relist::Initial;
        let mut failures = 0u32;
        let mut reachable = true;
        loop {
            self.metrics
                .relists
                .with_label_values(&[self.resource, cause.label()])
                .inc();
            if cause == Relist::Gone && out.send(Update::Stale).await.is_err() {
                return;
            }
            // List until it works.
            let (items, mut version) = loop {
                let listed = tokio::select! {
                    () = shutdown.cancelled() => return,
                    listed = self.list() => listed,
                };
                match listed {
                    Ok(listed) => break listed,
                    Err(error) => {
                        failures += 1;
                        if !self.failed(&out, &mut reachable, &error.to_string(), "list").await
                            || !pause(failures, &shutdown).await
                        {
                            return;
                        }
                    }
                }
            };
            failures = 0;
            self.metrics.silence.touch(self.resource);
            self.metrics
                .events
                .with_label_values(&[self.resource, "listed"])
                .inc_by(items.len() as u64);
            if out.send(Update::Listed(items)).await.is_err() {
                return;
            }
            if !reachable {
                reachable = true;
                if out.send(Update::Reachable).await.is_err() {
                    return;
                }
            }
            let mut last_heard = Instant::now();
            // Watch, resuming from the last resourceVersion, until a relist is needed.
            cause = loop {
                match self
                    .watch(&out, &mut version, &mut last_heard, &mut reachable, &shutdown)
                    .await
                {
                    End::Stop => return,
                    End::Relist(cause) => break cause,
                    End::Resume { failed: false } => failures = 0,
                    End::Resume { failed: true } => {
                        failures += 1;
                        if !pause(failures, &shutdown).await {
                            return;
                        }
                    }
                }
            };
        }
    }

    /// A complete, paginated list and its resourceVersion.
    async fn list(&self) -> kube::Result<(Vec<K>, String)> {
        let mut params = ListParams::default().limit(self.config.page_size);
        if let Some(fields) = &self.fields {
            params = params.fields(fields);
        }
        let mut items = Vec::new();
        loop {
            let page = self.api.list(&params).await?;
            items.extend(page.items);
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params.continue_token = Some(token),
                None => return Ok((items, page.metadata.resource_version.unwrap_or_default())),
            }
        }
    }

    /// One watch request, followed until it ends.
    async fn watch(
        &self,
        out: &mpsc::Sender<Update<K>>,
        version: &mut String,
        last_heard: &mut Instant,
        reachable: &mut bool,
        shutdown: &CancellationToken,
    ) -> End {
        let mut params = WatchParams::default();
        if let Some(fields) = &self.fields {
            params = params.fields(fields);
        }
        let from = version.clone();
        let start = self.api.watch(&params, &from);
        let mut start = std::pin::pin!(start);
        let grace = tokio::time::sleep(START_GRACE);
        let mut grace = std::pin::pin!(grace);
        let mut graced = false;
        let started = loop {
            tokio::select! {
                () = shutdown.cancelled() => return End::Stop,
                () = tokio::time::sleep_until(*last_heard + self.config.idle) => return self.idle(),
                // A healthy API server answers a watch at once; one that does not is as good as away.
                () = &mut grace, if !graced => {
                    graced = true;
                    if *reachable {
                        *reachable = false;
                        if out.send(Update::Unreachable).await.is_err() {
                            return End::Stop;
                        }
                    }
                }
                started = &mut start => break started,
            }
        };
        let stream = match started {
            Ok(stream) => stream,
            Err(kube::Error::Api(status)) if status.code == 410 => return self.gone(),
            Err(error) => {
                return if self.failed(out, reachable, &error.to_string(), "watch").await {
                    End::Resume { failed: true }
                } else {
                    End::Stop
                };
            }
        };
        if !*reachable {
            *reachable = true;
            if out.send(Update::Reachable).await.is_err() {
                return End::Stop;
            }
        }
        let mut stream = std::pin::pin!(stream);
        loop {
            let next = tokio::select! {
                () = shutdown.cancelled() => return End::Stop,
                () = tokio::time::sleep_until(*last_heard + self.config.idle) => return self.idle(),
                next = stream.next() => next,
            };
            let update = match next {
                None => return End::Resume { failed: false },
                Some(Ok(WatchEvent::Added(object) | WatchEvent::Modified(object))) => {
                    self.count("apply");
                    *version = object.resource_version().unwrap_or_default();
                    Update::Applied(object)
                }
                Some(Ok(WatchEvent::Deleted(object))) => {
                    self.count("delete");
                    *version = object.resource_version().unwrap_or_default();
                    Update::Deleted(object)
                }
                Some(Ok(WatchEvent::Bookmark(bookmark))) => {
                    self.count("bookmark");
                    *version = bookmark.metadata.resource_version;
                    *last_heard = Instant::now();
                    self.metrics.silence.touch(self.resource);
                    continue;
                }
                Some(Ok(WatchEvent::Error(status))) if status.code == 410 => return self.gone(),
                Some(Ok(WatchEvent::Error(status))) => {
                    let message = format!("{} {}: {}", status.code, status.reason, status.message);
                    return if self.failed(out, reachable, &message, "watch").await {
                        End::Resume { failed: true }
                    } else {
                        End::Stop
                    };
                }
                Some(Err(error)) => {
                    return if self.failed(out, reachable, &error.to_string(), "watch").await {
                        End::Resume { failed: true }
                    } else {
                        End::Stop
                    };
                }
            };
            *last_heard = Instant::now();
            self.metrics.silence.touch(self.resource);
            if out.send(update).await.is_err() {
                return End::Stop;
            }
        }
    }

    fn gone(&self) -> End {
        tracing::info!(
            resource = self.resource,
            "watch history compacted (410 Gone); relisting now"
        );
        End::Relist(Relist::Gone)
    }

    fn idle(&self) -> End {
        tracing::warn!(
            resource = self.resource, idle = ?self.config.idle,
            "watch silent (no event, no bookmark); relisting"
        );
        End::Relist(Relist::Idle)
    }

    /// Counts and logs a failure and tells the consumer once; false when the consumer is gone.
    async fn failed(&self, out: &mpsc::Sender<Update<K>>, reachable: &mut bool, error: &str, during: &str) -> bool {
        self.metrics.errors.with_label_values(&[self.resource]).inc();
        tracing::warn!(resource = self.resource, during, %error, "API server request failed; retrying");
        if *reachable {
            *reachable = false;
            return out.send(Update::Unreachable).await.is_ok();
        }
        true
    }

    fn count(&self, event: &str) {
        self.metrics.events.with_label_values(&[self.resource, event]).inc();
    }
}

/// Sleeps the retry delay; false on shutdown.
async fn pause(failures: u32, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => false,
        () = tokio::time::sleep(retry_delay(failures, rand::random())) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_start_fast_and_never_wait_more_than_five_seconds() {
        assert_eq!(retry_delay(1, 0.0), Duration::from_millis(250));
        assert_eq!(retry_delay(2, 0.0), Duration::from_millis(500));
        assert_eq!(retry_delay(5, 0.0), Duration::from_secs(4));
        for failures in 1..100 {
            for fraction in [0.0, 0.5, 0.999] {
                let delay = retry_delay(failures, fraction);
                assert!(
                    delay <= RETRY_CAP && delay >= RETRY_INITIAL / 2,
                    "{failures}: {delay:?}"
                );
            }
        }
    }
}
