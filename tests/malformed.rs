//! Objects the agent cannot read: pods, service accounts and namespaces whose fields have the wrong
//! types (what a client meets when the API server's schema and its own disagree), objects with no
//! metadata at all, and hostile values of the right type (huge annotations, IPs that are not IPs).
//! None of them crashes the agent, stops its watches or costs it a tight retry loop, and none of them
//! lets a pod be served from what the agent knew before the object changed.
//!
//! What an unreadable object does: the watch goes on past it; what can be read of it (uid, name,
//! addresses) tells the agent what to stop trusting. An unreadable pod is held on its addresses (503),
//! the pods of an unreadable service account are refused (503) unless they name their own role, and
//! an unreadable namespace requires IMDSv2. An object whose uid or name cannot be read identifies
//! nothing: it makes the view stale (503 for every pod, never stale answers) until it is gone.

use std::time::Duration;

use http::StatusCode;
use serde_json::{Value, json};

use crate::support::Cluster;
use crate::support::agent::NODE;
use crate::support::client::poll;
use crate::support::fixtures::{pod, role, service_account};
use crate::support::kube::{FakeKube, Kind};

const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

fn spec() -> Value {
    json!({ "nodeName": NODE, "containers": [{ "name": "main", "image": "registry.example/app:1" }] })
}

fn meta(name: &str) -> Value {
    json!({ "name": name, "namespace": "apps", "uid": format!("uid-{name}") })
}

/// Pods on this node (so the field selector serves them) that no Pod schema reads, but that say which
/// pod they are. The one named `phase` still names an address: 127.0.9.9.
fn unreadable_pods() -> Vec<Value> {
    let spec = spec();
    vec![
        json!({ "apiVersion": "v1", "kind": "Pod", "metadata": meta("ips"), "spec": spec,
                "status": { "phase": "Running", "podIP": 2130706433, "podIPs": [{ "ip": 42 }] } }),
        json!({ "apiVersion": "v1", "kind": "Pod", "metadata": meta("phase"), "spec": spec,
                "status": { "phase": 3, "podIP": "127.0.9.9" } }),
        json!({ "apiVersion": "v1", "kind": "Pod", "metadata": meta("containers"), "spec": spec,
                "status": { "phase": "Running", "containerStatuses": "garbage" } }),
        json!({ "apiVersion": "v1", "kind": "Pod", "metadata": meta("states"), "spec": spec,
                "status": { "phase": "Running", "containerStatuses": [{ "name": 1, "state": [], "ready": "yes" }] } }),
        json!({ "apiVersion": "v1", "kind": "Pod", "spec": spec,
                "metadata": { "name": "annotations", "namespace": "apps", "uid": "uid-annotations",
                              "annotations": { "iam.amazonaws.com/role": { "arn": true } } } }),
    ]
}

/// Pods that do not even say which pod they are (no API server stores such a thing, but a client
/// must not trust anything it knew while one is in its stream).
fn unidentified_pods() -> Vec<Value> {
    let spec = spec();
    vec![
        json!({ "apiVersion": "v1", "kind": "Pod", "metadata": "pod", "spec": spec }),
        json!({ "apiVersion": "v1", "kind": "Pod", "spec": spec, "status": { "phase": ["Running"] } }),
    ]
}

/// Plain (paginated) lists of pods the double has received so far.
fn pod_lists(kube: &FakeKube) -> usize {
    kube.requests_seen()
        .iter()
        .filter(|r| r.path == "/api/v1/pods" && r.is_collection(Kind::Pod) && !r.is_watch())
        .count()
}

/// Polls `source` until it answers `status` (a watch event takes a moment to apply).
async fn until_status(agent: &crate::support::agent::Agent, source: &str, status: StatusCode) {
    let caller = agent.from(source);
    let reached = poll(Duration::from_secs(10), Duration::from_millis(100), || async {
        caller.get(CREDS, &[]).await.status == status
    })
    .await;
    assert!(reached, "{source} never answered {status}");
}

