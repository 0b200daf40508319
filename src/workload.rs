//! The vocabulary every other module speaks: who is calling (a [`Workload`]), which role it may use
//! (a [`RoleArn`]), and what it gets ([`Credentials`]).
//!
//! Invariants: a `RoleArn` is always a syntactically valid IAM role ARN; a `Secret` never prints its
//! contents, so credentials and tokens cannot reach logs, errors or `Debug` output by accident.

use std::fmt;
use std::net::IpAddr;

use time::OffsetDateTime;

/// A string that must never be printed: STS session tokens, secret access keys, service-account tokens.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that must send it on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Why a string is not an IAM role ARN.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoleArnError {
    /// Not of the form `arn:…`.
    #[error("not an ARN (expected arn:<partition>:iam::<12-digit account>:role/<name>)")]
    NotAnArn,
    /// An ARN of another service.
    #[error("ARN of service {0:?}, expected \"iam\"")]
    WrongService(String),
    /// Not `aws`, `aws-cn`, `aws-us-gov`, ….
    #[error("partition {0:?} is not an AWS partition")]
    UnknownPartition(String),
    /// IAM is global: its ARNs have an empty region.
    #[error("IAM ARNs have no region")]
    HasRegion,
    /// Not 12 digits.
    #[error("account must be 12 digits")]
    BadAccount,
    /// An IAM resource that is not a role.
    #[error("resource is not a role (expected role/<name>)")]
    NotARole,
    /// A role name IAM would not accept.
    #[error("role name must be 1-64 characters of [A-Za-z0-9+=,.@_-]")]
    BadName,
    /// A role path IAM would not accept.
    #[error("role path must be /, or /<segments>/ of [A-Za-z0-9+=,.@_-] (at most 512 characters)")]
    BadPath,
}

/// A syntactically valid IAM role ARN, e.g. `arn:aws:iam::123456789012:role/team/app`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoleArn {
    arn: String,
    /// Byte offset where the role name (the last path segment) starts.
    name_at: usize,
}

/// The AWS partitions an ARN may name.
pub const PARTITIONS: &[&str] = &[
    "aws",
    "aws-cn",
    "aws-us-gov",
    "aws-iso",
    "aws-iso-b",
    "aws-iso-e",
    "aws-iso-f",
    "aws-eusc",
];

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "+=,.@_-".contains(c)
}

impl RoleArn {
    /// Parses and validates an IAM role ARN. Leading or trailing white space is an error: annotation
    /// values are compared byte for byte, and a silently trimmed value hides a typo.
    pub fn parse(value: &str) -> Result<Self, RoleArnError> {
        let mut parts = value.splitn(6, ':');
        let (Some("arn"), Some(partition), Some(service), Some(region), Some(account), Some(resource)) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(RoleArnError::NotAnArn);
        };
        if !PARTITIONS.contains(&partition) {
            return Err(RoleArnError::UnknownPartition(partition.to_owned()));
        }
        if service != "iam" {
            return Err(RoleArnError::WrongService(service.to_owned()));
        }
        if !region.is_empty() {
            return Err(RoleArnError::HasRegion);
        }
        if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
            return Err(RoleArnError::BadAccount);
        }
        let Some(path_and_name) = resource.strip_prefix("role/") else {
            return Err(RoleArnError::NotARole);
        };
        let (path, name) = match path_and_name.rfind('/') {
            Some(i) => (&path_and_name[..=i], &path_and_name[i + 1..]),
            None => ("", path_and_name),
        };
        if name.is_empty() || name.len() > 64 || !name.chars().all(is_name_char) {
            return Err(RoleArnError::BadName);
        }
        let segments_ok = path
            .split_terminator('/')
            .all(|s| !s.is_empty() && s != "." && s != ".." && s.chars().all(is_name_char));
        if path.len() > 511 || !segments_ok {
            return Err(RoleArnError::BadPath);
        }
        Ok(Self {
            name_at: value.len() - name.len(),
            arn: value.to_owned(),
        })
    }

    /// The full ARN.
    pub fn as_str(&self) -> &str {
        &self.arn
    }

    /// The role name: the last path segment, which IMDS lists under `security-credentials/`.
    pub fn name(&self) -> &str {
        &self.arn[self.name_at..]
    }

    /// The 12-digit account id.
    pub fn account(&self) -> &str {
        self.arn.split(':').nth(4).expect("validated by parse")
    }
}

impl fmt::Display for RoleArn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.arn)
    }
}

impl fmt::Debug for RoleArn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RoleArn({})", self.arn)
    }
}

