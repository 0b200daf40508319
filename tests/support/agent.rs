//! `spawn_agent()`: the real agent, in-process, on port 0, against the doubles; and clients that call
//! it from a chosen loopback source address, the way a pod with that IP would.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use imds_broker::app::App;
use imds_broker::config::{Cli, Config};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The node name every test pod is scheduled on.
pub const NODE: &str = "node-1";

/// A running agent.
pub struct Agent {
    pub imds: SocketAddr,
    pub admin: SocketAddr,
    shutdown: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

/// Parses agent flags the way the binary does, plus `extra`.
pub fn config(sts_url: &str, extra: &[&str]) -> Config {
    let mut argv = vec!["imds-broker", "--node-name", NODE];
    // A test that names its own region (or `--region ""`: none, from the Node's label) gets it instead.
    if !extra.contains(&"--region") {
        argv.extend(["--region", "us-east-1"]);
    }
    argv.extend([
        "--sts-endpoint",
        sts_url,
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--base-role-arn",
        "arn:aws:iam::111111111111:role/",
    ]);
    argv.extend_from_slice(extra);
    Cli::try_parse_from(argv)
        .expect("valid test flags")
        .run
        .config()
        .expect("valid test config")
}

/// Starts the agent against the kube double at `kube_url` and waits until it is ready.
pub async fn spawn_agent(kube_url: &str, sts_url: &str, extra: &[&str]) -> Agent {
    let agent = start_agent(kube_url, sts_url, extra).await;
    agent.wait_ready().await;
    agent
}

/// Starts the agent without waiting for anything: it may not have listed a single pod yet.
pub async fn start_agent(kube_url: &str, sts_url: &str, extra: &[&str]) -> Agent {
    let config = config(sts_url, extra);
    let client =
        imds_broker::app::kube_client(kube::Config::new(kube_url.parse().expect("kube url"))).expect("kube client");
    let app = App::build(config, client).await.expect("agent builds");
    let (imds, admin) = (app.imds_addr(), app.admin_addr());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(app.run(shutdown.clone()));
    Agent {
        imds,
        admin,
        shutdown,
        task: Some(task),
    }
}

impl Agent {
    /// Waits (bounded) until `/readyz` answers 200.
    pub async fn wait_ready(&self) {
        eventually("agent ready", || async {
            admin_get(self.admin, "/readyz").await.0 == StatusCode::OK
        })
        .await;
    }

    /// The IMDS base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.imds)
    }

    /// A client calling from `source`.
    pub fn from(&self, source: &str) -> Caller {
        Caller {
            target: self.imds,
            source: source.parse().expect("source ip"),
        }
    }

    /// The text of `/metrics`.
    pub async fn metrics(&self) -> String {
        admin_get(self.admin, "/metrics").await.1
    }

    /// Starts the shutdown (as SIGTERM does) without waiting for it.
    pub fn begin_stop(&self) {
        self.shutdown.cancel();
    }

    /// Whether `/readyz` answers 200 now.
    pub async fn is_ready(&self) -> bool {
        admin_get(self.admin, "/readyz").await.0 == StatusCode::OK
    }

    /// The value of one unlabelled sample (or the sum of a labelled family's samples matching
    /// `labels`, e.g. `cause="gone"`) in `/metrics`.
    pub async fn metric(&self, name: &str, labels: &str) -> f64 {
        parse_metric(&self.metrics().await, name, labels)
    }

    /// Asks `path` from `source` every 100 ms until it answers 200, failing the test after `limit`;
    /// returns every status seen before and the 200's body. Meant for paused time.
    pub async fn until_ok(&self, source: &str, path: &str, limit: Duration) -> (Vec<StatusCode>, String) {
        let caller = self.from(source);
        let seen = std::sync::Mutex::new((Vec::new(), None));
        let answered = super::client::poll(limit, Duration::from_millis(100), || {
            let seen = &seen;
            async move {
                let reply = caller.get(path, &[]).await;
                let mut seen = seen.lock().unwrap();
                if reply.status == StatusCode::OK {
                    seen.1 = Some(reply.text());
                    return true;
                }
                seen.0.push(reply.status);
                false
            }
        })
        .await;
        let (before, body) = seen.into_inner().unwrap();
        assert!(answered, "{path} from {source}: no 200 within {limit:?}: {before:?}");
        (before, body.unwrap_or_default())
    }

