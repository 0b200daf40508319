//! One list-then-watch loop per resource, shared by every watcher of the agent: it lists, watches from
//! the list's resourceVersion with bookmarks, and tells its consumer exactly what the consumer's view
//! is worth at each moment.
//!
//! What it costs the API server and the node (every node runs one):
//! - Lists are served from the API server's watch cache rather than etcd: the first with
//!   `resourceVersion=0` (any version; nothing has been seen yet), every relist with the last
//!   resourceVersion seen and `resourceVersionMatch=NotOlderThan`, so a relist can never go back in
//!   time (behind a load balancer another API server's cache may lag: it waits for its cache to catch
//!   up, or answers 504 and the list is retried with the backoff). The cache ignores `limit` (it serves
//!   the whole list at once, and kube drops `resourceVersion=0` when a limit is given), so none is
//!   sent. Should a server refuse the version anyway (410 on a list; none of the semantics above
//!   allows it, but a proxy or an older server may), the next attempt reads the latest version from
//!   etcd, paginated by [`Config::page_size`].
//! - A resource whose objects matter only by their metadata ([`Object::METADATA_ONLY`]) is listed
//!   and watched as `PartialObjectMetadata`, and decoded into what the consumer keeps (see
//!   [`Metadata`]); listed objects that tell the consumer nothing ([`Object::matters`]) are dropped
//!   as they are decoded, and a list's body is decoded as it arrives (a few 64 KiB chunks in flight),
//!   so the cluster's size costs no memory, not even while listing.
//! - Relists after missed events or a silent watch wait a random delay below [`RELIST_SPREAD`]: after
//!   an API server restart, the nodes of a cluster do not all relist at the same instant.
//!
//! - A watch that ends normally (server timeout, load balancer) resumes from the last resourceVersion
//!   at once: nothing was missed, the view stays whole.
//! - `410 Gone` means events were lost while the API server was up: [`Update::Stale`] at once, then a
//!   relist after the spread delay (no backoff).
//! - A watch that delivers nothing — no event, no bookmark — for `idle` is presumed dead and relisted
//!   (bookmarks are asked for, so a quiet but healthy watch is not mistaken for a dead one).
//! - Errors (API server down, 5xx, transport) are retried with [`retry_delay`], a short capped backoff,
//!   and reported as [`Update::Unreachable`]: what the view holds is still true as far as anyone knows,
//!   but objects created meanwhile are missing from it; [`Update::Reachable`] when a watch stands again.
//!
//! - An object the agent cannot decode (a field of an unexpected type: the API server's schema and
//!   ours disagree) never stops the watch. What can be read of its identity (uid, name, namespace,
//!   addresses) reaches the consumer as [`Update::Unreadable`] (or in [`Update::Listed`]'s
//!   `unreadable`), so it can stop trusting what it knew of that object; the watch goes on past it.
//!   One whose uid or name cannot be read either identifies nothing: in a watch it makes the view
//!   [`Update::Stale`] and forces a relist, and a list that holds one fails (retried with the backoff)
//!   until the object is gone or readable.
//!
//! It decides nothing about pods or roles. The only task it starts is a list's decoder, on the blocking
//! pool, which ends with the list.

use std::collections::HashMap;
use std::fmt::Debug;
use std::marker::PhantomData;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{AsyncReadExt, StreamExt};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ListMeta;
use kube::Resource;
use kube::api::{ListParams, VersionMatch, WatchEvent, WatchParams};
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{GaugeVec, IntCounterVec, Opts, Registry};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Watch settings shared by every resource.
#[derive(Debug, Clone)]
pub struct Config {
    /// `--watch-idle-timeout`: a watch silent this long (no event, no bookmark) is relisted.
    pub idle: Duration,
    /// Objects per list page, for the one kind of list that is paginated: the latest version read
    /// from etcd after the server refused a cached one (watch-cache lists ignore `limit`).
    pub page_size: u32,
}

/// What a consumer learns.
#[derive(Debug)]
pub enum Update<K> {
    /// Events were missed (410 Gone): the view is stale in unknown ways until the next [`Update::Listed`].
    Stale,
    /// A complete list; it replaces the view.
    Listed {
        /// The objects that could be read.
        items: Vec<K>,
        /// The objects that could not, each with its identity (uid and name are always present).
        unreadable: Vec<Unreadable>,
    },
    /// An object was added or changed.
    Applied(K),
    /// An object was deleted.
    Deleted(K),
    /// An object was added, changed or deleted, but could not be decoded: whatever was known of it is
    /// no longer true.
    Unreadable {
        /// What could be read of it (uid and name are always present).
        object: Unreadable,
        /// Whether the event was a deletion.
        deleted: bool,
    },
    /// The API server cannot be reached: the view misses whatever happened since.
    Unreachable,
    /// A watch is established again after [`Update::Unreachable`]; nothing was missed.
    Reachable,
}

/// Why a list was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relist {
    /// The first list.
    Initial,
    /// The watch's resourceVersion was compacted away (410 Gone).
    Gone,
    /// The watch delivered nothing for the idle bound.
    Idle,
    /// The watch delivered an object that identifies nothing (no readable uid or name).
    Unreadable,
}

impl Relist {
    fn label(self) -> &'static str {
        match self {
            Relist::Initial => "initial",
            Relist::Gone => "gone",
            Relist::Idle => "idle",
            Relist::Unreadable => "unreadable",
        }
    }
}

/// How long a watch may take to start before the API server counts as unreachable.
pub const START_GRACE: Duration = Duration::from_secs(2);

