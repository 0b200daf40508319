//! Kubernetes Events on a pod that cannot get credentials for a reason its owner can fix (an invalid
//! role annotation, a role that does not trust it, a refused TokenRequest, throttling), so that
//! `kubectl describe pod` says why its SDK finds no credentials.
//!
//! Invariants:
//! - nothing here blocks the caller: [`Sink`] hands a notice to a bounded queue (`try_send`); a full
//!   queue drops it, counted in `imds_broker_events_total{result="dropped"}`;
//! - the [`Recorder`] task alone talks to the API server (events.k8s.io/v1), one write at a time, each
//!   bounded by a timeout and by shutdown;
//! - repeats aggregate: one Event per (pod UID, reason, note), created on the first occurrence; later
//!   occurrences only count, and the Event's `series` is patched at most once per
//!   [`SERIES_WRITE_INTERVAL`]; a series nobody observed for [`SERIES_GAP`] ends, and the next
//!   occurrence creates a new Event (client-go's events library keeps the same shape);
//! - notes name the pod's role and the AWS or Kubernetes error code, never a token or a credential
//!   (only errors that carry neither are turned into notes, and anything JWT-shaped is blanked).
//!
//! Why not kube's `Recorder`: it writes once per call (so a looping failure is one API write per
//! occurrence), keys its series without the note, although the API server holds `note` immutable —
//! a pod that changes from one refused role to another would keep showing the first role — and it
//! reads the wall clock for its cache, which paused-time tests cannot drive.
//!
//! Occurrences come from the credential cache, which already remembers failures with backoff: a pod
//! whose SDK loops produces one occurrence per backoff step, not one per request.

use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use prometheus::{IntCounterVec, Opts, Registry};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::workload::Workload;
use crate::{credentials, roles, sa_token, spire, sts};

/// The `reportingController` of every Event this agent writes.
pub const CONTROLLER: &str = "imds-broker.io/agent";
/// A series is written (patched) at most this often; occurrences in between are only counted.
pub const SERIES_WRITE_INTERVAL: Duration = Duration::from_secs(5 * 60);
/// A series with no occurrence for this long ends; the next occurrence starts a new Event.
pub const SERIES_GAP: Duration = Duration::from_secs(6 * 60);
/// Notices waiting for the recorder; more are dropped.
const QUEUE: usize = 256;
/// Series remembered at once (pods × reasons of one node: far fewer in practice).
const MAX_SERIES: usize = 4096;
/// The longest one API write may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often pending series updates are looked for.
const FLUSH_CHECK: Duration = Duration::from_secs(30);
/// The API server's limit on `note`, in bytes.
const NOTE_LIMIT: usize = 1024;
/// A failed write is logged at most this often (the rest are counted).
const ERROR_LOG_EVERY: Duration = Duration::from_secs(5 * 60);

/// Events settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// `--events`: whether Events are written at all.
    pub enabled: bool,
    /// The `reportingInstance`: the node's name, as the kubelet reports its own Events.
    pub instance: String,
}

/// Why a pod got no credentials, as the Event's `reason`: a closed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The role annotation (pod or service account) is not a usable role.
    InvalidRoleAnnotation,
    /// STS refused with `AccessDenied`: the role's trust policy does not name this service account.
    StsAccessDenied,
    /// STS refused the service-account token (`InvalidIdentityToken`: issuer, audience, OIDC provider).
    StsInvalidIdentityToken,
    /// STS refused with another code (e.g. `ValidationError` for a session longer than the role allows).
    StsRefused,
    /// STS is throttling this node's calls.
    StsThrottled,
    /// The API server refused the TokenRequest (RBAC, admission policy, pod or service account gone).
    TokenRequestRefused,
    /// STS granted a session too short to be served.
    SessionTooShort,
    /// `--identity-source spire`: no SPIRE registration entry matches the pod (yet).
    SpireNoRegistration,
    /// `--identity-source spire`: the SPIRE agent refused (not an authorized delegate, another gRPC
    /// error) or several entries match the pod.
    SpireRefused,
}

