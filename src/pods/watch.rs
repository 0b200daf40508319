//! The node-scoped watches that feed the [`Store`]: pods with `spec.nodeName=<node>` and all service
//! accounts (their IRSA annotation can change at any time and must take effect within seconds).
//!
//! kube-runtime's watcher re-lists after `410 Gone` and reconnects with backoff; this module only
//! translates its events into index updates and forwards the resulting changes. It never decides roles.

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event as WatchEvent};
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Event, Store};

/// Watch metrics.
#[derive(Clone)]
pub struct Metrics {
    pods: IntGauge,
    events: IntCounterVec,
    errors: IntCounterVec,
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let pods = IntGauge::new("imds_broker_pods_indexed", "Pods on this node currently indexed by IP")?;
        let events = IntCounterVec::new(
            Opts::new(
                "imds_broker_watch_events_total",
                "Watch events applied, by resource and type",
            ),
            &["resource", "event"],
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "imds_broker_watch_errors_total",
                "Watch stream errors (the watcher retries with backoff)",
            ),
            &["resource"],
        )?;
        registry.register(Box::new(pods.clone()))?;
        registry.register(Box::new(events.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        Ok(Self { pods, events, errors })
    }
}

/// Runs both watches until shutdown.
pub struct Watcher {
    pub client: kube::Client,
    pub node_name: String,
    pub store: Store,
    pub events: mpsc::Sender<Event>,
    pub metrics: Metrics,
}

impl Watcher {
    /// Watches until `shutdown` is cancelled. Sends [`Event::Synced`] once both first lists are applied.
    pub async fn run(self, shutdown: CancellationToken) {
        let pods = watcher::watcher(
            Api::<Pod>::all(self.client.clone()),
            watcher::Config::default().fields(&format!("spec.nodeName={}", self.node_name)),
        )
        .default_backoff()
        .map_ok(|e| Update::Pod(Box::new(e)))
        .map_err(|e| ("pods", e));
        let accounts = watcher::watcher(
            Api::<ServiceAccount>::all(self.client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .map_ok(|e| Update::ServiceAccount(Box::new(e)))
        .map_err(|e| ("serviceaccounts", e));
        let mut updates = std::pin::pin!(futures::stream::select(pods, accounts));

        let mut pod_buffer: Vec<Pod> = Vec::new();
        let mut sa_buffer: Vec<ServiceAccount> = Vec::new();
        let (mut pods_synced, mut accounts_synced, mut announced) = (false, false, false);
        loop {
            let next = tokio::select! {
                () = shutdown.cancelled() => return,
                next = updates.next() => next,
            };
            let update = match next {
                Some(Ok(update)) => update,
                Some(Err((resource, error))) => {
                    tracing::warn!(resource, %error, "watch failed; retrying with backoff");
                    self.metrics.errors.with_label_values(&[resource]).inc();
                    continue;
                }
                None => return,
            };
            let changes = match update {
                Update::Pod(event) => {
                    self.count("pods", &event);
                    match *event {
                        WatchEvent::Init => {
                            pod_buffer.clear();
                            Vec::new()
                        }
                        WatchEvent::InitApply(pod) => {
                            pod_buffer.push(pod);
                            Vec::new()
                        }
                        WatchEvent::InitDone => {
                            pods_synced = true;
                            let pods = std::mem::take(&mut pod_buffer);
                            self.store.write(|i| i.replace_pods(&pods))
                        }
                        WatchEvent::Apply(pod) => self.store.write(|i| i.apply_pod(&pod)).into_iter().collect(),
                        WatchEvent::Delete(pod) => self.store.write(|i| i.delete_pod(&pod)).into_iter().collect(),
                    }
                }
                Update::ServiceAccount(event) => {
                    self.count("serviceaccounts", &event);
                    match *event {
                        WatchEvent::Init => {
                            sa_buffer.clear();
                            Vec::new()
                        }
                        WatchEvent::InitApply(sa) => {
                            sa_buffer.push(sa);
                            Vec::new()
                        }
                        WatchEvent::InitDone => {
                            accounts_synced = true;
                            let accounts = std::mem::take(&mut sa_buffer);
                            self.store.write(|i| i.replace_service_accounts(&accounts))
                        }
                        WatchEvent::Apply(sa) => self.store.write(|i| i.apply_service_account(&sa)),
                        WatchEvent::Delete(sa) => self.store.write(|i| i.delete_service_account(&sa)),
                    }
                }
            };
            self.metrics.pods.set(self.store.read(|i| i.len()) as i64);
            for change in changes {
                if self.events.send(Event::Changed(change)).await.is_err() {
                    return;
                }
            }
            if pods_synced && accounts_synced && !announced {
                announced = true;
                tracing::info!(pods = self.store.read(|i| i.len()), node = %self.node_name, "pod index synced");
                if self.events.send(Event::Synced).await.is_err() {
                    return;
                }
            }
        }
    }

    fn count<K>(&self, resource: &str, event: &WatchEvent<K>) {
        let kind = match event {
            WatchEvent::Init => "init",
            WatchEvent::InitApply(_) => "init_apply",
            WatchEvent::InitDone => "init_done",
            WatchEvent::Apply(_) => "apply",
            WatchEvent::Delete(_) => "delete",
        };
        self.metrics.events.with_label_values(&[resource, kind]).inc();
    }
}

enum Update {
    Pod(Box<WatchEvent<Pod>>),
    ServiceAccount(Box<WatchEvent<ServiceAccount>>),
}
