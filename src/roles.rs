//! Which IAM role a workload may use. Pure: no I/O, no clock.
//!
//! Order, first match wins:
//! 1. the pod annotation `iam.amazonaws.com/role` (kube2iam and kiam users): a full role ARN, or a role
//!    name (optionally with a path) appended to `--base-role-arn`;
//! 2. the service account annotation `eks.amazonaws.com/role-arn` (IRSA users): a full role ARN;
//! 3. `--default-role`, when set.
//!
//! An annotation that is present but invalid is an error, never a fall-through to a weaker source: a pod
//! whose owner asked for a specific role must not silently get another one. The node's own role is never
//! a candidate.

use crate::workload::{RoleArn, RoleArnError, Workload};

/// The pod annotation kube2iam and kiam read.
pub const POD_ANNOTATION: &str = "iam.amazonaws.com/role";
/// The service account annotation IRSA reads.
pub const SERVICE_ACCOUNT_ANNOTATION: &str = "eks.amazonaws.com/role-arn";

/// Why a workload's role could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The annotation's value is not a role ARN (nor a name to complete).
    #[error("annotation {annotation}={value:?} is not a valid IAM role: {reason}")]
    Invalid {
        /// Which annotation.
        annotation: &'static str,
        /// Its value, verbatim.
        value: String,
        /// What is wrong with it.
        #[source]
        reason: RoleArnError,
    },
    /// The pod names no role itself and its service account could not be decoded: whether it names
    /// one is unknown until it can be read again (a weaker source never stands in for it).
    #[error("service account {service_account} could not be decoded; its role annotation is unknown")]
    UnreadableServiceAccount {
        /// `namespace/name`.
        service_account: String,
    },
    /// A bare role name without `--base-role-arn` to complete it.
    #[error("annotation {annotation}={value:?} names a role but no --base-role-arn is configured")]
    NoBaseArn {
        /// Which annotation.
        annotation: &'static str,
        /// Its value, verbatim.
        value: String,
    },
}

impl Error {
    /// Whether an annotation's value is at fault (the pod owner's to fix), not the agent's view.
    pub fn is_annotation(&self) -> bool {
        matches!(self, Error::Invalid { .. } | Error::NoBaseArn { .. })
    }

    /// A closed label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Invalid { .. } => "invalid_annotation",
            Error::NoBaseArn { .. } => "no_base_arn",
            Error::UnreadableServiceAccount { .. } => "unreadable_service_account",
        }
    }
}

/// A validated `--base-role-arn`: `arn:<partition>:iam::<account>:role/` plus an optional path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseArn(String);

impl BaseArn {
    /// Accepts `arn:aws:iam::123456789012:role/` or `…:role/some/path/` (a missing final `/` is added).
    pub fn parse(value: &str) -> Result<Self, RoleArnError> {
        let mut base = value.to_owned();
        if !base.ends_with('/') {
            base.push('/');
        }
        // Validate by completing it with a placeholder name.
        RoleArn::parse(&format!("{base}x"))?;
        Ok(Self(base))
    }
}

/// Resolves workloads to roles.
#[derive(Debug, Clone, Default)]
pub struct Resolver {
    /// `--base-role-arn`.
    pub base: Option<BaseArn>,
    /// `--default-role`.
    pub default: Option<RoleArn>,
}

impl Resolver {
    /// The role `workload` may use, `Ok(None)` when it has none.
    pub fn resolve(&self, workload: &Workload) -> Result<Option<RoleArn>, Error> {
        if let Some(value) = &workload.pod_role {
            return self.resolve_pod_annotation(value).map(Some);
        }
        if workload.service_account_unreadable {
            return Err(Error::UnreadableServiceAccount {
                service_account: format!("{}/{}", workload.namespace, workload.service_account),
            });
        }
        if let Some(value) = &workload.service_account_role {
            return RoleArn::parse(value).map(Some).map_err(|reason| Error::Invalid {
                annotation: SERVICE_ACCOUNT_ANNOTATION,
                value: value.clone(),
                reason,
            });
        }
        Ok(self.default.clone())
    }

