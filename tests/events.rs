//! Kubernetes Events: a pod that cannot get credentials for a reason its owner can fix gets a Warning
//! Event naming the reason, the role and the error code (what `kubectl describe pod` shows), and a
//! looping SDK makes one Event series, not a flood of API writes.

use std::time::Duration;

use serde_json::Value;

use crate::support::Cluster;
use crate::support::agent::eventually;
use crate::support::fixtures::{pod, role};
use crate::support::logs::capture;

const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

/// The Events about pod `apps/<name>` with `reason`.
fn events_for(cluster: &Cluster, name: &str, reason: &str) -> Vec<Value> {
    cluster
        .kube
        .events()
        .into_iter()
        .filter(|e| e["regarding"]["name"] == name && e["reason"] == reason)
        .collect()
}

async fn one_event(cluster: &Cluster, name: &str, reason: &str) -> Value {
    eventually(&format!("a {reason} Event on {name}"), || async {
        !events_for(cluster, name, reason).is_empty()
    })
    .await;
    let events = events_for(cluster, name, reason);
    assert_eq!(events.len(), 1, "{events:#?}");
    events.into_iter().next().unwrap()
}

#[tokio::test]
async fn an_sts_refusal_is_a_warning_event_on_the_pod_naming_the_role_and_the_aws_code() {
    let cluster = Cluster::start().await;
    cluster.sts.trust(&role("app"), "system:serviceaccount:elsewhere:other");
    let refused = pod("refused", "127.0.0.90").role("app").phase("Pending");
    cluster.add_pod(&refused);
    let agent = cluster.agent(&[]).await;
    let reply = agent.from("127.0.0.90").get(&format!("{CREDS}app"), &[]).await;
    assert_eq!(reply.json()["Code"], "AssumeRoleUnauthorizedAccess");

    let event = one_event(&cluster, "refused", "StsAccessDenied").await;
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["action"], "AssumeRoleWithWebIdentity");
    assert_eq!(event["reportingController"], "imds-broker.io/agent");
    assert_eq!(event["reportingInstance"], "node-1");
    assert_eq!(event["metadata"]["namespace"], "apps");
    assert_eq!(event["regarding"]["kind"], "Pod");
    assert_eq!(event["regarding"]["uid"], refused.uid_str());
    let note = event["note"].as_str().unwrap();
    assert!(note.contains(&role("app")) && note.contains("AccessDenied"), "{note}");
    assert!(!note.contains("eyJ"), "a token in the note: {note}");
    // As `kubectl describe pod` lists it (shown with --no-capture).
    println!(
        "Events:\n  Type     Reason           From                  Message\n  {:<8} {:<16} {:<21} {note}",
        event["type"].as_str().unwrap_or_default(),
        event["reason"].as_str().unwrap_or_default(),
        event["reportingController"].as_str().unwrap_or_default(),
    );
    assert_eq!(
        agent
            .metric(
                "imds_broker_events_total",
                "reason=\"StsAccessDenied\",result=\"created\""
            )
            .await,
        1.0
    );
}

#[tokio::test]
async fn an_invalid_role_annotation_is_an_event_before_the_pod_asks() {
    let cluster = Cluster::start().await;
    cluster.add_pod(&pod("typo", "127.0.0.91").role("arn:aws:iam::123:role/x"));
    let _agent = cluster.agent(&[]).await;
    let event = one_event(&cluster, "typo", "InvalidRoleAnnotation").await;
    let note = event["note"].as_str().unwrap();
    assert!(
        note.contains("iam.amazonaws.com/role") && note.contains("arn:aws:iam::123:role/x"),
        "{note}"
    );
    assert_eq!(event["action"], "ResolveRole");
    assert_eq!(cluster.sts.calls(), 0);
}

#[tokio::test]
async fn a_refused_token_request_is_an_event_naming_the_service_account() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("app"));
    cluster.kube.set_token_failure(Some(403));
    cluster.add_pod(&pod("no-token", "127.0.0.92").role("app").phase("Pending"));
    let agent = cluster.agent(&[]).await;
    agent.from("127.0.0.92").get(&format!("{CREDS}app"), &[]).await;
    let event = one_event(&cluster, "no-token", "TokenRequestRefused").await;
    let note = event["note"].as_str().unwrap();
    assert!(note.contains("apps/default") && note.contains("403"), "{note}");
    assert_eq!(cluster.sts.calls(), 0);
}

