//! Service-account tokens bound to one pod, minted with the TokenRequest API.
//!
//! The token's `boundObjectRef` is the pod (name and UID), so it stops being valid the moment that pod
//! is deleted, and STS sees a `sub` of the pod's own service account. Tokens are only ever handed to
//! STS; they are wrapped in [`Secret`] and never logged.

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::Api;
use kube::api::PostParams;

use crate::workload::{Secret, Workload};

/// The longest a TokenRequest may take, retries included.
const MINT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

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
        service_account: String,
        status: u16,
        reason: String,
        message: String,
    },
    /// The API server could not be reached or failed.
    #[error("TokenRequest for {service_account} failed: {message}")]
    Unavailable { service_account: String, message: String },
    /// The API server answered 2xx without a token.
    #[error("TokenRequest for {service_account} returned no token")]
    Empty { service_account: String },
}

impl Error {
    /// A closed label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Refused { .. } => "refused",
            Error::Unavailable { .. } => "unavailable",
            Error::Empty { .. } => "empty",
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
            .map_err(|_| Error::Unavailable {
                service_account: service_account.clone(),
                message: format!("no answer within {MINT_TIMEOUT:?}"),
            })?
            .map_err(|error| match error {
                kube::Error::Api(status) if (400..500).contains(&status.code) => Error::Refused {
                    service_account: service_account.clone(),
                    status: status.code,
                    reason: status.reason.clone(),
                    message: status.message.clone(),
                },
                other => Error::Unavailable {
                    service_account: service_account.clone(),
                    message: other.to_string(),
                },
            })?;
        answer
            .status
            .and_then(|s| s.token)
            .filter(|t| !t.is_empty())
            .map(Secret::new)
            .ok_or(Error::Empty { service_account })
    }
}
