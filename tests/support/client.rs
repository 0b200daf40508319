//! The one small HTTP/1 client of the tests and the benchmarks: a connection from a chosen source
//! address (the way a pod with that IP calls the agent), and bounded polling. Callers choose how to
//! treat failures; nothing here panics.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hyper::body::Body;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpSocket;

/// An HTTP/1 connection to `target` from `source` (a loopback or test-namespace address), connected
/// within `within`; the connection is driven by a task of its own.
pub async fn connect<B>(target: SocketAddr, source: IpAddr, within: Duration) -> std::io::Result<SendRequest<B>>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let socket = if source.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }?;
    socket.bind(SocketAddr::new(source, 0))?;
    let stream = tokio::time::timeout(within, socket.connect(target))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    stream.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(connection);
    Ok(sender)
}

/// Calls `check` every `every` until it holds (true) or `within` has passed (false). Tokio's clock, so
/// paused-time tests wait nothing.
pub async fn poll<F, Fut>(within: Duration, every: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(every).await;
    }
}