impl Reason {
    /// Every reason, for documentation and tests.
    pub const ALL: [Reason; 9] = [
        Reason::InvalidRoleAnnotation,
        Reason::StsAccessDenied,
        Reason::StsInvalidIdentityToken,
        Reason::StsRefused,
        Reason::StsThrottled,
        Reason::TokenRequestRefused,
        Reason::SessionTooShort,
        Reason::SpireNoRegistration,
        Reason::SpireRefused,
    ];

    /// The Event's `reason` (CamelCase, as Kubernetes' own) and the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidRoleAnnotation => "InvalidRoleAnnotation",
            Reason::StsAccessDenied => "StsAccessDenied",
            Reason::StsInvalidIdentityToken => "StsInvalidIdentityToken",
            Reason::StsRefused => "StsRefused",
            Reason::StsThrottled => "StsThrottled",
            Reason::TokenRequestRefused => "TokenRequestRefused",
            Reason::SessionTooShort => "SessionTooShort",
            Reason::SpireNoRegistration => "SpireNoRegistration",
            Reason::SpireRefused => "SpireRefused",
        }
    }

    /// The Event's `action`: what the agent was doing for the pod.
    fn action(self) -> &'static str {
        match self {
            Reason::InvalidRoleAnnotation => "ResolveRole",
            Reason::TokenRequestRefused => "RequestServiceAccountToken",
            Reason::SpireNoRegistration | Reason::SpireRefused => "FetchJWTSVID",
            Reason::StsAccessDenied
            | Reason::StsInvalidIdentityToken
            | Reason::StsRefused
            | Reason::StsThrottled
            | Reason::SessionTooShort => "AssumeRoleWithWebIdentity",
        }
    }

    /// The reason and note for a failed exchange, `None` for failures the pod's owner cannot act on
    /// (STS or the API server unreachable, the agent stopping, the pod gone meanwhile).
    pub fn of_exchange(error: &credentials::Error) -> Option<(Reason, String)> {
        use credentials::Error as E;
        let found = match error {
            E::Sts(sts::Error::Refused { role, code, message }) => {
                let reason = match code.as_str() {
                    "AccessDenied" => Reason::StsAccessDenied,
                    "InvalidIdentityToken" => Reason::StsInvalidIdentityToken,
                    _ => Reason::StsRefused,
                };
                let note = format!("STS refused AssumeRoleWithWebIdentity for role {role}: {code}: {message}");
                (reason, note)
            }
            E::Sts(sts::Error::Throttled { role, code, .. }) => (
                Reason::StsThrottled,
                format!("STS throttled AssumeRoleWithWebIdentity for role {role}: {code}; retrying with backoff"),
            ),
            E::SaToken(sa_token::Error::Refused {
                service_account,
                status,
                reason,
                message,
            }) => (
                Reason::TokenRequestRefused,
                format!(
                    "TokenRequest for service account {service_account} refused: HTTP {status} {reason}: {message}"
                ),
            ),
            E::ShortLived {
                role,
                granted,
                required,
            } => (
                Reason::SessionTooShort,
                format!(
                    "STS granted a session for role {role} valid for {}s, less than the {}s the agent must leave (--credential-min-remaining)",
                    granted.as_secs(),
                    required.as_secs()
                ),
            ),
            E::Spire(e @ spire::Error::NoSvid { .. }) => (Reason::SpireNoRegistration, e.to_string()),
            E::Spire(
                e @ (spire::Error::Denied { .. } | spire::Error::Refused { .. } | spire::Error::Ambiguous { .. }),
            ) => (Reason::SpireRefused, e.to_string()),
            E::Sts(_) | E::SaToken(_) | E::Spire(_) | E::Stopped | E::Superseded => return None,
        };
        Some(found)
    }
}

/// Events metrics.
#[derive(Clone)]
pub struct Metrics {
    occurrences: IntCounterVec,
    writes: IntCounterVec,
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let occurrences = IntCounterVec::new(
            Opts::new(
                "imds_broker_events_total",
                "Pod Event occurrences by reason and result: created (a new Event), aggregated (counted into \
                 an existing Event's series), dropped (queue full, or too many series), failed (the API \
                 server refused the write)",
            ),
            &["reason", "result"],
        )?;
        let writes = IntCounterVec::new(
            Opts::new(
                "imds_broker_events_writes_total",
                "Writes to the events.k8s.io API by verb (create, patch) and outcome (ok, error)",
            ),
            &["verb", "outcome"],
        )?;
        registry.register(Box::new(occurrences.clone()))?;
        registry.register(Box::new(writes.clone()))?;
        Ok(Self { occurrences, writes })
    }

    fn count(&self, reason: Reason, result: &str) {
        self.occurrences.with_label_values(&[reason.as_str(), result]).inc();
    }
}