#[tokio::test(start_paused = true)]
async fn unreadable_objects_never_stop_the_watch_nor_the_pods_it_knows_and_later_pods_are_seen() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("app"));
    cluster.add_pod(&pod("good", "127.0.9.1").role("app"));
    let agent = cluster.agent(&[]).await;
    let good = agent.from("127.0.9.1");
    assert_eq!(good.get(CREDS, &[]).await.text(), "app");

    for object in unreadable_pods() {
        cluster.kube.inject_raw(Kind::Pod, object);
    }
    cluster.kube.inject_raw(
        Kind::ServiceAccount,
        json!({ "metadata": { "name": "odd", "namespace": "apps", "uid": "uid-odd", "annotations": [] } }),
    );
    // Created behind them: seen at once, because the watch went on.
    cluster.add_pod(&pod("late", "127.0.9.2").role("app"));
    let (before, roles) = agent.until_ok("127.0.9.2", CREDS, Duration::from_secs(5)).await;
    assert_eq!(roles, "app", "after {before:?}");

    // A minute (less than --watch-idle-timeout, so no relist): the known pod is served throughout.
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let reply = good.get(&format!("{CREDS}app"), &[]).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    for (resource, unreadable) in [("pods", 5.0), ("serviceaccounts", 1.0)] {
        let labels = format!("resource=\"{resource}\"");
        assert_eq!(
            agent.metric("imds_broker_watch_unreadable_total", &labels).await,
            unreadable
        );
        assert_eq!(agent.metric("imds_broker_watch_errors_total", &labels).await, 0.0);
    }
    // The unreadable pod that names an address holds it: 503 (it may be running), never 404.
    let held = agent.from("127.0.9.9").get(CREDS, &[]).await;
    assert_eq!(held.status, StatusCode::SERVICE_UNAVAILABLE, "{}", held.text());
    assert_eq!(cluster.sts.calls(), 2, "one session each for good and late");
    agent.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_deleted_pods_ip_reused_behind_an_unreadable_event_goes_to_the_new_pod_only() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("app"));
    cluster.sts.trust_any(&role("other"));
    cluster.add_pod(&pod("old", "127.0.9.1").role("app"));
    let agent = cluster.agent(&[]).await;
    assert_eq!(agent.from("127.0.9.1").get(CREDS, &[]).await.text(), "app");

    cluster.kube.inject_raw(Kind::Pod, unreadable_pods().swap_remove(1));
    cluster.kube.delete(Kind::Pod, "apps", "old");
    cluster.add_pod(&pod("new", "127.0.9.1").role("other"));
    // Requests racing the events may still reach the old pod (as with any watch); once the events
    // are applied the address is the new pod's. A stalled watch would answer "app" for ever.
    let caller = agent.from("127.0.9.1");
    let moved = poll(Duration::from_secs(5), Duration::from_millis(100), || async {
        caller.get(CREDS, &[]).await.text() == "other"
    })
    .await;
    assert!(moved, "the new pod never got its own role");
    let document = agent.from("127.0.9.1").get(&format!("{CREDS}app"), &[]).await;
    assert_eq!(
        document.status,
        StatusCode::NOT_FOUND,
        "the old pod's role is not the new pod's"
    );
    agent.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_pod_that_becomes_unreadable_is_held_503_until_it_is_readable_again() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("app"));
    cluster.add_pod(&pod("drifted", "127.0.9.1").role("app"));
    let agent = cluster.agent(&[]).await;
    assert_eq!(agent.from("127.0.9.1").get(CREDS, &[]).await.text(), "app");
    let readable = cluster.kube.get(Kind::Pod, "apps", "drifted").expect("stored");

    // Its status changes into something the agent cannot decode, addresses included: what it knew of
    // the pod (running, that IP, that role) is no longer known to be true.
    let mut drifted = readable.clone();
    drifted["status"] = json!({ "phase": "Running", "podIPs": "127.0.9.1", "podIP": 7 });
    cluster.kube.replace_raw(Kind::Pod, "apps", "drifted", drifted);
    until_status(&agent, "127.0.9.1", StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(agent.metric("imds_broker_pods_held", "").await, 1.0);
    assert_eq!(agent.metric("imds_broker_pods_indexed", "").await, 0.0);

    cluster.kube.replace_raw(Kind::Pod, "apps", "drifted", readable);
    let (_, roles) = agent.until_ok("127.0.9.1", CREDS, Duration::from_secs(5)).await;
    assert_eq!(roles, "app");
    agent.stop().await;
}

