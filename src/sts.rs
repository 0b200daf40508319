//! `AssumeRoleWithWebIdentity`: a pod-bound token in, temporary credentials for one role out.
//!
//! The call is unsigned (the operation needs no AWS credentials), so the node holds none. Errors are
//! classified once, here: a refusal (the role does not trust this pod, the token is rejected) is final
//! for this token; anything else (5xx, throttling, network) is transient.

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sts::config::{BehaviorVersion, Region};
use aws_sdk_sts::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_sts::operation::assume_role_with_web_identity::AssumeRoleWithWebIdentityError;
use aws_smithy_http_client::tls;
use aws_smithy_runtime_api::client::http::SharedHttpClient;
use aws_smithy_runtime_api::http::Response as HttpResponse;
use time::OffsetDateTime;

use crate::workload::{Credentials, RoleArn, Secret, Workload};

/// STS settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// `--sts-endpoint`: overrides the endpoint (a VPC endpoint, a test double).
    pub endpoint: Option<String>,
    /// `--session-duration`.
    pub session_duration: Duration,
}

/// Why STS gave no credentials.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// STS answered and refused: AccessDenied, InvalidIdentityToken, …
    #[error("STS refused AssumeRoleWithWebIdentity for {role}: {code}: {message}")]
    Refused {
        /// The role ARN.
        role: String,
        /// The AWS error code.
        code: String,
        /// The AWS error message.
        message: String,
    },
    /// STS is throttling us (`Throttling`, `RequestLimitExceeded`): try again later, more slowly.
    #[error("STS throttled AssumeRoleWithWebIdentity for {role}: {code}: {message}")]
    Throttled {
        /// The role ARN.
        role: String,
        /// The AWS error code.
        code: String,
        /// The AWS error message.
        message: String,
    },
    /// STS failed (5xx, an expired token, the IdP unreachable) or could not be reached.
    #[error("STS AssumeRoleWithWebIdentity for {role} failed: {code}: {message}")]
    Unavailable {
        /// The role ARN.
        role: String,
        /// The AWS error code, or what failed (`Timeout`, `DispatchFailure`, `ResponseError`).
        code: String,
        /// What happened.
        message: String,
        /// The SDK's error, when there is one (kept whole; shared because sessions are cloned).
        #[source]
        source: Option<Arc<SdkError<AssumeRoleWithWebIdentityError, HttpResponse>>>,
    },
    /// STS answered without usable credentials.
    #[error("STS answered AssumeRoleWithWebIdentity for {role} without credentials")]
    Malformed {
        /// The role ARN.
        role: String,
    },
}

impl Error {
    /// A closed label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Refused { .. } => "sts_refused",
            Error::Throttled { .. } => "sts_throttled",
            Error::Unavailable { .. } => "sts_unavailable",
            Error::Malformed { .. } => "sts_malformed",
        }
    }

    /// True when trying again later may succeed without anything changing in IAM.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Throttled { .. } | Error::Unavailable { .. } => true,
            Error::Refused { .. } | Error::Malformed { .. } => false,
        }
    }

    /// The AWS error code, for logs and error documents.
    pub fn code(&self) -> &str {
        match self {
            Error::Refused { code, .. } | Error::Throttled { code, .. } | Error::Unavailable { code, .. } => code,
            Error::Malformed { .. } => "MalformedResponse",
        }
    }
}

/// Error codes that mean "slow down".
const THROTTLING_CODES: &[&str] = &["Throttling", "ThrottlingException", "RequestLimitExceeded"];

/// Error codes that say "try again later" even on a 4xx status. An expired token is one of them: the
/// next attempt mints a fresh token.
const TRANSIENT_CODES: &[&str] = &[
    "ExpiredTokenException",
    "ExpiredToken",
    "IDPCommunicationError",
    "ServiceUnavailable",
    "InternalFailure",
];

/// Exchanges tokens for credentials.
#[derive(Clone)]
pub struct Exchanger {
    client: aws_sdk_sts::Client,
    duration_seconds: i32,
}

