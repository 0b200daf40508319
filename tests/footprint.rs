//! What the agent asks of the API server, and that asking for less changes no answer: service
//! accounts and namespaces are listed and watched as metadata only (pods whole), lists come from the
//! API server's watch cache and a relist never asks for a version older than one already seen, and
//! role resolution and the namespace IMDSv2 policy still follow every annotation change without a
//! restart.

use http::StatusCode;

use crate::support::Cluster;
use crate::support::agent::eventually;
use crate::support::fixtures::{pod, role, service_account};
use crate::support::kube::{Kind, Outage, RequestRecord};

const CREDS: &str = "/latest/meta-data/iam/security-credentials/";
const LIST_METADATA: &str = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1";
const WATCH_METADATA: &str = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1";

/// The list and watch requests of `kind`'s collection, oldest first.
fn collection_requests(cluster: &Cluster, kind: Kind) -> (Vec<RequestRecord>, Vec<RequestRecord>) {
    cluster
        .kube
        .requests_seen()
        .into_iter()
        .filter(|r| r.is_collection(kind))
        .partition(|r| !r.is_watch())
}

fn param<'a>(request: &'a RequestRecord, name: &str) -> Option<&'a str> {
    request.query.get(name).map(String::as_str)
}

#[tokio::test]
async fn service_accounts_and_namespaces_are_asked_for_as_metadata_only_and_pods_whole() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("app"));
    cluster.add_pod(&pod("p", "127.0.3.1").role("app"));
    let agent = cluster.agent(&[]).await;
    assert_eq!(agent.from("127.0.3.1").get(CREDS, &[]).await.text(), "app");

    for kind in [Kind::ServiceAccount, Kind::Namespace] {
        let (lists, watches) = collection_requests(&cluster, kind);
        assert!(!lists.is_empty() && !watches.is_empty(), "{kind:?}");
        for list in &lists {
            assert_eq!(list.accept.as_deref(), Some(LIST_METADATA), "{kind:?} list");
        }
        for watch in &watches {
            assert_eq!(watch.accept.as_deref(), Some(WATCH_METADATA), "{kind:?} watch");
        }
    }
    let (lists, watches) = collection_requests(&cluster, Kind::Pod);
    for request in lists.iter().chain(&watches) {
        let accept = request.accept.as_deref().unwrap_or_default();
        assert!(!accept.contains("as="), "pods are asked for whole: {accept}");
    }
}

#[tokio::test]
async fn first_lists_come_from_the_watch_cache_without_a_limit_the_cache_would_ignore() {
    let cluster = Cluster::start().await;
    let _agent = cluster.agent(&[]).await;
    for kind in [Kind::Pod, Kind::ServiceAccount, Kind::Namespace] {
        let (lists, _) = collection_requests(&cluster, kind);
        let first = lists.first().unwrap_or_else(|| panic!("{kind:?} was listed"));
        assert_eq!(param(first, "resourceVersion"), Some("0"), "{kind:?}");
        assert_eq!(param(first, "limit"), None, "{kind:?}");
        assert_eq!(param(first, "resourceVersionMatch"), None, "{kind:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_relist_after_410_never_asks_for_a_version_older_than_the_one_it_has_seen() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("app"));
    cluster.add_pod(&pod("p", "127.0.3.2").role("app"));
    let agent = cluster.agent(&[]).await;
    // Something happens after the first lists, so the version seen moves past theirs.
    cluster.kube.upsert_namespace("later", &[]);
    cluster.add_pod(&pod("q", "127.0.3.3").role("app"));
    let (_, roles) = agent
        .until_ok("127.0.3.3", CREDS, std::time::Duration::from_secs(5))
        .await;
    assert_eq!(roles, "app");
    let seen = cluster.kube.resource_version();

    cluster.kube.compact();
    cluster.kube.break_watches();
    for kind in [Kind::Pod, Kind::ServiceAccount, Kind::Namespace] {
        eventually(&format!("{kind:?} relisted"), || async {
            collection_requests(&cluster, kind).0.len() >= 2
        })
        .await;
        let (lists, _) = collection_requests(&cluster, kind);
        let relist = &lists[1];
        assert_eq!(param(relist, "resourceVersionMatch"), Some("NotOlderThan"), "{kind:?}");
        assert_eq!(param(relist, "limit"), None, "{kind:?}");
        let from: u64 = param(relist, "resourceVersion").unwrap().parse().unwrap();
        assert!(from > 1 && from <= seen, "{kind:?}: {from} (seen {seen})");
    }
    let (_, roles) = agent
        .until_ok("127.0.3.3", CREDS, std::time::Duration::from_secs(5))
        .await;
    assert_eq!(roles, "app");
}

#[tokio::test]
async fn an_irsa_annotation_added_changed_and_removed_takes_effect_without_a_restart() {
    let cluster = Cluster::start().await;
    for name in ["first", "second"] {
        cluster.sts.trust_any(&role(name));
    }
    // Not annotated when the agent lists: a list keeps nothing of it.
    cluster.add_service_account(&service_account("apps", "robot", None));
    cluster.add_pod(&pod("p", "127.0.3.4").service_account("robot"));
    let agent = cluster.agent(&[]).await;
    let caller = agent.from("127.0.3.4");
    assert_eq!(caller.get(CREDS, &[]).await.status, StatusCode::NOT_FOUND);

    cluster.add_service_account(&service_account("apps", "robot", Some(&role("first"))));
    eventually("the annotation gives the pod its role", || async {
        caller.get(CREDS, &[]).await.text() == "first"
    })
    .await;
    cluster.add_service_account(&service_account("apps", "robot", Some(&role("second"))));
    eventually("the changed annotation changes the role", || async {
        caller.get(CREDS, &[]).await.text() == "second"
    })
    .await;

    // A relist (events missed) keeps the annotated account.
    cluster.kube.compact();
    cluster.kube.break_watches();
    eventually("relisted", || async {
        collection_requests(&cluster, Kind::ServiceAccount).0.len() >= 2
    })
    .await;
    eventually("served again after the relist", || async {
        caller.get(CREDS, &[]).await.text() == "second"
    })
    .await;

    cluster.add_service_account(&service_account("apps", "robot", None));
    eventually("the removed annotation takes the role away", || async {
        caller.get(CREDS, &[]).await.status == StatusCode::NOT_FOUND
    })
    .await;
}

#[tokio::test]
async fn an_annotation_removed_while_the_watch_was_lost_is_gone_after_the_relist() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("first"));
    cluster.add_service_account(&service_account("apps", "robot", Some(&role("first"))));
    cluster.add_pod(&pod("p", "127.0.3.5").service_account("robot"));
    let agent = cluster.agent(&[]).await;
    let caller = agent.from("127.0.3.5");
    assert_eq!(caller.get(CREDS, &[]).await.text(), "first");

    // As across an API server restart: the change happens while no watch stands and its event is
    // compacted away, so only the relist, which no longer lists the account (it has no annotation),
    // can tell.
    cluster.kube.set_outage(Some(Outage::Unavailable));
    cluster.add_service_account(&service_account("apps", "robot", None));
    cluster.kube.compact();
    cluster.kube.set_outage(None);
    eventually("the role is gone after the relist", || async {
        caller.get(CREDS, &[]).await.status == StatusCode::NOT_FOUND
    })
    .await;
    assert_eq!(
        agent
            .metric(
                "imds_broker_watch_relists_total",
                "resource=\"serviceaccounts\",cause=\"gone\""
            )
            .await,
        1.0
    );
}

