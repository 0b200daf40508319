//! The admin endpoint, on its own port: `/healthz` (the process serves), `/readyz` (the pod index is
//! synced, the first prefetch attempted and, with `--iptables`, the capture rule in place) and
//! `/metrics` (Prometheus text format).

use http::{Response, StatusCode, header};
use prometheus::Registry;
use tokio::sync::watch;

use super::response::Body;

/// The admin request handler.
pub struct Handler {
    /// Every metric of the agent.
    pub registry: Registry,
    /// Ready when every one of these is true (the pod index and prefetch; the capture rule, if managed).
    pub ready: Vec<watch::Receiver<bool>>,
}

impl Handler {
    /// Answers one request for `path`.
    pub fn handle(&self, path: &str) -> Response<Body> {
        match path {
            "/healthz" => plain(StatusCode::OK, "ok\n".to_owned()),
            "/readyz" if self.ready.iter().all(|r| *r.borrow()) => plain(StatusCode::OK, "ready\n".to_owned()),
            "/readyz" => plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: pod index not synced, or capture rule not installed\n".to_owned(),
            ),
            "/metrics" => {
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