impl Exchanger {
    /// Builds the STS client. No credentials provider is configured, on purpose.
    pub fn new(config: &Config, region: &str) -> Self {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::Ring))
            .build_https();
        Self::with_http_client(config, region, http)
    }

    /// [`Exchanger::new`] over another HTTP client, for tests and fuzzing (a client that answers every
    /// request with canned bytes); the agent itself always uses [`Exchanger::new`].
    #[doc(hidden)]
    pub fn with_http_client(config: &Config, region: &str, http: SharedHttpClient) -> Self {
        let mut builder = aws_sdk_sts::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(region.to_owned()))
            .http_client(http)
            // One HTTP call per exchange: the cache retries with its own jittered backoff, per pod, so a
            // failing STS sees one call per backoff step instead of the SDK's three.
            .retry_config(aws_sdk_sts::config::retry::RetryConfig::disabled())
            .timeout_config(
                aws_sdk_sts::config::timeout::TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(3))
                    .operation_attempt_timeout(Duration::from_secs(5))
                    .operation_timeout(Duration::from_secs(5))
                    .build(),
            );
        if let Some(endpoint) = &config.endpoint {
            builder = builder.endpoint_url(endpoint);
        }
        Self {
            client: aws_sdk_sts::Client::from_conf(builder.build()),
            duration_seconds: i32::try_from(config.session_duration.as_secs()).unwrap_or(i32::MAX),
        }
    }

    /// Assumes `role` as `workload` with its pod-bound service-account token.
    pub async fn exchange(&self, role: &RoleArn, workload: &Workload, sa_token: &Secret) -> Result<Credentials, Error> {
        let output = self
            .client
            .assume_role_with_web_identity()
            .role_arn(role.as_str())
            .role_session_name(session_name(&workload.namespace, &workload.name))
            .web_identity_token(sa_token.expose())
            .duration_seconds(self.duration_seconds)
            .send()
            .await
            .map_err(|error| classify(role, error))?;
        let malformed = || Error::Malformed { role: role.to_string() };
        let creds = output.credentials.ok_or_else(malformed)?;
        let expiration = OffsetDateTime::from_unix_timestamp(creds.expiration.secs()).map_err(|_| malformed())?;
        Ok(Credentials {
            access_key_id: creds.access_key_id,
            secret_access_key: Secret::new(creds.secret_access_key),
            session_token: Secret::new(creds.session_token),
            expiration,
            last_updated: OffsetDateTime::now_utc(),
        })
    }
}

fn classify(role: &RoleArn, error: SdkError<AssumeRoleWithWebIdentityError, HttpResponse>) -> Error {
    let role = role.to_string();
    let (code, message) = match &error {
        SdkError::ServiceError(service) => {
            let err = service.err();
            let code = err.code().unwrap_or("Unknown").to_owned();
            let message = err.message().unwrap_or_default().to_owned();
            if THROTTLING_CODES.contains(&code.as_str()) {
                return Error::Throttled { role, code, message };
            }
            if !service.raw().status().is_server_error() && !TRANSIENT_CODES.contains(&code.as_str()) {
                return Error::Refused { role, code, message };
            }
            (code, message)
        }
        SdkError::TimeoutError(_) => ("Timeout".to_owned(), "no answer from STS in time".to_owned()),
        SdkError::DispatchFailure(_) => ("DispatchFailure".to_owned(), context(&error)),
        _ => ("ResponseError".to_owned(), context(&error)),
    };
    Error::Unavailable {
        role,
        code,
        message,
        source: Some(Arc::new(error)),
    }
}

/// The SDK error's whole chain in one line (endpoints and causes; never the request's token).
fn context(error: &SdkError<AssumeRoleWithWebIdentityError, HttpResponse>) -> String {
    format!("{}", aws_smithy_types::error::display::DisplayErrorContext(error))
}

/// The `RoleSessionName` for a pod: `<namespace>.<name>`, restricted to `[\w+=,.@-]` and at most 64
/// characters. Stable across refreshes, so CloudTrail shows one session name per pod. Too-long names
/// keep a readable prefix and end in a hash of the full name, so two long names never collide.
pub fn session_name(namespace: &str, name: &str) -> String {
    use sha2::{Digest, Sha256};
    let sanitise = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "_+=,.@-".contains(c) {
                    c
                } else {
                    '-'
                }
            })
            .collect()
    };
    let full = format!("{}.{}", sanitise(namespace), sanitise(name));
    if full.len() <= 64 {
        return full;
    }
    let digest = Sha256::digest(format!("{namespace}/{name}").as_bytes());
    let hash: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
    format!("{}-{hash}", &full[..64 - 1 - hash.len()])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid(name: &str) -> bool {
        (2..=64).contains(&name.len()) && name.chars().all(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c))
    }

    #[test]
    fn session_names_identify_the_pod() {
        assert_eq!(session_name("payments", "api-7d9f-x2"), "payments.api-7d9f-x2");
    }

    #[test]
    fn session_names_are_sanitised() {
        let name = session_name("ns", "we!rd/näme");
        assert!(valid(&name), "{name}");
    }

    #[test]
    fn long_session_names_are_cut_stable_and_distinct() {
        let long_a = "a".repeat(200);
        let long_b = format!("{}b", "a".repeat(199));
        let a = session_name("namespace", &long_a);
        assert!(valid(&a) && a.len() == 64, "{a}");
        assert_eq!(a, session_name("namespace", &long_a));
        assert_ne!(a, session_name("namespace", &long_b));
    }
}
