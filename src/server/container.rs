//! The container-credentials endpoint (`--container-credentials`): `GET /v1/credentials` at
//! 169.254.170.23 (or `[fd00:ec2::23]`), answered as the EKS Pod Identity agent answers it.
//!
//! The caller is whoever the token in `Authorization` (raw, no `Bearer`) says, never its address: the
//! token is verified locally ([`crate::pod_token`]), its bound pod must be served on this node with the
//! token's uid, namespace, name and service account, and then the IMDS path takes over (the same role
//! resolution, the same per-pod cache: one STS session serves both endpoints of a pod). That is also
//! why `hostNetwork` pods, which share the node's address, can be served here and never by IMDS.
//!
//! Statuses, EKS's where it defines one: 400 for a missing or unparseable token and for one outside
//! its validity (the EKS agent's basic claim check); 403 for the wrong `Host` (anti DNS rebinding),
//! a token this cluster did not issue for this audience, a pod that is not on this node, no or an
//! invalid role, and a refusal by STS or the API server; 503 while the answer may change (signing keys
//! or pod view not available, the pod held, STS or the API server failing); 500 for anything else.
//! Bodies are one line of text, as the EKS agent's (Go's `http.Error`), naming nothing secret.
//!
//! Invariants: nothing from an unverified token is trusted or logged but the reason it failed; a
//! caller gets credentials only for the pod its verified token is bound to.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Full;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use serde::Serialize;
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::document;
use super::imds::Handler;
use super::response::Body;
use crate::credentials;
use crate::pod_token::{self, Expect, KeySource, PodClaims, SourceError};
use crate::pods::ByUid;
use crate::workload::{Credentials, Workload};

/// The one path served.
pub const PATH: &str = "/v1/credentials";

/// The `Host` values accepted (with or without `:80`): the addresses SDKs are given.
pub const HOSTS: [&str; 2] = ["169.254.170.23", "[fd00:ec2::23]"];

/// How long a failed issuer discovery is remembered before the API server is asked again.
const DISCOVERY_RETRY: Duration = Duration::from_secs(10);

/// The longest issuer discovery may take.
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(5);

/// `--container-credentials` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// `--container-credentials-audience`.
    pub audience: String,
    /// `--service-account-issuer`; `None`: discovered from the API server.
    pub issuer: Option<String>,
}

/// Why a request got no credentials: each a status, a closed label and a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `Host` is not one of [`HOSTS`].
    WrongHost,
    /// Not a `GET`.
    MethodNotAllowed,
    /// The request's headers are larger than the endpoint takes.
    HeadersTooLarge,
    /// No `Authorization`, or an empty one.
    NoToken,
    /// The token is not a JWT.
    Malformed,
    /// The token is past its `exp`.
    Expired,
    /// The token is before its `nbf`.
    NotYetValid,
    /// The token is not RS256.
    Algorithm,
    /// No signing key of the cluster has the token's `kid`.
    UnknownKey,
    /// The signature does not verify.
    Signature,
    /// Another issuer's token.
    Issuer,
    /// Another audience's token.
    Audience,
    /// Not bound to a pod.
    NotPodBound,
    /// The signing keys (or the issuer) could not be read from the API server.
    KeysUnavailable,
    /// The token says its pod runs on another node.
    OtherNode,
    /// No pod of this node has the token's uid.
    NotOnNode,
    /// A pod of this node has the uid but not the token's namespace, name or service account.
    Mismatch,
    /// The pod is held (terminated, not republished since the node booted, or unreadable).
    Held,
    /// The pod view is incomplete or the API server unreachable.
    Unsynced,
    /// The pod has no role.
    NoRole,
    /// The pod's role annotation is invalid.
    InvalidRole,
    /// STS or the API server refused the exchange.
    Refused,
    /// STS or the API server failed transiently.
    Unavailable,
    /// Anything else.
    Failed,
}

