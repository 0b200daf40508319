//! What the agent logs: every refusal names the pod (or the caller's IP), the role and the error
//! code; no secret ever reaches a log line, at any level.

use http::StatusCode;

use crate::support::Cluster;
use crate::support::fixtures::{pod, role};
use crate::support::logs::{capture, capture_json};

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
    assert!(text.contains("credentials issued"), "the capture works");
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

#[tokio::test(start_paused = true)]
async fn a_flood_of_bad_tokens_and_unknown_callers_writes_a_bounded_number_of_lines() {
    let (logs, _guard) = capture("info");
    let cluster = Cluster::start().await;
    let agent = cluster.agent(&[]).await;
    let bad = agent.from("127.0.0.72");
    let header = [("x-aws-ec2-metadata-token", "AAAA")];
    for _ in 0..500 {
        assert_eq!(bad.get(CREDS, &header).await.status, StatusCode::UNAUTHORIZED);
    }
    // Unknown callers wait --pod-wait each (paused time: instantly).
    for _ in 0..200 {
        assert_eq!(
            agent.from("127.0.0.73").get(CREDS, &[]).await.status,
            StatusCode::NOT_FOUND
        );
    }
    let bad_lines = logs.lines_with(&["refusing IMDSv2 request"]).len();
    let unknown_lines = logs.lines_with(&["no pod on this node has this IP"]).len();
    // A burst of 20 per kind, then one a second (the 200 unknown callers take 100 s of paused time).
    assert!((20..=25).contains(&bad_lines), "{bad_lines} lines for 500 bad tokens");
    assert!(
        (20..=130).contains(&unknown_lines),
        "{unknown_lines} lines for 200 unknown callers"
    );
    let held_back = agent
        .metric("imds_broker_imds_refusal_logs_suppressed_total", "kind=\"bad_token\"")
        .await;
    assert_eq!(held_back as usize, 500 - bad_lines);
    // Every refusal is still counted.
    assert_eq!(
        agent
            .metric("imds_broker_imds_requests_total", "code=\"401\",outcome=\"bad_token\"")
            .await,
        500.0
    );
}

#[tokio::test]
async fn each_credential_issued_is_one_json_audit_line_without_any_secret() {
    let (logs, _guard) = capture_json("trace");
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("app"));
    let audited = pod("audited", "127.0.0.74").role("app").phase("Pending");
    cluster.add_pod(&audited);
    let agent = cluster.agent(&[]).await;
    let caller = agent.from("127.0.0.74");
    let mut docs = Vec::new();
    for _ in 0..3 {
        docs.push(caller.get(&format!("{CREDS}app"), &[]).await.json());
    }
    let lines: Vec<serde_json::Value> = logs
        .text()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["target"] == imds_broker::audit::TARGET)
        .collect();
    // Three requests served, one credential issued.
    assert_eq!(lines.len(), 1, "{lines:#?}");
    let line = &lines[0];
    let doc = &docs[0];
    assert_eq!(line["message"], "credentials issued");
    assert_eq!(line["level"], "INFO");
    assert_eq!(line["pod_namespace"], "apps");
    assert_eq!(line["pod_name"], "audited");
    assert_eq!(line["pod_uid"], audited.uid_str());
    assert_eq!(line["service_account"], "default");
    assert_eq!(line["role_arn"], role("app"));
    assert_eq!(line["session_name"], "apps.audited");
    assert_eq!(line["access_key_id"], doc["AccessKeyId"]);
    assert_eq!(line["cause"], "request");
    let expiration = time::OffsetDateTime::parse(
        line["expiration"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let served = time::OffsetDateTime::parse(
        doc["Expiration"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert_eq!(expiration, served);
    // What STS issued (and CloudTrail records) is what the line names.
    let issued = cluster.sts.issued();
    assert_eq!(issued.len(), 1);
    assert_eq!(line["access_key_id"], issued[0].access_key_id.as_str());
    assert_eq!(line["session_name"], issued[0].session_name.as_str());
    let text = logs.text();
    for (what, value) in [
        ("secret access key", &doc["SecretAccessKey"]),
        ("session token", &doc["Token"]),
    ] {
        let value = value.as_str().unwrap();
        assert!(!text.contains(value), "the {what} reached the logs");
    }
    assert!(!text.contains("eyJ"), "a JWT reached the logs");
}

#[tokio::test(start_paused = true)]
async fn a_flood_of_forged_container_tokens_writes_a_bounded_number_of_lines_and_no_token() {
    let (logs, _guard) = capture("trace");
    let cluster = Cluster::start().await;
    let app = pod("cc-0", "127.0.0.74").role("app");
    cluster.sts.trust_any(&role("app"));
    cluster.add_pod(&app);
    let agent = cluster.agent(&["--container-credentials"]).await;
    let token = crate::support::fixtures::token_request(
        cluster.kube.client(),
        app.namespace_str(),
        app.service_account_str(),
        ("cc-0", app.uid_str()),
        "pods.eks.amazonaws.com",
    )
    .await
    .unwrap();
    let forged = crate::support::jwt::tamper_payload(&token, |claims| claims["exp"] = (i64::MAX / 2).into());
    let caller = agent.from("127.0.0.74");
    for _ in 0..300 {
        let reply = caller
            .get(
                "/v1/credentials",
                &[("host", "169.254.170.23"), ("authorization", &forged)],
            )
            .await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN);
    }
    let good = caller
        .get(
            "/v1/credentials",
            &[("host", "169.254.170.23"), ("authorization", &token)],
        )
        .await;
    assert_eq!(good.status, StatusCode::OK);
    let doc = good.json();

    let lines = logs.lines_with(&["bad token", "signature"]).len();
    assert!(
        (20..=25).contains(&lines),
        "{lines} lines for 300 forged tokens:\n{}",
        logs.lines_with(&["container"]).join("\n")
    );
    assert_eq!(
        agent
            .metric(
                "imds_broker_container_credentials_requests_total",
                "code=\"403\",outcome=\"signature\""
            )
            .await,
        300.0,
        "every refusal is counted"
    );
    let text = logs.text();
    for (what, value) in [
        ("secret access key", doc["SecretAccessKey"].as_str().unwrap()),
        ("session token", doc["Token"].as_str().unwrap()),
    ] {
        assert!(!text.contains(value), "{what} in the logs");
    }
    assert!(!text.contains("eyJ"), "a presented token reached the logs");
}
