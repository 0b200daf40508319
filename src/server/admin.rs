//! The admin endpoint, on its own port: `/healthz` (the process serves), `/readyz` (the pod index is
//! synced, the first prefetch attempted and, with `--iptables`, the capture rule in place) and
//! `/metrics` (Prometheus text format, with `imds_broker_ready` taken from what `/readyz` would say).

use http::{Response, StatusCode, header};
use prometheus::{IntGauge, Registry};
use tokio::sync::watch;

use super::response::Body;

/// Admin metrics.
#[derive(Clone)]
pub struct Metrics {
    ready: IntGauge,
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let ready = IntGauge::new(
            "imds_broker_ready",
            "1 while /readyz answers 200 (views complete, first prefetch attempted, capture in place), else 0",
        )?;
        registry.register(Box::new(ready.clone()))?;
        Ok(Self { ready })
    }
}

/// The admin request handler.
pub struct Handler {
    /// Every metric of the agent.
    pub registry: Registry,
    /// Ready when every one of these is true (the pod index and prefetch; the capture rule, if managed).
    pub ready: Vec<watch::Receiver<bool>>,
    /// The readiness gauge.
    pub metrics: Metrics,
}

impl Handler {
    /// Answers one request for `path`.
    pub fn handle(&self, path: &str) -> Response<Body> {
        match path {
            "/healthz" => plain(StatusCode::OK, "ok\n".to_owned()),
            "/readyz" if self.is_ready() => plain(StatusCode::OK, "ready\n".to_owned()),
            "/readyz" => plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: pod index not synced, or capture rule not installed\n".to_owned(),
            ),
            "/metrics" => {
                self.metrics.ready.set(i64::from(self.is_ready()));
                let mut response = plain(StatusCode::OK, crate::metrics::encode(&self.registry));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static(prometheus::TEXT_FORMAT),
                );
                response
            }
            _ => plain(StatusCode::NOT_FOUND, "not found\n".to_owned()),
        }
    }

    fn is_ready(&self) -> bool {
        self.ready.iter().all(|r| *r.borrow())
    }
}

fn plain(status: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
