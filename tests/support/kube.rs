//! A wire-level double of the Kubernetes API server: pods, service accounts, watches and TokenRequest.
//!
//! Owns [`FakeKube`], a plain HTTP/1.1 server on loopback that answers the requests the real `kube`
//! client and kube-runtime's watcher send, with the real server's shapes and status codes:
//! - `GET /api/v1/{pods,serviceaccounts}` and `GET /api/v1/namespaces/{ns}/{pods,serviceaccounts}`:
//!   lists (with `limit`/`continue` pagination from a snapshot, `fieldSelector`, `labelSelector`) and
//!   `watch=true` streams (newline-delimited events from `resourceVersion`, initial `ADDED` events for
//!   `resourceVersion=0`/unset, `sendInitialEvents` with the `k8s.io/initial-events-end` bookmark,
//!   `allowWatchBookmarks`, `timeoutSeconds`, a `DELETED` event when an object leaves the field
//!   selector, and an `ERROR` event with a 410 `Expired` Status for a compacted `resourceVersion`);
//! - `GET/PUT/PATCH/DELETE /api/v1/namespaces/{ns}/{pods,serviceaccounts}/{name}` and `POST` to the
//!   collection (objects get a UID and a global, increasing `resourceVersion`);
//! - `POST /api/v1/namespaces/{ns}/serviceaccounts/{sa}/token` (authentication.k8s.io/v1 TokenRequest,
//!   bound to a pod, signed with [`super::jwt`]'s test key);
//! - `GET /api/v1/namespaces` lists and watches of Namespaces (cluster-scoped; stored with an empty
//!   namespace), for the per-namespace IMDSv2 policy;
//! - the metadata-only form of lists, watches and gets, negotiated by `Accept` as the real server
//!   does: `application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1` for a list,
//!   `...;as=PartialObjectMetadata;...` for a watch or a get (kind `PartialObjectMetadata[List]`,
//!   apiVersion `meta.k8s.io/v1`, only `metadata`); 406 when no offered type can be served;
//! - list `resourceVersion` semantics as the real server's watch cache applies them: unset reads the
//!   latest version and honours `limit`; `0` (any version) and `resourceVersionMatch=NotOlderThan`
//!   are served from the cache, whole, ignoring `limit`; a version newer than the server's is 504
//!   `Too large resource version`; `Exact` (or a version with a limit and no match) of a version
//!   already compacted is 410 (the double keeps no history of states, so an `Exact` list of a later
//!   version serves the current one);
//! - `POST /apis/events.k8s.io/v1/namespaces/{ns}/events` and `GET`/`PATCH` of one Event, validated
//!   strictly and recorded (see [`events`]);
//! - `GET /openid/v1/jwks`, `GET /.well-known/openid-configuration`, `GET /version`, `GET /api`;
//! - `/_double/...` control endpoints for scripts (see [`FakeKube`]); not counted as API requests.
//!
//! Faults a test can inject, all on tokio's clock (so they compress under `tokio::time::pause()`):
//! slow lists per kind, watch events delivered late (a fixed delay plus random jitter per kind, in
//! order within each watch, so events of different kinds can arrive out of order), failing
//! TokenRequests, compaction, broken watches, and API outages (503s, or connections reset unanswered).
//! Objects can also be stored exactly as given, unvalidated ([`FakeKube::inject_raw`]), to serve what
//! does not match the client's schema.
//!
//! Every API request is recorded ([`FakeKube::requests_seen`]: path, query, `Accept`), and what lists
//! and watches served is counted per kind ([`FakeKube::traffic`]).
//!
//! Anything else is a 404 Status. Tokens are never logged or echoed anywhere but the TokenRequest answer.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::jwt::{self, Claims, Signer};

#[path = "kube/events.rs"]
pub mod events;
pub use events::EventWrite;

/// The pod annotation kube2iam/kiam read.
pub const POD_ROLE_ANNOTATION: &str = "iam.amazonaws.com/role";
/// The service-account annotation IRSA reads.
pub const SA_ROLE_ANNOTATION: &str = "eks.amazonaws.com/role-arn";

/// Watch history kept before the oldest entries are compacted away.
const HISTORY_LIMIT: usize = 20_000;
/// One API request as received.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The decoded query parameters.
    pub query: HashMap<String, String>,
    /// The `Accept` header, if any.
    pub accept: Option<String>,
}

impl RequestRecord {
    /// Whether this is a list or watch of `kind`'s collection (all namespaces or one).
    pub fn is_collection(&self, kind: Kind) -> bool {
        self.method == "GET"
            && self
                .path
                .trim_end_matches('/')
                .ends_with(&format!("/{}", kind.plural()))
    }

    /// Whether this is a watch.
    pub fn is_watch(&self) -> bool {
        self.query.get("watch").is_some_and(|w| w == "true" || w == "1")
    }
}

/// What a kind's lists and watches have served.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// List requests answered (each page counts).
    pub lists: u64,
    /// Bytes of list response bodies.
    pub list_bytes: u64,
    /// Watch requests answered.
    pub watches: u64,
    /// Bytes sent on watch streams (events, bookmarks, errors).
    pub watch_bytes: u64,
}

/// Which form of an object a request asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    /// The whole object.
    Full,
    /// `PartialObjectMetadata`: kind, apiVersion and metadata only.
    Metadata,
}

/// Picks the first media type of `accept` this endpoint can serve, as the real server's negotiation
/// does: JSON (or any) for whole objects, `as=PartialObjectMetadataList` for a list and
/// `as=PartialObjectMetadata` for a watch or a get, both in `meta.k8s.io/v1`. 406 when none fits.
fn negotiate(accept: Option<&str>, list: bool) -> Result<Form, ApiError> {
    let Some(accept) = accept.filter(|a| !a.trim().is_empty()) else {
        return Ok(Form::Full);
    };
    for offered in accept.split(',') {
        let mut parts = offered.split(';').map(str::trim);
        let media = parts.next().unwrap_or_default().to_ascii_lowercase();
        if !matches!(media.as_str(), "application/json" | "application/*" | "*/*") {
            continue;
        }
        let params: HashMap<String, String> = parts
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let Some(target) = params.get("as") else {
            return Ok(Form::Full);
        };
        let wanted = if list {
            "PartialObjectMetadataList"
        } else {
            "PartialObjectMetadata"
        };
        if target == wanted
            && params.get("g").map(String::as_str) == Some("meta.k8s.io")
            && params.get("v").map(String::as_str) == Some("v1")
        {
            return Ok(Form::Metadata);
        }
    }
    Err(ApiError::new(
        406,
        "NotAcceptable",
        "only the following media types are accepted: application/json, application/yaml, application/vnd.kubernetes.protobuf",
    ))
}

/// `object` in the form asked for. The type of a metadata-only object is `PartialObjectMetadata`
/// whatever its kind.
fn in_form(object: &Value, form: Form) -> Value {
    match form {
        Form::Full => object.clone(),
        Form::Metadata => json!({
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": object.get("metadata").cloned().unwrap_or_else(|| json!({})),
        }),
    }
}

/// Pagination snapshots kept for `continue` tokens.
const SNAPSHOT_LIMIT: usize = 64;
/// Server-side watch timeout when the client sends no `timeoutSeconds`.
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// The resources this double serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `pods`
    Pod,
    /// `serviceaccounts`
    ServiceAccount,
    /// `namespaces` (cluster-scoped)
    Namespace,
    /// `nodes` (cluster-scoped)
    Node,
}

impl Kind {
    fn from_plural(s: &str) -> Option<Self> {
        match s {
            "pods" => Some(Kind::Pod),
            "serviceaccounts" => Some(Kind::ServiceAccount),
            "namespaces" => Some(Kind::Namespace),
            "nodes" => Some(Kind::Node),
            _ => None,
        }
    }

    /// The lower-case plural used in paths and Status details.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Pod => "pods",
            Kind::ServiceAccount => "serviceaccounts",
            Kind::Namespace => "namespaces",
            Kind::Node => "nodes",
        }
    }

    /// The `kind` of one object.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Pod => "Pod",
            Kind::ServiceAccount => "ServiceAccount",
            Kind::Namespace => "Namespace",
            Kind::Node => "Node",
        }
    }

    fn list_kind(self) -> &'static str {
        match self {
            Kind::Pod => "PodList",
            Kind::ServiceAccount => "ServiceAccountList",
            Kind::Namespace => "NamespaceList",
            Kind::Node => "NodeList",
        }
    }

    /// Field labels the real API server accepts in `fieldSelector` for this resource.
    fn field_labels(self) -> &'static [&'static str] {
        match self {
            Kind::Pod => &[
                "metadata.name",
                "metadata.namespace",
                "spec.nodeName",
                "spec.restartPolicy",
                "spec.schedulerName",
                "spec.serviceAccountName",
                "spec.hostNetwork",
                "status.phase",
                "status.podIP",
                "status.nominatedNodeName",
            ],
            Kind::ServiceAccount => &["metadata.name", "metadata.namespace"],
            Kind::Namespace => &["metadata.name", "status.phase"],
            Kind::Node => &["metadata.name", "spec.unschedulable"],
        }
    }
}

/// How the API is down during [`FakeKube::set_outage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outage {
    /// Every API request is answered 503 with a `ServiceUnavailable` Status (an API server that is
    /// up but not serving, or a load balancer without healthy backends).
    Unavailable,
    /// Every API request gets no answer: its connection is reset (a crashed API server, a dropped
    /// load balancer flow).
    Reset,
}

/// One TokenRequest the double received (the token itself is not kept).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenRequestRecord {
    /// Namespace of the service account.
    pub namespace: String,
    /// Service account name.
    pub service_account: String,
    /// `spec.boundObjectRef.name`.
    pub pod_name: Option<String>,
    /// `spec.boundObjectRef.uid`.
    pub pod_uid: Option<String>,
    /// Effective audiences (the issuer when the request named none).
    pub audiences: Vec<String>,
    /// Effective `spec.expirationSeconds`.
    pub expiration_seconds: i64,
    /// The HTTP status the double answered with.
    pub status: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EventType {
    Added,
    Modified,
    Deleted,
}

