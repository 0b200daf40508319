//! JWT-SVIDs from the SPIRE agent's Delegated Identity API, as the web identity exchanged at STS.
//!
//! `--identity-source spire`: instead of a TokenRequest, the agent asks the SPIRE agent on its node
//! (over the admin Unix socket, as an authorized delegate) for the JWT-SVID of the workload described
//! by the calling pod's selectors (`k8s:ns`, `k8s:sa`, `k8s:pod-uid`), for the STS audience.
//!
//! Only one unary RPC is needed, `FetchJWTSVIDs`, so it is spoken directly: gRPC framing over hyper's
//! HTTP/2 client on a Unix socket, with the few protobuf messages encoded by hand below (field numbers
//! of spire-api-sdk `spire/api/agent/delegatedidentity/v1` and `spire/api/types`). No tonic, no prost.
//! SVIDs are wrapped in [`Secret`] and never logged.

use std::path::PathBuf;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, Request, header};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::workload::{Secret, Workload};

/// The longest a FetchJWTSVIDs call may take, connection included (as the TokenRequest's bound).
const MINT_TIMEOUT: Duration = Duration::from_secs(10);

/// The RPC's path: `/<package>.<service>/<method>`.
pub const FETCH_JWT_SVIDS_PATH: &str = "/spire.api.agent.delegatedidentity.v1.DelegatedIdentity/FetchJWTSVIDs";

/// The largest response accepted (a handful of JWTs).
const MAX_RESPONSE: usize = 1 << 20;

/// gRPC status codes we tell apart.
mod code {
    pub const OK: u32 = 0;
    pub const DEADLINE_EXCEEDED: u32 = 4;
    pub const PERMISSION_DENIED: u32 = 7;
    pub const RESOURCE_EXHAUSTED: u32 = 8;
    pub const UNAVAILABLE: u32 = 14;
    pub const UNAUTHENTICATED: u32 = 16;
}

/// `--identity-source spire` settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// `--spire-admin-socket`: the SPIRE agent's admin socket.
    pub socket: PathBuf,
    /// `--token-audience`: the `aud` of the JWT-SVIDs (the OIDC provider's client id in IAM).
    pub audience: String,
}

/// Why no JWT-SVID was obtained.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The SPIRE agent could not be reached, failed, or answered something we cannot read.
    #[error("FetchJWTSVIDs for pod {pod} failed: {detail}")]
    Unavailable {
        /// `namespace/name` of the pod.
        pod: String,
        /// What went wrong (never a token).
        detail: String,
    },
    /// No answer within [`MINT_TIMEOUT`].
    #[error("FetchJWTSVIDs for pod {pod} got no answer within {after:?}")]
    Timeout {
        /// `namespace/name` of the pod.
        pod: String,
        /// The bound that passed.
        after: Duration,
    },
    /// PermissionDenied / Unauthenticated: this agent is not an authorized delegate of the SPIRE agent.
    #[error(
        "FetchJWTSVIDs for pod {pod} denied (is imds-broker in the SPIRE agent's authorized_delegates?): {message}"
    )]
    Denied {
        /// `namespace/name` of the pod.
        pod: String,
        /// The grpc-message.
        message: String,
    },
    /// Another gRPC error the SPIRE agent gave as its word on this request.
    #[error("FetchJWTSVIDs for pod {pod} refused: gRPC status {code}: {message}")]
    Refused {
        /// `namespace/name` of the pod.
        pod: String,
        /// The grpc-status.
        code: u32,
        /// The grpc-message.
        message: String,
    },
    /// No registration entry matches the pod's selectors (yet).
    #[error("no SPIRE registration entry matches pod {pod} (selectors {selectors})")]
    NoSvid {
        /// `namespace/name` of the pod.
        pod: String,
        /// The selectors asked for, `type:value` joined by commas.
        selectors: String,
    },
    /// Several entries match: which identity the pod has is ambiguous, so none is used.
    #[error("{count} SPIRE registration entries match pod {pod} ({ids}): exactly one is required")]
    Ambiguous {
        /// `namespace/name` of the pod.
        pod: String,
        /// How many SVIDs came back.
        count: usize,
        /// Their SPIFFE IDs.
        ids: String,
    },
}

