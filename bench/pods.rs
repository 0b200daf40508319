//! Simulated pods: their loopback addresses, namespaces, service accounts and roles, and the API
//! objects the kube double serves for them.
//!
//! Each scenario draws its pods from its own `127.<block>.x.y` range, so no address is ever reused
//! across scenarios; every address of 127.0.0.0/8 is local on Linux, no setup is needed.

use std::net::{IpAddr, Ipv4Addr};

use serde_json::{Value, json};

use crate::agent::NODE;

/// How a pod names its role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoleSource {
    /// Through its service account's `eks.amazonaws.com/role-arn` annotation.
    ServiceAccount,
    /// Through its own `iam.amazonaws.com/role` annotation (a role name under the base ARN).
    Annotation(String),
}

/// One simulated pod.
#[derive(Debug, Clone)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub ip: IpAddr,
    pub service_account: String,
    pub role: RoleSource,
}

/// The role a service account `sa` in `namespace` maps to.
pub fn sa_role_name(namespace: &str, sa: &str) -> String {
    format!("{namespace}-{sa}")
}

/// The address of pod `i` in range `block` (1..=254): `127.block.(i / 250).(i % 250 + 1)`.
pub fn address(block: u8, i: usize) -> IpAddr {
    assert!(i < 250 * 256, "at most 64000 pods per range");
    IpAddr::V4(Ipv4Addr::new(127, block, (i / 250) as u8, (i % 250 + 1) as u8))
}

/// `count` pods in range `block`, spread round-robin over `namespaces` namespaces of `accounts`
/// service accounts each, every pod taking its role from its service account.
pub fn spread(prefix: &str, block: u8, count: usize, namespaces: usize, accounts: usize) -> Vec<Pod> {
    (0..count)
        .map(|i| {
            let slot = i % (namespaces * accounts);
            Pod {
                namespace: format!("{prefix}-ns{}", slot / accounts),
                name: format!("{prefix}-pod-{i}"),
                uid: format!("{prefix}-uid-{i}"),
                ip: address(block, i),
                service_account: format!("sa{}", slot % accounts),
                role: RoleSource::ServiceAccount,
            }
        })
        .collect()
}

impl Pod {
    /// The role name this pod is given.
    pub fn role_name(&self) -> String {
        match &self.role {
            RoleSource::ServiceAccount => sa_role_name(&self.namespace, &self.service_account),
            RoleSource::Annotation(name) => name.clone(),
        }
    }

    /// The path of this pod's role document.
    pub fn credentials_path(&self) -> String {
        format!("/latest/meta-data/iam/security-credentials/{}", self.role_name())
    }

    /// The pod object, running with its IP set.
    pub fn json(&self) -> Value {
        let annotations = match &self.role {
            RoleSource::ServiceAccount => json!({}),
            RoleSource::Annotation(name) => json!({ "iam.amazonaws.com/role": name }),
        };
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "uid": self.uid,
                "annotations": annotations,
            },
            "spec": {
                "nodeName": NODE,
                "serviceAccountName": self.service_account,
                "containers": [{ "name": "app", "image": "app:1" }],
            },
            "status": {
                "phase": "Running",
                "podIP": self.ip.to_string(),
                "podIPs": [{ "ip": self.ip.to_string() }],
            },
        })
    }
}

/// The service account `name` in `namespace`, annotated with its role.
pub fn service_account(namespace: &str, name: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": format!("sa-uid-{namespace}-{name}"),
            "annotations": {
                "eks.amazonaws.com/role-arn": format!("{}{}", crate::agent::BASE_ARN, sa_role_name(namespace, name)),
            },
        },
    })
}

/// What the API server adds to every object it stores through server-side or client-side apply: one
/// `managedFields` entry, about as long as a real one for a small object.
fn managed_fields(manager: &str) -> Value {
    json!([{
        "manager": manager,
        "operation": "Update",
        "apiVersion": "v1",
        "time": "2026-01-01T00:00:00Z",
        "fieldsType": "FieldsV1",
        "fieldsV1": { "f:metadata": { "f:labels": { ".": {}, "f:app.kubernetes.io/name": {}, "f:app.kubernetes.io/part-of": {} } } },
    }])
}

/// Service account `i` of the rest of the cluster (none of this node's pods uses it), in one of 500
/// namespaces, shaped like a real one (labels, a managedFields entry); with its IRSA annotation when
/// `annotated`.
pub fn elsewhere_service_account(i: usize, annotated: bool) -> Value {
    let namespace = format!("team-{}", i % 500);
    let name = format!("app-{i}");
    let mut annotations = json!({});
    if annotated {
        annotations[crate::support::kube::SA_ROLE_ANNOTATION] =
            json!(format!("{}{}", crate::agent::BASE_ARN, sa_role_name(&namespace, &name)));
    }
    json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": { "app.kubernetes.io/name": name, "app.kubernetes.io/part-of": namespace },
            "annotations": annotations,
            "managedFields": managed_fields("kubectl-client-side-apply"),
        },
    })
}

/// Namespace `i` of the rest of the cluster, shaped like a real one (the name label, the finalizer,
/// a managedFields entry), without the IMDSv2 annotation.
pub fn elsewhere_namespace(i: usize) -> Value {
    let name = format!("elsewhere-{i}");
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": name,
            "namespace": "",
            "labels": { "kubernetes.io/metadata.name": name, "app.kubernetes.io/part-of": "platform" },
            "managedFields": managed_fields("kube-apiserver"),
        },
        "spec": { "finalizers": ["kubernetes"] },
        "status": { "phase": "Active" },
    })
}