#[tokio::test]
async fn a_thousand_failing_requests_make_one_event_and_at_most_a_few_api_writes() {
    let cluster = Cluster::start().await;
    cluster.sts.trust(&role("app"), "system:serviceaccount:elsewhere:other");
    cluster.add_pod(&pod("looping", "127.0.0.93").role("app").phase("Pending"));
    let agent = cluster.agent(&[]).await;
    let caller = agent.from("127.0.0.93");
    for _ in 0..1000 {
        assert_eq!(
            caller.get(&format!("{CREDS}app"), &[]).await.json()["Code"],
            "AssumeRoleUnauthorizedAccess"
        );
    }
    one_event(&cluster, "looping", "StsAccessDenied").await;
    let writes = cluster.kube.event_writes();
    assert!((1..=3).contains(&writes.len()), "{} writes: {writes:?}", writes.len());
    assert!(writes.iter().all(|w| w.status < 300), "{writes:?}");
    // The cache's remembered failure answered most requests: STS saw a handful, the Event counts them.
    // The recorder counts asynchronously: the last failure's notice may still be queued.
    eventually("every STS refusal counted as an occurrence", || async {
        agent
            .metric("imds_broker_events_total", "reason=\"StsAccessDenied\"")
            .await as usize
            == cluster.sts.calls()
    })
    .await;
    assert!(cluster.sts.calls() < 20, "{} STS calls", cluster.sts.calls());
}

#[tokio::test(start_paused = true)]
async fn a_failure_that_goes_on_for_minutes_updates_one_series_every_five_minutes() {
    let cluster = Cluster::start().await;
    cluster.sts.trust(&role("app"), "system:serviceaccount:elsewhere:other");
    cluster.add_pod(&pod("slow-loop", "127.0.0.94").role("app").phase("Pending"));
    let agent = cluster.agent(&[]).await;
    let caller = agent.from("127.0.0.94");
    // An SDK asking about once a minute for twelve minutes; each ask is past the cache's backoff
    // (at most a minute), so each is a new failure.
    for _ in 0..12 {
        caller.get(&format!("{CREDS}app"), &[]).await;
        tokio::time::sleep(Duration::from_secs(61)).await;
    }
    let event = one_event(&cluster, "slow-loop", "StsAccessDenied").await;
    let writes = cluster.kube.event_writes();
    let patches = writes.iter().filter(|w| w.verb == "PATCH").count();
    assert_eq!(writes.iter().filter(|w| w.verb == "POST").count(), 1, "{writes:?}");
    assert!(
        (1..=3).contains(&patches),
        "{patches} series updates in 12 minutes: {writes:?}"
    );
    assert!(writes.iter().all(|w| w.status < 300), "{writes:?}");
    let count = event["series"]["count"].as_u64().unwrap();
    assert!(
        (2..=cluster.sts.calls() as u64).contains(&count),
        "series count {count}, {} failures",
        cluster.sts.calls()
    );
}

#[tokio::test]
async fn with_events_off_nothing_is_written() {
    let cluster = Cluster::start().await;
    cluster.sts.trust(&role("app"), "system:serviceaccount:elsewhere:other");
    cluster.add_pod(&pod("quiet", "127.0.0.95").role("app").phase("Pending"));
    cluster.add_pod(&pod("quiet-typo", "127.0.0.96").role("arn:aws:iam::123:role/x"));
    let agent = cluster.agent(&["--events", "false"]).await;
    let reply = agent.from("127.0.0.95").get(&format!("{CREDS}app"), &[]).await;
    assert_eq!(reply.json()["Code"], "AssumeRoleUnauthorizedAccess");
    assert_eq!(cluster.sts.calls(), 1, "the refusal happened");
    assert!(cluster.kube.event_writes().is_empty());
}

#[tokio::test]
async fn without_the_rbac_rule_events_fail_counted_and_logged_and_pods_are_answered_as_before() {
    let (logs, _guard) = capture("info");
    let cluster = Cluster::start().await;
    cluster.kube.set_event_failure(Some(403));
    cluster.sts.trust(&role("app"), "system:serviceaccount:elsewhere:other");
    cluster.add_pod(&pod("no-rbac", "127.0.0.97").role("app").phase("Pending"));
    let agent = cluster.agent(&[]).await;
    let reply = agent.from("127.0.0.97").get(&format!("{CREDS}app"), &[]).await;
    assert_eq!(reply.json()["Code"], "AssumeRoleUnauthorizedAccess");
    eventually("the refused write counted", || async {
        agent
            .metric(
                "imds_broker_events_total",
                "reason=\"StsAccessDenied\",result=\"failed\"",
            )
            .await
            == 1.0
    })
    .await;
    assert_eq!(cluster.kube.event_writes().len(), 1);
    assert_eq!(cluster.kube.event_writes()[0].status, 403);
    let lines = logs.lines_with(&["could not write a Kubernetes Event", "apps/no-rbac", "ClusterRole"]);
    assert_eq!(lines.len(), 1, "{}", logs.text());
}
