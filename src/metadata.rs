//! Instance metadata other than credentials: what SDKs and agents read besides the role (region, zone,
//! instance identity), answered either from the node's real IMDS through an allow-list (EC2 mode) or
//! synthesised from flags (on-prem mode).
//!
//! Invariants: deny by default. Upstream, only paths matching an `--allow-path` pattern are fetched,
//! and [`DENIED`] is checked after the allow-list, so the node's credentials, user-data, identity
//! signatures and spot notices are never proxied, whatever the patterns say. Listings show exactly the
//! entries that would be served. The upstream is only ever asked for `/latest/<canonical path>`
//! (the router has already refused anything else), with no query and no caller header.
//!
//! This module does not decide HTTP statuses: [`Error`] is mapped in `server::response`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use regex::Regex;
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio::time::Instant;

/// The real IMDS, probed by `--upstream-imds auto` (never by the tests).
pub const EC2_IMDS_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::new(169, 254, 169, 254)), 80);

/// What the default allow-list lets through, each for a named reader (see the README, "Metadata besides credentials").
pub const DEFAULT_ALLOW: &[&str] = &[
    // Region and zone: the Rust SDK reads placement/region; botocore and the C++ SDK derive the region
    // from availability-zone; zone ids are what cross-account tooling compares.
    "meta-data/placement/(region|availability-zone|availability-zone-id)",
    // Go v1/v2 and Java v1 read the region from the identity document (unsigned: it proves nothing).
    "dynamic/instance-identity/document",
    // Resource detectors (OpenTelemetry, X-Ray, CloudWatch agent) and Java's EC2MetadataUtils.
    "meta-data/(instance-id|instance-type|local-hostname|hostname)",
];

/// Never proxied, whatever `--allow-path` says: path prefixes (whole segments) relative to `/latest/`.
/// The node's role and its identity credentials would hand the node's AWS identity to a pod; user-data
/// often holds bootstrap secrets; the signed identity documents let a pod prove it is the node (e.g. to
/// Vault's EC2 auth); spot notices belong to the node's lifecycle handler.
pub const DENIED: &[&str] = &[
    "meta-data/iam",
    "meta-data/identity-credentials",
    "meta-data/spot",
    "user-data",
    "dynamic/instance-identity/signature",
    "dynamic/instance-identity/pkcs7",
    "dynamic/instance-identity/rsa2048",
];

/// Where metadata comes from (`--upstream-imds`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// No upstream: synthesise from flags (on-prem, or EC2 with the node's IMDS kept out of reach).
    None,
    /// Probe [`EC2_IMDS_ADDR`] with an IMDSv2 token request at start; fall back to `None` if it does not
    /// answer within [`PROBE_TIMEOUT`].
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

/// The allow-list, compiled.
#[derive(Debug, Clone)]
pub struct Rules {
    /// Each pattern as given and anchored (`^(?:…)$`).
    patterns: Vec<(String, Regex)>,
}

