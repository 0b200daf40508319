//! What the doubles share on the wire: an HTTP/1.1 accept loop (which can also reset a connection
//! instead of answering, see [`Reset`]), and `application/x-www-form-urlencoded` decoding (the kube
//! API's query strings, the STS query protocol's form bodies).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use hyper::body::{Body, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A response extension: [`serve`] sends nothing for a response carrying it and aborts the connection
/// with a TCP RST instead, as a crashed server or a load balancer dropping its backends does.
#[derive(Debug, Clone, Copy)]
pub struct Reset;

/// The error hyper gets for a [`Reset`] response, so that it drops the connection without writing.
#[derive(Debug)]
struct ResetConnection;

impl std::fmt::Display for ResetConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection reset by the test double")
    }
}

impl std::error::Error for ResetConnection {}

/// Serves `handler` on every connection `listener` accepts, until `shutdown` (when given) turns true.
pub async fn serve<H, F, B>(listener: TcpListener, shutdown: Option<watch::Receiver<bool>>, handler: H)
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        // As Go's net/http does: without it a small write (a watch event, the end of a stream) can wait
        // ~40 ms for a delayed ACK, which a paused tokio clock turns into a jump to its next timer.
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let stream = Abortable {
                stream,
                abort: Arc::new(AtomicBool::new(false)),
            };
            let abort = stream.abort.clone();
            let service = service_fn(move |request| {
                let answer = handler(request);
                let abort = abort.clone();
                async move {
                    let answer = answer.await;
                    if answer.extensions().get::<Reset>().is_some() {
                        abort.store(true, Ordering::SeqCst);
                        return Err(ResetConnection);
                    }
                    Ok(answer)
                }
            });
            let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            match shutdown.as_mut() {
                Some(shutdown) => {
                    tokio::select! {
                        _ = connection => {}
                        _ = shutdown.wait_for(|s| *s) => {}
                    }
                }
                None => {
                    let _ = connection.await;
                }
            }
        });
    }
}

/// A connection that closes with RST instead of FIN once `abort` is set.
struct Abortable {
    stream: TcpStream,
    abort: Arc<AtomicBool>,
}

impl Drop for Abortable {
    fn drop(&mut self) {
        if self.abort.load(Ordering::SeqCst) {
            let _ = self.stream.set_zero_linger();
        }
    }
}

impl AsyncRead for Abortable {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Abortable {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Decodes `a=1&b=x%20y` into pairs; a key without `=` gets an empty value, `+` is a space.
pub fn parse(form: &str) -> HashMap<String, String> {
    form.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
