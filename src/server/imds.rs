//! The IMDS endpoint: routes a request, checks its IMDSv2 token, finds the calling pod by source IP,
//! resolves its role and answers from the credential cache.
//!
//! Invariants: a caller only ever sees its own pod's role; a caller that is not a known pod, or has no
//! role, gets 404; a hostile path is rejected before routing, never resolved.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{Request, Response};
use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry};
use time::OffsetDateTime;
use tokio::time::Instant;

use super::document;
use super::hop_limit::HopLimit;
use super::imds_token::{self, Issuer};
use super::refusal_log;
use super::response::{self, Body, Failure};
use super::route::{Iam, Route, route_target};
use crate::credentials::Cache;
use crate::metadata::{self, Metadata};
use crate::pods::{Lookup, Store};
use crate::workload::{RoleArn, Workload};

/// Whether token-less (IMDSv1) requests are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Imdsv2 {
    /// IMDSv1 and IMDSv2 are both served (what old SDKs need).
    Optional,
    /// Requests without a valid token get 401.
    Required,
}

/// IMDS endpoint settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// `--imdsv2`.
    pub imdsv2: Imdsv2,
    /// `--pod-wait`: how long a request from an unknown IP waits for the pod watch to catch up.
    pub pod_wait: Duration,
    /// `--token-hop-limit`: the IP TTL of token responses (1-64).
    pub token_hop_limit: u8,
}

/// Request metrics.
#[derive(Clone)]
pub struct Metrics {
    requests: IntCounterVec,
    seconds: HistogramVec,
    tokens_issued: IntCounter,
    tokens_rejected: IntCounterVec,
}

/// Every `route` label (see [`Route::label`]; `other` is a request that was not routed).
const ROUTES: &[&str] = &[
    "token",
    "iam",
    "role_listing",
    "credentials",
    "info",
    "metadata",
    "other",
];

/// Why an IMDSv2 token was refused: at issue (`bad_ttl`, `forwarded`) or on use (the rest).
const TOKEN_REJECTIONS: &[&str] = &["bad_ttl", "forwarded", "malformed", "wrong_caller", "expired"];

fn rejection(invalid: imds_token::Invalid) -> &'static str {
    match invalid {
        imds_token::Invalid::Malformed => "malformed",
        imds_token::Invalid::WrongCaller => "wrong_caller",
        imds_token::Invalid::Expired => "expired",
    }
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let requests = IntCounterVec::new(
            Opts::new(
                "imds_broker_imds_requests_total",
                "IMDS requests by route, status code and outcome",
            ),
            &["route", "code", "outcome"],
        )?;
        let seconds = HistogramVec::new(
            HistogramOpts::new(
                "imds_broker_imds_request_duration_seconds",
                "IMDS request latency by route",
            )
            .buckets(super::LATENCY_BUCKETS.to_vec()),
            &["route"],
        )?;
        let tokens_issued = IntCounter::new(
            "imds_broker_imds_tokens_issued_total",
            "IMDSv2 tokens issued (PUT /latest/api/token answered 200)",
        )?;
        let tokens_rejected = IntCounterVec::new(
            Opts::new(
                "imds_broker_imds_tokens_rejected_total",
                "IMDSv2 token requests refused (bad_ttl, forwarded) and tokens refused on use \
                 (malformed, wrong_caller, expired)",
            ),
            &["reason"],
        )?;
        // Every route's series exist from the start, so dashboards show 0 before the first request.
        for route in ROUTES {
            seconds.with_label_values(&[route]);
            if *route != "other" {
                requests.with_label_values(&[route, "200", "ok"]);
            }
        }
        for reason in TOKEN_REJECTIONS {
            tokens_rejected.with_label_values(&[reason]);
        }
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(seconds.clone()))?;
        registry.register(Box::new(tokens_issued.clone()))?;
        registry.register(Box::new(tokens_rejected.clone()))?;
        Ok(Self {
            requests,
            seconds,
            tokens_issued,
            tokens_rejected,
        })
    }
}

/// Logs a refusal of `kind` (a `Failure::kind` label) unless that kind's log budget is spent; a line
/// that gets through says how many were held back before it.
macro_rules! refusal {
    ($handler:ident, $kind:expr, $level:ident, $($fields:tt)*) => {
        if let Some(suppressed) = $handler.refusal_log.admit($kind) {
            tracing::$level!(suppressed, $($fields)*);
        }
    };
}

