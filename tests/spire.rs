//! `--identity-source spire`: the agent asks the SPIRE agent double (Delegated Identity API on a Unix
//! socket) for the calling pod's JWT-SVID and exchanges it at the STS double, which trusts the SPIRE
//! OIDC discovery provider's keys (read as IAM reads them) and the trust policy `trust-policy
//! --spiffe-id` prints.

use std::path::PathBuf;

use http::StatusCode;
use serde_json::Value;

use crate::support::agent::{Agent, eventually};
use crate::support::fixtures::{ACCOUNT, role};
use crate::support::spire::{self, FakeSpire};
use crate::support::{Cluster, jwt, kube, sts};

const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

/// A fresh directory for the admin socket (removed on drop).
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "imds-spire-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The SPIRE double, the kube double, and an STS double trusting the SPIRE discovery provider.
async fn start(dir: &TempDir) -> (FakeSpire, Cluster) {
    let spire = FakeSpire::start(&dir.0.join("admin.sock")).await.unwrap();
    let (issuer, jwks) = spire::discover(&spire.discovery_url()).await;
    assert_eq!(issuer, spire::ISSUER);
    let kube = kube::FakeKube::start().await;
    let sts = sts::FakeSts::start(&jwks, &issuer).await;
    (spire, Cluster { kube, sts })
}

async fn agent(cluster: &Cluster, spire: &FakeSpire) -> Agent {
    let socket = spire.socket().to_str().unwrap().to_owned();
    cluster
        .agent(&["--identity-source", "spire", "--spire-admin-socket", &socket])
        .await
}

/// `trust-policy --issuer <SPIRE's> --spiffe-id ID --account ACCOUNT`, from the binary.
async fn spiffe_trust_policy(id: &str) -> Value {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_imds-broker"))
        .args([
            "trust-policy",
            "--issuer",
            spire::ISSUER,
            "--spiffe-id",
            id,
            "--account",
            ACCOUNT,
        ])
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}

fn selectors_of(pod: &kube::PodFixture, service_account: &str) -> Vec<String> {
    vec![
        format!("k8s:ns:{}", pod.namespace_str()),
        format!("k8s:sa:{service_account}"),
        format!("k8s:pod-uid:{}", pod.uid_str()),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_gets_its_role_through_a_jwt_svid_whose_sub_is_its_spiffe_id() {
    let dir = TempDir::new();
    let (spire, cluster) = start(&dir).await;
    let id = spire::spiffe_id("apps", "api");
    spire.register(&["k8s:ns:apps", "k8s:sa:api"], &id);
    cluster.sts.trust_policy(&role("api"), spiffe_trust_policy(&id).await);

    let registered = kube::pod("apps", "api-1")
        .ip("127.0.11.1")
        .service_account("api")
        .role("api");
    let unregistered = kube::pod("apps", "batch-1")
        .ip("127.0.11.2")
        .service_account("batch")
        .role("api");
    cluster.add_pod(&registered);
    cluster.add_pod(&unregistered);
    let agent = agent(&cluster, &spire).await;

    let reply = agent.from("127.0.11.1").get(&format!("{CREDS}api"), &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["Code"], "Success", "{}", reply.text());
    let issued = cluster.sts.issued();
    assert_eq!(issued.len(), 1, "{issued:?}");
    assert_eq!(issued[0].sub, id);

    // No registration entry matches: 503, a registration may be created moments later.
    let reply = agent.from("127.0.11.2").get(&format!("{CREDS}api"), &[]).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{}", reply.text());
    assert_eq!(cluster.sts.issued().len(), 1, "an unregistered pod reached STS");
    assert!(
        agent
            .metric(
                "imds_broker_sa_token_request_duration_seconds_count",
                "outcome=\"svid_none\""
            )
            .await
            >= 1.0
    );
    eventually("a SpireNoRegistration Event on batch-1", || async {
        cluster
            .kube
            .events()
            .iter()
            .any(|e| e["regarding"]["name"] == "batch-1" && e["reason"] == "SpireNoRegistration")
    })
    .await;

    // Every call named exactly one of the calling pods, for the STS audience.
    let fetches = spire.fetches();
    let want = [selectors_of(&registered, "api"), selectors_of(&unregistered, "batch")];
    assert!(fetches.iter().any(|f| f.selectors == want[0]), "{fetches:?}");
    assert!(fetches.iter().any(|f| f.selectors == want[1]), "{fetches:?}");
    for fetch in &fetches {
        assert!(want.contains(&fetch.selectors), "{fetch:?}");
        assert_eq!(fetch.audience, [jwt::STS_AUDIENCE]);
    }
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_that_is_not_an_authorized_delegate_is_refused_and_no_token_reaches_sts() {
    let dir = TempDir::new();
    let (spire, cluster) = start(&dir).await;
    let id = spire::spiffe_id("apps", "api");
    spire.register(&["k8s:ns:apps", "k8s:sa:api"], &id);
    cluster.sts.trust_policy(&role("api"), spiffe_trust_policy(&id).await);
    spire.deny(true);
    cluster.add_pod(
        &kube::pod("apps", "api-1")
            .ip("127.0.11.3")
            .service_account("api")
            .role("api"),
    );
    let agent = agent(&cluster, &spire).await;

    let reply = agent.from("127.0.11.3").get(&format!("{CREDS}api"), &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["Code"], "AssumeRoleUnauthorizedAccess", "{}", reply.text());
    assert!(reply.text().contains("svid_denied"), "{}", reply.text());
    assert_eq!(cluster.sts.calls(), 0);
    assert!(!spire.fetches().is_empty(), "the SPIRE agent was never asked");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_svid_for_a_subject_the_role_does_not_trust_is_refused_by_sts() {
    let dir = TempDir::new();
    let (spire, cluster) = start(&dir).await;
    spire.register(&["k8s:ns:apps"], &spire::spiffe_id("apps", "someone-else"));
    let trusted = spire::spiffe_id("apps", "api");
    cluster
        .sts
        .trust_policy(&role("api"), spiffe_trust_policy(&trusted).await);
    cluster.add_pod(
        &kube::pod("apps", "api-1")
            .ip("127.0.11.4")
            .service_account("api")
            .role("api"),
    );
    let agent = agent(&cluster, &spire).await;

    let reply = agent.from("127.0.11.4").get(&format!("{CREDS}api"), &[]).await;
    assert_eq!(reply.json()["Code"], "AssumeRoleUnauthorizedAccess", "{}", reply.text());
    assert!(cluster.sts.issued().is_empty());
    assert!(cluster.sts.calls() >= 1, "STS was never asked");
    agent.stop().await;
}
