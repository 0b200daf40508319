//! The cache's metrics: lookups by result, exchanges by cause and outcome and their duration, and the
//! sizes that must drain when pods go (pods with sessions, exchanges in flight).

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};

/// Cache metrics.
#[derive(Clone)]
pub struct Metrics {
    pub(super) lookups: IntCounterVec,
    pub(super) fetches: IntCounterVec,
    pub(super) fetch_seconds: HistogramVec,
    pub(super) pods: IntGauge,
    pub(super) in_flight: IntGauge,
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
            .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
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
        registry.register(Box::new(lookups.clone()))?;
        registry.register(Box::new(fetches.clone()))?;
        registry.register(Box::new(fetch_seconds.clone()))?;
        registry.register(Box::new(pods.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        Ok(Self {
            lookups,
            fetches,
            fetch_seconds,
            pods,
            in_flight,
        })
    }
}