impl Refusal {
    /// Every refusal, in the order their series are created (after `ok`).
    pub const ALL: [Refusal; 24] = [
        Refusal::WrongHost,
        Refusal::MethodNotAllowed,
        Refusal::HeadersTooLarge,
        Refusal::NoToken,
        Refusal::Malformed,
        Refusal::Expired,
        Refusal::NotYetValid,
        Refusal::Algorithm,
        Refusal::UnknownKey,
        Refusal::Signature,
        Refusal::Issuer,
        Refusal::Audience,
        Refusal::NotPodBound,
        Refusal::KeysUnavailable,
        Refusal::OtherNode,
        Refusal::NotOnNode,
        Refusal::Mismatch,
        Refusal::Held,
        Refusal::Unsynced,
        Refusal::NoRole,
        Refusal::InvalidRole,
        Refusal::Refused,
        Refusal::Unavailable,
        Refusal::Failed,
    ];

    /// A closed label for metrics and the log budget.
    pub fn kind(self) -> &'static str {
        match self {
            Refusal::WrongHost => "wrong_host",
            Refusal::MethodNotAllowed => "method_not_allowed",
            Refusal::HeadersTooLarge => "headers_too_large",
            Refusal::NoToken => "no_token",
            Refusal::Malformed => "malformed",
            Refusal::Expired => "expired",
            Refusal::NotYetValid => "not_yet_valid",
            Refusal::Algorithm => "algorithm",
            Refusal::UnknownKey => "unknown_key",
            Refusal::Signature => "signature",
            Refusal::Issuer => "issuer",
            Refusal::Audience => "audience",
            Refusal::NotPodBound => "not_pod_bound",
            Refusal::KeysUnavailable => "keys_unavailable",
            Refusal::OtherNode => "other_node",
            Refusal::NotOnNode => "not_on_node",
            Refusal::Mismatch => "mismatch",
            Refusal::Held => "held",
            Refusal::Unsynced => "unsynced",
            Refusal::NoRole => "no_role",
            Refusal::InvalidRole => "invalid_role",
            Refusal::Refused => "refused",
            Refusal::Unavailable => "unavailable",
            Refusal::Failed => "failed",
        }
    }

    /// The status: 400 for a request the EKS agent calls invalid, 403 when final, 503 when the answer
    /// may change soon (SDKs retry), 500 otherwise.
    pub fn status(self) -> StatusCode {
        match self {
            Refusal::NoToken | Refusal::Malformed | Refusal::Expired | Refusal::NotYetValid => StatusCode::BAD_REQUEST,
            Refusal::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Refusal::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Refusal::WrongHost
            | Refusal::Algorithm
            | Refusal::UnknownKey
            | Refusal::Signature
            | Refusal::Issuer
            | Refusal::Audience
            | Refusal::NotPodBound
            | Refusal::OtherNode
            | Refusal::NotOnNode
            | Refusal::Mismatch
            | Refusal::NoRole
            | Refusal::InvalidRole
            | Refusal::Refused => StatusCode::FORBIDDEN,
            Refusal::KeysUnavailable | Refusal::Held | Refusal::Unsynced | Refusal::Unavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Refusal::Failed => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The response body's one line.
    fn message(self) -> &'static str {
        match self {
            Refusal::WrongHost => {
                "Access Denied. Called agent through invalid address, please use either 169.254.170.23 or [fd00:ec2::23]"
            }
            Refusal::MethodNotAllowed => "Method not allowed: use GET",
            Refusal::HeadersTooLarge => "Request header fields too large",
            Refusal::NoToken => "Service account token cannot be empty",
            Refusal::Malformed => "Service account token cannot be parsed",
            Refusal::Expired => "Service account token failed basic claim validations: token is expired",
            Refusal::NotYetValid => "Service account token failed basic claim validations: token is not valid yet",
            Refusal::Algorithm
            | Refusal::UnknownKey
            | Refusal::Signature
            | Refusal::Issuer
            | Refusal::Audience
            | Refusal::NotPodBound => "Access Denied. Service account token was not issued for this agent",
            Refusal::KeysUnavailable => "The cluster's service account signing keys cannot be read now; retry",
            Refusal::OtherNode | Refusal::NotOnNode | Refusal::Mismatch => {
                "Access Denied. The token's pod does not run on this node"
            }
            Refusal::Held => "The token's pod is not running now; retry",
            Refusal::Unsynced => "The agent's view of this node's pods is incomplete; retry",
            Refusal::NoRole => "Access Denied. The token's pod has no IAM role",
            Refusal::InvalidRole => "Access Denied. The pod's IAM role annotation is invalid (see the pod's events)",
            Refusal::Refused => "Access Denied. The role could not be assumed (see the pod's events)",
            Refusal::Unavailable => "Credentials cannot be obtained now; retry",
            Refusal::Failed => "Credentials could not be obtained (see the imds-broker log)",
        }
    }

    /// The response: status and one line of text, as Go's `http.Error` writes it.
    pub fn into_response(self) -> Response<Body> {
        let mut response = Response::new(Full::new(format!("{}\n", self.message()).into()));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        headers.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
        if self == Refusal::MethodNotAllowed {
            headers.insert(header::ALLOW, HeaderValue::from_static("GET"));
        }
        response
    }
}

