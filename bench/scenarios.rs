//! The measured scenarios, each starting its own doubles and its own agent process so none inherits
//! another's pods, sessions or heap: serving speed against the ceiling, memory by pod count, time to a
//! pod's first credential, upstream load in steady state, and a burst of pods starting at once.
//!
//! Every scenario returns plain numbers; judging them against the targets is `report`'s job. Every loop
//! is bounded by a count and a deadline.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use http::StatusCode;
use imds_broker::credentials::schedule::schedule;

use crate::agent::{Agent, Memory};
use crate::ceiling::Ceiling;
use crate::load::{self, Caller, Mode, Outcome};
use crate::pods::{self, Pod, RoleSource};
use crate::support::kube::{FakeKube, Kind, Traffic};
use crate::support::sts::FakeSts;

/// How big a run is: the full benchmark or the smoke run.
#[derive(Debug, Clone)]
pub struct Sizes {
    pub connections: Vec<usize>,
    pub serving_pods: usize,
    pub warmup: Duration,
    pub measure: Duration,
    pub memory_pods: Vec<usize>,
    pub memory_load: Duration,
    /// The pod count of the extra memory row whose agent never trims its heap (`--heap-trim-interval 0`).
    pub memory_untrimmed: usize,
    /// The agents' `--heap-trim-interval` in the memory rows, and how long after the load the settled
    /// reading waits (one interval and a second).
    pub heap_trim: Duration,
    pub first_credential_pods: usize,
    pub upstream_pods: usize,
    pub upstream_window: Duration,
    pub burst_pods: usize,
    /// Pods on the node in the cluster-size rows.
    pub cluster_pods: usize,
    /// The cluster-size rows: objects elsewhere in the cluster.
    pub cluster_rows: Vec<Elsewhere>,
    /// The quiet window over which bookmark traffic is measured.
    pub bookmark_window: Duration,
}

/// What the rest of the cluster holds in one cluster-size row (none of it used by this node's pods).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elsewhere {
    pub service_accounts: usize,
    /// Whether those service accounts carry the IRSA annotation (all of them) or none.
    pub annotated: bool,
    pub namespaces: usize,
}

const fn elsewhere(service_accounts: usize, annotated: bool, namespaces: usize) -> Elsewhere {
    Elsewhere {
        service_accounts,
        annotated,
        namespaces,
    }
}

impl Sizes {
    /// The published benchmark.
    pub fn full() -> Self {
        Self {
            connections: vec![1, 16, 64, 256],
            serving_pods: 256,
            warmup: Duration::from_secs(1),
            measure: Duration::from_secs(4),
            memory_pods: vec![0, 110, 250, 1000],
            memory_load: Duration::from_secs(3),
            memory_untrimmed: 250,
            heap_trim: Duration::from_secs(10),
            first_credential_pods: 200,
            upstream_pods: 100,
            upstream_window: Duration::from_secs(95),
            burst_pods: 200,
            cluster_pods: 250,
            cluster_rows: vec![
                elsewhere(0, false, 0),
                elsewhere(10_000, false, 0),
                elsewhere(50_000, false, 0),
                elsewhere(50_000, true, 0),
                elsewhere(0, false, 5_000),
            ],
            bookmark_window: Duration::from_secs(5),
        }
    }

    /// A few seconds, to prove the harness works.
    pub fn smoke() -> Self {
        Self {
            connections: vec![1, 4],
            serving_pods: 4,
            warmup: Duration::from_millis(100),
            measure: Duration::from_millis(300),
            memory_pods: vec![0, 5],
            memory_load: Duration::from_millis(300),
            memory_untrimmed: 5,
            heap_trim: Duration::from_secs(1),
            first_credential_pods: 3,
            upstream_pods: 3,
            upstream_window: Duration::from_secs(2),
            burst_pods: 10,
            cluster_pods: 5,
            cluster_rows: vec![
                elsewhere(0, false, 0),
                elsewhere(200, false, 0),
                elsewhere(200, true, 50),
            ],
            bookmark_window: Duration::from_millis(1500),
        }
    }
}

