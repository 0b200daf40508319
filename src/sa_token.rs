//! Service-account tokens bound to one pod, minted with the TokenRequest API.
//!
//! The token's `boundObjectRef` is the pod (name and UID), so it stops being valid the moment that pod
//! is deleted, and STS sees a `sub` of the pod's own service account. Tokens are only ever handed to
//! STS; they are wrapped in [`Secret`] and never logged.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::Api;
use kube::api::PostParams;

use crate::workload::{Secret, Workload};

/// The longest a TokenRequest may take, retries included.
const MINT_TIMEOUT: Duration = Duration::from_secs(10);

/// TokenRequest settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// `--token-audience`: the `aud` STS expects (the OIDC provider's client id).
    pub audience: String,
    /// `--token-expiration` in seconds; the API server enforces at least 600.
    pub expiration_seconds: i64,
}

/// Why no token could be minted.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The API server answered and said no (RBAC, pod or service account gone, UID mismatch).
    #[error("TokenRequest for {service_account} refused: HTTP {status} {reason}: {message}")]
    Refused {
        /// `namespace/name` of the service account.
        service_account: String,
        /// The HTTP status.
        status: u16,
        /// The Status `reason`.
        reason: String,
        /// The Status `message`.
        message: String,
    },
    /// The API server is throttling us (429): try again later.
    #[error("TokenRequest for {service_account} throttled by the API server: {message}")]
    Throttled {
        /// `namespace/name` of the service account.
        service_account: String,
        /// The Status `message`.
        message: String,
    },
    /// The API server could not be reached or failed (5xx, transport).
    #[error("TokenRequest for {service_account} failed")]
    Unavailable {
        /// `namespace/name` of the service account.
        service_account: String,
        /// The client's error (shared: failures are remembered and cloned).
        #[source]
        source: Arc<kube::Error>,
    },
    /// No answer within [`MINT_TIMEOUT`].
    #[error("TokenRequest for {service_account} got no answer within {after:?}")]
    Timeout {
        /// `namespace/name` of the service account.
        service_account: String,
        /// The bound that passed.
        after: Duration,
    },
    /// The API server answered 2xx without a token.
    #[error("TokenRequest for {service_account} returned no token")]
    Empty {
        /// `namespace/name` of the service account.
        service_account: String,
    },
}

impl Error {
    /// A closed label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Refused { .. } => "token_refused",
            Error::Throttled { .. } => "token_throttled",
            Error::Unavailable { .. } | Error::Timeout { .. } => "token_unavailable",
            Error::Empty { .. } => "token_empty",
        }
    }

    /// True when trying again later may succeed without anything changing in Kubernetes.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Throttled { .. } | Error::Unavailable { .. } | Error::Timeout { .. } => true,
            Error::Refused { .. } | Error::Empty { .. } => false,
        }
    }
}

/// Mints pod-bound tokens.
#[derive(Clone)]
pub struct Minter {
    client: kube::Client,
    config: Config,
}

impl Minter {
    /// A minter using `client`.
    pub fn new(client: kube::Client, config: Config) -> Self {
        Self { client, config }
    }

    /// A token for `workload`'s service account, bound to the pod itself.
    pub async fn mint(&self, workload: &Workload) -> Result<Secret, Error> {
        let service_account = format!("{}/{}", workload.namespace, workload.service_account);
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), &workload.namespace);
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                audiences: Some(vec![self.config.audience.clone()]),
                expiration_seconds: Some(self.config.expiration_seconds),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".to_owned()),
                    kind: Some("Pod".to_owned()),
                    name: Some(workload.name.clone()),
                    uid: Some(workload.uid.clone()),
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        // kube-client retries 429/503/504 with backoff for minutes; a pod's SDK gives up after a second,
        // so bound the whole exchange and let the next request try again.
        let params = PostParams::default();
        let call = api.create_token_request(&workload.service_account, &params, &request);
        let answer = tokio::time::timeout(MINT_TIMEOUT, call)
            .await
            .map_err(|_| Error::Timeout {
                service_account: service_account.clone(),
                after: MINT_TIMEOUT,
            })?
            .map_err(|error| classify(&service_account, error))?;
        answer
            .status
            .and_then(|s| s.token)
            .filter(|t| !t.is_empty())
            .map(Secret::new)
            .ok_or(Error::Empty { service_account })
    }
}

/// Sorts a failed TokenRequest by what it means: 429 is throttling (transient, like 5xx); any other
/// 4xx is the API server's final word on this pod.
fn classify(service_account: &str, error: kube::Error) -> Error {
    let service_account = service_account.to_owned();
    match error {
        kube::Error::Api(status) if status.code == 429 => Error::Throttled {
            service_account,
            message: status.message.clone(),
        },
        kube::Error::Api(status) if (400..500).contains(&status.code) => Error::Refused {
            service_account,
            status: status.code,
            reason: status.reason.clone(),
            message: status.message.clone(),
        },
        other => Error::Unavailable {
            service_account,
            source: Arc::new(other),
        },
    }
}
