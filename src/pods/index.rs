//! The pure map from a caller's IP address to the pod that owns it on this node, fed by watch events.
//!
//! Invariants:
//! - entries are keyed by pod UID, and an IP points at UIDs, so a late delete of an old pod can never
//!   remove a newer pod that reuses its IP;
//! - `hostNetwork` pods are never indexed (their IP is the node's and identifies nothing), nor are pods
//!   that finished (`Succeeded`/`Failed`) or that have no UID;
//! - a pod whose containers have all terminated for good (deleting, or a restart policy that will not
//!   start them again), or whose every container started before the node last booted (its status was
//!   not republished since a reboot, and the CNI may have handed its IP to another pod), is *held*: its
//!   IP answers [`Lookup::Pending`], never the pod, until its status says it runs again or it is gone;
//! - when two live pods claim one IP, that IP resolves to nobody until it is unambiguous again;
//! - a terminating pod whose containers still run keeps its IP (graceful shutdown needs credentials)
//!   until a live pod claims it.
//!
//! No I/O and no clock: `watch` feeds it, tests drive it directly; the node's boot time is given.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{ContainerStatus, Pod, ServiceAccount};

use crate::roles::{POD_ANNOTATION, SERVICE_ACCOUNT_ANNOTATION};
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
    /// (namespace, name) → value of the IRSA annotation.
    service_accounts: HashMap<(String, String), Option<String>>,
    /// The node's boot time in Unix seconds, when known.
    boot_time: Option<i64>,
}

