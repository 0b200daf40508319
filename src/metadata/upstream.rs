//! The EC2-mode metadata source: an HTTP/1 client for the node's real IMDS, with the agent's own
//! `upstream_token` (its IMDSv2 token at that IMDS) and a short cache of answers.
//!
//! It does not decide what is served: [`Rules`] does, and it is asked before anything is fetched or
//! cached. It does not map failures to HTTP statuses either ([`UpstreamError`] goes to
//! `server::response`).
//!
//! Invariants: the upstream is only ever asked for `/latest/<canonical path>` (the router has already
//! refused anything else), with no query and no caller header. One `upstream_token` is held at a time
//! and replaced before it expires, or at once when the upstream refuses it. Listings are filtered
//! before they are cached, so the cache only ever holds what may be served.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::rules::{IAM_ENTRY, ROOT, Rules};
use super::{Error, UpstreamError};

/// How long one upstream exchange may take (IMDS is link-local and answers in milliseconds).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// The `upstream_token` TTL asked of the upstream IMDS, and how long before its end it is replaced.
const UPSTREAM_TOKEN_TTL: Duration = Duration::from_secs(21_600);
const UPSTREAM_TOKEN_MARGIN: Duration = Duration::from_secs(300);

/// How long an upstream answer is reused. Metadata SDKs read is static for the instance's life; a
/// short cache keeps a node full of pods well under the IMDS per-instance rate limit.
const CACHE_TTL: Duration = Duration::from_secs(60);

/// The `upstream_token` the agent holds, and when to replace it.
struct Held {
    value: String,
    refresh_at: Instant,
}

/// When an `upstream_token` fetched at `fetched` with `ttl` must be replaced.
pub fn refresh_at(fetched: Instant, ttl: Duration) -> Instant {
    fetched + ttl.saturating_sub(UPSTREAM_TOKEN_MARGIN).max(ttl / 2)
}

/// EC2 mode: allowed paths fetched from the node's IMDS with an `upstream_token` the agent holds.
pub struct Upstream {
    addr: SocketAddr,
    rules: Rules,
    timeout: Duration,
    upstream_token: Mutex<Option<Held>>,
    cache: moka::future::Cache<String, Arc<str>>,
}

impl Upstream {
    /// An upstream at `addr`.
    pub fn new(addr: SocketAddr, rules: Rules, timeout: Duration) -> Self {
        Self {
            addr,
            rules,
            timeout,
            upstream_token: Mutex::new(None),
            cache: moka::future::Cache::builder()
                .max_capacity(512)
                .time_to_live(CACHE_TTL)
                .build(),
        }
    }

    /// The answer for `path` (relative to `/latest/`, no trailing slash), if the rules serve it.
    pub(super) async fn get(&self, path: &str) -> Result<String, Error> {
        let directory = self.rules.is_directory(path);
        let served = if path.is_empty() {
            true
        } else if directory {
            self.rules.shows_directory(path)
        } else {
            self.rules.allows(path)
        };
        if !served {
            return Err(Error::NotFound);
        }
        if path.is_empty() {
            return Ok(ROOT.to_owned());
        }
        if let Some(hit) = self.cache.get(path).await {
            return Ok(hit.to_string());
        }
        let answer = if directory {
            let listing = self.fetch(&format!("/latest/{path}/")).await?;
            let mut entries = self.rules.filter(path, &listing);
            if path == "meta-data" {
                entries.push(IAM_ENTRY.to_owned());
                entries.sort();
                entries.dedup();
            }
            entries.join("\n")
        } else {
            self.fetch(&format!("/latest/{path}")).await?
        };
        self.cache.insert(path.to_owned(), Arc::from(answer.as_str())).await;
        Ok(answer)
    }

    /// GETs `target` with the held `upstream_token`, fetching a new one once if upstream says 401.
    async fn fetch(&self, target: &str) -> Result<String, Error> {
        let upstream_token = self.upstream_token(None).await?;
        let (mut status, mut body) = self
            .send(Method::GET, target, ("x-aws-ec2-metadata-token", &upstream_token))
            .await?;
        if status == StatusCode::UNAUTHORIZED {
            let fresh = self.upstream_token(Some(&upstream_token)).await?;
            (status, body) = self
                .send(Method::GET, target, ("x-aws-ec2-metadata-token", &fresh))
                .await?;
        }
        match status {
            StatusCode::OK => String::from_utf8(body.to_vec()).map_err(|_| UpstreamError::NotText.into()),
            StatusCode::NOT_FOUND => Err(Error::NotFound),
            other => Err(UpstreamError::Status(other).into()),
        }
    }

    /// The held `upstream_token`, or a new one if none is held, it is due, or it is `stale` (refused
    /// upstream).
    pub(super) async fn upstream_token(&self, stale: Option<&str>) -> Result<String, UpstreamError> {
        let mut held = self.upstream_token.lock().await;
        if let Some(h) = held.as_ref()
            && Instant::now() < h.refresh_at
            && Some(h.value.as_str()) != stale
        {
            return Ok(h.value.clone());
        }
        let fetched = Instant::now();
        let ttl = UPSTREAM_TOKEN_TTL.as_secs().to_string();
        let (status, body) = self
            .send(
                Method::PUT,
                "/latest/api/token",
                ("x-aws-ec2-metadata-token-ttl-seconds", &ttl),
            )
            .await?;
        if status != StatusCode::OK {
            return Err(UpstreamError::Status(status));
        }
        let value = String::from_utf8(body.to_vec()).map_err(|_| UpstreamError::NotText)?;
        *held = Some(Held {
            value: value.clone(),
            refresh_at: refresh_at(fetched, UPSTREAM_TOKEN_TTL),
        });
        Ok(value)
    }

    /// One request with `header` on a fresh connection, bounded by the timeout.
    async fn send(
        &self,
        method: Method,
        target: &str,
        header: (&str, &str),
    ) -> Result<(StatusCode, Bytes), UpstreamError> {
        let exchange = async {
            let stream = TcpStream::connect(self.addr)
                .await
                .map_err(|source| UpstreamError::Connect {
                    addr: self.addr,
                    source,
                })?;
            let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            let driver = tokio::spawn(connection);
            let request = Request::builder()
                .method(method)
                .uri(target)
                .header(http::header::HOST, self.addr.ip().to_string())
                .header(header.0, header.1)
                .body(Full::new(Bytes::new()))
                .expect("a static method, a canonical path and upstream_token headers make a valid request");
            let response = sender.send_request(request).await?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            driver.abort();
            Ok((status, body))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| UpstreamError::Timeout(self.timeout))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_tokens_are_replaced_before_their_ttl_ends() {
        let now = Instant::now();
        assert_eq!(
            refresh_at(now, UPSTREAM_TOKEN_TTL),
            now + UPSTREAM_TOKEN_TTL - UPSTREAM_TOKEN_MARGIN
        );
        assert_eq!(refresh_at(now, Duration::from_secs(60)), now + Duration::from_secs(30));
    }
}
