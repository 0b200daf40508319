//! Refusals: every kind of bad input gets its defined answer, and nobody gets credentials that are not
//! their own.

use http::{Method, StatusCode};

use crate::support::Cluster;
use crate::support::agent::eventually;
use crate::support::fixtures::{pod, role, service_account};

const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

#[tokio::test]
async fn an_unknown_ip_gets_404_after_the_bounded_wait() {
    let cluster = Cluster::start().await;
    let agent = cluster.agent(&["--pod-wait", "100ms"]).await;
    let reply = agent.from("127.0.0.30").get(CREDS, &[]).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert!(reply.text().contains("404 - Not Found"));
}

#[tokio::test]
async fn a_pod_without_a_role_gets_404_and_no_sts_call() {
    let cluster = Cluster::start().await;
    cluster.add_pod(&pod("plain", "127.0.0.31"));
    let agent = cluster.agent(&[]).await;
    let caller = agent.from("127.0.0.31");
    assert_eq!(caller.get(CREDS, &[]).await.status, StatusCode::NOT_FOUND);
    assert_eq!(
        caller.get(&format!("{CREDS}anything"), &[]).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        caller.get("/latest/meta-data/iam/info", &[]).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(cluster.sts.calls(), 0);
    assert_eq!(cluster.kube.token_request_count(), 0);
}

#[tokio::test]
async fn a_malformed_annotation_is_refused_not_replaced_by_another_role() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("from-sa"));
    cluster.add_service_account(&service_account("apps", "app", Some(&role("from-sa"))));
    cluster.add_pod(
        &pod("bad", "127.0.0.32")
            .service_account("app")
            .role("arn:aws:iam::12:role/x"),
    );
    let agent = cluster.agent(&["--default-role", &role("fallback")]).await;
    let caller = agent.from("127.0.0.32");
    assert_eq!(caller.get(CREDS, &[]).await.status, StatusCode::NOT_FOUND);
    assert_eq!(
        caller.get(&format!("{CREDS}from-sa"), &[]).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        caller.get(&format!("{CREDS}fallback"), &[]).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(cluster.sts.calls(), 0);
}

#[tokio::test]
async fn host_network_pods_are_never_served() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("app"));
    let host = pod("host", "127.0.0.33").role("app").host_network(true);
    cluster.add_pod(&host);
    let agent = cluster.agent(&["--pod-wait", "50ms"]).await;
    assert_eq!(
        agent.from("127.0.0.33").get(CREDS, &[]).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(cluster.sts.calls(), 0);
}

#[tokio::test]
async fn an_sts_refusal_is_a_non_success_document_naming_the_error() {
    let cluster = Cluster::start().await;
    // The role does not trust this pod's service account.
    cluster.sts.trust(&role("app"), "system:serviceaccount:other:other");
    cluster.add_pod(&pod("p", "127.0.0.34").role("app"));
    let agent = cluster.agent(&[]).await;
    let reply = agent.from("127.0.0.34").get(&format!("{CREDS}app"), &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    let doc = reply.json();
    assert_eq!(doc["Code"], "AssumeRoleUnauthorizedAccess");
    assert!(doc["Message"].as_str().unwrap().contains("AccessDenied"), "{doc}");
    assert!(doc.get("AccessKeyId").is_none());
    assert!(doc.get("Token").is_none());
}

#[tokio::test]
async fn an_sts_outage_is_503_so_sdks_retry() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("app"));
    cluster.sts.set_failure(Some((503, "ServiceUnavailable")));
    cluster.add_pod(&pod("p", "127.0.0.35").role("app").phase("Pending"));
    let agent = cluster.agent(&[]).await;
    let caller = agent.from("127.0.0.35");
    let reply = caller.get(&format!("{CREDS}app"), &[]).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    // Once STS is back, a request after the (remembered, backed-off) failure succeeds.
    cluster.sts.set_failure(None);
    eventually("credentials once STS is back", || async {
        caller.get(&format!("{CREDS}app"), &[]).await.status == StatusCode::OK
    })
    .await;
}

