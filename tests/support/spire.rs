//! A double of the SPIRE agent's Delegated Identity API (`FetchJWTSVIDs` only) on a Unix socket, and of
//! the SPIRE OIDC discovery provider.
//!
//! gRPC over hyper's HTTP/2 server; the protobuf messages are encoded and decoded here by hand from the
//! spire-api-sdk field numbers (`FetchJWTSVIDsRequest{audience=1, selectors=2}`,
//! `Selector{type=1, value=2}`, `FetchJWTSVIDsResponse{svids=1}`,
//! `JWTSVID{token=1, id=2, expires_at=3, issued_at=4, hint=5}`, `SPIFFEID{trust_domain=1, path=2}`),
//! independently of the agent's encoder. Entries match as SPIRE matches them: an entry's selectors must
//! all be among the workload's. Each match is a JWT-SVID signed with the double's own key
//! (`keys/spire-signer.pem`), `sub` = the entry's SPIFFE ID, `iss` = [`ISSUER`]. The discovery provider
//! serves `/.well-known/openid-configuration` and `/keys` on loopback TCP.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinHandle;

use super::jwt::{self, Signer};

/// The `iss` of the double's JWT-SVIDs (the SPIRE server's `jwt_issuer`).
pub const ISSUER: &str = "https://oidc.spire.test";

/// The trust domain.
pub const TRUST_DOMAIN: &str = "example.org";

/// PEM (PKCS#8) of the double's signing key.
pub const SPIRE_KEY_PEM: &str = include_str!("keys/spire-signer.pem");

/// The double's signing key.
pub fn signer() -> &'static Signer {
    static KEY: OnceLock<Signer> = OnceLock::new();
    KEY.get_or_init(|| Signer::from_pem(SPIRE_KEY_PEM))
}

/// The SPIFFE ID SPIRE's Kubernetes registrations conventionally give a service account.
pub fn spiffe_id(namespace: &str, service_account: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{service_account}")
}

/// One `FetchJWTSVIDs` call as the double received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetch {
    /// The audiences asked for.
    pub audience: Vec<String>,
    /// The selectors, as `type:value`.
    pub selectors: Vec<String>,
}

#[derive(Default)]
struct State {
    /// (selectors as `type:value`, SPIFFE ID path).
    entries: Vec<(Vec<String>, String)>,
    deny: bool,
    fetches: Vec<Fetch>,
}