impl Error {
    /// A closed label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Unavailable { .. } | Error::Timeout { .. } => "svid_unavailable",
            Error::Denied { .. } => "svid_denied",
            Error::Refused { .. } => "svid_refused",
            Error::NoSvid { .. } => "svid_none",
            Error::Ambiguous { .. } => "svid_ambiguous",
        }
    }

    /// True when trying again later may succeed. A missing registration entry counts: it is often
    /// created moments after the pod (by the SPIRE controller manager), so the pod gets 503, not a
    /// final refusal.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Unavailable { .. } | Error::Timeout { .. } | Error::NoSvid { .. } => true,
            Error::Denied { .. } | Error::Refused { .. } | Error::Ambiguous { .. } => false,
        }
    }
}

/// A SPIRE selector (`spire.api.types.Selector`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    /// Field 1: the plugin, `k8s`.
    pub kind: String,
    /// Field 2: e.g. `ns:default`.
    pub value: String,
}

/// The selectors naming exactly `workload`: its namespace, service account and UID.
pub fn selectors(workload: &Workload) -> Vec<Selector> {
    let k8s = |value: String| Selector {
        kind: "k8s".to_owned(),
        value,
    };
    vec![
        k8s(format!("ns:{}", workload.namespace)),
        k8s(format!("sa:{}", workload.service_account)),
        k8s(format!("pod-uid:{}", workload.uid)),
    ]
}

/// One JWT-SVID of a response (`spire.api.types.JWTSVID`; the timestamps are not needed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtSvid {
    /// Field 1: the JWT.
    pub token: Secret,
    /// Field 2 (`SPIFFEID{trust_domain = 1, path = 2}`), as `spiffe://<trust_domain><path>`.
    pub spiffe_id: String,
    /// Field 5: the operator's hint.
    pub hint: String,
}

/// Protobuf wire encoding of the few messages, by hand.
pub mod wire {
    use super::*;

    const LEN: u64 = 2;
    const VARINT: u64 = 0;
    const I64: u64 = 1;
    const I32: u64 = 5;

    fn varint(out: &mut BytesMut, mut value: u64) {
        while value >= 0x80 {
            out.put_u8((value as u8) | 0x80);
            value >>= 7;
        }
        out.put_u8(value as u8);
    }

    fn field_bytes(out: &mut BytesMut, field: u64, bytes: &[u8]) {
        varint(out, (field << 3) | LEN);
        varint(out, bytes.len() as u64);
        out.put_slice(bytes);
    }

    /// `FetchJWTSVIDsRequest{repeated string audience = 1; repeated Selector selectors = 2}`.
    pub fn fetch_request(audience: &[&str], selectors: &[Selector]) -> Bytes {
        let mut out = BytesMut::new();
        for aud in audience {
            field_bytes(&mut out, 1, aud.as_bytes());
        }
        for selector in selectors {
            let mut inner = BytesMut::new();
            field_bytes(&mut inner, 1, selector.kind.as_bytes());
            field_bytes(&mut inner, 2, selector.value.as_bytes());
            field_bytes(&mut out, 2, &inner);
        }
        out.freeze()
    }

