//! The watches that feed the [`Store`]: pods with `spec.nodeName=<node>` (whole objects) and all
//! service accounts (their IRSA annotation can change at any time and must take effect within
//! seconds). Service accounts are watched as metadata only and kept as their IRSA annotation's value
//! ([`ServiceAccount`]); a list keeps only the annotated ones, so the cluster's size costs nothing.
//!
//! [`crate::watch`] lists, watches and says what the view is worth; this module applies its updates to
//! the index, keeps the store's [`super::View`] true, and forwards the resulting changes. It never
//! decides roles.

use std::marker::PhantomData;

use k8s_openapi::api::core::v1::Pod;
use prometheus::{IntGauge, Registry};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Change, Event, Store};
use crate::roles::SERVICE_ACCOUNT_ANNOTATION;
use crate::watch::{self, Update};

/// The service-account watch keeps `eks.amazonaws.com/role-arn` only.
pub struct Irsa;

impl watch::Selection for Irsa {
    type Kind = k8s_openapi::api::core::v1::ServiceAccount;
    const ANNOTATION: &'static str = SERVICE_ACCOUNT_ANNOTATION;
}

/// A service account as the index needs it: its name and IRSA annotation.
pub type ServiceAccount = watch::Metadata<Irsa>;

impl watch::Object for Pod {
    type Kind = Pod;
    const METADATA_ONLY: bool = false;

    fn resource_version(&self) -> Option<&str> {
        self.metadata.resource_version.as_deref()
    }
}

/// Index metrics.
#[derive(Clone)]
pub struct Metrics {
    pods: IntGauge,
    held: IntGauge,
    addresses: IntGauge,
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let pods = IntGauge::new("imds_broker_pods_indexed", "Pods on this node currently served by IP")?;
        let held = IntGauge::new(
            "imds_broker_pods_held",
            "Pods on this node indexed but not served: containers terminated, or status from before the node's boot",
        )?;
        let addresses = IntGauge::new("imds_broker_pods_addresses", "Pod addresses currently indexed")?;
        registry.register(Box::new(pods.clone()))?;
        registry.register(Box::new(held.clone()))?;
        registry.register(Box::new(addresses.clone()))?;
        Ok(Self { pods, held, addresses })
    }
}

/// Runs both watches until shutdown.
pub struct Watcher {
    /// The API server.
    pub client: kube::Client,
    /// Only this node's pods are watched.
    pub node_name: String,
    /// What the watches keep up to date.
    pub store: Store,
    /// Where changes go (the credential cache).
    pub events: mpsc::Sender<Event>,
    /// The index metrics.
    pub metrics: Metrics,
    /// The list-then-watch settings.
    pub watch_config: watch::Config,
    /// The watch metrics.
    pub watch_metrics: watch::Metrics,
}

impl Watcher {
    /// Watches until `shutdown` is cancelled. Sends [`Event::Synced`] whenever the view becomes whole:
    /// after the first lists, and after each relist that follows missed events.
    pub async fn run(self, shutdown: CancellationToken) {
        let (pods_tx, mut pods) = mpsc::channel(256);
        let (accounts_tx, mut accounts) = mpsc::channel(256);
        let pod_watch = watch::Watch {
            client: self.client.clone(),
            resource: "pods",
            fields: Some(format!("spec.nodeName={}", self.node_name)),
            config: self.watch_config.clone(),
            metrics: self.watch_metrics.clone(),
            kind: PhantomData::<Pod>,
        };
        let account_watch = watch::Watch {
            client: self.client.clone(),
            resource: "serviceaccounts",
            fields: None,
            config: self.watch_config.clone(),
            metrics: self.watch_metrics.clone(),
            kind: PhantomData::<ServiceAccount>,
        };
        let apply = async {
            let mut whole = false;
            loop {
                let changes = tokio::select! {
                    () = shutdown.cancelled() => return,
                    update = pods.recv() => match update {
                        Some(update) => self.apply_pods(update),
                        None => return,
                    },
                    update = accounts.recv() => match update {
                        Some(update) => self.apply_accounts(update),
                        None => return,
                    },
                };
                let (served, held, addresses) = self.store.read(|i| i.sizes());
                self.metrics.pods.set(served as i64);
                self.metrics.held.set(held as i64);
                self.metrics.addresses.set(addresses as i64);
                for change in changes {
                    if self.events.send(Event::Changed(change)).await.is_err() {
                        return;
                    }
                }
                let now_whole = self.store.view().is_whole();
                if now_whole && !whole {
                    tracing::info!(pods = served, node = %self.node_name, "pod index synced");
                    if self.events.send(Event::Synced).await.is_err() {
                        return;
                    }
                }
                whole = now_whole;
            }
        };
        tokio::join!(
            pod_watch.run(pods_tx, shutdown.clone()),
            account_watch.run(accounts_tx, shutdown.clone()),
            apply
        );
    }

    fn apply_pods(&self, update: Update<Pod>) -> Vec<Change> {
        let store = &self.store;
        match update {
            Update::Stale => {
                tracing::warn!(
                    "pod events were missed (410 Gone) or unreadable: refusing credentials until the relist completes"
                );
                store.set_view(|v| v.pods = false);
                Vec::new()
            }
            Update::Listed { items, unreadable } => {
                let changes = store.write(|i| i.replace_pods(&items, &unreadable));
                store.set_view(|v| {
                    v.pods = true;
                    v.reachable = true;
                });
                changes
            }
            Update::Applied(pod) => store.write(|i| i.apply_pod(&pod)).into_iter().collect(),
            Update::Deleted(pod) => store.write(|i| i.delete_pod(&pod)).into_iter().collect(),
            Update::Unreadable { object, deleted: false } => {
                store.write(|i| i.distrust_pod(&object)).into_iter().collect()
            }
            Update::Unreadable { object, deleted: true } => {
                store.write(|i| i.delete_unreadable_pod(&object)).into_iter().collect()
            }
            Update::Unreachable => {
                store.set_view(|v| v.reachable = false);
                Vec::new()
            }
            Update::Reachable => {
                store.set_view(|v| v.reachable = true);
                Vec::new()
            }
        }
    }

    fn apply_accounts(&self, update: Update<ServiceAccount>) -> Vec<Change> {
        let store = &self.store;
        match update {
            Update::Stale => {
                tracing::warn!(
                    "service-account events were missed (410 Gone) or unreadable: refusing credentials until the relist completes"
                );
                store.set_view(|v| v.service_accounts = false);
                Vec::new()
            }
            Update::Listed { items, unreadable } => {
                let changes = store.write(|i| i.replace_service_accounts(items, &unreadable));
                store.set_view(|v| v.service_accounts = true);
                changes
            }
            Update::Applied(account) => store.write(|i| i.apply_service_account(&account)),
            Update::Deleted(account) => store.write(|i| i.delete_service_account(&account)),
            Update::Unreadable { object, deleted } => store.write(|i| i.distrust_service_account(&object, deleted)),
            // Known service accounts stay true; pods are what an unreachable API server hides.
            Update::Unreachable | Update::Reachable => Vec::new(),
        }
    }
}