#[derive(Debug)]
struct Change {
    rv: u64,
    /// When the change was written, for [`FakeKube::set_event_delay`].
    at: Instant,
    kind: Kind,
    event: EventType,
    old: Option<Arc<Value>>,
    new: Arc<Value>,
}

struct Snapshot {
    id: u64,
    rv: u64,
    items: Vec<Arc<Value>>,
}

struct State {
    rv: u64,
    objects: HashMap<Kind, BTreeMap<(String, String), Arc<Value>>>,
    history: VecDeque<Arc<Change>>,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted: u64,
    pending: Vec<Arc<Change>>,
    snapshots: VecDeque<Snapshot>,
    token_requests: Vec<TokenRequestRecord>,
    token_failure: Option<u16>,
    request_log: VecDeque<String>,
    seen: VecDeque<RequestRecord>,
    traffic: HashMap<Kind, Traffic>,
    outage: Option<Outage>,
    list_delay: HashMap<Kind, Duration>,
    event_delay: HashMap<Kind, Duration>,
    event_jitter: HashMap<Kind, Duration>,
}

struct Shared {
    state: Mutex<State>,
    events: Mutex<events::Store>,
    changes: broadcast::Sender<Arc<Change>>,
    breaker: watch::Sender<u64>,
    shutdown: watch::Sender<bool>,
    open_watches: watch::Sender<usize>,
    requests: AtomicUsize,
    snapshot_ids: AtomicU64,
    bookmark_interval_ms: AtomicU64,
    /// Signs new tokens; [`FakeKube::rotate_signer`] changes it.
    signer: std::sync::RwLock<&'static Signer>,
    /// Every key published at `/openid/v1/jwks` (the signer and the keys it replaced).
    published: std::sync::RwLock<Vec<&'static Signer>>,
    issuer: String,
    url: String,
}

/// The Kubernetes API server double. Dropping it stops the server and ends its watches.
///
/// Control endpoints (for scripts; not counted by [`FakeKube::request_count`]):
/// `GET /_double/stats` → `{"requests", "token_requests": [...], "token_request_count", "open_watches",
/// "resource_version", "events": [...], "event_writes": [...]}`; `POST /_double/compact`; `POST /_double/break-watches`;
/// `POST /_double/token-failure` with `{"status": 503}` or `null`; `POST /_double/outage` with
/// `{"mode": "unavailable"}`, `{"mode": "reset"}` or `null` (see [`FakeKube::set_outage`]).
pub struct FakeKube {
    shared: Arc<Shared>,
    addr: SocketAddr,
    accept: JoinHandle<()>,
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.accept.abort();
        let _ = self.shared.shutdown.send(true);
    }
}

impl FakeKube {
    /// Starts on `127.0.0.1:0`. Panics if it cannot bind.
    pub async fn start() -> Self {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("bind the Kubernetes double")
    }

    /// Starts on `addr` (use a loopback address).
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (changes, _) = broadcast::channel(16_384);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 1,
                objects: HashMap::new(),
                history: VecDeque::new(),
                compacted: 0,
                pending: Vec::new(),
                snapshots: VecDeque::new(),
                token_requests: Vec::new(),
                token_failure: None,
                request_log: VecDeque::new(),
                seen: VecDeque::new(),
                traffic: HashMap::new(),
                outage: None,
                list_delay: HashMap::new(),
                event_delay: HashMap::new(),
                event_jitter: HashMap::new(),
            }),
            events: Mutex::default(),
            changes,
            breaker: watch::Sender::new(0),
            shutdown: watch::Sender::new(false),
            open_watches: watch::Sender::new(0),
            requests: AtomicUsize::new(0),
            snapshot_ids: AtomicU64::new(1),
            bookmark_interval_ms: AtomicU64::new(1000),
            signer: std::sync::RwLock::new(Signer::test_key()),
            published: std::sync::RwLock::new(vec![Signer::test_key()]),
            issuer: jwt::DEFAULT_ISSUER.to_owned(),
            url: format!("http://{addr}"),
        });
        let accept = tokio::spawn(super::wire::serve(listener, Some(shared.shutdown.subscribe()), {
            let shared = shared.clone();
            move |req| handle(shared.clone(), req)
        }));
        Ok(Self { shared, addr, accept })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        self.shared.url.clone()
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A `kube::Client` for this double (no authentication).
    pub fn client(&self) -> ::kube::Client {
        ::kube::Client::try_from(::kube::Config::new(self.url().parse().expect("double url"))).expect("kube client")
    }

    /// The `iss` of the tokens it mints.
    pub fn issuer(&self) -> String {
        self.shared.issuer.clone()
    }

    /// The JWKS it serves at `/openid/v1/jwks`.
    pub fn jwks(&self) -> Value {
        self.shared.jwks()
    }

    /// Key rotation as an API server does it: new tokens are signed with [`Signer::other_key`], and
    /// both keys are published while tokens signed with the old one are still live.
    pub fn rotate_signer(&self) {
        *self.shared.signer.write().expect("signer lock") = Signer::other_key();
        self.shared
            .published
            .write()
            .expect("published lock")
            .push(Signer::other_key());
    }

    /// The signing key of its tokens.
    pub fn signer(&self) -> &'static Signer {
        *self.shared.signer.read().expect("signer lock")
    }

    /// A verifier for its tokens.
    pub fn verifier(&self) -> jwt::Verifier {
        jwt::Verifier::from_jwks(&self.jwks(), &self.issuer()).expect("own JWKS")
    }

    /// A kubeconfig pointing at this double with a dummy bearer token, for `KUBECONFIG`.
    pub fn kubeconfig_yaml(&self) -> String {
        kubeconfig_yaml(&self.url())
    }

    /// Creates or replaces a pod (a `serde_json::Value`, a [`PodFixture`] or a k8s-openapi `Pod`) and
    /// emits ADDED or MODIFIED; a different `metadata.uid` for an existing name is a recreation
    /// (DELETED then ADDED). Returns the stored object.
    pub fn upsert_pod(&self, pod: impl Serialize) -> Value {
        self.upsert(Kind::Pod, pod)
    }

    /// Deletes a pod (emits DELETED). Returns the last state, or `None` if it did not exist.
    pub fn delete_pod(&self, namespace: &str, name: &str) -> Option<Value> {
        self.delete(Kind::Pod, namespace, name)
    }

    /// The stored pod.
    pub fn get_pod(&self, namespace: &str, name: &str) -> Option<Value> {
        self.get(Kind::Pod, namespace, name)
    }

    /// Creates or replaces a service account; see [`FakeKube::upsert_pod`].
    pub fn upsert_service_account(&self, service_account: impl Serialize) -> Value {
        self.upsert(Kind::ServiceAccount, service_account)
    }

    /// Deletes a service account (emits DELETED).
    pub fn delete_service_account(&self, namespace: &str, name: &str) -> Option<Value> {
        self.delete(Kind::ServiceAccount, namespace, name)
    }

    /// The stored service account.
    pub fn get_service_account(&self, namespace: &str, name: &str) -> Option<Value> {
        self.get(Kind::ServiceAccount, namespace, name)
    }

    /// Creates or replaces a Namespace with these annotations (emits ADDED or MODIFIED).
    pub fn upsert_namespace(&self, name: &str, annotations: &[(&str, &str)]) -> Value {
        let annotations: serde_json::Map<String, Value> =
            annotations.iter().map(|(k, v)| ((*k).to_owned(), json!(v))).collect();
        self.upsert(
            Kind::Namespace,
            json!({ "metadata": { "name": name, "namespace": "", "annotations": annotations } }),
        )
    }

    /// Creates or replaces a Node with these taints (`(key, effect)`), stored as the API server would.
    pub fn upsert_node(&self, name: &str, taints: &[(&str, &str)]) -> Value {
        let taints: Vec<Value> = taints.iter().map(|(k, e)| json!({ "key": k, "effect": e })).collect();
        self.upsert(
            Kind::Node,
            json!({
                "metadata": { "name": name, "namespace": "", "labels": { "kubernetes.io/hostname": name } },
                "spec": { "taints": taints, "podCIDR": "10.244.1.0/24" },
            }),
        )
    }

    /// The keys of a Node's taints, in order (`None`: no such Node).
    pub fn node_taints(&self, name: &str) -> Option<Vec<String>> {
        let node = self.get(Kind::Node, "", name)?;
        Some(
            node["spec"]["taints"]
                .as_array()
                .map(|taints| {
                    taints
                        .iter()
                        .filter_map(|t| t["key"].as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default(),
        )
    }

    /// Creates or replaces an object of `kind`.
    pub fn upsert(&self, kind: Kind, object: impl Serialize) -> Value {
        let object = serde_json::to_value(object).expect("object serializes");
        let stored = self.shared.write(|st| st.upsert(kind, object));
        (*stored).clone()
    }

    /// Stores `object` as an object of `kind` exactly as given: no field the API server owns is filled
    /// in and nothing is validated, so it may have wrong types or no metadata at all (what a client
    /// meets when an object does not match its schema). Lists serve it and watches whose selectors it
    /// matches get an ADDED event with it. Returns the name it is stored under, with an empty
    /// namespace, for [`FakeKube::delete`].
    pub fn inject_raw(&self, kind: Kind, object: Value) -> String {
        self.shared.write(|st| st.insert_raw(kind, object))
    }

    /// Replaces the stored object `namespace/name` of `kind` with `object` verbatim (only its
    /// `metadata.resourceVersion` is set, when `metadata` is an object), as a Modified event: an
    /// object that changed into something the agent cannot decode.
    pub fn replace_raw(&self, kind: Kind, namespace: &str, name: &str, object: Value) {
        self.shared.write(|st| st.replace_raw(kind, namespace, name, object));
    }

    /// Deletes an object of `kind`.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        self.shared
            .write(|st| st.remove(kind, namespace, name))
            .map(|v| (*v).clone())
    }

    /// The stored object of `kind`.
    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        self.shared.lock().get(kind, namespace, name).map(|v| (**v).clone())
    }

    /// Every TokenRequest received, in order.
    pub fn token_requests(&self) -> Vec<TokenRequestRecord> {
        self.shared.lock().token_requests.clone()
    }

    /// How many TokenRequests were received (successful or not).
    pub fn token_request_count(&self) -> usize {
        self.shared.lock().token_requests.len()
    }

    /// Answer every TokenRequest with `status` and a Status body (e.g. 403, 429, 500, 503), or
    /// `None` to answer normally again.
    pub fn set_token_failure(&self, status: Option<u16>) {
        self.shared.lock().token_failure = status;
    }

    /// Forgets all watch history: every resourceVersion handed out so far becomes too old, so the next
    /// watch resuming from one gets a 410 `Expired` ERROR event and the client must relist. Open
    /// watches keep running (combine with [`FakeKube::break_watches`]).
    pub fn compact(&self) {
        self.shared.lock().compact();
    }

    /// Ends every open watch stream cleanly (the response ends), as an API server restart or a load
    /// balancer idle timeout does.
    pub fn break_watches(&self) {
        self.shared.break_watches();
    }

    /// Every stored events.k8s.io Event, by namespace and name.
    pub fn events(&self) -> Vec<Value> {
        self.shared.events().events()
    }

    /// Answer every Event write with `status` and a Status body (403 as for an agent without the
    /// RBAC rule), or `None` to answer normally again.
    pub fn set_event_failure(&self, status: Option<u16>) {
        self.shared.events().set_failure(status);
    }

    /// Every Event write (create or patch, accepted or not), in order.
    pub fn event_writes(&self) -> Vec<EventWrite> {
        self.shared.events().writes()
    }

    /// API requests received so far (lists, watches, gets, writes, TokenRequests, discovery).
    pub fn request_count(&self) -> usize {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// The last requests as `METHOD path?query` (at most 1000), oldest first.
    pub fn request_log(&self) -> Vec<String> {
        self.shared.lock().request_log.iter().cloned().collect()
    }

    /// The last API requests (at most 1000), oldest first, with their query and `Accept` header.
    pub fn requests_seen(&self) -> Vec<RequestRecord> {
        self.shared.lock().seen.iter().cloned().collect()
    }

    /// What the lists and watches of `kind` have served so far.
    pub fn traffic(&self, kind: Kind) -> Traffic {
        self.shared.lock().traffic.get(&kind).copied().unwrap_or_default()
    }

    /// Watch streams currently open.
    pub fn open_watches(&self) -> usize {
        *self.shared.open_watches.borrow()
    }

    /// Waits until at least `n` watch streams are open (subscribed to changes: anything written after
    /// this returns is delivered to them).
    pub async fn wait_for_watches(&self, n: usize) {
        let mut rx = self.shared.open_watches.subscribe();
        let _ = rx.wait_for(|open| *open >= n).await;
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    /// How often an idle watch with `allowWatchBookmarks` gets a BOOKMARK when its resourceVersion moved
    /// on without an event for it (default 1 s).
    pub fn set_bookmark_interval(&self, every: Duration) {
        let ms = u64::try_from(every.as_millis()).unwrap_or(u64::MAX).max(1);
        self.shared.bookmark_interval_ms.store(ms, Ordering::SeqCst);
    }

    /// Makes every plain list (a GET of a collection that is not a watch, each page) of `kind` wait
    /// `delay` before it is answered; the answer is the state at the end of the wait, as a slow
    /// API server reading from etcd. `Duration::ZERO` answers at once again.
    pub fn set_list_delay(&self, kind: Kind, delay: Duration) {
        set_or_clear(&mut self.shared.lock().list_delay, kind, delay);
    }

    /// Delivers every watch event of `kind` `delay` after its change was written (plus the jitter of
    /// [`FakeKube::set_event_jitter`]), as a lagging watch cache. Each watch keeps resourceVersion
    /// order: an event is never sent before the one before it, and bookmarks wait for delayed events.
    /// Applies to events replayed from history on a resume too, not to the initial `ADDED` state of a
    /// watch without a resourceVersion or of a streaming list. `Duration::ZERO` delivers at once again.
    pub fn set_event_delay(&self, kind: Kind, delay: Duration) {
        set_or_clear(&mut self.shared.lock().event_delay, kind, delay);
    }

    /// Adds a uniformly random extra delay between zero and `max` to each watch event of `kind`
    /// (drawn per watch and event); see [`FakeKube::set_event_delay`]. `Duration::ZERO` for none.
    pub fn set_event_jitter(&self, kind: Kind, max: Duration) {
        set_or_clear(&mut self.shared.lock().event_jitter, kind, max);
    }

    /// Starts (`Some`) or ends (`None`) an API outage. Starting one cuts every open watch, as
    /// [`FakeKube::break_watches`] does; while it lasts every API request (not `/_double/` control
    /// requests) fails the [`Outage`] way, including lists still waiting out a
    /// [`FakeKube::set_list_delay`]. Failed requests are still counted and logged.
    pub fn set_outage(&self, outage: Option<Outage>) {
        self.shared.set_outage(outage);
    }
}

fn set_or_clear(map: &mut HashMap<Kind, Duration>, kind: Kind, value: Duration) {
    if value.is_zero() {
        map.remove(&kind);
    } else {
        map.insert(kind, value);
    }
}

/// A kubeconfig for `server` with a dummy bearer token.
pub fn kubeconfig_yaml(server: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {server}\n\
         contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
         current-context: fake\nusers:\n- name: fake\n  user:\n    token: fake-token\n"
    )
}

// ---------------------------------------------------------------------------------------------------
// Fixtures

/// Starts a pod fixture; defaults: random UID, node `node-1`, service account `default`, phase
/// `Running`, no IP, no annotations.
pub fn pod(namespace: &str, name: &str) -> PodFixture {
    PodFixture {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        uid: jwt::random_uid(),
        node: Some("node-1".to_owned()),
        ips: Vec::new(),
        service_account: "default".to_owned(),
        phase: "Running".to_owned(),
        host_network: false,
        annotations: BTreeMap::new(),
        labels: BTreeMap::new(),
        deleting: false,
        container: None,
        restart_policy: "Always".to_owned(),
    }
}

/// The state of a fixture pod's one container, as the kubelet reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerFixture {
    /// `state.running` since the given time.
    Running(time::OffsetDateTime),
    /// `state.terminated` with this exit code, started at the given time.
    Terminated(time::OffsetDateTime, i32),
}

