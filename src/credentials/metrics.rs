//! The cache's metrics: lookups by result, exchanges by cause and outcome and their duration, the
//! TokenRequest and STS calls inside them by outcome, how long running pods waited for their first
//! credentials, the headroom until the soonest cached session expires, and the sizes that must drain
//! when pods go (pods with sessions, exchanges in flight).
//!
//! Every labelled series is created at registration for each value its closed label set can take, so
//! dashboards show 0 rather than "No data" and rules can tell a missing agent from a quiet one.

use std::sync::{Arc, OnceLock};

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Gauge, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};
use time::OffsetDateTime;

/// `result` of a lookup.
pub(super) const LOOKUP_RESULTS: &[&str] = &["hit", "stale", "remembered", "miss"];
/// `cause` of an exchange.
pub(super) const CAUSES: &[&str] = &["request", "prefetch", "refresh"];
/// `outcome` of a TokenRequest or FetchJWTSVIDs: `ok`, a [`crate::sa_token::Error::kind`] or a
/// [`crate::spire::Error::kind`].
pub(super) const SA_TOKEN_OUTCOMES: &[&str] = &[
    "ok",
    "token_refused",
    "token_throttled",
    "token_unavailable",
    "token_empty",
    "svid_unavailable",
    "svid_denied",
    "svid_refused",
    "svid_none",
    "svid_ambiguous",
];
/// `outcome` of an `AssumeRoleWithWebIdentity`: `ok` or a [`crate::sts::Error::kind`].
pub(super) const STS_OUTCOMES: &[&str] = &["ok", "sts_refused", "sts_throttled", "sts_unavailable", "sts_malformed"];
/// `outcome` of a whole exchange, beyond the TokenRequest and STS ones: a [`super::Error::kind`].
pub(super) const CACHE_OUTCOMES: &[&str] = &["short_lived", "stopped", "superseded"];

/// Buckets for calls to the API server and STS: milliseconds when healthy, up to their timeouts.
const CALL_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Cache metrics.
#[derive(Clone)]
pub struct Metrics {
    pub(super) lookups: IntCounterVec,
    pub(super) fetches: IntCounterVec,
    pub(super) fetch_seconds: HistogramVec,
    pub(super) pods: IntGauge,
    pub(super) in_flight: IntGauge,
    pub(super) sa_token_seconds: HistogramVec,
    pub(super) sts_seconds: HistogramVec,
    pub(super) first_seconds: Histogram,
    pub(super) headroom: Headroom,
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let lookups = IntCounterVec::new(
            Opts::new(
                "imds_broker_credentials_lookups_total",
                "Credential lookups by result: hit, stale (served past the fresh window because refreshes fail), \
                 remembered (a recent failure answered again), miss",
            ),
            &["result"],
        )?;
        let fetches = IntCounterVec::new(
            Opts::new(
                "imds_broker_credentials_fetches_total",
                "TokenRequest + AssumeRoleWithWebIdentity exchanges, by cause and outcome",
            ),
            &["cause", "outcome"],
        )?;
        let fetch_seconds = HistogramVec::new(
            HistogramOpts::new(
                "imds_broker_credentials_fetch_duration_seconds",
                "Time to mint a service-account token and exchange it at STS, waiting for the node's budget included",
            )
            .buckets(CALL_BUCKETS.to_vec()),
            &["cause"],
        )?;
        let pods = IntGauge::new(
            "imds_broker_credentials_pods",
            "Pods with cached STS sessions or remembered failures (updated by the refresher)",
        )?;
        let in_flight = IntGauge::new(
            "imds_broker_credentials_exchanges_in_flight",
            "Exchanges started and not finished, waiting for the node's budget included",
        )?;
        let sa_token_seconds = HistogramVec::new(
            HistogramOpts::new(
                "imds_broker_sa_token_request_duration_seconds",
                "Duration of TokenRequest calls for pod-bound service-account tokens, by outcome",
            )
            .buckets(CALL_BUCKETS.to_vec()),
            &["outcome"],
        )?;
        let sts_seconds = HistogramVec::new(
            HistogramOpts::new(
                "imds_broker_sts_request_duration_seconds",
                "Duration of AssumeRoleWithWebIdentity calls, by outcome",
            )
            .buckets(CALL_BUCKETS.to_vec()),
            &["outcome"],
        )?;
        let first_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "imds_broker_credentials_first_delay_seconds",
                "Seconds from a pod's Running time (its first container's start) to its first STS session, \
                 for pods that started while this agent ran",
            )
            .buckets(vec![0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]),
        )?;
        let headroom = Headroom::new()?;
        for result in LOOKUP_RESULTS {
            lookups.with_label_values(&[result]);
        }
        for cause in CAUSES {
            fetch_seconds.with_label_values(&[cause]);
            let outcomes = SA_TOKEN_OUTCOMES.iter().chain(&STS_OUTCOMES[1..]).chain(CACHE_OUTCOMES);
            for outcome in outcomes {
                fetches.with_label_values(&[cause, outcome]);
            }
        }
        for outcome in SA_TOKEN_OUTCOMES {
            sa_token_seconds.with_label_values(&[outcome]);
        }
        for outcome in STS_OUTCOMES {
            sts_seconds.with_label_values(&[outcome]);
        }
        registry.register(Box::new(lookups.clone()))?;
        registry.register(Box::new(fetches.clone()))?;
        registry.register(Box::new(fetch_seconds.clone()))?;
        registry.register(Box::new(pods.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        registry.register(Box::new(sa_token_seconds.clone()))?;
        registry.register(Box::new(sts_seconds.clone()))?;
        registry.register(Box::new(first_seconds.clone()))?;
        registry.register(Box::new(headroom.clone()))?;
        Ok(Self {
            lookups,
            fetches,
            fetch_seconds,
            pods,
            in_flight,
            sa_token_seconds,
            sts_seconds,
            first_seconds,
            headroom,
        })
    }

    /// Records a TokenRequest that took `seconds` and ended with `outcome` (`ok` or an error kind).
    pub(super) fn sa_token_call(&self, outcome: &str, seconds: f64) {
        self.sa_token_seconds.with_label_values(&[outcome]).observe(seconds);
    }

    /// Records an `AssumeRoleWithWebIdentity` that took `seconds` and ended with `outcome`.
    pub(super) fn sts_call(&self, outcome: &str, seconds: f64) {
        self.sts_seconds.with_label_values(&[outcome]).observe(seconds);
    }

    /// Records a pod's first STS session, obtained at `now`, for a pod Running since `running_since`.
    /// Pods that were running before the agent started (`started`) are not counted: their wait is the
    /// agent's restart, not the pod's start.
    pub(super) fn first_session(
        &self,
        running_since: Option<OffsetDateTime>,
        started: OffsetDateTime,
        now: OffsetDateTime,
    ) {
        if let Some(delay) = first_delay(running_since, started, now) {
            self.first_seconds.observe(delay);
        }
    }
}