/// The IMDS request handler.
pub struct Handler {
    /// The endpoint's settings.
    pub config: Config,
    /// Who is calling.
    pub store: Store,
    /// Their credentials.
    pub cache: Cache,
    /// Issues and verifies IMDSv2 tokens.
    pub imds_tokens: Issuer,
    /// Request metrics.
    pub metrics: Metrics,
    /// The refusal log budget.
    pub refusal_log: refusal_log::Limiter,
    /// Everything under `/latest/` that is not the credential tree.
    pub metadata: Metadata,
    /// Namespaces that require IMDSv2 whatever `--imdsv2` says.
    pub namespaces: crate::namespaces::Policy,
    /// `--container-credentials`: the `GET /v1/credentials` endpoint, served on the same port.
    pub container: Option<super::container::Endpoint>,
}

impl Handler {
    /// Answers one request from `peer`.
    pub async fn handle<B>(self: Arc<Self>, peer: IpAddr, request: Request<B>) -> Response<Body> {
        let started = Instant::now();
        // An IPv4 peer seen through a dual-stack socket arrives as `::ffff:a.b.c.d`; pods are indexed
        // by the plain IPv4 address.
        let peer = peer.to_canonical();
        if let Some(endpoint) = &self.container
            && request.uri().path() == super::container::PATH
        {
            return self.container_credentials(endpoint, peer, &request).await;
        }
        let route = if super::headers_too_large(request.headers()) {
            Err(Failure::HeadersTooLarge)
        } else {
            route_target(request.method(), request.uri())
        };
        let label = route.as_ref().map_or("other", Route::label);
        let outcome = match route {
            Ok(route) => self.answer(peer, &request, route).await,
            Err(failure) => {
                let kind = failure.kind();
                refusal!(self, kind, info, %peer, kind, "refusing a malformed request");
                Err(failure)
            }
        };
        let (response, outcome_label) = match outcome {
            Ok(response) => (response, "ok"),
            Err(failure) => {
                let kind = failure.kind();
                (failure.into_response(), kind)
            }
        };
        self.metrics
            .requests
            .with_label_values(&[label, response.status().as_str(), outcome_label])
            .inc();
        self.metrics
            .seconds
            .with_label_values(&[label])
            .observe(started.elapsed().as_secs_f64());
        response
    }

    async fn answer<B>(&self, peer: IpAddr, request: &Request<B>, route: Route) -> Result<Response<Body>, Failure> {
        let now = unix_now();
        let headers = request.headers();
        let route = match route {
            Route::Token => return self.token(peer, request, now),
            Route::Iam(iam) => Ok(iam),
            Route::Metadata(path) => Err(path),
        };
        let tokenless = match headers.get("x-aws-ec2-metadata-token") {
            Some(token) => {
                let Ok(token) = token.to_str() else {
                    self.metrics.tokens_rejected.with_label_values(&["malformed"]).inc();
                    return Err(Failure::BadToken);
                };
                if let Err(invalid) = self.imds_tokens.verify(token, peer, now) {
                    self.metrics
                        .tokens_rejected
                        .with_label_values(&[rejection(invalid)])
                        .inc();
                    refusal!(self, "bad_token", info, %peer, reason = %invalid, "refusing IMDSv2 request");
                    return Err(Failure::BadToken);
                }
                false
            }
            None if self.config.imdsv2 == Imdsv2::Required => return Err(Failure::TokenRequired),
            None => true,
        };
        let workload = self.caller(peer).await?;
        if tokenless
            && self
                .namespaces
                .requires_v2(&workload.namespace, Instant::now() + self.config.pod_wait)
                .await
        {
            refusal!(self, "token_required", info, pod = %workload.key(), "refusing IMDSv1 request: the namespace requires IMDSv2");
            return Err(Failure::TokenRequired);
        }
        match route {
            Ok(iam) => self.iam(&workload, iam).await,
            Err(path) => self.metadata(&workload, &path).await,
        }
    }

    /// `PUT /latest/api/token`.
    fn token<B>(&self, peer: IpAddr, request: &Request<B>, now: u64) -> Result<Response<Body>, Failure> {
        let headers = request.headers();
        if headers.contains_key("x-forwarded-for") {
            self.metrics.tokens_rejected.with_label_values(&["forwarded"]).inc();
            refusal!(self, "forwarded", info, %peer, "refusing token request that came through a proxy (X-Forwarded-For)");
            return Err(Failure::Forwarded);
        }
        let Some(ttl) = headers
            .get("x-aws-ec2-metadata-token-ttl-seconds")
            .and_then(|v| imds_token::parse_ttl(v.as_bytes()))
        else {
            self.metrics.tokens_rejected.with_label_values(&["bad_ttl"]).inc();
            return Err(Failure::BadTtl);
        };
        if let Some(hops) = request.extensions().get::<HopLimit>() {
            hops.limit(self.config.token_hop_limit);
        }
        self.metrics.tokens_issued.inc();
        Ok(response::token(self.imds_tokens.issue(peer, ttl, now), ttl))
    }

