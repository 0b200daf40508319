//! Pod tokens as the API server issues them: the agent's verifier (`imds_broker::pod_token`) accepts a
//! pod-bound token the kube double mints through TokenRequest, against the keys the double publishes at
//! `/openid/v1/jwks`, and names exactly the pod it is bound to.

use imds_broker::pod_token::{Error, Expect, Keys, verify};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;

use crate::support::Cluster;
use crate::support::fixtures::pod;
use crate::support::jwt::now_unix;
use crate::support::kube::PodFixture;

async fn mint(cluster: &Cluster, audience: &str, fixture: &PodFixture) -> String {
    let api: kube::Api<ServiceAccount> = kube::Api::namespaced(cluster.kube.client(), fixture.namespace_str());
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec![audience.to_owned()]),
            expiration_seconds: Some(3600),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some("app-0".into()),
                uid: Some(fixture.uid_str().into()),
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let answer = api
        .create_token_request(fixture.service_account_str(), &Default::default(), &request)
        .await
        .unwrap();
    answer.status.unwrap().token.unwrap()
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