/// The first retry delay after a watch or list error.
pub const RETRY_INITIAL: Duration = Duration::from_millis(250);
/// The longest delay between two attempts: short, so pods created right after an outage are seen
/// within seconds of the API server's return.
pub const RETRY_CAP: Duration = Duration::from_secs(5);

/// The delay before attempt `failures + 1` after `failures` (≥ 1) errors in a row: 250 ms doubling to
/// [`RETRY_CAP`], jittered down by up to a half by `fraction` (uniform in `[0, 1)`) so the nodes of a
/// cluster do not reconnect in lockstep.
pub fn retry_delay(failures: u32, fraction: f64) -> Duration {
    let full = RETRY_INITIAL
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(RETRY_CAP);
    full - (full / 2).mul_f64(fraction.clamp(0.0, 1.0))
}

/// The longest a relist after missed events or a silent watch is delayed. Small, since the view is
/// stale (credentials refused) until the relist completes; enough to spread the lists of thousands
/// of nodes that all lost their watch at once over a second instead of an instant.
pub const RELIST_SPREAD: Duration = Duration::from_secs(1);

/// The delay before a relist for `cause`, `fraction` uniform in `[0, 1)`: none for the first list (a
/// starting agent is not ready until it lists) nor after an unidentifiable object (that relist already
/// waits [`retry_delay`]); up to [`RELIST_SPREAD`] after `410 Gone` or a silent watch, which an API
/// server restart causes on every node at once.
pub fn relist_delay(cause: Relist, fraction: f64) -> Duration {
    match cause {
        Relist::Initial | Relist::Unreadable => Duration::ZERO,
        Relist::Gone | Relist::Idle => RELIST_SPREAD.mul_f64(fraction.clamp(0.0, 1.0)),
    }
}

/// What a watch decodes its objects into.
pub trait Object: DeserializeOwned + Clone + Debug + Send + 'static {
    /// The API type whose collection (of all namespaces) is listed and watched.
    type Kind: Resource<DynamicType = ()>;
    /// Whether only metadata is asked for (`PartialObjectMetadata`), not whole objects.
    const METADATA_ONLY: bool;
    /// `metadata.resourceVersion`.
    fn resource_version(&self) -> Option<&str>;
    /// Whether a listed object tells the consumer anything; one that does not is dropped as it is
    /// decoded. A consumer that answers `false` must treat an object absent from a list like one
    /// listed that does not matter (watch events always reach it: a change may make one stop
    /// mattering).
    fn matters(&self) -> bool {
        true
    }
}

/// Which kind a [`Metadata`] watch follows, and the one annotation it keeps.
pub trait Selection: Send + Sync + 'static {
    /// The API type (`ServiceAccount`, `Namespace`).
    type Kind: Resource<DynamicType = ()>;
    /// The annotation whose value is kept.
    const ANNOTATION: &'static str;
}

/// An object as its metadata-only watch keeps it: its identity, its resourceVersion and the value of
/// one annotation ([`Selection::ANNOTATION`]), nothing else. Decoding checks the annotations are a
/// map of strings, as a whole object's decoding would (so a malformed one is still [`Unreadable`]);
/// the other metadata fields are not read, so they can neither cost memory nor fail it.
pub struct Metadata<S> {
    /// `metadata.namespace` (none for cluster-scoped kinds).
    pub namespace: Option<String>,
    /// `metadata.name`.
    pub name: Option<String>,
    /// `metadata.resourceVersion`.
    pub resource_version: Option<String>,
    /// The value of [`Selection::ANNOTATION`], if present.
    pub annotation: Option<String>,
    selection: PhantomData<fn() -> S>,
}

impl<S> Metadata<S> {
    /// An object `namespace/name` with this annotation value (tests and fixtures).
    pub fn new(namespace: Option<&str>, name: &str, annotation: Option<&str>) -> Self {
        Self {
            namespace: namespace.map(str::to_owned),
            name: Some(name.to_owned()),
            resource_version: None,
            annotation: annotation.map(str::to_owned),
            selection: PhantomData,
        }
    }
}

impl<S> Clone for Metadata<S> {
    fn clone(&self) -> Self {
        Self {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            resource_version: self.resource_version.clone(),
            annotation: self.annotation.clone(),
            selection: PhantomData,
        }
    }
}

impl<S> Debug for Metadata<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metadata")
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .field("resource_version", &self.resource_version)
            .field("annotation", &self.annotation)
            .finish()
    }
}

impl<'de, S: Selection> Deserialize<'de> for Metadata<S> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(bound = "S: Selection")]
        struct Object<S> {
            metadata: Meta<S>,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase", bound = "S: Selection")]
        struct Meta<S> {
            name: Option<String>,
            namespace: Option<String>,
            resource_version: Option<String>,
            #[serde(default)]
            annotations: Option<Only<S>>,
        }
        let object = Object::<S>::deserialize(deserializer)?;
        Ok(Self {
            namespace: object.metadata.namespace,
            name: object.metadata.name,
            resource_version: object.metadata.resource_version,
            annotation: object.metadata.annotations.and_then(|a| a.0),
            selection: PhantomData,
        })
    }
}

/// The value of one annotation, read from the whole map (every value must be a string).
struct Only<S>(Option<String>, PhantomData<fn() -> S>);

impl<'de, S: Selection> Deserialize<'de> for Only<S> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor<S>(PhantomData<fn() -> S>);
        impl<'de, S: Selection> serde::de::Visitor<'de> for Visitor<S> {
            type Value = Only<S>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a map of strings")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Only<S>, A::Error> {
                let mut kept = None;
                while let Some(key) = map.next_key::<String>()? {
                    let value = map.next_value::<String>()?;
                    if key == S::ANNOTATION {
                        kept = Some(value);
                    }
                }
                Ok(Only(kept, PhantomData))
            }
        }
        deserializer.deserialize_map(Visitor(PhantomData))
    }
}