    /// The rest of the metadata tree, for a known pod.
    async fn metadata(&self, workload: &Workload, path: &str) -> Result<Response<Body>, Failure> {
        let role = self.cache.resolver().resolve(workload).ok().flatten();
        match self.metadata.get(path, role.as_ref()).await {
            Ok(answer) => Ok(response::metadata(answer)),
            Err(metadata::Error::NotFound) => Err(Failure::NotFound),
            Err(metadata::Error::Upstream(error)) => {
                tracing::warn!(pod = %workload.key(), %path, kind = error.kind(), %error, "upstream IMDS failed");
                Err(Failure::Upstream(error))
            }
        }
    }

    /// The pod's credential tree.
    async fn iam(&self, workload: &Workload, iam: Iam) -> Result<Response<Body>, Failure> {
        let role = self.role_of(workload)?;
        match iam {
            Iam::Listing => Ok(response::text(
                http::StatusCode::OK,
                "info\nsecurity-credentials/".to_owned(),
            )),
            // Exactly the role name, no trailing newline: the Rust SDK uses the body verbatim in a URI.
            Iam::RoleListing => Ok(response::text(http::StatusCode::OK, role.name().to_owned())),
            Iam::Info => Ok(response::text(
                http::StatusCode::OK,
                document::info(&role, OffsetDateTime::now_utc()),
            )),
            Iam::RoleDocument(name) if name != role.name() => {
                refusal!(self, "not_found", info, pod = %workload.key(), asked = %name, role = %role, "refusing another role's document");
                Err(Failure::NotFound)
            }
            Iam::RoleDocument(_) => match self.cache.get(workload, &role).await {
                Ok(session) => Ok(response::text(
                    http::StatusCode::OK,
                    session.document(|credentials| document::credentials(credentials).into()),
                )),
                Err(error) if error.is_transient() => Err(Failure::Unavailable),
                Err(error) => Err(Failure::Refused { role, error }),
            },
        }
    }

    /// The pod calling from `peer`, once the view can say so. Anything short of one known, running pod
    /// is refused with 503 while the answer may still change (view incomplete, address in flux, API
    /// server away) and 404 only when no pod of this node has the address.
    async fn caller(&self, peer: IpAddr) -> Result<Arc<Workload>, Failure> {
        let deadline = Instant::now() + self.config.pod_wait;
        if !self.store.wait_whole(deadline).await || !self.namespaces.wait_synced(deadline).await {
            refusal!(self, "unsynced", info, %peer, "refusing: the pod view is incomplete (starting, or relisting after missed events)");
            return Err(Failure::Unsynced);
        }
        match self.store.lookup_or_wait(peer, deadline).await {
            Lookup::Found(workload) => Ok(workload),
            Lookup::Ambiguous(pods) => {
                refusal!(self, "contested", warn, %peer, ?pods, "refusing: several live pods claim this IP");
                Err(Failure::Contested)
            }
            Lookup::Pending => {
                refusal!(self, "contested", info, %peer, "refusing: this IP belongs to a pod that cannot be running (terminated, or not seen since the node booted)");
                Err(Failure::Contested)
            }
            Lookup::Unknown if !self.store.view().reachable => {
                refusal!(self, "unsynced", info, %peer, "refusing: no known pod has this IP and the API server is unreachable");
                Err(Failure::Unsynced)
            }
            Lookup::Unknown => {
                refusal!(self, "not_found", info, %peer, "refusing: no pod on this node has this IP");
                Err(Failure::NotFound)
            }
        }
    }

    fn role_of(&self, workload: &Workload) -> Result<RoleArn, Failure> {
        match self.cache.resolver().resolve(workload) {
            Ok(Some(role)) => Ok(role),
            Ok(None) => {
                tracing::debug!(pod = %workload.key(), "pod has no role");
                Err(Failure::NotFound)
            }
            Err(error @ crate::roles::Error::UnreadableServiceAccount { .. }) => {
                refusal!(self, "unsynced", warn, pod = %workload.key(), %error, "refusing credentials until the service account can be read");
                Err(Failure::Unsynced)
            }
            Err(error) => {
                refusal!(self, "invalid_role", warn, pod = %workload.key(), %error, "refusing credentials: invalid role annotation");
                Err(Failure::InvalidRole)
            }
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_mapped_peers_are_seen_as_ipv4() {
        assert_eq!(
            "::ffff:10.0.0.1".parse::<IpAddr>().unwrap().to_canonical(),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
    }
}