/// A pod under construction; [`PodFixture::build`] gives the JSON the API server would store.
#[derive(Debug, Clone)]
pub struct PodFixture {
    namespace: String,
    name: String,
    uid: String,
    node: Option<String>,
    ips: Vec<String>,
    service_account: String,
    phase: String,
    host_network: bool,
    annotations: BTreeMap<String, String>,
    labels: BTreeMap<String, String>,
    deleting: bool,
    container: Option<ContainerFixture>,
    restart_policy: String,
}

impl PodFixture {
    /// The pod's `metadata.uid`.
    pub fn uid_str(&self) -> &str {
        &self.uid
    }

    /// The pod's namespace.
    pub fn namespace_str(&self) -> &str {
        &self.namespace
    }

    /// The pod's `spec.serviceAccountName`.
    pub fn service_account_str(&self) -> &str {
        &self.service_account
    }

    /// Sets `metadata.uid`.
    pub fn uid(mut self, uid: &str) -> Self {
        self.uid = uid.to_owned();
        self
    }

    /// Sets `spec.nodeName` (`None`: not scheduled).
    pub fn node(mut self, node: Option<&str>) -> Self {
        self.node = node.map(str::to_owned);
        self
    }

    /// Sets the single pod IP (`status.podIP` and `status.podIPs`).
    pub fn ip(self, ip: &str) -> Self {
        self.ips(&[ip])
    }

    /// Sets the pod IPs (the first is `status.podIP`).
    pub fn ips(mut self, ips: &[&str]) -> Self {
        self.ips = ips.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    /// Sets `spec.serviceAccountName`.
    pub fn service_account(mut self, name: &str) -> Self {
        self.service_account = name.to_owned();
        self
    }

    /// Sets `status.phase` (Pending, Running, Succeeded, Failed, Unknown).
    pub fn phase(mut self, phase: &str) -> Self {
        self.phase = phase.to_owned();
        self
    }

    /// Sets `spec.hostNetwork`.
    pub fn host_network(mut self, on: bool) -> Self {
        self.host_network = on;
        self
    }

    /// Adds an annotation.
    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.insert(key.to_owned(), value.to_owned());
        self
    }

    /// Adds the kube2iam/kiam role annotation.
    pub fn role(self, role: &str) -> Self {
        self.annotation(POD_ROLE_ANNOTATION, role)
    }

    /// Sets `metadata.deletionTimestamp` (graceful deletion has begun).
    pub fn deleting(mut self) -> Self {
        self.deleting = true;
        self
    }

    /// Reports the pod's one container (`status.containerStatuses`); none by default.
    pub fn container(mut self, state: ContainerFixture) -> Self {
        self.container = Some(state);
        self
    }

    /// Sets `spec.restartPolicy` (default `Always`).
    pub fn restart_policy(mut self, policy: &str) -> Self {
        self.restart_policy = policy.to_owned();
        self
    }