#[tokio::test]
async fn the_namespace_imdsv2_policy_follows_its_annotation_through_changes_and_relists() {
    let cluster = Cluster::start().await;
    cluster.kube.upsert_namespace("apps", &[]);
    cluster.add_pod(&pod("p", "127.0.3.6"));
    let agent = cluster.agent(&[]).await;
    let region = "/latest/meta-data/placement/region";
    let caller = agent.from("127.0.3.6");
    assert_eq!(caller.get(region, &[]).await.status, StatusCode::OK);

    cluster
        .kube
        .upsert_namespace("apps", &[("imds-broker.io/imdsv2", "required")]);
    eventually("the namespace requires IMDSv2", || async {
        caller.get(region, &[]).await.status == StatusCode::UNAUTHORIZED
    })
    .await;

    cluster.kube.compact();
    cluster.kube.break_watches();
    eventually("relisted", || async {
        collection_requests(&cluster, Kind::Namespace).0.len() >= 2
    })
    .await;
    // While the relist is under way the policy is unknown: 503, never 200.
    eventually("still required after the relist", || async {
        let status = caller.get(region, &[]).await.status;
        assert_ne!(status, StatusCode::OK, "a token-less request passed during the relist");
        status == StatusCode::UNAUTHORIZED
    })
    .await;

    cluster
        .kube
        .upsert_namespace("apps", &[("imds-broker.io/imdsv2", "optional")]);
    eventually("optional again", || async {
        caller.get(region, &[]).await.status == StatusCode::OK
    })
    .await;
    cluster
        .kube
        .upsert_namespace("apps", &[("imds-broker.io/imdsv2", "requierd")]);
    eventually("an unknown value fails closed", || async {
        caller.get(region, &[]).await.status == StatusCode::UNAUTHORIZED
    })
    .await;
}

#[tokio::test]
async fn all_the_clusters_service_accounts_come_in_one_cached_metadata_only_response() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("app"));
    for i in 0..500 {
        cluster.add_service_account(&service_account(
            &format!("elsewhere-{}", i % 20),
            &format!("sa{i}"),
            None,
        ));
    }
    cluster.add_service_account(&service_account("apps", "robot", Some(&role("app"))));
    cluster.add_pod(&pod("p", "127.0.3.7").service_account("robot"));
    let agent = cluster.agent(&[]).await;
    assert_eq!(agent.from("127.0.3.7").get(CREDS, &[]).await.text(), "app");
    // Every account was received (the events metric counts each listed object, kept or not) ...
    let listed = agent
        .metric(
            "imds_broker_watch_events_total",
            "resource=\"serviceaccounts\",event=\"listed\"",
        )
        .await;
    assert_eq!(listed, 501.0);
    // ... in one response from the cache.
    let traffic = cluster.kube.traffic(Kind::ServiceAccount);
    assert_eq!(traffic.lists, 1);
    let bytes = agent
        .metric("imds_broker_watch_list_bytes_total", "resource=\"serviceaccounts\"")
        .await;
    assert_eq!(bytes, traffic.list_bytes as f64);
}