impl<S: Selection> Object for Metadata<S> {
    type Kind = S::Kind;
    const METADATA_ONLY: bool = true;

    fn resource_version(&self) -> Option<&str> {
        self.resource_version.as_deref()
    }

    /// Only objects carrying the annotation: one without it says no more than its absence.
    fn matters(&self) -> bool {
        self.annotation.is_some()
    }
}

/// What could be read of an object that could not be decoded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Unreadable {
    /// `metadata.uid`, when it is a string.
    pub uid: Option<String>,
    /// `metadata.namespace`, when it is a string.
    pub namespace: Option<String>,
    /// `metadata.name`, when it is a string.
    pub name: Option<String>,
    /// `metadata.resourceVersion`, when it is a string.
    pub resource_version: Option<String>,
    /// The addresses in `status.podIPs[].ip` and `status.podIP` that parse (pods only).
    pub ips: Vec<IpAddr>,
    /// Why decoding failed (serde's message, at most [`ERROR_CHARS`] characters).
    pub error: String,
}

/// The longest decoding error kept: serde quotes the offending value, which may be long.
pub const ERROR_CHARS: usize = 160;

impl Unreadable {
    /// Reads what it can of `value`, an object that failed to decode with `error`.
    pub fn of(value: &serde_json::Value, error: &str) -> Self {
        let text = |v: Option<&serde_json::Value>| v.and_then(|v| v.as_str()).map(str::to_owned);
        let meta = value.get("metadata");
        let field = |name: &str| text(meta.and_then(|m| m.get(name)));
        let status = value.get("status");
        let listed = status
            .and_then(|s| s.get("podIPs"))
            .and_then(|ips| ips.as_array())
            .into_iter()
            .flatten()
            .filter_map(|ip| ip.get("ip"));
        let single = status.and_then(|s| s.get("podIP"));
        let mut ips: Vec<IpAddr> = listed
            .chain(single)
            .filter_map(|ip| ip.as_str()?.parse().ok())
            .collect();
        ips.sort_unstable();
        ips.dedup();
        Self {
            uid: field("uid").filter(|u| !u.is_empty()),
            namespace: field("namespace"),
            name: field("name").filter(|n| !n.is_empty()),
            resource_version: field("resourceVersion"),
            ips,
            error: error.chars().take(ERROR_CHARS).collect(),
        }
    }

    /// Whether the object says which object it is: a uid and a name.
    pub fn is_identified(&self) -> bool {
        self.uid.is_some() && self.name.is_some()
    }

    /// `namespace/name` (or `name`), for logs.
    pub fn key(&self) -> String {
        let name = self.name.as_deref().unwrap_or("?");
        match &self.namespace {
            Some(namespace) => format!("{namespace}/{name}"),
            None => name.to_owned(),
        }
    }
}

/// An object as received: decoded, or what could be read of it. Decoding never fails, so one odd
/// object cannot fail a list or a watch.
#[derive(Debug, Clone)]
enum Lenient<K> {
    Read(K),
    Unreadable(Box<Unreadable>),
}

impl<'de, K: DeserializeOwned> Deserialize<'de> for Lenient<K> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        match K::deserialize(&value) {
            Ok(object) => Ok(Lenient::Read(object)),
            Err(error) => Ok(Lenient::Unreadable(Box::new(Unreadable::of(
                &value,
                &error.to_string(),
            )))),
        }
    }
}

impl<K: Object> Lenient<K> {
    fn resource_version(&self) -> Option<&str> {
        match self {
            Lenient::Read(object) => object.resource_version(),
            Lenient::Unreadable(object) => object.resource_version.as_deref(),
        }
    }
}

/// One list response, keeping only the objects that matter ([`Object::matters`]) and every
/// unreadable one, dropping the others as they are decoded.
struct Page<K> {
    items: Vec<Lenient<K>>,
    /// How many objects the page held, kept or not.
    received: usize,
    metadata: ListMeta,
}

impl<'de, K: Object> Deserialize<'de> for Page<K> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(bound = "K: Object")]
        struct Wire<K> {
            #[serde(default)]
            metadata: ListMeta,
            #[serde(default)]
            items: Kept<K>,
        }
        let wire = Wire::<K>::deserialize(deserializer)?;
        Ok(Self {
            items: wire.items.kept,
            received: wire.items.received,
            metadata: wire.metadata,
        })
    }
}

struct Kept<K> {
    kept: Vec<Lenient<K>>,
    received: usize,
}

impl<K> Default for Kept<K> {
    fn default() -> Self {
        Self {
            kept: Vec::new(),
            received: 0,
        }
    }
}

impl<'de, K: Object> Deserialize<'de> for Kept<K> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor<K>(PhantomData<fn() -> K>);
        impl<'de, K: Object> serde::de::Visitor<'de> for Visitor<K> {
            type Value = Kept<K>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a list of objects")
            }
            fn visit_unit<E>(self) -> Result<Kept<K>, E> {
                Ok(Kept::default())
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Kept<K>, A::Error> {
                let mut page = Kept::default();
                while let Some(item) = seq.next_element::<Lenient<K>>()? {
                    page.received += 1;
                    if matches!(&item, Lenient::Read(object) if !object.matters()) {
                        continue;
                    }
                    page.kept.push(item);
                }
                Ok(page)
            }
        }
        deserializer.deserialize_any(Visitor(PhantomData))
    }
}

