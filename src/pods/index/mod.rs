//! The pure map from a caller's IP address to the pod that owns it on this node, fed by watch events.
//!
//! Invariants:
//! - entries are keyed by pod UID, and an IP points at UIDs, so a late delete of an old pod can never
//!   remove a newer pod that reuses its IP;
//! - `hostNetwork` pods are never found by IP (their IP is the node's and identifies nothing): they are
//!   not indexed at all, or, when the container-credentials endpoint is on, indexed by UID alone (found
//!   only by the token they present); pods that finished (`Succeeded`/`Failed`) or that have no UID are
//!   never indexed;
//! - a pod whose containers have all terminated for good (deleting, or a restart policy that will not
//!   start them again), or whose every container started before the node last booted (its status was
//!   not republished since a reboot, and the CNI may have handed its IP to another pod), is *held*: its
//!   IP answers [`Lookup::Pending`], never the pod, until its status says it runs again or it is gone;
//! - when two live pods claim one IP, that IP resolves to nobody until it is unambiguous again;
//! - a terminating pod whose containers still run keeps its IP (graceful shutdown needs credentials)
//!   until a live pod claims it;
//! - a pod the watch could not decode is held too, on every address it was known by or still names,
//!   until it can be read again or is gone; the pods of a service account that could not be decoded
//!   are marked so (their role is unknown, and no weaker source stands in for it).
//!
//! No I/O and no clock: `watch` feeds it, tests drive it directly; the node's boot time is given.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};

use super::watch::ServiceAccount;
use crate::roles::POD_ANNOTATION;
use crate::watch::Unreadable;
use crate::workload::Workload;

/// What a caller's IP resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Exactly one pod owns the address (shared, so a lookup copies nothing).
    Found(Arc<Workload>),
    /// Several live pods claim the address; serving any of them could hand out another pod's role.
    Ambiguous(Vec<String>),
    /// Only held pods (terminated, or not republished since the node booted) claim the address: its
    /// next owner may not be published yet.
    Pending,
    /// No pod on this node has the address.
    Unknown,
}

/// A change to a workload that credential holders must react to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A workload was added or changed (IP, phase, annotation, service account role).
    Upserted(Workload),
    /// A workload is gone or must not be served any more: deleted, finished, held, or turned into
    /// something we do not index.
    Removed {
        /// The pod's UID.
        uid: String,
        /// `namespace/name`, for logs.
        key: String,
    },
}

/// What a pod UID resolves to (the container-credentials endpoint's question).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ByUid {
    /// The pod is served.
    Served(Arc<Workload>),
    /// The pod is indexed but held (terminated, not republished since the node booted, or unreadable).
    Held,
    /// No pod of this node has the UID.
    Unknown,
}

/// Why an indexed pod is not served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Every container has terminated and none will start again.
    Terminated,
    /// Every container started before the node's boot: the status is from before a reboot.
    BeforeBoot,
}

/// IP → pod index plus the service accounts' role annotations.
#[derive(Debug, Default)]
pub struct Index {
    /// Pods that are served, by UID.
    pods: HashMap<String, Arc<Workload>>,
    /// Pods that are indexed but held, by UID, with the addresses they claim.
    held: HashMap<String, Vec<IpAddr>>,
    /// Address → UIDs of served and held pods claiming it.
    by_ip: HashMap<IpAddr, Vec<String>>,
    /// (namespace, name) → value of the IRSA annotation, for the service accounts that have one (one
    /// without it resolves like one that does not exist: only annotated ones cost memory).
    service_accounts: HashMap<(String, String), String>,
    /// (namespace, name) of service accounts that exist but could not be decoded.
    unreadable_accounts: HashSet<(String, String)>,
    /// The node's boot time in Unix seconds, when known.
    boot_time: Option<i64>,
    /// Whether `hostNetwork` pods are indexed (by UID only).
    host_network: bool,
}

