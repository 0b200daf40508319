//! What the agent logs: every refusal names the pod (or the caller's IP), the role and the error
//! code; no secret ever reaches a log line, at any level.

use http::StatusCode;

use crate::support::Cluster;
use crate::support::fixtures::{pod, role};
use crate::support::logs::capture;

const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

#[tokio::test]
async fn an_sts_refusal_logs_the_pod_the_role_and_the_aws_error_code() {
    let (logs, _guard) = capture("info");
    let cluster = Cluster::start().await;
    cluster.sts.trust(&role("app"), "system:serviceaccount:elsewhere:other");
    cluster.add_pod(&pod("refused-pod", "127.0.0.70").role("app").phase("Pending"));
    let agent = cluster.agent(&[]).await;
    agent.from("127.0.0.70").get(&format!("{CREDS}app"), &[]).await;
    let lines = logs.lines_with(&["apps/refused-pod", &role("app"), "AccessDenied"]);
    assert_eq!(lines.len(), 1, "{}", logs.text());
    assert!(lines[0].contains("WARN"), "{}", lines[0]);
}

#[tokio::test]
async fn a_malformed_annotation_logs_the_pod_and_the_value() {
    let (logs, _guard) = capture("info");
    let cluster = Cluster::start().await;
    cluster.add_pod(&pod("typo-pod", "127.0.0.71").role("arn:aws:iam::123:role/x"));
    let agent = cluster.agent(&[]).await;
    assert_eq!(
        agent.from("127.0.0.71").get(CREDS, &[]).await.status,
        StatusCode::NOT_FOUND
    );
    let lines = logs.lines_with(&["apps/typo-pod", "arn:aws:iam::123:role/x", "iam.amazonaws.com/role"]);
    assert!(!lines.is_empty(), "{}", logs.text());
}

#[tokio::test]
async fn an_unknown_caller_is_logged_by_ip() {
    let (logs, _guard) = capture("info");
    let cluster = Cluster::start().await;
    let agent = cluster.agent(&["--pod-wait", "10ms"]).await;
    agent.from("127.0.0.72").get(CREDS, &[]).await;
    assert_eq!(
        logs.lines_with(&["127.0.0.72", "no pod on this node"]).len(),
        1,
        "{}",
        logs.text()
    );
}

#[tokio::test]
async fn secrets_never_reach_logs_or_metrics_even_at_trace_level() {
    let (logs, _guard) = capture("trace");
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("app"));
    cluster.add_pod(&pod("p", "127.0.0.73").role("app"));
    let agent = cluster.agent(&[]).await;
    let caller = agent.from("127.0.0.73");
    let token = caller.token("60").await.text();
    let doc = caller
        .get(&format!("{CREDS}app"), &[("x-aws-ec2-metadata-token", &token)])
        .await
        .json();
    let secret = doc["SecretAccessKey"].as_str().unwrap();
    let session_token = doc["Token"].as_str().unwrap();
    let metrics = agent.metrics().await;
    let text = logs.text();
    assert!(text.contains("obtained credentials"), "the capture works");
    for (what, value) in [
        ("secret access key", secret),
        ("session token", session_token),
        ("IMDSv2 token", token.as_str()),
    ] {
        assert!(!text.contains(value), "{what} in the logs");
        assert!(!metrics.contains(value), "{what} in the metrics");
    }
    // Every service-account token is a JWT, and every JWT starts with a base64url '{"'.
    assert!(!text.contains("eyJ"), "a JWT reached the logs");
}