/// Every `resource` label the agent's watches use; their series exist from start-up.
pub const RESOURCES: &[&str] = &["pods", "serviceaccounts", "namespaces"];

/// Watch metrics, labelled by resource.
#[derive(Clone)]
pub struct Metrics {
    events: IntCounterVec,
    errors: IntCounterVec,
    relists: IntCounterVec,
    unreadable: IntCounterVec,
    list_bytes: IntCounterVec,
    silence: Silence,
    unreadable_logs: Arc<Mutex<HashMap<&'static str, (Instant, u32)>>>,
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let events = IntCounterVec::new(
            Opts::new(
                "imds_broker_watch_events_total",
                "Watch events received, by resource and type (listed counts each object of a list)",
            ),
            &["resource", "event"],
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "imds_broker_watch_errors_total",
                "List and watch failures, by resource (each is retried after a capped backoff)",
            ),
            &["resource"],
        )?;
        let relists = IntCounterVec::new(
            Opts::new(
                "imds_broker_watch_relists_total",
                "Full lists by resource and cause: initial, gone (410, events missed), idle (a silent watch)",
            ),
            &["resource", "cause"],
        )?;
        let unreadable = IntCounterVec::new(
            Opts::new(
                "imds_broker_watch_unreadable_total",
                "Objects received that could not be decoded, by resource (each stops being trusted; the watch goes on)",
            ),
            &["resource"],
        )?;
        let list_bytes = IntCounterVec::new(
            Opts::new(
                "imds_broker_watch_list_bytes_total",
                "Bytes of list responses received, by resource (what the agent's lists cost the API server)",
            ),
            &["resource"],
        )?;
        let silence = Silence::new()?;
        for resource in RESOURCES {
            errors.with_label_values(&[resource]);
            list_bytes.with_label_values(&[resource]);
            for cause in [Relist::Initial, Relist::Gone, Relist::Idle] {
                relists.with_label_values(&[resource, cause.label()]);
            }
            for event in ["listed", "apply", "delete", "bookmark"] {
                events.with_label_values(&[resource, event]);
            }
            // Not heard from yet: silent since start-up.
            silence.touch(resource);
        }
        registry.register(Box::new(events.clone()))?;
        registry.register(Box::new(unreadable.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(relists.clone()))?;
        registry.register(Box::new(list_bytes.clone()))?;
        registry.register(Box::new(silence.clone()))?;
        Ok(Self {
            events,
            errors,
            relists,
            unreadable,
            list_bytes,
            silence,
            unreadable_logs: Arc::default(),
        })
    }

    /// Counts an unreadable object, and whether a line about it may be logged: [`UNREADABLE_LOGS`] a
    /// minute per resource, so a flood of them writes a bounded number of lines.
    fn unreadable(&self, resource: &'static str) -> bool {
        self.unreadable.with_label_values(&[resource]).inc();
        let now = Instant::now();
        let mut logs = self.unreadable_logs.lock().expect("unreadable log lock poisoned");
        let (since, lines) = logs.entry(resource).or_insert((now, 0));
        if now.duration_since(*since) >= Duration::from_secs(60) {
            *since = now;
            *lines = 0;
        }
        *lines += 1;
        *lines <= UNREADABLE_LOGS
    }
}

/// Bytes read from a list response at a time.
const LIST_READ: usize = 64 * 1024;
/// Chunks of a list response in flight between the connection and the decoder.
const LIST_CHUNKS: usize = 4;

/// A list response's body as the blocking decoder reads it: the chunks the connection received.
struct Body {
    received: mpsc::Receiver<Vec<u8>>,
    chunk: std::io::Cursor<Vec<u8>>,
}

impl std::io::Read for Body {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let n = self.chunk.read(out)?;
            if n > 0 || out.is_empty() {
                return Ok(n);
            }
            match self.received.blocking_recv() {
                Some(next) => self.chunk = std::io::Cursor::new(next),
                // The end of the body (or a failed read, which the connection side reports).
                None => return Ok(0),
            }
        }
    }
}

/// Lines logged about unreadable objects per resource and minute.
pub const UNREADABLE_LOGS: u32 = 10;

/// `imds_broker_watch_silence_seconds`: seconds since each watch last heard from the API server (an
/// event, a bookmark or a list), computed when scraped.
#[derive(Clone)]
struct Silence {
    last: Arc<Mutex<HashMap<&'static str, Instant>>>,
    gauge: GaugeVec,
}

impl Silence {
    fn new() -> prometheus::Result<Self> {
        let gauge = GaugeVec::new(
            Opts::new(
                "imds_broker_watch_silence_seconds",
                "Seconds since the watch of a resource last received an event, a bookmark or a list",
            ),
            &["resource"],
        )?;
        Ok(Self {
            last: Arc::default(),
            gauge,
        })
    }

    fn touch(&self, resource: &'static str) {
        self.last
            .lock()
            .expect("silence lock poisoned")
            .insert(resource, Instant::now());
    }
}

impl Collector for Silence {
    fn desc(&self) -> Vec<&Desc> {
        self.gauge.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let now = Instant::now();
        for (resource, at) in self.last.lock().expect("silence lock poisoned").iter() {
            self.gauge
                .with_label_values(&[resource])
                .set(now.duration_since(*at).as_secs_f64());
        }
        self.gauge.collect()
    }
}

/// One resource's list-then-watch loop.
pub struct Watch<K> {
    /// The API server (all namespaces of `K` are watched).
    pub client: kube::Client,
    /// The metric label and log name (`pods`, `serviceaccounts`, `namespaces`).
    pub resource: &'static str,
    /// A field selector (`spec.nodeName=<node>`), if any.
    pub fields: Option<String>,
    /// Shared settings.
    pub config: Config,
    /// Shared metrics.
    pub metrics: Metrics,
    /// The object type.
    pub kind: std::marker::PhantomData<K>,
}