/// The STS latency used where the scenario does not vary it.
pub const STS_LATENCY: Duration = Duration::from_millis(50);

/// A kube double and an STS double that trusts every role.
pub struct Doubles {
    pub kube: FakeKube,
    pub sts: FakeSts,
}

impl Doubles {
    /// Starts both doubles; STS answers after `latency`.
    pub async fn start(latency: Duration) -> Self {
        let kube = FakeKube::start().await;
        let sts = FakeSts::start(&kube.jwks(), &kube.issuer()).await;
        sts.trust_all(true);
        sts.set_latency(latency);
        Self { kube, sts }
    }

    /// Adds `pods` and the service accounts they use.
    pub fn add(&self, pods: &[Pod]) {
        let mut accounts: Vec<(&str, &str)> = pods
            .iter()
            .map(|p| (p.namespace.as_str(), p.service_account.as_str()))
            .collect();
        accounts.sort_unstable();
        accounts.dedup();
        for (namespace, name) in accounts {
            self.kube.upsert_service_account(pods::service_account(namespace, name));
        }
        for pod in pods {
            self.kube.upsert_pod(pod.json());
        }
    }

    /// Starts the agent against these doubles.
    pub async fn agent(&self, name: &str, extra: &[&str]) -> Agent {
        Agent::start(name, &self.kube.url(), &self.sts.url(), extra).await
    }
}

/// Asks every pod for its credentials once, `parallel` at a time; the number of failures.
async fn warm(agent: &Agent, pods: &[Pod], parallel: usize) -> usize {
    stream::iter(pods)
        .map(|p| async move { load::once(agent.imds, p.ip, &p.credentials_path()).await })
        .buffer_unordered(parallel)
        .filter(|r| std::future::ready(!matches!(r, Some((StatusCode::OK, _)))))
        .count()
        .await
}