impl From<&pod_token::Error> for Refusal {
    fn from(error: &pod_token::Error) -> Self {
        match error {
            pod_token::Error::Malformed => Refusal::Malformed,
            pod_token::Error::Expired => Refusal::Expired,
            pod_token::Error::NotYetValid => Refusal::NotYetValid,
            pod_token::Error::Algorithm(_) => Refusal::Algorithm,
            pod_token::Error::UnknownKey(_) => Refusal::UnknownKey,
            pod_token::Error::Signature => Refusal::Signature,
            pod_token::Error::Issuer(_) => Refusal::Issuer,
            pod_token::Error::Audience(_) => Refusal::Audience,
            pod_token::Error::NotPodBound => Refusal::NotPodBound,
        }
    }
}

/// The EKS agent's response document, in its field order.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct Document<'a> {
    access_key_id: &'a str,
    secret_access_key: &'a str,
    token: &'a str,
    account_id: &'a str,
    expiration: String,
}

/// The 200 document for `credentials` of a role in `account`.
pub fn document(credentials: &Credentials, account: &str) -> String {
    serde_json::to_string(&Document {
        access_key_id: &credentials.access_key_id,
        secret_access_key: credentials.secret_access_key.expose(),
        token: credentials.session_token.expose(),
        account_id: account,
        expiration: document::imds_time(credentials.expiration),
    })
    .expect("strings always serialise")
}

/// Whether `host` (a `Host` header's value) names the container-credentials address.
pub fn host_allowed(host: &[u8]) -> bool {
    let Ok(host) = std::str::from_utf8(host) else {
        return false;
    };
    let host = host.strip_suffix(":80").unwrap_or(host);
    HOSTS.contains(&host)
}

/// Endpoint metrics.
#[derive(Clone)]
pub struct Metrics {
    requests: IntCounterVec,
    seconds: HistogramVec,
}

impl Metrics {
    /// Creates and registers the metrics; every outcome's series exists from the start.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let requests = IntCounterVec::new(
            Opts::new(
                "imds_broker_container_credentials_requests_total",
                "Container-credentials (GET /v1/credentials) requests by status code and outcome",
            ),
            &["code", "outcome"],
        )?;
        let seconds = HistogramVec::new(
            HistogramOpts::new(
                "imds_broker_container_credentials_request_duration_seconds",
                "Container-credentials request latency by outcome class (ok, refused)",
            )
            .buckets(super::LATENCY_BUCKETS.to_vec()),
            &["result"],
        )?;
        requests.with_label_values(&[StatusCode::OK.as_str(), "ok"]);
        for refusal in Refusal::ALL {
            requests.with_label_values(&[refusal.status().as_str(), refusal.kind()]);
        }
        for result in ["ok", "refused"] {
            seconds.with_label_values(&[result]);
        }
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(seconds.clone()))?;
        Ok(Self { requests, seconds })
    }
}

/// What a presented token must say: the audience, and the issuer (the flag's, or the API server's
/// discovery document's, read once on first use). Settled, it costs a request nothing but a read.
struct Expected {
    client: kube::Client,
    audience: String,
    settled: OnceLock<Expect>,
    /// When discovery last failed, so a failing API server is asked at most every [`DISCOVERY_RETRY`].
    failed_at: Mutex<Option<Instant>>,
}

impl Expected {
    fn new(client: kube::Client, config: Config) -> Self {
        let settled = OnceLock::new();
        if let Some(issuer) = config.issuer {
            let _ = settled.set(Expect {
                issuer,
                audience: config.audience.clone(),
            });
        }
        Self {
            client,
            audience: config.audience,
            settled,
            failed_at: Mutex::new(None),
        }
    }