/// How a watch ended.
enum End {
    /// Relist for this cause.
    Relist(Relist),
    /// Retry the watch from the same resourceVersion (after a backoff when `failed`).
    Resume { failed: bool },
    /// Shutdown, or the consumer went away.
    Stop,
}

/// Where a list reads from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum From {
    /// The watch cache, any version (`resourceVersion=0`): the first list.
    Cache,
    /// The watch cache, at least this version (`resourceVersionMatch=NotOlderThan`): a relist never
    /// goes back behind what the consumer has already seen.
    NotOlderThan(String),
    /// The latest version, a quorum read from etcd, paginated: after the server refused a version.
    Latest,
}

/// A complete list.
struct Listed<K> {
    /// The objects that could be read and matter.
    items: Vec<K>,
    /// The objects that could not be read.
    unreadable: Vec<Unreadable>,
    /// How many objects were received, kept or not.
    received: usize,
    /// Its resourceVersion.
    version: String,
}

/// Why a list failed.
struct ListError {
    message: String,
    /// The server refused the version asked for (410).
    gone: bool,
}

impl<K: Object> Watch<K> {
    /// Lists and watches into `out` until `shutdown` or until `out` is closed.
    pub async fn run(self, out: mpsc::Sender<Update<K>>, shutdown: CancellationToken) {
        let mut cause = Relist::Initial;
        let mut from = From::Cache;
        let mut failures = 0u32;
        let mut reachable = true;
        // Every series exists from the start, at zero.
        self.metrics.errors.with_label_values(&[self.resource]);
        self.metrics.unreadable.with_label_values(&[self.resource]);
        loop {
            self.metrics
                .relists
                .with_label_values(&[self.resource, cause.label()])
                .inc();
            if matches!(cause, Relist::Gone | Relist::Unreadable) && out.send(Update::Stale).await.is_err() {
                return;
            }
            // An object that identifies nothing may well be in the next list too: not in a tight loop.
            if cause == Relist::Unreadable {
                failures += 1;
                if !pause(failures, &shutdown).await {
                    return;
                }
            }
            let spread = relist_delay(cause, rand::random());
            if !spread.is_zero() {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(spread) => {}
                }
            }
            // List until it works.
            let Listed {
                items,
                unreadable,
                received,
                mut version,
            } = loop {
                let listed = tokio::select! {
                    () = shutdown.cancelled() => return,
                    listed = self.list(&from) => listed,
                };
                match listed {
                    Ok(listed) => break listed,
                    Err(error) => {
                        failures += 1;
                        if error.gone {
                            from = From::Latest;
                        }
                        if !self.failed(&out, &mut reachable, &error.message, "list").await
                            || !pause(failures, &shutdown).await
                        {
                            return;
                        }
                    }
                }
            };
            failures = 0;
            self.metrics.silence.touch(self.resource);
            self.metrics
                .events
                .with_label_values(&[self.resource, "listed"])
                .inc_by(received as u64);
            if out.send(Update::Listed { items, unreadable }).await.is_err() {
                return;
            }
            if !reachable {
                reachable = true;
                if out.send(Update::Reachable).await.is_err() {
                    return;
                }
            }
            let mut last_heard = Instant::now();
            // Watch, resuming from the last resourceVersion, until a relist is needed.
            cause = loop {
                match self
                    .watch(&out, &mut version, &mut last_heard, &mut reachable, &shutdown)
                    .await
                {
                    End::Stop => return,
                    End::Relist(cause) => {
                        from = if version.is_empty() {
                            From::Cache
                        } else {
                            From::NotOlderThan(version)
                        };
                        break cause;
                    }
                    End::Resume { failed: false } => failures = 0,
                    End::Resume { failed: true } => {
                        failures += 1;
                        if !pause(failures, &shutdown).await {
                            return;
                        }
                    }
                }
            };
        }
    }

    fn request(&self) -> kube::core::Request {
        kube::core::Request::new(K::Kind::url_path(&(), None))
    }

    /// A complete list (what could be read and matters, what could not) and its resourceVersion. A
    /// list holding an object that identifies nothing fails: the consumer could not tell what to
    /// distrust.
    async fn list(&self, from: &From) -> Result<Listed<K>, ListError> {
        let mut params = ListParams::default();
        if let Some(fields) = &self.fields {
            params = params.fields(fields);
        }
        params = match from {
            // No limit: the watch cache ignores it, and kube would drop `resourceVersion=0` for it.
            From::Cache => params.at("0"),
            From::NotOlderThan(version) => params.at(version).matching(VersionMatch::NotOlderThan),
            From::Latest => params.limit(self.config.page_size),
        };
        let failed = |message: String| ListError { message, gone: false };
        let mut listed = Listed {
            items: Vec::new(),
            unreadable: Vec::new(),
            received: 0,
            version: String::new(),
        };
        loop {
            let request = if K::METADATA_ONLY {
                self.request().list_metadata(&params)
            } else {
                self.request().list(&params)
            }
            .map_err(|e| failed(e.to_string()))?;
            let page = self.fetch(request).await?;
            listed.received += page.received;
            for item in page.items {
                match item {
                    Lenient::Read(object) => listed.items.push(object),
                    Lenient::Unreadable(object) => {
                        self.log_unreadable(&object, "list");
                        if !object.is_identified() {
                            return Err(failed(format!(
                                "the list holds an object with no readable uid or name ({})",
                                object.error
                            )));
                        }
                        listed.unreadable.push(*object);
                    }
                }
            }
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params.continue_token = Some(token),
                None => {
                    listed.version = page.metadata.resource_version.unwrap_or_default();
                    return Ok(listed);
                }
            }
        }
    }

    /// One list response, decoded as it arrives, keeping only what matters. A cached list is one
    /// response however long (tens of MiB for a large cluster): read whole, its buffer would set the
    /// agent's memory by the cluster's size (the allocator keeps what a large buffer once took), so the
    /// body goes chunk by chunk through a small bounded channel to a decoder on the blocking pool, and
    /// a list costs a few chunks of memory whatever its length.
    async fn fetch(&self, request: http::Request<Vec<u8>>) -> Result<Page<K>, ListError> {
        let failed = |error: kube::Error| ListError {
            gone: matches!(&error, kube::Error::Api(status) if status.code == 410),
            message: error.to_string(),
        };
        let reader = self.client.request_stream(request).await.map_err(failed)?;
        let mut reader = std::pin::pin!(reader);
        let (chunks, received) = mpsc::channel::<Vec<u8>>(LIST_CHUNKS);
        let decoder = tokio::task::spawn_blocking(move || {
            let body = std::io::BufReader::with_capacity(
                LIST_READ,
                Body {
                    received,
                    chunk: std::io::Cursor::default(),
                },
            );
            serde_json::from_reader::<_, Page<K>>(body)
        });
        let mut bytes = 0u64;
        let read = loop {
            let mut chunk = vec![0; LIST_READ];
            match reader.read(&mut chunk).await {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    bytes += n as u64;
                    chunk.truncate(n);
                    // The decoder stopped (malformed JSON): its error says why.
                    if chunks.send(chunk).await.is_err() {
                        break Ok(());
                    }
                }
                Err(error) => break Err(error),
            }
        };
        drop(chunks);
        self.metrics
            .list_bytes
            .with_label_values(&[self.resource])
            .inc_by(bytes);
        let decoded = decoder.await;
        read.map_err(|e| failed(kube::Error::ReadEvents(e)))?;
        match decoded {
            Ok(Ok(page)) => Ok(page),
            Ok(Err(error)) => Err(ListError {
                message: format!("cannot decode the list: {error}"),
                gone: false,
            }),
            Err(error) => Err(ListError {
                message: format!("the list decoder failed: {error}"),
                gone: false,
            }),
        }
    }

    fn log_unreadable(&self, object: &Unreadable, during: &str) {
        if self.metrics.unreadable(self.resource) {
            tracing::warn!(
                resource = self.resource,
                during,
                object = %object.key(),
                uid = object.uid.as_deref().unwrap_or("?"),
                error = %object.error,
                "cannot decode an object; it is no longer trusted (see imds_broker_watch_unreadable_total)"
            );
        }
    }

    /// One watch request, followed until it ends.
    async fn watch(
        &self,
        out: &mpsc::Sender<Update<K>>,
        version: &mut String,
        last_heard: &mut Instant,
        reachable: &mut bool,
        shutdown: &CancellationToken,
    ) -> End {
        let mut params = WatchParams::default();
        if let Some(fields) = &self.fields {
            params = params.fields(fields);
        }
        let request = if K::METADATA_ONLY {
            self.request().watch_metadata(&params, version)
        } else {
            self.request().watch(&params, version)
        };
        let start = async {
            match request {
                Ok(request) => self.client.request_events::<Lenient<K>>(request).await,
                Err(error) => Err(kube::Error::BuildRequest(error)),
            }
        };
        let mut start = std::pin::pin!(start);
        let grace = tokio::time::sleep(START_GRACE);
        let mut grace = std::pin::pin!(grace);
        let mut graced = false;
        let started = loop {
            tokio::select! {
                () = shutdown.cancelled() => return End::Stop,
                () = tokio::time::sleep_until(*last_heard + self.config.idle) => return self.idle(),
                // A healthy API server answers a watch at once; one that does not is as good as away.
                () = &mut grace, if !graced => {
                    graced = true;
                    if *reachable {
                        *reachable = false;
                        if out.send(Update::Unreachable).await.is_err() {
                            return End::Stop;
                        }
                    }
                }
                started = &mut start => break started,
            }
        };
        let stream = match started {
            Ok(stream) => stream,
            Err(kube::Error::Api(status)) if status.code == 410 => return self.gone(),
            Err(error) => {
                return if self.failed(out, reachable, &error.to_string(), "watch").await {
                    End::Resume { failed: true }
                } else {
                    End::Stop
                };
            }
        };
        if !*reachable {
            *reachable = true;
            if out.send(Update::Reachable).await.is_err() {
                return End::Stop;
            }
        }
        let mut stream = std::pin::pin!(stream);
        loop {
            let next = tokio::select! {
                () = shutdown.cancelled() => return End::Stop,
                () = tokio::time::sleep_until(*last_heard + self.config.idle) => return self.idle(),
                next = stream.next() => next,
            };
            let update = match next {
                None => return End::Resume { failed: false },
                Some(Ok(WatchEvent::Added(object) | WatchEvent::Modified(object))) => {
                    self.count("apply");
                    advance(version, &object);
                    match object {
                        Lenient::Read(object) => Update::Applied(object),
                        Lenient::Unreadable(object) => match self.unreadable(*object) {
                            Some(object) => Update::Unreadable { object, deleted: false },
                            None => return End::Relist(Relist::Unreadable),
                        },
                    }
                }
                Some(Ok(WatchEvent::Deleted(object))) => {
                    self.count("delete");
                    advance(version, &object);
                    match object {
                        Lenient::Read(object) => Update::Deleted(object),
                        Lenient::Unreadable(object) => match self.unreadable(*object) {
                            Some(object) => Update::Unreadable { object, deleted: true },
                            None => return End::Relist(Relist::Unreadable),
                        },
                    }
                }
                Some(Ok(WatchEvent::Bookmark(bookmark))) => {
                    self.count("bookmark");
                    *version = bookmark.metadata.resource_version;
                    *last_heard = Instant::now();
                    self.metrics.silence.touch(self.resource);
                    continue;
                }
                Some(Ok(WatchEvent::Error(status))) if status.code == 410 => return self.gone(),
                Some(Ok(WatchEvent::Error(status))) => {
                    let message = format!("{} {}: {}", status.code, status.reason, status.message);
                    return if self.failed(out, reachable, &message, "watch").await {
                        End::Resume { failed: true }
                    } else {
                        End::Stop
                    };
                }
                Some(Err(error)) => {
                    return if self.failed(out, reachable, &error.to_string(), "watch").await {
                        End::Resume { failed: true }
                    } else {
                        End::Stop
                    };
                }
            };
            *last_heard = Instant::now();
            self.metrics.silence.touch(self.resource);
            if out.send(update).await.is_err() {
                return End::Stop;
            }
        }
    }

    /// Logs an unreadable object of the watch; `None` when it identifies nothing (relist).
    fn unreadable(&self, object: Unreadable) -> Option<Unreadable> {
        self.log_unreadable(&object, "watch");
        if object.is_identified() {
            return Some(object);
        }
        tracing::warn!(
            resource = self.resource,
            "an unreadable object identifies nothing: refusing credentials until a relist completes"
        );
        None
    }

    fn gone(&self) -> End {
        tracing::info!(
            resource = self.resource,
            "watch history compacted (410 Gone); relisting now"
        );
        End::Relist(Relist::Gone)
    }

    fn idle(&self) -> End {
        tracing::warn!(
            resource = self.resource, idle = ?self.config.idle,
            "watch silent (no event, no bookmark); relisting"
        );
        End::Relist(Relist::Idle)
    }

    /// Counts and logs a failure and tells the consumer once; false when the consumer is gone.
    async fn failed(&self, out: &mpsc::Sender<Update<K>>, reachable: &mut bool, error: &str, during: &str) -> bool {
        self.metrics.errors.with_label_values(&[self.resource]).inc();
        tracing::warn!(resource = self.resource, during, %error, "API server request failed; retrying");
        if *reachable {
            *reachable = false;
            return out.send(Update::Unreachable).await.is_ok();
        }
        true
    }

    fn count(&self, event: &str) {
        self.metrics.events.with_label_values(&[self.resource, event]).inc();
    }
}

