//! Unit tests of the index: sequences of pod and service-account events, and (in `model`) a property
//! test against a model that recomputes every answer from scratch.

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
fn with_container_credentials_host_network_pods_are_found_by_uid_and_never_by_ip() {
    let mut index = Index::new().with_host_network(true);
    let mut p = pod("h", "uid-h", &["192.168.1.10"], Some("r"));
    p.spec.as_mut().unwrap().host_network = Some(true);
    let Some(Change::Upserted(w)) = index.apply_pod(&p) else {
        panic!("a hostNetwork pod is indexed when the endpoint is on");
    };
    assert!(w.host_network);
    assert!(w.ips.is_empty(), "the node's address is not the pod's: {:?}", w.ips);
    assert_eq!(index.lookup(ip("192.168.1.10")), Lookup::Unknown);
    assert_eq!(index.sizes(), (1, 0, 0), "no address is indexed");
    assert!(matches!(index.by_uid("uid-h"), ByUid::Served(w) if w.name == "h"));
    assert_eq!(index.by_uid("uid-other"), ByUid::Unknown);
    // An ordinary pod sharing nothing with it is still found by IP.
    index.apply_pod(&pod("a", "uid-a", &["10.0.0.1"], None));
    assert_eq!(found_uid(&index, "10.0.0.1").as_deref(), Some("uid-a"));
}

