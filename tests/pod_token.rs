//! Pod tokens as the API server issues them: the agent's verifier (`imds_broker::pod_token`) accepts a
//! pod-bound token the kube double mints through TokenRequest, against the keys the double publishes at
//! `/openid/v1/jwks`, and names exactly the pod it is bound to; the key source follows a key rotation
//! with one fetch and bounds what tokens with made-up key ids cost the API server.

use imds_broker::pod_token::{Error, Expect, KeySource, Keys, MIN_REFETCH, SourceError, verify};

use crate::support::Cluster;
use crate::support::fixtures::{pod, token_request};
use crate::support::jwt::now_unix;
use crate::support::kube::PodFixture;

async fn mint(cluster: &Cluster, audience: &str, fixture: &PodFixture) -> String {
    let (namespace, service_account) = (fixture.namespace_str(), fixture.service_account_str());
    let pod = ("app-0", fixture.uid_str());
    token_request(cluster.kube.client(), namespace, service_account, pod, audience)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_token_the_api_server_binds_to_a_pod_verifies_against_its_published_keys() {
    let cluster = Cluster::start().await;
    let fixture = pod("app-0", "127.0.1.20");
    cluster.add_pod(&fixture);
    let token = mint(&cluster, "pods.eks.amazonaws.com", &fixture).await;
    let keys = Keys::from_jwks(cluster.kube.jwks().to_string().as_bytes()).unwrap();
    let expect = Expect {
        issuer: cluster.kube.issuer(),
        audience: "pods.eks.amazonaws.com".into(),
    };
    let claims = verify(&token, &keys, &expect, now_unix()).unwrap();
    assert_eq!(
        (
            claims.namespace.as_str(),
            claims.pod_name.as_str(),
            claims.pod_uid.as_str()
        ),
        (fixture.namespace_str(), "app-0", fixture.uid_str())
    );
    assert_eq!(claims.service_account, fixture.service_account_str());

    let for_sts = mint(&cluster, "sts.amazonaws.com", &fixture).await;
    assert_eq!(
        verify(&for_sts, &keys, &expect, now_unix()),
        Err(Error::Audience("pods.eks.amazonaws.com".into()))
    );
}

fn jwks_fetches(cluster: &Cluster) -> usize {
    cluster
        .kube
        .request_log()
        .iter()
        .filter(|line| line.contains("/openid/v1/jwks"))
        .count()
}

#[tokio::test(start_paused = true)]
async fn rotated_keys_are_fetched_once_and_made_up_key_ids_cost_one_fetch_per_interval() {
    let cluster = Cluster::start().await;
    let fixture = pod("app-0", "127.0.1.21");
    cluster.add_pod(&fixture);
    let source = KeySource::new(cluster.kube.client());
    let expect = Expect {
        issuer: cluster.kube.issuer(),
        audience: "pods.eks.amazonaws.com".into(),
    };
    let first = mint(&cluster, "pods.eks.amazonaws.com", &fixture).await;
    assert!(source.verify(&first, &expect, now_unix()).await.is_ok());
    assert!(source.verify(&first, &expect, now_unix()).await.is_ok());
    assert_eq!(jwks_fetches(&cluster), 1, "fetched on first use, then held");

    tokio::time::advance(MIN_REFETCH).await;
    cluster.kube.rotate_signer();
    let rotated = mint(&cluster, "pods.eks.amazonaws.com", &fixture).await;
    assert!(
        source.verify(&rotated, &expect, now_unix()).await.is_ok(),
        "the new key, fetched"
    );
    assert!(
        source.verify(&first, &expect, now_unix()).await.is_ok(),
        "the old key, still published"
    );
    assert_eq!(jwks_fetches(&cluster), 2);

    // A token naming a key nobody has: refused, and a flood of them costs at most one fetch per
    // interval (this one comes too soon after the rotation's).
    let made_up = cluster.kube.signer().sign_value(
        &serde_json::json!({ "alg": "RS256", "kid": "made-up" }),
        &serde_json::json!({}),
    );
    for _ in 0..50 {
        assert!(matches!(
            source.verify(&made_up, &expect, now_unix()).await,
            Err(SourceError::Token(Error::UnknownKey(_)))
        ));
    }
    assert_eq!(jwks_fetches(&cluster), 2);
    tokio::time::advance(MIN_REFETCH).await;
    assert!(source.verify(&made_up, &expect, now_unix()).await.is_err());
    assert_eq!(jwks_fetches(&cluster), 3);
}