#[tokio::test]
async fn a_refused_token_request_is_a_non_success_document() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("app"));
    cluster.kube.set_token_failure(Some(403));
    cluster.add_pod(&pod("p", "127.0.0.36").role("app").phase("Pending"));
    let agent = cluster.agent(&[]).await;
    let doc = agent.from("127.0.0.36").get(&format!("{CREDS}app"), &[]).await.json();
    assert_eq!(doc["Code"], "AssumeRoleUnauthorizedAccess");
    assert!(doc["Message"].as_str().unwrap().contains("TokenRequest 403"), "{doc}");
    assert_eq!(cluster.sts.calls(), 0);
}

#[tokio::test]
async fn an_api_server_failure_on_token_request_is_503() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("app"));
    cluster.kube.set_token_failure(Some(500));
    cluster.add_pod(&pod("p", "127.0.0.37").role("app").phase("Pending"));
    let agent = cluster.agent(&[]).await;
    let reply = agent.from("127.0.0.37").get(&format!("{CREDS}app"), &[]).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn the_token_put_echoes_its_ttl_and_checks_its_bounds() {
    let cluster = Cluster::start().await;
    let agent = cluster.agent(&[]).await;
    let caller = agent.from("127.0.0.38");
    let reply = caller.token("21600").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.headers["x-aws-ec2-metadata-token-ttl-seconds"], "21600");
    assert_eq!(reply.text().len(), 56);
    for bad in ["0", "21601", "abc", ""] {
        assert_eq!(caller.token(bad).await.status, StatusCode::BAD_REQUEST, "ttl {bad:?}");
    }
    let missing = caller.request(Method::PUT, "/latest/api/token", &[]).await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    let forwarded = caller
        .request(
            Method::PUT,
            "/latest/api/token",
            &[
                ("x-aws-ec2-metadata-token-ttl-seconds", "60"),
                ("x-forwarded-for", "10.0.0.1"),
            ],
        )
        .await;
    assert_eq!(forwarded.status, StatusCode::FORBIDDEN);
    assert!(forwarded.body.is_empty());
    let get = caller.get("/latest/api/token", &[]).await;
    assert_eq!(get.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(get.headers["allow"], "OPTIONS, PUT");
}

#[tokio::test]
async fn garbage_tokens_and_tokens_from_another_ip_get_401() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("app"));
    cluster.add_pod(&pod("a", "127.0.0.39").role("app"));
    cluster.add_pod(&pod("b", "127.0.0.40").role("app"));
    let agent = cluster.agent(&[]).await;
    let a = agent.from("127.0.0.39");
    let b = agent.from("127.0.0.40");
    let token = a.token("60").await.text();
    assert_eq!(
        a.get(CREDS, &[("x-aws-ec2-metadata-token", &token)]).await.text(),
        "app"
    );
    let stolen = b.get(CREDS, &[("x-aws-ec2-metadata-token", &token)]).await;
    assert_eq!(stolen.status, StatusCode::UNAUTHORIZED);
    for garbage in ["garbage", "", &"A".repeat(56), &"x".repeat(4000)] {
        let reply = a.get(CREDS, &[("x-aws-ec2-metadata-token", garbage)]).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{garbage:?}");
    }
}

#[tokio::test]
async fn with_imdsv2_required_token_less_requests_get_401() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("app"));
    cluster.add_pod(&pod("a", "127.0.0.41").role("app"));
    let agent = cluster.agent(&["--imdsv2", "required"]).await;
    let caller = agent.from("127.0.0.41");
    assert_eq!(caller.get(CREDS, &[]).await.status, StatusCode::UNAUTHORIZED);
    let token = caller.token("60").await.text();
    assert_eq!(
        caller.get(CREDS, &[("x-aws-ec2-metadata-token", &token)]).await.text(),
        "app"
    );
}

