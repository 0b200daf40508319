//! Shorthands for the roles, subjects and pods the topic tests use, on top of the kube double's
//! fixture builders.

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;

use super::kube::{self, PodFixture, ServiceAccountFixture};

/// Account id used by every test role.
pub const ACCOUNT: &str = "111111111111";

/// `arn:aws:iam::111111111111:role/<name>`.
pub fn role(name: &str) -> String {
    format!("arn:aws:iam::{ACCOUNT}:role/{name}")
}

/// `system:serviceaccount:<ns>:<sa>`, the `sub` STS trusts.
pub fn subject(namespace: &str, service_account: &str) -> String {
    format!("system:serviceaccount:{namespace}:{service_account}")
}

/// A running pod named `name` in namespace `apps` on the test node, with the single IP `ip`.
pub fn pod(name: &str, ip: &str) -> PodFixture {
    kube::pod("apps", name).ip(ip)
}

/// A service account in `namespace`, with the IRSA annotation when `role_arn` is given.
pub fn service_account(namespace: &str, name: &str, role_arn: Option<&str>) -> ServiceAccountFixture {
    let account = kube::service_account(namespace, name);
    match role_arn {
        Some(arn) => account.role_arn(arn),
        None => account,
    }
}

/// A token for service account `namespace/service_account` bound to pod `pod` (UID `uid`), through
/// the TokenRequest API, valid for an hour.
pub async fn token_request(
    client: ::kube::Client,
    namespace: &str,
    service_account: &str,
    (pod, uid): (&str, &str),
    audience: &str,
) -> Result<String, ::kube::Error> {
    let api: ::kube::Api<ServiceAccount> = ::kube::Api::namespaced(client, namespace);
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec![audience.to_owned()]),
            expiration_seconds: Some(3600),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod.into()),
                uid: Some(uid.into()),
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let answer = api
        .create_token_request(service_account, &Default::default(), &request)
        .await?;
    Ok(answer
        .status
        .and_then(|s| s.token)
        .expect("a created TokenRequest has a token"))
}
