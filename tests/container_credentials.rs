//! The container-credentials endpoint (`--container-credentials`, `GET /v1/credentials`): the caller
//! is whoever the token it presents is bound to, checked against this node's pods, never its address;
//! the answer is the EKS Pod Identity agent's document, from the same per-pod cache as IMDS.

use http::StatusCode;

use crate::support::Cluster;
use crate::support::agent::{Agent, NODE, Reply};
use crate::support::fixtures::{ACCOUNT, pod, role, subject, token_request};
use crate::support::jwt::{Claims, Signer, tamper_payload};
use crate::support::kube::{ContainerFixture, PodFixture};

const AUDIENCE: &str = "pods.eks.amazonaws.com";
const HOST: &str = "169.254.170.23";

async fn token_of(cluster: &Cluster, pod: &PodFixture, name: &str) -> String {
    token_request(
        cluster.kube.client(),
        pod.namespace_str(),
        pod.service_account_str(),
        (name, pod.uid_str()),
        AUDIENCE,
    )
    .await
    .unwrap()
}

async fn credentials(agent: &Agent, source: &str, token: &str) -> Reply {
    agent
        .from(source)
        .get("/v1/credentials", &[("host", HOST), ("authorization", token)])
        .await
}

async fn outcome(agent: &Agent, code: &str, outcome: &str) -> f64 {
    agent
        .metric(
            "imds_broker_container_credentials_requests_total",
            &format!("code=\"{code}\",outcome=\"{outcome}\""),
        )
        .await
}

/// Adds `pod` (whose service account's tokens STS then trusts for `role_name`).
fn add_trusted(cluster: &Cluster, pod: &PodFixture, role_name: &str) {
    cluster.add_pod(pod);
    cluster.sts.trust(
        &role(role_name),
        &subject(pod.namespace_str(), pod.service_account_str()),
    );
}

/// How many times STS was asked for `role_name`.
fn assumed(cluster: &Cluster, role_name: &str) -> usize {
    cluster.sts.calls_for(&role(role_name))
}

#[tokio::test]
async fn a_pods_own_token_gets_its_role_as_the_eks_agent_answers_from_the_same_session_as_imds() {
    let cluster = Cluster::start().await;
    let app = pod("app-0", "127.0.23.10").role("reader");
    add_trusted(&cluster, &app, "reader");
    let agent = cluster.agent(&["--container-credentials"]).await;
    let token = token_of(&cluster, &app, "app-0").await;

    let reply = credentials(&agent, "127.0.23.10", &token).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.headers["content-type"], "application/json");
    let doc = reply.json();
    let text = reply.text();
    let fields = ["AccessKeyId", "SecretAccessKey", "Token", "AccountId", "Expiration"];
    let at: Vec<usize> = fields
        .iter()
        .map(|f| text.find(&format!("\"{f}\":")).unwrap())
        .collect();
    assert!(at.is_sorted(), "the EKS agent's fields, in its order: {at:?}");
    assert_eq!(doc.as_object().unwrap().len(), fields.len());
    assert_eq!(doc["AccountId"], ACCOUNT);
    let expiration = doc["Expiration"].as_str().unwrap();
    assert!(
        time::OffsetDateTime::parse(expiration, &time::format_description::well_known::Rfc3339).is_ok(),
        "{expiration}"
    );

    // IMDS from the same pod is served from the very same session: one exchange for both.
    let imds = agent
        .from("127.0.23.10")
        .get("/latest/meta-data/iam/security-credentials/reader", &[])
        .await;
    assert_eq!(imds.status, StatusCode::OK);
    assert_eq!(imds.json()["AccessKeyId"], doc["AccessKeyId"]);
    assert_eq!(assumed(&cluster, "reader"), 1);
    assert_eq!(outcome(&agent, "200", "ok").await, 1.0);
}