fn callers(pods: &[Pod]) -> Vec<Caller> {
    pods.iter()
        .map(|p| Caller {
            source: p.ip,
            path: p.credentials_path(),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------------
// Serving speed

/// One (mode, connections) cell: the agent and the ceiling, measured back to back.
#[derive(Debug, Clone)]
pub struct ServingCell {
    pub mode: Mode,
    pub connections: usize,
    pub agent: Outcome,
    pub ceiling: Outcome,
}

/// Serving speed results.
#[derive(Debug, Clone)]
pub struct Serving {
    pub body_len: usize,
    pub pods: usize,
    pub cells: Vec<ServingCell>,
    pub warm_failures: usize,
}

/// Warm cached role-document reads against the agent and the ceiling, at each connection count and in
/// each mode.
pub async fn serving(sizes: &Sizes) -> Serving {
    let doubles = Doubles::start(STS_LATENCY).await;
    let pods = pods::spread("serve", 10, sizes.serving_pods, 8, 4);
    doubles.add(&pods);
    let agent = doubles.agent("serving", &[]).await;
    let warm_failures = warm(&agent, &pods, 32).await;
    let body_len = match load::once(agent.imds, pods[0].ip, &pods[0].credentials_path()).await {
        Some((StatusCode::OK, body)) => body.len(),
        other => panic!("the agent served no role document: {other:?}"),
    };
    let ceiling = Ceiling::start(body_len);
    let callers = callers(&pods);
    let mut cells = Vec::new();
    for mode in [Mode::V1, Mode::V2Amortised, Mode::V2PerRequest] {
        for &connections in &sizes.connections {
            let ceiling = load::run(ceiling.addr, &callers, connections, mode, sizes.warmup, sizes.measure).await;
            let agent = load::run(agent.imds, &callers, connections, mode, sizes.warmup, sizes.measure).await;
            eprintln!(
                "  serving {:<36} {connections:>3} conns: agent {:>8.0}/s p99 {:>7.0?}  ceiling {:>8.0}/s p99 {:>7.0?}",
                mode.label(),
                agent.rate(),
                agent.quantile(0.99),
                ceiling.rate(),
                ceiling.quantile(0.99),
            );
            cells.push(ServingCell {
                mode,
                connections,
                agent,
                ceiling,
            });
        }
    }
    Serving {
        body_len,
        pods: pods.len(),
        cells,
        warm_failures,
    }
}

// ---------------------------------------------------------------------------------------------------
// Memory

/// Memory of one agent process with `pods` pods indexed and cached.
#[derive(Debug, Clone)]
pub struct MemoryRow {
    pub pods: usize,
    pub namespaces: usize,
    pub service_accounts: usize,
    pub idle: Memory,
    /// Whether the agent trims its heap (`--heap-trim-interval`), or never (`0`).
    pub trim: bool,
    /// Idle again, one trim interval and a second after the load.
    pub settled: Memory,
    /// The largest VmRSS sampled while under load.
    pub loaded_rss: u64,
    /// VmHWM after the load.
    pub loaded_hwm: u64,
    pub load_rate: f64,
    pub failures: u64,
}

/// RSS of the agent alone with each pod count, idle and under load.
pub async fn memory(sizes: &Sizes) -> Vec<MemoryRow> {
    let mut rows = Vec::new();
    let runs = sizes
        .memory_pods
        .iter()
        .map(|&count| (count, true))
        .chain([(sizes.memory_untrimmed, false)]);
    let interval = format!("{}ms", sizes.heap_trim.as_millis());
    for (i, (count, trim)) in runs.enumerate() {
        let doubles = Doubles::start(Duration::ZERO).await;
        let (namespaces, accounts) = (10, 5);
        let pods = pods::spread(&format!("mem{count}"), 20 + i as u8, count, namespaces, accounts);
        doubles.add(&pods);
        let flags = ["--heap-trim-interval", if trim { interval.as_str() } else { "0" }];
        let name = format!("memory-{count}{}", if trim { "" } else { "-untrimmed" });
        let agent = doubles.agent(&name, &flags).await;
        let mut failures = warm(&agent, &pods, 32).await as u64;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let idle = agent.memory();
        let (loaded_rss, load_rate) = if pods.is_empty() {
            (idle.rss, 0.0)
        } else {
            let sampler = {
                let pid = agent.pid();
                let until = Instant::now() + sizes.warmup + sizes.memory_load;
                tokio::spawn(async move {
                    let mut max = 0;
                    while Instant::now() < until {
                        max = max.max(rss_of(pid));
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    max
                })
            };
            let outcome = load::run(
                agent.imds,
                &callers(&pods),
                64.min(pods.len().max(4)),
                Mode::V1,
                sizes.warmup,
                sizes.memory_load,
            )
            .await;
            failures += outcome.errors;
            (sampler.await.unwrap_or(0), outcome.rate())
        };
        let after = agent.memory();
        tokio::time::sleep(sizes.heap_trim + Duration::from_secs(1)).await;
        let settled = agent.memory();
        eprintln!(
            "  memory {count:>5} pods{}: idle {:.2} MiB, under load {:.2} MiB, settled {:.2} MiB",
            if trim { "" } else { " (untrimmed)" },
            mib(idle.rss),
            mib(loaded_rss),
            mib(settled.rss)
        );
        rows.push(MemoryRow {
            pods: count,
            namespaces: namespaces.min(count),
            service_accounts: (namespaces * accounts).min(count),
            idle,
            trim,
            settled,
            loaded_rss: loaded_rss.max(after.rss),
            loaded_hwm: after.hwm,
            load_rate,
            failures,
        });
    }
    rows
}

fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// Bytes as MiB.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

// ---------------------------------------------------------------------------------------------------
// Cluster size

/// The kinds the agent lists and watches for its pods' roles and the IMDSv2 policy.
pub const WATCHED: [Kind; 3] = [Kind::Pod, Kind::ServiceAccount, Kind::Namespace];

/// What the API server served the agent, summed over [`WATCHED`] (the Node watch is not counted: one
/// object, whatever the cluster's size).
#[derive(Debug, Clone, Copy, Default)]
pub struct Served {
    pub requests: u64,
    pub bytes: u64,
    /// Of `bytes`, the service-account list's.
    pub service_account_list_bytes: u64,
}

fn served(kube: &FakeKube) -> Served {
    let traffic: Vec<Traffic> = WATCHED.iter().map(|&k| kube.traffic(k)).collect();
    Served {
        requests: traffic.iter().map(|t| t.lists + t.watches).sum(),
        bytes: traffic.iter().map(|t| t.list_bytes + t.watch_bytes).sum(),
        service_account_list_bytes: kube.traffic(Kind::ServiceAccount).list_bytes,
    }
}

impl std::ops::Sub for Served {
    type Output = Served;
    fn sub(self, before: Served) -> Served {
        Served {
            requests: self.requests - before.requests,
            bytes: self.bytes - before.bytes,
            service_account_list_bytes: self.service_account_list_bytes - before.service_account_list_bytes,
        }
    }
}

/// One agent with `cluster_pods` pods on its node and `elsewhere` objects in the rest of the cluster.
#[derive(Debug, Clone)]
pub struct ClusterRow {
    pub pods: usize,
    pub elsewhere: Elsewhere,
    /// Idle, after every pod's session is cached.
    pub idle: Memory,
    /// Idle again after a relist of every watched kind.
    pub after_relist: Memory,
    /// The first lists and watches.
    pub start: Served,
    /// One relist of every watched kind (after 410 Gone): its lists and new watches.
    pub relist: Served,
    /// Watch bytes per second over a quiet window in which every watch gets one bookmark a second.
    pub bookmark_bytes_per_second: f64,
    pub failures: u64,
}

/// RSS and API-server cost of an agent by the size of the rest of the cluster.
pub async fn cluster(sizes: &Sizes) -> Vec<ClusterRow> {
    let mut rows = Vec::new();
    for (i, &elsewhere) in sizes.cluster_rows.iter().enumerate() {
        let doubles = Doubles::start(Duration::ZERO).await;
        let pods = pods::spread(&format!("size{i}"), 70 + i as u8, sizes.cluster_pods, 10, 5);
        doubles.add(&pods);
        for n in 0..elsewhere.service_accounts {
            doubles
                .kube
                .upsert_service_account(pods::elsewhere_service_account(n, elsewhere.annotated));
        }
        for n in 0..elsewhere.namespaces {
            doubles.kube.upsert(Kind::Namespace, pods::elsewhere_namespace(n));
        }
        let name = format!(
            "cluster-{}sa{}-{}ns",
            elsewhere.service_accounts,
            if elsewhere.annotated { "-annotated" } else { "" },
            elsewhere.namespaces
        );
        let agent = doubles.agent(&name, &[]).await;
        let mut failures = warm(&agent, &pods, 32).await as u64;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let idle = agent.memory();
        let start = served(&doubles.kube);

        // A quiet minute compressed: writes elsewhere move the resourceVersion, so each watch gets a
        // bookmark every second and nothing else.
        let window_start = served(&doubles.kube);
        let started = Instant::now();
        while started.elapsed() < sizes.bookmark_window {
            doubles.kube.upsert_node("elsewhere-node", &[]);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let quiet = served(&doubles.kube) - window_start;
        let bookmark_bytes_per_second = quiet.bytes as f64 / started.elapsed().as_secs_f64();

        // What an API server restart costs: every watch gets 410 and every kind is relisted.
        let before = served(&doubles.kube);
        let traffic_before: Vec<Traffic> = WATCHED.iter().map(|&k| doubles.kube.traffic(k)).collect();
        doubles.kube.compact();
        doubles.kube.break_watches();
        // Relisted: for each kind a list, and two watches (the resume that got 410, the new one).
        let relisted = crate::support::client::poll(Duration::from_secs(60), Duration::from_millis(20), || {
            let kube = &doubles.kube;
            let traffic_before = &traffic_before;
            async move {
                WATCHED.iter().zip(traffic_before).all(|(&k, before)| {
                    let now = kube.traffic(k);
                    now.lists > before.lists && now.watches >= before.watches + 2
                })
            }
        })
        .await;
        // Watches start right after their list; the agent serves again once every list is applied.
        failures += warm(&agent, &pods, 32).await as u64;
        if !relisted {
            failures += 1;
        }
        let relist = served(&doubles.kube) - before;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after_relist = agent.memory();
        eprintln!(
            "  cluster {name}: idle {:.2} MiB, after a relist {:.2} MiB; relist {} requests, {} bytes",
            mib(idle.rss),
            mib(after_relist.rss),
            relist.requests,
            relist.bytes
        );
        rows.push(ClusterRow {
            pods: pods.len(),
            elsewhere,
            idle,
            after_relist,
            start,
            relist,
            bookmark_bytes_per_second,
            failures,
        });
    }
    rows
}

// ---------------------------------------------------------------------------------------------------
// First credential

/// The three ways a pod's first credential is obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstCase {
    /// The pod's role is already in use by another pod (same service account).
    KnownRole,
    /// Every pod has a role no pod used before.
    NewRole,
    /// The pod's first request is already waiting when its IP appears in the API.
    RequestFirst,
}

impl FirstCase {
    /// A label for tables.
    pub fn label(self) -> &'static str {
        match self {
            FirstCase::KnownRole => "role already used by another pod",
            FirstCase::NewRole => "a new role per pod",
            FirstCase::RequestFirst => "request arrives before the agent has seen the pod",
        }
    }
}

/// Time to first credential for one (case, STS latency).
#[derive(Debug, Clone)]
pub struct FirstRow {
    pub case: FirstCase,
    pub sts_latency: Duration,
    /// Sorted nanoseconds, one per pod that got a credential.
    pub samples: Vec<u64>,
    pub failures: usize,
    /// Non-200 answers seen while polling (before the first credential).
    pub early_misses: usize,
}

/// First-credential results plus the API-server load they caused.
#[derive(Debug, Clone)]
pub struct First {
    pub rows: Vec<FirstRow>,
    /// Pod events written to the kube double (creations and deletions).
    pub pod_events: usize,
    /// API requests other than TokenRequests while those events were processed.
    pub api_requests: usize,
    pub token_requests: usize,
    pub sts_calls: usize,
    pub pods: usize,
}

/// Polls `path` from `source` until it answers 200; returns when, and how many other answers came
/// first. Gives up after 10 s.
async fn poll_until_served(target: std::net::SocketAddr, source: IpAddr, path: &str) -> (Option<Instant>, usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut misses = 0;
    while Instant::now() < deadline {
        if let Some((StatusCode::OK, _)) = load::once(target, source, path).await {
            return (Some(Instant::now()), misses);
        }
        misses += 1;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    (None, misses)
}

/// The least time between two pods of the first-credential scenario: one slot of the node's exchange
/// budget at the default `--exchange-rate` (20/s).
pub const FIRST_CREDENTIAL_PACE: Duration = Duration::from_millis(50);

/// Time from a pod's IP appearing in the API to its first credential, polled from its own address.
pub async fn first_credential(sizes: &Sizes) -> First {
    let doubles = Doubles::start(Duration::ZERO).await;
    // One pod already holds the shared role, so `KnownRole` pods reuse a role in active use.
    let anchor = pods::spread("first", 30, 1, 1, 1);
    doubles.add(&anchor);
    let agent = Arc::new(doubles.agent("first-credential", &[]).await);
    let _ = warm(&agent, &anchor, 1).await;
    let (requests0, tokens0, calls0) = (
        doubles.kube.request_count(),
        doubles.kube.token_request_count(),
        doubles.sts.calls(),
    );
    let mut rows = Vec::new();
    let mut all = Vec::new();
    let mut block = 31u8;
    for latency in [Duration::ZERO, STS_LATENCY] {
        doubles.sts.set_latency(latency);
        for case in [FirstCase::KnownRole, FirstCase::NewRole, FirstCase::RequestFirst] {
            let mut pods = pods::spread("first", block, sizes.first_credential_pods, 1, 1);
            for pod in &mut pods {
                // Unique names across blocks; same namespace and service account as the anchor.
                pod.name = format!("first-{block}-{}", pod.name);
                pod.uid = format!("first-{block}-{}", pod.uid);
                if case == FirstCase::NewRole {
                    pod.role = RoleSource::Annotation(format!("new-{}", pod.name));
                }
            }
            block += 1;
            let mut samples = Vec::new();
            let (mut failures, mut early_misses) = (0, 0);
            let mut next = Instant::now();
            for pod in &pods {
                // One pod per budget slot (the default --exchange-rate, 20/s): each pod's own latency, not
                // the queue of the pods before it (the burst scenario measures that).
                tokio::time::sleep_until(next.into()).await;
                next = Instant::now() + FIRST_CREDENTIAL_PACE;
                let path = pod.credentials_path();
                let (started, (served, misses)) = if case == FirstCase::RequestFirst {
                    let (imds, ip, path) = (agent.imds, pod.ip, path.clone());
                    let poll = tokio::spawn(async move { poll_until_served(imds, ip, &path).await });
                    // Let the request reach the agent and start waiting for the pod.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    let started = Instant::now();
                    doubles.kube.upsert_pod(pod.json());
                    (started, poll.await.unwrap_or((None, 0)))
                } else {
                    let started = Instant::now();
                    doubles.kube.upsert_pod(pod.json());
                    (started, poll_until_served(agent.imds, pod.ip, &path).await)
                };
                early_misses += misses;
                match served {
                    Some(at) => samples.push(at.saturating_duration_since(started).as_nanos() as u64),
                    None => failures += 1,
                }
            }
            samples.sort_unstable();
            eprintln!(
                "  first credential, STS +{latency:?}, {}: p50 {:?} p99 {:?}",
                case.label(),
                load::quantile(&samples, 0.5),
                load::quantile(&samples, 0.99)
            );
            rows.push(FirstRow {
                case,
                sts_latency: latency,
                samples,
                failures,
                early_misses,
            });
            all.extend(pods);
        }
    }
    for pod in &all {
        doubles.kube.delete_pod(&pod.namespace, &pod.name);
    }
    // Let the deletions reach the agent (it makes no requests for them; this only bounds the count).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let token_requests = doubles.kube.token_request_count() - tokens0;
    First {
        rows,
        pod_events: all.len() * 2,
        api_requests: doubles.kube.request_count() - requests0 - token_requests,
        token_requests,
        sts_calls: doubles.sts.calls() - calls0,
        pods: all.len(),
    }
}

// ---------------------------------------------------------------------------------------------------
// Upstream load

/// Steady-state STS and TokenRequest load, measured with compressed session times.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub pods: usize,
    pub window: Duration,
    pub session: Duration,
    pub min_remaining: Duration,
    pub check_interval: Duration,
    /// The compressed refresh period, from the agent's own `schedule`.
    pub refresh_after: Duration,
    /// The refresh period with the default flags (3600 s sessions, 15 min minimum remaining).
    pub real_refresh_after: Duration,
    pub sts_calls: usize,
    pub token_requests: usize,
    pub api_requests: usize,
    pub reads: usize,
    pub failures: usize,
}

impl Upstream {
    /// Refresh cycles per pod that fit in the window.
    pub fn cycles(&self) -> f64 {
        self.window.as_secs_f64() / self.refresh_after.as_secs_f64()
    }

    /// STS calls per pod per refresh cycle (one is ideal).
    pub fn sts_per_cycle(&self) -> f64 {
        self.sts_calls as f64 / self.pods as f64 / self.cycles()
    }

    /// TokenRequests per pod per refresh cycle.
    pub fn tokens_per_cycle(&self) -> f64 {
        self.token_requests as f64 / self.pods as f64 / self.cycles()
    }

    /// Scales a per-cycle count to a pod-hour with the default flags.
    pub fn per_pod_hour(&self, per_cycle: f64) -> f64 {
        per_cycle * 3600.0 / self.real_refresh_after.as_secs_f64()
    }
}

/// Runs pods that read their credentials every 5 s for a window much longer than the compressed
/// refresh period, and counts what reached STS and the API server.
pub async fn upstream(sizes: &Sizes) -> Upstream {
    let session = Duration::from_secs(3600);
    let min_remaining = Duration::from_secs(3540);
    let check_interval = Duration::from_secs(1);
    // Refreshes are jittered over the last fifth of their span; 0.5 is the mean.
    let refresh_after = schedule(session, min_remaining, Duration::from_secs(300), 0.5)
        .expect("a servable session")
        .refresh_after;
    let real_refresh_after = schedule(session, Duration::from_secs(900), Duration::from_secs(300), 0.5)
        .expect("a servable session")
        .refresh_after;
    let doubles = Doubles::start(STS_LATENCY).await;
    let pods = pods::spread("up", 40, sizes.upstream_pods, 4, 5);
    doubles.add(&pods);
    let agent = doubles
        .agent(
            "upstream",
            &[
                "--session-duration",
                "3600",
                "--credential-min-remaining",
                "3540s",
                "--refresh-check-interval",
                "1s",
            ],
        )
        .await;
    let mut failures = warm(&agent, &pods, 32).await;
    let (requests0, tokens0, calls0) = (
        doubles.kube.request_count(),
        doubles.kube.token_request_count(),
        doubles.sts.calls(),
    );
    let started = Instant::now();
    let end = started + sizes.upstream_window;
    let readers: Vec<_> = pods
        .iter()
        .enumerate()
        .map(|(i, pod)| {
            let (imds, ip, path) = (agent.imds, pod.ip, pod.credentials_path());
            // Spread the pods' reads over the 5 s period.
            let offset = Duration::from_millis((i as u64 * 5000) / pods.len().max(1) as u64);
            tokio::spawn(async move {
                let (mut reads, mut failures) = (0, 0);
                tokio::time::sleep(offset).await;
                while Instant::now() < end {
                    match load::once(imds, ip, &path).await {
                        Some((StatusCode::OK, _)) => reads += 1,
                        _ => failures += 1,
                    }
                    tokio::time::sleep(Duration::from_secs(5).min(end.saturating_duration_since(Instant::now()))).await;
                }
                (reads, failures)
            })
        })
        .collect();
    let mut reads = 0;
    for reader in readers {
        let (r, f) = reader.await.unwrap_or((0, 1));
        reads += r;
        failures += f;
    }
    let window = started.elapsed();
    let token_requests = doubles.kube.token_request_count() - tokens0;
    let result = Upstream {
        pods: pods.len(),
        window,
        session,
        min_remaining,
        check_interval,
        refresh_after,
        real_refresh_after,
        sts_calls: doubles.sts.calls() - calls0,
        token_requests,
        api_requests: doubles.kube.request_count() - requests0 - token_requests,
        reads,
        failures,
    };
    eprintln!(
        "  upstream: {} STS calls, {} TokenRequests for {} pods over {:?}",
        result.sts_calls, result.token_requests, result.pods, result.window
    );
    result
}

// ---------------------------------------------------------------------------------------------------
// Burst

/// A Job's pods all starting at once.
#[derive(Debug, Clone)]
pub struct Burst {
    pub sts_latency: Duration,
    pub pods: usize,
    pub samples: Vec<u64>,
    pub failures: usize,
    pub early_misses: usize,
    pub sts_calls: usize,
    pub token_requests: usize,
}

/// Creates `burst_pods` pods (one service account, one role, as a Job's pods are) in one go, each
/// polling for its credentials as soon as its IP is in the API.
pub async fn burst(sizes: &Sizes) -> Vec<Burst> {
    let mut results = Vec::new();
    for (i, latency) in [Duration::ZERO, STS_LATENCY].into_iter().enumerate() {
        let doubles = Doubles::start(latency).await;
        let agent = doubles.agent(&format!("burst-{}", latency.as_millis()), &[]).await;
        let pods = pods::spread(&format!("job{i}"), 50 + i as u8, sizes.burst_pods, 1, 1);
        doubles
            .kube
            .upsert_service_account(pods::service_account(&pods[0].namespace, &pods[0].service_account));
        let (tokens0, calls0) = (doubles.kube.token_request_count(), doubles.sts.calls());
        let mut pollers = Vec::new();
        for pod in &pods {
            let started = Instant::now();
            doubles.kube.upsert_pod(pod.json());
            let (imds, ip, path) = (agent.imds, pod.ip, pod.credentials_path());
            pollers.push(tokio::spawn(async move {
                let (served, misses) = poll_until_served(imds, ip, &path).await;
                (served.map(|at| at.saturating_duration_since(started)), misses)
            }));
        }
        let (mut samples, mut failures, mut early_misses) = (Vec::new(), 0, 0);
        for poller in pollers {
            match poller.await {
                Ok((Some(took), misses)) => {
                    samples.push(took.as_nanos() as u64);
                    early_misses += misses;
                }
                Ok((None, misses)) => {
                    failures += 1;
                    early_misses += misses;
                }
                Err(_) => failures += 1,
            }
        }
        samples.sort_unstable();
        // Prefetches still in flight when the last pod was served count too.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let result = Burst {
            sts_latency: latency,
            pods: pods.len(),
            samples,
            failures,
            early_misses,
            sts_calls: doubles.sts.calls() - calls0,
            token_requests: doubles.kube.token_request_count() - tokens0,
        };
        eprintln!(
            "  burst of {} pods, STS +{latency:?}: p99 {:?}, {} STS calls, {} failures",
            result.pods,
            load::quantile(&result.samples, 0.99),
            result.sts_calls,
            result.failures
        );
        results.push(result);
    }
    results
}

// ---------------------------------------------------------------------------------------------------
// Profile

/// Serves IMDSv1 reads at `connections` for `seconds` while `perf record` samples the agent process
/// (when `perf` is installed); writes `target/bench-logs/perf.data`. Not part of the report.
pub async fn profile(connections: usize, seconds: u64) {
    let doubles = Doubles::start(STS_LATENCY).await;
    let pods = pods::spread("prof", 60, 256, 8, 4);
    doubles.add(&pods);
    let agent = doubles.agent("profile", &[]).await;
    let _ = warm(&agent, &pods, 32).await;
    let data = agent.log.with_file_name("perf.data");
    let perf = std::process::Command::new("perf")
        .args(["record", "-F", "1999", "-g", "-o"])
        .arg(&data)
        .args(["-p", &agent.pid().to_string(), "--", "sleep", &seconds.to_string()])
        .stdout(std::process::Stdio::null())
        .spawn();
    let outcome = load::run(
        agent.imds,
        &callers(&pods),
        connections,
        Mode::V1,
        Duration::from_millis(500),
        Duration::from_secs(seconds),
    )
    .await;
    eprintln!(
        "  profile: {:.0} req/s at {connections} connections; agent pid {}",
        outcome.rate(),
        agent.pid()
    );
    match perf {
        Ok(mut child) => {
            let _ = child.wait();
            eprintln!("  perf data in {}", data.display());
        }
        Err(error) => eprintln!("  perf not available ({error}); no profile recorded"),
    }
}