/// The delay to record for a first session (see [`Metrics::first_session`]); never negative, since the
/// API server's timestamps are whole seconds.
fn first_delay(running_since: Option<OffsetDateTime>, started: OffsetDateTime, now: OffsetDateTime) -> Option<f64> {
    let since = running_since?;
    // Timestamps are truncated to the second: a pod that started in the agent's first second counts.
    if since < started.replace_nanosecond(0).unwrap_or(started) {
        return None;
    }
    Some((now - since).as_seconds_f64().max(0.0))
}

/// `imds_broker_credentials_expiry_headroom_seconds`: seconds until the soonest expiry among cached STS
/// sessions, computed when scraped from the expiry the cache last reported; `+Inf` while none is cached.
#[derive(Clone)]
pub(super) struct Headroom {
    soonest: Arc<OnceLock<Soonest>>,
    gauge: Gauge,
}

/// Reads the soonest expiry among the cached sessions, when scraped.
type Soonest = Box<dyn Fn() -> Option<OffsetDateTime> + Send + Sync>;

impl Headroom {
    fn new() -> prometheus::Result<Self> {
        let gauge = Gauge::new(
            "imds_broker_credentials_expiry_headroom_seconds",
            "Seconds until the soonest expiry among cached STS sessions (+Inf while none is cached)",
        )?;
        gauge.set(f64::INFINITY);
        Ok(Self {
            soonest: Arc::default(),
            gauge,
        })
    }

    /// Where the soonest expiry is read from at each scrape (the cache, once it exists); scanning the
    /// sessions once per scrape keeps that work off exchanges and watch events.
    pub(super) fn read_from(&self, soonest: impl Fn() -> Option<OffsetDateTime> + Send + Sync + 'static) {
        if self.soonest.set(Box::new(soonest)).is_err() {
            tracing::warn!("the headroom gauge already has a source; keeping the first");
        }
    }
}