#[tokio::test]
async fn hostile_paths_are_rejected() {
    let cluster = Cluster::start().await;
    cluster.add_pod(&pod("a", "127.0.0.42").role("app"));
    let agent = cluster.agent(&[]).await;
    let caller = agent.from("127.0.0.42");
    for path in [
        "/latest/meta-data/iam/security-credentials/../../user-data",
        "/latest/meta-data/iam/security-credentials/%2e%2e/app",
        "/latest/meta-data/iam/security-credentials%2Fapp",
    ] {
        assert_eq!(caller.get(path, &[]).await.status, StatusCode::BAD_REQUEST, "{path}");
    }
    let post = caller.request(Method::POST, CREDS, &[]).await;
    assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn two_live_pods_claiming_one_ip_are_both_refused() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("a"));
    cluster.sts.trust_any(&role("b"));
    cluster.add_pod(&pod("a", "127.0.0.43").role("a"));
    cluster.add_pod(&pod("b", "127.0.0.43").role("b"));
    let agent = cluster.agent(&[]).await;
    // Contested, not final: one of them is about to go, so SDKs should retry.
    assert_eq!(
        agent.from("127.0.0.43").get(CREDS, &[]).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[tokio::test]
async fn a_session_longer_than_the_roles_maximum_is_a_non_success_document_naming_the_error() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("app"));
    cluster.sts.set_max_session_duration(3600);
    cluster.add_pod(&pod("p", "127.0.0.44").role("app").phase("Pending"));
    let agent = cluster.agent(&["--session-duration", "7200"]).await;
    let doc = agent.from("127.0.0.44").get(&format!("{CREDS}app"), &[]).await.json();
    assert_eq!(doc["Code"], "AssumeRoleUnauthorizedAccess");
    assert!(doc["Message"].as_str().unwrap().contains("ValidationError"), "{doc}");
}

#[tokio::test]
async fn deleting_a_service_account_takes_its_role_from_its_pods() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("irsa"));
    cluster.add_service_account(&service_account("apps", "irsa", Some(&role("irsa"))));
    cluster.add_pod(&pod("p", "127.0.0.45").service_account("irsa"));
    let agent = cluster.agent(&[]).await;
    let caller = agent.from("127.0.0.45");
    assert_eq!(caller.get(CREDS, &[]).await.text(), "irsa");
    cluster.kube.delete_service_account("apps", "irsa");
    eventually("the role is gone with its service account", || async {
        caller.get(CREDS, &[]).await.status == StatusCode::NOT_FOUND
    })
    .await;
}

/// A connection from `source` to the agent that sends nothing.
async fn idle_connection(agent: &crate::support::agent::Agent, source: &str) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(std::net::SocketAddr::new(source.parse().unwrap(), 0))
        .unwrap();
    socket.connect(agent.imds).await.unwrap()
}

/// Whether the agent closes `stream` without answering.
async fn closed_by_agent(mut stream: tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 16];
    matches!(
        tokio::time::timeout(std::time::Duration::from_secs(3), stream.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test]
async fn one_address_cannot_hold_more_connections_than_its_share_nor_all_more_than_the_total() {
    let cluster = Cluster::start().await;
    cluster.sts.trust_any(&role("app"));
    cluster.add_pod(&pod("p", "127.0.0.46").role("app"));
    let agent = cluster
        .agent(&["--max-connections-per-ip", "4", "--max-connections", "8"])
        .await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(idle_connection(&agent, "127.0.0.46").await);
    }
    assert!(
        closed_by_agent(idle_connection(&agent, "127.0.0.46").await).await,
        "a fifth from one pod"
    );
    // Others are unaffected.
    assert_eq!(
        agent.from("127.0.0.47").get(CREDS, &[]).await.status,
        StatusCode::NOT_FOUND
    );
    assert!(
        agent
            .metric("imds_broker_imds_connections_refused_total", "limit=\"per_ip\"")
            .await
            >= 1.0
    );
    // Everyone together: 4 + 4 from elsewhere fill the total.
    for source in ["127.0.0.48", "127.0.0.48", "127.0.0.49", "127.0.0.49"] {
        held.push(idle_connection(&agent, source).await);
    }
    assert!(
        closed_by_agent(idle_connection(&agent, "127.0.0.50").await).await,
        "past the total"
    );
    assert!(
        agent
            .metric("imds_broker_imds_connections_refused_total", "limit=\"total\"")
            .await
            >= 1.0
    );
    // A closed connection frees its slot.
    held.truncate(3);
    eventually("the pod is served again", || async {
        agent.metric("imds_broker_imds_connections_open", "").await <= 3.0
    })
    .await;
    assert_eq!(agent.from("127.0.0.46").get(CREDS, &[]).await.text(), "app");
}