    /// Stops the agent and waits for it to drain.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("agent stops within 10s")
                .expect("agent task")
                .expect("agent run");
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Sums the samples of `name` whose label set contains every `k="v"` of `labels` (comma-separated).
pub fn parse_metric(text: &str, name: &str, labels: &str) -> f64 {
    let wanted: Vec<&str> = labels.split(',').filter(|l| !l.is_empty()).collect();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, set) = match series.split_once('{') {
                Some((metric, set)) => (metric, set.trim_end_matches('}')),
                None => (series, ""),
            };
            let matches = metric == name && wanted.iter().all(|w| set.split(',').any(|l| l == *w));
            matches.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// Polls `check` every 20 ms until it holds, failing the test after 10 s.
pub async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let held = super::client::poll(Duration::from_secs(10), Duration::from_millis(20), check).await;
    assert!(held, "timed out waiting for: {what}");
}

async fn admin_get(admin: SocketAddr, path: &str) -> (StatusCode, String) {
    let reply = send(admin, "127.0.0.1".parse().unwrap(), Method::GET, path, &[]).await;
    (reply.status, reply.text())
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

/// Calls the agent from one source address, like a pod.
#[derive(Clone, Copy)]
pub struct Caller {
    pub target: SocketAddr,
    pub source: IpAddr,
}

impl Caller {
    /// GET `path` with `headers`.
    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        send(self.target, self.source, Method::GET, path, headers).await
    }

    /// Any method.
    pub async fn request(&self, method: Method, path: &str, headers: &[(&str, &str)]) -> Reply {
        send(self.target, self.source, method, path, headers).await
    }

    /// An IMDSv2 token with the given TTL header value.
    pub async fn token(&self, ttl: &str) -> Reply {
        send(
            self.target,
            self.source,
            Method::PUT,
            "/latest/api/token",
            &[("x-aws-ec2-metadata-token-ttl-seconds", ttl)],
        )
        .await
    }
}

/// Sends one request over a fresh connection bound to `source`, with `Host: 169.254.169.254` unless
/// `headers` name another.
pub async fn send(target: SocketAddr, source: IpAddr, method: Method, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut sender = super::client::connect(target, source, Duration::from_secs(5))
        .await
        .expect("connect");
    let mut request = Request::builder().method(method).uri(path);
    if !headers.iter().any(|(name, _)| name.eq_ignore_ascii_case("host")) {
        request = request.header("host", "169.254.169.254");
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        sender.send_request(request.body(Full::new(Bytes::new())).expect("request")),
    )
    .await
    .expect("answer in time")
    .expect("response");
    let (parts, body) = response.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.expect("body").to_bytes(),
    }
}

pub mod sdk {
    //! An HTTP client for the AWS Rust SDK that connects from a chosen source address, so the real
    //! `aws-config` IMDS provider can act as a particular pod on loopback.

    use std::net::{IpAddr, SocketAddr};

    use aws_smithy_runtime_api::client::http::{
        HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpConnector,
    };
    use aws_smithy_runtime_api::client::orchestrator::HttpRequest;
    use aws_smithy_runtime_api::client::result::ConnectorError;
    use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
    use aws_smithy_runtime_api::http::Response;
    use aws_smithy_types::body::SdkBody;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};

    /// Sends every request from `0`.
    #[derive(Debug, Clone, Copy)]
    pub struct FromAddress(pub IpAddr);

    impl HttpConnector for FromAddress {
        fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
            let source = self.0;
            HttpConnectorFuture::new(async move {
                let io = |e: Box<dyn std::error::Error + Send + Sync>| ConnectorError::io(e);
                let request = request.try_into_http1x().map_err(|e| ConnectorError::user(e.into()))?;
                let uri = request.uri().clone();
                let host: IpAddr = uri
                    .host()
                    .unwrap_or_default()
                    .trim_matches(['[', ']'])
                    .parse()
                    .map_err(|e: std::net::AddrParseError| ConnectorError::user(e.into()))?;
                let target = SocketAddr::new(host, uri.port_u16().unwrap_or(80));
                let mut sender = crate::support::client::connect(target, source, std::time::Duration::from_secs(5))
                    .await
                    .map_err(|e| io(e.into()))?;
                let (mut parts, body) = request.into_parts();
                parts.uri = uri.path_and_query().map_or("/", |p| p.as_str()).parse().expect("path");
                let body = Bytes::copy_from_slice(body.bytes().unwrap_or_default());
                let response = sender
                    .send_request(http::Request::from_parts(parts, Full::new(body)))
                    .await
                    .map_err(|e| io(e.into()))?;
                let (parts, body) = response.into_parts();
                let bytes = body.collect().await.map_err(|e| io(e.into()))?.to_bytes();
                Response::try_from(http::Response::from_parts(parts, SdkBody::from(bytes)))
                    .map_err(|e| ConnectorError::other(e.into(), None))
            })
        }
    }

    impl HttpClient for FromAddress {
        fn http_connector(&self, _: &HttpConnectorSettings, _: &RuntimeComponents) -> SharedHttpConnector {
            SharedHttpConnector::new(*self)
        }
    }
}