    async fn get(&self) -> Result<&Expect, String> {
        if let Some(expect) = self.settled.get() {
            return Ok(expect);
        }
        let mut failed_at = self.failed_at.lock().await;
        // Another request may have settled it while this one waited for the lock.
        if let Some(expect) = self.settled.get() {
            return Ok(expect);
        }
        if failed_at.is_some_and(|at| at.elapsed() < DISCOVERY_RETRY) {
            return Err("the last discovery failed moments ago".into());
        }
        let live = tokio::time::timeout(DISCOVERY_TIMEOUT, crate::federation::oidc::live_issuer(&self.client)).await;
        let error = match live {
            Ok(Ok(issuer)) => {
                tracing::info!(%issuer, "service-account issuer read from the API server's discovery document");
                return Ok(self.settled.get_or_init(|| Expect {
                    issuer,
                    audience: self.audience.clone(),
                }));
            }
            Ok(Err(error)) => error.to_string(),
            Err(_) => format!("no discovery document within {DISCOVERY_TIMEOUT:?}"),
        };
        *failed_at = Some(Instant::now());
        Err(error)
    }
}

/// The endpoint: settings, the cluster's signing keys and issuer, metrics.
pub struct Endpoint {
    node_name: String,
    keys: KeySource,
    expected: Expected,
    metrics: Metrics,
}

impl Endpoint {
    /// An endpoint verifying tokens against `client`'s API server, for pods of `node_name`.
    pub fn new(
        config: Config,
        node_name: String,
        client: kube::Client,
        registry: &Registry,
    ) -> prometheus::Result<Self> {
        Ok(Self {
            node_name,
            keys: KeySource::new(client.clone()),
            expected: Expected::new(client, config),
            metrics: Metrics::register(registry)?,
        })
    }
}

/// Logs a refusal unless its kind's log budget is spent (shared with the IMDS endpoint's).
macro_rules! refusal {
    ($handler:ident, $refusal:expr, $level:ident, $($fields:tt)*) => {
        if let Some(suppressed) = $handler.refusal_log.admit($refusal.kind()) {
            tracing::$level!(suppressed, endpoint = "container", reason = $refusal.kind(), $($fields)*);
        }
    };
}

impl Handler {
    /// Answers `GET /v1/credentials` from `peer` with `endpoint`.
    pub(super) async fn container_credentials<B>(
        &self,
        endpoint: &Endpoint,
        peer: std::net::IpAddr,
        request: &Request<B>,
    ) -> Response<Body> {
        let started = Instant::now();
        let outcome = self.container_answer(endpoint, peer, request).await;
        let (response, label, result) = match outcome {
            Ok(response) => (response, "ok", "ok"),
            Err(refusal) => (refusal.into_response(), refusal.kind(), "refused"),
        };
        endpoint
            .metrics
            .requests
            .with_label_values(&[response.status().as_str(), label])
            .inc();
        endpoint
            .metrics
            .seconds
            .with_label_values(&[result])
            .observe(started.elapsed().as_secs_f64());
        response
    }

    async fn container_answer<B>(
        &self,
        endpoint: &Endpoint,
        peer: std::net::IpAddr,
        request: &Request<B>,
    ) -> Result<Response<Body>, Refusal> {
        let headers = request.headers();
        if super::headers_too_large(headers) {
            return Err(Refusal::HeadersTooLarge);
        }
        if request.method() != http::Method::GET {
            return Err(Refusal::MethodNotAllowed);
        }
        if !headers.get(header::HOST).is_some_and(|h| host_allowed(h.as_bytes())) {
            refusal!(self, Refusal::WrongHost, info, %peer, "refusing container credentials: wrong Host (DNS rebinding?)");
            return Err(Refusal::WrongHost);
        }
        let token = headers
            .get(header::AUTHORIZATION)
            .map(|t| t.to_str().map_err(|_| Refusal::Malformed))
            .transpose()?
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(Refusal::NoToken)?;
        let claims = self.verify_pod_token(endpoint, peer, token).await?;
        let workload = self.token_pod(endpoint, &claims).await?;
        let role = self.container_role(&workload)?;
        match self.cache.get(&workload, &role).await {
            Ok(session) => {
                Ok(credentials_response(session.container_document(|credentials| {
                    document(credentials, role.account()).into()
                })))
            }
            Err(error) => {
                let refusal = if error.is_transient() {
                    Refusal::Unavailable
                } else if refused(&error) {
                    Refusal::Refused
                } else {
                    Refusal::Failed
                };
                refusal!(self, refusal, warn, pod = %workload.key(), role = %role, kind = error.kind(), "refusing container credentials");
                Err(refusal)
            }
        }
    }