/// A pod on this node, as far as identity is concerned. Built by `pods` from the API server's view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// `metadata.uid`: what distinguishes this pod from an earlier pod with the same name or IP.
    pub uid: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `spec.serviceAccountName` (`default` when unset, as the API server defaults it).
    pub service_account: String,
    /// The pod's `iam.amazonaws.com/role` annotation, verbatim.
    pub pod_role: Option<String>,
    /// The service account's `eks.amazonaws.com/role-arn` annotation, verbatim, as last seen.
    pub service_account_role: Option<String>,
    /// The service account exists but could not be decoded: whether it names a role is unknown.
    pub service_account_unreadable: bool,
    /// `status.podIPs`.
    pub ips: Vec<IpAddr>,
    /// `status.phase == Running`.
    pub running: bool,
    /// When the pod started running: the earliest `startedAt` of its running containers (the kubelet
    /// reports phase Running once one runs). For metrics only.
    pub running_since: Option<OffsetDateTime>,
    /// `metadata.deletionTimestamp` is set.
    pub terminating: bool,
    /// `spec.hostNetwork`: the pod shares the node's addresses, so it is never found by IP, only by the
    /// token it presents to the container-credentials endpoint.
    pub host_network: bool,
}

impl Workload {
    /// `namespace/name`, for log lines.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Temporary AWS credentials for one pod and one role.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// `ASIA…`: identifies the STS session in CloudTrail; not a secret.
    pub access_key_id: String,
    /// The secret access key.
    pub secret_access_key: Secret,
    /// The STS session token.
    pub session_token: Secret,
    /// When STS says the credentials stop working.
    pub expiration: OffsetDateTime,
    /// When the agent obtained them (IMDS's `LastUpdated`).
    pub last_updated: OffsetDateTime,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The access key id identifies a session in CloudTrail without granting anything; the rest stays hidden.
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("expiration", &self.expiration)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_role_arn_parses_and_names_its_role() {
        let arn = RoleArn::parse("arn:aws:iam::123456789012:role/app").unwrap();
        assert_eq!(arn.name(), "app");
        assert_eq!(arn.account(), "123456789012");
        assert_eq!(arn.as_str(), "arn:aws:iam::123456789012:role/app");
    }

    #[test]
    fn a_role_with_a_path_is_named_by_its_last_segment() {
        let arn = RoleArn::parse("arn:aws-cn:iam::123456789012:role/team/svc/app-1").unwrap();
        assert_eq!(arn.name(), "app-1");
    }

    #[test]
    fn malformed_arns_are_refused_with_a_reason() {
        let cases = [
            ("app", RoleArnError::NotAnArn),
            ("arn:aws:s3:::bucket/x", RoleArnError::WrongService("s3".into())),
            (
                "arn:foo:iam::123456789012:role/x",
                RoleArnError::UnknownPartition("foo".into()),
            ),
            ("arn:aws:iam:us-east-1:123456789012:role/x", RoleArnError::HasRegion),
            ("arn:aws:iam::12345:role/x", RoleArnError::BadAccount),
            ("arn:aws:iam::123456789012:user/x", RoleArnError::NotARole),
            ("arn:aws:iam::123456789012:role/", RoleArnError::BadName),
            ("arn:aws:iam::123456789012:role/a b", RoleArnError::BadName),
            ("arn:aws:iam::123456789012:role/a\n", RoleArnError::BadName),
            (" arn:aws:iam::123456789012:role/a", RoleArnError::NotAnArn),
            ("arn:aws:iam::123456789012:role//x", RoleArnError::BadPath),
            ("arn:aws:iam::123456789012:role/../x", RoleArnError::BadPath),
        ];
        for (input, want) in cases {
            assert_eq!(RoleArn::parse(input).unwrap_err(), want, "{input:?}");
        }
        let long = format!("arn:aws:iam::123456789012:role/{}", "a".repeat(65));
        assert_eq!(RoleArn::parse(&long).unwrap_err(), RoleArnError::BadName);
    }

    #[test]
    fn secrets_never_print() {
        let creds = Credentials {
            access_key_id: "ASIAEXAMPLE".into(),
            secret_access_key: Secret::new("very-secret"),
            session_token: Secret::new("session-token-value"),
            expiration: OffsetDateTime::UNIX_EPOCH,
            last_updated: OffsetDateTime::UNIX_EPOCH,
        };
        let shown = format!("{creds:?} {:?}", Secret::new("x-secret"));
        assert!(!shown.contains("very-secret"));
        assert!(!shown.contains("session-token-value"));
        assert!(!shown.contains("x-secret"));
        assert!(shown.contains("ASIAEXAMPLE"));
    }
}