/// Resumes later watches after `object`; one without a resourceVersion (unreadable) leaves it as it
/// was, since an empty one would ask the API server for "any" version.
fn advance<K: Object>(version: &mut String, object: &Lenient<K>) {
    if let Some(seen) = object.resource_version().filter(|v| !v.is_empty()) {
        *version = seen.to_owned();
    }
}

/// Sleeps the retry delay; false on shutdown.
async fn pause(failures: u32, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => false,
        () = tokio::time::sleep(retry_delay(failures, rand::random())) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;

    #[test]
    fn an_object_that_does_not_decode_is_kept_as_what_can_be_read_of_it() {
        let text = r#"{"metadata":{"name":"p","namespace":"ns","uid":"u1","resourceVersion":"7","labels":[]},
            "status":{"podIPs":[{"ip":"10.0.0.1"},{"ip":42},{"ip":"bad"}],"podIP":"10.0.0.1"}}"#;
        let Lenient::<Pod>::Unreadable(object) = serde_json::from_str(text).unwrap() else {
            panic!("decoded")
        };
        let unreadable = *object;
        assert!(unreadable.is_identified());
        assert_eq!(unreadable.key(), "ns/p");
        assert_eq!(unreadable.ips, vec!["10.0.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            unreadable.resource_version.as_deref(),
            Some("7"),
            "the watch resumes after it"
        );
        assert!(!unreadable.error.is_empty() && unreadable.error.chars().count() <= ERROR_CHARS);

        let nameless = r#"{"metadata":"p","status":{"podIP":"10.0.0.1"}}"#;
        let Lenient::<Pod>::Unreadable(object) = serde_json::from_str(nameless).unwrap() else {
            panic!("decoded")
        };
        assert!(!object.is_identified());

        let fine = r#"{"metadata":{"name":"p","uid":"u1"},"status":{"podIP":"10.0.0.1"}}"#;
        assert!(matches!(
            serde_json::from_str::<Lenient<Pod>>(fine).unwrap(),
            Lenient::Read(_)
        ));
    }

    #[test]
    fn a_long_decoding_error_is_cut_short() {
        let huge = "x".repeat(10_000);
        let text = format!(r#"{{"metadata":{{"name":"p","uid":"u","annotations":{{"a":["{huge}"]}}}}}}"#);
        let Lenient::<Pod>::Unreadable(object) = serde_json::from_str(&text).unwrap() else {
            panic!("decoded")
        };
        assert!(object.error.chars().count() <= ERROR_CHARS);
    }

    #[test]
    fn retries_start_fast_and_never_wait_more_than_five_seconds() {
        assert_eq!(retry_delay(1, 0.0), Duration::from_millis(250));
        assert_eq!(retry_delay(2, 0.0), Duration::from_millis(500));
        assert_eq!(retry_delay(5, 0.0), Duration::from_secs(4));
        for failures in 1..100 {
            for fraction in [0.0, 0.5, 0.999] {
                let delay = retry_delay(failures, fraction);
                assert!(
                    delay <= RETRY_CAP && delay >= RETRY_INITIAL / 2,
                    "{failures}: {delay:?}"
                );
            }
        }
    }

    struct Role;
    impl Selection for Role {
        type Kind = k8s_openapi::api::core::v1::ServiceAccount;
        const ANNOTATION: &'static str = "example.com/role";
    }

    #[test]
    fn a_metadata_object_keeps_its_identity_and_the_one_annotation_only() {
        let text = r#"{"kind":"PartialObjectMetadata","apiVersion":"meta.k8s.io/v1","metadata":{
            "name":"sa","namespace":"ns","uid":"u","resourceVersion":"9","labels":{"a":"b"},
            "managedFields":[{"manager":"kubectl"}],
            "annotations":{"other":"x","example.com/role":"arn","kubectl.kubernetes.io/last-applied-configuration":"{}"}}}"#;
        let Lenient::<Metadata<Role>>::Read(object) = serde_json::from_str(text).unwrap() else {
            panic!("unreadable")
        };
        assert_eq!(object.namespace.as_deref(), Some("ns"));
        assert_eq!(object.name.as_deref(), Some("sa"));
        assert_eq!(object.resource_version(), Some("9"));
        assert_eq!(object.annotation.as_deref(), Some("arn"));
        assert!(object.matters());
        let plain: Metadata<Role> = serde_json::from_str(r#"{"metadata":{"name":"sa","annotations":null}}"#).unwrap();
        assert_eq!(plain.annotation, None);
        assert!(!plain.matters(), "without the annotation it says nothing");
    }

    #[test]
    fn malformed_annotations_make_a_metadata_object_unreadable_as_a_whole_object_would_be() {
        for annotations in [r#"[]"#, r#"{"other":["x"]}"#, r#"{"example.com/role":7}"#, r#""x""#] {
            let text = format!(r#"{{"metadata":{{"name":"sa","uid":"u","annotations":{annotations}}}}}"#);
            let Lenient::<Metadata<Role>>::Unreadable(object) = serde_json::from_str(&text).unwrap() else {
                panic!("{annotations} decoded")
            };
            assert!(object.is_identified(), "{annotations}");
        }
    }

    #[test]
    fn a_list_keeps_what_matters_and_every_unreadable_object_and_counts_them_all() {
        let text = r#"{"kind":"PartialObjectMetadataList","apiVersion":"meta.k8s.io/v1",
            "metadata":{"resourceVersion":"12"},"items":[
            {"metadata":{"name":"a","uid":"1"}},
            {"metadata":{"name":"b","uid":"2","annotations":{"example.com/role":"arn"}}},
            {"metadata":{"name":"c","uid":"3","annotations":[]}},
            {"metadata":{"name":"d","uid":"4","annotations":{"x":"y"}}}]}"#;
        let page: Page<Metadata<Role>> = serde_json::from_str(text).unwrap();
        assert_eq!(page.received, 4);
        let kept: Vec<String> = page
            .items
            .iter()
            .map(|item| match item {
                Lenient::Read(object) => object.name.clone().unwrap(),
                Lenient::Unreadable(object) => format!("unreadable {}", object.key()),
            })
            .collect();
        assert_eq!(kept, ["b", "unreadable c"]);
        assert_eq!(page.metadata.resource_version.as_deref(), Some("12"));
        let empty: Page<Metadata<Role>> = serde_json::from_str(r#"{"metadata":{},"items":null}"#).unwrap();
        assert_eq!((empty.items.len(), empty.received), (0, 0));
    }

    #[test]
    fn relists_that_every_node_makes_at_once_are_spread_over_at_most_a_second() {
        assert_eq!(relist_delay(Relist::Initial, 0.9), Duration::ZERO);
        assert_eq!(
            relist_delay(Relist::Unreadable, 0.9),
            Duration::ZERO,
            "already backed off"
        );
        for cause in [Relist::Gone, Relist::Idle] {
            assert_eq!(relist_delay(cause, 0.0), Duration::ZERO);
            assert_eq!(relist_delay(cause, 0.5), RELIST_SPREAD / 2);
            let mut last = Duration::ZERO;
            for step in 0..=1000 {
                let delay = relist_delay(cause, f64::from(step) / 1000.0);
                assert!(delay >= last && delay <= RELIST_SPREAD, "{cause:?} {step}: {delay:?}");
                last = delay;
            }
            assert_eq!(relist_delay(cause, 7.0), RELIST_SPREAD, "clamped");
        }
    }

    #[test]
    fn a_list_body_is_decoded_from_its_chunks_as_they_come() {
        let text = br#"{"metadata":{"resourceVersion":"5"},"items":[{"metadata":{"name":"a","uid":"1","annotations":{"example.com/role":"arn"}}}]}"#;
        let body = || {
            let (chunks, received) = mpsc::channel(text.len());
            for piece in text.chunks(3) {
                chunks
                    .try_send(piece.to_vec())
                    .unwrap_or_else(|_| panic!("room for every chunk"));
            }
            Body {
                received,
                chunk: std::io::Cursor::default(),
            }
        };
        let mut read = Vec::new();
        std::io::Read::read_to_end(&mut body(), &mut read).unwrap();
        assert_eq!(read, text, "every chunk, in order, then the end");
        let page: Page<Metadata<Role>> = serde_json::from_reader(std::io::BufReader::new(body())).unwrap();
        assert_eq!((page.received, page.items.len()), (1, 1));
        assert_eq!(page.metadata.resource_version.as_deref(), Some("5"));
    }
}
