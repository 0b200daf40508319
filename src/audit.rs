//! The audit trail: one log line per credential STS issued for a pod (not per request served; a
//! session obtained for a pod that went meanwhile, and so handed to nobody, is logged too), on the tracing
//! target [`TARGET`] so that log pipelines can route it apart (`--log imds_broker::audit=info`, or a
//! filter on the JSON `target` field).
//!
//! The line joins with CloudTrail: `session_name` is the last segment of `userIdentity.arn`
//! (`assumed-role/<role>/<session>`) and `access_key_id` is `userIdentity.accessKeyId` of every call
//! made with these credentials. It never carries the secret access key, the session token or the
//! service-account token.

use time::format_description::well_known::Rfc3339;

use crate::sts;
use crate::workload::{Credentials, RoleArn, Workload};

/// The tracing target of audit lines.
pub const TARGET: &str = "imds_broker::audit";

/// Logs that `credentials` for `role` were issued to `workload`, obtained because of `cause`
/// (`prefetch`, `request` or `refresh`).
pub fn issued(workload: &Workload, role: &RoleArn, cause: &'static str, credentials: &Credentials) {
    let expiration = credentials
        .expiration
        .format(&Rfc3339)
        .unwrap_or_else(|_| credentials.expiration.unix_timestamp().to_string());
    tracing::info!(
        target: TARGET,
        pod_namespace = %workload.namespace,
        pod_name = %workload.name,
        pod_uid = %workload.uid,
        service_account = %workload.service_account,
        role_arn = %role,
        session_name = %sts::session_name(&workload.namespace, &workload.name),
        access_key_id = %credentials.access_key_id,
        expiration = %expiration,
        cause,
        "credentials issued"
    );
}