    /// The verified claims of `token`.
    async fn verify_pod_token(
        &self,
        endpoint: &Endpoint,
        peer: std::net::IpAddr,
        token: &str,
    ) -> Result<PodClaims, Refusal> {
        let expect = endpoint.expected.get().await.map_err(|error| {
            refusal!(self, Refusal::KeysUnavailable, warn, %peer, %error, "refusing container credentials: the service-account issuer is unknown");
            Refusal::KeysUnavailable
        })?;
        match endpoint.keys.verify(token, expect, unix_now()).await {
            Ok(claims) => Ok(claims),
            Err(SourceError::Keys(error)) => {
                refusal!(self, Refusal::KeysUnavailable, warn, %peer, %error, "refusing container credentials: the signing keys cannot be read");
                Err(Refusal::KeysUnavailable)
            }
            Err(SourceError::Token(error)) => {
                let refusal = Refusal::from(&error);
                refusal!(self, refusal, info, %peer, %error, "refusing container credentials: bad token");
                Err(refusal)
            }
        }
    }

    /// The served pod of this node the claims name, once the view can say so.
    async fn token_pod(&self, endpoint: &Endpoint, claims: &PodClaims) -> Result<Arc<Workload>, Refusal> {
        let pod = PodOf(claims);
        if let Some(node) = claims.node.as_deref().filter(|n| *n != endpoint.node_name) {
            refusal!(self, Refusal::OtherNode, warn, %pod, token_node = %node, "refusing container credentials: the token's pod runs on another node");
            return Err(Refusal::OtherNode);
        }
        let deadline = Instant::now() + self.config.pod_wait;
        if !self.store.wait_whole(deadline).await {
            refusal!(self, Refusal::Unsynced, info, %pod, "refusing container credentials: the pod view is incomplete");
            return Err(Refusal::Unsynced);
        }
        let workload = match self.store.by_uid_or_wait(&claims.pod_uid, deadline).await {
            ByUid::Served(workload) => workload,
            ByUid::Held => {
                refusal!(self, Refusal::Held, info, %pod, "refusing container credentials: the pod is not running (terminated, not republished since boot, or unreadable)");
                return Err(Refusal::Held);
            }
            ByUid::Unknown if !self.store.view().reachable => {
                refusal!(self, Refusal::Unsynced, info, %pod, "refusing container credentials: unknown pod and the API server is unreachable");
                return Err(Refusal::Unsynced);
            }
            ByUid::Unknown => {
                refusal!(self, Refusal::NotOnNode, warn, %pod, uid = %claims.pod_uid, "refusing container credentials: no pod of this node has the token's uid (deleted, finished, or elsewhere)");
                return Err(Refusal::NotOnNode);
            }
        };
        if workload.namespace != claims.namespace
            || workload.name != claims.pod_name
            || workload.service_account != claims.service_account
        {
            refusal!(self, Refusal::Mismatch, warn, %pod, found = %workload.key(), "refusing container credentials: the token's pod and this node's pod of that uid differ");
            return Err(Refusal::Mismatch);
        }
        Ok(workload)
    }

    fn container_role(&self, workload: &Workload) -> Result<crate::workload::RoleArn, Refusal> {
        match self.cache.resolver().resolve(workload) {
            Ok(Some(role)) => Ok(role),
            Ok(None) => {
                refusal!(self, Refusal::NoRole, info, pod = %workload.key(), "refusing container credentials: the pod has no role");
                Err(Refusal::NoRole)
            }
            Err(error @ crate::roles::Error::UnreadableServiceAccount { .. }) => {
                refusal!(self, Refusal::Unsynced, warn, pod = %workload.key(), %error, "refusing container credentials until the service account can be read");
                Err(Refusal::Unsynced)
            }
            Err(error) => {
                refusal!(self, Refusal::InvalidRole, warn, pod = %workload.key(), %error, "refusing container credentials: invalid role annotation");
                Err(Refusal::InvalidRole)
            }
        }
    }
}