impl Rules {
    /// Compiles `patterns` (regular expressions over the path after `/latest/`, matched whole).
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Self, regex::Error> {
        let patterns = patterns
            .iter()
            .map(|p| {
                let p = p.as_ref();
                Regex::new(&format!("^(?:{p})$")).map(|r| (p.to_owned(), r))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { patterns })
    }

    /// The default allow-list.
    pub fn default_allow() -> Self {
        Self::new(DEFAULT_ALLOW).expect("the default patterns compile")
    }

    /// Whether the leaf `path` may be fetched.
    pub fn allows(&self, path: &str) -> bool {
        !denied(path) && self.patterns.iter().any(|(_, r)| r.is_match(path))
    }

    /// Whether `path` is a directory this agent lists: the roots, the parents of denied entries (so
    /// that a permissive pattern cannot list them), and every directory a pattern spells out literally.
    pub fn is_directory(&self, path: &str) -> bool {
        ["", "meta-data", "dynamic", "dynamic/instance-identity"].contains(&path)
            || self.patterns.iter().any(|(p, _)| p.starts_with(&format!("{path}/")))
    }

    /// Whether the directory `path` has anything served under it.
    fn shows_directory(&self, path: &str) -> bool {
        !denied(path)
            && self
                .patterns
                .iter()
                .any(|(p, r)| p.starts_with(&format!("{path}/")) || r.is_match(&format!("{path}/")))
    }

    /// Keeps only the entries of the listing of `directory` that are served.
    fn filter(&self, directory: &str, listing: &str) -> Vec<String> {
        listing
            .lines()
            .filter(|entry| !entry.is_empty() && !entry.contains(['\\', '%']) && !entry.starts_with('.'))
            .filter(|entry| {
                let full = format!("{directory}/{}", entry.trim_end_matches('/'));
                if entry.ends_with('/') {
                    self.shows_directory(&full)
                } else {
                    self.allows(&full)
                }
            })
            .map(str::to_owned)
            .collect()
    }
}

/// Whether `path` is, or is under, a [`DENIED`] prefix.
pub fn denied(path: &str) -> bool {
    DENIED
        .iter()
        .any(|d| path == *d || path.strip_prefix(d).is_some_and(|rest| rest.starts_with('/')))
}

/// Settings of the metadata surface.
#[derive(Debug, Clone)]
pub struct Config {
    /// `--upstream-imds`.
    pub mode: Mode,
    /// `--allow-path` (or [`DEFAULT_ALLOW`]).
    pub allow: Rules,
    /// `--region`.
    pub region: String,
    /// `--availability-zone`.
    pub availability_zone: Option<String>,
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
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP exchange failed: {0}")]
    Http(#[from] hyper::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("answered {0}")]
    Status(StatusCode),
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
    /// Builds the source; `auto` probes the real IMDS here, once.
    pub async fn build(config: Config) -> Self {
        Self::build_probing(config, EC2_IMDS_ADDR).await
    }

    /// [`Metadata::build`], with `auto` probing `probe` (tests probe loopback, never the real IMDS).
    async fn build_probing(config: Config, probe: SocketAddr) -> Self {
        let upstream = match config.mode {
            Mode::None => None,
            Mode::Upstream(addr) => Some(addr),
            Mode::Auto => {
                match Upstream::new(probe, config.allow.clone(), PROBE_TIMEOUT)
                    .token(None)
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
                region: config.region,
                availability_zone: config.availability_zone,
                node_name: config.node_name,
            }),
        }
    }