/// One occurrence, on its way to the recorder.
struct Notice {
    uid: String,
    namespace: String,
    name: String,
    reason: Reason,
    note: String,
}

/// The handle the credential cache reports to; cheap to clone, never blocks.
#[derive(Clone)]
pub struct Sink {
    queue: Option<mpsc::Sender<Notice>>,
    metrics: Metrics,
}

impl Sink {
    /// Reports a failed exchange for `workload` (ignored unless its owner can act on it).
    pub fn exchange_failed(&self, workload: &Workload, error: &credentials::Error) {
        if let Some((reason, note)) = Reason::of_exchange(error) {
            self.send(workload, reason, note);
        }
    }

    /// Reports that `workload`'s role annotation cannot be used.
    pub fn invalid_role(&self, workload: &Workload, error: &roles::Error) {
        self.send(workload, Reason::InvalidRoleAnnotation, error.to_string());
    }

    fn send(&self, workload: &Workload, reason: Reason, note: String) {
        let Some(queue) = &self.queue else {
            return;
        };
        let notice = Notice {
            uid: workload.uid.clone(),
            namespace: workload.namespace.clone(),
            name: workload.name.clone(),
            reason,
            note: clean_note(&note),
        };
        match queue.try_send(notice) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => self.metrics.count(reason, "dropped"),
            // The recorder has stopped: the agent is shutting down.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

/// Builds the sink and, when `--events` is on, the recorder task that writes what it is sent.
pub fn build(
    config: &Config,
    client: kube::Client,
    registry: &Registry,
) -> prometheus::Result<(Sink, Option<Recorder>)> {
    let metrics = Metrics::register(registry)?;
    if !config.enabled {
        return Ok((Sink { queue: None, metrics }, None));
    }
    let (sender, queue) = mpsc::channel(QUEUE);
    let recorder = Recorder {
        client,
        instance: config.instance.clone(),
        queue,
        metrics: metrics.clone(),
        series: HashMap::new(),
        error_logged: None,
    };
    Ok((
        Sink {
            queue: Some(sender),
            metrics,
        },
        Some(recorder),
    ))
}

/// What makes two occurrences the same Event.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    uid: String,
    reason: Reason,
    note: String,
}

/// One Event the recorder created and may still add occurrences to.
struct Series {
    namespace: String,
    /// The Event's name.
    name: String,
    /// The pod's name, for log lines.
    pod: String,
    /// Occurrences so far; the created Event is the first.
    count: i32,
    /// The count the API server has.
    written_count: i32,
    /// When the series was last written (created or patched).
    written_at: Instant,
    /// The last occurrence.
    observed_at: Instant,
    /// The last occurrence, as the wall clock the API server keeps.
    observed_time: Timestamp,
}

/// Why a write did not happen.
enum WriteError {
    /// The Event is gone from the API server (Events live an hour by default).
    Gone,
    /// Anything else: refused, unreachable, too slow, or the agent stopping.
    Failed(String),
}

/// Writes Events for the notices the [`Sink`] sends; the only part that talks to the API server.
pub struct Recorder {
    client: kube::Client,
    instance: String,
    queue: mpsc::Receiver<Notice>,
    metrics: Metrics,
    series: HashMap<Key, Series>,
    error_logged: Option<Instant>,
}

impl Recorder {
    /// Writes Events until `shutdown`. Occurrences not yet written into a series are dropped then
    /// (an undercount of a failure that is still being reported, no more).
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(FLUSH_CHECK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = ticker.tick() => self.flush(&shutdown).await,
                notice = self.queue.recv() => match notice {
                    Some(notice) => self.observe(notice, &shutdown).await,
                    None => break,
                },
            }
        }
    }

    /// Counts one occurrence: a new Event, or one more in an existing series.
    async fn observe(&mut self, notice: Notice, shutdown: &CancellationToken) {
        let now = Instant::now();
        let reason = notice.reason;
        let key = Key {
            uid: notice.uid.clone(),
            reason,
            note: notice.note.clone(),
        };
        if let Some(series) = self.series.get_mut(&key)
            && now.duration_since(series.observed_at) < SERIES_GAP
        {
            series.count = series.count.saturating_add(1);
            series.observed_at = now;
            series.observed_time = Timestamp::now();
            self.metrics.count(reason, "aggregated");
            if now.duration_since(series.written_at) >= SERIES_WRITE_INTERVAL {
                self.write_series(&key, shutdown).await;
            }
            return;
        }
        self.series.remove(&key);
        if self.series.len() >= MAX_SERIES {
            self.metrics.count(reason, "dropped");
            return;
        }
        match self.create(&notice, shutdown).await {
            Ok(series) => {
                self.metrics.count(reason, "created");
                self.series.insert(key, series);
            }
            Err(error) => {
                self.metrics.count(reason, "failed");
                self.log_failure(&notice.namespace, &notice.name, reason, &error);
            }
        }
    }

    /// Writes the series that gained occurrences and are due; forgets those that ended.
    async fn flush(&mut self, shutdown: &CancellationToken) {
        let now = Instant::now();
        let due: Vec<Key> = self
            .series
            .iter()
            .filter(|(_, s)| s.count > s.written_count && now.duration_since(s.written_at) >= SERIES_WRITE_INTERVAL)
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            self.write_series(&key, shutdown).await;
        }
        // A series past the gap has just had its last write attempted (it was due).
        self.series
            .retain(|_, s| now.duration_since(s.observed_at) < SERIES_GAP);
    }

    /// Patches the series of `key` with its count and last occurrence.
    async fn write_series(&mut self, key: &Key, shutdown: &CancellationToken) {
        let Some(series) = self.series.get(key) else {
            return;
        };
        let (namespace, name, pod, count) = (
            series.namespace.clone(),
            series.name.clone(),
            series.pod.clone(),
            series.count,
        );
        let patch = serde_json::json!({
            "series": { "count": count, "lastObservedTime": MicroTime(series.observed_time) },
        });
        let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), &namespace);
        let (params, patch) = (PatchParams::default(), Patch::Merge(&patch));
        let result = bounded(api.patch(&name, &params, &patch), shutdown).await;
        self.metrics
            .writes
            .with_label_values(&["patch", if result.is_ok() { "ok" } else { "error" }])
            .inc();
        match result {
            Ok(()) => {
                if let Some(series) = self.series.get_mut(key) {
                    series.written_count = count;
                    series.written_at = Instant::now();
                }
            }
            // Expired on the server: the next occurrence starts a new Event.
            Err(WriteError::Gone) => {
                self.series.remove(key);
            }
            Err(error) => {
                // Try again at the next interval, not at the next tick.
                if let Some(series) = self.series.get_mut(key) {
                    series.written_at = Instant::now();
                }
                self.log_failure(&namespace, &pod, key.reason, &error);
            }
        }
    }

    /// Creates the Event for a first occurrence.
    async fn create(&self, notice: &Notice, shutdown: &CancellationToken) -> Result<Series, WriteError> {
        let now = Timestamp::now();
        let name = event_name(&notice.name, now.as_nanosecond());
        let event = K8sEvent {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(notice.namespace.clone()),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(now)),
            reporting_controller: Some(CONTROLLER.to_owned()),
            reporting_instance: Some(self.instance.clone()),
            action: Some(notice.reason.action().to_owned()),
            reason: Some(notice.reason.as_str().to_owned()),
            note: Some(notice.note.clone()),
            type_: Some("Warning".to_owned()),
            regarding: Some(ObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("Pod".to_owned()),
                namespace: Some(notice.namespace.clone()),
                name: Some(notice.name.clone()),
                uid: Some(notice.uid.clone()),
                ..ObjectReference::default()
            }),
            ..K8sEvent::default()
        };
        let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), &notice.namespace);
        let result = bounded(api.create(&PostParams::default(), &event), shutdown).await;
        self.metrics
            .writes
            .with_label_values(&["create", if result.is_ok() { "ok" } else { "error" }])
            .inc();
        result?;
        let at = Instant::now();
        Ok(Series {
            namespace: notice.namespace.clone(),
            name,
            pod: notice.name.clone(),
            count: 1,
            written_count: 1,
            written_at: at,
            observed_at: at,
            observed_time: now,
        })
    }

    fn log_failure(&mut self, namespace: &str, pod: &str, reason: Reason, error: &WriteError) {
        let now = Instant::now();
        if self
            .error_logged
            .is_some_and(|at| now.duration_since(at) < ERROR_LOG_EVERY)
        {
            return;
        }
        self.error_logged = Some(now);
        let error = match error {
            WriteError::Gone => "the Event is gone",
            WriteError::Failed(error) => error.as_str(),
        };
        tracing::warn!(
            pod = %format!("{namespace}/{pod}"), reason = reason.as_str(), %error,
            "could not write a Kubernetes Event (does the agent's ClusterRole allow create and patch of events.k8s.io events?); \
             further failures are only counted for a while"
        );
    }
}

