//! Instance metadata other than credentials: what SDKs and agents read besides the role (region, zone,
//! instance identity), answered either from the node's real IMDS through an allow-list (EC2 mode) or
//! synthesised from flags and the Node's labels (on-prem mode).
//!
//! This module owns the settings ([`Config`], [`Mode`]), the choice of source at start and the
//! [`Metadata`] facade the IMDS endpoint asks. What may be served is decided in [`rules`]; the answers
//! come from [`synthetic`] (on-prem, placed by [`placement`]) or [`upstream`] (the node's IMDS, with its `upstream_token` and
//! caches).
//!
//! Invariants: deny by default. Upstream, only paths matching an `--allow-path` pattern are fetched,
//! and [`DENIED`] is checked after the allow-list, so the node's credentials, user-data, identity
//! signatures and spot notices are never proxied, whatever the patterns say; the facade checks
//! [`DENIED`] again before asking either source. Listings show exactly the entries that would be
//! served, and `meta-data/` lists `iam/` only to a caller that has a role.
//!
//! This module does not decide HTTP statuses: [`Error`] is mapped in `server::response`.

pub mod placement;
pub mod rules;
pub mod synthetic;
pub mod upstream;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http::StatusCode;

use crate::workload::RoleArn;

pub use placement::Placement;
pub use rules::{DEFAULT_ALLOW, DENIED, Rules, denied};
pub use synthetic::Synthetic;
pub use upstream::{REQUEST_TIMEOUT, Upstream, refresh_at};

use rules::IAM_ENTRY;

/// The real IMDS, probed by `--upstream-imds auto` (never by the tests).
pub const EC2_IMDS_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::new(169, 254, 169, 254)), 80);

/// Where metadata comes from (`--upstream-imds`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// No upstream: synthesise from flags (on-prem, or EC2 with the node's IMDS kept out of reach).
    None,
    /// Probe [`EC2_IMDS_ADDR`] with an `upstream_token` request at start; fall back to `None` if it does
    /// not answer within [`PROBE_TIMEOUT`].
    Auto,
    /// Proxy allowed paths to this IMDS (`http://IP[:PORT]`).
    Upstream(SocketAddr),
}

/// How long `auto` waits for the real IMDS at start.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

impl Mode {
    /// Parses `none`, `auto` or `http://IP[:PORT]` (an IP literal: no DNS on this path).
    pub fn parse(value: &str) -> Result<Self, String> {
        match value {
            "none" => return Ok(Mode::None),
            "auto" => return Ok(Mode::Auto),
            _ => {}
        }
        let uri: http::Uri = value
            .parse()
            .map_err(|e| format!("{value:?}: not none, auto or a URL ({e})"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!("{value:?}: only http:// is spoken by IMDS"));
        }
        if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
            return Err(format!("{value:?}: give the base URL only, without a path"));
        }
        let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
        let ip: IpAddr = host
            .parse()
            .map_err(|_| format!("{value:?}: the host must be an IP address"))?;
        Ok(Mode::Upstream(SocketAddr::new(ip, uri.port_u16().unwrap_or(80))))
    }
}

/// Settings of the metadata surface.
#[derive(Debug, Clone)]
pub struct Config {
    /// `--upstream-imds`.
    pub mode: Mode,
    /// `--allow-path` (or [`DEFAULT_ALLOW`]).
    pub allow: Rules,
    /// `--region` and `--availability-zone`, which win over the Node's labels.
    pub flags: Placement,
    /// `--account-id`.
    pub account_id: Option<String>,
    /// `--node-name`.
    pub node_name: String,
}

/// An answer, before HTTP: plain text, or a JSON document rendered in EC2's layout by the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Sent verbatim.
    Text(String),
    /// String fields in this order.
    Json(Vec<(&'static str, String)>),
}

/// Why metadata was not answered.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not served here (not allowed, denied, or absent upstream).
    #[error("not served")]
    NotFound,
    /// The upstream IMDS failed.
    #[error("upstream IMDS: {0}")]
    Upstream(#[from] UpstreamError),
}

/// How the upstream IMDS failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No TCP connection to the upstream.
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// The upstream dialled.
        addr: SocketAddr,
        /// Why the connection failed.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP/1 exchange broke off.
    #[error("HTTP exchange failed: {0}")]
    Http(#[from] hyper::Error),
    /// No full answer within the exchange's bound.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// A status other than expected (including a 401 that a new `upstream_token` did not cure).
    #[error("answered {0}")]
    Status(StatusCode),
    /// A body that is not UTF-8.
    #[error("answer is not UTF-8 text")]
    NotText,
}

impl UpstreamError {
    /// A closed label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Connect { .. } => "connect",
            UpstreamError::Http(_) => "http",
            UpstreamError::Timeout(_) => "timeout",
            UpstreamError::Status(_) => "status",
            UpstreamError::NotText => "not_text",
        }
    }
}