/// Converts a pod to a workload, or `None` when the pod must not be indexed. A `hostNetwork` pod is
/// one only with `host_network`, and then without addresses.
pub fn workload_of(pod: &Pod, service_account_role: Option<String>, host_network: bool) -> Option<Workload> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref()?;
    let on_host = spec.host_network == Some(true);
    if on_host && !host_network {
        return None;
    }
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return None;
    }
    let uid = meta.uid.clone().filter(|u| !u.is_empty())?;
    let mut ips: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if on_host {
        // The node's own addresses: they identify nothing.
        ips.clear();
    } else if ips.is_empty() {
        // Older API servers only fill `podIP`.
        ips.extend(
            status
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|ip| ip.parse::<IpAddr>().ok()),
        );
    }
    Some(Workload {
        uid,
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
        service_account: spec
            .service_account_name
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".to_owned()),
        pod_role: annotation(&meta.annotations, POD_ANNOTATION),
        service_account_role,
        service_account_unreadable: false,
        ips,
        running: phase == Some("Running"),
        running_since: running_since(pod),
        terminating: meta.deletion_timestamp.is_some(),
        host_network: on_host,
    })
}

/// The earliest start of the pod's running containers.
fn running_since(pod: &Pod) -> Option<time::OffsetDateTime> {
    let containers = pod.status.as_ref()?.container_statuses.as_deref()?;
    let first = containers
        .iter()
        .filter_map(|c| c.state.as_ref()?.running.as_ref()?.started_at.as_ref())
        .map(|at| at.0.as_nanosecond())
        .min()?;
    time::OffsetDateTime::from_unix_timestamp_nanos(first).ok()
}

/// Whether an indexable pod must be held rather than served, given the node's boot time.
pub fn hold_of(pod: &Pod, boot_time: Option<i64>) -> Option<Hold> {
    let containers: &[ContainerStatus] = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_deref())
        .unwrap_or_default();
    if containers.is_empty() {
        return None;
    }
    fn terminated(c: &ContainerStatus) -> Option<&k8s_openapi::api::core::v1::ContainerStateTerminated> {
        c.state.as_ref()?.terminated.as_ref()
    }
    if containers.iter().all(|c| terminated(c).is_some()) {
        let restart = pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.as_deref())
            .unwrap_or("Always");
        let all_succeeded = containers
            .iter()
            .all(|c| terminated(c).is_some_and(|t| t.exit_code == 0));
        // The kubelet restarts containers unless the pod is going away or its policy says no.
        let final_ = pod.metadata.deletion_timestamp.is_some()
            || restart == "Never"
            || (restart == "OnFailure" && all_succeeded);
        if final_ {
            return Some(Hold::Terminated);
        }
    }
    let boot = boot_time?;
    let started = |c: &ContainerStatus| {
        let state = c.state.as_ref()?;
        let at = state
            .running
            .as_ref()
            .and_then(|r| r.started_at.as_ref())
            .or_else(|| state.terminated.as_ref().and_then(|t| t.started_at.as_ref()))?;
        Some(at.0.as_second())
    };
    containers
        .iter()
        .all(|c| started(c).is_some_and(|at| at < boot))
        .then_some(Hold::BeforeBoot)
}

fn annotation(annotations: &Option<BTreeMap<String, String>>, key: &str) -> Option<String> {
    annotations.as_ref().and_then(|a| a.get(key)).cloned()
}

fn sa_key(namespace: &str, name: &str) -> (String, String) {
    (namespace.to_owned(), name.to_owned())
}

impl Index {
    /// An empty index that knows no boot time (pods are never held for it).
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty index for a node that booted at `boot_time` (Unix seconds).
    pub fn with_boot_time(boot_time: Option<i64>) -> Self {
        Self {
            boot_time,
            ..Self::default()
        }
    }

    /// Also indexes `hostNetwork` pods, by UID only (for the container-credentials endpoint).
    pub fn with_host_network(self, host_network: bool) -> Self {
        Self { host_network, ..self }
    }

    /// Number of served pods.
    pub fn len(&self) -> usize {
        self.pods.len()
    }