/// Converts a pod to a workload, or `None` when the pod must not be indexed.
pub fn workload_of(pod: &Pod, service_account_role: Option<String>) -> Option<Workload> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref()?;
    if spec.host_network == Some(true) {
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
    // Older API servers only fill `podIP`.
    if ips.is_empty() {
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
        ips,
        running: phase == Some("Running"),
        terminating: meta.deletion_timestamp.is_some(),
    })
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

    /// Every served workload.
    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.pods.values()
    }

    /// Applies an added or modified pod.
    pub fn apply_pod(&mut self, pod: &Pod) -> Option<Change> {
        let uid = pod.metadata.uid.clone()?;
        let sa_role = self.service_account_role_for(pod);
        match workload_of(pod, sa_role) {
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

    /// Replaces every pod with a fresh list (after a relist), returning what changed.
    pub fn replace_pods<'a>(&mut self, pods: impl IntoIterator<Item = &'a Pod>) -> Vec<Change> {
        let mut seen = HashSet::new();
        let mut changes = Vec::new();
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
        let namespace = sa.metadata.namespace.as_deref().unwrap_or_default();
        let name = sa.metadata.name.as_deref().unwrap_or_default();
        let role = annotation(&sa.metadata.annotations, SERVICE_ACCOUNT_ANNOTATION);
        self.set_service_account_role(namespace, name, role, true)
    }

    /// Forgets a deleted service account.
    pub fn delete_service_account(&mut self, sa: &ServiceAccount) -> Vec<Change> {
        let namespace = sa.metadata.namespace.as_deref().unwrap_or_default();
        let name = sa.metadata.name.as_deref().unwrap_or_default();
        self.set_service_account_role(namespace, name, None, false)
    }

    /// Replaces every service account with a fresh list.
    pub fn replace_service_accounts<'a>(
        &mut self,
        accounts: impl IntoIterator<Item = &'a ServiceAccount>,
    ) -> Vec<Change> {
        let mut fresh: HashMap<(String, String), Option<String>> = HashMap::new();
        for sa in accounts {
            let namespace = sa.metadata.namespace.as_deref().unwrap_or_default();
            let name = sa.metadata.name.as_deref().unwrap_or_default();
            let role = annotation(&sa.metadata.annotations, SERVICE_ACCOUNT_ANNOTATION);
            fresh.insert(sa_key(namespace, name), role);
        }
        let stale: Vec<(String, String)> = self
            .service_accounts
            .keys()
            .filter(|k| !fresh.contains_key(*k))
            .cloned()
            .collect();
        let mut changes = Vec::new();
        for (ns, name) in stale {
            changes.extend(self.set_service_account_role(&ns, &name, None, false));
        }
        for ((ns, name), role) in fresh {
            changes.extend(self.set_service_account_role(&ns, &name, role, true));
        }
        changes
    }

    fn set_service_account_role(
        &mut self,
        namespace: &str,
        name: &str,
        role: Option<String>,
        exists: bool,
    ) -> Vec<Change> {
        if exists {
            self.service_accounts.insert(sa_key(namespace, name), role.clone());
        } else {
            self.service_accounts.remove(&sa_key(namespace, name));
        }
        self.pods
            .values_mut()
            .filter(|w| w.namespace == namespace && w.service_account == name && w.service_account_role != role)
            .map(|w| {
                Arc::make_mut(w).service_account_role = role.clone();
                Change::Upserted((**w).clone())
            })
            .collect()
    }

    fn service_account_role_for(&self, pod: &Pod) -> Option<String> {
        let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
        let name = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.as_deref())
            .filter(|s| !s.is_empty())
            .unwrap_or("default");
        self.service_accounts.get(&sa_key(namespace, name)).cloned().flatten()
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodIP, PodSpec, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    /// A pod fixture: running, with the given IPs and annotations.
    pub(crate) fn pod(name: &str, uid: &str, ips: &[&str], role: Option<&str>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                uid: Some(uid.into()),
                annotations: role.map(|r| BTreeMap::from([(POD_ANNOTATION.to_owned(), r.to_owned())])),
                ..Default::default()
            },
            spec: Some(PodSpec {
                service_account_name: Some("sa".into()),
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                pod_ip: ips.first().map(|s| s.to_string()),
                pod_ips: Some(ips.iter().map(|ip| PodIP { ip: ip.to_string() }).collect()),
                ..Default::default()
            }),
        }
    }

    fn terminating(mut p: Pod) -> Pod {
        p.metadata.deletion_timestamp = Some(Time(Default::default()));
        p
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn found_uid(index: &Index, addr: &str) -> Option<String> {
        match index.lookup(ip(addr)) {
            Lookup::Found(w) => Some(w.uid.clone()),
            _ => None,
        }
    }

    #[test]
    fn every_pod_ip_resolves_to_its_pod() {
        let mut index = Index::new();
        index.apply_pod(&pod("a", "uid-a", &["10.0.0.1", "fd00::1"], Some("r")));
        assert_eq!(found_uid(&index, "10.0.0.1").as_deref(), Some("uid-a"));
        assert_eq!(found_uid(&index, "fd00::1").as_deref(), Some("uid-a"));
        assert_eq!(index.lookup(ip("10.0.0.2")), Lookup::Unknown);
    }

    #[test]
    fn host_network_pods_are_never_indexed() {
        let mut index = Index::new();
        let mut p = pod("h", "uid-h", &["192.168.1.10"], Some("r"));
        p.spec.as_mut().unwrap().host_network = Some(true);
        assert_eq!(index.apply_pod(&p), None);
        assert_eq!(index.lookup(ip("192.168.1.10")), Lookup::Unknown);
    }

    #[test]
    fn a_pod_switching_to_host_network_is_removed() {
        let mut index = Index::new();
        let mut p = pod("h", "uid-h", &["10.0.0.9"], None);
        index.apply_pod(&p);
        p.spec.as_mut().unwrap().host_network = Some(true);
        assert!(matches!(index.apply_pod(&p), Some(Change::Removed { .. })));
        assert!(index.is_empty());
    }

    #[test]
    fn finished_pods_are_dropped() {
        let mut index = Index::new();
        let mut p = pod("a", "uid-a", &["10.0.0.1"], None);
        index.apply_pod(&p);
        p.status.as_mut().unwrap().phase = Some("Succeeded".into());
        assert!(matches!(index.apply_pod(&p), Some(Change::Removed { .. })));
        assert_eq!(index.lookup(ip("10.0.0.1")), Lookup::Unknown);
    }

    #[test]
    fn a_late_delete_of_an_old_pod_keeps_the_new_pod_on_its_ip() {
        let mut index = Index::new();
        let old = pod("old", "uid-old", &["10.0.0.1"], Some("old-role"));
        index.apply_pod(&old);
        // The old pod terminates, the new pod gets the same IP, then the old pod's delete arrives late.
        index.apply_pod(&terminating(old.clone()));
        index.apply_pod(&pod("new", "uid-new", &["10.0.0.1"], Some("new-role")));
        assert_eq!(found_uid(&index, "10.0.0.1").as_deref(), Some("uid-new"));
        index.delete_pod(&old);
        assert_eq!(found_uid(&index, "10.0.0.1").as_deref(), Some("uid-new"));
    }

    #[test]
    fn a_terminating_pod_keeps_its_ip_until_another_pod_claims_it() {
        let mut index = Index::new();
        index.apply_pod(&terminating(pod("old", "uid-old", &["10.0.0.1"], None)));
        assert_eq!(found_uid(&index, "10.0.0.1").as_deref(), Some("uid-old"));
        index.apply_pod(&pod("new", "uid-new", &["10.0.0.1"], None));
        assert_eq!(found_uid(&index, "10.0.0.1").as_deref(), Some("uid-new"));
    }

    #[test]
    fn two_live_pods_on_one_ip_are_refused_until_unambiguous() {
        let mut index = Index::new();
        index.apply_pod(&pod("a", "uid-a", &["10.0.0.1"], None));
        let b = pod("b", "uid-b", &["10.0.0.1"], None);
        index.apply_pod(&b);
        assert!(matches!(index.lookup(ip("10.0.0.1")), Lookup::Ambiguous(keys) if keys.len() == 2));
        index.delete_pod(&b);
        assert_eq!(found_uid(&index, "10.0.0.1").as_deref(), Some("uid-a"));
    }

    #[test]
    fn an_ip_change_moves_the_pod() {
        let mut index = Index::new();
        index.apply_pod(&pod("a", "uid-a", &["10.0.0.1"], None));
        index.apply_pod(&pod("a", "uid-a", &["10.0.0.2"], None));
        assert_eq!(index.lookup(ip("10.0.0.1")), Lookup::Unknown);
        assert_eq!(found_uid(&index, "10.0.0.2").as_deref(), Some("uid-a"));
    }

    #[test]
    fn a_relist_removes_pods_that_vanished_while_disconnected() {
        let mut index = Index::new();
        let a = pod("a", "uid-a", &["10.0.0.1"], None);
        index.apply_pod(&a);
        index.apply_pod(&pod("b", "uid-b", &["10.0.0.2"], None));
        let changes = index.replace_pods([&a]);
        assert_eq!(
            changes,
            vec![Change::Removed {
                uid: "uid-b".into(),
                key: "ns/b".into()
            }]
        );
        assert_eq!(index.lookup(ip("10.0.0.2")), Lookup::Unknown);
    }

    #[test]
    fn a_service_account_annotation_reaches_its_pods_and_only_them() {
        let mut index = Index::new();
        index.apply_pod(&pod("a", "uid-a", &["10.0.0.1"], None));
        let mut other = pod("o", "uid-o", &["10.0.0.2"], None);
        other.spec.as_mut().unwrap().service_account_name = Some("other".into());
        index.apply_pod(&other);
        let sa = ServiceAccount {
            metadata: ObjectMeta {
                name: Some("sa".into()),
                namespace: Some("ns".into()),
                annotations: Some(BTreeMap::from([(
                    SERVICE_ACCOUNT_ANNOTATION.to_owned(),
                    "arn:aws:iam::111111111111:role/x".to_owned(),
                )])),
                ..Default::default()
            },
            ..Default::default()
        };
        let changes = index.apply_service_account(&sa);
        assert_eq!(changes.len(), 1);
        let Lookup::Found(w) = index.lookup(ip("10.0.0.1")) else {
            panic!()
        };
        assert_eq!(
            w.service_account_role.as_deref(),
            Some("arn:aws:iam::111111111111:role/x")
        );
        let Lookup::Found(w) = index.lookup(ip("10.0.0.2")) else {
            panic!()
        };
        assert_eq!(w.service_account_role, None);
        // A pod created later under the same service account sees the annotation too.
        index.apply_pod(&pod("late", "uid-late", &["10.0.0.3"], None));
        let Lookup::Found(w) = index.lookup(ip("10.0.0.3")) else {
            panic!()
        };
        assert!(w.service_account_role.is_some());
        // Deleting the service account removes the role from its pods.
        assert_eq!(index.delete_service_account(&sa).len(), 2);
        let Lookup::Found(w) = index.lookup(ip("10.0.0.1")) else {
            panic!()
        };
        assert_eq!(w.service_account_role, None);
    }

    /// Gives the pod one container in `state` (started at Unix second `started`).
    fn with_container(mut p: Pod, running: bool, started: i64, exit_code: i32) -> Pod {
        use k8s_openapi::api::core::v1::{
            ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStatus,
        };
        let at = Some(Time(k8s_openapi::jiff::Timestamp::from_second(started).unwrap()));
        let state = if running {
            ContainerState {
                running: Some(ContainerStateRunning { started_at: at }),
                ..Default::default()
            }
        } else {
            ContainerState {
                terminated: Some(ContainerStateTerminated {
                    started_at: at,
                    exit_code,
                    ..Default::default()
                }),
                ..Default::default()
            }
        };
        p.status.as_mut().unwrap().container_statuses = Some(vec![ContainerStatus {
            name: "main".into(),
            state: Some(state),
            ..Default::default()
        }]);
        p
    }

    const BOOT: i64 = 1_700_000_000;

    #[test]
    fn a_terminating_pod_whose_containers_run_keeps_its_credentials() {
        let mut index = Index::with_boot_time(Some(BOOT));
        let old = with_container(
            terminating(pod("old", "uid-old", &["10.0.0.1"], None)),
            true,
            BOOT + 60,
            0,
        );
        index.apply_pod(&old);
        assert_eq!(found_uid(&index, "10.0.0.1").as_deref(), Some("uid-old"));
    }

    #[test]
    fn a_pod_whose_containers_all_terminated_is_never_served_even_before_its_ip_is_claimed() {
        let mut index = Index::with_boot_time(Some(BOOT));
        let running = with_container(pod("old", "uid-old", &["10.0.0.1"], Some("r")), true, BOOT + 60, 0);
        index.apply_pod(&running);
        let done = with_container(terminating(running.clone()), false, BOOT + 60, 0);
        assert!(matches!(index.apply_pod(&done), Some(Change::Removed { .. })));
        assert_eq!(index.lookup(ip("10.0.0.1")), Lookup::Pending);
        assert_eq!(index.get("uid-old"), None);
        // The new owner of the IP is served as soon as it is published; the old pod's delete is a no-op.
        index.apply_pod(&pod("new", "uid-new", &["10.0.0.1"], Some("n")));
        assert_eq!(found_uid(&index, "10.0.0.1").as_deref(), Some("uid-new"));
        assert_eq!(index.delete_pod(&done), None);
        assert_eq!(found_uid(&index, "10.0.0.1").as_deref(), Some("uid-new"));
        assert_eq!(index.sizes(), (1, 0, 1));
    }

    #[test]
    fn containers_that_the_kubelet_restarts_do_not_hold_the_pod() {
        let mut index = Index::with_boot_time(Some(BOOT));
        // restartPolicy Always (the default) and not deleting: the kubelet starts them again.
        let crashed = with_container(pod("a", "uid-a", &["10.0.0.1"], None), false, BOOT + 60, 1);
        index.apply_pod(&crashed);
        assert_eq!(found_uid(&index, "10.0.0.1").as_deref(), Some("uid-a"));
        // OnFailure with a failed container: restarted too; with success: done for good.
        let mut on_failure = crashed.clone();
        on_failure.spec.as_mut().unwrap().restart_policy = Some("OnFailure".into());
        index.apply_pod(&on_failure);
        assert_eq!(found_uid(&index, "10.0.0.1").as_deref(), Some("uid-a"));
        let succeeded = with_container(on_failure, false, BOOT + 60, 0);
        index.apply_pod(&succeeded);
        assert_eq!(index.lookup(ip("10.0.0.1")), Lookup::Pending);
        let mut never = with_container(pod("b", "uid-b", &["10.0.0.2"], None), false, BOOT + 60, 1);
        never.spec.as_mut().unwrap().restart_policy = Some("Never".into());
        index.apply_pod(&never);
        assert_eq!(index.lookup(ip("10.0.0.2")), Lookup::Pending);
    }

    #[test]
    fn after_a_reboot_pods_are_held_until_their_status_is_republished() {
        let mut index = Index::with_boot_time(Some(BOOT));
        // Before the reboot A had .1 and B had .2; the API still says so, but both started before boot.
        let a = with_container(pod("a", "uid-a", &["10.0.0.1"], Some("ra")), true, BOOT - 600, 0);
        let b = with_container(pod("b", "uid-b", &["10.0.0.2"], Some("rb")), true, BOOT - 600, 0);
        index.replace_pods([&a, &b]);
        assert_eq!(index.lookup(ip("10.0.0.1")), Lookup::Pending);
        assert_eq!(index.lookup(ip("10.0.0.2")), Lookup::Pending);
        // The kubelet republishes B with A's old address: B is served there, A's stale claim is not.
        let b2 = with_container(pod("b", "uid-b", &["10.0.0.1"], Some("rb")), true, BOOT + 30, 0);
        assert!(matches!(index.apply_pod(&b2), Some(Change::Upserted(w)) if w.uid == "uid-b"));
        assert_eq!(found_uid(&index, "10.0.0.1").as_deref(), Some("uid-b"));
        assert_eq!(index.lookup(ip("10.0.0.2")), Lookup::Unknown);
        // Without a known boot time nothing is held.
        let mut unknown = Index::new();
        unknown.apply_pod(&a);
        assert_eq!(found_uid(&unknown, "10.0.0.1").as_deref(), Some("uid-a"));
    }

    #[test]
    fn a_pod_without_container_statuses_is_not_held() {
        let mut index = Index::with_boot_time(Some(BOOT));
        index.apply_pod(&pod("a", "uid-a", &["10.0.0.1"], None));
        assert_eq!(found_uid(&index, "10.0.0.1").as_deref(), Some("uid-a"));
    }

    mod model {
        //! A property test of the index against a model that recomputes every answer from scratch.
        use super::*;
        use proptest::prelude::*;

        const IPS: [&str; 3] = ["10.0.0.1", "10.0.0.2", "10.0.0.3"];

        #[derive(Debug, Clone)]
        struct Spec {
            uid: usize,
            ips: Vec<usize>,
            phase: &'static str,
            terminating: bool,
            host_network: bool,
            /// None: no container status; Some((running, started before boot)).
            container: Option<(bool, bool)>,
        }

        #[derive(Debug, Clone)]
        enum Step {
            Apply(Spec),
            Delete(usize),
            Relist(Vec<Spec>),
        }

        fn spec() -> impl Strategy<Value = Spec> {
            (
                0..5usize,
                proptest::collection::vec(0..IPS.len(), 0..3),
                proptest::sample::select(vec!["Pending", "Running", "Running", "Succeeded", "Failed"]),
                any::<bool>(),
                proptest::bool::weighted(0.1),
                proptest::option::of((any::<bool>(), proptest::bool::weighted(0.3))),
            )
                .prop_map(|(uid, ips, phase, terminating, host_network, container)| Spec {
                    uid,
                    ips,
                    phase,
                    terminating,
                    host_network,
                    container,
                })
        }

        fn step() -> impl Strategy<Value = Step> {
            prop_oneof![
                6 => spec().prop_map(Step::Apply),
                2 => (0..5usize).prop_map(Step::Delete),
                1 => proptest::collection::vec(spec(), 0..4).prop_map(Step::Relist),
            ]
        }

        fn build(s: &Spec) -> Pod {
            let ips: Vec<&str> = s.ips.iter().map(|i| IPS[*i]).collect();
            let mut p = pod(&format!("p{}", s.uid), &format!("uid-{}", s.uid), &ips, None);
            p.status.as_mut().unwrap().phase = Some(s.phase.into());
            p.spec.as_mut().unwrap().host_network = Some(s.host_network);
            if s.terminating {
                p = terminating(p);
            }
            if let Some((running, before_boot)) = s.container {
                let started = if before_boot { BOOT - 100 } else { BOOT + 100 };
                // Restart policy Never, so a terminated container is final.
                p.spec.as_mut().unwrap().restart_policy = Some("Never".into());
                p = with_container(p, running, started, 0);
            }
            p
        }

        /// What the model says an address resolves to: `Some(uid)` for exactly one owner, `None` for
        /// anything else (nobody, ambiguous, held).
        fn expected(pods: &HashMap<usize, Spec>, ip: usize) -> Option<String> {
            let claim = |s: &&Spec| {
                s.ips.contains(&ip)
                    && !s.host_network
                    && !matches!(s.phase, "Succeeded" | "Failed")
                    && s.container.is_none_or(|(running, before_boot)| running && !before_boot)
            };
            let claimants: Vec<&Spec> = pods.values().filter(claim).collect();
            let live: Vec<&&Spec> = claimants.iter().filter(|s| !s.terminating).collect();
            let owners: Vec<usize> = if live.is_empty() {
                claimants.iter().map(|s| s.uid).collect()
            } else {
                live.iter().map(|s| s.uid).collect()
            };
            match owners.as_slice() {
                [one] => Some(format!("uid-{one}")),
                _ => None,
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(10_000))]

            /// Whatever the order of events, the index answers exactly one pod for an address only when
            /// the model does, and the same pod; it never answers a pod that is gone, held or contested.
            #[test]
            fn the_index_agrees_with_the_model_after_every_event(steps in proptest::collection::vec(step(), 1..24)) {
                let mut index = Index::with_boot_time(Some(BOOT));
                let mut model: HashMap<usize, Spec> = HashMap::new();
                for step in steps {
                    match step {
                        Step::Apply(s) => {
                            index.apply_pod(&build(&s));
                            model.insert(s.uid, s);
                        }
                        Step::Delete(uid) => {
                            let gone = model.remove(&uid).map_or_else(
                                || pod("x", &format!("uid-{uid}"), &[], None),
                                |s| build(&s),
                            );
                            index.delete_pod(&gone);
                        }
                        Step::Relist(specs) => {
                            model.clear();
                            for s in &specs {
                                model.insert(s.uid, s.clone());
                            }
                            // A list holds each object once: the last spec of a UID wins in both.
                            let pods: Vec<Pod> = model.values().map(build).collect();
                            index.replace_pods(&pods);
                        }
                    }
                    for (i, addr) in IPS.iter().enumerate() {
                        let got = match index.lookup(ip(addr)) {
                            Lookup::Found(w) => Some(w.uid.clone()),
                            _ => None,
                        };
                        prop_assert_eq!(got, expected(&model, i), "address {}", addr);
                    }
                }
                // Nothing outlives its pod: after deleting everything, every map is empty.
                for uid in 0..5 {
                    index.delete_pod(&pod("x", &format!("uid-{uid}"), &[], None));
                }
                prop_assert_eq!(index.sizes(), (0, 0, 0));
            }
        }
    }
}