/// The metadata source the IMDS endpoint asks.
pub enum Metadata {
    /// On-prem mode.
    Synthetic(Synthetic),
    /// EC2 mode.
    Upstream(Upstream),
}

impl Metadata {
    /// Builds the source; `auto` probes the real IMDS here, once. On-prem answers follow `placement`.
    pub async fn build(config: Config, placement: placement::Live) -> Self {
        Self::build_probing(config, placement, EC2_IMDS_ADDR).await
    }

    /// [`Metadata::build`], with `auto` probing `probe` (tests probe loopback, never the real IMDS).
    async fn build_probing(config: Config, placement: placement::Live, probe: SocketAddr) -> Self {
        let upstream = match config.mode {
            Mode::None => None,
            Mode::Upstream(addr) => Some(addr),
            Mode::Auto => {
                match Upstream::new(probe, config.allow.clone(), PROBE_TIMEOUT)
                    .upstream_token(None)
                    .await
                {
                    Ok(_) => Some(probe),
                    Err(error) => {
                        tracing::info!(%error, "no instance metadata service answered; synthesising metadata");
                        None
                    }
                }
            }
        };
        match upstream {
            Some(addr) => {
                tracing::info!(%addr, "proxying allowed metadata paths to the node's IMDS");
                Metadata::Upstream(Upstream::new(addr, config.allow, REQUEST_TIMEOUT))
            }
            None => Metadata::Synthetic(Synthetic {
                placement,
                account_id: config.account_id,
                node_name: config.node_name,
            }),
        }
    }

    /// Whether answers are synthesised here (on-prem mode), so follow the Node's placement.
    pub fn is_synthetic(&self) -> bool {
        matches!(self, Metadata::Synthetic(_))
    }

    /// The answer for `path` (relative to `/latest/`, no trailing slash). `role`: the caller's, if it
    /// has one, so that `meta-data/` lists `iam/` only when it is served to this caller (and the
    /// synthetic identity document can name its account).
    pub async fn get(&self, path: &str, role: Option<&RoleArn>) -> Result<Answer, Error> {
        let with_iam = role.is_some();
        // Never served here, in either mode: the IMDS handler answers `meta-data/iam/` itself.
        if denied(path) {
            return Err(Error::NotFound);
        }
        let answer = match self {
            Metadata::Synthetic(s) => s.get(path, role.map(RoleArn::account)).ok_or(Error::NotFound)?,
            Metadata::Upstream(u) => Answer::Text(u.get(path).await?),
        };
        Ok(match answer {
            Answer::Text(listing) if path == "meta-data" && !with_iam => Answer::Text(
                listing
                    .lines()
                    .filter(|entry| *entry != IAM_ENTRY)
                    .collect::<Vec<_>>()
                    .join("\n"),
            ),
            other => other,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_only_ip_literal_http_urls_are_upstreams() {
        assert_eq!(Mode::parse("none"), Ok(Mode::None));
        assert_eq!(Mode::parse("auto"), Ok(Mode::Auto));
        assert_eq!(
            Mode::parse("http://127.0.0.1:8080"),
            Ok(Mode::Upstream("127.0.0.1:8080".parse().unwrap()))
        );
        assert_eq!(
            Mode::parse("http://[fd00:ec2::254]"),
            Ok(Mode::Upstream("[fd00:ec2::254]:80".parse().unwrap()))
        );
        for bad in [
            "https://127.0.0.1",
            "http://imds.local",
            "http://127.0.0.1/latest",
            "ftp://x",
            "",
        ] {
            assert!(Mode::parse(bad).is_err(), "{bad}");
        }
    }

    fn auto() -> Config {
        Config {
            mode: Mode::Auto,
            allow: Rules::default_allow(),
            flags: Placement::default(),
            account_id: None,
            node_name: "worker-7".into(),
        }
    }

    #[tokio::test]
    async fn auto_falls_back_to_synthetic_when_nothing_answers_and_proxies_when_an_imds_does() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(matches!(
            Metadata::build_probing(auto(), placement::fixed(Placement::default()), closed).await,
            Metadata::Synthetic(_)
        ));

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = [0; 1024];
            let _ = stream.read(&mut buf).await.unwrap();
            let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 14\r\nConnection: close\r\n\r\nupstream-token";
            stream.write_all(answer).await.unwrap();
        });
        assert!(matches!(
            Metadata::build_probing(auto(), placement::fixed(Placement::default()), addr).await,
            Metadata::Upstream(_)
        ));
    }
}