    /// Adds a label.
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_owned(), value.to_owned());
        self
    }

    /// The pod as JSON.
    pub fn build(&self) -> Value {
        let mut metadata = json!({
            "name": self.name,
            "namespace": self.namespace,
            "uid": self.uid,
        });
        if !self.annotations.is_empty() {
            metadata["annotations"] = json!(self.annotations);
        }
        if !self.labels.is_empty() {
            metadata["labels"] = json!(self.labels);
        }
        let mut spec = json!({
            "serviceAccountName": self.service_account,
            "serviceAccount": self.service_account,
            "containers": [{"name": "main", "image": "registry.example/app:1"}],
            "restartPolicy": self.restart_policy,
            "schedulerName": "default-scheduler",
            "automountServiceAccountToken": true,
        });
        if let Some(node) = &self.node {
            spec["nodeName"] = json!(node);
        }
        if self.host_network {
            spec["hostNetwork"] = json!(true);
        }
        if self.deleting {
            metadata["deletionTimestamp"] = json!(now_rfc3339());
            metadata["deletionGracePeriodSeconds"] = json!(30);
        }
        let mut status = json!({ "phase": self.phase });
        if let Some(container) = self.container {
            let state = match container {
                ContainerFixture::Running(at) => json!({ "running": { "startedAt": rfc3339(at) } }),
                ContainerFixture::Terminated(at, code) => json!({ "terminated": {
                    "exitCode": code, "reason": if code == 0 { "Completed" } else { "Error" },
                    "startedAt": rfc3339(at), "finishedAt": now_rfc3339(),
                } }),
            };
            status["containerStatuses"] = json!([{
                "name": "main", "image": "registry.example/app:1", "imageID": "", "ready": matches!(container, ContainerFixture::Running(_)),
                "restartCount": 0, "state": state,
            }]);
        }
        if let Some(first) = self.ips.first() {
            status["podIP"] = json!(first);
            status["podIPs"] = json!(self.ips.iter().map(|ip| json!({ "ip": ip })).collect::<Vec<_>>());
        }
        if self.host_network
            && let Some(first) = self.ips.first()
        {
            status["hostIP"] = json!(first);
        }
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": metadata,
            "spec": spec,
            "status": status,
        })
    }
}

impl Serialize for PodFixture {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.build().serialize(serializer)
    }
}

impl From<PodFixture> for Value {
    fn from(p: PodFixture) -> Self {
        p.build()
    }
}

/// Starts a service-account fixture with a random UID.
pub fn service_account(namespace: &str, name: &str) -> ServiceAccountFixture {
    ServiceAccountFixture {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        uid: jwt::random_uid(),
        annotations: BTreeMap::new(),
    }
}

/// A service account under construction.
#[derive(Debug, Clone)]
pub struct ServiceAccountFixture {
    namespace: String,
    name: String,
    uid: String,
    annotations: BTreeMap<String, String>,
}

impl ServiceAccountFixture {
    /// Sets `metadata.uid`.
    pub fn uid(mut self, uid: &str) -> Self {
        self.uid = uid.to_owned();
        self
    }

    /// Adds an annotation.
    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.insert(key.to_owned(), value.to_owned());
        self
    }

    /// Adds the IRSA annotation `eks.amazonaws.com/role-arn`.
    pub fn role_arn(self, arn: &str) -> Self {
        self.annotation(SA_ROLE_ANNOTATION, arn)
    }

    /// The service account as JSON.
    pub fn build(&self) -> Value {
        let mut metadata = json!({ "name": self.name, "namespace": self.namespace, "uid": self.uid });
        if !self.annotations.is_empty() {
            metadata["annotations"] = json!(self.annotations);
        }
        json!({ "apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata })
    }
}

impl Serialize for ServiceAccountFixture {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.build().serialize(serializer)
    }
}

impl From<ServiceAccountFixture> for Value {
    fn from(s: ServiceAccountFixture) -> Self {
        s.build()
    }
}

// ---------------------------------------------------------------------------------------------------
// Store

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}

fn now_rfc3339() -> String {
    rfc3339(time::OffsetDateTime::now_utc())
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    let t = t.replace_nanosecond(0).expect("zero nanoseconds");
    t.format(&time::format_description::well_known::Rfc3339)
        .expect("RFC 3339")
}

impl Shared {
    fn jwks(&self) -> Value {
        let keys: Vec<Value> = self
            .published
            .read()
            .expect("published lock")
            .iter()
            .flat_map(|signer| signer.jwks()["keys"].as_array().cloned().unwrap_or_default())
            .collect();
        json!({ "keys": keys })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn events(&self) -> MutexGuard<'_, events::Store> {
        self.events.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ends every open watch; they stop counting as open at once, so a later
    /// [`FakeKube::wait_for_watches`] waits for the reconnections.
    fn break_watches(&self) {
        let _st = self.lock();
        self.breaker.send_modify(|g| *g += 1);
        self.open_watches.send_replace(0);
    }

    /// Sets the outage and cuts the watches under one lock, so no watch that started before the
    /// outage survives it ([`start_watch`] checks for an outage under the lock).
    fn set_outage(&self, outage: Option<Outage>) {
        let mut st = self.lock();
        st.outage = outage;
        if outage.is_some() {
            self.breaker.send_modify(|g| *g += 1);
            self.open_watches.send_replace(0);
        }
    }

    /// Runs `f` under the lock and publishes the changes it recorded, still under the lock, so a watch
    /// that subscribes under the lock sees every change exactly once.
    fn write<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let mut st = self.lock();
        let r = f(&mut st);
        for change in st.pending.drain(..) {
            let _ = self.changes.send(change);
        }
        r
    }
}

impl State {
    fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<&Arc<Value>> {
        self.objects.get(&kind)?.get(&(namespace.to_owned(), name.to_owned()))
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn record(&mut self, kind: Kind, event: EventType, old: Option<Arc<Value>>, new: Arc<Value>) {
        let change = Arc::new(Change {
            rv: self.rv,
            at: Instant::now(),
            kind,
            event,
            old,
            new,
        });
        self.history.push_back(change.clone());
        while self.history.len() > HISTORY_LIMIT {
            if let Some(dropped) = self.history.pop_front() {
                self.compacted = dropped.rv;
            }
        }
        self.pending.push(change);
    }

    fn compact(&mut self) {
        // An unrelated write elsewhere in the cluster moves the revision on; then etcd compacts.
        let rv = self.next_rv();
        self.history.clear();
        self.compacted = rv;
        self.snapshots.clear();
    }

    /// Fills in what the API server owns: kind, namespace, uid, resourceVersion, creationTimestamp and
    /// the pod defaults admission sets.
    fn stamp(&mut self, kind: Kind, namespace: &str, mut obj: Value, existing: Option<&Value>) -> Value {
        let rv = self.next_rv();
        let map = obj.as_object_mut().expect("object");
        map.insert("apiVersion".into(), json!("v1"));
        map.insert("kind".into(), json!(kind.name()));
        let meta = map
            .entry("metadata")
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("metadata object");
        meta.insert("namespace".into(), json!(namespace));
        let uid = existing
            .and_then(|e| meta_str(e, "uid"))
            .map(str::to_owned)
            .or_else(|| meta.get("uid").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_else(jwt::random_uid);
        meta.insert("uid".into(), json!(uid));
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        let created = existing
            .and_then(|e| meta_str(e, "creationTimestamp"))
            .map(str::to_owned)
            .or_else(|| meta.get("creationTimestamp").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_else(now_rfc3339);
        meta.insert("creationTimestamp".into(), json!(created));
        if kind == Kind::Pod {
            let spec = map
                .entry("spec")
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .expect("spec object");
            let sa = spec
                .get("serviceAccountName")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .unwrap_or("default")
                .to_owned();
            spec.insert("serviceAccountName".into(), json!(sa));
            spec.insert("serviceAccount".into(), json!(sa));
            let status = map
                .entry("status")
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .expect("status object");
            status.entry("phase").or_insert_with(|| json!("Pending"));
        }
        obj
    }

    fn insert(&mut self, kind: Kind, namespace: &str, name: &str, obj: Value) -> Arc<Value> {
        let existing = self.get(kind, namespace, name).cloned();
        let stored = Arc::new(self.stamp(kind, namespace, obj, existing.as_deref()));
        self.store(kind, namespace, name, existing, stored.clone());
        stored
    }

    fn replace_raw(&mut self, kind: Kind, namespace: &str, name: &str, mut obj: Value) {
        let existing = self.get(kind, namespace, name).cloned();
        let rv = self.next_rv();
        if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
        }
        self.store(kind, namespace, name, existing, Arc::new(obj));
    }

    /// Stores `stored` under `namespace/name` and records it as Added, or Modified over `existing`.
    fn store(&mut self, kind: Kind, namespace: &str, name: &str, existing: Option<Arc<Value>>, stored: Arc<Value>) {
        self.objects
            .entry(kind)
            .or_default()
            .insert((namespace.to_owned(), name.to_owned()), stored.clone());
        let event = if existing.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        self.record(kind, event, existing, stored);
    }

    fn insert_raw(&mut self, kind: Kind, obj: Value) -> String {
        let name = format!("raw-{}", self.next_rv());
        let stored = Arc::new(obj);
        self.objects
            .entry(kind)
            .or_default()
            .insert((String::new(), name.clone()), stored.clone());
        self.record(kind, EventType::Added, None, stored);
        name
    }

    fn upsert(&mut self, kind: Kind, obj: Value) -> Arc<Value> {
        let namespace = meta_str(&obj, "namespace").unwrap_or("default").to_owned();
        let name = meta_str(&obj, "name").expect("metadata.name").to_owned();
        if let Some(existing) = self.get(kind, &namespace, &name)
            && let Some(uid) = meta_str(&obj, "uid")
            && meta_str(existing, "uid") != Some(uid)
        {
            // Same name, new UID: the object was deleted and created again.
            self.remove(kind, &namespace, &name);
        }
        self.insert(kind, &namespace, &name, obj)
    }

    fn remove(&mut self, kind: Kind, namespace: &str, name: &str) -> Option<Arc<Value>> {
        let old = self
            .objects
            .get_mut(&kind)?
            .remove(&(namespace.to_owned(), name.to_owned()))?;
        let rv = self.next_rv();
        let mut last = (*old).clone();
        // A raw object ([`FakeKube::inject_raw`]) may have no metadata object to stamp.
        if let Some(meta) = last.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("resourceVersion".into(), json!(rv.to_string()));
        }
        let last = Arc::new(last);
        self.record(kind, EventType::Deleted, Some(old), last.clone());
        Some(last)
    }

    fn list(&self, kind: Kind, filter: &Filter) -> Vec<Arc<Value>> {
        self.objects
            .get(&kind)
            .map(|objects| objects.values().filter(|o| filter.matches(o)).cloned().collect())
            .unwrap_or_default()
    }
}

// ---------------------------------------------------------------------------------------------------
// Selectors

#[derive(Debug, Clone, Default)]
struct Filter {
    namespace: Option<String>,
    fields: Vec<(String, bool, String)>,
    labels: Vec<LabelRequirement>,
}

#[derive(Debug, Clone)]
enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

impl Filter {
    fn parse(kind: Kind, namespace: Option<&str>, query: &HashMap<String, String>) -> Result<Self, ApiError> {
        let mut filter = Filter {
            namespace: namespace.map(str::to_owned),
            ..Default::default()
        };
        if let Some(selector) = query.get("fieldSelector").filter(|s| !s.is_empty()) {
            for term in selector.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                let (key, eq, value) = if let Some((k, v)) = term.split_once("!=") {
                    (k, false, v)
                } else if let Some((k, v)) = term.split_once("==") {
                    (k, true, v)
                } else if let Some((k, v)) = term.split_once('=') {
                    (k, true, v)
                } else {
                    return Err(ApiError::bad_request(format!(
                        "invalid selector: '{selector}'; can't understand '{term}'"
                    )));
                };
                if !kind.field_labels().contains(&key) {
                    return Err(ApiError::bad_request(format!("field label not supported: {key}")));
                }
                filter.fields.push((key.to_owned(), eq, value.to_owned()));
            }
        }
        if let Some(selector) = query.get("labelSelector").filter(|s| !s.is_empty()) {
            filter.labels = parse_label_selector(selector)?;
        }
        Ok(filter)
    }