#[tokio::test]
async fn the_token_is_the_identity_whatever_address_presents_it() {
    let cluster = Cluster::start().await;
    let a = pod("a-0", "127.0.23.20").role("role-a").service_account("sa-a");
    let b = pod("b-0", "127.0.23.21").role("role-b").service_account("sa-b");
    add_trusted(&cluster, &a, "role-a");
    add_trusted(&cluster, &b, "role-b");
    let agent = cluster.agent(&["--container-credentials"]).await;
    let token_a = token_of(&cluster, &a, "a-0").await;

    let imds_key = |source: &'static str, role: &'static str| {
        let agent = &agent;
        async move {
            let path = format!("/latest/meta-data/iam/security-credentials/{role}");
            agent.from(source).get(&path, &[]).await.json()["AccessKeyId"].clone()
        }
    };
    let (key_a, key_b) = (
        imds_key("127.0.23.20", "role-a").await,
        imds_key("127.0.23.21", "role-b").await,
    );
    assert_ne!(key_a, key_b);

    // A's token from B's address: A's identity, never B's (as with EKS Pod Identity).
    let reply = credentials(&agent, "127.0.23.21", &token_a).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["AccessKeyId"], key_a, "A's session");
    // And from an address no pod has.
    let reply = credentials(&agent, "127.0.23.29", &token_a).await;
    assert_eq!(reply.json()["AccessKeyId"], key_a);
}

