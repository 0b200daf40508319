//! The IMDS endpoint: routes a request, checks its IMDSv2 token, finds the calling pod by source IP,
//! resolves its role and answers from the credential cache.
//!
//! Invariants: a caller only ever sees its own pod's role; a caller that is not a known pod, or has no
//! role, gets 404; a hostile path is rejected before routing, never resolved.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{Method, Request, Response};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use time::OffsetDateTime;
use tokio::time::Instant;

use super::document;
use super::hop_limit::HopLimit;
use super::response::{self, Body, Failure};
use super::imds_token::{self, Issuer};
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

/// Where a request goes, decided from method and path alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `PUT /latest/api/token`: an IMDSv2 token, answered without knowing the caller.
    Token,
    /// The caller's own credential tree, answered from its pod's role.
    Iam(Iam),
    /// Any other `GET` under `/latest/` (outside `meta-data/iam/`), as a path relative to `/latest/`
    /// without a trailing slash (`""` is `/latest/` itself). What is served there is decided by
    /// [`crate::metadata`], never by the router.
    Metadata(String),
}

/// The paths under `meta-data/iam/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Iam {
    /// `GET /latest/meta-data/iam/`.
    Listing,
    /// `GET /latest/meta-data/iam/security-credentials/`.
    RoleListing,
    /// `GET /latest/meta-data/iam/security-credentials/<name>`.
    RoleDocument(String),
    /// `GET /latest/meta-data/iam/info`.
    Info,
}

impl Route {
    fn label(&self) -> &'static str {
        match self {
            Route::Token => "token",
            Route::Iam(Iam::Listing) => "iam",
            Route::Iam(Iam::RoleListing) => "role_listing",
            Route::Iam(Iam::RoleDocument(_)) => "credentials",
            Route::Iam(Iam::Info) => "info",
            Route::Metadata(_) => "metadata",
        }
    }

    /// The one canonical path this route answers (without the tolerated trailing slash).
    pub fn path(&self) -> String {
        match self {
            Route::Token => "/latest/api/token".to_owned(),
            Route::Iam(Iam::Listing) => "/latest/meta-data/iam".to_owned(),
            Route::Iam(Iam::RoleListing) => "/latest/meta-data/iam/security-credentials".to_owned(),
            Route::Iam(Iam::RoleDocument(name)) => format!("/latest/meta-data/iam/security-credentials/{name}"),
            Route::Iam(Iam::Info) => "/latest/meta-data/iam/info".to_owned(),
            Route::Metadata(path) if path.is_empty() => "/latest".to_owned(),
            Route::Metadata(path) => format!("/latest/{path}"),
        }
    }
}

/// Routes a whole request target. Only the origin form (`/path`) is accepted: an absolute-form target
/// (`GET http://host/path`), an authority or `*` form, and any query string are 400, so nothing but
/// the path can ever influence what is answered (or forwarded upstream).
pub fn route_target(method: &Method, target: &http::Uri) -> Result<Route, Failure> {
    if target.scheme().is_some() || target.authority().is_some() || target.query().is_some() {
        return Err(Failure::BadPath);
    }
    route(method, target.path())
}

/// Routes a request. Paths are taken literally: anything that a normalising proxy or client could
/// read differently (dot segments, percent-encoding, backslashes, empty segments, control bytes) is a
/// 400 and never reaches a handler.
pub fn route(method: &Method, path: &str) -> Result<Route, Failure> {
    if !is_clean(path) {
        return Err(Failure::BadPath);
    }
    let segments: Vec<&str> = path[1..].split('/').collect();
    // One trailing slash is tolerated on every path, as IMDS does (botocore asks for leaves with one).
    let segments = match segments.split_last() {
        Some((&"", rest)) => rest,
        _ => &segments[..],
    };
    match segments {
        ["latest", "api", "token"] => {
            return if method == Method::PUT {
                Ok(Route::Token)
            } else {
                Err(Failure::MethodNotAllowed("OPTIONS, PUT"))
            };
        }
        [_, "api", "token"] if method == Method::PUT => return Err(Failure::VersionedTokenPath),
        _ => {}
    }
    let route = match segments {
        ["latest", "meta-data", "iam"] => Route::Iam(Iam::Listing),
        ["latest", "meta-data", "iam", "security-credentials"] => Route::Iam(Iam::RoleListing),
        ["latest", "meta-data", "iam", "security-credentials", name] => {
            Route::Iam(Iam::RoleDocument((*name).to_owned()))
        }
        ["latest", "meta-data", "iam", "info"] => Route::Iam(Iam::Info),
        // The node's own credential tree is never looked up anywhere else.
        ["latest", "meta-data", "iam", ..] => return Err(Failure::NotFound),
        ["latest"] => Route::Metadata(String::new()),
        ["latest", "meta-data" | "dynamic", ..] => Route::Metadata(segments[1..].join("/")),
        _ => return Err(Failure::NotFound),
    };
    if method != Method::GET && method != Method::HEAD {
        return Err(Failure::MethodNotAllowed("GET, HEAD"));
    }
    Ok(route)
}