    fn resolve_pod_annotation(&self, value: &str) -> Result<RoleArn, Error> {
        let invalid = |reason| Error::Invalid {
            annotation: POD_ANNOTATION,
            value: value.to_owned(),
            reason,
        };
        if value.starts_with("arn:") {
            return RoleArn::parse(value).map_err(invalid);
        }
        let Some(base) = &self.base else {
            return Err(Error::NoBaseArn {
                annotation: POD_ANNOTATION,
                value: value.to_owned(),
            });
        };
        // kube2iam accepts a leading slash on names ("/app"); the path then comes from the base alone.
        let name = value.strip_prefix('/').unwrap_or(value);
        RoleArn::parse(&format!("{}{name}", base.0)).map_err(invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(pod_role: Option<&str>, sa_role: Option<&str>) -> Workload {
        Workload {
            uid: "uid-1".into(),
            namespace: "ns".into(),
            name: "pod".into(),
            service_account: "sa".into(),
            pod_role: pod_role.map(Into::into),
            service_account_role: sa_role.map(Into::into),
            service_account_unreadable: false,
            ips: vec![],
            running: true,
            running_since: None,
            terminating: false,
            host_network: false,
        }
    }

    fn resolver() -> Resolver {
        Resolver {
            base: Some(BaseArn::parse("arn:aws:iam::111111111111:role").unwrap()),
            default: None,
        }
    }

    const SA_ROLE: &str = "arn:aws:iam::222222222222:role/from-sa";

    #[test]
    fn the_pod_annotation_wins_over_the_service_account() {
        let role = resolver()
            .resolve(&workload(
                Some("arn:aws:iam::333333333333:role/from-pod"),
                Some(SA_ROLE),
            ))
            .unwrap();
        assert_eq!(role.unwrap().as_str(), "arn:aws:iam::333333333333:role/from-pod");
    }

    #[test]
    fn a_role_name_is_completed_with_the_base_arn() {
        let r = resolver();
        assert_eq!(
            r.resolve(&workload(Some("app"), None)).unwrap().unwrap().as_str(),
            "arn:aws:iam::111111111111:role/app"
        );
        assert_eq!(
            r.resolve(&workload(Some("/team/app"), None)).unwrap().unwrap().as_str(),
            "arn:aws:iam::111111111111:role/team/app"
        );
    }

    #[test]
    fn the_service_account_annotation_applies_without_a_pod_annotation() {
        let role = resolver().resolve(&workload(None, Some(SA_ROLE))).unwrap().unwrap();
        assert_eq!(role.as_str(), SA_ROLE);
    }

    #[test]
    fn without_annotations_the_default_role_or_nothing() {
        assert_eq!(resolver().resolve(&workload(None, None)).unwrap(), None);
        let with_default = Resolver {
            default: Some(RoleArn::parse("arn:aws:iam::111111111111:role/default").unwrap()),
            ..resolver()
        };
        assert_eq!(
            with_default.resolve(&workload(None, None)).unwrap().unwrap().name(),
            "default"
        );
    }

    #[test]
    fn an_invalid_pod_annotation_is_refused_not_skipped() {
        let err = resolver()
            .resolve(&workload(Some("arn:aws:iam::1:role/x"), Some(SA_ROLE)))
            .unwrap_err();
        assert_eq!(err.kind(), "invalid_annotation");
        let err = resolver()
            .resolve(&workload(Some("bad name"), Some(SA_ROLE)))
            .unwrap_err();
        assert!(matches!(
            err,
            Error::Invalid {
                annotation: POD_ANNOTATION,
                ..
            }
        ));
    }

    #[test]
    fn an_invalid_service_account_annotation_is_refused_not_defaulted() {
        let with_default = Resolver {
            default: Some(RoleArn::parse("arn:aws:iam::111111111111:role/default").unwrap()),
            ..resolver()
        };
        let err = with_default.resolve(&workload(None, Some("not-an-arn"))).unwrap_err();
        assert!(matches!(
            err,
            Error::Invalid {
                annotation: SERVICE_ACCOUNT_ANNOTATION,
                ..
            }
        ));
    }

    #[test]
    fn a_role_name_without_a_base_arn_is_refused() {
        let err = Resolver::default().resolve(&workload(Some("app"), None)).unwrap_err();
        assert_eq!(err.kind(), "no_base_arn");
    }

    #[test]
    fn base_arns_are_validated() {
        assert!(BaseArn::parse("arn:aws:iam::111111111111:role/").is_ok());
        assert!(BaseArn::parse("arn:aws:iam::111111111111:role/path").is_ok());
        assert!(BaseArn::parse("arn:aws:iam::111:role/").is_err());
        assert!(BaseArn::parse("arn:aws:iam::111111111111:user/").is_err());
    }
}