#[tokio::test]
async fn a_host_network_pod_is_served_by_its_token_and_never_by_its_address() {
    let cluster = Cluster::start().await;
    let host_pod = pod("node-agent-0", "127.0.23.1").host_network(true).role("node-agent");
    add_trusted(&cluster, &host_pod, "node-agent");
    let agent = cluster.agent(&["--container-credentials"]).await;
    let token = token_of(&cluster, &host_pod, "node-agent-0").await;

    let reply = credentials(&agent, "127.0.23.1", &token).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(assumed(&cluster, "node-agent"), 1);
    // The node's address identifies nobody on the IMDS side.
    let imds = agent
        .from("127.0.23.1")
        .get("/latest/meta-data/iam/security-credentials/", &[])
        .await;
    assert_eq!(imds.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn host_network_pods_are_not_prefetched() {
    let cluster = Cluster::start().await;
    let host_pod = pod("node-agent-1", "127.0.23.2").host_network(true).role("node-agent");
    let ordinary = pod("app-1", "127.0.23.30").role("app");
    cluster.add_pod(&host_pod);
    cluster.add_pod(&ordinary);
    let agent = cluster.agent(&["--container-credentials"]).await;
    // Ready means the initial prefetch was attempted: the ordinary pod's role, not the host pod's.
    assert_eq!(assumed(&cluster, "app"), 1);
    assert_eq!(assumed(&cluster, "node-agent"), 0);
    drop(agent);
}

#[tokio::test]
async fn bad_requests_and_foreign_tokens_get_the_eks_agents_statuses_and_nothing_else() {
    let cluster = Cluster::start().await;
    let app = pod("app-2", "127.0.23.40").role("reader");
    cluster.add_pod(&app);
    let agent = cluster.agent(&["--container-credentials"]).await;
    let token = token_of(&cluster, &app, "app-2").await;
    let caller = agent.from("127.0.23.40");
    let path = "/v1/credentials";

    // What, the headers sent, the status and the outcome label counted.
    type Case<'a> = (&'a str, Vec<(&'a str, String)>, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            "wrong Host",
            vec![
                ("host", "imds.attacker.example".into()),
                ("authorization", token.clone()),
            ],
            403,
            "wrong_host",
        ),
        (
            "IMDS's Host",
            vec![("host", "169.254.169.254".into()), ("authorization", token.clone())],
            403,
            "wrong_host",
        ),
        ("no token", vec![("host", HOST.into())], 400, "no_token"),
        (
            "empty token",
            vec![("host", HOST.into()), ("authorization", " ".into())],
            400,
            "no_token",
        ),
        (
            "not a JWT",
            vec![("host", HOST.into()), ("authorization", "hello".into())],
            400,
            "malformed",
        ),
        (
            "Bearer prefix",
            vec![("host", HOST.into()), ("authorization", format!("Bearer {token}"))],
            400,
            "malformed",
        ),
        (
            "claims edited",
            vec![
                ("host", HOST.into()),
                (
                    "authorization",
                    tamper_payload(&token, |c| c["kubernetes.io"]["pod"]["name"] = "other".into()),
                ),
            ],
            403,
            "signature",
        ),
    ];
    for (what, headers, status, label) in &cases {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let reply = caller.get(path, &headers).await;
        assert_eq!(reply.status.as_u16(), *status, "{what}: {}", reply.text());
        assert_eq!(reply.headers["content-type"], "text/plain; charset=utf-8", "{what}");
        assert!(!reply.text().contains("ASIA"), "{what}");
        assert!(
            outcome(&agent, &status.to_string(), label).await >= 1.0,
            "{what}: counted as {label}"
        );
    }

    // A token for STS (IRSA's audience) is not one for this endpoint.
    let for_sts = token_request(
        cluster.kube.client(),
        app.namespace_str(),
        app.service_account_str(),
        ("app-2", app.uid_str()),
        "sts.amazonaws.com",
    )
    .await
    .unwrap();
    assert_eq!(
        credentials(&agent, "127.0.23.40", &for_sts).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(outcome(&agent, "403", "audience").await, 1.0);

    // Forged: the right claims, signed by a key the cluster never published.
    let forged = Signer::other_key().sign(
        &Claims::new(
            &cluster.kube.issuer(),
            vec![AUDIENCE.into()],
            app.namespace_str(),
            app.service_account_str(),
            "sa-uid",
            3600,
        )
        .with_pod("app-2", app.uid_str())
        .with_node(NODE, "node-uid"),
    );
    let reply = credentials(&agent, "127.0.23.40", &forged).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
    assert_eq!(outcome(&agent, "403", "unknown_key").await, 1.0);
    assert_eq!(
        assumed(&cluster, "reader"),
        1,
        "only the prefetch: no refused request reached STS"
    );

    // Only GET.
    let reply = caller
        .request(
            http::Method::POST,
            path,
            &[("host", HOST), ("authorization", token.as_str())],
        )
        .await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(reply.headers["allow"], "GET");
}

#[tokio::test]
async fn tokens_of_pods_that_are_not_served_here_are_refused() {
    let cluster = Cluster::start().await;
    let elsewhere = pod("far-0", "10.9.9.9").node(Some("node-2")).role("reader");
    let gone = pod("gone-0", "127.0.23.51").role("reader");
    let finished = pod("done-0", "127.0.23.52").role("reader");
    let stopped = pod("stopped-0", "127.0.23.53")
        .role("reader")
        .restart_policy("Never")
        .container(ContainerFixture::Terminated(time::OffsetDateTime::now_utc(), 0));
    let no_role = pod("plain-0", "127.0.23.54");
    for p in [&elsewhere, &gone, &finished, &stopped, &no_role] {
        cluster.add_pod(p);
    }
    // Tokens the API server issued while each pod was there and running.
    let tokens = [
        token_of(&cluster, &elsewhere, "far-0").await,
        token_of(&cluster, &gone, "gone-0").await,
        token_of(&cluster, &finished, "done-0").await,
        token_of(&cluster, &stopped, "stopped-0").await,
        token_of(&cluster, &no_role, "plain-0").await,
    ];
    cluster.kube.delete_pod(gone.namespace_str(), "gone-0");
    cluster.add_pod(&finished.clone().phase("Succeeded"));
    let agent = cluster.agent(&["--container-credentials"]).await;

    let expected = [
        (403, "other_node"),
        (403, "not_on_node"),
        (403, "not_on_node"),
        (503, "held"),
        (403, "no_role"),
    ];
    for (token, (status, label)) in tokens.iter().zip(expected) {
        let reply = credentials(&agent, "127.0.23.50", token).await;
        assert_eq!(reply.status.as_u16(), status, "{label}: {}", reply.text());
        assert!(outcome(&agent, &status.to_string(), label).await >= 1.0, "{label}");
    }
    assert_eq!(assumed(&cluster, "reader"), 0, "nobody's credentials were obtained");
}

#[tokio::test]
async fn without_the_flag_the_path_is_not_served() {
    let cluster = Cluster::start().await;
    let app = pod("app-3", "127.0.23.60").role("reader");
    cluster.add_pod(&app);
    let agent = cluster.agent(&[]).await;
    let token = token_of(&cluster, &app, "app-3").await;
    let reply = credentials(&agent, "127.0.23.60", &token).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    let metrics = agent.metrics().await;
    assert!(!metrics.contains("imds_broker_container_credentials_requests_total"));
}