    /// A cursor over one message's fields.
    struct Fields<'a> {
        rest: &'a [u8],
    }

    enum Value<'a> {
        Varint,
        Bytes(&'a [u8]),
        Fixed,
    }

    impl<'a> Fields<'a> {
        fn read_varint(&mut self) -> Result<u64, String> {
            let mut value = 0u64;
            for shift in (0..64).step_by(7) {
                let (&byte, rest) = self.rest.split_first().ok_or("truncated varint")?;
                self.rest = rest;
                value |= u64::from(byte & 0x7f) << shift;
                if byte & 0x80 == 0 {
                    return Ok(value);
                }
            }
            Err("varint too long".to_owned())
        }

        fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
            if self.rest.len() < n {
                return Err("truncated field".to_owned());
            }
            let (taken, rest) = self.rest.split_at(n);
            self.rest = rest;
            Ok(taken)
        }

        fn next(&mut self) -> Result<Option<(u64, Value<'a>)>, String> {
            if self.rest.is_empty() {
                return Ok(None);
            }
            let key = self.read_varint()?;
            let value = match key & 7 {
                VARINT => {
                    self.read_varint()?;
                    Value::Varint
                }
                LEN => {
                    let n = usize::try_from(self.read_varint()?).map_err(|_| "length overflow")?;
                    Value::Bytes(self.take(n)?)
                }
                I64 => {
                    self.take(8)?;
                    Value::Fixed
                }
                I32 => {
                    self.take(4)?;
                    Value::Fixed
                }
                other => return Err(format!("unsupported wire type {other}")),
            };
            Ok(Some((key >> 3, value)))
        }
    }

    fn string(bytes: &[u8]) -> Result<String, String> {
        String::from_utf8(bytes.to_vec()).map_err(|_| "string field is not UTF-8".to_owned())
    }

    fn spiffe_id(bytes: &[u8]) -> Result<String, String> {
        let (mut trust_domain, mut path) = (String::new(), String::new());
        let mut fields = Fields { rest: bytes };
        while let Some((field, value)) = fields.next()? {
            match (field, value) {
                (1, Value::Bytes(b)) => trust_domain = string(b)?,
                (2, Value::Bytes(b)) => path = string(b)?,
                _ => {}
            }
        }
        Ok(format!("spiffe://{trust_domain}{path}"))
    }

    fn jwt_svid(bytes: &[u8]) -> Result<JwtSvid, String> {
        let mut svid = JwtSvid {
            token: Secret::new(String::new()),
            spiffe_id: String::new(),
            hint: String::new(),
        };
        let mut fields = Fields { rest: bytes };
        while let Some((field, value)) = fields.next()? {
            match (field, value) {
                (1, Value::Bytes(b)) => svid.token = Secret::new(string(b)?),
                (2, Value::Bytes(b)) => svid.spiffe_id = spiffe_id(b)?,
                (5, Value::Bytes(b)) => svid.hint = string(b)?,
                (1 | 2 | 5, _) => return Err(format!("field {field} has the wrong wire type")),
                _ => {}
            }
        }
        Ok(svid)
    }

    /// `FetchJWTSVIDsResponse{repeated JWTSVID svids = 1}`; unknown fields are skipped.
    pub fn fetch_response(bytes: &[u8]) -> Result<Vec<JwtSvid>, String> {
        let mut svids = Vec::new();
        let mut fields = Fields { rest: bytes };
        while let Some((field, value)) = fields.next()? {
            match (field, value) {
                (1, Value::Bytes(b)) => svids.push(jwt_svid(b)?),
                (1, Value::Varint | Value::Fixed) => return Err("svids has the wrong wire type".to_owned()),
                _ => {}
            }
        }
        Ok(svids)
    }

    /// One gRPC message frame: uncompressed flag, 4-byte big-endian length, the message.
    pub fn frame(message: &[u8]) -> Result<Bytes, String> {
        let len = u32::try_from(message.len()).map_err(|_| "message too large")?;
        let mut out = BytesMut::with_capacity(5 + message.len());
        out.put_u8(0);
        out.put_u32(len);
        out.put_slice(message);
        Ok(out.freeze())
    }

    /// The one message of a unary response body.
    pub fn unframe(body: &[u8]) -> Result<&[u8], String> {
        let [flag, a, b, c, d, rest @ ..] = body else {
            return Err("response has no gRPC message".to_owned());
        };
        if *flag != 0 {
            return Err("compressed gRPC message (not requested)".to_owned());
        }
        let len = u32::from_be_bytes([*a, *b, *c, *d]) as usize;
        if rest.len() != len {
            return Err(format!("gRPC frame says {len} bytes, body has {}", rest.len()));
        }
        Ok(rest)
    }
}

/// Asks the SPIRE agent for pods' JWT-SVIDs.
#[derive(Clone, Debug)]
pub struct Client {
    config: Config,
}

impl Client {
    /// A client of the admin socket in `config`.
    pub fn new(config: Config) -> Self {
        Self { config }
    }

    /// The JWT-SVID of `workload`, for the configured audience: exactly one must match.
    pub async fn mint(&self, workload: &Workload) -> Result<Secret, Error> {
        let pod = format!("{}/{}", workload.namespace, workload.name);
        let selectors = selectors(workload);
        let svids = tokio::time::timeout(MINT_TIMEOUT, self.fetch(&pod, &selectors))
            .await
            .map_err(|_| Error::Timeout {
                pod: pod.clone(),
                after: MINT_TIMEOUT,
            })??;
        pick(pod, &selectors, svids)
    }