    /// The answer for `path` (relative to `/latest/`, no trailing slash). `with_iam`: whether the
    /// caller has a role, so that `meta-data/` lists `iam/` only when it is served to this caller.
    pub async fn get(&self, path: &str, with_iam: bool) -> Result<Answer, Error> {
        // Never served here, in either mode: the IMDS handler answers `meta-data/iam/` itself.
        if denied(path) {
            return Err(Error::NotFound);
        }
        let answer = match self {
            Metadata::Synthetic(s) => s.get(path).ok_or(Error::NotFound)?,
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

    /// `synthetic` or `upstream`.
    pub fn mode(&self) -> &'static str {
        match self {
            Metadata::Synthetic(_) => "synthetic",
            Metadata::Upstream(_) => "upstream",
        }
    }
}

/// Every `/latest/` listing starts here; user-data is never served.
const ROOT: &str = "dynamic\nmeta-data";

/// The credential tree the IMDS handler serves, added to every `meta-data/` listing.
const IAM_ENTRY: &str = "iam/";

/// On-prem metadata: region and zone from flags, identity from the node name. Synthetic, and
/// documented as such: nothing here is attested by AWS.
#[derive(Debug, Clone)]
pub struct Synthetic {
    pub region: String,
    pub availability_zone: Option<String>,
    pub node_name: String,
}

impl Synthetic {
    /// A stable, well-formed instance id (`i-` and 17 hex digits) derived from the node name, for tools
    /// that check the format.
    pub fn instance_id(&self) -> String {
        let digest = Sha256::digest(self.node_name.as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        format!("i-{}", &hex[..17])
    }

    fn get(&self, path: &str) -> Option<Answer> {
        let text = |s: &str| Some(Answer::Text(s.to_owned()));
        let zone = self.availability_zone.as_deref();
        match path {
            "" => text(ROOT),
            "meta-data" => text(&format!(
                "hostname\n{IAM_ENTRY}\ninstance-id\nlocal-hostname\nplacement/"
            )),
            "meta-data/hostname" | "meta-data/local-hostname" => text(&self.node_name),
            "meta-data/instance-id" => text(&self.instance_id()),
            "meta-data/placement" => text(if zone.is_some() {
                "availability-zone\nregion"
            } else {
                "region"
            }),
            "meta-data/placement/region" => text(&self.region),
            "meta-data/placement/availability-zone" => zone.and_then(text),
            "dynamic" => text("instance-identity/"),
            "dynamic/instance-identity" => text("document"),
            "dynamic/instance-identity/document" => Some(Answer::Json(self.identity_document())),
            _ => None,
        }
    }

    /// The fields SDKs read from the identity document (region above all), in EC2's key order.
    fn identity_document(&self) -> Vec<(&'static str, String)> {
        let architecture = match std::env::consts::ARCH {
            "aarch64" => "arm64",
            other => other,
        };
        let mut fields = vec![("architecture", architecture.to_owned())];
        if let Some(zone) = &self.availability_zone {
            fields.push(("availabilityZone", zone.clone()));
        }
        fields.push(("instanceId", self.instance_id()));
        fields.push(("region", self.region.clone()));
        fields.push(("version", "2017-09-30".to_owned()));
        fields
    }
}

/// How long one upstream exchange may take (IMDS is link-local and answers in milliseconds).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// The session TTL asked of the upstream IMDS, and how long before its end it is replaced.
const TOKEN_TTL: Duration = Duration::from_secs(21_600);
const TOKEN_MARGIN: Duration = Duration::from_secs(300);

/// How long an upstream answer is reused. Metadata SDKs read is static for the instance's life; a
/// short cache keeps a node full of pods well under the IMDS per-instance rate limit.
const CACHE_TTL: Duration = Duration::from_secs(60);

struct Held {
    value: String,
    refresh_at: Instant,
}

/// When a token fetched at `fetched` with `ttl` must be replaced.
pub fn refresh_at(fetched: Instant, ttl: Duration) -> Instant {
    fetched + ttl.saturating_sub(TOKEN_MARGIN).max(ttl / 2)
}

/// EC2 mode: allowed paths fetched from the node's IMDS with a session token the agent holds.
pub struct Upstream {
    addr: SocketAddr,
    rules: Rules,
    timeout: Duration,
    token: Mutex<Option<Held>>,
    cache: moka::future::Cache<String, Arc<str>>,
}

impl Upstream {
    /// An upstream at `addr`.
    pub fn new(addr: SocketAddr, rules: Rules, timeout: Duration) -> Self {
        Self {
            addr,
            rules,
            timeout,
            token: Mutex::new(None),
            cache: moka::future::Cache::builder()
                .max_capacity(512)
                .time_to_live(CACHE_TTL)
                .build(),
        }
    }