#[test]
fn by_uid_tells_served_held_and_unknown_pods_apart() {
    let mut index = Index::with_boot_time(Some(BOOT));
    index.apply_pod(&with_container(
        pod("a", "uid-a", &["10.0.0.1"], None),
        true,
        BOOT + 5,
        0,
    ));
    index.apply_pod(&with_container(
        pod("b", "uid-b", &["10.0.0.2"], None),
        true,
        BOOT - 5,
        0,
    ));
    assert!(matches!(index.by_uid("uid-a"), ByUid::Served(_)));
    assert_eq!(index.by_uid("uid-b"), ByUid::Held, "started before the boot: held");
    index.delete_pod(&pod("a", "uid-a", &["10.0.0.1"], None));
    assert_eq!(index.by_uid("uid-a"), ByUid::Unknown, "deleted");
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
    let changes = index.replace_pods([&a], &[]);
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
    let sa = ServiceAccount::new(Some("ns"), "sa", Some("arn:aws:iam::111111111111:role/x"));
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
    index.replace_pods([&a, &b], &[]);
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

mod model;

fn unreadable(name: &str, uid: &str, ips: &[&str]) -> Unreadable {
    Unreadable {
        uid: Some(uid.into()),
        namespace: Some("ns".into()),
        name: Some(name.into()),
        ips: ips.iter().map(|s| ip(s)).collect(),
        ..Unreadable::default()
    }
}

#[test]
fn a_pod_that_cannot_be_read_any_more_is_held_on_every_address_it_was_known_by() {
    let mut index = Index::new();
    index.apply_pod(&pod("a", "uid-a", &["10.0.0.1"], Some("r")));
    // Its addresses are among what could not be read.
    let change = index.distrust_pod(&unreadable("a", "uid-a", &[]));
    assert!(matches!(change, Some(Change::Removed { ref uid, .. }) if uid == "uid-a"));
    assert_eq!(index.lookup(ip("10.0.0.1")), Lookup::Pending);
    assert_eq!(index.sizes(), (0, 1, 1));
    // Changed again, still unreadable, now naming another address too: both are held.
    assert_eq!(index.distrust_pod(&unreadable("a", "uid-a", &["10.0.0.2"])), None);
    assert_eq!(index.lookup(ip("10.0.0.1")), Lookup::Pending);
    assert_eq!(index.lookup(ip("10.0.0.2")), Lookup::Pending);
    // Readable again, it is what it says.
    index.apply_pod(&pod("a", "uid-a", &["10.0.0.2"], Some("r")));
    assert_eq!(found_uid(&index, "10.0.0.2").as_deref(), Some("uid-a"));
    assert_eq!(index.lookup(ip("10.0.0.1")), Lookup::Unknown);
    // An unreadable deletion removes it.
    index.delete_unreadable_pod(&unreadable("a", "uid-a", &[]));
    assert_eq!(index.sizes(), (0, 0, 0));
}

#[test]
fn a_relist_holds_the_pods_it_cannot_read_and_drops_the_ones_it_no_longer_lists() {
    let mut index = Index::new();
    index.apply_pod(&pod("a", "uid-a", &["10.0.0.1"], None));
    index.apply_pod(&pod("b", "uid-b", &["10.0.0.2"], None));
    let changes = index.replace_pods([], &[unreadable("a", "uid-a", &[])]);
    assert_eq!(changes.len(), 2, "{changes:?}");
    assert_eq!(index.lookup(ip("10.0.0.1")), Lookup::Pending);
    assert_eq!(index.lookup(ip("10.0.0.2")), Lookup::Unknown);
    // A live pod that claims a held address gets it (the CNI gave it away).
    index.apply_pod(&pod("c", "uid-c", &["10.0.0.1"], None));
    assert_eq!(found_uid(&index, "10.0.0.1").as_deref(), Some("uid-c"));
}

#[test]
fn an_unreadable_service_account_marks_its_pods_until_it_is_read_or_deleted() {
    let mut index = Index::new();
    index.apply_pod(&pod("a", "uid-a", &["10.0.0.1"], None));
    let marked = |index: &Index| match index.lookup(ip("10.0.0.1")) {
        Lookup::Found(w) => (w.service_account_unreadable, w.service_account_role.clone()),
        other => panic!("{other:?}"),
    };
    let account = |role: Option<&str>| ServiceAccount::new(Some("ns"), "sa", role);
    index.apply_service_account(&account(Some("arn:aws:iam::111111111111:role/x")));
    let changes = index.distrust_service_account(&unreadable("sa", "uid-sa", &[]), false);
    assert_eq!(changes.len(), 1);
    assert_eq!(marked(&index), (true, None));
    // A pod created meanwhile under it is marked too.
    index.apply_pod(&pod("b", "uid-b", &["10.0.0.2"], None));
    assert!(matches!(index.lookup(ip("10.0.0.2")), Lookup::Found(w) if w.service_account_unreadable));
    index.apply_service_account(&account(None));
    assert_eq!(marked(&index), (false, None));
    index.replace_service_accounts([], &[unreadable("sa", "uid-sa", &[])]);
    assert_eq!(marked(&index), (true, None));
    index.distrust_service_account(&unreadable("sa", "uid-sa", &[]), true);
    assert_eq!(
        marked(&index),
        (false, None),
        "deleted: the pod has no account role at all"
    );
    index.replace_service_accounts([account(Some("arn:aws:iam::111111111111:role/y"))], &[]);
    assert_eq!(marked(&index), (false, Some("arn:aws:iam::111111111111:role/y".into())));
}

#[test]
fn a_pods_running_time_is_its_earliest_running_containers_start() {
    let w = workload_of(&pod("p", "uid-p", &["10.0.0.1"], None), None, false).unwrap();
    assert_eq!(w.running_since, None, "no container status yet");
    let mut p = with_container(pod("p", "uid-p", &["10.0.0.1"], None), true, BOOT + 90, 0);
    let second = with_container(pod("p", "uid-p", &["10.0.0.1"], None), true, BOOT + 30, 0);
    let terminated = with_container(pod("p", "uid-p", &["10.0.0.1"], None), false, BOOT + 10, 0);
    let statuses = p.status.as_mut().unwrap().container_statuses.as_mut().unwrap();
    statuses.extend(second.status.unwrap().container_statuses.unwrap());
    // A terminated container's start is not a Running time.
    statuses.extend(terminated.status.unwrap().container_statuses.unwrap());
    let w = workload_of(&p, None, false).unwrap();
    assert_eq!(
        w.running_since,
        Some(time::OffsetDateTime::from_unix_timestamp(BOOT + 30).unwrap())
    );
}

#[test]
fn only_service_accounts_that_name_a_role_are_kept() {
    let mut index = Index::new();
    let role = "arn:aws:iam::111111111111:role/x";
    index.replace_service_accounts(
        [
            ServiceAccount::new(Some("ns"), "plain", None),
            ServiceAccount::new(Some("ns"), "sa", Some(role)),
        ],
        &[],
    );
    assert_eq!(index.service_accounts.len(), 1);
    index.apply_service_account(&ServiceAccount::new(Some("ns"), "sa", None));
    assert!(
        index.service_accounts.is_empty(),
        "an annotation removed frees its entry"
    );
}