    fn matches(&self, obj: &Value) -> bool {
        if let Some(ns) = &self.namespace
            && meta_str(obj, "namespace") != Some(ns.as_str())
        {
            return false;
        }
        let fields_ok = self
            .fields
            .iter()
            .all(|(key, eq, value)| (field_value(obj, key) == *value) == *eq);
        let labels = obj.get("metadata").and_then(|m| m.get("labels"));
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        let labels_ok = self.labels.iter().all(|req| match req {
            LabelRequirement::Equals(k, v) => label(k) == Some(v.as_str()),
            LabelRequirement::NotEquals(k, v) => label(k) != Some(v.as_str()),
            LabelRequirement::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelRequirement::NotIn(k, vs) => !label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelRequirement::Exists(k) => label(k).is_some(),
            LabelRequirement::NotExists(k) => label(k).is_none(),
        });
        fields_ok && labels_ok
    }
}

fn field_value(obj: &Value, path: &str) -> String {
    let mut cur = obj;
    for part in path.split('.') {
        match cur.get(part) {
            Some(v) => cur = v,
            None => {
                return if path == "spec.hostNetwork" {
                    "false".into()
                } else {
                    String::new()
                };
            }
        }
    }
    match cur {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        _ => String::new(),
    }
}

fn parse_label_selector(selector: &str) -> Result<Vec<LabelRequirement>, ApiError> {
    // Split on commas outside parentheses.
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, c) in selector.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&selector[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&selector[start..]);
    let set = |s: &str| -> Vec<String> {
        s.trim()
            .trim_start_matches('(')
            .trim_end_matches(')')
            .split(',')
            .map(|v| v.trim().to_owned())
            .collect()
    };
    terms
        .into_iter()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            Ok(if let Some((k, v)) = t.split_once(" notin ") {
                LabelRequirement::NotIn(k.trim().into(), set(v))
            } else if let Some((k, v)) = t.split_once(" in ") {
                LabelRequirement::In(k.trim().into(), set(v))
            } else if let Some((k, v)) = t.split_once("!=") {
                LabelRequirement::NotEquals(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = t.split_once("==") {
                LabelRequirement::Equals(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = t.split_once('=') {
                LabelRequirement::Equals(k.trim().into(), v.trim().into())
            } else if let Some(k) = t.strip_prefix('!') {
                LabelRequirement::NotExists(k.trim().into())
            } else if t.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c)) {
                LabelRequirement::Exists(t.into())
            } else {
                return Err(ApiError::bad_request(format!("unable to parse requirement: {t}")));
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------------
// HTTP plumbing

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).boxed_unsync()
}

fn json_response(status: u16, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("cache-control", "no-cache, private")
        .body(full(serde_json::to_vec(body).expect("json")))
        .expect("response")
}

/// A failed API call, rendered as a `Status`.
#[derive(Debug)]
struct ApiError {
    code: u16,
    reason: &'static str,
    message: String,
    details: Option<Value>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    fn not_found(kind: Kind, name: &str) -> Self {
        Self {
            details: Some(json!({ "name": name, "kind": kind.plural() })),
            ..Self::new(404, "NotFound", format!("{} \"{name}\" not found", kind.plural()))
        }
    }

    fn for_status(code: u16) -> Self {
        let (reason, message) = match code {
            400 => ("BadRequest", "the server rejected our request for an unknown reason"),
            401 => ("Unauthorized", "Unauthorized"),
            403 => ("Forbidden", "forbidden: injected by the test double"),
            404 => ("NotFound", "the server could not find the requested resource"),
            409 => (
                "Conflict",
                "the object has been modified; please apply your changes to the latest version and try again",
            ),
            410 => ("Expired", "the resource has expired"),
            422 => ("Invalid", "the request is invalid"),
            429 => (
                "TooManyRequests",
                "the server has received too many requests and has asked us to try again later",
            ),
            503 => (
                "ServiceUnavailable",
                "the server is currently unable to handle the request",
            ),
            504 => (
                "Timeout",
                "the server was unable to return a response in the time allotted",
            ),
            _ => (
                "InternalError",
                "an error on the server (\"injected by the test double\") has prevented the request from succeeding",
            ),
        };
        Self::new(code, reason, message)
    }

    fn status_object(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }

    fn response(&self) -> Response<Body> {
        json_response(self.code, &self.status_object())
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = super::wire::parse(req.uri().query().unwrap_or_default());
    let accept = req
        .headers()
        .get(hyper::header::ACCEPT)
        .and_then(|a| a.to_str().ok())
        .map(str::to_owned);
    if !path.starts_with("/_double/") {
        shared.requests.fetch_add(1, Ordering::SeqCst);
        let mut st = shared.lock();
        st.request_log.push_back(format!(
            "{method} {}",
            req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/")
        ));
        if st.request_log.len() > 1000 {
            st.request_log.pop_front();
        }
        st.seen.push_back(RequestRecord {
            method: method.to_string(),
            path: path.clone(),
            query: query.clone(),
            accept: accept.clone(),
        });
        if st.seen.len() > 1000 {
            st.seen.pop_front();
        }
    }
    let body = match req.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return ApiError::bad_request("unreadable body").response(),
    };
    if !path.starts_with("/_double/")
        && let Some(outage) = shared.lock().outage
    {
        return outage_response(outage);
    }
    match route(&shared, &method, &path, &query, accept.as_deref(), &body).await {
        Ok(response) => response,
        Err(error) => error.response(),
    }
}

/// What a request gets during an outage.
fn outage_response(outage: Outage) -> Response<Body> {
    match outage {
        Outage::Unavailable => ApiError::for_status(503).response(),
        Outage::Reset => {
            let mut response = Response::new(full(Bytes::new()));
            response.extensions_mut().insert(super::wire::Reset);
            response
        }
    }
}

async fn route(
    shared: &Arc<Shared>,
    method: &Method,
    path: &str,
    query: &HashMap<String, String>,
    accept: Option<&str>,
    body: &Bytes,
) -> Result<Response<Body>, ApiError> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        (&Method::GET, ["openid", "v1", "jwks"]) => Ok(Response::builder()
            .status(200)
            .header("content-type", "application/jwk-set+json")
            .body(full(serde_json::to_vec(&shared.jwks()).expect("json")))
            .expect("response")),
        (&Method::GET, [".well-known", "openid-configuration"]) => Ok(json_response(
            200,
            &json!({
                "issuer": shared.issuer,
                "jwks_uri": format!("{}/openid/v1/jwks", shared.url),
                "response_types_supported": ["id_token"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
            }),
        )),
        (&Method::GET, ["version"]) => Ok(json_response(
            200,
            &json!({
                "major": "1", "minor": "33", "gitVersion": "v1.33.0-fake", "gitCommit": "0000000",
                "gitTreeState": "clean", "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.24",
                "compiler": "gc", "platform": "linux/amd64",
            }),
        )),
        (&Method::GET, ["api"]) => Ok(json_response(
            200,
            &json!({
                "kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": shared.url.trim_start_matches("http://")}],
            }),
        )),
        (_, ["_double", rest @ ..]) => control(shared, method, rest, body),
        (&Method::GET, ["api", "v1", plural]) => {
            let kind = Kind::from_plural(plural).ok_or_else(|| ApiError::for_status(404))?;
            collection_get(shared, kind, None, query, accept).await
        }
        (_, ["api", "v1", "namespaces", ns, plural]) => {
            let kind = Kind::from_plural(plural).ok_or_else(|| ApiError::for_status(404))?;
            match *method {
                Method::GET => collection_get(shared, kind, Some(ns), query, accept).await,
                Method::POST => create(shared, kind, ns, body),
                _ => Err(method_not_allowed(method)),
            }
        }
        (_, ["api", "v1", "namespaces", ns, plural, name]) => {
            let kind = Kind::from_plural(plural).ok_or_else(|| ApiError::for_status(404))?;
            item(shared, method, kind, ns, name, accept, body)
        }
        (&Method::POST, ["api", "v1", "nodes"]) => create(shared, Kind::Node, "", body),
        (_, ["api", "v1", "nodes", name]) => item(shared, method, Kind::Node, "", name, accept, body),
        (_, ["api", "v1", "namespaces", ns, "pods", name, "status"]) => {
            status_subresource(shared, method, ns, name, body)
        }
        (&Method::POST, ["api", "v1", "namespaces", ns, "serviceaccounts", sa, "token"]) => {
            token_request(shared, ns, sa, body)
        }
        (_, ["apis", "events.k8s.io", "v1", "namespaces", ns, "events"]) => match *method {
            Method::POST => Ok(json_response(201, &shared.events().create(ns, body)?)),
            _ => Err(method_not_allowed(method)),
        },
        (_, ["apis", "events.k8s.io", "v1", "namespaces", ns, "events", name]) => match *method {
            Method::GET => Ok(json_response(200, &shared.events().get(ns, name)?)),
            Method::PATCH => Ok(json_response(200, &shared.events().patch(ns, name, body)?)),
            _ => Err(method_not_allowed(method)),
        },
        _ => Err(ApiError::for_status(404)),
    }
}