    /// True when no pod is served.
    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }

    /// Sizes of every per-pod structure: (served pods, held pods, addresses), for leak checks.
    pub fn sizes(&self) -> (usize, usize, usize) {
        (self.pods.len(), self.held.len(), self.by_ip.len())
    }

    /// The pod that owns `ip`.
    pub fn lookup(&self, ip: IpAddr) -> Lookup {
        let Some(uids) = self.by_ip.get(&ip) else {
            return Lookup::Unknown;
        };
        let candidates = || uids.iter().filter_map(|u| self.pods.get(u));
        // Live pods own the address; terminating ones only while no live pod claims it.
        let live = candidates().filter(|w| !w.terminating).count();
        let owners = || candidates().filter(move |w| live == 0 || !w.terminating);
        let mut found = owners();
        match (found.next(), found.next()) {
            (None, _) if uids.iter().any(|u| self.held.contains_key(u)) => Lookup::Pending,
            (None, _) => Lookup::Unknown,
            (Some(one), None) => Lookup::Found(one.clone()),
            _ => Lookup::Ambiguous(owners().map(|w| w.key()).collect()),
        }
    }

    /// The served workload with this UID.
    pub fn get(&self, uid: &str) -> Option<&Workload> {
        self.pods.get(uid).map(|w| &**w)
    }

    /// Whether the pod with this UID is served, held or unknown.
    pub fn by_uid(&self, uid: &str) -> ByUid {
        match self.pods.get(uid) {
            Some(workload) => ByUid::Served(workload.clone()),
            None if self.held.contains_key(uid) => ByUid::Held,
            None => ByUid::Unknown,
        }
    }

    /// Every served workload.
    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.pods.values()
    }

    /// Applies an added or modified pod.
    pub fn apply_pod(&mut self, pod: &Pod) -> Option<Change> {
        let uid = pod.metadata.uid.clone()?;
        let (sa_role, sa_unreadable) = self.service_account_role_for(pod);
        let workload = workload_of(pod, sa_role, self.host_network).map(|w| Workload {
            service_account_unreadable: sa_unreadable,
            ..w
        });
        match workload {
            Some(workload) => match hold_of(pod, self.boot_time) {
                None => Some(self.upsert(workload)),
                Some(_) => self.hold(workload),
            },
            None => self.remove(&uid),
        }
    }

    /// Applies a deleted pod. Only the entry with this pod's UID goes.
    pub fn delete_pod(&mut self, pod: &Pod) -> Option<Change> {
        self.remove(pod.metadata.uid.as_deref()?)
    }

    /// Stops trusting what is known of a pod that could not be decoded (added, changed or listed):
    /// it is held on the addresses it was known by and those it still names, so they answer
    /// [`Lookup::Pending`] until the pod can be read again or is deleted. A change only if it was
    /// served; `None` too when the object has no uid.
    pub fn distrust_pod(&mut self, pod: &Unreadable) -> Option<Change> {
        let uid = pod.uid.as_deref()?;
        let mut ips = pod.ips.clone();
        let was_served = self.forget_keeping_addresses(uid, &mut ips);
        self.link(uid, &ips);
        self.held.insert(uid.to_owned(), ips);
        was_served.map(|old| Change::Removed {
            uid: uid.to_owned(),
            key: old.key(),
        })
    }

    /// Applies the deletion of a pod that could not be decoded.
    pub fn delete_unreadable_pod(&mut self, pod: &Unreadable) -> Option<Change> {
        self.remove(pod.uid.as_deref()?)
    }

    /// Replaces every pod with a fresh list (after a relist), returning what changed: the pods that
    /// could be read, and those that could not (held, see [`Index::distrust_pod`]).
    pub fn replace_pods<'a>(
        &mut self,
        pods: impl IntoIterator<Item = &'a Pod>,
        unreadable: &[Unreadable],
    ) -> Vec<Change> {
        let mut seen = HashSet::new();
        let mut changes = Vec::new();
        for pod in unreadable {
            if let Some(uid) = &pod.uid {
                seen.insert(uid.clone());
            }
            changes.extend(self.distrust_pod(pod));
        }
        for pod in pods {
            if let Some(uid) = &pod.metadata.uid {
                seen.insert(uid.clone());
            }
            let before = pod.metadata.uid.as_ref().and_then(|u| self.pods.get(u)).cloned();
            let before = before.as_deref();
            if let Some(change) = self.apply_pod(pod) {
                let unchanged = matches!((before, &change), (Some(b), Change::Upserted(a)) if a == b);
                if !unchanged {
                    changes.push(change);
                }
            }
        }
        let gone: Vec<String> = self
            .pods
            .keys()
            .chain(self.held.keys())
            .filter(|u| !seen.contains(*u))
            .cloned()
            .collect();
        changes.extend(gone.iter().filter_map(|uid| self.remove(uid)));
        changes
    }
    /// Records a service account's role annotation; returns the workloads whose role source changed.
    pub fn apply_service_account(&mut self, sa: &ServiceAccount) -> Vec<Change> {
        let namespace = sa.namespace.as_deref().unwrap_or_default();
        let name = sa.name.as_deref().unwrap_or_default();
        self.set_service_account(namespace, name, Account::Annotated(sa.annotation.clone()))
    }

    /// Forgets a deleted service account.
    pub fn delete_service_account(&mut self, sa: &ServiceAccount) -> Vec<Change> {
        let namespace = sa.namespace.as_deref().unwrap_or_default();
        let name = sa.name.as_deref().unwrap_or_default();
        self.set_service_account(namespace, name, Account::Absent)
    }

    /// Records that a service account exists but could not be decoded (added, changed or listed), or,
    /// with `deleted`, that it is gone. `None` changes when it has no name.
    pub fn distrust_service_account(&mut self, sa: &Unreadable, deleted: bool) -> Vec<Change> {
        let Some(name) = sa.name.as_deref() else {
            return Vec::new();
        };
        let namespace = sa.namespace.as_deref().unwrap_or_default();
        let account = if deleted { Account::Absent } else { Account::Unreadable };
        self.set_service_account(namespace, name, account)
    }

    /// Replaces every service account with a fresh list: those that could be read and those that
    /// could not. One missing from the list is deleted or has no annotation (lists keep only the
    /// annotated ones): either way it names no role. The listed accounts' strings move into the map,
    /// so a large cluster's list costs what is kept and nothing beside it; only the pods' roles are
    /// compared.
    pub fn replace_service_accounts(
        &mut self,
        accounts: impl IntoIterator<Item = ServiceAccount>,
        unreadable: &[Unreadable],
    ) -> Vec<Change> {
        let mut annotated = HashMap::new();
        for sa in accounts {
            if let (Some(name), Some(role)) = (sa.name, sa.annotation) {
                annotated.insert((sa.namespace.unwrap_or_default(), name), role);
            }
        }
        let mut unreadable_accounts = HashSet::new();
        for sa in unreadable {
            if let Some(name) = sa.name.as_deref() {
                let key = sa_key(sa.namespace.as_deref().unwrap_or_default(), name);
                annotated.remove(&key);
                unreadable_accounts.insert(key);
            }
        }
        self.service_accounts = annotated;
        self.unreadable_accounts = unreadable_accounts;
        let (accounts, unreadable) = (&self.service_accounts, &self.unreadable_accounts);
        self.pods
            .values_mut()
            .filter_map(|w| {
                let key = sa_key(&w.namespace, &w.service_account);
                let role = accounts.get(&key).cloned();
                let unreadable = unreadable.contains(&key);
                (w.service_account_role != role || w.service_account_unreadable != unreadable).then(|| {
                    let w = Arc::make_mut(w);
                    w.service_account_role = role;
                    w.service_account_unreadable = unreadable;
                    Change::Upserted(w.clone())
                })
            })
            .collect()
    }

    fn set_service_account(&mut self, namespace: &str, name: &str, account: Account) -> Vec<Change> {
        let key = sa_key(namespace, name);
        let unreadable = account == Account::Unreadable;
        let role = match account {
            Account::Annotated(role) => {
                self.unreadable_accounts.remove(&key);
                match &role {
                    Some(role) => self.service_accounts.insert(key, role.clone()),
                    None => self.service_accounts.remove(&key),
                };
                role
            }
            Account::Unreadable => {
                self.service_accounts.remove(&key);
                self.unreadable_accounts.insert(key);
                None
            }
            Account::Absent => {
                self.service_accounts.remove(&key);
                self.unreadable_accounts.remove(&key);
                None
            }
        };
        self.pods
            .values_mut()
            .filter(|w| w.namespace == namespace && w.service_account == name)
            .filter(|w| w.service_account_role != role || w.service_account_unreadable != unreadable)
            .map(|w| {
                let w = Arc::make_mut(w);
                w.service_account_role = role.clone();
                w.service_account_unreadable = unreadable;
                Change::Upserted(w.clone())
            })
            .collect()
    }

    /// The role annotation of the pod's service account, and whether that account is unreadable.
    fn service_account_role_for(&self, pod: &Pod) -> (Option<String>, bool) {
        let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
        let name = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.as_deref())
            .filter(|s| !s.is_empty())
            .unwrap_or("default");
        let key = sa_key(namespace, name);
        (
            self.service_accounts.get(&key).cloned(),
            self.unreadable_accounts.contains(&key),
        )
    }

    fn upsert(&mut self, workload: Workload) -> Change {
        self.forget(&workload.uid);
        self.link(&workload.uid, &workload.ips);
        self.pods.insert(workload.uid.clone(), Arc::new(workload.clone()));
        Change::Upserted(workload)
    }

    /// Keeps the pod's addresses claimed but stops serving it; a change only if it was served.
    fn hold(&mut self, workload: Workload) -> Option<Change> {
        let was_served = self.forget(&workload.uid);
        self.link(&workload.uid, &workload.ips);
        self.held.insert(workload.uid.clone(), workload.ips.clone());
        was_served.map(|old| Change::Removed {
            uid: workload.uid.clone(),
            key: old.key(),
        })
    }

    /// Forgets a pod entirely; a change only if it was served.
    fn remove(&mut self, uid: &str) -> Option<Change> {
        let old = self.forget(uid)?;
        Some(Change::Removed {
            uid: uid.to_owned(),
            key: old.key(),
        })
    }

    /// Like [`Index::forget`], adding the addresses it was known by to `ips`.
    fn forget_keeping_addresses(&mut self, uid: &str, ips: &mut Vec<IpAddr>) -> Option<Arc<Workload>> {
        let held = self.held.get(uid).cloned().unwrap_or_default();
        let served = self.pods.get(uid).map(|w| w.ips.clone()).unwrap_or_default();
        for ip in held.into_iter().chain(served) {
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
        self.forget(uid)
    }

    /// Drops `uid` from every map, returning its served workload if it had one.
    fn forget(&mut self, uid: &str) -> Option<Arc<Workload>> {
        if let Some(ips) = self.held.remove(uid) {
            self.unlink(uid, &ips);
        }
        let old = self.pods.remove(uid)?;
        self.unlink(uid, &old.ips);
        Some(old)
    }

    fn link(&mut self, uid: &str, ips: &[IpAddr]) {
        for ip in ips {
            let uids = self.by_ip.entry(*ip).or_default();
            if !uids.iter().any(|u| u == uid) {
                uids.push(uid.to_owned());
            }
        }
    }

    fn unlink(&mut self, uid: &str, ips: &[IpAddr]) {
        for ip in ips {
            if let Some(uids) = self.by_ip.get_mut(ip) {
                uids.retain(|u| u != uid);
                if uids.is_empty() {
                    self.by_ip.remove(ip);
                }
            }
        }
    }
}

/// What the index knows of a service account.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Account {
    /// Read, with its role annotation if any.
    Annotated(Option<String>),
    /// It exists, but could not be decoded.
    Unreadable,
    /// Deleted, or never seen.
    Absent,
}

#[cfg(test)]
pub(crate) mod tests;
