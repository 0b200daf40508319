//! Objects the agent cannot read: pods and service accounts whose fields have the wrong types or no
//! metadata at all (what a client meets when the API server's schema and its own disagree), and
//! hostile values of the right type (huge annotations, IPs that are not IPs). None of them crashes the
//! agent or costs it a tight retry loop.
//!
//! What an unreadable object does today, as these tests pin it down: kube cannot decode the watch
//! event, the watch fails and is retried from the same resourceVersion with the capped backoff, and the
//! API server replays the same event. Pods already known keep their credentials; a pod created after
//! the unreadable event is not seen (503, never 404 or another pod's credentials) until a relist gets
//! past it, which needs the object gone; in the very first list it keeps the agent unready.

use std::time::Duration;

use http::StatusCode;
use serde_json::{Value, json};

use crate::support::Cluster;
use crate::support::agent::NODE;
use crate::support::fixtures::{pod, role};
use crate::support::kube::{FakeKube, Kind};

const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

/// Pods on this node (so the field selector serves them) that no Pod schema reads.
fn unreadable_pods() -> Vec<Value> {
    let spec = json!({ "nodeName": NODE, "containers": [{ "name": "main", "image": "registry.example/app:1" }] });
    let meta = |name: &str| json!({ "name": name, "namespace": "apps", "uid": format!("uid-{name}") });
    vec![
        json!({ "apiVersion": "v1", "kind": "Pod", "metadata": meta("ips"), "spec": spec,
                "status": { "phase": "Running", "podIP": 2130706433, "podIPs": [{ "ip": 42 }] } }),
        json!({ "apiVersion": "v1", "kind": "Pod", "metadata": meta("phase"), "spec": spec,
                "status": { "phase": 3, "podIP": "127.0.9.9" } }),
        json!({ "apiVersion": "v1", "kind": "Pod", "metadata": "pod", "spec": spec }),
        json!({ "apiVersion": "v1", "kind": "Pod", "spec": spec, "status": { "phase": ["Running"] } }),
        json!({ "apiVersion": "v1", "kind": "Pod", "metadata": meta("containers"), "spec": spec,
                "status": { "phase": "Running", "containerStatuses": "garbage" } }),
        json!({ "apiVersion": "v1", "kind": "Pod", "metadata": meta("states"), "spec": spec,
                "status": { "phase": "Running", "containerStatuses": [{ "name": 1, "state": [], "ready": "yes" }] } }),
        json!({ "apiVersion": "v1", "kind": "Pod", "spec": spec,
                "metadata": { "name": "annotations", "namespace": "apps", "annotations": { "iam.amazonaws.com/role": { "arn": true } } } }),
    ]
}

/// Watch requests for pods the double has received so far.
fn pod_watches(kube: &FakeKube) -> usize {
    requests(kube, "watch=true")
}

/// Plain (paginated) lists of pods the double has received so far.
fn pod_lists(kube: &FakeKube) -> usize {
    requests(kube, "limit=")
}

fn requests(kube: &FakeKube, marker: &str) -> usize {
    kube.request_log()
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/pods?") && r.contains(marker))
        .count()
}