fn method_not_allowed(method: &Method) -> ApiError {
    ApiError::new(
        405,
        "MethodNotAllowed",
        format!("the server does not allow this method on the requested resource ({method})"),
    )
}

fn parse_object(body: &[u8]) -> Result<Value, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body of the request was in an unknown format: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::bad_request("the body of the request must be a JSON object"));
    }
    Ok(value)
}

fn generate_name(obj: &mut Value) -> Result<String, ApiError> {
    if let Some(name) = meta_str(obj, "name").filter(|n| !n.is_empty()) {
        return Ok(name.to_owned());
    }
    let Some(prefix) = meta_str(obj, "generateName").filter(|n| !n.is_empty()) else {
        return Err(ApiError::new(
            422,
            "Invalid",
            "metadata.name: Required value: name or generateName is required",
        ));
    };
    let suffix: String = (0..5)
        .map(|_| {
            let alphabet = b"bcdfghjklmnpqrstvwxz2456789";
            alphabet[rand::random_range(0..alphabet.len())] as char
        })
        .collect();
    let name = format!("{prefix}{suffix}");
    obj["metadata"]["name"] = json!(name);
    Ok(name)
}

fn check_namespace(obj: &Value, ns: &str) -> Result<(), ApiError> {
    match meta_str(obj, "namespace") {
        Some(other) if !other.is_empty() && other != ns => Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        )),
        _ => Ok(()),
    }
}

fn create(shared: &Arc<Shared>, kind: Kind, ns: &str, body: &[u8]) -> Result<Response<Body>, ApiError> {
    let mut obj = parse_object(body)?;
    check_namespace(&obj, ns)?;
    let name = generate_name(&mut obj)?;
    let stored = shared.write(|st| {
        if st.get(kind, ns, &name).is_some() {
            return Err(ApiError {
                details: Some(json!({ "name": name, "kind": kind.plural() })),
                ..ApiError::new(
                    409,
                    "AlreadyExists",
                    format!("{} \"{name}\" already exists", kind.plural()),
                )
            });
        }
        if let Some(map) = obj["metadata"].as_object_mut() {
            map.remove("resourceVersion");
        }
        Ok(st.insert(kind, ns, &name, obj))
    })?;
    Ok(json_response(201, &stored))
}

fn item(
    shared: &Arc<Shared>,
    method: &Method,
    kind: Kind,
    ns: &str,
    name: &str,
    accept: Option<&str>,
    body: &[u8],
) -> Result<Response<Body>, ApiError> {
    match *method {
        Method::GET => {
            let form = negotiate(accept, false)?;
            let st = shared.lock();
            let obj = st.get(kind, ns, name).ok_or_else(|| ApiError::not_found(kind, name))?;
            Ok(json_response(200, &in_form(obj, form)))
        }
        Method::DELETE => {
            let last = shared
                .write(|st| st.remove(kind, ns, name))
                .ok_or_else(|| ApiError::not_found(kind, name))?;
            Ok(json_response(200, &last))
        }
        Method::PUT | Method::PATCH => {
            let patch = parse_object(body)?;
            let stored = shared.write(|st| {
                let existing = st.get(kind, ns, name).cloned().ok_or_else(|| ApiError::not_found(kind, name))?;
                let obj = if *method == Method::PATCH {
                    let mut merged = (*existing).clone();
                    merge_patch(&mut merged, &patch);
                    merged
                } else {
                    check_namespace(&patch, ns)?;
                    if meta_str(&patch, "name").is_some_and(|n| n != name) {
                        return Err(ApiError::bad_request(
                            "the name of the object does not match the name on the URL",
                        ));
                    }
                    if let Some(rv) = meta_str(&patch, "resourceVersion")
                        && Some(rv) != meta_str(&existing, "resourceVersion")
                    {
                        return Err(ApiError::new(
                            409,
                            "Conflict",
                            format!(
                                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                                kind.plural()
                            ),
                        ));
                    }
                    if let Some(uid) = meta_str(&patch, "uid")
                        && Some(uid) != meta_str(&existing, "uid")
                    {
                        return Err(ApiError::new(
                            409,
                            "Conflict",
                            format!("Precondition failed: UID in precondition: {uid}, UID in object meta: {}", meta_str(&existing, "uid").unwrap_or_default()),
                        ));
                    }
                    let mut obj = patch.clone();
                    obj["metadata"]["name"] = json!(name);
                    obj
                };
                Ok(st.insert(kind, ns, name, obj))
            })?;
            Ok(json_response(200, &stored))
        }
        _ => Err(method_not_allowed(method)),
    }
}

/// `GET/PUT/PATCH .../pods/{name}/status`: like the object itself, but writes change only `status`.
fn status_subresource(
    shared: &Arc<Shared>,
    method: &Method,
    ns: &str,
    name: &str,
    body: &[u8],
) -> Result<Response<Body>, ApiError> {
    if *method == Method::GET {
        return item(shared, method, Kind::Pod, ns, name, None, body);
    }
    if !(*method == Method::PUT || *method == Method::PATCH) {
        return Err(method_not_allowed(method));
    }
    let request = parse_object(body)?;
    let stored = shared.write(|st| {
        let existing = st
            .get(Kind::Pod, ns, name)
            .cloned()
            .ok_or_else(|| ApiError::not_found(Kind::Pod, name))?;
        let mut obj = (*existing).clone();
        let status = request.get("status").cloned().unwrap_or_else(|| json!({}));
        if *method == Method::PATCH {
            merge_patch(&mut obj["status"], &status);
        } else {
            obj["status"] = status;
        }
        Ok(st.insert(Kind::Pod, ns, name, obj))
    })?;
    Ok(json_response(200, &stored))
}

/// RFC 7396 JSON merge patch (also used for strategic-merge patches, which agree on maps and scalars).
fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(patch) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            let map = target.as_object_mut().expect("object");
            for (k, v) in patch {
                if v.is_null() {
                    map.remove(k);
                } else {
                    merge_patch(map.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn strip_type_meta(obj: &Value) -> Value {
    let mut obj = obj.clone();
    if let Some(map) = obj.as_object_mut() {
        map.remove("apiVersion");
        map.remove("kind");
    }
    obj
}

async fn collection_get(
    shared: &Arc<Shared>,
    kind: Kind,
    namespace: Option<&str>,
    query: &HashMap<String, String>,
    accept: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    let filter = Filter::parse(kind, namespace, query)?;
    let watching = query.get("watch").is_some_and(|w| w == "true" || w == "1");
    let form = negotiate(accept, !watching)?;
    if watching {
        return start_watch(shared, kind, filter, query, form);
    }
    let delay = shared.lock().list_delay.get(&kind).copied();
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
        if let Some(outage) = shared.lock().outage {
            return Ok(outage_response(outage));
        }
    }
    let limit: Option<usize> = match query.get("limit").filter(|l| !l.is_empty()) {
        Some(l) => Some(
            l.parse()
                .map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))?,
        ),
        None => None,
    }
    .filter(|l| *l > 0);
    let continue_token = query.get("continue").filter(|c| !c.is_empty());
    let version = query.get("resourceVersion").filter(|v| !v.is_empty());
    let matching = query.get("resourceVersionMatch").filter(|m| !m.is_empty());
    let mut st = shared.lock();
    // Where the list is served from, as the real server decides it.
    let limit = match (version, matching) {
        (_, Some(m)) if m != "NotOlderThan" && m != "Exact" => {
            return Err(ApiError::bad_request(format!(
                "resourceVersionMatch: Unsupported value: {m:?}: supported values: \"Exact\", \"NotOlderThan\""
            )));
        }
        (None, Some(_)) => {
            return Err(ApiError::bad_request(
                "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden unless resourceVersion is provided",
            ));
        }
        (Some(_), _) if continue_token.is_some() => {
            return Err(ApiError::bad_request(
                "resourceVersion: Forbidden: specifying resource version is not allowed when using continue",
            ));
        }
        (None, None) => limit,
        (Some(v), m) => {
            let rv: u64 = v
                .parse()
                .map_err(|_| ApiError::bad_request(format!("resourceVersion: Invalid value: {v:?}")))?;
            let exact = m.map(String::as_str) == Some("Exact") || (m.is_none() && rv != 0 && limit.is_some());
            if exact && rv == 0 {
                return Err(ApiError::bad_request(
                    "resourceVersionMatch: Forbidden: resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"",
                ));
            }
            if rv > st.rv {
                // The cache waits (3 s) for a version it has not reached, then gives up.
                return Err(ApiError::new(
                    504,
                    "Timeout",
                    format!("Too large resource version: {rv}, current: {}", st.rv),
                ));
            }
            if exact {
                if rv < st.compacted {
                    return Err(ApiError::new(
                        410,
                        "Expired",
                        format!("too old resource version: {rv} ({})", st.compacted),
                    ));
                }
                limit
            } else {
                // Served from the watch cache: whole, whatever the limit.
                None
            }
        }
    };
    let (snapshot_id, rv, items, offset) = match continue_token {
        Some(token) => {
            let (id, offset) = decode_continue(token).ok_or_else(|| ApiError::bad_request("invalid continue token"))?;
            let snapshot = st.snapshots.iter().find(|s| s.id == id).ok_or_else(|| {
                ApiError::new(
                    410,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                )
            })?;
            (snapshot.id, snapshot.rv, snapshot.items.clone(), offset)
        }
        None => (0, st.rv, st.list(kind, &filter), 0),
    };
    let end = limit.map_or(items.len(), |l| (offset + l).min(items.len()));
    let page: Vec<Value> = items[offset.min(items.len())..end]
        .iter()
        .map(|o| match form {
            Form::Full => strip_type_meta(o),
            Form::Metadata => in_form(o, form),
        })
        .collect();
    let mut metadata = json!({ "resourceVersion": rv.to_string() });
    if end < items.len() {
        let id = if snapshot_id == 0 {
            let id = shared.snapshot_ids.fetch_add(1, Ordering::SeqCst);
            st.snapshots.push_back(Snapshot {
                id,
                rv,
                items: items.clone(),
            });
            while st.snapshots.len() > SNAPSHOT_LIMIT {
                st.snapshots.pop_front();
            }
            id
        } else {
            snapshot_id
        };
        metadata["continue"] = json!(encode_continue(id, end));
        metadata["remainingItemCount"] = json!(items.len() - end);
    }
    let (list_kind, api_version) = match form {
        Form::Full => (kind.list_kind(), "v1"),
        Form::Metadata => ("PartialObjectMetadataList", "meta.k8s.io/v1"),
    };
    let body = serde_json::to_vec(
        &json!({ "kind": list_kind, "apiVersion": api_version, "metadata": metadata, "items": page }),
    )
    .expect("json");
    let traffic = st.traffic.entry(kind).or_default();
    traffic.lists += 1;
    traffic.list_bytes += body.len() as u64;
    Ok(Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .header("cache-control", "no-cache, private")
        .body(full(body))
        .expect("response"))
}