    async fn get(&self, path: &str) -> Result<String, Error> {
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

    /// GETs `target` with the held token, fetching a new token once if upstream says 401.
    async fn fetch(&self, target: &str) -> Result<String, Error> {
        let token = self.token(None).await?;
        let (mut status, mut body) = self
            .send(Method::GET, target, ("x-aws-ec2-metadata-token", &token))
            .await?;
        if status == StatusCode::UNAUTHORIZED {
            let fresh = self.token(Some(&token)).await?;
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

    /// The held token, or a new one if none is held, it is due, or it is `stale` (refused upstream).
    async fn token(&self, stale: Option<&str>) -> Result<String, UpstreamError> {
        let mut held = self.token.lock().await;
        if let Some(h) = held.as_ref()
            && Instant::now() < h.refresh_at
            && Some(h.value.as_str()) != stale
        {
            return Ok(h.value.clone());
        }
        let fetched = Instant::now();
        let ttl = TOKEN_TTL.as_secs().to_string();
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
            refresh_at: refresh_at(fetched, TOKEN_TTL),
        });
        Ok(value)
    }

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
                .expect("a static method, a canonical path and token headers make a valid request");
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

    #[test]
    fn the_default_allow_list_serves_what_sdks_read_and_nothing_else() {
        let rules = Rules::default_allow();
        for path in [
            "meta-data/placement/region",
            "meta-data/placement/availability-zone",
            "meta-data/placement/availability-zone-id",
            "dynamic/instance-identity/document",
            "meta-data/instance-id",
            "meta-data/instance-type",
            "meta-data/local-hostname",
        ] {
            assert!(rules.allows(path), "{path}");
        }
        for path in [
            "user-data",
            "meta-data/iam/security-credentials/node-role",
            "meta-data/local-ipv4",
            "meta-data/placement/region/x",
            "xmeta-data/instance-id",
            "dynamic/instance-identity/pkcs7",
        ] {
            assert!(!rules.allows(path), "{path}");
        }
    }

    #[test]
    fn the_hard_deny_list_wins_over_a_permissive_pattern() {
        let rules = Rules::new(&[".*"]).unwrap();
        for path in [
            "meta-data/iam/security-credentials/node-role",
            "meta-data/iam/info",
            "meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
            "user-data",
            "meta-data/spot/instance-action",
            "dynamic/instance-identity/signature",
        ] {
            assert!(!rules.allows(path), "{path}");
        }
        assert!(rules.allows("meta-data/ami-id"));
        assert!(!denied("meta-data/iamx") && !denied("user-database"));
    }

    #[test]
    fn listings_keep_only_served_entries() {
        let rules = Rules::default_allow();
        let upstream = "ami-id\nhostname\niam/\nidentity-credentials/\ninstance-id\nlocal-ipv4\nplacement/\nspot/";
        assert_eq!(
            rules.filter("meta-data", upstream),
            ["hostname", "instance-id", "placement/"]
        );
        let permissive = Rules::new(&[".*"]).unwrap();
        assert_eq!(
            permissive.filter("meta-data", upstream),
            ["ami-id", "hostname", "instance-id", "local-ipv4", "placement/"]
        );
        assert_eq!(
            permissive.filter("dynamic/instance-identity", "document\npkcs7\nrsa2048\nsignature"),
            ["document"]
        );
        assert!(rules.is_directory("meta-data/placement") && !rules.is_directory("meta-data/placement/region"));
    }

    #[test]
    fn tokens_are_replaced_before_their_ttl_ends() {
        let now = Instant::now();
        assert_eq!(refresh_at(now, TOKEN_TTL), now + TOKEN_TTL - TOKEN_MARGIN);
        assert_eq!(refresh_at(now, Duration::from_secs(60)), now + Duration::from_secs(30));
    }

    fn auto() -> Config {
        Config {
            mode: Mode::Auto,
            allow: Rules::default_allow(),
            region: "eu-west-1".into(),
            availability_zone: None,
            node_name: "worker-7".into(),
        }
    }

    #[tokio::test]
    async fn auto_falls_back_to_synthetic_when_nothing_answers_and_proxies_when_an_imds_does() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert_eq!(Metadata::build_probing(auto(), closed).await.mode(), "synthetic");

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = [0; 1024];
            let _ = stream.read(&mut buf).await.unwrap();
            let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\ntoken";
            stream.write_all(answer).await.unwrap();
        });
        assert_eq!(Metadata::build_probing(auto(), addr).await.mode(), "upstream");
    }

    fn synthetic(zone: Option<&str>) -> Synthetic {
        Synthetic {
            region: "eu-west-1".into(),
            availability_zone: zone.map(str::to_owned),
            node_name: "worker-7".into(),
        }
    }

    #[test]
    fn synthetic_metadata_comes_from_the_flags_and_the_node_name() {
        let s = synthetic(Some("eu-west-1b"));
        let text = |p: &str| match s.get(p) {
            Some(Answer::Text(t)) => t,
            other => panic!("{p}: {other:?}"),
        };
        assert_eq!(text("meta-data/placement/region"), "eu-west-1");
        assert_eq!(text("meta-data/placement/availability-zone"), "eu-west-1b");
        assert_eq!(text("meta-data/local-hostname"), "worker-7");
        let id = text("meta-data/instance-id");
        assert!(id.len() == 19 && id.starts_with("i-"), "{id}");
        assert_eq!(id, synthetic(None).instance_id(), "stable per node");
        assert!(s.get("user-data").is_none() && s.get("meta-data/ami-id").is_none());
        assert!(synthetic(None).get("meta-data/placement/availability-zone").is_none());
        assert_eq!(
            synthetic(None).get("meta-data/placement"),
            Some(Answer::Text("region".into()))
        );
    }
}
