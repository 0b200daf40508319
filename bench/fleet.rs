//! The fleet model (issue #13, part 4): what a 5,000-node cluster with 110 pods per node costs the API
//! server and STS, extrapolated from one agent's figures measured in the same run. Arithmetic only;
//! every input is either measured here or one of the agent's defaults, and the text says which.

use std::fmt::Write as _;
use std::time::Duration;

use imds_broker::credentials::schedule::schedule;
use imds_broker::watch::RELIST_SPREAD;

use crate::report::Results;
use crate::scenarios::WATCHED;

/// The cluster modelled.
const NODES: f64 = 5000.0;
const PODS_PER_NODE: f64 = 110.0;

/// The agent's defaults that set the exchange rate: `--credential-min-remaining`,
/// `--credential-expiry-margin`, `--exchange-rate`.
const MIN_REMAINING: Duration = Duration::from_secs(900);
const EXPIRY_MARGIN: Duration = Duration::from_secs(300);
const EXCHANGE_RATE: f64 = 20.0;

/// The only figure seen for STS's request quota: AWS publishes none (its knowledge-center article on
/// STS throttling says only that the quota is per account and Region endpoint and cannot be raised);
/// 600 requests per second is what users report hitting (e.g. awslabs/mountpoint-s3#1358).
const STS_REPORTED_QUOTA: f64 = 600.0;

/// kube-apiserver's default `--max-mutating-requests-inflight` (TokenRequest is a create).
const API_MUTATING_INFLIGHT: f64 = 200.0;

/// Mean time to a pod's next exchange with `session` and the defaults above (refreshes are jittered
/// over part of the span; 0.5 is the mean).
fn refresh_period(session: Duration) -> Option<Duration> {
    schedule(session, MIN_REMAINING, EXPIRY_MARGIN, 0.5).map(|s| s.refresh_after)
}