fn encode_continue(id: u64, offset: usize) -> String {
    URL_SAFE_NO_PAD
        .encode(serde_json::to_vec(&json!({ "v": "fake/v1", "snapshot": id, "offset": offset })).expect("json"))
}

fn decode_continue(token: &str) -> Option<(u64, usize)> {
    #[derive(Deserialize)]
    struct Token {
        snapshot: u64,
        offset: usize,
    }
    let bytes = URL_SAFE_NO_PAD.decode(token.trim_end_matches('=')).ok()?;
    let t: Token = serde_json::from_slice(&bytes).ok()?;
    Some((t.snapshot, t.offset))
}

// ---------------------------------------------------------------------------------------------------
// Watches

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({ "type": kind, "object": object })).expect("json");
    line.push(b'\n');
    Bytes::from(line)
}

fn bookmark_line(kind: Kind, rv: u64, initial_end: bool, form: Form) -> Bytes {
    let mut metadata = json!({ "resourceVersion": rv.to_string(), "creationTimestamp": null });
    if initial_end {
        metadata["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
    }
    let (kind, api_version) = match form {
        Form::Full => (kind.name(), "v1"),
        Form::Metadata => ("PartialObjectMetadata", "meta.k8s.io/v1"),
    };
    event_line(
        "BOOKMARK",
        &json!({ "kind": kind, "apiVersion": api_version, "metadata": metadata }),
    )
}

fn gone_line(requested: u64, oldest: u64) -> Bytes {
    let error = ApiError::new(
        410,
        "Expired",
        format!("too old resource version: {requested} ({oldest})"),
    );
    event_line("ERROR", &error.status_object())
}

/// What one change means to one watcher, as the API server's watch cache decides it.
fn translate(change: &Change, kind: Kind, filter: &Filter, form: Form) -> Option<Bytes> {
    if change.kind != kind {
        return None;
    }
    let event_line = |kind: &str, object: &Value| event_line(kind, &in_form(object, form));
    let was = change.old.as_deref().is_some_and(|o| filter.matches(o));
    match change.event {
        EventType::Deleted => was.then(|| event_line("DELETED", &change.new)),
        EventType::Added | EventType::Modified => {
            let is = filter.matches(&change.new);
            match (was, is) {
                (false, true) => Some(event_line("ADDED", &change.new)),
                (true, true) => Some(event_line("MODIFIED", &change.new)),
                (true, false) => {
                    // Left the selector: DELETED with the previous state at the new resourceVersion.
                    let mut old = change.old.as_deref().expect("was matching").clone();
                    old["metadata"]["resourceVersion"] = json!(change.rv.to_string());
                    Some(event_line("DELETED", &old))
                }
                (false, false) => None,
            }
        }
    }
}

/// Counts a watch as open until it ends, unless [`Shared::break_watches`] already uncounted it.
struct WatchGuard {
    shared: Arc<Shared>,
    generation: u64,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        let _st = self.shared.lock();
        if *self.shared.breaker.borrow() == self.generation {
            self.shared.open_watches.send_modify(|n| *n = n.saturating_sub(1));
        }
    }
}

fn start_watch(
    shared: &Arc<Shared>,
    kind: Kind,
    filter: Filter,
    query: &HashMap<String, String>,
    form: Form,
) -> Result<Response<Body>, ApiError> {
    let bookmarks = query.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let send_initial = query.get("sendInitialEvents").is_some_and(|v| v == "true");
    let timeout = match query.get("timeoutSeconds").filter(|t| !t.is_empty()) {
        Some(t) => Duration::from_secs(
            t.parse()
                .map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds {t:?}")))?,
        ),
        None => DEFAULT_WATCH_TIMEOUT,
    };
    let requested = match query.get("resourceVersion").map(String::as_str) {
        None | Some("") | Some("0") => None,
        Some(rv) => Some(
            rv.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("resourceVersion: Invalid value: {rv:?}")))?,
        ),
    };
    if send_initial && query.get("resourceVersionMatch").map(String::as_str) != Some("NotOlderThan") {
        return Err(ApiError::new(
            422,
            "Invalid",
            "resourceVersionMatch: Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
        ));
    }

    let (tx, mut rx) = mpsc::channel::<Bytes>(256);
    let mut initial: Vec<Bytes> = Vec::new();
    let mut replay: Vec<Arc<Change>> = Vec::new();
    let (changes, start_rv, guard, breaker) = {
        let mut st = shared.lock();
        if let Some(outage) = st.outage {
            return Ok(outage_response(outage));
        }
        let changes = shared.changes.subscribe();
        let breaker = shared.breaker.subscribe();
        let guard = WatchGuard {
            shared: shared.clone(),
            generation: *breaker.borrow(),
        };
        shared.open_watches.send_modify(|n| *n += 1);
        st.traffic.entry(kind).or_default().watches += 1;
        match requested {
            Some(rv) if !send_initial => {
                if rv < st.compacted {
                    initial.push(gone_line(rv, st.compacted));
                    (None, st.rv, guard, breaker)
                } else {
                    replay.extend(st.history.iter().filter(|c| c.rv > rv).cloned());
                    (Some(changes), st.rv, guard, breaker)
                }
            }
            _ => {
                // No resourceVersion (or "0"), or a streaming list: the current state as ADDED events.
                initial.extend(
                    st.list(kind, &filter)
                        .iter()
                        .map(|o| event_line("ADDED", &in_form(o, form))),
                );
                if send_initial {
                    initial.push(bookmark_line(kind, st.rv, true, form));
                }
                (Some(changes), st.rv, guard, breaker)
            }
        }
    };
    let shutdown = shared.shutdown.subscribe();
    let every = Duration::from_millis(shared.bookmark_interval_ms.load(Ordering::SeqCst));
    let shared_for_pump = shared.clone();
    tokio::spawn(async move {
        let _guard = guard;
        pump(Pump {
            shared: shared_for_pump,
            tx,
            initial,
            replay,
            changes,
            kind,
            filter,
            form,
            last_rv: start_rv,
            bookmarks,
            every,
            timeout,
            breaker,
            shutdown,
        })
        .await;
    });
    let counted = shared.clone();
    let stream = futures::stream::poll_fn(move |cx| {
        rx.poll_recv(cx).map(|line| {
            line.map(|line| {
                counted.lock().traffic.entry(kind).or_default().watch_bytes += line.len() as u64;
                Ok(Frame::data(line))
            })
        })
    });
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .header("cache-control", "no-cache, private")
        .body(StreamBody::new(stream).boxed_unsync())
        .expect("response"))
}

struct Pump {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Bytes>,
    /// Sent first and at once: the current state, or a 410 ERROR.
    initial: Vec<Bytes>,
    /// History after the requested resourceVersion, delivered like live changes.
    replay: Vec<Arc<Change>>,
    changes: Option<broadcast::Receiver<Arc<Change>>>,
    kind: Kind,
    filter: Filter,
    form: Form,
    last_rv: u64,
    bookmarks: bool,
    every: Duration,
    timeout: Duration,
    breaker: watch::Receiver<u64>,
    shutdown: watch::Receiver<bool>,
}

/// A line waiting for its delivery time ([`FakeKube::set_event_delay`]).
struct Scheduled {
    due: Instant,
    rv: u64,
    line: Bytes,
    /// The stream ends after this line.
    last: bool,
}

/// The lines of one watch not sent yet, in the order they must be sent.
struct Outbox {
    queue: VecDeque<Scheduled>,
    /// Due time of the latest line queued: a later line is never due before it.
    last_due: Instant,
    /// The resourceVersion of the last line sent.
    announced: u64,
}

impl Outbox {
    fn push(&mut self, due: Instant, rv: u64, line: Bytes, last: bool) {
        let due = due.max(self.last_due);
        self.last_due = due;
        self.queue.push_back(Scheduled { due, rv, line, last });
    }

    /// Queues what `change` means to this watch, due after the configured delay and jitter.
    fn schedule(&mut self, p: &Pump, change: &Change) {
        let Some(line) = translate(change, p.kind, &p.filter, p.form) else {
            return;
        };
        let (delay, jitter) = {
            let st = p.shared.lock();
            let get = |map: &HashMap<Kind, Duration>| map.get(&p.kind).copied().unwrap_or_default();
            (get(&st.event_delay), get(&st.event_jitter))
        };
        let extra = if jitter.is_zero() {
            Duration::ZERO
        } else {
            Duration::from_nanos(rand::random_range(
                0..=u64::try_from(jitter.as_nanos()).unwrap_or(u64::MAX),
            ))
        };
        self.push(change.at + delay + extra, change.rv, line, false);
    }