impl Collector for Headroom {
    fn desc(&self) -> Vec<&Desc> {
        self.gauge.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let soonest = self.soonest.get().and_then(|soonest| soonest());
        let seconds = soonest.map_or(f64::INFINITY, |at| (at - OffsetDateTime::now_utc()).as_seconds_f64());
        self.gauge.set(seconds);
        self.gauge.collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::Error;
    use crate::{sa_token, spire, sts};
    use std::sync::Mutex;
    use time::macros::datetime;

    #[test]
    fn every_error_kind_is_a_zero_initialised_outcome() {
        let role = || "arn:aws:iam::123456789012:role/r".to_owned();
        let sa = || "ns/sa".to_owned();
        let sts_errors = [
            sts::Error::Refused {
                role: role(),
                code: "AccessDenied".into(),
                message: String::new(),
            },
            sts::Error::Throttled {
                role: role(),
                code: "Throttling".into(),
                message: String::new(),
            },
            sts::Error::Unavailable {
                role: role(),
                code: "Timeout".into(),
                message: String::new(),
                source: None,
            },
            sts::Error::Malformed { role: role() },
        ];
        let sa_errors = [
            sa_token::Error::Refused {
                service_account: sa(),
                status: 403,
                reason: String::new(),
                message: String::new(),
            },
            sa_token::Error::Throttled {
                service_account: sa(),
                message: String::new(),
            },
            sa_token::Error::Timeout {
                service_account: sa(),
                after: std::time::Duration::from_secs(1),
            },
            sa_token::Error::Empty { service_account: sa() },
        ];
        let pod = || "ns/pod".to_owned();
        let svid_errors = [
            spire::Error::Unavailable {
                pod: pod(),
                detail: String::new(),
            },
            spire::Error::Timeout {
                pod: pod(),
                after: std::time::Duration::from_secs(1),
            },
            spire::Error::Denied {
                pod: pod(),
                message: String::new(),
            },
            spire::Error::Refused {
                pod: pod(),
                code: 3,
                message: String::new(),
            },
            spire::Error::NoSvid {
                pod: pod(),
                selectors: String::new(),
            },
            spire::Error::Ambiguous {
                pod: pod(),
                count: 2,
                ids: String::new(),
            },
        ];
        for error in &svid_errors {
            assert!(SA_TOKEN_OUTCOMES.contains(&error.kind()), "{}", error.kind());
        }
        for error in &sts_errors {
            assert!(STS_OUTCOMES.contains(&error.kind()), "{}", error.kind());
        }
        for error in &sa_errors {
            assert!(SA_TOKEN_OUTCOMES.contains(&error.kind()), "{}", error.kind());
        }
        let cache_errors = [
            Error::ShortLived {
                role: role(),
                granted: std::time::Duration::ZERO,
                required: std::time::Duration::ZERO,
            },
            Error::Stopped,
            Error::Superseded,
        ];
        for error in &cache_errors {
            assert!(CACHE_OUTCOMES.contains(&error.kind()), "{}", error.kind());
        }

        let registry = Registry::new();
        Metrics::register(&registry).unwrap();
        let text = crate::metrics::encode(&registry);
        let kinds = sts_errors.iter().map(sts::Error::kind);
        let kinds = kinds.chain(sa_errors.iter().map(sa_token::Error::kind));
        let kinds = kinds.chain(svid_errors.iter().map(spire::Error::kind));
        for kind in kinds.chain(cache_errors.iter().map(Error::kind)) {
            for cause in CAUSES {
                let series = format!("imds_broker_credentials_fetches_total{{cause=\"{cause}\",outcome=\"{kind}\"}} 0");
                assert!(text.contains(&series), "missing {series}");
            }
        }
    }

    #[test]
    fn headroom_is_infinite_without_sessions_and_counts_down_to_the_soonest_expiry() {
        let registry = Registry::new();
        let metrics = Metrics::register(&registry).unwrap();
        let value = |registry: &Registry| {
            registry
                .gather()
                .iter()
                .find(|f| f.name() == "imds_broker_credentials_expiry_headroom_seconds")
                .map(|f| f.get_metric()[0].get_gauge().get_value())
                .unwrap()
        };
        assert_eq!(value(&registry), f64::INFINITY, "no source yet");
        let soonest = Arc::new(Mutex::new(Some(
            OffsetDateTime::now_utc() + time::Duration::minutes(20),
        )));
        let source = soonest.clone();
        metrics.headroom.read_from(move || *source.lock().unwrap());
        let seconds = value(&registry);
        assert!((1190.0..=1200.0).contains(&seconds), "{seconds}");
        *soonest.lock().unwrap() = None;
        assert_eq!(value(&registry), f64::INFINITY);
    }

    #[test]
    fn the_first_delay_counts_only_pods_that_started_while_the_agent_ran() {
        let started = datetime!(2026-01-01 10:00:00.700 UTC);
        let now = datetime!(2026-01-01 10:05:00 UTC);
        assert_eq!(first_delay(None, started, now), None);
        assert_eq!(
            first_delay(Some(datetime!(2026-01-01 09:59:59 UTC)), started, now),
            None
        );
        // Truncated to the second like the API server's timestamps: same second as the start counts.
        assert_eq!(
            first_delay(Some(datetime!(2026-01-01 10:00:00 UTC)), started, now),
            Some(300.0)
        );
        assert_eq!(
            first_delay(Some(datetime!(2026-01-01 10:04:58 UTC)), started, now),
            Some(2.0)
        );
        // A kubelet clock slightly ahead never makes a negative delay.
        assert_eq!(
            first_delay(Some(datetime!(2026-01-01 10:05:01 UTC)), started, now),
            Some(0.0)
        );
    }
}