fn is_clean(path: &str) -> bool {
    path.starts_with('/')
        && path.len() <= 1024
        && path.bytes().all(|b| b.is_ascii_graphic() && b != b'%' && b != b'\\')
        && path[1..]
            .split('/')
            .enumerate()
            .all(|(i, s)| s != "." && s != ".." && (!s.is_empty() || i == path[1..].split('/').count() - 1))
}

/// Request metrics.
#[derive(Clone)]
pub struct Metrics {
    requests: IntCounterVec,
    seconds: HistogramVec,
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
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            ]),
            &["route"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(seconds.clone()))?;
        Ok(Self { requests, seconds })
    }
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
    /// Everything under `/latest/` that is not the credential tree.
    pub metadata: Metadata,
    /// Namespaces that require IMDSv2 whatever `--imdsv2` says.
    pub namespaces: crate::namespaces::Policy,
}

impl Handler {
    /// Answers one request from `peer`.
    pub async fn handle<B>(self: Arc<Self>, peer: IpAddr, request: Request<B>) -> Response<Body> {
        let started = Instant::now();
        // An IPv4 peer seen through a dual-stack socket arrives as `::ffff:a.b.c.d`; pods are indexed
        // by the plain IPv4 address.
        let peer = peer.to_canonical();
        let route = route_target(request.method(), request.uri());
        let label = route.as_ref().map_or("other", Route::label);
        let outcome = match route {
            Ok(route) => self.answer(peer, &request, route).await,
            Err(failure) => Err(failure),
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
                let token = token.to_str().map_err(|_| Failure::BadToken)?;
                if let Err(invalid) = self.imds_tokens.verify(token, peer, now) {
                    tracing::info!(%peer, reason = %invalid, "refusing IMDSv2 request");
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
            tracing::info!(pod = %workload.key(), "refusing IMDSv1 request: the namespace requires IMDSv2");
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
            tracing::info!(%peer, "refusing token request that came through a proxy (X-Forwarded-For)");
            return Err(Failure::Forwarded);
        }
        let ttl = headers
            .get("x-aws-ec2-metadata-token-ttl-seconds")
            .and_then(|v| imds_token::parse_ttl(v.as_bytes()))
            .ok_or(Failure::BadTtl)?;
        if let Some(hops) = request.extensions().get::<HopLimit>() {
            hops.limit(self.config.token_hop_limit);
        }
        Ok(response::token(self.imds_tokens.issue(peer, ttl, now), ttl))
    }

    /// The rest of the metadata tree, for a known pod.
    async fn metadata(&self, workload: &Workload, path: &str) -> Result<Response<Body>, Failure> {
        let with_iam = matches!(self.cache.resolver().resolve(workload), Ok(Some(_)));
        match self.metadata.get(path, with_iam).await {
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
                tracing::info!(pod = %workload.key(), asked = %name, role = %role, "refusing another role's document");
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
            tracing::info!(%peer, "refusing: the pod view is incomplete (starting, or relisting after missed events)");
            return Err(Failure::Unsynced);
        }
        match self.store.lookup_or_wait(peer, deadline).await {
            Lookup::Found(workload) => Ok(workload),
            Lookup::Ambiguous(pods) => {
                tracing::warn!(%peer, ?pods, "refusing: several live pods claim this IP");
                Err(Failure::Contested)
            }
            Lookup::Pending => {
                tracing::info!(%peer, "refusing: this IP belongs to a pod that cannot be running (terminated, or not seen since the node booted)");
                Err(Failure::Contested)
            }
            Lookup::Unknown if !self.store.view().reachable => {
                tracing::info!(%peer, "refusing: no known pod has this IP and the API server is unreachable");
                Err(Failure::Unsynced)
            }
            Lookup::Unknown => {
                tracing::info!(%peer, "refusing: no pod on this node has this IP");
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
            Err(error) => {
                tracing::warn!(pod = %workload.key(), %error, "refusing credentials: invalid role annotation");
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

    fn get(path: &str) -> Result<Route, Failure> {
        route(&Method::GET, path)
    }

    fn kind(r: Result<Route, Failure>) -> &'static str {
        match r {
            Ok(_) => "ok",
            Err(f) => f.kind(),
        }
    }

    #[test]
    fn the_credential_paths_route_with_and_without_a_trailing_slash() {
        let list = Ok::<_, ()>(Route::Iam(Iam::RoleListing));
        assert_eq!(
            get("/latest/meta-data/iam/security-credentials/").ok(),
            list.clone().ok()
        );
        assert_eq!(get("/latest/meta-data/iam/security-credentials").ok(), list.ok());
        assert_eq!(
            get("/latest/meta-data/iam/security-credentials/app").ok(),
            Some(Route::Iam(Iam::RoleDocument("app".into())))
        );
        assert_eq!(
            get("/latest/meta-data/iam/security-credentials/app/").ok(),
            Some(Route::Iam(Iam::RoleDocument("app".into())))
        );
        assert_eq!(get("/latest/meta-data/iam/info").ok(), Some(Route::Iam(Iam::Info)));
        assert_eq!(get("/latest/meta-data/iam/").ok(), Some(Route::Iam(Iam::Listing)));
        assert_eq!(
            route(&Method::HEAD, "/latest/meta-data/iam/info").ok(),
            Some(Route::Iam(Iam::Info))
        );
    }

    #[test]
    fn the_extended_credentials_api_is_not_found_so_sdks_fall_back() {
        assert_eq!(
            kind(get("/latest/meta-data/iam/security-credentials-extended/")),
            "not_found"
        );
        assert_eq!(
            kind(get("/latest/meta-data/iam/security-credentials-extended/app")),
            "not_found"
        );
    }

    #[test]
    fn other_paths_are_not_found() {
        for path in [
            "/",
            "/latest/user-data",
            "/latest/user-data/",
            "/2021-07-15/meta-data/placement/region",
            "/latest/meta-data/iam/security-credentials/a/b",
            "/latest/meta-data/iam/security-credentials-extended/app",
            "/latest/meta-data/iam/anything-else",
        ] {
            assert_eq!(kind(get(path)), "not_found", "{path}");
        }
    }

    #[test]
    fn hostile_paths_are_rejected_before_routing() {
        for path in [
            "/latest/meta-data/iam/security-credentials/../../user-data",
            "/latest/meta-data/iam/security-credentials/%2e%2e/x",
            "/latest/meta-data/iam/security-credentials%2fapp",
            "/latest/meta-data/iam/security-credentials\\app",
            "/latest//meta-data/iam/info",
            "/latest/meta-data/iam/./info",
            "latest/meta-data/iam/info",
        ] {
            assert_eq!(kind(get(path)), "bad_path", "{path}");
        }
        assert_eq!(kind(get(&format!("/latest/{}", "a".repeat(2000)))), "bad_path");
    }

    fn target(t: &str) -> Result<Route, Failure> {
        route_target(&Method::GET, &t.parse::<http::Uri>().unwrap())
    }

    #[test]
    fn the_metadata_tree_routes_to_the_metadata_source_by_canonical_path() {
        assert_eq!(get("/latest").ok(), Some(Route::Metadata(String::new())));
        assert_eq!(get("/latest/").ok(), Some(Route::Metadata(String::new())));
        assert_eq!(
            get("/latest/meta-data/").ok(),
            Some(Route::Metadata("meta-data".into()))
        );
        assert_eq!(
            get("/latest/meta-data/placement/availability-zone/").ok(),
            Some(Route::Metadata("meta-data/placement/availability-zone".into()))
        );
        assert_eq!(
            get("/latest/dynamic/instance-identity/document").ok(),
            Some(Route::Metadata("dynamic/instance-identity/document".into()))
        );
        assert_eq!(
            kind(route(&Method::POST, "/latest/meta-data/placement/region")),
            "method_not_allowed"
        );
    }

    #[test]
    fn only_origin_form_targets_without_a_query_are_routed() {
        assert_eq!(target("/latest/meta-data/iam/info").ok(), Some(Route::Iam(Iam::Info)));
        for bad in [
            "http://169.254.169.254/latest/meta-data/iam/info",
            "http://evil/latest/meta-data/iam/info",
            "169.254.169.254:80",
            "*",
            "/latest/meta-data/iam/info?x=1",
            "/latest/meta-data/iam/info?",
            "/latest/meta-data/placement/region?../../user-data",
        ] {
            assert_eq!(kind(target(bad)), "bad_path", "{bad}");
        }
    }

    #[test]
    fn control_bytes_spaces_and_non_ascii_are_rejected() {
        for path in [
            "/latest/meta-data/iam/info\0",
            "/latest/meta-data/iam/info\0/x",
            "/latest/meta-data/iam/\tinfo",
            "/latest/meta-data/iam/info\r\n",
            "/latest/meta-data/iam/ info",
            "/latest/meta-data/iam/inf\u{7f}o",
            "/latest/meta-data/iam/\u{e9}",
            "/latest/meta-data/placement/region/..",
            "/latest/meta-data/placement/%2E%2E/%2e%2e/user-data",
            "/latest/dynamic/..\\..\\user-data",
            "//latest/meta-data/iam/info",
            "/latest/meta-data//",
        ] {
            assert_eq!(kind(get(path)), "bad_path", "{path:?}");
        }
    }

    use proptest::strategy::Strategy;

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(4096))]

        /// Whatever the target, a routed request answers exactly its one canonical path (optionally
        /// with the one tolerated trailing slash): nothing is resolved, decoded or normalised.
        #[test]
        fn a_routed_target_is_exactly_its_canonical_path(
            parts in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::sample::select(vec![
                        "latest", "meta-data", "iam", "security-credentials", "info", "api", "token",
                        "dynamic", "instance-identity", "document", "placement", "region", "user-data",
                        "..", ".", "", "%2e", "%2f", "%2E%2E", "\\", "\0", "\t", "\u{e9}", "?", "#",
                        " ", ";", "http:", "a\\b", "..;",
                    ]).prop_map(str::to_owned),
                    "[ -~]{0,6}",
                    proptest::prelude::any::<String>(),
                ],
                0..8,
            ),
            leading in proptest::sample::select(vec!["/", "", "//", "\\", "http://x/"]),
            trailing in proptest::sample::select(vec!["", "/", "//"]),
        ) {
            let path = format!("{leading}{}{trailing}", parts.join("/"));
            if let Ok(route) = get(&path) {
                let canonical = route.path();
                let with_slash = canonical.clone() + "/";
                proptest::prop_assert!(
                    path == canonical || path == with_slash,
                    "{:?} routed as {:?}", path, canonical
                );
                proptest::prop_assert!(path.bytes().all(|b| b.is_ascii_graphic() && b != b'%' && b != b'\\'));
                proptest::prop_assert!(!path.split('/').any(|s| s == ".." || s == "."));
            }
            if let Ok(uri) = path.parse::<http::Uri>()
                && let Ok(route) = route_target(&Method::GET, &uri)
            {
                proptest::prop_assert!(uri.query().is_none() && uri.authority().is_none());
                let (canonical, got) = (route.path(), uri.path());
                proptest::prop_assert!(got == canonical || got.strip_suffix('/') == Some(canonical.as_str()));
            }
        }
    }

    #[test]
    fn the_token_path_takes_only_put() {
        assert_eq!(route(&Method::PUT, "/latest/api/token").ok(), Some(Route::Token));
        assert_eq!(kind(route(&Method::GET, "/latest/api/token")), "method_not_allowed");
        assert_eq!(kind(route(&Method::POST, "/latest/api/token")), "method_not_allowed");
        assert_eq!(
            kind(route(&Method::PUT, "/2021-03-23/api/token")),
            "versioned_token_path"
        );
    }

    #[test]
    fn metadata_paths_take_only_get_and_head() {
        assert_eq!(
            kind(route(&Method::POST, "/latest/meta-data/iam/security-credentials/")),
            "method_not_allowed"
        );
        assert_eq!(
            kind(route(&Method::PUT, "/latest/meta-data/iam/info")),
            "method_not_allowed"
        );
    }

    #[test]
    fn v4_mapped_peers_are_seen_as_ipv4() {
        assert_eq!(
            "::ffff:10.0.0.1".parse::<IpAddr>().unwrap().to_canonical(),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
    }
}