#[tokio::test(start_paused = true)]
async fn unreadable_pods_in_the_watch_never_stop_the_agent_serving_the_pods_it_knows() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("app"));
    cluster.add_pod(&pod("good", "127.0.9.1").role("app"));
    let agent = cluster.agent(&[]).await;
    let good = agent.from("127.0.9.1");
    assert_eq!(good.get(CREDS, &[]).await.text(), "app");
    let watches = pod_watches(&cluster.kube);

    for object in unreadable_pods() {
        cluster.kube.inject_raw(Kind::Pod, object);
    }
    cluster.kube.inject_raw(
        Kind::ServiceAccount,
        json!({ "metadata": { "name": 7, "annotations": [] } }),
    );

    // A minute (less than --watch-idle-timeout, so no relist): the known pod is served throughout.
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let reply = good.get(&format!("{CREDS}app"), &[]).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    // Retried with the backoff (250 ms doubling to 5 s, jittered), not in a tight loop.
    let retries = pod_watches(&cluster.kube) - watches;
    assert!((5..=40).contains(&retries), "{retries} pod watches in a minute");
    assert!(
        agent
            .metric("imds_broker_watch_errors_total", "resource=\"pods\"")
            .await
            >= 5.0
    );
    assert!(
        agent
            .metric("imds_broker_watch_errors_total", "resource=\"serviceaccounts\"")
            .await
            >= 1.0
    );
    assert_eq!(
        cluster.sts.calls(),
        1,
        "the known pod's session is still the prefetched one"
    );
    agent.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_pod_created_behind_an_unreadable_event_is_refused_503_until_a_relist_gets_past_it() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("app"));
    let agent = cluster.agent(&["--watch-idle-timeout", "30s"]).await;
    let unreadable = cluster.kube.inject_raw(Kind::Pod, unreadable_pods().swap_remove(1));
    cluster.add_pod(&pod("late", "127.0.9.2").role("app"));

    let late = agent.from("127.0.9.2");
    for _ in 0..45 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let reply = late.get(CREDS, &[]).await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{}", reply.text());
    }
    assert_eq!(cluster.sts.calls(), 0);

    // Gone, the next relist (at the idle timeout) no longer fails and the watch resumes after it.
    cluster.kube.delete(Kind::Pod, "", &unreadable);
    let (before, roles) = agent.until_ok("127.0.9.2", CREDS, Duration::from_secs(60)).await;
    assert_eq!(roles, "app");
    assert!(
        before.iter().all(|s| *s == StatusCode::SERVICE_UNAVAILABLE),
        "{before:?}"
    );
    agent.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_unreadable_pod_in_the_first_list_keeps_the_agent_unready_but_alive_until_it_is_gone() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("app"));
    cluster.add_pod(&pod("good", "127.0.9.1").role("app"));
    let unreadable = cluster.kube.inject_raw(Kind::Pod, unreadable_pods().swap_remove(0));
    let agent = cluster.agent_unready(&[]).await;

    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(!agent.is_ready().await);
    let reply = agent.from("127.0.9.1").get(CREDS, &[]).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{}", reply.text());
    let lists = pod_lists(&cluster.kube);
    assert!((5..=25).contains(&lists), "{lists} pod lists in 30 s");

    cluster.kube.delete(Kind::Pod, "", &unreadable);
    agent.wait_ready().await;
    assert_eq!(agent.from("127.0.9.1").get(CREDS, &[]).await.text(), "app");
    agent.stop().await;
}

#[tokio::test]
async fn hostile_values_of_the_right_type_are_refused_per_pod_and_the_neighbours_are_served() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("app"));
    cluster.add_pod(&pod("good", "127.0.9.1").role("app"));
    // The API server's limit for all annotations of an object together is 256 KiB.
    let huge = "a".repeat(250 * 1024);
    cluster.add_pod(&pod("huge-role", "127.0.9.3").role(&huge));
    cluster.add_pod(
        &pod("huge-other", "127.0.9.4")
            .role("app")
            .annotation("example.com/blob", &huge),
    );
    cluster.add_pod(
        &pod("not-ips", "127.0.9.5")
            .ips(&["not-an-ip", "127.0.9.256", "::ffff:zz", ""])
            .role("app"),
    );
    let agent = cluster.agent(&["--pod-wait", "50ms"]).await;

    assert_eq!(agent.from("127.0.9.1").get(CREDS, &[]).await.text(), "app");
    assert_eq!(agent.from("127.0.9.4").get(CREDS, &[]).await.text(), "app");
    let refused = agent.from("127.0.9.3").get(CREDS, &[]).await;
    assert_eq!(
        refused.status,
        StatusCode::NOT_FOUND,
        "an invalid role annotation is refused"
    );
    assert_eq!(
        agent.metric("imds_broker_pods_addresses", "").await,
        3.0,
        "no address is made up from the strings that are not IPs"
    );
    assert!(agent.is_ready().await);
}
