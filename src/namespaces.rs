//! Per-namespace IMDSv2 enforcement: a Namespace annotated `imds-broker.io/imdsv2: required` gets 401
//! for token-less (IMDSv1) requests from its pods even when the node serves IMDSv1 (`--imdsv2 optional`).
//!
//! [`Policy`] is the shared, read-mostly view the IMDS handler asks; [`Watcher`] (a metadata-only
//! watch of all Namespaces, keeping the annotation's value alone) is its only writer; it holds the
//! names of the namespaces that require IMDSv2, nothing of the others. Fails closed: until the first
//! list is applied, and for annotation values other than `required` / `optional`, a namespace counts
//! as requiring IMDSv2.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::watch::{self, Unreadable, Update};

/// The Namespace annotation read.
pub const IMDSV2_ANNOTATION: &str = "imds-broker.io/imdsv2";

/// The namespace watch keeps [`IMDSV2_ANNOTATION`] only.
pub struct Imdsv2;

impl watch::Selection for Imdsv2 {
    type Kind = k8s_openapi::api::core::v1::Namespace;
    const ANNOTATION: &'static str = IMDSV2_ANNOTATION;
}

/// A namespace as the policy needs it: its name and its [`IMDSV2_ANNOTATION`] value.
pub type Namespace = watch::Metadata<Imdsv2>;

#[derive(Default)]
struct State {
    required: HashSet<String>,
}

/// Which namespaces require IMDSv2.
#[derive(Clone)]
pub struct Policy {
    state: Arc<RwLock<State>>,
    synced: tokio::sync::watch::Sender<bool>,
}

impl Default for Policy {
    fn default() -> Self {
        Self::new()
    }
}

impl Policy {
    /// A policy that has not seen the namespaces yet.
    pub fn new() -> Self {
        Self {
            state: Arc::default(),
            synced: tokio::sync::watch::channel(false).0,
        }
    }

    /// Whether token-less requests from pods of `namespace` are refused. Before the first list has
    /// been applied it waits until `deadline`, then answers `true`.
    pub async fn requires_v2(&self, namespace: &str, deadline: Instant) -> bool {
        let mut synced = self.synced.subscribe();
        let ready = tokio::time::timeout_at(deadline, synced.wait_for(|s| *s)).await;
        if !matches!(ready, Ok(Ok(_))) {
            return true;
        }
        self.read().required.contains(namespace)
    }

    /// Whether the first list (or the relist after a 410) has been applied.
    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Waits until `deadline` for the policy to be synced; true if it is.
    pub async fn wait_synced(&self, deadline: Instant) -> bool {
        let mut synced = self.synced.subscribe();
        matches!(
            tokio::time::timeout_at(deadline, synced.wait_for(|s| *s)).await,
            Ok(Ok(_))
        )
    }

    /// Follows whether the policy is synced (for readiness).
    pub fn synced(&self) -> tokio::sync::watch::Receiver<bool> {
        self.synced.subscribe()
    }

    /// Events were missed: not synced until the next full list.
    pub fn unsync(&self) {
        tracing::warn!("namespace events were missed (410 Gone): refusing requests until the relist completes");
        self.synced.send_replace(false);
    }

    /// Replaces everything with a full list, and marks the policy synced. Namespaces that could not be
    /// decoded require IMDSv2 (fail closed, as for an unknown annotation value); those missing from the
    /// list (lists keep only annotated ones) do not.
    pub fn replace(&self, namespaces: &[Namespace], unreadable: &[Unreadable]) {
        let required = namespaces
            .iter()
            .filter(|ns| requires(ns))
            .filter_map(name)
            .chain(unreadable.iter().filter_map(|ns| ns.name.clone()))
            .collect();
        self.write().required = required;
        self.synced.send_replace(true);
    }

    /// A namespace that could not be decoded requires IMDSv2 until it can be read again or is deleted.
    pub fn distrust(&self, namespace: &Unreadable, deleted: bool) {
        let Some(name) = namespace.name.clone() else { return };
        let mut state = self.write();
        if deleted {
            state.required.remove(&name);
        } else {
            state.required.insert(name);
        }
    }

    /// Applies one added or changed namespace.
    pub fn apply(&self, namespace: &Namespace) {
        let Some(name) = name(namespace) else { return };
        let mut state = self.write();
        if requires(namespace) {
            state.required.insert(name);
        } else {
            state.required.remove(&name);
        }
    }