    async fn fetch(&self, pod: &str, selectors: &[Selector]) -> Result<Vec<JwtSvid>, Error> {
        let unavailable = |detail: String| Error::Unavailable {
            pod: pod.to_owned(),
            detail,
        };
        let stream = tokio::net::UnixStream::connect(&self.config.socket)
            .await
            .map_err(|e| unavailable(format!("connect {}: {e}", self.config.socket.display())))?;
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .map_err(|e| unavailable(format!("HTTP/2 handshake: {e}")))?;
        let driver = tokio::spawn(connection);
        let body = wire::frame(&wire::fetch_request(&[&self.config.audience], selectors)).map_err(unavailable)?;
        let request = Request::post(format!("http://localhost{FETCH_JWT_SVIDS_PATH}"))
            .header(header::CONTENT_TYPE, "application/grpc")
            .header(header::TE, "trailers")
            .body(Full::new(body))
            .map_err(|e| unavailable(format!("request: {e}")))?;
        let result = async {
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| unavailable(format!("HTTP/2: {e}")))?;
            let (parts, body) = response.into_parts();
            if parts.status != http::StatusCode::OK {
                return Err(unavailable(format!("HTTP status {}", parts.status)));
            }
            // A trailers-only response carries its status in the headers.
            if let Some(status) = grpc_status(&parts.headers)
                && status.0 != code::OK
            {
                return Err(classify(pod, status));
            }
            let collected = http_body_util::Limited::new(body, MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| unavailable(format!("response body: {e}")))?;
            let trailers = collected.trailers().cloned().unwrap_or_default();
            let bytes = collected.to_bytes();
            match grpc_status(&trailers).or_else(|| grpc_status(&parts.headers)) {
                Some((code::OK, _)) => {}
                Some(status) => return Err(classify(pod, status)),
                None => return Err(unavailable("no grpc-status".to_owned())),
            }
            wire::fetch_response(wire::unframe(&bytes).map_err(unavailable)?).map_err(unavailable)
        }
        .await;
        driver.abort();
        result
    }
}

/// Exactly one SVID is the pod's identity; none or several are refusals.
fn pick(pod: String, selectors: &[Selector], mut svids: Vec<JwtSvid>) -> Result<Secret, Error> {
    match svids.len() {
        0 => Err(Error::NoSvid {
            pod,
            selectors: selectors
                .iter()
                .map(|s| format!("{}:{}", s.kind, s.value))
                .collect::<Vec<_>>()
                .join(","),
        }),
        1 => {
            let svid = svids.remove(0);
            if svid.token.expose().is_empty() {
                return Err(Error::Unavailable {
                    pod,
                    detail: "JWT-SVID without a token".to_owned(),
                });
            }
            Ok(svid.token)
        }
        count => Err(Error::Ambiguous {
            pod,
            count,
            ids: svids.iter().map(|s| s.spiffe_id.as_str()).collect::<Vec<_>>().join(","),
        }),
    }
}

fn grpc_status(headers: &HeaderMap) -> Option<(u32, String)> {
    let status = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    let message = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .map(percent_decode)
        .unwrap_or_default();
    Some((status, message))
}

/// grpc-message is percent-encoded.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(b) = text.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn classify(pod: &str, (status, message): (u32, String)) -> Error {
    let pod = pod.to_owned();
    match status {
        code::PERMISSION_DENIED | code::UNAUTHENTICATED => Error::Denied { pod, message },
        code::UNAVAILABLE | code::DEADLINE_EXCEEDED | code::RESOURCE_EXHAUSTED => Error::Unavailable {
            pod,
            detail: format!("gRPC status {status}: {message}"),
        },
        code => Error::Refused { pod, code, message },
    }
}

/// The identity exchanged at STS: a pod-bound service-account token, or the pod's JWT-SVID.
#[derive(Clone)]
pub enum IdentitySource {
    /// `--identity-source kubernetes`: TokenRequest.
    Kubernetes(crate::sa_token::Minter),
    /// `--identity-source spire`: the Delegated Identity API.
    Spire(Client),
}

impl IdentitySource {
    /// The web identity token of `workload`.
    pub async fn mint(&self, workload: &Workload) -> Result<Secret, crate::credentials::Error> {
        match self {
            IdentitySource::Kubernetes(minter) => Ok(minter.mint(workload).await?),
            IdentitySource::Spire(client) => Ok(client.mint(workload).await?),
        }
    }
}

impl From<crate::sa_token::Minter> for IdentitySource {
    fn from(minter: crate::sa_token::Minter) -> Self {
        IdentitySource::Kubernetes(minter)
    }
}

#[cfg(test)]
mod tests;
