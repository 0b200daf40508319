//! Shorthands for the roles, subjects and pods the topic tests use, on top of the kube double's
//! fixture builders.

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