impl Results {
    /// `## Fleet model`.
    pub fn fleet(&self, out: &mut String) {
        let pods = NODES * PODS_PER_NODE;
        let _ = writeln!(
            out,
            "## Fleet model: {NODES:.0} nodes × {PODS_PER_NODE:.0} pods\n\n\
             From this run's per-agent figures; a model, not a measurement of such a cluster. Inputs: the \
             cluster-size rows above (API-server requests and bytes per agent), the upstream row (exchanges \
             per pod per refresh cycle), and the agent's defaults (`--credential-min-remaining` 15 min, \
             `--credential-expiry-margin` 5 min, `--exchange-rate` {EXCHANGE_RATE:.0}/s per node). STS \
             quota: AWS publishes no number for `AssumeRoleWithWebIdentity` (the quota is per account and \
             Region endpoint and cannot be raised); the figure users report hitting is \
             {STS_REPORTED_QUOTA:.0} requests/s per account and Region, used below. API server: \
             TokenRequest is a mutating request, {API_MUTATING_INFLIGHT:.0} in flight by default per API \
             server (`--max-mutating-requests-inflight`).\n"
        );
        // Watches: one per watched kind per node (the Node watch only in on-prem mode).
        let watched = WATCHED.len() as f64;
        let _ = writeln!(
            out,
            "- **Watches**: {} per agent ({}; on-prem agents also watch their own Node): {:.0} open on the \
             API servers. Pods are watched per node (`spec.nodeName`), so a pod event reaches one agent; \
             every service-account or namespace change (metadata only) reaches all {NODES:.0}.",
            WATCHED.len(),
            WATCHED.iter().map(|k| k.plural()).collect::<Vec<_>>().join(", "),
            NODES * watched
        );
        if let Some((base, largest)) = self.cluster_pair() {
            // The pods' share scales with the pods per node; the rest (service accounts, namespaces
            // elsewhere) is the same on every node.
            let pod_share = base.relist.bytes as f64 * PODS_PER_NODE / base.pods.max(1) as f64;
            let per_node = largest.relist.bytes.saturating_sub(base.relist.bytes) as f64 + pod_share;
            let requests = NODES * largest.relist.requests as f64;
            let _ = writeln!(
                out,
                "- **After an API server restart** (every watch gets 410 and relists; with the watch cache \
                 most watches resume instead): per agent {} requests; {:.1} KiB with {} service accounts \
                 elsewhere and {PODS_PER_NODE:.0} pods (measured: {:.1} KiB with {} pods, of which the pods' \
                 list scales with the pods). Fleet: {requests:.0} requests and {:.0} MiB, spread over {:.0} s \
                 by the agents' relist jitter (≈ {:.0} requests/s), served from the watch cache \
                 (`resourceVersion=0` / `NotOlderThan`), not from etcd. The agents' sessions survive it: no \
                 TokenRequest, no STS call. These bytes are what still grows with the cluster (about 0.6 KiB \
                 per service account, per node): at 1 Gbit/s from each of 3 API servers they take {:.0} s to \
                 send, not the 1 s the jitter spreads them over.",
                largest.relist.requests,
                per_node / 1024.0,
                largest.elsewhere.service_accounts,
                largest.relist.bytes as f64 / 1024.0,
                largest.pods,
                NODES * per_node / (1024.0 * 1024.0),
                RELIST_SPREAD.as_secs_f64(),
                requests / RELIST_SPREAD.as_secs_f64().max(1.0),
                NODES * per_node / (3.0 * 125_000_000.0),
            );
        }
        let per_cycle = self.upstream.sts_per_cycle();
        let _ = writeln!(
            out,
            "- **Steady state**: each pod exchanges once per refresh period ({per_cycle:.2} STS calls per \
             pod per cycle measured above), one TokenRequest and one `AssumeRoleWithWebIdentity` each, \
             spread by the refresh jitter:\n"
        );
        let _ = writeln!(
            out,
            "| `--session-duration` | refresh period | TokenRequest/s (cluster) | STS calls/s (cluster) | \
             vs STS's {STS_REPORTED_QUOTA:.0}/s |\n|---|---|---|---|---|"
        );
        for session in [3600, 14400, 43200] {
            let Some(period) = refresh_period(Duration::from_secs(session)) else {
                continue;
            };
            let rate = pods * per_cycle.max(1.0) / period.as_secs_f64();
            let _ = writeln!(
                out,
                "| {session} s{} | {:.0} min | {rate:.0} | {rate:.0} | {:.2}× |",
                if session == 3600 { " (default)" } else { "" },
                period.as_secs_f64() / 60.0,
                rate / STS_REPORTED_QUOTA
            );
        }
        let burst_seconds = PODS_PER_NODE / EXCHANGE_RATE;
        let all_at_once = NODES * EXCHANGE_RATE;
        let batch = (STS_REPORTED_QUOTA / EXCHANGE_RATE).floor();
        let _ = writeln!(
            out,
            "\n- **After a mass restart of the agents** (every cache lost): each agent re-exchanges its \
             {PODS_PER_NODE:.0} pods at `--exchange-rate` ({EXCHANGE_RATE:.0}/s, pods waiting first), \
             {burst_seconds:.1} s per node. All {NODES:.0} at once: {all_at_once:.0} TokenRequests/s and \
             STS calls/s for those seconds, {:.0}× STS's quota and far past what API servers admit \
             ({API_MUTATING_INFLIGHT:.0} mutating requests in flight each); STS throttles (the agent backs \
             off, serves cached credentials where it has them, and answers 503 where it has none, so SDKs \
             retry). A rolling update of the DaemonSet keeps it under the quota with at most {batch:.0} \
             nodes restarting at once at the default rate (`maxUnavailable: {batch:.0}`), about {:.0} min \
             for the fleet, or a lower `--exchange-rate` with a wider batch (rate 2/s: {:.0} nodes at once). \
             The shipped DaemonSet's `maxUnavailable: 10%` is {:.0} nodes here: {:.0} calls/s in each batch's \
             first seconds, {:.1}× the quota; lower it on large clusters.\n",
            all_at_once / STS_REPORTED_QUOTA,
            NODES / batch.max(1.0) * (burst_seconds + 10.0) / 60.0,
            (STS_REPORTED_QUOTA / 2.0).floor(),
            NODES * 0.1,
            NODES * 0.1 * EXCHANGE_RATE,
            NODES * 0.1 * EXCHANGE_RATE / STS_REPORTED_QUOTA,
        );
        let saving = match (
            refresh_period(Duration::from_secs(3600)),
            refresh_period(Duration::from_secs(43200)),
        ) {
            (Some(short), Some(long)) => long.as_secs_f64() / short.as_secs_f64(),
            _ => f64::NAN,
        };
        let _ = writeln!(
            out,
            "Recommended for large clusters (README, \"Large clusters\"): `--session-duration 43200` where \
             the roles allow 12 h sessions ({saving:.1}× fewer steady STS calls and TokenRequests than the \
             default), the default `--exchange-rate`, and a DaemonSet `maxUnavailable` of at most {batch:.0} \
             nodes; roles in several accounts divide STS's load by account.\n"
        );
    }
}