/// The double. Dropping it stops both servers.
pub struct FakeSpire {
    state: Arc<Mutex<State>>,
    socket: PathBuf,
    oidc: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for FakeSpire {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl FakeSpire {
    /// Listens on `socket` (the admin socket) and on `127.0.0.1:0` (the OIDC discovery provider).
    pub async fn start(socket: &Path) -> std::io::Result<Self> {
        let _ = std::fs::remove_file(socket);
        let admin = UnixListener::bind(socket)?;
        let oidc = TcpListener::bind("127.0.0.1:0").await?;
        let oidc_addr = oidc.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let grpc = tokio::spawn({
            let state = state.clone();
            async move {
                loop {
                    let Ok((stream, _)) = admin.accept().await else {
                        continue;
                    };
                    let state = state.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |request| {
                            let state = state.clone();
                            async move { Ok::<_, std::convert::Infallible>(handle(&state, request).await) }
                        });
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            }
        });
        let jwks_uri = format!("http://{oidc_addr}/keys");
        let discovery = tokio::spawn(super::wire::serve(oidc, None, move |request: Request<Incoming>| {
            let jwks_uri = jwks_uri.clone();
            async move {
                let body = match request.uri().path() {
                    "/.well-known/openid-configuration" => json!({
                        "issuer": ISSUER,
                        "jwks_uri": jwks_uri,
                        "authorization_endpoint": "",
                        "response_types_supported": ["id_token"],
                        "subject_types_supported": [],
                        "id_token_signing_alg_values_supported": ["RS256"],
                    }),
                    "/keys" => signer().jwks(),
                    _ => {
                        let mut response = Response::new(Full::new(Bytes::new()));
                        *response.status_mut() = StatusCode::NOT_FOUND;
                        return response;
                    }
                };
                let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
                response
                    .headers_mut()
                    .insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                response
            }
        }));
        Ok(Self {
            state,
            socket: socket.to_owned(),
            oidc: oidc_addr,
            tasks: vec![grpc, discovery],
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The admin socket's path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The OIDC discovery provider's base URL (what IAM fetches; `issuer` in it is [`ISSUER`]).
    pub fn discovery_url(&self) -> String {
        format!("http://{}", self.oidc)
    }

    /// Registers an entry: `selectors` as `type:value` (e.g. `k8s:ns:apps`), `id` its SPIFFE ID.
    pub fn register(&self, selectors: &[&str], id: &str) {
        let path = id
            .strip_prefix(&format!("spiffe://{TRUST_DOMAIN}"))
            .expect("an ID in the double's trust domain")
            .to_owned();
        let selectors = selectors.iter().map(|s| (*s).to_owned()).collect();
        self.lock().entries.push((selectors, path));
    }

    /// Answers every call PermissionDenied (the caller is not an authorized delegate).
    pub fn deny(&self, deny: bool) {
        self.lock().deny = deny;
    }

    /// Every call so far.
    pub fn fetches(&self) -> Vec<Fetch> {
        self.lock().fetches.clone()
    }
}

async fn handle(state: &Mutex<State>, request: Request<Incoming>) -> Response<GrpcBody> {
    let lock = || state.lock().unwrap_or_else(|e| e.into_inner());
    if request.uri().path() != "/spire.api.agent.delegatedidentity.v1.DelegatedIdentity/FetchJWTSVIDs" {
        return trailers_only(12, "unknown method");
    }
    if request.headers().get(http::header::CONTENT_TYPE) != Some(&HeaderValue::from_static("application/grpc")) {
        return trailers_only(3, "content-type is not application/grpc");
    }
    let Ok(body) = request.into_body().collect().await else {
        return trailers_only(13, "body");
    };
    let body = body.to_bytes();
    let Some(message) = unframe(&body) else {
        return trailers_only(13, "bad frame");
    };
    let Some(fetch) = decode_request(message) else {
        return trailers_only(13, "bad message");
    };
    lock().fetches.push(fetch.clone());
    if lock().deny {
        return trailers_only(7, "caller is not configured as an authorized delegate");
    }
    if fetch.audience.is_empty() || fetch.selectors.is_empty() {
        return trailers_only(3, "audience and selectors are required");
    }
    let matched: Vec<String> = lock()
        .entries
        .iter()
        .filter(|(selectors, _)| selectors.iter().all(|s| fetch.selectors.contains(s)))
        .map(|(_, path)| path.clone())
        .collect();
    let now = jwt::now_unix();
    let mut response = BytesMut::new();
    for path in matched {
        let sub = format!("spiffe://{TRUST_DOMAIN}{path}");
        let token = signer().sign_value(
            &json!({ "alg": "RS256", "kid": signer().kid(), "typ": "JWT" }),
            &json!({ "aud": fetch.audience, "exp": now + 300, "iat": now, "iss": ISSUER, "sub": sub }),
        );
        let mut id = BytesMut::new();
        put_bytes(&mut id, 1, TRUST_DOMAIN.as_bytes());
        put_bytes(&mut id, 2, path.as_bytes());
        let mut svid = BytesMut::new();
        put_bytes(&mut svid, 1, token.as_bytes());
        put_bytes(&mut svid, 2, &id);
        put_varint_field(&mut svid, 3, u64::try_from(now + 300).unwrap_or_default());
        put_varint_field(&mut svid, 4, u64::try_from(now).unwrap_or_default());
        put_bytes(&mut response, 1, &svid);
    }
    let mut framed = BytesMut::new();
    framed.put_u8(0);
    framed.put_u32(u32::try_from(response.len()).expect("small"));
    framed.put_slice(&response);
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    grpc_response(
        vec![Frame::data(framed.freeze()), Frame::trailers(trailers)],
        HeaderMap::new(),
    )
}

type GrpcBody = http_body_util::StreamBody<
    futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, std::convert::Infallible>>>,
>;

fn grpc_response(frames: Vec<Frame<Bytes>>, headers: HeaderMap) -> Response<GrpcBody> {
    let frames: Vec<Result<_, std::convert::Infallible>> = frames.into_iter().map(Ok).collect();
    let mut response = Response::new(http_body_util::StreamBody::new(futures::stream::iter(frames)));
    response
        .headers_mut()
        .insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    response.headers_mut().extend(headers);
    response
}

/// A trailers-only response: the status in the headers, no body.
fn trailers_only(code: u32, message: &str) -> Response<GrpcBody> {
    let mut headers = HeaderMap::new();
    headers.insert("grpc-status", HeaderValue::from_str(&code.to_string()).expect("digits"));
    let encoded = message.replace('%', "%25").replace(' ', "%20");
    headers.insert("grpc-message", HeaderValue::from_str(&encoded).expect("ascii"));
    grpc_response(Vec::new(), headers)
}

fn unframe(body: &[u8]) -> Option<&[u8]> {
    let (prefix, message) = body.split_at_checked(5)?;
    let len = u32::from_be_bytes(prefix[1..5].try_into().ok()?) as usize;
    (prefix[0] == 0 && message.len() == len).then_some(message)
}

fn put_varint(out: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        out.put_u8((v & 0x7f) as u8 | 0x80);
        v >>= 7;
    }
    out.put_u8(v as u8);
}

fn put_bytes(out: &mut BytesMut, field: u64, bytes: &[u8]) {
    put_varint(out, field << 3 | 2);
    put_varint(out, bytes.len() as u64);
    out.put_slice(bytes);
}

fn put_varint_field(out: &mut BytesMut, field: u64, v: u64) {
    put_varint(out, field << 3);
    put_varint(out, v);
}

fn get_varint(input: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = input.split_first()?;
        *input = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Length-delimited fields only (all the request has): (field, bytes).
fn len_fields(mut input: &[u8]) -> Option<Vec<(u64, &[u8])>> {
    let mut out = Vec::new();
    while !input.is_empty() {
        let key = get_varint(&mut input)?;
        if key & 7 != 2 {
            return None;
        }
        let len = usize::try_from(get_varint(&mut input)?).ok()?;
        let (value, rest) = input.split_at_checked(len)?;
        input = rest;
        out.push((key >> 3, value));
    }
    Some(out)
}

fn decode_request(message: &[u8]) -> Option<Fetch> {
    let mut fetch = Fetch {
        audience: Vec::new(),
        selectors: Vec::new(),
    };
    for (field, value) in len_fields(message)? {
        match field {
            1 => fetch.audience.push(String::from_utf8(value.to_vec()).ok()?),
            2 => {
                let (mut kind, mut val) = (String::new(), String::new());
                for (f, v) in len_fields(value)? {
                    match f {
                        1 => kind = String::from_utf8(v.to_vec()).ok()?,
                        2 => val = String::from_utf8(v.to_vec()).ok()?,
                        _ => return None,
                    }
                }
                fetch.selectors.push(format!("{kind}:{val}"));
            }
            _ => return None,
        }
    }
    Some(fetch)
}

/// What IAM does with an OIDC provider: reads the discovery document at `base`, then its `jwks_uri`.
/// Returns (issuer, JWKS).
pub async fn discover(base: &str) -> (String, Value) {
    let configuration: Value = get_json(&format!("{base}/.well-known/openid-configuration")).await;
    let issuer = configuration["issuer"].as_str().expect("issuer").to_owned();
    let jwks = get_json(configuration["jwks_uri"].as_str().expect("jwks_uri")).await;
    (issuer, jwks)
}

async fn get_json(url: &str) -> Value {
    let uri: http::Uri = url.parse().expect("url");
    let addr = uri.authority().expect("authority").as_str().to_owned();
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(connection);
    let request = Request::get(uri.path())
        .header(http::header::HOST, uri.authority().expect("authority").as_str())
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = sender.send_request(request).await.expect("response");
    assert_eq!(response.status(), StatusCode::OK, "{url}");
    let body = response.into_body().collect().await.expect("body").to_bytes();
    serde_json::from_slice(&body).expect("JSON")
}