/// `namespace/name` of a token's pod, formatted only when a log line is written.
#[derive(Clone, Copy)]
struct PodOf<'a>(&'a PodClaims);

impl std::fmt::Display for PodOf<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.0.namespace, self.0.pod_name)
    }
}

/// Whether IAM or Kubernetes said no (the pod owner's to fix), not merely failed.
fn refused(error: &credentials::Error) -> bool {
    matches!(
        error,
        credentials::Error::Sts(crate::sts::Error::Refused { .. })
            | credentials::Error::SaToken(crate::sa_token::Error::Refused { .. })
    ) || matches!(error, credentials::Error::Spire(e) if !e.is_transient())
}

fn credentials_response(body: bytes::Bytes) -> Response<Body> {
    let mut response = Response::new(Full::new(body));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::Secret;
    use time::macros::datetime;

    #[test]
    fn the_document_is_the_eks_agents_byte_for_byte() {
        let credentials = Credentials {
            access_key_id: "ASIAIOSFODNN7EXAMPLE".into(),
            secret_access_key: Secret::new("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
            session_token: Secret::new("to+ken/="),
            expiration: datetime!(2026-11-24 00:40:00 UTC),
            last_updated: datetime!(2026-11-23 23:40:00 UTC),
        };
        assert_eq!(
            document(&credentials, "123456789012"),
            "{\"AccessKeyId\":\"ASIAIOSFODNN7EXAMPLE\",\"SecretAccessKey\":\"wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\",\
             \"Token\":\"to+ken/=\",\"AccountId\":\"123456789012\",\"Expiration\":\"2026-11-24T00:40:00Z\"}"
        );
    }

    #[test]
    fn only_the_container_credentials_addresses_are_accepted_hosts() {
        for host in [
            "169.254.170.23",
            "169.254.170.23:80",
            "[fd00:ec2::23]",
            "[fd00:ec2::23]:80",
        ] {
            assert!(host_allowed(host.as_bytes()), "{host}");
        }
        for host in [
            "",
            "169.254.170.23:8080",
            "169.254.170.2",
            "169.254.169.254",
            "attacker.example",
            "169.254.170.23.nip.io",
            "fd00:ec2::23",
            "localhost",
            "127.0.0.1",
        ] {
            assert!(!host_allowed(host.as_bytes()), "{host}");
        }
        assert!(!host_allowed(b"\xff169.254.170.23"));
    }

    #[test]
    fn every_refusal_has_a_status_a_label_and_a_line_naming_nothing_secret() {
        let mut kinds: Vec<&str> = Refusal::ALL.iter().map(|r| r.kind()).collect();
        kinds.sort_unstable();
        kinds.dedup();
        assert_eq!(kinds.len(), Refusal::ALL.len(), "every refusal has its own label");
        for refusal in Refusal::ALL {
            let kind = refusal.kind();
            let response = refusal.into_response();
            assert!(!response.status().is_success(), "{kind}");
            assert_eq!(response.headers()[header::CONTENT_TYPE], "text/plain; charset=utf-8");
            let body = futures::executor::block_on(http_body_util::BodyExt::collect(response.into_body()))
                .unwrap()
                .to_bytes();
            assert!(
                body.ends_with(b"\n") && body.iter().filter(|b| **b == b'\n').count() == 1,
                "{kind}"
            );
        }
    }

    #[test]
    fn statuses_follow_the_eks_agent_and_our_503_rule() {
        let cases = [
            (Refusal::NoToken, 400),
            (Refusal::Malformed, 400),
            (Refusal::Expired, 400),
            (Refusal::WrongHost, 403),
            (Refusal::Signature, 403),
            (Refusal::Audience, 403),
            (Refusal::OtherNode, 403),
            (Refusal::NotOnNode, 403),
            (Refusal::NoRole, 403),
            (Refusal::Refused, 403),
            (Refusal::KeysUnavailable, 503),
            (Refusal::Held, 503),
            (Refusal::Unsynced, 503),
            (Refusal::Unavailable, 503),
            (Refusal::Failed, 500),
        ];
        for (refusal, status) in cases {
            assert_eq!(refusal.status().as_u16(), status, "{}", refusal.kind());
        }
    }
}
