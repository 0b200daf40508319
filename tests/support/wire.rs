//! What the doubles share on the wire: an HTTP/1.1 accept loop, and `application/x-www-form-urlencoded`
//! decoding (the kube API's query strings, the STS query protocol's form bodies).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;

use hyper::body::{Body, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

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
        let handler = handler.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let answer = handler(request);
                async move { Ok::<_, Infallible>(answer.await) }
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