/// Runs one API call within [`WRITE_TIMEOUT`], giving up when the agent stops.
async fn bounded<T>(
    call: impl std::future::Future<Output = kube::Result<T>>,
    shutdown: &CancellationToken,
) -> Result<(), WriteError> {
    tokio::select! {
        () = shutdown.cancelled() => Err(WriteError::Failed("the agent is stopping".to_owned())),
        result = tokio::time::timeout(WRITE_TIMEOUT, call) => match result {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(kube::Error::Api(status))) if status.code == 404 => Err(WriteError::Gone),
            Ok(Err(error)) => Err(WriteError::Failed(error.to_string())),
            Err(_) => Err(WriteError::Failed(format!("no answer within {WRITE_TIMEOUT:?}"))),
        },
    }
}

/// `<pod>.<nanoseconds in hex>`, as client-go names Events, kept a valid DNS subdomain of at most 253
/// characters (a long pod name is cut, and a cut label never ends in `-` or `.`).
fn event_name(pod: &str, nanos: i128) -> String {
    let suffix = format!(".{:x}", nanos.max(0));
    let mut head: String = pod.chars().take(253 - suffix.len()).collect();
    while head.ends_with(['-', '.']) {
        head.pop();
    }
    format!("{head}{suffix}")
}

/// The note as the API server accepts it (at most 1 KiB, cut on a character boundary), with anything
/// shaped like a JWT blanked: no error the agent reports carries a token, and this keeps it so.
fn clean_note(note: &str) -> String {
    let blanked: Vec<&str> = note
        .split(' ')
        .map(|word| if word.contains("eyJ") { "<redacted>" } else { word })
        .collect();
    let mut note = blanked.join(" ");
    if note.len() > NOTE_LIMIT {
        let mut cut = NOTE_LIMIT - '…'.len_utf8();
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
        note.push('…');
    }
    note
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_camel_case_and_distinct() {
        let names: std::collections::HashSet<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), Reason::ALL.len());
        for name in names {
            assert!(name.chars().next().is_some_and(|c| c.is_ascii_uppercase()), "{name}");
            assert!(name.chars().all(|c| c.is_ascii_alphanumeric()), "{name}");
        }
    }

    #[test]
    fn notes_fit_the_api_limit_and_never_carry_a_jwt() {
        let long = format!("role arn:aws:iam::111111111111:role/x: {}", "é".repeat(2000));
        let note = clean_note(&long);
        assert!(note.len() <= NOTE_LIMIT, "{}", note.len());
        assert!(note.ends_with('…'));
        let note = clean_note("InvalidIdentityToken: bad token eyJhbGciOiJSUzI1NiJ9.e30.sig here");
        assert_eq!(note, "InvalidIdentityToken: bad token <redacted> here");
    }

    #[test]
    fn event_names_are_dns_subdomains_even_for_long_pod_names() {
        assert_eq!(event_name("api-7d9f", 255), "api-7d9f.ff");
        let long = format!("{}-{}", "a".repeat(240), "b".repeat(20));
        let name = event_name(&long, i128::from(u64::MAX));
        assert!(name.len() <= 253, "{}", name.len());
        let head = name.rsplit_once('.').map(|(h, _)| h).unwrap();
        assert!(!head.ends_with('-') && !head.ends_with('.'), "{name}");
    }

    #[tokio::test]
    async fn with_events_off_there_is_no_recorder_and_the_sink_queues_nothing() {
        let registry = Registry::new();
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        let client = kube::Client::try_from(config).unwrap();
        let disabled = Config {
            enabled: false,
            instance: "node-1".into(),
        };
        let (sink, recorder) = build(&disabled, client, &registry).unwrap();
        assert!(recorder.is_none());
        assert!(sink.queue.is_none());
        let error = roles::Error::NoBaseArn {
            annotation: roles::POD_ANNOTATION,
            value: "app".into(),
        };
        let workload = Workload {
            uid: "u".into(),
            namespace: "ns".into(),
            name: "p".into(),
            service_account: "default".into(),
            pod_role: Some("app".into()),
            service_account_role: None,
            service_account_unreadable: false,
            running_since: None,
            ips: Vec::new(),
            running: true,
            terminating: false,
            host_network: false,
        };
        sink.invalid_role(&workload, &error);
        let text = crate::metrics::encode(&registry);
        assert!(!text.contains("imds_broker_events_total{"), "{text}");
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let metrics = Metrics::register(&Registry::new()).unwrap();
        let (sender, _queue) = mpsc::channel(1);
        let sink = Sink {
            queue: Some(sender),
            metrics: metrics.clone(),
        };
        let workload = Workload {
            uid: "u".into(),
            namespace: "ns".into(),
            name: "p".into(),
            service_account: "default".into(),
            pod_role: None,
            service_account_role: None,
            service_account_unreadable: false,
            running_since: None,
            ips: Vec::new(),
            running: true,
            terminating: false,
            host_network: false,
        };
        let throttled = credentials::Error::Sts(sts::Error::Throttled {
            role: "arn:aws:iam::111111111111:role/app".into(),
            code: "Throttling".into(),
            message: "Rate exceeded".into(),
        });
        for _ in 0..5 {
            sink.exchange_failed(&workload, &throttled);
        }
        let dropped = metrics
            .occurrences
            .with_label_values(&["StsThrottled", "dropped"])
            .get();
        assert_eq!(dropped, 4);
    }

    #[test]
    fn only_failures_the_owner_can_fix_become_events() {
        let role = "arn:aws:iam::111111111111:role/app".to_owned();
        let refused = credentials::Error::Sts(sts::Error::Refused {
            role: role.clone(),
            code: "AccessDenied".into(),
            message: "Not authorized to perform sts:AssumeRoleWithWebIdentity".into(),
        });
        let (reason, note) = Reason::of_exchange(&refused).unwrap();
        assert_eq!(reason, Reason::StsAccessDenied);
        assert!(note.contains(&role) && note.contains("AccessDenied"), "{note}");
        let outage = credentials::Error::Sts(sts::Error::Unavailable {
            role,
            code: "ServiceUnavailable".into(),
            message: "down".into(),
            source: None,
        });
        assert!(Reason::of_exchange(&outage).is_none());
        assert!(Reason::of_exchange(&credentials::Error::Superseded).is_none());

        let pod = || "apps/api-1".to_owned();
        let none = credentials::Error::Spire(spire::Error::NoSvid {
            pod: pod(),
            selectors: "k8s:ns:apps".into(),
        });
        let (reason, note) = Reason::of_exchange(&none).unwrap();
        assert_eq!(reason, Reason::SpireNoRegistration);
        assert!(note.contains("k8s:ns:apps"), "{note}");
        let denied = credentials::Error::Spire(spire::Error::Denied {
            pod: pod(),
            message: "not an authorized delegate".into(),
        });
        assert_eq!(Reason::of_exchange(&denied).unwrap().0, Reason::SpireRefused);
        let spire_down = credentials::Error::Spire(spire::Error::Unavailable {
            pod: pod(),
            detail: "connect: refused".into(),
        });
        assert!(
            Reason::of_exchange(&spire_down).is_none(),
            "an outage is the operator's, not the pod's"
        );
    }
}