    fn next_due(&self) -> Option<Instant> {
        self.queue.front().map(|s| s.due)
    }

    /// Sends every line that is due; false when the stream is to end.
    async fn flush(&mut self, tx: &mpsc::Sender<Bytes>) -> bool {
        let now = Instant::now();
        while self.queue.front().is_some_and(|s| s.due <= now) {
            let Some(next) = self.queue.pop_front() else {
                break;
            };
            if tx.send(next.line).await.is_err() || next.last {
                return false;
            }
            self.announced = next.rv;
        }
        true
    }
}

enum Wake {
    Due,
    Change(Result<Arc<Change>, broadcast::error::RecvError>),
    Tick,
}

async fn pump(mut p: Pump) {
    for line in p.initial.drain(..) {
        if p.tx.send(line).await.is_err() {
            return;
        }
    }
    let Some(mut changes) = p.changes.take() else {
        return; // an ERROR event ends the stream
    };
    let deadline = tokio::time::sleep(p.timeout);
    tokio::pin!(deadline);
    let mut ticker = tokio::time::interval_at(Instant::now() + p.every, p.every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut outbox = Outbox {
        queue: VecDeque::new(),
        last_due: Instant::now(),
        announced: p.last_rv,
    };
    for change in std::mem::take(&mut p.replay) {
        outbox.schedule(&p, &change);
    }
    // After a lagged receive only the queued lines and the ERROR remain to be sent.
    let mut ending = false;
    loop {
        if !outbox.flush(&p.tx).await {
            return;
        }
        let next_due = outbox.next_due();
        let idle = outbox.queue.is_empty();
        let wake = tokio::select! {
            () = &mut deadline => return,
            _ = p.breaker.changed() => return,
            _ = p.shutdown.changed() => return,
            () = p.tx.closed() => return,
            () = tokio::time::sleep_until(next_due.unwrap_or_else(Instant::now)), if next_due.is_some() => Wake::Due,
            received = changes.recv(), if !ending => Wake::Change(received),
            // A bookmark must not overtake a delayed event: the client would resume after it.
            _ = ticker.tick(), if p.bookmarks && idle && !ending => Wake::Tick,
        };
        match wake {
            Wake::Due => {}
            Wake::Change(Ok(change)) => {
                p.last_rv = change.rv;
                outbox.schedule(&p, &change);
            }
            // Too slow a reader: the real server drops it the same way.
            Wake::Change(Err(broadcast::error::RecvError::Lagged(_))) => {
                outbox.push(Instant::now(), p.last_rv, gone_line(p.last_rv, p.last_rv + 1), true);
                ending = true;
            }
            Wake::Change(Err(broadcast::error::RecvError::Closed)) => return,
            Wake::Tick => {
                if p.last_rv != outbox.announced {
                    if p.tx
                        .send(bookmark_line(p.kind, p.last_rv, false, p.form))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    outbox.announced = p.last_rv;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// TokenRequest

fn token_request(shared: &Arc<Shared>, ns: &str, sa: &str, body: &[u8]) -> Result<Response<Body>, ApiError> {
    let request = parse_object(body)?;
    let spec = request.get("spec").cloned().unwrap_or_else(|| json!({}));
    let audiences: Vec<String> = spec
        .get("audiences")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
        .filter(|a: &Vec<String>| !a.is_empty())
        .unwrap_or_else(|| vec![shared.issuer.clone()]);
    let expiration_seconds = spec.get("expirationSeconds").and_then(Value::as_i64).unwrap_or(3600);
    let bound = spec.get("boundObjectRef").filter(|b| !b.is_null());
    let bound_str = |field: &str| {
        bound
            .and_then(|b| b.get(field))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let mut record = TokenRequestRecord {
        namespace: ns.to_owned(),
        service_account: sa.to_owned(),
        pod_name: bound_str("name"),
        pod_uid: bound_str("uid"),
        audiences: audiences.clone(),
        expiration_seconds,
        status: 201,
    };
    let result = mint(shared, ns, sa, &spec, &audiences, expiration_seconds);
    if let Err(error) = &result {
        record.status = error.code;
    }
    shared.lock().token_requests.push(record);
    result.map(|answer| json_response(201, &answer))
}

fn mint(
    shared: &Arc<Shared>,
    ns: &str,
    sa_name: &str,
    spec: &Value,
    audiences: &[String],
    expiration_seconds: i64,
) -> Result<Value, ApiError> {
    let st = shared.lock();
    if let Some(code) = st.token_failure {
        return Err(ApiError::for_status(code));
    }
    if expiration_seconds < 600 {
        return Err(ApiError::new(
            422,
            "Invalid",
            format!(
                "TokenRequest.authentication.k8s.io \"{sa_name}\" is invalid: spec.expirationSeconds: Invalid value: {expiration_seconds}: may not specify a duration less than 10 minutes"
            ),
        ));
    }
    if expiration_seconds > 1 << 32 {
        return Err(ApiError::new(
            422,
            "Invalid",
            format!(
                "TokenRequest.authentication.k8s.io \"{sa_name}\" is invalid: spec.expirationSeconds: Invalid value: {expiration_seconds}: may not specify a duration larger than 2^32 seconds"
            ),
        ));
    }
    let sa = st
        .get(Kind::ServiceAccount, ns, sa_name)
        .ok_or_else(|| ApiError::not_found(Kind::ServiceAccount, sa_name))?;
    let sa_uid = meta_str(sa, "uid").unwrap_or_default().to_owned();
    let bound = spec.get("boundObjectRef").filter(|b| !b.is_null()).ok_or_else(|| {
        ApiError::bad_request("spec.boundObjectRef: Required value: this test double only issues pod-bound tokens")
    })?;
    let field = |f: &str| bound.get(f).and_then(Value::as_str).unwrap_or_default();
    if field("kind") != "Pod" {
        return Err(ApiError::bad_request(format!(
            "cannot bind token to object of type {}: only Pod is supported by this test double",
            field("kind")
        )));
    }
    let api_version = field("apiVersion");
    if !api_version.is_empty() && api_version != "v1" {
        return Err(ApiError::bad_request(format!(
            "cannot bind token to object of type {api_version}, Kind=Pod"
        )));
    }
    let pod_name = field("name");
    let pod = st
        .get(Kind::Pod, ns, pod_name)
        .ok_or_else(|| ApiError::not_found(Kind::Pod, pod_name))?;
    let pod_uid = meta_str(pod, "uid").unwrap_or_default().to_owned();
    let requested_uid = field("uid");
    if !requested_uid.is_empty() && requested_uid != pod_uid {
        return Err(ApiError::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on pods \"{pod_name}\": the UID in the bound object reference ({requested_uid}) does not match the UID in record. The object might have been deleted and then recreated"
            ),
        ));
    }
    let pod_sa = pod
        .get("spec")
        .and_then(|s| s.get("serviceAccountName"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    if pod_sa != sa_name {
        return Err(ApiError::bad_request(format!(
            "cannot bind token for serviceaccount \"{sa_name}\" to pod running with different serviceaccount name."
        )));
    }
    let mut claims = Claims::new(
        &shared.issuer,
        audiences.to_vec(),
        ns,
        sa_name,
        &sa_uid,
        expiration_seconds,
    )
    .with_pod(pod_name, &pod_uid);
    if let Some(node) = pod.get("spec").and_then(|s| s.get("nodeName")).and_then(Value::as_str) {
        claims = claims.with_node(node, &jwt::derived_uid(&format!("node/{node}")));
    }
    drop(st);
    let token = shared.signer.read().expect("signer lock").sign(&claims);
    let expires = time::OffsetDateTime::from_unix_timestamp(claims.exp).expect("expiry");
    Ok(json!({
        "kind": "TokenRequest",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": { "name": sa_name, "namespace": ns, "creationTimestamp": null },
        "spec": {
            "audiences": audiences,
            "expirationSeconds": expiration_seconds,
            "boundObjectRef": { "kind": "Pod", "apiVersion": "v1", "name": pod_name, "uid": pod_uid },
        },
        "status": { "token": token, "expirationTimestamp": rfc3339(expires) },
    }))
}

// ---------------------------------------------------------------------------------------------------
// Control endpoints for scripts

fn control(shared: &Arc<Shared>, method: &Method, rest: &[&str], body: &[u8]) -> Result<Response<Body>, ApiError> {
    let ok = || json_response(200, &json!({ "ok": true }));
    match (method, rest) {
        (&Method::GET, ["stats"]) => {
            let st = shared.lock();
            Ok(json_response(
                200,
                &json!({
                    "requests": shared.requests.load(Ordering::SeqCst),
                    "token_request_count": st.token_requests.len(),
                    "token_requests": st.token_requests,
                    "open_watches": *shared.open_watches.borrow(),
                    "resource_version": st.rv,
                    "events": shared.events().events(),
                    "event_writes": shared.events().writes(),
                }),
            ))
        }
        (&Method::POST, ["compact"]) => {
            shared.lock().compact();
            Ok(ok())
        }
        (&Method::POST, ["break-watches"]) => {
            shared.break_watches();
            Ok(ok())
        }
        (&Method::POST, ["token-failure"]) => {
            let v: Value = if body.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(body).map_err(|e| ApiError::bad_request(e.to_string()))?
            };
            let status = match &v {
                Value::Null => None,
                Value::Number(n) => n.as_u64().map(|n| n as u16),
                other => other.get("status").and_then(Value::as_u64).map(|n| n as u16),
            };
            shared.lock().token_failure = status;
            Ok(ok())
        }
        (&Method::POST, ["outage"]) => {
            let v: Value = if body.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(body).map_err(|e| ApiError::bad_request(e.to_string()))?
            };
            let outage = match v.get("mode").and_then(Value::as_str) {
                _ if v.is_null() => None,
                Some("unavailable") => Some(Outage::Unavailable),
                Some("reset") => Some(Outage::Reset),
                _ => return Err(ApiError::bad_request("mode must be \"unavailable\" or \"reset\"")),
            };
            shared.set_outage(outage);
            Ok(ok())
        }
        _ => Err(ApiError::for_status(404)),
    }
}