#[tokio::test(start_paused = true)]
async fn pods_of_an_unreadable_service_account_are_refused_503_unless_they_name_their_own_role() {
    let cluster = Cluster::start().await;
    for name in ["sa-role", "app", "fallback"] {
        cluster.sts.trust_any(&role(name));
    }
    cluster.add_service_account(&service_account("apps", "robot", Some(&role("sa-role"))));
    cluster.add_pod(&pod("by-account", "127.0.9.1").service_account("robot"));
    cluster.add_pod(&pod("by-pod", "127.0.9.2").service_account("robot").role("app"));
    let agent = cluster.agent(&["--default-role", &role("fallback")]).await;
    assert_eq!(agent.from("127.0.9.1").get(CREDS, &[]).await.text(), "sa-role");
    assert_eq!(agent.from("127.0.9.2").get(CREDS, &[]).await.text(), "app");
    let readable = cluster.kube.get(Kind::ServiceAccount, "apps", "robot").expect("stored");

    let mut unreadable = readable.clone();
    unreadable["metadata"]["annotations"] = json!(["eks.amazonaws.com/role-arn"]);
    cluster
        .kube
        .replace_raw(Kind::ServiceAccount, "apps", "robot", unreadable);
    // Whether it still names sa-role is unknown: neither sa-role nor the weaker --default-role.
    until_status(&agent, "127.0.9.1", StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(agent.from("127.0.9.2").get(CREDS, &[]).await.text(), "app");

    cluster
        .kube
        .replace_raw(Kind::ServiceAccount, "apps", "robot", readable);
    let (before, roles) = agent.until_ok("127.0.9.1", CREDS, Duration::from_secs(5)).await;
    assert_eq!(roles, "sa-role");
    assert!(
        before.iter().all(|s| *s == StatusCode::SERVICE_UNAVAILABLE),
        "{before:?}"
    );
    agent.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_object_that_identifies_nothing_makes_every_answer_503_until_it_is_gone() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("app"));
    cluster.add_pod(&pod("good", "127.0.9.1").role("app"));
    let agent = cluster.agent(&[]).await;
    assert_eq!(agent.from("127.0.9.1").get(CREDS, &[]).await.text(), "app");
    let lists = pod_lists(&cluster.kube);

    // It might have been any pod's change, this one's termination included.
    let nameless = cluster.kube.inject_raw(Kind::Pod, unidentified_pods().swap_remove(0));
    until_status(&agent, "127.0.9.1", StatusCode::SERVICE_UNAVAILABLE).await;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let reply = agent.from("127.0.9.1").get(CREDS, &[]).await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{}", reply.text());
    }
    // Relisted (it is in every list, so each fails) with the backoff, not in a tight loop.
    let relists = pod_lists(&cluster.kube) - lists;
    assert!((5..=25).contains(&relists), "{relists} pod lists in about 30 s");
    assert!(
        agent
            .metric(
                "imds_broker_watch_relists_total",
                "cause=\"unreadable\",resource=\"pods\""
            )
            .await
            >= 1.0
    );

    cluster.kube.delete(Kind::Pod, "", &nameless);
    let (_, roles) = agent.until_ok("127.0.9.1", CREDS, Duration::from_secs(30)).await;
    assert_eq!(roles, "app");
    agent.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_unreadable_pod_in_the_first_list_is_held_and_the_agent_serves_the_others() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("app"));
    cluster.add_pod(&pod("good", "127.0.9.1").role("app"));
    for object in unreadable_pods() {
        cluster.kube.inject_raw(Kind::Pod, object);
    }
    let agent = cluster.agent(&[]).await;
    assert_eq!(agent.from("127.0.9.1").get(CREDS, &[]).await.text(), "app");
    let held = agent.from("127.0.9.9").get(CREDS, &[]).await;
    assert_eq!(held.status, StatusCode::SERVICE_UNAVAILABLE, "{}", held.text());
    assert_eq!(agent.metric("imds_broker_pods_held", "").await, 5.0);
    agent.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_pod_that_identifies_nothing_in_the_first_list_keeps_the_agent_unready_until_it_is_gone() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("app"));
    cluster.add_pod(&pod("good", "127.0.9.1").role("app"));
    let nameless = cluster.kube.inject_raw(Kind::Pod, unidentified_pods().swap_remove(1));
    let agent = cluster.agent_unready(&[]).await;

    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(!agent.is_ready().await);
    let reply = agent.from("127.0.9.1").get(CREDS, &[]).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{}", reply.text());
    let lists = pod_lists(&cluster.kube);
    assert!((5..=25).contains(&lists), "{lists} pod lists in 30 s");

    cluster.kube.delete(Kind::Pod, "", &nameless);
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