    /// Forgets a deleted namespace.
    pub fn delete(&self, namespace: &Namespace) {
        if let Some(name) = name(namespace) {
            self.write().required.remove(&name);
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().expect("policy lock poisoned: a writer panicked")
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().expect("policy lock poisoned: a writer panicked")
    }
}

fn name(namespace: &Namespace) -> Option<String> {
    namespace.name.clone()
}

fn requires(namespace: &Namespace) -> bool {
    match namespace.annotation.as_deref().map(|v| v.trim().to_ascii_lowercase()) {
        None => false,
        Some(v) if v == "optional" => false,
        Some(v) if v == "required" => true,
        Some(other) => {
            tracing::warn!(
                namespace = name(namespace).as_deref().unwrap_or_default(),
                value = %other,
                "unknown {IMDSV2_ANNOTATION} value; requiring IMDSv2"
            );
            true
        }
    }
}

/// Watches all Namespaces into a [`Policy`].
pub struct Watcher {
    /// The API server.
    pub client: kube::Client,
    /// What the watch keeps up to date.
    pub policy: Policy,
    /// The list-then-watch settings.
    pub watch_config: watch::Config,
    /// The watch metrics.
    pub watch_metrics: watch::Metrics,
}

impl Watcher {
    /// Watches until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) {
        let (tx, mut updates) = mpsc::channel(256);
        let namespaces = watch::Watch {
            client: self.client,
            resource: "namespaces",
            fields: None,
            config: self.watch_config,
            metrics: self.watch_metrics,
            kind: std::marker::PhantomData::<Namespace>,
        };
        let apply = async {
            while let Some(update) = updates.recv().await {
                match update {
                    Update::Stale => self.policy.unsync(),
                    Update::Listed { items, unreadable } => self.policy.replace(&items, &unreadable),
                    Update::Applied(ns) => self.policy.apply(&ns),
                    Update::Deleted(ns) => self.policy.delete(&ns),
                    Update::Unreadable { object, deleted } => self.policy.distrust(&object, deleted),
                    Update::Unreachable | Update::Reachable => {}
                }
            }
        };
        tokio::join!(namespaces.run(tx, shutdown.clone()), apply);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn namespace(name: &str, value: Option<&str>) -> Namespace {
        Namespace::new(None, name, value)
    }

    #[tokio::test(start_paused = true)]
    async fn annotated_namespaces_require_imdsv2_and_unknown_values_fail_closed() {
        let policy = Policy::new();
        policy.replace(
            &[
                namespace("strict", Some("required")),
                namespace("loose", Some("optional")),
                namespace("plain", None),
                namespace("typo", Some("requierd")),
            ],
            &[unreadable("odd")],
        );
        let at = Instant::now();
        assert!(
            policy.requires_v2("odd", at).await,
            "a namespace that cannot be read fails closed"
        );
        assert!(policy.requires_v2("strict", at).await);
        assert!(policy.requires_v2("typo", at).await);
        assert!(!policy.requires_v2("loose", at).await);
        assert!(!policy.requires_v2("plain", at).await);
        policy.apply(&namespace("plain", Some("Required")));
        assert!(policy.requires_v2("plain", at).await);
        policy.delete(&namespace("plain", None));
        assert!(!policy.requires_v2("plain", at).await);
        policy.distrust(&unreadable("plain"), false);
        assert!(policy.requires_v2("plain", at).await);
        policy.apply(&namespace("plain", None));
        assert!(
            !policy.requires_v2("plain", at).await,
            "readable again, its annotation decides"
        );
        policy.distrust(&unreadable("odd"), true);
        assert!(!policy.requires_v2("odd", at).await, "deleted");
    }

    fn unreadable(name: &str) -> Unreadable {
        Unreadable {
            uid: Some(format!("uid-{name}")),
            name: Some(name.to_owned()),
            ..Unreadable::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn before_the_first_list_every_namespace_requires_imdsv2_after_a_bounded_wait() {
        let policy = Policy::new();
        let started = Instant::now();
        assert!(policy.requires_v2("plain", started + Duration::from_millis(200)).await);
        assert_eq!(started.elapsed(), Duration::from_millis(200));
    }
}
