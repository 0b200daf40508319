//! Federation with AWS IAM from anywhere: publishing the cluster's service-account issuer where IAM
//! can fetch it ([`oidc`]), and the trust policies that let a workload identity assume a role
//! ([`trust_policy`]). Used by the `oidc` and `trust-policy` commands, never by the running agent.

pub mod oidc;
pub mod trust_policy;
