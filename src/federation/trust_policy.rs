//! `imds-broker trust-policy`: the IAM trust policy that lets exactly one workload identity (a
//! service account of the cluster, or a SPIFFE ID of a SPIRE trust domain) assume a role with
//! `sts:AssumeRoleWithWebIdentity`, through the IAM OIDC provider of its issuer.
//!
//! IAM names the provider after the issuer URL without its scheme, and the condition keys after the
//! provider (`<host/path>:sub`, `<host/path>:aud`). A subject with `*` or `?` is matched with
//! `StringLike` (IAM's wildcards), an exact one with `StringEquals`; the audience is always exact.

use serde_json::{Value, json};

use crate::workload::PARTITIONS;

/// Whose tokens the role trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// A Kubernetes service account: `sub` = `system:serviceaccount:<namespace>:<name>`.
    ServiceAccount {
        /// Namespace (IAM wildcards allowed).
        namespace: String,
        /// Name (IAM wildcards allowed).
        name: String,
    },
    /// A SPIFFE ID: `sub` = the ID itself (`spiffe://<trust domain>/<path>`).
    Spiffe(String),
}

/// What the policy is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The issuer URL, exactly as in the tokens' `iss` (`https://…`).
    pub issuer: String,
    /// Whose tokens.
    pub subject: Subject,
    /// The tokens' `aud`.
    pub audience: String,
    /// The AWS account of the OIDC provider (12 digits).
    pub account: String,
    /// The AWS partition (`aws`, `aws-cn`, `aws-us-gov`, …).
    pub partition: String,
}

/// Why no policy can be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// IAM accepts only `https://` issuers, without query or fragment.
    #[error("--issuer {0:?} is not an https:// URL without query or fragment (IAM OIDC providers need one)")]
    Issuer(String),
    /// Not 12 digits.
    #[error("--account {0:?} is not a 12-digit AWS account id")]
    Account(String),
    /// Not a known partition.
    #[error("--partition {0:?} is not an AWS partition")]
    Partition(String),
    /// A namespace or service-account name that no Kubernetes object can have.
    #[error(
        "{what} {value:?} is not a Kubernetes name (lower-case letters, digits, '-' and '.'; '*' and '?' as wildcards)"
    )]
    Name {
        /// `--namespace` or `--service-account`.
        what: &'static str,
        /// The value.
        value: String,
    },
    /// Not `spiffe://<trust domain>/<path>`.
    #[error("--spiffe-id {0:?} is not spiffe://<trust domain>/<path>")]
    Spiffe(String),
    /// An empty audience.
    #[error("--audience must not be empty")]
    Audience,
}

impl Subject {
    /// The `sub` the tokens carry (or the pattern they match).
    pub fn sub(&self) -> String {
        match self {
            Subject::ServiceAccount { namespace, name } => format!("system:serviceaccount:{namespace}:{name}"),
            Subject::Spiffe(id) => id.clone(),
        }
    }
}

/// The issuer as IAM names its provider: the URL without `https://` and without a trailing `/`.
pub fn provider_host(issuer: &str) -> Result<&str, Error> {
    let rest = issuer
        .strip_prefix("https://")
        .ok_or_else(|| Error::Issuer(issuer.to_owned()))?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() || rest.contains(['?', '#', ' ']) || rest.contains("//") {
        return Err(Error::Issuer(issuer.to_owned()));
    }
    Ok(rest)
}

/// `arn:<partition>:iam::<account>:oidc-provider/<host/path>`.
pub fn provider_arn(request: &Request) -> Result<String, Error> {
    let host = provider_host(&request.issuer)?;
    if request.account.len() != 12 || !request.account.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::Account(request.account.clone()));
    }
    if !PARTITIONS.contains(&request.partition.as_str()) {
        return Err(Error::Partition(request.partition.clone()));
    }
    Ok(format!(
        "arn:{}:iam::{}:oidc-provider/{host}",
        request.partition, request.account
    ))
}

fn is_wild(value: &str) -> bool {
    value.contains(['*', '?'])
}

fn check_name(what: &'static str, value: &str) -> Result<(), Error> {
    let ok = !value.is_empty()
        && value.len() <= 253
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-.*?".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Error::Name {
            what,
            value: value.to_owned(),
        })
    }
}

fn check_subject(subject: &Subject) -> Result<(), Error> {
    match subject {
        Subject::ServiceAccount { namespace, name } => {
            check_name("--namespace", namespace)?;
            check_name("--service-account", name)
        }
        Subject::Spiffe(id) => {
            let rest = id.strip_prefix("spiffe://").ok_or_else(|| Error::Spiffe(id.clone()))?;
            let (domain, path) = rest.split_once('/').ok_or_else(|| Error::Spiffe(id.clone()))?;
            let domain_ok = !domain.is_empty()
                && domain
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-._".contains(c));
            let path_ok = !path.is_empty() && !path.chars().any(|c| c.is_whitespace() || c == '#' || c == '?');
            if domain_ok && path_ok {
                Ok(())
            } else {
                Err(Error::Spiffe(id.clone()))
            }
        }
    }
}

