//! HTTP plumbing shared by the IMDS and admin endpoints: an accept loop with bounded header reads and a
//! graceful, bounded drain. What each endpoint answers lives in [`imds`] and [`admin`]; how failures
//! become HTTP lives only in [`response`].

pub mod admin;
pub mod connections;
pub mod container;
pub mod document;
pub mod hop_limit;
pub mod imds;
pub mod imds_token;
pub mod refusal_log;
pub mod response;
pub mod route;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use response::Body;

/// The most a request's head (request line and headers) may take in the read buffer of a connection.
pub const MAX_HEAD: usize = 80 * 1024;

/// Histogram buckets of request latency, in seconds, for both credential endpoints.
pub const LATENCY_BUCKETS: [f64; 11] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

/// The most a request's header fields may take, names and values together.
pub const MAX_HEADERS: usize = 16 * 1024;

/// Whether a request's header fields (names and values together) exceed [`MAX_HEADERS`].
pub fn headers_too_large(headers: &http::HeaderMap) -> bool {
    headers.iter().map(|(n, v)| n.as_str().len() + v.len()).sum::<usize>() > MAX_HEADERS
}

/// Serves `handler` on `listener` until `shutdown`, then stops accepting and lets in-flight requests
/// finish for at most `drain`.
pub async fn serve<H, F>(
    listener: TcpListener,
    handler: H,
    limits: connections::Limits,
    shutdown: CancellationToken,
    drain: Duration,
) where
    H: Fn(SocketAddr, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let local = listener.local_addr().ok();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(error) => {
                // Out of file descriptors and similar: back off instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(slot) = limits.admit(peer.ip()) else {
            // Closed before anything is read; counted by the limits.
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        // Each request can ask for this connection's hop limit (IMDSv2 token responses do).
        let hops = hop_limit::HopLimit::default();
        let io = hop_limit::Io::new(stream, hops.clone());
        let service = service_fn(move |mut request: Request<Incoming>| {
            let handler = handler.clone();
            request.extensions_mut().insert(hops.clone());
            async move { Ok::<_, Infallible>(handler(peer, request).await) }
        });
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(5))
            // Room for a target well past the router's limit, so an overlong one is told apart (414)
            // from overlong headers (431, checked by the handler); past this, hyper answers 431.
            .max_buf_size(MAX_HEAD)
            .serve_connection(TokioIo::new(io), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(error) = connection.await {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => tracing::debug!(?local, "drained"),
        () = tokio::time::sleep(drain) => tracing::warn!(?local, ?drain, "drain timed out; closing connections"),
    }
}
