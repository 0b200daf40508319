//! The load generator: keep-alive HTTP/1.1 connections, each bound to a simulated pod's loopback source
//! address, sending one request at a time (no pipelining) for a fixed time, recording every latency.
//!
//! Owns the request shapes measured (IMDSv1, IMDSv2 with the token fetched once per connection, IMDSv2
//! with a token fetched before every read) and the latency statistics. It does not start servers.
//! Every loop is bounded by a deadline, and every wait by a timeout.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;

/// The longest any single connect or request may take before the connection counts as failed.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// How a simulated pod asks for its credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A plain `GET`, no token.
    V1,
    /// `PUT /latest/api/token` once per connection, then `GET`s carrying that token.
    V2Amortised,
    /// A `PUT` for a fresh token before every `GET`; one measured request is the pair.
    V2PerRequest,
}

impl Mode {
    /// A short label for tables.
    pub fn label(self) -> &'static str {
        match self {
            Mode::V1 => "IMDSv1",
            Mode::V2Amortised => "IMDSv2, token once per connection",
            Mode::V2PerRequest => "IMDSv2, token PUT before every GET",
        }
    }
}

/// One connection's caller: its source address and the path it reads.
#[derive(Debug, Clone)]
pub struct Caller {
    pub source: IpAddr,
    pub path: String,
}

/// What a load run produced.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    /// Measured requests completed with 200 inside the measurement window.
    pub ok: u64,
    /// Requests answered with anything but 200, or that failed or timed out (whole run).
    pub errors: u64,
    /// Latencies of the measured requests, in nanoseconds, sorted.
    pub latencies: Vec<u64>,
    /// Length of the measurement window.
    pub window: Duration,
}

impl Outcome {
    /// Requests per second over the measurement window.
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.window.as_secs_f64().max(1e-9)
    }

    /// The latency at quantile `q` (nearest rank), or zero when nothing was measured.
    pub fn quantile(&self, q: f64) -> Duration {
        quantile(&self.latencies, q)
    }

    /// The slowest measured request.
    pub fn max(&self) -> Duration {
        Duration::from_nanos(self.latencies.last().copied().unwrap_or(0))
    }
}

/// Nearest-rank quantile of sorted nanosecond samples.
pub fn quantile(sorted: &[u64], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Duration::from_nanos(sorted[rank - 1])
}

/// Runs `connections` keep-alive connections against `target` for `warmup + measure`, connection `i`
/// acting as `callers[i % callers.len()]`. Only requests that start after the warm-up are measured.
pub async fn run(
    target: SocketAddr,
    callers: &[Caller],
    connections: usize,
    mode: Mode,
    warmup: Duration,
    measure: Duration,
) -> Outcome {
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + measure;
    let tasks: Vec<_> = (0..connections)
        .map(|i| {
            let caller = callers[i % callers.len()].clone();
            tokio::spawn(connection(target, caller, mode, measure_from, end))
        })
        .collect();
    let mut outcome = Outcome {
        window: measure,
        ..Outcome::default()
    };
    for task in tasks {
        match tokio::time::timeout_at((end + STEP_TIMEOUT * 3).into(), task).await {
            Ok(Ok(one)) => {
                outcome.ok += one.ok;
                outcome.errors += one.errors;
                outcome.latencies.extend(one.latencies);
            }
            _ => outcome.errors += 1,
        }
    }
    outcome.latencies.sort_unstable();
    outcome
}

async fn connection(target: SocketAddr, caller: Caller, mode: Mode, measure_from: Instant, end: Instant) -> Outcome {
    let mut outcome = Outcome::default();
    let Ok(mut sender) = connect(target, caller.source).await else {
        outcome.errors += 1;
        return outcome;
    };
    let mut token = None;
    if mode == Mode::V2Amortised {
        match fetch_token(&mut sender).await {
            Some(t) => token = Some(t),
            None => {
                outcome.errors += 1;
                return outcome;
            }
        }
    }
    while Instant::now() < end {
        let started = Instant::now();
        if mode == Mode::V2PerRequest {
            token = fetch_token(&mut sender).await;
            if token.is_none() {
                outcome.errors += 1;
                return outcome;
            }
        }
        match get(&mut sender, &caller.path, token.as_deref()).await {
            Some(StatusCode::OK) => {
                let elapsed = started.elapsed();
                if started >= measure_from && Instant::now() <= end {
                    outcome.ok += 1;
                    outcome.latencies.push(elapsed.as_nanos() as u64);
                }
            }
            Some(_) => outcome.errors += 1,
            None => {
                outcome.errors += 1;
                return outcome;
            }
        }
    }
    outcome
}

/// Opens a keep-alive HTTP/1.1 connection to `target` from `source`.
pub async fn connect(target: SocketAddr, source: IpAddr) -> std::io::Result<SendRequest<Empty<Bytes>>> {
    crate::support::client::connect(target, source, STEP_TIMEOUT).await
}

/// `GET path` on an open connection; the status once the whole body has arrived, `None` on failure.
pub async fn get(sender: &mut SendRequest<Empty<Bytes>>, path: &str, token: Option<&str>) -> Option<StatusCode> {
    let mut request = Request::builder()
        .method(Method::GET)
        .uri(path)
        .header("host", "169.254.169.254");
    if let Some(token) = token {
        request = request.header("x-aws-ec2-metadata-token", token);
    }
    send(sender, request.body(Empty::new()).ok()?)
        .await
        .map(|(status, _)| status)
}

/// `PUT /latest/api/token` on an open connection; the token, `None` on failure.
pub async fn fetch_token(sender: &mut SendRequest<Empty<Bytes>>) -> Option<String> {
    let request = Request::builder()
        .method(Method::PUT)
        .uri("/latest/api/token")
        .header("host", "169.254.169.254")
        .header("x-aws-ec2-metadata-token-ttl-seconds", "21600")
        .body(Empty::new())
        .ok()?;
    match send(sender, request).await? {
        (StatusCode::OK, body) => String::from_utf8(body.to_vec()).ok(),
        _ => None,
    }
}

async fn send(sender: &mut SendRequest<Empty<Bytes>>, request: Request<Empty<Bytes>>) -> Option<(StatusCode, Bytes)> {
    let exchange = async {
        sender.ready().await.ok()?;
        let response = sender.send_request(request).await.ok()?;
        let status = response.status();
        let body = response.into_body().collect().await.ok()?.to_bytes();
        Some((status, body))
    };
    tokio::time::timeout(STEP_TIMEOUT, exchange).await.ok().flatten()
}

/// One request on a fresh connection from `source`: the status and body, `None` on failure.
pub async fn once(target: SocketAddr, source: IpAddr, path: &str) -> Option<(StatusCode, Bytes)> {
    let mut sender = connect(target, source).await.ok()?;
    let request = Request::builder()
        .method(Method::GET)
        .uri(path)
        .header("host", "169.254.169.254")
        .body(Empty::new())
        .ok()?;
    send(&mut sender, request).await
}