/// The trust policy document.
pub fn policy(request: &Request) -> Result<Value, Error> {
    let provider = provider_arn(request)?;
    check_subject(&request.subject)?;
    if request.audience.is_empty() {
        return Err(Error::Audience);
    }
    let host = provider_host(&request.issuer)?;
    let sub = request.subject.sub();
    let (sub_key, aud_key) = (format!("{host}:sub"), format!("{host}:aud"));
    let condition = if is_wild(&sub) {
        json!({
            "StringEquals": { aud_key: request.audience },
            "StringLike": { sub_key: sub },
        })
    } else {
        json!({ "StringEquals": { aud_key: request.audience, sub_key: sub } })
    };
    Ok(json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow",
            "Principal": { "Federated": provider },
            "Action": "sts:AssumeRoleWithWebIdentity",
            "Condition": condition,
        }],
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(subject: Subject) -> Request {
        Request {
            issuer: "https://oidc.example.com/clusters/prod/".into(),
            subject,
            audience: "sts.amazonaws.com".into(),
            account: "123456789012".into(),
            partition: "aws".into(),
        }
    }

    fn account(namespace: &str, name: &str) -> Subject {
        Subject::ServiceAccount {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    #[test]
    fn an_exact_service_account_is_matched_with_string_equals_on_the_providers_keys() {
        let doc = policy(&request(account("billing", "api"))).unwrap();
        let statement = &doc["Statement"][0];
        assert_eq!(
            statement["Principal"]["Federated"],
            "arn:aws:iam::123456789012:oidc-provider/oidc.example.com/clusters/prod"
        );
        assert_eq!(statement["Action"], "sts:AssumeRoleWithWebIdentity");
        let equals = &statement["Condition"]["StringEquals"];
        assert_eq!(
            equals["oidc.example.com/clusters/prod:sub"],
            "system:serviceaccount:billing:api"
        );
        assert_eq!(equals["oidc.example.com/clusters/prod:aud"], "sts.amazonaws.com");
        assert!(statement["Condition"].get("StringLike").is_none());
    }

    #[test]
    fn wildcards_use_string_like_for_the_subject_only() {
        let doc = policy(&request(account("batch-*", "job-?"))).unwrap();
        let condition = &doc["Statement"][0]["Condition"];
        assert_eq!(
            condition["StringLike"]["oidc.example.com/clusters/prod:sub"],
            "system:serviceaccount:batch-*:job-?"
        );
        assert_eq!(
            condition["StringEquals"]["oidc.example.com/clusters/prod:aud"],
            "sts.amazonaws.com"
        );
        assert!(
            condition["StringEquals"]
                .get("oidc.example.com/clusters/prod:sub")
                .is_none()
        );
    }

    #[test]
    fn a_spiffe_id_is_the_subject_itself() {
        let doc = policy(&request(Subject::Spiffe("spiffe://example.org/ns/apps/sa/api".into()))).unwrap();
        assert_eq!(
            doc["Statement"][0]["Condition"]["StringEquals"]["oidc.example.com/clusters/prod:sub"],
            "spiffe://example.org/ns/apps/sa/api"
        );
    }

    #[test]
    fn what_iam_would_refuse_is_refused_here_with_the_flag_named() {
        let bad = |edit: fn(&mut Request)| {
            let mut r = request(account("apps", "api"));
            edit(&mut r);
            policy(&r).unwrap_err().to_string()
        };
        assert!(bad(|r| r.issuer = "http://oidc.example.com".into()).contains("--issuer"));
        assert!(bad(|r| r.issuer = "https://".into()).contains("--issuer"));
        assert!(bad(|r| r.issuer = "https://x.example.com/?a=b".into()).contains("--issuer"));
        assert!(bad(|r| r.account = "12345".into()).contains("--account"));
        assert!(bad(|r| r.partition = "azure".into()).contains("--partition"));
        assert!(bad(|r| r.audience = String::new()).contains("--audience"));
        assert!(bad(|r| r.subject = account("Apps", "api")).contains("--namespace"));
        assert!(bad(|r| r.subject = account("apps", "a b")).contains("--service-account"));
        assert!(bad(|r| r.subject = Subject::Spiffe("spiffe://example.org".into())).contains("--spiffe-id"));
        assert!(bad(|r| r.subject = Subject::Spiffe("https://example.org/x".into())).contains("--spiffe-id"));
    }

    #[test]
    fn other_partitions_name_their_provider_in_their_own_partition() {
        let mut r = request(account("apps", "api"));
        r.partition = "aws-cn".into();
        assert!(
            provider_arn(&r)
                .unwrap()
                .starts_with("arn:aws-cn:iam::123456789012:oidc-provider/")
        );
    }
}
